//! Registry membership and shard routing on the real cluster: sidecars register their pods with
//! Leases, the operator publishes the shard map, a client pod's sidecar routes keyed requests to
//! the owning shard (the demo app answers 421 to any key of another shard, so a routing mistake
//! is visible), and a deleted pod leaves the map at once and rejoins when recreated.

mod mesh;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authorization::v1::SubjectAccessReview, coordination::v1::Lease, core::v1::Pod,
};
use kube::{
    api::{DeleteParams, ListParams, PostParams},
    Api, ResourceExt,
};
use mesh::{keyed, members, shard_map, Load};
use serde_json::json;
use shardmesh_api::shardmap::ShardMapSlice;
use shardmesh_api::{labels, ShardedService};
use shardmesh_e2e::{apply_service, client, demo_service, wait_for, TestNamespace, WAIT};

const SHARDS: usize = 4;
const REPLICAS: usize = 2;
const REQUESTS: usize = 2000;

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn keyed_requests_reach_their_shard_and_membership_follows_pods() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "routing").await;
    let injected = mesh::injection_installed(&client).await;
    eprintln!("[e2e] sidecar injection installed: {injected}");

    // 1. A 4x2 demo service whose pods run the sidecar.
    let mut body = demo_service("demo", SHARDS as i32, REPLICAS as i32);
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20);
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply demo");
    let cms: Api<ShardMapSlice> = ns.api();
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

    // 2. A client pod: only a sidecar following the shard map.
    let http = mesh::http();
    let proxy = mesh::start_client(&ns, "demo", &http).await;
    let host = format!("demo.{}:8080", ns.name);

    // 3. 2,000 keyed requests: no misrouted key, every shard served.
    let t1 = Instant::now();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        let (status, shard) = keyed(&http, proxy, &host, "PUT", &format!("key-{i}"))
            .await
            .map_or((0, "-".into()), |r| (r.status, r.shard));
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
    let load = Load::start(&http, proxy, &host, "PUT", "churn");
    let victim = "demo-1-0";
    let pods: Api<Pod> = ns.api();
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
    let (sent, failed, last) = load.finish().await;
    eprintln!(
        "[e2e] pod deletion: lease gone after {:.1}s, map epoch {before} -> {} after {:.1}s, \
         rejoined at epoch {} after {:.1}s; {} requests during churn, failures {failed:?}",
        lease_gone.as_secs_f64(),
        after.epoch,
        map_dropped.as_secs_f64(),
        rejoined.epoch,
        rejoin.as_secs_f64(),
        sent,
    );
    assert!(rejoined.epoch > after.epoch);
    assert!(
        failed.is_empty(),
        "requests failed while a pod left and rejoined: {failed:?}, last: {last:?}"
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
    let cms: Api<ShardMapSlice> = ns.api();
    let settled = wait_for("both pods registered", WAIT, || async {
        let m = shard_map(&cms, "solo").await?;
        Ok((members(&m).len() == 2).then_some(m))
    })
    .await;

    // Shard 0's slice as published before shard 1's membership changes below.
    let shard0 = cms.get("solo-0").await.expect("shard 0's slice");

    // A Lease claiming membership without a pod of the service behind it (any pod allowed to
    // create Leases in the namespace could write one) is never published.
    let leases: Api<Lease> = ns.api();
    let lease_literal = |name: &str, address: &str, uid: Option<&str>| -> Lease {
        let now = k8s_openapi::jiff::Timestamp::now();
        let owners = uid.map_or_else(Vec::new, |uid| {
            vec![json!({"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid})]
        });
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {labels::SERVICE: "solo", labels::SHARD: "1"},
                         "annotations": {labels::LEASE_ADDRESS: address},
                         "ownerReferences": owners},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 4, "renewTime": now.to_string()},
        }))
        .expect("lease literal")
    };
    leases
        .create(
            &PostParams::default(),
            &lease_literal("forged", "10.255.255.1:4143", None),
        )
        .await
        .expect("create forged lease");

    // A member whose sidecar stops renewing is dropped once renewTime + leaseDurationSeconds has
    // passed, without any further event. Here: a real pod of the service (no sidecar) and a
    // Lease for it that nobody renews.
    let pods: Api<Pod> = ns.api();
    let ghost_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "solo-ghost",
                     "labels": {labels::SERVICE: "solo", labels::SHARD: "1"},
                     "annotations": {labels::INJECT: "disabled"}},
        "spec": {"terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "sleep", "image": "shardmesh.local/busybox:1",
                                 "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]},
    }))
    .expect("ghost pod literal");
    pods.create(&PostParams::default(), &ghost_pod)
        .await
        .expect("create ghost pod");
    let (ghost_uid, ghost_ip) = wait_for("ghost pod has an IP", WAIT, || async {
        let p = pods.get("solo-ghost").await?;
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        Ok(ip.map(|ip| (p.uid().unwrap_or_default(), ip)))
    })
    .await;
    let t0 = Instant::now();
    leases
        .create(
            &PostParams::default(),
            &lease_literal("solo-ghost", &format!("{ghost_ip}:4143"), Some(&ghost_uid)),
        )
        .await
        .expect("create ghost lease");
    let with_ghost = wait_for("ghost joins the map", Duration::from_secs(20), || async {
        let m = shard_map(&cms, "solo").await?;
        Ok(members(&m).contains("solo-ghost").then_some(m))
    })
    .await;
    assert!(
        !members(&with_ghost).contains("forged"),
        "a Lease without its pod was published: {:?}",
        members(&with_ghost)
    );
    let joined = t0.elapsed();
    let without = wait_for(
        "ghost expires out of the map",
        Duration::from_secs(20),
        || async {
            let m = shard_map(&cms, "solo").await?;
            Ok((!members(&m).contains("solo-ghost")).then_some(m))
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
    // Shard 1's member joined and left: only shard 1's slice was rewritten (what a watching
    // sidecar receives is that slice), shard 0's is the very object published before.
    let after0 = cms.get("solo-0").await.expect("shard 0's slice");
    let after1 = cms.get("solo-1").await.expect("shard 1's slice");
    assert_eq!(
        (after0.resource_version(), after0.spec.epoch),
        (shard0.resource_version(), shard0.spec.epoch),
        "shard 0's slice was rewritten by shard 1's membership changes"
    );
    assert_eq!(after1.spec.epoch, without.epoch);
    assert!(
        left >= Duration::from_secs(3),
        "expired too early: {left:?}"
    );
    assert!(
        leases.get_opt("solo-ghost").await.expect("get").is_some(),
        "the operator never deletes Leases"
    );

    // A member account (shard 0's): its shard's Leases and reading the shard map, nothing else.
    let user = format!(
        "system:serviceaccount:{}:{}",
        ns.name,
        labels::member_account_name("solo", 0)
    );
    let lease_res = ("coordination.k8s.io", "leases");
    let cm_res = ("", "configmaps");
    let slice_res = ("shardmesh.io", "shardmapslices");
    let cases = [
        (lease_res, "create", None, true),
        (lease_res, "update", Some("solo-0-0"), true),
        (lease_res, "delete", Some("solo-0-0"), true),
        (lease_res, "get", Some("solo-0-0"), true),
        // Another shard's pod: its Lease is out of reach.
        (lease_res, "delete", Some("solo-1-0"), false),
        (lease_res, "update", Some("solo-1-0"), false),
        (lease_res, "update", Some("forged"), false),
        (lease_res, "list", None, false),
        (slice_res, "watch", None, true),
        (slice_res, "list", None, true),
        (slice_res, "create", None, false),
        (slice_res, "update", Some("solo-0"), false),
        (cm_res, "get", Some("solo-shardmap"), false),
        (cm_res, "list", None, false),
        (("", "pods"), "get", Some("solo-0-0"), false),
    ];
    for (res, verb, name, want) in cases {
        assert_eq!(
            allowed(&client, &user, &ns.name, res, verb, name).await,
            want,
            "{verb} {}/{} as shard 0's member account",
            res.1,
            name.unwrap_or("*")
        );
    }
    ns.delete().await;
}
