//! Reconciles against kube's tower-test mock: for a refused spec (or a name an older
//! ShardedService keeps) the reconciler writes the Invalid status (and an Event) and touches
//! nothing else; on the happy path it applies every owned object once and then writes nothing
//! until something changes.

use std::sync::Arc;

use http::{Request, Response};
use kube::{
    client::Body,
    core::PartialObjectMeta,
    runtime::{
        controller::Action,
        reflector::{self, Store},
        watcher,
    },
    Client, Resource,
};
use serde_json::{json, Value};
use shardmesh_api::ShardedService;
use shardmesh_operator::{
    capabilities::Capabilities,
    controller::{self, reconcile, Context, Owned},
    runtime,
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

/// A fake API server remembering what was applied: server-side applies are stored (with a
/// managed-fields entry of the operator's field manager) and served back by the StatefulSet
/// list; no shard-map slice is published and no pods exist.
#[derive(Default)]
struct FakeApi {
    applied: std::sync::Mutex<std::collections::BTreeMap<String, Value>>,
    seen: std::sync::Mutex<Vec<String>>,
    status: std::sync::Mutex<Value>,
    /// The shard-map slices the list answers with.
    slices: Vec<Value>,
}

impl FakeApi {
    fn serve(self: Arc<Self>) -> Client {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let path = req.uri().path().to_string();
                let line = format!("{} {path}", req.method());
                self.seen.lock().expect("seen").push(line.clone());
                let applied = |kind: &str| -> Vec<Value> {
                    let a = self.applied.lock().expect("applied");
                    a.values().filter(|v| v["kind"] == kind).cloned().collect()
                };
                let resp = match line.as_str() {
                    "GET /apis/apps/v1/namespaces/shop/statefulsets" => respond(json!({
                        "apiVersion": "apps/v1", "kind": "StatefulSetList", "metadata": {},
                        "items": applied("StatefulSet")})),
                    "GET /api/v1/namespaces/shop/pods" => respond(
                        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
                    ),
                    "GET /apis/shardmesh.io/v1alpha1/namespaces/shop/shardmapslices" => respond(
                        json!({"apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardMapSliceList",
                               "metadata": {}, "items": self.slices}),
                    ),
                    "POST /apis/events.k8s.io/v1/namespaces/shop/events" => {
                        respond(body_json(req).await)
                    }
                    l if l.ends_with("/status") => {
                        let body = body_json(req).await;
                        *self.status.lock().expect("status") = body["status"].clone();
                        respond(json!({
                            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
                            "metadata": {"name": "orders", "namespace": "shop"},
                            "spec": {"shards": 1, "replicasPerShard": 1, "port": 1, "template": {}},
                            "status": body["status"].clone()
                        }))
                    }
                    l if l.starts_with("PATCH ") => {
                        let mut body = body_json(req).await;
                        body["metadata"]["resourceVersion"] = json!("1");
                        body["metadata"]["managedFields"] = json!([{
                            "manager": "shardmesh-operator", "operation": "Apply",
                            "apiVersion": body["apiVersion"].clone(),
                            "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                            "fieldsV1": {"f:metadata": {}, "f:spec": {}}}]);
                        self.applied
                            .lock()
                            .expect("applied")
                            .insert(path, body.clone());
                        respond(body)
                    }
                    other => panic!("unexpected request {other}"),
                };
                send.send_response(resp);
            }
        });
        Client::new(service, "default")
    }

    /// The request lines since the last call.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }

    /// A store of the applied objects of kind `K`, as the operator's metadata watch fills it.
    fn store<K>(&self) -> Store<PartialObjectMeta<K>>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned,
    {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        let kind = K::kind(&()).to_string();
        for v in self.applied.lock().expect("applied").values() {
            if v["kind"] != kind.as_str() {
                continue;
            }
            let mut m: PartialObjectMeta<K> = serde_json::from_value(json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": v["metadata"].clone()}))
            .expect("metadata");
            runtime::trim(&mut m.metadata);
            writer.apply_watcher_event(&watcher::Event::InitApply(m));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        reader
    }

    fn owned(&self) -> Owned {
        Owned {
            services: Some(self.store().into()),
            accounts: Some(self.store().into()),
            roles: Some(self.store().into()),
            bindings: Some(self.store().into()),
            leases: Some(self.store().into()),
            ..Owned::default()
        }
    }
}

fn services_store(svc: &ShardedService) -> Store<ShardedService> {
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitApply(svc.clone()));
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// The happy path: the first reconcile applies every object the service owns (access objects
/// first) and writes the status; a second one over the same state writes nothing at all; an
/// object someone else edited afterwards is applied again, and only that one.
#[tokio::test]
async fn applies_everything_once_then_writes_nothing_until_something_changes() {
    let api = Arc::new(FakeApi::default());
    let client = api.clone().serve();
    let caps = Capabilities {
        version: "1.20".into(),
        pdb: None,
        native_sidecars: false,
    };
    let mut svc = svc(2, 8080);
    let ctx = |svc: &ShardedService, owned: Owned| {
        Arc::new(
            Context::new(client.clone(), caps.clone(), Some("test".into()))
                .with_services(services_store(svc))
                .with_owned(owned),
        )
    };

    // 1. Nothing exists: every object is applied once, the pods' access objects first.
    reconcile(Arc::new(svc.clone()), ctx(&svc, api.owned()))
        .await
        .expect("first reconcile");
    let seen = api.take();
    let applies: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("PATCH "))
        .filter(|p| !p.ends_with("/status"))
        .collect();
    // The access objects go first (the pods run under that ServiceAccount), the RoleBindings
    // after their Roles (the API server refuses a binding to a Role it cannot find); within
    // each batch the applies run together, so their order is not asserted.
    fn sorted<'a>(v: &[&'a str]) -> Vec<&'a str> {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    }
    // Per shard a member account (ServiceAccount, Role, RoleBinding), and the reader Role.
    assert_eq!(applies.len(), 12, "{seen:#?}");
    assert_eq!(
        sorted(&applies[..5]),
        sorted(&[
            "/api/v1/namespaces/shop/serviceaccounts/orders-0-member",
            "/api/v1/namespaces/shop/serviceaccounts/orders-1-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-0-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-1-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-shardmap-reader",
        ]),
        "{seen:#?}"
    );
    assert_eq!(
        sorted(&applies[5..7]),
        sorted(&[
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/orders-0-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/orders-1-member",
        ]),
        "{seen:#?}"
    );
    assert_eq!(
        sorted(&applies),
        sorted(&[
            "/api/v1/namespaces/shop/serviceaccounts/orders-0-member",
            "/api/v1/namespaces/shop/serviceaccounts/orders-1-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-0-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-1-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-shardmap-reader",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/orders-0-member",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/orders-1-member",
            "/apis/apps/v1/namespaces/shop/statefulsets/orders-0",
            "/apis/apps/v1/namespaces/shop/statefulsets/orders-1",
            "/api/v1/namespaces/shop/services/orders-0",
            "/api/v1/namespaces/shop/services/orders-1",
            "/api/v1/namespaces/shop/services/orders",
        ]),
        "{seen:#?}"
    );
    assert!(seen.iter().any(|l| l.ends_with("/orders/status")));
    for v in api.applied.lock().expect("applied").values() {
        assert!(
            v["metadata"]["annotations"][runtime::APPLIED].is_string(),
            "every applied object carries its intent's hash: {v}"
        );
    }

    // 2. The same spec, its objects as the watches deliver them, the status as written, and
    // the token controller having filled the ServiceAccount's `secrets` (a field the operator
    // never sets): a resync reads but writes nothing.
    {
        let mut applied = api.applied.lock().expect("applied");
        let account = applied
            .get_mut("/api/v1/namespaces/shop/serviceaccounts/orders-0-member")
            .expect("service account");
        account["metadata"]["managedFields"]
            .as_array_mut()
            .expect("managed fields")
            .push(
                json!({"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "time": "2026-01-01T00:01:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:secrets": {".": {}, "k:{\"name\":\"orders-token-x\"}": {}}}}),
            );
    }
    svc.status =
        Some(serde_json::from_value(api.status.lock().expect("status").clone()).expect("status"));
    let next = reconcile(Arc::new(svc.clone()), ctx(&svc, api.owned()))
        .await
        .expect("resync");
    let seen = api.take();
    assert!(
        seen.iter().all(|l| l.starts_with("GET ")),
        "a resync of an unchanged service must not write: {seen:#?}"
    );
    // Not Ready (no pod runs here), and still looked at again only after the resync period:
    // its pods, objects and slices are watched.
    let uid = svc.metadata.uid.clone().expect("uid");
    assert_eq!(
        next,
        Action::requeue(controller::resync_after(controller::RESYNC, &uid))
    );

    // 3. Someone edits the routing Service's ports after the operator's apply: that object,
    // and only that one, is applied again.
    {
        let mut applied = api.applied.lock().expect("applied");
        let routing = applied
            .get_mut("/api/v1/namespaces/shop/services/orders")
            .expect("routing service");
        routing["metadata"]["managedFields"]
            .as_array_mut()
            .expect("managed fields")
            .push(
                json!({"manager": "kubectl-edit", "operation": "Update", "apiVersion": "v1",
                "time": "2026-01-01T00:05:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:ports": {}}}}),
            );
    }
    reconcile(Arc::new(svc.clone()), ctx(&svc, api.owned()))
        .await
        .expect("after an edit");
    let writes: Vec<String> = api
        .take()
        .into_iter()
        .filter(|l| !l.starts_with("GET "))
        .collect();
    assert_eq!(writes, ["PATCH /api/v1/namespaces/shop/services/orders"]);

    // 4. A spec change (more replicas) re-applies what it changes: the StatefulSets and the
    // member Roles (each names its shard's pods), nothing else.
    svc.spec.replicas_per_shard = 3;
    svc.metadata.generation = Some(3);
    reconcile(Arc::new(svc.clone()), ctx(&svc, api.owned()))
        .await
        .expect("after a spec change");
    let mut applies: Vec<String> = api
        .take()
        .into_iter()
        .filter(|l| l.starts_with("PATCH ") && !l.ends_with("/status"))
        .collect();
    applies.sort_unstable();
    assert_eq!(
        applies,
        [
            "PATCH /apis/apps/v1/namespaces/shop/statefulsets/orders-0",
            "PATCH /apis/apps/v1/namespaces/shop/statefulsets/orders-1",
            "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-0-member",
            "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/orders-1-member",
        ]
    );
}

/// A shard's slice of the published map under layout `id` (routing by `count`, listing
/// `listed`, handoff window from `previous`).
fn slice(shard: u32, id: i64, count: u32, listed: u32, previous: Option<u32>) -> Value {
    let mut layout = json!({"id": id, "count": count, "listed": listed,
                            "shardKey": "x-shard-key", "handoffMiss": "404"});
    if let Some(p) = previous {
        layout["previous"] = json!({"count": p, "until": "2026-01-01T00:01:00Z"});
    }
    json!({
        "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardMapSlice",
        "metadata": {"name": format!("orders-{shard}"), "namespace": "shop",
            "labels": {"shardmesh.io/service": "orders", "shardmesh.io/shard": shard.to_string()},
            "ownerReferences": [{"apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
                "name": "orders", "uid": "uid-orders", "controller": true}]},
        "spec": {"epoch": id, "layout": layout, "shard": {"index": shard, "members": []}}
    })
}

/// Shrinking 4 -> 3: the reconcile that runs while the shard-map controller is writing the new
/// layout (slices 0-2 already route by 3, slice 3 still carries the settled 4-shard layout, so
/// no layout is complete) must keep shard 3's workloads, which serve handoff reads through the
/// window, and leave the status as it was until the slices agree.
#[tokio::test]
async fn a_half_written_layout_removes_no_shard() {
    let mut slices: Vec<Value> = (0..3).map(|i| slice(i, 6, 3, 4, Some(4))).collect();
    slices.push(slice(3, 4, 4, 4, None));
    let api = Arc::new(FakeApi {
        slices,
        ..FakeApi::default()
    });
    for i in 0..4 {
        api.applied.lock().expect("applied").insert(
            format!("/apis/apps/v1/namespaces/shop/statefulsets/orders-{i}"),
            sts(i),
        );
    }
    let client = api.clone().serve();
    let caps = Capabilities {
        version: "1.20".into(),
        pdb: None,
        native_sidecars: false,
    };
    let mut svc = svc(3, 8080);
    svc.spec.rollout.allow_shard_removal = true;
    let ctx = Arc::new(
        Context::new(client, caps, Some("test".into()))
            .with_services(services_store(&svc))
            .with_owned(api.owned()),
    );
    let next = reconcile(Arc::new(svc), ctx)
        .await
        .expect("reconcile succeeds");
    let seen = api.take();
    assert!(
        seen.iter().all(|l| !l.starts_with("DELETE")),
        "nothing deleted: shard 3 keeps its StatefulSet: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l.ends_with("/status")),
        "the status waits for a complete layout: {seen:#?}"
    );
    assert_eq!(next, Action::requeue(std::time::Duration::from_secs(2)));
}

/// One slice written by hand (or by a broken client) that lists 1,024 shards creates nothing:
/// slices only keep workloads from being deleted; what is built comes from a complete map and
/// the spec.
#[tokio::test]
async fn a_forged_slice_listing_many_shards_creates_nothing() {
    let api = Arc::new(FakeApi {
        slices: vec![slice(0, 99, 1024, 1024, None)],
        ..FakeApi::default()
    });
    let client = api.clone().serve();
    let caps = Capabilities {
        version: "1.20".into(),
        pdb: None,
        native_sidecars: false,
    };
    let svc = svc(2, 8080);
    let ctx = Arc::new(
        Context::new(client, caps, Some("test".into()))
            .with_services(services_store(&svc))
            .with_owned(api.owned()),
    );
    reconcile(Arc::new(svc), ctx)
        .await
        .expect("reconcile succeeds");
    let sets: Vec<String> = api
        .take()
        .into_iter()
        .filter(|l| l.starts_with("PATCH") && l.contains("/statefulsets/"))
        .collect();
    assert_eq!(
        sets,
        [
            "PATCH /apis/apps/v1/namespaces/shop/statefulsets/orders-0",
            "PATCH /apis/apps/v1/namespaces/shop/statefulsets/orders-1"
        ]
    );
}
