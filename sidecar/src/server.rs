//! Accept loop shared by the inbound, outbound and admin listeners: HTTP/1 and HTTP/2 per
//! connection, every connection under the same [`ConnLimits`], and graceful connection shutdown
//! when the drain reaches the listener's closing phase (inbound closes before outbound, see
//! [`crate::drain`]; the admin server answers until the process exits).
//!
//! A peer that can reach a port can open connections and then do nothing, send its request
//! head a byte at a time, or stop reading what it asked for. None of that may cost more than a
//! bounded amount of memory and file descriptors for a bounded time:
//! - at most [`ConnLimits::max_connections`] connections per listener are served; further
//!   ones wait in the kernel's listen backlog;
//! - an HTTP/1 request head must be complete within [`ConnLimits::idle`] of the connection
//!   opening or its previous response ending (hyper's header-read timer), and may not exceed
//!   [`MAX_HEAD_BYTES`] (431);
//! - a connection that moved no byte either way for [`ConnLimits::idle`] is shut down
//!   gracefully (its in-flight requests may finish), and closed outright once silent for twice
//!   that: a request body that stopped arriving, a stream that stopped flowing;
//! - a response write the peer has not taken for [`ConnLimits::send`] closes the connection.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Instant,
};
use tower::{Service, ServiceExt};

use crate::{
    access_log::LoggedBody,
    body::{boxed, ProxyBody},
    drain::{ConnToken, Drain, Phase},
    errors::BoxFuture,
};

/// A proxy stack, type-erased so the accept loop is not generic: one shared copy, cloned for
/// each request (tower's contract) and called once it is ready. The stack's own future is
/// already boxed, so nothing is boxed again on the way (as `BoxCloneService` and `oneshot`
/// would: two more allocations and a copy of the future per request).
#[derive(Clone)]
pub struct HttpService(Arc<dyn Fn(Request<ProxyBody>) -> StackFuture + Send + Sync>);

type StackFuture = BoxFuture<Result<Response<LoggedBody>, Infallible>>;

impl HttpService {
    /// Erases `stack`'s type.
    pub fn new<S>(stack: S) -> Self
    where
        S: Service<
                Request<ProxyBody>,
                Response = Response<LoggedBody>,
                Error = Infallible,
                Future = StackFuture,
            > + Clone
            + Send
            + Sync
            + 'static,
    {
        HttpService(Arc::new(move |req| {
            let mut svc = stack.clone();
            // A stack that is ready now is called at once; one that is not is awaited (with a
            // real waker) before the call.
            let waker = std::task::Waker::noop();
            match svc.poll_ready(&mut std::task::Context::from_waker(waker)) {
                std::task::Poll::Ready(Ok(())) => svc.call(req),
                std::task::Poll::Ready(Err(never)) => match never {},
                std::task::Poll::Pending => Box::pin(svc.oneshot(req)),
            }
        }))
    }

    /// Handles one request.
    pub fn call(&self, req: Request<ProxyBody>) -> StackFuture {
        (self.0)(req)
    }
}

/// Largest HTTP/1 request head (request line and headers) and HTTP/2 header list accepted.
/// Larger heads are refused with 431 (HTTP/1) or a stream reset (HTTP/2). Envoy's default is
/// 60 KiB; 64 KiB leaves room for large cookies and tokens while keeping a connection's read
/// buffer small.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Concurrent HTTP/2 streams per connection.
pub const MAX_H2_STREAMS: u32 = 256;

/// What every accepted connection lives under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Silence allowed: no complete request head (HTTP/1) or no byte either way for this long
    /// closes the connection (gracefully first). Longer than the 30 s the sidecar's own pool
    /// keeps idle connections to endpoints ([`crate::client::POOL_IDLE_TIMEOUT`]), so a caller's
    /// sidecar closes a pooled connection before the server does and never reuses one that is
    /// being closed under it.
    pub idle: Duration,
    /// A response write the peer does not take for this long closes the connection.
    pub send: Duration,
    /// Connections served at once by one listener.
    pub max_connections: usize,
}

impl ConnLimits {
    /// The admin server's: probes and scrapes, a handful of connections.
    pub fn admin(self) -> ConnLimits {
        ConnLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..self
        }
    }
}

/// Connections the admin server serves at once (kubelet probes, a metrics scraper, the preStop
/// hook, an operator with curl).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// When a listener stops accepting and how long its connections have to finish.
#[derive(Clone, Debug)]
pub struct Closing {
    /// Lifecycle signal.
    pub drain: Drain,
    /// Phase at which the listener closes.
    pub at: Phase,
    /// Held by every connection, so the drain can wait for them.
    pub token: ConnToken,
}

/// Serves `svc` on `listener` until the drain reaches `closing.at` (or forever without
/// `closing`); then the listener is closed and each connection finishes its in-flight requests
/// before closing.
pub async fn serve(
    listener: TcpListener,
    svc: HttpService,
    limits: ConnLimits,
    closing: Option<Closing>,
) {
    let make = move |_peer: SocketAddr| {
        let svc = svc.clone();
        move |req: Request<Incoming>| -> StackFuture { svc.call(req.map(boxed)) }
    };
    serve_with(listener, make, limits, closing).await
}

/// [`serve`] for any request handler (the admin server's is not a proxy stack): `make` gives
/// each connection its handler, knowing the peer's address.
pub async fn serve_with<M, F, Fut, B>(
    listener: TcpListener,
    make: M,
    limits: ConnLimits,
    closing: Option<Closing>,
) where
    M: Fn(SocketAddr) -> F + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let closed = async {
        match &closing {
            Some(c) => c.drain.reached(c.at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed);
    loop {
        // At the cap, stop accepting: further connections wait in the listen backlog.
        let slot = tokio::select! {
            biased;
            _ = &mut closed => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut closed => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = make(peer);
        let closing = closing.clone();
        tokio::spawn(async move {
            connection(stream, peer, handler, limits, closing).await;
            drop(slot);
        });
    }
    drop(listener);
}

async fn connection<F, Fut, B>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: F,
    limits: ConnLimits,
    closing: Option<Closing>,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _token = closing.as_ref().map(|c| c.token.clone());
    let progress = Arc::new(Progress::default());
    let io = TokioIo::new(Watched {
        io: stream,
        progress: progress.clone(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // No header read timeout here: the watchdog closes a connection that has not completed
        // a request head within the idle timeout (hyper's timer is a boxed sleep per request).
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS);
    // Requests are counted in and out, so the watchdog knows when the connection waits for a head.
    let counted = {
        let progress = progress.clone();
        move |req| {
            let finished = Finished::new(&progress);
            let fut = handler(req);
            async move {
                let resp = fut.await?;
                Ok::<_, Infallible>(resp.map(|body| Counted {
                    body,
                    _finished: finished,
                }))
            }
        }
    };
    let conn = builder.serve_connection(io, hyper::service::service_fn(counted));
    tokio::pin!(conn);

    let draining = OnWake::new(async {
        match &closing {
            Some(c) => c.drain.reached(c.at).await,
            None => std::future::pending().await,
        }
    });
    tokio::pin!(draining);
    let mut watch = Watchdog::new(limits);
    let mut shutting_down = false;
    let result = loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => break r,
            _ = &mut draining, if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(watch.next_check) => {
                match watch.check(&progress, Instant::now()) {
                    Verdict::Fine => {}
                    Verdict::Idle => {
                        if !shutting_down {
                            shutting_down = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    Verdict::Close(why) => {
                        tracing::debug!(%peer, reason = why, "closing a stalled connection");
                        return;
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What the IO of one connection has done, for its watchdog. Atomics because hyper owns the IO;
/// both sides run on the connection's task, so `Relaxed` is enough.
#[derive(Debug, Default)]
struct Progress {
    /// Bytes moved either way.
    bytes: AtomicU64,
    /// The last write found the peer's window full.
    write_blocked: AtomicBool,
    /// Requests whose head arrived.
    heads: AtomicU64,
    /// Requests finished: their response written, or dropped.
    finished: AtomicU64,
}

/// Counts a request as finished when dropped: with its response body once written, or with
/// its handler's future when the request is abandoned.
struct Finished(Arc<Progress>);

impl Finished {
    fn new(progress: &Arc<Progress>) -> Self {
        progress.heads.fetch_add(1, Ordering::Relaxed);
        Finished(progress.clone())
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its request finished when it is dropped.
    struct Counted<B> {
        #[pin]
        body: B,
        _finished: Finished,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Polls `inner` only when it woke the task (and the first time). A connection's task wakes
    /// for every read and write; the drain signal, polled at each of them, would take its
    /// channel's lock twice per request.
    struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
    }
}

/// Set when the wrapped future's waker is woken, and the task's waker to pass that on to.
#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    fn new(inner: F) -> Self {
        let flag = WakeFlag {
            woken: AtomicBool::new(true),
            ..WakeFlag::default()
        };
        OnWake {
            inner,
            flag: Arc::new(flag),
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = std::task::Waker::from(this.flag.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

/// The watchdog's judgement of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Silent for the idle timeout: shut down gracefully.
    Idle,
    /// Stalled: close now.
    Close(&'static str),
}

/// Judges silence on the connection's own clock, a few times per limit.
#[derive(Debug)]
struct Watchdog {
    limits: ConnLimits,
    seen: u64,
    quiet_since: Instant,
    next_check: Instant,
    period: Duration,
    /// Since when no request has been in flight (the connection waits for a head), the heads
    /// counted then and the bytes moved then; `None` while a request is in flight.
    waiting: Option<(Instant, u64, u64)>,
}

impl Watchdog {
    fn new(limits: ConnLimits) -> Self {
        let now = Instant::now();
        let period = (limits.idle.min(limits.send) / 4).max(Duration::from_millis(10));
        Watchdog {
            limits,
            seen: 0,
            quiet_since: now,
            next_check: now + period,
            period,
            waiting: Some((now, 0, 0)),
        }
    }

    fn check(&mut self, progress: &Progress, now: Instant) -> Verdict {
        self.next_check = now + self.period;
        let bytes = progress.bytes.load(Ordering::Relaxed);
        let heads = progress.heads.load(Ordering::Relaxed);
        if heads != progress.finished.load(Ordering::Relaxed) {
            self.waiting = None;
        } else if self.waiting.is_none_or(|(_, h, _)| h != heads) {
            self.waiting = Some((now, heads, bytes));
        }
        // Bytes trickling in without ever completing a head (slowloris) keep the connection
        // from being silent; they do not keep it open past the idle timeout.
        if let Some((since, _, moved)) = self.waiting {
            if bytes != moved && now.saturating_duration_since(since) >= self.limits.idle {
                return Verdict::Close("no complete request head within the idle timeout");
            }
        }
        if bytes != self.seen {
            self.seen = bytes;
            self.quiet_since = now;
            return Verdict::Fine;
        }
        let quiet = now.saturating_duration_since(self.quiet_since);
        if progress.write_blocked.load(Ordering::Relaxed) && quiet >= self.limits.send {
            return Verdict::Close("the peer stopped reading");
        }
        if quiet >= self.limits.idle * 2 {
            return Verdict::Close("silent for twice the idle timeout");
        }
        if quiet >= self.limits.idle {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

pin_project_lite::pin_project! {
    /// A connection's IO, counting what it moves.
    struct Watched<IO> {
        #[pin]
        io: IO,
        progress: Arc<Progress>,
    }
}

impl<IO: AsyncRead> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }
}

impl<IO: AsyncWrite> Watched<IO> {
    fn wrote(progress: &Progress, res: &Poll<io::Result<usize>>) {
        match res {
            Poll::Ready(Ok(n)) => {
                progress.bytes.fetch_add(*n as u64, Ordering::Relaxed);
                progress.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => progress.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(Err(_)) => {}
        }
    }
}

impl<IO: AsyncWrite> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write(cx, buf);
        Self::wrote(this.progress, &res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write_vectored(cx, bufs);
        Self::wrote(this.progress, &res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            idle: Duration::from_secs(60),
            send: Duration::from_secs(30),
            max_connections: 8,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_idle_then_stalled_and_traffic_resets_it() {
        let p = Progress::default();
        let mut w = Watchdog::new(limits());
        let t0 = Instant::now();
        assert_eq!(w.check(&p, t0 + Duration::from_secs(59)), Verdict::Fine);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(60)), Verdict::Idle);
        // A request answered starts the silence over.
        p.heads.fetch_add(1, Ordering::Relaxed);
        p.finished.fetch_add(1, Ordering::Relaxed);
        p.bytes.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(61)), Verdict::Fine);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(120)), Verdict::Fine);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(121)), Verdict::Idle);
        assert!(matches!(
            w.check(&p, t0 + Duration::from_secs(181)),
            Verdict::Close(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_trickling_in_is_closed_after_the_idle_timeout_a_request_in_flight_is_not() {
        let p = Progress::default();
        let mut w = Watchdog::new(limits());
        let t0 = Instant::now();
        // A byte of a head every 10 s: never silent, never a complete head.
        for s in (10..60).step_by(10) {
            p.bytes.fetch_add(1, Ordering::Relaxed);
            assert_eq!(w.check(&p, t0 + Duration::from_secs(s)), Verdict::Fine);
        }
        p.bytes.fetch_add(1, Ordering::Relaxed);
        assert_eq!(
            w.check(&p, t0 + Duration::from_secs(60)),
            Verdict::Close("no complete request head within the idle timeout")
        );

        // A long upload: its head arrived, its body keeps coming for minutes.
        let p = Progress::default();
        let mut w = Watchdog::new(limits());
        p.heads.fetch_add(1, Ordering::Relaxed);
        for s in (10..300).step_by(10) {
            p.bytes.fetch_add(1, Ordering::Relaxed);
            assert_eq!(w.check(&p, t0 + Duration::from_secs(s)), Verdict::Fine);
        }
        // Answered: the wait for the next head starts now.
        p.finished.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(300)), Verdict::Fine);
        p.bytes.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(359)), Verdict::Fine);
        assert!(matches!(
            w.check(&p, t0 + Duration::from_secs(360)),
            Verdict::Close(_)
        ));
    }

    #[tokio::test]
    async fn a_future_polled_only_when_woken_still_completes_when_its_signal_comes() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let n = notify.clone();
        let polls = Arc::new(AtomicU64::new(0));
        let p = polls.clone();
        let fut = OnWake::new(async move {
            p.fetch_add(1, Ordering::Relaxed);
            n.notified().await;
            p.fetch_add(1, Ordering::Relaxed);
        });
        tokio::pin!(fut);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        // Polled again without its own wake-up: the inner future is not polled.
        for _ in 0..3 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        notify.notify_waiters();
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_closed_after_the_send_timeout() {
        let p = Progress::default();
        let mut w = Watchdog::new(limits());
        let t0 = Instant::now();
        p.write_blocked.store(true, Ordering::Relaxed);
        assert_eq!(w.check(&p, t0 + Duration::from_secs(29)), Verdict::Fine);
        assert_eq!(
            w.check(&p, t0 + Duration::from_secs(30)),
            Verdict::Close("the peer stopped reading")
        );
    }
}
