//! Shard-by-shard rollout of a pod-template change, as a pure planner: spec, observed
//! StatefulSets and pods, the previous status and the clock → which shards may move now, and
//! what status says. No client, so every rule is unit-tested.
//!
//! Every shard's StatefulSet always carries the current template; what holds a shard back is
//! `rollingUpdate.partition` = replicas. A held shard keeps its pods on their current revision,
//! even when one is deleted or restarts (the StatefulSet recreates it from that revision), and a
//! released shard (partition 0) replaces its pods one at a time with the StatefulSet's own
//! pod-by-pod safety. Both exist since Kubernetes 1.7, so this works on every supported server.
//!
//! Which revision a shard was released for is kept on its StatefulSet (annotation
//! [`RELEASED`]), so the plan survives operator restarts and never depends on status being
//! current. Waves: the first `canaryShards` shards that need the new template, then
//! `maxShardsInFlight` at a time, in index order; a wave starts only when every shard of the
//! previous one runs the new template with every pod Ready, and has stayed so for `bakeTime`.
//!
//! Halt: a new pod that crash-loops or cannot start, or a wave not done within
//! `progressDeadline`, halts the rollout. Nothing more is released for that template; shards
//! already released stay as they are (the StatefulSet does not replace more than the broken
//! pod, so the shard keeps serving on its other replicas). A different template (a revert, or a
//! fix) starts a new rollout and clears the halt; shards on the reverted-to revision are done
//! at once, touched shards roll back first.
//!
//! With resharding: shards added by a change of `spec.shards` start on the current template
//! (they have no old pods); shards being removed are never rolled.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::{
    api::{apps::v1::StatefulSet, core::v1::Pod},
    jiff::{SignedDuration, Timestamp},
};
use shardmesh_api::v1alpha1::{Rollout, RolloutStatus, RolloutStrategy};

/// StatefulSet annotation: the template revision the shard was released for.
pub const RELEASED: &str = "shardmesh.io/released-revision";
/// StatefulSet annotation: the template revision its `spec.template` is.
pub const TEMPLATE: &str = "shardmesh.io/template-revision";
/// Pod label the StatefulSet controller sets to the pod's revision.
const POD_REVISION: &str = "controller-revision-hash";

/// The time left until `deadline` has passed since `from` (at least a second). A rollout is
/// looked at again then (or at the controller's resync, whichever comes first), and on every
/// event in between: progress and failures arrive as events (the controller watches the
/// StatefulSets and the pods of every service; a crash loop changes its pod's status on every
/// restart), so nothing is polled.
fn until_past(from: Timestamp, deadline: Duration, now: Timestamp) -> Duration {
    deadline
        .saturating_sub(elapsed(from, now))
        .saturating_add(Duration::from_secs(1))
}

/// Phase names of `status.rollout.phase`.
pub mod phase {
    /// Every shard runs the current template.
    pub const COMPLETE: &str = "Complete";
    /// A wave is replacing pods.
    pub const ROLLING: &str = "Rolling";
    /// A wave is done and must stay Ready for `bakeTime`.
    pub const BAKING: &str = "Baking";
    /// `spec.rollout.paused`: no new wave starts.
    pub const PAUSED: &str = "Paused";
    /// A new revision failed; nothing more is rolled until the template changes.
    pub const HALTED: &str = "Halted";
}

/// Container waiting reasons that mean the new revision cannot run.
const FAILING: [&str; 7] = [
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What one shard's StatefulSet and pods say about the target revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardObs {
    /// [`RELEASED`] of the existing StatefulSet.
    pub released_for: Option<String>,
    /// Every pod runs the target template and is Ready, as observed by the StatefulSet
    /// controller.
    pub converged: bool,
    /// A pod on the StatefulSet's update revision that cannot run, e.g.
    /// `pod orders-0-1: container app CrashLoopBackOff (exit code 1)`.
    pub failure: Option<String>,
    /// `ready/desired` and updated counts, for messages.
    pub ready: i32,
    /// Pods on the update revision.
    pub updated: i32,
}

impl ShardObs {
    /// Observes an existing StatefulSet (before this reconcile's apply) against `target`, with
    /// the pods of that shard.
    pub fn of(sts: &StatefulSet, pods: &[&Pod], target: &str, desired: i32) -> ShardObs {
        let notes = sts.metadata.annotations.as_ref();
        let note = |k: &str| notes.and_then(|a| a.get(k)).cloned();
        let Some(st) = sts.status.as_ref() else {
            // Not yet seen by the StatefulSet controller: nothing converged, nothing failing.
            return ShardObs {
                released_for: note(RELEASED),
                ..ShardObs::default()
            };
        };
        let seen = st.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(1);
        let ready = st.ready_replicas.unwrap_or(0);
        let updated = st.updated_replicas.unwrap_or(0);
        let on_target = note(TEMPLATE).as_deref() == Some(target) && seen;
        let converged = on_target
            && st.replicas == desired
            && updated == desired
            && ready == desired
            && st.current_revision.is_some()
            && st.current_revision == st.update_revision;
        let failure = if on_target {
            st.update_revision
                .as_deref()
                .and_then(|rev| first_failure(pods, rev))
        } else {
            None
        };
        ShardObs {
            released_for: note(RELEASED),
            converged,
            failure,
            ready,
            updated,
        }
    }
}

/// The first pod of revision `rev` whose containers cannot run, described.
fn first_failure(pods: &[&Pod], rev: &str) -> Option<String> {
    pods.iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(POD_REVISION))
                    .is_some_and(|r| r == rev)
        })
        .find_map(|p| {
            let st = p.status.as_ref()?;
            let all = st
                .init_container_statuses
                .iter()
                .flatten()
                .chain(st.container_statuses.iter().flatten());
            for c in all {
                let exit = c
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| t.exit_code);
                let exit_note = exit
                    .map(|e| format!(" (exit code {e})"))
                    .unwrap_or_default();
                let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
                if let Some(reason) = waiting
                    .and_then(|w| w.reason.as_deref())
                    .filter(|r| FAILING.contains(r))
                {
                    return Some(format!(
                        "pod {}: container {} {reason}{exit_note}",
                        p.metadata.name.as_deref().unwrap_or("?"),
                        c.name
                    ));
                }
                if c.restart_count > 0 && exit.is_some_and(|e| e != 0) {
                    return Some(format!(
                        "pod {}: container {} restarted {} times{exit_note}",
                        p.metadata.name.as_deref().unwrap_or("?"),
                        c.name,
                        c.restart_count
                    ));
                }
            }
            None
        })
}

/// `spec.rollout` with its durations parsed (validation has checked them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Wave by wave, or everything at once.
    pub strategy: RolloutStrategy,
    /// First wave size.
    pub canary: usize,
    /// Later wave size.
    pub wave: usize,
    /// How long a finished wave must stay Ready.
    pub bake: Duration,
    /// How long a wave may take.
    pub deadline: Duration,
    /// No new wave.
    pub paused: bool,
}

impl Policy {
    /// From the spec; unparsable durations fall back to the defaults (validation refuses them
    /// before this is reached).
    pub fn of(r: &Rollout) -> Policy {
        Policy {
            strategy: r.strategy,
            canary: usize::try_from(r.canary_shards).unwrap_or(1).max(1),
            wave: usize::try_from(r.max_shards_in_flight).unwrap_or(1).max(1),
            bake: r.bake_time.parse().unwrap_or(Duration::from_secs(30)),
            deadline: r
                .progress_deadline
                .parse()
                .unwrap_or(Duration::from_secs(600)),
            paused: r.paused,
        }
    }
}

/// The decision of one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Shards (of `0..spec.shards`) released for the target: partition 0 and [`RELEASED`] =
    /// target. The others are held (partition = replicas, [`RELEASED`] kept).
    pub released: BTreeSet<u32>,
    /// `status.rollout`.
    pub status: RolloutStatus,
    /// When to look again without an event.
    pub requeue: Option<Duration>,
}

fn ts(t: Timestamp) -> String {
    t.to_string()
}

fn since(s: &RolloutStatus) -> Option<Timestamp> {
    s.since.as_deref().and_then(|t| t.parse().ok())
}

fn elapsed(from: Timestamp, now: Timestamp) -> Duration {
    let d = now.duration_since(from);
    if d <= SignedDuration::ZERO {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

fn list(shards: &BTreeSet<u32>) -> Vec<i32> {
    shards.iter().map(|&i| i as i32).collect()
}

/// Plans the rollout of template revision `target` over `shards` (index = shard; only shards
/// of `0..spec.shards`).
pub fn plan(
    policy: &Policy,
    target: &str,
    shards: &[ShardObs],
    prev: Option<&RolloutStatus>,
    now: Timestamp,
) -> Plan {
    let prev = prev.filter(|p| p.revision == target);
    let total = shards.len();
    let converged: BTreeSet<u32> = (0..total as u32)
        .filter(|&i| shards[i as usize].converged)
        .collect();
    // A shard that already runs the target needs nothing: it counts as released.
    let mut released: BTreeSet<u32> = (0..total as u32)
        .filter(|&i| {
            converged.contains(&i) || shards[i as usize].released_for.as_deref() == Some(target)
        })
        .collect();
    let updated = format!("{}/{total}", converged.len());
    let mut status = RolloutStatus {
        revision: target.to_string(),
        phase: phase::COMPLETE.into(),
        wave: prev.map_or(0, |p| p.wave),
        updated,
        shards_in_flight: Vec::new(),
        since: None,
        halted: None,
    };

    if policy.strategy == RolloutStrategy::AllAtOnce {
        released = (0..total as u32).collect();
        let rolling: BTreeSet<u32> = released.difference(&converged).copied().collect();
        if !rolling.is_empty() {
            status.phase = phase::ROLLING.into();
            status.wave = 1;
            status.shards_in_flight = list(&rolling);
        }
        return Plan {
            requeue: None,
            released,
            status,
        };
    }

    let in_flight: BTreeSet<u32> = released.difference(&converged).copied().collect();
    let pending: Vec<u32> = (0..total as u32)
        .filter(|i| !released.contains(i))
        .collect();
    if in_flight.is_empty() && pending.is_empty() {
        // Done: a pod failing now is a degradation of a finished rollout, not a halt.
        return Plan {
            released,
            status,
            requeue: None,
        };
    }
    let wave_started = prev
        .filter(|p| p.phase == phase::ROLLING || p.phase == phase::HALTED)
        .and_then(since)
        .unwrap_or(now);

    // Halt: kept until the template changes; otherwise a failing new pod of any released
    // shard, or a wave past its deadline.
    let halted = prev.and_then(|p| p.halted.clone()).or_else(|| {
        released
            .iter()
            .find_map(|&i| {
                shards[i as usize]
                    .failure
                    .as_ref()
                    .map(|f| format!("shard {i}: {f}"))
            })
            .or_else(|| {
                let late = elapsed(wave_started, now) > policy.deadline;
                in_flight.iter().find(|_| late).map(|&i| {
                    let s = &shards[i as usize];
                    format!(
                        "shard {i}: not updated and Ready within the progress deadline ({}s): \
                         {} pods ready, {} updated",
                        policy.deadline.as_secs(),
                        s.ready,
                        s.updated
                    )
                })
            })
    });
    if let Some(h) = halted {
        status.phase = phase::HALTED.into();
        status.shards_in_flight = list(&in_flight);
        status.since = Some(ts(wave_started));
        status.halted = Some(h);
        return Plan {
            released,
            status,
            requeue: None,
        };
    }

    if !in_flight.is_empty() {
        status.phase = phase::ROLLING.into();
        status.shards_in_flight = list(&in_flight);
        status.since = Some(ts(wave_started));
        return Plan {
            released,
            status,
            requeue: Some(until_past(wave_started, policy.deadline, now)),
        };
    }

    // The last wave is done: it bakes before the next one starts. (Wave 0 is no wave: shards
    // that were already on the target and only had to be observed again, e.g. after a revert.)
    if let Some(p) = prev.filter(|p| p.wave > 0 && !p.shards_in_flight.is_empty()) {
        let baking_since = if p.phase == phase::BAKING {
            since(p).unwrap_or(now)
        } else {
            now
        };
        let baked = elapsed(baking_since, now);
        if baked < policy.bake {
            status.phase = phase::BAKING.into();
            status.shards_in_flight = p.shards_in_flight.clone();
            status.since = Some(ts(baking_since));
            return Plan {
                released,
                status,
                requeue: Some(until_past(baking_since, policy.bake, now)),
            };
        }
    }
    if policy.paused {
        status.phase = phase::PAUSED.into();
        return Plan {
            released,
            status,
            requeue: None,
        };
    }
    let size = if status.wave == 0 {
        policy.canary
    } else {
        policy.wave
    };
    let wave: BTreeSet<u32> = pending.into_iter().take(size).collect();
    released.extend(&wave);
    status.wave += 1;
    status.phase = phase::ROLLING.into();
    status.shards_in_flight = list(&wave);
    status.since = Some(ts(now));
    Plan {
        released,
        status,
        requeue: Some(until_past(now, policy.deadline, now)),
    }
}

/// One line for the Progressing condition and Events.
pub fn message(s: &RolloutStatus) -> String {
    let shards = |v: &[i32]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match s.phase.as_str() {
        phase::HALTED => format!(
            "rollout of revision {} halted at wave {} ({} shards updated): {}; untouched shards \
             stay on their revision; revert or fix spec.template to continue",
            s.revision,
            s.wave,
            s.updated,
            s.halted.as_deref().unwrap_or("")
        ),
        phase::ROLLING => format!(
            "wave {}: shard(s) {} rolling to revision {} ({} shards updated)",
            s.wave,
            shards(&s.shards_in_flight),
            s.revision,
            s.updated
        ),
        phase::BAKING => format!(
            "wave {}: shard(s) {} updated, baking before the next wave ({} shards updated)",
            s.wave,
            shards(&s.shards_in_flight),
            s.updated
        ),
        phase::PAUSED => format!(
            "paused by spec.rollout.paused after wave {} ({} shards updated)",
            s.wave, s.updated
        ),
        _ => format!("every shard runs revision {}", s.revision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            strategy: RolloutStrategy::ShardByShard,
            canary: 1,
            wave: 2,
            bake: Duration::from_secs(30),
            deadline: Duration::from_secs(300),
            paused: false,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// Shards on the old revision, never released for "new".
    fn old(n: usize) -> Vec<ShardObs> {
        vec![ShardObs::default(); n]
    }

    fn done() -> ShardObs {
        ShardObs {
            released_for: Some("new".into()),
            converged: true,
            ..ShardObs::default()
        }
    }

    fn rolling() -> ShardObs {
        ShardObs {
            released_for: Some("new".into()),
            ..ShardObs::default()
        }
    }

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn canary_first_then_waves_after_bake() {
        let p = policy();
        // A new template: only the canary shard moves.
        let first = plan(&p, "new", &old(5), None, at(0));
        assert_eq!(first.released, set(&[0]));
        assert_eq!(first.status.phase, phase::ROLLING);
        assert_eq!(first.status.wave, 1);
        assert_eq!(first.status.updated, "0/5");

        // Still rolling: nothing more.
        let mut obs = old(5);
        obs[0] = rolling();
        let again = plan(&p, "new", &obs, Some(&first.status), at(20));
        assert_eq!(again.released, set(&[0]));
        assert_eq!(again.status.since, first.status.since);

        // Canary done: it bakes for 30 s before wave 2.
        obs[0] = done();
        let bake = plan(&p, "new", &obs, Some(&again.status), at(40));
        assert_eq!(bake.status.phase, phase::BAKING);
        assert_eq!(bake.released, set(&[0]));
        let still = plan(&p, "new", &obs, Some(&bake.status), at(69));
        assert_eq!(still.status.phase, phase::BAKING);
        // Looked at again just after the bake time, not before.
        assert_eq!(still.requeue, Some(Duration::from_secs(2)));

        // Baked: the next wave has maxShardsInFlight = 2 shards, in index order.
        let wave2 = plan(&p, "new", &obs, Some(&still.status), at(71));
        assert_eq!(wave2.released, set(&[0, 1, 2]));
        assert_eq!(wave2.status.wave, 2);
        assert_eq!(wave2.status.shards_in_flight, vec![1, 2]);
    }

    #[test]
    fn never_more_shards_in_flight_than_allowed() {
        let p = policy();
        let mut obs = old(6);
        let mut prev: Option<RolloutStatus> = None;
        let mut t = 0;
        let mut waves = Vec::new();
        for _ in 0..100 {
            let plan = plan(&p, "new", &obs, prev.as_ref(), at(t));
            let moving: Vec<u32> = plan
                .released
                .iter()
                .copied()
                .filter(|&i| !obs[i as usize].converged)
                .collect();
            let limit = if plan.status.wave <= 1 { 1 } else { 2 };
            assert!(
                moving.len() <= limit,
                "{moving:?} at wave {}",
                plan.status.wave
            );
            if plan.status.phase == phase::COMPLETE {
                prev = Some(plan.status);
                break;
            }
            if plan.status.phase == phase::ROLLING && waves.last() != Some(&moving) {
                waves.push(moving.clone());
            }
            // The StatefulSets finish what was released within one step.
            for i in &plan.released {
                obs[*i as usize] = done();
            }
            prev = Some(plan.status);
            t += 10;
        }
        assert_eq!(prev.map(|p| p.updated), Some("6/6".into()));
        assert_eq!(waves, vec![vec![0], vec![1, 2], vec![3, 4], vec![5]]);
    }

    #[test]
    fn crash_loop_halts_and_holds_untouched_shards_until_the_template_changes() {
        let p = policy();
        let first = plan(&p, "new", &old(4), None, at(0));
        let mut obs = old(4);
        obs[0] = ShardObs {
            failure: Some("pod s-0-1: container app CrashLoopBackOff (exit code 1)".into()),
            ..rolling()
        };
        let halted = plan(&p, "new", &obs, Some(&first.status), at(15));
        assert_eq!(halted.status.phase, phase::HALTED);
        assert_eq!(halted.released, set(&[0]));
        let why = halted.status.halted.clone().unwrap_or_default();
        assert!(
            why.contains("shard 0") && why.contains("CrashLoopBackOff"),
            "{why}"
        );
        assert!(message(&halted.status).contains("revert"));

        // Halted stays halted even once the pod looks fine for a moment.
        obs[0] = rolling();
        let later = plan(&p, "new", &obs, Some(&halted.status), at(600));
        assert_eq!(later.status.phase, phase::HALTED);
        assert_eq!(later.released, set(&[0]));

        // Revert: the untouched shards already run the old template (converged, no release
        // needed); the canary shard rolls back as the new rollout's canary.
        let mut back = vec![
            ShardObs {
                released_for: Some("new".into()),
                ..ShardObs::default()
            };
            1
        ];
        back.extend((1..4).map(|_| ShardObs {
            released_for: Some("old".into()),
            converged: true,
            ..ShardObs::default()
        }));
        // First look after the revert: the untouched shards' StatefulSets still carry the
        // broken template until this apply, so they are released but not yet seen converged.
        let mut unseen = back.clone();
        for s in &mut unseen[1..] {
            s.converged = false;
        }
        let settling = plan(&p, "old", &unseen, Some(&later.status), at(619));
        assert_eq!(settling.status.wave, 0);
        assert_eq!(settling.released, set(&[1, 2, 3]));
        // Seen converged a moment later: no bake for them, the canary wave starts at once.
        let revert = plan(&p, "old", &back, Some(&settling.status), at(620));
        assert_eq!(revert.status.halted, None);
        assert_eq!(revert.status.phase, phase::ROLLING);
        assert_eq!(revert.released, set(&[0, 1, 2, 3]));
        assert_eq!(revert.status.shards_in_flight, vec![0]);
        assert_eq!(revert.status.updated, "3/4");
    }

    #[test]
    fn wave_past_its_deadline_halts() {
        let p = policy();
        let first = plan(&p, "new", &old(3), None, at(0));
        let mut obs = old(3);
        obs[0] = ShardObs {
            ready: 1,
            updated: 1,
            ..rolling()
        };
        // Nothing happening is looked at right after the deadline (the resync may come sooner).
        assert_eq!(first.requeue, Some(Duration::from_secs(301)));
        let on_time = plan(&p, "new", &obs, Some(&first.status), at(299));
        assert_eq!(on_time.status.phase, phase::ROLLING);
        assert_eq!(on_time.requeue, Some(Duration::from_secs(2)));
        let late = plan(&p, "new", &obs, Some(&on_time.status), at(301));
        assert_eq!(late.status.phase, phase::HALTED);
        assert!(late
            .status
            .halted
            .is_some_and(|h| h.contains("progress deadline")));
    }

    #[test]
    fn paused_finishes_the_wave_then_waits() {
        let mut p = policy();
        let first = plan(&p, "new", &old(3), None, at(0));
        p.paused = true;
        let mut obs = old(3);
        obs[0] = done();
        let baked = plan(&p, "new", &obs, Some(&first.status), at(10));
        let paused = plan(&p, "new", &obs, Some(&baked.status), at(100));
        assert_eq!(paused.status.phase, phase::PAUSED);
        assert_eq!(paused.released, set(&[0]));
        p.paused = false;
        let resumed = plan(&p, "new", &obs, Some(&paused.status), at(110));
        assert_eq!(resumed.released, set(&[0, 1, 2]));
    }

    #[test]
    fn all_at_once_releases_every_shard() {
        let p = Policy {
            strategy: RolloutStrategy::AllAtOnce,
            ..policy()
        };
        let all = plan(&p, "new", &old(4), None, at(0));
        assert_eq!(all.released, set(&[0, 1, 2, 3]));
        assert_eq!(all.status.phase, phase::ROLLING);
    }

    #[test]
    fn nothing_to_roll_is_complete_without_waves() {
        let obs: Vec<ShardObs> = (0..3)
            .map(|_| ShardObs {
                converged: true,
                ..ShardObs::default()
            })
            .collect();
        let p = plan(&policy(), "new", &obs, None, at(0));
        assert_eq!(p.status.phase, phase::COMPLETE);
        assert_eq!(p.status.wave, 0);
        assert_eq!(p.released, set(&[0, 1, 2]));
        assert_eq!(p.requeue, None);
    }

    fn sts(
        template: &str,
        observed: i64,
        current: &str,
        update: &str,
        ready: i32,
        updated: i32,
    ) -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s-0", "generation": 3,
                         "annotations": {TEMPLATE: template, RELEASED: "new"}},
            "spec": {"selector": {}, "serviceName": "s-0", "template": {}},
            "status": {"observedGeneration": observed, "replicas": 2, "readyReplicas": ready,
                       "updatedReplicas": updated, "currentRevision": current,
                       "updateRevision": update},
        }))
        .expect("sts")
    }

    fn pod(name: &str, rev: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {POD_REVISION: rev}},
            "status": {"containerStatuses": [status]},
        }))
        .expect("pod")
    }

    #[test]
    fn observation_of_statefulset_and_pods() {
        // Converged only on the target template, seen by the controller, all pods updated.
        let done = sts("new", 3, "r2", "r2", 2, 2);
        assert!(ShardObs::of(&done, &[], "new", 2).converged);
        assert!(
            !ShardObs::of(&done, &[], "other", 2).converged,
            "another template"
        );
        assert!(!ShardObs::of(&sts("new", 2, "r2", "r2", 2, 2), &[], "new", 2).converged);
        assert!(!ShardObs::of(&sts("new", 3, "r1", "r2", 2, 1), &[], "new", 2).converged);

        // A crash-looping pod of the update revision is a failure; one of the old revision is not.
        let looping = serde_json::json!({
            "name": "app", "ready": false, "restartCount": 3, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2}},
        });
        let rolling = sts("new", 3, "r1", "r2", 1, 1);
        let new_pod = pod("s-0-1", "r2", looping.clone());
        let old_pod = pod("s-0-0", "r1", looping);
        let obs = ShardObs::of(&rolling, &[&old_pod, &new_pod], "new", 2);
        assert_eq!(
            obs.failure.as_deref(),
            Some("pod s-0-1: container app CrashLoopBackOff (exit code 2)")
        );
        assert_eq!(obs.released_for.as_deref(), Some("new"));
        assert_eq!(ShardObs::of(&rolling, &[&old_pod], "new", 2).failure, None);
        // A pod that is merely starting is not a failure.
        let starting = pod(
            "s-0-1",
            "r2",
            serde_json::json!({"name": "app", "ready": false, "restartCount": 0, "image": "x",
                               "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}),
        );
        assert_eq!(ShardObs::of(&rolling, &[&starting], "new", 2).failure, None);
    }
}
