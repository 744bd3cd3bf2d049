//! The upstream HTTP client: hyper's pooled client with a connect timeout, as a tower service
//! whose errors say whether the request provably never left (connect failure) or may have
//! reached the upstream (everything else) — the distinction the retry rules rest on.

use std::{
    error::Error as _,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{uri::Authority, Request, Response};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};
use tower::Service;

use crate::{
    body::{boxed, ProxyBody},
    errors::{BoxFuture, ProxyError},
};

/// Idle pooled connections are closed after this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle pooled connections kept per endpoint (bounds memory and file descriptors).
pub const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// Pooled HTTP/1 client to endpoints given as `http://ip:port/...` URIs. Behind one `Arc`:
/// the stack is cloned per request, and hyper's client is several.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Arc<Client<HttpConnector, ProxyBody>>,
}

impl Upstream {
    /// A client whose TCP connects give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Upstream {
            client: Arc::new(client),
        }
    }
}

/// The endpoint an upstream URI's authority names (`ip:port`), for errors; `0.0.0.0:0` when
/// it names none. Parsed only when an error needs it.
pub fn endpoint_of(authority: Option<&Authority>) -> SocketAddr {
    authority
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The error and its causes on one line: hyper's top-level messages alone ("client error
/// (Connect)") do not tell an operator what happened.
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

impl Service<Request<ProxyBody>> for Upstream {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let authority = req.uri().authority().cloned();
        let fut = self.client.request(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => Ok(resp.map(boxed)),
                Err(e) if e.is_connect() => Err(ProxyError::Connect {
                    endpoint: endpoint_of(authority.as_ref()),
                    message: e.source().map_or_else(|| e.to_string(), chain),
                }),
                Err(e) => Err(ProxyError::Reset {
                    endpoint: endpoint_of(authority.as_ref()),
                    message: e.source().map_or_else(|| e.to_string(), chain),
                }),
            }
        })
    }
}
