//! Names two ShardedServices of one namespace would both generate. Shard objects are named
//! `<name>-<shard>`, so ShardedService `x-1` and shard 1 of `x` both want a Service `x-1`;
//! applied with force, each reconcile would take it from the other. The older ShardedService
//! (by `creationTimestamp`, then name) keeps the name; the younger one is refused with the
//! `Invalid` condition and applies nothing until the names differ. Pure, so both controllers
//! decide alike from their caches.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    Resource,
};
use kube::ResourceExt;
use shardmesh_api::{labels, validate::FieldError, ShardedService};

/// How soon a refused ShardedService looks again: the older one's deletion or shard change
/// does not trigger its reconcile, so it polls for the names to come free.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Collisions reported per ShardedService; more would only lengthen the condition.
const MAX_REPORTED: usize = 5;

/// The validation's bound on `spec.shards`, so an object past validation cannot make the
/// enumeration large.
const MAX_SHARDS: i32 = 1024;

/// One object a ShardedService generates.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generated {
    /// Its kind, e.g. `Service`.
    pub kind: &'static str,
    /// Its name in the ShardedService's namespace.
    pub name: String,
    /// The shard it belongs to: it exists because `spec.shards` is above this.
    pub shard: Option<u32>,
}

/// Kind of the shard-map slices (a custom resource: no `k8s_openapi::Resource::KIND`).
const SLICE_KIND: &str = "ShardMapSlice";

impl Generated {
    fn of<K: Resource>(name: String, shard: Option<u32>) -> Self {
        Generated {
            kind: K::KIND,
            name,
            shard,
        }
    }

    fn describe(&self) -> String {
        match self.shard {
            Some(i) => format!("shard {i}'s {} {:?}", self.kind, self.name),
            None => format!("{} {:?}", self.kind, self.name),
        }
    }
}

/// Every object `svc` generates by name (build.rs, and shardmap.rs for the shard map and the
/// members' access): per shard with workloads (`spec.shards`, or the count being resharded from
/// while removed shards serve handoff reads) and once per service. Pods and their member
/// Leases are named `<StatefulSet>-<ordinal>`, so they can only collide where the
/// StatefulSets do.
pub fn generated(svc: &ShardedService) -> Vec<Generated> {
    let name = svc.name_any();
    let mut out = vec![
        Generated::of::<Service>(name.clone(), None),
        Generated::of::<ConfigMap>(labels::shardmap_name(&name), None),
        Generated::of::<Role>(labels::shardmap_reader_name(&name), None),
    ];
    let from = svc
        .status
        .as_ref()
        .and_then(|s| s.resharding.as_ref())
        .map_or(0, |r| r.from);
    let shards = svc.spec.shards.max(from).clamp(0, MAX_SHARDS) as u32;
    for i in 0..shards {
        let shard = labels::shard_object_name(&name, i);
        out.push(Generated::of::<StatefulSet>(shard.clone(), Some(i)));
        out.push(Generated::of::<Service>(shard.clone(), Some(i)));
        out.push(Generated::of::<PodDisruptionBudget>(shard.clone(), Some(i)));
        let member = labels::member_account_name(&name, i);
        out.push(Generated::of::<ServiceAccount>(member.clone(), Some(i)));
        out.push(Generated::of::<Role>(member.clone(), Some(i)));
        out.push(Generated::of::<RoleBinding>(member, Some(i)));
        out.push(Generated {
            kind: SLICE_KIND,
            name: shard,
            shard: Some(i),
        });
        if svc.spec.leader_election.enabled {
            out.push(Generated::of::<Lease>(
                labels::leader_lease_name(&name, i),
                Some(i),
            ));
        }
    }
    out
}

/// Whether `a` keeps names it shares with `b`: created first, or at the same second with the
/// smaller name.
fn precedes(a: &ShardedService, b: &ShardedService) -> bool {
    let key = |s: &ShardedService| (s.metadata.creation_timestamp.clone(), s.name_any());
    key(a) < key(b)
}

/// The names `svc` shares with an older ShardedService among `others` (any namespace; the
/// reflector's whole store will do), each as the field that makes `svc` generate it: its
/// `metadata.name`, or `spec.shards` for a shard object. Empty: nothing collides.
pub fn collisions<'a>(
    svc: &ShardedService,
    others: impl IntoIterator<Item = &'a ShardedService>,
) -> Vec<FieldError> {
    let (ns, name) = (svc.namespace(), svc.name_any());
    let mut mine: Option<BTreeMap<(&'static str, String), Generated>> = None;
    let mut errors = Vec::new();
    for other in others {
        let theirs = other.name_any();
        // Every generated name is the service's name or starts with it and '-', so two
        // services share one only when one's name starts with the other's.
        let related = name.starts_with(&theirs) || theirs.starts_with(&name);
        if other.namespace() != ns || theirs == name || !related || !precedes(other, svc) {
            continue;
        }
        let mine = mine.get_or_insert_with(|| {
            generated(svc)
                .into_iter()
                .map(|g| ((g.kind, g.name.clone()), g))
                .collect()
        });
        for t in generated(other) {
            if let Some(m) = mine.get(&(t.kind, t.name.clone())) {
                errors.push(collision(m, &theirs, &t));
            }
        }
    }
    errors.truncate(MAX_REPORTED);
    errors
}

fn collision(mine: &Generated, other: &str, theirs: &Generated) -> FieldError {
    let theirs_is = match theirs.shard {
        Some(j) => format!("shard {j}'s {}", theirs.kind),
        None => format!("the {}", theirs.kind),
    };
    let (path, fix) = match (mine.shard, theirs.shard) {
        (Some(i), _) => (
            "spec.shards",
            format!("set spec.shards to {i} or fewer, or rename this ShardedService"),
        ),
        (None, Some(j)) => (
            "metadata.name",
            format!("rename this ShardedService, or lower {other}'s spec.shards to {j}"),
        ),
        (None, None) => ("metadata.name", "rename this ShardedService".to_string()),
    };
    FieldError {
        path: path.into(),
        message: format!(
            "{} is also {theirs_is} of ShardedService {other}, which is older and keeps it; \
             nothing is applied for this ShardedService until the names differ: {fix}",
            mine.describe()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build, capabilities::Capabilities, shardmap};
    use serde_json::json;
    use std::collections::BTreeSet;

    fn svc(name: &str, shards: i32, created: &str) -> ShardedService {
        serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                         "creationTimestamp": created},
            "spec": {"shards": shards, "replicasPerShard": 2, "port": 8080,
                     "template": {"spec": {"containers": [{"name": "app", "image": "demo:1"}]}}}
        }))
        .expect("fixture")
    }

    const EARLY: &str = "2024-01-01T10:00:00Z";
    const LATE: &str = "2024-01-01T11:00:00Z";

    fn paths(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn distinct_names_do_not_collide() {
        let x = svc("x", 1, EARLY);
        let x1 = svc("x-1", 3, LATE);
        let other = svc("y", 4, EARLY);
        for s in [&x, &x1, &other] {
            assert_eq!(collisions(s, [&x, &x1, &other]), vec![], "{}", s.name_any());
        }
        // The same name in another namespace is another object.
        let mut elsewhere = svc("x", 4, EARLY);
        elsewhere.metadata.namespace = Some("other".into());
        assert_eq!(collisions(&x1, [&elsewhere]), vec![]);
    }

    #[test]
    fn the_younger_of_x_and_x_1_is_refused_naming_the_object_and_the_other() {
        let x = svc("x", 2, EARLY);
        let x1 = svc("x-1", 1, LATE);
        assert_eq!(
            collisions(&x, [&x, &x1]),
            vec![],
            "the older keeps its names"
        );
        let errors = collisions(&x1, [&x, &x1]);
        assert_eq!(paths(&errors), ["metadata.name"]);
        let msg = &errors[0].message;
        assert!(
            msg.contains(r#"Service "x-1""#)
                && msg.contains("ShardedService x,")
                && msg.contains("shard 1's Service")
                && msg.contains("lower x's spec.shards to 1"),
            "{msg}"
        );
    }

    #[test]
    fn raising_the_shard_count_into_an_older_name_is_refused() {
        let x1 = svc("x-1", 1, EARLY);
        let mut x = svc("x", 1, LATE);
        assert_eq!(collisions(&x, [&x1]), vec![]);
        x.spec.shards = 2;
        let errors = collisions(&x, [&x1]);
        assert_eq!(paths(&errors), ["spec.shards"]);
        assert!(
            errors[0].message.contains(r#"shard 1's Service "x-1""#)
                && errors[0].message.contains("ShardedService x-1,")
                && errors[0].message.contains("set spec.shards to 1 or fewer"),
            "{}",
            errors[0].message
        );
        assert_eq!(collisions(&x1, [&x]), vec![], "x-1 is older");
        // Shards still serving handoff reads after lowering the count keep their names too.
        x.spec.shards = 1;
        x.status = serde_json::from_value(
            json!({"resharding": {"phase": "Draining", "from": 2, "to": 1}}),
        )
        .expect("status");
        assert_eq!(paths(&collisions(&x, [&x1])), ["spec.shards"]);
    }

    #[test]
    fn created_in_the_same_second_the_smaller_name_is_older() {
        let x = svc("x", 2, EARLY);
        let x1 = svc("x-1", 1, EARLY);
        assert_eq!(collisions(&x, [&x1]), vec![]);
        assert_eq!(paths(&collisions(&x1, [&x])), ["metadata.name"]);
        // The timestamp decides before the name.
        let x = svc("x", 2, LATE);
        assert_eq!(paths(&collisions(&x, [&x1])), ["spec.shards"]);
        assert_eq!(collisions(&x1, [&x]), vec![]);
    }

    #[test]
    fn every_object_the_controllers_apply_is_enumerated() {
        let mut s = svc("orders", 3, EARLY);
        s.spec.leader_election.enabled = true;
        let named =
            |kind: &'static str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                (kind, m.name.clone().unwrap_or_default())
            };
        let d = build::build(&s, &Capabilities::latest()).expect("builds");
        let mut applied: BTreeSet<(&str, String)> = BTreeSet::new();
        applied.extend(
            d.stateful_sets
                .iter()
                .map(|o| named(StatefulSet::KIND, &o.metadata)),
        );
        applied.extend(
            d.shard_services
                .iter()
                .map(|o| named(Service::KIND, &o.metadata)),
        );
        applied.insert(named(Service::KIND, &d.routing_service.metadata));
        applied.extend(
            d.disruption_budgets
                .iter()
                .map(|o| named(PodDisruptionBudget::KIND, &o.metadata)),
        );
        let cm = shardmap::index(&s, 1).expect("index");
        applied.insert(named(ConfigMap::KIND, &cm.metadata));
        // Every shard listed, as the shard-map controller publishes it.
        let map = shardmesh_api::shardmap::ShardMap {
            shards: (0..3)
                .map(|index| shardmesh_api::shardmap::Shard {
                    index,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let next = shardmap::publication(map, None, shardmap::settings(&s), 0);
        for slice in shardmap::slice_objects(&s, &next).expect("slices") {
            applied.insert(named(SLICE_KIND, &slice.metadata));
        }
        for x in &d.access.shards {
            applied.insert(named(ServiceAccount::KIND, &x.account.metadata));
            applied.insert(named(Role::KIND, &x.role.metadata));
            applied.insert(named(RoleBinding::KIND, &x.binding.metadata));
        }
        applied.insert(named(Role::KIND, &d.access.reader_role.metadata));
        for l in &d.leader_leases {
            applied.insert(named(Lease::KIND, &l.metadata));
        }
        let enumerated: BTreeSet<(&str, String)> = generated(&s)
            .into_iter()
            .map(|g| (g.kind, g.name))
            .collect();
        assert_eq!(applied, enumerated);
    }
}
