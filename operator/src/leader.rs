//! Leader election over a `coordination.k8s.io/v1` Lease, so the controller can run with a hot
//! standby: exactly one replica reconciles; when it dies the standby takes over once the Lease
//! expires (its duration), and when it shuts down cleanly it releases the Lease at once.
//!
//! The rules are the shared ones of `shardmesh_api::lease`: a standby judges expiry on its own
//! monotonic clock (the holder's record unchanged for a whole duration since the standby first
//! saw it), never by comparing the holder's `renewTime` with its own wall clock, so clock skew
//! between nodes cannot give two active controllers. The holder's claim lapses on a local timer
//! two thirds of a duration after the start of its last successful renewal, whatever call is
//! pending, and every call is bounded; [`Elector::hold`] returns at that point and the process
//! stops reconciling.
//!
//! Writes use the Lease's resourceVersion (optimistic concurrency): two candidates racing for an
//! expired Lease cannot both win.

use std::{sync::Mutex, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{PostParams, ResourceExt},
    Api, Client,
};
use shardmesh_api::lease::{self, Observer, Timing};
use tokio::time::Instant;
use tracing::{info, warn};

/// Where and as whom to campaign.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This candidate's identity (pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal: the longest a dead leader blocks takeover.
    pub duration: Duration,
    /// Renewal interval; well under `duration` so one slow renewal does not lose leadership.
    pub renew: Duration,
}

/// What a candidate should do given the current Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease, an expired one, or a released one: take it (a new term).
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it for at least this long on our clock.
    Wait(Duration),
}

/// Pure decision for candidate `me`; `unchanged_for` is how long this candidate has seen the
/// Lease's record unchanged (see [`Observer`]).
pub fn decide(current: Option<&Lease>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(current) = current else {
        return Decision::Acquire;
    };
    match lease::holder(current) {
        Some(h) if h == me => Decision::Renew,
        _ if lease::expired(current, unchanged_for) => Decision::Acquire,
        _ => Decision::Wait(lease::duration_of(current).saturating_sub(unchanged_for)),
    }
}

/// The Lease body for `me` taking or renewing the term.
pub fn next_lease(current: Option<&Lease>, cfg: &LeaderConfig, now: Timestamp) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let prev = lease.spec.take().unwrap_or_default();
    let renewing = prev.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let secs = i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(secs),
        acquire_time: if renewing {
            prev.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            prev.lease_transitions.unwrap_or(0) + i32::from(!renewing && current.is_some()),
        ),
        ..LeaseSpec::default()
    });
    lease
}

/// Why one attempt did not settle leadership.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The API answered with an error.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// No answer within the call timeout.
    #[error("no answer from the API server within {0:?}")]
    TimedOut(Duration),
}

/// A candidate for leadership.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    timing: Timing,
    observer: Mutex<Observer>,
}

impl Elector {
    /// A candidate campaigning for `cfg.name` in `cfg.namespace`.
    pub fn new(client: Client, cfg: LeaderConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            timing: Timing::new(cfg.duration),
            cfg,
            observer: Mutex::new(Observer::default()),
        }
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = kube::Result<T>>,
    ) -> Result<T, AttemptError> {
        let limit = self.timing.call_timeout();
        match tokio::time::timeout(limit, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(AttemptError::TimedOut(limit)),
        }
    }

    fn observe(&self, current: Option<&Lease>) -> Duration {
        let mut o = self.observer.lock().unwrap_or_else(|e| e.into_inner());
        match current {
            Some(l) => o.observe(l, Instant::now().into_std()),
            None => {
                o.reset();
                Duration::ZERO
            }
        }
    }

    /// One attempt to acquire or renew. `Ok(Some(until))`: we lead until `until` (the claim
    /// counts from before the write); `Ok(None)`: someone else leads.
    async fn try_lead(&self) -> Result<Option<Instant>, AttemptError> {
        let current = self.bounded(self.api.get_opt(&self.cfg.name)).await?;
        let unchanged = self.observe(current.as_ref());
        match decide(current.as_ref(), &self.cfg.identity, unchanged) {
            Decision::Wait(_) => Ok(None),
            Decision::Acquire | Decision::Renew => {
                let started = Instant::now();
                let body = next_lease(current.as_ref(), &self.cfg, Timestamp::now());
                let res = match &current {
                    None => {
                        self.bounded(self.api.create(&PostParams::default(), &body))
                            .await
                    }
                    // Replace carries the resourceVersion we read: a concurrent writer makes it 409.
                    Some(_) => {
                        self.bounded(self.api.replace(
                            &self.cfg.name,
                            &PostParams::default(),
                            &body,
                        ))
                        .await
                    }
                };
                match res {
                    Ok(_) => Ok(Some(Instant::from_std(
                        self.timing.claim_until(started.into_std()),
                    ))),
                    Err(AttemptError::Api(kube::Error::Api(s))) if s.code == 409 => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Returns once this candidate leads, with the instant its claim lapses unless renewed.
    /// Logs who holds the Lease while waiting.
    pub async fn acquire(&self) -> Instant {
        let mut announced = String::new();
        loop {
            match self.try_lead().await {
                Ok(Some(until)) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "acquired leadership");
                    return until;
                }
                Ok(None) => {
                    let holder = self
                        .bounded(self.api.get_opt(&self.cfg.name))
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec.and_then(|s| s.holder_identity))
                        .unwrap_or_default();
                    if holder != announced {
                        info!(leader = %holder, "standing by: another replica leads");
                        announced = holder;
                    }
                }
                Err(e) => warn!(error = %e, "leader election: cannot read or write the Lease"),
            }
            tokio::time::sleep(self.cfg.renew).await;
        }
    }

    /// Renews until leadership is lost: another holder took the Lease, or the claim lapsed
    /// (no renewal succeeded in time; past that a standby may soon consider it expired). The
    /// claim's timer runs whatever call is pending, so this returns in time even when the API
    /// server does not answer at all.
    pub async fn hold(&self, mut until: Instant) {
        loop {
            let renew = async {
                tokio::time::sleep(self.cfg.renew).await;
                self.try_lead().await
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    warn!(deadline = ?self.timing.renew_deadline(),
                          "leadership lost: could not renew the Lease in time");
                    return;
                }
                r = renew => match r {
                    Ok(Some(next)) => until = next,
                    Ok(None) => {
                        warn!("leadership lost to another replica");
                        return;
                    }
                    Err(e) => warn!(error = %e, "renewing the leader Lease failed"),
                },
            }
        }
    }

    /// Gives the Lease up (clean shutdown) so a standby takes over without waiting for expiry.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.bounded(self.api.get_opt(&self.cfg.name)).await else {
            return;
        };
        if lease::holder(&lease) != Some(self.cfg.identity.as_str()) {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        match self
            .bounded(
                self.api
                    .replace(&lease.name_any(), &PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => info!("released leadership"),
            Err(e) => {
                warn!(error = %e, "could not release the leader Lease; it expires on its own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn cfg(me: &str) -> LeaderConfig {
        LeaderConfig {
            namespace: "ns".into(),
            name: "leader".into(),
            identity: me.into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }

    #[test]
    fn acquire_renew_wait_and_take_over_on_the_standbys_clock() {
        let t0 = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000);
        assert_eq!(decide(None, "a", Duration::ZERO), Decision::Acquire);
        let a = next_lease(None, &cfg("a"), t0);
        assert_eq!(a.spec.as_ref().and_then(|s| s.lease_transitions), Some(0));
        assert_eq!(decide(Some(&a), "a", Duration::ZERO), Decision::Renew);
        assert_eq!(
            decide(Some(&a), "b", Duration::from_secs(5)),
            Decision::Wait(Duration::from_secs(10))
        );
        // a renews: b's observer sees a new record and waits a full duration again.
        let t5 = t0 + SignedDuration::from_secs(5);
        let a2 = next_lease(Some(&a), &cfg("a"), t5);
        assert_eq!(
            a2.spec.as_ref().and_then(|s| s.acquire_time.clone()),
            Some(MicroTime(t0))
        );
        let mut b = Observer::default();
        let start = std::time::Instant::now();
        b.observe(&a, start);
        let seen = b.observe(&a2, start + Duration::from_secs(5));
        assert_eq!(seen, Duration::ZERO);
        // a dies: after a whole duration unchanged on b's clock, b takes over, a new term.
        let later = b.observe(&a2, start + Duration::from_secs(20));
        assert_eq!(decide(Some(&a2), "b", later), Decision::Acquire);
        let t21 = t0 + SignedDuration::from_secs(21);
        let next = next_lease(Some(&a2), &cfg("b"), t21);
        let spec = next.spec.as_ref().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(t21)));
    }

    #[test]
    fn clock_skew_never_shortens_the_wait() {
        // The holder's wall clock is an hour behind: its renewTime looks long expired, but the
        // standby only counts how long the record has been unchanged on its own clock.
        let skewed = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000);
        let a = next_lease(None, &cfg("a"), skewed);
        assert_eq!(
            decide(Some(&a), "b", Duration::from_secs(1)),
            Decision::Wait(Duration::from_secs(14))
        );
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let t0 = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000);
        let mut a = next_lease(None, &cfg("a"), t0);
        if let Some(s) = a.spec.as_mut() {
            s.holder_identity = None;
        }
        assert_eq!(decide(Some(&a), "b", Duration::ZERO), Decision::Acquire);
    }

    /// An API server that never answers: `hold` returns when the claim lapses, with the
    /// renewal call still pending.
    #[tokio::test(start_paused = true)]
    async fn hold_returns_on_its_timer_when_the_api_never_answers() {
        use kube::client::Body;
        let (svc, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let elector = Elector::new(Client::new(svc, "ns"), cfg("a"));
        let held = tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some((_, send)) = handle.next_request().await {
                pending.push(send);
            }
        });
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(10);
        elector.hold(until).await;
        assert_eq!(
            Instant::now(),
            until,
            "returned exactly when the claim lapsed"
        );
        held.abort();
    }
}
