//! The API client: kube's `Client` over a connector of our own that sends
//! every new connection to one of the pool's own backends (never only the
//! kubeconfig's `server`), with the kubeconfig's credentials, verifying the
//! server certificate against the pool's `tls.server_name`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower::{BoxError, ServiceBuilder};

use super::{Backends, DiscoveryError};
use crate::config::discovery::KubernetesDiscovery;
use crate::net;

/// Reads the credentials: the kubeconfig's current context, or the pod's
/// service account when no kubeconfig is set.
pub async fn kube_config(d: &KubernetesDiscovery) -> Result<kube::Config, DiscoveryError> {
    let cfg = match &d.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| DiscoveryError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| DiscoveryError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster()
            .map_err(|e| DiscoveryError::Config(format!("in-cluster service account: {e}")))?,
    };
    Ok(cfg)
}

/// A `kube::Client` whose connections go to the pool's backends.
pub fn client(
    cfg: &kube::Config,
    server_name: &str,
    connect_timeout: Duration,
    backends: Backends,
) -> Result<kube::Client, DiscoveryError> {
    let mut tls = cfg
        .rustls_client_config()
        .map_err(|e| DiscoveryError::Config(format!("TLS settings of the kubeconfig: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| DiscoveryError::Config(format!("server name {server_name:?}: {e}")))?;
    let connector = PoolConnector(Arc::new(Inner {
        backends,
        tls: TlsConnector::from(Arc::new(tls)),
        name,
        connect_timeout,
    }));
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let auth = cfg
        .auth_layer()
        .map_err(|e| DiscoveryError::Config(format!("credentials: {e}")))?;
    let headers = cfg
        .extra_headers_layer()
        .map_err(|e| DiscoveryError::Config(format!("headers: {e}")))?;
    let service = ServiceBuilder::new()
        .layer(cfg.base_uri_layer())
        .option_layer(auth)
        .layer(headers)
        .map_err(BoxError::from)
        .service(http);
    Ok(kube::Client::new(service, cfg.default_namespace.clone()))
}

struct Inner {
    backends: Backends,
    tls: TlsConnector,
    name: ServerName<'static>,
    connect_timeout: Duration,
}

/// Ignores the request's host: connects to an up backend of the pool.
#[derive(Clone)]
struct PoolConnector(Arc<Inner>);

impl tower::Service<Uri> for PoolConnector {
    type Response = Conn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.connect().await })
    }
}

impl Inner {
    /// Tries the candidates from a random one on, until one completes TLS.
    async fn connect(&self) -> io::Result<Conn> {
        let addrs = (self.backends)();
        if addrs.is_empty() {
            return Err(io::Error::other("the pool has no backend"));
        }
        let start = fastrand::usize(..addrs.len());
        let mut last = None;
        for i in 0..addrs.len() {
            let addr = addrs[(start + i) % addrs.len()];
            match self.connect_one(addr).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(io::Error::new(e.kind(), format!("{addr}: {e}"))),
            }
        }
        Err(last.expect("at least one address was tried"))
    }

    async fn connect_one(&self, addr: SocketAddr) -> io::Result<Conn> {
        let tcp = net::connect(addr, self.connect_timeout)
            .await
            .map_err(io::Error::other)?;
        let tls = tokio::time::timeout(
            self.connect_timeout,
            self.tls.connect(self.name.clone(), tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn(TokioIo::new(tls)))
    }
}

/// A TLS connection to one backend, as hyper's client wants it.
pub struct Conn(TokioIo<TlsStream<TcpStream>>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
