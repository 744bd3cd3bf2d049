//! Inbound proxy: Services target the sidecar's inbound port; it forwards to the application on
//! 127.0.0.1:`port`, behind a bulkhead.
//!
//! The bulkhead sheds instead of queueing: past `maxInFlight` requests the sidecar answers 503
//! with `Retry-After` at once. A queue would only add latency to requests whose callers are
//! already timing out, and the caller's sidecar retries a 503 on another replica.
//! No retries here: the application is the only endpoint, and the caller's sidecar owns retries.
//!
//! A slot of the bulkhead is a slot of the application, so a client must not be able to hold
//! one by being slow: small request bodies are read in full before the request takes a slot
//! ([`PREREAD_BODY_BYTES`]), and every request has a deadline (the policy's overall timeout:
//! the caller's sidecar has given up by then anyway). Slow or silent connections themselves are
//! bounded by [`crate::server`].

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{uri::PathAndQuery, Request, Response, Uri};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceBuilder};

use http_body::Body as _;
use http_body_util::BodyExt as _;

use crate::{
    access_log::{AccessLogConfig, AccessLogLayer, LoggedBody},
    body::{boxed, Guarded, ProxyBody},
    client::Upstream,
    ctx::RequestCtx,
    errors::{BoxFuture, ErrorResponseLayer, ProxyError},
    headers::strip_hop_by_hop,
    leader::RoleState,
    metrics::{Direction, Metrics},
    ownership::{Ownership, OwnershipLayer},
    timeout::DeadlineLayer,
};

/// Settings of the inbound side.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// The application's address (127.0.0.1:`--app-port`).
    pub app: SocketAddr,
    /// Bulkhead size.
    pub max_in_flight: usize,
    /// `Retry-After` sent with shed responses.
    pub shed_retry_after: Duration,
    /// Connect timeout to the application.
    pub connect_timeout: Duration,
    /// Deadline of a request, from its head arriving to the application's response head.
    pub deadline: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Access-log switches.
    pub access_log: AccessLogConfig,
    /// This pod's leader role, told to the application on every request when the service
    /// elects leaders.
    pub role: Option<RoleState>,
    /// Key ownership by the shard map of the pod's own service, when it is a shard member.
    pub ownership: Option<Ownership>,
}

/// The inbound request path, top to bottom.
pub fn stack(
    i: &Inbound,
) -> impl Service<
    Request<ProxyBody>,
    Response = Response<LoggedBody>,
    Error = Infallible,
    Future = BoxFuture<Result<Response<LoggedBody>, Infallible>>,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        // One JSON line per request.
        .layer(AccessLogLayer::new(
            Direction::Inbound,
            i.access_log,
            i.metrics.clone(),
        ))
        // Proxy errors become responses (503 + Retry-After when shed).
        .layer(ErrorResponseLayer)
        // The whole request, body reading and the application included (504 after).
        .layer(DeadlineLayer::new(i.deadline))
        // Small bodies arrive in full before the request takes a slot of the application.
        .layer(PrereadLayer)
        // Bulkhead: at most max_in_flight requests reach the application; the rest are shed.
        .layer(ShedLayer::new(
            i.max_in_flight,
            i.shed_retry_after,
            i.metrics.clone(),
        ))
        // This shard's keys only (421 with the owner otherwise); handoff reads and deletes
        // during a resharding window; the pod's shard, shard count and epoch told to the app.
        .layer(OwnershipLayer::new(i.ownership.clone()))
        // Forward to the application.
        .service(ToApp {
            app: i.app,
            client: Upstream::new(i.connect_timeout),
            role: i.role.clone(),
        })
}

/// Request bodies declaring at most this many bytes are read in full before the request takes a
/// bulkhead slot, so a client that declares a body and sends it slowly, or never, holds a
/// connection (bounded by [`crate::server`]) and not a slot of the application. Larger bodies
/// stream, as a proxy must.
pub const PREREAD_BODY_BYTES: u64 = 64 * 1024;

/// See [`PREREAD_BODY_BYTES`].
#[derive(Clone, Copy, Debug)]
pub struct PrereadLayer;

impl<S> Layer<S> for PrereadLayer {
    type Service = Preread<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Preread { inner }
    }
}

/// See [`PrereadLayer`].
#[derive(Clone, Debug)]
pub struct Preread<S> {
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for Preread<S>
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let small = req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n > 0 && n <= PREREAD_BODY_BYTES);
        if !small {
            return self.inner.call(req);
        }
        // The instance made ready goes with the request; this one takes its place.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // Bounded by the declared length, which hyper enforces.
            let collected = body
                .collect()
                .await
                .map_err(|e| ProxyError::RequestBody(e.to_string()))?;
            inner
                .call(Request::from_parts(parts, boxed(collected)))
                .await
        })
    }
}

/// Concurrency limit that rejects instead of waiting.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    retry_after: Duration,
    metrics: Arc<Metrics>,
}

impl ShedLayer {
    /// Admits `max_in_flight` requests at once.
    pub fn new(max_in_flight: usize, retry_after: Duration, metrics: Arc<Metrics>) -> Self {
        ShedLayer {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            retry_after,
            metrics,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

impl<S> Service<Request<ProxyBody>> for Shed<S>
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
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            self.layer.metrics.shed();
            let err = ProxyError::Shed {
                max_in_flight: self.layer.max_in_flight,
                retry_after: self.layer.retry_after,
            };
            return Box::pin(async move { Err(err) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // The permit is released when the response body is done, not at its headers.
            Ok(resp.map(|b| Guarded::wrap(b, permit)))
        })
    }
}

/// Sends the request to the application, with this pod's role headers when it has a role.
#[derive(Clone, Debug)]
pub struct ToApp {
    app: SocketAddr,
    client: Upstream,
    role: Option<RoleState>,
}

impl Service<Request<ProxyBody>> for ToApp {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ProxyBody>) -> Self::Future {
        let ctx = RequestCtx::from_extensions(req.extensions());
        {
            let mut r = ctx.lock();
            r.attempts = 1;
            r.tried.push(self.app);
        }
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.app.to_string())
            .path_and_query(pq)
            .build();
        let mut client = self.client.clone();
        let role = self.role.clone();
        Box::pin(async move {
            *req.uri_mut() =
                uri.map_err(|e| ProxyError::BadRequest(format!("cannot build the app URI: {e}")))?;
            strip_hop_by_hop(req.headers_mut());
            if let Some(role) = &role {
                role.annotate(req.headers_mut());
            }
            let mut resp = client.call(req).await?;
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        })
    }
}
