//! The validity of the webhook's certificates: the CA bundle the API server trusts and the
//! serving certificate the webhook presents, read from PEM with `x509-parser`.

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use x509_parser::pem::Pem;

/// What a check needs to know about one certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// Subject, e.g. `CN=shardmesh-webhook-ca-…, O=shardmesh`.
    pub subject: String,
    /// Issuer.
    pub issuer: String,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// DER of the subject name, to match a certificate to its issuer exactly.
    #[serde(skip)]
    pub subject_der: Vec<u8>,
    /// DER of the issuer name.
    #[serde(skip)]
    pub issuer_der: Vec<u8>,
    /// `not_before` as a timestamp.
    #[serde(skip)]
    pub from: Timestamp,
    /// `not_after` as a timestamp.
    #[serde(skip)]
    pub until: Timestamp,
}

/// Every certificate of a PEM bundle, in order; an error names the first unreadable one.
pub fn parse_bundle(pem: &[u8]) -> Result<Vec<CertInfo>, String> {
    let mut out = Vec::new();
    for (i, block) in Pem::iter_from_buffer(pem).enumerate() {
        let block = block.map_err(|e| format!("PEM block {i}: {e}"))?;
        let cert = block
            .parse_x509()
            .map_err(|e| format!("certificate {i}: {e}"))?;
        let ts = |t: &x509_parser::time::ASN1Time| {
            Timestamp::from_second(t.timestamp()).map_err(|e| format!("certificate {i}: {e}"))
        };
        let from = ts(&cert.validity().not_before)?;
        let until = ts(&cert.validity().not_after)?;
        out.push(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: from.to_string(),
            not_after: until.to_string(),
            subject_der: cert.subject().as_raw().to_vec(),
            issuer_der: cert.issuer().as_raw().to_vec(),
            from,
            until,
        });
    }
    if out.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(out)
}

/// How a certificate's validity stands at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// Valid with more than a third of its lifetime left.
    Good,
    /// Valid, but less than a third of its lifetime is left: the webhook rotates at that
    /// point, so it is overdue.
    RotationDue,
    /// Expired or not yet valid.
    Invalid,
}

/// The validity of `c` at `now`.
pub fn validity(c: &CertInfo, now: Timestamp) -> Validity {
    if now < c.from || now >= c.until {
        return Validity::Invalid;
    }
    let total = c.until.duration_since(c.from);
    if c.until.duration_since(now) < total / 3 {
        Validity::RotationDue
    } else {
        Validity::Good
    }
}

/// "in 89d 23h" / "2h 5m ago", for details.
pub fn relative(until: Timestamp, now: Timestamp) -> String {
    let secs = until.duration_since(now).as_secs();
    let a = secs.unsigned_abs();
    let text = match a {
        0..=3599 => format!("{}m", a / 60),
        3600..=86_399 => format!("{}h {}m", a / 3600, a % 3600 / 60),
        _ => format!("{}d {}h", a / 86_400, a % 86_400 / 3600),
    };
    if secs >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmesh_operator::webhook::tls::{issue_ca, issue_cert};
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn reads_the_webhooks_own_certificates_and_matches_issuer_to_ca() {
        let now = Timestamp::from_second(1_800_000_000).expect("in range");
        let ca = issue_ca(now, DAY * 365).expect("ca");
        let cert =
            issue_cert(&ca, &["shardmesh-webhook.x.svc".into()], now, DAY * 90).expect("cert");
        let bundle = parse_bundle(ca.cert_pem.as_bytes()).expect("bundle");
        let serving = parse_bundle(cert.cert_pem.as_bytes()).expect("serving");
        assert_eq!(bundle.len(), 1);
        assert_eq!(bundle[0].until, ca.not_after);
        assert_eq!(serving[0].until, cert.not_after);
        assert_eq!(serving[0].issuer_der, bundle[0].subject_der);
        assert!(bundle[0].subject.contains(&ca.name));
        assert_eq!(validity(&serving[0], now), Validity::Good);
        // Less than a third left: the webhook should have rotated it.
        let late = now.checked_add(DAY * 70).expect("in range");
        assert_eq!(validity(&serving[0], late), Validity::RotationDue);
        let expired = now.checked_add(DAY * 91).expect("in range");
        assert_eq!(validity(&serving[0], expired), Validity::Invalid);
        // Two certificates in one bundle, garbage refused.
        let two = format!("{}{}", ca.cert_pem, cert.cert_pem);
        assert_eq!(parse_bundle(two.as_bytes()).expect("two").len(), 2);
        assert!(parse_bundle(b"not a pem").is_err());
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = Timestamp::from_second(1_000_000).expect("in range");
        let at = |s: i64| Timestamp::from_second(1_000_000 + s).expect("in range");
        assert_eq!(relative(at(90 * 86_400 + 7200), now), "in 90d 2h");
        assert_eq!(relative(at(-3 * 3600 - 60), now), "3h 1m ago");
        assert_eq!(relative(at(120), now), "in 2m");
    }
}
