//! `kubectl shardmesh status NAME`: per shard, what the operator's status and the published
//! shard map say, side by side. [`build`] is pure over the ShardedService and its slices.

use std::collections::BTreeMap;

use serde::Serialize;
use shardmesh_api::{
    shardmap::{assemble, ShardMapSliceSpec},
    v1alpha1::{condition, ReshardingStatus, RolloutStatus},
    ShardedService,
};
use shardmesh_operator::{reshard, rollout};

use crate::{
    operator::Leader,
    output::{field, or_dash, Report, Table},
};

/// What `status` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The `Ready` condition is True for the current generation (the exit code follows it).
    pub ready: bool,
    /// `status.ready`: ready pods / desired pods.
    pub pods: Option<String>,
    /// `spec.shards`.
    pub spec_shards: i32,
    /// `spec.replicasPerShard`.
    pub replicas_per_shard: i32,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `status.observedGeneration`.
    pub observed_generation: Option<i64>,
    /// Epoch of the published shard map (highest slice epoch), when it can be combined.
    pub map_epoch: Option<i64>,
    /// The shard count keys are routed by now (may differ from `specShards` mid-change).
    pub routing_shards: Option<u32>,
    /// A change of the shard count in progress, with what happens next.
    pub resharding: Option<Resharding>,
    /// The pod-template rollout.
    pub rollout: Option<RolloutStatus>,
    /// The service's conditions.
    pub conditions: Vec<Cond>,
    /// `status.notes`: capabilities missing, spec parts not applied as written.
    pub notes: Vec<String>,
    /// What makes this report incomplete or stale (operator not running, map mid-change).
    pub warnings: Vec<String>,
    /// The operator's leader, when its Lease could be read.
    pub operator: Option<Leader>,
    /// One entry per shard: wanted, listed in the map, or still in the status.
    pub shards: Vec<ShardRow>,
}

/// `status.resharding` with the operator's own sentence about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resharding {
    /// `AddingShards`, `Handoff` or `Draining`.
    pub phase: String,
    /// Shard count before.
    pub from: i32,
    /// Shard count after.
    pub to: i32,
    /// When the handoff window closes.
    pub until: Option<String>,
    /// What happens next (the `Resharding` condition's message).
    pub message: String,
}

/// One condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cond {
    /// Type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

/// One shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardRow {
    /// Shard index.
    pub index: u32,
    /// Desired replicas (status; absent for a shard the status no longer lists, e.g. draining).
    pub replicas: Option<i32>,
    /// Ready replicas (status).
    pub ready_replicas: Option<i32>,
    /// Live members the map lists for the shard (pod names).
    pub members: Vec<String>,
    /// The shard's leader pod, when leader election is on and one is live.
    pub leader: Option<String>,
    /// The leader epoch (fencing epoch).
    pub leader_epoch: Option<i64>,
    /// StatefulSet revision most of its pods run.
    pub current_revision: Option<String>,
    /// StatefulSet revision of the current template.
    pub update_revision: Option<String>,
    /// Map epoch at which this shard's slice last changed.
    pub map_epoch: Option<i64>,
    /// The shard's part in routing: `serving`, `receiving` (new owner in a handoff window),
    /// `joining` (listed, no keys yet), `draining` (removed, serving handoff reads) or
    /// `unpublished` (no map yet).
    pub keys: &'static str,
    /// The shard in the template rollout: `updated`, `rolling`, `baking`, `halted`, `paused`,
    /// `pending`, or `-` when there is no rollout to speak of.
    pub rollout: String,
}

/// The shard's part in routing given the map's routing count, its previous count during a
/// handoff window, and `spec.shards`.
pub fn key_role(
    index: u32,
    routing: Option<u32>,
    previous: Option<u32>,
    spec: u32,
) -> &'static str {
    let Some(count) = routing else {
        return "unpublished";
    };
    if index < count {
        match previous {
            Some(p) if p < count && index >= p => "receiving",
            _ => "serving",
        }
    } else if index < spec {
        "joining"
    } else {
        "draining"
    }
}

fn rollout_role(index: u32, updated: bool, spec: u32, r: Option<&RolloutStatus>) -> String {
    let Some(r) = r else {
        return "-".into();
    };
    if index >= spec {
        return "-".into();
    }
    if updated {
        return "updated".into();
    }
    let in_flight = r
        .shards_in_flight
        .iter()
        .any(|&s| u32::try_from(s).ok() == Some(index));
    match r.phase.as_str() {
        rollout::phase::PAUSED if !in_flight => "paused".into(),
        _ if in_flight => format!("{} (wave {})", r.phase.to_lowercase(), r.wave),
        _ => "pending".into(),
    }
}

/// The Ready condition is True and describes the current generation.
pub fn is_ready(svc: &ShardedService) -> bool {
    let Some(st) = svc.status.as_ref() else {
        return false;
    };
    st.observed_generation == svc.metadata.generation
        && st
            .conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.status == "True")
}

/// The report for `svc` with its slices and (when readable) the operator's leader.
pub fn build(
    svc: &ShardedService,
    slices: &[ShardMapSliceSpec],
    operator: Option<Leader>,
) -> StatusReport {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let st = svc.status.clone().unwrap_or_default();
    let spec_shards = u32::try_from(svc.spec.shards).unwrap_or(0);
    let mut warnings = Vec::new();
    if svc.status.is_none() {
        warnings.push(
            "the operator has written no status for this service yet: is it running? \
             (`kubectl shardmesh check`)"
                .to_string(),
        );
    } else if st.observed_generation != svc.metadata.generation {
        warnings.push(format!(
            "the status describes generation {}, the spec is at {}: the operator has not caught \
             up yet (if this persists: `kubectl shardmesh check`)",
            or_dash(st.observed_generation),
            or_dash(svc.metadata.generation)
        ));
    }
    if let Some(op) = operator.as_ref().filter(|o| !o.current) {
        warnings.push(format!(
            "operator: {} (this status may be stale)",
            op.detail
        ));
    }

    // The map as sidecars see it; when it cannot be combined, each shard's newest slice still
    // says who its members are.
    let assembled = if slices.is_empty() {
        if svc.status.is_some() {
            warnings.push("no shard map published yet".into());
        }
        None
    } else {
        match assemble(slices) {
            Ok(a) => Some(a),
            Err(e) => {
                warnings.push(format!("shard map: {e}"));
                None
            }
        }
    };
    let mut newest: BTreeMap<u32, &ShardMapSliceSpec> = BTreeMap::new();
    for s in slices {
        let slot = newest.entry(s.shard.index).or_insert(s);
        if s.layout.id > slot.layout.id {
            *slot = s;
        }
    }
    let routing = assembled.as_ref().map(|a| a.map.count());
    let previous = assembled
        .as_ref()
        .and_then(|a| a.map.previous.as_ref())
        .map(|p| p.count);
    let listed = assembled
        .as_ref()
        .map_or(0, |a| u32::try_from(a.map.shards.len()).unwrap_or(u32::MAX));
    let in_status = u32::try_from(st.shards.len()).unwrap_or(u32::MAX);
    let total = spec_shards.max(listed).max(in_status);
    let by_index: BTreeMap<u32, _> = st
        .shards
        .iter()
        .filter_map(|s| Some((u32::try_from(s.index).ok()?, s)))
        .collect();

    let shards = (0..total)
        .map(|i| {
            let s = by_index.get(&i);
            let slice = newest.get(&i);
            let map_shard = assembled
                .as_ref()
                .and_then(|a| a.map.shards.get(i as usize))
                .or(slice.map(|s| &s.shard));
            ShardRow {
                index: i,
                replicas: s.map(|s| s.replicas),
                ready_replicas: s.map(|s| s.ready_replicas),
                members: map_shard
                    .map(|m| m.members.iter().map(|m| m.pod.clone()).collect())
                    .unwrap_or_default(),
                leader: map_shard
                    .and_then(|m| m.leader.as_ref().map(|l| l.pod.clone()))
                    .or_else(|| s.and_then(|s| s.leader.clone())),
                leader_epoch: map_shard
                    .and_then(|m| m.leader.as_ref().map(|l| l.epoch))
                    .or_else(|| s.and_then(|s| s.leader_epoch)),
                current_revision: s.and_then(|s| s.current_revision.clone()),
                update_revision: s.and_then(|s| s.update_revision.clone()),
                map_epoch: slice.map(|s| s.epoch),
                keys: key_role(i, routing, previous, spec_shards),
                rollout: rollout_role(
                    i,
                    s.is_some_and(|s| s.updated),
                    spec_shards,
                    st.rollout.as_ref(),
                ),
            }
        })
        .collect();

    StatusReport {
        ready: is_ready(svc),
        pods: st.ready.clone(),
        spec_shards: svc.spec.shards,
        replicas_per_shard: svc.spec.replicas_per_shard,
        generation: svc.metadata.generation,
        observed_generation: st.observed_generation,
        map_epoch: assembled.as_ref().map(|a| a.map.epoch),
        routing_shards: routing,
        resharding: st.resharding.as_ref().map(resharding),
        rollout: st.rollout.clone(),
        conditions: st
            .conditions
            .iter()
            .map(|c| Cond {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
            .collect(),
        notes: st.notes.clone(),
        warnings,
        operator,
        shards,
        name,
        namespace,
    }
}

fn resharding(r: &ReshardingStatus) -> Resharding {
    Resharding {
        phase: r.phase.clone(),
        from: r.from,
        to: r.to,
        until: r.until.clone(),
        message: reshard::message(r),
    }
}

/// A StatefulSet revision without its `<name>-<shard>-` prefix: the hash is what differs.
fn short_revision(rev: &str) -> &str {
    rev.rsplit_once('-').map_or(rev, |(_, hash)| hash)
}

impl Report for StatusReport {
    fn text(&self) -> String {
        let mut out = String::new();
        field(
            &mut out,
            "Service:",
            format!("{}/{}", self.namespace, self.name),
        );
        field(
            &mut out,
            "Ready:",
            format!(
                "{}, {} pods ready (generation {}, observed {})",
                if self.ready { "True" } else { "False" },
                or_dash(self.pods.as_deref()),
                or_dash(self.generation),
                or_dash(self.observed_generation)
            ),
        );
        field(
            &mut out,
            "Shards:",
            format!(
                "{} wanted x {} replicas; keys routed by {} (map epoch {})",
                self.spec_shards,
                self.replicas_per_shard,
                or_dash(self.routing_shards),
                or_dash(self.map_epoch)
            ),
        );
        field(
            &mut out,
            "Resharding:",
            self.resharding
                .as_ref()
                .map_or("none".into(), |r| format!("{}: {}", r.phase, r.message)),
        );
        field(
            &mut out,
            "Rollout:",
            self.rollout.as_ref().map_or("-".into(), |r| {
                let mut s = format!(
                    "{}, revision {}, {} shards updated",
                    r.phase, r.revision, r.updated
                );
                if !r.shards_in_flight.is_empty() {
                    s.push_str(&format!(
                        ", wave {} in flight: {:?}",
                        r.wave, r.shards_in_flight
                    ));
                }
                if let Some(h) = &r.halted {
                    s.push_str(&format!(", halted: {h}"));
                }
                s
            }),
        );
        if let Some(op) = &self.operator {
            field(&mut out, "Operator:", op.detail.clone());
        }
        for n in &self.notes {
            field(&mut out, "Note:", n.clone());
        }
        for w in &self.warnings {
            field(&mut out, "Warning:", w.clone());
        }
        if !self.conditions.is_empty() {
            out.push('\n');
            let mut t = Table::new(&["condition", "status", "reason", "message"]);
            for c in &self.conditions {
                t.row(vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                ]);
            }
            out.push_str(&t.render());
        }
        out.push('\n');
        let mut t = Table::new(&[
            "shard",
            "ready",
            "members",
            "leader",
            "leader-epoch",
            "revision",
            "map-epoch",
            "keys",
            "rollout",
        ]);
        for s in &self.shards {
            let revision = match (&s.current_revision, &s.update_revision) {
                (Some(c), Some(u)) if c != u => {
                    format!("{}->{}", short_revision(c), short_revision(u))
                }
                (Some(c), _) => short_revision(c).to_string(),
                (None, u) => or_dash(u.as_deref().map(short_revision)),
            };
            t.row(vec![
                s.index.to_string(),
                match (s.ready_replicas, s.replicas) {
                    (Some(r), Some(d)) => format!("{r}/{d}"),
                    _ => "-".into(),
                },
                if s.members.is_empty() {
                    "-".into()
                } else {
                    s.members.join(",")
                },
                or_dash(s.leader.as_deref()),
                or_dash(s.leader_epoch),
                revision,
                or_dash(s.map_epoch),
                s.keys.to_string(),
                s.rollout.clone(),
            ]);
        }
        out.push_str(&t.render());
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use shardmesh_api::shardmap::{
        slices as to_slices, Layout, Leader as MapLeader, Member, Previous, Shard, ShardMap,
    };

    pub(crate) fn service(shards: i32, status: serde_json::Value) -> ShardedService {
        serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop", "generation": 3},
            "spec": {"shards": shards, "replicasPerShard": 2, "port": 8080,
                     "template": {"spec": {"containers": [{"name": "app", "image": "demo:1"}]}}},
            "status": status,
        }))
        .expect("a ShardedService")
    }

    fn shard(index: u32, leader: bool) -> Shard {
        let pod = |o: u32| format!("orders-{index}-{o}");
        Shard {
            index,
            members: (0..2)
                .map(|o| Member {
                    pod: pod(o),
                    address: format!("10.0.{index}.{o}:4143"),
                })
                .collect(),
            leader: leader.then(|| MapLeader {
                pod: pod(1),
                address: format!("10.0.{index}.1:4143"),
                epoch: 4,
            }),
        }
    }

    pub(crate) fn map(count: u32, listed: u32, previous: Option<u32>) -> Vec<ShardMapSliceSpec> {
        let m = ShardMap {
            epoch: 12,
            routing_count: Some(count),
            shards: (0..listed).map(|i| shard(i, i == 0)).collect(),
            previous: previous.map(|count| Previous {
                count,
                until: "2026-11-28T21:00:00Z".into(),
            }),
        };
        to_slices(
            &m,
            &Layout {
                id: 12,
                shard_key: "x-shard-key".into(),
                handoff_miss: "404".into(),
                ..Layout::default()
            },
        )
    }

    fn ready_status() -> serde_json::Value {
        json!({
            "observedGeneration": 3, "epoch": 12, "ready": "4/4",
            "shards": [
                {"index": 0, "replicas": 2, "readyReplicas": 2, "liveMembers": 2,
                 "currentRevision": "orders-0-6d4f9", "updateRevision": "orders-0-6d4f9", "updated": true},
                {"index": 1, "replicas": 2, "readyReplicas": 1, "liveMembers": 2,
                 "currentRevision": "orders-1-6d4f9", "updateRevision": "orders-1-7a7a7", "updated": false},
            ],
            "rollout": {"revision": "abc", "phase": "Rolling", "wave": 2, "updated": "1/2",
                        "shardsInFlight": [1]},
            "conditions": [{"type": "Ready", "status": "True", "reason": "AllReady",
                            "message": "4/4", "lastTransitionTime": "2026-11-28T20:00:00Z"}],
        })
    }

    #[test]
    fn rows_join_status_and_slices_per_shard() {
        let svc = service(2, ready_status());
        let r = build(&svc, &map(2, 2, None), None);
        assert!(r.ready);
        assert_eq!((r.map_epoch, r.routing_shards), (Some(12), Some(2)));
        assert_eq!(r.shards.len(), 2);
        let s0 = &r.shards[0];
        assert_eq!(s0.members, ["orders-0-0", "orders-0-1"]);
        assert_eq!(
            (s0.leader.as_deref(), s0.leader_epoch),
            (Some("orders-0-1"), Some(4))
        );
        assert_eq!((s0.keys, s0.rollout.as_str()), ("serving", "updated"));
        let s1 = &r.shards[1];
        assert_eq!((s1.ready_replicas, s1.leader.as_deref()), (Some(1), None));
        assert_eq!(s1.rollout, "rolling (wave 2)");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let text = r.text();
        assert!(text.contains("Ready:      True, 4/4 pods ready"), "{text}");
        assert!(text.contains("6d4f9->7a7a7"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("0       2/2     orders-0-0,orders-0-1   orders-0-1")),
            "{text}"
        );
    }

    #[test]
    fn shards_mid_change_say_whether_they_own_keys() {
        // Growing 2 -> 3, the new shard listed but not routed to yet.
        let svc = service(3, ready_status());
        let r = build(&svc, &map(2, 3, None), None);
        let keys: Vec<&str> = r.shards.iter().map(|s| s.keys).collect();
        assert_eq!(keys, ["serving", "serving", "joining"]);
        // Shrinking 3 -> 2: shard 2 is still listed but no longer in the status.
        let shrunk = build(&service(2, ready_status()), &map(2, 3, Some(3)), None);
        let s2 = &shrunk.shards[2];
        assert_eq!(
            (s2.keys, s2.replicas, s2.members.len()),
            ("draining", None, 2)
        );
        assert!(
            shrunk
                .text()
                .lines()
                .any(|l| l.starts_with("2       -       orders-2-0")),
            "{}",
            shrunk.text()
        );
        // Handoff after growing 2 -> 3, and draining after shrinking 3 -> 2.
        assert_eq!(key_role(2, Some(3), Some(2), 3), "receiving");
        assert_eq!(key_role(1, Some(3), Some(2), 3), "serving");
        assert_eq!(key_role(2, Some(2), Some(3), 2), "draining");
        assert_eq!(key_role(0, None, None, 2), "unpublished");
    }

    #[test]
    fn a_missing_status_or_operator_is_a_warning_and_not_ready() {
        let svc = service(2, serde_json::Value::Null);
        let op = crate::operator::leader(
            "shardmesh-system/l",
            None,
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        let r = build(&svc, &[], Some(op));
        assert!(!r.ready);
        assert!(r.warnings[0].contains("no status"), "{:?}", r.warnings);
        assert!(
            r.warnings[1].contains("no Lease shardmesh-system/l"),
            "{:?}",
            r.warnings
        );
        assert!(r
            .shards
            .iter()
            .all(|s| s.keys == "unpublished" && s.rollout == "-"));
        // An observed generation behind the spec is not Ready either.
        let mut stale = service(2, ready_status());
        stale.metadata.generation = Some(4);
        assert!(!is_ready(&stale));
        assert!(build(&stale, &map(2, 2, None), None).warnings[0].contains("generation 3"));
    }

    #[test]
    fn an_incomplete_map_still_shows_each_shards_members() {
        let svc = service(2, ready_status());
        let mut slices = map(2, 2, None);
        slices.pop();
        let r = build(&svc, &slices, None);
        assert_eq!(r.map_epoch, None);
        assert!(
            r.warnings.iter().any(|w| w.contains("not yet published")),
            "{:?}",
            r.warnings
        );
        assert_eq!(r.shards[0].members.len(), 2);
        assert!(r.shards[1].members.is_empty());
    }
}
