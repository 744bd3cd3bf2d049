//! Prometheus metrics, hand-rolled on atomics: a fixed set of series (no label values from
//! requests), so memory is constant and recording is a few relaxed atomic adds.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use http::StatusCode;

use crate::{breaker::BreakerState, retry::RetryReason};

/// Latency histogram bucket bounds, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Which proxy a request went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the network to the application.
    Inbound,
    /// From the application to other services.
    Outbound,
}

impl Direction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const TRANSITIONS: [BreakerState; 3] = [
    BreakerState::Open,
    BreakerState::HalfOpen,
    BreakerState::Closed,
];

/// All counters of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; 5]; 2],
    latency: [Histogram; 2],
    upstream_attempts: AtomicU64,
    retries: [AtomicU64; RetryReason::ALL.len()],
    budget_exhausted: AtomicU64,
    breaker_transitions: [AtomicU64; 3],
    shed: AtomicU64,
    access_log_dropped: AtomicU64,
    misdirected: AtomicU64,
    redirects: [AtomicU64; 2],
    handoffs: [AtomicU64; HandoffKind::ALL.len()],
}

/// What a handoff step did (see `ownership.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffKind {
    /// A read that missed on this (new) owner was served by the previous owner.
    Read,
    /// A delete of a moved key was applied on the previous owner first.
    Delete,
    /// This (previous) owner served a handoff request from a new owner.
    Served,
    /// The previous owner could not be reached or failed.
    Failed,
}

impl HandoffKind {
    /// Every kind, in metric order.
    pub const ALL: [HandoffKind; 4] = [
        HandoffKind::Read,
        HandoffKind::Delete,
        HandoffKind::Served,
        HandoffKind::Failed,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffKind::Read => "read",
            HandoffKind::Delete => "delete",
            HandoffKind::Served => "served",
            HandoffKind::Failed => "failed",
        }
    }
}

impl Metrics {
    /// A finished request (response body done), with its total duration.
    pub fn request(&self, dir: Direction, status: StatusCode, duration: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[dir.index()][class].fetch_add(1, Relaxed);
        self.latency[dir.index()].observe(duration);
    }

    /// One attempt sent upstream by the outbound proxy.
    pub fn upstream_attempt(&self) {
        self.upstream_attempts.fetch_add(1, Relaxed);
    }

    /// One retry, by reason.
    pub fn retry(&self, reason: RetryReason) {
        self.retries[reason.index()].fetch_add(1, Relaxed);
    }

    /// A retry refused by the budget.
    pub fn budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Relaxed);
    }

    /// A breaker moved to `to`.
    pub fn breaker_transition(&self, to: BreakerState) {
        if let Some(i) = TRANSITIONS.iter().position(|t| *t == to) {
            self.breaker_transitions[i].fetch_add(1, Relaxed);
        }
    }

    /// A request shed by the inbound bulkhead.
    pub fn shed(&self) {
        self.shed.fetch_add(1, Relaxed);
    }

    /// An inbound request for a key of another shard, answered 421.
    pub fn misdirected(&self) {
        self.misdirected.fetch_add(1, Relaxed);
    }

    /// A 421 from a peer sidecar: retried once on the owner, or returned as is.
    pub fn redirect(&self, retried: bool) {
        self.redirects[usize::from(!retried)].fetch_add(1, Relaxed);
    }

    /// A handoff step.
    pub fn handoff(&self, kind: HandoffKind) {
        if let Some(i) = HandoffKind::ALL.iter().position(|k| *k == kind) {
            self.handoffs[i].fetch_add(1, Relaxed);
        }
    }

    /// A log line dropped because the writer fell behind.
    pub fn access_log_dropped(&self) {
        self.access_log_dropped.fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        out.push_str("# HELP shardmesh_requests_total Requests handled, by direction and status class.\n# TYPE shardmesh_requests_total counter\n");
        for dir in [Direction::Inbound, Direction::Outbound] {
            for (i, class) in CLASSES.iter().enumerate() {
                let v = self.requests[dir.index()][i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "shardmesh_requests_total{{direction=\"{}\",status_class=\"{class}\"}} {v}",
                    dir.as_str()
                );
            }
        }
        out.push_str("# HELP shardmesh_request_duration_seconds Time from request to end of response body.\n# TYPE shardmesh_request_duration_seconds histogram\n");
        for dir in [Direction::Inbound, Direction::Outbound] {
            self.latency[dir.index()].render(
                &mut out,
                "shardmesh_request_duration_seconds",
                &format!("direction=\"{}\"", dir.as_str()),
            );
        }
        let _ = writeln!(out, "# HELP shardmesh_upstream_attempts_total Attempts sent upstream by the outbound proxy, retries included.\n# TYPE shardmesh_upstream_attempts_total counter\nshardmesh_upstream_attempts_total {}", self.upstream_attempts.load(Relaxed));
        out.push_str("# HELP shardmesh_retries_total Retries, by the failure that caused them.\n# TYPE shardmesh_retries_total counter\n");
        for r in RetryReason::ALL {
            let _ = writeln!(
                out,
                "shardmesh_retries_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.retries[r.index()].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP shardmesh_retry_budget_exhausted_total Retries refused because the retry budget was spent.\n# TYPE shardmesh_retry_budget_exhausted_total counter\nshardmesh_retry_budget_exhausted_total {}", self.budget_exhausted.load(Relaxed));
        out.push_str("# HELP shardmesh_breaker_transitions_total Circuit breaker state changes, by new state.\n# TYPE shardmesh_breaker_transitions_total counter\n");
        for (i, t) in TRANSITIONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "shardmesh_breaker_transitions_total{{to=\"{}\"}} {}",
                t.as_str(),
                self.breaker_transitions[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP shardmesh_shed_total Inbound requests shed by the concurrency limit (503).\n# TYPE shardmesh_shed_total counter\nshardmesh_shed_total {}", self.shed.load(Relaxed));
        let _ = writeln!(out, "# HELP shardmesh_misdirected_total Inbound requests for keys of another shard, answered 421.\n# TYPE shardmesh_misdirected_total counter\nshardmesh_misdirected_total {}", self.misdirected.load(Relaxed));
        out.push_str("# HELP shardmesh_redirects_total 421 answers from a peer sidecar, retried once on the owning shard or returned.\n# TYPE shardmesh_redirects_total counter\n");
        for (i, outcome) in ["retried", "returned"].iter().enumerate() {
            let _ = writeln!(
                out,
                "shardmesh_redirects_total{{outcome=\"{outcome}\"}} {}",
                self.redirects[i].load(Relaxed)
            );
        }
        out.push_str("# HELP shardmesh_handoff_total Handoff steps during a resharding window, by kind.\n# TYPE shardmesh_handoff_total counter\n");
        for (i, k) in HandoffKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "shardmesh_handoff_total{{kind=\"{}\"}} {}",
                k.as_str(),
                self.handoffs[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP shardmesh_log_lines_dropped_total Log lines dropped because stdout fell behind.\n# TYPE shardmesh_log_lines_dropped_total counter\nshardmesh_log_lines_dropped_total {}", self.access_log_dropped.load(Relaxed));
        out
    }
}
