//! The HTTPS server the API server calls: hyper 1 (HTTP/1.1 and HTTP/2 by ALPN) over
//! tokio-rustls, with the certificate resolved per handshake from [`CertResolver`] so a rotated
//! certificate is served without a restart.
//!
//! Any pod that can reach the webhook can also hold connections to it, and with
//! `failurePolicy: Fail` a webhook that stops answering stops pod creation cluster-wide. So
//! every stage of a connection has a deadline ([`Limits`]), and the number of connections is
//! capped: at the cap the connection idle the longest is closed to admit the new one (the API
//! server reconnects at the cost of a handshake, while refusing new connections would let
//! whoever holds the idle ones block admission); only when every connection has a request in
//! flight is a new one refused, at once, so its client fails fast instead of hanging.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{tls::CertResolver, HandleError};

/// Largest AdmissionReview accepted. The API server caps objects at about 1.5 MiB; a review
/// carries the object (and the old one on update).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// How long each stage of a connection may take, and how many connections may be open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A client that does not finish its TLS handshake in this time is dropped.
    pub handshake_timeout: Duration,
    /// An HTTP/1.1 request head must arrive within this. hyper runs this timer whenever a
    /// connection waits for a request head, so an idle HTTP/1.1 keep-alive connection is also
    /// closed after it; the API server normally negotiates HTTP/2 (ALPN `h2`), whose idle
    /// connections `idle_timeout` closes.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this; a closing connection gets this long to finish
    /// the request in flight and write its answer.
    pub request_timeout: Duration,
    /// A connection with no request in flight for this long is closed (before its protocol is
    /// known too). The API server reuses connections between admissions, so this is well above
    /// the gaps of a busy cluster; an idle one closed early only costs a new handshake.
    pub idle_timeout: Duration,
    /// Connections open at once, handshaking ones included.
    pub max_connections: usize,
    /// Concurrent requests (streams) on one HTTP/2 connection (Go's server default).
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_concurrent_streams: 250,
        }
    }
}

/// Answers admission requests: body bytes posted to a path → response bytes. Implemented by
/// [`super::Admission`]; a trait so tests can serve their own webhooks with the same server.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError>;
}

impl Handler for super::Admission {
    fn handle(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError> {
        super::Admission::handle(self, path, body)
    }
}

/// TLS configuration resolving the certificate on every handshake.
pub fn tls_config(resolver: Arc<CertResolver>) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves `admission` on `listener` with the default [`Limits`] until `shutdown` resolves.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: ServerConfig,
    admission: Arc<H>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(Limits::default(), listener, tls, admission, shutdown).await
}

/// Serves `admission` on `listener` within `limits` until `shutdown` resolves.
pub async fn serve_with<H: Handler>(
    limits: Limits,
    listener: TcpListener,
    tls: ServerConfig,
    admission: Arc<H>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams);
    let open = Arc::new(Connections::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. too many open files: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(conn) = open.admit() else {
            debug!(%peer, max = limits.max_connections, "every connection busy; refused");
            continue;
        };
        let (acceptor, admission, http, open) = (
            acceptor.clone(),
            admission.clone(),
            http.clone(),
            open.clone(),
        );
        tokio::spawn(async move {
            let id = conn.id;
            serve_connection(limits, acceptor, &http, admission, conn, tcp, peer).await;
            open.remove(id);
        });
    }
}

/// One connection from accept to close: handshake, then HTTP until the client leaves, the
/// connection idles out, or the cap closes it.
async fn serve_connection<H: Handler>(
    limits: Limits,
    acceptor: TlsAcceptor,
    http: &auto::Builder<TokioExecutor>,
    admission: Arc<H>,
    conn: Arc<Conn>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
    let tls = tokio::select! {
        _ = conn.close.notified() => return,
        r = handshake => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let activity = conn.clone();
    let svc = service_fn(move |req| {
        let admission = admission.clone();
        let busy = Busy::start(activity.clone());
        async move {
            let resp = respond(&*admission, req, peer, limits.request_timeout).await;
            drop(busy);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let served = http.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(served);
    // Once closing, the request in flight gets `request_timeout` to finish; a client that
    // stops reading its answer cannot keep the connection past that.
    let mut closing: Option<Instant> = None;
    loop {
        let wake = closing.unwrap_or_else(|| conn.idle_deadline(limits.idle_timeout));
        tokio::select! {
            res = served.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = conn.close.notified(), if closing.is_none() => {
                debug!(%peer, "closing the longest idle connection for a new one");
                served.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.request_timeout);
            }
            _ = tokio::time::sleep_until(wake) => {
                if closing.is_some() {
                    debug!(%peer, "connection did not finish closing; dropped");
                    return;
                }
                if conn.idle_deadline(limits.idle_timeout) <= Instant::now() {
                    debug!(%peer, "idle connection closed");
                    served.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + limits.request_timeout);
                }
            }
        }
    }
}

/// The open connections, so that the cap can close the one idle the longest.
struct Connections {
    max: usize,
    origin: Instant,
    next: AtomicU64,
    /// Locked per connection opened and closed, never per request.
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Connections {
    fn new(max: usize) -> Self {
        Connections {
            max: max.max(1),
            origin: Instant::now(),
            next: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // A poisoned lock only means a task panicked between two map operations; keep going.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection; at the cap, first tells the victim to close and forgets
    /// it. `None`: every connection is busy, refuse the new one.
    fn admit(&self) -> Option<Arc<Conn>> {
        let mut open = self.lock();
        if open.len() >= self.max {
            let id = victim(open.values().map(|c| (c.id, c.activity())))?;
            if let Some(old) = open.remove(&id) {
                old.close.notify_one();
            }
        }
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            origin: self.origin,
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.origin.elapsed().as_millis() as u64),
            close: Notify::new(),
        });
        open.insert(conn.id, conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// What the cap judges a connection by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Activity {
    /// Requests being answered.
    in_flight: usize,
    /// When it last became idle (opened, or its last request answered), in ms since the
    /// server started.
    idle_since_ms: u64,
}

/// The connection the cap closes to admit a new one: of those with no request in flight, the
/// one idle the longest (then the oldest); none when every connection is busy.
fn victim(conns: impl IntoIterator<Item = (u64, Activity)>) -> Option<u64> {
    conns
        .into_iter()
        .filter(|(_, a)| a.in_flight == 0)
        .min_by_key(|(id, a)| (a.idle_since_ms, *id))
        .map(|(id, _)| id)
}

/// One open connection, updated by its own requests without a lock.
struct Conn {
    id: u64,
    origin: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
    /// Told to close by the cap.
    close: Notify,
}

impl Conn {
    fn activity(&self) -> Activity {
        Activity {
            in_flight: self.in_flight.load(Ordering::Acquire),
            idle_since_ms: self.idle_since_ms.load(Ordering::Acquire),
        }
    }

    /// When the connection has been idle for `idle`; while a request is in flight, a look
    /// again that much later.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        let a = self.activity();
        if a.in_flight > 0 {
            return Instant::now() + idle;
        }
        self.origin + Duration::from_millis(a.idle_since_ms) + idle
    }
}

/// A request in flight on a connection, from its head to its answer.
struct Busy(Arc<Conn>);

impl Busy {
    fn start(conn: Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.origin.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn respond<H: Handler>(
    admission: &H,
    req: Request<Incoming>,
    peer: SocketAddr,
    body_timeout: Duration,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz" | "/readyz") => {
            return reply(StatusCode::OK, "text/plain", "ok\n");
        }
        (&Method::POST, _) => {}
        _ => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST an AdmissionReview, or GET /healthz\n",
            )
        }
    }
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(body_timeout, body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            debug!(%peer, "request body not received in time");
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                "text/plain",
                format!("request body not received within {body_timeout:?}\n"),
            );
        }
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "cannot read the request body");
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!("request body unreadable or over {MAX_BODY} bytes: {e}\n"),
            );
        }
    };
    match admission.handle(&path, &body) {
        Ok(out) => reply(StatusCode::OK, "application/json", out),
        Err(HandleError::NotFound) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!(
                "no webhook at {path}; use {} or {}\n",
                super::MUTATE_PATH,
                super::VALIDATE_PATH
            ),
        ),
        Err(HandleError::BadRequest(msg)) => {
            warn!(%peer, %path, error = %msg, "malformed admission request");
            reply(StatusCode::BAD_REQUEST, "text/plain", format!("{msg}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(since: u64) -> Activity {
        Activity {
            in_flight: 0,
            idle_since_ms: since,
        }
    }

    fn busy(since: u64) -> Activity {
        Activity {
            in_flight: 1,
            idle_since_ms: since,
        }
    }

    #[test]
    fn the_cap_picks_the_longest_idle_connection_and_never_a_busy_one() {
        assert_eq!(
            victim([(1, idle(500)), (2, idle(100)), (3, busy(0))]),
            Some(2)
        );
        assert_eq!(victim([(7, idle(100)), (3, idle(100))]), Some(3));
        assert_eq!(victim([(1, busy(0)), (2, busy(5))]), None);
        assert_eq!(victim([]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_idle_connection_is_told_to_close_and_busy_ones_refuse() {
        let open = Connections::new(2);
        let first = open.admit().expect("below the cap");
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = open.admit().expect("below the cap");
        let _answering = Busy::start(second.clone());
        let third = open.admit().expect("the idle first one makes room");
        tokio::time::timeout(Duration::from_millis(1), first.close.notified())
            .await
            .expect("the first connection is told to close");
        let _also = Busy::start(third.clone());
        assert!(open.admit().is_none(), "every connection busy: refused");
        // A request answered makes its connection idle from then on.
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(_answering);
        let deadline = second.idle_deadline(Duration::from_secs(30));
        assert_eq!(deadline, Instant::now() + Duration::from_secs(30));
        assert!(open.admit().is_some());
        assert_eq!(open.lock().len(), 2);
    }
}
