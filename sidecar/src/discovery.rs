//! Endpoint discovery: which endpoints serve a destination.
//!
//! [`Discover`] is the seam between the data path and where membership comes from. The
//! [`StaticRegistry`] reads a YAML/JSON file (standalone use, local development, benchmarks);
//! the Kubernetes registry (Leases + shard-map watch) implements the same trait, so everything
//! after discovery is one code path.
//!
//! File format (YAML or JSON):
//!
//! ```yaml
//! destinations:
//!   orders.shop:8080:                # host:port as clients address it (port 80 if omitted)
//!     endpoints: ["10.0.0.7:4143", "10.0.0.8:4143"]
//!   users.shop:8080:                 # a sharded destination
//!     shardKey: x-shard-key          # header carrying the key (default x-shard-key)
//!     shardMap: {epoch: 3, shards: [{index: 0, members: [{pod: users-0-0, address: "10.0.0.9:4143"}]}]}
//! ```

use std::{
    borrow::Cow, collections::BTreeMap, collections::HashMap, net::SocketAddr, path::Path,
    sync::Arc,
};

use http::{header::HeaderName, uri::Authority};
use serde::Deserialize;
use shardmesh_api::shardmap::ShardMap;

use crate::hash::FnvBuild;

/// How requests to a destination are spread.
#[derive(Clone, Debug, PartialEq)]
pub enum DestinationKind {
    /// Any endpoint may serve any request.
    Endpoints(Arc<[SocketAddr]>),
    /// The request's key (from `header`) picks a shard; any member of it may serve.
    Sharded {
        /// Header carrying the shard key.
        header: HeaderName,
        /// Shard-map epoch, forwarded as `x-shardmesh-epoch`.
        epoch: i64,
        /// Shard count keys are routed by (at most `shards.len()`).
        count: u32,
        /// While a handoff window is open: the shard count keys were routed by before.
        previous: Option<u32>,
        /// Statuses of a GET/HEAD answer that mean a miss during a handoff window.
        handoff_miss: Arc<[u16]>,
        /// Members per listed shard, by shard index.
        shards: Vec<Arc<[SocketAddr]>>,
        /// When the destination elects shard leaders: which requests are writes, and each
        /// shard's leader.
        leaders: Option<Arc<LeaderRouting>>,
    },
}

/// Routing of writes to shard leaders.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaderRouting {
    /// Which requests are writes.
    pub writes: Writes,
    /// Per shard index: the leader (as a one-endpoint list, ready for the balancer) and its
    /// epoch, sent as the fencing epoch; `None` while the shard has no live leader.
    pub leaders: Vec<Option<(Arc<[SocketAddr]>, i64)>>,
}

/// Which requests are writes (routed to the shard leader).
#[derive(Clone, Debug, PartialEq)]
pub enum Writes {
    /// Every request whose method is not safe (anything but GET, HEAD, OPTIONS, TRACE).
    Methods,
    /// Requests carrying this header.
    Header(HeaderName),
}

impl Writes {
    /// Parses `methods` or `header:<name>`; `p` names the field in errors.
    pub fn parse(p: &str, raw: &str) -> Result<Writes, String> {
        match raw.split_once(':') {
            None if raw == "methods" => Ok(Writes::Methods),
            Some(("header", h)) => HeaderName::try_from(h).map(Writes::Header).map_err(|_| {
                format!("{p}: {h:?} is not a valid header name; write e.g. header:x-write")
            }),
            _ => Err(format!(
                "{p}: {raw:?} is neither `methods` nor `header:<name>`"
            )),
        }
    }

    /// Whether a request with this method and headers is a write.
    pub fn is_write(&self, method: &http::Method, headers: &http::HeaderMap) -> bool {
        match self {
            Writes::Methods => !method.is_safe(),
            Writes::Header(h) => headers.contains_key(h),
        }
    }
}

/// A destination known to discovery.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    /// Normalized `host:port`.
    pub name: Arc<str>,
    /// Endpoints or shards.
    pub kind: DestinationKind,
}

/// Source of destinations. Implementations must answer from memory (no I/O on the request path).
pub trait Discover: Send + Sync + 'static {
    /// The destination for a normalized authority (see [`normalize_authority`]), if known.
    fn lookup(&self, authority: &str) -> Option<Arc<Destination>>;

    /// A receiver that changes whenever any destination changes; `None` for sources that never
    /// change (a static file).
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Every destination, for the shard-map gauges a scrape reads (not the request path).
    fn destinations(&self) -> Vec<Arc<Destination>>;
}

impl Destination {
    /// The shard-map epoch of a sharded destination.
    pub fn epoch(&self) -> Option<i64> {
        match &self.kind {
            DestinationKind::Sharded { epoch, .. } => Some(*epoch),
            DestinationKind::Endpoints(_) => None,
        }
    }
}

/// Waits, at most `timeout`, until `authority`'s shard map reaches `min_epoch`; returns the
/// destination as it is then (possibly still older, or gone). Used when a peer has seen a newer
/// map than this sidecar: the watch delivers it within moments, and waiting for it beats
/// deciding by a map known to be stale.
pub async fn wait_for_epoch(
    discovery: &dyn Discover,
    authority: &str,
    min_epoch: i64,
    timeout: std::time::Duration,
) -> Option<Arc<Destination>> {
    // Subscribe before looking, so a change between the look and the wait is not missed.
    let mut changes = discovery.changes();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let dest = discovery.lookup(authority);
        let current = dest.as_ref().and_then(|d| d.epoch());
        if current.is_some_and(|e| e >= min_epoch) {
            return dest;
        }
        let Some(rx) = changes.as_mut() else {
            return dest;
        };
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return discovery.lookup(authority),
        }
    }
}

/// Parses the `handoffMiss` list (comma-separated status codes); `p` names the field.
pub fn parse_miss_statuses(p: &str, raw: &str) -> Result<Arc<[u16]>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let code: u16 = s
                .parse()
                .map_err(|_| format!("{p}: {s:?} is not a status code; use e.g. 404"))?;
            match shardmesh_api::validate::miss_status_problem(i64::from(code)) {
                None => Ok(code),
                Some(why) => Err(format!("{p}: {code}: {why}; use e.g. 404")),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Arc::from)
}

/// `host:port` in lower case, with port 80 when absent; `None` when it is not an authority.
pub fn normalize_authority(raw: &str) -> Option<String> {
    normalized(raw).map(Cow::into_owned)
}

/// [`normalize_authority`], borrowing `raw` when it is already normalized (the request path's
/// common case: no allocation).
pub fn normalized(raw: &str) -> Option<Cow<'_, str>> {
    if is_normalized(raw) {
        return Some(Cow::Borrowed(raw));
    }
    parse_authority(raw).map(Cow::Owned)
}

/// [`normalize_authority`] the long way: parse, check, format.
fn parse_authority(raw: &str) -> Option<String> {
    let a: Authority = raw.trim().parse().ok()?;
    let (text, host) = (a.as_str(), a.host());
    if text.contains('@') || host.is_empty() {
        return None;
    }
    // A port that is not 1-65535 is refused, not replaced by 80.
    let port = match text.get(host.len()..)? {
        "" => 80,
        rest => rest
            .strip_prefix(':')?
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)?,
    };
    // A host is a DNS name, an IPv4 address or a bracketed IPv6 address.
    let valid_host = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')),
    };
    valid_host.then(|| format!("{}:{port}", host.to_ascii_lowercase()))
}

/// Whether `raw` is already what [`normalize_authority`] makes of it (a lowercase DNS name or
/// IPv4 address, `:`, a port 1-65535 without leading zeros): the common case on the request
/// path, answered without parsing or formatting.
fn is_normalized(raw: &str) -> bool {
    let Some((host, port)) = raw.split_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
        && (1..=5).contains(&port.len())
        && !port.starts_with('0')
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

/// Destinations from a file, fixed for the life of the process.
#[derive(Clone, Debug, Default)]
pub struct StaticRegistry {
    destinations: HashMap<String, Arc<Destination>, FnvBuild>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    destinations: BTreeMap<String, DestinationFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DestinationFile {
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    shard_map: Option<ShardMap>,
    #[serde(default)]
    shard_key: Option<String>,
    #[serde(default)]
    writes: Option<String>,
    #[serde(default)]
    handoff_miss: Option<String>,
}

pub(crate) fn parse_addr(path: &str, raw: &str) -> Result<SocketAddr, String> {
    raw.parse().map_err(|_| {
        format!("{path}: {raw:?} is not ip:port; write e.g. \"10.0.0.7:4143\" (names are not resolved here)")
    })
}

/// A sharded destination from a shard map; `p` (the entry's path) prefixes every error.
/// Shared by the static file and the Kubernetes shard-map watch so both accept exactly the same
/// maps.
pub fn sharded_kind(
    p: &str,
    shard_key: Option<&str>,
    writes: Option<&str>,
    handoff_miss: Option<&str>,
    map: &ShardMap,
) -> Result<DestinationKind, String> {
    map.check().map_err(|e| format!("{p}.shardMap.{e}"))?;
    let handoff_miss = parse_miss_statuses(
        &format!("{p}.handoffMiss"),
        handoff_miss.unwrap_or(DEFAULT_HANDOFF_MISS),
    )?;
    let header_raw = shard_key.unwrap_or(DEFAULT_SHARD_HEADER);
    let header = HeaderName::try_from(header_raw)
        .map_err(|_| format!("{p}.shardKey: {header_raw:?} is not a valid header name"))?;
    let shards = map
        .shards
        .iter()
        .map(|s| {
            s.members
                .iter()
                .map(|m| parse_addr(p, &m.address))
                .collect::<Result<Vec<_>, _>>()
                .map(Arc::from)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaders = match writes {
        None => None,
        Some(raw) => {
            let writes = Writes::parse(&format!("{p}.writes"), raw)?;
            let leaders = map
                .shards
                .iter()
                .map(|s| {
                    s.leader
                        .as_ref()
                        .map(|l| {
                            let addr =
                                parse_addr(&format!("{p}.shards[{}].leader", s.index), &l.address)?;
                            Ok((Arc::from([addr]), l.epoch))
                        })
                        .transpose()
                })
                .collect::<Result<Vec<_>, String>>()?;
            Some(Arc::new(LeaderRouting { writes, leaders }))
        }
    };
    Ok(DestinationKind::Sharded {
        header,
        epoch: map.epoch,
        count: map.count(),
        previous: map.previous.as_ref().map(|p| p.count),
        handoff_miss,
        shards,
        leaders,
    })
}

/// Header carrying the shard key when none is configured (the CRD's default too).
pub const DEFAULT_SHARD_HEADER: &str = "x-shard-key";
/// Miss statuses when none are configured (the CRD's default too).
pub const DEFAULT_HANDOFF_MISS: &str = "404";

impl StaticRegistry {
    /// No destinations.
    pub fn empty() -> Self {
        StaticRegistry::default()
    }

    /// Reads and validates a registry file; errors name the file and the entry.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses registry YAML/JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RegistryFile = serde_yaml::from_str(text).map_err(|e| {
            format!("{e}; expected `destinations: {{\"host:port\": {{endpoints: [\"ip:port\", ...]}}}}`")
        })?;
        let mut destinations = HashMap::default();
        for (key, d) in file.destinations {
            let p = format!("destinations[{key:?}]");
            let name = normalize_authority(&key)
                .ok_or_else(|| format!("{p}: {key:?} is not host or host:port"))?;
            let kind = match (d.endpoints, d.shard_map) {
                (Some(eps), None) => {
                    for (set, field) in [
                        (d.shard_key.is_some(), "shardKey"),
                        (d.writes.is_some(), "writes"),
                        (d.handoff_miss.is_some(), "handoffMiss"),
                    ] {
                        if set {
                            return Err(format!(
                                "{p}.{field}: only valid with shardMap; remove it or add a shardMap"
                            ));
                        }
                    }
                    let addrs = eps
                        .iter()
                        .enumerate()
                        .map(|(i, e)| parse_addr(&format!("{p}.endpoints[{i}]"), e))
                        .collect::<Result<Vec<_>, _>>()?;
                    DestinationKind::Endpoints(addrs.into())
                }
                (None, Some(map)) => sharded_kind(
                    &p,
                    d.shard_key.as_deref(),
                    d.writes.as_deref(),
                    d.handoff_miss.as_deref(),
                    &map,
                )?,
                (Some(_), Some(_)) => {
                    return Err(format!("{p}: has both endpoints and shardMap; keep one"))
                }
                (None, None) => {
                    return Err(format!(
                        "{p}: needs endpoints (a list of ip:port) or a shardMap"
                    ))
                }
            };
            if destinations.contains_key(&name) {
                return Err(format!(
                    "{p}: {name} is listed twice (after normalizing to host:port)"
                ));
            }
            destinations.insert(
                name.clone(),
                Arc::new(Destination {
                    name: name.into(),
                    kind,
                }),
            );
        }
        Ok(StaticRegistry { destinations })
    }

    /// Number of destinations.
    pub fn len(&self) -> usize {
        self.destinations.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty()
    }
}

impl Discover for StaticRegistry {
    fn lookup(&self, authority: &str) -> Option<Arc<Destination>> {
        self.destinations.get(authority).cloned()
    }

    fn destinations(&self) -> Vec<Arc<Destination>> {
        self.destinations.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The fast path answers exactly what the full parse would.
        #[test]
        fn the_fast_path_agrees_with_the_parse(raw in "[a-zA-Z0-9._@:\\[\\] -]{0,12}(:[0-9]{0,6})?") {
            if is_normalized(&raw) {
                proptest::prop_assert_eq!(parse_authority(&raw), Some(raw.clone()));
            }
        }
    }

    #[test]
    fn normalizes_authorities() {
        assert_eq!(
            normalize_authority("Orders.Shop"),
            Some("orders.shop:80".into())
        );
        assert_eq!(
            normalize_authority("orders:8080"),
            Some("orders:8080".into())
        );
        assert_eq!(
            normalize_authority("127.0.0.1:9"),
            Some("127.0.0.1:9".into())
        );
        assert_eq!(normalize_authority("u@h:1"), None);
        assert_eq!(normalize_authority(""), None);
    }

    #[test]
    fn parses_endpoints_and_shard_maps() {
        let r = StaticRegistry::parse(
            r#"
destinations:
  Orders:8080: {endpoints: ["127.0.0.1:1", "127.0.0.1:2"]}
  users:
    shardKey: x-user
    shardMap: {epoch: 2, shards: [{index: 0, members: [{pod: u-0-0, address: "127.0.0.1:3"}]}, {index: 1}]}
"#,
        )
        .unwrap();
        let o = r.lookup("orders:8080").unwrap();
        assert!(matches!(&o.kind, DestinationKind::Endpoints(a) if a.len() == 2));
        let u = r.lookup("users:80").unwrap();
        let DestinationKind::Sharded {
            header,
            epoch,
            shards,
            leaders,
            ..
        } = &u.kind
        else {
            panic!("users must be sharded")
        };
        assert_eq!((header.as_str(), *epoch, shards.len()), ("x-user", 2, 2));
        assert!(shards[1].is_empty());
        assert!(leaders.is_none());
    }

    #[test]
    fn leader_routing_from_the_map() {
        let r = StaticRegistry::parse(
            r#"
destinations:
  users:
    writes: "header:x-write"
    shardMap:
      epoch: 2
      shards:
        - {index: 0, members: [{pod: u-0-0, address: "127.0.0.1:3"}], leader: {pod: u-0-0, address: "127.0.0.1:3", epoch: 5}}
        - {index: 1}
"#,
        )
        .unwrap();
        let u = r.lookup("users:80").unwrap();
        let DestinationKind::Sharded {
            leaders: Some(l), ..
        } = &u.kind
        else {
            panic!("users must elect leaders")
        };
        assert_eq!(l.writes, Writes::Header(HeaderName::from_static("x-write")));
        let (addrs, epoch) = l.leaders[0].clone().expect("shard 0 has a leader");
        assert_eq!(
            (&addrs[..], epoch),
            (&["127.0.0.1:3".parse().unwrap()][..], 5)
        );
        assert!(l.leaders[1].is_none());
        let e = StaticRegistry::parse(
            "destinations: {u: {writes: sometimes, shardMap: {epoch: 1, shards: [{index: 0}]}}}",
        )
        .unwrap_err();
        assert!(e.starts_with("destinations[\"u\"].writes"), "{e}");
        let e = StaticRegistry::parse("destinations: {u: {writes: methods, endpoints: []}}")
            .unwrap_err();
        assert!(e.contains(".writes: only valid with shardMap"), "{e}");
    }

    #[test]
    fn writes_are_unsafe_methods_or_a_header() {
        use http::{HeaderMap, Method};
        let m = Writes::parse("w", "methods").unwrap();
        let mut h = HeaderMap::new();
        assert!(m.is_write(&Method::POST, &h) && m.is_write(&Method::DELETE, &h));
        assert!(!m.is_write(&Method::GET, &h) && !m.is_write(&Method::HEAD, &h));
        let by_header = Writes::parse("w", "header:x-write").unwrap();
        assert!(!by_header.is_write(&Method::POST, &h));
        h.insert("x-write", http::HeaderValue::from_static("1"));
        assert!(by_header.is_write(&Method::GET, &h));
        assert!(Writes::parse("w", "header:bad header").is_err());
        assert!(Writes::parse("w", "always").is_err());
    }

    #[test]
    fn errors_name_the_entry() {
        let e = StaticRegistry::parse("destinations: {a: {endpoints: [\"nope\"]}}").unwrap_err();
        assert!(e.starts_with("destinations[\"a\"].endpoints[0]"), "{e}");
        let e = StaticRegistry::parse("destinations: {a: {}}").unwrap_err();
        assert!(e.contains("needs endpoints"), "{e}");
        let e = StaticRegistry::parse("destinatons: {}").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }
}
