//! `shardmesh-operator`: one binary, subcommands per role.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
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
    },
    /// Print the ShardedService CRD (YAML), or write it to each --out file.
    Crdgen {
        /// Write to this file instead of stdout (repeatable).
        #[arg(long)]
        out: Vec<PathBuf>,
    },
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
        Command::Crdgen { out } => {
            let yaml = shardmesh_operator::crdgen::crd_yaml()?;
            if out.is_empty() {
                print!("{yaml}");
            }
            for path in out {
                std::fs::write(&path, &yaml)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            }
            Ok(())
        }
        Command::Controller {
            log_format,
            instance,
        } => {
            init_logging(log_format);
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("no Kubernetes config (in-cluster or KUBECONFIG): {e}")
            })?;
            shardmesh_operator::controller::run(client, instance).await
        }
    }
}
