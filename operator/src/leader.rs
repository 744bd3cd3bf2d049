//! Leader election over a `coordination.k8s.io/v1` Lease, so the controller can run with a hot
//! standby: exactly one replica reconciles; when it dies the standby takes over once the Lease
//! expires (its duration), and when it shuts down cleanly it releases the Lease at once.
//!
//! Writes use the Lease's resourceVersion (optimistic concurrency): two candidates racing for an
//! expired Lease cannot both win.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{PostParams, ResourceExt},
    Api, Client,
};
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
    /// Someone else holds it until at least this long from now.
    Wait(Duration),
}

/// Pure decision for candidate `me` at `now`.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(0).into());
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let expires = renewed.saturating_add(duration).unwrap_or(renewed);
    if expires <= now {
        Decision::Acquire
    } else {
        let left = now.duration_until(expires);
        Decision::Wait(Duration::try_from(left).unwrap_or(Duration::ZERO))
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

/// A candidate for leadership.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
}

impl Elector {
    /// A candidate campaigning for `cfg.name` in `cfg.namespace`.
    pub fn new(client: Client, cfg: LeaderConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One attempt to acquire or renew. `Ok(true)`: we lead for at least `duration` from now.
    async fn try_lead(&self) -> kube::Result<(bool, Option<Duration>)> {
        let current = self.api.get_opt(&self.cfg.name).await?;
        let now = Timestamp::now();
        match decide(current.as_ref(), &self.cfg.identity, now) {
            Decision::Wait(left) => Ok((false, Some(left))),
            Decision::Acquire | Decision::Renew => {
                let body = next_lease(current.as_ref(), &self.cfg, now);
                let res = match &current {
                    None => self.api.create(&PostParams::default(), &body).await,
                    // Replace carries the resourceVersion we read: a concurrent writer makes it 409.
                    Some(_) => {
                        self.api
                            .replace(&self.cfg.name, &PostParams::default(), &body)
                            .await
                    }
                };
                match res {
                    Ok(_) => Ok((true, None)),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, None)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Returns once this candidate leads. Logs who holds the Lease while waiting.
    pub async fn acquire(&self) {
        let mut announced = String::new();
        loop {
            match self.try_lead().await {
                Ok((true, _)) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "acquired leadership");
                    return;
                }
                Ok((false, _)) => {
                    let holder = self
                        .api
                        .get_opt(&self.cfg.name)
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

    /// Renews until leadership is lost: another holder took the Lease, or no renewal succeeded
    /// for two thirds of the duration (past that a standby may already consider it expired).
    pub async fn hold(&self) {
        let deadline = self.cfg.duration.mul_f64(2.0 / 3.0);
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew).await;
            match self.try_lead().await {
                Ok((true, _)) => last_ok = tokio::time::Instant::now(),
                Ok((false, _)) => {
                    warn!("leadership lost to another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the leader Lease failed"),
            }
            if last_ok.elapsed() > deadline {
                warn!(
                    after_s = last_ok.elapsed().as_secs(),
                    "leadership lost: could not renew the Lease in time"
                );
                return;
            }
        }
    }

    /// Gives the Lease up (clean shutdown) so a standby takes over without waiting for expiry.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.cfg.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        match self
            .api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
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
    fn acquire_renew_wait_and_take_over() {
        let t0 = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000);
        assert_eq!(decide(None, "a", t0), Decision::Acquire);
        let a = next_lease(None, &cfg("a"), t0);
        assert_eq!(a.spec.as_ref().and_then(|s| s.lease_transitions), Some(0));
        assert_eq!(decide(Some(&a), "a", t0), Decision::Renew);
        let t5 = t0 + SignedDuration::from_secs(5);
        assert_eq!(
            decide(Some(&a), "b", t5),
            Decision::Wait(Duration::from_secs(10))
        );
        // a renews at t5: b must wait the full duration again.
        let a2 = next_lease(Some(&a), &cfg("a"), t5);
        assert_eq!(
            a2.spec.as_ref().and_then(|s| s.acquire_time.clone()),
            Some(MicroTime(t0))
        );
        let t16 = t0 + SignedDuration::from_secs(16);
        assert_eq!(
            decide(Some(&a2), "b", t16),
            Decision::Wait(Duration::from_secs(4))
        );
        // a dies: after expiry b takes over, a new term.
        let t21 = t0 + SignedDuration::from_secs(21);
        assert_eq!(decide(Some(&a2), "b", t21), Decision::Acquire);
        let b = next_lease(Some(&a2), &cfg("b"), t21);
        let spec = b.spec.as_ref().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(t21)));
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let t0 = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000);
        let mut a = next_lease(None, &cfg("a"), t0);
        if let Some(s) = a.spec.as_mut() {
            s.holder_identity = None;
        }
        assert_eq!(decide(Some(&a), "b", t0), Decision::Acquire);
    }
}
