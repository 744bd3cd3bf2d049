//! Admin server: `/live`, `/ready`, `/metrics` for the kubelet and Prometheus, `GET /drain` for
//! the drain phase; `POST /drain`, `/shutdown` and `/log-level` only for clients on the loopback
//! interface (containers of the same pod), since anyone who can reach the pod IP could otherwise
//! stop the sidecar.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::{
    discovery::Discover,
    drain::{Drain, Phase},
    log::LevelControl,
    metrics::Metrics,
    server::ConnLimits,
};

/// How long `/ready` waits for the application to accept a TCP connection.
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest `/log-level` body read.
const MAX_LEVEL_BODY: usize = 1024;

/// Start-up steps `/ready` waits for besides the application: the first registration of the
/// pod's Lease and the first sync of each followed shard map. Once done they stay done: a later
/// API-server outage must not take every pod out of its Services (the sidecar keeps serving on
/// what it knows).
#[derive(Clone, Debug, Default)]
pub struct StartupGates(Arc<GatesInner>);

#[derive(Debug, Default)]
struct GatesInner {
    pending: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Signalled when the last pending step is done.
    all_open: tokio::sync::Notify,
}

/// One pending start-up step; `open` it when done (dropping it unopened keeps it pending).
#[derive(Debug)]
pub struct Gate {
    gates: StartupGates,
    what: String,
}

impl StartupGates {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a step `/ready` waits for, described for the `/ready` body.
    pub fn add(&self, what: impl Into<String>) -> Gate {
        let what = what.into();
        self.lock().insert(what.clone());
        Gate {
            gates: self.clone(),
            what,
        }
    }

    /// The steps still pending, sorted.
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// Returns once no step is pending (at once when none was added).
    pub async fn all_open(&self) {
        loop {
            let notified = self.0.all_open.notified();
            tokio::pin!(notified);
            // Registered before looking, so an `open` in between is not missed.
            notified.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

impl Gate {
    /// Marks the step done (idempotent).
    pub fn open(&self) {
        let mut pending = self.gates.lock();
        pending.remove(&self.what);
        if pending.is_empty() {
            drop(pending);
            self.gates.0.all_open.notify_waiters();
        }
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// Lifecycle.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Where the shard-map gauges (epoch, members per shard) are read when scraped.
    pub discovery: Option<Arc<dyn Discover>>,
    /// The application, probed by `/ready`; `None` when inbound is disabled.
    pub app: Option<SocketAddr>,
    /// Log-level control; `None` when the process does not own the global subscriber.
    pub level: Option<LevelControl>,
    /// Registry start-up steps still pending.
    pub gates: StartupGates,
    /// How long `POST /drain` holds the request for the inbound drain before answering 503
    /// (drain delay + grace period + slack: the drain itself is bounded by those).
    pub drain_answer_within: Duration,
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
                let mut body = self.metrics.render();
                if let Some(d) = &self.discovery {
                    crate::metrics::render_shard_maps(&mut body, &d.destinations());
                }
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (&Method::GET, "/drain") => text(StatusCode::OK, format!("{}\n", self.drain.phase().name())),
            (&Method::POST, "/drain") => {
                if !peer.ip().is_loopback() {
                    return local_only("/drain");
                }
                self.drain_and_wait(peer).await
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
            (_, "/live" | "/ready" | "/metrics" | "/drain" | "/shutdown" | "/log-level") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET /live, GET /ready, GET /metrics, GET|POST /drain, POST /shutdown, PUT /log-level\n",
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; endpoints: GET /live, GET /ready, GET /metrics, GET|POST /drain, POST /shutdown, PUT /log-level\n",
            ),
        }
    }

    /// `POST /drain`, the application's preStop hook: begins the drain as SIGTERM does
    /// (idempotent; with native sidecars SIGTERM only comes after the application exited) and
    /// answers once inbound traffic is drained, so the kubelet stops the application only then.
    async fn drain_and_wait(&self, peer: SocketAddr) -> Response<Full<Bytes>> {
        if !self.drain.is_draining() {
            tracing::info!(%peer, "drain requested over the admin API (preStop hook)");
        }
        self.drain.begin(false);
        let drained = tokio::time::timeout(
            self.drain_answer_within,
            self.drain.reached(Phase::InboundDrained),
        )
        .await;
        match drained {
            Ok(()) => text(
                StatusCode::OK,
                format!(
                    "drained: no inbound request left (phase {})\n",
                    self.drain.phase().name()
                ),
            ),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "still draining after {:?} (phase {}); stop the application anyway\n",
                    self.drain_answer_within,
                    self.drain.phase().name()
                ),
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
        let pending = self.gates.pending();
        if !pending.is_empty() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {}\n", pending.join("; ")),
            );
        }
        text(StatusCode::OK, "ready\n")
    }
}

/// Serves the admin API until the process exits (it keeps answering while draining so probes
/// see the failing readiness).
pub async fn serve(listener: TcpListener, admin: Admin, limits: ConnLimits) {
    crate::server::serve_with(
        listener,
        move |peer: SocketAddr| {
            let admin = admin.clone();
            move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req, peer).await) }
            }
        },
        limits,
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ready_text(admin: &Admin) -> (StatusCode, String) {
        let r = admin.ready().await;
        let status = r.status();
        let body = r
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ready_waits_for_the_registry_to_start_then_stays_ready() {
        let admin = admin();
        assert_eq!(ready_text(&admin).await.0, StatusCode::OK);
        let lease = admin.gates.add("the registration of this pod's Lease");
        let map = admin.gates.add("the first sync of the shard map of orders");
        let (status, body) = ready_text(&admin).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("Lease") && body.contains("orders"), "{body}");
        lease.open();
        let (_, body) = ready_text(&admin).await;
        assert!(!body.contains("Lease") && body.contains("orders"), "{body}");
        let started = admin.gates.clone();
        let mut started = tokio::spawn(async move { started.all_open().await });
        tokio::task::yield_now().await;
        assert!(!started.is_finished(), "a step is still pending");
        map.open();
        map.open();
        assert_eq!(ready_text(&admin).await.0, StatusCode::OK);
        tokio::time::timeout(Duration::from_secs(30), &mut started)
            .await
            .expect("all_open returns once the last step is done")
            .expect("no panic");
        // With nothing pending it returns at once.
        admin.gates.all_open().await;
        // Draining still wins.
        admin.drain.begin(false);
        let (status, body) = ready_text(&admin).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
        );
    }

    fn admin() -> Admin {
        Admin {
            drain: Drain::new(),
            metrics: Arc::new(Metrics::default()),
            discovery: None,
            app: None,
            level: None,
            gates: StartupGates::default(),
            drain_answer_within: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn post_drain_begins_the_drain_and_answers_once_inbound_is_drained() {
        let admin = admin();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let held = tokio::spawn({
            let admin = admin.clone();
            async move { admin.drain_and_wait(peer).await.status() }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(admin.drain.phase(), Phase::Draining, "begun like SIGTERM");
        admin.drain.advance(Phase::InboundClosed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!held.is_finished(), "inbound requests still finishing");
        admin.drain.advance(Phase::InboundDrained);
        assert_eq!(held.await.unwrap(), StatusCode::OK);
        // A second call (the hook retried, or another container's hook) answers at once.
        assert_eq!(admin.drain_and_wait(peer).await.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn post_drain_gives_up_after_its_bound() {
        let admin = admin();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let started = tokio::time::Instant::now();
        let r = admin.drain_and_wait(peer).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }
}
