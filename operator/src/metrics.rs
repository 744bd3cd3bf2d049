//! Prometheus metrics and health endpoints of the operator binary: one `prometheus-client`
//! registry (counters, gauges, histograms) rendered in the text exposition format and served on
//! a small HTTP listener. The controller's Kubernetes client counts its own API requests by verb
//! ([`count_api_requests`]).

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tower::util::MapRequestLayer;
use tracing::{info, warn};

/// Upper bounds (seconds) of the reconcile-duration histogram buckets.
const RECONCILE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Upper bounds (seconds) of the admission-latency histogram buckets (the handler takes µs).
const ADMISSION_BUCKETS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25,
];

/// A label set of `N` fixed names with values from a bounded set.
type Labels<const N: usize> = [(&'static str, &'static str); N];

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
#[derive(Clone)]
pub struct ApiRequests(Family<Labels<1>, Counter>);

impl Default for ApiRequests {
    /// Every verb's series exists from the start (at 0), so a rate over a window that begins
    /// before the first request of a kind is still defined.
    fn default() -> Self {
        let family = Family::default();
        for verb in API_VERBS {
            let _ = family.get_or_create(&[("verb", verb)]);
        }
        ApiRequests(family)
    }
}

impl ApiRequests {
    /// Counts one request.
    pub fn record<B>(&self, req: &http::Request<B>) {
        self.0.get_or_create(&[("verb", api_verb(req))]).inc();
    }

    /// Requests counted so far with `verb` (one of the API server's verbs).
    pub fn count(&self, verb: &str) -> u64 {
        API_VERBS
            .iter()
            .find(|v| **v == verb)
            .map_or(0, |v| self.0.get_or_create(&[("verb", *v)]).get())
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

/// Metrics of the operator binary: both controllers record reconciles, the webhook
/// admissions. Cheap to update from every reconcile and admission.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels<2>, Counter>,
    errors: Family<Labels<2>, Counter>,
    reconcile_duration: Family<Labels<1>, Histogram>,
    applies: Family<Labels<1>, Counter>,
    leader: Gauge,
    admissions: Family<Labels<2>, Counter>,
    admission_duration: Histogram,
    api_requests: Arc<ApiRequests>,
    watch_restarts: Family<Labels<1>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<Labels<2>, Counter>::default();
        registry.register(
            "shardmesh_operator_reconciles",
            "Reconciles by controller (main: the ShardedService's objects and status; shardmap: its published membership) and result",
            reconciles.clone(),
        );
        let errors = Family::<Labels<2>, Counter>::default();
        registry.register(
            "shardmesh_operator_reconcile_errors",
            "Failed reconciles by controller and reason",
            errors.clone(),
        );
        let reconcile_duration = Family::<Labels<1>, Histogram>::new_with_constructor(|| {
            Histogram::new(RECONCILE_BUCKETS)
        });
        registry.register(
            "shardmesh_operator_reconcile_duration_seconds",
            "Reconcile duration by controller",
            reconcile_duration.clone(),
        );
        let applies = Family::<Labels<1>, Counter>::default();
        registry.register(
            "shardmesh_operator_applies",
            "Owned objects a reconcile compared with what it would apply, by result: written, or unchanged (no request sent)",
            applies.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "shardmesh_operator_leader",
            "1 when this replica leads and reconciles",
            leader.clone(),
        );
        let admissions = Family::<Labels<2>, Counter>::default();
        registry.register(
            "shardmesh_webhook_admissions",
            "Admission requests by webhook and outcome",
            admissions.clone(),
        );
        let admission_duration = Histogram::new(ADMISSION_BUCKETS);
        registry.register(
            "shardmesh_webhook_admission_duration_seconds",
            "Time the admission handler took per request",
            admission_duration.clone(),
        );
        let api_requests = Arc::new(ApiRequests::default());
        registry.register(
            "shardmesh_operator_api_requests",
            "Kubernetes API requests sent by the controller, by verb",
            api_requests.0.clone(),
        );
        let watch_restarts = Family::<Labels<1>, Counter>::default();
        registry.register(
            "shardmesh_operator_watch_restarts",
            "Watches of owned objects restarted with a fresh list because they had not shown an object the operator wrote, by kind",
            watch_restarts.clone(),
        );
        // Every series a dashboard or an alert reads exists from the start, at 0: a family
        // without series is not rendered at all, and a rate over a window that begins before
        // the first reconcile is still defined.
        for controller in ["main", "shardmap"] {
            for result in ["ok", "error"] {
                let _ = reconciles.get_or_create(&[("controller", controller), ("result", result)]);
            }
            let _ = reconcile_duration.get_or_create(&[("controller", controller)]);
        }
        for result in ["written", "unchanged"] {
            let _ = applies.get_or_create(&[("result", result)]);
        }
        Metrics {
            registry,
            reconciles,
            errors,
            reconcile_duration,
            applies,
            leader,
            admissions,
            admission_duration,
            api_requests,
            watch_restarts,
        }
    }
}

impl Metrics {
    /// Records one reconcile of `controller` (`main` or `shardmap`): its duration and, when it
    /// failed, the error's metric label.
    pub fn reconciled(
        &self,
        controller: &'static str,
        took: Duration,
        error: Option<&'static str>,
    ) {
        let result = match error {
            None => "ok",
            Some(reason) => {
                self.errors
                    .get_or_create(&[("controller", controller), ("reason", reason)])
                    .inc();
                "error"
            }
        };
        self.reconciles
            .get_or_create(&[("controller", controller), ("result", result)])
            .inc();
        self.reconcile_duration
            .get_or_create(&[("controller", controller)])
            .observe(took.as_secs_f64());
    }

    /// Records how many owned objects a reconcile wrote and how many it left alone because
    /// they already held what would be applied.
    pub fn applied(&self, written: u32, unchanged: u32) {
        self.applies
            .get_or_create(&[("result", "written")])
            .inc_by(u64::from(written));
        self.applies
            .get_or_create(&[("result", "unchanged")])
            .inc_by(u64::from(unchanged));
    }

    /// Records one admission request: which webhook (`mutate`, `validate`, `other`), its
    /// outcome (`answered`, `bad_request`, `not_found`) and how long the handler took.
    pub fn admitted(&self, webhook: &'static str, outcome: &'static str, took: Duration) {
        self.admissions
            .get_or_create(&[("webhook", webhook), ("outcome", outcome)])
            .inc();
        self.admission_duration.observe(took.as_secs_f64());
    }

    /// Records a restart of the watch of owned objects of `kind` (it stalled).
    pub fn watch_restarted(&self, kind: &'static str) {
        self.watch_restarts.get_or_create(&[("kind", kind)]).inc();
    }

    /// The API request counter to hand to [`count_api_requests`].
    pub fn api_requests(&self) -> Arc<ApiRequests> {
        self.api_requests.clone()
    }

    /// Whether this replica currently leads (and so reconciles).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
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
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
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
        // Before anything happened, the series exist at 0.
        let t = m.render();
        for series in [
            "# TYPE shardmesh_operator_reconcile_duration_seconds histogram\n",
            "shardmesh_operator_reconciles_total{controller=\"main\",result=\"ok\"} 0\n",
            "shardmesh_operator_reconciles_total{controller=\"shardmap\",result=\"error\"} 0\n",
            "shardmesh_operator_applies_total{result=\"written\"} 0\n",
            "shardmesh_operator_api_requests_total{verb=\"apply\"} 0\n",
        ] {
            assert!(t.contains(series), "{series} missing from:\n{t}");
        }
        m.reconciled("main", Duration::from_millis(3), None);
        m.reconciled("main", Duration::from_millis(300), Some("api_error"));
        m.reconciled("shardmap", Duration::from_millis(3), None);
        m.applied(2, 7);
        m.set_leader(true);
        let t = m.render();
        let has = |series: &str| assert!(t.contains(series), "{series} missing from:\n{t}");
        has("shardmesh_operator_reconciles_total{controller=\"main\",result=\"ok\"} 1\n");
        has("shardmesh_operator_reconciles_total{controller=\"main\",result=\"error\"} 1\n");
        has("shardmesh_operator_reconciles_total{controller=\"shardmap\",result=\"ok\"} 1\n");
        has("shardmesh_operator_reconcile_errors_total{controller=\"main\",reason=\"api_error\"} 1\n");
        has("shardmesh_operator_reconcile_duration_seconds_bucket{le=\"0.005\",controller=\"main\"} 1\n");
        has("shardmesh_operator_reconcile_duration_seconds_bucket{le=\"0.5\",controller=\"main\"} 2\n");
        has("shardmesh_operator_reconcile_duration_seconds_count{controller=\"main\"} 2\n");
        has("# TYPE shardmesh_operator_reconcile_duration_seconds histogram\n");
        has("shardmesh_operator_applies_total{result=\"written\"} 2\n");
        has("shardmesh_operator_applies_total{result=\"unchanged\"} 7\n");
        has("shardmesh_operator_leader 1\n");
        m.admitted("mutate", "answered", Duration::from_micros(40));
        let t = m.render();
        let series =
            "shardmesh_webhook_admissions_total{webhook=\"mutate\",outcome=\"answered\"} 1";
        assert!(t.contains(series), "{t}");
        assert!(
            t.contains("shardmesh_webhook_admission_duration_seconds_bucket{le=\"0.00005\"} 1"),
            "{t}"
        );
        assert!(t.contains("shardmesh_webhook_admission_duration_seconds_count 1"));
        assert!(t.ends_with("# EOF\n"), "{t}");
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
