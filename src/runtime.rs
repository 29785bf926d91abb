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
use crate::reload::{self, AdminListener, Reconciler, ReloadError};
use crate::snapshot::Shared;

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            watch_config: true,
            process: Process::current(),
            inherited: Arc::default(),
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
    let (tx, rx) = mpsc::channel(16);
    let (changed_tx, changed_rx) = mpsc::channel(1);
    if let Some(path) = source.as_ref().filter(|_| options.watch_config) {
        reload::watch::watch_file(path.clone(), changed_tx, shared.shutdown.clone());
    }
    let ctl = Control {
        shared: shared.clone(),
        reconciler,
        admin,
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

struct Control {
    shared: Arc<Shared>,
    reconciler: Reconciler,
    admin: AdminTask,
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
                        let _ = reply.send(r.map(|a| self.admin.replace(&self.shared, a)));
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
        let spawn = handover::spawn_successor(&self.process, &sockets, handover::READY_TIMEOUT);
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
                handover::notify(&format!("STATUS=serving; the last re-exec failed: {e}"));
            }
        }
        r
    }

    async fn reload(&mut self, force: bool) -> Result<(), ReloadError> {
        let a = self
            .reconciler
            .reload_file(self.source.as_deref(), force)
            .await?;
        self.admin.replace(&self.shared, a);
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
