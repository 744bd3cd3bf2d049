//! Hop-by-hop header handling (RFC 9110 §7.6.1): headers that describe one connection must not
//! be forwarded to the next, or a client's `Connection: close` would close pooled upstream
//! connections and `Proxy-Authorization` would leak to the application.

use std::sync::OnceLock;

use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Numbers below this have a shared header value ([`number`]): every shard index of the CRD's
/// maximum, and the epochs of most shard maps.
const SHARED_NUMBERS: usize = 1024;

/// `n` as a header value; shared (no allocation) for small `n`, which every sharded request
/// sends twice (its shard and the map's epoch).
pub fn number(n: i64) -> HeaderValue {
    static VALUES: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    match usize::try_from(n) {
        Ok(i) if i < SHARED_NUMBERS => {
            VALUES.get_or_init(|| (0..SHARED_NUMBERS).map(HeaderValue::from).collect())[i].clone()
        }
        _ => HeaderValue::from(n),
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names instead of a lookup per
    // hop-by-hop name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back() {
        for n in [0, 1, 7, 1023, 1024, 99_999, -3, i64::MAX] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
        }
    }

    #[test]
    fn strips_listed_and_standard_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));

        let mut only_te = HeaderMap::new();
        only_te.insert(header::TE, "trailers".parse().unwrap());
        only_te.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut only_te);
        assert_eq!(only_te.len(), 1);

        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, "a:80".parse().unwrap());
        clean.insert("x-secret", "1".parse().unwrap());
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 2);
    }
}
