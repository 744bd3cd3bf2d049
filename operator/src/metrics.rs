//! Prometheus metrics and health endpoints of the controller: a few atomics and a fixed-bucket
//! histogram rendered in the text exposition format, served on a small HTTP listener.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Upper bounds (seconds) of the reconcile-duration histogram buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Controller metrics. Cheap to update from every reconcile.
#[derive(Default)]
pub struct Metrics {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    leader: AtomicBool,
}

impl Metrics {
    /// Records one reconcile: its duration and, when it failed, the error's metric label.
    pub fn reconciled(&self, took: Duration, error: Option<&'static str>) {
        match error {
            None => self.ok.fetch_add(1, Ordering::Relaxed),
            Some(label) => {
                let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
                *errors.entry(label).or_default() += 1;
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        let secs = took.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Whether this replica currently leads (and so reconciles).
    pub fn set_leader(&self, leading: bool) {
        self.leader.store(leading, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP shardmesh_operator_reconciles_total Reconciles by result."
        );
        let _ = writeln!(s, "# TYPE shardmesh_operator_reconciles_total counter");
        let _ = writeln!(
            s,
            "shardmesh_operator_reconciles_total{{result=\"ok\"}} {ok}"
        );
        let _ = writeln!(
            s,
            "shardmesh_operator_reconciles_total{{result=\"error\"}} {failed}"
        );
        let _ = writeln!(
            s,
            "# HELP shardmesh_operator_reconcile_errors_total Failed reconciles by reason."
        );
        let _ = writeln!(
            s,
            "# TYPE shardmesh_operator_reconcile_errors_total counter"
        );
        for (reason, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                s,
                "shardmesh_operator_reconcile_errors_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP shardmesh_operator_reconcile_duration_seconds Reconcile duration."
        );
        let _ = writeln!(
            s,
            "# TYPE shardmesh_operator_reconcile_duration_seconds histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                s,
                "shardmesh_operator_reconcile_duration_seconds_bucket{{le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "shardmesh_operator_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            ok + failed
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "shardmesh_operator_reconcile_duration_seconds_sum {sum}");
        let _ = writeln!(
            s,
            "shardmesh_operator_reconcile_duration_seconds_count {}",
            ok + failed
        );
        let _ = writeln!(
            s,
            "# HELP shardmesh_operator_leader 1 when this replica leads and reconciles."
        );
        let _ = writeln!(s, "# TYPE shardmesh_operator_leader gauge");
        let _ = writeln!(
            s,
            "shardmesh_operator_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        s
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics and health endpoints listening");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&req, &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body, ctype) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4",
        ),
        // A standby replica is healthy and ready: it is waiting to take over.
        "/healthz" | "/readyz" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: use /metrics, /healthz or /readyz\n".to_string(),
            "text/plain",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_buckets_and_reasons() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(3), None);
        m.reconciled(Duration::from_millis(300), Some("api_error"));
        m.set_leader(true);
        let t = m.render();
        assert!(
            t.contains("shardmesh_operator_reconciles_total{result=\"ok\"} 1"),
            "{t}"
        );
        assert!(t.contains("shardmesh_operator_reconciles_total{result=\"error\"} 1"));
        assert!(t.contains("shardmesh_operator_reconcile_errors_total{reason=\"api_error\"} 1"));
        assert!(t.contains("shardmesh_operator_reconcile_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(t.contains("shardmesh_operator_reconcile_duration_seconds_bucket{le=\"0.5\"} 2"));
        assert!(t.contains("shardmesh_operator_reconcile_duration_seconds_count 2"));
        assert!(t.contains("shardmesh_operator_leader 1"));
    }
}
