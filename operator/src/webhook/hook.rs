//! The ordered-termination part of the injection: what makes the application outlive its
//! inbound traffic on every Kubernetes version (1.20 has no native sidecars, and its kubelet
//! sends SIGTERM to every container at once).
//!
//! An init container copies the static `shardmesh-hook` binary from the sidecar image into a
//! small in-memory `emptyDir`; every application container mounts it read-only and gets an exec
//! `preStop` hook `shardmesh-hook wait-drained`, which asks the sidecar to drain and returns when
//! inbound requests are done (an HTTP hook would get about a second on 1.20; an exec hook gets
//! its full time). A container that has a `preStop` of its own keeps it, and the pod says so in
//! the [`annotations::PRESTOP`] annotation. Only pods with an inbound (app) port need this.

use json_patch::PatchOperation;
use k8s_openapi::{
    api::core::v1::{Container, PodSpec, ResourceRequirements, VolumeMount},
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::{json, Value};
use shardmesh_api::ports;

use super::{
    annotations,
    inject::{add, hardened_security_context, InjectorConfig},
};

/// Name of the shared volume and of the init container that fills it.
pub const HOOK_NAME: &str = "shardmesh-hook";
/// Where the volume is mounted, in the init container and in the application containers.
pub const HOOK_DIR: &str = "/var/run/shardmesh";
/// The helper's path inside the sidecar image (`e2e/release.sh`, `sidecar/Dockerfile`).
pub const HOOK_IN_IMAGE: &str = "/shardmesh-hook";
/// The volume's size limit: the static helper is about 1.5 MiB.
const VOLUME_SIZE: &str = "4Mi";

/// The application's preStop command.
pub fn prestop_command() -> Vec<String> {
    vec![
        format!("{HOOK_DIR}/{HOOK_NAME}"),
        "wait-drained".into(),
        "--admin".into(),
        format!("127.0.0.1:{}", ports::SIDECAR_ADMIN),
    ]
}

/// Refuses a pod whose own names or paths would clash with the hook's, naming the field.
pub fn check_clashes(spec: &PodSpec) -> Result<(), String> {
    let fix = "rename it, or opt out with the annotation shardmesh.io/inject: disabled";
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if v.name == HOOK_NAME {
            return Err(format!(
                "spec.volumes[{i}].name: {HOOK_NAME:?} is reserved for the shardmesh preStop \
                 helper volume; {fix}"
            ));
        }
    }
    let init = spec.init_containers.as_deref().unwrap_or_default();
    for (kind, list) in [
        ("containers", &spec.containers[..]),
        ("initContainers", init),
    ] {
        for (i, c) in list.iter().enumerate() {
            if c.name == HOOK_NAME {
                return Err(format!(
                    "spec.{kind}[{i}].name: {HOOK_NAME:?} is reserved for the shardmesh init \
                     container; {fix}"
                ));
            }
        }
    }
    for (i, c) in spec.containers.iter().enumerate() {
        for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
            if m.mount_path.trim_end_matches('/') == HOOK_DIR {
                return Err(format!(
                    "spec.containers[{i}].volumeMounts[{j}].mountPath: {HOOK_DIR} is where the \
                     shardmesh preStop helper is mounted; mount the volume elsewhere, or opt \
                     out with the annotation shardmesh.io/inject: disabled"
                ));
            }
        }
    }
    Ok(())
}

/// The shared volume: in memory, so nothing lands on the node's disk.
pub fn volume() -> Value {
    json!({"name": HOOK_NAME, "emptyDir": {"medium": "Memory", "sizeLimit": VOLUME_SIZE}})
}

/// The init container that installs the helper into the volume; hardened like the sidecar.
pub fn init_container(cfg: &InjectorConfig) -> Container {
    let q = |s: &str| Quantity(s.to_string());
    Container {
        name: HOOK_NAME.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![
            HOOK_IN_IMAGE.into(),
            "install".into(),
            HOOK_DIR.into(),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some([("cpu".into(), q("10m")), ("memory".into(), q("16Mi"))].into()),
            limits: Some([("memory".into(), q("32Mi"))].into()),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: HOOK_NAME.into(),
            mount_path: HOOK_DIR.into(),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(hardened_security_context()),
        ..Container::default()
    }
}

/// Adds the read-only mount and the preStop hook to every application container; returns the
/// names of the containers whose own preStop hook was kept.
pub fn application_ops(containers: &[Container], ops: &mut Vec<PatchOperation>) -> Vec<String> {
    let mount = json!({"name": HOOK_NAME, "mountPath": HOOK_DIR, "readOnly": true});
    let prestop = json!({"exec": {"command": prestop_command()}});
    let mut kept = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let index = i.to_string();
        let at = ["spec", "containers", index.as_str()];
        match &c.volume_mounts {
            None => ops.push(add(&[&at[..], &["volumeMounts"]].concat(), json!([mount]))),
            Some(_) => ops.push(add(
                &[&at[..], &["volumeMounts", "-"]].concat(),
                mount.clone(),
            )),
        }
        match &c.lifecycle {
            Some(l) if l.pre_stop.is_some() => kept.push(c.name.clone()),
            Some(_) => ops.push(add(
                &[&at[..], &["lifecycle", "preStop"]].concat(),
                prestop.clone(),
            )),
            None => ops.push(add(
                &[&at[..], &["lifecycle"]].concat(),
                json!({"preStop": prestop}),
            )),
        }
    }
    kept
}

/// The [`annotations::PRESTOP`] value telling users whose preStop hook was left alone.
pub fn kept_note(kept: &[String]) -> Option<(&'static str, String)> {
    (!kept.is_empty()).then(|| {
        (
            annotations::PRESTOP,
            format!("{}{}", annotations::PRESTOP_KEPT, kept.join(",")),
        )
    })
}
