//! The one Lease rule of shardmesh: shard leaders (sidecar), the operator's own election and
//! membership renewal all time their Leases from here, so every holder and every observer
//! agrees on what "expired" means.
//!
//! - **Liveness is judged on the observer's own monotonic clock** (as client-go does): a held
//!   Lease is expired once its record (holder, renew time, transitions) has stayed unchanged
//!   for its `leaseDurationSeconds`, measured from when this observer first saw that record.
//!   No two machines need agreeing wall clocks; `renewTime` is only compared for equality.
//! - **A holder's claim lapses by itself**: a holder may act as holder only until the start of
//!   its last successful renewal plus the renew deadline (two thirds of the duration), whatever
//!   API calls are still pending. An observer cannot see the renewal before it started, so it
//!   cannot consider the Lease expired before start + duration: the claim ends at least a third
//!   of the duration (the margin) before anyone else may take over, as long as the two
//!   monotonic clocks do not drift apart by that much during one duration.
//! - Every API call of a holder is bounded by [`Timing::call_timeout`], well under the renew
//!   deadline, so a black-holed API server only delays the next attempt.

use std::time::{Duration, Instant};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};

/// The timings derived from a Lease duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `leaseDurationSeconds`: how long an unchanged record stays live for observers.
    pub duration: Duration,
}

impl Timing {
    /// Timings of a Lease of `duration`.
    pub fn new(duration: Duration) -> Timing {
        Timing { duration }
    }

    /// Interval between a holder's renewals: a third of the duration.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// How long after the start of its last successful renewal a holder may still act: two
    /// thirds of the duration. The remaining third is the safety margin.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// The margin between a lapsed claim and the earliest takeover.
    pub fn margin(&self) -> Duration {
        self.duration - self.renew_deadline()
    }

    /// How often candidates look at the Lease: a tenth of the duration, 500 ms to 2 s.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 10).clamp(Duration::from_millis(500), Duration::from_secs(2))
    }

    /// Upper bound of one API call: a quarter of the duration, at least 1 s. A hung call then
    /// costs one attempt, never the claim's correctness (the claim lapses on its own timer).
    pub fn call_timeout(&self) -> Duration {
        (self.duration / 4).max(Duration::from_secs(1))
    }

    /// Until when a holder whose renewal started at `renew_started` (and succeeded) may act.
    pub fn claim_until(&self, renew_started: Instant) -> Instant {
        renew_started + self.renew_deadline()
    }
}

/// What an observer compares to decide whether a Lease changed: holder, renew time and
/// transitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `holderIdentity` (absent or empty: released).
    pub holder: Option<String>,
    /// `renewTime`, compared for equality only.
    pub renew: Option<Timestamp>,
    /// `leaseTransitions`.
    pub transitions: i32,
}

impl Record {
    /// The record of `lease`.
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.as_ref();
        Record {
            holder: holder(lease).map(str::to_string),
            renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
        }
    }
}

/// The holder of `lease`, if any (empty means released).
pub fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// `leaseDurationSeconds` of `lease` (at least 1 s; absent counts as 1 s).
pub fn duration_of(lease: &Lease) -> Duration {
    let secs = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(1)
        .max(1);
    Duration::from_secs(u64::try_from(secs).unwrap_or(1))
}

/// The liveness rule: a Lease with a holder is live until its record has been unchanged for
/// its duration on the observer's clock; a Lease without a holder is free.
pub fn expired(lease: &Lease, unchanged_for: Duration) -> bool {
    holder(lease).is_none() || unchanged_for >= duration_of(lease)
}

/// Since when (on this observer's monotonic clock) the record of one Lease is unchanged.
#[derive(Clone, Debug, Default)]
pub struct Observer {
    seen: Option<(Record, Instant)>,
}

impl Observer {
    /// Records `lease` as read at `now`; returns how long its record has been unchanged.
    pub fn observe(&mut self, lease: &Lease, now: Instant) -> Duration {
        let rec = Record::of(lease);
        let since = match &self.seen {
            Some((r, at)) if *r == rec => *at,
            _ => now,
        };
        self.seen = Some((rec, since));
        now.saturating_duration_since(since)
    }

    /// The record last observed, if any.
    pub fn record(&self) -> Option<&Record> {
        self.seen.as_ref().map(|(r, _)| r)
    }

    /// Forgets what was seen (a deleted Lease, or one we wrote ourselves).
    pub fn reset(&mut self) {
        self.seen = None;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };

    use super::*;

    fn lease(holder: Option<&str>, renew_s: i64, transitions: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(
                    Timestamp::from_second(renew_s).unwrap_or(Timestamp::UNIX_EPOCH),
                )),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn timings_keep_the_claim_a_margin_ahead_of_any_takeover() {
        let t = Timing::new(Duration::from_secs(15));
        assert_eq!(t.renew_interval(), Duration::from_secs(5));
        assert_eq!(t.renew_deadline(), Duration::from_secs(10));
        assert_eq!(t.margin(), Duration::from_secs(5));
        assert_eq!(t.retry_period(), Duration::from_millis(1500));
        assert!(t.call_timeout() < t.renew_interval());
        assert!(t.call_timeout() < t.renew_deadline());
        let start = Instant::now();
        // The observer saw the renewal at the earliest when it started: takeover at start + 15 s.
        assert_eq!(t.claim_until(start) + t.margin(), start + t.duration);
        assert_eq!(
            Timing::new(Duration::from_secs(300)).retry_period(),
            Duration::from_secs(2)
        );
        assert_eq!(
            Timing::new(Duration::from_secs(3)).call_timeout(),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn liveness_is_an_unchanged_record_on_the_observers_clock() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        let a = lease(Some("a"), 100, 3);
        assert_eq!(o.observe(&a, t0), Duration::ZERO);
        // The same record later: unchanged for 14 s, then 15 s.
        assert!(!expired(&a, o.observe(&a, t0 + Duration::from_secs(14))));
        assert!(expired(&a, o.observe(&a, t0 + Duration::from_secs(15))));
        // A renewal (new renewTime, whatever its value: wall clocks are never compared) resets.
        let renewed = lease(Some("a"), 50, 3);
        assert_eq!(
            o.observe(&renewed, t0 + Duration::from_secs(16)),
            Duration::ZERO
        );
        assert!(!expired(&renewed, Duration::ZERO));
        // Released Leases are free at once.
        assert!(expired(&lease(None, 100, 3), Duration::ZERO));
        assert!(expired(&lease(Some(""), 100, 3), Duration::ZERO));
        o.reset();
        assert_eq!(
            o.observe(&renewed, t0 + Duration::from_secs(40)),
            Duration::ZERO
        );
    }
}
