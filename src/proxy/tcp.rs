//! L4 frontends: the accept loop, connect with timeout and failover, and one
//! relay task per client connection with its accounting and close log line.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info_span, warn, Instrument};

use super::pump::{self, Counters};
use crate::balancer::ActiveGuard;
use crate::health;
use crate::metrics::reject;
use crate::runtime::{Frontend, Shared};

/// Keepalive on both sockets: a peer that vanished (power loss, partition) is
/// found within about two minutes instead of the kernel's two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_RETRIES: u32 = 4;
/// First pause after an accept error (EMFILE...); doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

pub fn tune(sock: &TcpStream) {
    tune_socket(&SockRef::from(sock));
}

/// TCP_NODELAY and keepalive; on a listener, inherited by accepted sockets.
pub fn tune_socket(s: &socket2::Socket) {
    let _ = s.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = s.set_tcp_keepalive(&ka);
}

/// Accepts until `stop` is cancelled. Accept errors back off and retry; they
/// never end the listener.
pub async fn serve(
    listener: TcpListener,
    name: Arc<ArcSwap<String>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(x) => {
                backoff = ACCEPT_BACKOFF_MIN;
                x
            }
            Err(e) => {
                if is_per_connection(&e) {
                    debug!(error = %e, "accept: client connection failed before it was accepted");
                    continue;
                }
                warn!(error = %e, backoff = ?backoff, "accept failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let snap = shared.snapshot.load();
        let Some(fe) = snap.frontends.get(name.load().as_str()).cloned() else {
            continue; // removed by a reload a moment ago
        };
        drop(snap);
        let stats = &fe.stats;
        if stats.active.fetch_add(1, Relaxed) >= fe.config.max_connections {
            stats.active.fetch_sub(1, Relaxed);
            stats.metrics.rejected(reject::MAX_CONNECTIONS);
            debug!(frontend = %fe.name, client.addr = %peer, "closed: max_connections reached");
            continue;
        }
        stats.metrics.connections.inc();
        stats.metrics.active.inc();
        let guard = FrontendGuard(fe.clone());
        #[cfg(not(target_os = "linux"))]
        tune(&sock); // inherited from the listener on Linux
        let span = info_span!("conn", frontend = %fe.name, client.addr = %peer, backend.addr = field::Empty);
        let hard_stop = shared.hard_stop.clone();
        let sh = shared.clone();
        if fe.http.is_some() {
            shared.connections.spawn(
                async move {
                    let _guard = guard;
                    super::http::serve_conn(sh, fe, sock, peer, hard_stop).await
                }
                .instrument(span),
            );
        } else {
            shared
                .connections
                .spawn(handle(sh, fe, sock, peer, guard, hard_stop).instrument(span));
        }
    }
}

/// Errors that concern one client only (it reset before we accepted).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Holds a frontend's open-connection count for the life of a connection.
struct FrontendGuard(Arc<Frontend>);

impl Drop for FrontendGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Relaxed);
        self.0.stats.metrics.active.dec();
    }
}

async fn handle(
    shared: Arc<Shared>,
    fe: Arc<Frontend>,
    client: TcpStream,
    peer: SocketAddr,
    _guard: FrontendGuard,
    hard_stop: CancellationToken,
) {
    let started = Instant::now();
    let (backend, active) = match connect(&shared, &fe).await {
        Ok(x) => x,
        Err(reason) => {
            fe.stats.metrics.rejected(reason);
            debug!(frontend = %fe.name, client.addr = %peer, reason, "closed: no backend reached");
            return;
        }
    };
    let b = active.backend().clone();
    tracing::Span::current().record("backend.addr", field::display(&b.server.key));
    let kill = b.kill_token();
    let r = pump::relay(
        &client,
        &backend,
        Counters {
            to_backend: &b.metrics.bytes_to_backend,
            to_client: &b.metrics.bytes_to_client,
        },
        fe.config.idle_timeout,
        &kill,
        &hard_stop,
    )
    .await;
    let error = match &r.end {
        pump::End::ClientError(e) | pump::End::BackendError(e) => e.to_string(),
        _ => String::new(),
    };
    debug!(
        frontend = %fe.name,
        client.addr = %peer,
        backend.addr = %b.server.key,
        bytes.to_backend = r.to_backend,
        bytes.to_client = r.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end = r.end.as_str(),
        error,
        "connection closed"
    );
    drop(active);
}

/// Picks and connects, failing over to the next distinct server on a refused
/// or timed-out connect (each failure feeds passive health).
async fn connect(shared: &Shared, fe: &Frontend) -> Result<(TcpStream, ActiveGuard), &'static str> {
    let pool = &fe.pool;
    let cfg = &pool.config;
    let mut tried: Vec<usize> = Vec::with_capacity(cfg.connect_attempts as usize);
    let mut last_reason = reject::ALL_DOWN;
    while tried.len() < cfg.connect_attempts as usize {
        if shared.shutdown.is_cancelled() {
            return Err(reject::SHUTDOWN);
        }
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let b = &pool.backends[i];
        let guard = b.enter();
        let t0 = Instant::now();
        let err = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(b.server.addr))
            .await
        {
            Ok(Ok(s)) => {
                b.metrics
                    .connect_duration
                    .observe(t0.elapsed().as_secs_f64());
                b.metrics.connections.inc();
                tune(&s);
                return Ok((s, guard));
            }
            Ok(Err(e)) => format!("connect: {e}"),
            Err(_) => format!(
                "connect: timeout after {}",
                humantime::format_duration(cfg.connect_timeout)
            ),
        };
        drop(guard);
        b.metrics.connect_failures.inc();
        last_reason = reject::CONNECT_FAILED;
        debug!(backend.addr = %b.server.key, error = %err, attempt = tried.len(), "connect failed; trying the next server");
        health::connect_failed(shared, b, &cfg.health, &err);
    }
    Err(last_reason)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The accept path relies on Linux copying these options from the
    /// listener to every accepted socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        super::tune_socket(&sock);
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        sock.listen(16).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (acc, _) = sock.accept().unwrap();
        assert!(acc.nodelay().unwrap());
        assert!(acc.keepalive().unwrap());
        assert_eq!(acc.keepalive_time().unwrap(), super::KEEPALIVE_IDLE);
        assert_eq!(acc.keepalive_interval().unwrap(), super::KEEPALIVE_INTERVAL);
        assert_eq!(acc.keepalive_retries().unwrap(), super::KEEPALIVE_RETRIES);
    }
}
