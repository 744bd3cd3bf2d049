//! Shard-by-shard rollout on the real cluster, under keyed load through a client pod's sidecar.
//! A 4 × 2 demo service (canary 1 shard, then waves of 2, bake 5 s):
//!
//! 1. a new image tag rolls wave by wave: the canary shard alone first, never more than two
//!    shards with a pod missing at once, every pod replaced, and 0 failed requests (every pod
//!    is deleted gracefully by its StatefulSet, so this is also the ordered-termination proof);
//! 2. a revision whose command exits at start halts after the canary shard (condition
//!    Progressing=False/RolloutHalted, a Warning Event naming the shard and the pod's reason)
//!    while shards 1-3 keep their pods and answer every request for their keys;
//! 3. reverting the template rolls the canary shard back and the service is Ready again.
//!
//! The leading operator is SIGKILLed during the second wave: the standby continues the rollout
//! from what the StatefulSets record, leaving no orphaned or duplicated object.
//!
//! Prints its timeline as `rollout:` lines and writes `$SHARDMESH_E2E_LOGS/rollout-summary.txt`.

mod mesh;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    coordination::v1::Lease,
    core::v1::{Event, Pod, Service},
};
use kube::{api::ListParams, Api, ResourceExt};
use mesh::{keyed_value, Http};
use serde_json::json;
use shardmesh_api::{labels, routing::shard_for_key, v1alpha1::condition, ShardedService};
use shardmesh_e2e::{
    apply_service, client, condition as cond, demo_service, is_true, show, wait_for, wait_obj,
    write_artifact, TestNamespace, DEMO_IMAGE, OPERATOR_NAMESPACE,
};

const NAME: &str = "roll";
const SHARDS: u32 = 4;
const REPLICAS: usize = 2;
/// Waves after the canary.
const IN_FLIGHT: usize = 2;
const WORKERS: usize = 6;
const KEYS: usize = 1200;
/// Deadline of one rollout: 8 pods replaced one shard-wave at a time on 2 busy cores.
const ROLLOUT_WAIT: Duration = Duration::from_secs(480);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One request that did not succeed.
#[derive(Clone, Debug)]
struct Failure {
    at: f64,
    shard: u32,
    what: String,
}

#[derive(Default)]
struct Counts {
    sent: u64,
    /// Requests per shard of their key.
    per_shard: BTreeMap<u32, u64>,
    failures: Vec<Failure>,
}

/// PUT then GET over a fixed key set, `WORKERS` at a time. A GET may answer 404 (the PUT went
/// to the other replica: the demo app does not replicate); anything else but 2xx is a failure.
struct KeyLoad {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<Counts>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KeyLoad {
    fn start(http: &Http, proxy: SocketAddr, host: &str, t0: Instant) -> KeyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(Counts::default()));
        let tasks = (0..WORKERS)
            .map(|w| {
                let (stop, counts, http, host) =
                    (stop.clone(), counts.clone(), http.clone(), host.to_string());
                tokio::spawn(async move {
                    let keys: Vec<String> = (w..KEYS)
                        .step_by(WORKERS)
                        .map(|i| format!("r-{i}"))
                        .collect();
                    for key in keys.iter().cycle() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let shard = shard_for_key(key.as_bytes(), SHARDS);
                        for method in ["PUT", "GET"] {
                            let r = keyed_value(&http, proxy, &host, method, key, key).await;
                            let bad = match &r {
                                Ok(r) if (200..300).contains(&r.status) => None,
                                Ok(r) if method == "GET" && r.status == 404 => None,
                                Ok(r) => Some(format!(
                                    "{method} {key}: {} from pod {}: {}",
                                    r.status,
                                    r.pod,
                                    r.body.trim()
                                )),
                                Err(e) => Some(format!("{method} {key}: no answer: {e:#}")),
                            };
                            let mut c = lock(&counts);
                            c.sent += 1;
                            *c.per_shard.entry(shard).or_default() += 1;
                            if let Some(what) = bad {
                                c.failures.push(Failure {
                                    at: t0.elapsed().as_secs_f64(),
                                    shard,
                                    what,
                                });
                            }
                        }
                    }
                })
            })
            .collect();
        KeyLoad {
            stop,
            counts,
            tasks,
        }
    }

    fn snapshot(&self) -> (u64, usize) {
        let c = lock(&self.counts);
        (c.sent, c.failures.len())
    }

    async fn finish(self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load worker panicked");
        }
        std::mem::take(&mut *lock(&self.counts))
    }
}

/// One look at the pods: per shard, how many pods are Ready and not terminating, and the UIDs.
#[derive(Clone, Debug, Default)]
struct PodSample {
    at: f64,
    serving: BTreeMap<u32, usize>,
    uids: BTreeMap<u32, BTreeSet<String>>,
    /// UIDs of pods being deleted.
    terminating: BTreeSet<String>,
    rollout: String,
}

async fn sample(pods: &Api<Pod>, svcs: &Api<ShardedService>, at: f64) -> anyhow::Result<PodSample> {
    let list = pods
        .list(&ListParams::default().labels(&labels::service_selector_string(NAME)))
        .await?;
    let mut s = PodSample {
        at,
        ..PodSample::default()
    };
    for i in 0..SHARDS {
        s.serving.insert(i, 0);
    }
    for p in &list.items {
        let Some(shard) = p
            .labels()
            .get(labels::SHARD)
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        s.uids
            .entry(shard)
            .or_default()
            .insert(p.uid().unwrap_or_default());
        let ready = p
            .status
            .as_ref()
            .and_then(|st| st.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if p.metadata.deletion_timestamp.is_some() {
            s.terminating.insert(p.uid().unwrap_or_default());
        }
        if ready && p.metadata.deletion_timestamp.is_none() {
            *s.serving.entry(shard).or_default() += 1;
        }
    }
    let svc = svcs.get(NAME).await?;
    s.rollout = svc
        .status
        .and_then(|st| st.rollout)
        .map(|r| {
            format!(
                "{} wave {} {:?} {}",
                r.phase, r.wave, r.shards_in_flight, r.updated
            )
        })
        .unwrap_or_default();
    Ok(s)
}

/// Samples pods every 300 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<PodSample>>,
}

impl Sampler {
    fn start(pods: Api<Pod>, svcs: Api<ShardedService>, t0: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(s) = sample(&pods, &svcs, t0.elapsed().as_secs_f64()).await {
                    out.push(s);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            out
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Vec<PodSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("sampler panicked")
    }
}

/// Per shard, the span of samples with a pod missing (first, last), in seconds.
fn disturbed_spans(samples: &[PodSample]) -> BTreeMap<u32, (f64, f64)> {
    let mut spans: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    for s in samples {
        for (&shard, &n) in &s.serving {
            if n < REPLICAS {
                let e = spans.entry(shard).or_insert((s.at, s.at));
                e.1 = s.at;
            }
        }
    }
    spans
}

/// How long each deleted pod took to go (from the first sample showing it terminating to the
/// last showing it at all), sorted.
fn termination_times(samples: &[PodSample]) -> Vec<f64> {
    let mut first: BTreeMap<&str, f64> = BTreeMap::new();
    let mut last: BTreeMap<&str, f64> = BTreeMap::new();
    for s in samples {
        for uid in &s.terminating {
            first.entry(uid.as_str()).or_insert(s.at);
        }
        for uid in s.uids.values().flatten() {
            last.insert(uid.as_str(), s.at);
        }
    }
    let mut v: Vec<f64> = first
        .iter()
        .filter_map(|(uid, a)| Some(last.get(uid)? - a))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn max_disturbed_at_once(samples: &[PodSample]) -> (usize, f64) {
    samples
        .iter()
        .map(|s| (s.serving.values().filter(|&&n| n < REPLICAS).count(), s.at))
        .fold((0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
}

fn rollout_of(svc: &ShardedService) -> Option<(String, String, Option<String>)> {
    let r = svc.status.as_ref()?.rollout.as_ref()?;
    Some((r.revision.clone(), r.phase.clone(), r.halted.clone()))
}

async fn wait_complete(svcs: &Api<ShardedService>, what: &str, not: Option<&str>) -> String {
    wait_for(what, ROLLOUT_WAIT, || async {
        let s = svcs.get(NAME).await?;
        let done = matches!(rollout_of(&s), Some((rev, phase, None))
            if phase == "Complete" && Some(rev.as_str()) != not)
            && is_true(&s, condition::READY)
            && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation;
        if done {
            Ok(rollout_of(&s).map(|r| r.0))
        } else {
            Err(anyhow::anyhow!(
                "{}; rollout {:?}",
                show(&s),
                rollout_of(&s)
            ))
        }
    })
    .await
}

/// SIGKILLs the process of the operator replica holding the controller Lease; returns its pod.
async fn kill_operator_leader(client: &kube::Client) -> String {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let holder = leases
        .get(shardmesh_e2e::OPERATOR_LEASE)
        .await
        .expect("the operator's Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("an operator leads");
    mesh::crash("shardmesh-operator", &holder);
    holder
}

fn set_image(body: &mut serde_json::Value, image: &str, args: Option<&[&str]>) {
    let c = &mut body["spec"]["template"]["spec"]["containers"][0];
    c["image"] = json!(image);
    match args {
        Some(a) => c["args"] = json!(a),
        None => {
            if let Some(o) = c.as_object_mut() {
                o.remove("args");
            }
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (e2e/test.sh)"]
async fn rollout_goes_shard_by_shard_halts_on_a_bad_revision_and_reverts() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "rollout").await;
    let injected = mesh::injection_installed(&client).await;
    let mut body = demo_service(NAME, SHARDS as i32, REPLICAS as i32);
    // Long enough for the sidecar's drain (5 s) and the app's exit.
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(30);
    body["spec"]["rollout"] = json!({
        "canaryShards": 1,
        "maxShardsInFlight": IN_FLIGHT,
        "bakeTime": "5s",
        "progressDeadline": "3m",
    });
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply roll 4x2");
    let first = wait_complete(&svcs, "roll Ready with its first revision rolled out", None).await;
    let cms = ns.api();
    wait_for(
        "the shard map of roll lists 2 members per shard",
        shardmesh_e2e::WAIT,
        || async {
            let m = mesh::shard_map(&cms, NAME).await?;
            let full = m.shards.len() == SHARDS as usize
                && m.shards.iter().all(|s| s.members.len() == REPLICAS);
            Ok(full.then_some(()))
        },
    )
    .await;

    let http = mesh::http();
    let proxy = mesh::start_client(&ns, NAME, &http).await;
    let host = format!("{NAME}.{}:8080", ns.name);
    let pods: Api<Pod> = ns.api();
    let t0 = Instant::now();
    let load = KeyLoad::start(&http, proxy, &host, t0);
    let sampler = Sampler::start(pods.clone(), svcs.clone(), t0);
    let mut summary = String::new();
    let mut problems: Vec<String> = Vec::new();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = sample(&pods, &svcs, 0.0).await.expect("sample pods");

    // 1. A new image tag, shard by shard.
    let next_image = format!("{DEMO_IMAGE}-next");
    set_image(&mut body, &next_image, None);
    let t_apply = t0.elapsed().as_secs_f64();
    apply_service(&svcs, &body)
        .await
        .expect("apply the new image tag");
    // Mid-rollout, the leading operator is SIGKILLed (no release): the standby takes over after
    // the Lease expires and continues from what the StatefulSets record.
    wait_for("the rollout's second wave starts", ROLLOUT_WAIT, || async {
        let s = svcs.get(NAME).await?;
        let r = s.status.and_then(|st| st.rollout);
        Ok(r.filter(|r| r.revision != first && r.wave >= 2).map(|_| ()))
    })
    .await;
    let killed_operator = kill_operator_leader(&client).await;
    let t_killed = t0.elapsed().as_secs_f64();
    let good = wait_complete(
        &svcs,
        "the new image tag rolled out to every shard",
        Some(&first),
    )
    .await;
    let t_done = t0.elapsed().as_secs_f64();
    let after_good = sample(&pods, &svcs, t_done).await.expect("sample pods");
    let (sent_good, failed_good) = load.snapshot();

    // 2. A revision that exits at start: halts after the canary shard.
    let mut broken = body.clone();
    set_image(&mut broken, &next_image, Some(&["--no-such-flag"]));
    let t_broken = t0.elapsed().as_secs_f64();
    apply_service(&svcs, &broken)
        .await
        .expect("apply the broken revision");
    let halted = wait_for(
        "the rollout of the broken revision halts",
        ROLLOUT_WAIT,
        || async {
            let s = svcs.get(NAME).await?;
            match rollout_of(&s) {
                Some((rev, phase, Some(why))) if phase == "Halted" && rev != good => {
                    Ok(Some((s, why)))
                }
                r => Err(anyhow::anyhow!("rollout {r:?}; {}", show(&s))),
            }
        },
    )
    .await;
    let t_halted = t0.elapsed().as_secs_f64();
    let (svc_halted, why) = halted;
    if !why.starts_with("shard 0:") {
        problems.push(format!("the halt must name the canary shard 0: {why}"));
    }
    match cond(&svc_halted, condition::PROGRESSING) {
        Some((status, reason, _)) if status == "False" && reason == "RolloutHalted" => {}
        other => problems.push(format!("Progressing while halted: {other:?}")),
    }
    let events: Api<Event> = ns.api();
    let halt_event = wait_for("a RolloutHalted Event", shardmesh_e2e::WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("RolloutHalted"))
            .map(|e| (e.type_.unwrap_or_default(), e.message.unwrap_or_default())))
    })
    .await;
    if halt_event.0 != "Warning" || !halt_event.1.contains("shard 0") {
        problems.push(format!("RolloutHalted event: {halt_event:?}"));
    }
    // Shards 1-3 keep serving on their pods for a while after the halt.
    let (_, failed_at_halt) = load.snapshot();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let halted_sample = sample(&pods, &svcs, t0.elapsed().as_secs_f64())
        .await
        .expect("sample pods");
    for shard in 1..SHARDS {
        if halted_sample.uids.get(&shard) != after_good.uids.get(&shard) {
            problems.push(format!(
                "shard {shard} was touched by the halted rollout: pods {:?} -> {:?}",
                after_good.uids.get(&shard),
                halted_sample.uids.get(&shard)
            ));
        }
    }
    if halted_sample.serving.get(&0).copied().unwrap_or(0) < 1 {
        problems.push("the canary shard has no serving pod while halted".into());
    }

    // 3. Revert: the canary shard rolls back; Ready again on the good revision.
    let t_revert = t0.elapsed().as_secs_f64();
    apply_service(&svcs, &body)
        .await
        .expect("revert the template");
    let reverted = wait_complete(&svcs, "the revert rolled out and cleared the halt", None).await;
    if reverted != good {
        problems.push(format!(
            "the reverted template has revision {reverted}, not the good revision {good}"
        ));
    }
    let t_end = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = sampler.finish().await;
    let counts = load.finish().await;

    // The new image tag: wave order and concurrency.
    let good_samples: Vec<PodSample> = samples
        .iter()
        .filter(|s| s.at >= t_apply && s.at <= t_done)
        .cloned()
        .collect();
    let spans = disturbed_spans(&good_samples);
    let (max_at_once, max_at) = max_disturbed_at_once(&good_samples);
    let _ = writeln!(
        summary,
        "rollout: 4x2, canary 1 then waves of {IN_FLIGHT}, bake 5s; new image tag applied at \
         +{t_apply:.1}s, complete at +{t_done:.1}s ({:.1}s)",
        t_done - t_apply
    );
    for (shard, (a, b)) in &spans {
        let _ = writeln!(
            summary,
            "rollout: shard {shard} had a pod missing from +{a:.1}s to +{b:.1}s"
        );
    }
    let _ = writeln!(
        summary,
        "rollout: at most {max_at_once} shards had a pod missing at once (at +{max_at:.1}s)"
    );
    let gone = termination_times(&good_samples);
    let _ = writeln!(
        summary,
        "rollout: {} graceful pod terminations: median {:.1}s, max {:.1}s (sidecar drain delay 5s, \
         grace period 30s)",
        gone.len(),
        gone.get(gone.len() / 2).copied().unwrap_or(0.0),
        gone.last().copied().unwrap_or(0.0)
    );
    if max_at_once > IN_FLIGHT {
        problems.push(format!(
            "{max_at_once} shards had a pod missing at once (+{max_at:.1}s); at most {IN_FLIGHT} \
             may"
        ));
    }
    match spans.get(&0) {
        Some(&(_, canary_end)) => {
            for (shard, (a, _)) in spans.iter().filter(|(s, _)| **s != 0) {
                if *a <= canary_end {
                    problems.push(format!(
                        "shard {shard} lost a pod at +{a:.1}s, before the canary shard 0 was \
                         done (+{canary_end:.1}s)"
                    ));
                }
            }
        }
        None => problems.push("the canary shard 0 never replaced a pod".into()),
    }
    for shard in 0..SHARDS {
        let (a, b) = (before.uids.get(&shard), after_good.uids.get(&shard));
        if a.zip(b).is_none_or(|(a, b)| !a.is_disjoint(b)) {
            problems.push(format!(
                "shard {shard}: not every pod was replaced by the new image tag: {a:?} -> {b:?}"
            ));
        }
    }
    let phases: Vec<String> =
        samples
            .iter()
            .map(|s| s.rollout.clone())
            .fold(Vec::new(), |mut v, r| {
                if v.last() != Some(&r) {
                    v.push(r);
                }
                v
            });
    let _ = writeln!(summary, "rollout: status trail {phases:?}");
    let _ = writeln!(
        summary,
        "rollout: the leading operator {killed_operator} was SIGKILLed at +{t_killed:.1}s, \
         during wave 2"
    );
    // No orphaned or duplicated objects after the operator's crash: exactly the shards'
    // StatefulSets and Services, every shard released for the good revision.
    let sts: Api<StatefulSet> = ns.api();
    let sets = sts
        .list(&ListParams::default().labels(&labels::service_selector_string(NAME)))
        .await
        .expect("list StatefulSets")
        .items;
    let names: BTreeSet<String> = sets.iter().map(|s| s.name_any()).collect();
    let want: BTreeSet<String> = (0..SHARDS).map(|i| format!("{NAME}-{i}")).collect();
    if names != want || sets.len() != want.len() {
        problems.push(format!(
            "StatefulSets after the rollout: {names:?}, want {want:?}"
        ));
    }
    for s in &sets {
        let released = s
            .annotations()
            .get("shardmesh.io/released-revision")
            .cloned();
        let partition = s
            .spec
            .as_ref()
            .and_then(|sp| sp.update_strategy.as_ref())
            .and_then(|u| u.rolling_update.as_ref())
            .and_then(|r| r.partition);
        if released.as_deref() != Some(good.as_str()) || partition != Some(0) {
            problems.push(format!(
                "{}: released for {released:?} with partition {partition:?}, want {good} and 0",
                s.name_any()
            ));
        }
    }
    let services: Api<Service> = ns.api();
    let svc_names: BTreeSet<String> = services
        .list(&ListParams::default().labels(&labels::service_selector_string(NAME)))
        .await
        .expect("list Services")
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    let mut want_svcs = want.clone();
    want_svcs.insert(NAME.to_string());
    if svc_names != want_svcs {
        problems.push(format!(
            "Services after the rollout: {svc_names:?}, want {want_svcs:?}"
        ));
    }
    let _ = writeln!(
        summary,
        "rollout: broken revision applied at +{t_broken:.1}s, halted at +{t_halted:.1}s: {why}"
    );
    let _ = writeln!(
        summary,
        "rollout: reverted at +{t_revert:.1}s, Ready at +{t_end:.1}s"
    );
    let _ = writeln!(
        summary,
        "rollout: {} requests ({sent_good} until the new tag was out), per shard {:?}; failed: \
         {} (new tag: {failed_good}, until the halt: {failed_at_halt})",
        counts.sent,
        counts.per_shard,
        counts.failures.len()
    );
    let mut by_shard: BTreeMap<u32, usize> = BTreeMap::new();
    for f in &counts.failures {
        *by_shard.entry(f.shard).or_default() += 1;
    }
    let _ = writeln!(summary, "rollout: failures per shard {by_shard:?}");
    for f in counts.failures.iter().take(20) {
        let _ = writeln!(
            summary,
            "rollout:   +{:.1}s shard {}: {}",
            f.at, f.shard, f.what
        );
    }
    eprint!("{summary}");
    let _ = write_artifact("rollout-summary.txt", &summary);

    if !counts.failures.is_empty() {
        problems.push(format!(
            "{} of {} requests failed (per shard {by_shard:?}); first: {:?}",
            counts.failures.len(),
            counts.sent,
            counts.failures.first()
        ));
    }
    assert!(
        problems.is_empty(),
        "rollout problems:\n{}",
        problems.join("\n")
    );
    let _ = wait_obj(
        &svcs,
        NAME,
        "roll still Ready",
        |s| is_true(s, condition::READY),
        show,
    )
    .await;
    ns.delete().await;
}
