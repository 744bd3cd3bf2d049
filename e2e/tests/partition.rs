//! A shard leader cut off from the API server (its packets to the API server dropped in its
//! pod's network namespace: no kill, no restart, no reset) while a client keeps writing:
//!
//! - the cut-off leader stops telling its application `leader` on its own timer, before the
//!   other pod can take the Lease: sampling both pods' role every 100 ms, the two claims never
//!   overlap (the documented margin is a third of the Lease duration, measured here);
//! - no write is accepted under the superseded epoch once the new leader holds the next one;
//! - after the drop is lifted, the old leader sees the new holder and the shard converges: one
//!   leader, both members in the map, writes succeed.
//!
//! Prints its timeline as `partition:` lines and writes
//! `$SHARDMESH_E2E_LOGS/partition-summary.txt`.

mod mesh;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use kube::Api;
use mesh::{keyed, shard_map};
use serde_json::json;
use shardmesh_api::shardmap::ShardMapSlice;
use shardmesh_api::{shardmap::ShardMap, ShardedService};
use shardmesh_e2e::{
    apply_service, client, demo_service, wait_for, write_artifact, TestNamespace, WAIT,
};

const NAME: &str = "fence";
/// Leader Lease duration: the claim lapses after 4 s without renewal, takeover after 6 s.
const LEASE_SECS: u64 = 6;
/// How long the leader stays cut off: several Lease durations.
const CUT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn leader_of(m: &ShardMap) -> Option<(String, String, i64)> {
    let l = m.shards.first()?.leader.as_ref()?;
    Some((l.pod.clone(), l.address.clone(), l.epoch))
}

/// One look at a pod's role: (seconds since t0 when the request started, when it answered,
/// role, epoch).
#[derive(Clone, Debug)]
struct RoleSample {
    sent: f64,
    answered: f64,
    role: String,
    epoch: String,
}

/// One write through the client's sidecar.
#[derive(Clone, Debug)]
struct Write {
    sent: f64,
    status: u16,
    pod: String,
    epoch: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn a_cut_off_leader_steps_down_before_anyone_takes_over() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "partition").await;
    let injected = mesh::injection_installed(&client).await;
    let mut body = demo_service(NAME, 1, 2);
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20);
    body["spec"]["leaderElection"] =
        json!({"enabled": true, "leaseDuration": format!("{LEASE_SECS}s")});
    let lease_flag = format!("{LEASE_SECS}s");
    mesh::add_sidecar_if_not_injected(&mut body, injected, &["--leader-lease", &lease_flag]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply fence");
    let cms: Api<ShardMapSlice> = ns.api();
    let map = wait_for(
        "a leader and two members in the shard map",
        WAIT,
        || async {
            let m = shard_map(&cms, NAME).await?;
            let full = m
                .shards
                .first()
                .is_some_and(|s| s.members.len() == 2 && s.leader.is_some());
            Ok(full.then_some(m))
        },
    )
    .await;
    let (old_leader, old_addr, old_epoch) = leader_of(&map).expect("leader");
    let other = map.shards[0]
        .members
        .iter()
        .find(|m| m.pod != old_leader)
        .expect("a second member")
        .clone();
    let pods: Vec<(String, SocketAddr)> = vec![
        (
            old_leader.clone(),
            old_addr.parse().expect("leader address"),
        ),
        (
            other.pod.clone(),
            other.address.parse().expect("member address"),
        ),
    ];
    let api_ip = mesh::api_server_ip(&client).await;

    let http = mesh::http();
    let proxy = mesh::start_client(&ns, NAME, &http).await;
    let host = format!("{NAME}.{}:8080", ns.name);
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    // Role samplers: each pod's role straight from its inbound sidecar, every 100 ms.
    let roles: Arc<Mutex<Vec<Vec<RoleSample>>>> = Arc::new(Mutex::new(vec![Vec::new(); 2]));
    let sampler = {
        let (stop, roles, http, host, pods) = (
            stop.clone(),
            roles.clone(),
            http.clone(),
            host.clone(),
            pods.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for (i, (_, addr)) in pods.iter().enumerate() {
                    let sent = t0.elapsed().as_secs_f64();
                    // A cut-off pod still answers: only its way to the API server is dropped.
                    let r = tokio::time::timeout(
                        Duration::from_secs(2),
                        keyed(&http, *addr, &host, "GET", "role-probe"),
                    )
                    .await;
                    if let Ok(Ok(r)) = r {
                        lock(&roles)[i].push(RoleSample {
                            sent,
                            answered: t0.elapsed().as_secs_f64(),
                            role: r.role,
                            epoch: r.epoch,
                        });
                    }
                }
            }
        })
    };
    // Writes through the client's sidecar (to the leader in its map, fenced with its epoch).
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let writer = {
        let (stop, writes, http, host) = (stop.clone(), writes.clone(), http.clone(), host.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = t0.elapsed().as_secs_f64();
                let r = keyed(&http, proxy, &host, "PUT", &format!("w-{}", i % 500)).await;
                let w = match r {
                    Ok(r) => Write {
                        sent,
                        status: r.status,
                        pod: r.pod,
                        epoch: r.epoch,
                    },
                    Err(_) => Write {
                        sent,
                        status: 0,
                        pod: String::new(),
                        epoch: String::new(),
                    },
                };
                lock(&writes).push(w);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(5)).await;
    let cut_at = t0.elapsed().as_secs_f64();
    let cut = mesh::ApiCut::start("shardmesh-sidecar", &old_leader, &api_ip);
    let new = wait_for(
        "the other pod leads with a higher epoch in the shard map",
        WAIT,
        || async {
            let m = shard_map(&cms, NAME).await?;
            Ok(leader_of(&m).filter(|(pod, _, e)| *pod == other.pod && *e > old_epoch))
        },
    )
    .await;
    let remaining =
        CUT.saturating_sub(Duration::from_secs_f64(t0.elapsed().as_secs_f64() - cut_at));
    tokio::time::sleep(remaining).await;
    let healed_at = t0.elapsed().as_secs_f64();
    cut.heal();
    eprintln!("[e2e] drop lifted at +{healed_at:.1}s");

    // After healing: the old leader follows at the new epoch; writes succeed.
    wait_for(
        "the old leader reports follower at the new epoch",
        WAIT,
        || async {
            let r = keyed(&http, pods[0].1, &host, "GET", "role-probe").await?;
            Ok((r.role == "follower" && r.epoch == new.2.to_string()).then_some(()))
        },
    )
    .await;
    wait_for(
        "both members and one leader in the shard map again",
        WAIT,
        || async {
            let m = shard_map(&cms, NAME).await?;
            let ok = m.shards[0].members.len() == 2
                && leader_of(&m).is_some_and(|(p, _, e)| p == other.pod && e == new.2);
            Ok(ok.then_some(()))
        },
    )
    .await;
    wait_for("a write succeeds after healing", WAIT, || async {
        let r = keyed(&http, proxy, &host, "PUT", "after-heal").await?;
        Ok((200..300).contains(&r.status).then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    writer.await.expect("writer");

    let roles = std::mem::take(&mut *lock(&roles));
    let writes = std::mem::take(&mut *lock(&writes));
    let leading = |s: &RoleSample| s.role == "leader";
    // The old leader's last claim (by when it answered) and the new leader's first (by when it
    // was asked): with sampling in between, the gap is a lower bound of the real one.
    let old_last = roles[0]
        .iter()
        .filter(|s| s.sent >= cut_at && s.sent < healed_at && leading(s))
        .map(|s| s.answered)
        .fold(f64::NAN, f64::max);
    let new_first = roles[1]
        .iter()
        .filter(|s| s.sent >= cut_at && leading(s))
        .map(|s| s.sent)
        .fold(f64::NAN, f64::min);
    let both = roles[0]
        .iter()
        .filter(|s| leading(s) && s.sent >= cut_at)
        .filter(|a| {
            roles[1]
                .iter()
                .any(|b| leading(b) && b.sent <= a.answered && a.sent <= b.answered)
        })
        .count();
    // Each claim carries its own epoch: the old leader's the old one, the new leader's the new.
    let wrong_epoch: Vec<String> = roles
        .iter()
        .zip([old_epoch, new.2])
        .flat_map(|(samples, want)| {
            samples
                .iter()
                .filter(move |s| s.sent >= cut_at && leading(s) && s.epoch != want.to_string())
                .map(move |s| format!("+{:.2}s leader at epoch {} (want {want})", s.sent, s.epoch))
        })
        .collect();
    let stale_writes: Vec<&Write> = writes
        .iter()
        .filter(|w| (200..300).contains(&w.status))
        .filter(|w| w.pod == old_leader && w.sent >= new_first)
        .collect();
    let ok = writes
        .iter()
        .filter(|w| (200..300).contains(&w.status))
        .count();
    let accepted_epochs: std::collections::BTreeSet<String> = writes
        .iter()
        .filter(|w| (200..300).contains(&w.status))
        .map(|w| format!("{}@{}", w.pod, w.epoch))
        .collect();
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "partition: lease {LEASE_SECS}s (claim {}s, margin {}s); {old_leader} led at epoch \
         {old_epoch}; cut off from the API server at +{cut_at:.1}s for {}s",
        LEASE_SECS * 2 / 3,
        LEASE_SECS / 3,
        CUT.as_secs()
    );
    let _ = writeln!(
        summary,
        "partition: old leader's last `leader` answer +{old_last:.2}s ({:.2}s after the cut); \
         {} first `leader` at +{new_first:.2}s (epoch {}); gap {:.2}s",
        old_last - cut_at,
        other.pod,
        new.2,
        new_first - old_last
    );
    let _ = writeln!(
        summary,
        "partition: {} role samples of each pod, {both} with both leading at once; {} writes, \
         {ok} accepted ({accepted_epochs:?}), {} accepted by the old leader after the takeover",
        roles[0].len().min(roles[1].len()),
        writes.len(),
        stale_writes.len()
    );
    eprint!("{summary}");
    let _ = write_artifact("partition-summary.txt", &summary);

    assert!(
        old_last.is_finite() && new_first.is_finite(),
        "no leader sample on one side: old last {old_last}, new first {new_first}"
    );
    assert!(
        old_last < new_first,
        "the old leader still claimed the role at +{old_last:.2}s, after the new one at \
         +{new_first:.2}s"
    );
    assert_eq!(both, 0, "samples with both pods leading at once");
    assert!(
        wrong_epoch.is_empty(),
        "leader claims with another epoch: {wrong_epoch:?}"
    );
    assert!(
        old_last - cut_at < (LEASE_SECS as f64) * 2.0 / 3.0 + 1.5,
        "the old leader kept claiming for {:.2}s after the cut (claim {}s, sampled every 100 ms)",
        old_last - cut_at,
        LEASE_SECS * 2 / 3
    );
    assert!(
        stale_writes.is_empty(),
        "writes accepted by the superseded leader: {stale_writes:?}"
    );
    ns.delete().await;
}
