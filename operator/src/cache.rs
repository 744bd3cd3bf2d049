//! The caches of owned objects: one kind's metadata, watched into a store that a reconcile
//! reads to skip applies of objects that already hold the intent, and checked against the
//! operator's own writes.
//!
//! **A watch can go silent without ending.** Seen at 1,000 ShardedServices on a loaded API
//! server: the Service watch delivered nothing for minutes while its connection stayed open —
//! no error, no end (the server ends a watch only at its timeout, ~5 minutes). A cache that
//! misses objects is safe (an unsure check writes) but costly: every resync re-applies what it
//! misses. The operator knows what its watch must show: each write answers with the object's
//! `resourceVersion`, and the watch has to deliver an event at or past it. When a write is
//! still unseen after [`STALL`], the watch is restarted with a fresh quorum list, which
//! replaces the store.
//!
//! `resourceVersion`s are compared as numbers: the API server's are etcd revisions, and its
//! own watch cache orders them the same way. A server whose versions are not numbers simply
//! never triggers a restart.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use kube::{
    core::PartialObjectMeta,
    runtime::{
        reflector::{self, store::Writer, ObjectRef, Store},
        watcher::{self, ListSemantic},
        WatchStreamExt,
    },
    Client, Resource,
};
use serde::de::DeserializeOwned;
use shardmesh_api::ShardedService;
use tokio::time::Instant;
use tracing::warn;

use crate::{metrics::Metrics, runtime, scope};

/// How long a write of the operator may go unseen by the watch of its kind before the watch is
/// restarted. Under load events arrive within seconds; a minute-long silence is a stall.
pub const STALL: Duration = Duration::from_secs(30);
/// How often the watch task checks for a stall.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The newest `resourceVersion` a watch delivered, and the oldest write of the operator it has
/// not shown yet.
#[derive(Debug, Default)]
pub struct Freshness(Mutex<Seen>);

#[derive(Debug, Default)]
struct Seen {
    newest: u64,
    unseen: Option<(u64, Instant)>,
}

fn version(rv: Option<&str>) -> Option<u64> {
    rv?.parse().ok()
}

impl Freshness {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A panic while holding this lock leaves plain numbers behind: still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The operator wrote an object of the watched kind and the API server answered with
    /// `rv`. A write the watch already went past (a no-op apply) is not waited for.
    pub fn wrote(&self, rv: Option<&str>) {
        let Some(rv) = version(rv) else { return };
        let mut s = self.seen();
        if rv > s.newest && s.unseen.is_none() {
            s.unseen = Some((rv, Instant::now()));
        }
    }

    /// The watch delivered an object at `rv`.
    fn saw(&self, rv: Option<&str>) {
        let Some(rv) = version(rv) else { return };
        let mut s = self.seen();
        s.newest = s.newest.max(rv);
        if s.unseen.is_some_and(|(w, _)| w <= s.newest) {
            s.unseen = None;
        }
    }

    /// How long the oldest unseen write has waited, at `now`.
    fn unseen_for(&self, now: Instant) -> Option<Duration> {
        self.seen().unseen.map(|(_, at)| now.duration_since(at))
    }

    /// A fresh list is on its way: it shows every write made before it.
    fn restarted(&self) {
        self.seen().unseen = None;
    }
}

/// One kind's watched metadata, and what the watch is known to have shown.
pub struct Cache<K: Resource<DynamicType = ()> + 'static> {
    store: Store<PartialObjectMeta<K>>,
    freshness: Arc<Freshness>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Cache<K> {
    /// The watched metadata of `name` in `ns`, if the watch has shown it.
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<PartialObjectMeta<K>>> {
        self.store
            .get(&ObjectRef::<PartialObjectMeta<K>>::new(name).within(ns))
    }

    /// Records a write of an object of this kind (the API server's answer), which the watch
    /// must show within [`STALL`].
    pub fn wrote(&self, written: &K) {
        self.freshness
            .wrote(written.meta().resource_version.as_deref());
    }

    /// Waits for the first complete listing.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.store.wait_until_ready().await
    }
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache {
            store: self.store.clone(),
            freshness: self.freshness.clone(),
        }
    }
}

/// A cache fed by someone else (tests): its writes are never checked.
impl<K: Resource<DynamicType = ()> + 'static> From<Store<PartialObjectMeta<K>>> for Cache<K> {
    fn from(store: Store<PartialObjectMeta<K>>) -> Self {
        Cache {
            store,
            freshness: Arc::default(),
        }
    }
}

/// Watches the metadata of the owned objects of kind `K` under `root` (selected by `config`)
/// into a cache, trimmed to what [`runtime::unchanged`] reads; the stream wakes their owners.
/// The watch runs in a task of its own (see [`runtime::detach`]) and is restarted when it
/// stalls.
pub fn watch<K>(
    client: &Client,
    root: &Option<String>,
    config: watcher::Config,
    metrics: Arc<Metrics>,
) -> (
    Cache<K>,
    impl Stream<Item = ObjectRef<ShardedService>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api = scope::api::<PartialObjectMeta<K>>(client, root);
    let make = move |restart: bool| {
        // A restart lists from etcd: the API server's watch cache may be what fell behind.
        let config = if restart {
            config.clone().list_semantic(ListSemantic::MostRecent)
        } else {
            config.clone()
        };
        watcher::watcher(api.clone(), config)
            .default_backoff()
            .boxed()
    };
    follow_owned(make, <K as k8s_openapi::Resource>::KIND, Some(metrics))
}

/// Feeds a new cache from the watches `make` opens (`make(true)` for a restart) in a task of
/// its own; returns the cache and the owners of the objects the watch touches.
fn follow_owned<K, F, S>(
    make: F,
    kind: &'static str,
    metrics: Option<Arc<Metrics>>,
) -> (
    Cache<K>,
    impl Stream<Item = ObjectRef<ShardedService>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    F: FnMut(bool) -> S + Send + 'static,
    S: Stream<Item = Result<watcher::Event<PartialObjectMeta<K>>, watcher::Error>>
        + Send
        + Unpin
        + 'static,
{
    let (store, writer) = reflector::store();
    let freshness = Arc::new(Freshness::default());
    let cache = Cache {
        store,
        freshness: freshness.clone(),
    };
    let (tx, wakeups) = runtime::wakeups();
    tokio::spawn(run(make, writer, freshness, kind, metrics, tx));
    (cache, wakeups)
}

/// The watch task: feeds the store, sends the owners of what changed, and every
/// [`CHECK_EVERY`] restarts the watch when a write of the operator has gone unseen for
/// [`STALL`]. Like [`runtime::detach`], it follows the API server whether or not the
/// controller takes the wake-ups.
async fn run<K, F, S>(
    mut make: F,
    mut writer: Writer<PartialObjectMeta<K>>,
    freshness: Arc<Freshness>,
    kind: &'static str,
    metrics: Option<Arc<Metrics>>,
    tx: tokio::sync::mpsc::UnboundedSender<ObjectRef<ShardedService>>,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    F: FnMut(bool) -> S,
    S: Stream<Item = Result<watcher::Event<PartialObjectMeta<K>>, watcher::Error>> + Unpin,
{
    let mut watch = make(false);
    let mut check = tokio::time::interval_at(Instant::now() + CHECK_EVERY, CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = watch.next() => {
                let event = match item {
                    // A watcher's stream never ends by itself: the cache is being dropped.
                    None => break,
                    Some(Err(e)) => {
                        warn!(kind, error = %e, "watch of owned objects failed; retrying with backoff (until it recovers, their applies are not skipped)");
                        continue;
                    }
                    Some(Ok(event)) => event.modify(|m| {
                        freshness.saw(m.metadata.resource_version.as_deref());
                        runtime::trim(&mut m.metadata);
                    }),
                };
                writer.apply_watcher_event(&event);
                let owner = match &event {
                    watcher::Event::Apply(o)
                    | watcher::Event::Delete(o)
                    | watcher::Event::InitApply(o) => runtime::controller_of(o),
                    watcher::Event::Init | watcher::Event::InitDone => None,
                };
                // The controller is gone when nobody receives.
                if owner.is_some_and(|o| tx.send(o).is_err()) {
                    break;
                }
            }
            _ = check.tick() => {
                let Some(waited) = freshness.unseen_for(Instant::now()).filter(|w| *w >= STALL) else {
                    continue;
                };
                warn!(kind, waited_s = waited.as_secs(),
                      "the watch of owned objects has not shown an object the operator wrote; restarting it with a fresh list");
                if let Some(m) = &metrics {
                    m.watch_restarted(kind);
                }
                freshness.restarted();
                watch = make(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use watcher::Event;

    type Meta = PartialObjectMeta<Service>;
    type Item = Result<Event<Meta>, watcher::Error>;

    fn meta(name: &str, rv: u64) -> Meta {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv.to_string()}
        }))
        .expect("metadata")
    }

    fn written(rv: u64) -> Service {
        let mut s = Service::default();
        s.metadata.resource_version = Some(rv.to_string());
        s
    }

    /// A watch that lists `listed` and then stays open without a word.
    fn silent_after(listed: Vec<Meta>) -> futures::stream::BoxStream<'static, Item> {
        let mut events = vec![Ok(Event::Init)];
        events.extend(listed.into_iter().map(|m| Ok(Event::InitApply(m))));
        events.push(Ok(Event::InitDone));
        futures::stream::iter(events)
            .chain(futures::stream::pending())
            .boxed()
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_does_not_show_a_write_is_restarted_with_a_fresh_list() {
        let opened = Arc::new(AtomicUsize::new(0));
        let restarts = Arc::new(Mutex::new(Vec::new()));
        let (o, r) = (opened.clone(), restarts.clone());
        // First watch: lists orders-0 at 5, then goes silent. Second: lists both.
        let make = move |restart: bool| {
            r.lock().unwrap().push(restart);
            match o.fetch_add(1, Ordering::SeqCst) {
                0 => silent_after(vec![meta("orders-0", 5)]),
                _ => silent_after(vec![meta("orders-0", 5), meta("orders-1", 10)]),
            }
        };
        let (cache, _wakeups) = follow_owned::<Service, _, _>(make, "Service", None);
        cache.wait_until_ready().await.unwrap();
        assert!(cache.get("shop", "orders-0").is_some());
        // The operator creates orders-1 (the server answers at 10); the watch never shows it.
        cache.wrote(&written(10));
        tokio::time::sleep(STALL - Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(
            opened.load(Ordering::SeqCst),
            1,
            "restarted before {STALL:?}"
        );
        assert!(cache.get("shop", "orders-1").is_none());
        tokio::time::sleep(CHECK_EVERY + Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(*restarts.lock().unwrap(), [false, true]);
        assert!(
            cache.get("shop", "orders-1").is_some(),
            "the fresh list fills the cache"
        );
        // Nothing unseen any more: no further restart, however long the watch stays quiet.
        tokio::time::sleep(10 * STALL).await;
        settle().await;
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_the_watch_shows_and_no_op_writes_never_restart_it() {
        let opened = Arc::new(AtomicUsize::new(0));
        let o = opened.clone();
        let (tx, rx) = futures::channel::mpsc::unbounded::<Item>();
        let mut rx = Some(rx);
        let make = move |_restart: bool| {
            o.fetch_add(1, Ordering::SeqCst);
            rx.take()
                .map(|rx| rx.boxed())
                .unwrap_or_else(|| futures::stream::pending().boxed())
        };
        let (cache, wakeups) = follow_owned::<Service, _, _>(make, "Service", None);
        for e in [
            Event::Init,
            Event::InitApply(meta("orders-0", 5)),
            Event::InitDone,
        ] {
            tx.unbounded_send(Ok(e)).unwrap();
        }
        cache.wait_until_ready().await.unwrap();
        // A write the watch shows a moment later.
        cache.wrote(&written(12));
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.unbounded_send(Ok(Event::Apply(meta("orders-1", 12))))
            .unwrap();
        // A write whose answer the watch had already shown (the event came first), and a no-op
        // apply answering with the object's old version.
        cache.wrote(&written(12));
        cache.wrote(&written(5));
        // A server whose versions are not numbers.
        cache.freshness.wrote(Some("not-a-number"));
        tokio::time::sleep(10 * STALL).await;
        settle().await;
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert!(cache.get("shop", "orders-1").is_some());
        drop(tx);
        drop(wakeups);
    }
}
