//! The HTTPS server the API server calls: hyper 1 (HTTP/1.1 and HTTP/2 by ALPN) over
//! tokio-rustls, with the certificate resolved per handshake from [`CertResolver`] so a rotated
//! certificate is served without a restart.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{tls::CertResolver, HandleError};

/// Largest AdmissionReview accepted. The API server caps objects at about 1.5 MiB; a review
/// carries the object (and the old one on update).
const MAX_BODY: usize = 4 * 1024 * 1024;
/// A client that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers admission requests: body bytes posted to a path → response bytes. Implemented by
/// [`super::Admission`]; a trait so tests can serve their own webhooks with the same server.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError>;
}

impl Handler for super::Admission {
    fn handle(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, HandleError> {
        super::Admission::handle(self, path, body)
    }
}

/// TLS configuration resolving the certificate on every handshake.
pub fn tls_config(resolver: Arc<CertResolver>) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves `admission` on `listener` until `shutdown` resolves.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: ServerConfig,
    admission: Arc<H>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. too many open files: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let admission = admission.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&*admission, req, peer).await) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn respond<H: Handler>(
    admission: &H,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz" | "/readyz") => {
            return reply(StatusCode::OK, "text/plain", "ok\n");
        }
        (&Method::POST, _) => {}
        _ => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST an AdmissionReview, or GET /healthz\n",
            )
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            warn!(%peer, error = %e, "cannot read the request body");
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!("request body unreadable or over {MAX_BODY} bytes: {e}\n"),
            );
        }
    };
    match admission.handle(&path, &body) {
        Ok(out) => reply(StatusCode::OK, "application/json", out),
        Err(HandleError::NotFound) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!(
                "no webhook at {path}; use {} or {}\n",
                super::MUTATE_PATH,
                super::VALIDATE_PATH
            ),
        ),
        Err(HandleError::BadRequest(msg)) => {
            warn!(%peer, %path, error = %msg, "malformed admission request");
            reply(StatusCode::BAD_REQUEST, "text/plain", format!("{msg}\n"))
        }
    }
}
