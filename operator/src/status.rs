//! Pure status computation: observed StatefulSets and Pods → `ShardedServiceStatus`, and the
//! condition transitions worth an Event. No client, so every rule is unit-tested.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{apps::v1::StatefulSet, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{SignedDuration, Timestamp},
};
use shardmesh_api::{
    labels,
    shardmap::ShardMap,
    v1alpha1::{condition, RolloutStatus, RolloutStrategy, ShardStatus},
    validate::FieldError,
    ShardedService, ShardedServiceStatus,
};

/// A rollout that has not completed after this long is reported as Degraded.
pub const PROGRESS_DEADLINE: SignedDuration = SignedDuration::from_secs(600);

/// What the reconciler saw in the cluster after applying.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// StatefulSets by shard index.
    pub stateful_sets: BTreeMap<u32, StatefulSet>,
    /// Pods labelled with the service.
    pub pods: Vec<Pod>,
    /// The published shard map (live registry members), when the shard-map controller has
    /// written one: then it is the source of members and epoch, so status and sidecars agree.
    pub map: Option<ShardMap>,
    /// The rollout plan's status (see [`crate::rollout`]).
    pub rollout: Option<RolloutStatus>,
}

/// Why the spec was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    /// A field is invalid.
    InvalidSpec,
    /// `spec.shards` was lowered without `rollout.allowShardRemoval`.
    ShardRemovalRefused,
    /// An older ShardedService generates an object of the same name (see
    /// [`crate::collision`]).
    NameCollision,
}

impl InvalidReason {
    fn as_str(self) -> &'static str {
        match self {
            InvalidReason::InvalidSpec => "InvalidSpec",
            InvalidReason::ShardRemovalRefused => "ShardRemovalRefused",
            InvalidReason::NameCollision => "NameCollision",
        }
    }
}

/// A condition change worth telling the user about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

/// Status for a spec that was applied.
pub fn applied(
    svc: &ShardedService,
    observed: &Observed,
    notes: Vec<String>,
    now: Timestamp,
) -> ShardedServiceStatus {
    let prev = svc.status.clone().unwrap_or_default();
    let generation = svc.metadata.generation;
    let desired = svc.spec.replicas_per_shard;
    let name = svc.metadata.name.clone().unwrap_or_default();

    let mut members: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    if let Some(map) = &observed.map {
        for shard in &map.shards {
            members.insert(
                shard.index,
                shard.members.iter().map(|m| m.pod.clone()).collect(),
            );
        }
    }
    for pod in observed.pods.iter().filter(|_| observed.map.is_none()) {
        if pod.metadata.deletion_timestamp.is_some() || !pod_ready(pod) {
            continue;
        }
        let shard = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::SHARD))
            .and_then(|s| s.parse::<u32>().ok());
        if let (Some(shard), Some(pod_name)) = (shard, pod.metadata.name.clone()) {
            members.entry(shard).or_default().push(pod_name);
        }
    }

    let mut shards = Vec::new();
    let mut lagging = Vec::new();
    let mut rolled_out = true;
    for i in 0..u32::try_from(svc.spec.shards).unwrap_or(0) {
        let sts_status = observed.stateful_sets.get(&i).map(|s| {
            let st = s.status.clone().unwrap_or_default();
            let current = st.observed_generation.unwrap_or(0) >= s.metadata.generation.unwrap_or(1);
            (st, current)
        });
        let (ready, done) = match &sts_status {
            Some((st, current)) => {
                let ready = st.ready_replicas.unwrap_or(0);
                let done = *current
                    && st.replicas == desired
                    && st.updated_replicas.unwrap_or(0) == desired
                    && ready == desired;
                (ready, done)
            }
            None => (0, false),
        };
        rolled_out &= done;
        if ready < desired {
            lagging.push(format!("shard {i}: {ready}/{desired} ready"));
        }
        let mut m = members.remove(&i).unwrap_or_default();
        m.sort();
        let published = observed
            .map
            .as_ref()
            .and_then(|map| map.shards.get(i as usize));
        let leader = published.and_then(|s| s.leader.as_ref());
        let (current_revision, update_revision) = sts_status
            .as_ref()
            .map(|(st, _)| (st.current_revision.clone(), st.update_revision.clone()))
            .unwrap_or_default();
        shards.push(ShardStatus {
            index: i as i32,
            replicas: desired,
            ready_replicas: ready,
            live_members: i32::try_from(m.len()).unwrap_or(i32::MAX),
            leader: leader.map(|l| l.pod.clone()),
            leader_epoch: leader.map(|l| l.epoch),
            updated: done && current_revision.is_some() && current_revision == update_revision,
            current_revision,
            update_revision,
        });
    }

    let membership_changed = prev.shards.len() != shards.len()
        || prev
            .shards
            .iter()
            .zip(&shards)
            .any(|(a, b)| a.live_members != b.live_members);
    let epoch = match &observed.map {
        Some(map) => map.epoch,
        None if membership_changed => prev.epoch + 1,
        None => prev.epoch,
    };
    let total_ready: i32 = shards.iter().map(|s| s.ready_replicas).sum();
    let total_desired = desired * svc.spec.shards;

    // Progressing runs from a spec change until every shard is rolled out at that generation;
    // afterwards a missing replica is a degradation, not progress.
    let prev_progressing = find(&prev.conditions, condition::PROGRESSING);
    let completed_this_generation = prev_progressing
        .is_some_and(|c| c.status == "False" && c.observed_generation == generation);
    let progressing_since = prev_progressing
        .filter(|c| c.status == "True")
        .map(|c| c.last_transition_time.0);
    let lag = lagging.join("; ");

    let mut conds = prev.conditions.clone();
    let set = |conds: &mut Vec<Condition>, t: &str, ok: bool, reason: &str, msg: String| {
        set_condition(conds, t, ok, reason, msg, generation, now);
    };
    set(
        &mut conds,
        condition::INVALID,
        false,
        "Valid",
        "the spec is valid and applied".into(),
    );
    let rollout = observed.rollout.clone();
    let rollout_phase = rollout.as_ref().map_or("", |r| r.phase.as_str());
    if let Some(r) = rollout
        .as_ref()
        .filter(|r| r.phase == crate::rollout::phase::HALTED)
    {
        let msg = crate::rollout::message(r);
        set(
            &mut conds,
            condition::PROGRESSING,
            false,
            "RolloutHalted",
            msg.clone(),
        );
        set(
            &mut conds,
            condition::READY,
            false,
            "RolloutHalted",
            if lag.is_empty() { msg } else { lag.clone() },
        );
        if lag.is_empty() {
            set(
                &mut conds,
                condition::DEGRADED,
                false,
                "AllShardsReady",
                "no shard is missing replicas".into(),
            );
        } else {
            set(
                &mut conds,
                condition::DEGRADED,
                true,
                "RolloutHalted",
                format!("{lag}; the new revision does not run"),
            );
        }
    } else if rolled_out {
        set(
            &mut conds,
            condition::READY,
            true,
            "AllShardsReady",
            format!("{} shards × {desired} replicas ready", svc.spec.shards),
        );
        set(
            &mut conds,
            condition::PROGRESSING,
            false,
            "RolloutComplete",
            "every shard runs the current spec".into(),
        );
        set(
            &mut conds,
            condition::DEGRADED,
            false,
            "AllShardsReady",
            "no shard is missing replicas".into(),
        );
    } else if completed_this_generation {
        set(
            &mut conds,
            condition::READY,
            false,
            "ReplicasUnavailable",
            lag.clone(),
        );
        set(
            &mut conds,
            condition::DEGRADED,
            true,
            "ReplicasUnavailable",
            format!("{lag}; the StatefulSets are replacing the missing pods"),
        );
    } else {
        // A shard-by-shard rollout has its own per-wave deadline (it halts); the overall
        // deadline only judges changes that are not waves (scaling, AllAtOnce).
        let waves = matches!(
            rollout_phase,
            crate::rollout::phase::ROLLING
                | crate::rollout::phase::BAKING
                | crate::rollout::phase::PAUSED
        ) && svc.spec.rollout.strategy == RolloutStrategy::ShardByShard;
        let overdue =
            !waves && progressing_since.is_some_and(|t| now.duration_since(t) > PROGRESS_DEADLINE);
        let msg = match rollout.as_ref().filter(|_| waves) {
            Some(r) if lag.is_empty() => crate::rollout::message(r),
            Some(r) => format!("{}; {lag}", crate::rollout::message(r)),
            None if lag.is_empty() => "updating pods to the current spec".to_string(),
            None => lag.clone(),
        };
        set(
            &mut conds,
            condition::READY,
            false,
            "RolloutInProgress",
            msg.clone(),
        );
        set(
            &mut conds,
            condition::PROGRESSING,
            true,
            if rollout_phase == crate::rollout::phase::PAUSED {
                "RolloutPaused"
            } else {
                "RollingOut"
            },
            msg.clone(),
        );
        if overdue {
            set(
                &mut conds,
                condition::DEGRADED,
                true,
                "ProgressDeadlineExceeded",
                format!(
                    "rollout not complete after {}s: {msg}; check `kubectl describe pods -l {}`",
                    PROGRESS_DEADLINE.as_secs(),
                    labels::service_selector_string(&name)
                ),
            );
        } else {
            set(
                &mut conds,
                condition::DEGRADED,
                false,
                "RolloutInProgress",
                "a rollout is in progress".into(),
            );
        }
    }

    let resharding = crate::reshard::status(
        observed.map.as_ref(),
        u32::try_from(svc.spec.shards).unwrap_or(0),
    );
    match &resharding {
        Some(r) => set(
            &mut conds,
            condition::RESHARDING,
            true,
            &r.phase,
            crate::reshard::message(r),
        ),
        None => set(
            &mut conds,
            condition::RESHARDING,
            false,
            "Settled",
            format!("keys are routed by {} shards", svc.spec.shards),
        ),
    }

    ShardedServiceStatus {
        observed_generation: generation,
        epoch,
        resharding,
        rollout,
        ready: Some(format!("{total_ready}/{total_desired}")),
        replicas_per_shard: shards.iter().map(|s| s.ready_replicas).min().unwrap_or(0),
        selector: Some(labels::service_selector_string(&name)),
        shards,
        notes,
        conditions: conds,
    }
}

/// Status for a spec that was refused: the previous observed state is kept, the conditions say
/// which field is wrong and how to fix it.
pub fn invalid(
    svc: &ShardedService,
    reason: InvalidReason,
    errors: &[FieldError],
    notes: Vec<String>,
    now: Timestamp,
) -> ShardedServiceStatus {
    let mut st = svc.status.clone().unwrap_or_default();
    let generation = svc.metadata.generation;
    let msg = shardmesh_api::validate::summarize(errors);
    set_condition(
        &mut st.conditions,
        condition::INVALID,
        true,
        reason.as_str(),
        msg.clone(),
        generation,
        now,
    );
    set_condition(
        &mut st.conditions,
        condition::READY,
        false,
        reason.as_str(),
        format!("the current spec is not applied (existing objects are left as they are): {msg}"),
        generation,
        now,
    );
    st.observed_generation = generation;
    st.selector = svc
        .metadata
        .name
        .as_deref()
        .map(labels::service_selector_string);
    st.notes = notes;
    st
}

/// Condition changes between two statuses that deserve an Event.
pub fn transitions(prev: &ShardedServiceStatus, next: &ShardedServiceStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    for t in [condition::INVALID, condition::READY, condition::DEGRADED] {
        let (Some(n), p) = (find(&next.conditions, t), find(&prev.conditions, t)) else {
            continue;
        };
        let changed = p.is_none_or(|p| p.status != n.status || p.reason != n.reason);
        if !changed {
            continue;
        }
        let bad = (t == condition::READY) != (n.status == "True");
        // Ready=False while rolling out is expected, the first Invalid=False is noise, and one
        // cause (e.g. InvalidSpec flips Invalid and Ready) is told once.
        let told = out.iter().any(|o: &Transition| o.reason == n.reason);
        // A halt is told by the rollout's own Event, which names the shard and the pod.
        if (t == condition::READY && n.reason == "RolloutInProgress")
            || n.reason == "RolloutHalted"
            || (!bad && p.is_none())
            || told
        {
            continue;
        }
        out.push(Transition {
            warning: bad,
            reason: n.reason.clone(),
            note: n.message.clone(),
        });
    }
    if !prev.shards.is_empty() && prev.shards.len() != next.shards.len() {
        out.push(Transition {
            warning: false,
            reason: if next.shards.len() > prev.shards.len() {
                "ShardsAdded"
            } else {
                "ShardsRemoved"
            }
            .into(),
            note: format!("shards {} → {}", prev.shards.len(), next.shards.len()),
        });
    }
    let phase = |s: &ShardedServiceStatus| s.resharding.as_ref().map(|r| r.phase.clone());
    if phase(prev) != phase(next) {
        out.push(match &next.resharding {
            Some(r) => Transition {
                warning: false,
                reason: format!("Resharding{}", r.phase),
                note: crate::reshard::message(r),
            },
            None => Transition {
                warning: false,
                reason: "ReshardingComplete".into(),
                note: format!("keys are routed by {} shards", next.shards.len()),
            },
        });
    }
    out.extend(rollout_transitions(
        prev.rollout.as_ref(),
        next.rollout.as_ref(),
    ));
    let replicas = |s: &ShardedServiceStatus| s.shards.first().map(|x| x.replicas);
    if let (Some(a), Some(b)) = (replicas(prev), replicas(next)) {
        if a != b {
            out.push(Transition {
                warning: false,
                reason: "Scaled".into(),
                note: format!("replicas per shard {a} → {b}"),
            });
        }
    }
    out
}

/// Events of a rollout: each wave started, a halt (naming the shard and the pod's reason), and
/// completion.
fn rollout_transitions(
    prev: Option<&RolloutStatus>,
    next: Option<&RolloutStatus>,
) -> Vec<Transition> {
    use crate::rollout::{message, phase};
    let Some(n) = next else {
        return Vec::new();
    };
    let same = prev.filter(|p| p.revision == n.revision);
    let mut out = Vec::new();
    if n.halted.is_some() && same.and_then(|p| p.halted.as_ref()).is_none() {
        out.push(Transition {
            warning: true,
            reason: "RolloutHalted".into(),
            note: message(n),
        });
    } else if n.phase == phase::ROLLING && same.is_none_or(|p| p.wave != n.wave) {
        out.push(Transition {
            warning: false,
            reason: "RolloutWave".into(),
            note: message(n),
        });
    } else if n.phase == phase::COMPLETE
        && n.wave > 0
        && same.is_some_and(|p| p.phase != phase::COMPLETE)
    {
        out.push(Transition {
            warning: false,
            reason: "RolloutComplete".into(),
            note: message(n),
        });
    }
    out
}

fn find<'a>(conds: &'a [Condition], t: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == t)
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if ok { "True" } else { "False" };
    let new = |ltt| Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.clone(),
        observed_generation: generation,
        last_transition_time: ltt,
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => *c = new(c.last_transition_time.clone()),
        Some(c) => *c = new(Time(now)),
        None => conds.push(new(Time(now))),
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(generation: i64, status: Option<ShardedServiceStatus>) -> ShardedService {
        let mut s: ShardedService = serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u", "generation": generation},
            "spec": {"shards": 2, "replicasPerShard": 2, "port": 8080,
                     "template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}}
        }))
        .expect("fixture");
        s.status = status;
        s
    }

    fn sts(ready: i32, replicas: i32) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"generation": 1},
            "spec": {"selector": {}, "serviceName": "x", "template": {}},
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas}
        }))
        .expect("sts")
    }

    fn pod(name: &str, shard: u32, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"shardmesh.io/shard": shard.to_string()}},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .expect("pod")
    }

    fn observed(ready: [i32; 2]) -> Observed {
        let mut pods = Vec::new();
        for (shard, n) in ready.iter().enumerate() {
            for r in 0..2 {
                pods.push(pod(&format!("orders-{shard}-{r}"), shard as u32, r < *n));
            }
        }
        Observed {
            stateful_sets: [(0, sts(ready[0], 2)), (1, sts(ready[1], 2))].into(),
            pods,
            map: None,
            rollout: None,
        }
    }

    fn cond<'a>(s: &'a ShardedServiceStatus, t: &str) -> (&'a str, &'a str) {
        let c = find(&s.conditions, t).expect(t);
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn create_progresses_then_ready_then_degraded_then_ready() {
        let now = Timestamp::UNIX_EPOCH;
        let s1 = applied(&svc(1, None), &observed([1, 0]), vec![], now);
        assert_eq!(cond(&s1, condition::PROGRESSING), ("True", "RollingOut"));
        assert_eq!(cond(&s1, condition::DEGRADED).0, "False");
        assert_eq!(s1.ready.as_deref(), Some("1/4"));
        assert_eq!(s1.epoch, 1);

        let s2 = applied(&svc(1, Some(s1.clone())), &observed([2, 2]), vec![], now);
        assert_eq!(cond(&s2, condition::READY), ("True", "AllShardsReady"));
        assert_eq!(
            cond(&s2, condition::PROGRESSING),
            ("False", "RolloutComplete")
        );
        assert_eq!(s2.epoch, 2);
        assert_eq!(s2.shards[1].live_members, 2);
        assert_eq!(s2.replicas_per_shard, 2);

        // A pod dies: Degraded, not Progressing.
        let s3 = applied(&svc(1, Some(s2.clone())), &observed([2, 1]), vec![], now);
        assert_eq!(
            cond(&s3, condition::DEGRADED),
            ("True", "ReplicasUnavailable")
        );
        assert_eq!(cond(&s3, condition::PROGRESSING).0, "False");
        assert_eq!(cond(&s3, condition::READY).0, "False");
        assert_eq!(s3.epoch, 3);
        let ev = transitions(&s2, &s3);
        assert!(
            ev.iter()
                .any(|t| t.warning && t.reason == "ReplicasUnavailable"),
            "{ev:?}"
        );

        let s4 = applied(&svc(1, Some(s3.clone())), &observed([2, 2]), vec![], now);
        assert_eq!(cond(&s4, condition::READY).0, "True");
        assert_eq!(cond(&s4, condition::DEGRADED).0, "False");
        // Unchanged membership keeps the epoch.
        let s5 = applied(&svc(1, Some(s4.clone())), &observed([2, 2]), vec![], now);
        assert_eq!(s5.epoch, s4.epoch);
        assert_eq!(s5.conditions, s4.conditions);
    }

    #[test]
    fn published_shard_map_is_the_source_of_members_and_epoch() {
        use shardmesh_api::shardmap::{Member, Shard};
        let now = Timestamp::UNIX_EPOCH;
        let mut obs = observed([2, 2]);
        let member = |pod: &str| Member {
            pod: pod.into(),
            address: "10.0.0.1:4143".into(),
        };
        obs.map = Some(ShardMap {
            epoch: 7,
            routing_count: None,
            previous: None,
            shards: vec![
                Shard {
                    index: 0,
                    members: vec![member("orders-0-1")],
                    leader: Some(shardmesh_api::shardmap::Leader {
                        pod: "orders-0-1".into(),
                        address: "10.0.0.1:4143".into(),
                        epoch: 4,
                    }),
                },
                Shard {
                    index: 1,
                    members: vec![member("orders-1-0"), member("orders-1-1")],
                    leader: None,
                },
            ],
        });
        let s = applied(&svc(1, None), &obs, vec![], now);
        assert_eq!(s.epoch, 7);
        assert_eq!(
            (s.shards[0].leader.as_deref(), s.shards[0].leader_epoch),
            (Some("orders-0-1"), Some(4))
        );
        assert_eq!(
            (s.shards[1].leader.as_deref(), s.shards[1].leader_epoch),
            (None, None)
        );
        assert_eq!((s.shards[0].live_members, s.shards[1].live_members), (1, 2));
        // Readiness still comes from the workloads.
        assert_eq!(s.shards[0].ready_replicas, 2);
    }

    /// At the CRD's maximum (1,024 shards of 100 replicas, leaders elected, every other shard
    /// lagging), the whole ShardedService with its status stays far below the 1 MiB an object
    /// may take: the status counts members and names leaders, the map's slices list the members.
    #[test]
    fn status_fits_at_the_crds_maximum() {
        use shardmesh_api::shardmap::MAX_SHARDS;
        let name = "a".repeat(40);
        let mut s = svc(1, None);
        s.metadata.name = Some(name.clone());
        s.spec.shards = MAX_SHARDS as i32;
        s.spec.replicas_per_shard = 100;
        let mut sts_of = |i: u32| {
            let mut st = sts(if i % 2 == 0 { 100 } else { 99 }, 100);
            let status = st.status.as_mut().expect("status");
            status.current_revision = Some(format!("{name}-{i}-7d9f8b6c5d"));
            status.update_revision = Some(format!("{name}-{i}-6c5d7d9f8b"));
            (i, st)
        };
        let stateful_sets = (0..MAX_SHARDS).map(&mut sts_of).collect();
        let map = crate::shardmap::tests::map_at_max(&name);
        let obs = Observed {
            stateful_sets,
            pods: Vec::new(),
            map: Some(map),
            rollout: None,
        };
        s.status = Some(applied(&s, &obs, vec![], Timestamp::UNIX_EPOCH));
        let st = s.status.as_ref().expect("status");
        assert_eq!(st.shards.len(), MAX_SHARDS as usize);
        assert_eq!(st.shards[5].live_members, 100);
        let bytes = serde_json::to_vec(&s).expect("json").len();
        eprintln!("ShardedService at the CRD's maximum, status included: {bytes} bytes");
        assert!(bytes < 512 * 1024, "{bytes} bytes");
    }

    #[test]
    fn new_generation_is_progress_not_degradation() {
        let now = Timestamp::UNIX_EPOCH;
        let ready = applied(&svc(1, None), &observed([2, 2]), vec![], now);
        let s = applied(&svc(2, Some(ready)), &observed([2, 1]), vec![], now);
        assert_eq!(cond(&s, condition::PROGRESSING).0, "True");
        assert_eq!(cond(&s, condition::DEGRADED).0, "False");
        let later = now + SignedDuration::from_secs(601);
        let s = applied(&svc(2, Some(s)), &observed([2, 1]), vec![], later);
        assert_eq!(
            cond(&s, condition::DEGRADED),
            ("True", "ProgressDeadlineExceeded")
        );
    }

    #[test]
    fn invalid_keeps_observed_state_and_names_the_field() {
        let now = Timestamp::UNIX_EPOCH;
        let ready = applied(&svc(1, None), &observed([2, 2]), vec![], now);
        let errs = vec![FieldError {
            path: "spec.port".into(),
            message: "bad".into(),
        }];
        let s = invalid(
            &svc(2, Some(ready.clone())),
            InvalidReason::InvalidSpec,
            &errs,
            vec![],
            now,
        );
        assert_eq!(cond(&s, condition::INVALID), ("True", "InvalidSpec"));
        assert!(find(&s.conditions, condition::INVALID)
            .expect("c")
            .message
            .contains("spec.port: bad"));
        assert_eq!(s.shards, ready.shards);
        assert_eq!(s.observed_generation, Some(2));
        let ev = transitions(&ready, &s);
        assert!(ev.iter().any(|t| t.warning && t.reason == "InvalidSpec"));
    }

    #[test]
    fn transition_time_kept_when_status_unchanged() {
        let mut conds = Vec::new();
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = t0 + SignedDuration::from_secs(5);
        set_condition(&mut conds, "Ready", true, "A", "m".into(), Some(1), t0);
        set_condition(&mut conds, "Ready", true, "B", "m2".into(), Some(2), t1);
        assert_eq!(conds[0].last_transition_time, Time(t0));
        assert_eq!(conds[0].reason, "B");
        set_condition(&mut conds, "Ready", false, "C", "m3".into(), Some(2), t1);
        assert_eq!(conds[0].last_transition_time, Time(t1));
    }

    #[test]
    fn halted_rollout_is_not_progressing_and_told_once() {
        use crate::rollout::phase;
        let rolling = RolloutStatus {
            revision: "abc".into(),
            phase: phase::ROLLING.into(),
            wave: 1,
            updated: "0/2".into(),
            shards_in_flight: vec![0],
            ..RolloutStatus::default()
        };
        let mut o = observed([1, 2]);
        o.rollout = Some(rolling.clone());
        let before = applied(&svc(2, None), &o, vec![], Timestamp::UNIX_EPOCH);
        assert_eq!(cond(&before, "Progressing"), ("True", "RollingOut"));
        let halted = RolloutStatus {
            phase: phase::HALTED.into(),
            halted: Some("shard 0: pod orders-0-1: container app CrashLoopBackOff".into()),
            ..rolling
        };
        o.rollout = Some(halted);
        let after = applied(
            &svc(2, Some(before.clone())),
            &o,
            vec![],
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(cond(&after, "Progressing"), ("False", "RolloutHalted"));
        assert_eq!(cond(&after, "Degraded"), ("True", "RolloutHalted"));
        let told = transitions(&before, &after);
        let halt: Vec<_> = told
            .iter()
            .filter(|t| t.reason == "RolloutHalted")
            .collect();
        assert_eq!(halt.len(), 1, "{told:?}");
        assert!(halt[0].warning && halt[0].note.contains("orders-0-1"));
        // Unchanged: nothing more to tell.
        assert!(transitions(&after, &after).is_empty());
    }
}
