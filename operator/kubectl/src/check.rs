//! `kubectl shardmesh check`: is shardmesh installed and working on this cluster? Each row is
//! one question with ok/warn/fail and the detail a person needs; any fail makes the exit code 1.
//! The row functions are pure; [`gather`] only fetches.

use k8s_openapi::{
    api::{
        admissionregistration::v1::{
            MutatingWebhookConfiguration, ServiceReference, ValidatingWebhookConfiguration,
        },
        core::v1::Secret,
    },
    jiff::Timestamp,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};
use serde::Serialize;
use serde_json::json;
use shardmesh_api::ShardedService;
use shardmesh_operator::capabilities::Capabilities;

use crate::{
    certs::{self, CertInfo, Validity},
    cluster::{self, Ctx, GROUP_VERSION},
    error::{api_code, Error, INSTALL_HINT},
    operator::{self, Leader},
    output::{Report, Table},
};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Works.
    Ok,
    /// Works, but deserves a look.
    Warn,
    /// Broken: shardmesh does not work as documented until it is fixed.
    Fail,
}

/// One row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// What was checked.
    pub name: &'static str,
    /// ok, warn or fail.
    pub status: Level,
    /// What was found, and the fix when it is not ok.
    pub detail: String,
}

fn row(name: &'static str, status: Level, detail: impl Into<String>) -> Row {
    Row {
        name,
        status,
        detail: detail.into(),
    }
}

/// What `check` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// No row failed (the exit code follows it).
    pub ok: bool,
    /// The rows, in a fixed order.
    pub checks: Vec<Row>,
    /// The operator's leader, as the Lease says.
    pub operator_leader: Option<Leader>,
}

impl CheckReport {
    /// The report of `checks`.
    pub fn new(checks: Vec<Row>, operator_leader: Option<Leader>) -> CheckReport {
        CheckReport {
            ok: checks.iter().all(|c| c.status != Level::Fail),
            checks,
            operator_leader,
        }
    }
}

impl Report for CheckReport {
    fn text(&self) -> String {
        let mut t = Table::new(&["check", "status", "detail"]);
        for c in &self.checks {
            let status = match c.status {
                Level::Ok => "ok",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            t.row(vec![c.name.to_string(), status.into(), c.detail.clone()]);
        }
        t.render()
    }
}

/// Rows of what the API server offers: version, PodDisruptionBudget API, native sidecars.
pub fn capability_rows(caps: &Capabilities, git_version: &str) -> Vec<Row> {
    let (major, minor) = caps.version.split_once('.').unwrap_or(("0", "0"));
    let supported = (
        major.parse::<u32>().unwrap_or(0),
        minor.parse::<u32>().unwrap_or(0),
    ) >= (1, 20);
    let mut rows = vec![row(
        "api-server",
        if supported { Level::Ok } else { Level::Warn },
        if supported {
            format!("{git_version} (Kubernetes {})", caps.version)
        } else {
            format!("{git_version}: older than 1.20, the oldest version shardmesh is tested on")
        },
    )];
    rows.push(match caps.pdb {
        Some(api) => row(
            "pod-disruption-budgets",
            Level::Ok,
            format!("{} (one budget per shard)", api.api_version()),
        ),
        None => row(
            "pod-disruption-budgets",
            Level::Warn,
            caps.notes().join("; "),
        ),
    });
    rows.push(row(
        "native-sidecars",
        Level::Ok,
        if caps.native_sidecars {
            "yes: the sidecar is injected as an init container with restartPolicy Always".into()
        } else {
            format!(
                "no (Kubernetes {} < 1.29): the sidecar is injected as a regular container",
                caps.version
            )
        },
    ));
    rows
}

/// The row for the shardmesh resources discovery lists.
pub fn discovery_row(served: &[String]) -> Row {
    let has = |r: &str| served.iter().any(|s| s == r);
    match (has("shardedservices"), has("shardmapslices")) {
        (true, true) => row(
            "crds",
            Level::Ok,
            format!("{GROUP_VERSION}: shardedservices, shardmapslices"),
        ),
        (true, false) => row(
            "crds",
            Level::Fail,
            "shardmapslices.shardmesh.io is missing (helm upgrade does not add CRDs): run \
             `kubectl apply -f crds/`",
        ),
        _ => row(
            "crds",
            Level::Fail,
            format!("{GROUP_VERSION} is not served: {INSTALL_HINT}"),
        ),
    }
}

/// The webhooks shardmesh registers, as found on the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Webhooks {
    /// Name of the ValidatingWebhookConfiguration validating ShardedServices, its failure
    /// policy, its Service and CA bundle.
    pub validating: Option<(String, String, Option<ServiceReference>, Vec<u8>)>,
    /// Name of the MutatingWebhookConfiguration injecting the sidecar.
    pub mutating: Option<String>,
}

/// Finds shardmesh's webhooks by what they do (any release name): the validating one has a
/// rule for `shardmesh.io` `shardedservices`, the mutating one a webhook named
/// `*.inject.shardmesh.io`.
pub fn find_webhooks(
    validating: &[ValidatingWebhookConfiguration],
    mutating: &[MutatingWebhookConfiguration],
) -> Webhooks {
    let v = validating.iter().find_map(|c| {
        let w = c.webhooks.iter().flatten().find(|w| {
            w.rules.iter().flatten().any(|r| {
                r.api_groups.iter().flatten().any(|g| g == "shardmesh.io")
                    && r.resources.iter().flatten().any(|x| x == "shardedservices")
            })
        })?;
        Some((
            c.metadata.name.clone().unwrap_or_default(),
            w.failure_policy.clone().unwrap_or_else(|| "Fail".into()),
            w.client_config.service.clone(),
            w.client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.clone())
                .unwrap_or_default(),
        ))
    });
    let m = mutating.iter().find_map(|c| {
        c.webhooks
            .iter()
            .flatten()
            .any(|w| w.name.ends_with(".inject.shardmesh.io"))
            .then(|| c.metadata.name.clone().unwrap_or_default())
    });
    Webhooks {
        validating: v,
        mutating: m,
    }
}

/// The row for the webhook configurations.
pub fn configurations_row(w: &Webhooks) -> Row {
    match (&w.validating, &w.mutating) {
        (Some((v, policy, _, _)), Some(m)) => row(
            "webhook-configurations",
            Level::Ok,
            format!("validating {v}, mutating {m} (failurePolicy {policy})"),
        ),
        (Some((v, policy, _, _)), None) => row(
            "webhook-configurations",
            Level::Warn,
            format!(
                "validating {v} (failurePolicy {policy}); no sidecar injector: pods get no \
                 sidecar unless their template has one"
            ),
        ),
        (None, _) => row(
            "webhook-configurations",
            Level::Fail,
            format!(
                "no ValidatingWebhookConfiguration validates shardedservices.shardmesh.io: bad \
                 specs are only refused after they are stored; {INSTALL_HINT}"
            ),
        ),
    }
}

/// How the probe (a dry-run create the validating webhook must refuse) came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The webhook answered and refused the bad spec, as it should.
    Refused(String),
    /// Admitted: no webhook was asked (missing, or unreachable under failurePolicy Ignore).
    Admitted,
    /// The API server could not call the webhook.
    Unreachable(String),
    /// Some other answer (e.g. the dry run is forbidden to this user).
    Other(String),
}

/// The `port` the probe asks for: reserved for the sidecar, which the CRD schema allows and
/// only shardmesh's validation refuses, so a refusal proves the webhook answered.
pub const PROBE_PORT: i32 = shardmesh_api::ports::SIDECAR_INBOUND as i32;

/// What the probe's answer means.
pub fn classify_probe(result: Result<(), kube::Error>) -> Probe {
    match result {
        Ok(()) => Probe::Admitted,
        Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook") => {
            Probe::Unreachable(s.message)
        }
        Err(kube::Error::Api(s)) if s.message.contains("denied the request") => {
            Probe::Refused(s.message)
        }
        Err(e) => Probe::Other(e.to_string()),
    }
}

/// The row for the probe.
pub fn probe_row(p: &Probe, namespace: &str) -> Row {
    match p {
        Probe::Refused(_) => row(
            "webhook",
            Level::Ok,
            format!(
                "reachable: a server-side dry-run create in {namespace} with spec.port \
                 {PROBE_PORT} was refused by the validating webhook"
            ),
        ),
        Probe::Admitted => row(
            "webhook",
            Level::Fail,
            format!(
                "not called: a dry-run create with spec.port {PROBE_PORT} (reserved) was \
                 admitted, so no validating webhook answered (missing, or unreachable with \
                 failurePolicy Ignore)"
            ),
        ),
        Probe::Unreachable(m) => row("webhook", Level::Fail, format!("unreachable: {m}")),
        Probe::Other(m) => row(
            "webhook",
            Level::Warn,
            format!("could not probe with a dry-run create in {namespace}: {m}"),
        ),
    }
}

/// The row for a certificate (`what`: the CA bundle or the serving certificate).
pub fn cert_row(name: &'static str, what: &str, c: &CertInfo, now: Timestamp) -> Row {
    let when = certs::relative(c.until, now);
    match certs::validity(c, now) {
        Validity::Good => row(
            name,
            Level::Ok,
            format!("{what} valid until {} ({when})", c.not_after),
        ),
        Validity::RotationDue => row(
            name,
            Level::Warn,
            format!(
                "{what} expires {} ({when}): less than a third of its lifetime left, the webhook \
                 should have rotated it (is it running?)",
                c.not_after
            ),
        ),
        Validity::Invalid => row(
            name,
            Level::Fail,
            format!(
                "{what} is not valid now (valid {} to {}): the API server cannot call the webhook",
                c.not_before, c.not_after
            ),
        ),
    }
}

/// The CA of `bundle` that issued `serving`, else the one valid longest.
pub fn issuing_ca<'a>(bundle: &'a [CertInfo], serving: Option<&CertInfo>) -> Option<&'a CertInfo> {
    serving
        .and_then(|s| bundle.iter().find(|c| c.subject_der == s.issuer_der))
        .or_else(|| bundle.iter().max_by_key(|c| c.until))
}

/// The row for the operator's leader.
pub fn leader_row(l: &Leader) -> Row {
    row(
        "operator-leader",
        if l.current { Level::Ok } else { Level::Fail },
        if l.current {
            format!("{}; Lease {}", l.detail, l.lease)
        } else {
            l.detail.clone()
        },
    )
}

/// Where the operator runs.
#[derive(Clone, Debug)]
pub struct Target {
    /// Namespace of the operator's leader Lease.
    pub operator_namespace: String,
    /// Name of that Lease.
    pub leader_lease: String,
    /// Name of the webhook's TLS Secret; `None`: `<webhook Service>-tls`, the chart's name.
    pub webhook_secret: Option<String>,
}

/// Runs every check. Only an API server that cannot be asked at all is an error.
pub async fn gather(ctx: &Ctx, target: &Target) -> Result<CheckReport, Error> {
    let client = &ctx.client;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| Error::from_kube("asking the server version", e))?;
    let caps = Capabilities::detect(client)
        .await
        .map_err(|e| Error::from_kube("discovering the API server's capabilities", e))?;
    let mut checks = capability_rows(&caps, &version.git_version);
    checks.push(discovery_row(&cluster::served_resources(client).await?));

    let hooks = webhooks(client).await;
    let found = match &hooks {
        Ok(h) => {
            checks.push(configurations_row(h));
            h.clone()
        }
        Err(e) => {
            checks.push(row(
                "webhook-configurations",
                Level::Warn,
                format!("cannot list them: {e}"),
            ));
            Webhooks::default()
        }
    };
    checks.push(probe_row(&probe(ctx).await, &ctx.namespace));
    checks.extend(cert_rows(client, &found, target, Timestamp::now()).await);

    let lease_ref = format!("{}/{}", target.operator_namespace, target.leader_lease);
    let leader =
        match cluster::leader_lease(client, &target.operator_namespace, &target.leader_lease).await
        {
            Ok(lease) => {
                let l = operator::leader(&lease_ref, lease.as_ref(), Timestamp::now());
                checks.push(leader_row(&l));
                Some(l)
            }
            Err(e) => {
                checks.push(row(
                    "operator-leader",
                    Level::Warn,
                    format!("cannot read it: {e}"),
                ));
                None
            }
        };
    Ok(CheckReport::new(checks, leader))
}

async fn webhooks(client: &Client) -> Result<Webhooks, String> {
    let v: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let m: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let lp = ListParams::default();
    let v = v.list(&lp).await.map_err(|e| e.to_string())?.items;
    let m = m.list(&lp).await.map_err(|e| e.to_string())?.items;
    Ok(find_webhooks(&v, &m))
}

/// A server-side dry-run create of a ShardedService the webhook must refuse; nothing is stored.
async fn probe(ctx: &Ctx) -> Probe {
    let api: Api<ShardedService> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let body: Result<ShardedService, _> = serde_json::from_value(json!({
        "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
        "metadata": {"name": "kubectl-shardmesh-check-probe"},
        "spec": {"shards": 1, "replicasPerShard": 1, "port": PROBE_PORT,
                 "template": {"spec": {"containers": [{"name": "app", "image": "probe"}]}}},
    }));
    let body = match body {
        Ok(b) => b,
        Err(e) => return Probe::Other(format!("building the probe: {e}")),
    };
    let pp = PostParams {
        dry_run: true,
        field_manager: Some("kubectl-shardmesh".into()),
    };
    classify_probe(api.create(&pp, &body).await.map(|_| ()))
}

async fn cert_rows(client: &Client, hooks: &Webhooks, target: &Target, now: Timestamp) -> Vec<Row> {
    let Some((config, _, service, bundle)) = &hooks.validating else {
        return vec![row(
            "webhook-ca",
            Level::Warn,
            "no webhook configuration to read a CA bundle from",
        )];
    };
    let mut rows = Vec::new();
    let bundle = if bundle.is_empty() {
        rows.push(row(
            "webhook-ca",
            Level::Fail,
            format!(
                "{config} has no caBundle: the webhook has not published its CA (is it running?)"
            ),
        ));
        Vec::new()
    } else {
        match certs::parse_bundle(bundle) {
            Ok(b) => b,
            Err(e) => {
                rows.push(row(
                    "webhook-ca",
                    Level::Fail,
                    format!("caBundle of {config}: {e}"),
                ));
                Vec::new()
            }
        }
    };
    let serving = match service {
        None => Err("the webhook is not a Service in the cluster".to_string()),
        Some(svc) => {
            let name = target
                .webhook_secret
                .clone()
                .unwrap_or_else(|| format!("{}-tls", svc.name));
            let api: Api<Secret> = Api::namespaced(client.clone(), &svc.namespace);
            match api.get_opt(&name).await {
                Ok(Some(s)) => s
                    .data
                    .as_ref()
                    .and_then(|d| d.get("tls.crt"))
                    .ok_or_else(|| format!("Secret {}/{name} has no tls.crt", svc.namespace))
                    .and_then(|pem| certs::parse_bundle(&pem.0))
                    .map(|mut c| (format!("{}/{name}", svc.namespace), c.remove(0))),
                Ok(None) => Err(format!(
                    "no Secret {}/{name} (--webhook-secret names another)",
                    svc.namespace
                )),
                Err(e) if api_code(&e) == Some(403) => Err(format!(
                    "not allowed to read Secret {}/{name}; only the CA bundle is checked",
                    svc.namespace
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let serving_cert = serving.as_ref().ok().map(|(_, c)| c);
    if let Some(ca) = issuing_ca(&bundle, serving_cert) {
        rows.push(cert_row(
            "webhook-ca",
            &format!("CA {}", ca.subject),
            ca,
            now,
        ));
    }
    rows.push(match &serving {
        Ok((secret, cert)) => {
            let mut r = cert_row(
                "webhook-serving-cert",
                &format!("certificate in {secret}"),
                cert,
                now,
            );
            if !bundle.is_empty() && !bundle.iter().any(|c| c.subject_der == cert.issuer_der) {
                r.status = Level::Fail;
                r.detail = format!(
                    "{}; its issuer {} is not in the caBundle of {config}: the API server will \
                     not trust it",
                    r.detail, cert.issuer
                );
            }
            r
        }
        Err(e) => row("webhook-serving-cert", Level::Warn, e.clone()),
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmesh_operator::{disruption::PdbApi, webhook::tls};
    use std::time::Duration;

    #[test]
    fn capabilities_of_1_20_are_fine_and_say_what_differs() {
        let caps = Capabilities {
            version: "1.20".into(),
            pdb: Some(PdbApi::V1beta1),
            native_sidecars: false,
        };
        let rows = capability_rows(&caps, "v1.20.2");
        assert!(rows.iter().all(|r| r.status == Level::Ok), "{rows:?}");
        assert_eq!(rows[1].detail, "policy/v1beta1 (one budget per shard)");
        assert!(rows[2].detail.starts_with("no (Kubernetes 1.20 < 1.29)"));
        let none = Capabilities { pdb: None, ..caps };
        assert_eq!(capability_rows(&none, "v1.20.2")[1].status, Level::Warn);
    }

    #[test]
    fn missing_crds_fail_with_the_fix() {
        let both = ["shardedservices".to_string(), "shardmapslices".to_string()];
        assert_eq!(discovery_row(&both).status, Level::Ok);
        let r = discovery_row(&both[..1]);
        assert_eq!(r.status, Level::Fail);
        assert!(r.detail.contains("kubectl apply -f crds/"));
        assert!(discovery_row(&[]).detail.contains("helm install"));
    }

    #[test]
    fn the_probe_tells_refused_from_unreachable_from_not_called() {
        let status = |msg: &str| {
            Err(kube::Error::Api(
                kube::core::Status::failure(msg, "BadRequest")
                    .with_code(400)
                    .boxed(),
            ))
        };
        let refused = classify_probe(status(
            "admission webhook \"shardedservices.validate.shardmesh.io\" denied the request: spec.port: 4143 is reserved",
        ));
        assert_eq!(probe_row(&refused, "default").status, Level::Ok);
        let down = classify_probe(status(
            "Internal error occurred: failed calling webhook \"shardedservices.validate.shardmesh.io\": connection refused",
        ));
        assert!(matches!(down, Probe::Unreachable(_)));
        assert_eq!(probe_row(&down, "default").status, Level::Fail);
        assert_eq!(
            probe_row(&classify_probe(Ok(())), "default").status,
            Level::Fail
        );
        assert_eq!(
            probe_row(&classify_probe(status("forbidden")), "x").status,
            Level::Warn
        );
    }

    #[test]
    fn certificates_are_judged_by_what_is_left_and_who_issued_them() {
        let now = Timestamp::from_second(1_800_000_000).expect("in range");
        let day = Duration::from_secs(86_400);
        let old = tls::issue_ca(now, day * 30).expect("ca");
        let ca = tls::issue_ca(now, day * 365).expect("ca");
        let cert = tls::issue_cert(&ca, &["w.ns.svc".into()], now, day * 90).expect("cert");
        let bundle = certs::parse_bundle(format!("{}{}", old.cert_pem, ca.cert_pem).as_bytes())
            .expect("bundle");
        let serving = certs::parse_bundle(cert.cert_pem.as_bytes())
            .expect("cert")
            .remove(0);
        let issuer = issuing_ca(&bundle, Some(&serving)).expect("issuer");
        assert!(issuer.subject.contains(&ca.name));
        let r = cert_row("webhook-serving-cert", "certificate", &serving, now);
        assert_eq!(r.status, Level::Ok);
        assert!(r.detail.contains("in 90d"), "{}", r.detail);
        let later = now.checked_add(day * 95).expect("in range");
        assert_eq!(
            cert_row("x", "certificate", &serving, later).status,
            Level::Fail
        );
    }

    #[test]
    fn the_report_fails_when_any_row_fails() {
        let ok = row("a", Level::Ok, "");
        let warn = row("b", Level::Warn, "");
        assert!(CheckReport::new(vec![ok.clone(), warn], None).ok);
        let r = CheckReport::new(vec![ok, row("c", Level::Fail, "broken")], None);
        assert!(!r.ok);
        assert!(r.text().contains("c       FAIL     broken"), "{}", r.text());
    }

    #[test]
    fn webhooks_are_found_by_what_they_do() {
        let v: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "rel-validator"},
            "webhooks": [{"name": "shardedservices.validate.shardmesh.io",
                "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                "clientConfig": {"service": {"name": "rel-webhook", "namespace": "sys"}, "caBundle": "QUJD"},
                "rules": [{"apiGroups": ["shardmesh.io"], "apiVersions": ["v1alpha1"],
                           "resources": ["shardedservices"], "operations": ["CREATE"]}]}],
        }))
        .expect("config");
        let found = find_webhooks(&[v], &[]);
        let (name, policy, svc, bundle) = found.validating.clone().expect("found");
        assert_eq!((name.as_str(), policy.as_str()), ("rel-validator", "Fail"));
        assert_eq!(svc.map(|s| s.name), Some("rel-webhook".into()));
        assert_eq!(bundle, b"ABC");
        assert_eq!(configurations_row(&found).status, Level::Warn);
        assert_eq!(configurations_row(&Webhooks::default()).status, Level::Fail);
    }
}
