//! Per-shard leaders on the real cluster: with `leaderElection.enabled`, the sidecars of each
//! shard elect a leader over the shard's leader Lease, the operator publishes it with its epoch,
//! a client's writes land on the leader fenced with that epoch, a follower refuses writes, and a
//! crashed leader (its sidecar killed with SIGKILL: no release) is replaced by a new holder with
//! a higher epoch once its Lease has expired — never before.

mod mesh;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use mesh::{keyed, keyed_with, shard_map};
use serde_json::json;
use shardmesh_api::shardmap::ShardMapSlice;
use shardmesh_api::{headers, labels, shardmap::ShardMap, ShardedService};
use shardmesh_e2e::{apply_service, client, demo_service, wait_for, TestNamespace, WAIT};

const SHARDS: u32 = 2;
const REPLICAS: usize = 2;
/// Leader Lease duration of the scenario (the CRD allows 3s-5m).
const LEASE_SECS: u64 = 6;

fn key_for(shard: u32) -> String {
    (0..)
        .map(|i| format!("ledger-key-{i}"))
        .find(|k| shardmesh_api::routing::shard_for_key(k.as_bytes(), SHARDS) == shard)
        .expect("some key hashes to every shard")
}

/// (leader pod, leader address, epoch) of `shard`, when published.
fn leader_of(m: &ShardMap, shard: u32) -> Option<(String, String, i64)> {
    let l = m.shards.get(shard as usize)?.leader.as_ref()?;
    Some((l.pod.clone(), l.address.clone(), l.epoch))
}

fn lease_time(l: &Lease, acquire: bool) -> Option<f64> {
    let s = l.spec.as_ref()?;
    let t = if acquire {
        s.acquire_time.as_ref()
    } else {
        s.renew_time.as_ref()
    }?;
    Some(t.0.as_millisecond() as f64 / 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn shard_leaders_take_writes_fenced_by_epoch_and_fail_over() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "leader").await;
    let injected = mesh::injection_installed(&client).await;
    let mut body = demo_service("ledger", SHARDS as i32, REPLICAS as i32);
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20);
    body["spec"]["leaderElection"] =
        json!({"enabled": true, "leaseDuration": format!("{LEASE_SECS}s")});
    let lease_flag = format!("{LEASE_SECS}s");
    mesh::add_sidecar_if_not_injected(&mut body, injected, &["--leader-lease", &lease_flag]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply ledger");
    let cms: Api<ShardMapSlice> = ns.api();
    let leases: Api<Lease> = ns.api();

    // 1. Every shard gets a leader that is one of its members; the status mirrors it.
    let t0 = Instant::now();
    let map = wait_for("a leader per shard in the shard map", WAIT, || async {
        let m = shard_map(&cms, "ledger").await?;
        let full = m
            .shards
            .iter()
            .all(|s| s.members.len() == REPLICAS && s.leader.is_some());
        Ok(full.then_some(m))
    })
    .await;
    eprintln!(
        "[e2e] leaders after {:.1}s: {:?}",
        t0.elapsed().as_secs_f64(),
        (0..SHARDS).map(|s| leader_of(&map, s)).collect::<Vec<_>>()
    );
    for s in &map.shards {
        let l = s.leader.as_ref().expect("leader");
        assert!(
            s.members.iter().any(|m| m.pod == l.pod),
            "leader {} not a member",
            l.pod
        );
        assert!(l.epoch >= 1);
    }
    wait_for(
        "status shows each shard's leader and epoch",
        WAIT,
        || async {
            let svc = svcs.get("ledger").await?;
            let st = svc.status.unwrap_or_default();
            let shown: Vec<_> = st
                .shards
                .iter()
                .map(|s| (s.leader.clone(), s.leader_epoch))
                .collect();
            let want: Vec<_> = map
                .shards
                .iter()
                .map(|s| {
                    s.leader
                        .as_ref()
                        .map(|l| (Some(l.pod.clone()), Some(l.epoch)))
                })
                .collect::<Option<_>>()
                .unwrap_or_default();
            Ok((shown == want).then_some(()))
        },
    )
    .await;

    // 2. Writes through a client's sidecar land on the leader, which its sidecar told so.
    let http = mesh::http();
    let proxy = mesh::start_client(&ns, "ledger", &http).await;
    let host = format!("ledger.{}:8080", ns.name);
    for shard in 0..SHARDS {
        let (leader, _, _) = leader_of(&map, shard).expect("leader");
        for _ in 0..5 {
            let r = keyed(&http, proxy, &host, "PUT", &key_for(shard))
                .await
                .expect("put");
            assert!(
                (200..300).contains(&r.status),
                "write to shard {shard}: {r:?}"
            );
            assert_eq!(
                (r.pod.as_str(), r.role.as_str()),
                (leader.as_str(), "leader"),
                "{r:?}"
            );
        }
    }

    // 3. A follower refuses a write even with the right epoch: its sidecar says "follower".
    let shard = 0;
    let (old_leader, _, old_epoch) = leader_of(&map, shard).expect("leader");
    let follower = map.shards[0]
        .members
        .iter()
        .find(|m| m.pod != old_leader)
        .expect("a follower")
        .clone();
    let direct: std::net::SocketAddr = follower.address.parse().expect("member address");
    let fence = vec![(headers::FENCING_EPOCH, old_epoch.to_string())];
    let r = keyed_with(&http, direct, &host, "PUT", &key_for(shard), &fence)
        .await
        .expect("direct put");
    assert_eq!((r.status, r.role.as_str()), (409, "follower"), "{r:?}");
    assert!(r.body.contains("not the shard leader"), "{}", r.body);

    // 4. Crash the leader's sidecar: no release, so the others must wait out the Lease.
    let lease_name = labels::leader_lease_name("ledger", shard);
    let before = leases.get(&lease_name).await.expect("leader lease");
    mesh::crash_sidecar(&old_leader);
    let killed = Instant::now();
    let last_renew = lease_time(&leases.get(&lease_name).await.expect("lease"), false)
        .or_else(|| lease_time(&before, false))
        .expect("renewTime");
    let (new_leader, new_addr, new_epoch) = wait_for(
        "a new leader with a higher epoch in the shard map",
        Duration::from_secs(90),
        || async {
            let m = shard_map(&cms, "ledger").await?;
            Ok(leader_of(&m, shard).filter(|(_, _, e)| *e > old_epoch))
        },
    )
    .await;
    let published_after = killed.elapsed();
    let lease = leases.get(&lease_name).await.expect("leader lease");
    let acquired = lease_time(&lease, true).expect("acquireTime");
    let takeover = acquired - last_renew;
    eprintln!(
        "[e2e] leader {old_leader} (epoch {old_epoch}) crashed; {new_leader} leads at epoch \
         {new_epoch}: Lease taken {takeover:.1}s after the last renewal (lease {LEASE_SECS}s), \
         published {:.1}s after the kill",
        published_after.as_secs_f64()
    );
    // Never before the Lease expired (the safety of fencing), and within one lease duration
    // plus the candidates' retry period (0.6 s here) and scheduling slack.
    assert!(
        takeover >= LEASE_SECS as f64 - 0.05,
        "taken over too early: {takeover:.2}s"
    );
    assert!(
        takeover <= LEASE_SECS as f64 + 3.0,
        "taken over too late: {takeover:.2}s"
    );
    assert!(
        published_after <= Duration::from_secs(LEASE_SECS + 10),
        "published after {published_after:?}"
    );

    // 5. Writes reach the new leader; a write fenced with the old epoch is refused by it.
    let r = wait_for(
        "a write lands on the new leader",
        Duration::from_secs(60),
        || async {
            let r = keyed(&http, proxy, &host, "PUT", &key_for(shard)).await?;
            Ok(((200..300).contains(&r.status) && r.pod == new_leader).then_some(r))
        },
    )
    .await;
    assert_eq!(r.role, "leader");
    let direct: std::net::SocketAddr = new_addr.parse().expect("leader address");
    let stale = vec![(headers::FENCING_EPOCH, old_epoch.to_string())];
    let r = keyed_with(&http, direct, &host, "PUT", &key_for(shard), &stale)
        .await
        .expect("stale put");
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        r.body.contains(&format!("stale fencing epoch {old_epoch}")),
        "{}",
        r.body
    );
    let current = vec![(headers::FENCING_EPOCH, new_epoch.to_string())];
    let r = keyed_with(&http, direct, &host, "PUT", &key_for(shard), &current)
        .await
        .expect("fenced put");
    assert!((200..300).contains(&r.status), "{r:?}");

    // 6. The other shard never noticed.
    let m = shard_map(&cms, "ledger").await.expect("map");
    assert_eq!(
        leader_of(&m, 1).map(|l| l.2),
        leader_of(&map, 1).map(|l| l.2)
    );
    ns.delete().await;
}
