//! The benchmark's baseline: a bare hyper reverse proxy with nothing but forwarding — the same
//! runtime (tokio multi-thread, sized by the CPUs the process may run on), the same pooled
//! hyper-util client and HTTP/1+2 server as the sidecar, without any of its layers.
//!
//! `bare_forwarder LISTEN_ADDR UPSTREAM_ADDR`, e.g. `bare_forwarder 127.0.0.1:4150 127.0.0.1:8080`.

use std::{convert::Infallible, net::SocketAddr};

use http::{uri::PathAndQuery, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_forwarder LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR is ip:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR is ip:port");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(listen, upstream));
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(64)
        .build(connector);
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
                    *req.uri_mut() = Uri::try_from(format!("http://{upstream}{path}"))
                        .unwrap_or_else(|_| Uri::from_static("/"));
                    let resp: Response<Body> = match client.request(req).await {
                        Ok(r) => r.map(BodyExt::boxed_unsync),
                        Err(_) => {
                            let mut r = Response::new(
                                Empty::new().map_err(|never| match never {}).boxed_unsync(),
                            );
                            *r.status_mut() = StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
