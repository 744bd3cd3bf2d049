//! Sidecar injection as a pure function: a Pod → a JSON patch (RFC 6902) that adds the sidecar,
//! or the reason it is left alone, or the reason it is refused. No I/O, so every shape is
//! unit-tested by applying the patch to the pod.
//!
//! Idempotency is structural: a pod that already has a container named
//! [`SIDECAR_CONTAINER`] (in `containers` or `initContainers`) gets no patch at all. The API
//! server re-invokes mutating webhooks (`reinvocationPolicy: IfNeeded`), so a second call must
//! add nothing; appending blindly is what produced `Duplicate value` in a trial.
//!
//! Pods with an inbound (app) port also get the ordered-termination helper ([`super::hook`]):
//! an init container, a shared volume and a preStop hook on each application container.

use std::collections::BTreeMap;

use json_patch::{jsonptr::PointerBuf, AddOperation, Patch, PatchOperation};
use k8s_openapi::{
    api::core::v1::{
        Capabilities as LinuxCapabilities, Container, ContainerPort, EnvVar, EnvVarSource,
        HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements,
        SeccompProfile, SecurityContext,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{json, Value};
use shardmesh_api::{
    labels, ports,
    v1alpha1::{Resilience, ShardedService},
    validate::{validate, SIDECAR_CONTAINER},
};

use super::{annotations, hook};

/// User and group the sidecar runs as: the images are built `--nonroot` with this id, and an
/// explicit numeric id lets the kubelet verify `runAsNonRoot` whatever the image metadata says.
pub const SIDECAR_UID: i64 = 65532;

/// Port names of the sidecar; at most 15 characters, unique within the pod (dropped on a clash).
const INBOUND_PORT_NAME: &str = "shardmesh-in";
const ADMIN_PORT_NAME: &str = "shardmesh-admin";

/// What the injector puts into pods; fixed for the life of the webhook process.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectorConfig {
    /// Sidecar image reference.
    pub image: String,
    /// `imagePullPolicy` of the sidecar.
    pub image_pull_policy: String,
    /// Recorded in the `shardmesh.io/injected-version` annotation.
    pub version: String,
    /// Default resources of the sidecar (a pod annotation may override them).
    pub resources: ResourceRequirements,
    /// Native sidecar (init container with `restartPolicy: Always`, Kubernetes ≥ 1.29) instead
    /// of a regular container. Older servers silently drop the field, which would turn the
    /// sidecar into an init container that never exits and blocks the pod.
    pub native_sidecars: bool,
    /// Namespaces never injected: the operator's own (the webhook must not depend on itself)
    /// and kube-system. Checked here because 1.20 has no `kubernetes.io/metadata.name` label
    /// to exclude them by namespaceSelector.
    pub excluded_namespaces: Vec<String>,
    /// `SHARDMESH_LOG_LEVEL` of the sidecar.
    pub log_level: String,
}

impl InjectorConfig {
    /// A config for tests and benchmarks: regular containers, `shardmesh-system` excluded.
    pub fn example() -> Self {
        InjectorConfig {
            image: "shardmesh.local/sidecar:dev".into(),
            image_pull_policy: "IfNotPresent".into(),
            version: "0.1.0".into(),
            resources: ResourceRequirements::default(),
            native_sidecars: false,
            excluded_namespaces: vec!["shardmesh-system".into(), "kube-system".into()],
            log_level: "info".into(),
        }
    }
}

/// Skip reason of a pod that already has the sidecar (a re-invocation).
pub const ALREADY_INJECTED: &str = "sidecar already present";

/// The injector's verdict on one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admit the pod unchanged; the reason goes to the audit annotation and the debug log.
    Skip(&'static str),
    /// Admit the pod with this patch.
    Inject(Patch),
    /// Refuse the pod: it cannot work with the sidecar. The message names the field and the fix.
    Deny(String),
}

/// Decides what to do with `pod` being created in `namespace`.
pub fn decide(pod: &Pod, namespace: &str, cfg: &InjectorConfig) -> Decision {
    if cfg.excluded_namespaces.iter().any(|n| n == namespace) {
        return Decision::Skip("namespace excluded from injection");
    }
    let meta = &pod.metadata;
    let opted_out = |m: &Option<BTreeMap<String, String>>| {
        m.as_ref()
            .and_then(|m| m.get(annotations::INJECT))
            .is_some_and(|v| v.eq_ignore_ascii_case(annotations::INJECT_DISABLED))
    };
    if opted_out(&meta.annotations) || opted_out(&meta.labels) {
        return Decision::Skip("opted out (shardmesh.io/inject: disabled)");
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Decision::Skip("pod has no spec");
    };
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if spec
        .containers
        .iter()
        .chain(init)
        .any(|c| c.name == SIDECAR_CONTAINER)
    {
        return Decision::Skip(ALREADY_INJECTED);
    }
    match plan(pod, spec, cfg) {
        Ok(patch) => Decision::Inject(patch),
        Err(msg) => Decision::Deny(msg),
    }
}

fn plan(pod: &Pod, spec: &PodSpec, cfg: &InjectorConfig) -> Result<Patch, String> {
    if spec.host_network == Some(true) {
        return Err(
            "spec.hostNetwork: the sidecar's ports 4140, 4143 and 4191 would be bound on the \
             node and clash between pods; remove hostNetwork, or opt out with the annotation \
             shardmesh.io/inject: disabled"
                .into(),
        );
    }
    let init = spec.init_containers.as_deref().unwrap_or_default();
    for (kind, list) in [
        ("containers", &spec.containers[..]),
        ("initContainers", init),
    ] {
        for (i, c) in list.iter().enumerate() {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                if let Some((_, what)) = ports::RESERVED
                    .iter()
                    .find(|(r, _)| p.container_port == i32::from(*r))
                {
                    return Err(format!(
                        "spec.{kind}[{i}].ports[{j}].containerPort: {} is reserved for the \
                         {what} port of the shardmesh sidecar; use another port, or opt out \
                         with the annotation shardmesh.io/inject: disabled",
                        p.container_port
                    ));
                }
            }
        }
    }
    let notes = pod.metadata.annotations.as_ref();
    let note = |k: &str| notes.and_then(|n| n.get(k)).map(String::as_str);
    let app_port = app_port(note(annotations::APP_PORT), &spec.containers)?;
    // Only inbound traffic needs ordering against the application's exit.
    let ordered_termination = app_port.is_some();
    if ordered_termination {
        hook::check_clashes(spec)?;
    }
    let policy = note(annotations::RESILIENCE)
        .map(check_policy)
        .transpose()?;
    let leader_lease = note(annotations::LEADER_LEASE)
        .map(check_leader_lease)
        .transpose()?;
    let trace_start = match note(annotations::TRACE_START) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(format!(
                "metadata.annotations[{}]: {other:?} is neither \"true\" nor \"false\"; \
                 \"false\" makes the sidecar propagate callers' trace context without starting \
                 traces",
                annotations::TRACE_START
            ))
        }
    };
    let resources = match note(annotations::SIDECAR_RESOURCES) {
        None => cfg.resources.clone(),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            format!(
                "metadata.annotations[{}]: not a ResourceRequirements JSON ({e}); use e.g. \
                 {{\"limits\":{{\"memory\":\"128Mi\"}}}}",
                annotations::SIDECAR_RESOURCES
            )
        })?,
    };
    let used_names: Vec<&str> = spec
        .containers
        .iter()
        .chain(init)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| p.name.as_deref())
        .collect();
    let pod_labels = pod.metadata.labels.as_ref();
    let sidecar = sidecar_container(&SidecarInput {
        cfg,
        app_port,
        policy,
        leader_lease,
        trace_start,
        resources,
        used_port_names: &used_names,
        has_service_label: pod_labels.is_some_and(|l| l.contains_key(labels::SERVICE)),
        has_shard_label: pod_labels.is_some_and(|l| l.contains_key(labels::SHARD)),
    });
    // Serializing a k8s-openapi struct of plain data cannot fail.
    let sidecar = serde_json::to_value(&sidecar).unwrap_or(Value::Null);

    let mut ops = Vec::new();
    // Serializing a k8s-openapi struct of plain data cannot fail.
    let hook_init = ordered_termination
        .then(|| serde_json::to_value(hook::init_container(cfg)).unwrap_or(Value::Null));
    // The helper's init container goes first, so the binary is in place whatever the user's
    // init containers do; a native sidecar goes last, as before.
    let native = cfg.native_sidecars.then_some(sidecar.clone());
    match &spec.init_containers {
        None => {
            let list: Vec<Value> = hook_init.into_iter().chain(native).collect();
            if !list.is_empty() {
                ops.push(add(&["spec", "initContainers"], Value::Array(list)));
            }
        }
        Some(_) => {
            if let Some(h) = hook_init {
                ops.push(add(&["spec", "initContainers", "0"], h));
            }
            if let Some(n) = native {
                ops.push(add(&["spec", "initContainers", "-"], n));
            }
        }
    }
    if !cfg.native_sidecars {
        ops.push(add(&["spec", "containers", "-"], sidecar));
    }
    let mut notes = vec![(annotations::INJECTED_VERSION, cfg.version.clone())];
    if ordered_termination {
        match &spec.volumes {
            None => ops.push(add(&["spec", "volumes"], json!([hook::volume()]))),
            Some(_) => ops.push(add(&["spec", "volumes", "-"], hook::volume())),
        }
        let kept = hook::application_ops(&spec.containers, &mut ops);
        notes.extend(hook::kept_note(&kept));
    }
    if note(annotations::OUTBOUND_PROXY).is_some_and(is_true) {
        proxy_env(&spec.containers, &mut ops);
    }
    match &pod.metadata.annotations {
        None => {
            let map: serde_json::Map<String, Value> = notes
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        }
        Some(_) => {
            for (k, v) in notes {
                ops.push(add(&["metadata", "annotations", k], json!(v)));
            }
        }
    }
    Ok(Patch(ops))
}

fn is_true(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "true" | "enabled" | "yes")
}

/// One JSON-patch `add` at `path` (tokens, escaped as needed).
pub(super) fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

/// The app port: the annotation when present (must be valid), else the first declared container
/// port, else none (inbound proxy off).
fn app_port(annotation: Option<&str>, containers: &[Container]) -> Result<Option<u16>, String> {
    if let Some(text) = annotation {
        let port = text
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                format!(
                    "metadata.annotations[{}]: {text:?} is not a port; use the application's \
                     port number, 1-65535",
                    annotations::APP_PORT
                )
            })?;
        if let Some((_, what)) = ports::RESERVED.iter().find(|(r, _)| *r == port) {
            return Err(format!(
                "metadata.annotations[{}]: {port} is the sidecar's {what} port; move the \
                 application to another port",
                annotations::APP_PORT
            ));
        }
        return Ok(Some(port));
    }
    Ok(containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .and_then(|p| u16::try_from(p.container_port).ok()))
}

/// Checks a resilience policy annotation with the CRD's own rules, so a bad policy is refused
/// at pod creation with the field named, instead of a sidecar that exits at start.
fn check_policy(text: &str) -> Result<String, String> {
    let field = format!("metadata.annotations[{}]", annotations::RESILIENCE);
    let resilience: Resilience = serde_json::from_str(text).map_err(|e| {
        format!("{field}: not a resilience policy ({e}); use the JSON shape of a ShardedService's spec.resilience")
    })?;
    let probe = ShardedService::new(
        "policy",
        shardmesh_api::ShardedServiceSpec {
            shards: 1,
            replicas_per_shard: 1,
            port: 8080,
            shard_key: Default::default(),
            template: Default::default(),
            resilience,
            rollout: Default::default(),
            leader_election: Default::default(),
            resharding: Default::default(),
            placement: Default::default(),
        },
    );
    let problems: Vec<String> = validate(&probe)
        .into_iter()
        .filter_map(|e| {
            e.path
                .strip_prefix("spec.resilience")
                .map(|rest| format!("{field}{rest}: {}", e.message))
        })
        .collect();
    if problems.is_empty() {
        Ok(text.to_string())
    } else {
        Err(problems.join("; "))
    }
}

/// Checks the leader Lease duration annotation with the CRD's own rule
/// (`spec.leaderElection.leaseDuration`).
fn check_leader_lease(text: &str) -> Result<String, String> {
    let field = format!("metadata.annotations[{}]", annotations::LEADER_LEASE);
    let d = shardmesh_api::duration::parse_duration(text)
        .map_err(|e| format!("{field}: {e}; use e.g. 15s"))?;
    if !(std::time::Duration::from_secs(3)..=std::time::Duration::from_secs(300)).contains(&d) {
        return Err(format!("{field}: {text} is out of range; use 3s to 5m"));
    }
    Ok(text.to_string())
}

/// Adds `HTTP_PROXY`/`NO_PROXY` (both spellings: clients disagree on the case) to every app
/// container that does not define them already.
fn proxy_env(containers: &[Container], ops: &mut Vec<PatchOperation>) {
    let proxy = format!("http://127.0.0.1:{}", ports::SIDECAR_OUTBOUND);
    let no_proxy = "localhost,127.0.0.1,::1";
    let wanted = [
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        ("NO_PROXY", no_proxy),
        ("no_proxy", no_proxy),
    ];
    for (i, c) in containers.iter().enumerate() {
        let index = i.to_string();
        let missing: Vec<Value> = wanted
            .iter()
            .filter(|(n, _)| !c.env.iter().flatten().any(|e| e.name == *n))
            .map(|(n, v)| json!({"name": n, "value": v}))
            .collect();
        match &c.env {
            None => ops.push(add(&["spec", "containers", &index, "env"], json!(missing))),
            Some(_) => {
                for var in missing {
                    ops.push(add(&["spec", "containers", &index, "env", "-"], var));
                }
            }
        }
    }
}

struct SidecarInput<'a> {
    cfg: &'a InjectorConfig,
    app_port: Option<u16>,
    policy: Option<String>,
    leader_lease: Option<String>,
    trace_start: Option<bool>,
    resources: ResourceRequirements,
    used_port_names: &'a [&'a str],
    has_service_label: bool,
    has_shard_label: bool,
}

fn sidecar_container(input: &SidecarInput<'_>) -> Container {
    let cfg = input.cfg;
    let mut env = Vec::new();
    let mut literal = |name: &str, value: String| {
        env.push(EnvVar {
            name: name.into(),
            value: Some(value),
            value_from: None,
        })
    };
    if let Some(port) = input.app_port {
        literal("SHARDMESH_APP_PORT", port.to_string());
    }
    if let Some(policy) = &input.policy {
        literal("SHARDMESH_POLICY", policy.clone());
    }
    if let Some(lease) = &input.leader_lease {
        literal("SHARDMESH_LEADER_LEASE", lease.clone());
    }
    if let Some(start) = input.trace_start {
        literal("SHARDMESH_TRACE_START", start.to_string());
    }
    literal("SHARDMESH_LOG_LEVEL", cfg.log_level.clone());
    let mut field = |name: &str, path: String| {
        env.push(EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path,
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        })
    };
    field("POD_NAME", "metadata.name".into());
    field("POD_NAMESPACE", "metadata.namespace".into());
    field("POD_IP", "status.podIP".into());
    // The sidecar's registry Lease is owned by the pod (garbage-collected with it).
    field("POD_UID", "metadata.uid".into());
    if input.has_service_label {
        field(
            "SHARDMESH_SERVICE",
            format!("metadata.labels['{}']", labels::SERVICE),
        );
    }
    if input.has_shard_label {
        field(
            "SHARDMESH_SHARD",
            format!("metadata.labels['{}']", labels::SHARD),
        );
    }

    let name = |n: &str| (!input.used_port_names.contains(&n)).then(|| n.to_string());
    let mut container_ports = Vec::new();
    if input.app_port.is_some() {
        container_ports.push(ContainerPort {
            name: name(INBOUND_PORT_NAME),
            container_port: i32::from(ports::SIDECAR_INBOUND),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }
    container_ports.push(ContainerPort {
        name: name(ADMIN_PORT_NAME),
        container_port: i32::from(ports::SIDECAR_ADMIN),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ports::SIDECAR_ADMIN)),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        env: Some(env),
        ports: Some(container_ports),
        liveness_probe: Some(probe("/live", 10)),
        readiness_probe: Some(probe("/ready", 2)),
        resources: Some(input.resources.clone()),
        restart_policy: cfg.native_sidecars.then(|| "Always".to_string()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(hardened_security_context()),
        ..Container::default()
    }
}

/// The sidecar's security context, also used by the hook's init container: non-root with a
/// numeric id, read-only root, no privilege escalation, no capabilities, the runtime's seccomp
/// profile (what the `restricted` Pod Security Standard asks for).
pub(super) fn hardened_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        run_as_group: Some(SIDECAR_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(LinuxCapabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("pod fixture")
    }

    fn plain() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"shardmesh.io/inject": "enabled"}},
            "spec": {"containers": [{
                "name": "app", "image": "demo:1",
                "ports": [{"containerPort": 8080}]
            }]}
        })
    }

    /// Applies the decision's patch to the pod JSON (as the API server would) and returns it.
    fn apply(v: &Value, cfg: &InjectorConfig) -> (Value, Patch) {
        let Decision::Inject(patch) = decide(&pod(v.clone()), "shop", cfg) else {
            panic!("expected a patch for {v}");
        };
        let mut doc = v.clone();
        json_patch::patch(&mut doc, &patch).expect("patch applies cleanly");
        // The result is still a valid Pod.
        let _: Pod = serde_json::from_value(doc.clone()).expect("patched pod deserializes");
        (doc, patch)
    }

    fn sidecar<'a>(doc: &'a Value, list: &str) -> &'a Value {
        doc["spec"][list]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == SIDECAR_CONTAINER))
            .expect("sidecar present")
    }

    fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
        c["env"].as_array()?.iter().find(|e| e["name"] == name)
    }

    #[test]
    fn plain_pod_gets_a_hardened_sidecar() {
        let cfg = InjectorConfig::example();
        let (doc, _) = apply(&plain(), &cfg);
        let containers = doc["spec"]["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[0]["name"], "app");
        let s = sidecar(&doc, "containers");
        assert_eq!(s["image"], "shardmesh.local/sidecar:dev");
        assert!(s.get("restartPolicy").is_none());
        let sc = &s["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(s["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(s["readinessProbe"]["httpGet"]["port"], 4191);
        assert_eq!(s["livenessProbe"]["httpGet"]["path"], "/live");
        // App port from the first declared port; inbound port exposed.
        assert_eq!(
            env(s, "SHARDMESH_APP_PORT").expect("app port")["value"],
            "8080"
        );
        let ports: Vec<i64> = s["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .filter_map(|p| p["containerPort"].as_i64())
            .collect();
        assert_eq!(ports, vec![4143, 4191]);
        for var in ["POD_NAME", "POD_NAMESPACE", "POD_IP", "POD_UID"] {
            assert!(
                env(s, var).expect(var)["valueFrom"]["fieldRef"].is_object(),
                "{var}"
            );
        }
        assert_eq!(
            doc["metadata"]["annotations"]["shardmesh.io/injected-version"],
            "0.1.0"
        );
        // No proxy env unless asked.
        assert!(env(&containers[0], "HTTP_PROXY").is_none());
    }

    #[test]
    fn reinvocation_adds_nothing() {
        let cfg = InjectorConfig::example();
        for native in [false, true] {
            let cfg = InjectorConfig {
                native_sidecars: native,
                ..cfg.clone()
            };
            let (once, _) = apply(&plain(), &cfg);
            assert_eq!(
                decide(&pod(once), "shop", &cfg),
                Decision::Skip("sidecar already present")
            );
        }
    }

    #[test]
    fn existing_sidecar_is_a_no_op() {
        let mut v = plain();
        v["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": SIDECAR_CONTAINER, "image": "old:1"}));
        assert!(matches!(
            decide(&pod(v), "shop", &InjectorConfig::example()),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn native_shape_is_a_restartable_init_container() {
        let cfg = InjectorConfig {
            native_sidecars: true,
            ..InjectorConfig::example()
        };
        // Without and with existing init containers (two different patch paths).
        let (doc, _) = apply(&plain(), &cfg);
        assert_eq!(doc["spec"]["containers"].as_array().map(Vec::len), Some(1));
        assert_eq!(sidecar(&doc, "initContainers")["restartPolicy"], "Always");
        let names = |doc: &Value| -> Vec<String> {
            doc["spec"]["initContainers"]
                .as_array()
                .expect("init")
                .iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        };
        // The helper's installer first, the native sidecar last.
        assert_eq!(names(&doc), ["shardmesh-hook", SIDECAR_CONTAINER]);
        assert!(doc["spec"]["containers"][0]["lifecycle"]["preStop"].is_object());
        let mut v = plain();
        v["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m:1"}]);
        let (doc, _) = apply(&v, &cfg);
        assert_eq!(
            names(&doc),
            ["shardmesh-hook", "migrate", SIDECAR_CONTAINER]
        );
        assert_eq!(doc["spec"]["initContainers"][2]["restartPolicy"], "Always");
        assert!(doc["spec"]["initContainers"][0]
            .get("restartPolicy")
            .is_none());
    }

    const PRESTOP: [&str; 4] = [
        "/var/run/shardmesh/shardmesh-hook",
        "wait-drained",
        "--admin",
        "127.0.0.1:4191",
    ];

    #[test]
    fn app_containers_wait_for_the_inbound_drain_before_sigterm() {
        let cfg = InjectorConfig::example();
        let mut v = plain();
        v["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        v["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/data"}]);
        v["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": "worker", "image": "w:1",
                         "lifecycle": {"postStart": {"exec": {"command": ["true"]}}}}));
        let (doc, _) = apply(&v, &cfg);
        let vols = doc["spec"]["volumes"].as_array().expect("volumes");
        assert_eq!(vols.len(), 2);
        assert_eq!(
            vols[1],
            json!({"name": "shardmesh-hook", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}})
        );
        let init = &doc["spec"]["initContainers"][0];
        assert_eq!(init["name"], "shardmesh-hook");
        assert_eq!(init["image"], "shardmesh.local/sidecar:dev");
        assert_eq!(
            init["command"],
            json!(["/shardmesh-hook", "install", "/var/run/shardmesh"])
        );
        assert_eq!(
            init["securityContext"],
            sidecar(&doc, "containers")["securityContext"]
        );
        assert_eq!(
            init["volumeMounts"],
            json!([{"name": "shardmesh-hook", "mountPath": "/var/run/shardmesh"}])
        );
        assert_eq!(init["resources"]["limits"]["memory"], "32Mi");
        let containers = doc["spec"]["containers"].as_array().expect("containers");
        for c in &containers[..2] {
            assert_eq!(
                c["lifecycle"]["preStop"]["exec"]["command"],
                json!(PRESTOP),
                "{c}"
            );
            let mounts = c["volumeMounts"].as_array().expect("mounts");
            assert_eq!(
                mounts.last(),
                Some(
                    &json!({"name": "shardmesh-hook", "mountPath": "/var/run/shardmesh", "readOnly": true})
                )
            );
        }
        assert_eq!(containers[0]["volumeMounts"][0]["name"], "data");
        assert_eq!(
            containers[1]["lifecycle"]["postStart"]["exec"]["command"],
            json!(["true"])
        );
        let s = sidecar(&doc, "containers");
        assert!(s.get("lifecycle").is_none() && s.get("volumeMounts").is_none());
        assert!(doc["metadata"]["annotations"]
            .get("shardmesh.io/prestop")
            .is_none());
    }

    #[test]
    fn a_users_own_prestop_is_kept_and_noted() {
        let mut v = plain();
        v["metadata"]["annotations"] = json!({"team": "a"});
        v["spec"]["containers"][0]["lifecycle"] =
            json!({"preStop": {"httpGet": {"path": "/quit", "port": 8080}}});
        v["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .extend([
                json!({"name": "worker", "image": "w:1"}),
                json!({"name": "cron", "image": "c:1",
                       "lifecycle": {"preStop": {"exec": {"command": ["/bin/stop"]}}}}),
            ]);
        let (doc, _) = apply(&v, &InjectorConfig::example());
        let c = &doc["spec"]["containers"];
        assert_eq!(c[0]["lifecycle"]["preStop"]["httpGet"]["path"], "/quit");
        assert_eq!(
            c[1]["lifecycle"]["preStop"]["exec"]["command"],
            json!(PRESTOP)
        );
        assert_eq!(
            c[2]["lifecycle"]["preStop"]["exec"]["command"],
            json!(["/bin/stop"])
        );
        let notes = &doc["metadata"]["annotations"];
        assert_eq!(notes["shardmesh.io/prestop"], "kept-user-hook:app,cron");
        assert_eq!(notes["team"], "a");
        // Without annotations at all, the note comes in the new map.
        let mut v = plain();
        v["spec"]["containers"][0]["lifecycle"] = json!({"preStop": {"exec": {"command": ["x"]}}});
        let (doc, _) = apply(&v, &InjectorConfig::example());
        assert_eq!(
            doc["metadata"]["annotations"]["shardmesh.io/prestop"],
            "kept-user-hook:app"
        );
    }

    #[test]
    fn opt_out_and_excluded_namespaces_are_untouched() {
        let cfg = InjectorConfig::example();
        let mut v = plain();
        v["metadata"]["annotations"] = json!({"shardmesh.io/inject": "disabled"});
        assert!(matches!(
            decide(&pod(v), "shop", &cfg),
            Decision::Skip(r) if r.contains("opted out")
        ));
        let mut v = plain();
        v["metadata"]["labels"]["shardmesh.io/inject"] = json!("Disabled");
        assert!(matches!(decide(&pod(v), "shop", &cfg), Decision::Skip(_)));
        for ns in ["kube-system", "shardmesh-system"] {
            assert_eq!(
                decide(&pod(plain()), ns, &cfg),
                Decision::Skip("namespace excluded from injection")
            );
        }
    }

    #[test]
    fn pod_without_ports_has_no_inbound_proxy() {
        let mut v = plain();
        v["spec"]["containers"][0]
            .as_object_mut()
            .expect("container")
            .remove("ports");
        let (doc, _) = apply(&v, &InjectorConfig::example());
        let s = sidecar(&doc, "containers");
        assert!(env(s, "SHARDMESH_APP_PORT").is_none());
        // No inbound traffic, nothing to order: no helper, volume or preStop hook.
        let spec = &doc["spec"];
        assert!(spec.get("initContainers").is_none() && spec.get("volumes").is_none());
        assert!(spec["containers"][0].get("lifecycle").is_none());
        assert!(spec["containers"][0].get("volumeMounts").is_none());
        assert_eq!(
            s["ports"],
            json!([{"name": "shardmesh-admin", "containerPort": 4191, "protocol": "TCP"}])
        );
    }

    #[test]
    fn many_containers_each_get_proxy_env_when_asked() {
        let mut v = plain();
        v["metadata"]["annotations"] = json!({"shardmesh.io/outbound-proxy": "true"});
        let containers: Vec<Value> = (0..12)
            .map(|i| {
                let mut c = json!({"name": format!("c{i}"), "image": "x:1"});
                // Some with env (append path), one with HTTP_PROXY of its own (kept).
                if i % 2 == 0 {
                    c["env"] = json!([{"name": "A", "value": "1"}]);
                }
                if i == 4 {
                    c["env"] = json!([{"name": "HTTP_PROXY", "value": "http://mine:3128"}]);
                }
                c
            })
            .collect();
        v["spec"]["containers"] = json!(containers);
        v["spec"]["initContainers"] = json!([{"name": "init", "image": "x:1"}]);
        let (doc, _) = apply(&v, &InjectorConfig::example());
        let out = doc["spec"]["containers"].as_array().expect("containers");
        assert_eq!(out.len(), 13);
        for c in &out[..12] {
            assert!(env(c, "NO_PROXY").is_some(), "{c}");
            let names: Vec<&str> = c["env"]
                .as_array()
                .expect("env")
                .iter()
                .filter_map(|e| e["name"].as_str())
                .collect();
            assert_eq!(
                names.iter().filter(|n| **n == "HTTP_PROXY").count(),
                1,
                "{names:?}"
            );
        }
        assert_eq!(
            env(&out[4], "HTTP_PROXY").expect("kept")["value"],
            "http://mine:3128"
        );
        assert_eq!(
            env(&out[1], "HTTP_PROXY").expect("set")["value"],
            "http://127.0.0.1:4140"
        );
        // Init containers and the sidecar itself get no proxy env.
        assert!(env(&doc["spec"]["initContainers"][0], "HTTP_PROXY").is_none());
        assert!(env(sidecar(&doc, "containers"), "HTTP_PROXY").is_none());
        // No app port annotation and no ports anywhere: inbound off.
        assert!(env(sidecar(&doc, "containers"), "SHARDMESH_APP_PORT").is_none());
    }

    #[test]
    fn shard_pod_passes_port_policy_and_identity() {
        let mut v = plain();
        v["metadata"]["labels"] =
            json!({"shardmesh.io/service": "orders", "shardmesh.io/shard": "2"});
        v["metadata"]["annotations"] = json!({
            "shardmesh.io/app-port": "9090",
            "shardmesh.io/resilience": "{\"retries\":{\"maxAttempts\":4}}",
            "shardmesh.io/leader-lease-duration": "20s",
            "shardmesh.io/trace-start": "false",
            "other": "kept"
        });
        let (doc, _) = apply(&v, &InjectorConfig::example());
        let s = sidecar(&doc, "containers");
        assert_eq!(
            env(s, "SHARDMESH_LEADER_LEASE").expect("leader")["value"],
            "20s"
        );
        let uids = s["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter(|e| e["name"] == "POD_UID")
            .count();
        assert_eq!(uids, 1, "each variable once");
        assert_eq!(env(s, "SHARDMESH_APP_PORT").expect("port")["value"], "9090");
        assert_eq!(
            env(s, "SHARDMESH_TRACE_START").expect("trace start")["value"],
            "false"
        );
        assert_eq!(
            env(s, "SHARDMESH_POLICY").expect("policy")["value"],
            "{\"retries\":{\"maxAttempts\":4}}"
        );
        assert_eq!(
            env(s, "SHARDMESH_SHARD").expect("shard")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.labels['shardmesh.io/shard']"
        );
        let notes = &doc["metadata"]["annotations"];
        assert_eq!(notes["other"], "kept");
        assert_eq!(notes["shardmesh.io/injected-version"], "0.1.0");
    }

    #[test]
    fn unusable_pods_are_denied_naming_the_field() {
        let cfg = InjectorConfig::example();
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"metadata": {"annotations": {"shardmesh.io/app-port": "http"}}}),
                "metadata.annotations[shardmesh.io/app-port]",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/app-port": "4143"}}}),
                "metadata.annotations[shardmesh.io/app-port]",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/resilience": "{\"retries\":{\"maxAttempts\":0}}"}}}),
                "metadata.annotations[shardmesh.io/resilience].retries.maxAttempts",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/resilience": "not json"}}}),
                "metadata.annotations[shardmesh.io/resilience]",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/sidecar-resources": "[]"}}}),
                "metadata.annotations[shardmesh.io/sidecar-resources]",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/leader-lease-duration": "1s"}}}),
                "metadata.annotations[shardmesh.io/leader-lease-duration]",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/leader-lease-duration": "soon"}}}),
                "metadata.annotations[shardmesh.io/leader-lease-duration]",
            ),
            (
                json!({"metadata": {"annotations": {"shardmesh.io/trace-start": "off"}}}),
                "metadata.annotations[shardmesh.io/trace-start]",
            ),
            (json!({"spec": {"hostNetwork": true}}), "spec.hostNetwork"),
            (
                json!({"spec": {"volumes": [{"name": "x", "emptyDir": {}}, {"name": "shardmesh-hook", "emptyDir": {}}]}}),
                "spec.volumes[1].name",
            ),
            (
                json!({"spec": {"initContainers": [{"name": "shardmesh-hook", "image": "x"}]}}),
                "spec.initContainers[0].name",
            ),
            (
                json!({"spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}],
                       "volumeMounts": [{"name": "v", "mountPath": "/var/run/shardmesh/"}]}]}}),
                "spec.containers[0].volumeMounts[0].mountPath",
            ),
            (
                json!({"spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 4191}]}]}}),
                "spec.containers[0].ports[0].containerPort",
            ),
        ];
        for (patch, field) in cases {
            let mut v = plain();
            for part in ["metadata", "spec"] {
                if let Some(obj) = patch.get(part).and_then(Value::as_object) {
                    for (k, val) in obj {
                        v[part][k] = val.clone();
                    }
                }
            }
            match decide(&pod(v), "shop", &cfg) {
                Decision::Deny(msg) => assert!(msg.starts_with(field), "{field}: {msg}"),
                other => panic!("{field}: expected a denial, got {other:?}"),
            }
        }
    }

    #[test]
    fn port_name_clash_drops_only_the_name() {
        let mut v = plain();
        v["spec"]["containers"][0]["ports"] =
            json!([{"name": "shardmesh-admin", "containerPort": 8080}]);
        let (doc, _) = apply(&v, &InjectorConfig::example());
        let s = sidecar(&doc, "containers");
        assert!(s["ports"][1].get("name").is_none());
        assert_eq!(s["ports"][0]["name"], "shardmesh-in");
    }
}
