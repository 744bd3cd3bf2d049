//! The shard-map controller: turns the membership Leases of each ShardedService into one small
//! ConfigMap `<name>-shardmap` that every calling sidecar watches.
//!
//! - A Lease is a live member while `renewTime + leaseDurationSeconds` is in the future; an
//!   expired one is a dead member (the sidecar stopped renewing: app not ready, pod frozen or cut
//!   off). Sidecars delete their Lease on graceful shutdown, so departures are usually instant.
//! - The map's `epoch` increases on every membership change and never otherwise; it is read back
//!   from the published ConfigMap, so it survives operator restarts and never goes backwards.
//! - Reconciles come from Lease and ShardedService events and from a requeue at the next expiry
//!   (no event marks a Lease expiring).
//! - Per service it also applies the pods' ServiceAccount with a Role allowing exactly their
//!   Lease writes and the shard-map read, and a reader Role client pods can be bound to. The
//!   operator does this (not the chart) because the Role names the service's pods, which change
//!   with `shards`/`replicasPerShard`, and the account must exist in every namespace a
//!   ShardedService is created in.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        controller::{Action, Controller},
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};
use shardmesh_api::{
    labels,
    shardmap::{Member, Shard, ShardMap},
    ShardedService,
};
use tracing::{info, warn};

use crate::{controller::backoff, Error, Result};

/// Field manager of the shard-map controller's writes (separate from the main reconciler's so
/// neither's server-side apply removes the other's fields).
pub const FIELD_MANAGER: &str = "shardmesh-shardmap";
/// `app.kubernetes.io/component` of the objects this controller owns.
const COMPONENT: &str = "shardmap";
/// Longest wait between reconciles of a service (a safety net; events drive the rest).
const RESYNC: Duration = Duration::from_secs(300);
/// Slack after an expiry before re-evaluating, so the Lease is past its end when looked at.
const EXPIRY_SLACK: Duration = Duration::from_millis(500);

/// A computed shard map and when it next needs a look without any event.
#[derive(Clone, Debug, PartialEq)]
pub struct Computed {
    /// The map to publish.
    pub map: ShardMap,
    /// Earliest expiry among the live members.
    pub next_expiry: Option<Timestamp>,
}

/// When a Lease stops being live (`renewTime + leaseDurationSeconds`), if it names a holder.
pub fn lease_expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let renew = spec.renew_time.as_ref()?.0;
    let secs = spec.lease_duration_seconds?;
    renew
        .checked_add(SignedDuration::from_secs(i64::from(secs.max(0))))
        .ok()
}

/// The member a live Lease of a service with `shards` shards stands for, with its shard and
/// expiry; `None` for Leases that are expired, being deleted, out of range or malformed.
fn live_member(lease: &Lease, shards: u32, now: Timestamp) -> Option<(u32, Member, Timestamp)> {
    if lease.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let expiry = lease_expiry(lease).filter(|e| *e > now)?;
    let shard: u32 = lease.labels().get(labels::SHARD)?.parse().ok()?;
    if shard >= shards {
        return None;
    }
    let address = lease.annotations().get(labels::LEASE_ADDRESS)?;
    address.parse::<SocketAddr>().ok()?;
    Some((
        shard,
        Member {
            pod: lease.name_any(),
            address: address.clone(),
        },
        expiry,
    ))
}

/// The shard map of a service with `shards` shards from its Leases at `now`. The epoch is the
/// previous one when the membership is unchanged, one more when it changed (or the shard
/// count did), and 1 for the first map.
pub fn compute(shards: u32, leases: &[Lease], now: Timestamp, prev: Option<&ShardMap>) -> Computed {
    let mut members: Vec<Vec<Member>> = vec![Vec::new(); shards as usize];
    let mut next_expiry: Option<Timestamp> = None;
    for lease in leases {
        if let Some((shard, member, expiry)) = live_member(lease, shards, now) {
            members[shard as usize].push(member);
            next_expiry = Some(next_expiry.map_or(expiry, |e| e.min(expiry)));
        }
    }
    let shards: Vec<Shard> = members
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            m.sort();
            m.dedup_by(|a, b| a.pod == b.pod);
            Shard {
                index: i as u32,
                members: m,
            }
        })
        .collect();
    let epoch = match prev {
        None => 1,
        Some(p) if p.shards == shards => p.epoch,
        Some(p) => p.epoch.saturating_add(1),
    };
    Computed {
        map: ShardMap { epoch, shards },
        next_expiry,
    }
}

/// How long to wait before looking again: just past the next expiry, at most [`RESYNC`].
pub fn requeue_after(next_expiry: Option<Timestamp>, now: Timestamp) -> Duration {
    next_expiry
        .and_then(|e| Duration::try_from(e.duration_since(now)).ok())
        .map_or(RESYNC, |d| (d + EXPIRY_SLACK).min(RESYNC))
}

/// Pod names of a service: StatefulSet `<name>-<shard>` names its pods `<name>-<shard>-<ordinal>`.
pub fn pod_names(name: &str, shards: u32, replicas: u32) -> Vec<String> {
    (0..shards)
        .flat_map(|s| {
            (0..replicas).map(move |r| format!("{}-{r}", labels::shard_object_name(name, s)))
        })
        .collect()
}

fn meta(name: String, ns: &str, service: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_string()),
        labels: Some(BTreeMap::from([
            (labels::SERVICE.to_string(), service.to_string()),
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
            (labels::COMPONENT.to_string(), COMPONENT.to_string()),
        ])),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The published shard-map ConfigMap.
pub fn configmap(svc: &ShardedService, map: &ShardMap) -> Result<ConfigMap> {
    let (name, ns, owner) = identity(svc)?;
    let json = serde_json::to_string(map).map_err(|source| Error::Serialize {
        what: "shard map".into(),
        source,
    })?;
    Ok(ConfigMap {
        metadata: meta(labels::shardmap_name(&name), &ns, &name, &owner),
        data: Some(BTreeMap::from([
            (labels::SHARDMAP_KEY.to_string(), json),
            (
                labels::SHARDMAP_HEADER_KEY.to_string(),
                svc.spec.shard_key.header.to_ascii_lowercase(),
            ),
        ])),
        ..ConfigMap::default()
    })
}

fn identity(svc: &ShardedService) -> Result<(String, String, OwnerReference)> {
    let owner = svc
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let ns = svc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Ok((svc.name_any(), ns, owner))
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
/// service's pods; the shard map is readable by name only (list/watch with a
/// `metadata.name` field selector are authorized against `resourceNames`).
pub fn access_objects(svc: &ShardedService) -> Result<(ServiceAccount, Role, Role, RoleBinding)> {
    let (name, ns, owner) = identity(svc)?;
    let account = labels::member_account_name(&name);
    let shards = u32::try_from(svc.spec.shards).unwrap_or(0);
    let replicas = u32::try_from(svc.spec.replicas_per_shard).unwrap_or(0);
    let map_name = vec![labels::shardmap_name(&name)];
    let read_map = rule("", "configmaps", &["get", "list", "watch"], Some(map_name));
    let member_role = Role {
        metadata: meta(account.clone(), &ns, &name, &owner),
        rules: Some(vec![
            rule("coordination.k8s.io", "leases", &["create"], None),
            rule(
                "coordination.k8s.io",
                "leases",
                &["get", "update", "delete"],
                Some(pod_names(&name, shards, replicas)),
            ),
            read_map.clone(),
        ]),
    };
    let reader_role = Role {
        metadata: meta(labels::shardmap_reader_name(&name), &ns, &name, &owner),
        rules: Some(vec![read_map]),
    };
    let binding = RoleBinding {
        metadata: meta(account.clone(), &ns, &name, &owner),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: account.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account.clone(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    let sa = ServiceAccount {
        metadata: meta(account, &ns, &name, &owner),
        ..ServiceAccount::default()
    };
    Ok((sa, member_role, reader_role, binding))
}

/// State shared by the reconciles.
pub struct Context {
    client: Client,
    leases: Store<Lease>,
    failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<ShardedService>, u32>>,
    /// Per service: (uid, generation) whose access objects were applied, and when.
    access_applied:
        std::sync::Mutex<std::collections::HashMap<ObjectRef<ShardedService>, AccessStamp>>,
}

type AccessStamp = ((String, Option<i64>), std::time::Instant);

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(obj)).await?)
}

/// The map currently published, if any and readable (an unreadable one restarts the epoch
/// after it: never lower than what sidecars saw, since we add one).
fn published(cm: &ConfigMap) -> Option<ShardMap> {
    let json = cm.data.as_ref()?.get(labels::SHARDMAP_KEY)?;
    serde_json::from_str(json).ok()
}

/// One reconcile of one ShardedService's shard map.
pub async fn reconcile(svc: Arc<ShardedService>, ctx: Arc<Context>) -> Result<Action> {
    let (name, ns, _) = identity(&svc)?;
    // Deleted: garbage collection removes what we own. Invalid: the main reconciler reports
    // it and creates no pods, so there is no membership to publish.
    if svc.metadata.deletion_timestamp.is_some()
        || !shardmesh_api::validate::validate(&svc).is_empty()
    {
        ctx.access_applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ObjectRef::from_obj(&*svc));
        return Ok(Action::await_change());
    }
    // Lease renewals wake this reconcile every few seconds; the access objects only change
    // with the spec, so they are applied per generation (and re-asserted every RESYNC).
    let key = ObjectRef::from_obj(&*svc);
    let stamp = (svc.uid().unwrap_or_default(), svc.metadata.generation);
    let fresh = ctx
        .access_applied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .is_some_and(|(s, at)| *s == stamp && at.elapsed() < RESYNC);
    if !fresh {
        let (sa, member, reader, binding) = access_objects(&svc)?;
        apply(&ctx.client, &ns, &sa).await?;
        apply(&ctx.client, &ns, &member).await?;
        apply(&ctx.client, &ns, &reader).await?;
        apply(&ctx.client, &ns, &binding).await?;
        let mut applied = ctx.access_applied.lock().unwrap_or_else(|e| e.into_inner());
        // Stale entries would be re-applied anyway; dropping them bounds the map to the
        // services seen in the last RESYNC (deleted services are never reconciled again).
        applied.retain(|_, (_, at)| at.elapsed() < RESYNC);
        applied.insert(key, (stamp, std::time::Instant::now()));
    }

    let leases: Vec<Lease> = ctx
        .leases
        .state()
        .iter()
        .filter(|l| {
            l.namespace().as_deref() == Some(ns.as_str())
                && l.labels().get(labels::SERVICE) == Some(&name)
        })
        .map(|l| (**l).clone())
        .collect();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = cms.get_opt(&labels::shardmap_name(&name)).await?;
    let prev = existing.as_ref().and_then(published);
    let now = Timestamp::now();
    let shards = u32::try_from(svc.spec.shards).unwrap_or(0).max(1);
    let computed = compute(shards, &leases, now, prev.as_ref());
    let header = svc.spec.shard_key.header.to_ascii_lowercase();
    let header_same = existing
        .as_ref()
        .and_then(|c| c.data.as_ref()?.get(labels::SHARDMAP_HEADER_KEY).cloned())
        == Some(header);
    if prev.as_ref() != Some(&computed.map) || !header_same {
        apply(&ctx.client, &ns, &configmap(&svc, &computed.map)?).await?;
        let live: usize = computed.map.shards.iter().map(|s| s.members.len()).sum();
        info!(namespace = %ns, name = %name, epoch = computed.map.epoch, live_members = live,
              empty_shards = computed.map.shards.iter().filter(|s| s.members.is_empty()).count(),
              "shard map published");
    }
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&ObjectRef::from_obj(&*svc));
    Ok(Action::requeue(requeue_after(computed.next_expiry, now)))
}

fn error_policy(svc: Arc<ShardedService>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(ObjectRef::from_obj(&*svc)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    warn!(name = %svc.name_any(), namespace = svc.namespace().unwrap_or_default(),
          error = %err, failures = n, "shard-map reconcile failed");
    Action::requeue(backoff(n))
}

/// Runs the shard-map controller until SIGTERM/SIGINT.
pub async fn run(client: Client) -> anyhow::Result<()> {
    let svcs: Api<ShardedService> = Api::all(client.clone());
    let leases: Api<Lease> = Api::all(client.clone());
    let cms: Api<ConfigMap> = Api::all(client.clone());
    let (lease_reader, lease_writer) = reflector::store();
    let lease_events = watcher(
        leases,
        watcher::Config::default()
            .labels(labels::SERVICE)
            .any_semantic(),
    )
    .default_backoff()
    .reflect(lease_writer)
    .touched_objects();
    let owned = watcher::Config::default()
        .labels(&format!("{}={COMPONENT}", labels::COMPONENT))
        .any_semantic();
    let controller = Controller::new(svcs, watcher::Config::default().any_semantic())
        .owns(cms, owned)
        .watches_stream(lease_events, |lease: Lease| {
            let svc = lease.labels().get(labels::SERVICE)?.clone();
            Some(ObjectRef::<ShardedService>::new(&svc).within(&lease.namespace()?))
        })
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)),
        );
    let ctx = Arc::new(Context {
        client,
        leases: lease_reader.clone(),
        failures: Default::default(),
        access_applied: Default::default(),
    });
    // A map computed before the Lease cache is filled would drop live members (and bump the
    // epoch twice); the cache fills once the controller polls its streams, so each reconcile
    // waits for it rather than waiting before `run`.
    info!("shard-map controller started");
    controller
        .shutdown_on_signal()
        .run(
            move |svc, ctx: Arc<Context>| {
                let ready = lease_reader.clone();
                async move {
                    ready
                        .wait_until_ready()
                        .await
                        .map_err(|_| Error::CacheUnavailable("leases"))?;
                    reconcile(svc, ctx).await
                }
            },
            error_policy,
            ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "shard-map reconcile failed");
            }
        })
        .await;
    info!("shard-map controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn lease(pod: &str, shard: &str, ip: &str, renewed: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(pod.into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([
                    (labels::SERVICE.into(), "orders".into()),
                    (labels::SHARD.into(), shard.into()),
                ])),
                annotations: Some(BTreeMap::from([(
                    labels::LEASE_ADDRESS.into(),
                    format!("{ip}:4143"),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(pod.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(t(renewed))),
                ..LeaseSpec::default()
            }),
        }
    }

    fn pods(m: &ShardMap) -> Vec<Vec<&str>> {
        m.shards
            .iter()
            .map(|s| s.members.iter().map(|m| m.pod.as_str()).collect())
            .collect()
    }

    #[test]
    fn live_leases_become_sorted_members_per_shard() {
        let leases = [
            lease("o-1-1", "1", "10.0.0.4", 0, 30),
            lease("o-0-0", "0", "10.0.0.1", 0, 30),
            lease("o-1-0", "1", "10.0.0.3", 5, 30),
        ];
        let c = compute(3, &leases, t(10), None);
        assert_eq!(c.map.epoch, 1);
        assert_eq!(
            pods(&c.map),
            vec![vec!["o-0-0"], vec!["o-1-0", "o-1-1"], vec![]]
        );
        assert_eq!(c.map.shards[1].members[0].address, "10.0.0.3:4143");
        assert_eq!(c.map.check(), Ok(()));
        assert_eq!(c.next_expiry, Some(t(30)));
    }

    #[test]
    fn expired_foreign_and_malformed_leases_are_not_members() {
        let mut released = lease("o-0-1", "0", "10.0.0.2", 0, 30);
        released.spec.as_mut().unwrap().holder_identity = None;
        let mut bad_addr = lease("o-0-2", "0", "10.0.0.2", 0, 30);
        bad_addr.metadata.annotations = Some(BTreeMap::from([(
            labels::LEASE_ADDRESS.into(),
            "nowhere".into(),
        )]));
        let mut deleting = lease("o-0-3", "0", "10.0.0.5", 0, 30);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(1)));
        let leases = [
            lease("o-0-0", "0", "10.0.0.1", 0, 30), // expires at 30
            released,
            bad_addr,
            deleting,
            lease("o-5-0", "5", "10.0.0.9", 0, 30), // shard out of range
            lease("o-1-0", "x", "10.0.0.9", 0, 30), // shard not a number
        ];
        assert_eq!(
            pods(&compute(2, &leases, t(29), None).map),
            vec![vec!["o-0-0"], vec![]]
        );
        // Exactly at renewTime + duration the member is dead.
        assert_eq!(
            pods(&compute(2, &leases, t(30), None).map),
            vec![Vec::<&str>::new(), vec![]]
        );
    }

    #[test]
    fn epoch_increases_exactly_on_membership_changes() {
        let a = lease("o-0-0", "0", "10.0.0.1", 0, 30);
        let b = lease("o-0-1", "0", "10.0.0.2", 0, 30);
        let m1 = compute(1, &[a.clone(), b.clone()], t(1), None).map;
        assert_eq!(m1.epoch, 1);
        // Renewals alone change nothing.
        let renewed = lease("o-0-0", "0", "10.0.0.1", 20, 30);
        let m2 = compute(1, &[renewed.clone(), b.clone()], t(25), Some(&m1)).map;
        assert_eq!(m2, m1);
        // b expires at 30: one change.
        let m3 = compute(1, &[renewed.clone(), b.clone()], t(31), Some(&m2)).map;
        assert_eq!((m3.epoch, pods(&m3)), (2, vec![vec!["o-0-0"]]));
        // b comes back (new IP after a restart): another change.
        let b2 = lease("o-0-1", "0", "10.0.0.7", 32, 30);
        let m4 = compute(1, &[renewed.clone(), b2.clone()], t(33), Some(&m3)).map;
        assert_eq!((m4.epoch, pods(&m4)), (3, vec![vec!["o-0-0", "o-0-1"]]));
        // Same members, new address: a change too (callers must dial the new one).
        let b3 = lease("o-0-1", "0", "10.0.0.8", 34, 30);
        assert_eq!(
            compute(1, &[renewed.clone(), b3], t(35), Some(&m4))
                .map
                .epoch,
            4
        );
        // A shard-count change is a change even with no members.
        assert_eq!(compute(2, &[renewed, b2], t(35), Some(&m4)).map.epoch, 4);
    }

    #[test]
    fn requeue_just_after_next_expiry_capped() {
        assert_eq!(
            requeue_after(Some(t(10)), t(0)),
            Duration::from_millis(10_500)
        );
        assert_eq!(requeue_after(None, t(0)), RESYNC);
        assert_eq!(requeue_after(Some(t(10_000)), t(0)), RESYNC);
        assert_eq!(requeue_after(Some(t(0)), t(5)), RESYNC);
    }

    fn svc() -> ShardedService {
        let mut s: ShardedService = serde_json::from_value(serde_json::json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"},
            "spec": {"shards": 2, "replicasPerShard": 2, "port": 8080, "template": {},
                     "shardKey": {"header": "X-User"}}
        }))
        .unwrap();
        s.metadata.uid = Some("u-1".into());
        s
    }

    #[test]
    fn configmap_is_owned_and_holds_map_and_header() {
        let map = compute(2, &[], t(0), None).map;
        let cm = configmap(&svc(), &map).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("orders-shardmap"));
        assert_eq!(cm.metadata.owner_references.as_ref().unwrap()[0].uid, "u-1");
        let data = cm.data.unwrap();
        let back: ShardMap = serde_json::from_str(&data[labels::SHARDMAP_KEY]).unwrap();
        assert_eq!(back, map);
        assert_eq!(data[labels::SHARDMAP_HEADER_KEY], "x-user");
    }

    #[test]
    fn member_role_names_exactly_the_pods_and_the_map() {
        let (sa, member, reader, binding) = access_objects(&svc()).unwrap();
        assert_eq!(sa.metadata.name.as_deref(), Some("orders-shardmesh-member"));
        let rules = member.rules.unwrap();
        assert_eq!(rules[0].verbs, vec!["create"]);
        assert_eq!(rules[0].resource_names, None);
        assert_eq!(
            rules[1].resource_names.as_deref().unwrap(),
            ["orders-0-0", "orders-0-1", "orders-1-0", "orders-1-1"]
        );
        assert_eq!(rules[1].verbs, vec!["get", "update", "delete"]);
        assert_eq!(
            rules[2].resource_names.as_deref().unwrap(),
            ["orders-shardmap"]
        );
        assert_eq!(reader.rules.unwrap(), vec![rules[2].clone()]);
        assert_eq!(binding.role_ref.name, "orders-shardmesh-member");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("orders-shardmesh-member", Some("shop"))
        );
    }
}
