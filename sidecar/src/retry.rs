//! Retries: which failures, for which requests, how often and when.
//!
//! Order of decisions after a failed attempt (first "no" wins and the failure is returned):
//! 1. the failure class is in `retryOn` (connect failure, reset, per-try timeout as 504, 429,
//!    502, 503, 504);
//! 2. the request is safe to repeat: a connect failure never reached the upstream, so anything
//!    may be retried; otherwise the request must be idempotent (GET, HEAD, OPTIONS, TRACE, PUT,
//!    DELETE unless marked `x-shardmesh-idempotent: false`; POST/PATCH/others only with an
//!    `Idempotency-Key` header or `x-shardmesh-idempotent: true`);
//! 3. its body was buffered for replay (at most `maxReplayBodyBytes`; larger bodies stream
//!    through once);
//! 4. attempts remain (`maxAttempts`);
//! 5. the wait — full-jitter exponential backoff, or `Retry-After` if longer — ends before the
//!    overall deadline;
//! 6. the retry budget has room.
//!
//! The next attempt is picked by the balancer, which avoids endpoints already tried.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{
    header::HeaderName, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body::Body as _;
use http_body_util::BodyExt;
use rand::Rng;
use shardmesh_api::v1alpha1::RetryOn;
use tower::{Layer, Service};

use crate::{
    body::{full, Prefixed, ProxyBody},
    budget::RetryBudget,
    ctx::RequestCtx,
    errors::{BoxFuture, ProxyError},
    metrics::Metrics,
};

/// Header by which an application marks a request (non-)idempotent: `true` or `false`. Removed
/// before the request is forwarded.
pub const IDEMPOTENT_HEADER: HeaderName = HeaderName::from_static("x-shardmesh-idempotent");

/// Header that makes a non-idempotent request safe to retry (the upstream deduplicates it).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// `retry_stop` of a request whose retry the budget refused (counted per destination too).
pub const BUDGET_EXHAUSTED: &str = "budget-exhausted";

/// Longest `Retry-After` honoured; longer values are treated as "do not retry".
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The request as the retry layer kept it for replay, handed back in the extensions of a 421
/// response, so the layer above can send it again without keeping a copy of its own.
#[derive(Clone, Debug)]
pub struct Resend {
    /// Method, URI, headers (as received, hop-by-hop ones removed) and extensions.
    pub parts: http::request::Parts,
    /// The complete body.
    pub body: Bytes,
}

/// What every attempt after the first is made from: the request head without its extensions
/// (only the request's context travels there, and each attempt is given it), so the copy kept
/// for replay is the headers and the URI, not a map of boxed values too.
#[derive(Clone)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn of(parts: &http::request::Parts) -> Head {
        Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    /// The head as request parts again, carrying `ctx`.
    fn into_parts(self, ctx: &RequestCtx) -> http::request::Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = self.version;
        parts.headers = self.headers;
        parts.extensions.insert(ctx.clone());
        parts
    }

    /// A copy of the request for one more attempt.
    fn request(&self, ctx: &RequestCtx, body: ProxyBody) -> Request<ProxyBody> {
        Request::from_parts(self.clone().into_parts(ctx), body)
    }
}

/// `result`, carrying the kept request when it is a 421 (a request never processed, which the
/// layer above may send to the right shard).
fn hand_back(
    mut result: Result<Response<ProxyBody>, ProxyError>,
    head: Head,
    ctx: &RequestCtx,
    body: Bytes,
    idempotent: Option<HeaderValue>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if let Ok(resp) = &mut result {
        if resp.status() == StatusCode::MISDIRECTED_REQUEST {
            let mut parts = head.into_parts(ctx);
            if let Some(v) = idempotent {
                parts.headers.insert(IDEMPOTENT_HEADER, v);
            }
            resp.extensions_mut().insert(Resend { parts, body });
        }
    }
    result
}

/// Retry parameters (from `resilience.retries`).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts including the first.
    pub max_attempts: u32,
    /// First backoff cap.
    pub base_backoff: Duration,
    /// Backoff cap.
    pub max_backoff: Duration,
    /// Failure classes retried.
    pub retry_on: Vec<RetryOn>,
    /// Largest body buffered for replay.
    pub max_replay_body_bytes: usize,
}

/// Why an attempt failed in a retryable way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// TCP connect failed.
    ConnectFailure,
    /// The connection broke before a complete response.
    Reset,
    /// The per-try timeout expired.
    PerTryTimeout,
    /// 429.
    TooManyRequests,
    /// 502.
    BadGateway,
    /// 503.
    ServiceUnavailable,
    /// 504 from the upstream.
    GatewayTimeout,
}

impl RetryReason {
    /// All reasons, for metrics.
    pub const ALL: [RetryReason; 7] = [
        RetryReason::ConnectFailure,
        RetryReason::Reset,
        RetryReason::PerTryTimeout,
        RetryReason::TooManyRequests,
        RetryReason::BadGateway,
        RetryReason::ServiceUnavailable,
        RetryReason::GatewayTimeout,
    ];

    /// Name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ConnectFailure => "connect-failure",
            RetryReason::Reset => "reset",
            RetryReason::PerTryTimeout => "per-try-timeout",
            RetryReason::TooManyRequests => "429",
            RetryReason::BadGateway => "502",
            RetryReason::ServiceUnavailable => "503",
            RetryReason::GatewayTimeout => "504",
        }
    }

    /// Position in [`RetryReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `retryOn` entry enabling this reason.
    pub fn retry_on(self) -> RetryOn {
        match self {
            RetryReason::ConnectFailure => RetryOn::ConnectFailure,
            RetryReason::Reset => RetryOn::Reset,
            RetryReason::PerTryTimeout | RetryReason::GatewayTimeout => RetryOn::GatewayTimeout,
            RetryReason::TooManyRequests => RetryOn::TooManyRequests,
            RetryReason::BadGateway => RetryOn::BadGateway,
            RetryReason::ServiceUnavailable => RetryOn::ServiceUnavailable,
        }
    }

    /// Whether the upstream may have received the request.
    pub fn may_have_reached(self) -> bool {
        self != RetryReason::ConnectFailure
    }
}

/// The retryable failure class of an attempt's result, if any.
pub fn classify(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<RetryReason> {
    match result {
        Ok(resp) => match resp.status() {
            StatusCode::TOO_MANY_REQUESTS => Some(RetryReason::TooManyRequests),
            StatusCode::BAD_GATEWAY => Some(RetryReason::BadGateway),
            StatusCode::SERVICE_UNAVAILABLE => Some(RetryReason::ServiceUnavailable),
            StatusCode::GATEWAY_TIMEOUT => Some(RetryReason::GatewayTimeout),
            _ => None,
        },
        Err(ProxyError::Connect { .. }) => Some(RetryReason::ConnectFailure),
        Err(ProxyError::Reset { .. }) => Some(RetryReason::Reset),
        Err(ProxyError::PerTryTimeout { .. }) => Some(RetryReason::PerTryTimeout),
        Err(_) => None,
    }
}

/// Whether repeating the request is harmless once it may have reached the upstream.
pub fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    idempotent_given(method, headers.get(&IDEMPOTENT_HEADER), headers)
}

/// [`is_idempotent`] with the marking header's value already taken out of `headers`.
fn idempotent_given(method: &Method, marked: Option<&HeaderValue>, headers: &HeaderMap) -> bool {
    if let Some(v) = marked.and_then(|v| v.to_str().ok()).map(str::trim) {
        if v.eq_ignore_ascii_case("true") {
            return true;
        }
        if v.eq_ignore_ascii_case("false") {
            return false;
        }
    }
    if headers.contains_key(&IDEMPOTENCY_KEY) {
        return true;
    }
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Full-jitter backoff before retry number `retry` (1 for the first retry): uniform in
/// [0, min(max, base · 2^(retry-1))]. `unit` is a uniform sample in [0, 1).
pub fn backoff(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    shardmesh_api::backoff::full_jitter(base, max, retry, unit)
}

/// `Retry-After` as delta-seconds. HTTP-date values are ignored (the backoff applies): clocks
/// of pods are not trusted to agree.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: u64 = v.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// A request body, buffered for replay or not.
pub enum Replay {
    /// Complete body, cheap to clone per attempt.
    Buffered(Bytes),
    /// Too large to buffer: sent once.
    Streaming(ProxyBody),
}

/// Reads `body` into memory up to `limit` bytes. Larger bodies come back as a stream that
/// replays what was read and continues with the rest, so nothing is lost and memory stays
/// bounded. Trailers of buffered bodies are dropped (HTTP/1 clients practically never send them).
pub async fn buffer(mut body: ProxyBody, limit: usize) -> Result<Replay, ProxyError> {
    if body.is_end_stream() {
        return Ok(Replay::Buffered(Bytes::new()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(Replay::Streaming(body));
    }
    let mut buf = BytesMut::new();
    // A body that arrives as one frame (every body a layer above already buffered, and most
    // small ones) is kept as it is, without a copy.
    if let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::RequestBody(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if body.is_end_stream() && data.len() <= limit {
                return Ok(Replay::Buffered(data));
            }
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                let rest = Prefixed::new(buf.freeze(), body);
                return Ok(Replay::Streaming(rest.boxed_unsync()));
            }
        }
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::RequestBody(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                let rest = Prefixed::new(buf.freeze(), body);
                return Ok(Replay::Streaming(rest.boxed_unsync()));
            }
        }
    }
    Ok(Replay::Buffered(buf.freeze()))
}

/// Why a retryable failure was returned instead of retried.
fn stop_reason(
    policy: &RetryPolicy,
    reason: RetryReason,
    idempotent: bool,
    attempt: u32,
) -> Option<&'static str> {
    if !policy.retry_on.contains(&reason.retry_on()) {
        return Some("not-in-retry-on");
    }
    if reason.may_have_reached() && !idempotent {
        return Some("non-idempotent");
    }
    if attempt >= policy.max_attempts {
        return Some("max-attempts");
    }
    None
}

/// Retries failed attempts; see the module docs.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    budget: Arc<RetryBudget>,
    metrics: Arc<Metrics>,
}

impl RetryLayer {
    /// Retries by `policy`, bounded by `budget`.
    pub fn new(policy: RetryPolicy, budget: Arc<RetryBudget>, metrics: Arc<Metrics>) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
            budget,
            metrics,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Service<Request<ProxyBody>> for Retry<S>
where
    S: Service<
            Request<ProxyBody>,
            Response = Response<ProxyBody>,
            Error = ProxyError,
            Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // The balancer below is always ready; each attempt calls a fresh clone of it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let RetryLayer {
                policy,
                budget,
                metrics,
            } = this.layer;
            let (mut parts, body) = req.into_parts();
            // The marking header is for this sidecar only: taken out, and read from there.
            let marked = parts.headers.remove(&IDEMPOTENT_HEADER);
            let idempotent = idempotent_given(&parts.method, marked.as_ref(), &parts.headers);
            let ctx = RequestCtx::from_extensions(&parts.extensions);
            let (deadline, may_redirect) = {
                let r = ctx.lock();
                (r.deadline, r.may_redirect)
            };
            budget.deposit();

            // A request the resolve step may send again after a 421 is kept (and handed back
            // in `Resend`) even for a single attempt.
            let keep = policy.max_attempts > 1 || may_redirect;
            let replay = if keep {
                buffer(body, policy.max_replay_body_bytes).await?
            } else {
                Replay::Streaming(body)
            };
            let bytes = match replay {
                Replay::Buffered(bytes) => bytes,
                Replay::Streaming(body) => {
                    ctx.lock().attempts = 1;
                    metrics.upstream_attempt();
                    let mut inner = this.inner.clone();
                    return inner.call(Request::from_parts(parts, body)).await;
                }
            };
            ctx.lock().request_bytes = Some(bytes.len() as u64);

            // The first attempt is the request itself; the copy is kept for the others.
            let head = Head::of(&parts);
            let mut first = Some(parts);
            let mut attempt = 1u32;
            loop {
                ctx.lock().attempts = attempt;
                metrics.upstream_attempt();
                let body = full(bytes.clone());
                let req = match first.take() {
                    Some(parts) => Request::from_parts(parts, body),
                    None => head.request(&ctx, body),
                };
                let mut inner = this.inner.clone();
                let result = inner.call(req).await;
                let Some(reason) = classify(&result) else {
                    return hand_back(result, head, &ctx, bytes, marked);
                };
                if let Some(why) = stop_reason(&policy, reason, idempotent, attempt) {
                    ctx.lock().retry_stop = Some(why);
                    return result;
                }
                let unit: f64 = rand::rng().random();
                let mut wait = backoff(policy.base_backoff, policy.max_backoff, attempt, unit);
                if let Ok(resp) = &result {
                    match retry_after(resp.headers()) {
                        Some(ra) if ra > MAX_RETRY_AFTER => {
                            ctx.lock().retry_stop = Some("retry-after-too-long");
                            return result;
                        }
                        Some(ra) => wait = wait.max(ra),
                        None => {}
                    }
                }
                if let Some(deadline) = deadline {
                    if tokio::time::Instant::now() + wait >= deadline {
                        ctx.lock().retry_stop = Some("deadline");
                        return result;
                    }
                }
                if !budget.try_withdraw() {
                    metrics.budget_exhausted();
                    ctx.lock().retry_stop = Some(BUDGET_EXHAUSTED);
                    return result;
                }
                // The failed attempt's response (and its connection) is released before waiting.
                drop(result);
                metrics.retry(reason);
                ctx.lock().retry_reasons.push(reason.as_str());
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_exponential_cap() {
        let base = Duration::from_millis(25);
        let max = Duration::from_secs(1);
        assert_eq!(backoff(base, max, 1, 0.0), Duration::ZERO);
        assert_eq!(backoff(base, max, 1, 0.999_999).as_millis(), 24);
        assert!(backoff(base, max, 3, 0.999_999) <= Duration::from_millis(100));
        assert!(backoff(base, max, 3, 0.999_999) > Duration::from_millis(99));
        assert!(backoff(base, max, 30, 0.999_999) <= max);
        assert!(backoff(base, max, u32::MAX, 0.5) <= max);
    }

    #[test]
    fn idempotency_rules() {
        let h = HeaderMap::new();
        assert!(is_idempotent(&Method::GET, &h));
        assert!(is_idempotent(&Method::PUT, &h));
        assert!(!is_idempotent(&Method::POST, &h));
        assert!(!is_idempotent(&Method::PATCH, &h));
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY, "k1".parse().unwrap());
        assert!(is_idempotent(&Method::POST, &keyed));
        let mut marked = HeaderMap::new();
        marked.insert(IDEMPOTENT_HEADER, "false".parse().unwrap());
        assert!(!is_idempotent(&Method::PUT, &marked));
    }

    #[test]
    fn retry_after_delta_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn post_is_retried_only_when_it_never_left() {
        let p = RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            retry_on: RetryOn::DEFAULT.to_vec(),
            max_replay_body_bytes: 10,
        };
        assert_eq!(stop_reason(&p, RetryReason::ConnectFailure, false, 1), None);
        assert_eq!(
            stop_reason(&p, RetryReason::Reset, false, 1),
            Some("non-idempotent")
        );
        assert_eq!(
            stop_reason(&p, RetryReason::Reset, true, 3),
            Some("max-attempts")
        );
    }

    #[tokio::test]
    async fn buffer_is_bounded() {
        let small = buffer(full("hello"), 5).await.unwrap();
        assert!(matches!(small, Replay::Buffered(b) if b == "hello"));
        let big = buffer(full("hello!"), 5).await.unwrap();
        let Replay::Streaming(body) = big else {
            panic!("a 6-byte body must not be buffered with a 5-byte limit")
        };
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello!");
    }
}
