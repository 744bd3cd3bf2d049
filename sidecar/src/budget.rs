//! Retry budget: retries may add at most `percent`% of the request rate over a sliding window,
//! plus a small floor so low-traffic clients can still retry.
//!
//! Why a budget and not only `maxAttempts`: during an outage every request fails, and with three
//! attempts each the load on the struggling upstream triples. With the budget, load grows by at
//! most `percent`% (plus the floor), whatever `maxAttempts` says.
//!
//! The window is a ring of [`BUCKETS`] counters (bounded memory, O(1) per request). The
//! arithmetic lives in [`BudgetWindow`], which takes time as an argument so it can be
//! property-tested; [`RetryBudget`] adds the clock and a lock.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Number of buckets in the sliding window.
pub const BUCKETS: usize = 10;

/// Length of the sliding window. Ten seconds smooths bursts without remembering old outages.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Budget parameters (from `resilience.retries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Retries allowed as a percentage of requests in the window (0-100).
    pub percent: u32,
    /// Retries per second always allowed; the floor is this times the window in seconds.
    pub min_per_second: u32,
    /// Window length.
    pub window: Duration,
}

impl BudgetConfig {
    /// Retries allowed regardless of traffic in one window.
    pub fn floor(&self) -> u64 {
        u64::from(self.min_per_second) * self.window.as_secs().max(1)
    }

    /// Retries allowed in a window that saw `requests` requests.
    pub fn allowance(&self, requests: u64) -> u64 {
        self.floor() + requests.saturating_mul(u64::from(self.percent)) / 100
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    requests: u64,
    retries: u64,
}

/// The window arithmetic, clocked by the caller in milliseconds.
#[derive(Clone, Debug)]
pub struct BudgetWindow {
    cfg: BudgetConfig,
    buckets: [Bucket; BUCKETS],
    bucket_ms: u64,
    /// Absolute index (time / bucket_ms) of the newest bucket.
    current: u64,
}

impl BudgetWindow {
    /// An empty window.
    pub fn new(cfg: BudgetConfig) -> Self {
        let bucket_ms = (cfg.window.as_millis() as u64 / BUCKETS as u64).max(1);
        BudgetWindow {
            cfg,
            buckets: [Bucket::default(); BUCKETS],
            bucket_ms,
            current: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> BudgetConfig {
        self.cfg
    }

    /// Expires buckets older than the window. Time never goes backwards here: an earlier
    /// `now_ms` counts into the newest bucket.
    fn advance(&mut self, now_ms: u64) {
        let idx = now_ms / self.bucket_ms;
        if idx <= self.current {
            return;
        }
        let steps = (idx - self.current).min(BUCKETS as u64);
        for i in 1..=steps {
            self.buckets[((self.current + i) % BUCKETS as u64) as usize] = Bucket::default();
        }
        self.current = idx;
    }

    fn newest(&mut self) -> &mut Bucket {
        &mut self.buckets[(self.current % BUCKETS as u64) as usize]
    }

    /// Counts one request (every original request, not retries).
    pub fn deposit(&mut self, now_ms: u64) {
        self.advance(now_ms);
        self.newest().requests += 1;
    }

    /// Takes one retry from the budget if the window allows it.
    pub fn try_withdraw(&mut self, now_ms: u64) -> bool {
        self.advance(now_ms);
        let (requests, retries) = self.totals();
        if retries < self.cfg.allowance(requests) {
            self.newest().retries += 1;
            true
        } else {
            false
        }
    }

    /// Requests and retries currently in the window.
    pub fn totals(&self) -> (u64, u64) {
        self.buckets
            .iter()
            .fold((0, 0), |(q, r), b| (q + b.requests, r + b.retries))
    }
}

/// The process-wide retry budget of the outbound side.
#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    window: Mutex<BudgetWindow>,
}

impl RetryBudget {
    /// A budget with `cfg`.
    pub fn new(cfg: BudgetConfig) -> Self {
        RetryBudget {
            start: Instant::now(),
            window: Mutex::new(BudgetWindow::new(cfg)),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Counts a request.
    pub fn deposit(&self) {
        let now = self.now_ms();
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deposit(now);
    }

    /// Takes a retry if allowed.
    pub fn try_withdraw(&self) -> bool {
        let now = self.now_ms();
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_withdraw(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(percent: u32, min_per_second: u32) -> BudgetConfig {
        BudgetConfig {
            percent,
            min_per_second,
            window: WINDOW,
        }
    }

    #[test]
    fn twenty_percent_plus_floor() {
        let mut w = BudgetWindow::new(cfg(20, 1));
        for _ in 0..100 {
            w.deposit(0);
        }
        let granted = (0..1000).filter(|_| w.try_withdraw(0)).count();
        assert_eq!(granted, 20 + 10);
    }

    #[test]
    fn old_buckets_expire() {
        let mut w = BudgetWindow::new(cfg(0, 1));
        assert_eq!((0..100).filter(|_| w.try_withdraw(0)).count(), 10);
        assert!(!w.try_withdraw(9_999));
        assert!(w.try_withdraw(10_000), "the first bucket left the window");
    }
}
