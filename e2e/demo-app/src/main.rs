use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use shardmesh_demo::{server, App, RawConfig};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let raw = RawConfig::parse();
    let config = match raw.validate(shardmesh_demo::config::hostname()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardmesh-demo: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stdout)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardmesh-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: shardmesh_demo::Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "shardmesh-demo: cannot listen on {}: {e} (set PORT or --listen to a free port)",
                config.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("shardmesh-demo: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(
        listen = %addr,
        pod = %config.pod,
        shard = config.shard,
        shards = config.shards,
        "listening"
    );
    let delay = config.shutdown_delay;
    let app = Arc::new(App::new(config));
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        }
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "still serving during the shutdown delay"
            );
            tokio::time::sleep(delay).await;
        }
    };
    server::serve(listener, app, shutdown, server::DEFAULT_DRAIN).await;
    ExitCode::SUCCESS
}
