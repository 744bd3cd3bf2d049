//! Prometheus metrics and health endpoints of the controller: a few atomics and a fixed-bucket
//! histogram rendered in the text exposition format, served on a small HTTP listener. The
//! controller's Kubernetes client counts its own API requests by verb ([`count_api_requests`]).

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
use tower::util::MapRequestLayer;
use tracing::{info, warn};

/// Upper bounds (seconds) of the reconcile-duration histogram buckets.
const RECONCILE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Upper bounds (seconds) of the admission-latency histogram buckets (the handler takes µs).
const ADMISSION_BUCKETS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25,
];

/// A cumulative histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (le, n) in self.bounds.iter().zip(&self.counts) {
            if secs <= *le {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        header(s, name, "histogram", help);
        for (le, n) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                s,
                "{name}_bucket{{le=\"{le}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "{name}_sum {sum}");
        let _ = writeln!(s, "{name}_count {count}");
    }
}

fn header(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}");
    let _ = writeln!(s, "# TYPE {name} {kind}");
}

/// Verbs of Kubernetes API requests, as the API server names them (`apply` is a server-side
/// apply PATCH); `other` covers non-resource paths that are not GETs.
const API_VERBS: [&str; 10] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "apply",
    "delete",
    "deletecollection",
    "other",
];

/// Client-side count of Kubernetes API requests by verb, updated by the layer that
/// [`count_api_requests`] puts on the controller's client.
#[derive(Default)]
pub struct ApiRequests {
    counts: [AtomicU64; API_VERBS.len()],
}

impl ApiRequests {
    /// Counts one request.
    pub fn record<B>(&self, req: &http::Request<B>) {
        let verb = api_verb(req);
        if let Some(i) = API_VERBS.iter().position(|v| *v == verb) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests counted so far with `verb` (one of the API server's verbs).
    pub fn count(&self, verb: &str) -> u64 {
        API_VERBS
            .iter()
            .position(|v| *v == verb)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    fn render(&self, s: &mut String) {
        let name = "shardmesh_operator_api_requests_total";
        header(
            s,
            name,
            "counter",
            "Kubernetes API requests sent by the controller, by verb.",
        );
        for (verb, n) in API_VERBS.iter().zip(&self.counts) {
            let _ = writeln!(s, "{name}{{verb=\"{verb}\"}} {}", n.load(Ordering::Relaxed));
        }
    }
}

/// The API server's verb for a request: `watch` for `?watch=true|1`, `get`/`list` and
/// `delete`/`deletecollection` by whether the path names one object, `apply` for a server-side
/// apply PATCH.
pub fn api_verb<B>(req: &http::Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let named = path_names_object(req.uri().path());
    match *req.method() {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => {
            let apply = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/apply-patch"));
            if apply {
                "apply"
            } else {
                "patch"
            }
        }
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "other",
    }
}

/// Whether a resource path (`/api/v1/...`, `/apis/<group>/<version>/...`) names one object
/// (possibly a subresource of it) rather than a collection. Non-resource paths count as named.
fn path_names_object(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => return true,
    }
    .unwrap_or_default();
    // namespaces/<ns>/<resource>... is a namespaced resource; namespaces/<ns> is a Namespace.
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        _ => rest,
    };
    rest.len() >= 2
}

/// A tower layer for the controller's `kube::Client` (`ClientBuilder::with_layer`) that counts
/// every request it sends in `counter`, by verb.
pub fn count_api_requests(
    counter: Arc<ApiRequests>,
) -> MapRequestLayer<
    impl FnMut(http::Request<kube::client::Body>) -> http::Request<kube::client::Body> + Clone,
> {
    MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        counter.record(&req);
        req
    })
}

/// Metrics of the operator binary: the controller records reconciles, the webhook admissions.
/// Cheap to update from every reconcile and admission.
pub struct Metrics {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    reconcile_duration: Histogram,
    leader: AtomicBool,
    admissions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    admission_duration: Histogram,
    api_requests: Arc<ApiRequests>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: Mutex::default(),
            reconcile_duration: Histogram::new(&RECONCILE_BUCKETS),
            leader: AtomicBool::new(false),
            admissions: Mutex::default(),
            admission_duration: Histogram::new(&ADMISSION_BUCKETS),
            api_requests: Arc::default(),
        }
    }
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
        self.reconcile_duration.observe(took);
    }

    /// Records one admission request: which webhook (`mutate`, `validate`, `other`), its
    /// outcome (`answered`, `bad_request`, `not_found`) and how long the handler took.
    pub fn admitted(&self, webhook: &'static str, outcome: &'static str, took: Duration) {
        *self
            .admissions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((webhook, outcome))
            .or_default() += 1;
        self.admission_duration.observe(took);
    }

    /// The API request counter to hand to [`count_api_requests`].
    pub fn api_requests(&self) -> Arc<ApiRequests> {
        self.api_requests.clone()
    }

    /// Whether this replica currently leads (and so reconciles).
    pub fn set_leader(&self, leading: bool) {
        self.leader.store(leading, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let name = "shardmesh_operator_reconciles_total";
        header(&mut s, name, "counter", "Reconciles by result.");
        let _ = writeln!(
            s,
            "{name}{{result=\"ok\"}} {}",
            self.ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "{name}{{result=\"error\"}} {}",
            self.failed.load(Ordering::Relaxed)
        );
        let name = "shardmesh_operator_reconcile_errors_total";
        header(&mut s, name, "counter", "Failed reconciles by reason.");
        for (reason, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {n}");
        }
        self.reconcile_duration.render(
            &mut s,
            "shardmesh_operator_reconcile_duration_seconds",
            "Reconcile duration.",
        );
        let name = "shardmesh_operator_leader";
        header(
            &mut s,
            name,
            "gauge",
            "1 when this replica leads and reconciles.",
        );
        let _ = writeln!(
            s,
            "{name} {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        let name = "shardmesh_webhook_admissions_total";
        header(
            &mut s,
            name,
            "counter",
            "Admission requests by webhook and outcome.",
        );
        for ((webhook, outcome), n) in self
            .admissions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "{name}{{webhook=\"{webhook}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        self.admission_duration.render(
            &mut s,
            "shardmesh_webhook_admission_duration_seconds",
            "Time the admission handler took per request.",
        );
        self.api_requests.render(&mut s);
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
        m.admitted("mutate", "answered", Duration::from_micros(40));
        let t = m.render();
        let series =
            "shardmesh_webhook_admissions_total{webhook=\"mutate\",outcome=\"answered\"} 1";
        assert!(t.contains(series), "{t}");
        assert!(t.contains("shardmesh_webhook_admission_duration_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(t.contains("shardmesh_webhook_admission_duration_seconds_count 1"));
    }

    fn req(method: &str, uri: &str, content_type: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            b = b.header(http::header::CONTENT_TYPE, ct);
        }
        b.body(()).expect("request literal")
    }

    #[test]
    fn classifies_api_verbs() {
        let cases = [
            ("GET", "/api/v1/namespaces/ns/services/a", None, "get"),
            ("GET", "/api/v1/namespaces/ns/services", None, "list"),
            ("GET", "/api/v1/namespaces/ns", None, "get"),
            ("GET", "/api/v1/namespaces", None, "list"),
            (
                "GET",
                "/apis/apps/v1/statefulsets?labelSelector=x&watch=true&resourceVersion=1",
                None,
                "watch",
            ),
            (
                "GET",
                "/apis/apps/v1/namespaces/ns/statefulsets/a-0/status",
                None,
                "get",
            ),
            (
                "GET",
                "/apis/shardmesh.io/v1alpha1/shardedservices?limit=1",
                None,
                "list",
            ),
            ("GET", "/version", None, "get"),
            ("POST", "/api/v1/namespaces/ns/events", None, "create"),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
                None,
                "update",
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/ns/statefulsets/a-0?fieldManager=m&force=true",
                Some("application/apply-patch+yaml"),
                "apply",
            ),
            (
                "PATCH",
                "/api/v1/namespaces/ns/configmaps/c",
                Some("application/merge-patch+json"),
                "patch",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/services/a-3",
                None,
                "delete",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/pods",
                None,
                "deletecollection",
            ),
            ("OPTIONS", "/api/v1/namespaces/ns/pods", None, "other"),
        ];
        for (method, uri, ct, verb) in cases {
            assert_eq!(api_verb(&req(method, uri, ct)), verb, "{method} {uri}");
        }
    }

    #[tokio::test]
    async fn the_client_layer_counts_requests_by_verb() {
        use tower::{Layer, ServiceExt};
        let m = Metrics::default();
        let inner = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
            Ok::<_, Infallible>(http::Response::new(()))
        });
        let svc = count_api_requests(m.api_requests()).layer(inner);
        let send = |method: &str, uri: &str| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .body(kube::client::Body::from(Vec::<u8>::new()))
                .expect("request literal")
        };
        svc.clone()
            .oneshot(send("GET", "/api/v1/namespaces/ns/configmaps/c"))
            .await
            .expect("served");
        svc.clone()
            .oneshot(send("GET", "/api/v1/configmaps?watch=true"))
            .await
            .expect("served");
        svc.oneshot(send("GET", "/api/v1/namespaces/ns/configmaps/d"))
            .await
            .expect("served");
        assert_eq!(m.api_requests().count("get"), 2);
        assert_eq!(m.api_requests().count("watch"), 1);
        assert_eq!(m.api_requests().count("list"), 0);
        let t = m.render();
        assert!(
            t.contains("shardmesh_operator_api_requests_total{verb=\"get\"} 2"),
            "{t}"
        );
        assert!(t.contains("shardmesh_operator_api_requests_total{verb=\"watch\"} 1"));
        assert!(t.contains("shardmesh_operator_api_requests_total{verb=\"apply\"} 0"));
    }
}
