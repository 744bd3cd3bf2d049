//! Admin server: `/live`, `/ready`, `/metrics` for the kubelet and Prometheus; `/shutdown` and
//! `/log-level` only for clients on the loopback interface (containers of the same pod), since
//! anyone who can reach the pod IP could otherwise stop the sidecar.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

use crate::{drain::Drain, log::LevelControl, metrics::Metrics};

/// How long `/ready` waits for the application to accept a TCP connection.
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest `/log-level` body read.
const MAX_LEVEL_BODY: usize = 1024;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// Lifecycle.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The application, probed by `/ready`; `None` when inbound is disabled.
    pub app: Option<SocketAddr>,
    /// Log-level control; `None` when the process does not own the global subscriber.
    pub level: Option<LevelControl>,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Admin {
    /// Answers one admin request from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let local_only = |what: &str| {
            text(
                StatusCode::FORBIDDEN,
                format!(
                    "{what} is only served to 127.0.0.1/::1 (containers of this pod); you are {}\n",
                    peer.ip()
                ),
            )
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => self.ready().await,
            (&Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (&Method::POST, "/shutdown") => {
                if !peer.ip().is_loopback() {
                    return local_only("/shutdown");
                }
                tracing::info!(%peer, "shutdown requested over the admin API");
                self.drain.begin(true);
                text(StatusCode::ACCEPTED, "shutting down: draining in-flight requests\n")
            }
            (&Method::PUT, "/log-level") => {
                if !peer.ip().is_loopback() {
                    return local_only("/log-level");
                }
                let Some(level) = &self.level else {
                    return text(StatusCode::NOT_IMPLEMENTED, "log level control is not available in this process\n");
                };
                let body = match Limited::new(req.into_body(), MAX_LEVEL_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}\n")),
                };
                let wanted = String::from_utf8_lossy(&body).trim().to_string();
                match level(&wanted) {
                    Ok(()) => {
                        tracing::info!(level = %wanted, "log level changed");
                        text(StatusCode::OK, format!("log level set to {wanted}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            (_, "/live" | "/ready" | "/metrics" | "/shutdown" | "/log-level") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET /live, GET /ready, GET /metrics, POST /shutdown, PUT /log-level\n",
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; endpoints: GET /live, GET /ready, GET /metrics, POST /shutdown, PUT /log-level\n",
            ),
        }
    }

    async fn ready(&self) -> Response<Full<Bytes>> {
        if self.drain.is_draining() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n");
        }
        if let Some(app) = self.app {
            match tokio::time::timeout(APP_PROBE_TIMEOUT, tokio::net::TcpStream::connect(app)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: the application is not answering on {app}: {e}\n"),
                    )
                }
                Err(_) => {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: the application did not accept a connection on {app} within 1s\n"),
                    )
                }
            }
        }
        text(StatusCode::OK, "ready\n")
    }
}

/// Serves the admin API until the process exits (it keeps answering while draining so probes
/// see the failing readiness).
pub async fn serve(listener: TcpListener, admin: Admin) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req, peer).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
