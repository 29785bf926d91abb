//! L7 frontends: TLS termination, HTTP/1.1 and HTTP/2 served by hyper, every
//! request balanced on its own, responses streamed as they arrive, upgrades
//! (SPDY, WebSocket) tunnelled, and identity hygiene: client-sent X-Remote-*
//! headers are always removed; verified client certificates travel as
//! front-proxy headers on connections presenting the front-proxy certificate.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::h1guard::H1Guard;
use super::headers;
use super::upstream::{Identity, Sender, UpBody, Upstream};
use super::Env;
use crate::balancer::{ActiveGuard, Pool};
use crate::config::HttpFrontend;
use crate::metrics::{method_label, reject, FrontendMetrics};
use crate::tls::TlsError;

type RespBody = BoxBody<Bytes, hyper::Error>;

/// Reset streams a client may cause before its HTTP/2 connection is closed.
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_LOCAL_RESETS: usize = 1024;
/// HTTP/2 PINGs to clients: finds dead peers without cutting idle watches.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Where one request goes: the frontend's settings, its pool and the pool's
/// upstream connections. Reloads store a new one in the frontend's route
/// cell, so open client connections follow them request by request.
pub struct Route {
    pub settings: HttpFrontend,
    pub pool: Arc<Pool>,
    pub upstream: Arc<Upstream>,
}

/// The L7 side of a frontend, built by each reload (certificates re-read).
pub struct Service {
    pub name: Arc<str>,
    pub acceptor: TlsAcceptor,
    /// Shared across reloads by every connection of this frontend.
    pub route: Arc<ArcSwap<Route>>,
    pub metrics: FrontendMetrics,
    /// `apilb_http_active_streams{frontend}`.
    pub active_streams: IntGauge,
}

/// The TLS acceptor of an L7 frontend (h2 and http/1.1 by ALPN).
pub fn acceptor(settings: &HttpFrontend) -> Result<TlsAcceptor, TlsError> {
    let cfg = crate::tls::server_config_files(
        &settings.cert_file,
        &settings.key_file,
        settings.client_ca_file.as_deref(),
        &[b"h2", b"http/1.1"],
    )?;
    Ok(TlsAcceptor::from(cfg))
}

/// Held by a client connection and every tunnel it opened: the frontend's
/// connection slot (`max_connections`, active gauge) is released when the
/// last of them ends.
pub type Hold = Arc<dyn Send + Sync>;

/// Per-connection context shared by its requests.
struct Conn {
    env: Env,
    svc: Arc<Service>,
    peer: SocketAddr,
    id: Option<headers::ClientId>,
    hold: Hold,
}

/// Runs a hyper server connection; at shutdown asks it to finish (GOAWAY,
/// close when idle), and drops it when the grace is over.
macro_rules! drive {
    ($conn:expr, $env:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let finished = tokio::select! {
            r = conn.as_mut() => { log_end(r); true }
            _ = $env.shutdown.cancelled() => { conn.as_mut().graceful_shutdown(); false }
            _ = $env.hard_stop.cancelled() => true,
        };
        if !finished {
            tokio::select! {
                r = conn.as_mut() => log_end(r),
                _ = $env.hard_stop.cancelled() => {}
            }
        }
    }};
}

/// Serves one accepted client connection until it ends, shutdown drains it,
/// or the grace runs out.
pub async fn serve_conn(
    env: Env,
    svc: Arc<Service>,
    sock: TcpStream,
    peer: SocketAddr,
    hold: Hold,
) {
    let route = svc.route.load_full();
    let s = &route.settings;
    let tls = match tokio::time::timeout(s.header_timeout, svc.acceptor.accept(sock)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            svc.metrics.rejected(reject::TLS_HANDSHAKE);
            debug!(client.addr = %peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            svc.metrics.rejected(reject::TLS_HANDSHAKE);
            debug!(client.addr = %peer, "tls handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let id = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| headers::client_id(c.as_ref()));
    let h2 = session.alpn_protocol() == Some(b"h2");
    let conn = Arc::new(Conn {
        env: env.clone(),
        svc: svc.clone(),
        peer,
        id,
        hold,
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        // Boxed: hyper spawns a task per HTTP/2 stream, and moving this
        // large future by value was a fifth of L7 CPU time (memmove).
        async move { Ok::<_, Infallible>(Box::pin(proxy(conn, req)).await) }
    });
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(s.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .max_header_list_size(s.max_header_bytes as u32)
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
        drive!(b.serve_connection(TokioIo::new(tls), service), env);
    } else {
        let io = H1Guard::new(tls, s.max_header_bytes, svc.metrics.clone());
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(s.header_timeout)
            .max_header_size(s.max_header_bytes);
        drive!(
            b.serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
            env
        );
    }
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        debug!(error = %e, "client connection ended with an error");
    }
}

fn local(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    let mut body = msg.into();
    body.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Requests with no response deadline: watches, follows, exec/attach/port-forward, proxy.
pub fn is_long_running(uri: &Uri) -> bool {
    let q = uri.query().unwrap_or("");
    let flag = |k: &str| {
        q.split('&')
            .any(|kv| kv == format!("{k}=true") || kv == format!("{k}=1"))
    };
    let path = uri.path();
    flag("watch")
        || flag("follow")
        || path.contains("/watch/")
        || path
            .split('/')
            .any(|seg| matches!(seg, "exec" | "attach" | "portforward" | "proxy"))
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

/// The head of a request, kept to resend a body-less GET/HEAD on another backend.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

async fn proxy(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<RespBody> {
    // Each request reads the frontend's current route: a long-lived client
    // connection follows reloads (a removed server gets no new requests). A
    // frontend removed by a reload keeps serving its open connections as it was.
    let route = conn.svc.route.load_full();
    let rt = &*route;
    let started = Instant::now();
    let method = method_label(req.method());
    let upgrade = is_upgrade(&req);
    let long = upgrade || is_long_running(req.uri());

    // Identity hygiene comes before anything else looks at the request.
    let strip = &rt.settings.strip_headers;
    headers::strip_identity(req.headers_mut(), strip);
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);
    headers::set_forwarded_for(req.headers_mut(), conn.peer.ip(), rt.settings.forwarded_for);
    let identity = match &conn.id {
        Some(id) => {
            if let Err(why) = headers::insert_identity(req.headers_mut(), id) {
                return local(StatusCode::BAD_REQUEST, why);
            }
            if !rt.upstream.has_front_proxy() {
                warn!(frontend = %conn.svc.name, "a verified client certificate arrived but the pool has no front_proxy_cert_file");
                return local(
                    StatusCode::BAD_GATEWAY,
                    "front-proxy identity is not configured for this pool",
                );
            }
            Identity::FrontProxy
        }
        None => Identity::Plain,
    };
    // Authority for HTTP/2 upstreams and Host for HTTP/1.1 ones.
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let replay = (matches!(*req.method(), Method::GET | Method::HEAD)
        && req.body().is_end_stream())
    .then(|| Replay {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
    });
    let stream = GaugeGuard::new(conn.svc.active_streams.clone());

    let pool = &rt.pool;
    let cfg = &pool.config;
    let mut tried: Vec<usize> = Vec::with_capacity(cfg.connect_attempts as usize);
    let mut first = Some(req);
    let fault = headers::BodyFault::default();
    let mut last_error = String::from("no backend available");
    while tried.len() < cfg.connect_attempts as usize {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let b = &pool.backends[i];
        let guard = b.enter();
        let t0 = Instant::now();
        let sender = match rt.upstream.sender(i, b, identity, upgrade).await {
            Ok(s) => s,
            Err(e) => {
                last_error = e.to_string();
                debug!(backend.addr = %b.server.key, error = %last_error, "upstream connect failed; trying the next server");
                conn.env.upstream_failed(b, e.fault(), &last_error);
                continue;
            }
        };
        b.metrics
            .connect_duration
            .observe(t0.elapsed().as_secs_f64());
        let out = match first.take() {
            Some(r) => {
                r.map(|body| headers::StripTrailers::new(body, strip, fault.clone()).boxed())
            }
            None => match &replay {
                Some(rp) => {
                    let mut r = Request::new(
                        Empty::<Bytes>::new()
                            .map_err(|n: Infallible| match n {})
                            .boxed(),
                    );
                    *r.method_mut() = rp.method.clone();
                    *r.uri_mut() = rp.uri.clone();
                    *r.headers_mut() = rp.headers.clone();
                    r
                }
                None => break,
            },
        };
        let out = shape(out, &sender, authority.as_deref(), &b.server.key);
        let is_h2 = sender.is_h2();
        let send = send(&rt.upstream, i, identity, sender, out, upgrade);
        let result = if long {
            send.await
        } else {
            match tokio::time::timeout(rt.settings.request_timeout, send).await {
                Ok(r) => r,
                Err(_) => {
                    count(&conn, b, method, StatusCode::GATEWAY_TIMEOUT);
                    return local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the apiserver did not answer within request_timeout",
                    );
                }
            }
        };
        match result {
            Ok(mut resp) => {
                count(&conn, b, method, resp.status());
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_up) = client_upgrade {
                        let server_up = hyper::upgrade::on(&mut resp);
                        tunnel(&conn, client_up, server_up, guard);
                        let (parts, _) = resp.into_parts();
                        return Response::from_parts(
                            parts,
                            Empty::new().map_err(|n: Infallible| match n {}).boxed(),
                        );
                    }
                } else {
                    headers::strip_hop_by_hop(resp.headers_mut(), false);
                }
                let timer = (!long).then(|| {
                    (
                        started,
                        conn.env
                            .metrics
                            .http_duration
                            .with_label_values(&[&conn.svc.name, method]),
                    )
                });
                let closed = Box::pin(b.kill_token().cancelled_owned());
                return resp.map(|body| {
                    Tracked {
                        body,
                        closed,
                        _backend: guard,
                        _stream: stream,
                        timer,
                    }
                    .boxed()
                });
            }
            Err(e) => {
                if fault.is_set() {
                    // The client's body broke (h1guard counted it): not the backend's fault.
                    return local(StatusCode::BAD_REQUEST, "malformed request body");
                }
                last_error = format!("upstream request failed: {e}");
                debug!(backend.addr = %b.server.key, h2 = is_h2, error = %e, "upstream request failed");
                if replay.is_none() {
                    count(&conn, b, method, StatusCode::BAD_GATEWAY);
                    return local(StatusCode::BAD_GATEWAY, last_error);
                }
                // A body-less GET/HEAD failed before any response byte: the
                // next backend may answer it.
            }
        }
    }
    if tried.is_empty() {
        conn.svc.metrics.rejected(reject::ALL_DOWN);
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no apiserver is up (when_all_down: reject)",
        );
    }
    local(StatusCode::BAD_GATEWAY, last_error)
}

/// Sets version, URI form and Host for the upstream protocol.
fn shape(
    mut r: Request<UpBody>,
    sender: &Sender,
    authority: Option<&str>,
    fallback: &str,
) -> Request<UpBody> {
    let pq = r
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let auth = authority.unwrap_or(fallback);
    if sender.is_h2() {
        *r.version_mut() = Version::HTTP_2;
        // An HTTP/2 client's URI is already absolute; build one only for
        // HTTP/1.1 clients (origin-form).
        if r.uri().scheme().is_none() || r.uri().authority().is_none() {
            if let Ok(u) = format!("https://{auth}{pq}").parse() {
                *r.uri_mut() = u;
            }
        }
        r.headers_mut().remove(header::HOST);
    } else {
        *r.version_mut() = Version::HTTP_11;
        if let Ok(u) = pq.parse() {
            *r.uri_mut() = u;
        }
        if !r.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(auth) {
                r.headers_mut().insert(header::HOST, v);
            }
        }
    }
    r
}

async fn send(
    up: &Arc<Upstream>,
    i: usize,
    identity: Identity,
    sender: Sender,
    req: Request<UpBody>,
    upgrade: bool,
) -> Result<Response<Incoming>, hyper::Error> {
    match sender {
        Sender::H2(mut s) => s.send_request(req).await,
        Sender::H1(mut s) => {
            let r = s.send_request(req).await;
            if r.is_ok() && !upgrade {
                up.release(i, identity, s);
            }
            r
        }
    }
}

fn count(conn: &Conn, b: &crate::balancer::Backend, method: &str, status: StatusCode) {
    conn.env
        .metrics
        .http_requests
        .with_label_values(&[
            &*conn.svc.name,
            &*b.pool,
            b.server.key.as_str(),
            method,
            status.as_str(),
        ])
        .inc();
}

/// Joins the client's and the apiserver's upgraded connections and copies
/// bytes both ways (exec, attach, port-forward).
fn tunnel(
    conn: &Conn,
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    guard: ActiveGuard,
) {
    let hard_stop = conn.env.hard_stop.clone();
    let peer = conn.peer;
    // The tunnel keeps the client connection's frontend slot until it closes.
    let hold = conn.hold.clone();
    conn.env.tasks.spawn(async move {
        let _hold = hold;
        let (c, s) = match tokio::try_join!(client, server) {
            Ok(x) => x,
            Err(e) => {
                debug!(client.addr = %peer, error = %e, "upgrade failed");
                return;
            }
        };
        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
        let kill = guard.backend().kill_token();
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut c, &mut s) => {
                if let Err(e) = r { debug!(client.addr = %peer, error = %e, "upgraded stream ended"); }
            }
            _ = kill.cancelled() => {}
            _ = hard_stop.cancelled() => {}
        }
        drop(guard);
    });
}

/// Decrements a gauge when dropped.
struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(g: IntGauge) -> Self {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A response body that holds the backend's open-request count and the
/// frontend's active-stream gauge until the response ends, times it
/// (long-running requests are not timed), and ends early when the backend's
/// connections are closed (drain_timeout, close_after_down) so the client
/// re-issues its watch against a live server.
struct Tracked {
    body: Incoming,
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    _backend: ActiveGuard,
    _stream: GaugeGuard,
    timer: Option<(Instant, prometheus::Histogram)>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some((t, h)) = self.timer.take() {
            h.observe(t.elapsed().as_secs_f64());
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_running_requests_are_recognised() {
        for (u, want) in [
            ("/api/v1/namespaces?watch=true", true),
            ("/api/v1/pods?labelSelector=a&watch=1", true),
            ("/api/v1/watch/namespaces", true),
            ("/api/v1/namespaces/d/pods/p/log?follow=true", true),
            ("/api/v1/namespaces/d/pods/p/exec?command=sh", true),
            ("/api/v1/namespaces/d/pods/p/attach", true),
            ("/api/v1/namespaces/d/pods/p/portforward", true),
            ("/api/v1/namespaces/d/services/s/proxy/healthz", true),
            ("/api/v1/namespaces", false),
            ("/api/v1/namespaces?watch=false", false),
            ("/version", false),
        ] {
            assert_eq!(is_long_running(&u.parse().unwrap()), want, "{u}");
        }
    }
}
