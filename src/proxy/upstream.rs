//! Pools of TLS connections from L7 frontends to a pool's backends, one pool
//! per (backend, identity). Requests from clients with a verified
//! certificate use connections that present the front-proxy certificate;
//! the two kinds never mix.
//!
//! HTTP/2: many connections per backend. Each carries at most
//! min(the server's SETTINGS_MAX_CONCURRENT_STREAMS, [`MAX_STREAMS_PER_CONN`])
//! streams; when every connection is full one new connection opens (one at
//! a time, so a burst does not open fifty); past the pool's
//! `upstream.max_connections_per_server` requests wait in a bounded queue
//! (`upstream.max_queued`) and fail after `upstream.queue_timeout`. A
//! connection that said GOAWAY or refused a stream takes no new streams and
//! closes when its streams end. HTTP/1.1 (servers without h2, upgrades):
//! idle keep-alive connections are reused, and the same connection cap holds.
//!
//! Flow control: a stream's receive window ([`STREAM_WINDOW`]) is all that
//! an unread response can hold here; the connection window is the stream
//! window times the stream limit, so unread streams never block the others.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Body;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

pub use super::h2body::BoxError;
use super::h2body::{pipe, PeerBody, MAX_SEND_BUF};
use super::h2frames::{GoawayState, Watched};
use super::readahead::ReadAhead;
use crate::balancer::Backend;
use crate::config::{PoolConfig, UpstreamLimits};
use crate::metrics::BackendMetrics;
use crate::net::{self, Fault};
use crate::tls::{self, ClientMaterial, TlsError};

/// The body type apilb sends upstream.
pub type UpBody = BoxBody<Bytes, BoxError>;

/// Streams per upstream HTTP/2 connection at most, even when the server
/// allows more (kube-apiserver advertises 100).
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// Per-stream receive window toward backends: the most unread response
/// data one stream can hold in apilb.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Connection receive window: every stream's window fits at once.
pub const CONN_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS_PER_CONN as u32;
/// Largest response header list accepted from a backend.
pub const MAX_HEADER_LIST: u32 = 256 * 1024;
/// Streams one upstream HTTP/2 connection carries before it retires: a
/// client's stream IDs are odd 31-bit numbers (about 2^30 of them), and a
/// busy connection reaches that in days.
const STREAMS_PER_CONN_LIFETIME: u32 = 1 << 29;
/// Largest frame apilb accepts from a backend.
const MAX_FRAME: u32 = 64 * 1024;
/// Idle HTTP/1.1 connections kept per backend and identity.
const IDLE_H1_PER_BACKEND: usize = 64;
/// HTTP/2 PING interval toward backends: finds a dead apiserver connection.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Which client identity a connection carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Identity {
    /// No client certificate: bearer tokens pass through.
    Plain,
    /// Presents the front-proxy certificate; requests carry X-Remote-* headers.
    FrontProxy,
}

/// One upstream HTTP/2 connection and its stream count. Spoken through
/// the h2 crate directly: hyper's client adds a channel, a oneshot and a
/// spawned task per request in front of it.
pub struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    inflight: AtomicUsize,
    /// Streams ever opened: a connection retires before its stream IDs run out.
    opened: AtomicU32,
    /// A stream refused, or the connection ended: no new streams.
    draining: AtomicBool,
    /// GOAWAY seen (no new streams), and how the connection ended.
    goaway: Arc<GoawayState>,
}

impl H2Conn {
    fn try_take(&self) -> bool {
        if self.draining.load(Relaxed) || self.goaway.draining.load(Relaxed) {
            return false;
        }
        // The server's SETTINGS_MAX_CONCURRENT_STREAMS as last seen.
        let cap = self
            .send
            .current_max_send_streams()
            .min(MAX_STREAMS_PER_CONN);
        let took = self
            .inflight
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .is_ok();
        if took && self.opened.fetch_add(1, Relaxed) + 1 >= STREAMS_PER_CONN_LIFETIME {
            // This is the last stream; the next request opens a new connection.
            self.draining.store(true, Relaxed);
        }
        took
    }
}

/// Connections to one backend for one identity.
pub struct Slot {
    h2: ArcSwap<Vec<Arc<H2Conn>>>,
    h1: ArrayQueue<http1::SendRequest<UpBody>>,
    /// Connections open (both protocols), for the cap.
    open: AtomicUsize,
    /// One connection is being opened; others wait for it.
    opening: AtomicBool,
    /// The server did not offer h2: use HTTP/1.1 connections.
    h1_only: AtomicBool,
    waiting: AtomicUsize,
    wake: Notify,
}

impl Slot {
    fn new() -> Self {
        Slot {
            h2: ArcSwap::from_pointee(Vec::new()),
            h1: ArrayQueue::new(IDLE_H1_PER_BACKEND),
            open: AtomicUsize::new(0),
            opening: AtomicBool::new(false),
            h1_only: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
        }
    }

    fn take_h2(&self) -> Option<Arc<H2Conn>> {
        self.h2.load().iter().find(|c| c.try_take()).cloned()
    }

    fn remove_h2(&self, c: &Arc<H2Conn>) {
        self.h2.rcu(|v| {
            v.iter()
                .filter(|x| !Arc::ptr_eq(x, c))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    fn freed(&self) {
        if self.waiting.load(Relaxed) > 0 {
            self.wake.notify_one();
        }
    }
}

/// TLS client settings for one identity: ALPN h2+http/1.1, and http/1.1 only
/// for upgrades (SPDY and WebSocket need HTTP/1.1).
struct Clients {
    any: Arc<ClientConfig>,
    h1_only: Arc<ClientConfig>,
}

/// What a pool's upstream TLS is built from: its settings and the bytes of
/// every file they name. Equal sources give equal TLS configs.
#[derive(PartialEq)]
struct TlsSource {
    cfg: Option<crate::config::UpstreamTls>,
    files: Vec<Option<Vec<u8>>>,
}

impl TlsSource {
    /// Reads the files (blocking); an unreadable one reads as `None` and the
    /// build that follows reports it.
    fn read(pool: &PoolConfig) -> Self {
        let t = pool.tls.clone().unwrap_or_default();
        let files = [
            &t.ca_file,
            &t.front_proxy_cert_file,
            &t.front_proxy_key_file,
        ]
        .into_iter()
        .map(|f| f.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect();
        TlsSource {
            cfg: pool.tls.clone(),
            files,
        }
    }
}

/// TLS settings of a pool; kept across reloads while they do not change.
pub struct TlsSet {
    source: TlsSource,
    plain: Clients,
    front_proxy: Option<Clients>,
    server_name: Option<String>,
}

/// One pool's upstream side.
pub struct Upstream {
    tls: Arc<TlsSet>,
    connect_timeout: Duration,
    limits: UpstreamLimits,
    /// Indexed like `Pool::backends`: [plain, front-proxy].
    slots: Vec<[Arc<Slot>; 2]>,
    /// Server keys in `slots` order, to carry slots across reloads.
    keys: Vec<String>,
}

/// A stream's place on an upstream connection, held until its response
/// ends; dropping it frees the place.
pub struct Lease {
    slot: Arc<Slot>,
    h2: Option<Arc<H2Conn>>,
    streams: prometheus::IntGauge,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(c) = &self.h2 {
            c.inflight.fetch_sub(1, Relaxed);
        }
        self.streams.dec();
        self.slot.freed();
    }
}

impl Lease {
    fn new(slot: Arc<Slot>, h2: Option<Arc<H2Conn>>, m: &BackendMetrics) -> Self {
        m.upstream_streams.inc();
        Lease {
            slot,
            h2,
            streams: m.upstream_streams.clone(),
        }
    }
}

/// A connection ready for one request.
pub enum Sender {
    H2(Arc<H2Conn>, Arc<Slot>),
    H1(http1::SendRequest<UpBody>),
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(..))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Tcp(std::io::Error),
    #[error("connect: timeout after {0:?}")]
    Timeout(Duration),
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("http handshake: {0}")]
    Handshake(hyper::Error),
    #[error("http/2 handshake: {0}")]
    H2Handshake(h2::Error),
    #[error("front-proxy identity requested but pools[].tls has no front_proxy_cert_file")]
    NoFrontProxy,
    #[error("{0}")]
    Name(#[from] TlsError),
    #[error("{0} requests already wait for a free upstream stream (pools[].upstream.max_queued)")]
    QueueFull(usize),
    #[error("no upstream stream became free within {} (pools[].upstream.queue_timeout)", humantime::format_duration(*.0))]
    QueueTimeout(Duration),
}

impl ConnectError {
    /// Whose fault it was, for passive health.
    pub fn fault(&self) -> Fault {
        match self {
            ConnectError::Tcp(e) | ConnectError::Tls(e) => net::classify(e),
            ConnectError::Timeout(_)
            | ConnectError::Handshake(_)
            | ConnectError::H2Handshake(_) => Fault::Backend,
            ConnectError::NoFrontProxy
            | ConnectError::Name(_)
            | ConnectError::QueueFull(_)
            | ConnectError::QueueTimeout(_) => Fault::Local(net::local::OTHER),
        }
    }

    /// Queue errors mean "busy", not "down": no failover, no health report.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            ConnectError::QueueFull(_) | ConnectError::QueueTimeout(_)
        )
    }
}

/// How an upstream request failed.
#[derive(Debug)]
pub enum SendError {
    /// The server refused it unprocessed (REFUSED_STREAM, a stream above
    /// GOAWAY's last-stream-id, or it was never sent): safe to resend for
    /// every method. Carries the request body when it was never sent.
    Refused(Option<UpBody>, BoxError),
    /// Anything else: the request may have been processed.
    Failed(BoxError),
}

fn clients(material: impl Fn() -> Result<ClientMaterial, TlsError>) -> Result<Clients, TlsError> {
    let mut any = material()?;
    any.alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut h1 = material()?;
    h1.alpn = vec![b"http/1.1".to_vec()];
    Ok(Clients {
        any: any.build()?,
        h1_only: h1.build()?,
    })
}

impl TlsSet {
    /// Reads the pool's TLS files (blocking: call off the async control path).
    pub fn new(pool: &PoolConfig) -> Result<Self, TlsError> {
        let source = TlsSource::read(pool);
        let t = pool.tls.clone().unwrap_or_default();
        let plain = clients(|| {
            ClientMaterial::from_files(t.ca_file.as_deref(), None, None, t.insecure_skip_verify)
        })?;
        let front_proxy = match (&t.front_proxy_cert_file, &t.front_proxy_key_file) {
            (Some(c), Some(k)) => Some(clients(|| {
                ClientMaterial::from_files(
                    t.ca_file.as_deref(),
                    Some(c),
                    Some(k),
                    t.insecure_skip_verify,
                )
            })?),
            _ => None,
        };
        Ok(TlsSet {
            source,
            plain,
            front_proxy,
            server_name: t.server_name.clone(),
        })
    }
}

impl Upstream {
    /// Reads the pool's TLS files; an error refuses the reload.
    pub fn new(pool: &PoolConfig) -> Result<Self, TlsError> {
        Ok(Self::with_tls(Arc::new(TlsSet::new(pool)?), pool, None))
    }

    /// The pool's upstream for a reload: when the pool's TLS settings and
    /// file contents are unchanged, `old`'s TLS configs and the connection
    /// pools of servers it also has are kept (no new handshakes); otherwise
    /// everything is new. Blocking (reads files).
    pub fn rebuild(pool: &PoolConfig, old: Option<&Upstream>) -> Result<Self, TlsError> {
        if let Some(o) = old {
            if o.tls.source == TlsSource::read(pool) {
                return Ok(Self::with_tls(o.tls.clone(), pool, Some(o)));
            }
        }
        Self::new(pool)
    }

    /// An upstream with given TLS settings; connection pools of servers
    /// that `old` also has are carried over.
    pub fn with_tls(tls: Arc<TlsSet>, pool: &PoolConfig, old: Option<&Upstream>) -> Self {
        let keys: Vec<String> = pool.servers.iter().map(|s| s.key.clone()).collect();
        let slots = keys
            .iter()
            .map(|k| {
                old.and_then(|o| {
                    o.keys
                        .iter()
                        .position(|x| x == k)
                        .map(|j| o.slots[j].clone())
                })
                .unwrap_or_else(|| [Arc::new(Slot::new()), Arc::new(Slot::new())])
            })
            .collect();
        Upstream {
            tls,
            connect_timeout: pool.connect_timeout,
            limits: pool.upstream,
            slots,
            keys,
        }
    }

    /// The TLS settings, for reuse by the next reload.
    pub fn tls(&self) -> Arc<TlsSet> {
        self.tls.clone()
    }

    pub fn has_front_proxy(&self) -> bool {
        self.tls.front_proxy.is_some()
    }

    /// A place for one request on a connection to backend `i`: a free
    /// stream on an open connection, else a new connection (one opens at a
    /// time), else a wait in the queue. Only connect errors fail over.
    pub async fn sender(
        &self,
        i: usize,
        backend: &Backend,
        identity: Identity,
        upgrade: bool,
    ) -> Result<(Sender, Lease), ConnectError> {
        let slot = &self.slots[i][identity as usize];
        // The common case: a free stream on an open connection, without
        // registering with the slot's Notify (that takes its lock).
        if let Some(s) = self.try_pooled(slot, backend, upgrade) {
            return Ok(s);
        }
        let limits = self.limits;
        let deadline = Instant::now() + limits.queue_timeout;
        let mut queued: Option<Queued> = None;
        loop {
            let notified = slot.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(s) = self.try_pooled(slot, backend, upgrade) {
                return Ok(s);
            }
            // Tunnels are bounded by the frontend's max_connections instead.
            let room = upgrade || slot.open.load(Relaxed) < limits.max_connections_per_server;
            let h1 = upgrade || slot.h1_only.load(Relaxed);
            if room && (h1 || !slot.opening.swap(true, Relaxed)) {
                // Released even when this request is dropped mid-connect
                // (its client left): others must not wait for it forever.
                let _opener = (!h1).then(|| Opener(slot.clone()));
                // Boxed: the connect/handshake future is large and rare;
                // inline, it would make every request's future that large.
                let r = Box::pin(self.open(slot, backend, identity, upgrade)).await;
                drop(_opener);
                match r? {
                    Some(s) => return Ok(s),
                    None => continue,
                }
            }
            if queued.is_none() {
                queued = Some(Queued::enter(slot, &backend.metrics, limits.max_queued)?);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ConnectError::QueueTimeout(limits.queue_timeout));
            }
        }
    }

    fn try_pooled(&self, slot: &Arc<Slot>, b: &Backend, upgrade: bool) -> Option<(Sender, Lease)> {
        if upgrade {
            return None;
        }
        if let Some(c) = slot.take_h2() {
            let lease = Lease::new(slot.clone(), Some(c.clone()), &b.metrics);
            return Some((Sender::H2(c, slot.clone()), lease));
        }
        while let Some(h1) = slot.h1.pop() {
            if h1.is_ready() {
                return Some((Sender::H1(h1), Lease::new(slot.clone(), None, &b.metrics)));
            }
        }
        None
    }

    /// Opens one connection. HTTP/2: joins the pool and `None` is returned
    /// (the caller takes a stream like everyone else); HTTP/1.1: returned.
    async fn open(
        &self,
        slot: &Arc<Slot>,
        backend: &Backend,
        identity: Identity,
        upgrade: bool,
    ) -> Result<Option<(Sender, Lease)>, ConnectError> {
        let tls = tokio::time::timeout(
            self.connect_timeout,
            self.connect(backend, identity, upgrade),
        )
        .await
        .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        backend.metrics.connections.inc();
        let open = OpenConn::new(slot, &backend.metrics);
        let server = backend.server.key.clone();
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            if !upgrade {
                slot.h1_only.store(true, Relaxed);
            }
            let (send, conn) = http1::Builder::new()
                .max_buf_size(MAX_SEND_BUF.max(8192) * 4)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(backend.addr = %server, error = %e, "upstream http/1.1 connection ended");
                }
                drop(open);
            });
            let lease = Lease::new(slot.clone(), None, &backend.metrics);
            return Ok(Some((Sender::H1(send), lease)));
        }
        let goaway = Arc::new(GoawayState::default());
        let io = Box::pin(Watched::new(tls, goaway.clone()));
        let (send, conn) = h2_builder()
            .handshake(io)
            .await
            .map_err(ConnectError::H2Handshake)?;
        let c = Arc::new(H2Conn {
            send,
            inflight: AtomicUsize::new(0),
            opened: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            goaway,
        });
        let (weak, me) = (Arc::downgrade(slot), Arc::downgrade(&c));
        slot.h2.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(c.clone());
            v
        });
        tokio::spawn(async move {
            if let Err(e) = drive(conn, H2_KEEPALIVE, H2_KEEPALIVE_TIMEOUT).await {
                debug!(backend.addr = %server, error = %e, "upstream h2 connection ended");
            }
            forget(weak, me);
            drop(open);
        });
        Ok(None)
    }

    /// TCP connect and TLS handshake to the backend, with the client
    /// certificate of `identity`; an upgrade offers HTTP/1.1 only.
    async fn connect(
        &self,
        backend: &Backend,
        identity: Identity,
        upgrade: bool,
    ) -> Result<tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>, ConnectError> {
        let clients = match identity {
            Identity::Plain => &self.tls.plain,
            Identity::FrontProxy => self
                .tls
                .front_proxy
                .as_ref()
                .ok_or(ConnectError::NoFrontProxy)?,
        };
        let config = if upgrade {
            &clients.h1_only
        } else {
            &clients.any
        };
        let host = self.tls.server_name.as_deref();
        let name = tls::server_name(host.unwrap_or(&backend.server.host))?;
        let tcp = TcpStream::connect(backend.server.addr)
            .await
            .map_err(ConnectError::Tcp)?;
        crate::net::tune(&tcp);
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, ReadAhead::new(tcp))
            .await
            .map_err(ConnectError::Tls)
    }

    /// Gives an HTTP/1.1 connection back once its response has been read.
    pub fn release(
        self: &Arc<Self>,
        i: usize,
        identity: Identity,
        mut h1: http1::SendRequest<UpBody>,
    ) {
        let slot = self.slots[i][identity as usize].clone();
        tokio::spawn(async move {
            if h1.ready().await.is_ok() {
                let _ = slot.h1.push(h1);
                slot.freed();
            }
        });
    }

    /// Sends a request; tells refusals (safe to resend) from other failures.
    /// A connection that refused takes no new streams.
    pub async fn send(
        sender: &mut Sender,
        req: Request<UpBody>,
    ) -> Result<Response<PeerBody>, SendError> {
        match sender {
            Sender::H1(s) => s
                .try_send_request(req)
                .await
                .map(|r| r.map(PeerBody::H1))
                .map_err(|mut e| match e.take_message() {
                    Some(m) => SendError::Refused(Some(m.into_body()), e.into_error().into()),
                    None => SendError::Failed(e.into_error().into()),
                }),
            Sender::H2(c, slot) => {
                let r = send_h2(c, req).await;
                if let Err(SendError::Refused(..)) = &r {
                    c.draining.store(true, Relaxed);
                    slot.remove_h2(c);
                }
                r
            }
        }
    }
}

/// One request on an HTTP/2 connection. A body streams from a task of its
/// own; an empty one ends the stream with the headers.
async fn send_h2(c: &H2Conn, req: Request<UpBody>) -> Result<Response<PeerBody>, SendError> {
    let (parts, body) = req.into_parts();
    let eos = body.is_end_stream();
    let (resp, tx) = match c
        .send
        .clone()
        .send_request(Request::from_parts(parts, ()), eos)
    {
        Ok(x) => x,
        // Nothing was sent: the connection is going away or closed...
        Err(e) if refused(&e) || e.is_io() || e.reason().is_some() => {
            return Err(SendError::Refused(Some(body), e.into()))
        }
        // ...or h2 would not send this request (no connection is at fault).
        Err(e) => return Err(SendError::Failed(e.into())),
    };
    if !eos {
        tokio::spawn(pipe(body, tx, h2::Reason::CANCEL));
    }
    match resp.await {
        Ok(r) => Ok(r.map(PeerBody::H2)),
        Err(e) if refused(&e) || c.goaway.unprocessed_at_eof.load(Relaxed) => {
            Err(SendError::Refused(None, e.into()))
        }
        Err(e) => Err(SendError::Failed(e.into())),
    }
}

fn h2_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .initial_max_send_streams(MAX_STREAMS_PER_CONN)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUF)
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

/// Whether the server refused a request unprocessed: REFUSED_STREAM, or a
/// GOAWAY whose last-stream-id is below the stream (RFC 9113 §8.7).
fn refused(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// Drives an HTTP/2 connection until it ends, and PINGs the server every
/// `every` ([`H2_KEEPALIVE`]): no PONG within `wait` ends a connection to a
/// dead apiserver.
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    every: Duration,
    wait: Duration,
) -> Result<(), BoxError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut pings = conn.ping_pong();
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            r = &mut conn => return r.map_err(Into::into),
            _ = tick.tick() => {}
        }
        let Some(p) = pings.as_mut() else { continue };
        let pong = tokio::time::timeout(wait, p.ping(h2::Ping::opaque()));
        tokio::select! {
            r = &mut conn => return r.map_err(Into::into),
            r = pong => match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(format!("no PING answer within {wait:?}").into()),
            }
        }
    }
}

/// Removes a closed connection from its pool and wakes waiters.
fn forget(slot: Weak<Slot>, conn: Weak<H2Conn>) {
    if let (Some(slot), Some(c)) = (slot.upgrade(), conn.upgrade()) {
        c.draining.store(true, Relaxed);
        slot.remove_h2(&c);
        slot.wake.notify_waiters();
    }
}

/// Counts an open upstream connection until its task ends.
struct OpenConn {
    slot: Weak<Slot>,
    gauge: prometheus::IntGauge,
}

impl OpenConn {
    fn new(slot: &Arc<Slot>, m: &BackendMetrics) -> Self {
        slot.open.fetch_add(1, Relaxed);
        m.upstream_connections.inc();
        OpenConn {
            slot: Arc::downgrade(slot),
            gauge: m.upstream_connections.clone(),
        }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Some(s) = self.slot.upgrade() {
            s.open.fetch_sub(1, Relaxed);
            s.wake.notify_waiters();
        }
    }
}

/// The one request opening an HTTP/2 connection for its slot; when it is
/// done (or dropped) the next may open one and waiters look again.
struct Opener(Arc<Slot>);

impl Drop for Opener {
    fn drop(&mut self) {
        self.0.opening.store(false, Relaxed);
        self.0.wake.notify_waiters();
    }
}

/// A request waiting for a free stream; counted while it waits.
struct Queued {
    slot: Arc<Slot>,
    gauge: prometheus::IntGauge,
}

impl Queued {
    fn enter(slot: &Arc<Slot>, m: &BackendMetrics, max: usize) -> Result<Self, ConnectError> {
        if slot.waiting.fetch_add(1, Relaxed) >= max {
            slot.waiting.fetch_sub(1, Relaxed);
            return Err(ConnectError::QueueFull(max));
        }
        m.queued.inc();
        Ok(Queued {
            slot: slot.clone(),
            gauge: m.queued.clone(),
        })
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.slot.waiting.fetch_sub(1, Relaxed);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection retires (takes no new stream) once it opened its
    /// lifetime's streams, long before h2 would run out of stream IDs.
    #[tokio::test]
    async fn a_connection_retires_after_its_lifetime_of_streams() {
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut s = h2::server::handshake(b).await.unwrap();
            while s.accept().await.is_some() {}
        });
        let (send, conn) = h2_builder().handshake::<_, Bytes>(a).await.unwrap();
        tokio::spawn(conn);
        let c = H2Conn {
            send,
            inflight: AtomicUsize::new(0),
            opened: AtomicU32::new(STREAMS_PER_CONN_LIFETIME - 2),
            draining: AtomicBool::new(false),
            goaway: Arc::new(GoawayState::default()),
        };
        assert!(c.try_take() && c.try_take(), "the last two streams");
        assert!(!c.try_take(), "a retired connection takes no stream");
        assert!(c.draining.load(Relaxed));
    }

    /// A server that completes the HTTP/2 handshake and then stops reading
    /// (a hung apiserver): the connection ends at the PING deadline; one that
    /// keeps answering stays up.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_stops_answering_pings_ends_the_connection() {
        for hung in [true, false] {
            let (a, b) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                let mut s = h2::server::handshake(b).await.unwrap();
                if hung {
                    std::future::pending::<()>().await;
                }
                while s.accept().await.is_some() {}
            });
            let (_send, conn) = h2_builder().handshake::<_, Bytes>(a).await.unwrap();
            let every = Duration::from_secs(30);
            let wait = Duration::from_secs(20);
            let t0 = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(300), drive(conn, every, wait)).await;
            if hung {
                let e = r
                    .expect("ends on its own")
                    .expect_err("a hung server is an error");
                assert!(e.to_string().contains("no PING answer"), "{e}");
                assert_eq!(t0.elapsed(), every + wait);
            } else {
                assert!(r.is_err(), "a live server's connection stays up for 300 s");
            }
            server.abort();
        }
    }
}
