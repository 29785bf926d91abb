//! L7 frontends: TLS termination, HTTP/1.1 served by hyper and HTTP/2 by
//! `h2serve`, every request balanced on its own, responses streamed as they
//! arrive, upgrades (SPDY, WebSocket) tunnelled, and identity hygiene: client-sent X-Remote-*
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
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::coalesce::Coalesced;
use super::h1guard::H1Guard;
use super::h2body::PeerBody;
use super::h2serve;
use super::handles::{Handles, Labels};
use super::headers;
use super::upstream::{
    BoxError, ConnectError, Identity, Lease, SendError, Sender, UpBody, Upstream,
};
use super::Env;
use crate::balancer::{ActiveGuard, Pool};
use crate::config::HttpFrontend;
use crate::metrics::{method_label, reject, FrontendMetrics};
use crate::tls::TlsError;

type RespBody = BoxBody<Bytes, BoxError>;

/// Request body kept to send again when a backend refuses the request
/// unprocessed; larger bodies are streamed and not replayed.
pub const REPLAY_BODY_LIMIT: usize = 64 * 1024;
/// Refused-and-resent attempts per request at most (GOAWAY, REFUSED_STREAM).
const MAX_REFUSALS: usize = 5;
/// Where one request goes: the frontend's settings, its pool and the pool's
/// upstream connections. Reloads store a new one in the frontend's route
/// cell, so open client connections follow them request by request.
pub struct Route {
    pub settings: HttpFrontend,
    pub pool: Arc<Pool>,
    pub upstream: Arc<Upstream>,
    /// Metric handles of this route's requests, resolved on first use.
    handles: Handles,
}

impl Route {
    pub fn new(settings: HttpFrontend, pool: Arc<Pool>, upstream: Arc<Upstream>) -> Self {
        let handles = Handles::new(pool.backends.len());
        Route {
            settings,
            pool,
            upstream,
            handles,
        }
    }
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
    /// The peer's address as an X-Forwarded-For value.
    xff: HeaderValue,
    id: Option<headers::ClientId>,
    hold: Hold,
}

/// Runs a hyper HTTP/1.1 server connection; at shutdown asks it to finish
/// (close when idle), and drops it when the grace is over.
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
        xff: headers::forwarded_value(peer.ip()),
        id,
        hold,
    });
    if h2 {
        let limits = h2serve::Limits::from(s);
        // Requests read the route anew; the connection keeps none.
        drop(route);
        let io = Coalesced::new(tls);
        // Not boxed here: h2serve builds each stream's future in its box.
        h2serve::serve(io, limits, &env, |req| proxy(conn.clone(), req)).await;
    } else {
        let io = H1Guard::new(tls, s.max_header_bytes, svc.metrics.clone());
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(s.header_timeout)
            .max_header_size(s.max_header_bytes)
            .max_buf_size(h1_buf_size(s.max_header_bytes));
        drop(route);
        let service = service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            let req = req.map(PeerBody::H1);
            async move { Ok::<_, Infallible>(Box::pin(proxy(conn, req)).await) }
        });
        drive!(
            b.serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
            env
        );
    }
}

/// hyper's HTTP/1.1 read and write buffer: room for the largest request
/// head; it also bounds the response data buffered for a slow client.
pub fn h1_buf_size(max_header_bytes: usize) -> usize {
    (max_header_bytes + 16 * 1024).max(64 * 1024)
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        debug!(error = %e, "client connection ended with an error");
    }
}

/// An empty body. Zero-sized, so boxing it allocates nothing.
fn empty() -> BoxBody<Bytes, BoxError> {
    Empty::new()
        .map_err(|n: Infallible| -> BoxError { match n {} })
        .boxed()
}

fn local(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    let mut body = msg.into();
    body.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| -> BoxError { match n {} })
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
/// One pass over the query and one over the path's segments (this runs for
/// every request: two substring searches and two query walks cost ~500
/// instructions).
pub fn is_long_running(uri: &Uri) -> bool {
    let flagged = uri.query().is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.split_once('=')
                .is_some_and(|(k, v)| matches!(k, "watch" | "follow") && matches!(v, "true" | "1"))
        })
    });
    if flagged {
        return true;
    }
    let mut segs = uri.path().split('/').enumerate().peekable();
    while let Some((i, seg)) = segs.next() {
        match seg {
            "exec" | "attach" | "portforward" | "proxy" => return true,
            // `/watch/` inside the path: neither its first nor last segment.
            "watch" if i > 0 && segs.peek().is_some() => return true,
            _ => {}
        }
    }
    false
}

fn is_upgrade(req: &Request<PeerBody>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

async fn proxy(conn: Arc<Conn>, mut req: Request<PeerBody>) -> Response<RespBody> {
    // Each request reads the frontend's current route: a long-lived client
    // connection follows reloads (a removed server gets no new requests). A
    // frontend removed by a reload keeps serving its open connections as it was.
    let route = conn.svc.route.load_full();
    let rt = &*route;
    let started = Instant::now();
    let method = method_label(req.method());
    let upgrade = is_upgrade(&req);
    let long = upgrade || is_long_running(req.uri());
    let identity = match prepare(&conn, rt, &mut req, upgrade) {
        Ok(id) => id,
        Err((status, why)) => return local(status, why),
    };
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let fault = headers::BodyFault::default();
    let body = match read_body(rt, body, &fault).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req = Request::from_parts(parts, ());
    let stream = GaugeGuard::new(conn.svc.active_streams.clone());
    let ctx = Attempt {
        conn: &conn,
        route: rt,
        identity,
        upgrade,
        long,
        method,
        ready: match &body {
            // Nothing was read: the request is as ready as it arrived.
            ReqBody::Whole(b) if b.is_empty() => started,
            _ => Instant::now(),
        },
        fault,
    };
    let (mut resp, b, guard, lease) = match forward(&ctx, req, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_up) = client_upgrade {
            let server_up = hyper::upgrade::on(&mut resp);
            tunnel(&conn, client_up, server_up, guard, lease);
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, empty());
        }
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    let timer = (!long).then(|| {
        let h = rt
            .handles
            .duration(&conn.env.metrics, &conn.svc.name, method);
        (started, h)
    });
    let kill = b.kill_token();
    resp.map(|body| {
        Tracked {
            body,
            kill,
            closed: None,
            idle_limit: (!long).then_some(rt.settings.request_timeout),
            idle: None,
            moved: true,
            _lease: lease,
            _backend: guard,
            _stream: stream,
            timer,
        }
        .boxed()
    })
}

/// Identity hygiene, before anything else looks at the request: strips
/// client-sent identity and hop-by-hop headers, sets X-Forwarded-For, and
/// adds the verified client certificate's identity as front-proxy headers.
fn prepare(
    conn: &Conn,
    rt: &Route,
    req: &mut Request<PeerBody>,
    upgrade: bool,
) -> Result<Identity, (StatusCode, String)> {
    let h = req.headers_mut();
    headers::strip_identity(h, &rt.settings.strip_headers);
    headers::strip_hop_by_hop(h, upgrade);
    headers::set_forwarded_for(h, &conn.xff, rt.settings.forwarded_for);
    let Some(id) = &conn.id else {
        return Ok(Identity::Plain);
    };
    if let Err(why) = headers::insert_identity(h, id) {
        return Err((StatusCode::BAD_REQUEST, why.into()));
    }
    if !rt.upstream.has_front_proxy() {
        warn!(frontend = %conn.svc.name, "a verified client certificate arrived but the pool has no front_proxy_cert_file");
        let why = "front-proxy identity is not configured for this pool";
        return Err((StatusCode::BAD_GATEWAY, why.into()));
    }
    Ok(Identity::FrontProxy)
}

/// Reads the request body (trailers stripped like headers) up to
/// [`REPLAY_BODY_LIMIT`] within the frontend's `request_timeout`.
async fn read_body(
    rt: &Route,
    body: PeerBody,
    fault: &headers::BodyFault,
) -> Result<ReqBody, Response<RespBody>> {
    // Most requests (GETs, watches) have no body: nothing to read or time.
    if body.is_end_stream() {
        return Ok(ReqBody::Whole(Bytes::new()));
    }
    let body = headers::StripTrailers::new(body, &rt.settings.strip_headers, fault.clone());
    match tokio::time::timeout(rt.settings.request_timeout, buffer(body)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(local(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
        Err(_) => Err(local(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive within request_timeout",
        )),
    }
}

/// What every attempt of one request shares.
struct Attempt<'a> {
    conn: &'a Arc<Conn>,
    route: &'a Route,
    identity: Identity,
    upgrade: bool,
    long: bool,
    method: &'static str,
    /// When the request was ready to send (its arrival, or the end of the
    /// body read): the first attempt's connect time counts from here.
    ready: Instant,
    /// Set when the client's request body broke (h1guard counted it).
    fault: headers::BodyFault,
}

/// A request body read up to [`REPLAY_BODY_LIMIT`]: whole (and so
/// resendable), or a prefix followed by the rest of the stream.
enum ReqBody {
    Whole(Bytes),
    Streamed(Option<Prefixed>),
}

impl ReqBody {
    /// The body for the next attempt; `None` once a streamed body is spent.
    fn next(&mut self) -> Option<UpBody> {
        match self {
            // Most requests are body-less GETs: no allocation for them.
            ReqBody::Whole(b) if b.is_empty() => Some(empty()),
            ReqBody::Whole(b) => Some(
                Full::new(b.clone())
                    .map_err(|n: Infallible| match n {})
                    .boxed(),
            ),
            ReqBody::Streamed(p) => p.take().map(|p| p.boxed()),
        }
    }
}

async fn buffer<B>(mut body: B) -> Result<ReqBody, BoxError>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + Sync + 'static,
{
    let mut chunks: Vec<Frame<Bytes>> = Vec::new();
    let mut size = 0usize;
    while size <= REPLAY_BODY_LIMIT {
        match body.frame().await {
            None => {
                let mut all = bytes::BytesMut::with_capacity(size);
                for c in chunks.iter().filter_map(|f| f.data_ref()) {
                    all.extend_from_slice(c);
                }
                return Ok(ReqBody::Whole(all.freeze()));
            }
            Some(f) => {
                let f = f?;
                let trailers = f.is_trailers();
                size += f.data_ref().map_or(0, |d| d.len());
                chunks.push(f);
                // Trailers: rare in kube; stream such a body as it is.
                if trailers {
                    break;
                }
            }
        }
    }
    Ok(ReqBody::Streamed(Some(Prefixed {
        prefix: chunks.into(),
        rest: body.boxed(),
    })))
}

/// The first frames of a body, already read, then the rest as it comes.
struct Prefixed {
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    rest: UpBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

type Forwarded = (
    Response<PeerBody>,
    Arc<crate::balancer::Backend>,
    ActiveGuard,
    Lease,
);

/// Sends the request to a backend: fails over on connect errors, resends
/// refused requests (every method: they were not processed) and body-less
/// GET/HEAD that failed before any response byte.
async fn forward(
    a: &Attempt<'_>,
    head: Request<()>,
    mut body: ReqBody,
) -> Result<Forwarded, Response<RespBody>> {
    let rt = a.route;
    let pool = &rt.pool;
    let cfg = &pool.config;
    let resend_on_failure = matches!(*head.method(), Method::GET | Method::HEAD)
        && matches!(&body, ReqBody::Whole(b) if b.is_empty());
    // Allocated only when an attempt fails.
    let mut tried: Vec<usize> = Vec::new();
    let mut refusals = 0;
    let mut last_error = String::new();
    // A body the last attempt gave back unsent.
    let mut spare: Option<UpBody> = None;
    while tried.len() < cfg.connect_attempts as usize && refusals <= MAX_REFUSALS {
        let Some(i) = pool.pick(&tried) else { break };
        let b = &pool.backends[i];
        let guard = b.enter();
        let t0 = if tried.is_empty() && refusals == 0 {
            a.ready
        } else {
            Instant::now()
        };
        let (mut sender, lease) = match rt.upstream.sender(i, b, a.identity, a.upgrade).await {
            Ok(s) => s,
            Err(e) if e.is_busy() => {
                count(a, i, StatusCode::SERVICE_UNAVAILABLE);
                return Err(local(StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
            }
            Err(e) => {
                tried.push(i);
                connect_failed(a, b, &e, &mut last_error);
                continue;
            }
        };
        let sent_at = Instant::now();
        b.metrics
            .connect_duration
            .observe((sent_at - t0).as_secs_f64());
        let Some(bd) = spare.take().or_else(|| body.next()) else {
            break;
        };
        let out = rebuild(&head, bd);
        let Some(out) = shape(out, &sender, &b.server.key) else {
            return Err(local(
                StatusCode::BAD_REQUEST,
                "the Host header is not a valid authority",
            ));
        };
        match send(a, i, &mut sender, out, sent_at).await? {
            Ok(resp) => {
                if let Sender::H1(h1) = sender {
                    if !a.upgrade {
                        rt.upstream.release(i, a.identity, h1);
                    }
                }
                count(a, i, resp.status());
                return Ok((resp, b.clone(), guard, lease));
            }
            Err(SendError::Refused(back, e)) => {
                refusals += 1;
                b.metrics.refused_retried.inc();
                last_error = format!("upstream refused the request: {e}");
                debug!(backend.addr = %b.server.key, error = %e, "request refused unprocessed; sending it again");
                spare = back;
            }
            Err(SendError::Failed(_)) if a.fault.is_set() => {
                return Err(local(StatusCode::BAD_REQUEST, "malformed request body"));
            }
            Err(SendError::Failed(e)) => {
                last_error = format!("upstream request failed: {e}");
                debug!(backend.addr = %b.server.key, error = %e, "upstream request failed");
                if !resend_on_failure {
                    count(a, i, StatusCode::BAD_GATEWAY);
                    return Err(local(StatusCode::BAD_GATEWAY, last_error));
                }
                tried.push(i);
            }
        }
    }
    if tried.is_empty() && refusals == 0 {
        a.conn.svc.metrics.rejected(reject::ALL_DOWN);
        return Err(local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no apiserver is up (when_all_down: reject)",
        ));
    }
    if last_error.is_empty() {
        last_error.push_str("no backend available");
    }
    Err(local(StatusCode::BAD_GATEWAY, last_error))
}

/// Sends one attempt; a request that is not long-running gets its response
/// head within `request_timeout` of `now` or a 504.
async fn send(
    a: &Attempt<'_>,
    i: usize,
    sender: &mut Sender,
    out: Request<UpBody>,
    now: Instant,
) -> Result<Result<Response<PeerBody>, SendError>, Response<RespBody>> {
    let send = Upstream::send(sender, out);
    if a.long {
        return Ok(send.await);
    }
    // A timeout too large for the clock is no deadline.
    let Some(deadline) = now.checked_add(a.route.settings.request_timeout) else {
        return Ok(send.await);
    };
    match tokio::time::timeout_at(deadline, send).await {
        Ok(r) => Ok(r),
        Err(_) => {
            count(a, i, StatusCode::GATEWAY_TIMEOUT);
            Err(local(
                StatusCode::GATEWAY_TIMEOUT,
                "the apiserver did not answer within request_timeout",
            ))
        }
    }
}

fn connect_failed(
    a: &Attempt<'_>,
    b: &crate::balancer::Backend,
    e: &ConnectError,
    last: &mut String,
) {
    *last = e.to_string();
    debug!(backend.addr = %b.server.key, error = %last, "upstream connect failed; trying the next server");
    a.conn.env.upstream_failed(b, e.fault(), last);
}

fn rebuild(head: &Request<()>, body: UpBody) -> Request<UpBody> {
    let mut r = Request::new(body);
    *r.method_mut() = head.method().clone();
    *r.uri_mut() = head.uri().clone();
    *r.version_mut() = head.version();
    *r.headers_mut() = head.headers().clone();
    r
}

/// Sets version, URI form and Host for the upstream protocol. The authority
/// is the client's (URI, else Host), else the server's address. An HTTP/2
/// client's request to an HTTP/2 upstream passes unchanged (no allocation).
/// `None`: the client's Host makes no URI (HTTP/2 needs one).
fn shape(mut r: Request<UpBody>, sender: &Sender, fallback: &str) -> Option<Request<UpBody>> {
    if sender.is_h2() {
        *r.version_mut() = Version::HTTP_2;
        // An HTTP/2 client's URI is already absolute; build one only for
        // HTTP/1.1 clients (origin-form).
        if r.uri().scheme().is_none() || r.uri().authority().is_none() {
            let auth = match r.uri().authority() {
                Some(a) => a.as_str(),
                None => r
                    .headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(fallback),
            };
            let pq = r.uri().path_and_query().map_or("/", |p| p.as_str());
            *r.uri_mut() = format!("https://{auth}{pq}").parse().ok()?;
        }
        r.headers_mut().remove(header::HOST);
    } else {
        *r.version_mut() = Version::HTTP_11;
        if !r.headers().contains_key(header::HOST) {
            let auth = r.uri().authority().map_or(fallback, |a| a.as_str());
            if let Ok(v) = HeaderValue::from_str(auth) {
                r.headers_mut().insert(header::HOST, v);
            }
        }
        if r.uri().scheme().is_some() || r.uri().authority().is_some() {
            let pq = r.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Ok(u) = pq.parse() {
                *r.uri_mut() = u;
            }
        }
    }
    Some(r)
}

/// Counts a request answered for backend `i` (by it, or by apilb on its behalf).
fn count(a: &Attempt<'_>, i: usize, status: StatusCode) {
    let b = &a.route.pool.backends[i];
    let labels = Labels {
        frontend: &a.conn.svc.name,
        pool: &b.pool,
        server: &b.server.key,
        method: a.method,
        status,
    };
    a.route.handles.count(&a.conn.env.metrics, i, &labels);
}

/// Joins the client's and the apiserver's upgraded connections and copies
/// bytes both ways (exec, attach, port-forward).
fn tunnel(
    conn: &Conn,
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    guard: ActiveGuard,
    lease: Lease,
) {
    let hard_stop = conn.env.hard_stop.clone();
    let peer = conn.peer;
    // The tunnel keeps the client connection's frontend slot until it closes.
    let hold = conn.hold.clone();
    let tunnels = GaugeGuard::new(conn.env.metrics.http_tunnels(&conn.svc.name));
    conn.env.tasks.spawn(async move {
        let _hold = hold;
        let _tunnels = tunnels;
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
        drop(lease);
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

/// A response body that holds the backend's open-request count, the
/// upstream stream's place and the frontend's active-stream gauge until the
/// response ends, and times it (long-running requests are not timed). It
/// ends with an error, never a clean end, when apilb cuts it: the backend's
/// connections are closed (drain_timeout, close_after_down, removal), or a
/// non-long-running response brings no data for request_timeout. The client
/// sees RST_STREAM (HTTP/2) or a close without the last chunk (HTTP/1.1).
struct Tracked {
    body: PeerBody,
    kill: tokio_util::sync::CancellationToken,
    /// Registered with `kill` only once the body has to wait: a response
    /// that is already there costs no waiter (a lock and an allocation).
    closed: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    idle_limit: Option<Duration>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the idle timer was last armed.
    moved: bool,
    _lease: Lease,
    _backend: ActiveGuard,
    _stream: GaugeGuard,
    timer: Option<(Instant, prometheus::Histogram)>,
}

/// Why apilb cut a response.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the backend's connections were closed; the response is incomplete")]
    BackendClosed,
    #[error("the apiserver sent nothing for {0:?} (request_timeout)")]
    Stalled(Duration),
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
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.kill.is_cancelled() {
            return Poll::Ready(Some(Err(Cut::BackendClosed.into())));
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(f) => {
                self.moved = true;
                Poll::Ready(f)
            }
            Poll::Pending => {
                let this = &mut *self;
                let kill = &this.kill;
                let closed = this
                    .closed
                    .get_or_insert_with(|| Box::pin(kill.clone().cancelled_owned()));
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Cut::BackendClosed.into())));
                }
                self.poll_idle(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Tracked {
    /// The backend sent nothing: arm (or check) the request_timeout timer.
    /// Only time spent waiting for the backend counts; a client that reads
    /// slowly is not polled and so never trips it.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(limit) = self.idle_limit else {
            return Poll::Pending;
        };
        let Some(deadline) = Instant::now().checked_add(limit) else {
            return Poll::Pending;
        };
        let moved = std::mem::take(&mut self.moved);
        let t = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if moved {
            t.as_mut().reset(deadline);
        }
        match t.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Cut::Stalled(limit).into()))),
            Poll::Pending => Poll::Pending,
        }
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
            ("/api/v1/namespaces?watch", false),
            ("/api/v1/namespaces?watchx=true&follow=0", false),
            ("/api/v1/namespaces/d/pods/watch", false),
            ("/api/v1/namespaces/d/pods/watch/log", true),
            ("/version", false),
        ] {
            assert_eq!(is_long_running(&u.parse().unwrap()), want, "{u}");
        }
    }
}
