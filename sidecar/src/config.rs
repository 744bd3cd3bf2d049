//! Configuration: flags (each also an environment variable), the resilience policy, and their
//! validation. Every error names the flag or policy field and says how to fix it; `main` exits
//! with status 2 on any of them.
//!
//! The policy has exactly the shape of a ShardedService's `spec.resilience` (the operator can
//! pass it through verbatim) and is validated by the same code as the admission webhook, so a
//! policy the API server accepts is one the sidecar accepts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser};
use serde_json::{json, Value};
use shardmesh_api::{
    ports::{SIDECAR_ADMIN, SIDECAR_INBOUND, SIDECAR_OUTBOUND},
    v1alpha1::Resilience,
    validate::validate,
    ShardedService,
};

use crate::{
    access_log::AccessLogConfig,
    breaker::BreakerConfig,
    budget::{BudgetConfig, WINDOW},
    discovery::StaticRegistry,
    retry::RetryPolicy,
};

/// A configuration problem: what (flag, env var or field) and why/how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {message}")]
pub struct ConfigError {
    /// The flag (with its env var) or the policy field.
    pub what: String,
    /// The problem and the fix.
    pub message: String,
}

impl ConfigError {
    /// An error about `what`.
    pub fn new(what: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            what: what.into(),
            message: message.into(),
        }
    }
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    shardmesh_api::duration::parse_duration(s).map_err(|e| e.to_string())
}

fn fraction_arg(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a fraction; use a number from 0.0 to 1.0, e.g. 0.1 to log 10% of successful requests")),
    }
}

/// Command line (every flag can also be given as the environment variable shown).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "shardmesh-sidecar",
    version,
    about = "The shardmesh sidecar: inbound/outbound HTTP proxy with timeouts, safe retries, circuit breaking and access logs"
)]
pub struct Args {
    /// Address of the inbound proxy (traffic to the application).
    #[arg(long, env = "SHARDMESH_INBOUND_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], SIDECAR_INBOUND)))]
    pub inbound_addr: SocketAddr,

    /// Address of the outbound proxy (the application's HTTP_PROXY / fixed local port).
    #[arg(long, env = "SHARDMESH_OUTBOUND_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], SIDECAR_OUTBOUND)))]
    pub outbound_addr: SocketAddr,

    /// Address of the admin server (/live, /ready, /metrics; /shutdown and /log-level from
    /// loopback only).
    #[arg(long, env = "SHARDMESH_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], SIDECAR_ADMIN)))]
    pub admin_addr: SocketAddr,

    /// Port of the application on 127.0.0.1. Without it the inbound proxy is off.
    #[arg(long, env = "SHARDMESH_APP_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub app_port: Option<u16>,

    /// Static registry file (YAML or JSON): destination host:port → endpoints or shard map.
    #[arg(long, env = "SHARDMESH_REGISTRY")]
    pub registry: Option<PathBuf>,

    /// File holding the resilience policy (YAML or JSON, the shape of a ShardedService's
    /// spec.resilience; a top-level `resilience:` key is accepted too).
    #[arg(long, env = "SHARDMESH_POLICY_FILE", conflicts_with = "policy_inline")]
    pub policy: Option<PathBuf>,

    /// The resilience policy inline (YAML or JSON), as an alternative to --policy.
    #[arg(long, env = "SHARDMESH_POLICY")]
    pub policy_inline: Option<String>,

    /// Proxy hosts missing from the registry by resolving them with DNS (same resilience).
    #[arg(long, env = "SHARDMESH_PASSTHROUGH", default_value_t = true, action = ArgAction::Set)]
    pub passthrough: bool,

    /// After SIGTERM: how long to keep accepting connections while readiness fails.
    #[arg(long, env = "SHARDMESH_DRAIN_DELAY", default_value = "5s", value_parser = duration_arg)]
    pub drain_delay: Duration,

    /// After the drain delay: how long in-flight requests may take before exiting anyway.
    #[arg(long, env = "SHARDMESH_GRACE_PERIOD", default_value = "20s", value_parser = duration_arg)]
    pub grace_period: Duration,

    /// `Retry-After` sent with requests shed by the inbound concurrency limit.
    #[arg(long, env = "SHARDMESH_SHED_RETRY_AFTER", default_value = "1s", value_parser = duration_arg)]
    pub shed_retry_after: Duration,

    /// Log level or tracing filter (e.g. info, debug, info,shardmesh_sidecar=debug).
    #[arg(long, env = "SHARDMESH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Emit access-log lines (true/false).
    #[arg(long, env = "SHARDMESH_ACCESS_LOG", default_value_t = true, action = ArgAction::Set)]
    pub access_log: bool,

    /// Share of successful requests logged (0.0-1.0); failures and retried requests are always
    /// logged.
    #[arg(long, env = "SHARDMESH_ACCESS_LOG_SAMPLE", default_value = "1.0", value_parser = fraction_arg)]
    pub access_log_sample: f64,
}

/// The validated resilience policy in the sidecar's units.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// TCP connect timeout.
    pub connect: Duration,
    /// Per-try timeout.
    pub per_try: Duration,
    /// Overall deadline.
    pub overall: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// Retry budget.
    pub budget: BudgetConfig,
    /// Breakers.
    pub breaker: BreakerConfig,
    /// Most endpoints of a destination ejected at once, in percent.
    pub max_ejection_percent: u32,
    /// Inbound bulkhead.
    pub max_in_flight: usize,
}

/// Field names of the known policy, to reject typos (serde would silently ignore them).
fn unknown_fields(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    if let (Value::Object(i), Value::Object(k)) = (input, known) {
        for (key, v) in i {
            let p = format!("{path}.{key}");
            match k.get(key) {
                None => {
                    let mut valid: Vec<&str> = k.keys().map(String::as_str).collect();
                    valid.sort_unstable();
                    out.push(format!(
                        "{p}: unknown field; valid fields here: {}",
                        valid.join(", ")
                    ));
                }
                Some(kv) => unknown_fields(v, kv, &p, out),
            }
        }
    }
}

impl Policy {
    /// Parses and validates a policy document; `source` (e.g. `--policy /etc/p.yaml`) prefixes
    /// every error.
    pub fn parse(text: &str, source: &str) -> Result<Policy, ConfigError> {
        let mut value: Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::new(source, format!("not valid YAML/JSON: {e}")))?;
        if value.is_null() {
            value = json!({});
        }
        if let Some(inner) = value
            .as_object()
            .and_then(|o| (o.len() == 1).then(|| o.get("resilience")).flatten())
        {
            value = inner.clone();
        }
        if !value.is_object() {
            return Err(ConfigError::new(
                source,
                "the policy must be a mapping like {timeouts: {...}, retries: {...}, circuitBreaker: {...}, concurrency: {...}}",
            ));
        }
        let text =
            serde_json::to_string(&value).map_err(|e| ConfigError::new(source, e.to_string()))?;
        // serde_yaml reports the path of a mistyped field (e.g. `retries.maxAttempts: invalid type`).
        let resilience: Resilience = serde_yaml::from_str(&text)
            .map_err(|e| ConfigError::new(source, format!("resilience.{e}")))?;
        let known = serde_json::to_value(&resilience)
            .map_err(|e| ConfigError::new(source, e.to_string()))?;
        let mut unknown = Vec::new();
        unknown_fields(&value, &known, "resilience", &mut unknown);
        if !unknown.is_empty() {
            return Err(ConfigError::new(source, unknown.join("; ")));
        }
        Self::from_resilience(&resilience, source)
    }

    /// Validates with the admission webhook's rules and converts.
    pub fn from_resilience(r: &Resilience, source: &str) -> Result<Policy, ConfigError> {
        let svc: ShardedService = serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1",
            "kind": "ShardedService",
            "metadata": {"name": "sidecar-policy"},
            "spec": {"shards": 1, "replicasPerShard": 1, "port": 8080, "template": {}, "resilience": r},
        }))
        .map_err(|e| ConfigError::new(source, format!("internal: cannot check the policy: {e}")))?;
        let problems: Vec<String> = validate(&svc)
            .into_iter()
            .filter_map(|e| {
                e.path
                    .strip_prefix("spec.")
                    .filter(|p| p.starts_with("resilience"))
                    .map(|p| format!("{p}: {}", e.message))
            })
            .collect();
        if !problems.is_empty() {
            return Err(ConfigError::new(source, problems.join("; ")));
        }
        // Validated above: every duration parses and every number is in range.
        let d = |s: &shardmesh_api::DurationString| s.parse().unwrap_or_default();
        let u = |v: i32| u32::try_from(v).unwrap_or_default();
        let (t, rt, cb) = (&r.timeouts, &r.retries, &r.circuit_breaker);
        Ok(Policy {
            connect: d(&t.connect),
            per_try: d(&t.per_try),
            overall: d(&t.overall),
            retry: RetryPolicy {
                max_attempts: u(rt.max_attempts),
                base_backoff: d(&rt.base_backoff),
                max_backoff: d(&rt.max_backoff),
                retry_on: rt.retry_on.clone(),
                max_replay_body_bytes: u(rt.max_replay_body_bytes) as usize,
            },
            budget: BudgetConfig {
                percent: u(rt.budget_percent),
                min_per_second: u(rt.min_retries_per_second),
                window: WINDOW,
            },
            breaker: BreakerConfig {
                consecutive_failures: u(cb.consecutive_failures),
                failure_rate_percent: u(cb.failure_rate_percent),
                min_requests: u(cb.min_requests),
                window: d(&cb.window),
                open_duration: d(&cb.open_duration),
                max_open_duration: d(&cb.max_open_duration),
                half_open_probes: u(cb.half_open_probes),
            },
            max_ejection_percent: u(cb.max_ejection_percent),
            max_in_flight: u(r.concurrency.max_in_flight) as usize,
        })
    }
}

/// Everything the sidecar needs, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The flags.
    pub args: Args,
    /// The policy.
    pub policy: Policy,
    /// The registry.
    pub registry: StaticRegistry,
    /// Access-log switches.
    pub access_log: AccessLogConfig,
}

impl Settings {
    /// Loads the files the flags point to and validates everything.
    pub fn from_args(args: Args) -> Result<Settings, ConfigError> {
        let policy = match (&args.policy, &args.policy_inline) {
            (Some(path), _) => {
                let what = format!("--policy {} (SHARDMESH_POLICY_FILE)", path.display());
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(&what, format!("cannot read the file: {e}; point it at a readable YAML/JSON policy file"))
                })?;
                Policy::parse(&text, &what)?
            }
            (None, Some(text)) => Policy::parse(text, "--policy-inline (SHARDMESH_POLICY)")?,
            (None, None) => Policy::from_resilience(&Resilience::default(), "default policy")?,
        };
        let registry = match &args.registry {
            Some(path) => StaticRegistry::load(path)
                .map_err(|e| ConfigError::new("--registry (SHARDMESH_REGISTRY)", e))?,
            None => StaticRegistry::empty(),
        };
        if let Err(e) = crate::log::filter(&args.log_level, args.access_log) {
            return Err(ConfigError::new("--log-level (SHARDMESH_LOG_LEVEL)", e));
        }
        let mut addrs = vec![
            (
                "--outbound-addr (SHARDMESH_OUTBOUND_ADDR)",
                args.outbound_addr,
            ),
            ("--admin-addr (SHARDMESH_ADMIN_ADDR)", args.admin_addr),
        ];
        if args.app_port.is_some() {
            addrs.push(("--inbound-addr (SHARDMESH_INBOUND_ADDR)", args.inbound_addr));
        }
        for (i, (flag, a)) in addrs.iter().enumerate() {
            for (other, b) in &addrs[i + 1..] {
                if a.port() != 0 && a == b {
                    return Err(ConfigError::new(
                        *flag,
                        format!("{a} is also used by {other}; give each listener its own port"),
                    ));
                }
            }
        }
        if let Some(port) = args.app_port {
            for (flag, a) in &addrs {
                if a.port() == port {
                    return Err(ConfigError::new(
                        "--app-port (SHARDMESH_APP_PORT)",
                        format!("{port} is the sidecar's own port ({flag}); set it to the application's port"),
                    ));
                }
            }
        }
        let access_log = AccessLogConfig {
            enabled: args.access_log,
            sample: args.access_log_sample,
        };
        Ok(Settings {
            args,
            policy,
            registry,
            access_log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_matches_the_crd_defaults() {
        let p = Policy::parse("{}", "test").unwrap();
        assert_eq!(p.retry.max_attempts, 3);
        assert_eq!(p.retry.max_replay_body_bytes, 64 * 1024);
        assert_eq!(p.budget.percent, 20);
        assert_eq!(p.per_try, Duration::from_secs(2));
        assert_eq!(p.breaker.consecutive_failures, 5);
        assert_eq!(p.max_in_flight, 1000);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Policy::parse("retries: {maxAttempts: 0}", "--policy p").unwrap_err();
        assert_eq!(e.what, "--policy p");
        assert!(e.message.contains("resilience.retries.maxAttempts"), "{e}");
        let e = Policy::parse("timeouts: {perTry: 5 parsecs}", "x").unwrap_err();
        assert!(e.message.contains("resilience.timeouts.perTry"), "{e}");
        let e = Policy::parse("retries: {maxAtempts: 2}", "x").unwrap_err();
        assert!(
            e.message
                .contains("resilience.retries.maxAtempts: unknown field"),
            "{e}"
        );
        let e = Policy::parse("retries: {maxAttempts: three}", "x").unwrap_err();
        assert!(e.message.contains("maxAttempts"), "{e}");
        let e = Policy::parse("[1, 2]", "x").unwrap_err();
        assert!(e.message.contains("must be a mapping"), "{e}");
    }

    #[test]
    fn accepts_a_wrapping_resilience_key_and_json() {
        let p = Policy::parse(r#"{"resilience": {"retries": {"maxAttempts": 5}}}"#, "x").unwrap();
        assert_eq!(p.retry.max_attempts, 5);
    }
}
