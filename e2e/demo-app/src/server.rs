//! HTTP/1.1 server: accept loop, one JSON access-log line per request, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::App;

/// How long in-flight requests may take to finish after shutdown starts.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets in-flight
/// requests finish (closing idle keep-alive connections) and returns once all connections are
/// closed or `drain` has passed.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let mut stop = stop_rx.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(handle_logged(&app, req).await) }
                    });
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        if !e.is_incomplete_message() {
                            tracing::debug!(%peer, error = %e, "connection error");
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let in_flight = conns.len();
    tracing::info!(
        connections = in_flight,
        "shutting down: no longer accepting; draining"
    );
    // Ignore the error: no receiver left just means no connection is open.
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    match drained {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => {
            tracing::warn!(
                remaining = conns.len(),
                drain_secs = drain.as_secs(),
                "drain deadline passed; closing remaining connections"
            );
            conns.abort_all();
        }
    }
}

async fn handle_logged(
    app: &App,
    req: Request<Incoming>,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let key_header = req
        .headers()
        .get(&app.config().key_header)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let resp = app.handle(req).await;
    tracing::info!(
        target: "access",
        method = %method,
        path = %path,
        shard_key = key_header.as_deref(),
        status = resp.status().as_u16(),
        pod = %app.config().pod,
        shard = app.config().shard,
        duration_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        "request"
    );
    resp
}
