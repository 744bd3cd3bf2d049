//! Membership and routing across control-plane restarts, on the real cluster. Runs alone (its
//! own phase of e2e/test.sh): it stops the API server and the operator.
//!
//! - The API server is down for 20 s while a client keeps sending keyed requests: none fails
//!   (sidecars route on the last known map); afterwards every member renews its Lease again
//!   (the sidecars retried with backoff) and no member was dropped from the map — the operator
//!   gives every member a full lease duration after it regains its view, instead of expiring
//!   Leases nobody could renew.
//! - Both operator replicas are deleted: the map is left as it is, and the new operator
//!   publishes the next membership change (which the client, whose watch survived the API
//!   outage, follows).
//! - The leading operator replica is cut off from the API server (its packets dropped in its
//!   pod's network namespace): it stops acting on its own timer before the standby takes over,
//!   sampled every 100 ms on both replicas' `shardmesh_operator_leader`.
//!
//! The scenarios run one at a time (`--test-threads=1`): each disturbs the control plane.

mod mesh;

use std::time::{Duration, Instant};

use k8s_openapi::api::{apps::v1::Deployment, coordination::v1::Lease, core::v1::Pod};
use kube::{
    api::{DeleteParams, ListParams},
    Api, ResourceExt,
};
use mesh::{members, shard_map, Load};
use serde_json::json;
use shardmesh_api::shardmap::ShardMapSlice;
use shardmesh_api::{labels, shardmap::ShardMap, ShardedService};
use shardmesh_e2e::{
    apply_service, client, demo_service, wait_for, TestNamespace, OPERATOR_NAMESPACE, WAIT,
};

const SHARDS: usize = 2;
const REPLICAS: usize = 2;
const OUTAGE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn control_plane_restarts_keep_membership_and_routing() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "ctlplane").await;
    let injected = mesh::injection_installed(&client).await;
    let mut body = demo_service("steady", SHARDS as i32, REPLICAS as i32);
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20);
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply steady");
    let cms: Api<ShardMapSlice> = ns.api();
    let leases: Api<Lease> = ns.api();
    wait_for("all members in the map", WAIT, || async {
        let m = shard_map(&cms, "steady").await?;
        Ok((members(&m).len() == SHARDS * REPLICAS).then_some(()))
    })
    .await;
    let http = mesh::http();
    let proxy = mesh::start_client(&ns, "steady", &http).await;
    let host = format!("steady.{}:8080", ns.name);
    let settled = shard_map(&cms, "steady").await.expect("map");

    // 1. API server down for OUTAGE under load.
    let load = Load::start(&http, proxy, &host, "GET", "outage");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (stopped, ready) = tokio::task::spawn_blocking(|| mesh::restart_apiserver(OUTAGE))
        .await
        .expect("restart task");
    let during = load.sent();
    eprintln!(
        "[e2e] API server unavailable for {:.1}s; {during} requests sent so far",
        ready - stopped
    );
    // Every member renews after the restart (the sidecars retried with backoff).
    let renewed = wait_for(
        "every member Lease renewed after the restart",
        Duration::from_secs(60),
        || async {
            let list = leases
                .list(&ListParams::default().labels(&labels::service_selector_string("steady")))
                .await?;
            let renewed_after = |l: &Lease| {
                l.spec
                    .as_ref()
                    .and_then(|s| s.renew_time.as_ref())
                    .is_some_and(|t| t.0.as_millisecond() as f64 / 1000.0 > ready)
            };
            let n = list.items.iter().filter(|l| renewed_after(l)).count();
            Ok((n == SHARDS * REPLICAS).then_some(Instant::now()))
        },
    )
    .await;
    let _ = renewed;
    eprintln!(
        "[e2e] all {} member Leases renewed {:.1}s after the API server was ready",
        SHARDS * REPLICAS,
        mesh::wall() - ready
    );
    // Give the operator time to act on its view (it requeues at the next expiry).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = shard_map(&cms, "steady").await.expect("map");
    assert_eq!(
        (after.epoch, members(&after)),
        (settled.epoch, members(&settled)),
        "the outage must not change the membership"
    );
    let (sent, failed, last) = load.finish().await;
    eprintln!("[e2e] API server outage: {sent} requests, failures {failed:?}");
    assert!(
        failed.is_empty(),
        "requests failed during the API server outage: {failed:?}, last: {last:?}"
    );

    // 2. Both operator replicas deleted: the map stays, the new operator publishes changes.
    let load = Load::start(&http, proxy, &host, "GET", "operator");
    let ops: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let old: Vec<String> = ops
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await
        .expect("operator pods")
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert!(!old.is_empty(), "no operator pods found");
    for p in &old {
        ops.delete(p, &DeleteParams::default())
            .await
            .expect("delete operator pod");
    }
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let t = Instant::now();
    wait_for("replacement operator pods available", WAIT, || async {
        let pods = ops
            .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
            .await?;
        let fresh = pods
            .items
            .iter()
            .filter(|p| !old.contains(&p.name_any()) && p.metadata.deletion_timestamp.is_none())
            .count();
        let d = deploys.get("shardmesh-operator").await?;
        let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
        Ok((fresh >= 1 && available >= 1).then_some(()))
    })
    .await;
    eprintln!(
        "[e2e] operator replaced after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let kept = shard_map(&cms, "steady").await.expect("map");
    assert_eq!(
        kept.epoch, settled.epoch,
        "an operator restart must not change the map"
    );

    let pods: Api<Pod> = ns.api();
    let victim = "steady-1-1";
    let old_uid = pods.get(victim).await.expect("victim").uid();
    let old_address = |m: &ShardMap| {
        m.shards
            .iter()
            .flat_map(|s| s.members.iter())
            .find(|x| x.pod == victim)
            .map(|x| x.address.clone())
    };
    let old_addr = old_address(&kept).expect("the victim is a member");
    pods.delete(victim, &DeleteParams::default())
        .await
        .expect("delete member");
    // The new operator may still be waiting out the old leader's Lease (a whole duration on its
    // own clock) while the StatefulSet recreates the pod under the same name: the map then
    // goes straight from the old member to the new one. Either way the old pod leaves it.
    let dropped = wait_for(
        "the new operator drops the deleted pod (absent, or back at a new address)",
        WAIT,
        || async {
            let m = shard_map(&cms, "steady").await?;
            Ok((old_address(&m).as_deref() != Some(old_addr.as_str())).then_some(m))
        },
    )
    .await;
    let back = wait_for("the recreated member rejoins", WAIT, || async {
        let p = pods.get(victim).await?;
        if p.uid() == old_uid {
            return Ok(None);
        }
        let m = shard_map(&cms, "steady").await?;
        Ok((members(&m).len() == SHARDS * REPLICAS).then_some(m))
    })
    .await;
    let (sent, failed, last) = load.finish().await;
    eprintln!(
        "[e2e] operator restart: map epoch {} kept; member change published as epochs {} and {}; \
         {sent} requests, failures {failed:?}",
        kept.epoch, dropped.epoch, back.epoch
    );
    assert!(dropped.epoch > kept.epoch && back.epoch >= dropped.epoch);
    assert!(
        failed.is_empty(),
        "requests failed across the operator restart: {failed:?}, last: {last:?}"
    );
    ns.delete().await;
}

/// `shardmesh_operator_leader` of the operator at `ip`, or `None` when it does not answer (a
/// process that exited or is starting acts on nothing).
async fn leads(http: &mesh::Http, ip: &str) -> Option<bool> {
    use http_body_util::BodyExt as _;
    let req = http::Request::get(format!("http://{ip}:8080/metrics"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(1), http.request(req))
        .await
        .ok()?
        .ok()?;
    let body = tokio::time::timeout(Duration::from_secs(1), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("shardmesh_operator_leader "))?;
    Some(v.trim() == "1")
}

/// The leading operator replica cut off from the API server (its packets dropped in its pod's
/// network namespace): it stops acting on its own timer before the standby may take over, so
/// the two never act at once; after the drop is lifted both replicas run again, one leading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn a_cut_off_operator_stops_before_the_standby_acts() {
    let client = client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let available = || async {
        let d = deployments.get("shardmesh-operator").await?;
        let s = d.status.unwrap_or_default();
        Ok((s.available_replicas == Some(2) && s.updated_replicas == Some(2)).then_some(()))
    };
    wait_for("both operator replicas available", WAIT, available).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let holder = |l: &Lease| {
        l.spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default()
    };
    let old = wait_for("an operator leads", WAIT, || async {
        let h = holder(&leases.get(shardmesh_e2e::OPERATOR_LEASE).await?);
        Ok((!h.is_empty()).then_some(h))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await
        .expect("operator pods")
        .items;
    let ip = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default()
    };
    let leader_ip = list
        .iter()
        .find(|p| p.name_any() == old)
        .map(ip)
        .expect("the leader's pod");
    let standby = list
        .iter()
        .find(|p| p.name_any() != old && p.metadata.deletion_timestamp.is_none())
        .expect("a standby pod");
    let (standby_name, standby_ip) = (standby.name_any(), ip(standby));
    let api_ip = mesh::api_server_ip(&client).await;

    // Sample both replicas every 100 ms: (sent, answered, leads?) per replica.
    let http = mesh::http();
    let t0 = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, http, ips) = (
            stop.clone(),
            http.clone(),
            [leader_ip.clone(), standby_ip.clone()],
        );
        tokio::spawn(async move {
            let mut out: [Vec<(f64, f64, Option<bool>)>; 2] = [Vec::new(), Vec::new()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, ip) in ips.iter().enumerate() {
                    let sent = t0.elapsed().as_secs_f64();
                    let v = leads(&http, ip).await;
                    out[i].push((sent, t0.elapsed().as_secs_f64(), v));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut = mesh::ApiCut::start("shardmesh-operator", &old, &api_ip);
    let cut_at = t0.elapsed().as_secs_f64();
    wait_for("the standby takes the controller Lease", WAIT, || async {
        let l = leases.get(shardmesh_e2e::OPERATOR_LEASE).await?;
        Ok((holder(&l) == standby_name).then_some(()))
    })
    .await;
    wait_for("the standby reports leading", WAIT, || async {
        Ok(leads(&http, &standby_ip).await.filter(|l| *l))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cut.heal();
    let healed_at = t0.elapsed().as_secs_f64();
    eprintln!("[e2e] drop lifted at +{healed_at:.1}s");
    wait_for("both operator replicas available again", WAIT, available).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.expect("sampler");

    let old_last = samples[0]
        .iter()
        .filter(|(sent, _, v)| *sent >= cut_at && *v == Some(true))
        .map(|(_, answered, _)| *answered)
        .fold(f64::NAN, f64::max);
    let new_first = samples[1]
        .iter()
        .filter(|(sent, _, v)| *sent >= cut_at && *v == Some(true))
        .map(|(sent, _, _)| *sent)
        .fold(f64::NAN, f64::min);
    let lease_secs = leases
        .get(shardmesh_e2e::OPERATOR_LEASE)
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(0);
    eprintln!(
        "[e2e] operator cut off at +{cut_at:.1}s: {old} last reported leading at +{old_last:.2}s, \
         {standby_name} first at +{new_first:.2}s (lease {lease_secs}s)"
    );
    assert!(new_first.is_finite(), "the standby never reported leading");
    assert!(
        old_last.is_nan() || old_last < new_first,
        "two controllers acted at once: the cut-off leader reported leading at +{old_last:.2}s, \
         the standby from +{new_first:.2}s"
    );
}
