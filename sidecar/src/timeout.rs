//! Timeouts: the overall deadline (outermost; bounds every retry and backoff) and the per-try
//! timeout (innermost; bounds one attempt until response headers). The connect timeout lives in
//! the client's connector. Each answers 504 with a body naming the limit that was hit.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{
    body::ProxyBody,
    ctx::RequestCtx,
    errors::{BoxFuture, ProxyError},
};

/// Bounds the whole request.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    overall: Duration,
}

impl DeadlineLayer {
    /// A deadline of `overall` from the moment the request enters the layer.
    pub fn new(overall: Duration) -> Self {
        DeadlineLayer { overall }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            overall: self.overall,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
    overall: Duration,
}

impl<S> Service<Request<ProxyBody>> for DeadlineService<S>
where
    S: Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = ProxyError,
        Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
    >,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ProxyBody>) -> Self::Future {
        let deadline = Instant::now() + self.overall;
        let ctx = RequestCtx::of(&mut req);
        ctx.lock().deadline = Some(deadline);
        // Kept (shared, not copied) only to name the request should the deadline expire.
        let authority = req.uri().authority().cloned();
        let host = req.headers().get(http::header::HOST).cloned();
        let timeout = self.overall;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let deadline_error = || {
                let r = ctx.lock();
                let destination = match (&r.destination, &authority, &host) {
                    (Some(d), _, _) => d.to_string(),
                    (None, Some(a), _) => a.to_string(),
                    (None, None, Some(h)) => String::from_utf8_lossy(h.as_bytes()).into_owned(),
                    (None, None, None) => String::new(),
                };
                ProxyError::Deadline {
                    destination,
                    timeout,
                    attempts: r.attempts,
                }
            };
            match tokio::time::timeout_at(deadline, fut).await {
                // A per-try timeout that expires together with the deadline (same timer tick,
                // or the per-try limit capped by it) is reported as what it is: the deadline.
                Ok(Err(ProxyError::PerTryTimeout { .. })) if Instant::now() >= deadline => {
                    Err(deadline_error())
                }
                Ok(result) => result,
                Err(_) => Err(deadline_error()),
            }
        })
    }
}

/// Bounds one attempt, until its response headers.
#[derive(Clone, Copy, Debug)]
pub struct PerTryTimeoutLayer {
    per_try: Duration,
}

impl PerTryTimeoutLayer {
    /// Each attempt gets `per_try`.
    pub fn new(per_try: Duration) -> Self {
        PerTryTimeoutLayer { per_try }
    }
}

impl<S> Layer<S> for PerTryTimeoutLayer {
    type Service = PerTryTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PerTryTimeout {
            inner,
            per_try: self.per_try,
        }
    }
}

/// See [`PerTryTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct PerTryTimeout<S> {
    inner: S,
    per_try: Duration,
}

impl<S> Service<Request<ProxyBody>> for PerTryTimeout<S>
where
    S: Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = ProxyError,
        Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
    >,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let authority = req.uri().authority().cloned();
        let timeout = self.per_try;
        // No attempt outlives the overall deadline.
        let deadline = req
            .extensions()
            .get::<RequestCtx>()
            .and_then(|c| c.lock().deadline);
        let until = match deadline {
            Some(d) => d.min(Instant::now() + timeout),
            None => Instant::now() + timeout,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(until, fut).await {
                Ok(result) => result,
                Err(_) => Err(ProxyError::PerTryTimeout {
                    endpoint: crate::client::endpoint_of(authority.as_ref()),
                    timeout,
                }),
            }
        })
    }
}
