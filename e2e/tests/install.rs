//! The installation: the Helm chart's own checks, the operator's least-privilege RBAC (real 403s
//! from the API server), and controller leader failover.

use std::{process::Command, time::Instant};

use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Pod, Secret},
};
use kube::{
    api::{DeleteParams, ListParams, PostParams},
    Api, Client, Config,
};
use serde_json::json;
use shardmesh_api::{v1alpha1::condition, ShardedService};
use shardmesh_e2e::*;

fn helm() -> String {
    std::env::var("SHARDMESH_HELM")
        .unwrap_or_else(|_| panic!("SHARDMESH_HELM (the helm binary) is unset; run e2e/test.sh"))
}

fn chart() -> String {
    format!("{}/../charts/shardmesh", env!("CARGO_MANIFEST_DIR"))
}

/// Runs helm with `args`; returns (success, stdout + stderr).
fn run_helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(helm())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running helm {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[ignore = "e2e: needs the harness' helm; run e2e/test.sh"]
fn chart_lints_renders_and_rejects_bad_values() {
    let chart = chart();
    let (ok, out) = run_helm(&["lint", "--strict", &chart]);
    assert!(ok, "helm lint --strict failed:\n{out}");
    // The webhook's budget uses the newest PodDisruptionBudget API the server serves.
    for (extra, pdb) in [
        (&[][..], None),
        (&["--set", "webhook.enabled=false"][..], None),
        (
            &["--api-versions", "policy/v1/PodDisruptionBudget"][..],
            Some("policy/v1"),
        ),
        (
            &["--api-versions", "policy/v1beta1/PodDisruptionBudget"][..],
            Some("policy/v1beta1"),
        ),
        (
            &[
                "--api-versions",
                "policy/v1/PodDisruptionBudget",
                "--api-versions",
                "policy/v1beta1/PodDisruptionBudget",
            ][..],
            Some("policy/v1"),
        ),
    ] {
        let mut args = vec!["template", "t", chart.as_str(), "-n", "shardmesh-system"];
        args.extend_from_slice(extra);
        let (ok, out) = run_helm(&args);
        assert!(ok, "helm template {extra:?} failed:\n{out}");
        assert!(out.contains("kind: Deployment"), "{out}");
        let rendered: Vec<&str> = out
            .split("\n---")
            .filter(|doc| doc.contains("\nkind: PodDisruptionBudget"))
            .filter_map(|doc| doc.lines().find_map(|l| l.strip_prefix("apiVersion: ")))
            .collect();
        assert_eq!(rendered, pdb.into_iter().collect::<Vec<_>>(), "{extra:?}");
    }
    // The Grafana dashboard: rendered only when asked, where asked, with the label Grafana's
    // sidecar loads, holding exactly the dashboard file.
    let (ok, out) = run_helm(&["template", "t", &chart, "-n", "shardmesh-system"]);
    assert!(ok && !out.contains("grafana-dashboard"), "{out}");
    let (ok, out) = run_helm(&[
        "template",
        "t",
        &chart,
        "-n",
        "shardmesh-system",
        "--set",
        "grafana.dashboard.enabled=true",
        "--set",
        "grafana.dashboard.namespace=monitoring",
        "--set",
        "grafana.dashboard.folder=shardmesh",
    ]);
    assert!(ok, "helm template with the dashboard failed:\n{out}");
    let cm: serde_json::Value = out
        .split("\n---")
        .find(|doc| doc.contains("name: t-grafana-dashboard"))
        .map(|doc| serde_yaml::from_str(doc).expect("the dashboard ConfigMap is YAML"))
        .unwrap_or_else(|| panic!("no dashboard ConfigMap in:\n{out}"));
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "shardmesh");
    let shipped: serde_json::Value = serde_json::from_str(
        cm["data"]["shardmesh.json"]
            .as_str()
            .expect("data.shardmesh.json"),
    )
    .expect("the ConfigMap holds JSON");
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{chart}/dashboards/shardmesh.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    assert_eq!(
        shipped, file,
        "the ConfigMap holds the dashboard file as it is"
    );
    let bad: [(&str, &str); 8] = [
        (
            "grafana.dashboard.labelValue=1",
            "grafana.dashboard.labelValue",
        ),
        ("webhook.failurePolicy=Maybe", "webhook.failurePolicy"),
        ("operator.replicas=two", "operator.replicas"),
        ("operator.replicas=0", "operator.replicas"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy"),
        (
            "operator.leaderElection.leaseDuration=15 parsecs",
            "operator.leaderElection.leaseDuration",
        ),
        ("webhook.timeoutSeconds=300", "webhook.timeoutSeconds"),
        ("oprator.replicas=2", "oprator"),
    ];
    for (set, field) in bad {
        let (ok, out) = run_helm(&["template", "t", &chart, "--set", set]);
        assert!(!ok, "--set {set} must be rejected");
        assert!(
            out.contains(field),
            "--set {set}: error should name {field}:\n{out}"
        );
    }
}

/// A client acting as the operator's ServiceAccount.
async fn as_operator() -> Client {
    let _ = client().await;
    let mut cfg = Config::infer().await.expect("kubeconfig");
    cfg.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{OPERATOR_NAMESPACE}:shardmesh-operator"
    ));
    cfg.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{OPERATOR_NAMESPACE}"),
        "system:authenticated".into(),
    ]);
    Client::try_from(cfg).expect("impersonating client")
}

fn forbidden<T: std::fmt::Debug>(r: kube::Result<T>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => eprintln!("[e2e] {what}: 403 as expected"),
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn operator_service_account_is_least_privilege() {
    let op = as_operator().await;
    // What it needs works...
    Api::<ShardedService>::all(op.clone())
        .list(&ListParams::default().limit(1))
        .await
        .expect("the operator may list ShardedServices");
    // ...what it does not need is refused by the real API server.
    forbidden(
        Api::<Secret>::namespaced(op.clone(), "default")
            .list(&ListParams::default())
            .await,
        "list Secrets in default",
    );
    forbidden(
        Api::<Secret>::all(op.clone())
            .list(&ListParams::default())
            .await,
        "list Secrets cluster-wide",
    );
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "rbac-probe"},
        "spec": {"containers": [{"name": "c", "image": DEMO_IMAGE}]}
    }))
    .expect("pod literal");
    forbidden(
        Api::<Pod>::namespaced(op.clone(), "default")
            .create(&PostParams::default(), &pod)
            .await,
        "create a Pod",
    );
    forbidden(
        Api::<Deployment>::namespaced(op, "kube-system")
            .list(&ListParams::default())
            .await,
        "list Deployments",
    );
}

fn holder(l: &Lease) -> String {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn controller_leader_fails_over_to_the_standby() {
    let client = client().await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    wait_obj(
        &deploys,
        "shardmesh-operator",
        "both controller replicas available",
        |d| d.status.as_ref().and_then(|s| s.available_replicas) == Some(2),
        |d| format!("{:?}", d.status),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let lease = wait_obj(
        &leases,
        shardmesh_e2e::OPERATOR_LEASE,
        "a controller leads",
        |l| !holder(l).is_empty(),
        |l| format!("{:?}", l.spec),
    )
    .await;
    let old = holder(&lease);
    let duration = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(0);

    // The leader's pod is deleted: it releases the Lease on SIGTERM and a standby takes over.
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    pods.delete(
        &old,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("delete the leader pod");
    let killed = Instant::now();
    let new = wait_obj(
        &leases,
        shardmesh_e2e::OPERATOR_LEASE,
        "another replica takes the Lease",
        |l| {
            let h = holder(l);
            !h.is_empty() && h != old
        },
        |l| format!("{:?}", l.spec),
    )
    .await;
    eprintln!(
        "[e2e] leader {old} deleted; {} took over after {:.1}s (lease duration {duration}s)",
        holder(&new),
        killed.elapsed().as_secs_f64()
    );
    assert!(
        new.spec
            .as_ref()
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0)
            > lease
                .spec
                .as_ref()
                .and_then(|s| s.lease_transitions)
                .unwrap_or(0)
    );

    // A leader that crashed cannot release: simulate one holding a fresh Lease. The running
    // leader must step down, and no replica may take the Lease before it expires.
    let mut crashed = leases
        .get(shardmesh_e2e::OPERATOR_LEASE)
        .await
        .expect("lease");
    let now = k8s_openapi::jiff::Timestamp::now();
    if let Some(spec) = crashed.spec.as_mut() {
        spec.holder_identity = Some("crashed-replica".into());
        spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            now,
        ));
    }
    leases
        .replace(
            shardmesh_e2e::OPERATOR_LEASE,
            &PostParams::default(),
            &crashed,
        )
        .await
        .expect("simulate a crashed leader");
    let crashed_at = Instant::now();
    let taken = wait_obj(
        &leases,
        shardmesh_e2e::OPERATOR_LEASE,
        "a replica takes over the expired Lease",
        |l| {
            let h = holder(l);
            !h.is_empty() && h != "crashed-replica"
        },
        |l| format!("{:?}", l.spec),
    )
    .await;
    let took = crashed_at.elapsed();
    eprintln!(
        "[e2e] crashed leader's Lease taken by {} after {:.1}s (lease duration {duration}s)",
        holder(&taken),
        took.as_secs_f64()
    );
    assert!(
        took.as_secs_f64() >= f64::from(duration) - 1.0,
        "the Lease was taken after {took:?}, before the crashed leader's {duration}s expired"
    );

    // The new leader reconciles a new change.
    let ns = TestNamespace::create(&client, "failover").await;
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &demo_service("after", 1, 1))
        .await
        .expect("apply");
    wait_obj(
        &svcs,
        "after",
        "a ShardedService created after failover becomes Ready",
        |s| is_true(s, condition::READY),
        show,
    )
    .await;
    ns.delete().await;
}

/// Plain HTTP GET from inside the cluster's network namespace (where the tests run), bounded
/// so a pod that just went away cannot stall a wait.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), get)
        .await
        .map_err(|_| anyhow::anyhow!("GET http://{addr}{path}: no answer in 5s"))?
}

fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn operator_and_webhook_export_prometheus_metrics() {
    let client = client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let ip = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default()
    };

    // The leading controller counts its reconciles. (The failover scenario may be moving the
    // Lease meanwhile: look the leader up again until its pod answers as leader.)
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let text = wait_for("the leading controller's /metrics", WAIT, || async {
        let lease = leases.get(shardmesh_e2e::OPERATOR_LEASE).await?;
        let Some(leader) = pods.get_opt(&holder(&lease)).await? else {
            return Ok(None);
        };
        let t = http_get(&format!("{}:8080", ip(&leader)), "/metrics").await?;
        Ok((metric_value(&t, "shardmesh_operator_leader") == 1.0).then_some(t))
    })
    .await;
    assert!(
        text.contains("# TYPE shardmesh_operator_reconcile_duration_seconds histogram"),
        "{text}"
    );

    // A dry-run apply is validated by the webhook: its admissions counter moves.
    let ns = TestNamespace::create(&client, "metrics").await;
    let svcs: Api<ShardedService> = ns.api();
    let webhook_pods = settled_pods(&pods, "app.kubernetes.io/component=webhook").await;
    let series = "shardmesh_webhook_admissions_total{webhook=\"validate\",outcome=\"answered\"}";
    let total = || async {
        let mut sum = 0.0;
        for p in &webhook_pods {
            sum += metric_value(
                &http_get(&format!("{}:8081", ip(p)), "/metrics").await?,
                series,
            );
        }
        anyhow::Ok(sum)
    };
    let before = total().await.expect("webhook metrics");
    svcs.patch(
        "probe",
        &kube::api::PatchParams::apply("e2e").dry_run(),
        &kube::api::Patch::Apply(&demo_service("probe", 1, 1)),
    )
    .await
    .expect("dry-run apply");
    wait_for("the webhook counts the validation", WAIT, || async {
        let now = total().await?;
        if now > before {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("{series} still {now}"))
        }
    })
    .await;
    ns.delete().await;
}
