//! W3C Trace Context (`traceparent`, `tracestate`) through the sidecar, so one request can be
//! followed from the client's sidecar to the server's in the access logs.
//!
//! Every hop through a sidecar is a span of its own: a request arriving with a valid
//! `traceparent` keeps its trace id and leaves with this sidecar's new span id as the parent;
//! `tracestate` travels untouched (it belongs to the tracing vendors, not to us). A request
//! without one (or with one that does not parse) starts a new trace when `--trace-start` is on
//! (the default), marked not sampled: the sidecar records no spans, so it must not make an
//! application's parent-based sampler record every request. An unparsable `traceparent` is
//! replaced, and its `tracestate` dropped, as the W3C recommendation says; with `--trace-start`
//! off both are left as they came. The ids go to the access-log line (`trace_id`, `span_id`,
//! `parent_span_id`).

use std::cell::RefCell;

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
const LEN: usize = 55;

/// The trace context of one request at this sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The trace's id (carried over, or new).
    pub trace_id: [u8; 16],
    /// This sidecar's span: the parent the next hop sees.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a valid `traceparent`.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled), carried over; 0 for a trace started here.
    pub flags: u8,
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex of `s` into `out` (the spec allows lowercase only).
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

/// Parses a `traceparent` value: (trace id, parent id, flags). Versions above 00 are read as
/// 00 (their first fields mean the same), `ff` and all-zero ids are invalid.
pub fn parse(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() < LEN {
        return None;
    }
    let version = unhex::<1>(&value[0..2])?[0];
    // Version 00 is exactly 55 bytes; a later version may append fields after a dash.
    if version == 0xff || (version == 0 && value.len() != LEN) {
        return None;
    }
    if value.len() > LEN && value[LEN] != b'-' {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = unhex::<16>(&value[3..35])?;
    let parent_id = unhex::<8>(&value[36..52])?;
    let flags = unhex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

thread_local! {
    /// Ids need to be unique, not secret: a small generator per thread, seeded from the OS.
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A random non-zero id.
fn new_id<const N: usize>() -> [u8; N] {
    RNG.with_borrow_mut(|rng| loop {
        let mut id = [0u8; N];
        rng.fill(&mut id[..]);
        if id != [0; N] {
            return id;
        }
    })
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes the lowercase hex of `bytes` into `out` (twice as long), on the stack: a trace id is
/// formatted twice per request, in the header sent on and in the access-log line.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Appends the lowercase hex of an id (at most 16 bytes).
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut buf = [0u8; 32];
    let n = bytes.len().min(16);
    hex_into(&bytes[..n], &mut buf[..2 * n]);
    out.extend_from_slice(&buf[..2 * n]);
}

impl Trace {
    /// The `traceparent` the next hop receives: this trace, this sidecar's span as parent.
    pub fn header(&self) -> HeaderValue {
        let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&self.trace_id, &mut v[3..35]);
        hex_into(&self.span_id, &mut v[36..52]);
        hex_into(&[self.flags], &mut v[53..55]);
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_bytes(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Takes the request's trace context and rewrites its `traceparent` for the next hop (see the
/// module doc). `None` when the request has no valid context and `start` is off.
pub fn on_request(headers: &mut HeaderMap, start: bool) -> Option<Trace> {
    let parsed = headers.get(&TRACEPARENT).map(|v| parse(v.as_bytes()));
    let trace = match parsed {
        Some(Some((trace_id, parent_id, flags))) => Trace {
            trace_id,
            span_id: new_id(),
            parent_id: Some(parent_id),
            // The trace id is the caller's, so its flags (sampled, random) still hold.
            flags,
        },
        _ if !start => return None,
        invalid_or_absent => {
            if invalid_or_absent.is_some() {
                headers.remove(&TRACESTATE);
            }
            Trace {
                trace_id: new_id(),
                span_id: new_id(),
                parent_id: None,
                flags: 0,
            }
        }
    };
    headers.insert(TRACEPARENT, trace.header());
    Some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn hex(b: &[u8]) -> String {
        let mut v = Vec::new();
        push_hex(&mut v, b);
        String::from_utf8(v).expect("hex is ascii")
    }

    #[test]
    fn parses_the_spec_example() {
        let (t, p, f) = parse(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(hex(&t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p), "00f067aa0ba902b7");
        assert_eq!(f, 1);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            // Uppercase hex, all-zero ids, version ff, a 00 with a suffix, bad separators.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version with more fields is read for the fields it shares with 00.
        assert!(
            parse(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-not").is_some()
        );
    }

    #[test]
    fn continues_a_trace_as_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let t = on_request(&mut h, false).expect("continued even without start");
        assert_eq!(hex(&t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_ne!(t.span_id, [0; 8]);
        assert_eq!(t.flags, 1);
        let out = h[&TRACEPARENT].to_str().expect("ascii");
        assert_eq!(
            out,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hex(&t.span_id))
        );
        assert_eq!(parse(out.as_bytes()).map(|(_, p, _)| p), Some(t.span_id));
        assert_eq!(h[&TRACESTATE], "vendor=x", "tracestate travels untouched");
        // Two hops of the same trace get different spans.
        let second = on_request(&mut h, true).expect("continued");
        assert_eq!(second.trace_id, t.trace_id);
        assert_eq!(second.parent_id, Some(t.span_id));
        assert_ne!(second.span_id, t.span_id);
    }

    #[test]
    fn starts_a_trace_when_asked_and_only_then() {
        let mut h = HeaderMap::new();
        assert_eq!(on_request(&mut h, false), None);
        assert!(h.get(&TRACEPARENT).is_none());
        let t = on_request(&mut h, true).expect("started");
        assert_eq!(t.parent_id, None);
        assert_eq!(t.flags, 0, "a started trace is not marked sampled");
        let (tid, sid, flags) = parse(h[&TRACEPARENT].as_bytes()).expect("valid header");
        assert_eq!((tid, sid, flags), (t.trace_id, t.span_id, 0));
        let other = on_request(&mut HeaderMap::new(), true).expect("started");
        assert_ne!(other.trace_id, t.trace_id);
    }

    #[test]
    fn an_invalid_context_is_replaced_with_its_state_or_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let mut kept = h.clone();
        assert_eq!(on_request(&mut kept, false), None);
        assert_eq!(kept, h);
        let t = on_request(&mut h, true).expect("restarted");
        assert!(h.get(&TRACESTATE).is_none());
        assert_eq!(
            parse(h[&TRACEPARENT].as_bytes()).map(|x| x.0),
            Some(t.trace_id)
        );
    }
}
