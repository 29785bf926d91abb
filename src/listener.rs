//! Accept loops: one per frontend listener. Each accepted socket is counted
//! against the frontend's `max_connections` and handed to the service of the
//! frontend's kind (`tcp` or `http`); the listener knows no protocol.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info_span, warn, Instrument};

use crate::metrics::reject;
use crate::proxy;
use crate::snapshot::{Frontend, FrontendKind, FrontendStats, Shared};

/// First pause after an accept error (EMFILE...); doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop` is cancelled. Accept errors back off and retry; they
/// never end the listener. `name` is the frontend it serves (a rename by a
/// reload keeps the socket and changes the name).
pub async fn serve(
    listener: TcpListener,
    name: Arc<ArcSwap<String>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let env = shared.env();
    // One waiter on the token for the listener's life, not one per accept.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
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
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Some(fe) = shared
            .snapshot
            .load()
            .frontends
            .get(name.load().as_str())
            .cloned()
        else {
            continue; // removed by a reload a moment ago
        };
        let Some(slot) = Slot::take(&fe.stats, fe.config.max_connections) else {
            fe.stats.metrics.rejected(reject::MAX_CONNECTIONS);
            debug!(frontend = %fe.name, client.addr = %peer, "closed: max_connections reached");
            continue;
        };
        #[cfg(not(target_os = "linux"))]
        crate::net::tune(&sock); // inherited from the listener on Linux
        let span = info_span!("conn", frontend = %fe.name, client.addr = %peer, backend.addr = field::Empty);
        let env = env.clone();
        let task = dispatch(env, &fe, sock, peer, slot);
        shared.connections.spawn(task.instrument(span));
    }
}

/// The connection's task for the frontend's kind; it holds `slot` to the end.
fn dispatch(
    env: proxy::Env,
    fe: &Frontend,
    sock: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: Slot,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    match &fe.kind {
        FrontendKind::Tcp(svc) => {
            let svc = svc.clone();
            Box::pin(async move {
                let _slot = slot;
                proxy::tcp::handle(env, svc, sock, peer).await
            })
        }
        FrontendKind::Http(svc) => {
            let svc = svc.clone();
            Box::pin(proxy::http::serve_conn(
                env,
                svc,
                sock,
                peer,
                slot.into_hold(),
            ))
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

/// A frontend connection slot: counted in `max_connections` and the active
/// gauge until dropped.
pub struct Slot(Arc<FrontendStats>);

impl Slot {
    fn take(stats: &Arc<FrontendStats>, max: usize) -> Option<Self> {
        if stats.active.fetch_add(1, Relaxed) >= max {
            stats.active.fetch_sub(1, Relaxed);
            return None;
        }
        stats.metrics.connections.inc();
        stats.metrics.active.inc();
        Some(Slot(stats.clone()))
    }

    /// As a value the L7 service can hold (and share with tunnels).
    fn into_hold(self) -> proxy::http::Hold {
        Arc::new(self)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.metrics.active.dec();
    }
}
