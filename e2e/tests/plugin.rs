//! `kubectl shardmesh` on the real cluster, run as kubectl runs plugins (the `kubectl-shardmesh`
//! binary of this build on PATH): each command's `-o json` is checked against what the API
//! says (status, shard map slices, the operator's Lease), its table against the same rows, and
//! its exit code; `plan` must leave the service untouched; the error paths must name what is
//! missing. The table outputs are kept as artifacts (the README's examples come from them).

mod mesh;

use std::time::Instant;

use k8s_openapi::api::{apps::v1::StatefulSet, coordination::v1::Lease};
use kube::{Api, ResourceExt};
use mesh::shard_map;
use serde_json::{json, Value};
use shardmesh_api::{
    routing::shard_for_key,
    shardmap::{ShardMap, ShardMapSlice},
    v1alpha1::condition,
    ShardedService,
};
use shardmesh_e2e::{
    apply_service, client, demo_service, is_true, kubectl_shardmesh as plugin, show, wait_for,
    wait_obj, write_artifact, PluginRun as Run, TestNamespace, OPERATOR_NAMESPACE, WAIT,
};

const SHARDS: usize = 2;
const REPLICAS: usize = 2;

/// Keeps a table output for the README and the run's logs.
fn keep(name: &str, args: &[&str], run: &Run) {
    let text = format!(
        "$ kubectl shardmesh {}\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    let _ = write_artifact(&format!("plugin-{name}.txt"), &text);
}

fn members_of(map: &ShardMap, shard: usize) -> Vec<String> {
    map.shards[shard]
        .members
        .iter()
        .map(|m| m.pod.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn kubectl_shardmesh_reports_what_the_cluster_holds() {
    let t0 = Instant::now();
    let client = client().await;
    let ns = TestNamespace::create(&client, "plugin").await;
    let n = ns.name.clone();
    let injected = mesh::injection_installed(&client).await;

    // 1. A 2x2 demo service electing a leader per shard, Ready, with a complete map.
    let mut body = demo_service("kv", SHARDS as i32, REPLICAS as i32);
    body["spec"]["leaderElection"] = json!({"enabled": true});
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply kv");
    wait_obj(
        &svcs,
        "kv",
        "kv Ready",
        |s| is_true(s, condition::READY),
        show,
    )
    .await;
    let slices: Api<ShardMapSlice> = ns.api();
    wait_for(
        "a map with every member and a leader per shard",
        WAIT,
        || async {
            let m = shard_map(&slices, "kv").await?;
            let full = m
                .shards
                .iter()
                .all(|s| s.members.len() == REPLICAS && s.leader.is_some());
            Ok(full.then_some(()))
        },
    )
    .await;

    // 2. status: every row matches the status and the slices (re-read until both agree: the
    //    cluster may still be settling a member or a leader).
    let args = ["status", "kv", "-n", n.as_str(), "-o", "json"];
    wait_for("status -o json matches the cluster", WAIT, || async {
        let run = plugin(&args);
        let svc = svcs.get("kv").await?;
        let map = shard_map(&slices, "kv").await?;
        let r = run.json();
        anyhow::ensure!(run.code == 0, "exit {}: {}", run.code, run.stdout);
        anyhow::ensure!(r["ready"] == json!(true), "ready: {}", r["ready"]);
        let st = svc.status.clone().unwrap_or_default();
        anyhow::ensure!(
            r["mapEpoch"] == json!(map.epoch),
            "map epoch {} vs {}",
            r["mapEpoch"],
            map.epoch
        );
        anyhow::ensure!(
            r["routingShards"] == json!(map.count()),
            "routing {}",
            r["routingShards"]
        );
        anyhow::ensure!(
            r["pods"] == json!(st.ready),
            "pods {} vs {:?}",
            r["pods"],
            st.ready
        );
        anyhow::ensure!(
            r["generation"] == json!(svc.metadata.generation),
            "generation"
        );
        let rows = r["shards"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(rows.len() == SHARDS, "{} rows", rows.len());
        for (i, row) in rows.iter().enumerate() {
            let s = &st.shards[i];
            let slice = &map.shards[i];
            let leader = slice.leader.as_ref();
            anyhow::ensure!(row["index"] == json!(i), "index {}", row["index"]);
            anyhow::ensure!(
                row["readyReplicas"] == json!(s.ready_replicas),
                "shard {i} ready"
            );
            anyhow::ensure!(row["replicas"] == json!(s.replicas), "shard {i} replicas");
            anyhow::ensure!(
                row["members"] == json!(members_of(&map, i)),
                "shard {i} members {}",
                row["members"]
            );
            anyhow::ensure!(
                row["leader"] == json!(leader.map(|l| &l.pod)),
                "shard {i} leader {}",
                row["leader"]
            );
            anyhow::ensure!(
                row["leaderEpoch"] == json!(leader.map(|l| l.epoch)),
                "shard {i} leader epoch"
            );
            anyhow::ensure!(
                row["currentRevision"] == json!(s.current_revision),
                "shard {i} revision"
            );
            anyhow::ensure!(
                row["keys"] == json!("serving"),
                "shard {i} keys {}",
                row["keys"]
            );
            anyhow::ensure!(
                row["rollout"] == json!("updated"),
                "shard {i} rollout {}",
                row["rollout"]
            );
        }
        Ok(Some(()))
    })
    .await;
    let args = ["status", "kv", "-n", n.as_str()];
    let table = plugin(&args);
    keep("status", &args, &table);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.contains(&format!("Service:    {n}/kv")),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("Ready:      True"),
        "{}",
        table.stdout
    );
    let map = shard_map(&slices, "kv").await.expect("map");
    for i in 0..SHARDS {
        let members = members_of(&map, i).join(",");
        assert!(
            table
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("{i} ")) && l.contains(&members)),
            "no row for shard {i} with members {members}:\n{}",
            table.stdout
        );
    }
    let yaml = plugin(&["status", "kv", "-n", &n, "-o", "yaml"]);
    let y: Value = serde_yaml::from_str(&yaml.stdout).expect("status -o yaml is YAML");
    assert_eq!(y["name"], json!("kv"));

    // 3. route: the sidecars' jump hash over the map's count, that shard's members and leader.
    for key in ["alice", "bob", "carol", "user-42"] {
        let args = ["route", "kv", key, "-n", n.as_str(), "-o", "json"];
        wait_for(&format!("route {key} matches the map"), WAIT, || async {
            let run = plugin(&args);
            let map = shard_map(&slices, "kv").await?;
            let r = run.json();
            let shard = shard_for_key(key.as_bytes(), map.count()) as usize;
            anyhow::ensure!(run.code == 0, "exit {}", run.code);
            anyhow::ensure!(
                r["shard"] == json!(shard),
                "shard {} vs {shard}",
                r["shard"]
            );
            let pods: Vec<Value> = r["pods"].as_array().cloned().unwrap_or_default();
            let pods: Vec<&str> = pods.iter().filter_map(|p| p["pod"].as_str()).collect();
            anyhow::ensure!(pods == members_of(&map, shard), "pods {pods:?}");
            let leader = map.shards[shard].leader.as_ref().map(|l| l.pod.clone());
            anyhow::ensure!(
                r["leader"]["pod"] == json!(leader),
                "leader {}",
                r["leader"]
            );
            anyhow::ensure!(
                r["header"] == json!("x-shard-key"),
                "header {}",
                r["header"]
            );
            Ok(Some(()))
        })
        .await;
    }
    let args = ["route", "kv", "alice", "-n", n.as_str()];
    let table = plugin(&args);
    keep("route", &args, &table);
    assert_eq!(table.code, 0, "{table:?}");
    let shard = shard_for_key(b"alice", map.count()) as usize;
    assert!(
        table
            .stdout
            .contains(&format!("-> shard {shard} of {SHARDS}")),
        "{}",
        table.stdout
    );
    for pod in members_of(&map, shard) {
        assert!(
            table.stdout.contains(&pod),
            "{pod} missing:\n{}",
            table.stdout
        );
    }

    // 4. plan: exact fractions, validated by a dry run, and nothing written.
    let before = svcs.get("kv").await.expect("kv");
    let sts: Api<StatefulSet> = ns.api();
    let grow = plugin(&["plan", "kv", "--shards", "3", "-n", &n, "-o", "json"]);
    assert_eq!(grow.code, 0, "{grow:?}");
    let g = grow.json();
    assert_eq!((g["from"].clone(), g["to"].clone()), (json!(2), json!(3)));
    assert!(
        (g["movedFraction"].as_f64().unwrap_or(0.0) - 1.0 / 3.0).abs() < 1e-12,
        "{g}"
    );
    assert_eq!(g["moved"], json!("1/3"));
    assert!(
        (g["sampledFraction"].as_f64().unwrap_or(0.0) - 1.0 / 3.0).abs() < 0.01,
        "{g}"
    );
    assert_eq!(g["addedShards"], json!([2]));
    assert_eq!(g["drainedShards"], json!([]));
    assert_eq!(g["podsCreated"], json!(REPLICAS));
    assert_eq!(g["admission"]["verdict"], json!("admitted"), "{g}");
    assert_eq!(g["steps"][0]["phase"], json!("AddingShards"));
    assert_eq!(g["applied"], json!(false));
    let args = ["plan", "kv", "--shards", "3", "-n", n.as_str()];
    let table = plugin(&args);
    keep("plan", &args, &table);
    assert!(
        table.stdout.contains("Keys moved: 1/3 = 33.33%"),
        "{}",
        table.stdout
    );
    // Shrinking without spec.rollout.allowShardRemoval is refused, naming the fix.
    let args = ["plan", "kv", "--shards", "1", "-n", n.as_str()];
    let shrink = plugin(&args);
    keep("plan-shrink", &args, &shrink);
    assert_eq!(shrink.code, 1, "{shrink:?}");
    assert!(
        shrink.stdout.contains("allowShardRemoval"),
        "{}",
        shrink.stdout
    );
    let s = plugin(&["plan", "kv", "--shards", "1", "-n", &n, "-o", "json"]).json();
    assert_eq!(
        (s["moved"].clone(), s["drainedShards"].clone()),
        (json!("1/2"), json!([1]))
    );
    assert_eq!(s["admission"]["verdict"], json!("refused"));
    let after = svcs.get("kv").await.expect("kv");
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "plan wrote to the service"
    );
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(after.spec.shards, SHARDS as i32);
    assert!(
        sts.get_opt("kv-2").await.expect("get kv-2").is_none(),
        "plan created shard 2"
    );

    // 5. check: every check passes; the leader is the Lease's holder, the webhook answered.
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let args = ["check", "-n", n.as_str(), "-o", "json"];
    wait_for(
        "check -o json matches the operator's Lease",
        WAIT,
        || async {
            let run = plugin(&args);
            let lease = leases.get(shardmesh_e2e::OPERATOR_LEASE).await?;
            let holder = lease.spec.and_then(|s| s.holder_identity);
            let r = run.json();
            anyhow::ensure!(run.code == 0, "exit {}: {}", run.code, run.stdout);
            anyhow::ensure!(r["ok"] == json!(true), "{}", r);
            anyhow::ensure!(
                r["operatorLeader"]["holder"] == json!(holder),
                "holder {} vs {holder:?}",
                r["operatorLeader"]["holder"]
            );
            anyhow::ensure!(r["operatorLeader"]["current"] == json!(true), "not current");
            let row = |name: &str| {
                r["checks"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["name"] == json!(name)).cloned())
                    .unwrap_or(Value::Null)
            };
            for name in [
                "api-server",
                "crds",
                "webhook-configurations",
                "webhook",
                "webhook-ca",
                "webhook-serving-cert",
                "operator-leader",
            ] {
                anyhow::ensure!(row(name)["status"] == json!("ok"), "{name}: {}", row(name));
            }
            anyhow::ensure!(
                row("webhook")["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("reachable")),
                "webhook {}",
                row("webhook")
            );
            anyhow::ensure!(
                row("pod-disruption-budgets")["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("policy/v1")),
                "pdb"
            );
            Ok(Some(()))
        },
    )
    .await;
    let args = ["check", "-n", n.as_str()];
    let table = plugin(&args);
    keep("check", &args, &table);
    assert_eq!(table.code, 0, "{table:?}");
    for name in [
        "api-server",
        "crds",
        "webhook ",
        "webhook-serving-cert",
        "operator-leader",
    ] {
        assert!(
            table
                .stdout
                .lines()
                .any(|l| l.starts_with(name) && l.contains(" ok ")),
            "no ok row {name}:\n{}",
            table.stdout
        );
    }
    // The dry-run probe stored nothing.
    assert!(svcs
        .get_opt("kubectl-shardmesh-check-probe")
        .await
        .expect("get probe")
        .is_none());

    // 6. Error paths: an unknown service names itself and exits 3; usage errors exit 2.
    let args = ["status", "nope", "-n", n.as_str()];
    let missing = plugin(&args);
    keep("not-found", &args, &missing);
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(
        missing
            .stderr
            .contains(&format!("ShardedService {n}/nope not found")),
        "{}",
        missing.stderr
    );
    assert_eq!(plugin(&["route", "nope", "k", "-n", &n]).code, 3);
    assert_eq!(plugin(&["route", "kv", "-n", &n]).code, 2, "missing KEY");
    assert_eq!(plugin(&["plan", "kv", "--shards", "0", "-n", &n]).code, 2);
    assert_eq!(plugin(&["status", "kv", "-n", &n, "-o", "xml"]).code, 2);

    ns.delete().await;
    eprintln!(
        "[e2e] plugin scenario passed in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
