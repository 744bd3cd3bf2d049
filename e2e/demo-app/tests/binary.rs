//! Starts the real `shardmesh-demo` binary on 127.0.0.1:0 and talks HTTP/1.1 to it over loopback.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(20);

struct Demo {
    child: Child,
    addr: String,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

async fn start(shard: u32, shards: u32) -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardmesh-demo"))
        .args(["--listen", "127.0.0.1:0"])
        .env("SHARDMESH_SHARD", shard.to_string())
        .env("SHARDMESH_SHARDS", shards.to_string())
        .env("POD_NAME", format!("demo-{shard}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn shardmesh-demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let addr = tokio::time::timeout(DEADLINE, async {
        loop {
            let line = rx.recv().await.expect("demo exited before listening");
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if v["message"] == "listening" {
                return v["listen"].as_str().expect("listen field").to_string();
            }
        }
    })
    .await
    .expect("demo did not log `listening` in time");
    Demo {
        child,
        addr,
        log: rx,
    }
}

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

fn parse(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn request(addr: &str, method: &str, path: &str, extra: &[(&str, &str)], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: demo\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    parse(&raw)
}

fn owner(key: &str, shards: u32) -> u32 {
    shardmesh_api::routing::shard_for_key(key.as_bytes(), shards)
}

#[tokio::test]
async fn serves_own_keys_and_refuses_others() {
    let mut demo = start(1, 3).await;
    let a = demo.addr.clone();

    let who = request(&a, "GET", "/whoami", &[], "").await;
    assert_eq!(who.status, 200);
    let v: serde_json::Value = serde_json::from_str(&who.body).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"pod": "demo-1", "shard": 1, "shards": 3})
    );
    assert_eq!(request(&a, "GET", "/healthz", &[], "").await.status, 200);
    assert_eq!(request(&a, "GET", "/readyz", &[], "").await.status, 200);

    let mut checked = (0, 0);
    for i in 0..30 {
        let key = format!("order-{i}");
        let path = format!("/kv/{key}");
        let hdr = [("x-shard-key", key.as_str())];
        let put = request(&a, "PUT", &path, &hdr, "value").await;
        assert_eq!(put.headers["x-demo-pod"], "demo-1");
        assert_eq!(put.headers["x-demo-shard"], "1");
        if owner(&key, 3) == 1 {
            assert_eq!(put.status, 201, "{}", put.body);
            let get = request(&a, "GET", &path, &hdr, "").await;
            assert_eq!((get.status, get.body.as_str()), (200, "value"));
            checked.0 += 1;
        } else {
            assert_eq!(put.status, 421);
            assert_eq!(
                put.body.trim_end(),
                format!(
                    "key \"{key}\" belongs to shard {} of 3; this is shard 1 (pod demo-1)",
                    owner(&key, 3)
                )
            );
            checked.1 += 1;
        }
    }
    assert!(checked.0 > 0 && checked.1 > 0, "{checked:?}");

    let mismatch = request(&a, "GET", "/kv/alice", &[("x-shard-key", "bob")], "").await;
    assert_eq!(mismatch.status, 400);
    assert!(mismatch.body.contains("x-shard-key"), "{}", mismatch.body);

    let big = "x".repeat(64 * 1024 + 1);
    let key = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| owner(k, 3) == 1)
        .expect("an owned key");
    let r = request(&a, "PUT", &format!("/kv/{key}"), &[], &big).await;
    assert_eq!(r.status, 413);

    // One JSON access-log line per request on stdout.
    let mut access = 0;
    while let Ok(line) = demo.log.try_recv() {
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if v["target"] == "access" {
            assert!(v["status"].is_u64() && v["path"].is_string(), "{line}");
            access += 1;
        }
    }
    assert!(access >= 30, "only {access} access-log lines");
    demo.child.kill().await.expect("kill");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_request_then_exits() {
    let mut demo = start(0, 1).await;
    // Start a PUT and send only half of its body: the request is in flight.
    let mut s = TcpStream::connect(&demo.addr).await.expect("connect");
    s.write_all(b"PUT /kv/slow HTTP/1.1\r\nhost: demo\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .expect("write head");
    // Wait until the server has the connection (a request round-trip on another one).
    assert_eq!(
        request(&demo.addr, "GET", "/healthz", &[], "").await.status,
        200
    );

    let pid = demo.child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused once shutdown has started...
    assert!(
        TcpStream::connect(&demo.addr).await.is_err(),
        "listener still open after SIGTERM"
    );
    // ...but the in-flight request completes.
    s.write_all(b"world").await.expect("write rest");
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let r = parse(&raw);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.headers.get("connection").map(String::as_str),
        Some("close")
    );

    let exit = tokio::time::timeout(DEADLINE, demo.child.wait())
        .await
        .expect("exit in time")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn bad_config_exits_2_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardmesh-demo"))
        .env("SHARDMESH_SHARD", "5")
        .env("SHARDMESH_SHARDS", "3")
        .env("PORT", "0")
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SHARDMESH_SHARD 5"), "{err}");
    assert!(err.contains("from 0 to 2"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_shardmesh-demo"))
        .env_remove("SHARDMESH_SHARD")
        .env_remove("SHARDMESH_SHARDS")
        .env("PORT", "0")
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHARDMESH_SHARDS is not set"));
}
