//! Per-endpoint circuit breaker: closed → open → half-open → closed.
//!
//! * Closed counts outcomes. It opens after `consecutive_failures` failures in a row, or when the
//!   failure rate over a sliding window (a ring of buckets: bounded memory) reaches
//!   `failure_rate_percent` with at least `min_requests` requests in it.
//! * Open rejects everything for an open duration that doubles on every re-opening without an
//!   intervening close (capped), minus up to 10% jitter so endpoints ejected together do not all
//!   come back at the same instant.
//! * Half-open admits at most `half_open_probes` requests at once; a successful probe closes the
//!   breaker, a failed one re-opens it.
//!
//! The caller decides whether opening is allowed (`may_open`): the balancer refuses to eject more
//! than `maxEjectionPercent` of a destination's endpoints. The state machine takes time and
//! randomness as arguments so it can be property-tested.

use std::time::{Duration, Instant};

/// Buckets of the failure-rate window.
pub const WINDOW_BUCKETS: usize = 10;

/// Largest share of the open duration removed by jitter.
pub const JITTER_FRACTION: f64 = 0.1;

/// Breaker parameters (from `resilience.circuitBreaker`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// Failure rate (percent) over the window that opens it...
    pub failure_rate_percent: u32,
    /// ...when the window holds at least this many requests.
    pub min_requests: u32,
    /// Length of the failure-rate window.
    pub window: Duration,
    /// First open duration.
    pub open_duration: Duration,
    /// Cap of the growing open duration.
    pub max_open_duration: Duration,
    /// Probes admitted at once while half-open.
    pub half_open_probes: u32,
}

/// The three states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows; outcomes are counted.
    Closed,
    /// Traffic is rejected until the open duration ends.
    Open,
    /// A bounded number of probes is admitted.
    HalfOpen,
}

impl BreakerState {
    /// Name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What a call admitted by [`Breaker::try_acquire`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A normal request through a closed breaker.
    Normal,
    /// A half-open probe; its outcome decides the state.
    Probe,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    total: u32,
    failures: u32,
}

/// One endpoint's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    origin: Instant,
    consecutive: u32,
    buckets: [Bucket; WINDOW_BUCKETS],
    bucket_ms: u64,
    current: u64,
    /// Openings since the last close; drives the growth of the open duration.
    opens: u32,
    open_until: Instant,
    last_open_duration: Duration,
    probes_in_flight: u32,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig, now: Instant) -> Self {
        Breaker {
            cfg,
            state: BreakerState::Closed,
            origin: now,
            consecutive: 0,
            buckets: [Bucket::default(); WINDOW_BUCKETS],
            bucket_ms: (cfg.window.as_millis() as u64 / WINDOW_BUCKETS as u64).max(1),
            current: 0,
            opens: 0,
            open_until: now,
            last_open_duration: Duration::ZERO,
            probes_in_flight: 0,
        }
    }

    /// The current state (an expired open breaker still reports `Open` until someone asks to
    /// be admitted).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Probes currently admitted and not yet finished.
    pub fn probes_in_flight(&self) -> u32 {
        self.probes_in_flight
    }

    /// Duration chosen at the last opening.
    pub fn last_open_duration(&self) -> Duration {
        self.last_open_duration
    }

    /// Openings since the last close.
    pub fn opens(&self) -> u32 {
        self.opens
    }

    /// When an open breaker lets probes in.
    pub fn open_until(&self) -> Instant {
        self.open_until
    }

    /// Whether [`Breaker::try_acquire`] would admit a request now (no side effects).
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => now >= self.open_until,
            BreakerState::HalfOpen => self.probes_in_flight < self.cfg.half_open_probes,
        }
    }

    /// Admits a request, moving an expired open breaker to half-open. Returns the transition,
    /// if any, alongside the admission.
    pub fn try_acquire(&mut self, now: Instant) -> (Option<Admission>, Option<BreakerState>) {
        let mut transition = None;
        if self.state == BreakerState::Open && now >= self.open_until {
            self.state = BreakerState::HalfOpen;
            self.probes_in_flight = 0;
            transition = Some(BreakerState::HalfOpen);
        }
        let admission = match self.state {
            BreakerState::Closed => Some(Admission::Normal),
            BreakerState::Open => None,
            BreakerState::HalfOpen if self.probes_in_flight < self.cfg.half_open_probes => {
                self.probes_in_flight += 1;
                Some(Admission::Probe)
            }
            BreakerState::HalfOpen => None,
        };
        (admission, transition)
    }

    /// Records the outcome of an admitted request. `may_open` is false when opening would eject
    /// too many of the destination's endpoints; `jitter` is uniform in [0, 1). Returns the new
    /// state when it changed.
    pub fn on_result(
        &mut self,
        now: Instant,
        admission: Admission,
        ok: bool,
        may_open: bool,
        jitter: f64,
    ) -> Option<BreakerState> {
        match (admission, self.state) {
            (Admission::Probe, BreakerState::HalfOpen) => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                if ok {
                    self.close();
                    Some(BreakerState::Closed)
                } else {
                    self.open(now, jitter);
                    Some(BreakerState::Open)
                }
            }
            (Admission::Normal, BreakerState::Closed) => {
                self.record(now, ok);
                if !ok && may_open && self.should_trip() {
                    self.open(now, jitter);
                    Some(BreakerState::Open)
                } else {
                    None
                }
            }
            // A late result of a request admitted in an earlier state says nothing new.
            _ => None,
        }
    }

    /// A probe ended without an outcome (cancelled by the deadline or the client): free its
    /// slot so the half-open state cannot get stuck.
    pub fn release_probe(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    /// Whether the closed-state counters call for opening.
    pub fn should_trip(&self) -> bool {
        if self.consecutive >= self.cfg.consecutive_failures {
            return true;
        }
        let (total, failures) = self.window_totals();
        total >= self.cfg.min_requests
            && u64::from(failures) * 100
                >= u64::from(self.cfg.failure_rate_percent) * u64::from(total)
    }

    /// Requests and failures in the window.
    pub fn window_totals(&self) -> (u32, u32) {
        self.buckets.iter().fold((0, 0), |(t, f), b| {
            (t.saturating_add(b.total), f.saturating_add(b.failures))
        })
    }

    /// Failures in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// The open duration for the `n`-th opening (0-based) before jitter.
    pub fn open_duration_for(cfg: &BreakerConfig, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        cfg.open_duration
            .saturating_mul(factor)
            .min(cfg.max_open_duration)
    }

    fn record(&mut self, now: Instant, ok: bool) {
        let idx = now.saturating_duration_since(self.origin).as_millis() as u64 / self.bucket_ms;
        if idx > self.current {
            let steps = (idx - self.current).min(WINDOW_BUCKETS as u64);
            for i in 1..=steps {
                self.buckets[((self.current + i) % WINDOW_BUCKETS as u64) as usize] =
                    Bucket::default();
            }
            self.current = idx;
        }
        let b = &mut self.buckets[(self.current % WINDOW_BUCKETS as u64) as usize];
        b.total = b.total.saturating_add(1);
        if ok {
            self.consecutive = 0;
        } else {
            b.failures = b.failures.saturating_add(1);
            self.consecutive = self.consecutive.saturating_add(1);
        }
    }

    fn open(&mut self, now: Instant, jitter: f64) {
        let base = Self::open_duration_for(&self.cfg, self.opens);
        let jitter = jitter.clamp(0.0, 1.0) * JITTER_FRACTION;
        let d = base.mul_f64(1.0 - jitter);
        self.state = BreakerState::Open;
        self.opens = self.opens.saturating_add(1);
        self.open_until = now + d;
        self.last_open_duration = d;
        self.probes_in_flight = 0;
        self.reset_counters();
    }

    fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.opens = 0;
        self.probes_in_flight = 0;
        self.reset_counters();
    }

    fn reset_counters(&mut self) {
        self.consecutive = 0;
        self.buckets = [Bucket::default(); WINDOW_BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate_percent: 50,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_duration: Duration::from_secs(1),
            max_open_duration: Duration::from_secs(5),
            half_open_probes: 2,
        }
    }

    #[test]
    fn consecutive_failures_open_then_probe_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for i in 0..3 {
            let (a, _) = b.try_acquire(t0);
            let t = b.on_result(t0, a.unwrap(), false, true, 0.0);
            assert_eq!(t, (i == 2).then_some(BreakerState::Open));
        }
        assert_eq!(b.try_acquire(t0).0, None);
        let later = t0 + Duration::from_secs(1);
        let (a, t) = b.try_acquire(later);
        assert_eq!(
            (a, t),
            (Some(Admission::Probe), Some(BreakerState::HalfOpen))
        );
        assert_eq!(b.try_acquire(later).0, Some(Admission::Probe));
        assert_eq!(b.try_acquire(later).0, None, "bounded probes");
        assert_eq!(
            b.on_result(later, Admission::Probe, true, true, 0.0),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn failure_rate_needs_min_requests_and_growth_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for i in 0..10 {
            // Alternate so consecutive failures never reach 3: 50% failures.
            let ok = i % 2 == 0;
            let t = b.on_result(t0, Admission::Normal, ok, true, 0.0);
            assert_eq!(t, (i == 9).then_some(BreakerState::Open), "i={i}");
        }
        for n in 1..6u32 {
            assert_eq!(b.opens(), n);
            let now = b.open_until();
            b.try_acquire(now);
            b.on_result(now, Admission::Probe, false, true, 0.0);
            let want = Duration::from_secs(1 << n.min(20)).min(Duration::from_secs(5));
            assert_eq!(b.last_open_duration(), want);
        }
    }

    #[test]
    fn may_open_false_keeps_it_closed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..10 {
            assert_eq!(b.on_result(t0, Admission::Normal, false, false, 0.0), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
