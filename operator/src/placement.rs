//! Placement (pure): the topology spread constraints of each shard's pods, from
//! `spec.placement`, merged with the ones the user's pod template already sets.
//!
//! Each constraint selects exactly one shard's pods, so the scheduler spreads the replicas of
//! a shard (not the service as a whole): with two replicas on two or more nodes, losing a node
//! takes at most one replica of each shard. The template's own constraint for a topology key
//! wins over ours, since the user wrote it on purpose; the status says ours was not applied.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::TopologySpreadConstraint, apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use shardmesh_api::{
    v1alpha1::{Placement, Spread},
    ShardedService,
};

/// The node label every kubelet sets to its node name.
pub const HOSTNAME: &str = "kubernetes.io/hostname";
/// The well-known zone label cloud node controllers set.
pub const ZONE: &str = "topology.kubernetes.io/zone";

/// The constraints of one shard's pods and the topology keys whose `spec.placement` constraint
/// the template overrode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merged {
    /// The template's constraints first (unchanged), then ours for the keys it leaves free.
    pub constraints: Vec<TopologySpreadConstraint>,
    /// Topology keys constrained by both; the template's constraint is the one kept.
    pub overridden: Vec<String>,
}

/// The constraints `spec.placement` asks for over the pods matching `selector`: one per node
/// (and per zone when `zones`), where an entry of `constraints` for the same key replaces the
/// built-in one.
pub fn requested(
    placement: &Placement,
    selector: &BTreeMap<String, String>,
) -> Vec<TopologySpreadConstraint> {
    let mut out = Vec::new();
    if let Some(mode) = placement.spread.when_unsatisfiable() {
        let keys = std::iter::once(HOSTNAME).chain(placement.zones.then_some(ZONE));
        for key in keys {
            if !placement.constraints.iter().any(|c| c.topology_key == key) {
                out.push(constraint(key, 1, mode, selector));
            }
        }
    }
    for c in &placement.constraints {
        // An extra constraint without its own mode follows `spread`; `None` there means the
        // built-ins are off, not this one, so it falls back to Hard (validation refuses an
        // explicit None on an extra constraint).
        let mode = c
            .spread
            .or(Some(placement.spread))
            .and_then(Spread::when_unsatisfiable)
            .unwrap_or("DoNotSchedule");
        out.push(constraint(&c.topology_key, c.max_skew, mode, selector));
    }
    out
}

/// Merges [`requested`] into the template's constraints (`template`): ours is dropped for
/// every topology key the template already constrains.
pub fn merge(
    placement: &Placement,
    template: &[TopologySpreadConstraint],
    selector: &BTreeMap<String, String>,
) -> Merged {
    let mut merged = Merged {
        constraints: template.to_vec(),
        overridden: Vec::new(),
    };
    for c in requested(placement, selector) {
        if template.iter().any(|t| t.topology_key == c.topology_key) {
            merged.overridden.push(c.topology_key);
        } else {
            merged.constraints.push(c);
        }
    }
    merged
}

/// Status notes for the placement constraints the template overrides: the same for every
/// shard, since the template is.
pub fn notes(svc: &ShardedService) -> Vec<String> {
    let template = svc
        .spec
        .template
        .pod()
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.as_deref())
        .unwrap_or_default();
    // The selector's values do not change which keys conflict.
    merge(&svc.spec.placement, template, &BTreeMap::new())
        .overridden
        .into_iter()
        .map(|key| {
            format!(
                "spec.template.spec.topologySpreadConstraints already spreads over {key:?}, so \
                 spec.placement's constraint for it is not applied and the template's \
                 labelSelector decides which pods are spread apart (remove it from the template \
                 to spread the replicas of each shard, or set it in spec.placement.constraints)"
            )
        })
        .collect()
}

fn constraint(
    key: &str,
    max_skew: i32,
    when_unsatisfiable: &str,
    selector: &BTreeMap<String, String>,
) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        topology_key: key.into(),
        max_skew,
        when_unsatisfiable: when_unsatisfiable.into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector.clone()),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shardmesh_api::labels;

    fn placement(v: serde_json::Value) -> Placement {
        serde_json::from_value(v).expect("placement fixture")
    }

    fn keys_modes(cs: &[TopologySpreadConstraint]) -> Vec<(String, i32, String)> {
        cs.iter()
            .map(|c| {
                (
                    c.topology_key.clone(),
                    c.max_skew,
                    c.when_unsatisfiable.clone(),
                )
            })
            .collect()
    }

    fn shard(i: u32) -> BTreeMap<String, String> {
        labels::shard_selector("orders", i)
    }

    #[test]
    fn default_is_hard_spreading_of_the_shard_over_nodes_only() {
        let cs = requested(&Placement::default(), &shard(2));
        assert_eq!(
            keys_modes(&cs),
            vec![(HOSTNAME.into(), 1, "DoNotSchedule".into())]
        );
        // Exactly this shard's pods: not the whole service, not another shard.
        let sel = cs[0].label_selector.as_ref().expect("selector");
        assert_eq!(sel.match_labels.as_ref(), Some(&shard(2)));
        assert_ne!(sel.match_labels.as_ref(), Some(&shard(1)));
        assert_eq!(sel.match_expressions, None);
    }

    #[test]
    fn soft_and_off() {
        let soft = requested(&placement(json!({"spread": "Soft"})), &shard(0));
        assert_eq!(
            keys_modes(&soft),
            vec![(HOSTNAME.into(), 1, "ScheduleAnyway".into())]
        );
        let off = requested(
            &placement(json!({"spread": "None", "zones": true})),
            &shard(0),
        );
        assert!(off.is_empty(), "{off:?}");
    }

    #[test]
    fn zones_are_opt_in_and_follow_the_mode() {
        let hard = requested(&placement(json!({"zones": true})), &shard(0));
        assert_eq!(
            keys_modes(&hard),
            vec![
                (HOSTNAME.into(), 1, "DoNotSchedule".into()),
                (ZONE.into(), 1, "DoNotSchedule".into())
            ]
        );
        let soft = requested(
            &placement(json!({"zones": true, "spread": "Soft"})),
            &shard(0),
        );
        assert_eq!(soft[1].when_unsatisfiable, "ScheduleAnyway");
    }

    #[test]
    fn extra_constraints_add_or_replace_builtins() {
        let p = placement(json!({"spread": "Soft", "constraints": [
            {"topologyKey": "example.com/rack"},
            {"topologyKey": HOSTNAME, "maxSkew": 2, "spread": "Hard"},
        ]}));
        assert_eq!(
            keys_modes(&requested(&p, &shard(1))),
            vec![
                ("example.com/rack".into(), 1, "ScheduleAnyway".into()),
                (HOSTNAME.into(), 2, "DoNotSchedule".into()),
            ]
        );
        // With the built-ins off, an extra constraint without a mode is still applied, hard.
        let p = placement(
            json!({"spread": "None", "constraints": [{"topologyKey": "example.com/rack"}]}),
        );
        assert_eq!(
            keys_modes(&requested(&p, &shard(1))),
            vec![("example.com/rack".into(), 1, "DoNotSchedule".into())]
        );
    }

    #[test]
    fn the_templates_constraint_for_a_key_wins_and_is_reported() {
        let user = TopologySpreadConstraint {
            topology_key: HOSTNAME.into(),
            max_skew: 3,
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(labels::service_selector("orders")),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        };
        let m = merge(
            &placement(json!({"zones": true})),
            std::slice::from_ref(&user),
            &shard(0),
        );
        assert_eq!(m.overridden, vec![HOSTNAME.to_string()]);
        assert_eq!(
            m.constraints[0], user,
            "the template's constraint is unchanged"
        );
        assert_eq!(
            keys_modes(&m.constraints),
            vec![
                (HOSTNAME.into(), 3, "ScheduleAnyway".into()),
                (ZONE.into(), 1, "DoNotSchedule".into()),
            ]
        );
        // A template constraint over another key is kept beside ours, no conflict.
        let rack = TopologySpreadConstraint {
            topology_key: "example.com/rack".into(),
            ..user
        };
        let m = merge(
            &Placement::default(),
            std::slice::from_ref(&rack),
            &shard(0),
        );
        assert!(m.overridden.is_empty());
        assert_eq!(m.constraints.len(), 2);
    }

    #[test]
    fn notes_name_the_overridden_key_once_per_service() {
        let svc = |tpl: serde_json::Value| -> ShardedService {
            serde_json::from_value(json!({
                "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
                "metadata": {"name": "orders", "namespace": "shop"},
                "spec": {"shards": 3, "replicasPerShard": 2, "port": 8080, "template": tpl}
            }))
            .expect("fixture")
        };
        let plain = svc(json!({"spec": {"containers": [{"name": "app", "image": "a:1"}]}}));
        assert!(notes(&plain).is_empty());
        let own = svc(json!({"spec": {
            "containers": [{"name": "app", "image": "a:1"}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": HOSTNAME,
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app": "orders"}}}]
        }}));
        let n = notes(&own);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(
            n[0].contains(HOSTNAME) && n[0].contains("spec.placement"),
            "{n:?}"
        );
    }
}
