//! Validation of ShardedService create/update at admission time. The rules are
//! `shardmesh_api::validate` (shared with the reconciler and the sidecar); this module only adds
//! what needs the admission context: the previous object (shard removal), and rules that exist
//! because the sidecar is injected.

use shardmesh_api::{
    validate::{self, FieldError},
    ShardedService,
};

use super::annotations;

/// Every problem of a create (`old` is `None`) or update. Empty means admitted.
///
/// An update that leaves `spec` unchanged is always admitted: metadata edits (labels,
/// finalizer removal during deletion) must work even on an object that predates a rule.
pub fn problems(
    new: &ShardedService,
    old: Option<&ShardedService>,
    sidecar_injection: bool,
) -> Vec<FieldError> {
    if new.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let mut errors = match old {
        Some(old) if old.spec == new.spec => return Vec::new(),
        Some(old) => validate::validate_update(old, new),
        None => validate::validate(new),
    };
    if sidecar_injection {
        errors.extend(injection_rules(new));
    }
    errors
}

/// Rules that only hold while the webhook injects the sidecar: the Services then target the
/// sidecar's inbound port, so a shard pod without the sidecar would get no traffic.
fn injection_rules(svc: &ShardedService) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let tpl = &svc.spec.template;
    let opted_out = tpl
        .metadata
        .as_ref()
        .into_iter()
        .flat_map(|m| m.annotations.iter().chain(m.labels.iter()))
        .any(|m| {
            m.get(annotations::INJECT)
                .is_some_and(|v| v.eq_ignore_ascii_case(annotations::INJECT_DISABLED))
        });
    if opted_out {
        errors.push(FieldError {
            path: format!(
                "spec.template.metadata.annotations[{}]",
                annotations::INJECT
            ),
            message: "a ShardedService's pods need the sidecar (its Services target the \
                      sidecar's inbound port); remove the opt-out"
                .into(),
        });
    }
    if tpl.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        errors.push(FieldError {
            path: "spec.template.spec.hostNetwork".into(),
            message: "the sidecar's ports would be bound on the node and clash between shard \
                      pods; remove hostNetwork"
                .into(),
        });
    }
    errors
}

/// The denial message: the object and every field with its fix.
pub fn message(svc: &ShardedService, errors: &[FieldError]) -> String {
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    format!(
        "ShardedService {ns}/{name} is invalid: {}",
        validate::summarize(errors)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn svc(spec_patch: Value) -> ShardedService {
        let mut v = json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"shards": 4, "replicasPerShard": 2, "port": 8080,
                     "template": {"spec": {"containers": [{"name": "app", "image": "demo:1"}]}}}
        });
        for (k, val) in spec_patch.as_object().expect("object") {
            v["spec"][k] = val.clone();
        }
        serde_json::from_value(v).expect("fixture")
    }

    fn paths(e: Vec<FieldError>) -> Vec<String> {
        e.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn shared_rules_apply_on_create() {
        assert!(problems(&svc(json!({})), None, true).is_empty());
        assert_eq!(
            paths(problems(&svc(json!({"port": 4191})), None, true)),
            vec!["spec.port"]
        );
    }

    #[test]
    fn shard_decrease_needs_the_override_on_update() {
        let old = svc(json!({}));
        let new = svc(json!({"shards": 2}));
        let errs = problems(&new, Some(&old), true);
        assert_eq!(paths(errs.clone()), vec!["spec.shards"]);
        assert!(message(&new, &errs).contains("allowShardRemoval"));
        let ok = svc(json!({"shards": 2, "rollout": {"allowShardRemoval": true}}));
        assert!(problems(&ok, Some(&old), true).is_empty());
    }

    #[test]
    fn metadata_only_updates_are_admitted() {
        // An object that became invalid under a newer rule can still be relabelled or deleted.
        let old = svc(json!({"port": 4191}));
        let mut new = old.clone();
        new.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
        assert!(problems(&new, Some(&old), true).is_empty());
    }

    #[test]
    fn injection_rules_only_with_injection() {
        let s = svc(json!({"template": {
            "metadata": {"annotations": {"shardmesh.io/inject": "disabled"}},
            "spec": {"hostNetwork": true, "containers": [{"name": "app", "image": "demo:1"}]}
        }}));
        assert_eq!(
            paths(problems(&s, None, true)),
            vec![
                "spec.template.metadata.annotations[shardmesh.io/inject]",
                "spec.template.spec.hostNetwork"
            ]
        );
        assert!(problems(&s, None, false).is_empty());
    }
}
