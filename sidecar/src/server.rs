//! Accept loop shared by the inbound and outbound listeners: HTTP/1 and HTTP/2 per connection,
//! graceful connection shutdown when the drain reaches the listener's closing phase (inbound
//! closes before outbound, see [`crate::drain`]).

use std::{convert::Infallible, net::SocketAddr};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};
use tower::{util::BoxCloneService, ServiceExt};

use crate::{
    access_log::LoggedBody,
    body::{boxed, ProxyBody},
    drain::{ConnToken, Drain, Phase},
    errors::BoxFuture,
};

/// A proxy stack, type-erased so the accept loop is not generic.
pub type HttpService = BoxCloneService<Request<ProxyBody>, Response<LoggedBody>, Infallible>;

/// Serves `svc` on `listener` until the drain reaches `close_at`; then the listener is closed and
/// each connection finishes its in-flight requests before closing.
pub async fn serve(
    listener: TcpListener,
    svc: HttpService,
    drain: Drain,
    close_at: Phase,
    token: ConnToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = drain.reached(close_at) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            svc.clone(),
            drain.clone(),
            close_at,
            token.clone(),
        ));
    }
    drop(listener);
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    svc: HttpService,
    drain: Drain,
    close_at: Phase,
    _token: ConnToken,
) {
    // Boxing here keeps the tower future type out of this task's state, which the compiler
    // would otherwise have to prove `Send` for every lifetime of the boxed error type.
    let hyper_svc = hyper::service::service_fn(
        move |req: Request<Incoming>| -> BoxFuture<Result<Response<LoggedBody>, Infallible>> {
            Box::pin(svc.clone().oneshot(req.map(boxed)))
        },
    );
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), hyper_svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.reached(close_at) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
