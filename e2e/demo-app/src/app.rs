//! Request handling: an in-memory key-value store that accepts only the keys of its own shard.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::config::Config;

/// Largest accepted PUT body.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Largest number of keys held; a PUT of a new key beyond it gets 507.
pub const MAX_KEYS: usize = 100_000;
/// Largest accepted key (bytes, after percent-decoding).
pub const MAX_KEY_BYTES: usize = 1024;

pub const POD_HEADER: &str = "x-demo-pod";
pub const SHARD_HEADER: &str = "x-demo-shard";
/// Echo of the role the sidecar told this pod (when its service elects leaders).
pub const ROLE_HEADER: &str = "x-demo-role";
/// Echo of the leader epoch the sidecar told this pod.
pub const EPOCH_HEADER: &str = "x-demo-leader-epoch";

/// The fencing rule for writes when the sidecar reports a leader role: accept only on the
/// leader, and only when the caller's fencing epoch is the epoch this pod leads in. `None`:
/// accept.
pub fn fence(headers: &hyper::HeaderMap) -> Option<(StatusCode, String)> {
    use shardmesh_api::headers::{FENCING_EPOCH, LEADER_EPOCH, ROLE, ROLE_LEADER};
    let role = headers.get(ROLE)?;
    let num = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
    };
    let mine = num(LEADER_EPOCH);
    let shown = mine.map_or_else(|| "unknown".to_string(), |e| e.to_string());
    if role.as_bytes() != ROLE_LEADER.as_bytes() {
        return Some((
            StatusCode::CONFLICT,
            format!(
                "this pod is not the shard leader (leader epoch {shown}); writes go to the leader"
            ),
        ));
    }
    match num(FENCING_EPOCH) {
        None => Some((
            StatusCode::CONFLICT,
            format!("a write needs the {FENCING_EPOCH} header (set by the calling sidecar); this leader holds epoch {shown}"),
        )),
        Some(f) if Some(f) != mine => Some((
            StatusCode::CONFLICT,
            format!("stale fencing epoch {f}: this leader holds epoch {shown}; refresh the shard map and retry"),
        )),
        Some(_) => None,
    }
}

/// The server state shared by all connections.
#[derive(Debug)]
pub struct App {
    config: Config,
    pod_header: HeaderValue,
    shard_header: HeaderValue,
    max_keys: usize,
    store: Mutex<Store>,
}

/// The keys, and the settled shard count they were last purged for.
#[derive(Debug, Default)]
struct Store {
    keys: HashMap<String, Bytes>,
    purged_for: Option<u32>,
}

type Reply = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    let mut body: String = body.into();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Decodes `%XX` escapes of a path segment; `None` for a malformed escape or non-UTF-8 result.
pub fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What is wrong with the key of a `/kv/` request, if anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// This shard owns the key.
    Owned,
    /// Another shard owns the key (HTTP 421).
    Misdirected { owner: u32 },
}

impl App {
    pub fn new(config: Config) -> Self {
        Self::with_max_keys(config, MAX_KEYS)
    }

    /// As [`App::new`] with a different store cap (tests).
    pub fn with_max_keys(config: Config, max_keys: usize) -> Self {
        // Config validation guarantees a printable-ASCII pod name.
        let pod_header = HeaderValue::from_str(&config.pod)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-pod-name"));
        let shard_header = HeaderValue::from(config.shard);
        Self {
            config,
            pod_header,
            shard_header,
            max_keys,
            store: Mutex::new(Store::default()),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The shard count to judge a request's key by: what the sidecar says for this request
    /// (`x-shardmesh-shards`, its live shard map; the previous layout for a handoff read), else
    /// SHARDMESH_SHARDS (the count when this pod's shard was created: the initial view).
    pub fn shards_for(&self, headers: &hyper::HeaderMap) -> u32 {
        headers
            .get(shardmesh_api::headers::SHARDS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| (1..=crate::config::MAX_SHARDS).contains(n))
            .unwrap_or(self.config.shards)
    }

    /// The delete contract of resharding: once a change of the shard count has settled (a
    /// request says `shards` with no `x-shardmesh-previous-shards` and is no handoff), keys this
    /// shard no longer owns are stale here (their new owner has the truth, and a later change
    /// could route them back), so they are dropped. During the handoff window they are kept,
    /// to answer the new owner's handoff reads.
    fn purge_if_settled(&self, headers: &hyper::HeaderMap, shards: u32) {
        use shardmesh_api::headers::{HANDOFF, PREVIOUS_SHARDS, SHARDS};
        if !headers.contains_key(SHARDS)
            || headers.contains_key(PREVIOUS_SHARDS)
            || headers.contains_key(HANDOFF)
        {
            return;
        }
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if store.purged_for == Some(shards) {
            return;
        }
        let me = self.config.shard;
        store
            .keys
            .retain(|k, _| shardmesh_api::routing::shard_for_key(k.as_bytes(), shards) == me);
        store.purged_for = Some(shards);
    }

    /// Which shard owns `key` among `shards`, seen from this pod.
    pub fn check_key(&self, key: &str, shards: u32) -> KeyCheck {
        let owner = shardmesh_api::routing::shard_for_key(key.as_bytes(), shards);
        if owner == self.config.shard {
            KeyCheck::Owned
        } else {
            KeyCheck::Misdirected { owner }
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Handles one request; every response carries `x-demo-pod` and `x-demo-shard`.
    pub async fn handle<B>(&self, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let role = req.headers().get(shardmesh_api::headers::ROLE).cloned();
        let epoch = req
            .headers()
            .get(shardmesh_api::headers::LEADER_EPOCH)
            .cloned();
        let mut resp = self.route(req).await;
        let h = resp.headers_mut();
        if let Some(role) = role {
            h.insert(ROLE_HEADER, role);
        }
        if let Some(epoch) = epoch {
            h.insert(EPOCH_HEADER, epoch);
        }
        h.insert(POD_HEADER, self.pod_header.clone());
        h.insert(SHARD_HEADER, self.shard_header.clone());
        resp
    }

    async fn route<B>(&self, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/healthz" | "/readyz" => match *req.method() {
                Method::GET | Method::HEAD => text(StatusCode::OK, "ok"),
                _ => method_not_allowed("GET, HEAD"),
            },
            "/whoami" => match *req.method() {
                Method::GET => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "pod": self.config.pod,
                        "shard": self.config.shard,
                        "shards": self.shards_for(req.headers()),
                    }),
                ),
                _ => method_not_allowed("GET"),
            },
            _ => match path.strip_prefix("/kv/") {
                Some(segment) => self.kv(segment, req).await,
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no route {path}; use /kv/{{key}}, /whoami, /healthz or /readyz"),
                ),
            },
        }
    }

    async fn kv<B>(&self, segment: &str, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if segment.is_empty() || segment.contains('/') {
            return text(
                StatusCode::BAD_REQUEST,
                "the key is one non-empty path segment: /kv/{key} (escape '/' as %2F)",
            );
        }
        let Some(key) = percent_decode(segment) else {
            return text(
                StatusCode::BAD_REQUEST,
                "the key in the path has a malformed %-escape or is not UTF-8",
            );
        };
        if key.len() > MAX_KEY_BYTES {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "the key is {} bytes; at most {MAX_KEY_BYTES} are allowed",
                    key.len()
                ),
            );
        }
        let header = &self.config.key_header;
        if let Some(v) = req.headers().get(header) {
            if v.as_bytes() != key.as_bytes() {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the {header} header {:?} differs from the key in the path {key:?}; send the same key in both (or omit the header)",
                        String::from_utf8_lossy(v.as_bytes())
                    ),
                );
            }
        }
        let shards = self.shards_for(req.headers());
        self.purge_if_settled(req.headers(), shards);
        if let KeyCheck::Misdirected { owner } = self.check_key(&key, shards) {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "key {key:?} belongs to shard {owner} of {shards}; this is shard {} (pod {})",
                    self.config.shard, self.config.pod
                ),
            );
        }
        if matches!(*req.method(), Method::PUT | Method::DELETE) {
            if let Some((status, why)) = fence(req.headers()) {
                return text(status, why);
            }
        }
        match *req.method() {
            Method::GET | Method::HEAD => {
                let value = self
                    .store
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .keys
                    .get(&key)
                    .cloned();
                match value {
                    Some(v) => {
                        let mut r = Response::new(Full::new(v));
                        r.headers_mut().insert(
                            CONTENT_TYPE,
                            HeaderValue::from_static("application/octet-stream"),
                        );
                        r
                    }
                    None => text(StatusCode::NOT_FOUND, format!("key {key:?} not found")),
                }
            }
            Method::PUT => self.put(key, req).await,
            Method::DELETE => {
                let removed = self
                    .store
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .keys
                    .remove(&key);
                match removed {
                    Some(_) => {
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::NO_CONTENT;
                        r
                    }
                    None => text(StatusCode::NOT_FOUND, format!("key {key:?} not found")),
                }
            }
            _ => method_not_allowed("GET, HEAD, PUT, DELETE"),
        }
    }

    async fn put<B>(&self, key: String, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let too_large = || {
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the value is larger than {MAX_VALUE_BYTES} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_VALUE_BYTES as u64) {
            return too_large();
        }
        let value = match Limited::new(req.into_body(), MAX_VALUE_BYTES)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                )
            }
        };
        let mut guard = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        let store = &mut guard.keys;
        if !store.contains_key(&key) && store.len() >= self.max_keys {
            return text(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "the store is full ({} keys); delete keys first",
                    self.max_keys
                ),
            );
        }
        match store.insert(key, value) {
            None => text(StatusCode::CREATED, "created"),
            Some(_) => text(StatusCode::OK, "replaced"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn app(shard: u32, shards: u32) -> App {
        App::new(Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            shard,
            shards,
            pod: format!("demo-{shard}"),
            key_header: hyper::header::HeaderName::from_static("x-shard-key"),
            shutdown_delay: std::time::Duration::ZERO,
        })
    }

    fn req(method: Method, path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from_static(body)))
            .expect("request")
    }

    async fn body(r: Reply) -> String {
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    /// A key owned by `shard` among `shards` and one that is not.
    fn keys_for(shard: u32, shards: u32) -> (String, String) {
        let mut owned = None;
        let mut other = None;
        for i in 0..10_000 {
            let k = format!("key-{i}");
            let s = shardmesh_api::routing::shard_for_key(k.as_bytes(), shards);
            if s == shard && owned.is_none() {
                owned = Some(k);
            } else if s != shard && other.is_none() {
                other = Some(k);
            }
            if owned.is_some() && other.is_some() {
                break;
            }
        }
        (owned.expect("owned key"), other.expect("foreign key"))
    }

    #[test]
    fn writes_are_fenced_by_role_and_epoch() {
        use shardmesh_api::headers::{FENCING_EPOCH, LEADER_EPOCH, ROLE};
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = hyper::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        // No role header: the service does not elect leaders; accept.
        assert_eq!(fence(&h(&[])), None);
        let follower = fence(&h(&[
            (ROLE, "follower"),
            (LEADER_EPOCH, "4"),
            (FENCING_EPOCH, "4"),
        ]));
        assert!(follower
            .is_some_and(|(s, m)| s == StatusCode::CONFLICT && m.contains("not the shard leader")));
        let stale = fence(&h(&[
            (ROLE, "leader"),
            (LEADER_EPOCH, "5"),
            (FENCING_EPOCH, "4"),
        ]));
        assert!(stale.is_some_and(|(_, m)| m.contains("stale fencing epoch 4")));
        let unfenced = fence(&h(&[(ROLE, "leader"), (LEADER_EPOCH, "5")]));
        assert!(unfenced.is_some_and(|(_, m)| m.contains(FENCING_EPOCH)));
        assert_eq!(
            fence(&h(&[
                (ROLE, "leader"),
                (LEADER_EPOCH, "5"),
                (FENCING_EPOCH, "5")
            ])),
            None
        );
    }

    #[tokio::test]
    async fn a_follower_refuses_writes_but_serves_reads() {
        use shardmesh_api::headers::{LEADER_EPOCH, ROLE};
        let a = app(0, 1);
        let mut put = req(Method::PUT, "/kv/k", b"v");
        put.headers_mut()
            .insert(ROLE, HeaderValue::from_static("follower"));
        put.headers_mut()
            .insert(LEADER_EPOCH, HeaderValue::from_static("2"));
        let r = a.handle(put).await;
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(r.headers()[ROLE_HEADER], "follower");
        assert_eq!(r.headers()[EPOCH_HEADER], "2");
        assert!(a.is_empty(), "nothing written");
        let mut get = req(Method::GET, "/kv/k", b"");
        get.headers_mut()
            .insert(ROLE, HeaderValue::from_static("follower"));
        assert_eq!(a.handle(get).await.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn ownership_follows_shard_for_key() {
        let a = app(1, 3);
        for i in 0..300 {
            let k = format!("k{i}");
            let owner = shardmesh_api::routing::shard_for_key(k.as_bytes(), 3);
            let want = if owner == 1 {
                KeyCheck::Owned
            } else {
                KeyCheck::Misdirected { owner }
            };
            assert_eq!(a.check_key(&k, 3), want);
        }
        // One shard owns everything.
        assert_eq!(app(0, 1).check_key("anything", 1), KeyCheck::Owned);
    }

    #[tokio::test]
    async fn ownership_follows_the_shard_count_the_sidecar_sends() {
        use shardmesh_api::headers::{HANDOFF, PREVIOUS_SHARDS, SHARDS};
        // Started as shard 0 of 1 (SHARDMESH_SHARDS=1); the service then grows to 2.
        let a = app(0, 1);
        let moved = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| shardmesh_api::routing::shard_for_key(k.as_bytes(), 2) == 1)
            .expect("a key moves");
        let with = |method: Method, headers: &[(&'static str, &'static str)]| {
            let mut r = req(method, &format!("/kv/{moved}"), b"v");
            for (h, v) in headers {
                r.headers_mut().insert(*h, HeaderValue::from_static(v));
            }
            r
        };
        // Without sidecar headers: the initial view (1 shard), so the key is ours.
        assert_eq!(
            a.handle(with(Method::PUT, &[])).await.status(),
            StatusCode::CREATED
        );
        // In the window of 1 -> 2: the key is shard 1's now, but the value is kept here...
        let r = a
            .handle(with(Method::PUT, &[(SHARDS, "2"), (PREVIOUS_SHARDS, "1")]))
            .await;
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
        assert!(body(r).await.contains("belongs to shard 1 of 2"));
        // ...for shard 1's handoff reads, judged under the previous layout.
        let handoff = [(SHARDS, "1"), (PREVIOUS_SHARDS, "1"), (HANDOFF, "1")];
        assert_eq!(
            a.handle(with(Method::GET, &handoff)).await.status(),
            StatusCode::OK
        );
        // Settled at 2 (no previous layout): the key this shard no longer owns is dropped, so
        // if a later change routes it back here it is a miss, never a stale value.
        let r = a.handle(with(Method::GET, &[(SHARDS, "2")])).await;
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
        assert!(a.is_empty(), "settled at 2: shard 1's key is dropped");
        let r = a
            .handle(with(Method::GET, &[(SHARDS, "1"), (PREVIOUS_SHARDS, "2")]))
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        // Nonsense falls back to the initial view.
        let r = a.handle(with(Method::GET, &[(SHARDS, "0")])).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn put_get_delete_owned_key() {
        let a = app(0, 2);
        let (k, _) = keys_for(0, 2);
        let path = format!("/kv/{k}");
        let r = a.handle(req(Method::GET, &path, b"")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = a.handle(req(Method::PUT, &path, b"v1")).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = a.handle(req(Method::PUT, &path, b"v2")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = a.handle(req(Method::GET, &path, b"")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[POD_HEADER], "demo-0");
        assert_eq!(r.headers()[SHARD_HEADER], "0");
        assert_eq!(body(r).await, "v2");
        let r = a.handle(req(Method::DELETE, &path, b"")).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let r = a.handle(req(Method::DELETE, &path, b"")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(a.is_empty());
    }

    #[tokio::test]
    async fn foreign_key_is_misdirected() {
        let a = app(1, 4);
        let (_, k) = keys_for(1, 4);
        let owner = shardmesh_api::routing::shard_for_key(k.as_bytes(), 4);
        for m in [Method::GET, Method::PUT, Method::DELETE] {
            let r = a.handle(req(m, &format!("/kv/{k}"), b"x")).await;
            assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
            assert_eq!(r.headers()[SHARD_HEADER], "1");
            assert_eq!(
                body(r).await.trim_end(),
                format!("key \"{k}\" belongs to shard {owner} of 4; this is shard 1 (pod demo-1)")
            );
        }
        assert!(a.is_empty(), "a misdirected PUT must not store anything");
    }

    #[tokio::test]
    async fn shard_key_header_must_match_path() {
        let a = app(0, 1);
        let mut r = req(Method::GET, "/kv/alice", b"");
        r.headers_mut()
            .insert("x-shard-key", HeaderValue::from_static("bob"));
        let resp = a.handle(r).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(body(resp).await.contains("x-shard-key header \"bob\""));
        let mut r = req(Method::PUT, "/kv/alice", b"1");
        r.headers_mut()
            .insert("x-shard-key", HeaderValue::from_static("alice"));
        assert_eq!(a.handle(r).await.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn bad_paths_and_methods() {
        let a = app(0, 1);
        for p in ["/kv/", "/kv/a/b", "/kv/%zz"] {
            let r = a.handle(req(Method::GET, p, b"")).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{p}");
        }
        let long = format!("/kv/{}", "k".repeat(MAX_KEY_BYTES + 1));
        assert_eq!(
            a.handle(req(Method::GET, &long, b"")).await.status(),
            StatusCode::BAD_REQUEST
        );
        let r = a.handle(req(Method::POST, "/kv/a", b"")).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(r.headers().contains_key(ALLOW));
        let r = a.handle(req(Method::GET, "/nope", b"")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[POD_HEADER], "demo-0");
        // %2F lets a key contain '/'.
        let r = a.handle(req(Method::PUT, "/kv/a%2Fb", b"1")).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn oversized_value_is_413() {
        static BIG: [u8; MAX_VALUE_BYTES + 1] = [b'x'; MAX_VALUE_BYTES + 1];
        static FITS: [u8; MAX_VALUE_BYTES] = [b'x'; MAX_VALUE_BYTES];
        let a = app(0, 1);
        // No Content-Length: the limit applies while reading.
        let r = a.handle(req(Method::PUT, "/kv/big", &BIG)).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // A declared Content-Length over the cap is refused before reading.
        let mut r = req(Method::PUT, "/kv/big", b"");
        r.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(MAX_VALUE_BYTES + 1));
        assert_eq!(a.handle(r).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = a.handle(req(Method::PUT, "/kv/big", &FITS)).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn full_store_is_507() {
        let a = App::with_max_keys(
            Config {
                listen: "127.0.0.1:0".parse().expect("addr"),
                shard: 0,
                shards: 1,
                pod: "p".into(),
                key_header: hyper::header::HeaderName::from_static("x-shard-key"),
                shutdown_delay: std::time::Duration::ZERO,
            },
            2,
        );
        for k in ["a", "b"] {
            let r = a.handle(req(Method::PUT, &format!("/kv/{k}"), b"1")).await;
            assert_eq!(r.status(), StatusCode::CREATED);
        }
        let r = a.handle(req(Method::PUT, "/kv/c", b"1")).await;
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
        // Replacing an existing key still works when full.
        let r = a.handle(req(Method::PUT, "/kv/a", b"2")).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn whoami_and_health() {
        let a = app(2, 3);
        let r = a.handle(req(Method::GET, "/whoami", b"")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body(r).await).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"pod": "demo-2", "shard": 2, "shards": 3})
        );
        for p in ["/healthz", "/readyz"] {
            assert_eq!(
                a.handle(req(Method::GET, p, b"")).await.status(),
                StatusCode::OK
            );
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
