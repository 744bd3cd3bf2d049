//! The Kubernetes side of discovery: each configured sharded destination follows the
//! `ShardMapSlice`s the operator publishes for its service (one per shard, watched by the
//! service's label), so a membership change delivers one shard's slice, not the whole map.
//!
//! Slices are combined only when every listed shard has one of the same layout
//! ([`shardmesh_api::shardmap::assemble`]); a slice of the layout in use replaces just its shard
//! in the routing table (its addresses are the only ones parsed). The routing table is swapped
//! per destination in one step (readers never see a half-updated map). On API errors the watch
//! retries with backoff and the last good map keeps routing; a slice that fails validation, or
//! a layout not yet complete, is logged and routing stays on the last good map. Destinations of
//! the static registry file stay available beside the live ones.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use shardmesh_api::{
    labels,
    shardmap::{self, Layout, ShardMapSlice, ShardMapSliceSpec, MAX_SHARDS},
};

use crate::{
    admin::Gate,
    discovery::{
        normalize_authority, parse_addr, sharded_kind, Destination, DestinationKind, Discover,
        StaticRegistry,
    },
    hash::FnvBuild,
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

/// The destination `authority` routes by, from a service's complete set of slices; `what`
/// (the service) prefixes every error.
pub fn destination_from_slices<'a>(
    authority: &str,
    what: &str,
    slices: impl IntoIterator<Item = &'a ShardMapSliceSpec>,
) -> Result<Destination, String> {
    built_from_slices(authority, what, slices).map(|(_, dest)| dest)
}

/// [`destination_from_slices`] with the layout the slices share.
fn built_from_slices<'a>(
    authority: &str,
    what: &str,
    slices: impl IntoIterator<Item = &'a ShardMapSliceSpec>,
) -> Result<(Layout, Destination), String> {
    let a = shardmap::assemble(slices).map_err(|e| format!("{what}: {e}"))?;
    let kind = sharded_kind(
        what,
        Some(&a.layout.shard_key),
        a.layout.writes.as_deref(),
        Some(&a.layout.handoff_miss),
        &a.map,
    )?;
    Ok((
        a.layout,
        Destination {
            name: authority.into(),
            kind,
        },
    ))
}

/// What a destination's watch knows: the slices seen (at most one per shard index, bounded by
/// [`MAX_SHARDS`]) and the routing table last built from them with its layout.
pub struct Follower {
    service: String,
    authority: String,
    what: String,
    slices: BTreeMap<u32, ShardMapSliceSpec>,
    built: Option<(Layout, Destination)>,
    /// UID of the ShardedService owning the slices: a new one (deleted and created again)
    /// starts the epoch over.
    owner: String,
}

/// The outcome of one watch event for the routing table.
#[derive(Debug, PartialEq)]
pub enum Update {
    /// A new routing table.
    Route(Destination, String),
    /// The service has no slices any more.
    Gone,
    /// Nothing to change; the reason when it is worth telling.
    Keep(Option<String>),
}

impl Follower {
    /// Follows `service` (in `namespace`) for requests to `authority`.
    pub fn new(namespace: &str, service: &str, authority: &str) -> Follower {
        Follower {
            service: service.to_string(),
            authority: authority.to_string(),
            what: format!("shard map of {namespace}/{service}"),
            slices: BTreeMap::new(),
            built: None,
            owner: String::new(),
        }
    }

    /// Checks that `slice` is one of this service's, under the name of its shard.
    fn admit(&self, slice: &ShardMapSlice) -> Result<u32, String> {
        let index = slice.spec.shard.index;
        let name = slice.name_any();
        if index >= MAX_SHARDS {
            return Err(format!(
                "{}: slice {name}: shard {index} is past the maximum of {MAX_SHARDS}",
                self.what
            ));
        }
        if name != labels::shard_object_name(&self.service, index) {
            return Err(format!(
                "{}: slice {name} carries shard {index}, so it must be named {}",
                self.what,
                labels::shard_object_name(&self.service, index)
            ));
        }
        Ok(index)
    }

    /// Takes one slice (added or changed).
    pub fn apply(&mut self, slice: ShardMapSlice) -> Update {
        let index = match self.admit(&slice) {
            Ok(i) => i,
            Err(e) => return Update::Keep(Some(e)),
        };
        if let Some(o) = slice.owner_references().first() {
            self.owner.clone_from(&o.uid);
        }
        let spec = slice.spec;
        // A slice of the layout in use replaces its shard only.
        let patched = match &self.built {
            Some((layout, current)) if *layout == spec.layout => {
                Some(self.patch(current, &spec).map(|d| (layout.clone(), d)))
            }
            _ => None,
        };
        self.slices.insert(index, spec);
        match patched {
            Some(Ok(built)) => {
                let dest = built.1.clone();
                self.built = Some(built);
                Update::Route(dest, self.owner.clone())
            }
            Some(Err(e)) => Update::Keep(Some(e)),
            None => self.rebuild(),
        }
    }

    /// Forgets one slice (deleted).
    pub fn remove(&mut self, slice: &ShardMapSlice) -> Update {
        if let Ok(index) = self.admit(slice) {
            self.slices.remove(&index);
        }
        if self.slices.is_empty() {
            self.built = None;
            return Update::Gone;
        }
        // The operator deletes only slices past the listed shards; a listed one going missing
        // leaves routing on the map built before.
        Update::Keep(None)
    }

    /// Starts over from a fresh listing.
    pub fn reset(&mut self, slices: Vec<ShardMapSlice>) -> Update {
        self.slices.clear();
        let mut refused = None;
        for s in slices {
            match self.admit(&s) {
                Ok(index) => {
                    if let Some(o) = s.owner_references().first() {
                        self.owner.clone_from(&o.uid);
                    }
                    self.slices.insert(index, s.spec);
                }
                Err(e) => refused = Some(e),
            }
        }
        if self.slices.is_empty() {
            self.built = None;
            return Update::Gone;
        }
        match self.rebuild() {
            Update::Keep(None) => Update::Keep(refused),
            u => u,
        }
    }

    fn rebuild(&mut self) -> Update {
        match built_from_slices(&self.authority, &self.what, self.slices.values()) {
            Ok((layout, dest)) => {
                self.built = Some((layout, dest.clone()));
                Update::Route(dest, self.owner.clone())
            }
            Err(e) => Update::Keep(Some(e)),
        }
    }

    /// `current` with the shard of `spec` (of the same layout) replaced.
    fn patch(
        &self,
        current: &Destination,
        spec: &ShardMapSliceSpec,
    ) -> Result<Destination, String> {
        let DestinationKind::Sharded {
            header,
            epoch,
            count,
            previous,
            handoff_miss,
            shards,
            leaders,
        } = &current.kind
        else {
            return Err(format!("{}: not a sharded destination", self.what));
        };
        let i = spec.shard.index as usize;
        let p = format!("{}.shards[{i}]", self.what);
        if i >= shards.len() {
            return Err(format!("{p}: past the {} listed shard(s)", shards.len()));
        }
        let members = spec
            .shard
            .members
            .iter()
            .map(|m| parse_addr(&p, &m.address))
            .collect::<Result<Vec<_>, _>>()?;
        let mut shards = shards.clone();
        shards[i] = Arc::from(members);
        let leaders = match leaders {
            None => None,
            Some(l) => {
                let mut l = (**l).clone();
                l.leaders[i] = spec
                    .shard
                    .leader
                    .as_ref()
                    .map(|x| {
                        parse_addr(&format!("{p}.leader"), &x.address)
                            .map(|a| (Arc::from([a]), x.epoch))
                    })
                    .transpose()?;
                Some(Arc::new(l))
            }
        };
        Ok(Destination {
            name: current.name.clone(),
            kind: DestinationKind::Sharded {
                header: header.clone(),
                epoch: (*epoch).max(spec.epoch),
                count: *count,
                previous: *previous,
                handoff_miss: handoff_miss.clone(),
                shards,
                leaders,
            },
        })
    }
}

/// Static destinations plus live ones fed by shard-map watches.
pub struct LiveRegistry {
    fixed: StaticRegistry,
    // A lock held only to clone or replace an `Arc`: no I/O, no await, so the request path
    // never waits on the API server. Bounded: one entry per `--shardmap` flag.
    live: RwLock<HashMap<String, Arc<Destination>, FnvBuild>>,
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
            live: RwLock::new(HashMap::default()),
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

    fn destinations(&self) -> Vec<Arc<Destination>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        // Live ones shadow static ones of the same name, as in `lookup`.
        let mut all: Vec<Arc<Destination>> = live.values().cloned().collect();
        all.extend(
            self.fixed
                .destinations()
                .into_iter()
                .filter(|d| !live.contains_key(d.name.as_ref())),
        );
        all
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

/// Follows one service's shard-map slices forever, feeding `registry`. `synced` opens once the
/// first listing completed (whether or not a map exists yet), so `/ready` knows the registry's
/// state.
pub async fn watch(
    client: Client,
    default_namespace: String,
    source: ShardMapSource,
    registry: Arc<LiveRegistry>,
    synced: Gate,
) {
    let ns = source.namespace.clone().unwrap_or(default_namespace);
    let api: Api<ShardMapSlice> = Api::namespaced(client, &ns);
    let config =
        watcher::Config::default().labels(&format!("{}={}", labels::SERVICE, source.service));
    let mut follower = Follower::new(&ns, &source.service, &source.authority);
    tracing::info!(service = %format!("{ns}/{}", source.service), destination = %source.authority,
                   "following the shard map");
    let mut events = watcher(api, config)
        .backoff(WatchBackoff::default())
        .boxed();
    // A re-listing is collected whole before it replaces what is known (bounded: one slice
    // per shard index is kept, see `Follower`).
    let mut listing: Option<Vec<ShardMapSlice>> = None;
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(s)) => {
                let l = listing.get_or_insert_with(Vec::new);
                if l.len() < 2 * MAX_SHARDS as usize {
                    l.push(s);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let all = listing.take().unwrap_or_default();
                if all.is_empty() {
                    tracing::warn!(service = %format!("{ns}/{}", source.service),
                                   "no shard map published yet; waiting for the operator");
                }
                let u = follower.reset(all);
                synced.open();
                u
            }
            Ok(watcher::Event::Apply(s)) => follower.apply(s),
            Ok(watcher::Event::Delete(s)) => follower.remove(&s),
            Err(e) => {
                tracing::warn!(error = %e, service = %format!("{ns}/{}", source.service),
                               "shard-map watch failed; retrying with backoff, routing stays on the last good map");
                continue;
            }
        };
        match update {
            Update::Route(dest, owner) => {
                if let DestinationKind::Sharded {
                    epoch,
                    shards,
                    count,
                    previous,
                    ..
                } = &dest.kind
                {
                    tracing::debug!(destination = %source.authority, epoch,
                                    shards = shards.len(), count, previous,
                                    members = shards.iter().map(|s| s.len()).sum::<usize>(),
                                    "shard map updated");
                }
                let epoch = dest.epoch();
                if !registry.offer(dest, &owner) {
                    tracing::warn!(destination = %source.authority, epoch,
                                   "ignoring a shard map older than the one in use; \
                                    routing stays on the newer one");
                }
            }
            Update::Gone => {
                if registry.lookup(&source.authority).is_some() {
                    tracing::warn!(destination = %source.authority,
                                   "shard map deleted (the ShardedService is gone); requests to it now fail");
                }
                registry.remove(&source.authority);
            }
            Update::Keep(Some(why)) => {
                tracing::info!(destination = %source.authority, reason = %why,
                               "shard map not updated; routing stays on the last complete one")
            }
            Update::Keep(None) => {}
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

    use shardmesh_api::shardmap::{Member, Shard, ShardMap};

    /// The slices of a map of `orders` in `shop`, one per entry of `shards` (member addresses),
    /// under layout `layout`.
    fn slices_of(epoch: i64, layout: i64, shards: &[&[&str]]) -> Vec<ShardMapSlice> {
        let map = ShardMap {
            epoch,
            routing_count: None,
            previous: None,
            shards: shards
                .iter()
                .enumerate()
                .map(|(i, addrs)| Shard {
                    index: i as u32,
                    members: addrs
                        .iter()
                        .enumerate()
                        .map(|(j, a)| Member {
                            pod: format!("orders-{i}-{j}"),
                            address: a.to_string(),
                        })
                        .collect(),
                    leader: None,
                })
                .collect(),
        };
        let layout = Layout {
            id: layout,
            shard_key: "x-user".into(),
            handoff_miss: "404".into(),
            ..Layout::default()
        };
        shardmap::slices(&map, &layout)
            .into_iter()
            .map(|spec| {
                let mut s = ShardMapSlice::new(
                    &labels::shard_object_name("orders", spec.shard.index),
                    spec,
                );
                s.metadata.namespace = Some("shop".into());
                s.metadata.owner_references = Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        uid: "uid-1".into(),
                        ..Default::default()
                    },
                ]);
                s
            })
            .collect()
    }

    fn dest(epoch: i64, shards: &[&[&str]]) -> Destination {
        let s = slices_of(epoch, 1, shards);
        destination_from_slices(
            "orders:8080",
            "shard map of shop/orders",
            s.iter().map(|s| &s.spec),
        )
        .unwrap()
    }

    fn addrs(d: &Destination) -> Vec<Vec<String>> {
        match &d.kind {
            DestinationKind::Sharded { shards, .. } => shards
                .iter()
                .map(|s| s.iter().map(|a| a.to_string()).collect())
                .collect(),
            DestinationKind::Endpoints(_) => panic!("must be sharded"),
        }
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
    fn slices_become_a_sharded_destination() {
        let d = dest(7, &[&["10.0.0.1:4143"], &[]]);
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
    }

    #[test]
    fn a_slice_of_the_layout_in_use_replaces_its_shard_only() {
        let mut f = Follower::new("shop", "orders", "orders:8080");
        let first = slices_of(3, 3, &[&["10.0.0.1:1"], &["10.0.0.2:1"], &[]]);
        let Update::Route(d, owner) = f.reset(first.clone()) else {
            panic!("a complete map routes")
        };
        assert_eq!((d.epoch(), owner.as_str()), (Some(3), "uid-1"));
        // Shard 2 gains a member at epoch 4: only its slice arrives.
        let mut s2 = first[2].clone();
        s2.spec.epoch = 4;
        s2.spec.shard.members.push(Member {
            pod: "orders-2-0".into(),
            address: "10.0.0.3:1".into(),
        });
        let Update::Route(d, _) = f.apply(s2.clone()) else {
            panic!("a slice of the layout in use routes")
        };
        assert_eq!(d.epoch(), Some(4));
        assert_eq!(
            addrs(&d),
            [vec!["10.0.0.1:1"], vec!["10.0.0.2:1"], vec!["10.0.0.3:1"]]
        );
        // The patched table equals the one combined from all slices.
        let mut all = first.clone();
        all[2] = s2;
        assert_eq!(
            d,
            destination_from_slices(
                "orders:8080",
                "shard map of shop/orders",
                all.iter().map(|s| &s.spec)
            )
            .unwrap()
        );
        // A bad address in a slice is refused; routing stays on the last good table.
        let mut bad = first[0].clone();
        bad.spec.shard.members[0].address = "nowhere".into();
        assert!(
            matches!(f.apply(bad), Update::Keep(Some(e)) if e.contains("shards[0]") && e.contains("nowhere"))
        );
        // A slice under someone else's name is refused.
        let mut stray = first[1].clone();
        stray.metadata.name = Some("orders-7".into());
        assert!(
            matches!(f.apply(stray), Update::Keep(Some(e)) if e.contains("must be named orders-1"))
        );
    }

    #[test]
    fn a_new_layout_routes_only_once_every_listed_shard_has_it() {
        let mut f = Follower::new("shop", "orders", "orders:8080");
        assert!(matches!(
            f.reset(slices_of(5, 5, &[&["10.0.0.1:1"], &["10.0.0.2:1"]])),
            Update::Route(..)
        ));
        // Growing to three shards at epoch 6: a new layout; its slices arrive one by one.
        let grown = slices_of(6, 6, &[&["10.0.0.1:1"], &["10.0.0.2:1"], &["10.0.0.3:1"]]);
        for s in &grown[..2] {
            let u = f.apply(s.clone());
            assert!(
                matches!(&u, Update::Keep(Some(e)) if e.contains("not yet published")),
                "{u:?}"
            );
        }
        let Update::Route(d, _) = f.apply(grown[2].clone()) else {
            panic!("complete")
        };
        assert_eq!((d.epoch(), addrs(&d).len()), (Some(6), 3));
        // Shrinking back: the slice past the listed shards is deleted; nothing else changes.
        assert_eq!(f.remove(&grown[2]), Update::Keep(None));
        for s in &grown[..2] {
            assert_eq!(f.remove(s) == Update::Gone, s.spec.shard.index == 1);
        }
    }

    #[test]
    fn bad_slices_name_the_service_and_problem() {
        let none: Vec<ShardMapSlice> = Vec::new();
        let e = destination_from_slices(
            "o:1",
            "shard map of shop/orders",
            none.iter().map(|s| &s.spec),
        )
        .unwrap_err();
        assert!(e.contains("shop/orders") && e.contains("no slices"), "{e}");
        let mut s = slices_of(1, 1, &[&["10.0.0.1:1"]]);
        s[0].spec.layout.shard_key = "bad header".into();
        let e =
            destination_from_slices("o:1", "shard map of shop/orders", s.iter().map(|s| &s.spec))
                .unwrap_err();
        assert!(e.contains("shop/orders.shardKey"), "{e}");
    }

    #[test]
    fn live_destinations_swap_and_shadow_static_ones() {
        let fixed = StaticRegistry::parse(
            "destinations: {a:1: {endpoints: [\"127.0.0.1:1\"]}, b:1: {endpoints: [\"127.0.0.1:2\"]}}",
        )
        .unwrap();
        let reg = LiveRegistry::new(fixed);
        let map = |epoch: i64| Destination {
            name: "a:1".into(),
            ..dest(epoch, &[&["127.0.0.1:9"]])
        };
        reg.set(map(1));
        let epoch_of = |reg: &LiveRegistry| match &reg.lookup("a:1").unwrap().kind {
            DestinationKind::Sharded { epoch, .. } => *epoch,
            DestinationKind::Endpoints(_) => -1,
        };
        assert_eq!(epoch_of(&reg), 1);
        let held = reg.lookup("a:1").unwrap();
        reg.set(map(2));
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
        let map = |epoch: i64| Destination {
            name: "a:1".into(),
            ..dest(epoch, &[&["127.0.0.1:9"]])
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
        let map = |epoch: i64| Destination {
            name: "a:1".into(),
            ..dest(epoch, &[&["127.0.0.1:9"]])
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
        let map = |epoch: i64, shard1: &[&str]| Destination {
            name: "o:80".into(),
            ..dest(epoch, &[&["10.0.0.9:4143"], shard1])
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
        reg.set(map(1, &[]));
        tokio::task::yield_now().await;
        assert_eq!(gates.pending(), ["listing"]);
        assert!(!waiter.is_finished());
        // Listed in its own shard: the gate opens and the task ends.
        reg.set(map(2, &["10.0.0.9:4143"]));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("wait_listed ends once listed")
            .unwrap();
        assert!(gates.pending().is_empty());
    }
}
