//! Registry membership: the pod announces itself with a `coordination.k8s.io/v1` Lease.
//!
//! The Lease is named after the pod, held by the pod, labelled with the service and shard, and
//! carries the sidecar's inbound address in annotations. The operator turns the live Leases of a
//! service into its shard map. A Lease is live while `renewTime + leaseDurationSeconds` lies in
//! the future, so:
//!
//! - the sidecar renews every `--lease-renew` (10 s) while the application accepts connections;
//! - while the application does not, it stops renewing: the Lease expires after
//!   `--lease-duration` (30 s) and the member leaves the map without any API call — which also
//!   covers a sidecar that is frozen or partitioned from the API server;
//! - on drain it deletes the Lease at once, so callers stop routing here before the listeners
//!   close (graceful departure costs no failed requests);
//! - the owner reference to the Pod lets the garbage collector remove a Lease whose pod is gone
//!   without a drain (killed node, OOM).
//!
//! API errors never stop the sidecar: renewals back off exponentially (capped at the renew
//! interval, so a recovered API server sees the member again within one interval).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, PostParams},
    Api, Client,
};
use shardmesh_api::labels;

use crate::{
    admin::Gate,
    drain::{Drain, Phase},
};

/// Who this pod is: the downward-API environment the operator and the injector set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Pod name; also the Lease name and holder.
    pub pod: String,
    /// Pod namespace; the Lease lives there.
    pub namespace: String,
    /// Pod UID, for the owner reference that garbage-collects the Lease with the pod.
    pub uid: String,
    /// ShardedService name.
    pub service: String,
    /// Shard index.
    pub shard: u32,
    /// Address callers dial: pod IP and the sidecar's inbound port.
    pub address: SocketAddr,
}

/// Membership settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// This pod.
    pub identity: Identity,
    /// Interval between renewals.
    pub renew_interval: Duration,
    /// `leaseDurationSeconds`: how long a Lease stays live without renewal.
    pub lease_duration: Duration,
    /// The application, probed before each renewal; `None` renews unconditionally.
    pub app: Option<SocketAddr>,
}

/// What the renew loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create or renew the Lease.
    Renew,
    /// Leave the Lease alone so it expires (the application is not ready).
    Pause,
    /// Delete the Lease and stop (the sidecar is draining).
    Release,
}

/// The renew decision: draining wins (leave the map before the listeners close), then the
/// application's readiness (never advertise a pod that cannot serve).
pub fn decide(draining: bool, app_ready: bool) -> Step {
    if draining {
        Step::Release
    } else if app_ready {
        Step::Renew
    } else {
        Step::Pause
    }
}

/// Delay after `failures` consecutive API errors (≥ 1): 500 ms doubling, capped at `cap`, minus
/// up to half as jitter so a fleet of sidecars does not hit a recovering API server together.
pub fn retry_delay(failures: u32, cap: Duration) -> Duration {
    shardmesh_api::backoff::half_jitter(
        Duration::from_millis(500),
        cap,
        failures,
        rand::random::<f64>(),
    )
}

/// Whole seconds for `leaseDurationSeconds` (at least 1).
pub(crate) fn whole_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The Lease this pod holds, renewed at `now`. `previous` (the server's copy) keeps its
/// resourceVersion (optimistic concurrency on replace), acquire time and transition count.
pub fn lease_object(cfg: &MembershipConfig, now: Timestamp, previous: Option<&Lease>) -> Lease {
    let id = &cfg.identity;
    let prev_spec = previous.and_then(|l| l.spec.as_ref());
    // Taking over a Lease another holder left behind counts as a transition, so observers of
    // `leaseTransitions` see the change; renewing our own keeps the acquire time.
    let same_holder = prev_spec.and_then(|s| s.holder_identity.as_deref()) == Some(&id.pod);
    let acquire_time = match prev_spec {
        Some(s) if same_holder => s.acquire_time.clone(),
        _ => None,
    }
    .unwrap_or(MicroTime(now));
    let transitions = prev_spec.and_then(|s| s.lease_transitions).unwrap_or(0)
        + i32::from(previous.is_some() && !same_holder);
    Lease {
        metadata: ObjectMeta {
            name: Some(id.pod.clone()),
            namespace: Some(id.namespace.clone()),
            resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
            labels: Some(BTreeMap::from([
                (labels::SERVICE.to_string(), id.service.clone()),
                (labels::SHARD.to_string(), id.shard.to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                (labels::LEASE_ADDRESS.to_string(), id.address.to_string()),
                (
                    labels::LEASE_PORT.to_string(),
                    id.address.port().to_string(),
                ),
            ])),
            // No blockOwnerDeletion: setting it needs finalizer rights on the Pod, which the
            // member Role deliberately does not grant.
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: id.pod.clone(),
                uid: id.uid.clone(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(id.pod.clone()),
            lease_duration_seconds: Some(whole_seconds(cfg.lease_duration)),
            acquire_time: Some(acquire_time),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    }
}

/// Whether the application accepts a TCP connection (the same check as `/ready`).
pub(crate) async fn app_ready(app: Option<SocketAddr>) -> bool {
    let Some(app) = app else { return true };
    matches!(
        tokio::time::timeout(
            crate::admin::APP_PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(app)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Whether an API call failed with HTTP status `code`.
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Creates or renews the Lease; `current` caches the server's copy between renewals so a
/// renewal is one `replace` call. A conflict or a vanished Lease re-reads it on the spot.
async fn renew(
    api: &Api<Lease>,
    cfg: &MembershipConfig,
    current: &mut Option<Lease>,
) -> kube::Result<()> {
    let pp = PostParams::default();
    for _ in 0..2 {
        let now = Timestamp::now();
        let result = match current.as_ref() {
            Some(prev) => {
                let next = lease_object(cfg, now, Some(prev));
                api.replace(&cfg.identity.pod, &pp, &next).await
            }
            None => match api.get_opt(&cfg.identity.pod).await? {
                Some(existing) => {
                    let next = lease_object(cfg, now, Some(&existing));
                    api.replace(&cfg.identity.pod, &pp, &next).await
                }
                None => api.create(&pp, &lease_object(cfg, now, None)).await,
            },
        };
        match result {
            Ok(lease) => {
                *current = Some(lease);
                return Ok(());
            }
            // Someone else wrote it (or it was deleted, or created concurrently): start over
            // from the server's state once, then report.
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => {
                tracing::debug!(error = %e, "lease changed on the server; re-reading");
                *current = None;
            }
            Err(e) => return Err(e),
        }
    }
    Err(kube::Error::Service(
        "the Lease kept changing under us (conflicts on two consecutive writes)".into(),
    ))
}

/// Deletes the Lease (a few quick attempts: the pod is going away either way, and the owner
/// reference or the expiry removes the member if this fails).
async fn release(api: &Api<Lease>, pod: &str) {
    for attempt in 1..=3u32 {
        match api.delete(pod, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(lease = pod, "membership released: lease deleted");
                return;
            }
            Err(e) if is_status(&e, 404) => {
                tracing::info!(lease = pod, "membership released: no lease to delete");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "could not delete the lease; retrying");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            }
        }
    }
    tracing::warn!(
        lease = pod,
        "giving up deleting the lease; it expires by itself"
    );
}

/// Keeps the Lease renewed until the sidecar drains, then deletes it and returns. `registered`
/// opens at the first successful renewal (`/ready` waits for it).
pub async fn run(client: Client, cfg: MembershipConfig, drain: Drain, registered: Gate) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.identity.namespace);
    let mut current = None;
    let mut failures = 0u32;
    let mut last_step = None;
    let limit = shardmesh_api::lease::Timing::new(cfg.lease_duration).call_timeout();
    tracing::info!(lease = %cfg.identity.pod, service = %cfg.identity.service,
                   shard = cfg.identity.shard, address = %cfg.identity.address,
                   renew = ?cfg.renew_interval, duration = ?cfg.lease_duration,
                   "registry membership started");
    loop {
        let step = decide(drain.is_draining(), app_ready(cfg.app).await);
        if last_step != Some(step) {
            match step {
                Step::Pause => tracing::warn!(
                    "application not ready: lease renewal paused (the member expires after the lease duration)"
                ),
                Step::Renew if last_step == Some(Step::Pause) => {
                    tracing::info!("application ready again: renewing the lease")
                }
                _ => {}
            }
            last_step = Some(step);
        }
        match step {
            Step::Release => return release(&api, &cfg.identity.pod).await,
            Step::Pause => {}
            // Bounded like every Lease call (shardmesh_api::lease): a black-holed API server
            // costs one attempt, and the member simply expires for the observers.
            Step::Renew => match tokio::time::timeout(limit, renew(&api, &cfg, &mut current)).await
            {
                Ok(Ok(())) => {
                    registered.open();
                    if failures > 0 {
                        tracing::info!(failures, "lease renewed again after API errors");
                    }
                    failures = 0;
                }
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer from the API server within {limit:?}"),
                    };
                    failures = failures.saturating_add(1);
                    current = None;
                    tracing::warn!(%error, failures, "lease renewal failed; retrying with backoff");
                }
            },
        }
        let wait = if failures > 0 {
            retry_delay(failures, cfg.renew_interval)
        } else {
            cfg.renew_interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = drain.reached(Phase::Draining) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MembershipConfig {
        MembershipConfig {
            identity: Identity {
                pod: "orders-1-0".into(),
                namespace: "shop".into(),
                uid: "u-1".into(),
                service: "orders".into(),
                shard: 1,
                address: "10.1.2.3:4143".parse().unwrap(),
            },
            renew_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(30),
            app: None,
        }
    }

    #[test]
    fn lease_carries_identity_address_and_owner() {
        let now: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let l = lease_object(&cfg(), now, None);
        assert_eq!(l.metadata.name.as_deref(), Some("orders-1-0"));
        assert_eq!(l.metadata.namespace.as_deref(), Some("shop"));
        let lab = l.metadata.labels.as_ref().unwrap();
        assert_eq!(lab[labels::SERVICE], "orders");
        assert_eq!(lab[labels::SHARD], "1");
        let ann = l.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[labels::LEASE_ADDRESS], "10.1.2.3:4143");
        assert_eq!(ann[labels::LEASE_PORT], "4143");
        let owner = &l.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Pod", "orders-1-0", "u-1")
        );
        assert_eq!(owner.block_owner_deletion, None);
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("orders-1-0"));
        assert_eq!(s.lease_duration_seconds, Some(30));
        assert_eq!(s.renew_time, Some(MicroTime(now)));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.lease_transitions, Some(0));
    }

    #[test]
    fn renewal_keeps_acquire_time_and_resource_version() {
        let t0: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2024-01-01T00:00:10Z".parse().unwrap();
        let mut first = lease_object(&cfg(), t0, None);
        first.metadata.resource_version = Some("42".into());
        let second = lease_object(&cfg(), t1, Some(&first));
        assert_eq!(second.metadata.resource_version.as_deref(), Some("42"));
        let s = second.spec.unwrap();
        assert_eq!(s.acquire_time, Some(MicroTime(t0)));
        assert_eq!(s.renew_time, Some(MicroTime(t1)));
        assert_eq!(s.lease_transitions, Some(0));
    }

    #[test]
    fn taking_over_a_foreign_lease_counts_a_transition() {
        let t0: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let mut foreign = lease_object(&cfg(), t0, None);
        let spec = foreign.spec.as_mut().unwrap();
        spec.holder_identity = Some("someone-else".into());
        spec.lease_transitions = Some(4);
        let t1: Timestamp = "2024-01-01T00:01:00Z".parse().unwrap();
        let s = lease_object(&cfg(), t1, Some(&foreign)).spec.unwrap();
        assert_eq!(s.lease_transitions, Some(5));
        assert_eq!(s.acquire_time, Some(MicroTime(t1)));
    }

    #[test]
    fn lease_duration_is_whole_seconds_at_least_one() {
        let mut c = cfg();
        c.lease_duration = Duration::from_millis(300);
        let now = Timestamp::now();
        let s = lease_object(&c, now, None).spec.unwrap();
        assert_eq!(s.lease_duration_seconds, Some(1));
    }

    #[test]
    fn decide_drain_first_then_readiness() {
        assert_eq!(decide(true, true), Step::Release);
        assert_eq!(decide(true, false), Step::Release);
        assert_eq!(decide(false, true), Step::Renew);
        assert_eq!(decide(false, false), Step::Pause);
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let cap = Duration::from_secs(10);
        for _ in 0..100 {
            let d1 = retry_delay(1, cap);
            assert!(d1 <= Duration::from_millis(500) && d1 >= Duration::from_millis(250));
            let d3 = retry_delay(3, cap);
            assert!(d3 <= Duration::from_secs(2) && d3 >= Duration::from_secs(1));
            assert!(retry_delay(40, cap) <= cap);
            assert!(retry_delay(40, cap) >= cap / 2);
        }
    }
}
