//! The runtime model every task reads: the `Snapshot` (config, pools,
//! frontends) published whole with one store, and `Shared`, the process-wide
//! state around it (metrics, shutdown tokens, the connection tracker).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::balancer::{Backend, Pool};
use crate::config::{AllDownPolicy, Config, FrontendConfig};
use crate::health::{self, Monitor};
use crate::metrics::{FrontendMetrics, Metrics};
use crate::proxy::{self, Env};

/// Everything a connection needs, published whole by `reload` with one store.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: HashMap<Arc<str>, Arc<Pool>>,
    pub frontends: HashMap<Arc<str>, Arc<Frontend>>,
    /// Health monitors by (pool, server key): `/status` reads the last probe.
    pub monitors: HashMap<(Arc<str>, String), Arc<Monitor>>,
    /// Where the admin server really listens (port 0 resolved).
    pub admin_addr: Option<SocketAddr>,
}

impl Snapshot {
    pub fn empty() -> Self {
        Snapshot {
            config: Arc::new(Config::empty()),
            pools: HashMap::new(),
            frontends: HashMap::new(),
            monitors: HashMap::new(),
            admin_addr: None,
        }
    }

    /// The health monitor of a backend, if it has one.
    pub fn monitor(&self, b: &Backend) -> Option<&Arc<Monitor>> {
        self.monitors.get(&(b.pool.clone(), b.server.key.clone()))
    }
}

/// A frontend as the current snapshot sees it.
pub struct Frontend {
    pub name: Arc<str>,
    pub config: FrontendConfig,
    pub pool: Arc<Pool>,
    /// Where it really listens (port 0 resolved).
    pub bound: SocketAddr,
    pub stats: Arc<FrontendStats>,
    pub kind: FrontendKind,
}

/// What serves a frontend's accepted connections.
pub enum FrontendKind {
    /// `mode: tcp`: L4 relay.
    Tcp(Arc<proxy::tcp::Service>),
    /// `mode: http`: TLS termination and per-request balancing.
    Http(Arc<proxy::http::Service>),
}

/// Per-frontend counters that outlive reloads (keyed by frontend name).
pub struct FrontendStats {
    /// Open client connections (and tunnels), checked against `max_connections`.
    pub active: AtomicUsize,
    pub metrics: FrontendMetrics,
}

/// State shared by every task of one apilb instance.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    /// Cancelled at shutdown: accept loops and probes stop.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace is over: every open connection closes.
    pub hard_stop: CancellationToken,
    /// Client connection tasks, waited for during the grace.
    pub connections: TaskTracker,
    /// True from the moment shutdown begins (admin `/readyz` turns 503).
    pub draining: AtomicBool,
    /// Whether some pool has an up backend (the VIP's `require_ready`).
    pub ready: tokio::sync::watch::Sender<bool>,
    /// The VIP election's status while `vip` is configured (admin `/status`).
    pub vip: arc_swap::ArcSwapOption<tokio::sync::watch::Receiver<crate::vip::VipStatus>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            metrics: Arc::new(Metrics::new()),
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            connections: TaskTracker::new(),
            draining: AtomicBool::new(false),
            ready: tokio::sync::watch::channel(true).0,
            vip: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The view of this process that proxy services get.
    pub fn env(&self) -> Env {
        Env {
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            hard_stop: self.hard_stop.clone(),
            tasks: self.connections.clone(),
        }
    }

    /// The `health::Events` that keep pool gauges and the all-down log.
    pub fn health_events(self: &Arc<Self>) -> Arc<dyn health::Events> {
        Arc::new(PoolEvents(Arc::downgrade(self)))
    }

    /// A backend of `pool` changed state (or the pool was rebuilt): update the
    /// pool gauges and log an all-down transition exactly once.
    pub fn pool_changed(&self, pool: &str) {
        let snap = self.snapshot.load();
        let Some(p) = snap.pools.get(pool) else {
            return;
        };
        let up = p.up_count();
        let ready = snap.pools.values().any(|p| p.up_count() > 0);
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
        let (g_up, g_down) = self.metrics.pool_gauges(pool);
        g_up.set(up as i64);
        let down = up == 0;
        g_down.set(down as i64);
        if p.state.all_down.swap(down, Relaxed) == down {
            return;
        }
        if down {
            let what = match p.config.when_all_down {
                AllDownPolicy::TryAll => {
                    "spreading new connections over every server (when_all_down: try-all)"
                }
                AllDownPolicy::Reject => "rejecting new connections (when_all_down: reject)",
            };
            warn!(
                pool,
                servers = p.backends.len(),
                "no backend of the pool is up; {what}"
            );
        } else {
            info!(pool, up, "pool has an up backend again");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
}

struct PoolEvents(Weak<Shared>);

impl health::Events for PoolEvents {
    fn backend_changed(&self, backend: &Backend, _up: bool) {
        if let Some(shared) = self.0.upgrade() {
            shared.pool_changed(&backend.pool);
        }
    }
}
