//! The real binary: configuration errors (exit 2, message naming the flag), access-log lines,
//! and the SIGTERM drain.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_shardmesh-sidecar");

fn run_expect_config_error(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "args {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_configuration_exits_2_naming_the_flag() {
    let e = run_expect_config_error(&["--drain-delay", "5parsecs"], &[]);
    assert!(
        e.contains("--drain-delay") && e.contains("is not a duration"),
        "{e}"
    );

    let e = run_expect_config_error(&[], &[("SHARDMESH_GRACE_PERIOD", "soon")]);
    assert!(e.contains("--grace-period"), "{e}");

    let e = run_expect_config_error(&["--registry", "/nonexistent/registry.yaml"], &[]);
    assert!(
        e.contains("--registry (SHARDMESH_REGISTRY)") && e.contains("cannot read"),
        "{e}"
    );

    let bad_reg = temp_file("destinations: {a: {endpoints: [\"not-an-address\"]}}");
    let e = run_expect_config_error(&["--registry", bad_reg.to_str().unwrap()], &[]);
    assert!(e.contains("destinations[\"a\"].endpoints[0]"), "{e}");

    let e = run_expect_config_error(&[], &[("SHARDMESH_POLICY", "retries: {maxAttempts: 0}")]);
    assert!(
        e.contains("SHARDMESH_POLICY") && e.contains("resilience.retries.maxAttempts"),
        "{e}"
    );

    let e = run_expect_config_error(&["--policy", "/nonexistent/policy.yaml"], &[]);
    assert!(e.contains("--policy") && e.contains("cannot read"), "{e}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["--admin-addr", &busy_addr, "--outbound-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--admin-addr") && e.contains("in use"), "{e}");
}

/// The spawned sidecar with its stdout lines on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Proc { child, lines }
    }

    /// The next log line matching `pred`, waiting up to 30s.
    fn line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("no log line: {what}"),
            }
        }
    }
}

fn addr(v: &Value, field: &str) -> std::net::SocketAddr {
    v[field].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_and_sigterm_drain() {
    let app = Upstream::start(Fault::Hold).await;
    let dest = Upstream::start(Fault::Ok).await;
    dest.script([Fault::Status(503)]);
    let reg = temp_file(&registry(&[dest.addr]));
    let port = app.addr.port().to_string();
    let p = Proc::spawn(&[
        "--app-port",
        &port,
        "--inbound-addr",
        "127.0.0.1:0",
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--registry",
        reg.to_str().unwrap(),
        "--passthrough",
        "false",
        "--drain-delay",
        "1s",
        "--grace-period",
        "60s",
        "--policy-inline",
        FAST,
    ]);
    let started = p.line("startup", |v| v["message"] == "shardmesh-sidecar started");
    let (inbound, outbound, admin) = (
        addr(&started, "inbound"),
        addr(&started, "outbound"),
        addr(&started, "admin"),
    );

    // Outbound: one retry after a 503, logged on one line.
    let r = get(outbound, "http://svc.test/orders/1").await;
    assert_eq!(r.status, 200);
    assert_eq!(dest.hits(), 2);
    let line = p.line("outbound access log", |v| {
        v["target"] == "access_log" && v["direction"] == "outbound"
    });
    assert_eq!(line["method"], "GET");
    assert_eq!(line["authority"], "svc.test");
    assert_eq!(line["path"], "/orders/1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["destination"], "svc.test:80");
    assert_eq!(line["endpoint"], dest.addr.to_string());
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["retry_reasons"], "503");
    assert_eq!(line["breaker"], "closed");
    assert_eq!(
        line["response_bytes"],
        format!("ok {}", dest.addr.port()).len()
    );
    assert!(line["duration_ms"].as_f64().is_some() && line["headers_ms"].as_f64().is_some());
    // hyper stops polling a body that reports its end: the last frame must count as complete.
    assert_eq!(line["response_complete"], true);
    // No traceparent came with it: the sidecar started a trace (not sampled) and sent it on
    // with its own span as the parent, the same one on both attempts.
    let (trace, span) = (
        line["trace_id"].as_str().expect("trace_id logged"),
        line["span_id"].as_str().expect("span_id logged"),
    );
    assert_eq!((trace.len(), span.len()), (32, 16), "{line}");
    assert!(line.get("parent_span_id").is_none(), "{line}");
    for seen in dest.seen() {
        assert_eq!(
            seen.header("traceparent"),
            Some(format!("00-{trace}-{span}-00").as_str())
        );
    }

    // Inbound: a request held by the app is in flight when SIGTERM arrives.
    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let in_flight = tokio::spawn(async move {
        let headers = [
            ("host", "me"),
            ("traceparent", CALLER),
            ("tracestate", "v=1"),
        ];
        send(inbound, "GET", "/slow", &headers, "").await
    });
    wait_until(
        "the request to reach the app",
        Duration::from_secs(30),
        || app.hits() == 1,
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // Readiness fails at once; after the drain delay new connections are refused.
    let end = Instant::now() + Duration::from_secs(30);
    while get(admin, &format!("http://{admin}/ready")).await.status != 503 {
        assert!(Instant::now() < end, "readiness never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(inbound).await.is_ok() {
        assert!(
            Instant::now() < end,
            "still accepting after the drain delay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.hits(), 1);

    // The in-flight request completes, then the process exits 0.
    app.release();
    let r = in_flight.await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, format!("ok {port}").as_str())
    );
    let line = p.line("inbound access log", |v| {
        v["target"] == "access_log" && v["direction"] == "inbound"
    });
    assert_eq!(
        (line["path"].as_str(), line["status"].as_u64()),
        (Some("/slow"), Some(200))
    );
    assert_eq!(line["response_complete"], true);
    // The caller's trace continues: the app sees the trace id with the sidecar's span as its
    // parent, and the vendors' tracestate as it came.
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(line["parent_span_id"], "00f067aa0ba902b7");
    let span = line["span_id"].as_str().expect("span_id logged");
    let seen = app.seen();
    assert_eq!(
        seen[0].header("traceparent"),
        Some(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01").as_str())
    );
    assert_eq!(seen[0].header("tracestate"), Some("v=1"));
    // The outbound proxy stays open until the application exits: stop it.
    drop(app);
    let mut p = p;
    let end = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < end,
            "the sidecar did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0));
}

/// Peak resident memory of process `pid` in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// The bound stated in README (Security model): a sidecar whose stdout is blocked, serving
/// request heads at the size limit on 16 connections, stays under this peak RSS.
const BLOCKED_STDOUT_PEAK_RSS_MIB: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_heads_with_a_blocked_stdout_keep_memory_bounded() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    let app = Upstream::start(Fault::Ok).await;
    let port = app.addr.port().to_string();
    let mut child = Command::new(BIN)
        .args([
            "--app-port",
            &port,
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    // Read the startup line, then never read stdout again: once the pipe (64 KiB) is full the
    // log writer blocks, as with a stalled log collector.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    loop {
        first.clear();
        assert!(stdout.read_line(&mut first).unwrap() > 0, "sidecar exited");
        if first.contains("shardmesh-sidecar started") {
            break;
        }
    }
    let started: Value = serde_json::from_str(&first).unwrap();
    let (inbound, admin) = (addr(&started, "inbound"), addr(&started, "admin"));

    // Heads just under the 64 KiB limit: a 30 KiB path and a 30 KiB Host.
    let path = format!("/{}", "p".repeat(30 * 1024));
    let host = "h".repeat(30 * 1024);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (path, host) = (path.clone(), host.clone());
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut ok = 0u32;
                for _ in 0..200 {
                    let req = http::Request::get(path.as_str())
                        .header("host", host.as_str())
                        .body(Full::new(bytes::Bytes::new()))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    ok += u32::from(resp.status() == 200);
                    let _ = resp.into_body().collect().await;
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 16 * 200, "every request at the size limit is served");

    // Over the limit: refused (431 when the client reads it before the close), never passed
    // on to the application.
    let hits = app.hits();
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let head = format!(
        "GET /{} HTTP/1.1\r\nhost: me\r\n\r\n",
        "p".repeat(70 * 1024)
    );
    let _ = tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes()).await;
    let mut answer = vec![0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut s, &mut answer)
        .await
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        n == 0 || answer.starts_with("HTTP/1.1 431"),
        "an over-limit head got {answer:?}"
    );
    assert_eq!(
        app.hits(),
        hits,
        "an over-limit head reached the application"
    );

    let peak = peak_rss_kib(child.id());
    let metrics = get(admin, "/metrics").await.body;
    let dropped = metric(&metrics, "shardmesh_log_lines_dropped_total");
    eprintln!(
        "blocked stdout: 3,200 requests with 62 KiB heads, peak RSS {} KiB, {dropped} log lines dropped",
        peak
    );
    assert!(
        dropped > 0,
        "stdout was blocked, so lines must have been dropped"
    );
    assert!(
        peak < BLOCKED_STDOUT_PEAK_RSS_MIB * 1024,
        "peak RSS {peak} KiB over {BLOCKED_STDOUT_PEAK_RSS_MIB} MiB"
    );
    drop(stdout);
    drop(guard);
    let _ = child.wait();
}

/// Kills a process when dropped, so a failed assertion leaves no sidecar behind.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}
