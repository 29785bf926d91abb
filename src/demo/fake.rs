//! A fake kube-apiserver: TLS, HTTP/1.1 and HTTP/2, `/readyz` `/livez`
//! `/healthz` `/version`, a chunked watch stream, and failure modes (readyz
//! status, hang, kill) that the demo and the tests switch at run time.
//!
//! Like kube-apiserver (Go's HTTP/2 server) it can advertise a stream limit,
//! and it answers a stream beyond that limit with RST_STREAM PROTOCOL_ERROR
//! (not a lenient REFUSED_STREAM), so a client that overruns the limit sees
//! failures. It counts peak streams per connection, can send GOAWAY after a
//! random share of responses, records every non-GET request it executed, and
//! serves large responses for slow-reader tests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fake_endpoints::EndpointStore;
use super::h2strict::GoStrict;
use crate::tls::{self, TlsError};

/// What the fake reports from `/version` (`kubectl version` reads it).
pub const FAKE_GIT_VERSION: &str = "v1.31.0-apilb-fake";

/// How to start a fake.
#[derive(Clone)]
pub struct FakeOptions {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Verify client certificates against this CA.
    pub client_ca_pem: Option<String>,
    /// With `client_ca_pem`: require a certificate (else one is optional).
    pub require_client_cert: bool,
    /// Time between watch events.
    pub watch_interval: Duration,
    /// Events before a watch ends; `None` streams until the client leaves.
    pub watch_events: Option<usize>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS to advertise and enforce; `None`
    /// keeps hyper's permissive default (200). kube-apiserver uses 100.
    pub max_concurrent_streams: Option<u32>,
    /// Percent of responses after which the connection sends GOAWAY
    /// (kube-apiserver's `--goaway-chance`, as a percentage).
    pub goaway_percent: u32,
}

impl FakeOptions {
    /// Options with the defaults the old tests rely on (no stream limit
    /// beyond hyper's, no GOAWAY, 100 ms between watch events).
    pub fn new(name: &str, cert_pem: &str, key_pem: &str) -> Self {
        FakeOptions {
            name: name.to_string(),
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            client_ca_pem: None,
            require_client_cert: false,
            watch_interval: Duration::from_millis(100),
            watch_events: None,
            max_concurrent_streams: None,
            goaway_percent: 0,
        }
    }
}

/// kube-apiserver's HTTP/2 stream window and largest frame (256 KiB each);
/// its connection window is the stream window times the stream limit.
pub const KUBE_STREAM_WINDOW: u32 = 256 * 1024;
pub const KUBE_MAX_FRAME: u32 = 256 * 1024;
/// Request header carrying an id the fake records for non-GET requests.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Run-time state a test can read and switch.
pub struct FakeState {
    pub name: String,
    ready: AtomicU16,
    hang: AtomicBool,
    /// TCP connections accepted.
    connections: AtomicUsize,
    /// HTTP requests served.
    requests: AtomicUsize,
    last_client_cn: Mutex<Option<String>>,
    /// EndpointSlices this fake serves (`serve_endpoints`).
    endpoints: OnceLock<Arc<EndpointStore>>,
    /// Most streams open at once on any one connection.
    peak_streams: AtomicUsize,
    /// Streams the server refused for exceeding its advertised limit.
    pub(super) over_limit: AtomicUsize,
    /// GOAWAY frames started (graceful shutdowns of a connection).
    goaways: AtomicUsize,
    goaway_percent: AtomicU32,
    /// Non-GET requests executed, keyed by "METHOD path request-id".
    executed: Mutex<HashMap<String, usize>>,
}

/// A running fake apiserver; `kill` (or drop) stops it and cuts its connections.
pub struct FakeApiserver {
    addr: SocketAddr,
    state: Arc<FakeState>,
    stop: CancellationToken,
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("fake apiserver: {0}")]
    Io(#[from] std::io::Error),
    #[error("fake apiserver TLS: {0}")]
    Tls(#[from] TlsError),
}

impl FakeApiserver {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start(opts: FakeOptions) -> Result<Self, FakeError> {
        Self::start_on(opts, ([127, 0, 0, 1], 0).into()).await
    }

    /// Starts on a given address (used to bring a killed fake back on its port).
    pub async fn start_on(opts: FakeOptions, addr: SocketAddr) -> Result<Self, FakeError> {
        let auth = match (&opts.client_ca_pem, opts.require_client_cert) {
            (Some(ca), true) => tls::ClientAuth::Required(ca.as_bytes()),
            (Some(ca), false) => tls::ClientAuth::Optional(ca.as_bytes()),
            (None, _) => tls::ClientAuth::None,
        };
        let tls_cfg = tls::server_config(
            opts.cert_pem.as_bytes(),
            opts.key_pem.as_bytes(),
            auth,
            &[b"h2", b"http/1.1"],
        )?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState {
            name: opts.name.clone(),
            ready: AtomicU16::new(200),
            hang: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            last_client_cn: Mutex::new(None),
            endpoints: OnceLock::new(),
            peak_streams: AtomicUsize::new(0),
            over_limit: AtomicUsize::new(0),
            goaways: AtomicUsize::new(0),
            goaway_percent: AtomicU32::new(opts.goaway_percent),
            executed: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            tokio_rustls::TlsAcceptor::from(tls_cfg),
            Arc::new(opts),
            state.clone(),
            stop.clone(),
        ));
        Ok(FakeApiserver { addr, state, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The status `/readyz` answers with (200 ready, 500 shutting down).
    pub fn set_ready(&self, status: u16) {
        self.state.ready.store(status, Relaxed);
    }

    /// Hang mode: accept connections and never answer.
    pub fn set_hang(&self, hang: bool) {
        self.state.hang.store(hang, Relaxed);
    }

    /// TCP connections accepted so far (every mode counts).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Relaxed)
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Relaxed)
    }

    /// The CN of the last verified client certificate.
    pub fn last_client_cn(&self) -> Option<String> {
        self.state
            .last_client_cn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves the EndpointSlices of `store` (list, watch) to clients with a
    /// verified certificate; every fake of a cluster shares one store.
    pub fn serve_endpoints(&self, store: Arc<EndpointStore>) {
        let _ = self.state.endpoints.set(store);
    }

    /// The most HTTP/2 streams (or HTTP/1.1 requests) open at once on one connection.
    pub fn peak_streams(&self) -> usize {
        self.state.peak_streams.load(Relaxed)
    }

    /// Streams refused (answered with PROTOCOL_ERROR) for exceeding the
    /// advertised SETTINGS_MAX_CONCURRENT_STREAMS.
    pub fn streams_over_limit(&self) -> usize {
        self.state.over_limit.load(Relaxed)
    }

    /// Connections this fake has sent GOAWAY on.
    pub fn goaways(&self) -> usize {
        self.state.goaways.load(Relaxed)
    }

    /// Changes the GOAWAY chance at run time.
    pub fn set_goaway_percent(&self, p: u32) {
        self.state.goaway_percent.store(p, Relaxed);
    }

    /// Non-GET requests executed, keyed by "METHOD path request-id", with
    /// how often each was executed.
    pub fn executed(&self) -> HashMap<String, usize> {
        self.state
            .executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops listening and cuts every open connection (a crashed apiserver).
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    opts: Arc<FakeOptions>,
    state: Arc<FakeState>,
    stop: CancellationToken,
) {
    loop {
        let sock = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        state.connections.fetch_add(1, Relaxed);
        let (acceptor, opts, state, stop) =
            (acceptor.clone(), opts.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            if state.hang.load(Relaxed) {
                // Hold the socket open and say nothing until killed.
                stop.cancelled().await;
                drop(sock);
                return;
            }
            let tls = tokio::select! {
                _ = stop.cancelled() => return,
                r = acceptor.accept(sock) => match r { Ok(t) => t, Err(_) => return },
            };
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| subject_cn(c.as_ref()));
            if cn.is_some() {
                *state
                    .last_client_cn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = cn.clone();
            }
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            serve(tls, h2, opts, state, stop, cn).await;
        });
    }
}

/// Per-connection bookkeeping: streams open now, and the GOAWAY trigger.
struct ConnCtx {
    open: AtomicUsize,
    goaway: CancellationToken,
}

/// Holds one stream's place in its connection's count until the response body ends.
struct StreamSlot(Arc<ConnCtx>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

async fn serve(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    h2: bool,
    opts: Arc<FakeOptions>,
    state: Arc<FakeState>,
    stop: CancellationToken,
    cn: Option<String>,
) {
    let ctx = Arc::new(ConnCtx {
        open: AtomicUsize::new(0),
        goaway: CancellationToken::new(),
    });
    let (svc_state, svc_stop, svc_ctx, svc_opts) =
        (state.clone(), stop.clone(), ctx.clone(), opts.clone());
    let svc = hyper::service::service_fn(move |req| {
        let (state, opts, stop, cn, ctx) = (
            svc_state.clone(),
            svc_opts.clone(),
            svc_stop.clone(),
            cn.clone(),
            svc_ctx.clone(),
        );
        async move {
            let now = ctx.open.fetch_add(1, Relaxed) + 1;
            state.peak_streams.fetch_max(now, Relaxed);
            let slot = StreamSlot(ctx.clone());
            let resp = handle(req, &state, &opts, &stop, cn).await;
            let p = state.goaway_percent.load(Relaxed);
            if p > 0 && fastrand::u32(0..100) < p {
                ctx.goaway.cancel();
            }
            Ok::<_, Infallible>(resp.map(|body| BoxBody::new(Slotted { body, _slot: slot })))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(opts.max_concurrent_streams)
        .initial_stream_window_size(KUBE_STREAM_WINDOW)
        .initial_connection_window_size(
            KUBE_STREAM_WINDOW.saturating_mul(opts.max_concurrent_streams.unwrap_or(100)),
        )
        .max_frame_size(KUBE_MAX_FRAME);
    let io = GoStrict::new(tls, h2, state.clone());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = conn.as_mut() => return,
        _ = ctx.goaway.cancelled() => {}
    }
    state.goaways.fetch_add(1, Relaxed);
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = conn.as_mut() => {}
    }
}

/// A response body that keeps its stream counted until it ends.
struct Slotted {
    body: BoxBody<Bytes, Infallible>,
    _slot: StreamSlot,
}

impl Body for Slotted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The subject's common name of a DER certificate.
pub fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>, server: &str) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-fake-server", server)
        .body(Full::new(body.into()).boxed())
        .expect("valid response")
}

async fn handle(
    mut req: Request<Incoming>,
    state: &FakeState,
    opts: &FakeOptions,
    stop: &CancellationToken,
    cn: Option<String>,
) -> Resp {
    state.requests.fetch_add(1, Relaxed);
    if state.hang.load(Relaxed) {
        stop.cancelled().await;
    }
    let name = state.name.as_str();
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    if let Some(store) = state.endpoints.get() {
        if let Some(mut r) = store.handle(path, query, cn.is_some(), stop) {
            r.headers_mut()
                .insert("x-fake-server", name.parse().expect("header value"));
            return r;
        }
    }
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/readyz" => readyz(state.ready.load(Relaxed), name),
        "/livez" | "/healthz" => full(StatusCode::OK, TEXT, "ok", name),
        "/version" => version(name),
        "/whoami" => whoami(&req, cn, name),
        _ if req.headers().contains_key(hyper::header::UPGRADE) => upgrade_echo(&mut req, name),
        "/api/v1/configmaps" if query.starts_with("size=") => {
            let n = query["size=".len()..].parse().unwrap_or(0);
            large(n, name)
        }
        p if req.method() != hyper::Method::GET && p.starts_with("/api") => {
            execute(req, state, name).await
        }
        p if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
            || p.contains("/watch/") =>
        {
            watch(opts, stop.clone(), name)
        }
        _ => full(
            StatusCode::NOT_FOUND,
            JSON,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#,
            name,
        ),
    }
}

/// `/readyz` answering with the status code the test set.
fn readyz(code: u16, name: &str) -> Resp {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if status.is_success() {
        "ok"
    } else {
        "[-]shutdown failed: reason withheld\nreadyz check failed"
    };
    full(status, "text/plain; charset=utf-8", body.to_string(), name)
}

/// `/version` as a v1.31 apiserver answers it.
fn version(name: &str) -> Resp {
    let v = serde_json::json!({
        "major": "1",
        "minor": "31",
        "gitVersion": FAKE_GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.22.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    });
    full(StatusCode::OK, "application/json", v.to_string(), name)
}

/// `/whoami`: the request as this server saw it (headers, HTTP version,
/// client certificate CN), for tests of what apilb forwards.
fn whoami(req: &Request<Incoming>, cn: Option<String>, name: &str) -> Resp {
    let mut headers = serde_json::Map::new();
    for k in req.headers().keys() {
        let vals: Vec<_> = req
            .headers()
            .get_all(k)
            .iter()
            .map(|v| serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()).to_string()))
            .collect();
        headers.insert(k.as_str().to_string(), vals.into());
    }
    let body = serde_json::json!({
        "server": name,
        "client_cn": cn,
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    full(StatusCode::OK, "application/json", body.to_string(), name)
}

/// Executes a write (POST/PUT/PATCH/DELETE): reads the body, records the
/// request once under "METHOD path request-id", answers with a Status.
async fn execute(req: Request<Incoming>, state: &FakeState, server: &str) -> Resp {
    let key = format!(
        "{} {} {}",
        req.method(),
        req.uri().path(),
        req.headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    );
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return full(StatusCode::BAD_REQUEST, "text/plain", "body", server),
    };
    *state
        .executed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
    full(
        StatusCode::OK,
        "application/json",
        format!(
            r#"{{"kind":"Status","apiVersion":"v1","status":"Success","bodyBytes":{}}}"#,
            body.len()
        ),
        server,
    )
}

/// A response of exactly `n` bytes, produced as it is read (64 KiB chunks).
fn large(n: u64, server: &str) -> Resp {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("content-length", n)
        .header("x-fake-server", server)
        .body(BoxBody::new(Filler::new(
            n,
            Bytes::from(vec![b' '; 64 * 1024]),
        )))
        .expect("valid response")
}

/// A body of `len` bytes made of one repeated chunk (no copying): large
/// responses here, and the benchmark's bulk body.
pub struct Filler {
    left: u64,
    chunk: Bytes,
}

impl Filler {
    pub fn new(len: u64, chunk: Bytes) -> Self {
        Filler { left: len, chunk }
    }
}

impl Body for Filler {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// Accepts an upgrade (SPDY/3.1 for exec, WebSocket) with 101 and echoes
/// every byte on the upgraded connection, as an exec session of `cat` would.
fn upgrade_echo(req: &mut Request<Incoming>, server: &str) -> Resp {
    let proto = req.headers()[hyper::header::UPGRADE].clone();
    let key = req.headers().get("sec-websocket-key").cloned();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let mut io = TokioIo::new(up);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tokio::io::AsyncReadExt::read(&mut io, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tokio::io::AsyncWriteExt::write_all(&mut io, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        }
    });
    let mut b = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", proto)
        .header("x-fake-server", server);
    if let Some(k) = key {
        b = b.header("sec-websocket-accept", websocket_accept(k.as_bytes()));
    }
    b.body(Full::new(Bytes::new()).boxed())
        .expect("valid response")
}

/// RFC 6455's Sec-WebSocket-Accept: base64(SHA-1(key + GUID)).
fn websocket_accept(key: &[u8]) -> String {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64_encode(&h.finalize())
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A chunked stream of ADDED events, one per `watch_interval`.
fn watch(opts: &FakeOptions, stop: CancellationToken, server: &str) -> Resp {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let (interval, limit, server_name) =
        (opts.watch_interval, opts.watch_events, server.to_string());
    tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            n += 1;
            let ev = serde_json::json!({
                "type": "ADDED",
                "object": {
                    "kind": "Namespace",
                    "apiVersion": "v1",
                    "metadata": {
                        "name": format!("ns-{n}"),
                        "resourceVersion": n.to_string(),
                        "annotations": { "apilb.dev/served-by": server_name }
                    }
                }
            });
            let mut line = ev.to_string();
            line.push('\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
            if limit.is_some_and(|l| n >= l) {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("x-fake-server", server)
        .body(BoxBody::new(ChannelBody(rx)))
        .expect("valid response")
}

/// A response body fed from a channel: each message is sent as it arrives.
pub(super) struct ChannelBody(pub(super) mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(
            super::websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
