//! Latency of the admission handler in-process (body bytes → response bytes, no network, no
//! TLS): what the webhook adds to every pod creation and ShardedService write, before transport.
//!
//! `cargo bench -p shardmesh-operator --bench admission` prints p50/p99/max per case.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardmesh_operator::webhook::{inject::InjectorConfig, Admission, MUTATE_PATH, VALIDATE_PATH};

const WARMUP: usize = 2_000;
const ITERATIONS: usize = 20_000;

fn review(
    kind: &str,
    resource: &str,
    group: &str,
    version: &str,
    op: &str,
    object: Value,
    old: Value,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "bench",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": "shop", "operation": op, "userInfo": {"username": "bench"},
            "object": object, "oldObject": old, "dryRun": false
        }
    }))
    .unwrap_or_default()
}

/// A shard pod as the StatefulSet controller creates it (labels, annotations, probes, env).
fn shard_pod(injected: bool) -> Value {
    let mut containers = vec![json!({
        "name": "app", "image": "shardmesh.local/demo:dev", "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "env": [
            {"name": "SHARDMESH_SERVICE", "value": "orders"},
            {"name": "SHARDMESH_SHARD", "value": "1"},
            {"name": "SHARDMESH_SHARDS", "value": "4"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
        "resources": {}, "terminationMessagePath": "/dev/termination-log",
        "volumeMounts": [{"name": "default-token-abcde", "readOnly": true,
                          "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    })];
    if injected {
        containers
            .push(json!({"name": "shardmesh-sidecar", "image": "shardmesh.local/sidecar:dev"}));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "orders-1-", "namespace": "shop",
            "labels": {"shardmesh.io/service": "orders", "shardmesh.io/shard": "1", "app": "orders",
                       "controller-revision-hash": "orders-1-7d9f8c6b5", "statefulset.kubernetes.io/pod-name": "orders-1-0"},
            "annotations": {"shardmesh.io/app-port": "8080",
                            "shardmesh.io/resilience": serde_json::to_string(&shardmesh_api::v1alpha1::Resilience::default()).unwrap_or_default()},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "orders-1",
                                 "uid": "8c1e6b0e-1111-2222-3333-444455556666", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "containers": containers,
            "volumes": [{"name": "default-token-abcde", "secret": {"secretName": "default-token-abcde"}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 5, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        }
    })
}

fn service(shards: i32) -> Value {
    json!({
        "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
        "metadata": {"name": "orders", "namespace": "shop", "generation": 2},
        "spec": {"shards": shards, "replicasPerShard": 3, "port": 8080,
                 "template": {"metadata": {"labels": {"app": "orders"}},
                              "spec": {"containers": [{"name": "app", "image": "shardmesh.local/demo:dev",
                                                        "ports": [{"containerPort": 8080}]}]}}}
    })
}

fn measure(name: &str, admission: &Admission, path: &str, body: &[u8]) {
    for _ in 0..WARMUP {
        let _ = admission.handle(path, body);
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let t = Instant::now();
        let out = admission.handle(path, body);
        samples.push(t.elapsed());
        assert!(out.is_ok(), "{name}: handler failed");
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name:<40} body {:>5} B  p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs  ({ITERATIONS} runs)",
        body.len(),
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        samples[samples.len() - 1].as_secs_f64() * 1e6,
    );
}

fn main() {
    let admission = Admission {
        injector: InjectorConfig::example(),
        sidecar_injection: true,
    };
    let pod = |p: Value| review("Pod", "pods", "", "v1", "CREATE", p, Value::Null);
    let svc = |op: &str, new: Value, old: Value| {
        review(
            "ShardedService",
            "shardedservices",
            "shardmesh.io",
            "v1alpha1",
            op,
            new,
            old,
        )
    };
    measure(
        "mutate: shard pod (inject)",
        &admission,
        MUTATE_PATH,
        &pod(shard_pod(false)),
    );
    measure(
        "mutate: re-invocation (no-op)",
        &admission,
        MUTATE_PATH,
        &pod(shard_pod(true)),
    );
    measure(
        "validate: ShardedService create (ok)",
        &admission,
        VALIDATE_PATH,
        &svc("CREATE", service(4), Value::Null),
    );
    measure(
        "validate: shard decrease (denied)",
        &admission,
        VALIDATE_PATH,
        &svc("UPDATE", service(2), service(4)),
    );
}
