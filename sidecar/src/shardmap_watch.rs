//! The Kubernetes side of discovery: each configured sharded destination follows the shard-map
//! ConfigMap `<service>-shardmap` the operator publishes (one small object per service, watched
//! by name, so a sidecar reads nothing else and its Role can name that one object).
//!
//! The routing table is swapped per destination in one step (readers never see a half-updated
//! map). On API errors the watch retries with backoff and the last good map keeps routing; a map
//! that fails validation is logged and ignored for the same reason. Destinations of the static
//! registry file stay available beside the live ones.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use shardmesh_api::{labels, shardmap::ShardMap};

use crate::{
    admin::Gate,
    discovery::{normalize_authority, sharded_kind, Destination, Discover, StaticRegistry},
};

/// One `--shardmap` entry: follow service `service` in `namespace` for requests to `authority`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMapSource {
    /// Namespace of the ShardedService (`None`: the pod's own namespace).
    pub namespace: Option<String>,
    /// ShardedService name.
    pub service: String,
    /// Normalized `host:port` the application addresses the service by.
    pub authority: String,
}

impl ShardMapSource {
    /// Parses `[namespace/]service=host[:port]`.
    pub fn parse(raw: &str) -> Result<ShardMapSource, String> {
        let (svc, host) = raw.split_once('=').ok_or_else(|| {
            format!("{raw:?} is not [namespace/]service=host[:port]; write e.g. orders=orders.shop:8080")
        })?;
        let (namespace, service) = match svc.trim().split_once('/') {
            Some((ns, s)) => (Some(ns.to_string()), s.to_string()),
            None => (None, svc.trim().to_string()),
        };
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns_label(&service) || namespace.as_deref().is_some_and(|n| !dns_label(n)) {
            return Err(format!(
                "{raw:?}: {svc:?} is not a ShardedService name (lower-case letters, digits, '-'), optionally prefixed by namespace/"
            ));
        }
        let authority = normalize_authority(host)
            .ok_or_else(|| format!("{raw:?}: {host:?} is not host or host:port"))?;
        Ok(ShardMapSource {
            namespace,
            service,
            authority,
        })
    }
}

/// The destination a shard-map ConfigMap describes, for requests to `authority`. Errors say
/// what is wrong with the object (the operator writes it, so they indicate a version skew or a
/// hand edit).
pub fn destination_from_configmap(authority: &str, cm: &ConfigMap) -> Result<Destination, String> {
    let what = format!(
        "configmap {}/{}",
        cm.namespace().unwrap_or_default(),
        cm.name_any()
    );
    let data = cm.data.as_ref();
    let json = data
        .and_then(|d| d.get(labels::SHARDMAP_KEY))
        .ok_or_else(|| format!("{what}: has no data key {}", labels::SHARDMAP_KEY))?;
    let map: ShardMap = serde_json::from_str(json)
        .map_err(|e| format!("{what}: {} is not a shard map: {e}", labels::SHARDMAP_KEY))?;
    let header = data.and_then(|d| d.get(labels::SHARDMAP_HEADER_KEY));
    let writes = data.and_then(|d| d.get(labels::SHARDMAP_WRITES_KEY));
    let miss = data.and_then(|d| d.get(labels::SHARDMAP_HANDOFF_MISS_KEY));
    let kind = sharded_kind(
        &what,
        header.map(String::as_str),
        writes.map(String::as_str),
        miss.map(String::as_str),
        &map,
    )?;
    Ok(Destination {
        name: authority.into(),
        kind,
    })
}

/// Static destinations plus live ones fed by shard-map watches.
pub struct LiveRegistry {
    fixed: StaticRegistry,
    // A lock held only to clone or replace an `Arc`: no I/O, no await, so the request path
    // never waits on the API server. Bounded: one entry per `--shardmap` flag.
    live: RwLock<HashMap<String, Arc<Destination>>>,
    /// Bumped on every change, for requests waiting for a newer map.
    changes: tokio::sync::watch::Sender<u64>,
    /// Per live destination: the UID of the ConfigMap its map came from and its epoch.
    epochs: std::sync::Mutex<HashMap<String, (String, i64)>>,
}

impl LiveRegistry {
    /// Live destinations answer before the static ones for the same authority.
    pub fn new(fixed: StaticRegistry) -> Self {
        LiveRegistry {
            fixed,
            live: RwLock::new(HashMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
            epochs: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Takes a map read from the ConfigMap with `uid`, unless it would move the destination's
    /// epoch backwards: routing, redirects and handoff compare epochs, so they only move
    /// forward. A ConfigMap with another UID (the service was deleted and created again)
    /// starts over. Returns whether the map was taken.
    pub fn offer(&self, dest: Destination, uid: &str) -> bool {
        let Some(epoch) = dest.epoch() else {
            self.set(dest);
            return true;
        };
        {
            let mut seen = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
            match seen.get(dest.name.as_ref()) {
                Some((u, e)) if u == uid && *e > epoch => return false,
                _ => {
                    seen.insert(dest.name.to_string(), (uid.to_string(), epoch));
                }
            }
        }
        self.set(dest);
        true
    }

    /// Replaces the routing table of one destination.
    pub fn set(&self, dest: Destination) {
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            live.insert(dest.name.to_string(), Arc::new(dest));
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Forgets a live destination (its ShardedService was deleted).
    pub fn remove(&self, authority: &str) {
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            live.remove(authority);
        }
        self.epochs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(authority);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Discover for LiveRegistry {
    fn lookup(&self, authority: &str) -> Option<Arc<Destination>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.get(authority)
            .cloned()
            .or_else(|| self.fixed.lookup(authority))
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

/// Backoff of a shard-map watch after an error: full jitter (the retry module's) from 200 ms
/// doubling up to 5 s, reset by any event. One small object per service is cheap to list
/// again, and a sidecar whose map lags after an API-server outage routes (and judges key
/// ownership) by a stale map: kube-runtime's default grows to 30 s for that.
#[derive(Debug, Default)]
struct WatchBackoff {
    failures: u32,
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        self.failures = self.failures.saturating_add(1);
        Some(crate::retry::backoff(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(5),
            self.failures,
            rand::random(),
        ))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Follows one shard-map ConfigMap forever, feeding `registry`. `synced` opens once the first
/// listing completed (whether or not the map exists yet), so `/ready` knows the registry's
/// state.
pub async fn watch(
    client: Client,
    default_namespace: String,
    source: ShardMapSource,
    registry: Arc<LiveRegistry>,
    synced: Gate,
) {
    let ns = source.namespace.clone().unwrap_or(default_namespace);
    let name = labels::shardmap_name(&source.service);
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tracing::info!(configmap = %format!("{ns}/{name}"), destination = %source.authority,
                   "following the shard map");
    let mut events = watcher(api, config)
        .backoff(WatchBackoff::default())
        .boxed();
    let mut seen_in_init = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                seen_in_init = true;
                match destination_from_configmap(&source.authority, &cm) {
                    Ok(dest) => {
                        if let crate::discovery::DestinationKind::Sharded {
                            epoch,
                            shards,
                            count,
                            previous,
                            ..
                        } = &dest.kind
                        {
                            tracing::info!(destination = %source.authority, epoch,
                                           shards = shards.len(), count, previous,
                                           members = shards.iter().map(|s| s.len()).sum::<usize>(),
                                           "shard map updated");
                        }
                        let uid = cm.metadata.uid.clone().unwrap_or_default();
                        let epoch = dest.epoch();
                        if !registry.offer(dest, &uid) {
                            tracing::warn!(destination = %source.authority, epoch,
                                           "ignoring a shard map older than the one in use; \
                                            routing stays on the newer one");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring an invalid shard map; routing stays on the last good one")
                    }
                }
            }
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(destination = %source.authority,
                               "shard map deleted (the ShardedService is gone); requests to it now fail");
                registry.remove(&source.authority);
            }
            Ok(watcher::Event::Init) => seen_in_init = false,
            Ok(watcher::Event::InitDone) => {
                synced.open();
                if !seen_in_init {
                    tracing::warn!(configmap = %format!("{ns}/{name}"),
                                   "no shard map published yet; waiting for the operator");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, configmap = %format!("{ns}/{name}"),
                               "shard-map watch failed; retrying with backoff, routing stays on the last good map")
            }
        }
    }
}

/// Opens `listed` once `authority`'s map lists `address` among shard `shard`'s members.
///
/// A member's `/ready` waits for this: the StatefulSet controller rolls on readiness, and a
/// pod that turned Ready before callers could route to it would let the rollout delete the
/// old pod while the published map still names only that one (an operator failover mid-rollout
/// leaves the map unpublished for a Lease duration).
pub async fn wait_listed(
    discovery: Arc<dyn Discover>,
    authority: String,
    shard: u32,
    address: std::net::SocketAddr,
    listed: Gate,
) {
    let Some(mut changes) = discovery.changes() else {
        listed.open();
        return;
    };
    loop {
        changes.borrow_and_update();
        if lists(discovery.as_ref(), &authority, shard, address) {
            tracing::info!(destination = %authority, shard, %address,
                           "this pod is listed in its shard map");
            listed.open();
            return;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

fn lists(
    discovery: &dyn Discover,
    authority: &str,
    shard: u32,
    address: std::net::SocketAddr,
) -> bool {
    match discovery.lookup(authority).as_deref().map(|d| &d.kind) {
        Some(crate::discovery::DestinationKind::Sharded { shards, .. }) => shards
            .get(shard as usize)
            .is_some_and(|members| members.contains(&address)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DestinationKind;

    fn cm(data: &[(&str, &str)]) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some("orders-shardmap".into());
        c.metadata.namespace = Some("shop".into());
        c.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        c
    }

    #[test]
    fn parses_sources() {
        assert_eq!(
            ShardMapSource::parse("orders=orders.shop:8080"),
            Ok(ShardMapSource {
                namespace: None,
                service: "orders".into(),
                authority: "orders.shop:8080".into()
            })
        );
        let s = ShardMapSource::parse("shop/orders=Orders").unwrap();
        assert_eq!(s.namespace.as_deref(), Some("shop"));
        assert_eq!(s.authority, "orders:80");
        for bad in ["orders", "Orders=x:1", "a/b/c=x", "orders=", "-x=y"] {
            assert!(ShardMapSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configmap_becomes_a_sharded_destination() {
        let json = r#"{"epoch":7,"shards":[{"index":0,"members":[{"pod":"o-0-0","address":"10.0.0.1:4143"}]},{"index":1,"members":[]}]}"#;
        let d = destination_from_configmap(
            "orders:8080",
            &cm(&[("shardmap.json", json), ("shardKey", "x-user")]),
        )
        .unwrap();
        let DestinationKind::Sharded {
            header,
            epoch,
            shards,
            ..
        } = &d.kind
        else {
            panic!("must be sharded")
        };
        assert_eq!(
            (header.as_str(), *epoch, shards.len(), shards[0].len()),
            ("x-user", 7, 2, 1)
        );
        // Default header when the key is absent.
        let d = destination_from_configmap("o:1", &cm(&[("shardmap.json", json)])).unwrap();
        assert!(
            matches!(&d.kind, DestinationKind::Sharded { header, .. } if header == "x-shard-key")
        );
    }

    #[test]
    fn bad_configmaps_name_the_object_and_problem() {
        let e = destination_from_configmap("o:1", &cm(&[])).unwrap_err();
        assert!(
            e.contains("shop/orders-shardmap") && e.contains("no data key"),
            "{e}"
        );
        let e = destination_from_configmap("o:1", &cm(&[("shardmap.json", "{")])).unwrap_err();
        assert!(e.contains("is not a shard map"), "{e}");
        let e = destination_from_configmap(
            "o:1",
            &cm(&[("shardmap.json", r#"{"epoch":1,"shards":[]}"#)]),
        )
        .unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn live_destinations_swap_and_shadow_static_ones() {
        let fixed = StaticRegistry::parse(
            "destinations: {a:1: {endpoints: [\"127.0.0.1:1\"]}, b:1: {endpoints: [\"127.0.0.1:2\"]}}",
        )
        .unwrap();
        let reg = LiveRegistry::new(fixed);
        let json = |epoch: i64| {
            format!(
                r#"{{"epoch":{epoch},"shards":[{{"index":0,"members":[{{"pod":"p","address":"127.0.0.1:9"}}]}}]}}"#
            )
        };
        reg.set(destination_from_configmap("a:1", &cm(&[("shardmap.json", &json(1))])).unwrap());
        let epoch_of = |reg: &LiveRegistry| match &reg.lookup("a:1").unwrap().kind {
            DestinationKind::Sharded { epoch, .. } => *epoch,
            DestinationKind::Endpoints(_) => -1,
        };
        assert_eq!(epoch_of(&reg), 1);
        let held = reg.lookup("a:1").unwrap();
        reg.set(destination_from_configmap("a:1", &cm(&[("shardmap.json", &json(2))])).unwrap());
        assert_eq!(epoch_of(&reg), 2);
        // A request that resolved before the swap keeps its consistent snapshot.
        assert!(matches!(
            &held.kind,
            DestinationKind::Sharded { epoch: 1, .. }
        ));
        assert!(reg.lookup("b:1").is_some());
        reg.remove("a:1");
        assert_eq!(epoch_of(&reg), -1, "falls back to the static entry");
    }

    #[test]
    fn epochs_only_move_forward_for_one_map_object() {
        let reg = LiveRegistry::new(StaticRegistry::empty());
        let map = |epoch: i64| {
            let json = format!(
                r#"{{"epoch":{epoch},"shards":[{{"index":0,"members":[{{"pod":"p","address":"127.0.0.1:9"}}]}}]}}"#
            );
            destination_from_configmap("a:1", &cm(&[("shardmap.json", &json)])).unwrap()
        };
        let epoch = |reg: &LiveRegistry| reg.lookup("a:1").and_then(|d| d.epoch());
        assert!(reg.offer(map(5), "uid-1"));
        assert!(
            !reg.offer(map(4), "uid-1"),
            "an older map of the same object"
        );
        assert_eq!(epoch(&reg), Some(5));
        assert!(
            reg.offer(map(5), "uid-1"),
            "the same epoch again (a resync)"
        );
        assert!(reg.offer(map(6), "uid-1"));
        // The service was deleted and created again: its new map starts over.
        assert!(reg.offer(map(1), "uid-2"));
        assert_eq!(epoch(&reg), Some(1));
        reg.remove("a:1");
        assert!(reg.offer(map(1), "uid-2"));
    }

    #[test]
    fn watch_backoff_stays_short_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut b = WatchBackoff::default();
        let waits: Vec<_> = (&mut b).take(20).collect();
        assert!(waits
            .iter()
            .all(|w| *w <= std::time::Duration::from_secs(5)));
        assert!(waits[0] <= std::time::Duration::from_millis(200));
        b.reset();
        assert!(b.next().unwrap() <= std::time::Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_newer_map_until_it_arrives_or_the_bound() {
        use crate::discovery::wait_for_epoch;
        use std::time::Duration;
        use tokio::time::Instant;
        let reg = Arc::new(LiveRegistry::new(StaticRegistry::empty()));
        let map = |epoch: i64| {
            let json = format!(
                r#"{{"epoch":{epoch},"shards":[{{"index":0,"members":[{{"pod":"p","address":"127.0.0.1:9"}}]}}]}}"#
            );
            destination_from_configmap("a:1", &cm(&[("shardmap.json", &json)])).unwrap()
        };
        reg.set(map(1));
        // Already new enough: no wait at all.
        let t0 = Instant::now();
        let d = wait_for_epoch(&*reg, "a:1", 1, Duration::from_secs(2)).await;
        assert_eq!(
            (d.and_then(|d| d.epoch()), t0.elapsed()),
            (Some(1), Duration::ZERO)
        );
        // Never arrives: the bound ends the wait with the map there is.
        let d = wait_for_epoch(&*reg, "a:1", 2, Duration::from_secs(2)).await;
        assert_eq!(d.and_then(|d| d.epoch()), Some(1));
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        // Arrives after 300 ms (an unrelated change first): the wait ends right then.
        let feeder = reg.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            feeder.remove("other:1");
            tokio::time::sleep(Duration::from_millis(200)).await;
            feeder.set(map(3));
        });
        let t1 = Instant::now();
        let d = wait_for_epoch(&*reg, "a:1", 2, Duration::from_secs(2)).await;
        assert_eq!(d.and_then(|d| d.epoch()), Some(3));
        assert_eq!(t1.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_member_is_ready_only_once_its_shard_lists_it() {
        let reg = Arc::new(LiveRegistry::new(StaticRegistry::empty()));
        let map = |epoch: i64, shard1: &str| {
            let json = format!(
                r#"{{"epoch":{epoch},"shards":[{{"index":0,"members":[{{"pod":"o-0-0","address":"10.0.0.9:4143"}}]}},{{"index":1,"members":[{shard1}]}}]}}"#
            );
            destination_from_configmap("o:80", &cm(&[("shardmap.json", &json)])).unwrap()
        };
        let gates = crate::admin::StartupGates::default();
        let me: std::net::SocketAddr = "10.0.0.9:4143".parse().unwrap();
        let waiter = tokio::spawn(wait_listed(
            reg.clone(),
            "o:80".into(),
            1,
            me,
            gates.add("listing"),
        ));
        // No map yet, then a map listing this address under another shard only.
        tokio::task::yield_now().await;
        reg.set(map(1, ""));
        tokio::task::yield_now().await;
        assert_eq!(gates.pending(), ["listing"]);
        assert!(!waiter.is_finished());
        // Listed in its own shard: the gate opens and the task ends.
        reg.set(map(2, r#"{"pod":"o-1-0","address":"10.0.0.9:4143"}"#));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("wait_listed ends once listed")
            .unwrap();
        assert!(gates.pending().is_empty());
    }
}
