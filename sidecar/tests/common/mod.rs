//! Test fixtures: fault-injecting upstream servers on real loopback sockets, a raw HTTP/1
//! client that can send absolute-form requests, and an in-process sidecar.
#![allow(dead_code)]

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use shardmesh_sidecar::{
    config::{Args, Settings},
    Running,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the upstream does with one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 200 with body `ok <port>`.
    Ok,
    /// This status.
    Status(u16),
    /// This status with `Retry-After: <secs>`.
    StatusRetryAfter(u16, u64),
    /// Read the request, send half a status line, then reset the connection.
    Reset,
    /// Wait, then 200.
    Delay(Duration),
    /// Wait until [`Upstream::release`], then 200.
    Hold,
    /// 200 with a body of this many bytes.
    Big(usize),
}

/// A request the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    script: Mutex<VecDeque<Fault>>,
    default: Mutex<Fault>,
    seen: Mutex<Vec<Seen>>,
    hits: AtomicUsize,
    release: watch::Sender<bool>,
}

/// A fault-injecting HTTP/1 upstream. Every response carries `Connection: close`, so each
/// attempt is one connection and the request count is exact.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(default: Fault) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            seen: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
            release: watch::Sender::new(false),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(handle(stream, st.clone(), addr.port()));
            }
        });
        Upstream { addr, state, task }
    }

    /// The next requests get these faults, in order; then the default applies.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        *self.state.script.lock().unwrap() = faults.into_iter().collect();
    }

    pub fn set_default(&self, fault: Fault) {
        *self.state.default.lock().unwrap() = fault;
    }

    /// Requests received (fully read), whatever the fault.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Lets every held request (and future ones) complete.
    pub fn release(&self) {
        self.state.release.send_replace(true);
    }
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

async fn read_request(stream: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while body.len() < len {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        // Read until the terminating chunk, then decode.
        while find(&body, b"0\r\n\r\n").is_none() {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let i = find(rest, b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..i]).ok()?.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + size]);
            rest = &rest[i + 2 + size + 2..];
        }
        body = out;
    }
    Some(Seen {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    })
}

async fn respond(stream: &mut TcpStream, status: u16, extra: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(msg.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn handle(mut stream: TcpStream, st: Arc<State>, port: u16) {
    let Some(seen) = read_request(&mut stream).await else {
        return;
    };
    let fault = {
        let next = st.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| st.default.lock().unwrap().clone())
    };
    st.seen.lock().unwrap().push(seen);
    st.hits.fetch_add(1, Ordering::SeqCst);
    let ok = format!("ok {port}");
    match fault {
        Fault::Ok => respond(&mut stream, 200, "", &ok).await,
        Fault::Status(s) => respond(&mut stream, s, "", &format!("upstream {s}")).await,
        Fault::StatusRetryAfter(s, secs) => {
            respond(
                &mut stream,
                s,
                &format!("retry-after: {secs}\r\n"),
                &format!("upstream {s}"),
            )
            .await
        }
        Fault::Reset => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            respond(&mut stream, 200, "", &ok).await
        }
        Fault::Big(n) => {
            let head =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if stream.write_all(&chunk[..k]).await.is_err() {
                    return;
                }
                left -= k;
            }
            let _ = stream.shutdown().await;
        }
        Fault::Hold => {
            let mut rx = st.release.subscribe();
            let _ = rx.wait_for(|r| *r).await;
            respond(&mut stream, 200, "", &ok).await
        }
    }
}

/// An address nothing listens on (connections are refused): a port bound and released on a
/// loopback address of its own (all of 127/8 is local), which no concurrent test binding
/// `127.0.0.1:0` can be handed.
pub fn refused_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 82, (n >> 8) as u8, n as u8);
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

/// Sends one request over a fresh connection to `proxy`. `uri` may be absolute-form (explicit
/// proxy) or origin-form (then pass a Host header).
pub async fn send(
    proxy: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder().method(method).uri(uri);
    let parsed: http::Uri = uri.parse().unwrap();
    if let Some(a) = parsed.authority() {
        b = b.header("host", a.as_str());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

/// GET through the explicit proxy.
pub async fn get(proxy: SocketAddr, uri: &str) -> Resp {
    send(proxy, "GET", uri, &[], Bytes::new()).await
}

static FILES: AtomicUsize = AtomicUsize::new(0);

/// A temporary file, removed when dropped so test runs leave nothing in /tmp.
pub struct TempFile(std::path::PathBuf);

impl TempFile {
    /// The file's path as a string.
    pub fn to_str(&self) -> Option<&str> {
        self.0.to_str()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a temporary file that lives as long as the returned guard.
pub fn temp_file(contents: &str) -> TempFile {
    let n = FILES.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!(
        "shardmesh-sidecar-test-{}-{n}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, contents).unwrap();
    TempFile(path)
}

/// A registry with one destination `svc.test:80` served by `endpoints`.
pub fn registry(endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "destinations:\n  svc.test:80:\n    endpoints: [{}]\n",
        list.join(", ")
    )
}

/// Starts an in-process sidecar on ephemeral loopback ports.
pub async fn sidecar(registry_yaml: &str, policy: &str, extra: &[&str]) -> Running {
    // The registry is read while building the settings; the file may go right after.
    let reg_file = temp_file(registry_yaml);
    let reg = reg_file.to_str().unwrap().to_string();
    let mut argv = vec![
        "shardmesh-sidecar",
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--inbound-addr",
        "127.0.0.1:0",
        "--passthrough",
        "false",
        "--registry",
        &reg,
        "--policy-inline",
        policy,
    ];
    argv.extend_from_slice(extra);
    let args = <Args as clap::Parser>::try_parse_from(&argv).unwrap();
    let settings = Settings::from_args(args).unwrap();
    shardmesh_sidecar::start(settings, None).await.unwrap()
}

/// Fast retries for tests; the rest of the policy at defaults unless overridden.
pub const FAST: &str = r#"{"retries": {"baseBackoff": "1ms", "maxBackoff": "5ms"}}"#;

/// Polls `cond` every 20ms until it holds or `deadline` passes.
pub async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric line (exact series text before the value).
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// The first key `key-<i>` that routes to `shard` of `shards`.
pub fn key_for(shard: u32, shards: u32) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| shardmesh_api::routing::shard_for_key(k.as_bytes(), shards) == shard)
        .expect("some key routes to every shard")
}
