//! Inbound bulkhead, admin endpoints and the in-process shutdown path.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn inbound_forwards_to_the_app_and_sheds_over_the_limit() {
    let app = Upstream::start(Fault::Hold).await;
    let policy = r#"{"concurrency": {"maxInFlight": 2}}"#;
    let port = app.addr.port().to_string();
    let sc = sidecar(&registry(&[]), policy, &["--app-port", &port]).await;
    let inbound = sc.inbound.unwrap();
    let held: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                send(inbound, "GET", &format!("/held/{i}"), &[("host", "me")], "").await
            })
        })
        .collect();
    wait_until("two requests at the app", Duration::from_secs(30), || {
        app.hits() == 2
    })
    .await;

    let r = send(inbound, "GET", "/third", &[("host", "me")], "").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["x-shardmesh-error"], "shed");
    assert_eq!(app.hits(), 2, "a shed request never reaches the app");

    app.release();
    for h in held {
        let r = h.await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, format!("ok {port}").as_str())
        );
    }
    // Permits are back: the next request goes through.
    assert_eq!(
        send(inbound, "GET", "/after", &[("host", "me")], "")
            .await
            .status,
        200
    );
    assert_eq!(app.hits(), 3);
    let m = sc.metrics.render();
    assert_eq!(metric(&m, "shardmesh_shed_total"), 1);
    assert_eq!(
        metric(
            &m,
            "shardmesh_requests_total{direction=\"inbound\",status_class=\"2xx\"}"
        ),
        3
    );
    assert_eq!(app.seen()[0].header("host"), Some("me"));
}

#[tokio::test]
async fn admin_live_ready_metrics_and_shutdown() {
    let app = Upstream::start(Fault::Ok).await;
    let port = app.addr.port().to_string();
    let sc = sidecar(&registry(&[app.addr]), FAST, &["--app-port", &port]).await;
    let admin = sc.admin;
    let admin_uri = |p: &str| format!("http://{admin}{p}");

    assert_eq!(get(admin, &admin_uri("/live")).await.status, 200);
    assert_eq!(get(admin, &admin_uri("/ready")).await.status, 200);
    assert_eq!(get(sc.outbound, "http://svc.test/").await.status, 200);
    let m = get(admin, &admin_uri("/metrics")).await;
    assert_eq!(m.status, 200);
    for name in [
        "shardmesh_requests_total",
        "shardmesh_request_duration_seconds_bucket",
        "shardmesh_retries_total",
        "shardmesh_retry_budget_exhausted_total",
        "shardmesh_breaker_transitions_total",
        "shardmesh_shed_total",
    ] {
        assert!(m.body.contains(name), "missing {name}");
    }
    assert_eq!(
        metric(
            &m.body,
            "shardmesh_requests_total{direction=\"outbound\",status_class=\"2xx\"}"
        ),
        1
    );
    assert_eq!(get(admin, &admin_uri("/nope")).await.status, 404);
    assert_eq!(
        send(admin, "GET", &admin_uri("/shutdown"), &[], "")
            .await
            .status,
        405
    );

    let r = send(admin, "POST", &admin_uri("/shutdown"), &[], "").await;
    assert_eq!(r.status, 202);
    assert_eq!(get(admin, &admin_uri("/ready")).await.status, 503);
    let outbound = sc.outbound;
    assert!(sc.drained().await, "nothing was in flight");
    assert!(
        tokio::net::TcpStream::connect(outbound).await.is_err(),
        "listener closed"
    );
    assert_eq!(app.hits(), 1);
}

#[tokio::test]
async fn ready_fails_while_the_app_is_not_answering() {
    // The app is always on 127.0.0.1: a port released there, nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
        .to_string();
    let sc = sidecar(&registry(&[]), FAST, &["--app-port", &port]).await;
    let r = get(sc.admin, &format!("http://{}/ready", sc.admin)).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("not answering"), "{}", r.body);
    let r = send(sc.inbound.unwrap(), "GET", "/", &[("host", "me")], "").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("could not connect"), "{}", r.body);
}
