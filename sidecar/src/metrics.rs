//! Prometheus metrics, hand-rolled on atomics: recording is a few relaxed atomic adds.
//!
//! The process-wide series are a fixed set. The outbound series per destination and shard
//! (`shardmesh_destination_*`, what the dashboard's per-destination panels read) take their
//! label values from routing, so their number is bounded: at most [`MAX_DESTINATION_SERIES`]
//! (destination, shard) pairs, the rest counted under `destination="_overflow"`; a destination
//! name is a registry name or, with pass-through, a host an application asked for. The shard-map
//! gauges (epoch, members) are read from the registry when scraped.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, RwLock,
    },
    time::Duration,
};

use http::StatusCode;

use crate::{
    breaker::BreakerState,
    discovery::{Destination, DestinationKind},
    hash::FnvBuild,
    retry::RetryReason,
};

/// Most (destination, shard) pairs with series of their own: a service of the CRD's maximum
/// (1,024 shards) fits four times over, and the memory stays under ~1 MiB.
pub const MAX_DESTINATION_SERIES: usize = 4096;

/// Destination label of the requests beyond [`MAX_DESTINATION_SERIES`].
pub const OVERFLOW_DESTINATION: &str = "_overflow";

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
    destinations: RwLock<HashMap<SeriesKey, Arc<DestinationSeries>, FnvBuild>>,
}

/// A (destination, shard) pair; `None` for destinations that are not sharded.
type SeriesKey = (Arc<str>, Option<u32>);

/// The outbound counters of one destination shard.
#[derive(Debug, Default)]
struct DestinationSeries {
    requests: [AtomicU64; 5],
    latency: Histogram,
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
    breaker_transitions: [AtomicU64; 3],
}

/// What the outbound proxy did for one finished request, by destination and shard.
#[derive(Clone, Copy, Debug)]
pub struct Outcome<'a> {
    /// The destination's name.
    pub destination: &'a Arc<str>,
    /// The shard the request was routed to, for sharded destinations.
    pub shard: Option<u32>,
    /// Response status.
    pub status: StatusCode,
    /// From request to the end of the response body.
    pub duration: Duration,
    /// Retries sent.
    pub retries: u32,
    /// Whether a retry was refused by the budget.
    pub budget_exhausted: bool,
}

/// `v` as a Prometheus label value (quote, backslash and newline escaped).
fn label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `destination="…",shard="…"` (an empty shard for destinations that are not sharded).
fn destination_labels(dest: &str, shard: Option<u32>) -> String {
    let mut l = String::with_capacity(dest.len() + 32);
    l.push_str("destination=\"");
    label_value(&mut l, dest);
    l.push_str("\",shard=\"");
    if let Some(s) = shard {
        let _ = write!(l, "{s}");
    }
    l.push('"');
    l
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

    /// A finished outbound request, by destination and shard.
    pub fn destination_request(&self, o: Outcome<'_>) {
        let series = self.destination_series(o.destination, o.shard);
        let class = (o.status.as_u16() / 100).clamp(1, 5) as usize - 1;
        series.requests[class].fetch_add(1, Relaxed);
        series.latency.observe(o.duration);
        if o.retries > 0 {
            series.retries.fetch_add(o.retries.into(), Relaxed);
        }
        if o.budget_exhausted {
            series.budget_exhausted.fetch_add(1, Relaxed);
        }
    }

    /// A breaker of an endpoint of `destination`'s `shard` moved to `to`.
    pub fn destination_breaker_transition(
        &self,
        destination: &Arc<str>,
        shard: Option<u32>,
        to: BreakerState,
    ) {
        self.breaker_transition(to);
        if let Some(i) = TRANSITIONS.iter().position(|t| *t == to) {
            self.destination_series(destination, shard)
                .breaker_transitions[i]
                .fetch_add(1, Relaxed);
        }
    }

    /// The series of a (destination, shard), made on first use while there is room.
    fn destination_series(&self, dest: &Arc<str>, shard: Option<u32>) -> Arc<DestinationSeries> {
        let key = (dest.clone(), shard);
        {
            let map = self.destinations.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = map.get(&key) {
                return s.clone();
            }
        }
        let mut map = self.destinations.write().unwrap_or_else(|e| e.into_inner());
        let key = if map.len() < MAX_DESTINATION_SERIES - 1 {
            key
        } else {
            (Arc::from(OVERFLOW_DESTINATION), None)
        };
        map.entry(key).or_default().clone()
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
        self.render_destinations(&mut out);
        out
    }

    /// The per-destination outbound series, sorted by destination and shard.
    fn render_destinations(&self, out: &mut String) {
        let mut all: Vec<(SeriesKey, Arc<DestinationSeries>)> = {
            let map = self.destinations.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let labels: Vec<String> = all
            .iter()
            .map(|((d, s), _)| destination_labels(d, *s))
            .collect();
        out.push_str("# HELP shardmesh_destination_requests_total Outbound requests, by destination, shard and status class.\n# TYPE shardmesh_destination_requests_total counter\n");
        for ((_, series), l) in all.iter().zip(&labels) {
            for (i, class) in CLASSES.iter().enumerate() {
                let v = series.requests[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "shardmesh_destination_requests_total{{{l},status_class=\"{class}\"}} {v}"
                );
            }
        }
        out.push_str("# HELP shardmesh_destination_request_duration_seconds Outbound time from request to end of response body, by destination and shard.\n# TYPE shardmesh_destination_request_duration_seconds histogram\n");
        for ((_, series), l) in all.iter().zip(&labels) {
            series
                .latency
                .render(out, "shardmesh_destination_request_duration_seconds", l);
        }
        out.push_str("# HELP shardmesh_destination_retries_total Outbound retries, by destination and shard.\n# TYPE shardmesh_destination_retries_total counter\n");
        for ((_, series), l) in all.iter().zip(&labels) {
            let v = series.retries.load(Relaxed);
            let _ = writeln!(out, "shardmesh_destination_retries_total{{{l}}} {v}");
        }
        out.push_str("# HELP shardmesh_destination_retry_budget_exhausted_total Outbound retries refused by the retry budget, by destination and shard.\n# TYPE shardmesh_destination_retry_budget_exhausted_total counter\n");
        for ((_, series), l) in all.iter().zip(&labels) {
            let v = series.budget_exhausted.load(Relaxed);
            let _ = writeln!(
                out,
                "shardmesh_destination_retry_budget_exhausted_total{{{l}}} {v}"
            );
        }
        out.push_str("# HELP shardmesh_destination_breaker_transitions_total Circuit breaker state changes of a destination shard's endpoints, by new state.\n# TYPE shardmesh_destination_breaker_transitions_total counter\n");
        for ((_, series), l) in all.iter().zip(&labels) {
            for (i, t) in TRANSITIONS.iter().enumerate() {
                let v = series.breaker_transitions[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "shardmesh_destination_breaker_transitions_total{{{l},to=\"{}\"}} {v}",
                    t.as_str()
                );
            }
        }
    }
}

/// The shard-map gauges of the sharded destinations this sidecar routes by: map epoch and live
/// members per shard (sorted by name).
pub fn render_shard_maps(out: &mut String, destinations: &[Arc<Destination>]) {
    let mut sharded: Vec<(&str, i64, Vec<usize>)> = destinations
        .iter()
        .filter_map(|d| match &d.kind {
            DestinationKind::Sharded { epoch, shards, .. } => {
                Some((&*d.name, *epoch, shards.iter().map(|m| m.len()).collect()))
            }
            DestinationKind::Endpoints(_) => None,
        })
        .collect();
    sharded.sort_by(|a, b| a.0.cmp(b.0));
    out.push_str("# HELP shardmesh_destination_map_epoch Epoch of the shard map a sharded destination is routed by.\n# TYPE shardmesh_destination_map_epoch gauge\n");
    for (name, epoch, _) in &sharded {
        out.push_str("shardmesh_destination_map_epoch{destination=\"");
        label_value(out, name);
        let _ = writeln!(out, "\"}} {epoch}");
    }
    out.push_str("# HELP shardmesh_destination_members Live members of each listed shard of a sharded destination, by its shard map.\n# TYPE shardmesh_destination_members gauge\n");
    for (name, _, members) in &sharded {
        for (shard, n) in members.iter().enumerate() {
            let l = destination_labels(name, Some(shard as u32));
            let _ = writeln!(out, "shardmesh_destination_members{{{l}}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(destination: &Arc<str>, shard: Option<u32>) -> Outcome<'_> {
        Outcome {
            destination,
            shard,
            status: StatusCode::OK,
            duration: Duration::from_millis(3),
            retries: 0,
            budget_exhausted: false,
        }
    }

    #[test]
    fn destination_series_are_bounded() {
        let m = Metrics::default();
        let names: Vec<Arc<str>> = (0..MAX_DESTINATION_SERIES + 100)
            .map(|i| Arc::from(format!("host-{i}:80")))
            .collect();
        for n in &names {
            m.destination_request(outcome(n, None));
        }
        let series = m.destinations.read().expect("lock").len();
        assert_eq!(series, MAX_DESTINATION_SERIES);
        let text = m.render();
        // The first ones keep their own series; the rest are counted together.
        assert!(text.contains("shardmesh_destination_requests_total{destination=\"host-0:80\",shard=\"\",status_class=\"2xx\"} 1\n"));
        let overflow = 100 + 1;
        assert!(
            text.contains(&format!("shardmesh_destination_requests_total{{destination=\"_overflow\",shard=\"\",status_class=\"2xx\"}} {overflow}\n")),
            "overflow not counted"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        let odd: Arc<str> = Arc::from("a\"b\\c\nd");
        m.destination_request(outcome(&odd, Some(3)));
        let text = m.render();
        assert!(
            text.contains("destination=\"a\\\"b\\\\c\\nd\",shard=\"3\",status_class=\"2xx\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn retries_budget_and_breaker_by_shard() {
        let m = Metrics::default();
        let d: Arc<str> = Arc::from("users:80");
        m.destination_request(Outcome {
            retries: 2,
            budget_exhausted: true,
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..outcome(&d, Some(1))
        });
        m.destination_breaker_transition(&d, Some(1), BreakerState::Open);
        let t = m.render();
        for line in [
            "shardmesh_destination_requests_total{destination=\"users:80\",shard=\"1\",status_class=\"5xx\"} 1\n",
            "shardmesh_destination_retries_total{destination=\"users:80\",shard=\"1\"} 2\n",
            "shardmesh_destination_retry_budget_exhausted_total{destination=\"users:80\",shard=\"1\"} 1\n",
            "shardmesh_destination_breaker_transitions_total{destination=\"users:80\",shard=\"1\",to=\"open\"} 1\n",
            "shardmesh_destination_request_duration_seconds_bucket{destination=\"users:80\",shard=\"1\",le=\"0.005\"} 1\n",
            // The process-wide breaker count moves too.
            "shardmesh_breaker_transitions_total{to=\"open\"} 1\n",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
    }
}
