//! Hostile clients next to legitimate traffic, on real loopback sockets: connections that send
//! their request head a byte at a time, declare a body and never send it, stop reading a large
//! response, or just sit idle. None of them may hold a slot of the application for long, and
//! every one of them is closed within the documented timeouts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

/// The connection limits every test here runs with: short, so closing is seen quickly.
const IDLE: &str = "1s";
const SEND: &str = "1s";

async fn hostile_sidecar(
    max_in_flight: u32,
    app: &Upstream,
    send_timeout: &str,
    extra: &[&str],
) -> shardmesh_sidecar::Running {
    let policy = format!(r#"{{"concurrency": {{"maxInFlight": {max_in_flight}}}}}"#);
    let port = app.addr.port().to_string();
    let mut args = vec![
        "--app-port",
        &port,
        "--idle-timeout",
        IDLE,
        "--send-timeout",
        send_timeout,
    ];
    args.extend_from_slice(extra);
    sidecar(&registry(&[]), &policy, &args).await
}

/// Reads (and discards) until the peer closes; how long that took from `since`.
fn until_closed(mut read: tokio::net::tcp::OwnedReadHalf, since: Instant) -> JoinHandle<Duration> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    })
}

/// A connection sending `GET /` and then one header byte every 100 ms, forever.
async fn slow_header(addr: std::net::SocketAddr) -> JoinHandle<Duration> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = s.into_split();
    let closed = until_closed(read, Instant::now());
    tokio::spawn(async move {
        if write
            .write_all(b"GET / HTTP/1.1\r\nhost: me\r\nx-slow: ")
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if write.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    closed
}

/// A connection declaring a 1000-byte body and sending 3 bytes of it.
async fn unsent_body(addr: std::net::SocketAddr) -> (TcpStream, Instant) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: me\r\ncontent-length: 1000\r\n\r\nabc")
        .await
        .unwrap();
    (s, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_hold_no_slot_of_the_application() {
    const MAX_IN_FLIGHT: u32 = 4;
    let app = Upstream::start(Fault::Ok).await;
    let sc = hostile_sidecar(MAX_IN_FLIGHT, &app, SEND, &[]).await;
    let inbound = sc.inbound.unwrap();

    // As many of each kind of hostile connection as the application has slots.
    let mut slow = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..MAX_IN_FLIGHT {
        slow.push(slow_header(inbound).await);
        bodies.push(unsent_body(inbound).await);
    }
    // Give them time to be read by the sidecar before the real traffic starts.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Real requests, several at a time, while the hostile connections are open.
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..10 {
        let batch: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|i| {
                tokio::spawn(async move {
                    send(
                        inbound,
                        "POST",
                        &format!("/real/{round}/{i}"),
                        &[("host", "me")],
                        "hello",
                    )
                    .await
                    .status
                })
            })
            .collect();
        for b in batch {
            *statuses.entry(b.await.unwrap()).or_insert(0) += 1;
        }
    }
    let real_took = started.elapsed();
    assert_eq!(
        statuses,
        [(200u16, 10 * MAX_IN_FLIGHT)].into_iter().collect(),
        "every real request is served while {MAX_IN_FLIGHT} slow-header and {MAX_IN_FLIGHT} \
         unsent-body connections are open"
    );
    // The unsent bodies never reached the application.
    assert!(
        app.seen().iter().all(|s| s.path.starts_with("/real/")),
        "a request whose body never arrived reached the application"
    );

    // Every hostile connection is closed: a head not complete within the idle timeout, a body
    // silent for twice it. Deadlines leave room for a busy machine.
    for h in slow {
        let took = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("a slow-header connection is closed within 20s")
            .unwrap();
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    }
    for (s, since) in bodies {
        let (read, _write) = s.into_split();
        let took = tokio::time::timeout(Duration::from_secs(20), until_closed(read, since))
            .await
            .expect("an unsent-body connection is closed within 20s")
            .unwrap();
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    }
    eprintln!("real requests took {real_took:?} next to the hostile connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let app = Upstream::start(Fault::Ok).await;
    let sc = hostile_sidecar(8, &app, SEND, &[]).await;
    let inbound = sc.inbound.unwrap();

    // Connected, never a byte.
    let silent = TcpStream::connect(inbound).await.unwrap();
    let (read, _keep) = silent.into_split();
    let silent = until_closed(read, Instant::now());

    // One request answered, then idle on a kept-alive connection.
    let mut kept = TcpStream::connect(inbound).await.unwrap();
    kept.write_all(b"GET /once HTTP/1.1\r\nhost: me\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("ok ") {
        let n = kept.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let (read, _keep2) = kept.into_split();
    let kept = until_closed(read, answered);

    for (what, h) in [("silent", silent), ("kept-alive", kept)] {
        let took = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .unwrap_or_else(|_| panic!("the {what} connection is closed within 20s"))
            .unwrap();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "the {what} connection closed after {took:?}, expected about the idle timeout (1s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection_and_slot_after_the_send_timeout() {
    let app = Upstream::start(Fault::Big(16 * 1024 * 1024)).await;
    let sc = hostile_sidecar(1, &app, "3s", &[]).await;
    let inbound = sc.inbound.unwrap();

    // Asks for 16 MiB and reads none of it: far more than socket buffers hold.
    let mut s = TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: me\r\n\r\n")
        .await
        .unwrap();
    wait_until(
        "the big request at the app",
        Duration::from_secs(30),
        || app.hits() == 1,
    )
    .await;
    app.set_default(Fault::Ok);
    // While it stalls, its slot is taken (the application is still sending to it).
    assert_eq!(
        send(inbound, "GET", "/meanwhile", &[("host", "me")], "")
            .await
            .status,
        503
    );
    // The sidecar gives up on it after the send timeout and the slot comes back.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = send(inbound, "GET", "/after", &[("host", "me")], "").await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the slot of the stalled client was not released within 30s (last status {})",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And its connection is gone: reading now ends before the 16 MiB.
    let mut total = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the stalled connection is still open"),
        }
    }
    assert!(total < 16 * 1024 * 1024, "read {total} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_for_a_free_one() {
    let app = Upstream::start(Fault::Ok).await;
    let sc = hostile_sidecar(8, &app, SEND, &["--max-connections", "4"]).await;
    let inbound = sc.inbound.unwrap();
    // Four silent connections fill the cap.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(inbound).await.unwrap());
    }
    let connected = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fifth is accepted by the kernel but only served once the idle timeout frees a place.
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        send(inbound, "GET", "/fifth", &[("host", "me")], ""),
    )
    .await
    .expect("served once an idle connection was closed");
    assert_eq!(r.status, 200);
    // The idle timeout is 1 s from each silent connection's start; timers may round a few
    // milliseconds either way.
    assert!(
        connected.elapsed() >= Duration::from_millis(900),
        "served {:?} after the silent connections opened, before any of them could have been \
         closed for idleness",
        connected.elapsed()
    );
    drop(silent);
}
