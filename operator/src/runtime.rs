//! What both controllers (the main reconciler and the shard-map publisher) share: one way to
//! write — server-side apply under one field manager, skipped when the object as watched already
//! holds what would be applied — one error backoff per ShardedService, one way to tell the user
//! (Events on the ShardedService), and one shutdown signal.
//!
//! **Writes only when something changed.** Every applied object carries the hash of what the
//! operator applies (annotation [`APPLIED`]). A reconcile compares it with the watched object's
//! and writes nothing when they match and no other field manager changed the object since the
//! operator's last write (status writes, and for Leases the holders' spec writes, do not
//! count). A resync of an unchanged ShardedService therefore issues no write, and an object
//! someone edited is applied again (the edit wakes the reconcile through the owned-object watch).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use futures::{future::Shared, FutureExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use kube::{
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
    Api, Client, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};
use shardmesh_api::{labels, ShardedService};

use crate::{status::Transition, Error, Result};

/// Annotation holding the hash of what the operator last applied to an object.
pub const APPLIED: &str = "shardmesh.io/applied";

/// First and largest delay of the per-object error backoff.
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay before retrying an object that failed `n` times in a row (n ≥ 1).
pub fn backoff(n: u32) -> Duration {
    shardmesh_api::backoff::ceiling(BACKOFF_BASE, BACKOFF_MAX, n)
}

/// Consecutive reconcile failures per ShardedService, for [`backoff`].
#[derive(Debug, Default)]
pub struct Failures(Mutex<HashMap<ObjectRef<ShardedService>, u32>>);

impl Failures {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<ShardedService>, u32>> {
        // A poisoned lock only means a reconcile panicked mid-update of a counter; keep going.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one more failure of `svc`; returns how many in a row and the delay before the
    /// next attempt.
    pub fn failed(&self, svc: &ShardedService) -> (u32, Duration) {
        let mut m = self.map();
        let n = m.entry(ObjectRef::from_obj(svc)).or_insert(0);
        *n = n.saturating_add(1);
        (*n, backoff(*n))
    }

    /// `svc` reconciled: its next failure starts the backoff over. Entries exist only for
    /// services currently failing, so the map stays as small as the failures.
    pub fn succeeded(&self, svc: &ShardedService) {
        self.map().remove(&ObjectRef::from_obj(svc));
    }
}

/// The operator's one shutdown signal (SIGTERM or Ctrl-C), awaited by both controllers.
pub type Shutdown = Shared<futures::future::BoxFuture<'static, ()>>;

/// Listens for SIGTERM and Ctrl-C once; every clone resolves when either arrives.
pub fn shutdown_signal() -> Shutdown {
    async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    .boxed()
    .shared()
}

/// Who the operator's Events say reported them: the operator, as `instance` (its pod name).
pub fn reporter(instance: Option<String>) -> Reporter {
    Reporter {
        controller: labels::MANAGED_BY_VALUE.into(),
        instance,
    }
}

/// Publishes `transitions` as Events on `svc`. An Event is informational: failing to publish
/// one is logged and never fails the reconcile.
pub async fn tell(recorder: &Recorder, svc: &ShardedService, transitions: &[Transition]) {
    let reference = svc.object_ref(&());
    for t in transitions {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.clone(),
            note: Some(truncate(&t.note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %t.reason, "could not publish event");
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Stamps `obj` with the hash of everything it says (annotation [`APPLIED`]) and returns the
/// hash. Built objects hold only ordered maps, so equal intent serializes to equal bytes.
pub fn stamp<K: Resource<DynamicType = ()> + Serialize>(obj: &mut K) -> Result<String> {
    let meta = obj.meta_mut();
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(APPLIED);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
    let bytes = serde_json::to_vec(obj).map_err(|source| Error::Serialize {
        what: format!(
            "{} {}",
            K::kind(&()),
            obj.meta().name.as_deref().unwrap_or("")
        ),
        source,
    })?;
    let hash = format!("{:016x}", shardmesh_api::routing::key_hash(&bytes));
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED.to_string(), hash.clone());
    Ok(hash)
}

/// Top-level fields of an object other managers may write without that counting as a change
/// of the operator's intent: status always; for a Lease also the spec (its holders renew it).
fn others_may_write(kind: &str) -> &'static [&'static str] {
    match kind {
        "Lease" => &["f:status", "f:spec"],
        _ => &["f:status"],
    }
}

/// Whether a managed-fields entry records a write by another manager to fields besides those
/// [`others_may_write`].
fn foreign_write(entry: &ManagedFieldsEntry, kind: &str) -> bool {
    if entry.manager.as_deref() == Some(labels::FIELD_MANAGER)
        || entry.subresource.as_deref() == Some("status")
    {
        return false;
    }
    let allowed = others_may_write(kind);
    match entry.fields_v1.as_ref().map(|f| &f.0) {
        Some(serde_json::Value::Object(fields)) => fields
            .keys()
            .any(|k| k != "." && !allowed.contains(&k.as_str())),
        // Without the field set, assume the worst.
        _ => true,
    }
}

/// Reduces a watched object's metadata to what [`unchanged`] reads: managed-fields entries
/// lose their field sets (the bulk of an object's metadata) after being judged, and writes by
/// others confined to status (or a Lease's spec) are dropped.
pub fn trim(meta: &mut ObjectMeta, kind: &str) {
    if let Some(entries) = meta.managed_fields.as_mut() {
        // A kept foreign entry without its field set still reads as a foreign write.
        entries.retain_mut(|e| {
            let keep =
                e.manager.as_deref() == Some(labels::FIELD_MANAGER) || foreign_write(e, kind);
            e.fields_v1 = None;
            keep
        });
    }
}

/// Whether `current` (as watched, possibly [`trim`]med) already holds the intent `hash`: it
/// carries the hash, and no other manager wrote the object's fields after the operator did.
pub fn unchanged(current: &ObjectMeta, hash: &str, kind: &str) -> bool {
    if current
        .annotations
        .as_ref()
        .and_then(|a| a.get(APPLIED))
        .map(String::as_str)
        != Some(hash)
    {
        return false;
    }
    let entries = current.managed_fields.as_deref().unwrap_or_default();
    let Some(ours) = entries
        .iter()
        .find(|e| e.manager.as_deref() == Some(labels::FIELD_MANAGER))
        .and_then(|e| e.time.as_ref())
    else {
        return false;
    };
    !entries
        .iter()
        .any(|e| foreign_write(e, kind) && e.time.as_ref().is_none_or(|t| t.0 > ours.0))
}

/// Server-side applies `obj` (forced, the operator's one field manager) and returns the
/// server's view of it.
pub async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K>
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
    // SSA needs apiVersion/kind in the body; k8s-openapi types serialize them.
    let params = PatchParams::apply(labels::FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(obj)).await?)
}

/// Applies `obj` unless the watched copy in `store` already holds it; returns whether it wrote.
pub async fn apply_if_changed<K>(
    client: &Client,
    ns: &str,
    mut obj: K,
    store: &Store<PartialObjectMeta<K>>,
) -> Result<bool>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let hash = stamp(&mut obj)?;
    let key = ObjectRef::<PartialObjectMeta<K>>::new(&obj.name_any()).within(ns);
    if store
        .get(&key)
        .is_some_and(|cur| unchanged(&cur.metadata, &hash, &K::kind(&())))
    {
        return Ok(false);
    }
    apply(client, ns, &obj).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::Service,
        apimachinery::pkg::apis::meta::v1::{FieldsV1, Time},
        jiff::Timestamp,
    };

    fn entry(manager: &str, at: i64, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Update".into()),
            time: Some(Time(Timestamp::from_second(1_700_000_000 + at).unwrap())),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    fn svc() -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("orders".into());
        s.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        s
    }

    #[test]
    fn truncate_on_char_boundary() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hi", 5), "hi");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }

    #[test]
    fn the_stamp_follows_the_intent_only() {
        let mut a = svc();
        let h = stamp(&mut a).unwrap();
        // Stamping again (the annotation present) gives the same hash.
        assert_eq!(stamp(&mut a.clone()).unwrap(), h);
        assert_eq!(a.annotations()[APPLIED], h);
        let mut b = svc();
        b.metadata.labels = Some([("a".to_string(), "c".to_string())].into());
        assert_ne!(stamp(&mut b).unwrap(), h);
    }

    #[test]
    fn unchanged_only_with_our_hash_and_no_later_foreign_write() {
        let mut applied = svc();
        let hash = stamp(&mut applied).unwrap();
        let mut cur = applied.metadata.clone();
        let ours = entry(labels::FIELD_MANAGER, 10, serde_json::json!({"f:spec": {}}));
        cur.managed_fields = Some(vec![ours.clone()]);
        assert!(unchanged(&cur, &hash, "Service"));
        // Another intent: changed.
        assert!(!unchanged(&cur, "0000000000000000", "Service"));
        // Never applied by us (no entry of ours): changed.
        let mut theirs = cur.clone();
        theirs.managed_fields = Some(vec![]);
        assert!(!unchanged(&theirs, &hash, "Service"));
        // A controller writing the status after us: still unchanged.
        let mut st = cur.clone();
        st.managed_fields = Some(vec![
            ours.clone(),
            entry(
                "kube-controller-manager",
                20,
                serde_json::json!({"f:status": {}}),
            ),
        ]);
        assert!(!foreign_write(
            &st.managed_fields.as_ref().unwrap()[1],
            "Service"
        ));
        assert!(unchanged(&st, &hash, "Service"));
        // A user editing the spec after us: changed, also once trimmed for the store.
        let mut edited = cur.clone();
        edited.managed_fields = Some(vec![
            ours.clone(),
            entry(
                "kubectl-edit",
                20,
                serde_json::json!({"f:spec": {"f:ports": {}}}),
            ),
        ]);
        assert!(!unchanged(&edited, &hash, "Service"));
        trim(&mut edited, "Service");
        assert_eq!(edited.managed_fields.as_ref().unwrap().len(), 2);
        assert!(!unchanged(&edited, &hash, "Service"));
        // ... but not when that edit came before our last apply (which took the fields back).
        let mut older = cur.clone();
        older.managed_fields = Some(vec![
            ours.clone(),
            entry(
                "kubectl-edit",
                5,
                serde_json::json!({"f:spec": {"f:ports": {}}}),
            ),
        ]);
        trim(&mut older, "Service");
        assert!(unchanged(&older, &hash, "Service"));
        // A Lease's holders write its spec: that is not a change of the operator's intent.
        let mut lease = cur.clone();
        lease.managed_fields = Some(vec![
            ours,
            entry(
                "shardmesh-sidecar",
                30,
                serde_json::json!({"f:spec": {"f:holderIdentity": {}}}),
            ),
        ]);
        trim(&mut lease, "Lease");
        assert_eq!(lease.managed_fields.as_ref().unwrap().len(), 1);
        assert!(unchanged(&lease, &hash, "Lease"));
    }

    #[test]
    fn failures_count_per_service_and_reset() {
        let f = Failures::default();
        let mut s = ShardedService::new(
            "orders",
            serde_json::from_value(serde_json::json!({
            "shards": 1, "replicasPerShard": 1, "port": 8080, "template": {},
            "shardKey": {"header": "x"}}))
            .unwrap(),
        );
        s.metadata.namespace = Some("shop".into());
        assert_eq!(f.failed(&s), (1, Duration::from_secs(2)));
        assert_eq!(f.failed(&s), (2, Duration::from_secs(4)));
        f.succeeded(&s);
        assert_eq!(f.failed(&s), (1, Duration::from_secs(2)));
    }
}
