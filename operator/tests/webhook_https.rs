//! The webhook's HTTPS server end to end on loopback: a client trusting only the generated CA
//! gets an AdmissionReview answered, and a certificate swapped in the resolver is served by the
//! next connection without restarting the server (the hot reload rotation relies on). Clients
//! that hold connections open without using them neither stop admissions nor keep their
//! connections for long.

use std::{sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use serde_json::{json, Value};
use shardmesh_operator::webhook::{
    inject::InjectorConfig,
    server,
    tls::{issue_ca, issue_cert, Ca, CertResolver},
    Admission, MUTATE_PATH,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

const NAMES: [&str; 2] = ["shardmesh-webhook.shardmesh-system.svc", "127.0.0.1"];

fn connector(cas: &[&Ca]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("CA accepted");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

/// POSTs `body` over a fresh TLS connection; returns the status line, the response body and
/// the DER of the certificate the server presented.
async fn post(
    addr: std::net::SocketAddr,
    tls: &TlsConnector,
    path: &str,
    body: &[u8],
) -> std::io::Result<(String, Value, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(NAMES[0]).expect("server name");
    let mut s = tls.connect(name, tcp).await?;
    let peer = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (headers, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers.lines().next().unwrap_or_default().to_string();
    let json = serde_json::from_str(payload).unwrap_or(Value::Null);
    Ok((status, json, peer))
}

fn review() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "https-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "userInfo": {"username": "t"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "web", "labels": {"shardmesh.io/inject": "enabled"}},
                       "spec": {"containers": [{"name": "app", "image": "x:1"}]}},
            "dryRun": false
        }
    }))
    .expect("review")
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("cert PEM")
        .to_vec()
}

#[tokio::test]
async fn serves_admission_over_tls_and_reloads_the_certificate() {
    let now = Timestamp::now();
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let validity = Duration::from_secs(3600);
    let ca1 = issue_ca(now, validity).expect("CA 1");
    let cert1 = issue_cert(&ca1, &names, now, validity).expect("cert 1");
    let resolver = Arc::new(CertResolver::default());
    resolver
        .set(&cert1.cert_pem, &cert1.key_pem)
        .expect("cert 1 loads");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let admission = Arc::new(Admission {
        injector: InjectorConfig::example(),
        sidecar_injection: true,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server::serve(
        listener,
        server::tls_config(resolver.clone()).expect("tls config"),
        admission,
        async move {
            let _ = stopped.await;
        },
    ));

    let trust1 = connector(&[&ca1]);
    let (status, body, peer) = post(addr, &trust1, MUTATE_PATH, &review())
        .await
        .expect("request");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body["response"]["uid"], "https-1");
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["patchType"], "JSONPatch");
    assert_eq!(peer, der(&cert1.cert_pem));

    // Garbage is a 400, an unknown path a 404: the API server then applies failurePolicy.
    let (status, _, _) = post(addr, &trust1, MUTATE_PATH, b"{oops")
        .await
        .expect("request");
    assert!(status.contains("400"), "{status}");
    let (status, _, _) = post(addr, &trust1, "/nope", &review())
        .await
        .expect("request");
    assert!(status.contains("404"), "{status}");

    // Rotation to a certificate of a new CA: the next connection presents it. A client
    // trusting both CAs (the bundle during a CA rotation) accepts either.
    let ca2 = issue_ca(now, validity).expect("CA 2");
    let cert2 = issue_cert(&ca2, &names, now, validity).expect("cert 2");
    assert!(resolver
        .set(&cert2.cert_pem, &cert2.key_pem)
        .expect("cert 2 loads"));
    let both = connector(&[&ca1, &ca2]);
    let (status, _, peer) = post(addr, &both, MUTATE_PATH, &review())
        .await
        .expect("request");
    assert!(status.contains("200"), "{status}");
    assert_eq!(peer, der(&cert2.cert_pem));
    // A client trusting only the old CA now fails the handshake: the bundle must lead the
    // certificate, which is why CA rotation is two-phase.
    // (A fresh client: the first one would resume its TLS session without a certificate.)
    let fresh = connector(&[&ca1]);
    assert!(post(addr, &fresh, MUTATE_PATH, &review()).await.is_err());

    let _ = stop.send(());
    handle.await.expect("server stops");
}

/// A webhook server on 127.0.0.1 with a fresh CA, serving within `limits`.
struct Server {
    addr: std::net::SocketAddr,
    ca: Ca,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

async fn start(limits: server::Limits) -> Server {
    let now = Timestamp::now();
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let validity = Duration::from_secs(3600);
    let ca = issue_ca(now, validity).expect("CA");
    let cert = issue_cert(&ca, &names, now, validity).expect("cert");
    let resolver = Arc::new(CertResolver::default());
    resolver
        .set(&cert.cert_pem, &cert.key_pem)
        .expect("cert loads");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let admission = Arc::new(Admission {
        injector: InjectorConfig::example(),
        sidecar_injection: true,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server::serve_with(
        limits,
        listener,
        server::tls_config(resolver).expect("tls config"),
        admission,
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        ca,
        stop,
        handle,
    }
}

impl Server {
    async fn shut_down(self) {
        let _ = self.stop.send(());
        self.handle.await.expect("server stops");
    }
}

/// A TLS connection with the handshake done and nothing sent.
async fn idle_connection(addr: std::net::SocketAddr, tls: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(NAMES[0]).expect("server name");
    tls.connect(name, tcp).await.expect("handshake")
}

/// Whether the server closed `s` (end of stream or a broken one) within `wait`.
async fn closed_within(s: &mut TlsStream<TcpStream>, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// `n` admission requests, each on a fresh connection, each answered 200 within 5 s.
async fn fresh_requests_are_answered(addr: std::net::SocketAddr, tls: &TlsConnector, n: usize) {
    for i in 0..n {
        let started = std::time::Instant::now();
        let (status, body, _) = tokio::time::timeout(
            Duration::from_secs(5),
            post(addr, tls, MUTATE_PATH, &review()),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} not answered within 5 s"))
        .expect("request");
        assert!(status.contains("200"), "request {i}: {status}");
        assert_eq!(body["response"]["allowed"], true);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_stop_admissions() {
    let server = start(server::Limits::default()).await;
    let tls = connector(&[&server.ca]);
    let mut idle = Vec::new();
    for _ in 0..20 {
        let batch = (0..50).map(|_| idle_connection(server.addr, &tls));
        idle.extend(futures::future::join_all(batch).await);
    }
    assert_eq!(idle.len(), 1000);
    fresh_requests_are_answered(server.addr, &tls, 20).await;
    // They are below the cap and not idle for long yet: still open.
    let mut still_open = 0;
    for s in idle.iter_mut().take(10) {
        if !closed_within(s, Duration::from_millis(20)).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 10);
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_the_longest_idle_connections_make_room() {
    let cap = 64;
    let server = start(server::Limits {
        max_connections: cap,
        ..server::Limits::default()
    })
    .await;
    let tls = connector(&[&server.ca]);
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(idle_connection(server.addr, &tls).await);
    }
    fresh_requests_are_answered(server.addr, &tls, 20).await;
    let closed = futures::future::join_all(
        idle.iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(1))),
    )
    .await;
    let open: Vec<usize> = (0..closed.len()).filter(|i| !closed[*i]).collect();
    assert!(
        open.len() <= cap,
        "{} idle connections still open",
        open.len()
    );
    // The oldest went first: whatever is left is among the newest.
    assert!(open.iter().all(|i| *i >= 1000 - cap), "{open:?}");
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let server = start(server::Limits {
        idle_timeout: idle,
        ..server::Limits::default()
    })
    .await;
    let tls = connector(&[&server.ca]);

    // Silent from the handshake on.
    let mut silent = idle_connection(server.addr, &tls).await;
    let started = std::time::Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(200) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );

    // Silent after a request answered on a kept-alive connection.
    let mut kept = idle_connection(server.addr, &tls).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: webhook\r\n\r\n")
        .await
        .expect("request");
    let mut got = Vec::new();
    while !got.ends_with(b"ok\n") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let answered = std::time::Instant::now();
    assert!(closed_within(&mut kept, Duration::from_secs(5)).await);
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(200) && after < Duration::from_secs(3),
        "closed {after:?} after the answer"
    );
    server.shut_down().await;
}
