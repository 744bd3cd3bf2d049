//! Outbound proxy: the application sends requests through the sidecar, either as an explicit
//! HTTP proxy (absolute-form `GET http://orders:8080/x`, what clients honouring `HTTP_PROXY`
//! send) or to the fixed local port with a `Host` header.
//!
//! [`stack`] is the whole request path, outermost first.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderName, HeaderValue, Method, Request, Response};
use tower::{Layer, Service, ServiceBuilder};

use crate::{
    access_log::{AccessLogConfig, AccessLogLayer, LoggedBody},
    balance::{BalanceLayer, Endpoints, Targets},
    body::full,
    body::ProxyBody,
    budget::RetryBudget,
    client::Upstream,
    config::Policy,
    ctx::RequestCtx,
    discovery::{normalized, wait_for_epoch, Destination, DestinationKind, Discover},
    errors::{BoxFuture, ErrorResponseLayer, ProxyError},
    headers::strip_hop_by_hop,
    metrics::{Direction, Metrics},
    retry::{buffer, Replay, Resend, RetryLayer},
    timeout::{DeadlineLayer, PerTryTimeoutLayer},
};

use shardmesh_api::headers::FENCING_EPOCH;
pub use shardmesh_api::headers::{EPOCH as EPOCH_HEADER, SHARD as SHARD_HEADER};

/// The routing headers set on every sharded request, parsed once.
const SHARD: HeaderName = HeaderName::from_static(SHARD_HEADER);
const EPOCH: HeaderName = HeaderName::from_static(EPOCH_HEADER);
const FENCING: HeaderName = HeaderName::from_static(FENCING_EPOCH);

/// Shared state of the outbound side.
#[derive(Clone)]
pub struct Outbound {
    /// Where destinations come from.
    pub discovery: Arc<dyn Discover>,
    /// Resolve unknown hosts with DNS and proxy them with the same resilience.
    pub passthrough: bool,
    /// Resilience policy.
    pub policy: Policy,
    /// Per-endpoint balancer and breaker state.
    pub endpoints: Arc<Endpoints>,
    /// Retry budget.
    pub budget: Arc<RetryBudget>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Access-log switches.
    pub access_log: AccessLogConfig,
}

/// The outbound request path, top to bottom.
pub fn stack(
    o: &Outbound,
) -> impl Service<
    Request<ProxyBody>,
    Response = Response<LoggedBody>,
    Error = Infallible,
    Future = BoxFuture<Result<Response<LoggedBody>, Infallible>>,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        // One JSON line per request, written when the response body ends.
        .layer(AccessLogLayer::new(
            Direction::Outbound,
            o.access_log,
            o.metrics.clone(),
        ))
        // Proxy errors become 4xx/5xx with a body naming the cause.
        .layer(ErrorResponseLayer)
        // The overall deadline bounds everything below, retries and backoff included (504).
        .layer(DeadlineLayer::new(o.policy.overall))
        // Authority → destination → (shard →) candidate endpoints; a peer's 421 (key of
        // another shard under a newer map) is followed once, to the owning shard.
        .layer(
            ResolveLayer::new(o.discovery.clone(), o.passthrough, o.policy.connect)
                .with_redirects(o.policy.retry.max_replay_body_bytes, o.metrics.clone()),
        )
        // Replay buffer, idempotency rules, backoff, Retry-After, retry budget.
        .layer(RetryLayer::new(
            o.policy.retry.clone(),
            o.budget.clone(),
            o.metrics.clone(),
        ))
        // P2C peak-EWMA among endpoints whose breaker admits; breaker bookkeeping.
        .layer(BalanceLayer::new(
            o.endpoints.clone(),
            o.policy.max_ejection_percent,
            o.metrics.clone(),
        ))
        // One attempt gets at most the per-try timeout until response headers (504).
        .layer(PerTryTimeoutLayer::new(o.policy.per_try))
        // Pooled HTTP client with the connect timeout.
        .service(Upstream::new(o.policy.connect))
}

/// Longest wait for this sidecar's map after a peer answered 421 from a newer one.
pub const REDIRECT_WAIT: Duration = Duration::from_secs(2);

/// Finds the candidate endpoints of a request.
#[derive(Clone)]
pub struct ResolveLayer {
    discovery: Arc<dyn Discover>,
    passthrough: bool,
    dns_timeout: Duration,
    /// Largest request body kept to resend after a 421; 0 never resends.
    redirect_body_limit: usize,
    metrics: Arc<Metrics>,
}

impl ResolveLayer {
    /// Resolves through `discovery`; unknown hosts through DNS when `passthrough`.
    pub fn new(discovery: Arc<dyn Discover>, passthrough: bool, dns_timeout: Duration) -> Self {
        ResolveLayer {
            discovery,
            passthrough,
            dns_timeout,
            redirect_body_limit: 0,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Follows a peer sidecar's 421 once for requests to sharded destinations whose body is at
    /// most `body_limit` bytes (kept to resend; a 421 was not processed, so any method may be
    /// sent again).
    pub fn with_redirects(mut self, body_limit: usize, metrics: Arc<Metrics>) -> Self {
        self.redirect_body_limit = body_limit;
        self.metrics = metrics;
        self
    }
}

/// A peer sidecar's 421 for a key of another shard: (its map epoch, the owner it named).
fn misdirected(resp: &Response<ProxyBody>) -> Option<(i64, u32)> {
    use shardmesh_api::headers::{MISDIRECTED, OWNER};
    if resp.status() != http::StatusCode::MISDIRECTED_REQUEST
        || resp.headers().get(crate::errors::ERROR_HEADER)?.as_bytes() != MISDIRECTED.as_bytes()
    {
        return None;
    }
    let text = |h: &str| resp.headers().get(h)?.to_str().ok();
    Some((
        text(EPOCH_HEADER)?.parse().ok()?,
        text(OWNER)?.parse().ok()?,
    ))
}

impl<S> Layer<S> for ResolveLayer {
    type Service = Resolve<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Resolve {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ResolveLayer`].
#[derive(Clone)]
pub struct Resolve<S> {
    inner: S,
    layer: ResolveLayer,
}

/// The authority a request is for, as the `Host` value sent upstream: the absolute-form URI's,
/// else the `Host` header (shared, not copied).
fn request_authority(req: &Request<ProxyBody>) -> Result<HeaderValue, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT tunnels are not supported; send plain http:// requests through the proxy (TLS to the destination is not proxied)".into(),
        ));
    }
    if let Some(scheme) = req.uri().scheme_str() {
        if scheme != "http" {
            return Err(ProxyError::BadRequest(format!(
                "{scheme}:// destinations are not proxied; send http:// requests through the sidecar"
            )));
        }
    }
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str())
            .map_err(|_| ProxyError::BadRequest(format!("{:?} is not a valid Host", a.as_str())));
    }
    req.headers().get(header::HOST).cloned().ok_or_else(|| {
        ProxyError::BadRequest(
            "no destination: send absolute-form URIs (set HTTP_PROXY) or a Host header".into(),
        )
    })
}

/// Picks the endpoints of `dest` for this request, setting shard headers and context. `owner`
/// overrides the key's shard (a peer with a newer map named it).
fn targets_of(
    dest: &Destination,
    req: &mut Request<ProxyBody>,
    ctx: &RequestCtx,
    owner: Option<u32>,
) -> Result<Arc<[SocketAddr]>, ProxyError> {
    match &dest.kind {
        DestinationKind::Endpoints(addrs) => Ok(addrs.clone()),
        DestinationKind::Sharded {
            header,
            epoch,
            count,
            shards,
            leaders,
            ..
        } => {
            let key = req.headers().get(header).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "{} is sharded: set the {header} header to the request's shard key",
                    dest.name
                ))
            })?;
            let shard = owner
                .unwrap_or_else(|| shardmesh_api::routing::shard_for_key(key.as_bytes(), *count));
            {
                let mut r = ctx.lock();
                r.shard = Some(shard);
                r.epoch = Some(*epoch);
            }
            req.headers_mut()
                .insert(SHARD, crate::headers::number(shard.into()));
            req.headers_mut()
                .insert(EPOCH, crate::headers::number(*epoch));
            // Writes to a service that elects leaders go to the shard's leader only, fenced
            // with its epoch; the leader's application compares it with its own.
            if let Some(l) = leaders.as_deref() {
                if l.writes.is_write(req.method(), req.headers()) {
                    return match l.leaders.get(shard as usize).cloned().flatten() {
                        Some((leader, leader_epoch)) => {
                            req.headers_mut()
                                .insert(FENCING, HeaderValue::from(leader_epoch));
                            Ok(leader)
                        }
                        None => Err(ProxyError::NoEndpoints(format!(
                            "shard {shard} of {} has no leader for this write (an election is \
                             in progress or no member is ready); retry shortly",
                            dest.name
                        ))),
                    };
                }
            }
            let members = shards.get(shard as usize).cloned().unwrap_or_default();
            if members.is_empty() {
                return Err(ProxyError::NoEndpoints(format!(
                    "shard {shard} of {} has no live members",
                    dest.name
                )));
            }
            Ok(members)
        }
    }
}

impl<S> Service<Request<ProxyBody>> for Resolve<S>
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
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let ctx = RequestCtx::of(&mut req);
            // Upstreams see the authority the application asked for.
            let host = request_authority(&req)?;
            let normal = host.to_str().ok().and_then(normalized).ok_or_else(|| {
                ProxyError::BadRequest(format!("{host:?} is not a valid host[:port]"))
            })?;
            let dest = this.layer.discovery.lookup(&normal);
            // A known destination's name is shared, not copied.
            let name: Arc<str> = match &dest {
                Some(d) => d.name.clone(),
                None => normal.into(),
            };
            ctx.lock().destination = Some(name.clone());
            let addrs = match &dest {
                Some(dest) => targets_of(dest, &mut req, &ctx, None)?,
                None if this.layer.passthrough => {
                    let lookup = tokio::net::lookup_host(name.to_string());
                    match tokio::time::timeout(this.layer.dns_timeout, lookup).await {
                        Ok(Ok(addrs)) => addrs.collect::<Vec<_>>().into(),
                        Ok(Err(e)) => {
                            return Err(ProxyError::NoRoute(format!("cannot resolve {name}: {e}")))
                        }
                        Err(_) => {
                            return Err(ProxyError::NoRoute(format!(
                                "resolving {name} took longer than the connect timeout"
                            )))
                        }
                    }
                }
                None => {
                    return Err(ProxyError::NoRoute(format!(
                    "{name} is not in the registry and pass-through is off (--passthrough=false)"
                )))
                }
            };
            strip_hop_by_hop(req.headers_mut());
            req.headers_mut().insert(header::HOST, host);
            let destination = name;
            let sharded = dest.as_ref().and_then(|d| d.epoch());
            let (Some(mine), true) = (sharded, this.layer.redirect_body_limit > 0) else {
                return send(this.inner.clone(), req, destination, addrs).await;
            };
            // Sharded: the body is read into memory, so a 421 from a peer with a newer map can be
            // followed; the retry layer keeps the request and hands it back with the 421.
            let (parts, body) = req.into_parts();
            let bytes = match buffer(body, this.layer.redirect_body_limit).await? {
                Replay::Buffered(bytes) => bytes,
                Replay::Streaming(body) => {
                    let req = Request::from_parts(parts, body);
                    return send(this.inner.clone(), req, destination, addrs).await;
                }
            };
            ctx.lock().may_redirect = true;
            let first = Request::from_parts(parts, full(bytes));
            let mut resp = send(this.inner.clone(), first, destination.clone(), addrs).await?;
            let Some((theirs, owner)) = misdirected(&resp) else {
                return Ok(resp);
            };
            let Some(Resend { mut parts, body }) = resp.extensions_mut().remove::<Resend>() else {
                this.layer.metrics.redirect(false);
                return Ok(resp);
            };
            // Routed afresh below: a fencing epoch belongs to the leader the first send chose.
            parts.headers.remove(FENCING);
            let fresh = if theirs > mine {
                wait_for_epoch(&*this.layer.discovery, &destination, theirs, REDIRECT_WAIT).await
            } else {
                this.layer.discovery.lookup(&destination)
            };
            let Some(fresh) = fresh else {
                this.layer.metrics.redirect(false);
                return Ok(resp);
            };
            let caught_up = fresh.epoch().is_some_and(|e| e >= theirs);
            if !caught_up && theirs <= mine {
                // The peer is behind and did not catch up while it waited: nothing to follow.
                this.layer.metrics.redirect(false);
                return Ok(resp);
            }
            let mut again = Request::from_parts(parts, full(body));
            // Caught up: route by our own (now as new) map; else trust the owner it named.
            let owner = (!caught_up).then_some(owner);
            let addrs = match targets_of(&fresh, &mut again, &ctx, owner) {
                Ok(addrs) => addrs,
                Err(_) => {
                    this.layer.metrics.redirect(false);
                    return Ok(resp);
                }
            };
            drop(resp);
            this.layer.metrics.redirect(true);
            {
                let mut r = ctx.lock();
                r.redirected_to = r.shard;
            }
            send(this.inner.clone(), again, destination, addrs).await
        })
    }
}

/// Sends `req` to the stack below with its candidate endpoints.
async fn send<S>(
    mut inner: S,
    mut req: Request<ProxyBody>,
    destination: Arc<str>,
    addrs: Arc<[SocketAddr]>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    S: Service<
            Request<ProxyBody>,
            Response = Response<ProxyBody>,
            Error = ProxyError,
            Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
        > + Clone,
{
    RequestCtx::of(&mut req).lock().targets = Some(Targets { destination, addrs });
    let mut resp = inner.call(req).await?;
    strip_hop_by_hop(resp.headers_mut());
    Ok(resp)
}
