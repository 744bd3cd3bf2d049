//! Admission webhooks served by `shardmesh-operator webhook`: the mutating webhook that injects
//! the sidecar ([`inject`]) and the validating webhook for ShardedServices ([`validating`]), over
//! HTTPS ([`server`]) with a self-managed CA and serving certificate ([`tls`]).
//!
//! [`Admission::handle`] is the whole request path from body bytes to response bytes, without
//! I/O, so it is what the unit tests and the latency benchmark exercise.

pub mod annotations;
pub mod hook;
pub mod inject;
pub mod server;
pub mod tls;
pub mod validating;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    core::{
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
        DynamicObject, Status,
    },
    Client,
};
use shardmesh_api::ShardedService;
use tracing::{debug, info, warn};

use crate::capabilities::Capabilities;
use inject::{Decision, InjectorConfig};
use tls::{CertResolver, TlsManager, TlsSettings, TlsTargets};

/// Path of the pod-mutating (injection) webhook.
pub const MUTATE_PATH: &str = "/mutate-pods";
/// Path of the ShardedService-validating webhook.
pub const VALIDATE_PATH: &str = "/validate-shardedservices";

/// A request that is not an AdmissionReview this server can answer.
#[derive(Debug, PartialEq, Eq)]
pub enum HandleError {
    /// Unknown path.
    NotFound,
    /// Not a readable AdmissionReview (HTTP 400: the API server applies the failurePolicy).
    BadRequest(String),
}

/// The admission logic shared by both webhooks.
#[derive(Clone, Debug)]
pub struct Admission {
    /// What to inject.
    pub injector: InjectorConfig,
    /// The sidecar is injected into ShardedService pods, so injection-only rules apply to
    /// ShardedServices.
    pub sidecar_injection: bool,
}

impl Admission {
    /// Answers one AdmissionReview posted to `path`.
    pub fn handle(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError> {
        if path != MUTATE_PATH && path != VALIDATE_PATH {
            return Err(HandleError::NotFound);
        }
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
            .map_err(|e| HandleError::BadRequest(format!("not an AdmissionReview: {e}")))?;
        let req: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| HandleError::BadRequest("AdmissionReview without a request".into()))?;
        let resp = if path == MUTATE_PATH {
            self.mutate(req)
        } else {
            self.validate(req)
        };
        serde_json::to_vec(&resp.into_review())
            .map_err(|e| HandleError::BadRequest(format!("cannot encode the response: {e}")))
    }

    fn mutate(&self, req: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let resp = AdmissionResponse::from(&req);
        if req.operation != Operation::Create || req.kind.kind != "Pod" {
            return resp;
        }
        let Some(obj) = req.object else {
            return resp;
        };
        // A pod the API server refuses anyway (no containers, no name) is left to its own
        // validation: the patch assumes both, and would not even apply to it as sent.
        let has_containers = obj
            .data
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(|c| c.as_array())
            .is_some_and(|c| !c.is_empty());
        let named = obj.metadata.name.is_some() || obj.metadata.generate_name.is_some();
        if !has_containers || !named {
            debug!(
                "pod without containers or name; admitted unchanged for the API server to refuse"
            );
            return resp;
        }
        let pod: Pod = match obj.try_parse() {
            Ok(p) => p,
            // Not a pod we can read: let the API server's own validation speak.
            Err(e) => {
                warn!(error = %e, "pod in admission request unreadable; admitted unchanged");
                return resp;
            }
        };
        let namespace = req
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
            .unwrap_or_default();
        match inject::decide(&pod, &namespace, &self.injector) {
            Decision::Skip(reason) => {
                if reason == inject::ALREADY_INJECTED {
                    // Only re-invocations (or hand-written sidecars) get here: worth a line.
                    info!(%namespace, pod = %name, reason, dry_run = req.dry_run, "not injected");
                } else {
                    debug!(%namespace, pod = %name, reason, dry_run = req.dry_run, "not injected");
                }
                let mut resp = resp;
                resp.audit_annotations
                    .insert("injection".into(), format!("skipped: {reason}"));
                resp
            }
            Decision::Inject(patch) => {
                info!(%namespace, pod = %name, version = %self.injector.version,
                      native = self.injector.native_sidecars, dry_run = req.dry_run,
                      "injecting sidecar");
                let fallback = resp.clone();
                resp.with_patch(patch).unwrap_or_else(|e| {
                    deny(
                        fallback,
                        format!("shardmesh: cannot encode the injection patch: {e}"),
                    )
                })
            }
            Decision::Deny(msg) => {
                info!(%namespace, pod = %name, reason = %msg, "pod refused by the injector");
                deny(resp, format!("shardmesh sidecar injection: {msg}"))
            }
        }
    }

    fn validate(&self, req: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let resp = AdmissionResponse::from(&req);
        if !matches!(req.operation, Operation::Create | Operation::Update) {
            return resp;
        }
        let Some(obj) = req.object else {
            return resp;
        };
        let new: ShardedService = match obj.try_parse() {
            Ok(s) => s,
            Err(e) => {
                return deny(
                    resp,
                    format!("cannot read the ShardedService: {e}; check the field types against `kubectl explain shardedservice.spec`"),
                )
            }
        };
        let old: Option<ShardedService> = match req.old_object.map(|o| o.try_parse()) {
            Some(Ok(o)) => Some(o),
            // An unreadable stored object: judge the new one on its own.
            Some(Err(_)) | None => None,
        };
        let errors = validating::problems(&new, old.as_ref(), self.sidecar_injection);
        if errors.is_empty() {
            return resp;
        }
        let msg = validating::message(&new, &errors);
        info!(reason = %msg, dry_run = req.dry_run, "ShardedService refused");
        deny(resp, msg)
    }
}

/// [`Admission`] counting requests and timing the handler for `/metrics`.
pub struct Measured {
    inner: Admission,
    metrics: Arc<crate::metrics::Metrics>,
}

impl server::Handler for Measured {
    fn handle(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError> {
        let started = std::time::Instant::now();
        let res = self.inner.handle(path, body);
        let webhook = match path {
            MUTATE_PATH => "mutate",
            VALIDATE_PATH => "validate",
            _ => "other",
        };
        let outcome = match &res {
            Ok(_) => "answered",
            Err(HandleError::NotFound) => "not_found",
            Err(HandleError::BadRequest(_)) => "bad_request",
        };
        self.metrics.admitted(webhook, outcome, started.elapsed());
        res
    }
}

/// Denies with HTTP-style code 422 (Invalid), which kubectl shows as the error message.
fn deny(resp: AdmissionResponse, msg: String) -> AdmissionResponse {
    let mut r = resp.deny(&msg);
    r.result = Status::failure(&msg, "Invalid").with_code(422);
    r
}

/// Everything `shardmesh-operator webhook` needs.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP `/metrics`, `/healthz` and `/readyz` endpoints.
    pub metrics_addr: SocketAddr,
    /// What to inject (its `native_sidecars` is set from the server version at start).
    pub injector: InjectorConfig,
    /// Whether injection-only ShardedService rules apply.
    pub sidecar_injection: bool,
    /// Secret and configuration names.
    pub targets: TlsTargets,
    /// Name of the webhook's Service (for the certificate's DNS names).
    pub service: String,
    /// CA lifetime.
    pub ca_validity: Duration,
    /// Serving certificate lifetime.
    pub cert_validity: Duration,
    /// How often the Secret and the bundles are re-checked (and rotations noticed).
    pub resync: Duration,
    /// After SIGTERM, how long to keep serving before exiting.
    pub drain: Duration,
}

/// Runs the webhook server until SIGTERM/SIGINT.
pub async fn run(client: Client, mut opts: WebhookOptions) -> anyhow::Result<()> {
    let caps = Capabilities::detect(&client).await?;
    opts.injector.native_sidecars = caps.native_sidecars;
    if !caps.native_sidecars {
        info!(version = %caps.version, "API server < 1.29: the sidecar is injected as a regular container, not a native sidecar");
    }
    let resolver = Arc::new(CertResolver::default());
    let manager = TlsManager::new(
        client,
        opts.targets.clone(),
        TlsSettings {
            ca_validity: opts.ca_validity,
            cert_validity: opts.cert_validity,
            dns_names: TlsSettings::for_service(&opts.service, &opts.targets.namespace),
        },
        resolver.clone(),
    );
    // No certificate, no server: retry the first sync until it works (RBAC or API trouble is
    // logged; the pod stays unready meanwhile).
    let mut delay = Duration::from_secs(1);
    loop {
        match manager.sync().await {
            Ok(_) => break,
            Err(e) => {
                warn!(error = %e, retry_in_s = delay.as_secs(), "TLS setup failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    let resync = opts.resync;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = manager.sync().await {
                warn!(error = %e, "TLS sync failed; serving the current certificate");
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.listen))?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.metrics_addr))?;
    tokio::spawn(crate::metrics::serve(metrics_listener, metrics.clone()));
    let admission = Arc::new(Measured {
        inner: Admission {
            injector: opts.injector,
            sidecar_injection: opts.sidecar_injection,
        },
        metrics,
    });
    info!(listen = %opts.listen, "admission webhook serving");
    let drain = opts.drain;
    let shutdown = async move {
        crate::runtime::shutdown_signal().await;
        // Endpoints drop a terminating pod asynchronously; keep answering meanwhile so no
        // admission fails (with failurePolicy Fail) on the way out.
        info!(
            drain_s = drain.as_secs(),
            "shutting down: serving during the drain delay"
        );
        tokio::time::sleep(drain).await;
    };
    server::serve(listener, server::tls_config(resolver)?, admission, shutdown).await;
    info!("admission webhook stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn admission() -> Admission {
        Admission {
            injector: InjectorConfig::example(),
            sidecar_injection: true,
        }
    }

    fn review(kind: &str, op: &str, ns: &str, object: Value, old: Value) -> Vec<u8> {
        let (group, version, resource) = if kind == "Pod" {
            ("", "v1", "pods")
        } else {
            ("shardmesh.io", "v1alpha1", "shardedservices")
        };
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": resource},
                "namespace": ns, "operation": op,
                "userInfo": {"username": "test"},
                "object": object, "oldObject": old, "dryRun": false
            }
        }))
        .expect("review")
    }

    fn response(out: &[u8]) -> Value {
        let v: Value = serde_json::from_slice(out).expect("json");
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"], "u-1");
        v["response"].clone()
    }

    #[test]
    fn mutation_round_trip_returns_a_base64_json_patch() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "labels": {"shardmesh.io/inject": "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "x:1"}]}});
        let out = admission()
            .handle(
                MUTATE_PATH,
                &review("Pod", "CREATE", "shop", pod.clone(), Value::Null),
            )
            .expect("answered");
        let r = response(&out);
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        // kube encodes the patch bytes as base64 in JSON; decode through serde like the API server.
        let resp: AdmissionResponse = serde_json::from_value(r).expect("response");
        let patch: json_patch::Patch =
            serde_json::from_slice(resp.patch.as_deref().expect("patch")).expect("patch json");
        let mut doc = pod;
        json_patch::patch(&mut doc, &patch).expect("applies");
        assert_eq!(doc["spec"]["containers"][1]["name"], "shardmesh-sidecar");
        // Re-invocation with the patched pod: allowed, no patch.
        let out = admission()
            .handle(
                MUTATE_PATH,
                &review("Pod", "CREATE", "shop", doc, Value::Null),
            )
            .expect("answered");
        let r = response(&out);
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
    }

    #[test]
    fn excluded_namespace_is_enforced_in_the_handler() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x", "labels": {"shardmesh.io/inject": "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "x:1"}]}});
        let out = admission()
            .handle(
                MUTATE_PATH,
                &review("Pod", "CREATE", "kube-system", pod, Value::Null),
            )
            .expect("answered");
        assert!(response(&out).get("patch").is_none());
    }

    #[test]
    fn invalid_sharded_service_is_denied_with_field_and_fix() {
        let svc = json!({"apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"shards": 2, "replicasPerShard": 1, "port": 4143,
                     "template": {"spec": {"containers": [{"name": "app", "image": "x:1"}]}}}});
        let out = admission()
            .handle(
                VALIDATE_PATH,
                &review("ShardedService", "CREATE", "shop", svc, Value::Null),
            )
            .expect("answered");
        let r = response(&out);
        assert_eq!(r["allowed"], false);
        assert_eq!(r["status"]["code"], 422);
        let msg = r["status"]["message"].as_str().expect("message");
        assert!(
            msg.contains("spec.port") && msg.contains("another port"),
            "{msg}"
        );
    }

    #[test]
    fn a_template_that_does_not_decode_is_denied_naming_the_field() {
        let svc = json!({"apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"shards": 2, "replicasPerShard": 1, "port": 8080,
                     "template": {"spec": {"containers": [{"name": "app", "image": "x:1",
                                                           "ports": [{"containerPort": "http"}]}]}}}});
        let out = admission()
            .handle(
                VALIDATE_PATH,
                &review("ShardedService", "CREATE", "shop", svc, Value::Null),
            )
            .expect("answered");
        let r = response(&out);
        assert_eq!(r["allowed"], false);
        assert_eq!(r["status"]["code"], 422);
        let msg = r["status"]["message"].as_str().expect("message");
        assert!(
            msg.contains("spec.template.spec.containers[0].ports[0].containerPort")
                && msg.contains("kubectl explain pod.spec.containers.ports.containerPort"),
            "{msg}"
        );
    }

    #[test]
    fn garbage_is_a_bad_request_and_unknown_paths_are_not_found() {
        assert!(matches!(
            admission().handle(MUTATE_PATH, b"{not json"),
            Err(HandleError::BadRequest(_))
        ));
        assert!(matches!(
            admission().handle(
                MUTATE_PATH,
                b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}"
            ),
            Err(HandleError::BadRequest(_))
        ));
        assert_eq!(
            admission().handle("/other", b"{}"),
            Err(HandleError::NotFound)
        );
    }
}
