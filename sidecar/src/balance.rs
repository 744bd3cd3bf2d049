//! Endpoint choice: power of two choices over peak-EWMA latency, among endpoints whose circuit
//! breaker admits traffic, avoiding endpoints this request already tried.
//!
//! Peak EWMA (as in Finagle and linkerd2-proxy) jumps to a slow observation at once and decays
//! back slowly, so one slow response moves traffic away quickly; multiplying by outstanding
//! requests + 1 makes a busy endpoint look expensive before its latency shows it. P2C then
//! needs no global ordering: sample two, take the cheaper.
//!
//! The layer also owns the breaker bookkeeping, because it is the one place that knows which
//! endpoint a result belongs to and how many of the destination's endpoints are already ejected.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{
    uri::{Authority, PathAndQuery, Scheme},
    Request, Response, Uri,
};
use rand::Rng;
use tower::{Layer, Service};

use crate::{
    body::ProxyBody,
    breaker::{Admission, Breaker, BreakerConfig, BreakerState},
    ctx::RequestCtx,
    errors::{BoxFuture, ProxyError},
    hash::FnvBuild,
    metrics::Metrics,
};

/// Latency assumed for an endpoint never measured: optimistic enough to try new endpoints.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast the EWMA forgets (time constant).
pub const DECAY: Duration = Duration::from_secs(10);

/// Most endpoint states kept; beyond it idle, healthy ones are forgotten (pass-through traffic
/// to many hosts must not grow memory without bound).
pub const MAX_ENDPOINTS: usize = 4096;

/// The endpoints a request may go to, set by the resolve step.
#[derive(Clone, Debug)]
pub struct Targets {
    /// Destination name, for errors and logs.
    pub destination: Arc<str>,
    /// Candidate endpoints.
    pub addrs: Arc<[SocketAddr]>,
}

#[derive(Debug)]
struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.rtt_ns {
            self.rtt_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            self.rtt_ns = self.rtt_ns * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }
}

/// What the sidecar knows about one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    /// Address.
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once: every request to the endpoint needs it.
    authority: Authority,
    breaker: Mutex<Breaker>,
    ewma: Mutex<PeakEwma>,
    pending: AtomicU32,
}

impl EndpointState {
    fn new(addr: SocketAddr, cfg: BreakerConfig) -> Self {
        let now = Instant::now();
        EndpointState {
            addr,
            authority: Authority::try_from(addr.to_string().as_str())
                .unwrap_or_else(|_| Authority::from_static("0.0.0.0:0")),
            breaker: Mutex::new(Breaker::new(cfg, now)),
            ewma: Mutex::new(PeakEwma {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                stamp: now,
            }),
            pending: AtomicU32::new(0),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current breaker state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker().state()
    }

    fn cost(&self) -> f64 {
        let rtt = self.ewma.lock().unwrap_or_else(|e| e.into_inner()).rtt_ns;
        (rtt + 1.0) * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }
}

/// All endpoint states, shared by every request of the outbound side.
#[derive(Debug)]
pub struct Endpoints {
    cfg: BreakerConfig,
    map: Mutex<HashMap<SocketAddr, Arc<EndpointState>, FnvBuild>>,
    /// Held while a failure decides whether its breaker may open: counting the open breakers
    /// and opening one is a single step, so concurrent failures cannot together eject more
    /// than the allowed share.
    ejecting: Mutex<()>,
}

impl Endpoints {
    /// An empty table whose breakers use `cfg`.
    pub fn new(cfg: BreakerConfig) -> Self {
        Endpoints {
            cfg,
            map: Mutex::new(HashMap::default()),
            ejecting: Mutex::new(()),
        }
    }

    /// The states of `addrs`, in order, each created on first use; one lock for all of them
    /// (every request looks up its candidates).
    pub fn get_all(&self, addrs: &[SocketAddr]) -> Vec<Arc<EndpointState>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        addrs
            .iter()
            .map(|&addr| {
                if let Some(e) = map.get(&addr) {
                    return e.clone();
                }
                if map.len() >= MAX_ENDPOINTS {
                    // Forget endpoints nobody is using whose breaker is closed: nothing is lost
                    // but their latency estimate.
                    map.retain(|_, e| {
                        Arc::strong_count(e) > 1 || e.breaker_state() != BreakerState::Closed
                    });
                }
                let e = Arc::new(EndpointState::new(addr, self.cfg));
                if map.len() < MAX_ENDPOINTS {
                    map.insert(addr, e.clone());
                }
                e
            })
            .collect()
    }

    /// Number of tracked endpoints.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no endpoint is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Picks an endpoint for each attempt; see the module docs.
#[derive(Clone, Debug)]
pub struct BalanceLayer {
    endpoints: Arc<Endpoints>,
    max_ejection_percent: u32,
    metrics: Arc<Metrics>,
}

impl BalanceLayer {
    /// Balances over `endpoints`, never ejecting more than `max_ejection_percent` of a
    /// destination's endpoints.
    pub fn new(
        endpoints: Arc<Endpoints>,
        max_ejection_percent: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        BalanceLayer {
            endpoints,
            max_ejection_percent,
            metrics,
        }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`BalanceLayer`].
#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
    layer: BalanceLayer,
}

/// Keeps the pending count and the half-open probe slot honest when an attempt is cancelled.
struct InFlight {
    ep: Arc<EndpointState>,
    admission: Admission,
    finished: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ep.pending.fetch_sub(1, Ordering::Relaxed);
        if !self.finished && self.admission == Admission::Probe {
            self.ep.breaker().release_probe();
        }
    }
}

/// Chooses among `states` (index list of candidates) by P2C over cost.
fn p2c(states: &[Arc<EndpointState>], candidates: &[usize]) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if states[a].cost() <= states[b].cost() {
                a
            } else {
                b
            })
        }
    }
}

/// Whether a response counts as an endpoint failure for the breaker. 429 is the endpoint
/// working as designed (rate limiting), not failing.
pub fn is_failure_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

impl<S> Balance<S> {
    /// Picks and admits an endpoint: untried ones first, then tried ones (a retry goes to a
    /// different endpoint when one exists), each filtered by its breaker.
    fn pick(
        &self,
        states: &[Arc<EndpointState>],
        tried: &[SocketAddr],
        now: Instant,
        (destination, shard): (&Arc<str>, Option<u32>),
    ) -> Option<(usize, Admission, BreakerState)> {
        for allow_tried in [false, true] {
            let mut candidates: Vec<usize> = (0..states.len())
                .filter(|&i| allow_tried || !tried.contains(&states[i].addr))
                .filter(|&i| states[i].breaker().is_available(now))
                .collect();
            // Admission can race with other requests taking the last probe slot: retry the pick
            // without the loser.
            while let Some(i) = p2c(states, &candidates) {
                let mut breaker = states[i].breaker();
                let (admission, transition) = breaker.try_acquire(now);
                let state = breaker.state();
                drop(breaker);
                if let Some(to) = transition {
                    self.layer
                        .metrics
                        .destination_breaker_transition(destination, shard, to);
                }
                if let Some(admission) = admission {
                    return Some((i, admission, state));
                }
                candidates.retain(|&c| c != i);
            }
        }
        None
    }

    /// Whether one more of `states` may be ejected.
    fn may_eject(&self, states: &[Arc<EndpointState>]) -> bool {
        let open = states
            .iter()
            .filter(|s| s.breaker_state() != BreakerState::Closed)
            .count();
        (open + 1) * 100 <= self.layer.max_ejection_percent as usize * states.len()
    }
}

impl<S> Service<Request<ProxyBody>> for Balance<S>
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
        // The client below is always ready (it queues on its own pool).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let ctx = RequestCtx::from_extensions(req.extensions());
            let (targets, tried, shard) = {
                let r = ctx.lock();
                (r.targets.clone(), r.tried.clone(), r.shard)
            };
            let Some(targets) = targets else {
                return Err(ProxyError::NoEndpoints(
                    "the request reached the balancer without a destination".into(),
                ));
            };
            if targets.addrs.is_empty() {
                return Err(ProxyError::NoEndpoints(format!(
                    "{} has no endpoints",
                    targets.destination
                )));
            }
            let states = this.layer.endpoints.get_all(&targets.addrs);
            let now = Instant::now();
            let Some((i, admission, state)) =
                this.pick(&states, &tried, now, (&targets.destination, shard))
            else {
                ctx.lock().breaker = Some(BreakerState::Open);
                return Err(ProxyError::CircuitOpen {
                    destination: targets.destination.to_string(),
                    endpoints: states.len(),
                });
            };
            let ep = states[i].clone();
            {
                let mut r = ctx.lock();
                r.tried.push(ep.addr);
                r.breaker = Some(state);
            }
            let mut uri = std::mem::take(req.uri_mut()).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(ep.authority.clone());
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(uri)
                .map_err(|e| ProxyError::BadRequest(format!("cannot build upstream URI: {e}")))?;

            ep.pending.fetch_add(1, Ordering::Relaxed);
            let mut guard = InFlight {
                ep: ep.clone(),
                admission,
                finished: false,
            };
            // The pick took no time worth measuring: the attempt's clock starts with it.
            let start = now;
            let mut inner = this.inner.clone();
            let result = inner.call(req).await;
            let end = Instant::now();
            ep.ewma
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(end - start, end);
            let ok = match &result {
                Ok(resp) => !is_failure_status(resp.status()),
                Err(_) => false,
            };
            let transition = if ok {
                // The jitter only spreads the open durations of breakers that open.
                ep.breaker().on_result(end, admission, true, false, 0.0)
            } else {
                let jitter: f64 = rand::rng().random();
                let _one_at_a_time = this
                    .layer
                    .endpoints
                    .ejecting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let may_open = this.may_eject(&states);
                ep.breaker()
                    .on_result(end, admission, false, may_open, jitter)
            };
            guard.finished = true;
            drop(guard);
            if let Some(to) = transition {
                this.layer
                    .metrics
                    .destination_breaker_transition(&targets.destination, shard, to);
                tracing::info!(endpoint = %ep.addr, destination = %targets.destination, to = to.as_str(), "circuit breaker transition");
            }
            result
        })
    }
}
