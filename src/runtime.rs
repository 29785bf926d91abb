//! The control loop of a running apilb: reload commands (file changes,
//! SIGHUP, in-memory configs), re-execs (SIGUSR2), the admin server's task,
//! shutdown and its grace; and the `Handle` callers hold.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin;
use crate::config::Config;
use crate::discovery;
use crate::handover::{self, Handed, HandoverError, Inherited, Process};
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
    /// Start the successor, hand it every listening socket and drain once
    /// it serves (SIGUSR2); the reply is its pid.
    Reexec {
        reply: oneshot::Sender<Result<u32, HandoverError>>,
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

    /// Re-executes (what SIGUSR2 does): on success the new process serves
    /// and this one drains; on failure nothing changed. Outcomes are logged
    /// and counted by the control task.
    pub async fn reexec(&self) -> Result<u32, HandoverError> {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Command::Reexec { reply: tx }).await.is_err() {
            return Err(HandoverError::Abandoned);
        }
        rx.await.unwrap_or(Err(HandoverError::Abandoned))
    }
}

/// How an instance is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch the config file and reload when its content changes. When off,
    /// only SIGHUP (or `Handle::reload`) reloads.
    pub watch_config: bool,
    /// This process: its generation, start time, and how to re-exec it.
    pub process: Process,
    /// Listening sockets from systemd or a re-exec predecessor; those the
    /// first config does not use are closed after start.
    pub inherited: Arc<Inherited>,
    /// The VIP lease handed over by the process this one replaced (re-exec,
    /// `Handle::hand_over_vip`): if it still holds the election key it is kept
    /// renewing, with the address left in place.
    pub vip_inherit_lease: Option<LeaseId>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            watch_config: true,
            process: Process::current(),
            inherited: Arc::default(),
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
    shared
        .metrics
        .generation
        .set(options.process.generation as i64);
    shared.metrics.started.set(options.process.started_unix());
    let (discovered_tx, discovered_rx) = mpsc::channel(16);
    let mut reconciler = Reconciler::new(shared.clone(), discovered_tx, options.inherited.clone());
    let source = config.source.clone();
    let admin_listener = reconciler.apply(config, None).await?;
    for l in options.inherited.leftovers() {
        warn!(addr = %l.local, from = %l.origin, name = l.label.as_deref().unwrap_or(""), "closing an inherited socket no listener of the config uses");
    }
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
        process: options.process,
        handed_over: false,
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
    /// `admin.listen` as configured and a duplicate of the socket, for a
    /// re-exec successor.
    handover: Option<(SocketAddr, std::net::TcpListener)>,
}

impl AdminTask {
    /// Serves a newly bound admin listener and stops the previous one.
    fn replace(&mut self, shared: &Arc<Shared>, new: Option<AdminListener>) {
        let Some(a) = new else { return };
        let stop = CancellationToken::new();
        let socket = if a.inherited { "inherited" } else { "bound" };
        info!(addr = %a.bound, socket, "admin listening");
        tokio::spawn(admin::serve(a.listener, shared.clone(), stop.clone()));
        self.handover = a.handover.map(|l| (a.listen, l));
        if let Some(old) = self.stop.replace(stop) {
            old.cancel();
        }
    }

    fn handed(&self) -> Option<Handed<'_>> {
        self.handover.as_ref().map(|(listen, l)| Handed {
            fd: l.as_fd(),
            label: reload::ADMIN_LABEL.into(),
            configured: *listen,
        })
    }

    fn stop(&mut self) {
        self.handover = None;
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

    /// Campaigns again after a failed re-exec, going on with `lease` when
    /// the election key is still bound to it (the address never moved).
    async fn resume(
        &mut self,
        shared: &Shared,
        cfg: crate::config::VipConfig,
        lease: Option<LeaseId>,
    ) {
        self.inherit = lease;
        match vip::prepare(cfg) {
            Ok(p) => self.apply(shared, Some(Some(Box::new(p)))).await,
            Err(e) => error!(error = %e, "cannot resume the VIP election after a failed re-exec"),
        }
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
    process: Process,
    /// A successor took over: drain without telling systemd we stop.
    handed_over: bool,
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
                    Some(Command::Reexec { reply }) => {
                        let _ = reply.send(self.reexec().await);
                    }
                },
            }
        }
        self.reconciler.release_listeners();
        if !self.handed_over {
            handover::notify("STOPPING=1\nSTATUS=draining open connections");
        }
        self.shared.draining.store(true, Relaxed);
        self.vip.release().await;
        drain(&self.shared).await;
        self.admin.stop();
        info!("stopped");
    }

    /// Starts the successor with every listening socket and waits until it
    /// serves; then stops this process's admin server and begins the drain.
    /// On failure this process serves on, unchanged.
    async fn reexec(&mut self) -> Result<u32, HandoverError> {
        let mut sockets = self.reconciler.handed();
        sockets.extend(self.admin.handed());
        info!(
            exe = %self.process.exe().map(|p| p.display().to_string()).unwrap_or_default(),
            sockets = sockets.len(),
            generation = self.process.generation + 1,
            "re-exec: starting the new process"
        );
        // The VIP stays with this node: the election stops without a release
        // (address kept, lease not revoked) and the successor renews the same
        // lease; if it fails, this process takes the lease back.
        let vip_cfg = self.vip.handle.as_ref().map(|h| h.config().clone());
        let lease = match self.vip.handle.take() {
            Some(h) => h.hand_over().await,
            None => None,
        };
        let env: Vec<(&str, String)> = lease
            .map(|l| (handover::ENV_VIP_LEASE, l.to_string()))
            .into_iter()
            .collect();
        let spawn =
            handover::spawn_successor_with(&self.process, &sockets, &env, handover::READY_TIMEOUT);
        let r = tokio::select! {
            r = spawn => r,
            _ = self.shared.shutdown.cancelled() => Err(HandoverError::Abandoned),
        };
        drop(sockets);
        let m = &self.shared.metrics;
        match &r {
            Ok(pid) => {
                m.reexecs.with_label_values(&["success"]).inc();
                info!(new_pid = pid, "re-exec: the new process serves; draining");
                // This process is still the main PID: systemd accepts the
                // change from it regardless of NotifyAccess.
                handover::notify(&format!(
                    "MAINPID={pid}\nSTATUS=handed over to pid {pid}; draining"
                ));
                self.handed_over = true;
                self.admin.stop();
                self.shared.shutdown.cancel();
            }
            Err(e) => {
                m.reexecs.with_label_values(&["failure"]).inc();
                error!(error = %e, "re-exec failed; this process keeps serving");
                if let Some(cfg) = vip_cfg {
                    self.vip.resume(&self.shared, cfg, lease).await;
                }
                handover::notify(&format!("STATUS=serving; the last re-exec failed: {e}"));
            }
        }
        r
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
