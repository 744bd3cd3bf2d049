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

use futures::{
    future::{BoxFuture, Shared},
    FutureExt, StreamExt, TryStreamExt,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        controller,
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
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

/// Logs what a controller's run loop yields that went wrong, for both controllers alike. A
/// child's event for a ShardedService already gone from the cache (deleted with its namespace,
/// say) is expected and reported at debug level, not as a failure: no reconcile ran.
pub fn report_failure<E1, E2>(controller: &'static str, err: &controller::Error<E1, E2>)
where
    E1: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    match err {
        controller::Error::ObjectNotFound(obj) => tracing::debug!(
            controller,
            object = %obj,
            "an owned object changed after its ShardedService was deleted; nothing to reconcile"
        ),
        e => tracing::warn!(controller, error = %e, "reconcile failed"),
    }
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

/// Drives `watch` (a watch reflected into a store) in a task of its own and returns, as a
/// stream, the ShardedService each event concerns (`owner_of`). A controller polls its trigger
/// streams only while it has room for more reconciles: a store fed inside one would fall behind
/// the API server whenever the controller is busy, and a Lease cache that lags would make
/// renewing members look silent. Detached, the cache follows the API server at its own pace;
/// the wake-ups queue (one small reference each) until the controller takes them, and it merges
/// repeats. The owned-object caches run the same way and also restart a stalled watch
/// ([`crate::cache`]).
pub fn detach<K, S>(
    watch: S,
    owner_of: impl Fn(&K) -> Option<ObjectRef<ShardedService>> + Send + 'static,
) -> impl futures::Stream<Item = ObjectRef<ShardedService>> + Send + 'static
where
    K: Send + 'static,
    S: futures::Stream<Item = std::result::Result<K, kube::runtime::watcher::Error>>
        + Send
        + 'static,
{
    let (tx, rx) = wakeups();
    tokio::spawn(async move {
        let mut watch = std::pin::pin!(watch);
        while let Some(item) = futures::StreamExt::next(&mut watch).await {
            if let Some(owner) = item.ok().as_ref().and_then(&owner_of) {
                if tx.send(owner).is_err() {
                    // The controller is gone.
                    break;
                }
            }
        }
    });
    rx
}

/// The queue between a watch task and its controller: the task sends the owners of what
/// changed (one small reference each, never blocking), the controller takes them as a stream.
pub fn wakeups() -> (
    tokio::sync::mpsc::UnboundedSender<ObjectRef<ShardedService>>,
    impl futures::Stream<Item = ObjectRef<ShardedService>> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    (tx, stream)
}

/// The ShardedService that controls `obj` (its controller owner reference), if any.
pub fn controller_of<K: Resource>(obj: &K) -> Option<ObjectRef<ShardedService>> {
    let owner = obj
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "ShardedService")?;
    Some(ObjectRef::new(&owner.name).within(&obj.namespace()?))
}

/// The ShardedService named by `obj`'s `shardmesh.io/service` label (its Leases and pods).
pub fn labelled_for<K: Resource>(obj: &K) -> Option<ObjectRef<ShardedService>> {
    let svc = obj.labels().get(labels::SERVICE)?;
    Some(ObjectRef::new(svc).within(&obj.namespace()?))
}

/// Drops what no reconcile reads from a cached ShardedService: its managed fields (the field
/// sets of every writer, often larger than the spec).
pub fn slim(svc: &mut ShardedService) {
    svc.metadata.managed_fields = None;
}

/// What the operator applies to one object: the hash stamped on it, and its JSON (to tell
/// whether another manager's write touched any of it).
#[derive(Clone, Debug)]
pub struct Intent {
    /// Hash of everything the object says (the [`APPLIED`] annotation's value).
    pub hash: String,
    /// The object as applied, annotation included.
    pub json: serde_json::Value,
}

/// Stamps `obj` with the hash of everything it says (annotation [`APPLIED`]) and returns the
/// intent. Built objects hold only ordered maps, so equal intent serializes to equal bytes.
pub fn stamp<K: Resource<DynamicType = ()> + Serialize>(obj: &mut K) -> Result<Intent> {
    let meta = obj.meta_mut();
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(APPLIED);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
    let serialize_error = |obj: &K, source| Error::Serialize {
        what: format!(
            "{} {}",
            K::kind(&()),
            obj.meta().name.as_deref().unwrap_or("")
        ),
        source,
    };
    let bytes = serde_json::to_vec(obj).map_err(|e| serialize_error(obj, e))?;
    let hash = format!("{:016x}", shardmesh_api::routing::key_hash(&bytes));
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED.to_string(), hash.clone());
    let json = serde_json::to_value(&*obj).map_err(|e| serialize_error(obj, e))?;
    Ok(Intent { hash, json })
}

/// Whether a managed-fields set (`FieldsV1`) names any field `desired` (an object's JSON) sets.
/// Maps are followed key by key; a list or a scalar the object sets counts whole (lists are
/// not matched item by item). Keys other than `f:` (`.`, `k:`, `v:`, `i:`) name no field of ours.
fn touches(fields: &serde_json::Value, desired: &serde_json::Value) -> bool {
    let serde_json::Value::Object(fields) = fields else {
        return false;
    };
    fields.iter().any(|(key, sub)| {
        let Some(mine) = key.strip_prefix("f:").and_then(|name| desired.get(name)) else {
            return false;
        };
        match (mine, sub) {
            // A whole map of ours claimed as a leaf.
            (serde_json::Value::Object(_), serde_json::Value::Object(s)) if s.is_empty() => true,
            (serde_json::Value::Object(_), _) => touches(sub, mine),
            _ => true,
        }
    })
}

/// Whether a managed-fields entry records a write by another manager that may touch what the
/// operator sets: not the operator's own, not a status write (those never touch the intent).
fn foreign(entry: &ManagedFieldsEntry) -> bool {
    if entry.manager.as_deref() == Some(labels::FIELD_MANAGER)
        || entry.subresource.as_deref() == Some("status")
    {
        return false;
    }
    match entry.fields_v1.as_ref().map(|f| &f.0) {
        // Before 1.22 status writes carry no subresource: they set only `f:status`.
        Some(serde_json::Value::Object(fields)) => {
            fields.keys().any(|k| k != "." && k != "f:status")
        }
        _ => true,
    }
}

/// Reduces a watched object's metadata to what [`unchanged`] and the owner lookup read (the
/// stores hold one entry per owned object, so this is most of the operator's memory): name,
/// namespace, owner references, the [`APPLIED`] annotation, and the managed fields, where the
/// operator's own entry loses its field set and status writes are dropped; other managers'
/// entries are kept whole (rare: an edit, or a controller such as the token controller adding
/// a ServiceAccount's `secrets`).
pub fn trim(meta: &mut ObjectMeta) {
    meta.labels = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.resource_version = None;
    meta.uid = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k == APPLIED);
    }
    if let Some(entries) = meta.managed_fields.as_mut() {
        entries.retain_mut(|e| {
            if e.manager.as_deref() == Some(labels::FIELD_MANAGER) {
                e.fields_v1 = None;
                true
            } else {
                foreign(e)
            }
        });
    }
}

/// Whether `current` (as watched, possibly [`trim`]med) already holds `intent`: it carries the
/// intent's hash, and no other manager wrote a field the intent sets after the operator's last
/// change (a user's edit of a Service's ports is applied over; the token controller adding a
/// ServiceAccount's `secrets`, or a holder renewing a leader Lease's spec, is not a change).
pub fn unchanged(current: &ObjectMeta, intent: &Intent) -> bool {
    let stamped = current.annotations.as_ref().and_then(|a| a.get(APPLIED));
    if stamped.map(String::as_str) != Some(intent.hash.as_str()) {
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
    !entries.iter().any(|e| {
        let later = e.time.as_ref().is_none_or(|t| t.0 > ours.0);
        let touching = match e.fields_v1.as_ref() {
            Some(f) => touches(&f.0, &intent.json),
            None => true,
        };
        later && foreign(e) && touching
    })
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

/// Applies `obj` unless `current` (its metadata as watched) already holds it: the server's
/// view when it wrote, `None` when nothing needed writing. Without `current` it always writes.
pub async fn apply_unless_held<K>(
    client: &Client,
    ns: &str,
    mut obj: K,
    current: Option<&ObjectMeta>,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let intent = stamp(&mut obj)?;
    if current.is_some_and(|cur| unchanged(cur, &intent)) {
        return Ok(None);
    }
    tracing::debug!(kind = %K::kind(&()), name = %obj.name_any(),
                    cached = current.is_some(), "applying: not as watched");
    Ok(Some(apply(client, ns, &obj).await?))
}

/// How many applies of one reconcile are in flight at once.
const APPLIES_IN_FLIGHT: usize = 8;

/// Runs `futures`, at most [`APPLIES_IN_FLIGHT`] at a time; their outputs in order, or the
/// first error.
pub async fn together<'a, T: Send + 'a>(futures: Vec<BoxFuture<'a, Result<T>>>) -> Result<Vec<T>> {
    futures::stream::iter(futures)
        .buffered(APPLIES_IN_FLIGHT)
        .try_collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::{
        api::{coordination::v1::Lease, core::v1::Service},
        apimachinery::pkg::apis::meta::v1::{FieldsV1, Time},
        jiff::Timestamp,
    };
    use std::sync::Arc;

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
        let h = stamp(&mut a).unwrap().hash;
        // Stamping again (the annotation present) gives the same hash.
        assert_eq!(stamp(&mut a.clone()).unwrap().hash, h);
        assert_eq!(a.annotations()[APPLIED], h);
        let mut b = svc();
        b.metadata.labels = Some([("a".to_string(), "c".to_string())].into());
        assert_ne!(stamp(&mut b).unwrap().hash, h);
    }

    #[test]
    fn unchanged_only_with_our_hash_and_no_later_write_to_what_we_set() {
        let mut applied = svc();
        applied.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            ports: Some(vec![Default::default()]),
            ..Default::default()
        });
        let intent = stamp(&mut applied).unwrap();
        let mut cur = applied.metadata.clone();
        let ours = entry(labels::FIELD_MANAGER, 10, serde_json::json!({"f:spec": {}}));
        cur.managed_fields = Some(vec![ours.clone()]);
        assert!(unchanged(&cur, &intent));
        // Another intent: changed.
        let other = Intent {
            hash: "0000000000000000".into(),
            ..intent.clone()
        };
        assert!(!unchanged(&cur, &other));
        // Never applied by us (no entry of ours): changed.
        let mut theirs = cur.clone();
        theirs.managed_fields = Some(vec![]);
        assert!(!unchanged(&theirs, &intent));
        // `cur` with one more managed-fields entry: `manager` wrote `fields` at `at`, as the
        // store keeps it.
        let with = |manager: &str, at: i64, fields: serde_json::Value| {
            let mut m = cur.clone();
            m.managed_fields = Some(vec![ours.clone(), entry(manager, at, fields)]);
            trim(&mut m);
            m
        };
        // A controller writing the status after us: still unchanged (and not even kept).
        let st = with(
            "kube-controller-manager",
            20,
            serde_json::json!({"f:status": {}}),
        );
        assert_eq!(st.managed_fields.as_ref().unwrap().len(), 1);
        assert!(unchanged(&st, &intent));
        // A user editing the ports after us: changed.
        let ports = serde_json::json!({"f:spec": {"f:ports": {}}});
        assert!(!unchanged(
            &with("kubectl-edit", 20, ports.clone()),
            &intent
        ));
        // ... a label of ours too; one of their own is none of our business.
        let label =
            |k: &str| serde_json::json!({"f:metadata": {"f:labels": {(format!("f:{k}")): {}}}});
        assert!(!unchanged(&with("kubectl-label", 20, label("a")), &intent));
        assert!(unchanged(
            &with("kubectl-label", 20, label("team")),
            &intent
        ));
        // ... nor a field we never set (the token controller filling a ServiceAccount's secrets).
        let secrets = serde_json::json!({"f:secrets": {".": {}, "k:{\"name\":\"t\"}": {}}});
        assert!(unchanged(
            &with("kube-controller-manager", 20, secrets),
            &intent
        ));
        // An edit before our last apply (which took the fields back): unchanged.
        assert!(unchanged(&with("kubectl-edit", 5, ports), &intent));
        // A Lease's holders write its spec, which the operator never sets.
        let holder = serde_json::json!({"f:spec": {"f:holderIdentity": {}}});
        let mut lease = Lease::default();
        lease.metadata.name = Some("orders-0-leader".into());
        let lease_intent = stamp(&mut lease).unwrap();
        let mut l = lease.metadata.clone();
        l.managed_fields = Some(vec![ours, entry("shardmesh-sidecar", 30, holder)]);
        trim(&mut l);
        assert!(unchanged(&l, &lease_intent));
    }

    #[tokio::test]
    async fn a_detached_watch_is_consumed_whether_or_not_the_controller_takes_its_wakeups() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let owned = |name: &str, owner: Option<&str>| {
            let mut s = svc();
            s.metadata.name = Some(name.into());
            s.metadata.namespace = Some("shop".into());
            s.metadata.owner_references = owner.map(|o| {
                vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        kind: "ShardedService".into(),
                        name: o.into(),
                        controller: Some(true),
                        ..Default::default()
                    },
                ]
            });
            s
        };
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let watch = futures::stream::iter(vec![
            Ok(owned("orders-0", Some("orders"))),
            Ok(owned("stray", None)),
            Ok(owned("carts-0", Some("carts"))),
        ])
        .inspect(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let wakeups = detach(watch, controller_of);
        // Nobody polls `wakeups` yet: the watch (and the store it would feed) still moves on.
        for _ in 0..100 {
            if seen.load(Ordering::SeqCst) == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        let owners: Vec<_> = wakeups.collect().await;
        assert_eq!(
            owners,
            [
                ObjectRef::new("orders").within("shop"),
                ObjectRef::new("carts").within("shop")
            ]
        );
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
