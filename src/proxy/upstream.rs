//! Pooled TLS connections from L7 frontends to a pool's backends: one shared
//! HTTP/2 connection per backend when the server offers h2, otherwise idle
//! HTTP/1.1 keep-alive connections. Requests from clients with a verified
//! certificate use separate connections that present the front-proxy
//! certificate; the two kinds never mix.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tracing::debug;

use crate::balancer::Backend;
use crate::config::PoolConfig;
use crate::net::{self, Fault};
use crate::tls::{self, ClientMaterial, TlsError};

/// The body type apilb sends upstream.
pub type UpBody = BoxBody<Bytes, hyper::Error>;

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

struct Cache {
    h2: ArcSwapOption<http2::SendRequest<UpBody>>,
    h1: ArrayQueue<http1::SendRequest<UpBody>>,
}

impl Cache {
    fn new() -> Self {
        Cache {
            h2: ArcSwapOption::empty(),
            h1: ArrayQueue::new(IDLE_H1_PER_BACKEND),
        }
    }
}

/// TLS client settings for one identity: ALPN h2+http/1.1, and http/1.1 only
/// for upgrades (SPDY and WebSocket need HTTP/1.1).
struct Clients {
    any: Arc<ClientConfig>,
    h1_only: Arc<ClientConfig>,
}

/// One pool's upstream side, rebuilt on every reload (connections in use
/// keep running; idle ones are dropped with the old snapshot).
pub struct Upstream {
    plain: Clients,
    front_proxy: Option<Clients>,
    server_name: Option<String>,
    connect_timeout: Duration,
    /// Indexed like `Pool::backends`: [plain, front-proxy].
    caches: Vec<[Cache; 2]>,
}

/// A connection ready for one request.
pub enum Sender {
    H2(http2::SendRequest<UpBody>),
    H1(http1::SendRequest<UpBody>),
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
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
    #[error("front-proxy identity requested but pools[].tls has no front_proxy_cert_file")]
    NoFrontProxy,
    #[error("{0}")]
    Name(#[from] TlsError),
}

impl ConnectError {
    /// Whose fault it was, for passive health.
    pub fn fault(&self) -> Fault {
        match self {
            ConnectError::Tcp(e) | ConnectError::Tls(e) => net::classify(e),
            ConnectError::Timeout(_) | ConnectError::Handshake(_) => Fault::Backend,
            ConnectError::NoFrontProxy | ConnectError::Name(_) => Fault::Local(net::local::OTHER),
        }
    }
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

impl Upstream {
    /// Reads the pool's TLS files; an error refuses the reload.
    pub fn new(pool: &PoolConfig) -> Result<Self, TlsError> {
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
        Ok(Upstream {
            plain,
            front_proxy,
            server_name: t.server_name.clone(),
            connect_timeout: pool.connect_timeout,
            caches: pool
                .servers
                .iter()
                .map(|_| [Cache::new(), Cache::new()])
                .collect(),
        })
    }

    pub fn has_front_proxy(&self) -> bool {
        self.front_proxy.is_some()
    }

    /// A connection to backend `i` for `identity`: a pooled one when there
    /// is one, else a new one (only this step may fail over to another backend).
    pub async fn sender(
        &self,
        i: usize,
        backend: &Backend,
        identity: Identity,
        upgrade: bool,
    ) -> Result<Sender, ConnectError> {
        let cache = &self.caches[i][identity as usize];
        if !upgrade {
            if let Some(h2) = cache.h2.load_full() {
                if !h2.is_closed() {
                    return Ok(Sender::H2((*h2).clone()));
                }
                cache.h2.store(None);
            }
            while let Some(h1) = cache.h1.pop() {
                if h1.is_ready() {
                    return Ok(Sender::H1(h1));
                }
            }
        }
        let clients = match identity {
            Identity::Plain => &self.plain,
            Identity::FrontProxy => self
                .front_proxy
                .as_ref()
                .ok_or(ConnectError::NoFrontProxy)?,
        };
        let config = if upgrade {
            &clients.h1_only
        } else {
            &clients.any
        };
        let name = tls::server_name(self.server_name.as_deref().unwrap_or(&backend.server.host))?;
        let connect = async {
            let tcp = TcpStream::connect(backend.server.addr)
                .await
                .map_err(ConnectError::Tcp)?;
            crate::net::tune(&tcp);
            tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(ConnectError::Tls)
        };
        let tls = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        backend.metrics.connections.inc();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEPALIVE)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let server = backend.server.key.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(backend.addr = %server, error = %e, "upstream h2 connection ended");
                }
            });
            cache.h2.store(Some(Arc::new(send.clone())));
            Ok(Sender::H2(send))
        } else {
            let (send, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let server = backend.server.key.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(backend.addr = %server, error = %e, "upstream http/1.1 connection ended");
                }
            });
            Ok(Sender::H1(send))
        }
    }

    /// Gives an HTTP/1.1 connection back once its response has been read.
    pub fn release(
        self: &Arc<Self>,
        i: usize,
        identity: Identity,
        mut h1: http1::SendRequest<UpBody>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            if h1.ready().await.is_ok() {
                let _ = me.caches[i][identity as usize].h1.push(h1);
            }
        });
    }
}
