//! `shardmesh-sidecar` binary: parse and validate configuration (exit 2 with a message naming
//! the flag on any problem), start the proxies, drain on SIGTERM/SIGINT or `/shutdown`, exit 0.

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use shardmesh_sidecar::{
    config::{Args, Settings},
    log,
    metrics::Metrics,
    resident,
};

/// mimalloc instead of glibc's allocator: a proxied request allocates and frees a few dozen
/// small objects (futures, header maps, buffers), and glibc's malloc and free were a fifth of
/// the sidecar's instructions per request (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("shardmesh-sidecar: error: {message}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // clap prints usage errors naming the flag and exits with status 2 itself.
    let args = Args::parse();
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // Reading the policy, the registry and the shard maps can take megabytes that are garbage
    // once parsed (a 10,000-endpoint registry: ~20 MiB); mimalloc would keep them until the
    // next allocations on this thread, so give them back now.
    // SAFETY: mi_collect takes no pointers; it only returns free memory to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shardmesh-sidecar")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    // One metrics object for the proxies and the log writer, so dropped lines are counted.
    let metrics = Arc::new(Metrics::default());
    let logging = match log::init(&settings.args.log_level, metrics.clone()) {
        Ok(l) => l,
        Err(e) => return fail(format!("--log-level (SHARDMESH_LOG_LEVEL): {e}")),
    };
    let code = runtime.block_on(async {
        let running =
            match shardmesh_sidecar::start_with(settings, Some(logging.level.clone()), metrics)
                .await
            {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
        // Start-up code is done once the sidecar has started: its pages need not stay resident.
        let started = running.started();
        tokio::spawn(async move {
            started.await;
            match resident::release_startup_pages() {
                Ok(r) => tracing::info!(
                    kib = r.bytes / 1024,
                    mappings = r.mappings,
                    "start-up pages of the binary released from the resident set"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot release the start-up pages of the binary (no other effect)"),
            }
        });
        let drain = running.drain.clone();
        tokio::spawn(async move {
            let why = shutdown_signal().await;
            tracing::info!(signal = why, "shutdown signal received");
            drain.begin(false);
        });
        running.drained().await;
        ExitCode::SUCCESS
    });
    logging.flush(Duration::from_secs(2));
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT and /shutdown stop the sidecar");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
