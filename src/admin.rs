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
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(client.addr = %peer, error = %e, "admin connection error") },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
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
