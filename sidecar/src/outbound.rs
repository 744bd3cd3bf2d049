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

use http::{header, HeaderValue, Method, Request, Response};
use tower::{Layer, Service, ServiceBuilder};

use crate::{
    access_log::{AccessLogConfig, AccessLogLayer, LoggedBody},
    balance::{BalanceLayer, Endpoints, Targets},
    body::ProxyBody,
    budget::RetryBudget,
    client::Upstream,
    config::Policy,
    ctx::RequestCtx,
    discovery::{normalize_authority, Destination, DestinationKind, Discover},
    errors::{BoxFuture, ErrorResponseLayer, ProxyError},
    headers::strip_hop_by_hop,
    metrics::{Direction, Metrics},
    retry::RetryLayer,
    timeout::{DeadlineLayer, PerTryTimeoutLayer},
};

use shardmesh_api::headers::FENCING_EPOCH;
pub use shardmesh_api::headers::{EPOCH as EPOCH_HEADER, SHARD as SHARD_HEADER};

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
        // Authority → destination → (shard →) candidate endpoints.
        .layer(ResolveLayer::new(
            o.discovery.clone(),
            o.passthrough,
            o.policy.connect,
        ))
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

/// Finds the candidate endpoints of a request.
#[derive(Clone)]
pub struct ResolveLayer {
    discovery: Arc<dyn Discover>,
    passthrough: bool,
    dns_timeout: Duration,
}

impl ResolveLayer {
    /// Resolves through `discovery`; unknown hosts through DNS when `passthrough`.
    pub fn new(discovery: Arc<dyn Discover>, passthrough: bool, dns_timeout: Duration) -> Self {
        ResolveLayer {
            discovery,
            passthrough,
            dns_timeout,
        }
    }
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

/// The authority a request is for: the absolute-form URI's, else the `Host` header.
fn request_authority(req: &Request<ProxyBody>) -> Result<String, ProxyError> {
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
        return Ok(a.to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| {
            ProxyError::BadRequest(
                "no destination: send absolute-form URIs (set HTTP_PROXY) or a Host header".into(),
            )
        })
}

/// Picks the endpoints of `dest` for this request, setting shard headers and context.
fn targets_of(
    dest: &Destination,
    req: &mut Request<ProxyBody>,
    ctx: &RequestCtx,
) -> Result<Arc<[SocketAddr]>, ProxyError> {
    match &dest.kind {
        DestinationKind::Endpoints(addrs) => Ok(addrs.clone()),
        DestinationKind::Sharded {
            header,
            epoch,
            shards,
            leaders,
        } => {
            let key = req.headers().get(header).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "{} is sharded: set the {header} header to the request's shard key",
                    dest.name
                ))
            })?;
            let n = u32::try_from(shards.len()).unwrap_or(u32::MAX);
            let shard = shardmesh_api::routing::shard_for_key(key.as_bytes(), n);
            {
                let mut r = ctx.lock();
                r.shard = Some(shard);
                r.epoch = Some(*epoch);
            }
            req.headers_mut()
                .insert(SHARD_HEADER, HeaderValue::from(shard));
            req.headers_mut()
                .insert(EPOCH_HEADER, HeaderValue::from(*epoch));
            // Writes to a service that elects leaders go to the shard's leader only, fenced
            // with its epoch; the leader's application compares it with its own.
            if let Some(l) = leaders.as_deref() {
                if l.writes.is_write(req.method(), req.headers()) {
                    return match l.leaders.get(shard as usize).cloned().flatten() {
                        Some((leader, leader_epoch)) => {
                            req.headers_mut()
                                .insert(FENCING_EPOCH, HeaderValue::from(leader_epoch));
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
            let ctx = RequestCtx::from_extensions(req.extensions());
            let raw = request_authority(&req)?;
            let name = normalize_authority(&raw).ok_or_else(|| {
                ProxyError::BadRequest(format!("{raw:?} is not a valid host[:port]"))
            })?;
            ctx.lock().destination = Some(name.clone());
            let addrs = match this.layer.discovery.lookup(&name) {
                Some(dest) => targets_of(&dest, &mut req, &ctx)?,
                None if this.layer.passthrough => {
                    let lookup = tokio::net::lookup_host(name.clone());
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
            // Upstreams see the authority the application asked for.
            let host = HeaderValue::from_str(&raw)
                .map_err(|_| ProxyError::BadRequest(format!("{raw:?} is not a valid Host")))?;
            strip_hop_by_hop(req.headers_mut());
            req.headers_mut().insert(header::HOST, host);
            req.extensions_mut().insert(Targets {
                destination: name.into(),
                addrs,
            });
            let mut inner = this.inner.clone();
            let mut resp = inner.call(req).await?;
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        })
    }
}
