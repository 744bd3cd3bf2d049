//! Admission scenarios on the real cluster: sidecar injection (labelled Deployment, unlabelled
//! pod, ShardedService pods), re-invocation, webhook pod restarts, certificate rotation, and
//! ShardedServices rejected at apply time with the field named.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        apps::v1::Deployment,
        core::v1::{Namespace, Pod, Secret, Service},
    },
    jiff::Timestamp,
    ByteString,
};
use kube::{
    api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams},
    core::{
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
        DynamicObject,
    },
    Api, Client, ResourceExt,
};
use serde_json::{json, Value};
use shardmesh_api::ShardedService;
use shardmesh_e2e::*;
use shardmesh_operator::webhook::{
    server::{self, Handler},
    tls::{self, CertResolver},
    HandleError,
};

const WEBHOOK: &str = "shardmesh-webhook";
const TLS_SECRET: &str = "shardmesh-webhook-tls";
const MUTATING: &str = "shardmesh-sidecar-injector";
const VALIDATING: &str = "shardmesh-validator";
const SIDECAR: &str = "shardmesh-sidecar";

/// A demo-app pod with `labels`; the demo app needs its shard identity outside a ShardedService.
fn demo_pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "app", "image": DEMO_IMAGE, "imagePullPolicy": "IfNotPresent",
                "env": [{"name": "SHARDMESH_SHARD", "value": "0"}, {"name": "SHARDMESH_SHARDS", "value": "1"}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1}
            }]
        }
    })
}

fn names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect()
}

fn ready_containers(pod: &Pod) -> (usize, usize) {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    (
        statuses.iter().filter(|c| c.ready).count(),
        pod.spec.as_ref().map_or(0, |s| s.containers.len()),
    )
}

/// Creates `pod` server-side with dryRun: the admission chain runs (webhooks with
/// sideEffects None are called) and the mutated pod comes back, nothing is stored.
async fn dry_run_create(api: &Api<Pod>, pod: &Value) -> kube::Result<Pod> {
    let pod: Pod = serde_json::from_value(pod.clone()).expect("pod literal");
    api.create(
        &PostParams {
            dry_run: true,
            ..PostParams::default()
        },
        &pod,
    )
    .await
}

async fn webhook_available(client: &Client) {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    wait_obj(
        &deploys,
        WEBHOOK,
        "webhook Deployment has all replicas available",
        |d| {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let st = d.status.clone().unwrap_or_default();
            want >= 2
                && st.available_replicas.unwrap_or(0) >= want
                && st.updated_replicas.unwrap_or(0) >= want
                && st.replicas.unwrap_or(0) == want
        },
        |d| format!("{:?}", d.status),
    )
    .await;
}

fn sidecar_of(pod: &Pod) -> k8s_openapi::api::core::v1::Container {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == SIDECAR).cloned())
        .unwrap_or_else(|| panic!("no sidecar in {}: {:?}", pod.name_any(), names(pod)))
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn labelled_workloads_run_with_the_sidecar_and_others_are_untouched() {
    let client = client().await;
    webhook_available(&client).await;
    let ns = TestNamespace::create(&client, "inject").await;
    let pods: Api<Pod> = ns.api();

    // A labelled Deployment: every pod gets the sidecar and becomes 2/2 Ready.
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": demo_pod("unused", json!({"app": "web", "shardmesh.io/inject": "enabled"}))
        }
    }))
    .expect("deployment literal");
    ns.api::<Deployment>()
        .create(&PostParams::default(), &deploy)
        .await
        .expect("create Deployment");
    let ready = wait_for("labelled Deployment pods 2/2 Ready", WAIT, || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await?;
        let summary: Vec<_> = list
            .items
            .iter()
            .map(|p| (p.name_any(), names(p), ready_containers(p)))
            .collect();
        let ok = list.items.len() == 2 && list.items.iter().all(|p| ready_containers(p) == (2, 2));
        if ok {
            Ok(Some(list.items))
        } else {
            Err(anyhow::anyhow!("{summary:?}"))
        }
    })
    .await;
    for p in &ready {
        assert_eq!(names(p), vec!["app", SIDECAR], "{}", p.name_any());
        let s = sidecar_of(p);
        let sc = s.security_context.clone().expect("securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.expect("capabilities");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(caps.add, None);
        // 1.20: a regular container, never a native sidecar (the field would be dropped).
        assert_eq!(s.restart_policy, None);
        // The only init container installs the preStop helper, and the app waits for the
        // sidecar's inbound drain before its SIGTERM.
        let spec = p.spec.as_ref().expect("spec");
        let init: Vec<_> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.restart_policy.as_deref()))
            .collect();
        assert_eq!(init, vec![("shardmesh-hook", None)]);
        let prestop = spec.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
            .unwrap_or_default();
        assert_eq!(
            prestop.get(..2),
            Some(
                &[
                    "/var/run/shardmesh/shardmesh-hook".to_string(),
                    "wait-drained".into()
                ][..]
            )
        );
        let version = p
            .annotations()
            .get("shardmesh.io/injected-version")
            .cloned();
        assert!(
            version.is_some_and(|v| !v.is_empty()),
            "injected-version annotation"
        );
        let env: BTreeMap<_, _> = s
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        assert_eq!(env.get("SHARDMESH_APP_PORT"), Some(&Some("8080".into())));
        assert!(env.contains_key("POD_NAME") && env.contains_key("POD_IP"));
    }
    eprintln!("[e2e] labelled Deployment: 2 pods 2/2 Ready with the sidecar");

    // An unlabelled pod in the same namespace: untouched.
    let plain: Pod =
        serde_json::from_value(demo_pod("plain", json!({"app": "plain"}))).expect("pod");
    pods.create(&PostParams::default(), &plain)
        .await
        .expect("create plain pod");
    let plain = wait_obj(
        &pods,
        "plain",
        "unlabelled pod 1/1 Ready",
        |p| ready_containers(p) == (1, 1),
        |p| format!("{:?}", names(p)),
    )
    .await;
    assert_eq!(names(&plain), vec!["app"]);
    assert!(!plain
        .annotations()
        .contains_key("shardmesh.io/injected-version"));

    // An opted-out pod: untouched, though labelled.
    let mut out = demo_pod("opted-out", json!({"shardmesh.io/inject": "enabled"}));
    out["metadata"]["annotations"] = json!({"shardmesh.io/inject": "disabled"});
    let out = dry_run_create(&pods, &out)
        .await
        .expect("opted-out pod admitted");
    assert_eq!(names(&out), vec!["app"]);

    // A ShardedService's pods get the sidecar with the app port and the policy, and its
    // Services target the sidecar's inbound port.
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &demo_service("orders", 1, 1))
        .await
        .expect("apply ShardedService");
    let pod = wait_obj(
        &pods,
        "orders-0-0",
        "ShardedService pod 2/2 Ready",
        |p| ready_containers(p) == (2, 2),
        |p| format!("{:?} {:?}", names(p), ready_containers(p)),
    )
    .await;
    let env: BTreeMap<_, _> = sidecar_of(&pod)
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["SHARDMESH_APP_PORT"], "8080");
    assert!(env["SHARDMESH_POLICY"].contains("maxAttempts"), "{env:?}");
    let routing = ns
        .api::<Service>()
        .get("orders")
        .await
        .expect("routing Service");
    let port = &routing.spec.and_then(|s| s.ports).expect("ports")[0];
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4143))
    );
    ns.delete().await;
}

/// A second mutating webhook, called after the injector (configurations run in name order),
/// that adds a label: the API server then re-invokes the injector (reinvocationPolicy
/// IfNeeded), which must add nothing.
struct Relabel {
    calls: AtomicUsize,
}

impl Handler for Relabel {
    fn handle(&self, _path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(|e| HandleError::BadRequest(e.to_string()))?;
        let req: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| HandleError::BadRequest("no request".into()))?;
        let touched = req
            .object
            .as_ref()
            .is_some_and(|o| o.labels().contains_key("e2e.shardmesh.io/touched"));
        let resp = AdmissionResponse::from(&req);
        let resp = if touched {
            resp
        } else {
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "add", "path": "/metadata/labels/e2e.shardmesh.io~1touched", "value": "true"}
            ]))
            .map_err(|e| HandleError::BadRequest(e.to_string()))?;
            resp.with_patch(patch)
                .map_err(|e| HandleError::BadRequest(e.to_string()))?
        };
        serde_json::to_vec(&resp.into_review()).map_err(|e| HandleError::BadRequest(e.to_string()))
    }
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn reinvocation_adds_nothing() {
    let client = client().await;
    webhook_available(&client).await;
    let ns = TestNamespace::create(&client, "reinvoke").await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"e2e.shardmesh.io/relabel": ns.name}}})),
        )
        .await
        .expect("label namespace");

    // Serve the relabelling webhook from this process (the test runs in the cluster's network
    // namespace, where the API server can reach 127.0.0.1).
    let now = Timestamp::now();
    let ca = tls::issue_ca(now, Duration::from_secs(3600)).expect("CA");
    let cert = tls::issue_cert(
        &ca,
        &["127.0.0.1".to_string()],
        now,
        Duration::from_secs(3600),
    )
    .expect("cert");
    let resolver = Arc::new(CertResolver::default());
    resolver
        .set(&cert.cert_pem, &cert.key_pem)
        .expect("load cert");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let relabel = Arc::new(Relabel {
        calls: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        server::tls_config(resolver).expect("tls config"),
        relabel.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let cfg_name = format!("zz-e2e-relabel-{}", ns.name);
    let cfg: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": cfg_name},
        "webhooks": [{
            "name": "relabel.e2e.shardmesh.io",
            "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5, "reinvocationPolicy": "Never",
            "clientConfig": {"url": format!("https://{addr}/relabel"), "caBundle": ByteString(ca.cert_pem.clone().into_bytes())},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"e2e.shardmesh.io/relabel": ns.name}}
        }]
    }))
    .expect("configuration literal");
    let cfgs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    cfgs.create(&PostParams::default(), &cfg)
        .await
        .expect("create relabel webhook");

    let pods: Api<Pod> = ns.api();
    let pod = demo_pod("twice", json!({"shardmesh.io/inject": "enabled"}));
    // The configuration takes effect asynchronously in the API server: retry until relabelled.
    let created = wait_for(
        "pod admitted through both webhooks",
        Duration::from_secs(60),
        || async {
            let p = dry_run_create(&pods, &pod).await?;
            if p.labels().contains_key("e2e.shardmesh.io/touched") {
                Ok(Some(p))
            } else {
                Err(anyhow::anyhow!("not relabelled yet: {:?}", p.labels()))
            }
        },
    )
    .await;
    assert_eq!(names(&created), vec!["app", SIDECAR], "exactly one sidecar");
    // Now for real, and check the injector logged the re-invocation of this very pod.
    let stored = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod.clone()).expect("pod"),
        )
        .await
        .expect("create pod through both webhooks");
    assert_eq!(names(&stored), vec!["app", SIDECAR]);
    assert_eq!(
        stored
            .labels()
            .get("e2e.shardmesh.io/touched")
            .map(String::as_str),
        Some("true")
    );
    let webhook_pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    wait_for(
        "injector logged the re-invocation as a no-op",
        Duration::from_secs(30),
        || async {
            let list = webhook_pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=webhook"))
                .await?;
            for p in &list.items {
                let logs = webhook_pods
                    .logs(
                        &p.name_any(),
                        &LogParams {
                            since_seconds: Some(300),
                            ..LogParams::default()
                        },
                    )
                    .await?;
                if logs.lines().any(|l| {
                    l.contains(&ns.name)
                        && l.contains("twice")
                        && l.contains("sidecar already present")
                }) {
                    return Ok(Some(()));
                }
            }
            Err(anyhow::anyhow!(
                "no 'sidecar already present' line for {}/twice",
                ns.name
            ))
        },
    )
    .await;
    eprintln!(
        "[e2e] re-invoked injector added nothing; relabel webhook calls: {}",
        relabel.calls.load(Ordering::SeqCst)
    );
    cfgs.delete(&cfg_name, &DeleteParams::default())
        .await
        .expect("delete relabel webhook");
    let _ = stop_tx.send(());
    let _ = server.await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn webhook_survives_pod_restarts() {
    let client = client().await;
    webhook_available(&client).await;
    let ns = TestNamespace::create(&client, "restart").await;
    let pods: Api<Pod> = ns.api();
    let webhook_pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let selector = ListParams::default().labels("app.kubernetes.io/component=webhook");
    let pod = demo_pod("probe", json!({"shardmesh.io/inject": "enabled"}));

    // One replica goes away: the other keeps answering (and the leaving one drains).
    let first = webhook_pods
        .list(&selector)
        .await
        .expect("list webhook pods")
        .items;
    let victim = first.first().expect("a webhook pod").name_any();
    webhook_pods
        .delete(&victim, &DeleteParams::default())
        .await
        .expect("delete one webhook pod");
    let mut failures = Vec::new();
    for i in 0..30 {
        match dry_run_create(&pods, &pod).await {
            Ok(p) if names(&p).contains(&SIDECAR.to_string()) => {}
            Ok(p) => failures.push(format!("#{i}: not injected: {:?}", names(&p))),
            Err(e) => failures.push(format!("#{i}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        failures.is_empty(),
        "admissions failed while one replica restarted: {failures:?}"
    );
    webhook_available(&client).await;

    // Every replica replaced: once available again, injection works (same Secret, same CA).
    let secret_before = Api::<Secret>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .get(TLS_SECRET)
        .await
        .expect("TLS Secret");
    for p in webhook_pods.list(&selector).await.expect("list").items {
        webhook_pods
            .delete(&p.name_any(), &DeleteParams::default())
            .await
            .expect("delete webhook pod");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    webhook_available(&client).await;
    let p = wait_for(
        "injection after all webhook pods restarted",
        Duration::from_secs(60),
        || async { Ok(Some(dry_run_create(&pods, &pod).await?)) },
    )
    .await;
    assert_eq!(names(&p), vec!["app", SIDECAR]);
    let secret_after = Api::<Secret>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .get(TLS_SECRET)
        .await
        .expect("TLS Secret");
    assert_eq!(
        secret_before.data.as_ref().and_then(|d| d.get("ca.crt")),
        secret_after.data.as_ref().and_then(|d| d.get("ca.crt")),
        "restarted replicas adopt the existing CA instead of making a new one"
    );
    ns.delete().await;
}

fn data(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

fn bundles_contain(
    m: &MutatingWebhookConfiguration,
    v: &ValidatingWebhookConfiguration,
    pem: &str,
) -> bool {
    let has = |b: &Option<ByteString>| {
        b.as_ref()
            .is_some_and(|b| String::from_utf8_lossy(&b.0).contains(pem.trim()))
    };
    m.webhooks
        .iter()
        .flatten()
        .all(|w| has(&w.client_config.ca_bundle))
        && v.webhooks
            .iter()
            .flatten()
            .all(|w| has(&w.client_config.ca_bundle))
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn rotated_certificate_keeps_admissions_working() {
    let client = client().await;
    webhook_available(&client).await;
    let ns = TestNamespace::create(&client, "rotate").await;
    let pods: Api<Pod> = ns.api();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let before = secrets.get(TLS_SECRET).await.expect("TLS Secret");
    let (old_ca, old_cert) = (data(&before, "ca.crt"), data(&before, "tls.crt"));
    assert!(old_ca.contains("BEGIN CERTIFICATE") && old_cert.contains("BEGIN CERTIFICATE"));

    // Pretend both the CA and the serving certificate are about to expire.
    secrets
        .patch(
            TLS_SECRET,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "shardmesh.io/cert-not-after": "2000-01-01T00:00:00Z",
                "shardmesh.io/ca-not-after": "2000-01-01T00:00:00Z"
            }}})),
        )
        .await
        .expect("expire the certificates");

    // Keep admitting pods all along: the two-phase CA rotation must never break a call.
    let pod = demo_pod("probe", json!({"shardmesh.io/inject": "enabled"}));
    let (mut ok, mut failures) = (0usize, Vec::new());
    let start = tokio::time::Instant::now();
    let mut rotated_at = None;
    while start.elapsed() < Duration::from_secs(180) {
        match dry_run_create(&pods, &pod).await {
            Ok(p) if names(&p).contains(&SIDECAR.to_string()) => ok += 1,
            Ok(p) => failures.push(format!("not injected: {:?}", names(&p))),
            Err(e) => failures.push(e.to_string()),
        }
        if rotated_at.is_none() {
            let s = secrets.get(TLS_SECRET).await.expect("TLS Secret");
            let (ca, cert) = (data(&s, "ca.crt"), data(&s, "tls.crt"));
            let (m, v) = (
                mutating.get(MUTATING).await.expect("mutating"),
                validating.get(VALIDATING).await.expect("validating"),
            );
            if ca != old_ca
                && cert != old_cert
                && bundles_contain(&m, &v, &ca)
                && bundles_contain(&m, &v, &old_ca)
            {
                eprintln!(
                    "[e2e] CA and serving certificate rotated after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                rotated_at = Some(tokio::time::Instant::now());
            }
        } else if rotated_at.is_some_and(|t| t.elapsed() > Duration::from_secs(25)) {
            // Two resync periods: every replica has reloaded the new certificate.
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        rotated_at.is_some(),
        "the certificates were not rotated within 180s"
    );
    assert!(
        failures.is_empty(),
        "admissions failed during rotation ({ok} ok): {failures:?}"
    );
    // Admissions through the validating webhook too.
    let svcs: Api<ShardedService> = ns.api();
    let mut bad = demo_service("bad", 1, 1);
    bad["spec"]["port"] = json!(4191);
    let msg = apply_service(&svcs, &bad)
        .await
        .expect_err("refused after rotation")
        .to_string();
    assert!(msg.contains("spec.port"), "{msg}");
    eprintln!("[e2e] {ok} pod admissions during rotation, none failed");
    ns.delete().await;
}

fn merge(dst: &mut Value, patch: &Value) {
    match (dst, patch) {
        (Value::Object(d), Value::Object(p)) => {
            for (k, v) in p {
                // null removes the key (a template without a spec).
                if v.is_null() {
                    d.remove(k);
                } else {
                    merge(d.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (d, p) => *d = p.clone(),
    }
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn invalid_sharded_services_are_rejected_at_apply() {
    let client = client().await;
    webhook_available(&client).await;
    let ns = TestNamespace::create(&client, "validate").await;
    let svcs: Api<ShardedService> = ns.api();
    let ctr = |extra: Value| {
        let mut c = json!({"name": "app", "image": DEMO_IMAGE});
        merge(&mut c, &extra);
        c
    };
    // (what, patch of the demo ShardedService, field the message must name). Each is accepted by
    // the CRD schema and refused by the validating webhook.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "app on the sidecar inbound port",
            json!({"spec": {"port": 4143}}),
            "spec.port",
        ),
        (
            "app on the sidecar outbound port",
            json!({"spec": {"port": 4140}}),
            "spec.port",
        ),
        (
            "app on the sidecar admin port",
            json!({"spec": {"port": 4191}}),
            "spec.port",
        ),
        (
            "template without spec",
            json!({"spec": {"template": {"spec": null}}}),
            "spec.template.spec",
        ),
        (
            "no containers",
            json!({"spec": {"template": {"spec": {"containers": []}}}}),
            "spec.template.spec.containers",
        ),
        (
            "container named like the sidecar",
            json!({"spec": {"template": {"spec": {"containers": [ctr(json!({"name": SIDECAR}))]}}}}),
            "spec.template.spec.containers[0].name",
        ),
        (
            "duplicate container names",
            json!({"spec": {"template": {"spec": {"containers": [ctr(json!({})), ctr(json!({}))]}}}}),
            "spec.template.spec.containers[1].name",
        ),
        (
            "container without image",
            json!({"spec": {"template": {"spec": {"containers": [{"name": "app"}]}}}}),
            "spec.template.spec.containers[0].image",
        ),
        (
            "container port = sidecar admin",
            json!({"spec": {"template": {"spec": {"containers": [ctr(json!({"ports": [{"containerPort": 4191}]}))]}}}}),
            "spec.template.spec.containers[0].ports[0].containerPort",
        ),
        (
            "second container on the inbound port",
            json!({"spec": {"template": {"spec": {"containers": [ctr(json!({})), ctr(json!({"name": "side", "ports": [{"containerPort": 8081}, {"containerPort": 4143}]}))]}}}}),
            "spec.template.spec.containers[1].ports[1].containerPort",
        ),
        (
            "template sets the service label",
            json!({"spec": {"template": {"metadata": {"labels": {"shardmesh.io/service": "x"}}}}}),
            "spec.template.metadata.labels[shardmesh.io/service]",
        ),
        (
            "template sets the shard label",
            json!({"spec": {"template": {"metadata": {"labels": {"shardmesh.io/shard": "0"}}}}}),
            "spec.template.metadata.labels[shardmesh.io/shard]",
        ),
        (
            "restartPolicy Never",
            json!({"spec": {"template": {"spec": {"restartPolicy": "Never"}}}}),
            "spec.template.spec.restartPolicy",
        ),
        (
            "hostNetwork",
            json!({"spec": {"template": {"spec": {"hostNetwork": true}}}}),
            "spec.template.spec.hostNetwork",
        ),
        (
            "sidecar opted out",
            json!({"spec": {"template": {"metadata": {"annotations": {"shardmesh.io/inject": "disabled"}}}}}),
            "spec.template.metadata.annotations[shardmesh.io/inject]",
        ),
        (
            "zero per-try timeout",
            json!({"spec": {"resilience": {"timeouts": {"perTry": "0s"}}}}),
            "spec.resilience.timeouts.perTry",
        ),
        (
            "connect timeout over 1m",
            json!({"spec": {"resilience": {"timeouts": {"connect": "2m"}}}}),
            "spec.resilience.timeouts.connect",
        ),
        (
            "deadline below per-try",
            json!({"spec": {"resilience": {"timeouts": {"perTry": "20s", "overall": "5s"}}}}),
            "spec.resilience.timeouts.overall",
        ),
        (
            "deadline over 10m",
            json!({"spec": {"resilience": {"timeouts": {"overall": "11m"}}}}),
            "spec.resilience.timeouts.overall",
        ),
        (
            "maxBackoff below baseBackoff",
            json!({"spec": {"resilience": {"retries": {"baseBackoff": "2s", "maxBackoff": "1s"}}}}),
            "spec.resilience.retries.maxBackoff",
        ),
        (
            "retryOn listed twice",
            json!({"spec": {"resilience": {"retries": {"retryOn": ["503", "503"]}}}}),
            "spec.resilience.retries.retryOn[1]",
        ),
        (
            "breaker window under 1s",
            json!({"spec": {"resilience": {"circuitBreaker": {"window": "500ms"}}}}),
            "spec.resilience.circuitBreaker.window",
        ),
        (
            "maxOpenDuration below openDuration",
            json!({"spec": {"resilience": {"circuitBreaker": {"openDuration": "2m", "maxOpenDuration": "1m"}}}}),
            "spec.resilience.circuitBreaker.maxOpenDuration",
        ),
        (
            "name not a DNS-1035 label",
            json!({"metadata": {"name": "orders.v2"}}),
            "metadata.name",
        ),
        (
            "name too long for shard objects",
            json!({"metadata": {"name": "o".repeat(60)}}),
            "metadata.name",
        ),
    ];
    assert!(cases.len() >= 20);
    let count = cases.len();
    for (what, patch, field) in cases {
        let mut body = demo_service("bad", 2, 1);
        merge(&mut body, &patch);
        let msg = apply_service(&svcs, &body)
            .await
            .map(|s| s.name_any())
            .expect_err(what)
            .to_string();
        assert!(
            msg.contains("shardedservices.validate.shardmesh.io"),
            "{what}: not refused by the webhook: {msg}"
        );
        assert!(
            msg.contains(field),
            "{what}: message should name {field}: {msg}"
        );
        eprintln!("[e2e] {what}: {msg}");
    }

    // An update lowering the shard count without the override.
    apply_service(&svcs, &demo_service("shrink", 2, 1))
        .await
        .expect("valid ShardedService accepted");
    let msg = apply_service(&svcs, &demo_service("shrink", 1, 1))
        .await
        .expect_err("shard decrease refused")
        .to_string();
    assert!(
        msg.contains("spec.shards") && msg.contains("allowShardRemoval"),
        "{msg}"
    );
    eprintln!("[e2e] shard decrease: {msg}");
    let mut ok = demo_service("shrink", 1, 1);
    ok["spec"]["rollout"] = json!({"allowShardRemoval": true});
    apply_service(&svcs, &ok)
        .await
        .expect("shard decrease with the override accepted");
    eprintln!(
        "[e2e] {} invalid ShardedServices refused at apply",
        count + 1
    );
    ns.delete().await;
}
