//! Outbound proxy behaviour against fault-injecting upstreams on loopback. Every test asserts
//! the exact number of requests the upstreams received.

mod common;

use std::time::{Duration, Instant};

use common::*;

const URI: &str = "http://svc.test/items?x=1";

#[tokio::test]
async fn explicit_proxy_forwards_absolute_form_and_fixed_port_with_host() {
    let up = Upstream::start(Fault::Ok).await;
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, format!("ok {}", up.addr.port()).as_str())
    );
    // Fixed local port: origin-form with a Host header.
    let r = send(sc.outbound, "GET", "/other", &[("host", "svc.test")], "").await;
    assert_eq!(r.status, 200);
    let seen = up.seen();
    assert_eq!(up.hits(), 2);
    assert_eq!(seen[0].path, "/items?x=1", "upstream gets origin-form");
    assert_eq!(seen[0].header("host"), Some("svc.test"));
    assert_eq!(seen[1].path, "/other");
}

#[tokio::test]
async fn unknown_destination_without_passthrough_is_a_clear_502() {
    let up = Upstream::start(Fault::Ok).await;
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;
    let r = get(sc.outbound, "http://elsewhere.test/").await;
    assert_eq!(r.status, 502);
    assert!(
        r.body.contains("elsewhere.test:80 is not in the registry"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn get_503_is_retried_until_success() {
    let up = Upstream::start(Fault::Ok).await;
    up.script([Fault::Status(503), Fault::Status(503)]);
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn max_attempts_bounds_retries_and_the_last_failure_is_returned() {
    let up = Upstream::start(Fault::Status(502)).await;
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!((r.status, r.body.as_str()), (502, "upstream 502"));
    assert_eq!(up.hits(), 3, "maxAttempts defaults to 3");
}

#[tokio::test]
async fn a_retry_goes_to_a_different_endpoint() {
    let a = Upstream::start(Fault::Status(503)).await;
    let b = Upstream::start(Fault::Status(503)).await;
    let policy = r#"{"retries": {"maxAttempts": 2, "baseBackoff": "1ms", "maxBackoff": "5ms"}}"#;
    let sc = sidecar(&registry(&[a.addr, b.addr]), policy, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 503);
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

#[tokio::test]
async fn post_is_never_sent_twice_but_is_with_an_idempotency_key() {
    let up = Upstream::start(Fault::Status(503)).await;
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;
    let r = send(sc.outbound, "POST", URI, &[], "order-1").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        up.hits(),
        1,
        "a POST that reached the upstream is not repeated"
    );

    let r = send(
        sc.outbound,
        "POST",
        URI,
        &[("idempotency-key", "k-1")],
        "order-2",
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(
        up.hits(),
        1 + 3,
        "with Idempotency-Key it is retried up to maxAttempts"
    );
    assert!(
        up.seen()[1..].iter().all(|s| s.body == b"order-2"),
        "the replayed body is intact"
    );

    // Marked non-idempotent by the app: even a PUT is not repeated, and the marker is removed.
    let r = send(
        sc.outbound,
        "PUT",
        URI,
        &[("x-shardmesh-idempotent", "false")],
        "v",
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 5);
    assert_eq!(up.seen()[4].header("x-shardmesh-idempotent"), None);
}

#[tokio::test]
async fn reset_mid_response_is_retried_for_get_not_for_post() {
    let up = Upstream::start(Fault::Ok).await;
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;

    up.script([Fault::Reset]);
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 2);

    up.script([Fault::Reset]);
    let r = send(sc.outbound, "POST", URI, &[], "p").await;
    assert_eq!(r.status, 502);
    assert!(
        r.body.contains("failed before a complete response"),
        "{}",
        r.body
    );
    assert_eq!(r.headers["x-shardmesh-error"], "reset");
    assert_eq!(
        up.hits(),
        3,
        "the POST reached the upstream once and was not repeated"
    );

    up.script([Fault::Reset]);
    let r = send(sc.outbound, "POST", URI, &[("idempotency-key", "k")], "p").await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn connect_failure_is_retried_even_for_post_because_it_never_left() {
    let sc = sidecar(&registry(&[refused_addr()]), FAST, &[]).await;
    let r = send(sc.outbound, "POST", URI, &[], "p").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("could not connect to"), "{}", r.body);
    let m = sc.metrics.render();
    assert_eq!(metric(&m, "shardmesh_upstream_attempts_total"), 3);
    assert_eq!(
        metric(&m, "shardmesh_retries_total{reason=\"connect-failure\"}"),
        2
    );
}

#[tokio::test]
async fn refused_endpoint_post_lands_once_on_the_healthy_one() {
    let good = Upstream::start(Fault::Ok).await;
    let sc = sidecar(&registry(&[refused_addr(), good.addr]), FAST, &[]).await;
    for i in 0..10 {
        let r = send(sc.outbound, "POST", URI, &[], format!("post-{i}")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    assert_eq!(
        good.hits(),
        10,
        "every POST reached the healthy endpoint exactly once"
    );
    let bodies: Vec<Vec<u8>> = good.seen().into_iter().map(|s| s.body).collect();
    let want: Vec<Vec<u8>> = (0..10).map(|i| format!("post-{i}").into_bytes()).collect();
    assert_eq!(bodies, want);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let up = Upstream::start(Fault::Ok).await;
    up.script([Fault::StatusRetryAfter(429, 1)]);
    let sc = sidecar(&registry(&[up.addr]), FAST, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 2);
    let seen = up.seen();
    // A lower bound only: the retry waited at least Retry-After, whatever the machine's load.
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(950));
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_is_not_waited_for() {
    let up = Upstream::start(Fault::StatusRetryAfter(503, 60)).await;
    let policy = r#"{"timeouts": {"overall": "5s"}, "retries": {"baseBackoff": "1ms", "maxBackoff": "5ms"}}"#;
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!((r.status, r.body.as_str()), (503, "upstream 503"));
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn per_try_timeout_retries_get_and_answers_504_for_post() {
    let up = Upstream::start(Fault::Ok).await;
    let policy = r#"{"timeouts": {"perTry": "200ms", "overall": "20s"}, "retries": {"baseBackoff": "1ms", "maxBackoff": "5ms"}}"#;
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    up.script([Fault::Delay(Duration::from_secs(3))]);
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 2);

    up.script([Fault::Delay(Duration::from_secs(3))]);
    let r = send(sc.outbound, "POST", URI, &[], "p").await;
    assert_eq!(r.status, 504);
    assert!(
        r.body.contains("within the per-try timeout of 200ms"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn overall_deadline_answers_504_with_a_clear_body() {
    let up = Upstream::start(Fault::Delay(Duration::from_secs(5))).await;
    let policy = r#"{"timeouts": {"perTry": "300ms", "overall": "300ms"}}"#;
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 504);
    assert!(
        r.body.contains("exceeded its overall deadline of 300ms"),
        "{}",
        r.body
    );
    assert_eq!(r.headers["x-shardmesh-error"], "deadline-exceeded");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn bodies_over_the_replay_bound_are_sent_once_and_intact() {
    let up = Upstream::start(Fault::Status(503)).await;
    let policy =
        r#"{"retries": {"maxReplayBodyBytes": 1024, "baseBackoff": "1ms", "maxBackoff": "5ms"}}"#;
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    let big = "x".repeat(4096);
    let r = send(sc.outbound, "PUT", URI, &[], big.clone()).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 1, "not buffered, so not retried");
    assert_eq!(up.seen()[0].body, big.as_bytes());
    let small = "y".repeat(1024);
    let r = send(sc.outbound, "PUT", URI, &[], small).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 1 + 3, "at the bound it is buffered and retried");
}

#[tokio::test]
async fn retry_budget_caps_retries_at_twenty_percent_plus_floor() {
    let up = Upstream::start(Fault::Status(503)).await;
    let policy =
        r#"{"retries": {"baseBackoff": "1ms", "maxBackoff": "2ms", "minRetriesPerSecond": 1}}"#;
    let started = Instant::now();
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    const REQUESTS: usize = 100;
    for _ in 0..REQUESTS {
        assert_eq!(get(sc.outbound, URI).await.status, 503);
    }
    let elapsed = started.elapsed();
    let floor = 10; // 1 retry/s over the 10s window
    let windows = elapsed.as_secs() as usize / 10 + 1;
    let hits = up.hits();
    assert!(
        hits <= REQUESTS * 12 / 10 + floor * windows,
        "{hits} attempts for {REQUESTS} requests"
    );
    if elapsed < Duration::from_secs(9) {
        // Within one window the arithmetic is exact: 100 requests + 20% + the floor of 10.
        assert_eq!(hits, REQUESTS + 20 + floor);
    }
    assert!(
        metric(
            &sc.metrics.render(),
            "shardmesh_retry_budget_exhausted_total"
        ) > 0
    );
}

#[tokio::test]
async fn breaker_moves_traffic_to_the_healthy_endpoint_and_recovers() {
    let bad = Upstream::start(Fault::Status(503)).await;
    // The healthy endpoint is slower, so latency-based balancing alone would prefer the failing
    // one (failing fast looks cheap): only the breaker keeps traffic away from it.
    let good = Upstream::start(Fault::Delay(Duration::from_millis(50))).await;
    let policy = r#"{
        "retries": {"baseBackoff": "1ms", "maxBackoff": "5ms"},
        "circuitBreaker": {"consecutiveFailures": 3, "openDuration": "300ms", "maxOpenDuration": "2s", "halfOpenProbes": 1}
    }"#;
    let sc = sidecar(&registry(&[bad.addr, good.addr]), policy, &[]).await;
    // Warm-up: the bad endpoint fails three times in a row and is ejected.
    for _ in 0..30 {
        assert_eq!(
            get(sc.outbound, URI).await.status,
            200,
            "retries hide the bad endpoint"
        );
    }
    let m = sc.metrics.render();
    assert!(metric(&m, "shardmesh_breaker_transitions_total{to=\"open\"}") >= 1);

    let (bad0, good0) = (bad.hits(), good.hits());
    for _ in 0..100 {
        assert_eq!(get(sc.outbound, URI).await.status, 200);
    }
    let (b, g) = (bad.hits() - bad0, good.hits() - good0);
    assert_eq!(g, 100, "every request was served by the healthy endpoint");
    assert!(
        g * 100 >= (b + g) * 90,
        "bad {b}, good {g}: under 90% to the healthy one"
    );

    // Recovery: half-open probes succeed, the breaker closes, traffic is shared again.
    bad.set_default(Fault::Ok);
    let bad1 = bad.hits();
    let deadline = Instant::now() + Duration::from_secs(60);
    while bad.hits() - bad1 < 10 {
        assert!(
            Instant::now() < deadline,
            "the recovered endpoint never got traffic back"
        );
        assert_eq!(get(sc.outbound, URI).await.status, 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let m = sc.metrics.render();
    assert!(metric(&m, "shardmesh_breaker_transitions_total{to=\"half_open\"}") >= 1);
    assert!(metric(&m, "shardmesh_breaker_transitions_total{to=\"closed\"}") >= 1);
}

#[tokio::test]
async fn all_breakers_open_fail_fast_with_503() {
    let up = Upstream::start(Fault::Status(500)).await;
    let policy = r#"{
        "retries": {"maxAttempts": 1},
        "circuitBreaker": {"consecutiveFailures": 2, "openDuration": "1m", "maxEjectionPercent": 100}
    }"#;
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    for _ in 0..2 {
        assert_eq!(get(sc.outbound, URI).await.status, 500);
    }
    let r = get(sc.outbound, URI).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-shardmesh-error"], "circuit-open");
    assert!(r.body.contains("circuit open"), "{}", r.body);
    assert_eq!(up.hits(), 2, "the open breaker kept the third request away");
}

#[tokio::test]
async fn max_ejection_percent_keeps_the_last_endpoint() {
    let up = Upstream::start(Fault::Status(500)).await;
    let policy = r#"{"retries": {"maxAttempts": 1}, "circuitBreaker": {"consecutiveFailures": 2, "openDuration": "1m"}}"#;
    let sc = sidecar(&registry(&[up.addr]), policy, &[]).await;
    for _ in 0..5 {
        assert_eq!(get(sc.outbound, URI).await.status, 500);
    }
    assert_eq!(
        up.hits(),
        5,
        "50% of one endpoint rounds down to none ejected"
    );
}

#[tokio::test]
async fn sharded_destination_routes_by_key() {
    let s0 = Upstream::start(Fault::Ok).await;
    let s1 = Upstream::start(Fault::Ok).await;
    let reg = format!(
        "destinations:\n  users.test:\n    shardMap: {{epoch: 7, shards: [{{index: 0, members: [{{pod: u-0-0, address: \"{}\"}}]}}, {{index: 1, members: [{{pod: u-1-0, address: \"{}\"}}]}}]}}\n",
        s0.addr, s1.addr
    );
    let sc = sidecar(&reg, FAST, &[]).await;
    let (k0, k1) = (key_for(0, 2), key_for(1, 2));
    for (key, up, shard) in [(&k0, &s0, "0"), (&k1, &s1, "1")] {
        let r = send(
            sc.outbound,
            "GET",
            "http://users.test/u",
            &[("x-shard-key", key)],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = up.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header("x-shardmesh-shard"), Some(shard));
        assert_eq!(seen[0].header("x-shardmesh-epoch"), Some("7"));
    }
    let r = get(sc.outbound, "http://users.test/u").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("set the x-shard-key header"), "{}", r.body);
    assert_eq!(s0.hits() + s1.hits(), 2);
}

#[tokio::test]
async fn metrics_per_destination_and_shard() {
    let s0 = Upstream::start(Fault::Ok).await;
    let s1 = Upstream::start(Fault::Ok).await;
    let plain = Upstream::start(Fault::Ok).await;
    // Shard 1's member answers 503 once: one retry, counted on shard 1 only.
    s1.script([Fault::Status(503)]);
    let reg = format!(
        "destinations:\n  users.test:\n    shardMap: {{epoch: 7, shards: [{{index: 0, members: [{{pod: u-0-0, address: \"{}\"}}]}}, {{index: 1, members: [{{pod: u-1-0, address: \"{}\"}}, {{pod: u-1-1, address: \"{}\"}}]}}]}}\n  svc.test:80:\n    endpoints: [\"{}\"]\n",
        s0.addr, s1.addr, s1.addr, plain.addr
    );
    let sc = sidecar(&reg, FAST, &[]).await;
    let (k0, k1) = (key_for(0, 2), key_for(1, 2));
    for key in [&k0, &k0, &k1] {
        let r = send(
            sc.outbound,
            "GET",
            "http://users.test/u",
            &[("x-shard-key", key)],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(get(sc.outbound, "http://svc.test/").await.status, 200);
    let m = get(sc.admin, &format!("http://{}/metrics", sc.admin))
        .await
        .body;
    let d = |shard: &str| format!("destination=\"users.test:80\",shard=\"{shard}\"");
    for (series, want) in [
        (format!("shardmesh_destination_requests_total{{{},status_class=\"2xx\"}}", d("0")), 2),
        (format!("shardmesh_destination_requests_total{{{},status_class=\"2xx\"}}", d("1")), 1),
        (format!("shardmesh_destination_requests_total{{{},status_class=\"5xx\"}}", d("1")), 0),
        (format!("shardmesh_destination_retries_total{{{}}}", d("0")), 0),
        (format!("shardmesh_destination_retries_total{{{}}}", d("1")), 1),
        (format!("shardmesh_destination_retry_budget_exhausted_total{{{}}}", d("1")), 0),
        (format!("shardmesh_destination_request_duration_seconds_count{{{}}}", d("0")), 2),
        (format!("shardmesh_destination_request_duration_seconds_bucket{{{},le=\"+Inf\"}}", d("1")), 1),
        (format!("shardmesh_destination_breaker_transitions_total{{{},to=\"open\"}}", d("1")), 0),
        // A destination that is not sharded has an empty shard label.
        ("shardmesh_destination_requests_total{destination=\"svc.test:80\",shard=\"\",status_class=\"2xx\"}".into(), 1),
        // The shard map as routed by: epoch, live members per shard.
        ("shardmesh_destination_map_epoch{destination=\"users.test:80\"}".into(), 7),
        (format!("shardmesh_destination_members{{{}}}", d("0")), 1),
        (format!("shardmesh_destination_members{{{}}}", d("1")), 2),
    ] {
        assert_eq!(metric(&m, &format!("{series} ")), want, "{series}");
    }
    assert!(m.contains("# TYPE shardmesh_destination_request_duration_seconds histogram"));
    assert!(!m.contains("shardmesh_destination_map_epoch{destination=\"svc.test:80\"}"));
}

#[tokio::test]
async fn writes_go_to_the_shard_leader_with_its_fencing_epoch() {
    // Shard 0: followers f and leader l; shard 1: a member but no leader (election under way).
    let f = Upstream::start(Fault::Ok).await;
    let l = Upstream::start(Fault::Ok).await;
    let s1 = Upstream::start(Fault::Ok).await;
    let reg = format!(
        "destinations:\n  users.test:\n    writes: methods\n    shardMap:\n      epoch: 3\n      shards:\n        - {{index: 0, members: [{{pod: u-0-0, address: \"{f}\"}}, {{pod: u-0-1, address: \"{l}\"}}], leader: {{pod: u-0-1, address: \"{l}\", epoch: 9}}}}\n        - {{index: 1, members: [{{pod: u-1-0, address: \"{s1}\"}}]}}\n",
        f = f.addr,
        l = l.addr,
        s1 = s1.addr
    );
    let sc = sidecar(&reg, FAST, &[]).await;
    let (k0, k1) = (key_for(0, 2), key_for(1, 2));
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = send(
            sc.outbound,
            method,
            "http://users.test/u",
            &[("x-shard-key", &k0)],
            "w",
        )
        .await;
        assert_eq!(r.status, 200, "{method}");
    }
    assert_eq!(
        (l.hits(), f.hits()),
        (4, 0),
        "every write lands on the leader"
    );
    for s in l.seen() {
        assert_eq!(s.header("x-shardmesh-fencing-epoch"), Some("9"));
        assert_eq!(s.header("x-shardmesh-epoch"), Some("3"));
    }
    // Reads may use any member and carry no fencing epoch: with the leader failing reads, the
    // retry lands on the follower.
    l.set_default(Fault::Status(503));
    for _ in 0..10 {
        let r = send(
            sc.outbound,
            "GET",
            "http://users.test/u",
            &[("x-shard-key", &k0)],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert!(
        f.hits() > 0 && l.hits() > 4,
        "reads use both replicas: f {} l {}",
        f.hits(),
        l.hits()
    );
    assert!(f
        .seen()
        .iter()
        .all(|s| s.header("x-shardmesh-fencing-epoch").is_none()));
    // A write to a shard without a leader fails fast, naming the shard; reads still work.
    let r = send(
        sc.outbound,
        "POST",
        "http://users.test/u",
        &[("x-shard-key", &k1)],
        "w",
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("shard 1 of users.test:80 has no leader"),
        "{}",
        r.body
    );
    assert_eq!(s1.hits(), 0);
    let r = send(
        sc.outbound,
        "GET",
        "http://users.test/u",
        &[("x-shard-key", &k1)],
        "",
    )
    .await;
    assert_eq!((r.status, s1.hits()), (200, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_never_eject_more_than_the_allowed_share() {
    let ups = [
        Upstream::start(Fault::Status(500)).await,
        Upstream::start(Fault::Status(500)).await,
        Upstream::start(Fault::Status(500)).await,
        Upstream::start(Fault::Status(500)).await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let policy = r#"{"retries": {"maxAttempts": 1}, "circuitBreaker": {"consecutiveFailures": 1, "openDuration": "1m", "maxEjectionPercent": 50}}"#;
    let sc = sidecar(&registry(&addrs), policy, &[]).await;
    let outbound = sc.outbound;
    // Every endpoint fails at once, many times over.
    for _ in 0..4 {
        let burst: Vec<_> = (0..32)
            .map(|_| tokio::spawn(async move { get(outbound, URI).await.status }))
            .collect();
        for b in burst {
            b.await.unwrap();
        }
    }
    // Half may be ejected, never more (each opened once: the open duration outlasts the test).
    let opened = metric(
        &sc.metrics.render(),
        "shardmesh_breaker_transitions_total{to=\"open\"}",
    );
    assert_eq!(
        opened, 2,
        "breakers opened with maxEjectionPercent 50 of 4 endpoints"
    );
    let _ = ups;
}
