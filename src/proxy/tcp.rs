//! L4 service: handed an accepted client socket, it connects to a backend
//! with timeout and failover, relays bytes, and logs one line at close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, field};

use super::pump::{self, Counters};
use super::Env;
use crate::balancer::{ActiveGuard, Pool};
use crate::metrics::{reject, FrontendMetrics};
use crate::net;

/// What an L4 frontend's connections need, built by each reload.
pub struct Service {
    pub name: Arc<str>,
    pub pool: Arc<Pool>,
    pub idle_timeout: Option<Duration>,
    /// How bytes move (`frontends[].splice`).
    pub copy: pump::Copy,
    pub metrics: FrontendMetrics,
}

/// Relays one accepted client connection until either side ends it.
pub async fn handle(env: Env, svc: Arc<Service>, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let (backend, active) = match connect(&env, &svc.pool).await {
        Ok(x) => x,
        Err(reason) => {
            svc.metrics.rejected(reason);
            debug!(frontend = %svc.name, client.addr = %peer, reason, "closed: no backend reached");
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
        svc.idle_timeout,
        svc.copy,
        &kill,
        &env.hard_stop,
    )
    .await;
    let error = match &r.end {
        pump::End::ClientError(e) | pump::End::BackendError(e) => e.to_string(),
        _ => String::new(),
    };
    debug!(
        frontend = %svc.name,
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
/// or timed-out connect (backend faults feed passive health).
async fn connect(env: &Env, pool: &Pool) -> Result<(TcpStream, ActiveGuard), &'static str> {
    let cfg = &pool.config;
    let mut tried: Vec<usize> = Vec::with_capacity(cfg.connect_attempts as usize);
    let mut last_reason = reject::ALL_DOWN;
    while tried.len() < cfg.connect_attempts as usize {
        // A connection accepted as the drain began (or as a re-exec
        // successor took over the socket) is served like any open one; only
        // failing over to more servers stops once shutdown began.
        if !tried.is_empty() && env.shutdown.is_cancelled() {
            return Err(reject::SHUTDOWN);
        }
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let b = &pool.backends[i];
        let guard = b.enter();
        let t0 = Instant::now();
        match net::connect(b.server.addr, cfg.connect_timeout).await {
            Ok(s) => {
                b.metrics
                    .connect_duration
                    .observe(t0.elapsed().as_secs_f64());
                b.metrics.connections.inc();
                return Ok((s, guard));
            }
            Err(e) => {
                drop(guard);
                last_reason = reject::CONNECT_FAILED;
                let err = e.to_string();
                debug!(backend.addr = %b.server.key, error = %err, attempt = tried.len(), "connect failed; trying the next server");
                env.upstream_failed(b, e.fault(), &err);
            }
        }
    }
    Err(last_reason)
}
