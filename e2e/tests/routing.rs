//! Registry membership and shard routing on the real cluster: sidecars register their pods with
//! Leases, the operator publishes the shard map, a client pod's sidecar routes keyed requests to
//! the owning shard (the demo app answers 421 to any key of another shard, so a routing mistake
//! is visible), and a deleted pod leaves the map at once and rejoins when recreated.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    authorization::v1::SubjectAccessReview,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, ServiceAccount},
    rbac::v1::RoleBinding,
};
use kube::{
    api::{DeleteParams, ListParams, PostParams},
    Api, ResourceExt,
};
use serde_json::json;
use shardmesh_api::{labels, shardmap::ShardMap, ShardedService};
use shardmesh_e2e::{apply_service, client, demo_service, wait_for, TestNamespace, WAIT};

const SIDECAR_IMAGE: &str = "shardmesh.local/sidecar:dev";
const SHARDS: usize = 4;
const REPLICAS: usize = 2;
const REQUESTS: usize = 2000;

type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Whether the chart's injector is installed (then it adds the sidecar to the demo pods; a
/// container of our own would be a second sidecar on the same ports).
async fn injection_installed(client: &kube::Client) -> bool {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items.iter().any(|c| {
                c.webhooks
                    .iter()
                    .flatten()
                    .any(|w| w.name.ends_with("inject.shardmesh.io"))
            })
        })
        .unwrap_or(false)
}

async fn shard_map(api: &Api<ConfigMap>, name: &str) -> anyhow::Result<ShardMap> {
    let cm = api.get(&labels::shardmap_name(name)).await?;
    let json = cm
        .data
        .as_ref()
        .and_then(|d| d.get(labels::SHARDMAP_KEY))
        .ok_or_else(|| anyhow::anyhow!("no {} in the ConfigMap", labels::SHARDMAP_KEY))?;
    Ok(serde_json::from_str(json)?)
}

fn members(m: &ShardMap) -> BTreeSet<String> {
    m.shards
        .iter()
        .flat_map(|s| s.members.iter().map(|m| m.pod.clone()))
        .collect()
}

/// One keyed PUT through the client sidecar: (status, shard header of the answering pod).
async fn put(http: &Http, proxy: SocketAddr, ns: &str, key: &str) -> anyhow::Result<(u16, String)> {
    let req = http::Request::put(format!("http://{proxy}/kv/{key}"))
        .header(http::header::HOST, format!("demo.{ns}:8080"))
        .header("x-shard-key", key)
        .body(Full::new(Bytes::from_static(b"v")))?;
    let resp = tokio::time::timeout(Duration::from_secs(15), http.request(req)).await??;
    let status = resp.status().as_u16();
    let shard = resp
        .headers()
        .get("x-demo-shard")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let _ = resp.into_body().collect().await?;
    Ok((status, shard))
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn keyed_requests_reach_their_shard_and_membership_follows_pods() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "routing").await;
    let injected = injection_installed(&client).await;
    eprintln!("[e2e] sidecar injection installed: {injected}");

    // 1. A 4x2 demo service whose pods run the sidecar.
    let mut body = demo_service("demo", SHARDS as i32, REPLICAS as i32);
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20);
    if !injected {
        let containers = body["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .expect("containers");
        // The operator adds the pod identity (service, shard, POD_*) to every container.
        containers.push(json!({
            "name": "sidecar",
            "image": SIDECAR_IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "args": ["--app-port", "8080", "--drain-delay", "3s"],
        }));
    }
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply demo");
    let cms: Api<ConfigMap> = ns.api();
    let leases: Api<Lease> = ns.api();
    let t0 = Instant::now();
    let map = wait_for("shard map lists all 8 members", WAIT, || async {
        let m = shard_map(&cms, "demo").await?;
        let n = members(&m).len();
        if n == SHARDS * REPLICAS && m.shards.iter().all(|s| s.members.len() == REPLICAS) {
            Ok(Some(m))
        } else {
            Err(anyhow::anyhow!(
                "epoch {} members {:?}",
                m.epoch,
                members(&m)
            ))
        }
    })
    .await;
    eprintln!(
        "[e2e] 8 members after {:.1}s, epoch {}",
        t0.elapsed().as_secs_f64(),
        map.epoch
    );
    let lease_names: BTreeSet<String> = leases
        .list(&ListParams::default().labels(&labels::service_selector_string("demo")))
        .await
        .expect("leases")
        .items
        .iter()
        .map(|l| l.name_any())
        .collect();
    assert_eq!(lease_names, members(&map), "one Lease per member");

    // 2. A client pod: only a sidecar following the shard map, its outbound port open to the
    //    test (which runs in the cluster's network namespace).
    let sas: Api<ServiceAccount> = ns.api();
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "client"}})).expect("sa"),
    )
    .await
    .expect("client sa");
    let rbs: Api<RoleBinding> = ns.api();
    rbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "client-reads-demo"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": labels::shardmap_reader_name("demo")},
            "subjects": [{"kind": "ServiceAccount", "name": "client", "namespace": ns.name}],
        }))
        .expect("rb"),
    )
    .await
    .expect("client rolebinding");
    let pods: Api<Pod> = ns.api();
    let client_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "client"},
        "spec": {
            "serviceAccountName": "client",
            "containers": [{
                "name": "client",
                "image": SIDECAR_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "args": ["--outbound-addr", "0.0.0.0:4140", "--passthrough", "false",
                         "--shardmap", format!("demo=demo.{}:8080", ns.name),
                         "--access-log-sample", "0"],
                "env": [{"name": "POD_NAMESPACE",
                         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 4191}, "periodSeconds": 1},
            }],
        },
    }))
    .expect("client pod");
    // Refused until the token controller has issued the new account's token (1.20).
    wait_for("client pod created", WAIT, || async {
        Ok(pods
            .create(&PostParams::default(), &client_pod)
            .await
            .map(|_| ())
            .ok())
    })
    .await;
    let ip = wait_for("client pod ready", WAIT, || async {
        let p = pods.get("client").await?;
        let st = p.status.unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(st.pod_ip.filter(|_| ready))
    })
    .await;
    let proxy: SocketAddr = format!("{ip}:4140").parse().expect("client address");
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    // The client may have started before it saw the map: wait for the first routed success.
    wait_for("client sidecar routes a request", WAIT, || async {
        let (status, _) = put(&http, proxy, &ns.name, "probe").await?;
        Ok((status < 300).then_some(()))
    })
    .await;

    // 3. 2,000 keyed requests: no misrouted key, every shard served.
    let t1 = Instant::now();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        let (status, shard) = put(&http, proxy, &ns.name, &format!("key-{i}"))
            .await
            .unwrap_or((0, "-".into()));
        *statuses.entry(status).or_default() += 1;
        *per_shard.entry(shard).or_default() += 1;
    }
    eprintln!(
        "[e2e] {REQUESTS} requests in {:.1}s: statuses {statuses:?}, per shard {per_shard:?}",
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(statuses.get(&421), None, "misrouted keys: {statuses:?}");
    assert!(
        statuses.keys().all(|s| (200..300).contains(s)),
        "every request must succeed: {statuses:?}"
    );
    assert_eq!(
        per_shard.keys().filter(|s| *s != "-").count(),
        SHARDS,
        "{per_shard:?}"
    );

    // 4. Delete a pod under load: its Lease goes at once (graceful drain), the epoch
    //    increments, requests keep succeeding, the recreated pod rejoins.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let load = {
        let (stop, sent, failures, http, nsn) = (
            stop.clone(),
            sent.clone(),
            failures.clone(),
            http.clone(),
            ns.name.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let status = put(&http, proxy, &nsn, &format!("churn-{i}"))
                    .await
                    .map_or(0, |r| r.0);
                sent.fetch_add(1, Ordering::Relaxed);
                if !(200..300).contains(&status) {
                    *failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(status)
                        .or_default() += 1;
                }
                i += 1;
            }
        })
    };
    let victim = "demo-1-0";
    let old_uid = pods.get(victim).await.expect("victim").uid();
    let before = shard_map(&cms, "demo").await.expect("map").epoch;
    let t2 = Instant::now();
    pods.delete(victim, &DeleteParams::default())
        .await
        .expect("delete victim");
    wait_for(
        "victim's Lease is gone",
        Duration::from_secs(40),
        || async { Ok(leases.get_opt(victim).await?.is_none().then_some(())) },
    )
    .await;
    let lease_gone = t2.elapsed();
    let after = wait_for(
        "shard map drops the victim",
        Duration::from_secs(40),
        || async {
            let m = shard_map(&cms, "demo").await?;
            Ok((!members(&m).contains(victim)).then_some(m))
        },
    )
    .await;
    let map_dropped = t2.elapsed();
    assert!(after.epoch > before, "epoch {before} -> {}", after.epoch);
    let rejoined = wait_for("recreated pod rejoins the map", WAIT, || async {
        let p = pods.get(victim).await?;
        if p.uid() == old_uid {
            return Ok(None);
        }
        let m = shard_map(&cms, "demo").await?;
        Ok((members(&m).len() == SHARDS * REPLICAS).then_some(m))
    })
    .await;
    let rejoin = t2.elapsed();
    // Keep the load on a little after the rejoin: new members must be routable at once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    let failed = failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!(
        "[e2e] pod deletion: lease gone after {:.1}s, map epoch {before} -> {} after {:.1}s, \
         rejoined at epoch {} after {:.1}s; {} requests during churn, failures {failed:?}",
        lease_gone.as_secs_f64(),
        after.epoch,
        map_dropped.as_secs_f64(),
        rejoined.epoch,
        rejoin.as_secs_f64(),
        sent.load(Ordering::Relaxed),
    );
    assert!(rejoined.epoch > after.epoch);
    assert!(
        failed.is_empty(),
        "requests failed while a pod left and rejoined: {failed:?}"
    );
    ns.delete().await;
}

/// Whether `user` may `verb` `resource`/`name` in `ns`, asked of the API server's authorizer.
async fn allowed(
    client: &kube::Client,
    user: &str,
    ns: &str,
    (group, resource): (&str, &str),
    verb: &str,
    name: Option<&str>,
) -> bool {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")],
            "resourceAttributes": {"namespace": ns, "group": group, "resource": resource,
                                   "verb": verb, "name": name.unwrap_or_default()},
        }
    }))
    .expect("review literal");
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn expired_leases_leave_the_map_and_members_get_exactly_their_rights() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "expiry").await;
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &demo_service("solo", 2, 1))
        .await
        .expect("apply solo");
    let cms: Api<ConfigMap> = ns.api();
    let settled = wait_for("both pods registered", WAIT, || async {
        let m = shard_map(&cms, "solo").await?;
        Ok((members(&m).len() == 2).then_some(m))
    })
    .await;

    // A member whose sidecar stops renewing (here: a Lease nobody renews) is dropped once
    // renewTime + leaseDurationSeconds has passed, without any further event.
    let leases: Api<Lease> = ns.api();
    let now = k8s_openapi::jiff::Timestamp::now();
    let ghost: Lease = serde_json::from_value(json!({
        "metadata": {"name": "ghost", "labels": {labels::SERVICE: "solo", labels::SHARD: "1"},
                     "annotations": {labels::LEASE_ADDRESS: "10.255.255.1:4143"}},
        "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 4, "renewTime": now.to_string()},
    }))
    .expect("ghost literal");
    let t0 = Instant::now();
    leases
        .create(&PostParams::default(), &ghost)
        .await
        .expect("create ghost");
    let with_ghost = wait_for("ghost joins the map", Duration::from_secs(20), || async {
        let m = shard_map(&cms, "solo").await?;
        Ok(members(&m).contains("ghost").then_some(m))
    })
    .await;
    let joined = t0.elapsed();
    let without = wait_for(
        "ghost expires out of the map",
        Duration::from_secs(20),
        || async {
            let m = shard_map(&cms, "solo").await?;
            Ok((!members(&m).contains("ghost")).then_some(m))
        },
    )
    .await;
    let left = t0.elapsed();
    eprintln!(
        "[e2e] expiry: epoch {} -> {} (ghost joined after {:.1}s) -> {} (expired after {:.1}s, lease duration 4s)",
        settled.epoch,
        with_ghost.epoch,
        joined.as_secs_f64(),
        without.epoch,
        left.as_secs_f64()
    );
    assert!(with_ghost.epoch > settled.epoch && without.epoch > with_ghost.epoch);
    assert!(
        left >= Duration::from_secs(3),
        "expired too early: {left:?}"
    );
    assert!(
        leases.get_opt("ghost").await.expect("get").is_some(),
        "the operator never deletes Leases"
    );

    // The member account: its own Leases and the shard map, nothing else.
    let user = format!(
        "system:serviceaccount:{}:{}",
        ns.name,
        labels::member_account_name("solo")
    );
    let lease_res = ("coordination.k8s.io", "leases");
    let cm_res = ("", "configmaps");
    let map_name = labels::shardmap_name("solo");
    let cases = [
        (lease_res, "create", None, true),
        (lease_res, "update", Some("solo-0-0"), true),
        (lease_res, "delete", Some("solo-1-0"), true),
        (lease_res, "get", Some("solo-1-0"), true),
        (lease_res, "update", Some("ghost"), false),
        (lease_res, "list", None, false),
        (cm_res, "watch", Some(map_name.as_str()), true),
        (cm_res, "list", Some(map_name.as_str()), true),
        (cm_res, "get", Some("other"), false),
        (cm_res, "list", None, false),
        (("", "pods"), "get", Some("solo-0-0"), false),
    ];
    for (res, verb, name, want) in cases {
        assert_eq!(
            allowed(&client, &user, &ns.name, res, verb, name).await,
            want,
            "{verb} {}/{} as the member account",
            res.1,
            name.unwrap_or("*")
        );
    }
    ns.delete().await;
}
