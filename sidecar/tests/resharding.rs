//! Resharding on loopback: real sidecars in front of small key-value apps, a map grown from 1
//! to 2 shards with its handoff window open, and clients holding the new or the old map.
//! Exercises the inbound 421, the client's single redirect, handoff reads and the delete
//! contract end to end.

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use common::{metric, send, temp_file};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use shardmesh_api::{
    headers::{EPOCH, FENCING_EPOCH, HANDOFF, HANDOFF_FROM, OWNER, PREVIOUS_SHARDS, SHARD, SHARDS},
    routing::shard_for_key,
};
use shardmesh_sidecar::{
    config::{Args, Settings},
    Running,
};
use tokio::net::TcpListener;

/// Sidecar headers an app saw, per key.
type Seen = Arc<Mutex<HashMap<String, Vec<(String, String)>>>>;

/// A key-value app: PUT stores, GET reads (404 when absent), DELETE removes; remembers the
/// sidecar headers of the last request per key.
#[derive(Clone, Default)]
struct Kv {
    data: Arc<Mutex<HashMap<String, String>>>,
    seen: Seen,
    hits: Arc<AtomicUsize>,
}

impl Kv {
    async fn start() -> (Kv, SocketAddr) {
        let kv = Kv::default();
        let app = kv.clone();
        let addr = serve(move |req| {
            let app = app.clone();
            async move { app.handle(req).await }
        })
        .await;
        (kv, addr)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let key = req.uri().path().trim_start_matches("/kv/").to_string();
        let headers = [
            SHARD,
            SHARDS,
            EPOCH,
            HANDOFF,
            PREVIOUS_SHARDS,
            FENCING_EPOCH,
        ]
        .iter()
        .filter_map(|h| {
            let v = req.headers().get(*h)?.to_str().ok()?;
            Some((h.to_string(), v.to_string()))
        })
        .collect();
        self.seen.lock().unwrap().insert(key.clone(), headers);
        let method = req.method().clone();
        let body = req.into_body().collect().await.expect("body").to_bytes();
        let mut data = self.data.lock().unwrap();
        let (status, text) = match method.as_str() {
            "PUT" => {
                data.insert(key, String::from_utf8_lossy(&body).into_owned());
                (StatusCode::NO_CONTENT, String::new())
            }
            "GET" => match data.get(&key) {
                Some(v) => (StatusCode::OK, v.clone()),
                None => (StatusCode::NOT_FOUND, "no such key".into()),
            },
            "DELETE" => match data.remove(&key) {
                Some(_) => (StatusCode::NO_CONTENT, String::new()),
                None => (StatusCode::NOT_FOUND, "no such key".into()),
            },
            _ => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
        };
        let mut r = Response::new(Full::new(Bytes::from(text)));
        *r.status_mut() = status;
        r
    }

    fn get(&self, key: &str) -> Option<String> {
        self.data.lock().unwrap().get(key).cloned()
    }

    fn put(&self, key: &str, value: &str) {
        self.data
            .lock()
            .unwrap()
            .insert(key.to_string(), value.to_string());
    }

    fn seen(&self, key: &str, header: &str) -> Option<String> {
        self.seen
            .lock()
            .unwrap()
            .get(key)?
            .iter()
            .find(|(h, _)| h == header)
            .map(|(_, v)| v.clone())
    }
}

/// Serves `handler` over HTTP/1 on an ephemeral loopback port, for the life of the test.
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let reply = handler(req);
                    async move { Ok::<_, Infallible>(reply.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A free loopback port (bound and released; the sidecar binds it right after), on a loopback
/// address of its own (all of 127/8 is local): between the release and the sidecar's bind, a
/// concurrent test binding `127.0.0.1:0` could be handed the same port, never this address.
fn free_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 81, (n >> 8) as u8, n as u8);
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind");
    l.local_addr().expect("addr")
}

/// A registry with `svc.test:80` routed by `count` shards over `members`, optionally with a
/// previous layout in its handoff window.
fn registry(epoch: i64, count: u32, previous: Option<u32>, members: &[SocketAddr]) -> String {
    let one: Vec<Vec<SocketAddr>> = members.iter().map(|a| vec![*a]).collect();
    registry_of(epoch, count, previous, &one)
}

/// As [`registry`], with any number of members per shard.
fn registry_of(
    epoch: i64,
    count: u32,
    previous: Option<u32>,
    shards: &[Vec<SocketAddr>],
) -> String {
    let shards: Vec<String> = shards
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let ms: Vec<String> = ms
                .iter()
                .enumerate()
                .map(|(j, a)| format!("{{pod: p{i}-{j}, address: \"{a}\"}}"))
                .collect();
            format!("{{index: {i}, members: [{}]}}", ms.join(", "))
        })
        .collect();
    let prev = previous.map_or(String::new(), |p| {
        format!(", previous: {{count: {p}, until: \"2030-01-01T00:00:00Z\"}}")
    });
    format!(
        "destinations:\n  svc.test:80:\n    shardMap: {{epoch: {epoch}, count: {count}, shards: [{}]{prev}}}\n",
        shards.join(", ")
    )
}

async fn start(registry_yaml: &str, extra: &[&str]) -> Running {
    let reg_file = temp_file(registry_yaml);
    let reg = reg_file.to_str().expect("path").to_string();
    let mut argv = vec![
        "shardmesh-sidecar",
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--passthrough",
        "false",
        "--registry",
        &reg,
        "--policy-inline",
        common::FAST,
    ];
    argv.extend_from_slice(extra);
    let args = <Args as clap::Parser>::try_parse_from(&argv).expect("args");
    let settings = Settings::from_args(args).expect("settings");
    shardmesh_sidecar::start(settings, None)
        .await
        .expect("start")
}

/// A member sidecar of shard `shard` listening on `inbound`, in front of `app`.
async fn member(reg: &str, shard: u32, inbound: SocketAddr, app: SocketAddr) -> Running {
    let (inbound, port, shard) = (
        inbound.to_string(),
        app.port().to_string(),
        shard.to_string(),
    );
    start(
        reg,
        &[
            "--inbound-addr",
            &inbound,
            "--app-port",
            &port,
            "--shard",
            &shard,
            "--own-destination",
            "svc.test:80",
        ],
    )
    .await
}

/// A key that moves from shard 0 to shard 1 when growing from 1 to 2 shards.
fn moved_key(n: usize) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| shard_for_key(k.as_bytes(), 2) == 1)
        .nth(n)
        .expect("keys move")
}

/// A key that stays on shard 0.
fn staying_key() -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| shard_for_key(k.as_bytes(), 2) == 0)
        .expect("keys stay")
}

fn url(key: &str) -> String {
    format!("http://svc.test/kv/{key}")
}

#[tokio::test]
async fn a_grown_map_redirects_hands_off_reads_and_keeps_deletes_deleted() {
    let (a, a_app) = Kv::start().await;
    let (b, b_app) = Kv::start().await;
    let (a_in, b_in) = (free_addr(), free_addr());
    // Grown 1 -> 2 at epoch 2, handoff window open.
    let grown = registry(2, 2, Some(1), &[a_in, b_in]);
    let _a = member(&grown, 0, a_in, a_app).await;
    let _b = member(&grown, 1, b_in, b_app).await;
    let client = start(&grown, &[]).await;

    // A value written before the change lives on its previous owner only.
    let k = moved_key(0);
    a.put(&k, "old");
    let key = [("x-shard-key", k.as_str())];
    let r = send(client.outbound, "GET", &url(&k), &key, Bytes::new()).await;
    assert_eq!((r.status, r.body.as_str()), (200, "old"), "{r:?}");
    assert_eq!(
        r.headers.get(HANDOFF_FROM).map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    // The previous owner's app was told to judge by the previous layout, as a handoff.
    assert_eq!(a.seen(&k, SHARDS).as_deref(), Some("1"));
    assert_eq!(a.seen(&k, HANDOFF).as_deref(), Some("1"));
    // The new owner's app was told the new layout (and the caller's values were replaced).
    assert_eq!(b.seen(&k, SHARD).as_deref(), Some("1"));
    assert_eq!(b.seen(&k, SHARDS).as_deref(), Some("2"));
    assert_eq!(b.seen(&k, EPOCH).as_deref(), Some("2"));
    assert_eq!(b.seen(&k, PREVIOUS_SHARDS).as_deref(), Some("1"));

    // The old owner itself refuses the key with the owner and its epoch: not processed.
    let before = a.hits.load(Ordering::SeqCst);
    let direct = format!("http://{a_in}/kv/{k}");
    let r = send(a_in, "PUT", &direct, &key, "sneaky").await;
    assert_eq!(r.status, 421, "{r:?}");
    assert_eq!(r.headers.get(OWNER).map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert_eq!(r.headers.get(EPOCH).map(|v| v.as_bytes()), Some(&b"2"[..]));
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        before,
        "a 421 never reaches the app"
    );
    // A caller's handoff marker does not make a write acceptable there.
    let forged = [("x-shard-key", k.as_str()), (HANDOFF, "1")];
    let r = send(a_in, "PUT", &direct, &forged, "sneaky").await;
    assert_eq!(r.status, 421);

    // Delete contract: a delete of a moved key removes the previous owner's copy first, so a
    // later read that misses on the new owner finds nothing there either.
    let r = send(client.outbound, "DELETE", &url(&k), &key, Bytes::new()).await;
    assert!(r.status == 204 || r.status == 404, "{r:?}");
    assert_eq!(a.get(&k), None, "deleted on the previous owner");
    let r = send(client.outbound, "GET", &url(&k), &key, Bytes::new()).await;
    assert_eq!(r.status, 404, "a deleted value must not come back: {r:?}");

    // Writes during the window go to the new owner only, and read back without handoff.
    let k2 = moved_key(1);
    let key2 = [("x-shard-key", k2.as_str())];
    let r = send(client.outbound, "PUT", &url(&k2), &key2, "new").await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!((a.get(&k2), b.get(&k2).as_deref()), (None, Some("new")));
    let r = send(client.outbound, "GET", &url(&k2), &key2, Bytes::new()).await;
    assert_eq!((r.status, r.body.as_str()), (200, "new"));
    assert!(r.headers.get(HANDOFF_FROM).is_none());

    // Keys that did not move are served by their owner with no handoff and no redirect.
    let s = staying_key();
    let keys = [("x-shard-key", s.as_str())];
    let r = send(client.outbound, "PUT", &url(&s), &keys, "here").await;
    assert_eq!(r.status, 204);
    assert_eq!(a.get(&s).as_deref(), Some("here"));

    let m = common::get(_b.admin, "http://x/metrics").await.body;
    // Two reads missed on the new owner: the first found the old value, the one after the
    // delete found nothing on the previous owner either.
    assert_eq!(metric(&m, "shardmesh_handoff_total{kind=\"read\"}"), 2);
    assert_eq!(metric(&m, "shardmesh_handoff_total{kind=\"delete\"}"), 1);
    let m = common::get(_a.admin, "http://x/metrics").await.body;
    assert_eq!(metric(&m, "shardmesh_handoff_total{kind=\"served\"}"), 3);
    assert_eq!(metric(&m, "shardmesh_misdirected_total"), 2);
}

#[tokio::test]
async fn a_client_with_the_old_map_follows_one_redirect_to_the_owner() {
    let (a, a_app) = Kv::start().await;
    let (b, b_app) = Kv::start().await;
    let (a_in, b_in) = (free_addr(), free_addr());
    let grown = registry(2, 2, Some(1), &[a_in, b_in]);
    let _a = member(&grown, 0, a_in, a_app).await;
    let _b = member(&grown, 1, b_in, b_app).await;
    // The client still routes by one shard (shard 1 is listed but owns nothing yet).
    let stale = start(&registry(1, 1, None, &[a_in, b_in]), &[]).await;
    let k = moved_key(2);
    let key = [("x-shard-key", k.as_str())];
    let r = send(stale.outbound, "PUT", &url(&k), &key, "v1").await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!((a.get(&k), b.get(&k).as_deref()), (None, Some("v1")));
    let m = common::get(stale.admin, "http://x/metrics").await.body;
    assert_eq!(
        metric(&m, "shardmesh_redirects_total{outcome=\"retried\"}"),
        1
    );
    // A non-idempotent POST is redirected too: a 421 was never processed.
    let r = send(stale.outbound, "POST", &url(&k), &key, "v2").await;
    assert_eq!(r.status, 405, "reached the owner's app: {r:?}");
}

#[tokio::test]
async fn a_handoff_read_asks_the_next_replica_when_one_misses() {
    // The previous owner has two replicas and only one of them holds the key (applications
    // need not replicate); the read finds it whichever replica the key picks first.
    let (a1, a1_app) = Kv::start().await;
    let (a2, a2_app) = Kv::start().await;
    let (_b, b_app) = Kv::start().await;
    let (a1_in, a2_in, b_in) = (free_addr(), free_addr(), free_addr());
    let grown = registry_of(2, 2, Some(1), &[vec![a1_in, a2_in], vec![b_in]]);
    let _a1 = member(&grown, 0, a1_in, a1_app).await;
    let _a2 = member(&grown, 0, a2_in, a2_app).await;
    let _b = member(&grown, 1, b_in, b_app).await;
    let client = start(&grown, &[]).await;
    for n in 0..6 {
        let k = moved_key(10 + n);
        // Alternate which replica holds the value.
        if n % 2 == 0 {
            a1.put(&k, "there");
        } else {
            a2.put(&k, "there");
        }
        let key = [("x-shard-key", k.as_str())];
        let r = send(client.outbound, "GET", &url(&k), &key, Bytes::new()).await;
        assert_eq!((r.status, r.body.as_str()), (200, "there"), "{k}: {r:?}");
    }
}

#[tokio::test]
async fn a_handoff_delete_goes_to_the_previous_shards_leader_fenced() {
    // Shard 0 (the previous owner) has a follower and a leader at leader epoch 7; writes are
    // every non-safe method. The delete of a moved key must reach the leader, fenced.
    let (follower, f_app) = Kv::start().await;
    let (leader, l_app) = Kv::start().await;
    let (_b, b_app) = Kv::start().await;
    let (f_in, l_in, b_in) = (free_addr(), free_addr(), free_addr());
    let grown = format!(
        "destinations:\n  svc.test:80:\n    writes: methods\n    shardMap: {{epoch: 2, count: 2, \
         previous: {{count: 1, until: \"2030-01-01T00:00:00Z\"}}, shards: [\
         {{index: 0, members: [{{pod: f, address: \"{f_in}\"}}, {{pod: l, address: \"{l_in}\"}}], \
         leader: {{pod: l, address: \"{l_in}\", epoch: 7}}}}, \
         {{index: 1, members: [{{pod: b, address: \"{b_in}\"}}], leader: {{pod: b, address: \"{b_in}\", epoch: 3}}}}]}}\n"
    );
    let _f = member(&grown, 0, f_in, f_app).await;
    let _l = member(&grown, 0, l_in, l_app).await;
    let _b = member(&grown, 1, b_in, b_app).await;
    let client = start(&grown, &[]).await;
    for n in 0..4 {
        let k = moved_key(20 + n);
        leader.put(&k, "old");
        follower.put(&k, "old");
        let key = [("x-shard-key", k.as_str())];
        let r = send(client.outbound, "DELETE", &url(&k), &key, Bytes::new()).await;
        assert!(r.status == 204 || r.status == 404, "{r:?}");
        assert_eq!(
            leader.get(&k),
            None,
            "deleted on the previous owner's leader"
        );
        assert_eq!(leader.seen(&k, FENCING_EPOCH).as_deref(), Some("7"));
        assert_eq!(
            follower.get(&k).as_deref(),
            Some("old"),
            "never sent to a follower"
        );
    }
}

/// A peer that answers 421 from a newer map to everything.
async fn always_misdirected() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let addr = serve(move |_req| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Response::builder()
                .status(421)
                .header("x-shardmesh-error", "misdirected")
                .header(EPOCH, "99")
                .header(OWNER, "0")
                .body(Full::new(Bytes::from_static(b"not mine")))
                .expect("response")
        }
    })
    .await;
    (addr, hits)
}

#[tokio::test]
async fn a_redirect_is_followed_once_never_in_a_loop() {
    let (peer, hits) = always_misdirected().await;
    let client = start(&registry(1, 1, None, &[peer]), &[]).await;
    let key = [("x-shard-key", "anything")];
    let r = send(client.outbound, "GET", &url("anything"), &key, Bytes::new()).await;
    assert_eq!(r.status, 421, "the second 421 is returned: {r:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one send and one redirect");
    let m = common::get(client.admin, "http://x/metrics").await.body;
    assert_eq!(
        metric(&m, "shardmesh_redirects_total{outcome=\"retried\"}"),
        1
    );
    // A 421 is not an endpoint failure: the breaker stays closed.
    assert_eq!(
        metric(&m, "shardmesh_breaker_transitions_total{to=\"open\"}"),
        0
    );
}

#[tokio::test]
async fn own_destination_needs_a_shard_and_a_known_map() {
    let reg = temp_file(&registry(1, 1, None, &[free_addr()]));
    let path = reg.to_str().expect("path").to_string();
    let parse = |extra: &[&str]| {
        let mut argv = vec!["shardmesh-sidecar", "--registry", &path, "--app-port", "9"];
        argv.extend_from_slice(extra);
        let args = <Args as clap::Parser>::try_parse_from(&argv).expect("args");
        Settings::from_args(args)
    };
    let e = parse(&["--own-destination", "svc.test"]).unwrap_err();
    assert!(e.message.contains("--shard"), "{e}");
    let e = parse(&["--own-destination", "other:80", "--shard", "0"]).unwrap_err();
    assert!(e.message.contains("neither in the --registry"), "{e}");
    let ok = parse(&["--own-destination", "svc.test", "--shard", "0"]).expect("valid");
    assert_eq!(ok.own.map(|o| o.authority).as_deref(), Some("svc.test:80"));
}
