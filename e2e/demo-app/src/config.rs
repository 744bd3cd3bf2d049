//! Configuration from flags and environment, validated with messages that say what to fix.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Largest shard count the `ShardedService` API accepts.
pub const MAX_SHARDS: u32 = 1024;

/// Raw values as given on the command line or in the environment (all optional strings so that
/// every bad value gets our own message naming the variable, not a generic parse error).
#[derive(Clone, Debug, Default, clap::Parser)]
#[command(
    name = "shardmesh-demo",
    version,
    about = "Demo key-value server for shardmesh: serves /kv/{key} only for keys of its own shard (421 otherwise)"
)]
pub struct RawConfig {
    /// Listen address: a port (binds 0.0.0.0:PORT) or HOST:PORT.
    #[arg(long, env = "PORT", default_value = "8080")]
    pub listen: String,
    /// This pod's shard index (0-based); the shardmesh operator injects SHARDMESH_SHARD.
    #[arg(long, env = "SHARDMESH_SHARD")]
    pub shard: Option<String>,
    /// Number of shards of the service; the shardmesh operator injects SHARDMESH_SHARDS.
    #[arg(long, env = "SHARDMESH_SHARDS")]
    pub shards: Option<String>,
    /// Name reported in responses and logs (default: the hostname, which is the pod name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Header that may carry the shard key; when present it must equal the key in the path.
    #[arg(long, env = "SHARDMESH_KEY_HEADER", default_value = "x-shard-key")]
    pub key_header: String,
    /// Milliseconds to keep accepting requests after SIGTERM before draining (lets endpoint
    /// removal propagate first; 0 stops accepting at once).
    #[arg(long, env = "SHUTDOWN_DELAY_MS", default_value = "0")]
    pub shutdown_delay_ms: String,
}

/// Validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub shard: u32,
    pub shards: u32,
    pub pod: String,
    pub key_header: hyper::header::HeaderName,
    pub shutdown_delay: std::time::Duration,
}

/// A configuration error; its text names the variable and says how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: String) -> Result<Config, ConfigError> {
    Err(ConfigError(msg))
}

/// Parses `--listen`/`PORT`: either a bare port or `HOST:PORT`.
pub fn parse_listen(value: &str) -> Option<SocketAddr> {
    let value = value.trim();
    if let Ok(port) = value.parse::<u16>() {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    value.parse::<SocketAddr>().ok()
}

impl RawConfig {
    /// Validates the raw values; `hostname` is the fallback pod name.
    pub fn validate(&self, hostname: Option<String>) -> Result<Config, ConfigError> {
        let Some(listen) = parse_listen(&self.listen) else {
            return err(format!(
                "invalid PORT / --listen {:?}: give a port number (0-65535, e.g. 8080) or HOST:PORT (e.g. 127.0.0.1:8080)",
                self.listen
            ));
        };
        let Some(shards_raw) = self.shards.as_deref() else {
            return err("SHARDMESH_SHARDS is not set: set it to the number of shards of the service \
                 (the shardmesh operator injects it into pods of a ShardedService), or pass --shards N"
                .to_string());
        };
        let shards = match shards_raw.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_SHARDS).contains(&n) => n,
            _ => {
                return err(format!(
                    "invalid SHARDMESH_SHARDS {shards_raw:?}: it must be a whole number from 1 to {MAX_SHARDS} (the shard count)"
                ))
            }
        };
        let Some(shard_raw) = self.shard.as_deref() else {
            return err("SHARDMESH_SHARD is not set: set it to this pod's shard index (0-based; \
                 the shardmesh operator injects it into pods of a ShardedService), or pass --shard I"
                .to_string());
        };
        let shard = match shard_raw.trim().parse::<u32>() {
            Ok(i) if i < shards => i,
            Ok(i) => {
                return err(format!(
                    "invalid SHARDMESH_SHARD {i}: with SHARDMESH_SHARDS={shards} it must be from 0 to {}",
                    shards - 1
                ))
            }
            Err(_) => {
                return err(format!(
                    "invalid SHARDMESH_SHARD {shard_raw:?}: it must be a whole number from 0 to {} (this pod's shard index)",
                    shards - 1
                ))
            }
        };
        let pod = match self.pod_name.as_deref().map(str::trim) {
            Some(p) if !p.is_empty() => p.to_string(),
            Some(_) => {
                return err("POD_NAME is set but empty: unset it (the hostname is used) or set it to the pod's name, \
                     e.g. from the downward API fieldRef metadata.name"
                    .to_string())
            }
            None => hostname
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "unknown".to_string()),
        };
        if pod.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return err(format!(
                "invalid POD_NAME {pod:?}: only printable ASCII is allowed (it is sent in the x-demo-pod header)"
            ));
        }
        let key_header = match hyper::header::HeaderName::from_bytes(self.key_header.trim().as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                return err(format!(
                    "invalid SHARDMESH_KEY_HEADER / --key-header {:?}: give an HTTP header name such as x-shard-key",
                    self.key_header
                ))
            }
        };
        let shutdown_delay = match self.shutdown_delay_ms.trim().parse::<u64>() {
            Ok(ms) if ms <= 600_000 => std::time::Duration::from_millis(ms),
            _ => {
                return err(format!(
                    "invalid SHUTDOWN_DELAY_MS / --shutdown-delay-ms {:?}: give milliseconds from 0 to 600000",
                    self.shutdown_delay_ms
                ))
            }
        };
        Ok(Config {
            listen,
            shard,
            shards,
            pod,
            key_header,
            shutdown_delay,
        })
    }
}

/// The machine's hostname (in a pod: the pod name).
pub fn hostname() -> Option<String> {
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.trim().is_empty() {
            return Some(h.trim().to_string());
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(shard: Option<&str>, shards: Option<&str>) -> RawConfig {
        RawConfig {
            listen: "8080".into(),
            shard: shard.map(Into::into),
            shards: shards.map(Into::into),
            pod_name: Some("orders-1-0".into()),
            key_header: "x-shard-key".into(),
            shutdown_delay_ms: "0".into(),
        }
    }

    #[test]
    fn valid_config() {
        let c = raw(Some("1"), Some("3")).validate(None).expect("valid");
        assert_eq!(c.shard, 1);
        assert_eq!(c.shards, 3);
        assert_eq!(c.pod, "orders-1-0");
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("addr"));
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            parse_listen("9000"),
            Some("0.0.0.0:9000".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen("127.0.0.1:0"),
            Some("127.0.0.1:0".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen("[::1]:80"),
            Some("[::1]:80".parse().expect("addr"))
        );
        assert_eq!(parse_listen("eighty"), None);
        assert_eq!(parse_listen("70000"), None);
    }

    #[test]
    fn errors_name_the_variable() {
        let cases = [
            (raw(None, Some("3")), "SHARDMESH_SHARD is not set"),
            (raw(Some("0"), None), "SHARDMESH_SHARDS is not set"),
            (raw(Some("3"), Some("3")), "invalid SHARDMESH_SHARD 3"),
            (raw(Some("-1"), Some("3")), "invalid SHARDMESH_SHARD \"-1\""),
            (raw(Some("0"), Some("0")), "invalid SHARDMESH_SHARDS \"0\""),
            (raw(Some("0"), Some("x")), "invalid SHARDMESH_SHARDS \"x\""),
            (raw(Some("0"), Some("5000")), "invalid SHARDMESH_SHARDS"),
        ];
        for (r, want) in cases {
            let e = r.validate(None).expect_err(want);
            assert!(e.0.starts_with(want), "{e} does not start with {want}");
        }
        let mut r = raw(Some("0"), Some("1"));
        r.listen = "nope".into();
        assert!(r.validate(None).expect_err("listen").0.contains("PORT"));
        let mut r = raw(Some("0"), Some("1"));
        r.pod_name = Some(" ".into());
        assert!(r.validate(None).expect_err("pod").0.contains("POD_NAME"));
        let mut r = raw(Some("0"), Some("1"));
        r.shutdown_delay_ms = "-5".into();
        assert!(r
            .validate(None)
            .expect_err("delay")
            .0
            .contains("SHUTDOWN_DELAY_MS"));
        let mut r = raw(Some("0"), Some("1"));
        r.key_header = "bad header".into();
        assert!(r
            .validate(None)
            .expect_err("header")
            .0
            .contains("SHARDMESH_KEY_HEADER"));
    }

    #[test]
    fn pod_name_falls_back_to_hostname() {
        let mut r = raw(Some("0"), Some("1"));
        r.pod_name = None;
        assert_eq!(r.validate(Some("host-a".into())).expect("ok").pod, "host-a");
        assert_eq!(r.validate(None).expect("ok").pod, "unknown");
    }
}
