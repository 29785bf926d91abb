//! A fake kube-apiserver: TLS, HTTP/1.1 and HTTP/2, `/readyz` `/livez`
//! `/healthz` `/version`, a chunked watch stream, and failure modes (readyz
//! status, hang, kill) that the demo and the tests switch at run time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering::Relaxed};
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
}

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
            let svc_state = state.clone();
            let svc_stop = stop.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (state, opts, stop, cn) = (
                    svc_state.clone(),
                    opts.clone(),
                    svc_stop.clone(),
                    cn.clone(),
                );
                async move { Ok::<_, Infallible>(handle(req, &state, &opts, &stop, cn).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
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
        "/readyz" => {
            let code = state.ready.load(Relaxed);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = if status.is_success() {
                "ok".to_string()
            } else {
                "[-]shutdown failed: reason withheld\nreadyz check failed".to_string()
            };
            full(status, TEXT, body, name)
        }
        "/livez" | "/healthz" => full(StatusCode::OK, TEXT, "ok", name),
        "/version" => full(
            StatusCode::OK,
            JSON,
            serde_json::json!({
                "major": "1",
                "minor": "31",
                "gitVersion": FAKE_GIT_VERSION,
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.22.0",
                "compiler": "gc",
                "platform": "linux/amd64"
            })
            .to_string(),
            name,
        ),
        "/whoami" => {
            let mut headers = serde_json::Map::new();
            for k in req.headers().keys() {
                let vals: Vec<_> = req
                    .headers()
                    .get_all(k)
                    .iter()
                    .map(|v| {
                        serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()).to_string())
                    })
                    .collect();
                headers.insert(k.as_str().to_string(), vals.into());
            }
            full(
                StatusCode::OK,
                JSON,
                serde_json::json!({
                    "server": name,
                    "client_cn": cn,
                    "version": format!("{:?}", req.version()),
                    "headers": headers,
                })
                .to_string(),
                name,
            )
        }
        _ if req.headers().contains_key(hyper::header::UPGRADE) => upgrade_echo(&mut req, name),
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
