//! Validation of a ShardedService spec beyond what the CRD schema can express (API 1.20 has no
//! CEL). Pure functions shared by the reconciler and the validating webhook: each problem names
//! the field path and the fix.

use std::{collections::HashSet, fmt, time::Duration};

use crate::{
    duration::DurationString,
    labels, ports, template,
    v1alpha1::{ShardedService, ShardedServiceSpec, Spread},
};

/// Name of the injected sidecar container; the template must not use it.
pub const SIDECAR_CONTAINER: &str = "shardmesh-sidecar";

/// Longest ShardedService name + `-<shard>` suffix: StatefulSet pod names get a further
/// `-<ordinal>` and the `controller-revision-hash` label must stay within 63 characters.
const MAX_SHARD_OBJECT_NAME: usize = 52;

/// One problem with a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.resilience.timeouts.perTry`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of a spec, joined for a condition message or an admission denial.
pub fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

struct Check(Vec<FieldError>);

impl Check {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn range(&mut self, path: &str, v: i64, min: i64, max: i64) {
        if v < min || v > max {
            self.err(path, format!("{v} is out of range; use {min} to {max}"));
        }
    }

    fn duration(
        &mut self,
        path: &str,
        d: &DurationString,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        match d.parse() {
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
            Ok(v) if v < min || v > max => {
                self.err(
                    path,
                    format!(
                        "{d} is out of range; use {} to {}",
                        DurationString::from_duration(min),
                        DurationString::from_duration(max)
                    ),
                );
                None
            }
            Ok(v) => Some(v),
        }
    }
}

/// Validates a ShardedService (name and spec). Empty means valid.
pub fn validate(svc: &ShardedService) -> Vec<FieldError> {
    let mut c = Check(Vec::new());
    if let Some(name) = svc.metadata.name.as_deref() {
        check_name(&mut c, name, svc.spec.shards);
    }
    check_spec(&mut c, &svc.spec);
    c.0
}

/// Validates an update: everything [`validate`] checks, plus shard removal without the override.
pub fn validate_update(old: &ShardedService, new: &ShardedService) -> Vec<FieldError> {
    let mut errors = validate(new);
    if let Some(e) = shard_removal(old.spec.shards, &new.spec) {
        errors.push(e);
    }
    errors
}

/// The error for lowering `spec.shards` from `current` without `rollout.allowShardRemoval`.
pub fn shard_removal(current: i32, new: &ShardedServiceSpec) -> Option<FieldError> {
    // A count below 1 is refused by `validate` as out of range; nothing is being removed.
    if new.shards < 1 || new.shards >= current || new.rollout.allow_shard_removal {
        return None;
    }
    let (removed, its) = if i64::from(current) - i64::from(new.shards) == 1 {
        (format!("shard {}", new.shards), "its")
    } else {
        (format!("shards {}-{}", new.shards, current - 1), "their")
    };
    Some(FieldError {
        path: "spec.shards".into(),
        message: format!(
            "lowered from {current} to {}: {removed} would be deleted, orphaning the data of \
             {its} keys; restore spec.shards to {current}, or set \
             spec.rollout.allowShardRemoval: true to delete {removed}",
            new.shards
        ),
    })
}

fn check_name(c: &mut Check, name: &str, shards: i32) {
    let dns1035 = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_lowercase())
        && name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
        && !name.ends_with('-');
    if !dns1035 {
        c.err(
            "metadata.name",
            format!(
                "{name:?} must be a DNS-1035 label (lowercase letters, digits and '-', starting \
                 with a letter) because it names Services; rename the ShardedService"
            ),
        );
    }
    let longest = labels::shard_object_name(name, shards.max(1) as u32 - 1).len();
    if longest > MAX_SHARD_OBJECT_NAME {
        c.err(
            "metadata.name",
            format!(
                "{name:?} is too long: shard objects are named <name>-<shard> and must fit in \
                 {MAX_SHARD_OBJECT_NAME} characters; use at most {} characters",
                MAX_SHARD_OBJECT_NAME.saturating_sub(longest - name.len())
            ),
        );
    }
}

fn check_spec(c: &mut Check, spec: &ShardedServiceSpec) {
    c.range("spec.shards", spec.shards.into(), 1, 1024);
    c.range(
        "spec.replicasPerShard",
        spec.replicas_per_shard.into(),
        1,
        100,
    );
    c.range("spec.port", spec.port.into(), 1, 65535);
    for (p, what) in ports::RESERVED {
        if spec.port == i32::from(p) {
            c.err(
                "spec.port",
                format!(
                    "{p} is reserved for the {what} port; move the application to another port"
                ),
            );
        }
    }
    check_header(
        c,
        "spec.shardKey.header",
        &spec.shard_key.header,
        "x-shard-key",
    );
    check_template(c, spec);
    check_resilience(c, spec);
    check_leader_election(c, spec);
    check_resharding(c, spec);
    check_placement(c, spec);
    c.range(
        "spec.rollout.maxUnavailable",
        spec.rollout.max_unavailable.into(),
        1,
        100,
    );
    let r = &spec.rollout;
    c.range("spec.rollout.canaryShards", r.canary_shards.into(), 1, 1024);
    c.range(
        "spec.rollout.maxShardsInFlight",
        r.max_shards_in_flight.into(),
        1,
        1024,
    );
    c.duration(
        "spec.rollout.bakeTime",
        &r.bake_time,
        Duration::ZERO,
        Duration::from_secs(3600),
    );
    c.duration(
        "spec.rollout.progressDeadline",
        &r.progress_deadline,
        Duration::from_secs(10),
        Duration::from_secs(24 * 3600),
    );
}

fn check_header(c: &mut Check, path: &str, header: &str, example: &str) {
    if header.is_empty()
        || header.len() > 128
        || !header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b))
    {
        c.err(
            path,
            format!("{header:?} is not a valid HTTP header name; use e.g. {example:?}"),
        );
    }
}

fn check_leader_election(c: &mut Check, spec: &ShardedServiceSpec) {
    let le = &spec.leader_election;
    let p = "spec.leaderElection";
    c.duration(
        &format!("{p}.leaseDuration"),
        &le.lease_duration,
        Duration::from_secs(3),
        Duration::from_secs(300),
    );
    if let Some(h) = &le.write_header {
        check_header(c, &format!("{p}.writeHeader"), h, "x-write");
    }
}

/// Why a status cannot mean "not here" for a handoff read, if it cannot. Shared by this
/// validation and the sidecar, which reads the list back from the shard map.
pub fn miss_status_problem(status: i64) -> Option<&'static str> {
    match status {
        410 => Some("410 marks a deleted key, which must not be read from the previous owner"),
        421 => Some("421 is the sidecar's own answer for a key of another shard"),
        400..=599 => None,
        _ => Some("only error statuses (400-599) can mean a miss"),
    }
}

fn check_resharding(c: &mut Check, spec: &ShardedServiceSpec) {
    let r = &spec.resharding;
    let p = "spec.resharding";
    c.duration(
        &format!("{p}.handoffWindow"),
        &r.handoff_window,
        Duration::ZERO,
        Duration::from_secs(24 * 3600),
    );
    if r.miss_statuses.is_empty() || r.miss_statuses.len() > 8 {
        c.err(
            format!("{p}.missStatuses"),
            format!(
                "has {} entries; list 1 to 8 status codes, e.g. [404]",
                r.miss_statuses.len()
            ),
        );
    }
    for (i, s) in r.miss_statuses.iter().enumerate() {
        if let Some(why) = miss_status_problem(i64::from(*s)) {
            c.err(
                format!("{p}.missStatuses[{i}]"),
                format!("{s}: {why}; use e.g. 404"),
            );
        }
    }
}

/// Most extra spread constraints: a pod's constraints are all evaluated for every node.
const MAX_SPREAD_CONSTRAINTS: usize = 8;

fn check_placement(c: &mut Check, spec: &ShardedServiceSpec) {
    let p = &spec.placement;
    if p.zones && p.spread == Spread::Disabled {
        c.err(
            "spec.placement.zones",
            "zone spreading needs spec.placement.spread Hard or Soft; set one, or remove zones",
        );
    }
    if p.constraints.len() > MAX_SPREAD_CONSTRAINTS {
        c.err(
            "spec.placement.constraints",
            format!(
                "has {} entries; list at most {MAX_SPREAD_CONSTRAINTS}",
                p.constraints.len()
            ),
        );
    }
    let mut keys = HashSet::new();
    for (i, sc) in p.constraints.iter().enumerate() {
        let path = format!("spec.placement.constraints[{i}]");
        if let Some(why) = label_key_problem(&sc.topology_key) {
            c.err(
                format!("{path}.topologyKey"),
                format!(
                    "{:?} is not a node label key ({why}); use e.g. \"topology.example.com/rack\"",
                    sc.topology_key
                ),
            );
        }
        if !keys.insert(sc.topology_key.as_str()) {
            c.err(
                format!("{path}.topologyKey"),
                format!(
                    "{:?} is constrained by an earlier entry; merge the two into one",
                    sc.topology_key
                ),
            );
        }
        c.range(&format!("{path}.maxSkew"), sc.max_skew.into(), 1, 100);
        if sc.spread == Some(Spread::Disabled) {
            c.err(
                format!("{path}.spread"),
                "None is only for spec.placement.spread; use Hard or Soft, or remove the entry",
            );
        }
    }
}

/// Why `key` is not a valid label key (an optional DNS subdomain prefix and `/`, then a name
/// of 1-63 alphanumerics, `-`, `_` and `.` starting and ending alphanumeric), if it is not.
fn label_key_problem(key: &str) -> Option<&'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let alnum_ends = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if name.is_empty() || name.len() > 63 {
        return Some("the name after any prefix must have 1 to 63 characters");
    }
    if !alnum_ends(name)
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Some(
            "the name must be alphanumerics, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
    if let Some(prefix) = prefix {
        let dns_ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|l| {
                !l.is_empty()
                    && alnum_ends(l)
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if !dns_ok {
            return Some("the prefix must be a lowercase DNS subdomain");
        }
    }
    None
}

fn check_template(c: &mut Check, spec: &ShardedServiceSpec) {
    // Stored past the CRD schema (which keeps the template opaque) without the webhook: the
    // rest of the checks would only see the empty template it stands in for.
    if let Some(e) = spec.template.decode_error() {
        c.err(
            format!("spec.template{}", e.path),
            format!(
                "{} (the template does not decode as a Pod template); correct the value as \
                 `kubectl explain {}` describes",
                e.message,
                template::explain_path(&e.path)
            ),
        );
        return;
    }
    if let Some(labels) = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
    {
        for key in [labels::SERVICE, labels::SHARD] {
            if labels.contains_key(key) {
                c.err(
                    format!("spec.template.metadata.labels[{key}]"),
                    "is set by the operator; remove it from the template",
                );
            }
        }
    }
    let Some(pod) = spec.template.spec.as_ref() else {
        c.err(
            "spec.template.spec",
            "missing; add a pod spec with at least one container",
        );
        return;
    };
    if pod.containers.is_empty() {
        c.err(
            "spec.template.spec.containers",
            "is empty; add at least one container running the application",
        );
    }
    let mut names = HashSet::new();
    for (i, ctr) in pod.containers.iter().enumerate() {
        if ctr.name == SIDECAR_CONTAINER {
            c.err(
                format!("spec.template.spec.containers[{i}].name"),
                format!("{SIDECAR_CONTAINER:?} is reserved for the injected sidecar; rename the container"),
            );
        }
        if !names.insert(ctr.name.as_str()) {
            c.err(
                format!("spec.template.spec.containers[{i}].name"),
                format!(
                    "{:?} is used by another container; container names must be unique",
                    ctr.name
                ),
            );
        }
        if ctr.image.as_deref().unwrap_or("").is_empty() {
            c.err(
                format!("spec.template.spec.containers[{i}].image"),
                "missing; set the application's image",
            );
        }
        for (j, p) in ctr.ports.iter().flatten().enumerate() {
            for (r, what) in ports::RESERVED {
                if p.container_port == i32::from(r) {
                    c.err(
                        format!("spec.template.spec.containers[{i}].ports[{j}].containerPort"),
                        format!("{r} clashes with the {what} port; use another port"),
                    );
                }
            }
        }
    }
    if pod.restart_policy.as_deref().is_some_and(|p| p != "Always") {
        c.err(
            "spec.template.spec.restartPolicy",
            "shard pods are run by StatefulSets, which require Always; remove the field",
        );
    }
}

fn check_resilience(c: &mut Check, spec: &ShardedServiceSpec) {
    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);
    const MIN: Duration = Duration::from_secs(60);
    let r = &spec.resilience;
    let p = "spec.resilience.timeouts";
    c.duration(&format!("{p}.connect"), &r.timeouts.connect, MS, MIN);
    let per_try = c.duration(&format!("{p}.perTry"), &r.timeouts.per_try, MS, 10 * MIN);
    let overall = c.duration(&format!("{p}.overall"), &r.timeouts.overall, MS, 10 * MIN);
    if let (Some(t), Some(o)) = (per_try, overall) {
        if o < t {
            c.err(
                format!("{p}.overall"),
                format!(
                    "{} is shorter than perTry {}; the deadline must allow at least one full try",
                    r.timeouts.overall, r.timeouts.per_try
                ),
            );
        }
    }
    let p = "spec.resilience.retries";
    let rt = &r.retries;
    c.range(&format!("{p}.maxAttempts"), rt.max_attempts.into(), 1, 10);
    let base = c.duration(&format!("{p}.baseBackoff"), &rt.base_backoff, MS, MIN);
    let max = c.duration(&format!("{p}.maxBackoff"), &rt.max_backoff, MS, 10 * MIN);
    if let (Some(b), Some(m)) = (base, max) {
        if m < b {
            c.err(
                format!("{p}.maxBackoff"),
                format!(
                    "{} is below baseBackoff {}; raise it",
                    rt.max_backoff, rt.base_backoff
                ),
            );
        }
    }
    c.range(
        &format!("{p}.budgetPercent"),
        rt.budget_percent.into(),
        0,
        100,
    );
    c.range(
        &format!("{p}.minRetriesPerSecond"),
        rt.min_retries_per_second.into(),
        0,
        1000,
    );
    c.range(
        &format!("{p}.maxReplayBodyBytes"),
        rt.max_replay_body_bytes.into(),
        0,
        16 * 1024 * 1024,
    );
    let mut seen = HashSet::new();
    for (i, on) in rt.retry_on.iter().enumerate() {
        if !seen.insert(*on) {
            c.err(
                format!("{p}.retryOn[{i}]"),
                "is listed twice; remove the duplicate",
            );
        }
    }
    let p = "spec.resilience.circuitBreaker";
    let cb = &r.circuit_breaker;
    c.range(
        &format!("{p}.consecutiveFailures"),
        cb.consecutive_failures.into(),
        1,
        1000,
    );
    c.range(
        &format!("{p}.failureRatePercent"),
        cb.failure_rate_percent.into(),
        1,
        100,
    );
    c.range(
        &format!("{p}.minRequests"),
        cb.min_requests.into(),
        1,
        100_000,
    );
    c.duration(&format!("{p}.window"), &cb.window, S, 10 * MIN);
    let open = c.duration(
        &format!("{p}.openDuration"),
        &cb.open_duration,
        MS,
        10 * MIN,
    );
    let max_open = c.duration(
        &format!("{p}.maxOpenDuration"),
        &cb.max_open_duration,
        MS,
        60 * MIN,
    );
    if let (Some(o), Some(m)) = (open, max_open) {
        if m < o {
            c.err(
                format!("{p}.maxOpenDuration"),
                format!(
                    "{} is below openDuration {}; raise it",
                    cb.max_open_duration, cb.open_duration
                ),
            );
        }
    }
    c.range(
        &format!("{p}.halfOpenProbes"),
        cb.half_open_probes.into(),
        1,
        100,
    );
    c.range(
        &format!("{p}.maxEjectionPercent"),
        cb.max_ejection_percent.into(),
        0,
        100,
    );
    c.range(
        "spec.resilience.concurrency.maxInFlight",
        r.concurrency.max_in_flight.into(),
        1,
        100_000,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(spec: serde_json::Value) -> ShardedService {
        serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1",
            "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": spec,
        }))
        .expect("test object deserializes")
    }

    fn base() -> serde_json::Value {
        json!({
            "shards": 4, "replicasPerShard": 3, "port": 8080,
            "template": {"spec": {"containers": [{"name": "app", "image": "demo:1"}]}}
        })
    }

    fn paths(s: &ShardedService) -> Vec<String> {
        validate(s).into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(validate(&svc(base())), vec![]);
    }

    #[test]
    fn placement_with_zones_and_label_keys_is_valid() {
        let mut spec = base();
        spec["placement"] = json!({"spread": "Soft", "zones": true, "constraints": [
            {"topologyKey": "topology.example.com/rack", "maxSkew": 2, "spread": "Hard"},
            {"topologyKey": "kubernetes.io/hostname"},
            {"topologyKey": "rack_1.a"},
        ]});
        assert_eq!(validate(&svc(spec)), vec![]);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (json!({"shards": 0}), "spec.shards"),
            (json!({"shards": 5000}), "spec.shards"),
            (json!({"replicasPerShard": -1}), "spec.replicasPerShard"),
            (json!({"port": 70000}), "spec.port"),
            (json!({"port": 4143}), "spec.port"),
            (
                json!({"shardKey": {"header": "bad header"}}),
                "spec.shardKey.header",
            ),
            (
                json!({"leaderElection": {"enabled": true, "leaseDuration": "1s"}}),
                "spec.leaderElection.leaseDuration",
            ),
            (
                json!({"leaderElection": {"enabled": true, "writeHeader": "x:y"}}),
                "spec.leaderElection.writeHeader",
            ),
            (
                json!({"resharding": {"handoffWindow": "48h"}}),
                "spec.resharding.handoffWindow",
            ),
            (
                json!({"rollout": {"canaryShards": 0}}),
                "spec.rollout.canaryShards",
            ),
            (
                json!({"placement": {"spread": "None", "zones": true}}),
                "spec.placement.zones",
            ),
            (
                json!({"placement": {"constraints": [{"topologyKey": "Rack/x"}]}}),
                "spec.placement.constraints[0].topologyKey",
            ),
            (
                json!({"placement": {"constraints": [{"topologyKey": "rack/"}]}}),
                "spec.placement.constraints[0].topologyKey",
            ),
            (
                json!({"placement": {"constraints": [
                    {"topologyKey": "rack"}, {"topologyKey": "rack", "maxSkew": 2}]}}),
                "spec.placement.constraints[1].topologyKey",
            ),
            (
                json!({"placement": {"constraints": [{"topologyKey": "rack", "maxSkew": 0}]}}),
                "spec.placement.constraints[0].maxSkew",
            ),
            (
                json!({"placement": {"constraints": [{"topologyKey": "rack", "spread": "None"}]}}),
                "spec.placement.constraints[0].spread",
            ),
            (
                json!({"rollout": {"maxShardsInFlight": 2000}}),
                "spec.rollout.maxShardsInFlight",
            ),
            (
                json!({"rollout": {"bakeTime": "2h"}}),
                "spec.rollout.bakeTime",
            ),
            (
                json!({"rollout": {"progressDeadline": "1s"}}),
                "spec.rollout.progressDeadline",
            ),
            (
                json!({"resharding": {"missStatuses": []}}),
                "spec.resharding.missStatuses",
            ),
            (
                json!({"resharding": {"missStatuses": [404, 410]}}),
                "spec.resharding.missStatuses[1]",
            ),
            (
                json!({"resharding": {"missStatuses": [200]}}),
                "spec.resharding.missStatuses[0]",
            ),
            (json!({"template": {}}), "spec.template.spec"),
            (
                json!({"template": {"spec": {"containers": []}}}),
                "spec.template.spec.containers",
            ),
            (
                json!({"template": {"spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 4191}]}]}}}),
                "spec.template.spec.containers[0].ports[0].containerPort",
            ),
            (
                json!({"template": {"spec": {"containers": [{"name": "shardmesh-sidecar", "image": "x"}]}}}),
                "spec.template.spec.containers[0].name",
            ),
            (
                json!({"template": {"spec": {"containers": [{"name": "app"}]}}}),
                "spec.template.spec.containers[0].image",
            ),
            (
                json!({"template": {"metadata": {"labels": {"shardmesh.io/shard": "1"}}, "spec": {"containers": [{"name": "a", "image": "x"}]}}}),
                "spec.template.metadata.labels[shardmesh.io/shard]",
            ),
            (
                json!({"resilience": {"timeouts": {"perTry": "5 parsecs"}}}),
                "spec.resilience.timeouts.perTry",
            ),
            (
                json!({"resilience": {"timeouts": {"perTry": "20s", "overall": "10s"}}}),
                "spec.resilience.timeouts.overall",
            ),
            (
                json!({"resilience": {"retries": {"maxAttempts": 0}}}),
                "spec.resilience.retries.maxAttempts",
            ),
            (
                json!({"resilience": {"retries": {"baseBackoff": "2s", "maxBackoff": "1s"}}}),
                "spec.resilience.retries.maxBackoff",
            ),
            (
                json!({"resilience": {"retries": {"retryOn": ["503", "503"]}}}),
                "spec.resilience.retries.retryOn[1]",
            ),
            (
                json!({"resilience": {"circuitBreaker": {"window": "0s"}}}),
                "spec.resilience.circuitBreaker.window",
            ),
            (
                json!({"resilience": {"concurrency": {"maxInFlight": 0}}}),
                "spec.resilience.concurrency.maxInFlight",
            ),
        ];
        for (patch, want) in cases {
            let mut spec = base();
            for (k, v) in patch.as_object().expect("object") {
                spec[k] = v.clone();
            }
            let got = paths(&svc(spec));
            assert!(got.iter().any(|p| p == want), "want {want}, got {got:?}");
        }
    }

    #[test]
    fn a_template_that_does_not_decode_is_named_to_the_field() {
        let mut spec = base();
        spec["template"]["spec"]["containers"][0]["ports"] = json!([{"containerPort": "http"}]);
        // Decoding the object succeeds: one such object must not stop the others' decoding.
        let s = svc(spec);
        let errs = validate(&s);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            errs[0].path,
            "spec.template.spec.containers[0].ports[0].containerPort"
        );
        assert!(
            errs[0].message.contains("\"http\"")
                && errs[0]
                    .message
                    .contains("kubectl explain pod.spec.containers.ports.containerPort"),
            "{}",
            errs[0].message
        );
        let mut spec = base();
        spec["template"]["spec"]["containers"] = json!("x");
        assert_eq!(paths(&svc(spec)), vec!["spec.template.spec.containers"]);
    }

    #[test]
    fn names_are_checked() {
        let mut s = svc(base());
        s.metadata.name = Some("Orders".into());
        assert_eq!(paths(&s), vec!["metadata.name"]);
        s.metadata.name = Some("o".repeat(60));
        assert_eq!(paths(&s), vec!["metadata.name"]);
    }

    #[test]
    fn shard_removal_needs_the_override() {
        let old = svc(base());
        let mut new = old.clone();
        new.spec.shards = 2;
        let errs = validate_update(&old, &new);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path, "spec.shards");
        assert!(
            errs[0].message.contains("shards 2-3"),
            "{}",
            errs[0].message
        );
        assert!(errs[0].message.contains("allowShardRemoval"));
        new.spec.rollout.allow_shard_removal = true;
        assert_eq!(validate_update(&old, &new), vec![]);
    }
}
