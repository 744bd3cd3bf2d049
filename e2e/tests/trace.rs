//! Trace context on the real cluster: one request from a client pod's sidecar to a demo pod's
//! injected sidecar is logged by both under the same W3C trace id, the server's span a child of
//! the client's, whether the application sent a `traceparent` or the client's sidecar started
//! the trace.

mod mesh;

use k8s_openapi::api::core::v1::Pod;
use kube::{api::LogParams, Api};
use serde_json::Value;
use shardmesh_api::{validate::SIDECAR_CONTAINER, ShardedService};
use shardmesh_e2e::{apply_service, client, demo_service, wait_for, TestNamespace, WAIT};

/// The access-log line of `direction` in `pod`'s `container` whose field `field` is `value`
/// and whose status is 404 (the answer the scenario waits for; earlier attempts are ignored).
async fn access_line(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    direction: &str,
    field: &str,
    value: &str,
) -> Value {
    let what = format!("{pod}/{container} logs a {direction} line with {field}={value}");
    wait_for(&what, WAIT, || async {
        let logs = pods
            .logs(
                pod,
                &LogParams {
                    container: Some(container.to_string()),
                    ..LogParams::default()
                },
            )
            .await?;
        let found = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| {
                v["target"] == "access_log"
                    && v["direction"] == direction
                    && v[field] == value
                    && v["status"] == 404
            });
        match found {
            Some(v) => Ok(Some(v)),
            None => Err(anyhow::anyhow!(
                "no such line among {} log lines",
                logs.lines().count()
            )),
        }
    })
    .await
}

/// A GET of a key never written, through the client's sidecar, until the demo app answers 404
/// (the key's shard may not have a live member in the client's map yet: 503).
async fn get_missing(
    http: &mesh::Http,
    proxy: std::net::SocketAddr,
    host: &str,
    key: &str,
    headers: &[(&str, String)],
) -> mesh::Reply {
    wait_for(
        &format!("GET {key} answered 404 by the demo app"),
        WAIT,
        || async {
            let r = mesh::keyed_with(http, proxy, host, "GET", key, headers).await?;
            if r.status == 404 {
                Ok(Some(r))
            } else {
                Err(anyhow::anyhow!("{r:?}"))
            }
        },
    )
    .await
}

fn text<'a>(line: &'a Value, field: &str) -> &'a str {
    line[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing in {line}"))
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn client_and_server_sidecars_log_one_trace() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "trace").await;
    let injected = mesh::injection_installed(&client).await;
    let mut body = demo_service("demo", 2, 1);
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    let svcs: Api<ShardedService> = ns.api();
    apply_service(&svcs, &body).await.expect("apply demo");
    let http = mesh::http();
    let proxy = mesh::start_client(&ns, "demo", &http).await;
    let host = format!("demo.{}:8080", ns.name);
    let pods: Api<Pod> = ns.api();

    // The client pod logs failures only (--access-log-sample 0): read keys never written, so
    // the demo app answers 404 and both sidecars log the request.
    // 1. The application sent a traceparent: both sidecars continue its trace.
    let trace_id = "5f0c1e2d3b4a59687766554433221100";
    let caller = format!("00-{trace_id}-a1b2c3d4e5f60718-01");
    let r = get_missing(
        &http,
        proxy,
        &host,
        "never-written-1",
        &[("traceparent", caller.clone())],
    )
    .await;
    let out = access_line(&pods, "client", "client", "outbound", "trace_id", trace_id).await;
    assert_eq!(text(&out, "parent_span_id"), "a1b2c3d4e5f60718", "{out}");
    let client_span = text(&out, "span_id");
    let inb = access_line(
        &pods,
        &r.pod,
        SIDECAR_CONTAINER,
        "inbound",
        "trace_id",
        trace_id,
    )
    .await;
    assert_eq!(text(&inb, "parent_span_id"), client_span, "{inb}");
    assert_ne!(text(&inb, "span_id"), client_span, "each hop is a span");
    assert_eq!(text(&inb, "path"), "/kv/never-written-1");
    eprintln!(
        "[e2e] trace {trace_id}: client span {client_span} -> {} span {}",
        r.pod,
        text(&inb, "span_id")
    );

    // 2. No traceparent: the client's sidecar starts a trace and the server's continues it.
    let r = get_missing(&http, proxy, &host, "never-written-2", &[]).await;
    let out = access_line(
        &pods,
        "client",
        "client",
        "outbound",
        "path",
        "/kv/never-written-2",
    )
    .await;
    assert!(out.get("parent_span_id").is_none(), "{out}");
    let started = text(&out, "trace_id");
    assert_eq!(started.len(), 32, "{out}");
    let inb = access_line(
        &pods,
        &r.pod,
        SIDECAR_CONTAINER,
        "inbound",
        "trace_id",
        started,
    )
    .await;
    assert_eq!(text(&inb, "parent_span_id"), text(&out, "span_id"), "{inb}");
    ns.delete().await;
}
