//! `helm upgrade` and `helm uninstall` of the installed chart. Run last, on its own (e2e/test.sh
//! runs it after every other scenario): it restarts and finally removes the operator.

use std::{collections::BTreeMap, process::Command};

use k8s_openapi::{
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        apps::v1::Deployment,
        core::v1::Pod,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{api::ListParams, Api, ResourceExt};
use serde_json::json;
use shardmesh_api::{v1alpha1::condition, ShardedService};
use shardmesh_e2e::*;

fn helm(args: &[&str]) -> String {
    let bin = std::env::var("SHARDMESH_HELM")
        .unwrap_or_else(|_| panic!("SHARDMESH_HELM (the helm binary) is unset; run e2e/test.sh"));
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running helm {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helm {args:?} failed:\n{text}");
    text
}

async fn pod_uids(pods: &Api<Pod>, selector: &str) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect())
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh (runs this last)"]
async fn helm_lifecycle_upgrade_rolls_the_operator_and_uninstall_keeps_crds_and_crs() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "helm").await;
    let svcs: Api<ShardedService> = ns.api();
    let pods: Api<Pod> = ns.api();
    let mut body = demo_service("steady", 1, 2);
    apply_service(&svcs, &body).await.expect("apply");
    wait_obj(
        &svcs,
        "steady",
        "steady Ready",
        |s| is_true(s, condition::READY),
        show,
    )
    .await;
    let app_pods = pod_uids(&pods, "shardmesh.io/service=steady")
        .await
        .expect("pods");
    let op_pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let controller = "app.kubernetes.io/component=controller";
    let old_ops = pod_uids(&op_pods, controller).await.expect("operator pods");

    // Upgrade with a changed value: the operator rolls, the running service is not disturbed.
    let chart = format!("{}/../charts/shardmesh", env!("CARGO_MANIFEST_DIR"));
    helm(&[
        "upgrade",
        "shardmesh",
        &chart,
        "-n",
        OPERATOR_NAMESPACE,
        "--reset-then-reuse-values",
        "--set",
        "operator.logLevel=debug",
        "--wait",
        "--timeout",
        "5m",
    ]);
    wait_for("operator pods replaced by the upgrade", WAIT, || async {
        let now = pod_uids(&op_pods, controller).await?;
        let fresh = now.values().all(|u| !old_ops.values().any(|o| o == u));
        if fresh && now.len() == 2 {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("operator pods {now:?}"))
        }
    })
    .await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let d = deploys.get("shardmesh-operator").await.expect("deployment");
    let env = d
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].env.clone())
        .unwrap_or_default();
    assert!(env
        .unwrap_or_default()
        .iter()
        .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")));
    assert_eq!(
        pod_uids(&pods, "shardmesh.io/service=steady")
            .await
            .expect("pods"),
        app_pods,
        "the upgrade must not restart application pods"
    );
    // Namespaced mode: Roles in the listed namespaces only, no cluster-wide grant.
    let other = TestNamespace::create(&client, "unwatched").await;
    let watched = ns.name.clone();
    helm(&[
        "upgrade",
        "shardmesh",
        &chart,
        "-n",
        OPERATOR_NAMESPACE,
        "--reset-then-reuse-values",
        "--set",
        &format!("operator.watchNamespaces={{{watched}}}"),
        "--wait",
        "--timeout",
        "5m",
    ]);
    let operator_user = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:shardmesh-operator");
    for (verb, group, resource, namespace, expect) in [
        ("create", "apps", "statefulsets", watched.as_str(), true),
        ("patch", "", "configmaps", watched.as_str(), true),
        (
            "create",
            "rbac.authorization.k8s.io",
            "roles",
            watched.as_str(),
            true,
        ),
        ("create", "apps", "statefulsets", other.name.as_str(), false),
        ("patch", "", "configmaps", "kube-system", false),
        ("create", "coordination.k8s.io", "leases", "default", false),
        ("list", "apps", "statefulsets", "", false),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            OPERATOR_NAMESPACE,
            true,
        ),
    ] {
        let allowed = can(&client, &operator_user, verb, group, resource, namespace).await;
        assert_eq!(
            allowed, expect,
            "SubjectAccessReview: may the operator {verb} {group}/{resource} in {namespace:?}?"
        );
    }
    eprintln!("[e2e] namespaced mode: 8 SubjectAccessReviews as expected");
    let others: Api<ShardedService> = other.api();
    apply_service(&others, &demo_service("ignored", 1, 1))
        .await
        .expect("apply in an unwatched namespace");

    // The upgraded operator reconciles changes.
    body["spec"]["replicasPerShard"] = json!(1);
    apply_service(&svcs, &body)
        .await
        .expect("scale after upgrade");
    wait_obj(
        &svcs,
        "steady",
        "steady scaled to 1 by the upgraded operator",
        |s| {
            is_true(s, condition::READY)
                && s.status.as_ref().and_then(|s| s.ready.clone()).as_deref() == Some("1/1")
        },
        show,
    )
    .await;

    // By now the namespaced operator has reconciled a change in its namespace; the service in
    // the other namespace was left alone.
    let ignored = others.get("ignored").await.expect("ignored");
    assert!(
        ignored.status.is_none(),
        "a ShardedService outside watchNamespaces got a status: {:?}",
        ignored.status
    );
    other.delete().await;

    // Uninstall removes everything of the release but the CRD and the user's objects.
    helm(&[
        "uninstall",
        "shardmesh",
        "-n",
        OPERATOR_NAMESPACE,
        "--wait",
        "--timeout",
        "5m",
    ]);
    wait_for("operator and webhook gone", WAIT, || async {
        let left: Vec<String> = deploys
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|d| d.name_any())
            .collect();
        let mut configs: Vec<String> = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|c| c.name_any())
            .collect();
        configs.extend(
            Api::<ValidatingWebhookConfiguration>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .map(|c| c.name_any()),
        );
        configs.retain(|c| c.contains("shardmesh"));
        if left.is_empty() && configs.is_empty() {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!(
                "deployments {left:?}, webhook configurations {configs:?}"
            ))
        }
    })
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.get("shardedservices.shardmesh.io")
        .await
        .expect("the CRD stays after uninstall");
    svcs.get("steady")
        .await
        .expect("the ShardedService stays after uninstall");
    // `kubectl shardmesh` tells that the operator and the webhook are gone (plugin.rs covers
    // the installed case).
    wait_for(
        "kubectl shardmesh check: operator, webhook gone",
        WAIT,
        || async {
            let run = kubectl_shardmesh(&["check", "-n", &ns.name, "-o", "json"]);
            let (code, out) = (run.code, run.stdout);
            let r: serde_json::Value = serde_json::from_str(&out)?;
            let failed = |name: &str| {
                r["checks"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["name"] == json!(name) && c["status"] == json!("fail"))
                })
            };
            let gone = code == 1 && failed("webhook-configurations") && failed("operator-leader");
            if gone {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("exit {code}: {out}"))
            }
        },
    )
    .await;
    let run = kubectl_shardmesh(&["status", "steady", "-n", &ns.name]);
    let (code, out) = (run.code, run.stdout);
    assert!(
        out.lines().any(|l| l.starts_with("Warning:    operator:")),
        "exit {code}: {out}"
    );
    ns.delete().await;
}

/// Whether `user` may `verb` `group/resource` in `namespace` ("" for every namespace), as the
/// API server's authorizer answers a SubjectAccessReview.
async fn can(
    client: &kube::Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec![
                "system:serviceaccounts".to_string(),
                "system:authenticated".to_string(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_string()),
                group: Some(group.to_string()),
                resource: Some(resource.to_string()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answered = Api::<SubjectAccessReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .expect("create SubjectAccessReview");
    answered.status.is_some_and(|s| s.allowed)
}
