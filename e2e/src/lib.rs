//! Helpers for the end-to-end scenarios in `e2e/tests/`. The cluster itself is started by
//! `e2e/test.sh`, which runs these tests inside the cluster's network namespace with
//! `SHARDMESH_E2E=1` and `KUBECONFIG` set. The scenarios are `#[ignore]`d so a plain
//! `cargo test` skips them; run without the harness they fail loudly instead of passing.

use std::{fmt::Debug, future::Future, path::PathBuf, process::Command, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, ServiceAccount},
    NamespaceResourceScope,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use shardmesh_api::ShardedService;

/// Default deadline of a wait: generous, the CI machine has 2 shared cores.
pub const WAIT: Duration = Duration::from_secs(240);

/// Image of the demo app, imported into the cluster by the harness.
pub const DEMO_IMAGE: &str = concat!("shardmesh.local/demo:", env!("CARGO_PKG_VERSION"));

/// Namespace the harness installs the operator into.
pub const OPERATOR_NAMESPACE: &str = shardmesh_api::labels::OPERATOR_NAMESPACE;

/// The controller's leader Lease in [`OPERATOR_NAMESPACE`].
pub const OPERATOR_LEASE: &str = shardmesh_api::labels::OPERATOR_LEADER_LEASE;

/// A client for the harness' cluster; panics with instructions outside the harness.
pub async fn client() -> Client {
    assert!(
        std::env::var_os("SHARDMESH_E2E").is_some(),
        "the e2e scenarios need the real cluster started by e2e/test.sh (SHARDMESH_E2E is unset); \
         run: e2e/test.sh"
    );
    Client::try_default()
        .await
        .unwrap_or_else(|e| panic!("cannot build a client from KUBECONFIG: {e}"))
}

/// Polls `probe` every 500 ms until it returns `Ok(Some(v))`, for at most `timeout`. On timeout
/// panics naming what was awaited and the last observation (`Ok(None)` carries none; `Err` is
/// an observation too: API errors during a wait are retried).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = tokio::time::Instant::now();
    let mut last = String::from("(no observation yet)");
    loop {
        match probe().await {
            Ok(Some(v)) => {
                eprintln!(
                    "[e2e] {what}: ok after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                return v;
            }
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}\nlast observation: {last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Like [`wait_for`] for a predicate over a freshly fetched object; the last object's relevant
/// part (from `show`) is printed on timeout.
pub async fn wait_obj<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    pred: impl Fn(&K) -> bool,
    show: impl Fn(&K) -> String,
) -> K
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    wait_for(what, WAIT, || async {
        let o = api.get(name).await?;
        if pred(&o) {
            Ok(Some(o))
        } else {
            Err(anyhow::anyhow!("{}", show(&o)))
        }
    })
    .await
}

/// A namespace for one scenario. Deleted by [`TestNamespace::delete`] at the end of a passing
/// test; a failing test leaves it for the harness' diagnostics dump.
pub struct TestNamespace {
    /// Namespace name.
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<random>`.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let suffix: u32 = std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0));
        let name = format!("e2e-{prefix}-{:x}", suffix & 0xffffff);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace literal");
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        eprintln!("[e2e] namespace {name}");
        // Pods created before the namespace's default ServiceAccount has its token are refused
        // (1.20's token controller fills it in asynchronously).
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for(
            &format!("ServiceAccount {name}/default with a token"),
            WAIT,
            || async {
                let sa = sas.get_opt("default").await?;
                Ok(sa
                    .filter(|sa| sa.secrets.as_ref().is_some_and(|s| !s.is_empty()))
                    .map(|_| ()))
            },
        )
        .await;
        TestNamespace {
            name,
            client: client.clone(),
        }
    }

    /// An API handle for namespaced kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace (background; the cluster is torn down after the run anyway).
    pub async fn delete(self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::background()).await;
    }
}

/// A ShardedService of the demo app as JSON, ready to patch in tests.
pub fn demo_service(name: &str, shards: i32, replicas: i32) -> Value {
    json!({
        "apiVersion": "shardmesh.io/v1alpha1",
        "kind": "ShardedService",
        "metadata": {"name": name},
        "spec": {
            "shards": shards,
            "replicasPerShard": replicas,
            "port": 8080,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "app",
                        "image": DEMO_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/readyz", "port": 8080},
                            "periodSeconds": 1
                        }
                    }]
                }
            }
        }
    })
}

/// Server-side applies a ShardedService given as JSON (as `kubectl apply --server-side` would).
pub async fn apply_service(
    api: &Api<ShardedService>,
    body: &Value,
) -> kube::Result<ShardedService> {
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    api.patch(
        &name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(body),
    )
    .await
}

/// The condition `t` of a ShardedService as (status, reason, message).
pub fn condition(svc: &ShardedService, t: &str) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Whether condition `t` has status `True` for the current generation.
pub fn is_true(svc: &ShardedService, t: &str) -> bool {
    let current =
        svc.status.as_ref().and_then(|s| s.observed_generation) == svc.metadata.generation;
    current && condition(svc, t).is_some_and(|c| c.0 == "True")
}

/// Compact status summary for timeout messages.
pub fn show(svc: &ShardedService) -> String {
    match &svc.status {
        None => format!("generation {:?}, no status yet", svc.metadata.generation),
        Some(s) => format!(
            "generation {:?} observed {:?} ready {:?} epoch {} conditions {:?}",
            svc.metadata.generation,
            s.observed_generation,
            s.ready,
            s.epoch,
            s.conditions
                .iter()
                .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
                .collect::<Vec<_>>()
        ),
    }
}

/// The pods matching `labels` once every one of them that is not terminating is Ready (at
/// least one): a scenario that restarted pods before (the webhook's) leaves a replacement
/// starting, and a starting pod has neither image ID nor a serving port yet.
pub async fn settled_pods(api: &Api<Pod>, labels: &str) -> Vec<Pod> {
    wait_for(
        &format!("every pod with labels {labels:?} Ready"),
        WAIT,
        || async {
            let pods: Vec<Pod> = api
                .list(&ListParams::default().labels(labels))
                .await?
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let ready = |p: &Pod| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            };
            let waiting: Vec<String> = pods
                .iter()
                .filter(|p| !ready(p))
                .map(|p| p.name_any())
                .collect();
            if !pods.is_empty() && waiting.is_empty() {
                Ok(Some(pods))
            } else {
                Err(anyhow::anyhow!(
                    "{} pods, not Ready yet: {waiting:?}",
                    pods.len()
                ))
            }
        },
    )
    .await
}

/// Names of the objects of kind `K` labelled for service `svc` in `api`'s namespace, sorted.
pub async fn names<K>(api: &Api<K>, svc: &str) -> anyhow::Result<Vec<String>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut v: Vec<String> = api
        .list(&ListParams::default().labels(&shardmesh_api::labels::service_selector_string(svc)))
        .await?
        .items
        .iter()
        .map(|o| o.name_any())
        .collect();
    v.sort();
    Ok(v)
}

/// Writes `contents` to `<SHARDMESH_E2E_LOGS>/<name>` (the harness keeps that directory with
/// the run's logs) and returns the path; `Ok(None)` when the variable is unset (a run outside
/// the harness).
pub fn write_artifact(name: &str, contents: &str) -> std::io::Result<Option<std::path::PathBuf>> {
    let Some(dir) = std::env::var_os("SHARDMESH_E2E_LOGS") else {
        return Ok(None);
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, contents)?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    /// The chart's default image tags (its appVersion), the images `e2e/release.sh` writes (the
    /// workspace version) and the tags the demo manifests and scenarios use must be one version,
    /// or `helm install` with defaults pulls images that do not exist.
    #[test]
    fn chart_release_images_and_manifests_agree_on_the_version() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let version = env!("CARGO_PKG_VERSION");
        let chart = std::fs::read_to_string(format!("{root}/charts/shardmesh/Chart.yaml"))
            .expect("Chart.yaml");
        let chart: serde_yaml::Value = serde_yaml::from_str(&chart).expect("Chart.yaml is YAML");
        assert_eq!(
            chart["appVersion"].as_str(),
            Some(version),
            "Chart.yaml appVersion"
        );
        for m in ["demo-shardedservice.yaml", "demo-client.yaml"] {
            let text = std::fs::read_to_string(format!("{root}/e2e/manifests/{m}")).expect(m);
            for line in text
                .lines()
                .filter(|l| l.contains("image: shardmesh.local/"))
            {
                assert!(
                    line.trim_end().ends_with(&format!(":{version}")),
                    "{m}: {line:?} must use the release tag {version}"
                );
            }
        }
        assert!(super::DEMO_IMAGE.ends_with(version));
    }
}

/// The directory holding `kubectl-shardmesh`: a test binary is `<target>/debug/deps/<test>-*`,
/// the plugin `<target>/debug/kubectl-shardmesh` (built by the harness' `cargo build --bins`).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let bin = dir.join("kubectl-shardmesh");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p kubectl-shardmesh` (e2e/test.sh builds \
         every binary of the workspace)",
        bin.display()
    );
    dir
}

/// One run of `kubectl shardmesh`.
#[derive(Debug)]
pub struct PluginRun {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl PluginRun {
    /// Stdout as JSON; panics showing both streams when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}); exit {}\nstdout:\n{}\nstderr:\n{}",
                self.code, self.stdout, self.stderr
            )
        })
    }
}

/// `kubectl shardmesh <args>`, with KUBECONFIG inherited from the harness.
pub fn kubectl_shardmesh(args: &[&str]) -> PluginRun {
    let path = format!(
        "{}:{}",
        plugin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .arg("shardmesh")
        .args(args)
        .env("PATH", path)
        .output()
        .expect("run kubectl (is it on PATH?)");
    let run = PluginRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "[e2e] kubectl shardmesh {} -> exit {}",
        args.join(" "),
        run.code
    );
    run
}
