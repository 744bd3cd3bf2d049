//! Per-request context shared by the layers of one request.
//!
//! The access-log layer creates it and puts it in the request extensions (the only extension
//! the stack adds: each is a boxed value, copied into every retry attempt); inner layers fill in
//! what only they know — the deadline, the candidate endpoints, what the log reports. Because
//! extensions are cloned into every retry attempt, all attempts share the one record, and the
//! log line is complete even when an outer layer (the deadline) answers instead of the inner
//! ones.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use http::{Extensions, Request};

use crate::{balance::Targets, breaker::BreakerState};

/// Shared handle to a request's record.
#[derive(Clone, Default, Debug)]
pub struct RequestCtx(Arc<Mutex<Record>>);

/// What the layers learned about one request. Every collection is bounded by the maximum number
/// of attempts (at most 10).
#[derive(Default, Debug, Clone)]
pub struct Record {
    /// When the overall deadline expires (set by the deadline layer): no attempt or backoff
    /// outlives it.
    pub deadline: Option<tokio::time::Instant>,
    /// The endpoints the next attempt may go to (set by the resolve step before each send).
    pub targets: Option<Targets>,
    /// The resolve step may send the request again after a peer's 421: the retry layer keeps
    /// it even for a single attempt.
    pub may_redirect: bool,
    /// Destination (normalized authority) the request was routed to.
    pub destination: Option<Arc<str>>,
    /// Logical shard, for sharded destinations.
    pub shard: Option<u32>,
    /// Shard-map epoch used for routing.
    pub epoch: Option<i64>,
    /// Endpoints tried, in order.
    pub tried: Vec<SocketAddr>,
    /// Attempts sent upstream.
    pub attempts: u32,
    /// Why each retry happened, in order.
    pub retry_reasons: Vec<&'static str>,
    /// Why a retryable failure was not retried further.
    pub retry_stop: Option<&'static str>,
    /// Breaker state of the last endpoint when it was picked (or `open` when failing fast).
    pub breaker: Option<BreakerState>,
    /// Short code of the proxy error that produced the response, if any.
    pub error: Option<&'static str>,
    /// Request body bytes sent upstream, when known.
    pub request_bytes: Option<u64>,
    /// Outbound: the shard a request was sent to again after a peer answered 421.
    pub redirected_to: Option<u32>,
    /// Inbound: the handoff step taken for this request, if any.
    pub handoff: Option<&'static str>,
}

impl RequestCtx {
    /// The context of a request, or a detached one when the request did not pass the access log
    /// (layers used on their own still work).
    pub fn from_extensions(ext: &Extensions) -> RequestCtx {
        ext.get::<RequestCtx>().cloned().unwrap_or_default()
    }

    /// The context of a request, put in its extensions first when it has none (a layer used on
    /// its own, without the access log above it).
    pub fn of<B>(req: &mut Request<B>) -> RequestCtx {
        if let Some(ctx) = req.extensions().get::<RequestCtx>() {
            return ctx.clone();
        }
        let ctx = RequestCtx::default();
        req.extensions_mut().insert(ctx.clone());
        ctx
    }

    /// Locks the record. A poisoned lock only means a panic elsewhere; the record stays usable.
    pub fn lock(&self) -> MutexGuard<'_, Record> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
