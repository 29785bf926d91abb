//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/status`. It never proxies.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::Mode;
use crate::snapshot::Shared;

/// An admin client that sends no request line within this is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an open admin connection is still served once the server stops
/// (handed over, or the process drained); then it closes after any request
/// in progress.
const STOP_GRACE: Duration = Duration::from_secs(1);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        tokio::spawn(connection(sock, peer, shared.clone(), stop.clone()));
    }
}

/// Serves one admin client until it leaves or `stop` fires. A request
/// already sent when it fires (a scrape as a re-exec hands the socket over)
/// is answered first: closing a connection with its bytes unread would reset
/// it. Then the connection closes after any request in progress.
async fn connection(
    sock: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => tokio::select! {
            r = conn.as_mut() => r,
            _ = tokio::time::sleep(STOP_GRACE) => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        },
    };
    if let Err(e) = r {
        debug!(client.addr = %peer, error = %e, "admin connection error");
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        content_type.parse().expect("static content type"),
    );
    r
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let path = req.uri().path();
    // Absolute-form (`GET http://x/readyz`) is for proxies; apilb's admin is none.
    let origin_form = req.uri().authority().is_none();
    let known = origin_form && matches!(path, "/metrics" | "/healthz" | "/readyz" | "/status");
    if !known {
        return reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: admin paths are /metrics /healthz /readyz /status\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, "GET, HEAD".parse().expect("static"));
        return r;
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match not_ready(shared) {
            None => reply(StatusCode::OK, TEXT, "ok\n"),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, why),
        },
        _ => reply(
            StatusCode::OK,
            "application/json",
            status(shared).to_string(),
        ),
    }
}

/// Why apilb should not receive traffic, or `None` when it should.
fn not_ready(shared: &Shared) -> Option<String> {
    if shared.is_draining() {
        return Some("not ready: shutting down\n".into());
    }
    let snap = shared.snapshot.load();
    let mut why = String::new();
    if snap.frontends.is_empty() {
        why.push_str("not ready: no frontend is listening\n");
    }
    let mut names: Vec<_> = snap.pools.keys().collect();
    names.sort();
    for name in names {
        if snap.pools[name].up_count() == 0 {
            why.push_str(&format!("not ready: pool {name} has no up backend\n"));
        }
    }
    (!why.is_empty()).then_some(why)
}

/// The `/status` document.
pub fn status(shared: &Shared) -> serde_json::Value {
    let snap = shared.snapshot.load();
    let mut frontends: Vec<_> = snap
        .frontends
        .values()
        .map(|f| {
            json!({
                "name": &*f.name,
                "listen": f.config.listen.to_string(),
                "bound": f.bound.to_string(),
                "mode": match f.config.mode { Mode::Tcp => "tcp", Mode::Http => "http" },
                "pool": f.config.pool,
                "active_connections": f.stats.active.load(Relaxed),
                "max_connections": f.config.max_connections,
            })
        })
        .collect();
    frontends.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let mut pools: Vec<_> = snap
        .pools
        .values()
        .map(|p| {
            let backends: Vec<_> = p
                .backends
                .iter()
                .map(|b| {
                    let probe = snap.monitor(b).and_then(|m| m.last_probe());
                    json!({
                        "server": b.server.key,
                        "source": p.config.members.as_str(),
                        "addr": b.server.addr.to_string(),
                        "state": if b.is_healthy() { "up" } else { "down" },
                        "since": b.since(),
                        "active_connections": b.active(),
                        "last_probe": probe,
                    })
                })
                .collect();
            json!({
                "name": &*p.name,
                "balance": p.config.balance.to_string(),
                "check": p.config.health.check.to_string(),
                "when_all_down": match p.config.when_all_down {
                    crate::config::AllDownPolicy::TryAll => "try-all",
                    crate::config::AllDownPolicy::Reject => "reject",
                },
                "up_backends": p.up_count(),
                "all_down": p.state.all_down.load(Relaxed),
                "backends": backends,
            })
        })
        .collect();
    pools.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "process": {
            "pid": std::process::id(),
            "generation": shared.metrics.generation.get(),
            "started_at": shared.metrics.started.get(),
        },
        "draining": shared.is_draining(),
        "config": {
            "source": snap.config.source.as_ref().map(|p| p.display().to_string()),
            "last_reload_successful": shared.metrics.last_reload_ok.get() == 1,
        },
        "frontends": frontends,
        "pools": pools,
        "vip": shared.vip.load().as_ref().map(|v| v.borrow().to_json()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The re-exec hand-over: the old server has accepted a connection whose
    /// request it has not read yet when it stops. It answers that request
    /// (50 rounds; closing at once reset about half of them).
    #[tokio::test]
    async fn a_request_unread_when_the_server_stops_is_answered() {
        let shared = Arc::new(Shared::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for round in 0..50 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let (sock, peer) = listener.accept().await.unwrap();
            let stop = CancellationToken::new();
            stop.cancel();
            tokio::spawn(connection(sock, peer, shared.clone(), stop));
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("round {round}: no answer in 5 s"))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(got.starts_with(b"HTTP/1.1 200"), "round {round}: {got:?}");
            assert!(got.ends_with(b"ok\n"), "round {round}: {got:?}");
        }
    }
}
