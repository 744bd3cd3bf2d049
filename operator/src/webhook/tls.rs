//! Self-managed TLS for the webhooks: a CA and a serving certificate generated with rcgen, kept
//! in one Secret that every webhook replica shares, the CA bundle patched into both webhook
//! configurations, and rotation well before expiry.
//!
//! Agreement between replicas: the Secret is the only state. Every replica runs the same
//! deterministic [`plan`] on what it read and writes with optimistic concurrency (create, or
//! replace at the read `resourceVersion`); a loser of a race gets 409, re-reads and finds the
//! winner's state good, so replicas never fight. Each write bumps a generation the bundle
//! patches carry, so a replica that read an older Secret never overwrites a newer bundle.
//!
//! CA rotation is two-phase so the API server always trusts the certificate being served:
//! (1) a next CA is added and published in the bundle next to the current one; (2) only once
//! both configurations carry it, the next CA becomes current and the serving certificate is
//! re-issued by it; the old CA stays in the bundle until it expires, for replicas that have not
//! reloaded yet. The serving certificate alone is simply re-issued by the same CA.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::Secret,
    },
    jiff::{SignedDuration, Timestamp},
    ByteString,
};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    crypto::ring::sign::any_supported_type,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{info, warn};

const ANN_GENERATION: &str = "shardmesh.io/tls-generation";
const ANN_CA_NAME: &str = "shardmesh.io/ca-name";
const ANN_NEXT_NAME: &str = "shardmesh.io/ca-next-name";
const ANN_NEXT_NOT_AFTER: &str = "shardmesh.io/ca-next-not-after";
const ANN_PREV_NOT_AFTER: &str = "shardmesh.io/ca-previous-not-after";
/// Annotation with the serving certificate's issue time (RFC 3339).
pub const ANN_CERT_NOT_BEFORE: &str = "shardmesh.io/cert-not-before";
/// Annotation with the serving certificate's expiry (RFC 3339). Setting it to a past time makes
/// the replicas re-issue the certificate at their next sync (how the e2e test forces rotation).
pub const ANN_CERT_NOT_AFTER: &str = "shardmesh.io/cert-not-after";
/// Annotation with the CA's expiry; a past time forces a (two-phase) CA rotation.
pub const ANN_CA_NOT_AFTER: &str = "shardmesh.io/ca-not-after";

/// Lifetimes and names of the certificates.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Validity of a new CA; rotated when a third of it remains.
    pub ca_validity: Duration,
    /// Validity of a serving certificate; re-issued when a third of it remains.
    pub cert_validity: Duration,
    /// DNS names of the webhook Service (`svc`, `svc.ns`, `svc.ns.svc`, ...).
    pub dns_names: Vec<String>,
}

impl TlsSettings {
    /// The names the API server may use for Service `service` in `namespace`.
    pub fn for_service(service: &str, namespace: &str) -> Vec<String> {
        vec![
            service.to_string(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ]
    }
}

/// A CA with its key.
#[derive(Clone, Debug, PartialEq)]
pub struct Ca {
    /// Common name; unique per CA so chains are never ambiguous across rotations.
    pub name: String,
    /// Certificate (PEM).
    pub cert_pem: String,
    /// PKCS#8 key (PEM).
    pub key_pem: String,
    /// Expiry.
    pub not_after: Timestamp,
}

/// The serving certificate with its key.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingCert {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// PKCS#8 key (PEM).
    pub key_pem: String,
    /// Issue time.
    pub not_before: Timestamp,
    /// Expiry.
    pub not_after: Timestamp,
}

/// Everything the Secret holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsState {
    /// Incremented on every write; carried by the bundle patches.
    pub generation: u64,
    /// The CA that signs the serving certificate.
    pub ca: Ca,
    /// A CA published in the bundle ahead of becoming current.
    pub next_ca: Option<Ca>,
    /// The previous CA (certificate, expiry), trusted until it expires.
    pub previous_ca: Option<(String, Timestamp)>,
    /// The serving certificate.
    pub cert: ServingCert,
}

impl TlsState {
    /// The CA bundle for the webhook configurations: current, next and previous CA.
    pub fn bundle(&self) -> String {
        let mut b = self.ca.cert_pem.clone();
        if let Some(next) = &self.next_ca {
            b.push_str(&next.cert_pem);
        }
        if let Some((prev, _)) = &self.previous_ca {
            b.push_str(prev);
        }
        b
    }
}

/// A certificate could not be generated.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct CertError(#[from] rcgen::Error);

fn offset(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(t)
}

/// Least time the previous CA stays in the bundle after a CA rotation.
const PREVIOUS_CA_GRACE: SignedDuration = SignedDuration::from_hours(1);

/// Clock skew tolerated between this node and the API server.
const SKEW: SignedDuration = SignedDuration::from_hours(1);

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "shardmesh");
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A new CA valid from `now` for `validity`.
pub fn issue_ca(now: Timestamp, validity: Duration) -> Result<Ca, CertError> {
    let key = KeyPair::generate()?;
    // Time plus key bits: distinct even for two CAs made in the same millisecond.
    let tag: String = key
        .public_key_raw()
        .iter()
        .rev()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("shardmesh-webhook-ca-{}-{tag}", now.as_millisecond());
    let not_after = add(now, validity);
    let mut p = ca_params(&name);
    p.not_before = offset(now.saturating_sub(SKEW).unwrap_or(now));
    p.not_after = offset(not_after);
    let cert = p.self_signed(&key)?;
    Ok(Ca {
        name,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// A serving certificate for `dns_names` signed by `ca`, never outliving it.
pub fn issue_cert(
    ca: &Ca,
    dns_names: &[String],
    now: Timestamp,
    validity: Duration,
) -> Result<ServingCert, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::new(ca_params(&ca.name), ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(dns_names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names
            .first()
            .map(String::as_str)
            .unwrap_or("shardmesh-webhook"),
    );
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let not_after = add(now, validity).min(ca.not_after);
    p.not_before = offset(now.saturating_sub(SKEW).unwrap_or(now));
    p.not_after = offset(not_after);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_before: now,
        not_after,
    })
}

/// Whether less than a third of the span `from..until` remains at `now`.
fn expiring(from: Timestamp, until: Timestamp, now: Timestamp) -> bool {
    let total = until.duration_since(from);
    until.duration_since(now) < total / 3
}

/// The state to write given the state read (`None`: no usable Secret) and whether both webhook
/// configurations already carry the next CA. `None` means nothing to change.
pub fn plan(
    current: Option<&TlsState>,
    now: Timestamp,
    settings: &TlsSettings,
    bundle_has_next: bool,
) -> Result<Option<TlsState>, CertError> {
    let Some(cur) = current else {
        let ca = issue_ca(now, settings.ca_validity)?;
        let cert = issue_cert(&ca, &settings.dns_names, now, settings.cert_validity)?;
        return Ok(Some(TlsState {
            generation: 1,
            ca,
            next_ca: None,
            previous_ca: None,
            cert,
        }));
    };
    let mut s = cur.clone();
    if s.previous_ca
        .as_ref()
        .is_some_and(|(_, until)| *until <= now)
    {
        s.previous_ca = None;
    }
    let ca_issued =
        s.ca.not_after
            .saturating_sub(
                SignedDuration::try_from(settings.ca_validity).unwrap_or(SignedDuration::MAX),
            )
            .unwrap_or(now);
    if s.next_ca.is_none() && expiring(ca_issued.min(now), s.ca.not_after, now) {
        s.next_ca = Some(issue_ca(now, settings.ca_validity)?);
    } else if let (Some(next), true) = (s.next_ca.clone(), bundle_has_next) {
        // Trusted until it expires, and at least for a grace period: replicas still serving a
        // certificate it signed reload within a resync, and a forced early rotation (an expiry
        // annotation set in the past) must not drop it at once.
        let grace = now.saturating_add(PREVIOUS_CA_GRACE).unwrap_or(now);
        s.previous_ca = Some((s.ca.cert_pem.clone(), s.ca.not_after.max(grace)));
        s.ca = next;
        s.next_ca = None;
        s.cert = issue_cert(&s.ca, &settings.dns_names, now, settings.cert_validity)?;
    }
    // A CA past (or claimed past) its end cannot sign a usable certificate: a serving cert
    // issued from it would expire at once. The CA rotation above replaces it first.
    let ca_usable = s.ca.not_after > now;
    if ca_usable
        && (expiring(s.cert.not_before, s.cert.not_after, now) || s.cert.not_after > s.ca.not_after)
    {
        s.cert = issue_cert(&s.ca, &settings.dns_names, now, settings.cert_validity)?;
    }
    if s == *cur {
        return Ok(None);
    }
    s.generation = cur.generation.saturating_add(1);
    Ok(Some(s))
}

fn data_str(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Reads the state from a Secret; `None` when it is incomplete or damaged (then it is replaced).
pub fn from_secret(secret: &Secret) -> Option<TlsState> {
    let notes = secret.metadata.annotations.as_ref()?;
    let ts = |k: &str| notes.get(k)?.parse::<Timestamp>().ok();
    let ca = Ca {
        name: notes.get(ANN_CA_NAME)?.clone(),
        cert_pem: data_str(secret, "ca.crt")?,
        key_pem: data_str(secret, "ca.key")?,
        not_after: ts(ANN_CA_NOT_AFTER)?,
    };
    let next_ca = match notes.get(ANN_NEXT_NAME) {
        None => None,
        Some(name) => Some(Ca {
            name: name.clone(),
            cert_pem: data_str(secret, "ca-next.crt")?,
            key_pem: data_str(secret, "ca-next.key")?,
            not_after: ts(ANN_NEXT_NOT_AFTER)?,
        }),
    };
    let previous_ca = match ts(ANN_PREV_NOT_AFTER) {
        None => None,
        Some(until) => Some((data_str(secret, "ca-previous.crt")?, until)),
    };
    Some(TlsState {
        generation: notes.get(ANN_GENERATION)?.parse().ok()?,
        ca,
        next_ca,
        previous_ca,
        cert: ServingCert {
            cert_pem: data_str(secret, "tls.crt")?,
            key_pem: data_str(secret, "tls.key")?,
            not_before: ts(ANN_CERT_NOT_BEFORE)?,
            not_after: ts(ANN_CERT_NOT_AFTER)?,
        },
    })
}

/// The Secret holding `state` (type `kubernetes.io/tls`, extra keys for the CAs).
pub fn to_secret(state: &TlsState, name: &str, namespace: &str) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put("tls.crt", &state.cert.cert_pem);
    put("tls.key", &state.cert.key_pem);
    put("ca.crt", &state.ca.cert_pem);
    put("ca.key", &state.ca.key_pem);
    let mut notes = BTreeMap::new();
    let mut note = |k: &str, v: String| {
        notes.insert(k.to_string(), v);
    };
    note(ANN_GENERATION, state.generation.to_string());
    note(ANN_CA_NAME, state.ca.name.clone());
    note(ANN_CA_NOT_AFTER, state.ca.not_after.to_string());
    note(ANN_CERT_NOT_BEFORE, state.cert.not_before.to_string());
    note(ANN_CERT_NOT_AFTER, state.cert.not_after.to_string());
    if let Some(next) = &state.next_ca {
        note(ANN_NEXT_NAME, next.name.clone());
        note(ANN_NEXT_NOT_AFTER, next.not_after.to_string());
        put("ca-next.crt", &next.cert_pem);
        put("ca-next.key", &next.key_pem);
    }
    if let Some((prev, until)) = &state.previous_ca {
        note(ANN_PREV_NOT_AFTER, until.to_string());
        put("ca-previous.crt", prev);
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            annotations: Some(notes),
            labels: Some(
                [(
                    shardmesh_api::labels::MANAGED_BY.to_string(),
                    shardmesh_api::labels::MANAGED_BY_VALUE.to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Serves whatever certificate was set last: the TLS acceptor asks on every handshake, so a
/// rotated certificate is used by the next connection without a restart.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl CertResolver {
    /// Installs a certificate chain and key (PEM). Returns whether it changed.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<bool> {
        if self.current_pem().as_deref() == Some(cert_pem) {
            return Ok(false);
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("serving certificate PEM: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("serving key PEM: {e}"))?;
        let signer =
            any_supported_type(&key).map_err(|e| anyhow::anyhow!("serving key unusable: {e}"))?;
        let ck = Arc::new(CertifiedKey::new(chain, signer));
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        *cur = Some((cert_pem.to_string(), ck));
        Ok(true)
    }

    /// The PEM of the certificate being served.
    pub fn current_pem(&self) -> Option<String> {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().map(|(pem, _)| pem.clone())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().map(|(_, ck)| ck.clone())
    }
}

/// Where the TLS material lives and which configurations get the bundle.
#[derive(Clone, Debug)]
pub struct TlsTargets {
    /// Namespace of the Secret (the webhook's own).
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
    /// Name of the MutatingWebhookConfiguration (empty: none).
    pub mutating: String,
    /// Name of the ValidatingWebhookConfiguration (empty: none).
    pub validating: String,
}

/// Keeps the Secret, the served certificate and the configurations' CA bundles in sync.
pub struct TlsManager {
    client: Client,
    targets: TlsTargets,
    settings: TlsSettings,
    resolver: Arc<CertResolver>,
}

/// Outcome of one sync, for logs and readiness.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// This replica wrote a new state to the Secret.
    pub wrote_secret: bool,
    /// The served certificate changed.
    pub reloaded: bool,
    /// Configurations whose bundle this replica patched.
    pub patched: Vec<String>,
}

impl TlsManager {
    /// A manager serving through `resolver`.
    pub fn new(
        client: Client,
        targets: TlsTargets,
        settings: TlsSettings,
        resolver: Arc<CertResolver>,
    ) -> Self {
        TlsManager {
            client,
            targets,
            settings,
            resolver,
        }
    }

    /// One round: read, plan, write (retrying conflicts), reload, publish the bundle.
    pub async fn sync(&self) -> anyhow::Result<SyncReport> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.targets.namespace);
        let mut report = SyncReport::default();
        let mut attempts = 0;
        let state = loop {
            attempts += 1;
            let existing = secrets.get_opt(&self.targets.secret).await?;
            let state = existing.as_ref().and_then(from_secret);
            if existing.is_some() && state.is_none() {
                warn!(secret = %self.targets.secret, "webhook TLS Secret is incomplete; replacing it");
            }
            let has_next = match state.as_ref().and_then(|s| s.next_ca.as_ref()) {
                Some(next) => self.bundles_contain(&next.cert_pem).await?,
                None => false,
            };
            let Some(mut new) = plan(state.as_ref(), Timestamp::now(), &self.settings, has_next)?
            else {
                break state.ok_or_else(|| anyhow::anyhow!("no TLS state after planning"))?;
            };
            if let Some(old) = &state {
                new.generation = old.generation.saturating_add(1);
            } else if let Some(s) = &existing {
                // A damaged Secret: continue its generation count so bundles stay monotonic.
                let g = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANN_GENERATION))
                    .and_then(|g| g.parse::<u64>().ok())
                    .unwrap_or(0);
                new.generation = g.saturating_add(1);
            }
            let mut body = to_secret(&new, &self.targets.secret, &self.targets.namespace);
            let written = match &existing {
                None => secrets
                    .create(&PostParams::default(), &body)
                    .await
                    .map(|_| ()),
                Some(old) => {
                    body.metadata.resource_version = old.metadata.resource_version.clone();
                    secrets
                        .replace(&self.targets.secret, &PostParams::default(), &body)
                        .await
                        .map(|_| ())
                }
            };
            match written {
                Ok(()) => {
                    info!(
                        generation = new.generation,
                        next_ca = new.next_ca.is_some(),
                        "wrote webhook TLS Secret"
                    );
                    report.wrote_secret = true;
                    break new;
                }
                // Another replica wrote first: adopt its state on the next read.
                Err(kube::Error::Api(s)) if (s.code == 409) && attempts < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        report.reloaded = self
            .resolver
            .set(&state.cert.cert_pem, &state.cert.key_pem)?;
        if report.reloaded {
            info!(
                generation = state.generation,
                not_after = %state.cert.not_after,
                "serving certificate loaded"
            );
        }
        report.patched = self.publish_bundle(&state).await?;
        Ok(report)
    }

    async fn bundles_contain(&self, ca_pem: &str) -> anyhow::Result<bool> {
        let (m, v) = (&self.targets.mutating, &self.targets.validating);
        Ok((m.is_empty()
            || self
                .contains_in::<MutatingWebhookConfiguration>(m, ca_pem)
                .await?)
            && (v.is_empty()
                || self
                    .contains_in::<ValidatingWebhookConfiguration>(v, ca_pem)
                    .await?))
    }

    /// Whether every webhook of configuration `name` trusts `ca_pem` (an absent one is no
    /// obstacle: there is nothing to wait for).
    async fn contains_in<K: WebhookConfiguration>(
        &self,
        name: &str,
        ca_pem: &str,
    ) -> anyhow::Result<bool> {
        let api: Api<K> = Api::all(self.client.clone());
        Ok(match api.get_opt(name).await? {
            Some(mut c) => c.bundles().1.into_iter().all(|b| has(b, ca_pem)),
            None => true,
        })
    }

    /// Puts `bundle` into configuration `name`; `Ok(true)` when it was written.
    async fn publish_to<K: WebhookConfiguration>(
        &self,
        name: &str,
        bundle: &ByteString,
        generation: u64,
    ) -> anyhow::Result<bool> {
        let api: Api<K> = Api::all(self.client.clone());
        let Some(mut c) = api.get_opt(name).await? else {
            warn!(%name, kind = %K::kind(&()), "webhook configuration not found; caBundle not published");
            return Ok(false);
        };
        let (meta, bundles) = c.bundles();
        if !update_bundle(meta, bundles.into_iter(), bundle, generation) {
            return Ok(false);
        }
        replace_ok(api.replace(name, &PostParams::default(), &c).await)
    }

    async fn publish_bundle(&self, state: &TlsState) -> anyhow::Result<Vec<String>> {
        let bundle = ByteString(state.bundle().into_bytes());
        let (m, v, generation) = (
            &self.targets.mutating,
            &self.targets.validating,
            state.generation,
        );
        let mut patched = Vec::new();
        if !m.is_empty()
            && self
                .publish_to::<MutatingWebhookConfiguration>(m, &bundle, generation)
                .await?
        {
            patched.push(m.clone());
        }
        if !v.is_empty()
            && self
                .publish_to::<ValidatingWebhookConfiguration>(v, &bundle, generation)
                .await?
        {
            patched.push(v.clone());
        }
        if !patched.is_empty() {
            info!(generation = state.generation, configurations = ?patched, "published CA bundle");
        }
        Ok(patched)
    }
}

/// A conflict means another replica updated the configuration concurrently: not an error, the
/// next sync re-checks.
/// A webhook configuration whose `caBundle`s the manager keeps current.
trait WebhookConfiguration:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
{
    /// Its metadata and every webhook's `clientConfig.caBundle` (disjoint borrows).
    fn bundles(&mut self) -> (&mut ObjectMeta, Vec<&mut Option<ByteString>>);
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn bundles(&mut self) -> (&mut ObjectMeta, Vec<&mut Option<ByteString>>) {
        let hooks = self.webhooks.iter_mut().flatten();
        (
            &mut self.metadata,
            hooks.map(|w| &mut w.client_config.ca_bundle).collect(),
        )
    }
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn bundles(&mut self) -> (&mut ObjectMeta, Vec<&mut Option<ByteString>>) {
        let hooks = self.webhooks.iter_mut().flatten();
        (
            &mut self.metadata,
            hooks.map(|w| &mut w.client_config.ca_bundle).collect(),
        )
    }
}

fn replace_ok<T>(r: kube::Result<T>) -> anyhow::Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn has(bundle: &Option<ByteString>, pem: &str) -> bool {
    bundle
        .as_ref()
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .is_some_and(|b| b.contains(pem.trim()))
}

/// Sets every bundle to `bundle` unless the configuration already carries a newer generation
/// (this replica read an older Secret). Returns whether anything changed.
pub fn update_bundle<'a>(
    meta: &mut ObjectMeta,
    bundles: impl Iterator<Item = &'a mut Option<ByteString>>,
    bundle: &ByteString,
    generation: u64,
) -> bool {
    let theirs = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_GENERATION))
        .and_then(|g| g.parse::<u64>().ok())
        .unwrap_or(0);
    if theirs > generation {
        return false;
    }
    let mut changed = theirs != generation;
    for b in bundles {
        if b.as_ref() != Some(bundle) {
            *b = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANN_GENERATION.into(), generation.to_string());
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TlsSettings {
        TlsSettings {
            ca_validity: Duration::from_secs(3 * 365 * 86400),
            cert_validity: Duration::from_secs(90 * 86400),
            dns_names: TlsSettings::for_service("shardmesh-webhook", "shardmesh-system"),
        }
    }

    fn days(n: i64) -> SignedDuration {
        SignedDuration::from_hours(24 * n)
    }

    #[test]
    fn fresh_state_round_trips_through_the_secret() {
        let now = Timestamp::now();
        let s = plan(None, now, &settings(), false)
            .expect("plan")
            .expect("state");
        assert_eq!(s.generation, 1);
        let back = from_secret(&to_secret(&s, "tls", "ns")).expect("readable");
        assert_eq!(back.generation, s.generation);
        assert_eq!(back.cert.cert_pem, s.cert.cert_pem);
        // Timestamps are stored to the second or finer; equal after a round trip.
        assert_eq!(back.ca.not_after, s.ca.not_after);
        // Nothing to do right after creation.
        assert_eq!(
            plan(Some(&back), now, &settings(), false).expect("plan"),
            None
        );
        // The served certificate loads into rustls.
        let r = CertResolver::default();
        assert!(r.set(&s.cert.cert_pem, &s.cert.key_pem).expect("loads"));
        assert!(!r.set(&s.cert.cert_pem, &s.cert.key_pem).expect("same"));
    }

    #[test]
    fn serving_cert_is_reissued_with_a_third_left() {
        let now = Timestamp::now();
        let s = plan(None, now, &settings(), false)
            .expect("plan")
            .expect("state");
        let later = now.checked_add(days(59)).expect("time");
        assert_eq!(
            plan(Some(&s), later, &settings(), false).expect("plan"),
            None
        );
        let later = now.checked_add(days(61)).expect("time");
        let n = plan(Some(&s), later, &settings(), false)
            .expect("plan")
            .expect("rotated");
        assert_ne!(n.cert.cert_pem, s.cert.cert_pem);
        assert_eq!(n.ca, s.ca, "the CA stays: the bundle need not change");
        assert_eq!(n.generation, 2);
    }

    #[test]
    fn ca_rotation_is_two_phase() {
        let now = Timestamp::now();
        let s = plan(None, now, &settings(), false)
            .expect("plan")
            .expect("state");
        let late = now.checked_add(days(2 * 365 + 1)).expect("time");
        // Phase 1: next CA published, still serving the old chain.
        let p1 = plan(Some(&s), late, &settings(), false)
            .expect("plan")
            .expect("phase 1");
        let next = p1.next_ca.clone().expect("next CA");
        assert_eq!(p1.ca, s.ca);
        assert!(p1.bundle().contains(&next.cert_pem) && p1.bundle().contains(&s.ca.cert_pem));
        // Until the bundles carry it, nothing more happens (the serving cert was renewed).
        let again = plan(Some(&p1), late, &settings(), false).expect("plan");
        assert_eq!(again, None);
        // Phase 2: promote, re-issue, keep the old CA trusted.
        let p2 = plan(Some(&p1), late, &settings(), true)
            .expect("plan")
            .expect("phase 2");
        assert_eq!(p2.ca, next);
        assert_eq!(p2.next_ca, None);
        assert_eq!(p2.previous_ca.as_ref().map(|p| &p.0), Some(&s.ca.cert_pem));
        assert_ne!(p2.cert.cert_pem, p1.cert.cert_pem);
        assert!(p2.bundle().contains(&s.ca.cert_pem));
        // The previous CA leaves the bundle once expired.
        let expired = s.ca.not_after.checked_add(days(1)).expect("time");
        let p3 = plan(Some(&p2), expired, &settings(), false)
            .expect("plan")
            .expect("drop");
        assert_eq!(p3.previous_ca, None);
    }

    #[test]
    fn forced_expiry_annotations_trigger_rotation() {
        let now = Timestamp::now();
        let s = plan(None, now, &settings(), false)
            .expect("plan")
            .expect("state");
        let mut secret = to_secret(&s, "tls", "ns");
        let notes = secret.metadata.annotations.as_mut().expect("notes");
        notes.insert(
            ANN_CERT_NOT_AFTER.into(),
            now.saturating_sub(days(1)).expect("t").to_string(),
        );
        let read = from_secret(&secret).expect("readable");
        let n = plan(Some(&read), now, &settings(), false)
            .expect("plan")
            .expect("rotated");
        assert!(n.cert.not_after > now);
    }

    #[test]
    fn forced_ca_and_cert_expiry_never_yield_an_expired_cert() {
        let now = Timestamp::now();
        let s = plan(None, now, &settings(), false)
            .expect("plan")
            .expect("state");
        let mut secret = to_secret(&s, "tls", "ns");
        let notes = secret.metadata.annotations.as_mut().expect("notes");
        let past = "2000-01-01T00:00:00Z".to_string();
        notes.insert(ANN_CERT_NOT_AFTER.into(), past.clone());
        notes.insert(ANN_CA_NOT_AFTER.into(), past);
        let read = from_secret(&secret).expect("readable");
        // Phase 1: the next CA is published; the served cert stays the (really valid) old one.
        let p1 = plan(Some(&read), now, &settings(), false)
            .expect("plan")
            .expect("next CA");
        assert!(p1.next_ca.is_some());
        assert_eq!(p1.cert.cert_pem, s.cert.cert_pem);
        // Phase 2: once the bundle carries it, the new CA signs a cert valid from now on.
        let p2 = plan(Some(&p1), now, &settings(), true)
            .expect("plan")
            .expect("promoted");
        assert!(p2.cert.not_after > now, "{:?}", p2.cert.not_after);
        assert_ne!(p2.cert.cert_pem, s.cert.cert_pem);
    }

    #[test]
    fn damaged_secret_reads_as_absent() {
        let s = plan(None, Timestamp::now(), &settings(), false)
            .expect("plan")
            .expect("state");
        let mut secret = to_secret(&s, "tls", "ns");
        secret.data.as_mut().expect("data").remove("tls.key");
        assert_eq!(from_secret(&secret), None);
    }

    #[test]
    fn bundles_only_move_forward() {
        let mut meta = ObjectMeta::default();
        let mut bundles = [None, Some(ByteString(b"old".to_vec()))];
        let new = ByteString(b"new".to_vec());
        assert!(update_bundle(&mut meta, bundles.iter_mut(), &new, 3));
        assert!(bundles.iter().all(|b| b.as_ref() == Some(&new)));
        // Same generation, same content: nothing to do.
        assert!(!update_bundle(&mut meta, bundles.iter_mut(), &new, 3));
        // A replica with an older Secret does not roll back.
        let stale = ByteString(b"stale".to_vec());
        assert!(!update_bundle(&mut meta, bundles.iter_mut(), &stale, 2));
        // Same generation but content reset (e.g. by helm upgrade): restored.
        bundles[0] = Some(stale);
        assert!(update_bundle(&mut meta, bundles.iter_mut(), &new, 3));
    }
}
