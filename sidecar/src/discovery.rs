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

use std::{collections::BTreeMap, collections::HashMap, net::SocketAddr, path::Path, sync::Arc};

use http::{header::HeaderName, uri::Authority};
use serde::Deserialize;
use shardmesh_api::shardmap::ShardMap;

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
        /// Members per shard, by shard index.
        shards: Vec<Arc<[SocketAddr]>>,
    },
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
}

/// `host:port` in lower case, with port 80 when absent; `None` when it is not an authority.
pub fn normalize_authority(raw: &str) -> Option<String> {
    let a: Authority = raw.trim().parse().ok()?;
    if a.as_str().contains('@') || a.host().is_empty() {
        return None;
    }
    let port = a.port_u16().unwrap_or(80);
    Some(format!("{}:{port}", a.host().to_ascii_lowercase()))
}

/// Destinations from a file, fixed for the life of the process.
#[derive(Clone, Debug, Default)]
pub struct StaticRegistry {
    destinations: HashMap<String, Arc<Destination>>,
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
}

fn parse_addr(path: &str, raw: &str) -> Result<SocketAddr, String> {
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
    map: &ShardMap,
) -> Result<DestinationKind, String> {
    map.check().map_err(|e| format!("{p}.shardMap.{e}"))?;
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
    Ok(DestinationKind::Sharded {
        header,
        epoch: map.epoch,
        shards,
    })
}

/// Header carrying the shard key when none is configured (the CRD's default too).
pub const DEFAULT_SHARD_HEADER: &str = "x-shard-key";

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
        let mut destinations = HashMap::new();
        for (key, d) in file.destinations {
            let p = format!("destinations[{key:?}]");
            let name = normalize_authority(&key)
                .ok_or_else(|| format!("{p}: {key:?} is not host or host:port"))?;
            let kind = match (d.endpoints, d.shard_map) {
                (Some(eps), None) => {
                    if d.shard_key.is_some() {
                        return Err(format!(
                            "{p}.shardKey: only valid with shardMap; remove it or add a shardMap"
                        ));
                    }
                    let addrs = eps
                        .iter()
                        .enumerate()
                        .map(|(i, e)| parse_addr(&format!("{p}.endpoints[{i}]"), e))
                        .collect::<Result<Vec<_>, _>>()?;
                    DestinationKind::Endpoints(addrs.into())
                }
                (None, Some(map)) => sharded_kind(&p, d.shard_key.as_deref(), &map)?,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        } = &u.kind
        else {
            panic!("users must be sharded")
        };
        assert_eq!((header.as_str(), *epoch, shards.len()), ("x-user", 2, 2));
        assert!(shards[1].is_empty());
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
