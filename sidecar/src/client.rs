//! The upstream HTTP client: HTTP/1 connections pooled per endpoint, with a connect timeout,
//! as a tower service whose errors say whether the request provably never left (connect
//! failure, or a pooled connection that closed before the request was written) or may have
//! reached the upstream (everything else) — the distinction the retry rules rest on.
//!
//! The pool is ours rather than hyper-util's: every request pays for the pool, and a pool that
//! returns a connection when the response body ends (instead of spawning a task to wait for the
//! connection to become ready), keys endpoints with a short hash and stamps idle connections
//! with a tick instead of a clock read costs a fraction of it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header::HOST, uri::Authority, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tower::Service;

use crate::{
    body::{boxed, ProxyBody},
    errors::{BoxFuture, ProxyError},
    hash::FnvBuild,
};

/// Idle pooled connections are closed after this long at most (and after two thirds of it at
/// least: idleness is counted in ticks of a third).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle pooled connections kept per endpoint (bounds memory and file descriptors).
pub const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// Idle connections are stamped with the pool's tick, advanced every third of the idle timeout.
const TICKS_PER_IDLE_TIMEOUT: u64 = 3;

/// Pooled HTTP/1 client to endpoints given as `http://ip:port/...` URIs. Behind one `Arc`:
/// the stack is cloned per request.
#[derive(Clone, Debug)]
pub struct Upstream {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    connect_timeout: Duration,
    /// Each endpoint's idle connections. A response holds its endpoint's slot, so returning
    /// its connection does not look the endpoint up again.
    slots: Mutex<HashMap<Key, Arc<Slot>, FnvBuild>>,
    /// Advanced by the reaper; an idle connection remembers the tick it was returned at.
    tick: AtomicU64,
    /// Whether the reaper task runs (started with the first returned connection).
    reaping: AtomicBool,
}

/// An endpoint's authority as the pool's key: hashed and compared as plain bytes (`ip:port`
/// authorities are lower case already), where `Authority` hashes byte by byte, lower-casing.
#[derive(Debug, Clone)]
struct Key(Authority);

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0.as_str().as_bytes());
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Key {}

/// One endpoint's ready connections, most recently returned last.
#[derive(Debug, Default)]
struct Slot(Mutex<Vec<Idle>>);

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection waiting for its next request, with the reaper's tick when it was returned.
struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    tick: u64,
}

impl Idle {
    /// Whether the connection may still serve a request at the pool's tick `now`: open, and
    /// returned less than [`TICKS_PER_IDLE_TIMEOUT`] ticks ago.
    fn usable(&self, now: u64) -> bool {
        !self.tx.is_closed() && now.saturating_sub(self.tick) < TICKS_PER_IDLE_TIMEOUT
    }
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("tick", &self.tick).finish()
    }
}

impl Upstream {
    /// A client whose TCP connects give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Upstream {
            pool: Arc::new(Pool {
                connect_timeout,
                slots: Mutex::new(HashMap::default()),
                tick: AtomicU64::new(0),
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// Idle connections kept for `endpoint` (an `ip:port` authority); for tests and debugging.
    pub fn idle_connections(&self, endpoint: &str) -> usize {
        let Ok(a) = Authority::try_from(endpoint) else {
            return 0;
        };
        let slot = self.pool.lock().get(&Key(a)).cloned();
        slot.map_or(0, |slot| {
            slot.lock().iter().filter(|c| !c.tx.is_closed()).count()
        })
    }
}

/// The endpoint an upstream URI's authority names (`ip:port`), for errors; `0.0.0.0:0` when
/// it names none. Parsed only when an error needs it.
pub fn endpoint_of(authority: Option<&Authority>) -> SocketAddr {
    authority
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The error and its causes on one line: hyper's top-level messages alone ("connection
/// closed before message completed") do not tell an operator what happened.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Slot>, FnvBuild>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of `authority`'s connections, made on first use.
    fn slot(&self, authority: Authority) -> Arc<Slot> {
        self.lock().entry(Key(authority)).or_default().clone()
    }

    /// Drops closed and expired connections; forgets endpoints without any (a response still
    /// holding a forgotten slot returns its connection there, and it is closed with the slot).
    fn reap(&self) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().retain(|_, slot| {
            let mut conns = slot.lock();
            conns.retain(|c| c.usable(tick));
            !conns.is_empty()
        });
    }

    /// The most recently returned connection in `slot` that is ready for a request. Closed and
    /// expired ones are dropped; one not ready yet (its last response still being finished by
    /// its connection task) stays for later.
    fn checkout(&self, slot: &Slot) -> Option<http1::SendRequest<ProxyBody>> {
        let tick = self.tick.load(Ordering::Relaxed);
        let mut conns = slot.lock();
        conns.retain(|c| c.usable(tick));
        let ready = conns.iter().rposition(|c| c.tx.is_ready())?;
        Some(conns.remove(ready).tx)
    }

    /// Keeps a connection whose response has ended for the next request to its endpoint.
    fn put(self: &Arc<Self>, slot: &Slot, tx: http1::SendRequest<ProxyBody>) {
        if tx.is_closed() {
            return;
        }
        if !self.reaping.swap(true, Ordering::Relaxed) {
            spawn_reaper(Arc::downgrade(self));
        }
        let tick = self.tick.load(Ordering::Relaxed);
        let mut conns = slot.lock();
        if conns.len() < POOL_MAX_IDLE_PER_HOST {
            conns.push(Idle { tx, tick });
        }
    }

    /// A new connection to `authority`, its connection task spawned.
    async fn connect(
        &self,
        authority: &Authority,
    ) -> Result<http1::SendRequest<ProxyBody>, ProxyError> {
        let failed = |message: String| ProxyError::Connect {
            endpoint: endpoint_of(Some(authority)),
            message,
        };
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(format!("tcp connect error: {e}"))),
            Err(_) => {
                return Err(failed(format!(
                    "tcp connect timed out after {} ms",
                    self.connect_timeout.as_millis()
                )))
            }
        };
        // Small requests and responses go out at once rather than waiting for an ACK.
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %chain(&e), "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// Sends `req` on a pooled connection, or a new one when none is ready. A pooled
    /// connection that closed before the request was written gives it back, and the next is
    /// tried: at most every idle connection once, then one new connection.
    async fn send(
        self: Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(authority) = to_origin_form(&mut req) else {
            return Err(ProxyError::BadRequest(
                "the upstream URI names no endpoint".into(),
            ));
        };
        let slot = self.slot(authority.clone());
        loop {
            let (mut tx, pooled) = match self.checkout(&slot) {
                Some(tx) => (tx, true),
                // Boxed: the connect's state would otherwise make every request's future
                // larger, and it is copied whole when boxed.
                None => (Box::pin(self.connect(&authority)).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let ended = body.is_end_stream();
                    let mut body = Returning {
                        body,
                        home: Some((self, slot, tx)),
                    };
                    if ended {
                        give_back(&mut body.home);
                    }
                    return Ok(Response::from_parts(parts, boxed(body)));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: a connection the upstream closed while it was idle.
                    Some(back) if pooled => req = back,
                    Some(_) => {
                        return Err(ProxyError::Connect {
                            endpoint: endpoint_of(Some(&authority)),
                            message: format!(
                                "the new connection closed before the request was sent: {}",
                                chain(e.error())
                            ),
                        })
                    }
                    None => {
                        return Err(ProxyError::Reset {
                            endpoint: endpoint_of(Some(&authority)),
                            message: chain(e.error()),
                        })
                    }
                },
            }
        }
    }
}

/// Rewrites an absolute `http://ip:port/path` request to what goes on the connection: the
/// origin form `/path`, a `Host` header when the request had none, HTTP/1.1 for requests that
/// arrived over HTTP/2. Returns the endpoint's authority.
fn to_origin_form(req: &mut Request<ProxyBody>) -> Option<Authority> {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    let authority = parts.authority.take()?;
    parts.scheme = None;
    let path = parts
        .path_and_query
        .take()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    if !req.headers().contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(HOST, v);
        }
    }
    if req.version() != Version::HTTP_10 && req.version() != Version::HTTP_11 {
        *req.version_mut() = Version::HTTP_11;
    }
    Some(authority)
}

/// Every third of the idle timeout, drops expired connections; ends with the pool.
fn spawn_reaper(pool: Weak<Pool>) {
    let every = POOL_IDLE_TIMEOUT / TICKS_PER_IDLE_TIMEOUT as u32;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            interval.tick().await;
            match pool.upgrade() {
                Some(p) => p.reap(),
                None => return,
            }
        }
    });
}

pin_project_lite::pin_project! {
    /// A response body that returns its connection to the pool when it ends. Dropped before
    /// its end, it drops the connection instead (the rest of the response is unread).
    struct Returning {
        #[pin]
        body: Incoming,
        home: Home,
    }
}

/// Where a response's connection goes back to when the response ends.
type Home = Option<(Arc<Pool>, Arc<Slot>, http1::SendRequest<ProxyBody>)>;

fn give_back(home: &mut Home) {
    if let Some((pool, slot, tx)) = home.take() {
        pool.put(&slot, tx);
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.body.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(None) => give_back(this.home),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => give_back(this.home),
            // A broken response: the connection is not reused.
            Poll::Ready(Some(Err(_))) => drop(this.home.take()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Service<Request<ProxyBody>> for Upstream {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // Never at capacity: a request without a ready connection opens one.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        Box::pin(self.pool.clone().send(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::full;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// What the test server saw: connections accepted, and each request's head as sent.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        heads: Mutex<Vec<String>>,
    }

    /// A raw HTTP/1.1 server answering `ok` to every request; with `close_after_one`, it closes
    /// each connection after its first response while announcing keep-alive (what a server
    /// with a short idle timeout does).
    async fn server(close_after_one: bool) -> (SocketAddr, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            s.heads.lock().unwrap().push(head);
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if sock.write_all(resp).await.is_err() {
                                return;
                            }
                            if close_after_one {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    fn get(addr: SocketAddr, path: &str) -> Request<ProxyBody> {
        Request::get(format!("http://{addr}{path}"))
            .body(full(Bytes::new()))
            .unwrap()
    }

    async fn read_all(resp: Response<ProxyBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// Waits (bounded) for `cond`, naming what was awaited when it times out.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out after 5 s waiting for {what}");
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form() {
        let (addr, seen) = server(false).await;
        let mut up = Upstream::new(Duration::from_secs(1));
        for i in 0..3 {
            let resp = up.call(get(addr, &format!("/x?i={i}"))).await.unwrap();
            assert_eq!(read_all(resp).await, "ok");
            assert_eq!(up.idle_connections(&addr.to_string()), 1);
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        let heads = seen.heads.lock().unwrap().clone();
        assert!(heads[2].starts_with("GET /x?i=2 HTTP/1.1\r\n"), "{heads:?}");
        // No Host in the request: the endpoint's authority is sent.
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains(&format!("host: {addr}")),
            "{heads:?}"
        );
    }

    #[tokio::test]
    async fn the_callers_host_header_is_kept() {
        let (addr, seen) = server(false).await;
        let mut up = Upstream::new(Duration::from_secs(1));
        let mut req = get(addr, "/");
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("orders.shop:8080"));
        read_all(up.call(req).await.unwrap()).await;
        let heads = seen.heads.lock().unwrap().clone();
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains("host: orders.shop:8080"),
            "{heads:?}"
        );
        assert!(!heads[0].contains(&addr.to_string()), "{heads:?}");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
        let (addr, seen) = server(true).await;
        let mut up = Upstream::new(Duration::from_secs(1));
        read_all(up.call(get(addr, "/a")).await.unwrap()).await;
        wait_for("the pooled connection to see the upstream's close", || {
            up.idle_connections(&addr.to_string()) == 0
        })
        .await;
        // A POST: it must not be lost or sent twice.
        let req = Request::post(format!("http://{addr}/b"))
            .body(full("x"))
            .unwrap();
        assert_eq!(read_all(up.call(req).await.unwrap()).await, "ok");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
        assert_eq!(seen.heads.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_takes_its_connection_with_it() {
        let (addr, seen) = server(false).await;
        let mut up = Upstream::new(Duration::from_secs(1));
        let resp = up.call(get(addr, "/")).await.unwrap();
        drop(resp);
        assert_eq!(up.idle_connections(&addr.to_string()), 0);
        read_all(up.call(get(addr, "/")).await.unwrap()).await;
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_failure_naming_the_endpoint() {
        // Bind and drop: nothing listens on the port afterwards.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut up = Upstream::new(Duration::from_secs(1));
        match up.call(get(addr, "/")).await {
            Err(ProxyError::Connect { endpoint, message }) => {
                assert_eq!(endpoint, addr);
                assert!(message.contains("tcp connect error"), "{message}");
            }
            other => panic!("expected a connect failure, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, _seen) = server(false).await;
        let mut up = Upstream::new(Duration::from_secs(1));
        read_all(up.call(get(addr, "/")).await.unwrap()).await;
        assert_eq!(up.idle_connections(&addr.to_string()), 1);
        tokio::time::sleep(POOL_IDLE_TIMEOUT / 2).await;
        assert_eq!(
            up.idle_connections(&addr.to_string()),
            1,
            "kept for at least 2/3 of the timeout"
        );
        tokio::time::sleep(POOL_IDLE_TIMEOUT / 2 + Duration::from_secs(1)).await;
        assert_eq!(up.idle_connections(&addr.to_string()), 0);
    }
}
