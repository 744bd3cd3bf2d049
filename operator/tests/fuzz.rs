//! Fuzz targets for what the operator reads from users and peers: AdmissionReview bodies posted
//! to the webhooks (pod injection and ShardedService validation, `Admission::handle` from body
//! bytes to response bytes) and the published shard map it continues from (the ConfigMap any
//! namespace editor can rewrite). Each must answer or refuse (never panic) within a second.
//!
//! Seeds: `tests/corpus/admission/` (`mutate-*`/`validate-*` name the webhook and the verdict:
//! `patch`, `allow` or `deny`; `bad-*` must be refused as a bad request), plus shardmesh-api's
//! ShardedService and shard-map seeds and the sidecar's policy seeds. Cases per target are sized
//! so that the fuzz suites of shardmesh-api, -sidecar and -operator together run in about 35 s
//! in a debug build; for a longer local run raise them all with e.g.
//! `PROPTEST_CASES=20000 cargo test -p shardmesh-operator --test fuzz`.

#[path = "../api/tests/fuzzing/mod.rs"]
mod fuzzing;

use std::{collections::BTreeMap, time::Duration};

use fuzzing::{
    config, corpus, dictionary, inputs, mutated_tree, trees, unstructured, within, Doc, Input, Seed,
};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::core::{admission::AdmissionReview, DynamicObject};
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};
use shardmesh_api::shardmap::{Member, Previous, Shard, ShardMap};
use shardmesh_operator::{
    reshard,
    shardmap::{compute, Inputs, PodFacts},
    webhook::{
        annotations, inject::InjectorConfig, Admission, HandleError, MUTATE_PATH, VALIDATE_PATH,
    },
};

fn dir(target: &str) -> String {
    format!("{}/tests/corpus/{target}", env!("CARGO_MANIFEST_DIR"))
}

fn api_dir(target: &str) -> String {
    format!("{}/api/tests/corpus/{target}", env!("CARGO_MANIFEST_DIR"))
}

/// Admission operations the seeds do not all show.
const OPERATIONS: &[&str] = &["CREATE", "UPDATE", "DELETE", "CONNECT"];

/// The injector's annotations, each fuzzed with values of its own.
const ANNOTATIONS: &[&str] = &[
    annotations::INJECT,
    annotations::APP_PORT,
    annotations::RESILIENCE,
    annotations::LEADER_LEASE,
    annotations::SIDECAR_RESOURCES,
    annotations::OUTBOUND_PROXY,
    annotations::INJECTED_VERSION,
    annotations::PRESTOP,
];

// ---------------------------------------------------------------------------------------------
// Admission reviews

/// A review body as the answer is checked against it: its uid (decoded skipping the rest, the
/// way the handler skips unknown fields, without a nesting limit) and, when it decodes within
/// serde_json's nesting limit, the submitted object.
#[derive(Deserialize)]
struct Posted<R> {
    request: R,
}

#[derive(Deserialize)]
struct Uid {
    uid: String,
}

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    object: Value,
}

/// What an answer must look like: an AdmissionReview the API server reads, for the request's
/// uid; a denial says why and names the field; a patch applies to the submitted object.
fn check_answer(path: &str, body: &[u8], out: &[u8]) -> Verdict {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(out).expect("the answer is an AdmissionReview");
    let resp = review.response.expect("the answer has a response");
    let uid: Posted<Uid> = serde_json::from_slice(body).expect("an answered body is a review");
    assert_eq!(resp.uid, uid.request.uid);
    if !resp.allowed {
        let msg = &resp.result.message;
        assert_eq!(resp.result.code, 422, "{msg}");
        assert!(
            msg.contains("spec.")
                || msg.contains("metadata.")
                || msg.contains("cannot read the ShardedService"),
            "a denial names the field: {msg}"
        );
        if path == MUTATE_PATH {
            assert!(msg.starts_with("shardmesh sidecar injection: "), "{msg}");
        }
        return Verdict::Deny;
    }
    let Some(patch) = resp.patch else {
        return Verdict::Allow;
    };
    assert_eq!(path, MUTATE_PATH, "only the injector patches");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON patch");
    let Ok(Posted {
        request: Object { object: mut pod },
    }) = serde_json::from_slice(body)
    else {
        // Unknown metadata fields nested past serde_json's limit: skipped by the handler, too
        // deep to rebuild here.
        return Verdict::Patch;
    };
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the submitted pod");
    // The API server knows the type whatever the body says; k8s-openapi insists on it.
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    let pod: Pod = serde_json::from_value(pod).expect("the patched pod is a pod");
    let spec = pod.spec.expect("a patched pod has a spec");
    assert!(
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == "shardmesh-sidecar"),
        "the patch adds the sidecar"
    );
    Verdict::Patch
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Patch,
    Allow,
    Deny,
    BadRequest,
    NotFound,
}

fn admission(native_sidecars: bool, sidecar_injection: bool) -> Admission {
    let mut injector = InjectorConfig::example();
    injector.native_sidecars = native_sidecars;
    Admission {
        injector,
        sidecar_injection,
    }
}

/// The handler's time is bounded; the checks of its answer (which apply its patch to the pod,
/// slow in a debug build for a pod of hundreds of containers) run after, untimed.
fn check_admission(adm: Admission, path: String, body: Vec<u8>) -> Verdict {
    let (path, body, answer) = within("Admission::handle", move || {
        let answer = adm.handle(&path, &body);
        (path, body, answer)
    });
    match answer {
        Ok(out) => check_answer(&path, &body, &out),
        Err(HandleError::BadRequest(msg)) => {
            assert!(!msg.is_empty());
            Verdict::BadRequest
        }
        Err(HandleError::NotFound) => {
            assert!(path != MUTATE_PATH && path != VALIDATE_PATH);
            Verdict::NotFound
        }
    }
}

#[test]
fn admission_corpus() {
    for seed in corpus(&dir("admission")) {
        let name = seed.name.clone();
        let (path, want) = match name.split('-').collect::<Vec<_>>()[..] {
            ["mutate", v, ..] => (MUTATE_PATH, v),
            ["validate", v, ..] => (VALIDATE_PATH, v),
            ["bad", ..] => (MUTATE_PATH, "bad"),
            ["tricky", ..] => (MUTATE_PATH, "tricky"),
            _ => panic!("{name}: admission seeds are mutate-*, validate-*, bad-* or tricky-*"),
        };
        for adm in [admission(false, true), admission(true, true)] {
            let got = check_admission(adm, path.into(), seed.bytes.clone());
            let expected = match want {
                "patch" => Some(Verdict::Patch),
                "allow" => Some(Verdict::Allow),
                "deny" => Some(Verdict::Deny),
                "bad" => Some(Verdict::BadRequest),
                _ => None,
            };
            if let Some(e) = expected {
                assert_eq!(got, e, "{name}");
            }
        }
        let got = check_admission(admission(false, true), "/other".into(), seed.bytes);
        assert_eq!(got, Verdict::NotFound);
    }
}

/// The corpus' review bodies, and the objects they carry.
fn reviews() -> Vec<Seed> {
    corpus(&dir("admission"))
}

fn objects(prefix: &str) -> Vec<Value> {
    reviews()
        .into_iter()
        .filter(|s| s.name.starts_with(prefix))
        .filter_map(|s| serde_json::from_slice::<Value>(&s.bytes).ok())
        .map(|v| v["request"]["object"].clone())
        .filter(Value::is_object)
        .collect()
}

fn review(kind: &str, op: &str, ns: &str, object: Doc, old: Doc) -> Doc {
    let (group, version, resource) = if kind == "Pod" {
        ("", "v1", "pods")
    } else {
        ("shardmesh.io", "v1alpha1", "shardedservices")
    };
    let mut d = Doc::from_value(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": ns, "operation": op, "userInfo": {"username": "fuzz"}, "dryRun": false
        }
    }));
    if let Doc::Obj(top) = &mut d {
        if let Some((_, Doc::Obj(req))) = top.iter_mut().find(|(k, _)| k == "request") {
            req.push(("object".into(), object));
            req.push(("oldObject".into(), old));
        }
    }
    d
}

/// Values the injector's annotations get: valid, near misses and junk.
fn annotation_value(key: &'static str) -> BoxedStrategy<String> {
    let policies = corpus(&format!(
        "{}/../sidecar/tests/corpus/policy",
        env!("CARGO_MANIFEST_DIR")
    ));
    let policy_trees = trees(&policies);
    let policy_words = fuzzing::WORDS
        .iter()
        .copied()
        .chain(dictionary(&policy_trees))
        .collect();
    let specific: BoxedStrategy<String> = match key {
        annotations::RESILIENCE => prop_oneof![
            mutated_tree(policy_trees, policy_words).prop_map(|i| i.text()),
            inputs(&policies, &[]).prop_map(|i| i.text()),
        ]
        .boxed(),
        annotations::SIDECAR_RESOURCES => prop::sample::select(vec![
            "{\"limits\":{\"memory\":\"128Mi\"}}",
            "{\"requests\":{\"cpu\":\"-1\"},\"limits\":{\"memory\":\"1e999\"}}",
            "{\"limits\":null}",
            "{\"claims\":[{\"name\":\"\"}]}",
            "{\"limits\":{\"memory\":128}}",
            "128Mi",
            "",
        ])
        .prop_map(str::to_string)
        .boxed(),
        _ => prop::sample::select(
            fuzzing::WORDS
                .iter()
                .chain(fuzzing::NUMBERS)
                .copied()
                .collect::<Vec<_>>(),
        )
        .prop_map(str::to_string)
        .boxed(),
    };
    prop_oneof![4 => specific, 1 => any::<String>()].boxed()
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let one = proptest::strategy::Union::new(ANNOTATIONS.iter().map(|k| {
        annotation_value(k)
            .prop_map(move |v| (k.to_string(), v))
            .boxed()
    }));
    prop::collection::vec(one, 0..5).prop_map(|pairs| pairs.into_iter().collect())
}

/// A pod of the corpus with hostile injector annotations, ports, hooks and volumes.
fn hostile_pod_review() -> impl Strategy<Value = Input> {
    let pods = objects("mutate-patch");
    let port = prop_oneof![
        prop::sample::select(vec![
            0i64, 80, 4140, 4143, 4191, 8080, 65535, 65536, -1, 2147483648
        ]),
        any::<i32>().prop_map(i64::from),
    ];
    (
        prop::sample::select(pods),
        annotations(),
        prop::option::of(any::<bool>()),
        prop::collection::vec(port, 0..3),
        0..4usize,
        prop::option::of(any::<bool>()),
        prop::sample::select(vec!["shop", "kube-system", "shardmesh-system", ""]),
        prop::sample::select(vec![
            "CREATE", "CREATE", "CREATE", "UPDATE", "DELETE", "CONNECT",
        ]),
    )
        .prop_map(
            |(mut pod, notes, host_network, ports, hook, init, ns, op)| {
                let meta = &mut pod["metadata"];
                let mut all = meta["annotations"].as_object().cloned().unwrap_or_default();
                for (k, v) in notes {
                    all.insert(k, Value::String(v));
                }
                meta["annotations"] = Value::Object(all);
                let spec = &mut pod["spec"];
                if let Some(h) = host_network {
                    spec["hostNetwork"] = json!(h);
                }
                if !ports.is_empty() {
                    let ports: Vec<Value> =
                        ports.iter().map(|p| json!({"containerPort": p})).collect();
                    spec["containers"][0]["ports"] = json!(ports);
                }
                spec["containers"][0]["lifecycle"] = match hook {
                    0 => Value::Null,
                    1 => json!({}),
                    2 => json!({"preStop": {"exec": {"command": ["true"]}}}),
                    _ => json!({"postStart": {"exec": {"command": ["true"]}}}),
                };
                match init {
                    None => {}
                    Some(false) => spec["initContainers"] = json!([]),
                    Some(true) => {
                        spec["initContainers"] = json!([{"name": "shardmesh-hook", "image": "x"}])
                    }
                }
                let body = review("Pod", op, ns, Doc::from_value(&pod), Doc::Null);
                Input(body.text().into_bytes())
            },
        )
}

/// A ShardedService of shardmesh-api's corpus, mutated, in a create or update review.
fn hostile_service_review() -> impl Strategy<Value = Input> {
    let services: Vec<Seed> = corpus(&api_dir("shardedservice"))
        .into_iter()
        .map(|s| {
            let v: Value = serde_json::from_slice(&s.bytes)
                .or_else(|_| serde_yaml::from_slice(&s.bytes))
                .unwrap_or(Value::Null);
            Seed {
                name: s.name,
                bytes: serde_json::to_vec(&v).expect("json"),
            }
        })
        .collect();
    let olds: Vec<Value> = trees(&services)
        .iter()
        .map(|d| serde_json::from_str(&d.text()).unwrap_or(Value::Null))
        .collect();
    (
        inputs(&services, OPERATIONS),
        prop::sample::select(olds),
        prop::sample::select(vec!["CREATE", "UPDATE", "UPDATE", "DELETE"]),
    )
        .prop_map(|(new, old, op)| {
            let old = if op == "CREATE" { Value::Null } else { old };
            let body = review(
                "ShardedService",
                op,
                "shop",
                Doc::Raw(new.text()),
                Doc::from_value(&old),
            );
            Input(body.text().into_bytes())
        })
}

/// An update of a valid ShardedService that changes `spec.shards` (the one field an update
/// is judged on besides the rules for any object), to counts at and around every edge.
fn shard_count_update_review() -> impl Strategy<Value = Input> {
    let count = || {
        prop_oneof![
            Just(json!(4)),
            (-2i64..1100).prop_map(|n| json!(n)),
            prop::sample::select(vec![i32::MIN, -1, 0, 1024, 1025, i32::MAX])
                .prop_map(|n| json!(n)),
            any::<i32>().prop_map(|n| json!(n)),
        ]
    };
    let services = objects("validate-allow-create");
    (
        prop::sample::select(services),
        count(),
        count(),
        any::<bool>(),
    )
        .prop_map(|(svc, old_shards, new_shards, removal)| {
            let (mut old, mut new) = (svc.clone(), svc);
            old["spec"]["shards"] = old_shards;
            new["spec"]["shards"] = new_shards;
            new["spec"]["rollout"] = json!({"allowShardRemoval": removal});
            let body = review(
                "ShardedService",
                "UPDATE",
                "shop",
                Doc::from_value(&new),
                Doc::from_value(&old),
            );
            Input(body.text().into_bytes())
        })
}

fn bodies(path: &'static str) -> BoxedStrategy<Input> {
    let specific = if path == MUTATE_PATH {
        hostile_pod_review().boxed()
    } else {
        prop_oneof![
            3 => hostile_service_review(),
            1 => shard_count_update_review(),
        ]
        .boxed()
    };
    prop_oneof![
        3 => inputs(&reviews(), OPERATIONS),
        3 => specific,
        1 => unstructured(fuzzing::tokens(OPERATIONS)),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config(7000))]

    #[test]
    fn admission_mutate(body in bodies(MUTATE_PATH), native in any::<bool>(), injection in any::<bool>()) {
        check_admission(admission(native, injection), MUTATE_PATH.into(), body.0);
    }
}

proptest! {
    #![proptest_config(config(7000))]

    #[test]
    fn admission_validate(body in bodies(VALIDATE_PATH), native in any::<bool>(), injection in any::<bool>()) {
        check_admission(admission(native, injection), VALIDATE_PATH.into(), body.0);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn admission_unknown_path(path in any::<String>(), body in bodies(MUTATE_PATH)) {
        prop_assume!(path != MUTATE_PATH && path != VALIDATE_PATH);
        prop_assert_eq!(check_admission(admission(false, true), path, body.0), Verdict::NotFound);
    }
}

/// A pod whose spec has no `containers` array (`spec: {}`, or `containers: null`) reads as a
/// pod with an empty container list (k8s-openapi defaults the missing required field); a patch
/// computed from it (`add /spec/containers/-`) would not apply to the object as sent, so the
/// injector admits it unchanged and the API server answers with its own `spec.containers:
/// Required value`.
#[test]
fn injection_into_a_pod_without_containers() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "labels": {"shardmesh.io/inject": "enabled"}},
        "spec": {}});
    let body = review("Pod", "CREATE", "shop", Doc::from_value(&pod), Doc::Null);
    let got = check_admission(
        admission(false, true),
        MUTATE_PATH.into(),
        body.text().into_bytes(),
    );
    assert_ne!(got, Verdict::Patch);
}

/// The same for a pod object without `metadata` (which the API server always sends, but any
/// client of the webhook endpoint may leave out): the patch's `add /metadata/annotations` would
/// not apply to it, so it is admitted unchanged.
#[test]
fn injection_into_a_pod_without_metadata() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "spec": {"containers": [{"name": "app", "image": "x:1"}]}});
    let body = review("Pod", "CREATE", "shop", Doc::from_value(&pod), Doc::Null);
    let got = check_admission(
        admission(false, true),
        MUTATE_PATH.into(),
        body.text().into_bytes(),
    );
    assert_ne!(got, Verdict::Patch);
}

/// An update of a ShardedService from `shards: 1` to `shards: -2147483648` is denied as out of
/// range (the subtraction in `validate_update` once overflowed: a panic in debug builds, a
/// nonsensical range in release). The CRD schema keeps such objects out of the API server, but
/// the webhook endpoint takes any body.
#[test]
fn validation_of_an_update_with_extreme_shard_counts() {
    let svc = |shards: i64| {
        json!({"apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
               "metadata": {"name": "orders", "namespace": "shop"},
               "spec": {"shards": shards, "replicasPerShard": 1, "port": 8080,
                        "template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}}})
    };
    let body = review(
        "ShardedService",
        "UPDATE",
        "shop",
        Doc::from_value(&svc(i64::from(i32::MIN))),
        Doc::from_value(&svc(1)),
    );
    let got = check_admission(
        admission(false, true),
        VALIDATE_PATH.into(),
        body.text().into_bytes(),
    );
    assert_eq!(got, Verdict::Deny);
}

// ---------------------------------------------------------------------------------------------
// The published shard map the operator continues from

fn now() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().expect("a timestamp")
}

fn check_published(map: ShardMap, spec_shards: u32, floor: i64, window: Duration, mask: u64) {
    let listed = u32::try_from(map.shards.len()).unwrap_or(u32::MAX);
    let workloads = reshard::workload_shards(listed, spec_shards);
    assert!(workloads >= spec_shards);
    if let Some(r) = reshard::status(Some(&map), spec_shards) {
        assert!(!reshard::message(&r).is_empty());
    }
    let layout = reshard::next_layout(
        Some(&map),
        spec_shards,
        |i| mask >> (i % 64) & 1 == 1,
        window,
        now(),
    );
    assert!(
        layout.count >= 1 && layout.listed >= layout.count,
        "{layout:?}"
    );
    let pods: BTreeMap<String, PodFacts> = BTreeMap::new();
    let input = Inputs {
        shards: spec_shards,
        pods: &pods,
        leaders: mask & 1 == 1,
        grace_from: None,
        prev: Some(&map),
        floor,
        window,
    };
    let next = compute(input, &[], now()).map;
    let high = map.epoch.max(floor);
    assert!(
        next.epoch >= high,
        "the epoch never goes back: {map:?} -> {next:?}"
    );
    let same =
        next.shards == map.shards && next.count() == map.count() && next.previous == map.previous;
    if !same && high < i64::MAX {
        assert!(
            next.epoch > high,
            "a changed map has a newer epoch: {map:?} -> {next:?}"
        );
    }
    if map.check().is_ok() {
        assert_eq!(
            next.check(),
            Ok(()),
            "a valid map is continued by a valid one: {map:?} -> {next:?}"
        );
    }
}

fn published_map() -> BoxedStrategy<ShardMap> {
    let decoded = inputs(
        &corpus(&api_dir("shardmap")),
        &[
            "epoch", "count", "shards", "previous", "until", "members", "leader",
        ],
    )
    .prop_filter_map("decodes as a shard map", |i| {
        serde_json::from_slice(&i.0).ok()
    });
    let until = prop::sample::select(vec![
        "2026-01-01T00:00:00Z",
        "2025-12-31T23:59:59Z",
        "2026-01-01T00:02:00Z",
        "9999-12-31T23:59:59Z",
        "-009999-01-01T00:00:00Z",
        "not a time",
        "",
    ]);
    let built = (
        any::<i64>(),
        prop::option::of(prop_oneof![0u32..8, 0u32..=4096, any::<u32>()]),
        0usize..8,
        prop::option::of((prop_oneof![0u32..8, 0u32..=4096, any::<u32>()], until)),
    )
        .prop_map(|(epoch, routing_count, listed, previous)| ShardMap {
            epoch,
            routing_count,
            shards: (0..listed)
                .map(|i| Shard {
                    index: i as u32,
                    members: vec![Member {
                        pod: format!("o-{i}-0"),
                        address: "10.0.0.1:4143".into(),
                    }],
                    leader: None,
                })
                .collect(),
            previous: previous.map(|(count, until)| Previous {
                count,
                until: until.to_string(),
            }),
        });
    prop_oneof![decoded, built].boxed()
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn published_shard_map(
        map in published_map(),
        spec_shards in prop_oneof![1u32..8, 1u32..=1024],
        floor in prop_oneof![Just(0i64), any::<i64>()],
        window in prop::sample::select(vec![0u64, 1, 120, 86_400, u64::MAX / 1000]),
        mask in any::<u64>(),
    ) {
        within("shard-map layout", move || {
            check_published(map, spec_shards, floor, Duration::from_secs(window), mask)
        });
    }
}

/// A published map (ConfigMap `<service>-shardmap`, writable by anyone who may edit ConfigMaps
/// in the namespace) whose `count` or `previous.count` is absurd is not a layout to continue
/// from: `next_layout` (and the operator reading the map back) only trusts a map that passes
/// `ShardMap::check`. Trusting it once meant asking about, and allocating for, 2^32 shards.
#[test]
fn published_map_with_an_absurd_count() {
    let map: ShardMap =
        serde_json::from_str(r#"{"epoch":1,"count":4294967295,"shards":[{"index":0}]}"#)
            .expect("it decodes: only check() refuses it");
    within("next_layout", move || {
        reshard::next_layout(Some(&map), 3, |_| false, Duration::from_secs(120), now())
    });
}
