//! One JSON access-log line per request, emitted as a `tracing` event with target `access_log`
//! when the response body ends (or is dropped), so durations and byte counts cover the whole
//! exchange. The subscriber writes through a bounded queue ([`crate::log`]): a slow stdout drops
//! lines (counted in metrics) instead of stalling requests.
//!
//! Sampling applies to successes only: failures, retried requests and sidecar-generated errors
//! are always logged, because those are the lines someone will look for.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use rand::Rng;
use tower::{Layer, Service};

use crate::{
    body::{BoxError, ProxyBody},
    ctx::RequestCtx,
    errors::BoxFuture,
    metrics::{Direction, Metrics},
};

/// Longest authority (Host) logged; longer ones are cut and marked. A client chooses it, and
/// hyper accepts headers of tens of KiB.
pub const MAX_LOGGED_AUTHORITY: usize = 256;

/// Longest path logged; longer ones are cut and marked.
pub const MAX_LOGGED_PATH: usize = 1024;

/// `s`, cut to at most `max` bytes on a character boundary and marked `…` when cut.
fn clipped(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 3);
    out.push_str(&s[..end]);
    out.push('…');
    out
}

/// Access-log switches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLogConfig {
    /// Whether lines are emitted at all (metrics are recorded either way).
    pub enabled: bool,
    /// Share of successful requests logged, 0.0-1.0.
    pub sample: f64,
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
    authority: String,
    path: String,
    status: StatusCode,
    start: Instant,
    headers_after: Duration,
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
        let ctx = RequestCtx::default();
        req.extensions_mut().insert(ctx.clone());
        let method = req.method().clone();
        let authority = req
            .uri()
            .authority()
            .map(|a| clipped(a.as_str(), MAX_LOGGED_AUTHORITY))
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| clipped(h, MAX_LOGGED_AUTHORITY))
            })
            .unwrap_or_default();
        let path = clipped(req.uri().path(), MAX_LOGGED_PATH);
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Ok(resp) = fut.await;
            let pending = Pending {
                layer,
                ctx,
                method,
                authority,
                path,
                status: resp.status(),
                start,
                headers_after: start.elapsed(),
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
        if !layer.cfg.enabled {
            return;
        }
        let r = self.ctx.snapshot();
        let interesting =
            self.status.as_u16() >= 400 || r.attempts > 1 || r.error.is_some() || !complete;
        if !interesting && layer.cfg.sample < 1.0 && rand::rng().random::<f64>() >= layer.cfg.sample
        {
            return;
        }
        let retry_reasons = r.retry_reasons.join(",");
        tracing::info!(
            target: "access_log",
            direction = layer.direction.as_str(),
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            status = self.status.as_u16(),
            destination = r.destination.as_deref(),
            shard = r.shard,
            epoch = r.epoch,
            endpoint = r.tried.last().map(tracing::field::display),
            attempts = r.attempts,
            retry_reasons = (!retry_reasons.is_empty()).then_some(retry_reasons.as_str()),
            retry_stop = r.retry_stop,
            redirected_to = r.redirected_to,
            handoff = r.handoff,
            breaker = r.breaker.map(|b| b.as_str()),
            error = r.error,
            request_bytes = r.request_bytes,
            response_bytes,
            response_complete = complete,
            headers_ms = self.headers_after.as_secs_f64() * 1000.0,
            duration_ms = duration.as_secs_f64() * 1000.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_clipped_on_a_character_boundary() {
        assert_eq!(clipped("/short", 10), "/short");
        let long = "é".repeat(600); // 1,200 bytes
        let c = clipped(&long, MAX_LOGGED_PATH);
        assert!(c.len() <= MAX_LOGGED_PATH + '…'.len_utf8(), "{}", c.len());
        assert!(c.ends_with('…'));
        assert!(c.trim_end_matches('…').chars().all(|ch| ch == 'é'));
    }
}
