//! `spec.template`: the application's pod template, decoded leniently.
//!
//! The CRD keeps the template opaque (`x-kubernetes-preserve-unknown-fields`; a full
//! PodTemplateSpec schema is several hundred KiB), so the API server stores any object there
//! when the validating webhook is absent or bypassed. A template that does not decode as a
//! PodTemplateSpec must not make the whole ShardedService undecodable: kube's watcher decodes a
//! list as a whole, so one such object would stop the reconciliation of every ShardedService in
//! the cluster. [`Template`] therefore accepts any JSON, keeps it as it was (so it serializes
//! back unchanged) and remembers that it did not decode; validation reports it naming the field.

use std::{borrow::Cow, ops::Deref};

use k8s_openapi::api::core::v1::PodTemplateSpec;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Most whole-template decodes spent locating a decode failure: enough for any real template's
/// depth and width, and a bound on the work a hostile object can cause per validation.
const LOCATE_BUDGET: usize = 128;

/// A pod template as stored: the decoded PodTemplateSpec (the default when it does not
/// decode), the JSON it came from, and why it did not decode. Reads through [`Deref`] as a
/// PodTemplateSpec; build a new one with `From<PodTemplateSpec>` to change it, so the decoded
/// and the stored form never disagree.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pod: PodTemplateSpec,
    raw: Value,
    error: Option<String>,
}

/// Where and why a template does not decode as a PodTemplateSpec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Path of the offending field below the template, e.g.
    /// `.spec.containers[0].ports[0].containerPort`; empty for the template itself.
    pub path: String,
    /// The decoder's message, e.g. `invalid type: string "http", expected i32`.
    pub message: String,
}

impl Template {
    /// A template from stored JSON, decoded if it can be.
    pub fn from_value(raw: Value) -> Self {
        match PodTemplateSpec::deserialize(&raw) {
            Ok(pod) => Template {
                pod,
                raw,
                error: None,
            },
            Err(e) => Template {
                pod: PodTemplateSpec::default(),
                raw,
                error: Some(e.to_string()),
            },
        }
    }

    /// The decoded template (the default when it did not decode).
    pub fn pod(&self) -> &PodTemplateSpec {
        &self.pod
    }

    /// The JSON as stored.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// Whether the stored JSON decoded as a PodTemplateSpec.
    pub fn decoded(&self) -> bool {
        self.error.is_none()
    }

    /// Why the template did not decode, at the deepest field that can be blamed. The search
    /// decodes the template again with parts left out, so it is done only when asked (by
    /// validation), and bounded.
    pub fn decode_error(&self) -> Option<DecodeError> {
        let message = self.error.clone()?;
        Some(DecodeError {
            path: render(&locate(&self.raw, &message, LOCATE_BUDGET)),
            message,
        })
    }
}

impl Default for Template {
    fn default() -> Self {
        PodTemplateSpec::default().into()
    }
}

impl From<PodTemplateSpec> for Template {
    fn from(pod: PodTemplateSpec) -> Self {
        // Serializing plain data structs cannot fail.
        let raw = serde_json::to_value(&pod).unwrap_or(Value::Null);
        Template {
            pod,
            raw,
            error: None,
        }
    }
}

impl Deref for Template {
    type Target = PodTemplateSpec;

    fn deref(&self) -> &PodTemplateSpec {
        &self.pod
    }
}

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Template::from_value)
    }
}

impl JsonSchema for Template {
    // Inlined like the `schema_with` function it replaces, so the CRD is unchanged.
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "PodTemplate".into()
    }

    /// Opaque in the CRD schema (a full PodTemplateSpec schema is several hundred KiB); the
    /// operator and the validating webhook check it instead.
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "description": "Pod template of the application, as in a Deployment (metadata + spec). Must have at least one container. shardmesh adds the labels shardmesh.io/service and shardmesh.io/shard.",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}

/// One step into a JSON document.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The deepest part of `raw` to blame for the decode failure `first`. The decoder reads
/// children in order and stops at its first error, and reports a missing required field only
/// once its object has been read through; so keeping only the first `k` children of the part
/// blamed so far fails the same way exactly when `k` passes the culprit child. A binary search
/// over `k` finds it; the part itself is blamed when it fails the same way with no children
/// (a wrong shape, a missing required field). Spends at most `budget` decodes; when they run
/// out, the part found so far is blamed.
fn locate(raw: &Value, first: &str, mut budget: usize) -> Vec<Step> {
    let mut path = Vec::new();
    'descend: loop {
        let n = match at(raw, &path) {
            Some(Value::Object(m)) => m.len(),
            Some(Value::Array(a)) => a.len(),
            _ => break,
        };
        let mut fails_the_same_with = |k: usize| {
            budget = budget.checked_sub(1)?;
            let mut trial = raw.clone();
            match at_mut(&mut trial, &path) {
                Some(Value::Object(m)) => {
                    let rest: Vec<String> = m.keys().skip(k).cloned().collect();
                    for key in rest {
                        m.remove(&key);
                    }
                }
                Some(Value::Array(a)) => a.truncate(k),
                _ => {}
            }
            let err = PodTemplateSpec::deserialize(&trial).err();
            Some(err.is_some_and(|e| e.to_string() == first))
        };
        if fails_the_same_with(0) != Some(false) {
            break;
        }
        // Invariant: `lo` children decode past the failure, `hi` (all of them, as stored) do not.
        let (mut lo, mut hi) = (0, n);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match fails_the_same_with(mid) {
                Some(true) => hi = mid,
                Some(false) => lo = mid,
                None => break 'descend,
            }
        }
        let Some(child) = (match at(raw, &path) {
            Some(Value::Object(m)) => m.keys().nth(hi - 1).cloned().map(Step::Key),
            _ => Some(Step::Index(hi - 1)),
        }) else {
            break;
        };
        path.push(child);
    }
    path
}

fn at<'v>(v: &'v Value, path: &[Step]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(i),
    })
}

fn at_mut<'v>(v: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    path.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get_mut(k),
        Step::Index(i) => v.get_mut(i),
    })
}

/// `.spec.containers[0].ports[0].containerPort`; keys that are not plain words (label keys)
/// in brackets, as the other field paths of the validation do.
fn render(path: &[Step]) -> String {
    path.iter()
        .map(|s| match s {
            Step::Key(k)
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                format!(".{k}")
            }
            Step::Key(k) => format!("[{k}]"),
            Step::Index(i) => format!("[{i}]"),
        })
        .collect()
}

/// The `kubectl explain` path documenting a template field: `.spec.containers[0].ports` →
/// `pod.spec.containers.ports`.
pub fn explain_path(path: &str) -> String {
    let mut out = String::from("pod");
    let mut depth = 0;
    for ch in path.chars() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error_of(template: Value) -> DecodeError {
        Template::from_value(template)
            .decode_error()
            .expect("does not decode")
    }

    #[test]
    fn a_good_template_decodes_and_serializes_as_stored() {
        let raw = json!({"metadata": {"labels": {"app": "a"}},
                         "spec": {"containers": [{"name": "app", "image": "x:1"}],
                                  "somethingNewer": {"kept": true}}});
        let t: Template = serde_json::from_value(raw.clone()).expect("decodes");
        assert!(t.decoded());
        assert_eq!(t.decode_error(), None);
        assert_eq!(t.spec.as_ref().map(|s| s.containers.len()), Some(1));
        // Fields the PodTemplateSpec does not know survive a round trip.
        assert_eq!(serde_json::to_value(&t).expect("serializes"), raw);
    }

    #[test]
    fn a_bad_template_keeps_its_json_and_names_the_deepest_field() {
        let raw = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1"},
            {"name": "b", "image": "x:1", "env": [{"name": "E", "value": "v"}],
             "ports": [{"containerPort": 80}, {"containerPort": "http", "protocol": "TCP"}]}
        ]}});
        let t = Template::from_value(raw.clone());
        assert!(!t.decoded());
        assert_eq!(t.pod(), &PodTemplateSpec::default());
        assert_eq!(serde_json::to_value(&t).expect("serializes"), raw);
        let e = t.decode_error().expect("error");
        assert_eq!(e.path, ".spec.containers[1].ports[1].containerPort");
        assert!(e.message.contains("\"http\""), "{}", e.message);
        assert_eq!(
            explain_path(&e.path),
            "pod.spec.containers.ports.containerPort"
        );
    }

    #[test]
    fn wrong_shapes_are_located() {
        assert_eq!(
            error_of(json!({"spec": {"containers": "x"}})).path,
            ".spec.containers"
        );
        assert_eq!(
            error_of(json!({"spec": {"containers": [{"name": 5}]}})).path,
            ".spec.containers[0].name"
        );
        assert_eq!(
            error_of(
                json!({"metadata": {"labels": {"app.kubernetes.io/name": 7}},
                            "spec": {"containers": []}})
            )
            .path,
            ".metadata.labels[app.kubernetes.io/name]"
        );
        // Past the siblings read before it.
        assert_eq!(
            error_of(json!({"spec": {
                "containers": [{"name": "a", "image": "x:1"}],
                "volumes": [{"name": "v", "emptyDir": {"sizeLimit": []}}]
            }}))
            .path,
            ".spec.volumes[0].emptyDir.sizeLimit"
        );
    }

    #[test]
    fn the_search_is_bounded() {
        let mut containers: Vec<Value> = (0..1000)
            .map(|i| json!({"name": format!("c{i}"), "image": "x:1"}))
            .collect();
        containers.push(json!({"name": "bad", "image": 1}));
        let raw = json!({"spec": {"containers": containers}});
        let first = PodTemplateSpec::deserialize(&raw)
            .expect_err("bad")
            .to_string();
        assert_eq!(
            render(&locate(&raw, &first, LOCATE_BUDGET)),
            ".spec.containers[1000].image"
        );
        // Out of budget among the containers: the list is blamed, not a wrong item.
        assert_eq!(render(&locate(&raw, &first, 10)), ".spec.containers");
    }
}
