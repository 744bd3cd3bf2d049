//! What the operator's leader Lease says about the operator: who leads and whether that is
//! current. A one-shot CLI cannot observe the record staying unchanged on its own clock as a
//! standby does (`shardmesh_api::lease`), so "current" here is `renewTime + duration` against
//! this machine's clock: good for a report, never used to decide leadership.

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use serde::Serialize;
use shardmesh_api::lease;

/// Default namespace of the operator (the chart's release namespace in the README).
pub const DEFAULT_NAMESPACE: &str = shardmesh_api::labels::OPERATOR_NAMESPACE;
/// Default name of the controller's leader Lease (`shardmesh-operator controller
/// --leader-lease-name`).
pub const DEFAULT_LEASE: &str = shardmesh_api::labels::OPERATOR_LEADER_LEASE;

/// The operator's leadership as its Lease shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Leader {
    /// `namespace/name` of the Lease.
    pub lease: String,
    /// `holderIdentity` (the leading replica's pod name); absent when released or missing.
    pub holder: Option<String>,
    /// `renewTime` (RFC 3339).
    pub renew_time: Option<String>,
    /// `leaseDurationSeconds`.
    pub lease_duration_seconds: Option<u64>,
    /// Held and renewed within its duration, by this machine's clock.
    pub current: bool,
    /// Why it is not current, or who leads; one sentence for people.
    pub detail: String,
}

/// The view of `lease` (`None`: it does not exist) at `now`.
pub fn leader(lease_ref: &str, lease: Option<&Lease>, now: Timestamp) -> Leader {
    let Some(l) = lease else {
        return Leader {
            lease: lease_ref.to_string(),
            holder: None,
            renew_time: None,
            lease_duration_seconds: None,
            current: false,
            detail: format!(
                "no Lease {lease_ref}: the operator has never run there (install the chart, or \
                 pass --operator-namespace)"
            ),
        };
    };
    let holder = lease::holder(l).map(str::to_string);
    let duration = lease::duration_of(l);
    let renew = l
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let age = renew.map(|r| now.duration_since(r).as_secs());
    let current = holder.is_some()
        && age.is_some_and(|a| a <= i64::try_from(duration.as_secs()).unwrap_or(i64::MAX));
    let detail = match (&holder, age) {
        (None, _) => format!("Lease {lease_ref} is released: no replica leads"),
        (Some(h), Some(a)) if current => {
            format!(
                "{h}, renewed {}s ago (duration {}s)",
                a.max(0),
                duration.as_secs()
            )
        }
        (Some(h), Some(a)) => format!(
            "{h} last renewed {a}s ago, more than the {}s duration: the operator is not running \
             or cannot reach the API server",
            duration.as_secs()
        ),
        (Some(h), None) => format!("{h} holds Lease {lease_ref} without a renewTime"),
    };
    Leader {
        lease: lease_ref.to_string(),
        holder,
        renew_time: renew.map(|r| r.to_string()),
        lease_duration_seconds: Some(duration.as_secs()),
        current,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };

    fn lease(holder: Option<&str>, renewed: i64) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Timestamp::from_second(renewed).ok().map(MicroTime),
                ..LeaseSpec::default()
            }),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("in range")
    }

    #[test]
    fn current_while_renewed_within_its_duration() {
        let l = lease(Some("op-1"), 1_000);
        let v = leader("ns/l", Some(&l), at(1_010));
        assert!(v.current, "{v:?}");
        assert_eq!(v.holder.as_deref(), Some("op-1"));
        assert!(v.detail.starts_with("op-1, renewed 10s ago"));
        let stale = leader("ns/l", Some(&l), at(1_016));
        assert!(!stale.current);
        assert!(stale.detail.contains("not running"), "{}", stale.detail);
    }

    #[test]
    fn missing_or_released_leases_are_not_current_and_say_why() {
        let missing = leader("shardmesh-system/x", None, at(0));
        assert!(!missing.current);
        assert!(missing.detail.contains("no Lease shardmesh-system/x"));
        let released = leader("ns/l", Some(&lease(Some(""), 1_000)), at(1_001));
        assert!(!released.current);
        assert_eq!(released.holder, None);
        assert!(released.detail.contains("released"));
    }
}
