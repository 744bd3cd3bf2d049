//! Proxy errors and their HTTP answers.
//!
//! Inner layers return a typed [`ProxyError`] so the retry layer can classify failures; the
//! [`ErrorResponseLayer`] turns whatever is left into a status code with a body a human can act
//! on, plus an `x-shardmesh-error` header a program can match.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderValue, Request, Response, StatusCode};
use shardmesh_api::DurationString;
use tower::{Layer, Service};

use crate::{
    body::{full, ProxyBody},
    ctx::RequestCtx,
};

/// Header naming the proxy error behind a response the sidecar generated itself.
pub const ERROR_HEADER: &str = "x-shardmesh-error";

/// Boxed future used by the stack's services.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Everything that can go wrong between receiving a request and getting response headers.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request cannot be proxied as sent.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The destination is unknown and pass-through is off, or its name does not resolve.
    #[error("no route: {0}")]
    NoRoute(String),
    /// The destination (or its shard) has no endpoints.
    #[error("no endpoints: {0}")]
    NoEndpoints(String),
    /// Every endpoint of the destination has an open circuit breaker.
    #[error("circuit open: all {endpoints} endpoint(s) of {destination} are failing and ejected; retry later")]
    CircuitOpen {
        /// Destination name.
        destination: String,
        /// Number of endpoints, all open.
        endpoints: usize,
    },
    /// The inbound bulkhead is full.
    #[error("overloaded: {max_in_flight} request(s) already in flight to the application; retry after {}s", retry_after.as_secs())]
    Shed {
        /// Configured limit.
        max_in_flight: usize,
        /// Sent as `Retry-After`.
        retry_after: Duration,
    },
    /// TCP connect to the endpoint failed: the request provably never left.
    #[error("could not connect to {endpoint}: {message}")]
    Connect {
        /// Endpoint.
        endpoint: SocketAddr,
        /// Cause.
        message: String,
    },
    /// The connection failed after the request may have been written.
    #[error("connection to {endpoint} failed before a complete response: {message}")]
    Reset {
        /// Endpoint.
        endpoint: SocketAddr,
        /// Cause.
        message: String,
    },
    /// No response headers within the per-try timeout.
    #[error("no response from {endpoint} within the per-try timeout of {}", DurationString::from_duration(*timeout))]
    PerTryTimeout {
        /// Endpoint.
        endpoint: SocketAddr,
        /// Configured per-try timeout.
        timeout: Duration,
    },
    /// The overall deadline expired (retries and backoff included).
    #[error("request to {destination} exceeded its overall deadline of {} after {attempts} attempt(s)", DurationString::from_duration(*timeout))]
    Deadline {
        /// Destination name or authority.
        destination: String,
        /// Configured deadline.
        timeout: Duration,
        /// Attempts made before it expired.
        attempts: u32,
    },
    /// Reading the request body from the client failed.
    #[error("could not read the request body: {0}")]
    RequestBody(String),
    /// The key belongs to another shard under this sidecar's shard map: the request was not
    /// processed (421, so a calling sidecar retries it on the owner whatever its method).
    #[error("the key belongs to shard {owner} under shard-map epoch {epoch}, not to this shard ({shard}); send it to shard {owner}")]
    Misdirected {
        /// This pod's shard.
        shard: u32,
        /// The owning shard.
        owner: u32,
        /// This sidecar's map epoch.
        epoch: i64,
    },
    /// During a handoff window, the key's previous owner could not answer for it.
    #[error("handoff to the previous owner of the key failed: {0}; retry")]
    Handoff(String),
}

impl ProxyError {
    /// The status code answered to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::Handoff(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoRoute(_) | ProxyError::Connect { .. } | ProxyError::Reset { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::NoEndpoints(_)
            | ProxyError::CircuitOpen { .. }
            | ProxyError::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::PerTryTimeout { .. } | ProxyError::Deadline { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// Short machine-readable code (header `x-shardmesh-error`, access-log `error`).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::NoRoute(_) => "no-route",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::CircuitOpen { .. } => "circuit-open",
            ProxyError::Shed { .. } => "shed",
            ProxyError::Connect { .. } => "connect-failure",
            ProxyError::Reset { .. } => "reset",
            ProxyError::PerTryTimeout { .. } => "per-try-timeout",
            ProxyError::Deadline { .. } => "deadline-exceeded",
            ProxyError::RequestBody(_) => "request-body",
            ProxyError::Misdirected { .. } => shardmesh_api::headers::MISDIRECTED,
            ProxyError::Handoff(_) => "handoff-failed",
        }
    }

    /// The response for this error: status, a one-line text body, and `Retry-After` where a
    /// client should back off.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let retry_after = match &self {
            ProxyError::Shed { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            ProxyError::CircuitOpen { .. } | ProxyError::Handoff(_) => Some(1),
            _ => None,
        };
        let misdirected = match &self {
            ProxyError::Misdirected { owner, epoch, .. } => Some((*owner, *epoch)),
            _ => None,
        };
        let code = self.code();
        let mut resp = Response::new(full(format!("shardmesh-sidecar: {self}\n")));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(code));
        if let Some(secs) = retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some((owner, epoch)) = misdirected {
            use shardmesh_api::headers::{EPOCH, OWNER};
            h.insert(EPOCH, HeaderValue::from(epoch));
            h.insert(OWNER, HeaderValue::from(owner));
        }
        resp
    }
}

/// Turns [`ProxyError`]s of the inner stack into responses.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorResponseLayer;

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse { inner }
    }
}

/// See [`ErrorResponseLayer`].
#[derive(Clone, Debug)]
pub struct ErrorResponse<S> {
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for ErrorResponse<S>
where
    S: Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = ProxyError,
        Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
    >,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let ctx = RequestCtx::from_extensions(req.extensions());
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => Ok(resp),
                Err(e) => {
                    ctx.lock().error = Some(e.code());
                    Ok(e.into_response())
                }
            }
        })
    }
}
