//! Fixtures of the registry and routing scenarios: the published shard map, a client pod whose
//! sidecar routes to a ShardedService, keyed requests through it, background load, and the
//! harness' fault injection (crash a sidecar, restart the API server).
#![allow(dead_code)]

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
    core::v1::{Pod, ServiceAccount},
    rbac::v1::RoleBinding,
};
use kube::{
    api::{ListParams, PostParams},
    Api,
};
use serde_json::{json, Value};
use shardmesh_api::{
    labels,
    shardmap::{ShardMap, ShardMapSlice},
};
use shardmesh_e2e::{wait_for, TestNamespace, WAIT};

/// The sidecar image the harness imports.
pub const SIDECAR_IMAGE: &str = concat!("shardmesh.local/sidecar:", env!("CARGO_PKG_VERSION"));

/// Plain HTTP/1 client of the test process.
pub type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A new HTTP client.
pub fn http() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// Whether the chart's injector is installed (then it adds the sidecar to the demo pods; a
/// container of our own would be a second sidecar on the same ports).
pub async fn injection_installed(client: &kube::Client) -> bool {
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

/// Adds a sidecar container to a demo ShardedService body when the injector is not installed,
/// with `extra` args (e.g. the leader Lease duration the injector would pass).
pub fn add_sidecar_if_not_injected(body: &mut Value, injected: bool, extra: &[&str]) {
    if injected {
        return;
    }
    let containers = body["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    let mut args = vec!["--app-port", "8080", "--drain-delay", "3s"];
    args.extend_from_slice(extra);
    // The operator adds the pod identity (service, shard, POD_*) to every container.
    containers.push(json!({
        "name": "sidecar",
        "image": SIDECAR_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
    }));
}

/// The shard map the operator published for service `name`, combined from its slices as a
/// sidecar combines them.
pub async fn shard_map(api: &Api<ShardMapSlice>, name: &str) -> anyhow::Result<ShardMap> {
    let lp = ListParams::default().labels(&format!("{}={name}", labels::SERVICE));
    let slices = api.list(&lp).await?.items;
    shardmesh_api::shardmap::assemble(slices.iter().map(|s| &s.spec))
        .map(|a| a.map)
        .map_err(|e| anyhow::anyhow!("shard map of {name}: {e}"))
}

/// Every member pod of a map.
pub fn members(m: &ShardMap) -> BTreeSet<String> {
    m.shards
        .iter()
        .flat_map(|s| s.members.iter().map(|m| m.pod.clone()))
        .collect()
}

/// Starts pod `client` in `ns`: only a sidecar following the shard map of `service`, its
/// outbound port open to the test (which runs in the cluster's network namespace). Returns the
/// proxy address once a routed request succeeds.
pub async fn start_client(ns: &TestNamespace, service: &str, http: &Http) -> SocketAddr {
    start_client_on(ns, service, http, None).await
}

/// [`start_client`] with the client pod bound to node `node`: a scenario that drains or stops
/// nodes keeps the client that measures the service off them.
pub async fn start_client_on(
    ns: &TestNamespace,
    service: &str,
    http: &Http,
    node: Option<&str>,
) -> SocketAddr {
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
            "metadata": {"name": format!("client-reads-{service}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": labels::shardmap_reader_name(service)},
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
            "nodeName": node,
            "serviceAccountName": "client",
            "containers": [{
                "name": "client",
                "image": SIDECAR_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "args": ["--outbound-addr", "0.0.0.0:4140", "--passthrough", "false",
                         "--shardmap", format!("{service}={service}.{}:8080", ns.name),
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
    // Ready means the map watch synced; the map may still be empty: wait for a routed success.
    wait_for("client sidecar routes a request", WAIT, || async {
        let r = keyed(
            http,
            proxy,
            &format!("{service}.{}:8080", ns.name),
            "GET",
            "probe",
        )
        .await?;
        Ok((r.status < 300 || r.status == 404).then_some(()))
    })
    .await;
    proxy
}

/// What a keyed request through a sidecar came back with.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    /// HTTP status (0: no response).
    pub status: u16,
    /// `x-demo-pod` of the answering pod.
    pub pod: String,
    /// `x-demo-shard` of the answering pod.
    pub shard: String,
    /// `x-demo-role`: the role the answering pod's sidecar told it.
    pub role: String,
    /// `x-demo-leader-epoch`: the leader epoch the answering pod's sidecar told it.
    pub epoch: String,
    /// Body.
    pub body: String,
    /// `x-shardmesh-handoff-from`: the previous owner that served a read during a handoff
    /// window (absent on any other response).
    pub handoff_from: Option<String>,
}

/// One request for `/kv/<key>` with the key header, to `host` (`name.ns:8080`) through the
/// proxy at `proxy`, or straight to a pod's inbound address.
pub async fn keyed(
    http: &Http,
    proxy: SocketAddr,
    host: &str,
    method: &str,
    key: &str,
) -> anyhow::Result<Reply> {
    keyed_with(http, proxy, host, method, key, &[]).await
}

/// [`keyed`] with extra headers.
pub async fn keyed_with(
    http: &Http,
    proxy: SocketAddr,
    host: &str,
    method: &str,
    key: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<Reply> {
    let body = if method == "PUT" { "v" } else { "" };
    send(http, proxy, host, method, key, body, headers).await
}

/// [`keyed`] with an explicit request body (a PUT's value; usually empty for other methods).
pub async fn keyed_value(
    http: &Http,
    proxy: SocketAddr,
    host: &str,
    method: &str,
    key: &str,
    body: &str,
) -> anyhow::Result<Reply> {
    send(http, proxy, host, method, key, body, &[]).await
}

async fn send(
    http: &Http,
    proxy: SocketAddr,
    host: &str,
    method: &str,
    key: &str,
    body: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<Reply> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{proxy}/kv/{key}"))
        .header(http::header::HOST, host)
        .header("x-shard-key", key);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))?;
    let resp = tokio::time::timeout(Duration::from_secs(15), http.request(req)).await??;
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let (status, pod, shard, role, epoch) = (
        resp.status().as_u16(),
        h("x-demo-pod"),
        h("x-demo-shard"),
        h("x-demo-role"),
        h("x-demo-leader-epoch"),
    );
    let handoff_from = resp
        .headers()
        .get(shardmesh_api::headers::HANDOFF_FROM)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        pod,
        shard,
        role,
        epoch,
        body: String::from_utf8_lossy(&body).into_owned(),
        handoff_from,
    })
}

/// Keyed requests in a loop until stopped, counting the ones that did not succeed.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<BTreeMap<u16, u64>>>,
    last_failure: Arc<Mutex<Option<String>>>,
    /// When each failed request was sent.
    failed_at: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts `method` requests (keys `<prefix>-<i>`) to `host` through `proxy`.
    pub fn start(
        http: &Http,
        proxy: SocketAddr,
        host: &str,
        method: &'static str,
        prefix: &str,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(BTreeMap::new()));
        let last_failure = Arc::new(Mutex::new(None));
        let failed_at = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (stop, sent, failures, last, at, http, host, prefix) = (
                stop.clone(),
                sent.clone(),
                failures.clone(),
                last_failure.clone(),
                failed_at.clone(),
                http.clone(),
                host.to_string(),
                prefix.to_string(),
            );
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let r = keyed(&http, proxy, &host, method, &format!("{prefix}-{i}")).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    let (status, what) = match r {
                        Ok(r) => (r.status, r.body),
                        Err(e) => (0, e.to_string()),
                    };
                    // 404 is a GET of a key never written: routed and answered.
                    if !(200..300).contains(&status) && status != 404 {
                        *failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(status)
                            .or_default() += 1;
                        *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
                        at.lock().unwrap_or_else(|e| e.into_inner()).push(started);
                    }
                    i += 1;
                }
            })
        };
        Load {
            stop,
            sent,
            failures,
            last_failure,
            failed_at,
            task,
        }
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Failed requests so far that were sent at or after `t`.
    pub fn failed_since(&self, t: Instant) -> usize {
        self.failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|at| **at >= t)
            .count()
    }

    /// Stops; returns (requests sent, failures by status, the last failure's body).
    pub async fn finish(self) -> (u64, BTreeMap<u16, u64>, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task");
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let last = self
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (self.sent.load(Ordering::Relaxed), failures, last)
    }
}

/// PIDs of the sidecar processes of pod `pod` on this node (the harness runs the kubelet here):
/// processes named shardmesh-sidecar whose environment has `POD_NAME=<pod>`.
pub fn sidecar_pids(pod: &str) -> Vec<i32> {
    pids_of("shardmesh-sidecar", pod)
}

/// PIDs of processes whose executable name starts with `exe` and whose environment has
/// `POD_NAME=<pod>` (the sidecar's and the operator's are set from the downward API).
pub fn pids_of(exe: &str, pod: &str) -> Vec<i32> {
    let want = format!("POD_NAME={pod}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let path = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let named = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(exe));
            named
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
                    .unwrap_or(false)
        })
        .collect()
}

/// Kills the sidecar of `pod` with SIGKILL (a crash: no drain, no Lease release).
pub fn crash_sidecar(pod: &str) {
    crash("shardmesh-sidecar", pod);
}

/// Kills the processes named `exe*` of `pod` with SIGKILL (no shutdown, no release).
pub fn crash(exe: &str, pod: &str) {
    let pids = pids_of(exe, pod);
    assert!(
        !pids.is_empty(),
        "no {exe} process of pod {pod} found in /proc"
    );
    for pid in pids {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -KILL {pid} failed");
        eprintln!("[e2e] killed {exe} of {pod} (pid {pid}) with SIGKILL");
    }
}

/// The cluster IP of the API server's Service (what in-cluster clients dial).
pub async fn api_server_ip(client: &kube::Client) -> String {
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .expect("the kubernetes Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("its cluster IP")
}

/// A pod cut off from the API server: its packets to `api_ip` dropped (no reset, no answer) in
/// its network namespace, which is held by name (`ip netns attach`), so the cut outlives the
/// process it was found through (a process that exits and restarts stays cut off).
pub struct ApiCut {
    netns: String,
    rule: Vec<String>,
}

impl ApiCut {
    /// Cuts off the pod whose `exe*` process runs with `POD_NAME=<pod>`.
    pub fn start(exe: &str, pod: &str, api_ip: &str) -> ApiCut {
        let pid = pids_of(exe, pod)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no {exe} process of pod {pod} found in /proc"));
        let netns = format!("e2e-cut-{pod}");
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &netns])
            .output();
        ip_netns(&["attach", &netns, &pid.to_string()]);
        let cut = ApiCut {
            netns,
            rule: ["OUTPUT", "-d", api_ip, "-p", "tcp", "-j", "DROP"]
                .map(String::from)
                .to_vec(),
        };
        cut.iptables("-I");
        eprintln!("[e2e] {pod}: packets to the API server {api_ip} dropped");
        cut
    }

    fn iptables(&self, op: &str) {
        let mut args = vec!["exec", self.netns.as_str(), "iptables", op];
        args.extend(self.rule.iter().map(String::as_str));
        ip_netns(&args);
    }

    /// Lifts the cut.
    pub fn heal(self) {
        self.iptables("-D");
        ip_netns(&["delete", &self.netns]);
    }
}

/// `ip netns <args>` (the harness runs as root).
fn ip_netns(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .arg("netns")
        .args(args)
        .output()
        .expect("run ip netns");
    assert!(
        out.status.success(),
        "ip netns {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restarts the API server through the harness, down for `down`; returns the wall-clock
/// seconds (since the epoch) when it stopped and when it was ready again.
pub fn restart_apiserver(down: Duration) -> (f64, f64) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/restart-apiserver.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(down.as_secs().to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run restart-apiserver.sh");
    assert!(
        out.status.success(),
        "restart-apiserver.sh failed: {:?}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(
        times.len(),
        2,
        "unexpected output of restart-apiserver.sh: {text}"
    );
    (times[0], times[1])
}

/// Seconds since the epoch, now.
pub fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
