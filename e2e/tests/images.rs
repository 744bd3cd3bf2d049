//! The release images in the cluster: loaded from `e2e/release.sh`'s OCI archives (containerd
//! holds exactly the archives' manifests), carrying their labels, and every shardmesh container
//! runs them as the non-root user.
//!
//! Reads `SHARDMESH_E2E_IMAGES` (the archives' `images.txt`) and `SHARDMESH_E2E_CTR_SOCK` (the
//! cluster's containerd), both set by `e2e/test.sh`.

use std::{collections::BTreeMap, process::Command};

use k8s_openapi::api::core::v1::Pod;
use kube::{api::ListParams, Api};
use shardmesh_api::{v1alpha1::condition, ShardedService};
use shardmesh_e2e::{
    apply_service, client, demo_service, is_true, settled_pods, show, wait_obj, TestNamespace,
    OPERATOR_NAMESPACE,
};

/// One line of images.txt.
#[derive(Debug)]
struct Released {
    id: String,
    digest: String,
    file: String,
}

fn released() -> (std::path::PathBuf, BTreeMap<String, Released>) {
    let path =
        std::env::var("SHARDMESH_E2E_IMAGES").expect("SHARDMESH_E2E_IMAGES (set by e2e/test.sh)");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dir = std::path::Path::new(&path)
        .parent()
        .expect("dir")
        .to_path_buf();
    let images = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 5, "images.txt line {l:?}");
            (
                f[0].to_string(),
                Released {
                    id: f[1].to_string(),
                    digest: f[2].to_string(),
                    file: f[4].to_string(),
                },
            )
        })
        .collect();
    (dir, images)
}

/// The image config of an OCI archive, read from the archive itself (index → manifest → config).
fn archive_config(archive: &std::path::Path) -> serde_json::Value {
    let read = |member: &str| -> Vec<u8> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(member)
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "tar -xOf {} {member}",
            archive.display()
        );
        out.stdout
    };
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let index: serde_json::Value = serde_json::from_slice(&read("index.json")).expect("index.json");
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("manifest digest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&blob(manifest_digest))).expect("manifest");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    serde_json::from_slice(&read(&blob(config_digest))).expect("config")
}

#[tokio::test]
#[ignore = "needs the e2e cluster (e2e/test.sh)"]
async fn release_images_are_loaded_from_their_archives_and_run_as_nonroot() {
    let (dir, images) = released();
    assert_eq!(images.len(), 3, "operator, sidecar and demo: {images:?}");
    let version = env!("CARGO_PKG_VERSION");

    // containerd holds each image under its name with the archive's manifest digest.
    let sock = std::env::var("SHARDMESH_E2E_CTR_SOCK").expect("SHARDMESH_E2E_CTR_SOCK");
    let out = Command::new("ctr")
        .args(["--address", &sock, "-n", "k8s.io", "images", "ls"])
        .output()
        .expect("run ctr");
    assert!(out.status.success(), "ctr images ls failed");
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    for (reference, r) in &images {
        assert!(
            listed.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&reference.as_str()) && f.get(2) == Some(&r.digest.as_str())
            }),
            "{reference} with digest {} is not in containerd:\n{listed}",
            r.digest
        );
        // The labels a user verifies, from the archive itself.
        let config = archive_config(&dir.join(&r.file));
        let labels = &config["config"]["Labels"];
        assert_eq!(
            labels["org.opencontainers.image.version"], version,
            "{reference}"
        );
        let revision = labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap_or("");
        assert!(revision.len() >= 40, "{reference}: revision {revision:?}");
        assert_eq!(config["config"]["User"], "65532:65532", "{reference}");
        assert!(reference.ends_with(&format!(":{version}")), "{reference}");
        eprintln!(
            "[e2e] {reference}: {} from {} (revision {revision})",
            r.digest, r.file
        );
    }

    // A service of the demo app, so the demo and (injected) sidecar images run too.
    let client = client().await;
    let ns = TestNamespace::create(&client, "images").await;
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &demo_service("img", 1, 1))
        .await
        .expect("apply img");
    wait_obj(
        &svcs,
        "img",
        "img Ready",
        |s| is_true(s, condition::READY),
        show,
    )
    .await;
    let app_pods: Api<Pod> = ns.api();

    // The pods run these images (by the chart's default tags).
    let ops: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = settled_pods(&ops, "app.kubernetes.io/name=shardmesh").await;
    all.extend(
        app_pods
            .list(&ListParams::default())
            .await
            .expect("pods")
            .items,
    );
    for p in all {
        for c in p
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
        {
            let r = images.get(&c.image).unwrap_or_else(|| {
                panic!("container {} runs {}, not a release image", c.name, c.image)
            });
            assert!(
                c.image_id.contains(r.digest.trim_start_matches("sha256:"))
                    || c.image_id.contains(r.id.trim_start_matches("sha256:")),
                "{}: imageID {} is neither {} nor {}",
                c.name,
                c.image_id,
                r.digest,
                r.id
            );
            *seen.entry(c.image).or_default() += 1;
        }
    }
    for kind in ["/operator:", "/sidecar:", "/demo:"] {
        assert!(
            seen.keys().any(|i| i.contains(kind)),
            "no container runs the {kind} image: {seen:?}"
        );
    }

    // Every shardmesh process on the node (they all run from /usr/local/bin in their image)
    // runs as 65532, never as root.
    let mut found: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        let exe = exe.to_string_lossy().to_string();
        let Some(name) = exe.strip_prefix("/usr/local/bin/shardmesh-") else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uids = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        found.entry(name.to_string()).or_default().push((pid, uids));
    }
    eprintln!("[e2e] shardmesh processes by binary (pid, real/effective/saved/fs uid): {found:?}");
    for binary in ["operator", "sidecar", "demo"] {
        let procs = found.get(binary).cloned().unwrap_or_default();
        assert!(
            !procs.is_empty(),
            "no shardmesh-{binary} process runs on the node: {found:?}"
        );
        for (pid, uids) in procs {
            assert_eq!(
                uids, "65532 65532 65532 65532",
                "shardmesh-{binary} pid {pid}"
            );
        }
    }
    ns.delete().await;
}
