//! Key ownership on the inbound side, by the shard map of the pod's own service.
//!
//! Every inbound request gets this pod's view, whatever the caller sent: `x-shardmesh-shard`
//! (this pod's shard), `x-shardmesh-shards` (the shard count to judge ownership by),
//! `x-shardmesh-epoch` (this sidecar's map epoch) and, while a handoff window is open,
//! `x-shardmesh-previous-shards`. A keyed request then goes one of four ways:
//!
//! - **owned**: forwarded to the application;
//! - **another shard's**: answered 421 with the owner and this map's epoch, never forwarded, so
//!   an application that ignores sharding is still protected (the calling sidecar retries it
//!   once on the owner);
//! - **moved here, in a handoff window**: a GET or HEAD the application answers with a miss
//!   status is sent to the key's previous owner and that answer returned (marked
//!   `x-shardmesh-handoff-from`); a DELETE is applied on the previous owner first, so the old
//!   value cannot come back through a later read; other writes stay here;
//! - **a handoff request from the key's new owner** (`x-shardmesh-handoff`): a GET, HEAD or
//!   DELETE of a key this shard owned in the previous layout is served under that layout. A
//!   handoff request is never handed off again, so nothing loops.
//!
//! A request for a key this shard does not own, whose caller has seen a newer map
//! (`x-shardmesh-epoch` above this sidecar's), waits up to a second for that map before it is
//! refused: the caller's map sent it here, so the newer map probably makes it ours.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{header::HeaderName, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use shardmesh_api::{
    headers::{EPOCH, HANDOFF, HANDOFF_FROM, PREVIOUS_SHARDS, SHARD, SHARDS},
    routing::{key_hash, shard_for_key},
};
use tower::{Layer, Service};

use crate::{
    body::{full, ProxyBody},
    client::Upstream,
    ctx::RequestCtx,
    discovery::{wait_for_epoch, Destination, DestinationKind, Discover},
    errors::{BoxFuture, ProxyError},
    headers::strip_hop_by_hop,
    metrics::{HandoffKind, Metrics},
};

/// Longest wait for this sidecar's map when a caller has seen a newer one and the key is not
/// ours under the map we have (well below the default per-try timeout of 2 s).
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// What the inbound side knows of the pod's own service.
#[derive(Clone)]
pub struct Ownership {
    /// This pod's shard index.
    pub shard: u32,
    /// Where the service's shard map is found in `discovery`.
    pub authority: Arc<str>,
    /// The live (or static) registry.
    pub discovery: Arc<dyn Discover>,
    /// Client for handoff requests to the previous owner's sidecars.
    pub client: Upstream,
    /// Bound on one handoff request, until response headers.
    pub handoff_timeout: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("shard", &self.shard)
            .field("authority", &self.authority)
            .field("handoff_timeout", &self.handoff_timeout)
            .finish_non_exhaustive()
    }
}

/// The part of a sharded destination ownership needs, borrowed from the destination (nothing
/// is copied per request).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View<'a> {
    /// Header carrying the key.
    pub header: &'a HeaderName,
    /// Map epoch.
    pub epoch: i64,
    /// Routing shard count.
    pub count: u32,
    /// Previous routing shard count, while a handoff window is open.
    pub previous: Option<u32>,
    /// Miss statuses.
    pub miss: &'a [u16],
    /// Members per listed shard.
    pub shards: &'a [Arc<[SocketAddr]>],
    /// Per-shard leaders, when the service elects them: a handoff delete is a write, so it goes
    /// to the previous owner's leader with its fencing epoch.
    pub leaders: Option<&'a crate::discovery::LeaderRouting>,
}

impl<'a> View<'a> {
    /// The view of a sharded destination.
    pub fn of(dest: &'a Destination) -> Option<View<'a>> {
        match &dest.kind {
            DestinationKind::Sharded {
                header,
                epoch,
                count,
                previous,
                handoff_miss,
                shards,
                leaders,
                ..
            } => Some(View {
                header,
                epoch: *epoch,
                count: *count,
                previous: *previous,
                miss: handoff_miss,
                shards,
                leaders: leaders.as_deref(),
            }),
            DestinationKind::Endpoints(_) => None,
        }
    }
}

/// What to do with one keyed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This shard owns the key; `moved_from` is its previous owner while a handoff window is
    /// open and the key moved here.
    Owned {
        /// Previous owner of a moved key.
        moved_from: Option<u32>,
    },
    /// Serve a new owner's handoff request under the previous layout of `count` shards.
    ServeHandoff {
        /// The previous layout's shard count.
        count: u32,
    },
    /// Another shard owns the key.
    Misdirected {
        /// The owner.
        owner: u32,
    },
}

/// Methods a handoff request may carry.
fn handoff_method(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD || m == Method::DELETE
}

/// Decides a keyed request for shard `me` under `view`. `handoff` says the request came from
/// the key's new owner as a handoff.
pub fn decide(view: &View<'_>, me: u32, key: &[u8], method: &Method, handoff: bool) -> Decision {
    let owner = shard_for_key(key, view.count);
    let before = view.previous.map(|p| shard_for_key(key, p));
    if handoff && owner != me && before == Some(me) && handoff_method(method) {
        return Decision::ServeHandoff {
            count: view.previous.unwrap_or(view.count),
        };
    }
    if owner != me {
        return Decision::Misdirected { owner };
    }
    Decision::Owned {
        // A handoff request is answered here, never handed off again.
        moved_from: before.filter(|b| *b != me && !handoff),
    }
}

/// Whether `status` means "not here" under `view`.
pub fn is_miss(view: &View<'_>, status: http::StatusCode) -> bool {
    view.miss.contains(&status.as_u16())
}

fn num(headers: &HeaderMap, name: &str) -> Option<i64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

/// Sets this pod's view on a request to the application, replacing what the caller sent.
fn tell_app(headers: &mut HeaderMap, me: u32, view: &View<'_>, count: u32, handoff: Option<u32>) {
    headers.insert(SHARD, HeaderValue::from(me));
    headers.insert(SHARDS, HeaderValue::from(count));
    headers.insert(EPOCH, HeaderValue::from(view.epoch));
    match view.previous {
        Some(p) => headers.insert(PREVIOUS_SHARDS, HeaderValue::from(p)),
        None => headers.remove(PREVIOUS_SHARDS),
    };
    match handoff {
        Some(from) => headers.insert(HANDOFF, HeaderValue::from(from)),
        None => headers.remove(HANDOFF),
    };
}

/// See [`Ownership`].
#[derive(Clone)]
pub struct OwnershipLayer {
    own: Option<Arc<Ownership>>,
}

impl OwnershipLayer {
    /// Ownership by `own`; `None` passes every request through untouched (no own service).
    pub fn new(own: Option<Ownership>) -> Self {
        OwnershipLayer {
            own: own.map(Arc::new),
        }
    }
}

impl<S> Layer<S> for OwnershipLayer {
    type Service = Owned<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Owned {
            inner,
            own: self.own.clone(),
        }
    }
}

/// See [`OwnershipLayer`].
#[derive(Clone)]
pub struct Owned<S> {
    inner: S,
    own: Option<Arc<Ownership>>,
}

impl<S> Service<Request<ProxyBody>> for Owned<S>
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
        let Some(own) = self.own.clone() else {
            return self.inner.call(req);
        };
        let inner = self.inner.clone();
        // The clone that was made ready is the one to call (tower's contract).
        let ready = std::mem::replace(&mut self.inner, inner);
        Box::pin(judge(own, ready, req))
    }
}

async fn judge<S>(
    own: Arc<Ownership>,
    mut inner: S,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    S: Service<
            Request<ProxyBody>,
            Response = Response<ProxyBody>,
            Error = ProxyError,
            Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
        > + Send,
{
    let handoff_from = num(req.headers(), HANDOFF).and_then(|v| u32::try_from(v).ok());
    let mut dest = own.discovery.lookup(&own.authority);
    // About to refuse a key whose caller routed here by a newer map than ours: that map says
    // the key is ours, so wait (bounded) for it rather than bounce the request. An owned key
    // needs no wait: the newer map sent it here too.
    if let Some(theirs) = num(req.headers(), EPOCH) {
        let refused_by_older_map = dest.as_deref().and_then(View::of).is_some_and(|v| {
            theirs > v.epoch
                && req.headers().get(v.header).is_some_and(|key| {
                    let d = decide(&v, own.shard, key.as_bytes(), req.method(), false);
                    matches!(d, Decision::Misdirected { .. })
                })
        });
        if refused_by_older_map {
            dest = wait_for_epoch(&*own.discovery, &own.authority, theirs, CATCH_UP_WAIT).await;
        }
    }
    let Some(view) = dest.as_deref().and_then(View::of) else {
        // No map yet (or the service is gone): the application judges alone.
        for h in [SHARD, SHARDS, EPOCH, HANDOFF, PREVIOUS_SHARDS] {
            req.headers_mut().remove(h);
        }
        req.headers_mut()
            .insert(SHARD, HeaderValue::from(own.shard));
        return inner.call(req).await;
    };
    let Some(key) = req.headers().get(view.header).cloned() else {
        tell_app(req.headers_mut(), own.shard, &view, view.count, None);
        return inner.call(req).await;
    };
    let decision = decide(
        &view,
        own.shard,
        key.as_bytes(),
        req.method(),
        handoff_from.is_some(),
    );
    let ctx = RequestCtx::from_extensions(req.extensions());
    {
        let mut r = ctx.lock();
        r.shard = Some(own.shard);
        r.epoch = Some(view.epoch);
    }
    match decision {
        Decision::Misdirected { owner } => {
            own.metrics.misdirected();
            Err(ProxyError::Misdirected {
                shard: own.shard,
                owner,
                epoch: view.epoch,
            })
        }
        Decision::ServeHandoff { count } => {
            own.metrics.handoff(HandoffKind::Served);
            ctx.lock().handoff = Some("served");
            tell_app(req.headers_mut(), own.shard, &view, count, handoff_from);
            inner.call(req).await
        }
        Decision::Owned { moved_from: None } => {
            tell_app(req.headers_mut(), own.shard, &view, view.count, None);
            inner.call(req).await
        }
        Decision::Owned {
            moved_from: Some(prev),
        } => {
            tell_app(req.headers_mut(), own.shard, &view, view.count, None);
            let method = req.method().clone();
            let replayable = req_body_empty(&req);
            if method == Method::DELETE && replayable {
                // Gone on the previous owner first: a later read that misses here cannot
                // bring the old value back.
                let copy = copy_request(&req);
                let resp = handoff(&own, &view, prev, key.as_bytes(), copy).await?;
                let st = resp.status();
                // Deleted, absent or gone there; 421: its window already closed, so no read
                // can reach the old value any more. Anything else (5xx, or a 409 from a
                // fenced follower) leaves the old value in place: the delete fails, to be
                // retried.
                let done = st.is_success()
                    || st == http::StatusCode::NOT_FOUND
                    || st == http::StatusCode::GONE
                    || st == http::StatusCode::MISDIRECTED_REQUEST;
                if !done {
                    own.metrics.handoff(HandoffKind::Failed);
                    return Err(ProxyError::Handoff(format!(
                        "the previous owner (shard {prev}) answered {st} to the delete"
                    )));
                }
                own.metrics.handoff(HandoffKind::Delete);
                ctx.lock().handoff = Some("delete");
                return inner.call(req).await;
            }
            let is_read = method == Method::GET || method == Method::HEAD;
            if !(is_read && replayable) {
                return inner.call(req).await;
            }
            let copy = copy_request(&req);
            let resp = inner.call(req).await?;
            if !is_miss(&view, resp.status()) {
                return Ok(resp);
            }
            // Release the miss (and its connection) before asking the previous owner.
            drop(resp);
            let mut resp = handoff(&own, &view, prev, key.as_bytes(), copy).await?;
            if resp.status() == http::StatusCode::MISDIRECTED_REQUEST {
                // Maps disagree for a moment (the previous owner's window closed first):
                // the caller's sidecar retries this 503 once maps agree.
                own.metrics.handoff(HandoffKind::Failed);
                return Err(ProxyError::Handoff(format!(
                    "shard {prev} no longer serves the key's previous layout"
                )));
            }
            own.metrics.handoff(HandoffKind::Read);
            ctx.lock().handoff = Some("read");
            resp.headers_mut()
                .insert(HANDOFF_FROM, HeaderValue::from(prev));
            Ok(resp)
        }
    }
}

/// Whether a request's body is known to be empty, so it can be sent twice.
fn req_body_empty(req: &Request<ProxyBody>) -> bool {
    use http_body::Body as _;
    req.body().is_end_stream() || req.body().size_hint().upper() == Some(0)
}

/// Method, URI and headers of a request, with an empty body.
fn copy_request(req: &Request<ProxyBody>) -> Request<ProxyBody> {
    let mut copy = Request::new(full(bytes::Bytes::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Most members of the previous owner asked for one handoff.
const HANDOFF_TRIES: usize = 3;

/// Sends a handoff request for `key` to a member of shard `prev`: first the member picked by
/// the key (so one key's handoffs go to one replica), then the next ones when it cannot be
/// connected to or, for a read, answers a miss (replicas of an application need not hold the
/// same keys).
async fn handoff(
    own: &Ownership,
    view: &View<'_>,
    prev: u32,
    key: &[u8],
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut members = view.shards.get(prev as usize).cloned().unwrap_or_default();
    // A write (the delete) to a service that elects leaders goes to the shard's leader only,
    // fenced with its epoch, as a caller's write would.
    if let Some(l) = view.leaders {
        if l.writes.is_write(req.method(), req.headers()) {
            let Some((leader, epoch)) = l.leaders.get(prev as usize).cloned().flatten() else {
                own.metrics.handoff(HandoffKind::Failed);
                return Err(ProxyError::Handoff(format!(
                    "shard {prev} has no leader for the delete in shard-map epoch {}",
                    view.epoch
                )));
            };
            req.headers_mut().insert(
                shardmesh_api::headers::FENCING_EPOCH,
                HeaderValue::from(epoch),
            );
            members = leader;
        }
    }
    if members.is_empty() {
        own.metrics.handoff(HandoffKind::Failed);
        return Err(ProxyError::Handoff(format!(
            "shard {prev} has no live member in shard-map epoch {}",
            view.epoch
        )));
    }
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    strip_hop_by_hop(req.headers_mut());
    tell_app(
        req.headers_mut(),
        own.shard,
        view,
        view.count,
        Some(own.shard),
    );
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let first = (key_hash(key) % members.len() as u64) as usize;
    let tries = members.len().min(HANDOFF_TRIES);
    let mut last_err = None;
    let mut last_miss = None;
    for i in 0..tries {
        let addr = members[(first + i) % members.len()];
        let mut attempt = copy_request(&req);
        *attempt.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(pq.as_str())
            .build()
            .map_err(|e| ProxyError::BadRequest(format!("cannot build the handoff URI: {e}")))?;
        let mut client = own.client.clone();
        match tokio::time::timeout(own.handoff_timeout, client.call(attempt)).await {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                if read && is_miss(view, resp.status()) && i + 1 < tries {
                    last_miss = Some(resp);
                    continue;
                }
                return Ok(resp);
            }
            Ok(Err(e @ ProxyError::Connect { .. })) => last_err = Some(e.to_string()),
            Ok(Err(e)) => {
                own.metrics.handoff(HandoffKind::Failed);
                return Err(ProxyError::Handoff(format!("shard {prev} at {addr}: {e}")));
            }
            Err(_) => {
                own.metrics.handoff(HandoffKind::Failed);
                return Err(ProxyError::Handoff(format!(
                    "shard {prev} at {addr} did not answer within {:?}",
                    own.handoff_timeout
                )));
            }
        }
    }
    if let Some(miss) = last_miss {
        return Ok(miss);
    }
    own.metrics.handoff(HandoffKind::Failed);
    Err(ProxyError::Handoff(format!(
        "no member of shard {prev} could be reached: {}",
        last_err.unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sharded destination routed by `count` shards, in the window of a change from
    /// `previous`, with these miss statuses.
    fn dest(count: u32, previous: Option<u32>, miss: &[u16]) -> Destination {
        Destination {
            name: "svc:80".into(),
            kind: DestinationKind::Sharded {
                header: HeaderName::from_static("x-shard-key"),
                epoch: 7,
                count,
                previous,
                handoff_miss: Arc::from(miss),
                shards: vec![Arc::from([]); count.max(previous.unwrap_or(0)) as usize],
                leaders: None,
            },
        }
    }

    fn view(d: &Destination) -> View<'_> {
        View::of(d).expect("sharded")
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..3000).map(|i| format!("key-{i}"))
    }

    #[test]
    fn owned_keys_pass_and_others_are_misdirected_to_their_owner() {
        let d = dest(4, None, &[404]);
        let v = view(&d);
        for k in keys() {
            let owner = shard_for_key(k.as_bytes(), 4);
            for me in 0..4 {
                let d = decide(&v, me, k.as_bytes(), &Method::PUT, false);
                if me == owner {
                    assert_eq!(d, Decision::Owned { moved_from: None });
                } else {
                    assert_eq!(d, Decision::Misdirected { owner });
                }
            }
        }
    }

    #[test]
    fn in_a_window_moved_keys_name_their_previous_owner() {
        // Grown 3 -> 4: keys that moved to shard 3 name their previous owner; the rest none.
        let d = dest(4, Some(3), &[404]);
        let v = view(&d);
        let mut moved = 0;
        for k in keys() {
            let (now, before) = (
                shard_for_key(k.as_bytes(), 4),
                shard_for_key(k.as_bytes(), 3),
            );
            let d = decide(&v, now, k.as_bytes(), &Method::GET, false);
            if now == before {
                assert_eq!(d, Decision::Owned { moved_from: None });
            } else {
                moved += 1;
                assert_eq!(now, 3);
                assert_eq!(
                    d,
                    Decision::Owned {
                        moved_from: Some(before)
                    }
                );
                // The previous owner serves the new owner's handoff under 3 shards, for
                // reads and deletes only; anything else, or without the marker, is 421.
                for m in [Method::GET, Method::HEAD, Method::DELETE] {
                    assert_eq!(
                        decide(&v, before, k.as_bytes(), &m, true),
                        Decision::ServeHandoff { count: 3 }
                    );
                }
                assert_eq!(
                    decide(&v, before, k.as_bytes(), &Method::PUT, true),
                    Decision::Misdirected { owner: 3 }
                );
                assert_eq!(
                    decide(&v, before, k.as_bytes(), &Method::GET, false),
                    Decision::Misdirected { owner: 3 }
                );
                // A handoff request reaching the new owner is answered there, never passed on.
                assert_eq!(
                    decide(&v, 3, k.as_bytes(), &Method::GET, true),
                    Decision::Owned { moved_from: None }
                );
            }
        }
        assert!((600..900).contains(&moved), "{moved} of 3000 moved");
    }

    #[test]
    fn a_shard_never_serves_a_handoff_for_keys_it_did_not_own() {
        let d = dest(4, Some(3), &[404]);
        let v = view(&d);
        for k in keys() {
            let before = shard_for_key(k.as_bytes(), 3);
            for me in (0..4).filter(|s| *s != before) {
                let d = decide(&v, me, k.as_bytes(), &Method::GET, true);
                assert!(!matches!(d, Decision::ServeHandoff { .. }), "{k} on {me}");
            }
        }
    }

    #[test]
    fn after_the_window_nothing_is_handed_off() {
        let d = dest(4, None, &[404]);
        let v = view(&d);
        for k in keys() {
            let now = shard_for_key(k.as_bytes(), 4);
            assert_eq!(
                decide(&v, now, k.as_bytes(), &Method::GET, false),
                Decision::Owned { moved_from: None }
            );
        }
    }

    #[test]
    fn miss_statuses_are_configurable() {
        let d = dest(2, Some(1), &[404]);
        let v = view(&d);
        assert!(is_miss(&v, http::StatusCode::NOT_FOUND));
        assert!(!is_miss(&v, http::StatusCode::GONE));
        assert!(!is_miss(&v, http::StatusCode::OK));
        let d = dest(2, Some(1), &[404, 503]);
        let v = view(&d);
        assert!(is_miss(&v, http::StatusCode::SERVICE_UNAVAILABLE));
    }
}
