//! `kubectl shardmesh`: a kubectl plugin (install the `kubectl-shardmesh` binary on PATH) that
//! answers the questions people ask about ShardedServices: how are the shards doing, where does
//! this key go, what would changing the shard count do, and is shardmesh working here.

mod certs;
mod check;
mod cluster;
mod error;
mod operator;
mod output;
mod plan;
mod route;
mod status;

use clap::{Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde_json::json;
use shardmesh_api::{shardmap::assemble, validate, ShardedService};

use crate::{
    cluster::Ctx,
    error::{exit, Error},
    output::{render, Format},
};

const EXIT_CODES: &str = "\
Exit codes:
  0  ok: the service is Ready, the key's shard has a live member, the plan would be admitted,
     every check passed (warnings allowed)
  1  not ok: the service is not Ready, the key's shard has no live member or the shard map is
     mid-change, the plan would be refused (or could not be validated), a check failed
  2  usage error
  3  not found: the CRD is not installed, no such ShardedService, no shard map published
  4  the API server could not be asked: kubeconfig, connection, authentication, permission";

#[derive(Parser)]
#[command(
    name = "kubectl-shardmesh",
    bin_name = "kubectl shardmesh",
    version,
    about = "Inspect shardmesh ShardedServices: shard status, key routing, resharding plans, installation checks",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Namespace of the ShardedService (default: the kubeconfig context's, else `default`).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// kubeconfig context to use (default: the current context; KUBECONFIG is honoured).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per shard: ready pods, map members, leader and epoch, revision, map epoch, key
    /// ownership and rollout. Exit 1 unless the service is Ready.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// ShardedService name.
        name: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// The shard owning KEY now (the sidecars' jump hash over the published map), its pods and
    /// leader. Exit 1 when that shard has no live member.
    #[command(after_help = EXIT_CODES)]
    Route {
        /// ShardedService name.
        name: String,
        /// The shard key (the value of the service's shard-key header).
        key: String,
    },
    /// What setting spec.shards to N would do: keys moved, shards added or drained, the steps
    /// of the change. Nothing is applied (at most a server-side dry run). Exit 1 when the
    /// change would be refused.
    #[command(after_help = EXIT_CODES)]
    Plan {
        /// ShardedService name.
        name: String,
        /// The shard count to plan for (1-1024).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
        shards: u32,
    },
    /// Is shardmesh working on this cluster: API server capabilities, CRDs, webhook reachable
    /// (a dry-run create in -n), certificate expiry, operator leader. Exit 1 when a check fails.
    #[command(after_help = EXIT_CODES)]
    Check {
        #[command(flatten)]
        operator: OperatorArgs,
        /// The webhook's TLS Secret (default: `<webhook Service>-tls`, as the chart names it).
        #[arg(long)]
        webhook_secret: Option<String>,
    },
}

/// Where the operator runs.
#[derive(clap::Args)]
struct OperatorArgs {
    /// Namespace the operator runs in (its leader Lease is there).
    #[arg(long, default_value = operator::DEFAULT_NAMESPACE)]
    operator_namespace: String,
    /// Name of the operator's leader Lease.
    #[arg(long, default_value = operator::DEFAULT_LEASE)]
    leader_lease: String,
}

/// A command's printable answer and whether it is a "yes".
struct Answer {
    text: String,
    ok: bool,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print to stdout with 0; anything else is a usage error.
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::NOT_OK);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(answer) => {
            print!("{}", answer.text);
            if answer.ok {
                exit::OK
            } else {
                exit::NOT_OK
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<Answer, Error> {
    let ctx = cluster::connect(cli.context.as_deref(), cli.namespace.as_deref()).await?;
    let format = cli.output;
    match cli.command {
        Command::Status { name, operator } => status(&ctx, &name, &operator, format).await,
        Command::Route { name, key } => route(&ctx, &name, &key, format).await,
        Command::Plan { name, shards } => plan(&ctx, &name, shards, format).await,
        Command::Check {
            operator,
            webhook_secret,
        } => {
            let target = check::Target {
                operator_namespace: operator.operator_namespace,
                leader_lease: operator.leader_lease,
                webhook_secret,
            };
            let report = check::gather(&ctx, &target).await?;
            Ok(Answer {
                text: render(&report, format)?,
                ok: report.ok,
            })
        }
    }
}

async fn status(ctx: &Ctx, name: &str, op: &OperatorArgs, format: Format) -> Result<Answer, Error> {
    let svc = cluster::service(ctx, name).await?;
    let slices = cluster::slices(ctx, name).await?;
    // Not being allowed to read the operator's Lease must not hide the service's status.
    let leader = cluster::leader_lease(&ctx.client, &op.operator_namespace, &op.leader_lease)
        .await
        .ok()
        .map(|lease| {
            let lease_ref = format!("{}/{}", op.operator_namespace, op.leader_lease);
            operator::leader(&lease_ref, lease.as_ref(), Timestamp::now())
        });
    let report = status::build(&svc, &slices, leader);
    Ok(Answer {
        text: render(&report, format)?,
        ok: report.ready,
    })
}

async fn route(ctx: &Ctx, name: &str, key: &str, format: Format) -> Result<Answer, Error> {
    let svc = cluster::service(ctx, name).await?;
    let slices = cluster::slices(ctx, name).await?;
    if slices.is_empty() {
        return Err(Error::NoShardMap {
            namespace: ctx.namespace.clone(),
            name: name.to_string(),
        });
    }
    let assembled = assemble(&slices).map_err(|reason| Error::MapIncomplete {
        namespace: ctx.namespace.clone(),
        name: name.to_string(),
        reason,
    })?;
    let report = route::build(&svc, &assembled, key);
    Ok(Answer {
        text: render(&report, format)?,
        ok: report.servable(),
    })
}

async fn plan(ctx: &Ctx, name: &str, shards: u32, format: Format) -> Result<Answer, Error> {
    let svc = cluster::service(ctx, name).await?;
    let slices = cluster::slices(ctx, name).await?;
    // Before the first map (or mid-write), plan from spec.shards.
    let map = assemble(&slices).ok().map(|a| a.map);
    let target = i32::try_from(shards).unwrap_or(i32::MAX);
    let mut changed = svc.clone();
    changed.spec.shards = target;
    let admission = match plan::Admission::from_local(&validate::validate_update(&svc, &changed)) {
        Some(refused) => refused,
        None => dry_run(ctx, name, target).await?,
    };
    let report = plan::build(&svc, map.as_ref(), shards, admission);
    Ok(Answer {
        text: render(&report, format)?,
        ok: report.admission.verdict == "admitted",
    })
}

/// Asks the API server, and through it the validating webhook, whether `spec.shards: target`
/// would be accepted: a merge patch with `dryRun=All`, which stores nothing.
async fn dry_run(ctx: &Ctx, name: &str, target: i32) -> Result<plan::Admission, Error> {
    let api: Api<ShardedService> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let pp = PatchParams {
        dry_run: true,
        field_manager: Some("kubectl-shardmesh".into()),
        ..PatchParams::default()
    };
    let patch = json!({"spec": {"shards": target}});
    match api.patch(name, &pp, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(plan::Admission {
            verdict: "admitted",
            detail: "the API server and the validating webhook accept it (server-side dry run, \
                     nothing written)"
                .into(),
        }),
        Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook") => {
            Ok(plan::Admission {
                verdict: "unverified",
                detail: format!("the validating webhook could not be called: {}", s.message),
            })
        }
        Err(kube::Error::Api(s))
            if (400..500).contains(&s.code) && s.code != 401 && s.code != 403 =>
        {
            Ok(plan::Admission {
                verdict: "refused",
                detail: s.message,
            })
        }
        Err(e) => Err(Error::from_kube(
            format!(
                "dry-running spec.shards: {target} on {}/{name}",
                ctx.namespace
            ),
            e,
        )),
    }
}
