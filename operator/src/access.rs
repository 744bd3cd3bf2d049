//! Pure builders of what a ShardedService's pods are allowed and contend for: the member
//! ServiceAccount with a Role allowing exactly their Lease writes and the shard-map read, a
//! reader Role client pods can be bound to, and (when the service elects leaders) one leader
//! Lease per shard. [`crate::build`] returns them with everything else the service owns; the
//! operator applies them (not the chart) because the Role names the service's pods, which
//! change with `shards`/`replicasPerShard`, and the account must exist in every namespace a
//! ShardedService is created in.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::ServiceAccount,
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use shardmesh_api::{labels, ShardedService};

/// `app.kubernetes.io/component` of the access objects.
const COMPONENT_ACCESS: &str = "access";
/// `app.kubernetes.io/component` of the leader Leases.
const COMPONENT_LEADER: &str = "leader";

/// The access objects of one service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Access {
    /// The member pods' ServiceAccount.
    pub account: ServiceAccount,
    /// What member pods may do: their own Leases, the leader Leases, the map.
    pub member_role: Role,
    /// What client pods bound to it may do: read the map.
    pub reader_role: Role,
    /// Binds the member Role to the member ServiceAccount.
    pub binding: RoleBinding,
}

/// Metadata of an object the operator owns for `service`, labelled with its component.
pub(crate) fn meta(
    name: String,
    ns: &str,
    service: &str,
    owner: &OwnerReference,
    component: &str,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_string()),
        labels: Some(BTreeMap::from([
            (labels::SERVICE.to_string(), service.to_string()),
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
            (labels::COMPONENT.to_string(), component.to_string()),
        ])),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Pod names of a service: StatefulSet `<name>-<shard>` names its pods `<name>-<shard>-<ordinal>`.
pub fn pod_names(name: &str, shards: u32, replicas: u32) -> Vec<String> {
    (0..shards)
        .flat_map(|s| {
            (0..replicas).map(move |r| format!("{}-{r}", labels::shard_object_name(name, s)))
        })
        .collect()
}

/// The per-shard leader Leases of a service that elects leaders (none otherwise). The operator
/// creates them, owned by the ShardedService, so they outlive every pod: their transition count
/// is the fencing epoch and must never restart. Only metadata is applied; the sidecars write
/// the spec.
pub fn leader_leases(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shards: u32,
) -> Vec<Lease> {
    if !svc.spec.leader_election.enabled {
        return Vec::new();
    }
    (0..shards)
        .map(|i| {
            let mut m = meta(
                labels::leader_lease_name(name, i),
                ns,
                name,
                owner,
                COMPONENT_LEADER,
            );
            let l = m.labels.get_or_insert_with(BTreeMap::new);
            l.insert(labels::SHARD.to_string(), i.to_string());
            l.insert(
                labels::LEASE_ROLE.to_string(),
                labels::LEASE_ROLE_LEADER.to_string(),
            );
            Lease {
                metadata: m,
                spec: None,
            }
        })
        .collect()
}

fn rule(group: &str, resource: &str, verbs: &[&str], names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(vec![resource.to_string()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        resource_names: names,
        ..PolicyRule::default()
    }
}

/// Access objects of a service: the member ServiceAccount, its Role and RoleBinding, and the
/// reader Role for client pods.
///
/// The member Role allows `create` on Leases without a name restriction (Kubernetes cannot
/// restrict creation by name), and `get`/`update`/`delete` only of the Leases named after the
/// service's pods; the shard map's slices are read by label (see
/// [`labels::shardmap_reader_name`]). `shards` is the
/// number of shards with workloads (see [`crate::reshard::workload_shards`]): removed shards keep
/// renewing their Leases while they serve handoff reads.
pub fn access(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shards: u32,
) -> Access {
    let account = labels::member_account_name(name);
    let replicas = u32::try_from(svc.spec.replicas_per_shard).unwrap_or(0);
    let read_map = rule(
        labels::GROUP,
        "shardmapslices",
        &["get", "list", "watch"],
        None,
    );
    let mut rules = vec![
        rule("coordination.k8s.io", "leases", &["create"], None),
        rule(
            "coordination.k8s.io",
            "leases",
            &["get", "update", "delete"],
            Some(pod_names(name, shards, replicas)),
        ),
        read_map.clone(),
    ];
    if svc.spec.leader_election.enabled {
        // Contend for and renew the shard leader Leases; never delete them (the transition
        // count is the fencing epoch).
        rules.push(rule(
            "coordination.k8s.io",
            "leases",
            &["get", "update"],
            Some(
                (0..shards)
                    .map(|i| labels::leader_lease_name(name, i))
                    .collect(),
            ),
        ));
    }
    let member_role = Role {
        metadata: meta(account.clone(), ns, name, owner, COMPONENT_ACCESS),
        rules: Some(rules),
    };
    let reader_role = Role {
        metadata: meta(
            labels::shardmap_reader_name(name),
            ns,
            name,
            owner,
            COMPONENT_ACCESS,
        ),
        rules: Some(vec![read_map]),
    };
    let binding = RoleBinding {
        metadata: meta(account.clone(), ns, name, owner, COMPONENT_ACCESS),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: account.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account.clone(),
            namespace: Some(ns.to_string()),
            ..Subject::default()
        }]),
    };
    let sa = ServiceAccount {
        metadata: meta(account, ns, name, owner, COMPONENT_ACCESS),
        ..ServiceAccount::default()
    };
    Access {
        account: sa,
        member_role,
        reader_role,
        binding,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shardmap::tests::svc;
    use kube::{Resource, ResourceExt};

    fn access_of(s: &ShardedService, shards: u32) -> Access {
        let owner = s.controller_owner_ref(&()).unwrap();
        access(s, "orders", "shop", &owner, shards)
    }

    fn leader_leases_of(s: &ShardedService, shards: u32) -> Vec<Lease> {
        let owner = s.controller_owner_ref(&()).unwrap();
        leader_leases(s, "orders", "shop", &owner, shards)
    }

    #[test]
    fn leader_leases_and_rights_only_when_enabled() {
        assert!(leader_leases_of(&svc(), 2).is_empty());
        let member = access_of(&svc(), 2).member_role;
        assert_eq!(member.rules.unwrap().len(), 3);
        let mut s = svc();
        s.spec.leader_election.enabled = true;
        let leases = leader_leases_of(&s, 2);
        let names: Vec<_> = leases.iter().map(|l| l.name_any()).collect();
        assert_eq!(names, ["orders-0-leader", "orders-1-leader"]);
        assert_eq!(leases[1].labels()[labels::SHARD], "1");
        assert_eq!(leases[1].labels()[labels::LEASE_ROLE], "leader");
        assert_eq!(leases[1].labels()[labels::SERVICE], "orders");
        assert_eq!(
            leases[1].metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
        assert!(leases[1].spec.is_none(), "the sidecars own the spec");
        let rules = access_of(&s, 2).member_role.rules.unwrap();
        assert_eq!(rules[3].verbs, vec!["get", "update"]);
        assert_eq!(
            rules[3].resource_names.as_deref().unwrap(),
            ["orders-0-leader", "orders-1-leader"]
        );
    }

    #[test]
    fn member_role_names_exactly_the_pods_and_reads_the_map() {
        let Access {
            account: sa,
            member_role: member,
            reader_role: reader,
            binding,
        } = access_of(&svc(), 2);
        assert_eq!(sa.metadata.name.as_deref(), Some("orders-shardmesh-member"));
        let rules = member.rules.unwrap();
        assert_eq!(rules[0].verbs, vec!["create"]);
        assert_eq!(rules[0].resource_names, None);
        assert_eq!(
            rules[1].resource_names.as_deref().unwrap(),
            ["orders-0-0", "orders-0-1", "orders-1-0", "orders-1-1"]
        );
        assert_eq!(rules[1].verbs, vec!["get", "update", "delete"]);
        // The map's slices: read by the service's label, so by no name.
        assert_eq!(
            (
                rules[2].resources.as_deref().unwrap(),
                rules[2].resource_names.as_ref()
            ),
            (&["shardmapslices".to_string()][..], None)
        );
        assert_eq!(rules[2].api_groups.as_deref().unwrap(), ["shardmesh.io"]);
        assert_eq!(reader.rules.unwrap(), vec![rules[2].clone()]);
        assert_eq!(binding.role_ref.name, "orders-shardmesh-member");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("orders-shardmesh-member", Some("shop"))
        );
    }
}
