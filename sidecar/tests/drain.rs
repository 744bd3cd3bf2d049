//! The ordered drain on loopback: inbound keeps serving during the drain delay, `POST /drain`
//! (the application's preStop hook) answers only after inbound closed and its in-flight requests
//! finished, and outbound keeps serving until the application's listener is gone.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_then_app_then_outbound() {
    let app = Upstream::start(Fault::Ok).await;
    // The first request to the app is held: in flight when the drain starts.
    app.script([Fault::Hold]);
    let dest = Upstream::start(Fault::Ok).await;
    let port = app.addr.port().to_string();
    let sc = sidecar(
        &registry(&[dest.addr]),
        FAST,
        &[
            "--app-port",
            &port,
            "--drain-delay",
            "1s",
            "--grace-period",
            "30s",
        ],
    )
    .await;
    let (inbound, outbound, admin) = (sc.inbound.unwrap(), sc.outbound, sc.admin);
    let drain = sc.drain.clone();
    let in_flight =
        tokio::spawn(async move { send(inbound, "GET", "/slow", &[("host", "me")], "").await });
    wait_until(
        "the held request at the app",
        Duration::from_secs(30),
        || app.hits() == 1,
    )
    .await;
    let exited = tokio::spawn(sc.drained());

    // The preStop hook: begins the drain and is held until inbound is drained.
    let hook = tokio::spawn(async move {
        send(admin, "POST", &format!("http://{admin}/drain"), &[], "").await
    });
    wait_until("the drain to begin", Duration::from_secs(30), || {
        drain.is_draining()
    })
    .await;
    let r = get(admin, &format!("http://{admin}/ready")).await;
    assert_eq!(r.status, 503);
    let r = get(admin, &format!("http://{admin}/drain")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "draining\n"));

    // (a) During the drain delay, inbound still serves (traffic routed before the removal).
    let r = send(inbound, "GET", "/late", &[("host", "me")], "").await;
    assert_eq!((r.status, r.body), (200, format!("ok {port}")));

    // After the delay the inbound listener closes; the held request keeps the hook waiting.
    wait_until(
        "the inbound listener to close",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(inbound).is_err(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !hook.is_finished(),
        "answered before the in-flight request finished"
    );
    assert_eq!(
        get(admin, &format!("http://{admin}/drain")).await.body,
        "inbound-closed\n"
    );
    // Outbound keeps serving the application meanwhile.
    assert_eq!(get(outbound, "http://svc.test/during").await.status, 200);

    // (b) The in-flight request finishes; then the hook gets its 200.
    app.release();
    let r = in_flight.await.unwrap();
    assert_eq!((r.status, r.body), (200, format!("ok {port}")));
    let r = hook.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("drained"), "{}", r.body);

    // (c) The application still runs: outbound still serves, the sidecar does not exit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        get(outbound, "http://svc.test/after-hook").await.status,
        200
    );
    assert!(!exited.is_finished(), "exited while the application runs");

    // The application exits (its listener goes away): outbound closes and the sidecar exits.
    drop(app);
    let clean = tokio::time::timeout(Duration::from_secs(10), exited)
        .await
        .expect("the sidecar exits soon after the application")
        .unwrap();
    assert!(clean, "every connection finished");
    assert!(
        std::net::TcpStream::connect(outbound).is_err(),
        "outbound closed"
    );
    assert_eq!(dest.hits(), 2);
}

#[tokio::test]
async fn without_an_app_port_every_listener_closes_after_the_delay() {
    let dest = Upstream::start(Fault::Ok).await;
    let sc = sidecar(
        &registry(&[dest.addr]),
        FAST,
        &["--drain-delay", "200ms", "--grace-period", "5s"],
    )
    .await;
    let outbound = sc.outbound;
    sc.drain.begin(false);
    assert!(sc.drained().await);
    assert!(tokio::net::TcpStream::connect(outbound).await.is_err());
}
