//! Per-shard leader election over the Lease `<service>-<shard>-leader`.
//!
//! The operator creates one leader Lease per shard (owned by the ShardedService, so it outlives
//! every pod); the sidecars of the shard contend for it. Its `leaseTransitions` is the shard's
//! **leader epoch**: it increases with every new holder and never restarts, because the Lease is
//! never deleted (a departing leader clears the holder instead). The operator publishes the
//! leader and its epoch in the shard map; callers send writes there with the epoch as fencing
//! token, and this pod's inbound side tells the application its role and epoch
//! ([`RoleState`]), so the application can refuse a write fenced with another epoch.
//!
//! The rules, as in client-go's leader election:
//! - a candidate takes the Lease when it has no holder, or when its record has not changed for a
//!   whole lease duration **as measured on this pod's clock** (no clock agreement needed);
//! - the leader renews every third of the duration, and **steps down locally** when it has not
//!   renewed for two thirds of it, before any candidate can consider the Lease expired — so two
//!   pods never both tell their applications they lead;
//! - holder identities carry a per-process suffix, so a restarted sidecar is a new candidate
//!   (it waits like the others and gets a new epoch);
//! - only a pod whose application accepts connections contends or keeps the role;
//! - on drain the leader clears the holder, so another pod takes over within one retry period.
//!
//! Takeover after a crash therefore takes between one lease duration and one lease duration
//! plus one retry period after the dead leader's last renewal.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{api::PostParams, Api, Client};
use shardmesh_api::headers;

use crate::{
    drain::{Drain, Phase},
    membership::{is_status, whole_seconds},
};

/// Leader-election settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Name of the shard's leader Lease.
    pub lease: String,
    /// Namespace of the Lease (the pod's).
    pub namespace: String,
    /// This process's holder identity (`<pod>_<suffix>`).
    pub holder: String,
    /// How long the role lasts without renewal.
    pub duration: Duration,
    /// The application, probed before contending or renewing; `None`: always eligible.
    pub app: Option<SocketAddr>,
}

impl LeaderConfig {
    /// Interval between the leader's renewals: a third of the duration.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// How long the leader may fail to renew before it stops claiming the role: two thirds of
    /// the duration, so it steps down well before a candidate may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often candidates look at the Lease: a tenth of the duration, 500 ms to 2 s.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 10).clamp(Duration::from_millis(500), Duration::from_secs(2))
    }
}

/// What this pod tells its application: whether it leads, and the epoch it knows.
#[derive(Clone, Debug)]
pub struct RoleState(Arc<RoleInner>);

#[derive(Debug)]
struct RoleInner {
    leader: AtomicBool,
    /// Leader epoch as last seen; -1 before the Lease was first read.
    epoch: AtomicI64,
}

impl Default for RoleState {
    fn default() -> Self {
        RoleState(Arc::new(RoleInner {
            leader: AtomicBool::new(false),
            epoch: AtomicI64::new(-1),
        }))
    }
}

impl RoleState {
    /// Whether this pod leads, and the leader epoch it knows (`None` before the first read).
    pub fn get(&self) -> (bool, Option<i64>) {
        let epoch = self.0.epoch.load(Ordering::Acquire);
        (
            self.0.leader.load(Ordering::Acquire),
            (epoch >= 0).then_some(epoch),
        )
    }

    fn set(&self, leader: bool, epoch: Option<i64>) {
        if let Some(e) = epoch {
            self.0.epoch.store(e, Ordering::Release);
        }
        self.0.leader.store(leader, Ordering::Release);
    }

    /// Puts `x-shardmesh-role` and `x-shardmesh-leader-epoch` on a request to the application,
    /// replacing whatever the caller sent (callers cannot claim a role for this pod).
    pub fn annotate(&self, h: &mut http::HeaderMap) {
        let (leader, epoch) = self.get();
        let role = if leader {
            headers::ROLE_LEADER
        } else {
            headers::ROLE_FOLLOWER
        };
        h.insert(headers::ROLE, http::HeaderValue::from_static(role));
        match epoch {
            Some(e) => {
                h.insert(headers::LEADER_EPOCH, http::HeaderValue::from(e));
            }
            None => {
                h.remove(headers::LEADER_EPOCH);
            }
        }
    }
}

/// What to do with the Lease as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it (a new epoch).
    Acquire,
    /// Someone else leads.
    Follow,
}

/// The election rule. `unchanged_for` is how long the Lease's record (holder, renew time,
/// transitions) has been the same on this pod's clock.
pub fn decide(me: &str, spec: Option<&LeaseSpec>, unchanged_for: Duration) -> Decision {
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty());
    match holder {
        Some(h) if h == me => Decision::Renew,
        None => Decision::Acquire,
        Some(_) => {
            let secs = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(0);
            let duration = Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1));
            if unchanged_for >= duration {
                Decision::Acquire
            } else {
                Decision::Follow
            }
        }
    }
}

/// The Lease's epoch (transition count).
pub fn epoch_of(lease: &Lease) -> i64 {
    i64::from(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0),
    )
}

/// The Lease after `decision` by `cfg.holder` at `now` (for Renew/Acquire); the server's copy
/// keeps its metadata and resourceVersion, so the write is a compare-and-swap.
pub fn next_lease(
    cfg: &LeaderConfig,
    current: &Lease,
    decision: Decision,
    now: Timestamp,
) -> Lease {
    let mut next = current.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(whole_seconds(cfg.duration));
    if decision == Decision::Acquire {
        spec.holder_identity = Some(cfg.holder.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    next
}

/// The Lease released by its holder: no holder, same transitions (the epoch continues).
pub fn released(current: &Lease, now: Timestamp) -> Lease {
    let mut next = current.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(now));
    next
}

/// Record identity for "has the Lease changed": holder, renew time, transitions.
type Record = (Option<String>, Option<Timestamp>, i64);

fn record(lease: &Lease) -> Record {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone()),
        spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
        epoch_of(lease),
    )
}

/// Runs the election until the sidecar drains; releases the role first if held.
pub async fn run(client: Client, cfg: LeaderConfig, role: RoleState, drain: Drain) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let pp = PostParams::default();
    // The Lease's record as last seen, and since when (on this pod's clock) it is unchanged.
    let mut seen: Option<(Record, Instant)> = None;
    let mut renewed_at: Option<Instant> = None;
    let mut last: Option<Lease> = None;
    let mut failures = 0u32;
    let mut missing_logged = false;
    tracing::info!(lease = %cfg.lease, holder = %cfg.holder, duration = ?cfg.duration,
                   "leader election started");
    loop {
        if drain.is_draining() {
            break;
        }
        let eligible = crate::membership::app_ready(cfg.app).await;
        let mut wait = cfg.retry_period();
        match api.get_opt(&cfg.lease).await {
            Ok(None) => {
                if !missing_logged {
                    tracing::warn!(lease = %cfg.lease, "leader lease not created yet; waiting for the operator");
                    missing_logged = true;
                }
                failures = 0;
            }
            Ok(Some(lease)) => {
                failures = 0;
                let rec = record(&lease);
                let since = match &seen {
                    Some((r, at)) if *r == rec => *at,
                    _ => Instant::now(),
                };
                seen = Some((rec, since));
                let decision = decide(&cfg.holder, lease.spec.as_ref(), since.elapsed());
                let was_leader = role.get().0;
                match decision {
                    Decision::Renew if !eligible => {
                        tracing::warn!(
                            epoch = epoch_of(&lease),
                            "application not ready: giving up the leader role"
                        );
                        role.set(false, None);
                        renewed_at = None;
                        if let Err(e) = api
                            .replace(&cfg.lease, &pp, &released(&lease, Timestamp::now()))
                            .await
                        {
                            tracing::warn!(error = %e, "could not release the leader lease; it expires by itself");
                        }
                    }
                    Decision::Acquire if !eligible => role.set(false, Some(epoch_of(&lease))),
                    Decision::Renew | Decision::Acquire => {
                        let next = next_lease(&cfg, &lease, decision, Timestamp::now());
                        match api.replace(&cfg.lease, &pp, &next).await {
                            Ok(written) => {
                                let epoch = epoch_of(&written);
                                if !was_leader {
                                    tracing::info!(lease = %cfg.lease, epoch, "became the shard leader");
                                }
                                role.set(true, Some(epoch));
                                renewed_at = Some(Instant::now());
                                seen = Some((record(&written), Instant::now()));
                                last = Some(written);
                                wait = cfg.renew_interval();
                            }
                            // Someone else wrote first: look again at once.
                            Err(e) if is_status(&e, 409) => {
                                tracing::debug!("leader lease changed under us; re-reading");
                                wait = Duration::ZERO;
                            }
                            Err(e) => {
                                failures += 1;
                                tracing::warn!(error = %e, failures, "leader lease write failed");
                            }
                        }
                    }
                    Decision::Follow => {
                        if was_leader {
                            tracing::warn!(
                                epoch = epoch_of(&lease),
                                "another pod holds the leader lease: now a follower"
                            );
                        }
                        role.set(false, Some(epoch_of(&lease)));
                        renewed_at = None;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "cannot read the leader lease; retrying");
            }
        }
        // Fencing on our side: a leader that could not renew for the renew deadline stops
        // claiming the role before anyone else may take it.
        if role.get().0 && renewed_at.is_none_or(|t| t.elapsed() >= cfg.renew_deadline()) {
            tracing::warn!(deadline = ?cfg.renew_deadline(), "could not renew the leader lease in time: stepping down");
            role.set(false, None);
            renewed_at = None;
        }
        if failures > 0 {
            wait = crate::membership::retry_delay(failures, cfg.retry_period());
        }
        if let Some(t) = renewed_at {
            // Never sleep past the step-down point.
            wait = wait.min(cfg.renew_deadline().saturating_sub(t.elapsed()));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = drain.reached(Phase::Draining) => {}
        }
    }
    if role.get().0 {
        role.set(false, None);
        let current = match last {
            Some(l) => Some(l),
            None => api.get_opt(&cfg.lease).await.ok().flatten(),
        };
        // Clearing the holder hands over within one retry period; a conflict means the Lease
        // moved on already.
        if let Some(l) = current {
            match api
                .replace(&cfg.lease, &pp, &released(&l, Timestamp::now()))
                .await
            {
                Ok(_) => tracing::info!(lease = %cfg.lease, "leader role released"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the leader lease; it expires by itself")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaderConfig {
        LeaderConfig {
            lease: "orders-1-leader".into(),
            namespace: "shop".into(),
            holder: "orders-1-0_ab12".into(),
            duration: Duration::from_secs(15),
            app: None,
        }
    }

    fn spec(holder: Option<&str>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn timings_keep_step_down_before_takeover() {
        let c = cfg();
        assert_eq!(c.renew_interval(), Duration::from_secs(5));
        assert_eq!(c.renew_deadline(), Duration::from_secs(10));
        assert_eq!(c.retry_period(), Duration::from_millis(1500));
        assert!(c.renew_deadline() < c.duration);
        let long = LeaderConfig {
            duration: Duration::from_secs(300),
            ..cfg()
        };
        assert_eq!(long.retry_period(), Duration::from_secs(2));
    }

    #[test]
    fn decide_follows_until_the_record_is_stale_on_our_clock() {
        let me = "orders-1-0_ab12";
        let other = spec(Some("orders-1-1_cd34"), 3);
        assert_eq!(
            decide(me, Some(&other), Duration::from_secs(14)),
            Decision::Follow
        );
        assert_eq!(
            decide(me, Some(&other), Duration::from_secs(15)),
            Decision::Acquire
        );
        assert_eq!(
            decide(me, Some(&spec(Some(me), 3)), Duration::ZERO),
            Decision::Renew
        );
        assert_eq!(
            decide(me, Some(&spec(None, 3)), Duration::ZERO),
            Decision::Acquire
        );
        assert_eq!(
            decide(me, Some(&spec(Some(""), 3)), Duration::ZERO),
            Decision::Acquire
        );
        assert_eq!(decide(me, None, Duration::ZERO), Decision::Acquire);
        // The same pod restarted is another candidate (different suffix).
        let old_me = spec(Some("orders-1-0_0000"), 3);
        assert_eq!(
            decide(me, Some(&old_me), Duration::from_secs(1)),
            Decision::Follow
        );
    }

    #[test]
    fn acquiring_bumps_the_epoch_renewing_and_releasing_keep_it() {
        let t0: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2024-01-01T00:00:05Z".parse().unwrap();
        let mut current = Lease::default();
        current.metadata.resource_version = Some("7".into());
        current.spec = Some(spec(Some("orders-1-1_cd34"), 3));
        let acquired = next_lease(&cfg(), &current, Decision::Acquire, t0);
        assert_eq!(acquired.metadata.resource_version.as_deref(), Some("7"));
        let s = acquired.spec.as_ref().unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("orders-1-0_ab12"));
        assert_eq!(
            (epoch_of(&acquired), s.acquire_time.clone()),
            (4, Some(MicroTime(t0)))
        );
        let renewed = next_lease(&cfg(), &acquired, Decision::Renew, t1);
        let s = renewed.spec.as_ref().unwrap();
        assert_eq!(epoch_of(&renewed), 4);
        assert_eq!(
            (s.acquire_time.clone(), s.renew_time.clone()),
            (Some(MicroTime(t0)), Some(MicroTime(t1)))
        );
        let gone = released(&renewed, t1);
        assert_eq!(gone.spec.as_ref().unwrap().holder_identity, None);
        assert_eq!(epoch_of(&gone), 4, "the epoch survives the release");
        // A fresh Lease (created by the operator without a spec) starts at epoch 1.
        let first = next_lease(&cfg(), &Lease::default(), Decision::Acquire, t0);
        assert_eq!(epoch_of(&first), 1);
        assert_eq!(first.spec.unwrap().lease_duration_seconds, Some(15));
    }

    #[test]
    fn role_headers_replace_what_callers_sent() {
        let role = RoleState::default();
        let mut h = http::HeaderMap::new();
        h.insert(headers::ROLE, http::HeaderValue::from_static("leader"));
        h.insert(headers::LEADER_EPOCH, http::HeaderValue::from_static("99"));
        role.annotate(&mut h);
        assert_eq!(h[headers::ROLE], "follower");
        assert!(
            h.get(headers::LEADER_EPOCH).is_none(),
            "unknown epoch: none claimed"
        );
        role.set(false, Some(3));
        role.annotate(&mut h);
        assert_eq!(
            (
                h[headers::ROLE].to_str().unwrap(),
                h[headers::LEADER_EPOCH].to_str().unwrap()
            ),
            ("follower", "3")
        );
        role.set(true, Some(4));
        role.annotate(&mut h);
        assert_eq!(
            (
                h[headers::ROLE].to_str().unwrap(),
                h[headers::LEADER_EPOCH].to_str().unwrap()
            ),
            ("leader", "4")
        );
        // Stepping down keeps the last known epoch.
        role.set(false, None);
        assert_eq!(role.get(), (false, Some(4)));
    }
}
