//! The running daemon: the shared state every task sees, the snapshot type, the
//! control task (reloads, shutdown and its grace) and the `Handle` callers hold.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::balancer::Pool;
use crate::config::{AllDownPolicy, Config, FrontendConfig};
use crate::metrics::{FrontendMetrics, Metrics};
use crate::reload::{self, Reconciler, ReloadError};

/// Everything a connection needs, published whole by `reload` with one store.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: HashMap<Arc<str>, Arc<Pool>>,
    pub frontends: HashMap<Arc<str>, Arc<Frontend>>,
    /// Where the admin server really listens (port 0 resolved).
    pub admin_addr: Option<SocketAddr>,
}

impl Snapshot {
    pub fn empty() -> Self {
        Snapshot {
            config: Arc::new(Config {
                source: None,
                admin: crate::config::AdminConfig {
                    listen: ([127, 0, 0, 1], 0).into(),
                },
                shutdown_grace: crate::config::DEFAULT_SHUTDOWN_GRACE,
                workers: None,
                frontends: Vec::new(),
                pools: Vec::new(),
            }),
            pools: HashMap::new(),
            frontends: HashMap::new(),
            admin_addr: None,
        }
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
    /// `mode: http` only: TLS acceptor and upstream connections.
    pub http: Option<Arc<crate::proxy::http::HttpRuntime>>,
}

/// Per-frontend counters that outlive reloads (keyed by frontend name).
pub struct FrontendStats {
    /// Open client connections, checked against `max_connections`.
    pub active: AtomicUsize,
    pub metrics: FrontendMetrics,
}

/// State shared by every task of one apilb instance.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    /// Cancelled at shutdown: accept loops and probes stop.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace is over: every open connection closes.
    pub hard_stop: CancellationToken,
    /// Client connection tasks, waited for during the grace.
    pub connections: TaskTracker,
    /// True from the moment shutdown begins (admin `/readyz` turns 503).
    pub draining: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            connections: TaskTracker::new(),
            draining: AtomicBool::new(false),
        }
    }

    /// A backend of `pool` changed state (or the pool was rebuilt): update the
    /// pool gauges and log an all-down transition exactly once.
    pub fn pool_changed(&self, pool: &str) {
        let snap = self.snapshot.load();
        let Some(p) = snap.pools.get(pool) else {
            return;
        };
        let up = p.up_count();
        let (g_up, g_down) = self.metrics.pool_gauges(pool);
        g_up.set(up as i64);
        let down = up == 0;
        g_down.set(down as i64);
        if p.state.all_down.swap(down, Relaxed) != down {
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
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
}

pub(crate) enum Command {
    /// Re-read the config file; `force` applies it even if unchanged (SIGHUP).
    Reload {
        force: bool,
        reply: Option<oneshot::Sender<Result<(), ReloadError>>>,
    },
    /// Apply a config given in memory (the demo, tests).
    Apply {
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), ReloadError>>,
    },
}

/// A running apilb. Dropping it does not stop it; call `shutdown`.
pub struct Handle {
    shared: Arc<Shared>,
    control: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Handle {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address a frontend really listens on.
    pub fn frontend_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .snapshot
            .load()
            .frontends
            .get(name)
            .map(|f| f.bound)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.shared.snapshot.load().admin_addr
    }

    /// Re-reads the config file and applies it (what SIGHUP does).
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Reload {
            force: true,
            reply: Some(tx),
        })
        .await?;
        rx.await.map_err(|_| ReloadError::Stopped)?
    }

    /// Applies an in-memory config as a reload would.
    pub async fn apply(&self, config: Config) -> Result<(), ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Apply {
            config: Box::new(config),
            reply: tx,
        })
        .await?;
        rx.await.map_err(|_| ReloadError::Stopped)?
    }

    async fn send(&self, cmd: Command) -> Result<(), ReloadError> {
        self.control
            .send(cmd)
            .await
            .map_err(|_| ReloadError::Stopped)
    }

    /// A sender other tasks (the SIGHUP listener) can use to ask for a reload.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.control.clone())
    }

    /// Begins a graceful shutdown: stop accepting now, drain up to the grace.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Waits until the instance has fully stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Asks a running instance to reload (cheap to clone).
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<Command>);

impl Reloader {
    pub async fn reload(&self) {
        let _ = self
            .0
            .send(Command::Reload {
                force: true,
                reply: None,
            })
            .await;
    }
}

/// How an instance is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch the config file and reload when its content changes. When off,
    /// only SIGHUP (or `Handle::reload`) reloads.
    pub watch_config: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { watch_config: true }
    }
}

/// Starts apilb with a checked config and default options.
pub async fn start(config: Config) -> Result<Handle, ReloadError> {
    start_with(config, Options::default()).await
}

/// Starts apilb with a checked config: binds every listener (an error here
/// means nothing was started), starts probes and, when the config came from a
/// file, watches that file for changes.
pub async fn start_with(config: Config, options: Options) -> Result<Handle, ReloadError> {
    let shared = Arc::new(Shared::new());
    let mut reconciler = Reconciler::new(shared.clone());
    let source = config.source.clone();
    reconciler.apply(config, None).await?;
    let (tx, rx) = mpsc::channel(16);
    if let Some(path) = source.as_ref().filter(|_| options.watch_config) {
        reload::watch_file(path.clone(), tx.clone(), shared.shutdown.clone());
    }
    let task = tokio::spawn(control(shared.clone(), reconciler, rx, source));
    Ok(Handle {
        shared,
        control: tx,
        task,
    })
}

/// Runs reload commands until shutdown, then drains connections.
async fn control(
    shared: Arc<Shared>,
    mut reconciler: Reconciler,
    mut rx: mpsc::Receiver<Command>,
    source: Option<PathBuf>,
) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Command::Reload { force, reply }) => {
                    let r = reconciler.reload_file(source.as_deref(), force).await;
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Some(Command::Apply { config, reply }) => {
                    let r = reconciler.apply(*config, None).await;
                    reconciler.record_result(&r);
                    let _ = reply.send(r);
                }
            },
        }
    }
    drain(&shared, &mut reconciler).await;
}

async fn drain(shared: &Shared, reconciler: &mut Reconciler) {
    shared.draining.store(true, Relaxed);
    let grace = shared.snapshot.load().config.shutdown_grace;
    // Accept loops and probes are children of `shutdown`: already stopping.
    shared.connections.close();
    let open = shared.connections.len();
    info!(open, grace = %humantime::format_duration(grace), "shutting down: stopped accepting, draining open connections");
    if tokio::time::timeout(grace, shared.connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = shared.connections.len(),
            "shutdown grace is over; closing the connections still open"
        );
        shared.hard_stop.cancel();
        // Pumps end at once on hard_stop; bound the wait anyway.
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.connections.wait()).await;
    }
    reconciler.stop_admin();
    info!("stopped");
}
