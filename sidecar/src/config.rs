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
    discovery::{normalize_authority, Discover, StaticRegistry},
    leader::LeaderConfig,
    membership::{Identity, MembershipConfig},
    retry::RetryPolicy,
    server::ConnLimits,
    shardmap_watch::ShardMapSource,
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

    /// After SIGTERM or `POST /drain`: how long to keep accepting connections while readiness
    /// fails (the pod's removal from endpoints and shard maps propagates meanwhile).
    #[arg(long, env = "SHARDMESH_DRAIN_DELAY", default_value = "5s", value_parser = duration_arg)]
    pub drain_delay: Duration,

    /// After the drain delay: how long in-flight inbound requests and then the application's exit
    /// may take before outbound closes and the sidecar exits anyway.
    #[arg(long, env = "SHARDMESH_GRACE_PERIOD", default_value = "20s", value_parser = duration_arg)]
    pub grace_period: Duration,

    /// `Retry-After` sent with requests shed by the inbound concurrency limit.
    #[arg(long, env = "SHARDMESH_SHED_RETRY_AFTER", default_value = "1s", value_parser = duration_arg)]
    pub shed_retry_after: Duration,

    /// A connection that sends no complete request head (HTTP/1) or moves no byte either way
    /// for this long is closed: gracefully, outright at twice it. Keep it above the time
    /// callers keep idle pooled connections (30s for shardmesh sidecars).
    #[arg(long, env = "SHARDMESH_IDLE_TIMEOUT", default_value = "60s", value_parser = duration_arg)]
    pub idle_timeout: Duration,

    /// A response its client stops reading for this long closes the connection.
    #[arg(long, env = "SHARDMESH_SEND_TIMEOUT", default_value = "30s", value_parser = duration_arg)]
    pub send_timeout: Duration,

    /// Connections the inbound and the outbound listener each serve at once; more wait in the
    /// listen backlog.
    #[arg(long, env = "SHARDMESH_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

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

    /// Start a W3C trace (`traceparent`, not sampled) for requests that arrive without one;
    /// false: only propagate the callers' (true/false). Access-log lines carry the trace and
    /// span ids either way.
    #[arg(long, env = "SHARDMESH_TRACE_START", default_value_t = true, action = ArgAction::Set)]
    pub trace_start: bool,

    /// ShardedService this pod is a member of. Set (with the pod identity below): the sidecar
    /// registers the pod with a Lease; unset: no membership (standalone or a pure client).
    #[arg(long, env = "SHARDMESH_SERVICE")]
    pub service: Option<String>,

    /// Shard index of this pod (with --service).
    #[arg(long, env = "SHARDMESH_SHARD")]
    pub shard: Option<u32>,

    /// Pod name: Lease name and holder (downward API metadata.name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Pod namespace: where the Lease lives and the default namespace of --shardmap
    /// (downward API metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Pod IP, advertised with the inbound port (downward API status.podIP).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// Pod UID, for the Lease's owner reference (downward API metadata.uid).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,

    /// Register the pod when --service is set (false: route only, never appear in a shard map).
    #[arg(long, env = "SHARDMESH_REGISTER", default_value_t = true, action = ArgAction::Set)]
    pub register: bool,

    /// How often the membership Lease is renewed.
    #[arg(long, env = "SHARDMESH_LEASE_RENEW", default_value = "10s", value_parser = duration_arg)]
    pub lease_renew: Duration,

    /// How long a Lease stays live without renewal (whole seconds).
    #[arg(long, env = "SHARDMESH_LEASE_DURATION", default_value = "30s", value_parser = duration_arg)]
    pub lease_duration: Duration,

    /// Contend for this shard's leader Lease (`<service>-<shard>-leader`), which stays held
    /// this long without renewal (3s-5m; needs --service). The injector sets it when the
    /// ShardedService has `leaderElection.enabled`.
    #[arg(long, env = "SHARDMESH_LEADER_LEASE", value_parser = duration_arg)]
    pub leader_lease: Option<Duration>,

    /// Sharded destination followed live from its shard-map ConfigMap:
    /// `[namespace/]service=host[:port]` (repeatable; the env var takes a comma-separated list).
    #[arg(long = "shardmap", env = "SHARDMESH_SHARDMAPS", value_delimiter = ',')]
    pub shardmaps: Vec<String>,

    /// host:port of this pod's own sharded service in the --registry file (standalone use):
    /// with --shard, the inbound side refuses keys of other shards (421) and serves handoff
    /// reads by its shard map. In Kubernetes (--service set) the service's live shard map is
    /// followed instead, and this is not needed.
    #[arg(long, env = "SHARDMESH_OWN_DESTINATION")]
    pub own_destination: Option<String>,
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
        let text = yaml_safe(
            serde_json::to_string(&value).map_err(|e| ConfigError::new(source, e.to_string()))?,
        );
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
    /// Registry membership, when this pod is a member of a ShardedService.
    pub membership: Option<MembershipConfig>,
    /// Sharded destinations followed live from the API server.
    pub shardmaps: Vec<ShardMapSource>,
    /// Per-shard leader election, when this pod's service elects leaders.
    pub leader: Option<LeaderConfig>,
    /// This pod's shard of its own sharded service, for key ownership on the inbound side.
    pub own: Option<OwnShard>,
    /// What every accepted connection lives under.
    pub conn: ConnLimits,
}

/// This pod's place in its own sharded service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnShard {
    /// Shard index.
    pub shard: u32,
    /// Where the service's shard map is found in discovery (normalized host:port).
    pub authority: String,
}

const OWN_FLAG: &str = "--own-destination (SHARDMESH_OWN_DESTINATION)";

/// The pod's own shard: from `--own-destination` (a registry entry), or in Kubernetes from
/// membership, following the service's live map (added to `shardmaps` when not already there).
fn own_shard(
    args: &Args,
    membership: Option<&MembershipConfig>,
    registry: &StaticRegistry,
    shardmaps: &mut Vec<ShardMapSource>,
) -> Result<Option<OwnShard>, ConfigError> {
    let Some(app_port) = args.app_port else {
        return match &args.own_destination {
            Some(_) => Err(ConfigError::new(
                OWN_FLAG,
                "needs the inbound proxy; set --app-port (SHARDMESH_APP_PORT) or unset it",
            )),
            None => Ok(None),
        };
    };
    if let Some(raw) = &args.own_destination {
        let authority = normalize_authority(raw).ok_or_else(|| {
            ConfigError::new(OWN_FLAG, format!("{raw:?} is not host or host:port"))
        })?;
        let shard = args.shard.ok_or_else(|| {
            ConfigError::new(
                OWN_FLAG,
                "needs --shard (SHARDMESH_SHARD), this pod's shard index",
            )
        })?;
        let known = registry.lookup(&authority).is_some()
            || shardmaps.iter().any(|s| s.authority == authority);
        if !known {
            return Err(ConfigError::new(
                OWN_FLAG,
                format!("{authority} is neither in the --registry file nor a --shardmap; add its shardMap there"),
            ));
        }
        return Ok(Some(OwnShard { shard, authority }));
    }
    let Some(m) = membership else {
        return Ok(None);
    };
    let service = m.identity.service.clone();
    let authority = normalize_authority(&format!("{service}:{app_port}")).ok_or_else(|| {
        ConfigError::new(
            SERVICE_FLAG,
            format!("{service:?} with port {app_port} is not a host:port"),
        )
    })?;
    if !shardmaps.iter().any(|s| s.authority == authority) && registry.lookup(&authority).is_none()
    {
        shardmaps.push(ShardMapSource {
            namespace: None,
            service,
            authority: authority.clone(),
        });
    }
    Ok(Some(OwnShard {
        shard: m.identity.shard,
        authority,
    }))
}

const LEADER_FLAG: &str = "--leader-lease (SHARDMESH_LEADER_LEASE)";

/// Leader-election settings: `None` unless `--leader-lease` is set, which needs membership.
fn leader(
    args: &Args,
    membership: Option<&MembershipConfig>,
) -> Result<Option<LeaderConfig>, ConfigError> {
    let Some(duration) = args.leader_lease else {
        return Ok(None);
    };
    let Some(m) = membership else {
        return Err(ConfigError::new(
            LEADER_FLAG,
            "needs registry membership (--service, --shard and the pod identity, with --register=true); unset it for a pod that is not a member",
        ));
    };
    if !(Duration::from_secs(3)..=Duration::from_secs(300)).contains(&duration) {
        return Err(ConfigError::new(
            LEADER_FLAG,
            format!("{duration:?} is out of range; use 3s to 5m"),
        ));
    }
    let id = &m.identity;
    // The holder suffix makes each process a distinct candidate (see leader.rs).
    let suffix = format!("{:08x}", rand::random::<u32>());
    Ok(Some(LeaderConfig {
        lease: shardmesh_api::labels::leader_lease_name(&id.service, id.shard),
        namespace: id.namespace.clone(),
        holder: shardmesh_api::labels::leader_holder(&id.pod, &suffix),
        duration,
        app: m.app,
    }))
}

/// Characters serde_json writes raw but YAML refuses in a document (DEL, the C1 controls,
/// U+FFFE and U+FFFF), escaped: JSON only has them inside strings, where `\uXXXX` means the
/// same to both, so a bad value is reported at its field instead of as unreadable YAML.
fn yaml_safe(json: String) -> String {
    let refused = |c: char| matches!(c, '\u{7f}'..='\u{9f}' | '\u{fffe}' | '\u{ffff}');
    if !json.chars().any(refused) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if refused(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Connection limits from the flags.
fn conn_limits(args: &Args) -> Result<ConnLimits, ConfigError> {
    let at_least_1s = |d: Duration, flag: &str| {
        if d < Duration::from_secs(1) {
            Err(ConfigError::new(
                flag,
                format!("{d:?} is too short for a network peer; use at least 1s"),
            ))
        } else {
            Ok(d)
        }
    };
    Ok(ConnLimits {
        idle: at_least_1s(args.idle_timeout, "--idle-timeout (SHARDMESH_IDLE_TIMEOUT)")?,
        send: at_least_1s(args.send_timeout, "--send-timeout (SHARDMESH_SEND_TIMEOUT)")?,
        max_connections: args.max_connections as usize,
    })
}

const SERVICE_FLAG: &str = "--service (SHARDMESH_SERVICE)";

/// Membership settings from the flags: `None` unless `--service` is set and `--register` is on;
/// every missing piece of pod identity is an error naming its downward-API source.
fn membership(args: &Args) -> Result<Option<MembershipConfig>, ConfigError> {
    let Some(service) = args.service.clone().filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if !args.register {
        return Ok(None);
    }
    let need = |v: Option<String>, flag: &str, source: &str| {
        v.filter(|s| !s.is_empty()).ok_or_else(|| {
            ConfigError::new(
                flag,
                format!("not set, but registering the pod (--service is set) needs it; add the env var from the downward API fieldRef {source}, or set --register=false"),
            )
        })
    };
    let pod = need(
        args.pod_name.clone(),
        "--pod-name (POD_NAME)",
        "metadata.name",
    )?;
    let namespace = need(
        args.pod_namespace.clone(),
        "--pod-namespace (POD_NAMESPACE)",
        "metadata.namespace",
    )?;
    let uid = need(args.pod_uid.clone(), "--pod-uid (POD_UID)", "metadata.uid")?;
    let ip = args.pod_ip.ok_or_else(|| {
        ConfigError::new(
            "--pod-ip (POD_IP)",
            "not set, but registering the pod needs the address callers dial; add the env var from the downward API fieldRef status.podIP",
        )
    })?;
    let shard = args.shard.ok_or_else(|| {
        ConfigError::new(
            "--shard (SHARDMESH_SHARD)",
            "not set, but registering the pod needs its shard index (the operator sets it)",
        )
    })?;
    if args.app_port.is_none() {
        return Err(ConfigError::new(
            SERVICE_FLAG,
            "registering the pod needs the inbound proxy; set --app-port (SHARDMESH_APP_PORT) to the application's port, or --register=false",
        ));
    }
    if args.lease_duration < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "--lease-duration (SHARDMESH_LEASE_DURATION)",
            "must be at least 1s (Leases count whole seconds)",
        ));
    }
    if args.lease_renew.is_zero() || args.lease_renew * 2 > args.lease_duration {
        return Err(ConfigError::new(
            "--lease-renew (SHARDMESH_LEASE_RENEW)",
            format!(
                "{:?} must be positive and at most half of --lease-duration ({:?}), so one failed renewal does not expire the member",
                args.lease_renew, args.lease_duration
            ),
        ));
    }
    let port = if args.inbound_addr.port() == 0 {
        SIDECAR_INBOUND
    } else {
        args.inbound_addr.port()
    };
    Ok(Some(MembershipConfig {
        identity: Identity {
            pod,
            namespace,
            uid,
            service,
            shard,
            address: SocketAddr::new(ip, port),
        },
        renew_interval: args.lease_renew,
        lease_duration: args.lease_duration,
        app: args.app_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
    }))
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
        if let Err(e) = crate::log::filter(&args.log_level) {
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
        let conn = conn_limits(&args)?;
        let access_log = AccessLogConfig {
            enabled: args.access_log,
            sample: args.access_log_sample,
            trace_start: args.trace_start,
        };
        let membership = membership(&args)?;
        let leader = leader(&args, membership.as_ref())?;
        const SHARDMAP_FLAG: &str = "--shardmap (SHARDMESH_SHARDMAPS)";
        let mut shardmaps: Vec<ShardMapSource> = Vec::new();
        for raw in args.shardmaps.iter().filter(|r| !r.trim().is_empty()) {
            let s = ShardMapSource::parse(raw).map_err(|e| ConfigError::new(SHARDMAP_FLAG, e))?;
            if shardmaps.iter().any(|o| o.authority == s.authority) {
                return Err(ConfigError::new(
                    SHARDMAP_FLAG,
                    format!(
                        "{} is given twice; one shard map per destination",
                        s.authority
                    ),
                ));
            }
            if registry.lookup(&s.authority).is_some() {
                return Err(ConfigError::new(
                    SHARDMAP_FLAG,
                    format!(
                        "{} is also in the --registry file; keep one source per destination",
                        s.authority
                    ),
                ));
            }
            if s.namespace.is_none() && args.pod_namespace.is_none() {
                return Err(ConfigError::new(
                    SHARDMAP_FLAG,
                    format!("{raw:?} has no namespace and POD_NAMESPACE is unset; write namespace/service=host:port"),
                ));
            }
            shardmaps.push(s);
        }
        let own = own_shard(&args, membership.as_ref(), &registry, &mut shardmaps)?;
        Ok(Settings {
            args,
            policy,
            registry,
            access_log,
            membership,
            shardmaps,
            leader,
            own,
            conn,
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

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "shardmesh-sidecar",
            "--admin-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    const MEMBER: &[&str] = &[
        "--app-port",
        "8080",
        "--service",
        "orders",
        "--shard",
        "2",
        "--pod-name",
        "orders-2-0",
        "--pod-namespace",
        "shop",
        "--pod-ip",
        "10.0.0.7",
        "--pod-uid",
        "u-7",
    ];

    #[test]
    fn membership_from_pod_identity() {
        let s = Settings::from_args(args(MEMBER)).unwrap();
        let m = s.membership.expect("member");
        assert_eq!(m.identity.pod, "orders-2-0");
        assert_eq!(m.identity.shard, 2);
        assert_eq!(m.identity.address, "10.0.0.7:4143".parse().unwrap());
        assert_eq!(m.renew_interval, Duration::from_secs(10));
        assert_eq!(m.lease_duration, Duration::from_secs(30));
        assert_eq!(m.app, Some("127.0.0.1:8080".parse().unwrap()));
        // Not a member without --service, or with --register=false.
        assert!(Settings::from_args(args(&[])).unwrap().membership.is_none());
        let mut off = MEMBER.to_vec();
        off.extend(["--register", "false"]);
        assert!(Settings::from_args(args(&off))
            .unwrap()
            .membership
            .is_none());
    }

    #[test]
    fn membership_errors_name_the_missing_identity() {
        let without = |flag: &str| {
            let i = MEMBER.iter().position(|a| *a == flag).unwrap();
            let mut v = MEMBER.to_vec();
            v.drain(i..i + 2);
            Settings::from_args(args(&v)).unwrap_err()
        };
        let e = without("--pod-uid");
        assert_eq!(e.what, "--pod-uid (POD_UID)");
        assert!(e.message.contains("metadata.uid"), "{e}");
        assert_eq!(without("--pod-ip").what, "--pod-ip (POD_IP)");
        assert_eq!(without("--shard").what, "--shard (SHARDMESH_SHARD)");
        assert!(without("--app-port").message.contains("--app-port"));
        let mut v = MEMBER.to_vec();
        v.extend(["--lease-renew", "20s"]);
        let e = Settings::from_args(args(&v)).unwrap_err();
        assert!(e.message.contains("at most half"), "{e}");
    }

    #[test]
    fn leader_election_needs_membership_and_a_sane_duration() {
        let mut v = MEMBER.to_vec();
        v.extend(["--leader-lease", "15s"]);
        let l = Settings::from_args(args(&v))
            .unwrap()
            .leader
            .expect("leader");
        assert_eq!(l.lease, "orders-2-leader");
        assert_eq!(l.namespace, "shop");
        assert!(l.holder.starts_with("orders-2-0_"), "{}", l.holder);
        assert_eq!(l.duration, Duration::from_secs(15));
        let other = Settings::from_args(args(&v)).unwrap().leader.unwrap();
        assert_ne!(l.holder, other.holder, "each process is its own candidate");
        assert!(Settings::from_args(args(MEMBER)).unwrap().leader.is_none());
        let e = Settings::from_args(args(&["--leader-lease", "15s"])).unwrap_err();
        assert_eq!(e.what, LEADER_FLAG);
        assert!(e.message.contains("--service"), "{e}");
        let mut short = MEMBER.to_vec();
        short.extend(["--leader-lease", "1s"]);
        let e = Settings::from_args(args(&short)).unwrap_err();
        assert!(
            e.what == LEADER_FLAG && e.message.contains("3s to 5m"),
            "{e}"
        );
    }

    #[test]
    fn shardmap_sources_are_validated() {
        let s = Settings::from_args(args(&[
            "--shardmap",
            "shop/orders=orders.shop:8080,users=users:80",
            "--pod-namespace",
            "shop",
        ]))
        .unwrap();
        assert_eq!(s.shardmaps.len(), 2);
        let e = Settings::from_args(args(&[
            "--shardmap",
            "orders=o:1",
            "--shardmap",
            "users=o:1",
            "--pod-namespace",
            "x",
        ]))
        .unwrap_err();
        assert!(e.message.contains("given twice"), "{e}");
        let e = Settings::from_args(args(&["--shardmap", "orders=o:1"])).unwrap_err();
        assert!(e.message.contains("POD_NAMESPACE"), "{e}");
        let e = Settings::from_args(args(&["--shardmap", "nonsense"])).unwrap_err();
        assert_eq!(e.what, "--shardmap (SHARDMESH_SHARDMAPS)");
    }

    #[test]
    fn accepts_a_wrapping_resilience_key_and_json() {
        let p = Policy::parse(r#"{"resilience": {"retries": {"maxAttempts": 5}}}"#, "x").unwrap();
        assert_eq!(p.retry.max_attempts, 5);
    }
}
