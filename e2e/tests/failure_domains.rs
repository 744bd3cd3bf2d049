//! Failure domains on a 3-node cluster (e2e/test.sh adds nodes 1 and 2 with
//! e2e/scripts/node-add.sh in its failure-domains phase). A 3 × 2 demo service:
//!
//! 1. the two replicas of every shard run on different nodes (the operator's topology spread
//!    constraints), and every shard has its PodDisruptionBudget (policy/v1beta1 on 1.20);
//! 2. `kubectl drain` of node 1 under keyed load through a client sidecar (pinned to the first
//!    node) completes while every shard keeps a Ready replica, with 0 failed requests;
//! 3. node 2 stops abruptly (e2e/scripts/node-stop.sh: its link, kubelet, kube-proxy,
//!    containerd, shims and containers) under the same load: the failures are counted and
//!    printed, and none may happen after the first per-try timeout; the status shows the shards
//!    that lost a replica Degraded once the control plane marks the node's pods not Ready; then
//!    the Node object is deleted, as a cloud provider's node controller does when the machine is
//!    gone (a StatefulSet never replaces a pod that still exists, and on 1.20 the pods of an
//!    unreachable node are only evicted after `pod-eviction-timeout`, and their deletion then
//!    waits for a kubelet that will not come back), the pod garbage collector removes its pods,
//!    the StatefulSets recreate them on the remaining nodes, and the status is Ready again.
//!
//! Prints its timeline as `failure-domains:` lines and writes
//! `$SHARDMESH_E2E_LOGS/failure-domains-summary.txt`.

mod mesh;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use kube::{api::DeleteParams, Api, ResourceExt};
use mesh::Load;
use shardmesh_api::{labels, v1alpha1::condition, ShardedService};
use shardmesh_e2e::{
    apply_service, client, demo_service, is_true, show, wait_for, wait_obj, write_artifact,
    TestNamespace, WAIT,
};
use shardmesh_operator::{
    capabilities::Capabilities,
    disruption::{PdbApi, PodDisruptionBudgetV1beta1},
};

const NAME: &str = "spread";
const SHARDS: u32 = 3;
const REPLICAS: usize = 2;
/// The node names e2e/scripts/lib.sh gives: the cluster's own node and added nodes 1 and 2.
const FIRST_NODE: &str = "shardmesh-e2e-node";
const DRAINED: &str = "shardmesh-e2e-node-1";
const LOST_INDEX: &str = "2";
const LOST: &str = "shardmesh-e2e-node-2";
/// The demo service's per-try timeout (the default): failures are tolerated only for requests
/// sent within one per-try timeout of the node's loss.
const PER_TRY: Duration = Duration::from_secs(2);
/// The node lifecycle controller marks an unreachable node's pods not Ready after
/// `node-monitor-grace-period` (40 s), then the status follows.
const NODE_LOSS_WAIT: Duration = Duration::from_secs(180);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Shard → (pod, node, Ready) of the service's pods that are not being deleted.
async fn layout(pods: &Api<Pod>) -> anyhow::Result<BTreeMap<u32, Vec<(String, String, bool)>>> {
    let list = pods
        .list(&kube::api::ListParams::default().labels(&labels::service_selector_string(NAME)))
        .await?;
    let mut out: BTreeMap<u32, Vec<(String, String, bool)>> = BTreeMap::new();
    for p in list.items {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let shard = p
            .labels()
            .get(labels::SHARD)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("pod {} has no shard label", p.name_any()))?;
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        out.entry(shard)
            .or_default()
            .push((p.name_any(), node, ready(&p)));
    }
    Ok(out)
}

/// Every shard has all its replicas Ready, each on a different node, none on `avoid`.
fn spread_and_ready(
    l: &BTreeMap<u32, Vec<(String, String, bool)>>,
    avoid: &[&str],
) -> Result<(), String> {
    for shard in 0..SHARDS {
        let pods = l.get(&shard).cloned().unwrap_or_default();
        let mut nodes: Vec<&str> = pods.iter().map(|(_, n, _)| n.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        if pods.len() != REPLICAS || !pods.iter().all(|p| p.2) {
            return Err(format!("shard {shard}: {pods:?} (want {REPLICAS} Ready)"));
        }
        if nodes.len() != REPLICAS || nodes.iter().any(|n| n.is_empty()) {
            return Err(format!("shard {shard}: replicas share a node: {pods:?}"));
        }
        if let Some(n) = nodes.iter().find(|n| avoid.contains(n)) {
            return Err(format!("shard {shard}: a replica is on {n}: {pods:?}"));
        }
    }
    Ok(())
}

/// Waits (up to `timeout`) until [`spread_and_ready`] holds, avoiding `avoid`; the layout seen.
async fn spread(
    pods: &Api<Pod>,
    what: &str,
    avoid: &[&str],
    timeout: Duration,
) -> BTreeMap<u32, Vec<(String, String, bool)>> {
    wait_for(what, timeout, || async {
        let l = layout(pods).await?;
        spread_and_ready(&l, avoid)
            .map(|()| Some(l))
            .map_err(|e| anyhow::anyhow!(e))
    })
    .await
}

/// Polls the pods every 250 ms and keeps each shard's fewest Ready replicas seen.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    min: Arc<Mutex<BTreeMap<u32, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    fn start(pods: Api<Pod>) -> ReadyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let min = Arc::new(Mutex::new(BTreeMap::new()));
        let task = {
            let (stop, min) = (stop.clone(), min.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(l) = layout(&pods).await {
                        let mut m = lock(&min);
                        for shard in 0..SHARDS {
                            let n = l
                                .get(&shard)
                                .map_or(0, |ps| ps.iter().filter(|p| p.2).count());
                            let e = m.entry(shard).or_insert(n);
                            *e = (*e).min(n);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        ReadyWatch { stop, min, task }
    }

    async fn finish(self) -> BTreeMap<u32, usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("ready watch task");
        let m = lock(&self.min).clone();
        m
    }
}

/// Runs a command to completion off the async runtime; (success, stdout + stderr).
async fn run(program: &str, args: &[&str]) -> (bool, String) {
    let (program, args): (String, Vec<String>) = (
        program.to_string(),
        args.iter().map(ToString::to_string).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .expect("command task")
}

fn say(summary: &mut String, t0: Instant, line: &str) {
    let l = format!(
        "failure-domains: {:7.1}s {line}",
        t0.elapsed().as_secs_f64()
    );
    eprintln!("{l}");
    let _ = writeln!(summary, "{l}");
}

#[tokio::test]
#[ignore = "e2e: needs the 3-node cluster of e2e/test.sh's failure-domains phase"]
async fn failure_domains_drain_and_node_loss() {
    let client = client().await;
    let t0 = Instant::now();
    let mut summary = String::new();
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for(
        &format!(
            "nodes {FIRST_NODE}, {DRAINED} and {LOST} Ready (e2e/scripts/node-add.sh 1 and 2)"
        ),
        WAIT,
        || async {
            let list = nodes.list(&Default::default()).await?;
            let ready: Vec<String> = list
                .items
                .iter()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
                .map(|n| n.name_any())
                .collect();
            let want = [FIRST_NODE, DRAINED, LOST];
            if want.iter().all(|w| ready.iter().any(|r| r == w)) {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("Ready nodes: {ready:?}"))
            }
        },
    )
    .await;

    let ns = TestNamespace::create(&client, "fd").await;
    let svcs: Api<ShardedService> = ns.api();
    let pods: Api<Pod> = ns.api();
    let injected = mesh::injection_installed(&client).await;
    let mut body = demo_service(NAME, SHARDS as i32, REPLICAS as i32);
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    apply_service(&svcs, &body)
        .await
        .expect("apply ShardedService");
    wait_obj(
        &svcs,
        NAME,
        "3 x 2 Ready",
        |s| is_true(s, condition::READY),
        show,
    )
    .await;

    // 1. Placement: the replicas of every shard on different nodes.
    let placed = spread(
        &pods,
        "every shard's replicas Ready on different nodes",
        &[],
        WAIT,
    )
    .await;
    say(&mut summary, t0, &format!("placed: {placed:?}"));

    // Every shard has a disruption budget, on the API the server serves.
    let caps = Capabilities::detect(&client).await.expect("capabilities");
    let mut budgets = match caps.pdb {
        Some(PdbApi::V1) => names(ns.api::<PodDisruptionBudget>()).await,
        Some(PdbApi::V1beta1) => names(ns.api::<PodDisruptionBudgetV1beta1>()).await,
        None => panic!(
            "the server {} serves no PodDisruptionBudget API",
            caps.version
        ),
    };
    budgets.sort();
    let want: Vec<String> = (0..SHARDS)
        .map(|i| labels::shard_object_name(NAME, i))
        .collect();
    assert_eq!(budgets, want, "one budget per shard");
    say(
        &mut summary,
        t0,
        &format!(
            "budgets ({}): {budgets:?}",
            caps.pdb.map_or("none", PdbApi::api_version)
        ),
    );

    // 2. Drain node 1 under load.
    let http = mesh::http();
    let proxy = mesh::start_client_on(&ns, NAME, &http, Some(FIRST_NODE)).await;
    let host = format!("{NAME}.{}:8080", ns.name);
    let load = Load::start(&http, proxy, &host, "GET", "fd");
    let watch = ReadyWatch::start(pods.clone());
    let t_drain = Instant::now();
    say(&mut summary, t0, &format!("draining {DRAINED}"));
    let (ok, out) = run(
        "kubectl",
        &[
            "drain",
            DRAINED,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=240s",
        ],
    )
    .await;
    assert!(ok, "kubectl drain {DRAINED} failed:\n{out}");
    say(
        &mut summary,
        t0,
        &format!("drain completed in {:.1}s", t_drain.elapsed().as_secs_f64()),
    );
    let after_drain = spread(
        &pods,
        &format!("every shard Ready again on different nodes, none on {DRAINED}"),
        &[DRAINED],
        WAIT,
    )
    .await;
    let min_ready = watch.finish().await;
    let drain_failed = load.failed_since(t_drain);
    say(
        &mut summary,
        t0,
        &format!(
            "after drain: {after_drain:?}; fewest Ready replicas per shard during the drain \
             {min_ready:?}; {} requests so far, {drain_failed} failed since the drain began",
            load.sent()
        ),
    );
    assert!(
        (0..SHARDS).all(|s| min_ready.get(&s).copied().unwrap_or(0) >= 1),
        "a shard had no Ready replica during the drain: {min_ready:?}"
    );
    assert_eq!(drain_failed, 0, "requests failed during the drain");
    let (ok, out) = run("kubectl", &["uncordon", DRAINED]).await;
    assert!(ok, "kubectl uncordon {DRAINED}: {out}");

    // 3. Lose node 2 abruptly under the same load.
    let hit: Vec<u32> = after_drain
        .iter()
        .filter(|(_, ps)| ps.iter().any(|(_, n, _)| n == LOST))
        .map(|(s, _)| *s)
        .collect();
    assert!(
        !hit.is_empty(),
        "no shard has a replica on {LOST}: {after_drain:?}"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/node-stop.sh");
    let t_stop = Instant::now();
    let (ok, out) = run(script, &[LOST_INDEX]).await;
    assert!(ok, "{script} {LOST_INDEX} failed:\n{out}");
    say(
        &mut summary,
        t0,
        &format!("stopped {LOST} abruptly; shards with a replica there: {hit:?}"),
    );
    let degraded = wait_for(
        "the status to show the shards that lost a replica Degraded",
        NODE_LOSS_WAIT,
        || async {
            let s = svcs.get(NAME).await?;
            let st = s.status.clone().unwrap_or_default();
            let short: Vec<u32> = st
                .shards
                .iter()
                .filter(|sh| sh.ready_replicas < sh.replicas)
                .map(|sh| sh.index as u32)
                .collect();
            let degraded =
                shardmesh_e2e::condition(&s, condition::DEGRADED).is_some_and(|c| c.0 == "True");
            if degraded && short == hit {
                Ok(Some(show(&s)))
            } else {
                Err(anyhow::anyhow!(
                    "shards short of replicas {short:?}; {}",
                    show(&s)
                ))
            }
        },
    )
    .await;
    say(
        &mut summary,
        t0,
        &format!(
            "Degraded {:.1}s after the stop: {degraded}",
            t_stop.elapsed().as_secs_f64()
        ),
    );
    // What a cloud provider's node controller does once the machine is gone.
    nodes
        .delete(LOST, &DeleteParams::default())
        .await
        .expect("delete the lost node's Node object");
    say(&mut summary, t0, &format!("deleted Node {LOST}"));
    let healed = spread(
        &pods,
        &format!("every shard Ready again on different nodes, none on {LOST}"),
        &[LOST],
        NODE_LOSS_WAIT,
    )
    .await;
    let status = wait_obj(
        &svcs,
        NAME,
        "Ready and not Degraded",
        |s| {
            is_true(s, condition::READY)
                && shardmesh_e2e::condition(s, condition::DEGRADED).is_none_or(|c| c.0 != "True")
        },
        show,
    )
    .await;
    say(
        &mut summary,
        t0,
        &format!(
            "healed {:.1}s after the stop: {healed:?}; {}",
            t_stop.elapsed().as_secs_f64(),
            show(&status)
        ),
    );
    let late_failed = load.failed_since(t_stop + PER_TRY);
    let (sent, failures, last) = load.finish().await;
    let stop_failed = failures.values().sum::<u64>();
    say(
        &mut summary,
        t0,
        &format!(
            "load: {sent} requests, {stop_failed} failed (by status, 0 = no answer: {failures:?}; \
             last: {last:?}), {late_failed} sent later than {PER_TRY:?} after the node's loss"
        ),
    );
    if let Ok(Some(p)) = write_artifact("failure-domains-summary.txt", &summary) {
        eprintln!("failure-domains: summary in {}", p.display());
    }
    assert_eq!(
        late_failed, 0,
        "requests failed later than one per-try timeout after the node's loss"
    );
    ns.delete().await;
}

/// The names of every object `api` lists.
async fn names<K>(api: kube::Api<K>) -> Vec<String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("list {}s: {e}", K::kind(&())))
        .items
        .iter()
        .map(|o| o.name_any())
        .collect()
}
