//! Benchmarks on the real cluster (BENCHMARKS.md, parts 3 and 4), driven by `e2e/bench/run.sh`.
//!
//! `scale_bench operator --services N --operator-pid PID --metrics ADDR [--per-namespace M]`:
//! applies N ShardedServices of 4 shards × 3 replicas into fresh namespaces (M per namespace,
//! default all in one) whose ResourceQuota admits no pods (so the node runs no shard pods and the operator is what is measured), then waits
//! until every service has all its child objects and `status.observedGeneration` equals its
//! generation (polled every 250 ms from the API server's watch cache). Reports the time, the operator's CPU seconds and RSS (from `/proc/PID`) and its
//! API requests per reconcile (deltas of its `/metrics`). Aborts when the machine's available
//! memory falls under 2 GiB.
//!
//! `scale_bench webhook --pods K`: creates K pods the injector mutates (label
//! `shardmesh.io/inject: enabled`) and K it does not, alternating, and reports the latency of the
//! pod-create API call of each kind. The pods select no node, so they stay Pending and the
//! node's work does not disturb the figures.
//!
//! Needs the harness' environment (`SHARDMESH_E2E=1`, `KUBECONFIG`) inside the cluster's
//! network namespace. Prints one `RESULT <json>` line at the end. Fails only when the benchmark
//! cannot run or the objects do not converge before the deadline, never on timing.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures::{stream, TryStreamExt};
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Pod, ResourceQuota, Service, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client, ResourceExt,
};
use serde_json::{json, Value};
use shardmesh_api::{labels, shardmap::ShardMapSlice, ShardedService};
use shardmesh_e2e::{apply_service, demo_service, TestNamespace};

const SHARDS: u32 = 4;
const REPLICAS: i32 = 3;
const SIDECAR_CONTAINER: &str = "shardmesh-sidecar";

const USAGE: &str = "\
usage: scale_bench operator --services N --operator-pid PID --metrics HOST:PORT
                            [--per-namespace M] [--deadline SECS] [--concurrency C] [--settle SECS] [--quiet SECS]
                            [--clk-tck HZ] [--keep]
       scale_bench webhook  --pods K [--warmup W] [--keep]
Run inside the cluster's network namespace with SHARDMESH_E2E=1 and KUBECONFIG (e2e/bench/run.sh).";

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn value(&mut self, flag: &str) -> anyhow::Result<Option<String>> {
        match self.rest.iter().position(|a| a == flag) {
            None => Ok(None),
            Some(i) if i + 1 < self.rest.len() => {
                let v = self.rest.remove(i + 1);
                self.rest.remove(i);
                Ok(Some(v))
            }
            Some(_) => bail!("{flag} needs a value\n{USAGE}"),
        }
    }

    fn num<T: std::str::FromStr>(&mut self, flag: &str, default: Option<T>) -> anyhow::Result<T> {
        match self.value(flag)? {
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: not a number: {v}\n{USAGE}")),
            None => default.ok_or_else(|| anyhow::anyhow!("{flag} is required\n{USAGE}")),
        }
    }

    fn flag(&mut self, flag: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != flag);
        before != self.rest.len()
    }

    fn finish(self) -> anyhow::Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            bail!("unknown arguments {:?}\n{USAGE}", self.rest)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() || argv.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    let command = argv.remove(0);
    let mut args = Args { rest: argv };
    match command.as_str() {
        "operator" => {
            let opts = OperatorOpts {
                services: args.num("--services", None)?,
                per_namespace: args.num("--per-namespace", Some(usize::MAX))?,
                pid: args.num("--operator-pid", None)?,
                metrics: args
                    .value("--metrics")?
                    .ok_or_else(|| anyhow::anyhow!("--metrics is required\n{USAGE}"))?,
                deadline: Duration::from_secs(args.num("--deadline", Some(600))?),
                concurrency: args.num("--concurrency", Some(8))?,
                settle: Duration::from_secs(args.num("--settle", Some(5))?),
                quiet: Duration::from_secs(args.num("--quiet", Some(60))?),
                clk_tck: args.num("--clk-tck", Some(100.0))?,
                keep: args.flag("--keep"),
            };
            args.finish()?;
            operator_bench(opts).await
        }
        "webhook" => {
            let pods = args.num("--pods", None)?;
            let warmup = args.num("--warmup", Some(5))?;
            let keep = args.flag("--keep");
            args.finish()?;
            webhook_bench(pods, warmup, keep).await
        }
        other => bail!("unknown command {other}\n{USAGE}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The operator process: /proc and /metrics.

/// CPU seconds (user + system) of process `pid`.
fn cpu_seconds(pid: u32, clk_tck: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is the operator running?)"))?;
    // Fields after "(comm) ": state is field 3, utime field 14, stime field 15.
    let after = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / clk_tck)
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is the operator running?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Below this much available memory (MiB) the operator benchmark aborts.
const MIN_AVAILABLE_MIB: u64 = 2048;

/// MemAvailable of the machine in MiB.
fn mem_available_mib() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// The operator's counters from its `/metrics`: series (name with labels) → value.
fn scrape(addr: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut conn = TcpStream::connect(addr)
        .with_context(|| format!("connecting to the operator's metrics endpoint {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    let (head, text) = body
        .split_once("\r\n\r\n")
        .context("no HTTP response from /metrics")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "/metrics on {addr} answered {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// The API server's verbs that write.
const WRITE_VERBS: [&str; 6] = [
    "create",
    "update",
    "patch",
    "apply",
    "delete",
    "deletecollection",
];

struct Sample {
    at: Instant,
    cpu: f64,
    metrics: BTreeMap<String, f64>,
}

impl Sample {
    fn take(o: &OperatorOpts) -> anyhow::Result<Self> {
        Ok(Sample {
            at: Instant::now(),
            cpu: cpu_seconds(o.pid, o.clk_tck)?,
            metrics: scrape(&o.metrics)?,
        })
    }

    fn sum(&self, prefix: &str) -> f64 {
        self.metrics
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum of the series of `name` whose labels include every one of `labels`
    /// (`key="value"`).
    fn sum_where(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(name).is_some_and(|rest| {
                    rest.starts_with('{') && labels.iter().all(|l| rest.contains(l))
                })
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn reconciles(&self) -> f64 {
        self.sum("shardmesh_operator_reconciles_total{")
    }

    /// Requests that change something on the API server.
    fn writes(&self) -> f64 {
        WRITE_VERBS
            .iter()
            .map(|v| {
                self.sum_where(
                    "shardmesh_operator_api_requests_total",
                    &[&format!("verb=\"{v}\"")],
                )
            })
            .sum()
    }

    fn requests(&self) -> f64 {
        self.sum("shardmesh_operator_api_requests_total{")
    }

    /// Per-verb request counts since `base`.
    fn requests_by_verb(&self, base: &Sample) -> BTreeMap<String, f64> {
        let prefix = "shardmesh_operator_api_requests_total{verb=\"";
        self.metrics
            .iter()
            .filter_map(|(k, v)| {
                let verb = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
                let d = v - base.metrics.get(k).copied().unwrap_or(0.0);
                (d > 0.0).then(|| (verb.to_string(), d))
            })
            .collect()
    }
}

/// Samples VmRSS every 100 ms until stopped; keeps the peak (KiB).
fn rss_sampler(
    pid: u32,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(kib) = status_kib(pid, "VmRSS") {
                peak.fetch_max(kib, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Part 3: the operator at scale.

struct OperatorOpts {
    services: usize,
    per_namespace: usize,
    pid: u32,
    metrics: String,
    deadline: Duration,
    concurrency: usize,
    settle: Duration,
    /// How long the operator is watched with nothing changing, after convergence: at least
    /// the 30 s after which a service that is not Ready is looked at again, so every service
    /// is resynced in it.
    quiet: Duration,
    clk_tck: f64,
    keep: bool,
}

/// What the benchmark saw in its namespaces: object keys (`<ns>/<name>`) per kind, and per
/// ShardedService its (generation, status.observedGeneration).
#[derive(Default)]
struct Seen {
    names: BTreeMap<&'static str, BTreeSet<String>>,
    generations: BTreeMap<String, (Option<i64>, Option<i64>)>,
}

impl Seen {
    /// Adds what a later poll saw (nothing here deletes, so objects only appear; generations
    /// are replaced by the later view).
    fn merge(&mut self, later: Seen) {
        for (kind, names) in later.names {
            self.names.entry(kind).or_default().extend(names);
        }
        self.generations.extend(later.generations);
    }
}

/// Adds the names of the objects of kind `K` in `ns` to `seen.names[kind]`: a metadata-only list
/// served from the API server's watch cache (`resourceVersion=0`), so polling it does not read
/// etcd.
async fn list_names<K>(client: &Client, ns: &str, kind: &'static str) -> anyhow::Result<Vec<String>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let list = api
        .list_metadata(&ListParams::default().match_any())
        .await
        .with_context(|| format!("listing {kind}s in {ns}"))?;
    Ok(list
        .items
        .into_iter()
        .map(|o| format!("{ns}/{}", o.name_any()))
        .collect())
}

/// One look at everything the benchmark waits for in `namespaces`.
async fn snapshot(
    client: &Client,
    namespaces: &[&str],
    budgets: Option<&kube::discovery::ApiResource>,
) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    for ns in namespaces {
        if let Some(ar) = budgets {
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
            let list = api
                .list_metadata(&ListParams::default().match_any())
                .await
                .with_context(|| format!("listing PodDisruptionBudgets in {ns}"))?;
            seen.names.entry("PodDisruptionBudget").or_default().extend(
                list.items
                    .into_iter()
                    .map(|o| format!("{ns}/{}", o.name_any())),
            );
        }
        let (sts, svcs, cms, slices, sas, roles, bindings, shsvcs) = futures::try_join!(
            list_names::<StatefulSet>(client, ns, "StatefulSet"),
            list_names::<Service>(client, ns, "Service"),
            list_names::<ConfigMap>(client, ns, "ConfigMap"),
            list_names::<ShardMapSlice>(client, ns, "ShardMapSlice"),
            list_names::<ServiceAccount>(client, ns, "ServiceAccount"),
            list_names::<Role>(client, ns, "Role"),
            list_names::<RoleBinding>(client, ns, "RoleBinding"),
            async {
                let api: Api<ShardedService> = Api::namespaced(client.clone(), ns);
                api.list(&ListParams::default().match_any())
                    .await
                    .with_context(|| format!("listing ShardedServices in {ns}"))
            },
        )?;
        for (kind, names) in [
            ("StatefulSet", sts),
            ("Service", svcs),
            ("ConfigMap", cms),
            ("ShardMapSlice", slices),
            ("ServiceAccount", sas),
            ("Role", roles),
            ("RoleBinding", bindings),
        ] {
            seen.names.entry(kind).or_default().extend(names);
        }
        for s in shsvcs.items {
            let observed = s.status.as_ref().and_then(|st| st.observed_generation);
            seen.generations.insert(
                format!("{ns}/{}", s.name_any()),
                (s.metadata.generation, observed),
            );
        }
    }
    Ok(seen)
}

/// Per service, what is still missing (an empty map: all converged); and objects seen per kind.
fn missing(
    seen: &Seen,
    services: &[(String, String)],
    budgets: bool,
) -> (BTreeMap<String, Vec<String>>, Value) {
    let empty = BTreeSet::new();
    let has = |kind: &str, name: &str| seen.names.get(kind).unwrap_or(&empty).contains(name);
    let mut missing = BTreeMap::new();
    for (ns, name) in services {
        let mut wanted = Vec::new();
        for i in 0..SHARDS {
            let shard = labels::shard_object_name(name, i);
            wanted.push(("StatefulSet", shard.clone()));
            if budgets {
                wanted.push(("PodDisruptionBudget", shard.clone()));
            }
            wanted.push(("Service", shard.clone()));
            wanted.push(("ShardMapSlice", shard));
        }
        wanted.push(("Service", name.clone()));
        wanted.push(("ConfigMap", labels::shardmap_name(name)));
        for i in 0..SHARDS {
            let member = labels::member_account_name(name, i);
            wanted.push(("ServiceAccount", member.clone()));
            wanted.push(("Role", member.clone()));
            wanted.push(("RoleBinding", member));
        }
        wanted.push(("Role", labels::shardmap_reader_name(name)));
        let mut m: Vec<String> = wanted
            .into_iter()
            .filter(|(kind, n)| !has(kind, &format!("{ns}/{n}")))
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        match seen.generations.get(&format!("{ns}/{name}")) {
            None => m.push("the ShardedService itself".to_string()),
            Some((g, o)) if g.is_none() || o != g => m.push(format!(
                "status.observedGeneration {} (generation {})",
                o.map_or("unset".to_string(), |o| o.to_string()),
                g.map_or("unset".to_string(), |g| g.to_string()),
            )),
            Some(_) => {}
        }
        if !m.is_empty() {
            missing.insert(format!("{ns}/{name}"), m);
        }
    }
    let present: serde_json::Map<String, Value> = seen
        .names
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.len())))
        .collect();
    (missing, Value::Object(present))
}

fn objects_per_service(budgets: bool) -> usize {
    // Per shard: a StatefulSet, a headless Service, a ShardMapSlice and the member
    // ServiceAccount, Role and RoleBinding (and a PodDisruptionBudget where the server serves a
    // policy API); once: the routing Service, the shard-map index ConfigMap, the reader Role.
    (6 + usize::from(budgets)) * SHARDS as usize + 3
}

/// The PodDisruptionBudget API the server serves (`policy/v1`, else `policy/v1beta1`), if any.
async fn budget_api(client: &Client) -> Option<kube::discovery::ApiResource> {
    for version in ["v1", "v1beta1"] {
        let gvk = kube::api::GroupVersionKind::gvk("policy", version, "PodDisruptionBudget");
        let ar = kube::discovery::ApiResource::from_gvk_with_plural(&gvk, "poddisruptionbudgets");
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
        if api
            .list_metadata(&ListParams::default().limit(1))
            .await
            .is_ok()
        {
            return Some(ar);
        }
    }
    None
}

/// A ResourceQuota of 0 pods in `ns`: the StatefulSet controller's pod creates are refused, so
/// the 12 pods per service never reach the scheduler or the node.
async fn no_pods(ns: &TestNamespace) -> anyhow::Result<()> {
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}}
    }))?;
    let quotas: Api<ResourceQuota> = ns.api();
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .with_context(|| format!("creating the ResourceQuota no-pods in {}", ns.name))?;
    shardmesh_e2e::wait_for(
        &format!(
            "ResourceQuota {}/no-pods counted by the quota controller",
            ns.name
        ),
        Duration::from_secs(60),
        || async {
            let q = quotas.get("no-pods").await?;
            Ok(q.status.and_then(|s| s.hard).map(|_| ()))
        },
    )
    .await;
    Ok(())
}

async fn operator_bench(o: OperatorOpts) -> anyhow::Result<()> {
    let client = shardmesh_e2e::client().await;
    // Fail early, before creating anything, when the operator is not there.
    let idle_rss = status_kib(o.pid, "VmRSS")?;
    scrape(&o.metrics)?;
    let per_ns = o.per_namespace.clamp(1, o.services.max(1));
    let budgets = budget_api(&client).await;
    let owned_per_service = objects_per_service(budgets.is_some());
    let mut namespaces = Vec::new();
    for _ in 0..o.services.div_ceil(per_ns) {
        let ns = TestNamespace::create(&client, "bench-operator").await;
        no_pods(&ns).await?;
        namespaces.push(ns);
    }
    let ns_names: Vec<&str> = namespaces.iter().map(|n| n.name.as_str()).collect();
    let run = async {
        let services: Vec<(String, String)> = (0..o.services)
            .map(|i| (namespaces[i / per_ns].name.clone(), format!("bench-{i:04}")))
            .collect();
        eprintln!(
            "[bench] operator: {} ShardedServices of {SHARDS} shards × {REPLICAS} replicas, {per_ns} \
             per namespace in {ns_names:?} ({} child objects expected), {} applies in flight; \
             operator pid {} (RSS idle {:.1} MiB)",
            o.services,
            o.services * owned_per_service,
            o.concurrency,
            o.pid,
            idle_rss as f64 / 1024.0
        );

        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(idle_rss));
        let sampler = rss_sampler(o.pid, stop.clone(), peak.clone());
        let base = Sample::take(&o)?;
        let start = base.at;

        // The API server refuses a create whose validating webhook call failed (failing
        // closed): nothing was written, so applying again is safe. Counted and reported, since
        // a user's `kubectl apply` would have seen the error.
        let webhook_retries = AtomicU64::new(0);
        stream::iter(services.iter().map(Ok::<_, anyhow::Error>))
            .try_for_each_concurrent(o.concurrency, |(ns, name)| {
                let svcs: Api<ShardedService> = Api::namespaced(client.clone(), ns);
                let webhook_retries = &webhook_retries;
                async move {
                    let mut body = demo_service(name, SHARDS as i32, REPLICAS);
                    // No pod ever starts here (the quota), so every service's first rollout
                    // would halt at the 10-minute progress deadline, a real change of status
                    // (and an Event) in the middle of the window that must see no change.
                    body["spec"]["rollout"] = serde_json::json!({"progressDeadline": "24h"});
                    let mut attempt = 1;
                    loop {
                        match apply_service(&svcs, &body).await {
                            Ok(_) => return Ok(()),
                            Err(kube::Error::Api(e))
                                if attempt < 3
                                    && e.code == 500
                                    && e.message.contains("failed calling webhook") =>
                            {
                                eprintln!("[bench] {ns}/{name}: {} (applying again)", e.message);
                                webhook_retries.fetch_add(1, Ordering::Relaxed);
                                attempt += 1;
                            }
                            Err(e) => {
                                return Err(anyhow::Error::new(e)
                                    .context(format!("applying ShardedService {ns}/{name}")))
                            }
                        }
                    }
                }
            })
            .await?;
        let applied = start.elapsed();
        let webhook_retries = webhook_retries.into_inner();
        eprintln!(
            "[bench] all {} applied after {:.1}s ({webhook_retries} applied again after a failed \
             webhook call)",
            o.services,
            applied.as_secs_f64()
        );

        let mut last_report = Instant::now();
        // Everything seen so far. Only namespaces with services still converging are polled
        // again (nothing here deletes, so a converged namespace stays converged): the
        // benchmark's own lists must not be what loads the API server.
        let mut seen = Seen::default();
        let mut pending: Vec<&str> = ns_names.clone();
        let (converged, at_convergence) = loop {
            // Polls served from the API server's watch cache: cheap for it, unlike quorum lists.
            let mut failed = None;
            for ns in &pending {
                match snapshot(&client, &[ns], budgets.as_ref()).await {
                    Ok(later) => seen.merge(later),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                eprintln!("[bench] poll failed (retrying): {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let (m, present) = missing(&seen, &services, budgets.is_some());
            pending.retain(|ns| {
                let prefix = format!("{ns}/");
                m.keys().any(|k| k.starts_with(&prefix))
            });
            let elapsed = start.elapsed();
            if m.is_empty() {
                break (elapsed, Sample::take(&o)?);
            }
            // The machine is shared: stop before the API server and etcd exhaust its memory.
            let available = mem_available_mib()?;
            if available < MIN_AVAILABLE_MIB {
                stop.store(true, Ordering::Relaxed);
                bail!(
                    "aborted after {:.1}s: the machine has only {available} MiB of memory left \
                     (MemAvailable < {MIN_AVAILABLE_MIB} MiB), {} of {} ShardedServices converged; \
                     objects present: {present}. Fewer services per namespace (--per-namespace) \
                     or fewer services load the API server less",
                    elapsed.as_secs_f64(),
                    o.services - m.len(),
                    o.services,
                );
            }
            if elapsed > o.deadline {
                stop.store(true, Ordering::Relaxed);
                let (first, what) = m.iter().next().expect("not empty");
                bail!(
                    "timed out after {:?} waiting for all {} ShardedServices in {:?} to have their {} \
                     child objects and status.observedGeneration == metadata.generation: {} not \
                     converged; e.g. {first} is missing {}; objects present: {present}. See the \
                     operator's log in e2e/bench/run.sh's output directory",
                    o.deadline,
                    o.services,
                    ns_names,
                    owned_per_service,
                    m.len(),
                    what.join(", "),
                );
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                eprintln!(
                    "[bench] {:5.1}s: {}/{} converged; present {present}",
                    elapsed.as_secs_f64(),
                    o.services - m.len(),
                    o.services,
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        eprintln!(
            "[bench] all {} converged after {:.1}s; settling {}s",
            o.services,
            converged.as_secs_f64(),
            o.settle.as_secs()
        );
        tokio::time::sleep(o.settle).await;
        let settled = Sample::take(&o)?;
        eprintln!(
            "[bench] nothing changes for {}s: every service is resynced, nothing may be written",
            o.quiet.as_secs()
        );
        tokio::time::sleep(o.quiet).await;
        let quiet = Sample::take(&o)?;
        let rss_after_quiet = status_kib(o.pid, "VmRSS")?;
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let hwm = status_kib(o.pid, "VmHWM")?;
        let peak_rss = peak
            .load(Ordering::Relaxed)
            .max(status_kib(o.pid, "VmRSS")?);

        let between = |from: &Sample, end: &Sample| {
            let reconciles = end.reconciles() - from.reconciles();
            let requests = end.requests() - from.requests();
            let delta = |name: &str, labels: &[&str]| {
                end.sum_where(name, labels) - from.sum_where(name, labels)
            };
            let n = o.services as f64;
            let writes = end.writes() - from.writes();
            let owned_writes = delta("shardmesh_operator_applies_total", &["result=\"written\""]);
            let owned = (o.services * owned_per_service) as f64;
            json!({
                "seconds": (end.at - from.at).as_secs_f64(),
                "cpu_seconds": end.cpu - from.cpu,
                "cpu_ms_per_service": (end.cpu - from.cpu) * 1000.0 / n,
                "reconciles": reconciles,
                "reconciles_main": delta("shardmesh_operator_reconciles_total", &["controller=\"main\""]),
                "reconciles_shardmap": delta("shardmesh_operator_reconciles_total", &["controller=\"shardmap\""]),
                "reconciles_per_service": reconciles / n,
                "reconcile_errors": delta("shardmesh_operator_reconciles_total", &["result=\"error\""]),
                "api_requests": requests,
                "api_requests_per_reconcile": if reconciles > 0.0 { requests / reconciles } else { 0.0 },
                "api_requests_by_verb": end.requests_by_verb(from),
                "writes": writes,
                "writes_per_service": writes / n,
                "writes_per_owned_object": writes / owned,
                "owned_object_applies": owned_writes,
                "owned_object_applies_per_object": owned_writes / owned,
                "owned_objects_left_unchanged": delta("shardmesh_operator_applies_total", &["result=\"unchanged\""]),
            })
        };
        let window = |end: &Sample| between(&base, end);
        let result = json!({
            "benchmark": "operator",
            "services": o.services,
            "shards": SHARDS,
            "replicas_per_shard": REPLICAS,
            "child_objects": o.services * owned_per_service,
            "applied_seconds": applied.as_secs_f64(),
            "applies_repeated_after_webhook_errors": webhook_retries,
            "converged_seconds": converged.as_secs_f64(),
            "rss_idle_mib": idle_rss as f64 / 1024.0,
            "rss_peak_mib": peak_rss as f64 / 1024.0,
            "vm_hwm_mib": hwm as f64 / 1024.0,
            "until_converged": window(&at_convergence),
            "until_settled": window(&settled),
            "converged_after_last_apply_seconds": (converged - applied).as_secs_f64(),
            "rss_peak_mib_per_1000_services": peak_rss as f64 / 1024.0 * 1000.0 / o.services as f64,
            "rss_after_quiet_mib": rss_after_quiet as f64 / 1024.0,
            "quiet": between(&settled, &quiet),
            "services_per_namespace": per_ns,
            "namespaces": ns_names,
        });
        println!("RESULT {result}");
        Ok(())
    };
    // Whatever happens (done, failed, interrupted), the namespaces go unless --keep: thousands of
    // leftover objects would disturb the next run.
    let outcome = tokio::select! {
        r = run => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    if o.keep {
        eprintln!("[bench] --keep: namespaces {ns_names:?} left in place");
    } else {
        eprintln!(
            "[bench] deleting namespaces {ns_names:?} (garbage collection continues in the \
             background)"
        );
        for ns in namespaces {
            ns.delete().await;
        }
    }
    outcome
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Part 4: pod creation with and without sidecar injection.

fn bench_pod(name: &str, inject: bool) -> anyhow::Result<Pod> {
    let mut pod_labels = json!({"app": "webhook-bench"});
    if inject {
        pod_labels[labels::INJECT] = json!("enabled");
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": pod_labels},
        "spec": {
            // No node carries this label: the pod stays Pending, the node does no work.
            "nodeSelector": {"shardmesh.io/benchmark": "never-scheduled"},
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "app",
                "image": "shardmesh.local/busybox:1",
                "imagePullPolicy": "IfNotPresent",
                "command": ["sleep", "3600"]
            }]
        }
    }))?)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    json!({
        "n": ms.len(),
        "p50_ms": quantile(&ms, 0.5),
        "p90_ms": quantile(&ms, 0.9),
        "p99_ms": quantile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(0.0),
        "mean_ms": mean,
    })
}

async fn webhook_bench(pods: usize, warmup: usize, keep: bool) -> anyhow::Result<()> {
    let client = shardmesh_e2e::client().await;
    let ns = TestNamespace::create(&client, "bench-webhook").await;
    let api: Api<Pod> = ns.api();
    eprintln!(
        "[bench] webhook: {pods} pods with injection and {pods} without (after {warmup} warm-up \
         pairs), alternating, in {}",
        ns.name
    );
    let mut with = Vec::with_capacity(pods);
    let mut without = Vec::with_capacity(pods);
    for i in 0..warmup + pods {
        // Alternate which kind goes first so neither always follows the other.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for inject in order {
            let name = format!("{}-{i:04}", if inject { "inj" } else { "plain" });
            let pod = bench_pod(&name, inject)?;
            let t = Instant::now();
            let created = api
                .create(&PostParams::default(), &pod)
                .await
                .with_context(|| format!("creating pod {name}"))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let has_sidecar = created
                .spec
                .as_ref()
                .map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                        .any(|c| c.name == SIDECAR_CONTAINER)
                })
                .unwrap_or(false);
            if has_sidecar != inject {
                bail!(
                    "pod {name}: expected the {SIDECAR_CONTAINER} container {}, but it {} \
                     (is the chart's webhook installed and serving?)",
                    if inject { "injected" } else { "absent" },
                    if has_sidecar { "is there" } else { "is not" }
                );
            }
            if i >= warmup {
                if inject {
                    with.push(ms);
                } else {
                    without.push(ms);
                }
            }
        }
    }
    let with = summary(with);
    let without = summary(without);
    let ratio = |k: &str| {
        let b = without[k].as_f64().unwrap_or(0.0);
        if b > 0.0 {
            with[k].as_f64().unwrap_or(0.0) / b
        } else {
            0.0
        }
    };
    let result = json!({
        "benchmark": "webhook",
        "pods_per_kind": pods,
        "with_injection": with,
        "without_injection": without,
        "p50_ratio": ratio("p50_ms"),
        "p99_ratio": ratio("p99_ms"),
        "p50_added_ms": with["p50_ms"].as_f64().unwrap_or(0.0) - without["p50_ms"].as_f64().unwrap_or(0.0),
        "namespace": ns.name,
    });
    println!("RESULT {result}");
    if keep {
        eprintln!("[bench] --keep: namespace {} left in place", ns.name);
    } else {
        ns.delete().await;
    }
    Ok(())
}
