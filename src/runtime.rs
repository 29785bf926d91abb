//! The control loop of a running apilb: reload commands (file changes,
//! SIGHUP, in-memory configs), the admin server's task, shutdown and its
//! grace; and the `Handle` callers hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::config::Config;
use crate::discovery;
use crate::reload::VipChange;
use crate::reload::{self, AdminListener, Reconciler, ReloadError};
use crate::snapshot::Shared;
use crate::vip::{self, LeaseId, VipHandle, VipMetrics};

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
    /// Re-exec: stop the VIP election, keeping address and lease for the successor.
    HandOverVip {
        reply: oneshot::Sender<Option<LeaseId>>,
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

    /// For a re-exec (SIGUSR2): stops the VIP election without removing the
    /// address or revoking the lease, and returns the lease when this node held
    /// the VIP. Pass it to the successor as `Options::vip_inherit_lease`; it must
    /// renew it within `renew_deadline`, or the address is dropped by nobody
    /// until the successor's start removes it. Call before `shutdown`.
    pub async fn hand_over_vip(&self) -> Option<LeaseId> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::HandOverVip { reply: tx }).await.ok()?;
        rx.await.ok().flatten()
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
    /// The VIP lease handed over by the process this one replaced (re-exec,
    /// `Handle::hand_over_vip`): if it still holds the election key it is kept
    /// renewing, with the address left in place.
    pub vip_inherit_lease: Option<LeaseId>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            watch_config: true,
            vip_inherit_lease: None,
        }
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
    let (discovered_tx, discovered_rx) = mpsc::channel(16);
    let mut reconciler = Reconciler::new(shared.clone(), discovered_tx);
    let source = config.source.clone();
    let admin_listener = reconciler.apply(config, None).await?;
    let mut admin = AdminTask::default();
    admin.replace(&shared, admin_listener);
    let mut vip = VipTask {
        inherit: options.vip_inherit_lease,
        ..VipTask::default()
    };
    vip.apply(&shared, reconciler.take_vip_change()).await;
    let (tx, rx) = mpsc::channel(16);
    let (changed_tx, changed_rx) = mpsc::channel(1);
    if let Some(path) = source.as_ref().filter(|_| options.watch_config) {
        reload::watch::watch_file(path.clone(), changed_tx, shared.shutdown.clone());
    }
    let ctl = Control {
        shared: shared.clone(),
        reconciler,
        admin,
        vip,
        source,
    };
    let task = tokio::spawn(ctl.run(rx, changed_rx, discovered_rx));
    Ok(Handle {
        shared,
        control: tx,
        task,
    })
}

/// The admin server's accept loop; not a child of `shutdown`: `/readyz`
/// must answer 503 and `/metrics` stay scrapeable while connections drain.
#[derive(Default)]
struct AdminTask {
    stop: Option<CancellationToken>,
}

impl AdminTask {
    /// Serves a newly bound admin listener and stops the previous one.
    fn replace(&mut self, shared: &Arc<Shared>, new: Option<AdminListener>) {
        let Some(a) = new else { return };
        let stop = CancellationToken::new();
        info!(addr = %a.bound, "admin listening");
        tokio::spawn(admin::serve(a.listener, shared.clone(), stop.clone()));
        if let Some(old) = self.stop.replace(stop) {
            old.cancel();
        }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }
}

/// The VIP election (`vip` section), owned here because changing it awaits the
/// old election's release.
#[derive(Default)]
struct VipTask {
    handle: Option<VipHandle>,
    /// Registered with the first election, kept across reloads.
    metrics: Option<VipMetrics>,
    /// The predecessor's lease (first election only).
    inherit: Option<LeaseId>,
}

impl VipTask {
    /// Carries out a committed `vip` change: the running election releases
    /// (address removed, lease revoked), then the new one, if any, starts.
    async fn apply(&mut self, shared: &Shared, change: Option<VipChange>) {
        let Some(next) = change else { return };
        if let Some(old) = self.handle.take() {
            let addr = old.config().address;
            info!(vip = %old.config().cidr(), "vip settings changed: releasing the VIP before campaigning with the new settings");
            old.release().await;
            if let Some(m) = &self.metrics {
                m.forget(addr);
            }
        }
        shared.vip.store(None);
        let Some(next) = next else { return };
        let metrics = self
            .metrics
            .get_or_insert_with(|| {
                VipMetrics::register(&shared.metrics.registry).expect("vip metrics register once")
            })
            .clone();
        let options = vip::Options {
            inherit_lease: self.inherit.take(),
        };
        let handle = next.start(
            metrics,
            shared.ready.subscribe(),
            shared.shutdown.clone(),
            options,
        );
        shared.vip.store(Some(Arc::new(handle.watch_status())));
        self.handle = Some(handle);
    }

    /// Shutdown: the address goes first, so another node takes new connections
    /// (within `retry_period`) while this one drains.
    async fn release(&mut self) {
        if let Some(h) = self.handle.take() {
            h.release().await;
        }
    }
}

struct Control {
    shared: Arc<Shared>,
    reconciler: Reconciler,
    admin: AdminTask,
    vip: VipTask,
    source: Option<PathBuf>,
}

impl Control {
    /// Runs reload commands until shutdown, then drains connections.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut changed: mpsc::Receiver<()>,
        mut discovered: mpsc::Receiver<discovery::Update>,
    ) {
        loop {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                Some(()) = changed.recv() => {
                    let _ = self.reload(false).await;
                }
                Some(u) = discovered.recv() => {
                    let pool = u.pool.clone();
                    match self.reconciler.apply_discovered(u).await {
                        Ok(a) => self.admin.replace(&self.shared, a),
                        Err(e) => warn!(pool = %pool, error = %e, "discovered servers not applied; the pool keeps its servers"),
                    }
                }
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(Command::Reload { force, reply }) => {
                        let r = self.reload(force).await;
                        if let Some(reply) = reply {
                            let _ = reply.send(r);
                        }
                    }
                    Some(Command::Apply { config, reply }) => {
                        let r = self.reconciler.apply(*config, None).await;
                        self.reconciler.record_result(r.as_ref().map(|_| ()));
                        let r = r.map(|a| self.admin.replace(&self.shared, a));
                        self.vip.apply(&self.shared, self.reconciler.take_vip_change()).await;
                        let _ = reply.send(r);
                    }
                    Some(Command::HandOverVip { reply }) => {
                        let lease = match self.vip.handle.take() {
                            Some(h) => h.hand_over().await,
                            None => None,
                        };
                        let _ = reply.send(lease);
                    }
                },
            }
        }
        self.shared.draining.store(true, Relaxed);
        self.vip.release().await;
        drain(&self.shared).await;
        self.admin.stop();
        info!("stopped");
    }

    async fn reload(&mut self, force: bool) -> Result<(), ReloadError> {
        let a = self
            .reconciler
            .reload_file(self.source.as_deref(), force)
            .await;
        self.vip
            .apply(&self.shared, self.reconciler.take_vip_change())
            .await;
        self.admin.replace(&self.shared, a?);
        Ok(())
    }
}

async fn drain(shared: &Shared) {
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
}
