//! `kubectl shardmesh plan NAME --shards N`: what changing `spec.shards` would do, applying
//! nothing. The moved share is exact for jump hashing: growing n -> m moves exactly the keys
//! whose bucket under m is n or above, (m - n)/m of them, all to the new shards; shrinking
//! m -> n moves the removed shards' keys, (m - n)/m again, spread over the remaining shards. A
//! sample of keys through the sidecars' own `shard_for_key` confirms it. The steps follow the
//! operator's resharding order (`shardmesh_operator::reshard`) and rollout rules.

use serde::Serialize;
use shardmesh_api::{
    routing::shard_for_key,
    shardmap::ShardMap,
    validate::{self, FieldError},
    ShardedService,
};
use shardmesh_operator::rollout;

use crate::output::{field, Report, Table};

/// Keys sampled to confirm the arithmetic.
pub const SAMPLE_KEYS: u32 = 100_000;

/// Which keys move between two routing counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Movement {
    /// The count keys are routed by now.
    pub from: u32,
    /// The count asked for.
    pub to: u32,
    /// Exact share of keys whose owner changes: |to - from| / max(from, to).
    pub moved_fraction: f64,
    /// The same as a reduced fraction, e.g. `1/4`.
    pub moved: String,
    /// Shards that start owning keys.
    pub added_shards: Vec<u32>,
    /// Shards whose keys all move away and that are deleted afterwards.
    pub drained_shards: Vec<u32>,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The exact movement from `from` to `to` shards (both at least 1).
pub fn movement(from: u32, to: u32) -> Movement {
    let (from, to) = (from.max(1), to.max(1));
    let (num, den) = (from.abs_diff(to), from.max(to));
    let g = gcd(num, den).max(1);
    Movement {
        from,
        to,
        moved_fraction: f64::from(num) / f64::from(den),
        moved: if num == 0 {
            "0".into()
        } else {
            format!("{}/{}", num / g, den / g)
        },
        added_shards: (from..to).collect(),
        drained_shards: (to..from).collect(),
    }
}

/// The share of `keys` sample keys (`key-0`, `key-1`, …) whose shard differs between `from`
/// and `to` under [`shard_for_key`].
pub fn sampled(from: u32, to: u32, keys: u32) -> f64 {
    if keys == 0 {
        return 0.0;
    }
    let moved = (0..keys)
        .filter(|i| {
            let k = format!("key-{i}");
            shard_for_key(k.as_bytes(), from) != shard_for_key(k.as_bytes(), to)
        })
        .count();
    moved as f64 / f64::from(keys)
}

/// Whether the change would be accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// `admitted`, `refused` or `unverified` (the validating webhook could not be asked).
    pub verdict: &'static str,
    /// The refusal (naming the field and the fix) or how it was checked.
    pub detail: String,
}

impl Admission {
    /// Refused by shardmesh's own validation rules, evaluated locally.
    pub fn from_local(errors: &[FieldError]) -> Option<Admission> {
        (!errors.is_empty()).then(|| Admission {
            verdict: "refused",
            detail: validate::summarize(errors),
        })
    }
}

/// What `plan` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    /// Service name.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// `spec.shards` now.
    pub spec_shards: i32,
    /// The count asked for.
    pub target_shards: u32,
    /// Keys moving, from the count keys are routed by now.
    #[serde(flatten)]
    pub movement: Movement,
    /// The sampled share, confirming `movedFraction`.
    pub sampled_fraction: f64,
    /// Keys sampled.
    pub sampled_keys: u32,
    /// Pods created (added shards × replicas).
    pub pods_created: i64,
    /// Pods deleted when the handoff window closes (drained shards × replicas).
    pub pods_deleted: i64,
    /// `spec.resharding.handoffWindow`.
    pub handoff_window: String,
    /// What has to finish before this change starts, if anything.
    pub waits_for: Option<String>,
    /// What the operator does, in order.
    pub steps: Vec<Step>,
    /// What happens to pods and to a template rollout.
    pub rollout: String,
    /// Whether the API server (and the validating webhook) would accept the change.
    pub admission: Admission,
    /// Always false: plan never writes.
    pub applied: bool,
}

/// One step of the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// `status.resharding.phase` during the step (`-` after it).
    pub phase: String,
    /// What happens.
    pub what: String,
}

/// "shard 3" or "shards 3-5", and whether that is plural (for the verb).
fn range(v: &[u32]) -> (String, bool) {
    match (v.first(), v.last()) {
        (Some(a), Some(b)) if a == b => (format!("shard {a}"), false),
        (Some(a), Some(b)) => (format!("shards {a}-{b}"), true),
        _ => ("no shard".into(), false),
    }
}

fn percent(f: f64) -> String {
    format!("{:.2}%", f * 100.0)
}

/// The plan for `svc` to `target` shards given its published map (`None` before the first),
/// with `admission` from validation (local, or the server's dry run).
pub fn build(
    svc: &ShardedService,
    map: Option<&ShardMap>,
    target: u32,
    admission: Admission,
) -> PlanReport {
    let spec_shards = u32::try_from(svc.spec.shards).unwrap_or(1).max(1);
    let from = map.map_or(spec_shards, ShardMap::count).max(1);
    let mv = movement(from, target);
    let replicas = i64::from(svc.spec.replicas_per_shard);
    let window = svc.spec.resharding.handoff_window.to_string();
    // Validation refuses an unreadable window, so it can only be a valid one here.
    let handoff = svc
        .spec
        .resharding
        .handoff_window
        .parse()
        .map(|d| !d.is_zero())
        .unwrap_or(true);
    let misses = svc
        .spec
        .resharding
        .miss_statuses
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // The operator lists (and starts) the wanted shards at once, but changes the routing count
    // only once the open window closes (`reshard::next_layout`).
    let waits_for = map.and_then(|m| {
        m.previous.as_ref().map(|p| {
            format!(
                "the handoff window of the change {} -> {} is open until {}: added shards start \
                 now, but keys move only after it closes (one routing change at a time)",
                p.count,
                m.count(),
                p.until
            )
        })
    });
    let moved = format!("{} of the keys ({})", mv.moved, percent(mv.moved_fraction));
    let mut steps = Vec::new();
    let revision = svc.status.as_ref().and_then(|s| s.rollout.as_ref());
    let listed = map.map_or(0, |m| u32::try_from(m.shards.len()).unwrap_or(u32::MAX));
    let fresh_shards = i64::from(target.saturating_sub(from.max(listed)));
    if target > from {
        let (added, many) = range(&mv.added_shards);
        let to = if many {
            format!("each to one of {added}")
        } else {
            format!("all to {added}")
        };
        // A shard the map still lists (joining, or draining after a shrink) keeps its
        // workload: the operator never deletes a listed shard.
        let (fresh, kept): (Vec<u32>, Vec<u32>) =
            mv.added_shards.iter().partition(|&&i| i >= listed);
        let mut what = Vec::new();
        if !fresh.is_empty() {
            let (names, many) = range(&fresh);
            what.push(format!(
                "{names} {} a StatefulSet, a headless Service and a PodDisruptionBudget ({} new \
                 pods)",
                if many { "each get" } else { "gets" },
                fresh.len() as i64 * replicas,
            ));
        }
        if !kept.is_empty() {
            let (names, many) = range(&kept);
            what.push(format!(
                "{names} {} listed in the current map and {} kept with {} pods (and whatever \
                 data {} still {})",
                if many { "are" } else { "is" },
                if many { "are" } else { "is" },
                if many { "their" } else { "its" },
                if many { "they" } else { "it" },
                if many { "hold" } else { "holds" },
            ));
        }
        what.push(format!(
            "the map lists {} but routes no key there until every new shard has a ready member",
            if many { "them" } else { "it" }
        ));
        steps.push(Step {
            phase: "AddingShards".into(),
            what: what.join("; "),
        });
        steps.push(Step {
            phase: if handoff { "Handoff" } else { "-" }.into(),
            what: if handoff {
                format!(
                    "one new map (epoch + 1) routes by {target}: {moved} move, {to}; for \
                     {window} a read that misses ({misses}) on its new owner is served by its \
                     previous owner, and a DELETE of a moved key is applied on the previous owner \
                     first"
                )
            } else {
                format!(
                    "one new map (epoch + 1) routes by {target}: {moved} move at once, {to}; no \
                     handoff (handoffWindow {window})"
                )
            },
        });
        if handoff {
            steps.push(Step {
                phase: "-".into(),
                what: format!("after {window} the window closes; the change is complete"),
            });
        }
    } else if target < from {
        let (drained, many) = range(&mv.drained_shards);
        let (rest, _) = range(&(0..target).collect::<Vec<_>>());
        let moves = format!(
            "one new map (epoch + 1) routes by {target} at once: the keys of {drained}, {moved}, \
             move to {rest}"
        );
        steps.push(Step {
            phase: if handoff { "Draining" } else { "-" }.into(),
            what: if handoff {
                format!(
                    "{moves}; {drained} {} serving reads that miss ({misses}) for {window}",
                    if many { "keep" } else { "keeps" }
                )
            } else {
                format!("{moves}; no handoff (handoffWindow {window})")
            },
        });
        steps.push(Step {
            phase: "-".into(),
            what: format!(
                "{drained} {} the map; {} and {} pods are deleted: data only {} is gone",
                if many { "leave" } else { "leaves" },
                if many {
                    "their StatefulSets, Services, PodDisruptionBudgets"
                } else {
                    "its StatefulSet, Service, PodDisruptionBudget"
                },
                i64::from(from - target) * replicas,
                if many { "they hold" } else { "it holds" },
            ),
        });
    }
    if target == spec_shards && target == from {
        steps.clear();
    }
    let rollout = rollout_sentence(target, from, fresh_shards > 0, revision);
    PlanReport {
        service: svc.metadata.name.clone().unwrap_or_default(),
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        spec_shards: svc.spec.shards,
        target_shards: target,
        sampled_fraction: sampled(from, target, SAMPLE_KEYS),
        sampled_keys: SAMPLE_KEYS,
        pods_created: fresh_shards * replicas,
        pods_deleted: i64::from(from.saturating_sub(target)) * replicas,
        handoff_window: window,
        waits_for,
        steps,
        rollout,
        admission,
        applied: false,
        movement: mv,
    }
}

fn rollout_sentence(
    target: u32,
    from: u32,
    creates: bool,
    r: Option<&shardmesh_api::v1alpha1::RolloutStatus>,
) -> String {
    if target == from {
        return "nothing changes: no pod is created, deleted or restarted".into();
    }
    let mut s = String::from(
        "no existing pod restarts: ownership is decided per request by the shard map (a pod's \
         SHARDMESH_SHARDS stays the count its shard was created with)",
    );
    if target > from {
        // A new shard has no old pods: its StatefulSet starts them on the current template at
        // once; the rollout planner counts it as a wave until its pods are Ready.
        if creates {
            s.push_str(&format!(
                "; the new shards' pods start at once on the current pod template{}, and \
                 status.rollout lists each new shard in flight until its pods are Ready",
                r.map(|r| format!(" (revision {})", r.revision))
                    .unwrap_or_default()
            ));
        } else {
            s.push_str("; no pod is created: the added shards are still listed and keep theirs");
        }
        if let Some(r) = r {
            if r.phase == rollout::phase::HALTED {
                s.push_str(&format!(
                    "; careful: the rollout of that revision is halted ({}), the new shards run \
                     it anyway",
                    r.halted.as_deref().unwrap_or("no reason recorded")
                ));
            } else if r.phase != rollout::phase::COMPLETE {
                s.push_str(&format!(
                    "; the template rollout in progress ({}, {} shards updated) continues over \
                     the existing shards",
                    r.phase, r.updated
                ));
            }
        }
    } else {
        s.push_str("; the removed shards are never rolled");
    }
    s
}

impl Report for PlanReport {
    fn text(&self) -> String {
        let mv = &self.movement;
        let mut out = String::new();
        field(
            &mut out,
            "Plan:",
            format!(
                "{}/{}: keys routed by {} -> {} shards (spec.shards is {}); nothing is applied",
                self.namespace, self.service, mv.from, mv.to, self.spec_shards
            ),
        );
        field(
            &mut out,
            "Keys moved:",
            format!(
                "{} = {} (sampled: {} of {} keys)",
                mv.moved,
                percent(mv.moved_fraction),
                percent(self.sampled_fraction),
                self.sampled_keys
            ),
        );
        field(
            &mut out,
            "Added:",
            if mv.added_shards.is_empty() {
                "none".into()
            } else {
                format!(
                    "{} ({} new pods)",
                    range(&mv.added_shards).0,
                    self.pods_created
                )
            },
        );
        field(
            &mut out,
            "Drained:",
            if mv.drained_shards.is_empty() {
                "none".into()
            } else {
                format!(
                    "{} ({} pods deleted after the handoff window)",
                    range(&mv.drained_shards).0,
                    self.pods_deleted
                )
            },
        );
        field(
            &mut out,
            "Admission:",
            format!("{}: {}", self.admission.verdict, self.admission.detail),
        );
        if let Some(w) = &self.waits_for {
            field(&mut out, "Waits for:", w.clone());
        }
        field(&mut out, "Rollout:", self.rollout.clone());
        if !self.steps.is_empty() {
            out.push('\n');
            let mut t = Table::new(&["step", "phase", "what happens"]);
            for (i, s) in self.steps.iter().enumerate() {
                t.row(vec![(i + 1).to_string(), s.phase.clone(), s.what.clone()]);
            }
            out.push_str(&t.render());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::service;

    #[test]
    fn jump_hash_moves_exactly_the_difference_over_the_larger_count() {
        let m = movement(3, 4);
        assert_eq!((m.moved.as_str(), m.added_shards.clone()), ("1/4", vec![3]));
        assert!((m.moved_fraction - 0.25).abs() < 1e-12);
        let m = movement(6, 4);
        assert_eq!(
            (m.moved.as_str(), m.drained_shards.clone()),
            ("1/3", vec![4, 5])
        );
        assert_eq!(movement(5, 5).moved, "0");
        assert_eq!(movement(1, 1024).moved, "1023/1024");
    }

    #[test]
    fn the_sample_through_shard_for_key_agrees_with_the_arithmetic() {
        for (from, to) in [(2, 3), (3, 4), (4, 2), (1, 5), (8, 7), (5, 5)] {
            let exact = movement(from, to).moved_fraction;
            let s = sampled(from, to, 20_000);
            assert!(
                (s - exact).abs() < 0.015,
                "{from}->{to}: sampled {s} exact {exact}"
            );
        }
    }

    fn admitted() -> Admission {
        Admission {
            verdict: "admitted",
            detail: "dry run".into(),
        }
    }

    #[test]
    fn growth_lists_the_new_shards_before_moving_keys() {
        let svc = service(2, serde_json::Value::Null);
        let p = build(&svc, None, 3, admitted());
        assert_eq!((p.movement.from, p.movement.to), (2, 3));
        assert_eq!(p.pods_created, 2);
        assert_eq!(p.steps[0].phase, "AddingShards");
        assert!(
            p.steps[0].what.starts_with("shard 2 gets"),
            "{}",
            p.steps[0].what
        );
        assert!(
            p.steps[1]
                .what
                .contains("1/3 of the keys (33.33%) move, all to shard 2"),
            "{}",
            p.steps[1].what
        );
        assert!(p.steps[1].what.contains("for 2m"));
        assert!(p.rollout.contains("no existing pod restarts"));
        assert!(!p.applied);
        let text = p.text();
        assert!(text.contains("Keys moved: 1/3 = 33.33%"), "{text}");
        assert!(text.contains("Added:      shard 2 (2 new pods)"), "{text}");
    }

    #[test]
    fn shrinking_drains_and_the_local_rules_refuse_it_without_permission() {
        let svc = service(4, serde_json::Value::Null);
        let mut new = svc.clone();
        new.spec.shards = 2;
        let refused = Admission::from_local(&validate::validate_update(&svc, &new))
            .expect("refused without allowShardRemoval");
        assert_eq!(refused.verdict, "refused");
        assert!(
            refused.detail.contains("allowShardRemoval"),
            "{}",
            refused.detail
        );
        let p = build(&svc, None, 2, refused);
        assert_eq!(p.movement.drained_shards, [2, 3]);
        assert_eq!((p.pods_deleted, p.pods_created), (4, 0));
        assert_eq!(p.steps[0].phase, "Draining");
        assert!(
            p.steps[0]
                .what
                .contains("the keys of shards 2-3, 1/2 of the keys (50.00%), move to shards 0-1"),
            "{}",
            p.steps[0].what
        );
        assert!(p.steps[1]
            .what
            .starts_with("shards 2-3 leave the map; their"));
        assert!(p.text().contains("Admission:  refused: "));
    }

    #[test]
    fn an_open_window_delays_the_change_and_no_change_has_no_steps() {
        let svc = service(3, serde_json::Value::Null);
        let map = ShardMap {
            epoch: 5,
            routing_count: Some(3),
            shards: Vec::new(),
            previous: Some(shardmesh_api::shardmap::Previous {
                count: 2,
                until: "2026-11-28T21:00:00Z".into(),
            }),
        };
        let p = build(&svc, Some(&map), 4, admitted());
        assert!(p.waits_for.as_deref().is_some_and(|w| w.contains("2 -> 3")));
        assert_eq!(p.movement.from, 3);
        // Shard 3 is still listed (draining after 4 -> 3): growing back keeps it.
        let draining = ShardMap {
            epoch: 6,
            routing_count: Some(3),
            shards: (0..4)
                .map(|index| shardmesh_api::shardmap::Shard {
                    index,
                    members: Vec::new(),
                    leader: None,
                })
                .collect(),
            previous: Some(shardmesh_api::shardmap::Previous {
                count: 4,
                until: "2026-11-28T21:00:00Z".into(),
            }),
        };
        let back = build(&svc, Some(&draining), 5, admitted());
        assert_eq!(back.pods_created, 2, "only shard 4 is new");
        let only_kept = build(&svc, Some(&draining), 4, admitted());
        assert_eq!(only_kept.pods_created, 0);
        assert!(
            only_kept.rollout.contains("no pod is created"),
            "{}",
            only_kept.rollout
        );
        assert!(
            back.steps[0].what.starts_with("shard 4 gets")
                && back.steps[0]
                    .what
                    .contains("shard 3 is listed in the current map and is kept"),
            "{}",
            back.steps[0].what
        );
        let same = build(&svc, None, 3, admitted());
        assert!(same.steps.is_empty());
        assert_eq!(same.movement.moved_fraction, 0.0);
        assert!(same.rollout.starts_with("nothing changes"));
    }
}
