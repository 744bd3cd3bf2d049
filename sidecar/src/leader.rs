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
//! - the leader renews every third of the duration, and its claim **lapses on a local timer**
//!   two thirds of the duration after the start of its last successful renewal, whatever API
//!   calls are pending (a black-holed API server cannot keep it leading): a candidate cannot
//!   consider the Lease expired before a whole duration after that start, so two pods never
//!   both tell their applications they lead, with a third of the duration as margin for the
//!   application to finish a write it accepted (see `shardmesh_api::lease`);
//! - every API call is bounded by a quarter of the duration;
//! - when this pod is not sure it leads (before the first renewal, after a failed one past the
//!   deadline), its application hears `follower`;
//! - holder identities carry a per-process suffix, so a restarted sidecar is a new candidate
//!   (it waits like the others and gets a new epoch);
//! - only a pod whose application accepts connections contends or keeps the role;
//! - on drain the leader clears the holder, so another pod takes over within one retry period.
//!
//! Takeover after a crash therefore takes between one lease duration and one lease duration
//! plus one retry period after the dead leader's last renewal.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{api::PostParams, Api, Client};
use shardmesh_api::{
    headers,
    lease::{self, Observer, Timing},
};
use tokio::time::Instant;

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
    /// The shared Lease timings of this duration.
    pub fn timing(&self) -> Timing {
        Timing::new(self.duration)
    }
}

/// What this pod tells its application: whether it leads, and the epoch it knows.
#[derive(Clone, Debug)]
pub struct RoleState(Arc<RoleInner>);

#[derive(Debug)]
struct RoleInner {
    /// The claim and the epoch, changed and read together: a reader must never see the
    /// claim of one epoch with the number of another.
    claim: std::sync::Mutex<Claim>,
    base: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Claim {
    /// Nanoseconds after `base` until which this pod leads (0: it does not). Read against the
    /// clock on every request, so the role lapses even if no task runs.
    until: u64,
    /// Leader epoch as last seen; -1 before the Lease was first read.
    epoch: i64,
}

impl Default for RoleState {
    fn default() -> Self {
        RoleState(Arc::new(RoleInner {
            claim: std::sync::Mutex::new(Claim {
                until: 0,
                epoch: -1,
            }),
            base: Instant::now(),
        }))
    }
}

impl RoleState {
    fn claim(&self) -> std::sync::MutexGuard<'_, Claim> {
        self.0.claim.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this pod leads now, and the leader epoch it knows (`None` before the first
    /// read).
    pub fn get(&self) -> (bool, Option<i64>) {
        let Claim { until, epoch } = *self.claim();
        let now = Instant::now()
            .saturating_duration_since(self.0.base)
            .as_nanos();
        (u128::from(until) > now, (epoch >= 0).then_some(epoch))
    }

    /// Leads at `epoch` until `until` (then lapses by itself).
    fn lead_until(&self, until: Instant, epoch: i64) {
        let nanos = until.saturating_duration_since(self.0.base).as_nanos();
        *self.claim() = Claim {
            until: u64::try_from(nanos).unwrap_or(u64::MAX),
            epoch,
        };
    }

    /// Does not lead; the epoch, when known, is the Lease's current one.
    fn follow(&self, epoch: Option<i64>) {
        let mut c = self.claim();
        c.until = 0;
        if let Some(e) = epoch {
            c.epoch = e;
        }
    }

    /// When the current claim lapses, if this pod leads.
    fn claim_left(&self) -> Option<Duration> {
        let until = self.0.base + Duration::from_nanos(self.claim().until);
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
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
/// transitions) has been the same on this pod's clock (see [`shardmesh_api::lease`]).
pub fn decide(me: &str, current: &Lease, unchanged_for: Duration) -> Decision {
    match lease::holder(current) {
        Some(h) if h == me => Decision::Renew,
        _ if lease::expired(current, unchanged_for) => Decision::Acquire,
        _ => Decision::Follow,
    }
}

/// Why a Lease call did not return a Lease.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The API answered with an error.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// No answer within the call timeout.
    #[error("no answer from the API server within {0:?}")]
    TimedOut(Duration),
}

/// `call` bounded by `limit`.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = kube::Result<T>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map_err(CallError::Api),
        Err(_) => Err(CallError::TimedOut(limit)),
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

/// Runs the election until the sidecar drains; releases the role first if held.
pub async fn run(client: Client, cfg: LeaderConfig, role: RoleState, drain: Drain) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let pp = PostParams::default();
    let timing = cfg.timing();
    let limit = timing.call_timeout();
    let mut observer = Observer::default();
    let mut last: Option<Lease> = None;
    let mut failures = 0u32;
    let mut missing_logged = false;
    // Whether the role was claimed at the last look, to log a lapse once.
    let mut claimed = false;
    tracing::info!(lease = %cfg.lease, holder = %cfg.holder, duration = ?cfg.duration,
                   margin = ?timing.margin(), "leader election started");
    loop {
        if drain.is_draining() {
            break;
        }
        let eligible = crate::membership::app_ready(cfg.app).await;
        let mut wait = timing.retry_period();
        match bounded(limit, api.get_opt(&cfg.lease)).await {
            Ok(None) => {
                if !missing_logged {
                    tracing::warn!(lease = %cfg.lease, "leader lease not created yet; waiting for the operator");
                    missing_logged = true;
                }
                observer.reset();
                failures = 0;
            }
            Ok(Some(current)) => {
                failures = 0;
                let unchanged = observer.observe(&current, Instant::now().into_std());
                let decision = decide(&cfg.holder, &current, unchanged);
                let epoch = epoch_of(&current);
                match decision {
                    Decision::Renew if !eligible => {
                        tracing::warn!(epoch, "application not ready: giving up the leader role");
                        role.follow(None);
                        if let Err(e) = bounded(
                            limit,
                            api.replace(&cfg.lease, &pp, &released(&current, Timestamp::now())),
                        )
                        .await
                        {
                            tracing::warn!(error = %e, "could not release the leader lease; it expires by itself");
                        }
                    }
                    Decision::Acquire if !eligible => role.follow(Some(epoch)),
                    Decision::Renew | Decision::Acquire => {
                        // The claim counts from before the write: no observer can see the new
                        // record earlier than this.
                        let started = Instant::now();
                        let next = next_lease(&cfg, &current, decision, Timestamp::now());
                        match bounded(limit, api.replace(&cfg.lease, &pp, &next)).await {
                            Ok(written) => {
                                let epoch = epoch_of(&written);
                                if !role.get().0 {
                                    tracing::info!(lease = %cfg.lease, epoch, "became the shard leader");
                                }
                                role.lead_until(
                                    Instant::from_std(timing.claim_until(started.into_std())),
                                    epoch,
                                );
                                observer.reset();
                                observer.observe(&written, Instant::now().into_std());
                                last = Some(written);
                                wait = timing.renew_interval();
                            }
                            // Someone else wrote first: look again at once.
                            Err(CallError::Api(e)) if is_status(&e, 409) => {
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
                        if role.get().0 {
                            tracing::warn!(
                                epoch,
                                "another pod holds the leader lease: now a follower"
                            );
                        }
                        role.follow(Some(epoch));
                    }
                }
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "cannot read the leader lease; retrying");
            }
        }
        let leads = role.get().0;
        if claimed && !leads {
            tracing::warn!(deadline = ?timing.renew_deadline(),
                           "leader claim lapsed (not renewed in time, or given up): a follower now");
        }
        claimed = leads;
        if failures > 0 {
            wait = crate::membership::retry_delay(failures, timing.retry_period());
        }
        if let Some(left) = role.claim_left() {
            // Try again before the claim lapses.
            wait = wait.min(left);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = drain.reached(Phase::Draining) => {}
        }
    }
    if role.get().0 {
        role.follow(None);
        let current = match last {
            Some(l) => Some(l),
            None => bounded(limit, api.get_opt(&cfg.lease)).await.ok().flatten(),
        };
        // Clearing the holder hands over within one retry period; a conflict means the Lease
        // moved on already.
        if let Some(l) = current {
            match bounded(
                limit,
                api.replace(&cfg.lease, &pp, &released(&l, Timestamp::now())),
            )
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

    fn lease_of(spec: LeaseSpec) -> Lease {
        Lease {
            spec: Some(spec),
            ..Lease::default()
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
    fn decide_follows_until_the_record_is_stale_on_our_clock() {
        let me = "orders-1-0_ab12";
        let other = spec(Some("orders-1-1_cd34"), 3);
        assert_eq!(
            decide(me, &lease_of(other.clone()), Duration::from_secs(14)),
            Decision::Follow
        );
        assert_eq!(
            decide(me, &lease_of(other), Duration::from_secs(15)),
            Decision::Acquire
        );
        assert_eq!(
            decide(me, &lease_of(spec(Some(me), 3)), Duration::ZERO),
            Decision::Renew
        );
        assert_eq!(
            decide(me, &lease_of(spec(None, 3)), Duration::ZERO),
            Decision::Acquire
        );
        assert_eq!(
            decide(me, &lease_of(spec(Some(""), 3)), Duration::ZERO),
            Decision::Acquire
        );
        // The same pod restarted is another candidate (different suffix).
        let old_me = spec(Some("orders-1-0_0000"), 3);
        assert_eq!(
            decide(me, &lease_of(old_me), Duration::from_secs(1)),
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
        role.follow(Some(3));
        role.annotate(&mut h);
        assert_eq!(
            (
                h[headers::ROLE].to_str().unwrap(),
                h[headers::LEADER_EPOCH].to_str().unwrap()
            ),
            ("follower", "3")
        );
        role.lead_until(Instant::now() + Duration::from_secs(60), 4);
        role.annotate(&mut h);
        assert_eq!(
            (
                h[headers::ROLE].to_str().unwrap(),
                h[headers::LEADER_EPOCH].to_str().unwrap()
            ),
            ("leader", "4")
        );
        // Stepping down keeps the last known epoch.
        role.follow(None);
        assert_eq!(role.get(), (false, Some(4)));
    }

    /// A Lease API that answers the first read and write, then never again (a black-holed API
    /// server): the claim lapses on its own timer two thirds of the duration after the renewal
    /// started, although every call is still pending.
    #[tokio::test(start_paused = true)]
    async fn a_leader_cut_off_from_the_api_stops_claiming_on_its_own_timer() {
        use http_body_util::BodyExt;
        use kube::client::Body;
        let (svc, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let client = Client::new(svc, "shop");
        let role = RoleState::default();
        let drain = Drain::new();
        let t0 = Instant::now();
        let task = tokio::spawn(run(client, cfg(), role.clone(), drain.clone()));
        let free = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "orders-1-leader", "namespace": "shop", "resourceVersion": "1"},
            "spec": {"leaseTransitions": 2},
        });
        let (req, send) = handle.next_request().await.expect("the first read");
        assert_eq!(req.method(), http::Method::GET);
        send.send_response(http::Response::new(Body::from(
            serde_json::to_vec(&free).expect("json"),
        )));
        let (req, send) = handle.next_request().await.expect("the acquiring write");
        assert_eq!(req.method(), http::Method::PUT);
        let written = req.into_body().collect().await.expect("body").to_bytes();
        let lease: Lease = serde_json::from_slice(&written).expect("a Lease was written");
        assert_eq!(epoch_of(&lease), 3, "acquiring bumps the epoch");
        send.send_response(http::Response::new(Body::from(written.to_vec())));
        tokio::task::yield_now().await;
        assert_eq!(role.get(), (true, Some(3)));

        // From now on nothing answers; the pending calls are kept open.
        let held = tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some((_, send)) = handle.next_request().await {
                pending.push(send);
            }
        });
        let deadline = cfg().timing().renew_deadline();
        tokio::time::sleep_until(t0 + deadline - Duration::from_millis(100)).await;
        assert!(role.get().0, "still within the claim");
        tokio::time::sleep_until(t0 + deadline + Duration::from_millis(1)).await;
        assert!(!role.get().0, "the claim lapsed although no call returned");
        // Well before anyone may take over: a whole duration after the renewal started.
        assert!(deadline + cfg().timing().margin() <= cfg().duration);
        drain.begin(true);
        task.abort();
        held.abort();
    }

    #[test]
    fn the_role_and_its_epoch_are_read_together() {
        // A writer alternating between leading at an even epoch and following at the odd one
        // after it; a reader must never see leadership with an odd epoch.
        let role = RoleState::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (role, stop) = (role.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut e = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    role.lead_until(Instant::now() + Duration::from_secs(60), e);
                    role.follow(Some(e + 1));
                    e += 2;
                }
            })
        };
        for _ in 0..200_000 {
            if let (true, Some(epoch)) = role.get() {
                assert_eq!(epoch % 2, 0, "read leadership with the epoch of a follower");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
    }
}
