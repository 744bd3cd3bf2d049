//! One JSON access-log line per request (`"target":"access_log"`), written when the response
//! body ends (or is dropped), so durations and byte counts cover the whole exchange. Lines are
//! formatted here into a reused buffer and queued with [`crate::log::write_line`], which is
//! bounded: a slow stdout drops lines (counted in metrics) instead of stalling requests.
//!
//! Sampling applies to successes only: failures, retried requests and sidecar-generated errors
//! are always logged, because those are the lines someone will look for.

/// A field's name as [`JsonLine`] writes it, separator and quotes included: one copy per
/// field instead of three.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

use std::{
    cell::{Cell, RefCell},
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use rand::Rng;
use tower::{Layer, Service};

use crate::{
    body::{BoxError, ProxyBody},
    ctx::RequestCtx,
    errors::BoxFuture,
    metrics::{Direction, Metrics, Outcome},
    trace::Trace,
};

/// Longest authority (Host) logged; longer ones are cut and marked. A client chooses it, and
/// hyper accepts headers of tens of KiB.
pub const MAX_LOGGED_AUTHORITY: usize = 256;

/// Longest path logged; longer ones are cut and marked.
pub const MAX_LOGGED_PATH: usize = 1024;

/// `s`, cut to at most `max` bytes on a character boundary, and whether it was cut.
fn clip(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

/// Access-log switches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLogConfig {
    /// Whether lines are emitted at all (metrics are recorded either way).
    pub enabled: bool,
    /// Share of successful requests logged, 0.0-1.0.
    pub sample: f64,
    /// Start a W3C trace for requests that come without one ([`crate::trace`]). Applied here
    /// because this layer is where every request enters, and its line carries the ids.
    pub trace_start: bool,
}

/// Creates the request context and logs the request when its response is done.
#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    direction: Direction,
    cfg: AccessLogConfig,
    metrics: Arc<Metrics>,
}

impl AccessLogLayer {
    /// Logs requests of `direction`.
    pub fn new(direction: Direction, cfg: AccessLogConfig, metrics: Arc<Metrics>) -> Self {
        AccessLogLayer {
            direction,
            cfg,
            metrics,
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
    layer: AccessLogLayer,
}

/// What is known when the response headers leave.
struct Pending {
    layer: AccessLogLayer,
    ctx: RequestCtx,
    method: Method,
    /// The request's URI and Host, shared with the request (not copied): clipped when written.
    uri: Uri,
    host: Option<HeaderValue>,
    status: StatusCode,
    start: Instant,
    headers_after: Duration,
    trace: Option<Trace>,
}

impl<S> Service<Request<ProxyBody>> for AccessLog<S>
where
    S: Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>,
    >,
{
    type Response = Response<LoggedBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<LoggedBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ProxyBody>) -> Self::Future {
        let start = Instant::now();
        let trace = crate::trace::on_request(req.headers_mut(), self.layer.cfg.trace_start);
        let ctx = RequestCtx::default();
        req.extensions_mut().insert(ctx.clone());
        let method = req.method().clone();
        let uri = req.uri().clone();
        let host = match uri.authority() {
            Some(_) => None,
            None => req.headers().get(http::header::HOST).cloned(),
        };
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Ok(resp) = fut.await;
            let pending = Pending {
                layer,
                ctx,
                method,
                uri,
                host,
                status: resp.status(),
                start,
                headers_after: start.elapsed(),
                trace,
            };
            Ok(resp.map(|inner| LoggedBody {
                inner,
                bytes: 0,
                pending: Some(Box::new(pending)),
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its bytes and emits the access-log line when it ends or is
    /// dropped (client went away), exactly once.
    pub struct LoggedBody {
        #[pin]
        inner: ProxyBody,
        bytes: u64,
        pending: Option<Box<Pending>>,
    }

    impl PinnedDrop for LoggedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(p) = this.pending.take() {
                // Dropped unpolled at its end (hyper does not poll a body that says it has
                // ended, e.g. an empty one): complete; otherwise the client went away.
                let complete = this.inner.is_end_stream();
                (*p).finish(*this.bytes, complete);
            }
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let res = this.inner.as_mut().poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                }
                // hyper stops polling once the body says it has ended, so the last frame is
                // where a complete response is seen.
                if this.inner.is_end_stream() {
                    if let Some(p) = this.pending.take() {
                        (*p).finish(*this.bytes, true);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    (*p).finish(*this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    (*p).finish(*this.bytes, false);
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Pending {
    fn finish(self, response_bytes: u64, complete: bool) {
        let duration = self.start.elapsed();
        let layer = &self.layer;
        layer
            .metrics
            .request(layer.direction, self.status, duration);
        let r = self.ctx.lock();
        if let (Direction::Outbound, Some(destination)) = (layer.direction, &r.destination) {
            layer.metrics.destination_request(Outcome {
                destination,
                shard: r.shard,
                status: self.status,
                duration,
                retries: r.retry_reasons.len() as u32,
                budget_exhausted: r.retry_stop == Some(crate::retry::BUDGET_EXHAUSTED),
            });
        }
        if !layer.cfg.enabled {
            return;
        }
        let interesting =
            self.status.as_u16() >= 400 || r.attempts > 1 || r.error.is_some() || !complete;
        if !interesting && layer.cfg.sample < 1.0 && rand::rng().random::<f64>() >= layer.cfg.sample
        {
            return;
        }
        LINE.with_borrow_mut(|buf| {
            buf.clear();
            let mut l = JsonLine::start(buf, SystemTime::now());
            l.str(key!("direction"), layer.direction.as_str());
            l.str(key!("method"), self.method.as_str());
            let authority = match (self.uri.authority(), &self.host) {
                (Some(a), _) => a.as_str(),
                (None, Some(h)) => h.to_str().unwrap_or_default(),
                (None, None) => "",
            };
            l.clipped(key!("authority"), authority, MAX_LOGGED_AUTHORITY);
            l.clipped(key!("path"), self.uri.path(), MAX_LOGGED_PATH);
            l.uint(key!("status"), self.status.as_u16().into());
            l.opt_str(key!("destination"), r.destination.as_deref());
            l.opt_uint(key!("shard"), r.shard.map(u64::from));
            if let Some(epoch) = r.epoch {
                l.int(key!("epoch"), epoch);
            }
            if let Some(endpoint) = r.tried.last() {
                l.addr(key!("endpoint"), *endpoint);
            }
            l.uint(key!("attempts"), r.attempts.into());
            l.list(key!("retry_reasons"), &r.retry_reasons);
            l.opt_str(key!("retry_stop"), r.retry_stop);
            l.opt_uint(key!("redirected_to"), r.redirected_to.map(u64::from));
            l.opt_str(key!("handoff"), r.handoff);
            l.opt_str(key!("breaker"), r.breaker.map(|b| b.as_str()));
            l.opt_str(key!("error"), r.error);
            l.opt_uint(key!("request_bytes"), r.request_bytes);
            l.uint(key!("response_bytes"), response_bytes);
            l.bool(key!("response_complete"), complete);
            l.millis(key!("headers_ms"), self.headers_after);
            l.millis(key!("duration_ms"), duration);
            if let Some(t) = &self.trace {
                l.hex(key!("trace_id"), &t.trace_id);
                l.hex(key!("span_id"), &t.span_id);
                if let Some(parent) = &t.parent_id {
                    l.hex(key!("parent_span_id"), parent);
                }
            }
            l.end();
            crate::log::write_line(buf);
        });
    }
}

thread_local! {
    /// The line being formatted, reused: formatting allocates nothing once it has grown.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// `YYYY-MM-DDTHH:MM:SS` of the last second formatted on this thread.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Writes one JSON object the way the process's other log lines look (`timestamp`, `level`,
/// `target`, then the fields flat; absent values are left out), straight into a byte buffer:
/// the access log runs once per request, and a generic event formatter cost more instructions
/// than proxying the request (BENCHMARKS.md).
struct JsonLine<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> JsonLine<'a> {
    fn start(out: &'a mut Vec<u8>, now: SystemTime) -> Self {
        out.extend_from_slice(b"{\"timestamp\":\"");
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let date = SECOND.with(|c| {
            let (cached, text) = c.get();
            if cached == secs {
                return text;
            }
            let text = rfc3339_seconds(secs);
            c.set((secs, text));
            text
        });
        out.extend_from_slice(&date);
        out.push(b'.');
        let micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut m = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (m % 10) as u8;
            m /= 10;
        }
        out.extend_from_slice(&digits);
        out.extend_from_slice(b"Z\",\"level\":\"INFO\",\"target\":\"access_log\"");
        JsonLine { out }
    }

    /// Starts a field; `key` is what [`key!`] makes of its name (`,"name":`), one copy.
    fn key(&mut self, key: &'static str) {
        self.out.extend_from_slice(key.as_bytes());
    }

    fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        json_string(self.out, value);
    }

    /// At most `max` bytes of `value`, marked `…` when cut.
    fn clipped(&mut self, key: &'static str, value: &str, max: usize) {
        let (kept, cut) = clip(value, max);
        self.key(key);
        self.out.push(b'"');
        json_escaped(self.out, kept);
        if cut {
            self.out.extend_from_slice("…".as_bytes());
        }
        self.out.push(b'"');
    }

    fn opt_str(&mut self, key: &'static str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    fn uint(&mut self, key: &'static str, value: u64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn opt_uint(&mut self, key: &'static str, value: Option<u64>) {
        if let Some(v) = value {
            self.uint(key, v);
        }
    }

    fn int(&mut self, key: &'static str, value: i64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// Milliseconds with microsecond precision, e.g. `1.234`.
    fn millis(&mut self, key: &'static str, d: Duration) {
        self.key(key);
        let micros = d.as_micros();
        let mut buf = itoa::Buffer::new();
        self.out
            .extend_from_slice(buf.format(micros / 1000).as_bytes());
        let frac = (micros % 1000) as u16;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    fn addr(&mut self, key: &'static str, addr: SocketAddr) {
        self.key(key);
        self.out.push(b'"');
        match addr {
            SocketAddr::V4(v4) => {
                let mut buf = itoa::Buffer::new();
                for (i, octet) in v4.ip().octets().iter().enumerate() {
                    if i > 0 {
                        self.out.push(b'.');
                    }
                    self.out.extend_from_slice(buf.format(*octet).as_bytes());
                }
                self.out.push(b':');
                self.out.extend_from_slice(buf.format(v4.port()).as_bytes());
            }
            SocketAddr::V6(v6) => {
                let _ = write!(self.out, "{v6}");
            }
        }
        self.out.push(b'"');
    }

    /// Bytes as a lowercase hex string (trace and span ids).
    fn hex(&mut self, key: &'static str, bytes: &[u8]) {
        self.key(key);
        self.out.push(b'"');
        crate::trace::push_hex(self.out, bytes);
        self.out.push(b'"');
    }

    /// A comma-separated string, left out when empty.
    fn list(&mut self, key: &'static str, items: &[&str]) {
        if items.is_empty() {
            return;
        }
        self.key(key);
        self.out.push(b'"');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            json_escaped(self.out, item);
        }
        self.out.push(b'"');
    }

    fn end(self) {
        self.out.extend_from_slice(b"}\n");
    }
}

/// `value` as a JSON string.
fn json_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    json_escaped(out, value);
    out.push(b'"');
}

/// Bytes that cannot appear as themselves inside a JSON string: quote, backslash and control
/// characters.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// `value`'s characters as they appear inside a JSON string: quote, backslash and control
/// characters escaped, everything else (valid UTF-8 already) as is.
fn json_escaped(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.as_bytes();
    let mut clean = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[usize::from(b)] {
            continue;
        }
        out.extend_from_slice(&bytes[clean..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        clean = i + 1;
    }
    out.extend_from_slice(&bytes[clean..]);
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of `secs` since the Unix epoch.
fn rfc3339_seconds(secs: u64) -> [u8; 19] {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 19];
    let mut put = |at: usize, value: i64, width: usize| {
        let mut v = value.rem_euclid(10_i64.pow(width as u32));
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, (rem / 3_600) as i64, 2);
    put(14, (rem / 60 % 60) as i64, 2);
    put(17, (rem % 60) as i64, 2);
    out[4] = b'-';
    out[7] = b'-';
    out[10] = b'T';
    out[13] = b':';
    out[16] = b':';
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("/short", 10), ("/short", false));
        let long = "é".repeat(600); // 1,200 bytes
        let mut buf = Vec::new();
        let mut l = JsonLine::start(&mut buf, SystemTime::now());
        l.clipped(key!("path"), &long, MAX_LOGGED_PATH);
        l.clipped(key!("authority"), "a:80", MAX_LOGGED_AUTHORITY);
        l.end();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        let c = v["path"].as_str().unwrap();
        assert!(c.len() <= MAX_LOGGED_PATH + '…'.len_utf8(), "{}", c.len());
        assert!(c.ends_with('…'));
        assert!(c.trim_end_matches('…').chars().all(|ch| ch == 'é'));
        assert_eq!(v["authority"], "a:80");
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let at = |secs| String::from_utf8(rfc3339_seconds(secs).to_vec()).unwrap();
        assert_eq!(at(0), "1970-01-01T00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(at(1_795_867_199), "2026-11-28T11:59:59");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00");
        let mut buf = Vec::new();
        let t = UNIX_EPOCH + Duration::new(1_795_867_199, 7_000);
        JsonLine::start(&mut buf, t).end();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["timestamp"], "2026-11-28T11:59:59.000007Z");
        assert_eq!(v["target"], "access_log");
    }

    proptest::proptest! {
        /// Whatever a client puts in a path or Host, the line stays one valid JSON object that
        /// reads back the same.
        #[test]
        fn any_string_round_trips(value in ".*", reasons in proptest::collection::vec("[a-z0-9-]{1,8}", 0..4)) {
            let mut buf = Vec::new();
            let mut l = JsonLine::start(&mut buf, SystemTime::now());
            l.str(key!("path"), &value);
            let refs: Vec<&str> = reasons.iter().map(String::as_str).collect();
            l.list(key!("retry_reasons"), &refs);
            l.millis(key!("duration_ms"), Duration::from_micros(1_234_567));
            l.addr(key!("endpoint"), "10.1.2.3:8080".parse().unwrap());
            l.int(key!("epoch"), -5);
            l.end();
            proptest::prop_assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            proptest::prop_assert_eq!(v["path"].as_str(), Some(value.as_str()));
            if reasons.is_empty() {
                proptest::prop_assert!(v.get("retry_reasons").is_none());
            } else {
                let joined = reasons.join(",");
                proptest::prop_assert_eq!(v["retry_reasons"].as_str(), Some(joined.as_str()));
            }
            proptest::prop_assert_eq!(v["duration_ms"].as_f64(), Some(1234.567));
            proptest::prop_assert_eq!(v["endpoint"].as_str(), Some("10.1.2.3:8080"));
            proptest::prop_assert_eq!(v["epoch"].as_i64(), Some(-5));
        }
    }
}
