//! `shardmesh-operator`: one binary, subcommands per role.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc instead of glibc's allocator: the controller's caches churn through many small
/// objects on several threads, where glibc's per-thread arenas hold on to freed memory (peak
/// RSS with 1,000 services: see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Parser)]
#[command(
    name = "shardmesh-operator",
    version,
    about = "The shardmesh Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile ShardedServices (in-cluster config, or KUBECONFIG outside a cluster).
    Controller {
        /// Log format.
        #[arg(long, env = "SHARDMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
        log_format: LogFormat,
        /// Name reported on Events (defaults to the pod name).
        #[arg(long, env = "POD_NAME")]
        instance: Option<String>,
        /// The webhook injects the sidecar into shard pods: Services target the sidecar's
        /// inbound port (4143) instead of the application port. Set by the chart with the webhook.
        #[arg(long, env = "SHARDMESH_SIDECAR_INJECTION")]
        sidecar_injection: bool,
        /// Address of the `/metrics`, `/healthz` and `/readyz` HTTP endpoints.
        #[arg(long, env = "SHARDMESH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Manage ShardedServices in these namespaces only (comma-separated; the env var too).
        /// Empty: every namespace, which needs cluster-wide RBAC; with a list, Roles in those
        /// namespaces (and the Lease namespace) are enough.
        #[arg(long, env = "SHARDMESH_WATCH_NAMESPACES", value_delimiter = ',')]
        watch_namespaces: Vec<String>,
        /// How often each ShardedService is looked at again when nothing changed (e.g. 5m;
        /// 10s to 24h): a safety net, changes arrive through watches.
        #[arg(long, env = "SHARDMESH_RESYNC_PERIOD", default_value = "5m", value_parser = parse_resync)]
        resync_period: std::time::Duration,
        #[command(flatten)]
        leader: LeaderArgs,
    },
    /// Serve the sidecar-injection and ShardedService-validation admission webhooks over HTTPS,
    /// with a self-managed CA and serving certificate.
    Webhook(Box<WebhookArgs>),
    /// Print the CRDs (YAML), or write one file per CRD into each --dir.
    Crdgen {
        /// Write into this directory instead of stdout (repeatable).
        #[arg(long)]
        dir: Vec<PathBuf>,
    },
}

/// Leader election, so several controller replicas can run with one active.
#[derive(clap::Args)]
struct LeaderArgs {
    /// Campaign for a Lease and reconcile only while holding it.
    #[arg(long, env = "SHARDMESH_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own; the downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "SHARDMESH_LEADER_LEASE",
        default_value = shardmesh_api::labels::OPERATOR_LEADER_LEASE
    )]
    leader_lease_name: String,
    /// How long a dead leader blocks a standby (e.g. 15s).
    #[arg(long, env = "SHARDMESH_LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    leader_lease_duration: std::time::Duration,
    /// Renewal interval; must be under a third of the duration (e.g. 4s).
    #[arg(long, env = "SHARDMESH_LEADER_RENEW", default_value = "4s", value_parser = parse_duration)]
    leader_renew: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    shardmesh_api::duration::parse_duration(s).map_err(|e| e.to_string())
}

/// A resync period: shorter than 10 s would make the safety net the operator's main load, and
/// longer than a day would leave a missed event unnoticed for too long.
fn parse_resync(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let d = parse_duration(s)?;
    if d < Duration::from_secs(10) || d > Duration::from_secs(24 * 3600) {
        return Err(format!("{s} is outside 10s..24h; e.g. 5m (the default)"));
    }
    Ok(d)
}

/// Runs the controller, behind leader election when asked to.
async fn controller(
    client: kube::Client,
    instance: Option<String>,
    settings: shardmesh_operator::controller::Settings,
    metrics_addr: SocketAddr,
    leader: LeaderArgs,
    metrics: std::sync::Arc<shardmesh_operator::metrics::Metrics>,
    scope: shardmesh_operator::scope::Scope,
) -> anyhow::Result<()> {
    use shardmesh_operator::{leader, metrics};
    // One signal listener for the whole process: the election and both controllers stop on it.
    let shutdown = shardmesh_operator::runtime::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!("--metrics-addr (SHARDMESH_METRICS_ADDR) {metrics_addr}: {e}")
        })?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    let run = shardmesh_operator::controller::run;
    if !leader.leader_elect {
        metrics.set_leader(true);
        return run(client, instance, settings, metrics, scope, shutdown).await;
    }
    let namespace = leader.leader_lease_namespace.ok_or_else(|| {
        anyhow::anyhow!("--leader-elect needs the Lease namespace: set POD_NAMESPACE (downward API metadata.namespace) or --leader-lease-namespace")
    })?;
    let identity = instance.clone().ok_or_else(|| {
        anyhow::anyhow!("--leader-elect needs this replica's identity: set POD_NAME (downward API metadata.name) or --instance")
    })?;
    if leader.leader_renew.saturating_mul(3) > leader.leader_lease_duration {
        anyhow::bail!(
            "--leader-renew {:?} must be at most a third of --leader-lease-duration {:?}",
            leader.leader_renew,
            leader.leader_lease_duration
        );
    }
    let elector = leader::Elector::new(
        client.clone(),
        leader::LeaderConfig {
            namespace,
            name: leader.leader_lease_name,
            identity,
            duration: leader.leader_lease_duration,
            renew: leader.leader_renew,
        },
    );
    let until = tokio::select! {
        until = elector.acquire() => until,
        _ = shutdown.clone() => return Ok(()),
    };
    metrics.set_leader(true);
    let result = tokio::select! {
        r = run(client, instance, settings, metrics.clone(), scope, shutdown) => r,
        _ = elector.hold(until) => Err(anyhow::anyhow!(
            "lost leadership; exiting so this replica restarts as a standby"
        )),
    };
    metrics.set_leader(false);
    elector.release().await;
    result
}

#[derive(clap::Args)]
struct WebhookArgs {
    /// Log format.
    #[arg(long, env = "SHARDMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Address the HTTPS server listens on.
    #[arg(long, env = "SHARDMESH_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Address of the plain-HTTP `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "SHARDMESH_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    metrics_addr: SocketAddr,
    /// Namespace of the webhook (its Secret lives here; never injected).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Name of the webhook's Service (the certificate's DNS names).
    #[arg(
        long,
        env = "SHARDMESH_WEBHOOK_SERVICE",
        default_value = "shardmesh-webhook"
    )]
    service: String,
    /// Secret holding the CA and the serving certificate, shared by all replicas.
    #[arg(
        long,
        env = "SHARDMESH_WEBHOOK_SECRET",
        default_value = "shardmesh-webhook-tls"
    )]
    secret: String,
    /// MutatingWebhookConfiguration that gets the CA bundle (empty: none).
    #[arg(
        long,
        env = "SHARDMESH_MUTATING_CONFIG",
        default_value = "shardmesh-sidecar-injector"
    )]
    mutating_config: String,
    /// ValidatingWebhookConfiguration that gets the CA bundle (empty: none).
    #[arg(
        long,
        env = "SHARDMESH_VALIDATING_CONFIG",
        default_value = "shardmesh-validator"
    )]
    validating_config: String,
    /// Further namespaces never injected (the own namespace and kube-system always are).
    #[arg(
        long = "exclude-namespace",
        env = "SHARDMESH_EXCLUDE_NAMESPACES",
        value_delimiter = ','
    )]
    exclude_namespaces: Vec<String>,
    /// Sidecar image.
    #[arg(long, env = "SHARDMESH_SIDECAR_IMAGE")]
    sidecar_image: String,
    /// Sidecar imagePullPolicy.
    #[arg(
        long,
        env = "SHARDMESH_SIDECAR_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    sidecar_pull_policy: String,
    /// Version recorded in the shardmesh.io/injected-version pod annotation.
    #[arg(long, env = "SHARDMESH_SIDECAR_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    sidecar_version: String,
    /// Sidecar resources as JSON ResourceRequirements, e.g. {"requests":{"cpu":"10m"}}.
    #[arg(long, env = "SHARDMESH_SIDECAR_RESOURCES", default_value = "{}")]
    sidecar_resources: String,
    /// Log level of the injected sidecars.
    #[arg(long, env = "SHARDMESH_SIDECAR_LOG_LEVEL", default_value = "info")]
    sidecar_log_level: String,
    /// Whether the sidecar is injected into ShardedService pods (enables the ShardedService rules
    /// that only matter then, e.g. no opt-out annotation on the template).
    #[arg(long, env = "SHARDMESH_SIDECAR_INJECTION", default_value_t = true, action = clap::ArgAction::Set)]
    sidecar_injection: bool,
    /// CA lifetime (rotated with a third left), e.g. 26280h (3 years).
    #[arg(long, env = "SHARDMESH_CA_VALIDITY", default_value = "26280h", value_parser = duration)]
    ca_validity: Duration,
    /// Serving certificate lifetime (re-issued with a third left), e.g. 2160h (90 days).
    #[arg(long, env = "SHARDMESH_CERT_VALIDITY", default_value = "2160h", value_parser = duration)]
    cert_validity: Duration,
    /// How often the Secret and the CA bundles are re-checked.
    #[arg(long, env = "SHARDMESH_TLS_RESYNC", default_value = "10s", value_parser = duration)]
    tls_resync: Duration,
    /// After SIGTERM, keep serving this long (while endpoints drop the pod) before exiting.
    #[arg(long, env = "SHARDMESH_WEBHOOK_DRAIN", default_value = "5s", value_parser = duration)]
    drain: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    shardmesh_api::duration::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn init_logging(format: LogFormat) {
    // RUST_LOG overrides the level, e.g. RUST_LOG=shardmesh_operator=debug,kube=info
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { dir } => {
            let crds = shardmesh_operator::crdgen::crds()?;
            if dir.is_empty() {
                for (_, yaml) in &crds {
                    print!("{yaml}");
                }
            }
            for d in dir {
                for (file, yaml) in &crds {
                    let path = d.join(file);
                    std::fs::write(&path, yaml)
                        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
                }
            }
            Ok(())
        }
        Command::Controller {
            log_format,
            instance,
            sidecar_injection,
            metrics_addr,
            watch_namespaces,
            resync_period,
            leader,
        } => {
            init_logging(log_format);
            let scope =
                shardmesh_operator::scope::Scope::parse(&watch_namespaces).map_err(|e| {
                    anyhow::anyhow!("--watch-namespaces (SHARDMESH_WATCH_NAMESPACES): {e}")
                })?;
            let metrics = std::sync::Arc::new(shardmesh_operator::metrics::Metrics::default());
            let config = kube::Config::infer().await.map_err(|e| {
                anyhow::anyhow!("no Kubernetes config (in-cluster or KUBECONFIG): {e}")
            })?;
            // Every API request of the controller is counted by verb (its /metrics).
            let client = kube::client::ClientBuilder::try_from(config)
                .map_err(|e| anyhow::anyhow!("building the Kubernetes client: {e}"))?
                .with_layer(&shardmesh_operator::metrics::count_api_requests(
                    metrics.api_requests(),
                ))
                .build();
            let settings = shardmesh_operator::controller::Settings {
                options: shardmesh_operator::build::BuildOptions { sidecar_injection },
                resync: resync_period,
            };
            controller(
                client,
                instance,
                settings,
                metrics_addr,
                leader,
                metrics,
                scope,
            )
            .await
        }
        Command::Webhook(args) => {
            init_logging(args.log_format);
            let opts = webhook_options(*args)?;
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("no Kubernetes config (in-cluster or KUBECONFIG): {e}")
            })?;
            shardmesh_operator::webhook::run(client, opts).await
        }
    }
}

fn webhook_options(a: WebhookArgs) -> anyhow::Result<shardmesh_operator::webhook::WebhookOptions> {
    use shardmesh_operator::webhook::{inject::InjectorConfig, tls::TlsTargets, WebhookOptions};
    let resources = serde_json::from_str(&a.sidecar_resources).map_err(|e| {
        anyhow::anyhow!(
            "--sidecar-resources (SHARDMESH_SIDECAR_RESOURCES): not a ResourceRequirements JSON \
             ({e}); use e.g. {{\"requests\":{{\"cpu\":\"10m\",\"memory\":\"32Mi\"}}}}"
        )
    })?;
    let mut excluded = vec![a.namespace.clone(), "kube-system".to_string()];
    excluded.extend(a.exclude_namespaces.into_iter().filter(|n| !n.is_empty()));
    Ok(WebhookOptions {
        listen: a.listen,
        metrics_addr: a.metrics_addr,
        injector: InjectorConfig {
            image: a.sidecar_image,
            image_pull_policy: a.sidecar_pull_policy,
            version: a.sidecar_version,
            resources,
            native_sidecars: false,
            excluded_namespaces: excluded,
            log_level: a.sidecar_log_level,
        },
        sidecar_injection: a.sidecar_injection,
        targets: TlsTargets {
            namespace: a.namespace,
            secret: a.secret,
            mutating: a.mutating_config,
            validating: a.validating_config,
        },
        service: a.service,
        ca_validity: a.ca_validity,
        cert_validity: a.cert_validity,
        resync: a.tls_resync,
        drain: a.drain,
    })
}
