//! Reconcile edge cases against kube's tower-test mock: for a refused spec (or a name an older
//! ShardedService keeps) the reconciler writes the Invalid status (and an Event) and touches
//! nothing else.

use std::sync::Arc;

use http::{Request, Response};
use kube::{
    client::Body,
    runtime::{controller::Action, reflector, watcher},
    Client,
};
use serde_json::{json, Value};
use shardmesh_api::ShardedService;
use shardmesh_operator::{
    capabilities::Capabilities,
    controller::{reconcile, Context},
};
use tower_test::mock;

fn svc(shards: i32, port: i32) -> ShardedService {
    named("orders", shards, port)
}

fn named(name: &str, shards: i32, port: i32) -> ShardedService {
    serde_json::from_value(json!({
        "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "generation": 2, "creationTimestamp": "2024-01-01T10:00:00Z"},
        "spec": {"shards": shards, "replicasPerShard": 2, "port": port,
                 "template": {"spec": {"containers": [{"name": "app", "image": "demo:1"}]}}}
    }))
    .expect("fixture")
}

fn sts(i: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": format!("orders-{i}"), "namespace": "shop",
            "labels": {"shardmesh.io/service": "orders", "shardmesh.io/shard": i.to_string()},
            "ownerReferences": [{"apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
                "name": "orders", "uid": "uid-orders", "controller": true}]},
        "spec": {"selector": {}, "serviceName": format!("orders-{i}"), "template": {}}
    })
}

fn respond(body: Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.expect("body");
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// Runs one reconcile against a fake API server that owns `existing` StatefulSets and returns
/// the status the reconciler wrote plus every request line it made.
async fn refused(svc: ShardedService, existing: Vec<Value>) -> (Value, Vec<String>) {
    let (status, seen, _) = refused_among(svc, existing, vec![]).await;
    (status, seen)
}

/// [`refused`] with `others` in the controller's cache of ShardedServices; also returns what
/// the reconcile asked for next.
async fn refused_among(
    svc: ShardedService,
    existing: Vec<Value>,
    others: Vec<ShardedService>,
) -> (Value, Vec<String>, Action) {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let status_path =
        format!("PATCH /apis/shardmesh.io/v1alpha1/namespaces/shop/shardedservices/{name}/status");
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut status = Value::Null;
        while let Some((req, send)) = handle.next_request().await {
            let line = format!("{} {}", req.method(), req.uri().path());
            seen.push(line.clone());
            match line.as_str() {
                "GET /apis/apps/v1/namespaces/shop/statefulsets" => send.send_response(respond(
                    json!({"apiVersion": "apps/v1", "kind": "StatefulSetList", "metadata": {}, "items": existing}),
                )),
                l if l == status_path => {
                    let body = body_json(req).await;
                    status = body["status"].clone();
                    send.send_response(respond(json!({
                        "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
                        "metadata": {"name": name, "namespace": "shop"},
                        "spec": {"shards": 1, "replicasPerShard": 1, "port": 1, "template": {}},
                        "status": status.clone()
                    })))
                }
                "POST /apis/events.k8s.io/v1/namespaces/shop/events" => {
                    let body = body_json(req).await;
                    send.send_response(respond(body))
                }
                other => panic!("unexpected request {other}"),
            }
        }
        (status, seen)
    });
    let client = Client::new(service, "default");
    let caps = Capabilities {
        version: "1.20".into(),
        pdb: None,
        native_sidecars: false,
    };
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in others.iter().chain([&svc]) {
        writer.apply_watcher_event(&watcher::Event::InitApply(o.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let ctx = Arc::new(Context::new(client, caps, Some("test".into())).with_services(store));
    let next = reconcile(Arc::new(svc), ctx)
        .await
        .expect("reconcile succeeds");
    let (status, seen) = server.await.expect("fake server");
    (status, seen, next)
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn invalid_spec_writes_only_status_and_an_event() {
    let (status, seen) = refused(svc(2, 4143), vec![sts(0), sts(1)]).await;
    assert_eq!(
        seen,
        [
            "GET /apis/apps/v1/namespaces/shop/statefulsets",
            "PATCH /apis/shardmesh.io/v1alpha1/namespaces/shop/shardedservices/orders/status",
            "POST /apis/events.k8s.io/v1/namespaces/shop/events",
        ]
    );
    let invalid = condition(&status, "Invalid");
    assert_eq!(invalid["status"], "True");
    assert_eq!(invalid["reason"], "InvalidSpec");
    assert!(
        invalid["message"]
            .as_str()
            .unwrap_or("")
            .contains("spec.port: 4143"),
        "{invalid}"
    );
    assert_eq!(status["observedGeneration"], 2);
    assert!(status["notes"][0]
        .as_str()
        .unwrap_or("")
        .contains("policy/v1"));
}

#[tokio::test]
async fn lowering_shards_is_refused_without_deleting() {
    let (status, seen) = refused(svc(2, 8080), vec![sts(0), sts(1), sts(2), sts(3)]).await;
    assert!(
        seen.iter()
            .all(|l| !l.starts_with("DELETE") && !l.contains("/statefulsets/")),
        "{seen:?}"
    );
    let invalid = condition(&status, "Invalid");
    assert_eq!(invalid["reason"], "ShardRemovalRefused");
    let msg = invalid["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("lowered from 4 to 2") && msg.contains("shards 2-3"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_name_an_older_service_generates_is_refused_and_looked_at_again() {
    // `orders` with 2 shards has a shard-1 Service `orders-1`: the routing Service of the
    // younger ShardedService `orders-1`.
    let older = named("orders", 2, 8080);
    let mut younger = named("orders-1", 1, 8080);
    younger.metadata.creation_timestamp =
        serde_json::from_value(json!("2024-01-01T11:00:00Z")).expect("timestamp");
    let (status, seen, next) = refused_among(younger, vec![], vec![older]).await;
    assert_eq!(
        seen,
        [
            "GET /apis/apps/v1/namespaces/shop/statefulsets",
            "PATCH /apis/shardmesh.io/v1alpha1/namespaces/shop/shardedservices/orders-1/status",
            "POST /apis/events.k8s.io/v1/namespaces/shop/events",
        ]
    );
    let invalid = condition(&status, "Invalid");
    assert_eq!(invalid["reason"], "NameCollision");
    let msg = invalid["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("metadata.name") && msg.contains("ShardedService orders,"),
        "{msg}"
    );
    // The older one going away triggers nothing here: the refused one must look again.
    assert_eq!(
        next,
        Action::requeue(shardmesh_operator::collision::RECHECK)
    );
}
