//! Reloads, in three steps: `plan` (pure: what to add, keep and remove),
//! `prepare` (fallible: bind new sockets, read TLS material) and `commit`
//! (infallible: build the next snapshot beside the live one, publish it with
//! one store, then reconcile accept loops, probes and drains). The
//! `Reconciler` is the only writer of the snapshot.

mod discovered;
pub mod plan;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::balancer::{unix_now, Backend, Pool, PoolState};
use crate::config::{self, CheckKind, Config, ConfigError, HealthConfig, Mode, ServerConfig};
use crate::discovery;
use crate::handover::{Handed, Inherited};
use crate::health::{self, Monitor};
use crate::net::{self, Bound};
use crate::proxy::{http, pump, tcp, upstream::Upstream};
use crate::snapshot::{Frontend, FrontendKind, FrontendStats, Shared, Snapshot};
use crate::{listener, tls};

pub use plan::{plan, Plan};
pub use watch::DEBOUNCE;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    // The cause is part of the message (one line per error in logs and
    // `check` output), so it is not also exposed as `source`: printed as a
    // chain it would appear twice.
    #[error("{field}: cannot listen on {addr}: {error}")]
    Bind {
        field: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("{field}: {error}")]
    Tls { field: String, error: tls::TlsError },
    #[error("no config file to reload (started from an in-memory config)")]
    NoSource,
    #[error("apilb is stopping")]
    Stopped,
    #[error("vip: {0}")]
    Vip(#[from] crate::vip::VipError),
}

impl ReloadError {
    /// Every message, one per line, for logs and `apilb check`-style output.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ReloadError::Config(c) => c.errors.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

struct ListenerTask {
    /// `listen` as configured (port 0 stays 0): the key a successor finds
    /// the socket by after a re-exec.
    listen: SocketAddr,
    bound: SocketAddr,
    /// A duplicate of the accept loop's socket, kept to hand it to a
    /// re-exec successor; released when draining begins.
    handover: Option<std::net::TcpListener>,
    /// The frontend name the accept loop serves; changes on a rename.
    name: Arc<ArcSwap<String>>,
    stop: CancellationToken,
}

struct ProbeTask {
    monitor: Arc<Monitor>,
    cfg: HealthConfig,
    stop: CancellationToken,
}

/// What `prepare` made ready; `commit` consumes it without failing.
struct Prepared {
    listeners: HashMap<String, Bound>,
    admin: Option<Bound>,
    /// Frontends (and `admin`) whose socket was inherited, not bound here.
    inherited: HashSet<String>,
    /// Per http frontend: its TLS acceptor and its pool's upstream.
    http: HashMap<String, (TlsAcceptor, Arc<Upstream>)>,
    /// `Some` when `vip` changed: the election to start (`None`: no more VIP).
    vip: Option<VipChange>,
}

/// A changed `vip` section, checked (capabilities, interface, etcd TLS files):
/// the caller releases the running election and starts this one, if any.
pub type VipChange = Option<Box<crate::vip::Prepared>>;

/// A listener the caller must serve: the admin server after it (re)bound.
pub struct AdminListener {
    pub listener: TcpListener,
    pub bound: SocketAddr,
    /// `admin.listen` as configured.
    pub listen: SocketAddr,
    /// A duplicate of the socket for a re-exec successor.
    pub handover: Option<std::net::TcpListener>,
    /// The socket came from systemd or the previous process.
    pub inherited: bool,
}

/// Owns listeners and probe tasks; applies configs.
pub struct Reconciler {
    shared: Arc<Shared>,
    /// Sockets from systemd or a re-exec predecessor, taken before binding.
    inherited: Arc<Inherited>,
    listeners: HashMap<String, ListenerTask>,
    /// Keyed by (pool, server key).
    probes: HashMap<(String, String), ProbeTask>,
    pool_states: HashMap<String, Arc<PoolState>>,
    frontend_stats: HashMap<String, Arc<FrontendStats>>,
    /// Per http frontend, the route its open connections read per request.
    routes: HashMap<String, Arc<ArcSwap<http::Route>>>,
    /// The bytes of the file last applied: a file event with the same content
    /// (a touch, another file in the directory) changes nothing.
    last_bytes: Option<Vec<u8>>,
    started: bool,
    /// Discovery's overlay on the config as given: see `discovered.rs`.
    discovery: discovered::Overlay,
    /// Set by a commit whose `vip` changed; taken by the runtime.
    vip_change: Option<VipChange>,
}

impl Reconciler {
    /// `updates`: where the pools' discovery tasks report (the control loop
    /// hands what arrives to `apply_discovered`); `inherited`: sockets from
    /// systemd or a re-exec predecessor, taken before binding.
    pub fn new(
        shared: Arc<Shared>,
        updates: mpsc::Sender<discovery::Update>,
        inherited: Arc<Inherited>,
    ) -> Self {
        Reconciler {
            discovery: discovered::Overlay::new(updates),
            shared,
            inherited,
            listeners: HashMap::new(),
            probes: HashMap::new(),
            pool_states: HashMap::new(),
            frontend_stats: HashMap::new(),
            routes: HashMap::new(),
            last_bytes: None,
            started: false,
            vip_change: None,
        }
    }

    /// The VIP change the last commits left for the runtime to carry out
    /// (async: the old election releases its address and lease first).
    pub fn take_vip_change(&mut self) -> Option<VipChange> {
        self.vip_change.take()
    }

    /// Re-reads the file; with `force` false an unchanged file is a no-op.
    /// Returns a new admin listener when the admin address moved.
    pub async fn reload_file(
        &mut self,
        path: Option<&Path>,
        force: bool,
    ) -> Result<Option<AdminListener>, ReloadError> {
        let Some(path) = path else {
            return Err(ReloadError::NoSource);
        };
        let p = path.to_path_buf();
        let read = tokio::task::spawn_blocking(move || config::read_file(&p))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        let bytes = match read {
            Ok(b) => b,
            Err(e) => return self.recorded(Err(e.into())),
        };
        if !force && self.last_bytes.as_deref() == Some(&bytes[..]) {
            // The file holds what runs: a refused edit that was reverted
            // is no longer a failure.
            if self.shared.metrics.last_reload_ok.get() == 0 {
                info!(path = %path.display(), "config file matches the running config again");
                self.shared.metrics.last_reload_ok.set(1);
            }
            return Ok(None);
        }
        info!(path = %path.display(), trigger = if force { "signal" } else { "file change" }, "reloading config");
        let p = path.to_path_buf();
        let b = bytes.clone();
        let parsed = tokio::task::spawn_blocking(move || config::from_bytes(&p, &b))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        let r = match parsed {
            Ok(cfg) => self.apply(cfg, Some(bytes)).await,
            Err(e) => Err(e.into()),
        };
        self.recorded(r)
    }

    fn recorded<T>(&self, r: Result<T, ReloadError>) -> Result<T, ReloadError> {
        self.record_result(r.as_ref().map(|_| ()));
        r
    }

    /// Counts a reload's outcome in the metrics and logs a failure.
    pub fn record_result(&self, r: Result<(), &ReloadError>) {
        let m = &self.shared.metrics;
        match r {
            Ok(()) => {
                m.reloads.with_label_values(&["success"]).inc();
                info!("config reloaded");
            }
            Err(e) => {
                m.reloads.with_label_values(&["failure"]).inc();
                m.last_reload_ok.set(0);
                for line in e.lines() {
                    error!(error = %line, "config reload refused; the running config stays");
                }
            }
        }
    }

    /// Applies a checked config, all or nothing: before the snapshot store
    /// nothing live is touched; after it nothing can fail. What runs is the
    /// desired state: `cfg` with discovered servers in place of the seeds.
    pub async fn apply(
        &mut self,
        cfg: Config,
        bytes: Option<Vec<u8>>,
    ) -> Result<Option<AdminListener>, ReloadError> {
        self.discovery.load_caches(&cfg);
        let desired = self.discovery.desired(&cfg, &self.shared.snapshot.load());
        let admin = self.apply_desired(desired, true).await?;
        if bytes.is_some() {
            self.last_bytes = bytes;
        }
        self.discovery.set_base(cfg);
        self.reconcile_discovery();
        Ok(admin)
    }

    /// A pool's discovery reported a new set: applied like a reload of the
    /// same file (kept servers keep their health, new ones are probed first).
    pub async fn apply_discovered(
        &mut self,
        u: discovery::Update,
    ) -> Result<Option<AdminListener>, ReloadError> {
        let Some(prev) = self.discovery.record(&u) else {
            return Ok(None);
        };
        let base = self
            .discovery
            .base()
            .expect("record() needs a base")
            .clone();
        let desired = self.discovery.desired(&base, &self.shared.snapshot.load());
        let r = self.apply_desired(desired, false).await;
        if r.is_err() {
            self.discovery.restore(&u.pool, prev);
        }
        r
    }

    async fn apply_desired(
        &mut self,
        cfg: Config,
        reload: bool,
    ) -> Result<Option<AdminListener>, ReloadError> {
        let old = self.shared.snapshot.load_full();
        let plan = plan(self.started.then_some(&*old.config), &cfg);
        let prepared = prepare(&cfg, &plan, self.upstreams(), &self.inherited).await?;
        if self.started && old.config.workers != cfg.workers {
            warn!("workers changed; the runtime keeps its threads until the next restart");
        }
        Ok(self.commit(cfg, plan, prepared, reload))
    }

    /// Starts, restarts and stops the pools' discovery tasks.
    fn reconcile_discovery(&mut self) {
        let shared = self.shared.clone();
        self.discovery
            .reconcile(&shared.shutdown, &shared.metrics, |pool| {
                let shared = shared.clone();
                let pool: Arc<str> = pool.into();
                Arc::new(move || {
                    let snap = shared.snapshot.load();
                    let Some(p) = snap.pools.get(&pool) else {
                        return Vec::new();
                    };
                    let addrs = p.backends.iter().map(|b| (b.server.addr, b.is_healthy()));
                    let up: Vec<SocketAddr> = addrs.clone().filter(|a| a.1).map(|a| a.0).collect();
                    if up.is_empty() {
                        addrs.map(|a| a.0).collect()
                    } else {
                        up
                    }
                })
            });
    }

    /// Publishes the next snapshot and reconciles tasks. Cannot fail.
    /// `reload`: a config was applied (not only a discovery change).
    fn commit(
        &mut self,
        cfg: Config,
        plan: Plan,
        mut prep: Prepared,
        reload: bool,
    ) -> Option<AdminListener> {
        let old = self.shared.snapshot.load_full();
        let metrics = self.shared.metrics.clone();
        let series = metrics.series.write().unwrap_or_else(|p| p.into_inner());
        let removed = self.retire(&old, &plan);
        let (pools, monitors) = self.build_pools(&cfg, &old);
        let frontends = self.build_frontends(&cfg, &plan, &pools, &mut prep);
        let admin_addr = prep.admin.as_ref().map(|b| b.bound).or(old.admin_addr);
        let drains: HashMap<String, Option<Duration>> = old
            .pools
            .keys()
            .map(|n| (n.to_string(), cfg.pool(n).and_then(|p| p.drain_timeout)))
            .collect();
        let next = Arc::new(Snapshot {
            config: Arc::new(cfg),
            pools,
            frontends,
            monitors,
            admin_addr,
        });
        self.shared.snapshot.store(next.clone());
        drop(series);
        if reload {
            metrics.last_reload_ok.set(1);
            metrics.last_reload_ts.set(unix_now() as f64);
            let certs = &next.config.certificates;
            metrics.set_cert_expiries(certs.iter().map(|c| (c.file.as_path(), c.not_after)));
            for w in next.config.expiry_warnings(unix_now() as i64) {
                warn!(warning = %w, "certificate expires soon");
            }
        }

        if let Some(v) = prep.vip {
            self.vip_change = Some(v);
        }
        self.reconcile_listeners(&next, plan, prep.listeners, &prep.inherited);
        self.reconcile_probes(&next);
        self.drain_removed(removed, &drains);
        for name in next.pools.keys() {
            self.shared.pool_changed(name);
        }
        self.started = true;
        let admin_listen = next.config.admin.listen;
        prep.admin.map(|b| AdminListener {
            handover: handover_dup(&b.listener, "admin"),
            listener: TcpListener::from_std(b.listener).expect("inside the runtime"),
            bound: b.bound,
            listen: admin_listen,
            inherited: prep.inherited.contains(ADMIN_LABEL),
        })
    }

    /// Every frontend's listening socket, for a re-exec successor.
    pub fn handed(&self) -> Vec<Handed<'_>> {
        self.listeners
            .iter()
            .filter_map(|(name, t)| {
                Some(Handed {
                    fd: t.handover.as_ref()?.as_fd(),
                    label: frontend_label(name),
                    configured: t.listen,
                })
            })
            .collect()
    }

    /// Drops the duplicates kept for a successor, so that once the accept
    /// loops stop, the sockets close (unless a successor or systemd holds
    /// them) and new connections are refused instead of queued.
    pub fn release_listeners(&mut self) {
        for t in self.listeners.values_mut() {
            t.handover = None;
        }
    }

    /// Drops metric series and state of what leaves; returns removed backends.
    fn retire(&mut self, old: &Snapshot, plan: &Plan) -> Vec<Arc<Backend>> {
        let metrics = &self.shared.metrics;
        let mut removed = Vec::new();
        for (pool, servers) in &plan.removed_servers {
            let Some(op) = old.pools.get(pool.as_str()) else {
                continue;
            };
            for b in op.backends.iter().filter(|b| servers.contains(&b.server)) {
                metrics.remove_backend(pool, &b.server.key);
                removed.push(b.clone());
            }
        }
        for pool in &plan.removed_pools {
            metrics.remove_pool(pool);
            self.pool_states.remove(pool);
        }
        for fe in &plan.removed_frontends {
            self.frontend_stats.remove(fe);
            self.routes.remove(fe);
            metrics.remove_frontend(fe);
        }
        for (_, old_name) in &plan.renames {
            if self.frontend_stats.remove(old_name).is_some() {
                metrics.remove_frontend(old_name);
            }
            self.routes.remove(old_name);
        }
        removed
    }

    /// Pools of the next snapshot: kept backends carry their health; new
    /// ones get a monitor (up at process start, else down until probed).
    #[allow(clippy::type_complexity)]
    fn build_pools(
        &mut self,
        cfg: &Config,
        old: &Snapshot,
    ) -> (
        HashMap<Arc<str>, Arc<Pool>>,
        HashMap<(Arc<str>, String), Arc<Monitor>>,
    ) {
        let mut pools = HashMap::new();
        let mut monitors = HashMap::new();
        for pc in &cfg.pools {
            let name: Arc<str> = pc.name.as_str().into();
            let old_pool = old.pools.get(&name);
            let mut backends = Vec::with_capacity(pc.servers.len());
            for s in &pc.servers {
                let kept = old_pool.and_then(|op| op.backends.iter().find(|b| b.server == *s));
                let monitor = match kept.and_then(|b| old.monitor(b)) {
                    Some(m) => m.clone(),
                    None => self.new_monitor(&name, s, &pc.health),
                };
                monitor.set_config(pc.health.clone());
                backends.push(monitor.backend().clone());
                monitors.insert((name.clone(), s.key.clone()), monitor);
            }
            let state = self.pool_states.entry(pc.name.clone()).or_default().clone();
            pools.insert(name, Arc::new(Pool::new(pc.clone(), backends, state)));
        }
        (pools, monitors)
    }

    fn new_monitor(&self, pool: &Arc<str>, s: &ServerConfig, hc: &HealthConfig) -> Arc<Monitor> {
        // At process start backends begin up; one added by a reload begins
        // down until its first success (`check: none`: up at once).
        let up = !self.started || hc.check == CheckKind::None;
        let metrics = self.shared.metrics.backend(pool, &s.key);
        let b = Arc::new(Backend::new(pool.clone(), s.clone(), up, metrics));
        Monitor::new(b, hc.clone(), up, self.shared.health_events())
    }

    fn build_frontends(
        &mut self,
        cfg: &Config,
        plan: &Plan,
        pools: &HashMap<Arc<str>, Arc<Pool>>,
        prep: &mut Prepared,
    ) -> HashMap<Arc<str>, Arc<Frontend>> {
        let renamed: HashMap<&str, &str> = plan
            .renames
            .iter()
            .map(|(n, o)| (n.as_str(), o.as_str()))
            .collect();
        let mut frontends = HashMap::new();
        for fe in &cfg.frontends {
            let stats = self.stats(&fe.name, fe.max_connections);
            let bound = match prep.listeners.get(&fe.name) {
                Some(b) => b.bound,
                None => {
                    let from = renamed.get(fe.name.as_str()).copied().unwrap_or(&fe.name);
                    self.listeners[from].bound
                }
            };
            let name: Arc<str> = fe.name.as_str().into();
            let pool = pools[fe.pool.as_str()].clone();
            let kind = match (fe.mode, prep.http.remove(&fe.name)) {
                (Mode::Http, Some((acceptor, upstream))) => {
                    let settings = fe.http.clone().expect("validated: http has settings");
                    let route = http::Route::new(settings, pool.clone(), upstream);
                    FrontendKind::Http(Arc::new(http::Service {
                        name: name.clone(),
                        acceptor,
                        route: self.route(&fe.name, route),
                        metrics: stats.metrics.clone(),
                        active_streams: self.shared.metrics.http_active(&fe.name),
                    }))
                }
                _ => FrontendKind::Tcp(Arc::new(tcp::Service {
                    name: name.clone(),
                    pool: pool.clone(),
                    idle_timeout: fe.idle_timeout,
                    copy: if fe.splice {
                        pump::Copy::Auto
                    } else {
                        pump::Copy::Buffer
                    },
                    metrics: stats.metrics.clone(),
                })),
            };
            let f = Frontend {
                name: name.clone(),
                config: fe.clone(),
                pool,
                bound,
                stats,
                kind,
            };
            frontends.insert(name, Arc::new(f));
        }
        frontends
    }

    fn stats(&mut self, name: &str, max: usize) -> Arc<FrontendStats> {
        let metrics = &self.shared.metrics;
        let stats = self
            .frontend_stats
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(FrontendStats {
                    active: AtomicUsize::new(0),
                    metrics: metrics.frontend(name),
                })
            })
            .clone();
        stats.metrics.max.set(max as i64);
        stats
    }

    /// The frontend's route cell with `route` stored in it.
    fn route(&mut self, name: &str, route: http::Route) -> Arc<ArcSwap<http::Route>> {
        let route = Arc::new(route);
        match self.routes.get(name) {
            Some(cell) => {
                cell.store(route);
                cell.clone()
            }
            None => {
                let cell = Arc::new(ArcSwap::new(route));
                self.routes.insert(name.to_string(), cell.clone());
                cell
            }
        }
    }

    fn reconcile_listeners(
        &mut self,
        snap: &Snapshot,
        plan: Plan,
        bound: HashMap<String, Bound>,
        inherited: &HashSet<String>,
    ) {
        for (new_name, old_name) in plan.renames {
            if let Some(task) = self.listeners.remove(&old_name) {
                info!(from = %old_name, to = %new_name, "frontend renamed; listener kept");
                task.name.store(Arc::new(new_name.clone()));
                self.listeners.insert(new_name, task);
            }
        }
        for (name, b) in bound {
            let fe = &snap.frontends[name.as_str()];
            let stop = self.shared.shutdown.child_token();
            let name_cell = Arc::new(ArcSwap::from_pointee(name.clone()));
            let handover = handover_dup(&b.listener, &name);
            let listener = TcpListener::from_std(b.listener).expect("inside the runtime");
            let mode = match fe.kind {
                FrontendKind::Tcp(_) => "tcp",
                FrontendKind::Http(_) => "http",
            };
            let socket = if inherited.contains(&frontend_label(&name)) {
                "inherited"
            } else {
                "bound"
            };
            info!(frontend = %name, addr = %b.bound, mode, pool = %fe.config.pool, socket, "frontend listening");
            tokio::spawn(listener::serve(
                listener,
                name_cell.clone(),
                self.shared.clone(),
                stop.clone(),
            ));
            let task = ListenerTask {
                listen: fe.config.listen,
                bound: b.bound,
                handover,
                name: name_cell,
                stop,
            };
            if let Some(old) = self.listeners.insert(name.clone(), task) {
                info!(frontend = %name, addr = %old.bound, "old listener closed (listen address changed)");
                old.stop.cancel();
            }
        }
        self.listeners.retain(|name, task| {
            let keep = snap.frontends.contains_key(name.as_str());
            if !keep {
                info!(frontend = %name, addr = %task.bound, "frontend removed; stopped accepting, open connections continue");
                task.stop.cancel();
            }
            keep
        });
    }

    /// One probe task per backend; restarted when its settings changed.
    fn reconcile_probes(&mut self, snap: &Snapshot) {
        for ((pool, key), monitor) in &snap.monitors {
            let k = (pool.to_string(), key.clone());
            let hc = &snap.pools[pool].config.health;
            if let Some(t) = self.probes.get(&k) {
                if Arc::ptr_eq(&t.monitor, monitor) && t.cfg == *hc {
                    continue;
                }
                t.stop.cancel();
            }
            let stop = self.shared.shutdown.child_token();
            health::spawn(monitor.clone(), stop.clone());
            self.probes.insert(
                k,
                ProbeTask {
                    monitor: monitor.clone(),
                    cfg: hc.clone(),
                    stop,
                },
            );
        }
        self.probes.retain(|(pool, key), t| {
            let keep = snap
                .monitors
                .contains_key(&(pool.as_str().into(), key.clone()));
            if !keep {
                t.stop.cancel();
            }
            keep
        });
    }

    /// Removed backends get no new connections; open ones continue, or are
    /// closed after the pool's `drain_timeout`.
    fn drain_removed(
        &self,
        removed: Vec<Arc<Backend>>,
        drains: &HashMap<String, Option<Duration>>,
    ) {
        for b in removed {
            b.mark_removed();
            info!(pool = %b.pool, server = %b.server.key, open = b.active(), "server removed; no new connections, open ones continue");
            let Some(Some(after)) = drains.get(&*b.pool) else {
                continue;
            };
            let after = *after;
            let stop = self.shared.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(after) => {
                        if b.active() > 0 {
                            info!(pool = %b.pool, server = %b.server.key, open = b.active(), "drain_timeout over; closing connections to removed server");
                        }
                        b.close_connections();
                    }
                }
            });
        }
    }
}

impl Reconciler {
    /// The live upstream of every pool an L7 frontend uses, by pool name:
    /// the next reload keeps those whose TLS did not change.
    fn upstreams(&self) -> HashMap<String, Arc<Upstream>> {
        self.routes
            .values()
            .map(|r| {
                let r = r.load();
                (r.pool.config.name.clone(), r.upstream.clone())
            })
            .collect()
    }
}

/// The fallible step: binds every new socket and reads TLS material (off the
/// async threads). Nothing live is touched.
async fn prepare(
    cfg: &Config,
    plan: &Plan,
    old: HashMap<String, Arc<Upstream>>,
    inherited: &Inherited,
) -> Result<Prepared, ReloadError> {
    let mut listeners = HashMap::new();
    let mut taken = HashSet::new();
    let mut listen = |field: String, label: String, addr: SocketAddr| {
        let (b, was_inherited) = take_or_bind(inherited, &label, addr)
            .map_err(|error| ReloadError::Bind { field, addr, error })?;
        if was_inherited {
            taken.insert(label);
        }
        Ok::<_, ReloadError>(b)
    };
    for (i, name, addr) in &plan.bind {
        let b = listen(
            format!("frontends[{i}].listen"),
            frontend_label(name),
            *addr,
        )?;
        listeners.insert(name.clone(), b);
    }
    let admin = match plan.admin_bind {
        Some(addr) => Some(listen("admin.listen".into(), ADMIN_LABEL.into(), addr)?),
        None => None,
    };
    let inherited = taken;
    let c = cfg.clone();
    let http = tokio::task::spawn_blocking(move || http_material(&c, &old))
        .await
        .map_err(|_| ReloadError::Stopped)??;
    let vip = match plan.vip_changed {
        true => Some(
            cfg.vip
                .clone()
                .map(|v| crate::vip::prepare(v).map(Box::new))
                .transpose()?,
        ),
        false => None,
    };
    Ok(Prepared {
        listeners,
        admin,
        inherited,
        http,
        vip,
    })
}

/// The hand-over label of the admin socket.
pub const ADMIN_LABEL: &str = "admin";

/// The hand-over label of a frontend's socket.
pub fn frontend_label(name: &str) -> String {
    format!("frontend/{name}")
}

/// An inherited socket for `label`/`addr` if there is one (tuned like ours),
/// else a freshly bound one. The flag says which.
fn take_or_bind(
    inherited: &Inherited,
    label: &str,
    addr: SocketAddr,
) -> std::io::Result<(Bound, bool)> {
    match inherited.take(label, addr) {
        Some(l) => {
            net::tune_socket(&socket2::SockRef::from(&l));
            Ok((Bound::from_listener(l)?, true))
        }
        None => Ok((net::bind(addr)?, false)),
    }
}

/// A duplicate of a listening socket to hand to a re-exec successor; without
/// one (descriptor limit) a re-exec must bind that address itself and fails.
fn handover_dup(l: &std::net::TcpListener, what: &str) -> Option<std::net::TcpListener> {
    l.try_clone()
        .map_err(|e| warn!(listener = what, error = %e, "cannot keep a copy of the socket for a re-exec"))
        .ok()
}

/// TLS acceptors of L7 frontends and upstreams of their pools.
fn http_material(
    cfg: &Config,
    old: &HashMap<String, Arc<Upstream>>,
) -> Result<HashMap<String, (TlsAcceptor, Arc<Upstream>)>, ReloadError> {
    let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
    let mut out = HashMap::new();
    for (i, fe) in cfg.frontends.iter().enumerate() {
        let Some(settings) = &fe.http else { continue };
        let up = match upstreams.get(fe.pool.as_str()) {
            Some(u) => u.clone(),
            None => {
                let pi = cfg
                    .pools
                    .iter()
                    .position(|p| p.name == fe.pool)
                    .unwrap_or(0);
                let pc = &cfg.pools[pi];
                let prev = old.get(&pc.name).map(|u| &**u);
                let u = Upstream::rebuild(pc, prev).map_err(|error| ReloadError::Tls {
                    field: format!("pools[{pi}].tls"),
                    error,
                })?;
                let u = Arc::new(u);
                upstreams.insert(fe.pool.as_str(), u.clone());
                u
            }
        };
        let acceptor = http::acceptor(settings).map_err(|error| ReloadError::Tls {
            field: format!("frontends[{i}].tls"),
            error,
        })?;
        out.insert(fe.name.clone(), (acceptor, up));
    }
    Ok(out)
}
