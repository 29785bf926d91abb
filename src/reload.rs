//! Reloads: watching the config file, building the next snapshot beside the
//! live one, publishing it with one store, and reconciling listeners and probes.
//! The `Reconciler` is the only writer of the snapshot.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::balancer::{unix_now, Backend, Pool, PoolState};
use crate::config::{self, CheckKind, Config, ConfigError, HealthConfig};
use crate::runtime::{Command, Frontend, FrontendStats, Shared, Snapshot};
use crate::{admin, health, proxy};

/// How long file events are collected before one reload (editors write in bursts).
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// Listen backlog for frontends: a reconnect storm after an apiserver restart
/// must not overflow it.
pub const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{field}: cannot listen on {addr}: {source}")]
    Bind {
        field: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{field}: {source}")]
    Tls {
        field: String,
        source: crate::tls::TlsError,
    },
    #[error("no config file to reload (started from an in-memory config)")]
    NoSource,
    #[error("apilb is stopping")]
    Stopped,
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
    /// `listen` as configured (port 0 stays 0: the same listener across reloads).
    listen: SocketAddr,
    bound: SocketAddr,
    /// The frontend name the accept loop serves; changes on a rename.
    name: Arc<ArcSwap<String>>,
    stop: CancellationToken,
}

struct ProbeTask {
    cfg: HealthConfig,
    stop: CancellationToken,
}

struct AdminTask {
    listen: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
}

/// Owns listeners, probe tasks and the admin server; applies configs.
pub struct Reconciler {
    shared: Arc<Shared>,
    listeners: HashMap<String, ListenerTask>,
    probes: HashMap<(String, String), ProbeTask>,
    admin: Option<AdminTask>,
    pool_states: HashMap<String, Arc<PoolState>>,
    frontend_stats: HashMap<String, Arc<FrontendStats>>,
    /// The bytes of the file last applied: a file event with the same content
    /// (a touch, another file in the directory) changes nothing.
    last_bytes: Option<Vec<u8>>,
    started: bool,
}

/// A listener bound during the fallible phase of a reload.
struct Bound {
    listener: std::net::TcpListener,
    bound: SocketAddr,
}

fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY and keepalive from the listener
    // (Linux): no per-connection setsockopt on the accept path.
    crate::proxy::tcp::tune_socket(&sock);
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    let listener: std::net::TcpListener = sock.into();
    let bound = listener.local_addr()?;
    Ok(Bound { listener, bound })
}

impl Reconciler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Reconciler {
            shared,
            listeners: HashMap::new(),
            probes: HashMap::new(),
            admin: None,
            pool_states: HashMap::new(),
            frontend_stats: HashMap::new(),
            last_bytes: None,
            started: false,
        }
    }

    /// Re-reads the file; with `force` false an unchanged file is a no-op.
    pub async fn reload_file(
        &mut self,
        path: Option<&Path>,
        force: bool,
    ) -> Result<(), ReloadError> {
        let Some(path) = path else {
            return Err(ReloadError::NoSource);
        };
        let p = path.to_path_buf();
        let read = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&p).map_err(|e| {
                ConfigError::single(p.display().to_string(), format!("cannot read config: {e}"))
            })?;
            Ok::<_, ConfigError>(bytes)
        })
        .await
        .map_err(|_| ReloadError::Stopped)?;
        let bytes = match read {
            Ok(b) => b,
            Err(e) => {
                let r = Err(e.into());
                self.record_result(&r);
                return r;
            }
        };
        if !force && self.last_bytes.as_deref() == Some(&bytes[..]) {
            return Ok(());
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
        self.record_result(&r);
        r
    }

    /// Counts a reload's outcome in the metrics and logs a failure.
    pub fn record_result(&self, r: &Result<(), ReloadError>) {
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

    /// Applies a checked config, all or nothing. Before the snapshot store
    /// nothing live is touched; after it nothing can fail.
    pub async fn apply(&mut self, cfg: Config, bytes: Option<Vec<u8>>) -> Result<(), ReloadError> {
        // Phase 1, fallible: bind every new listener.
        let mut new_listeners: HashMap<String, Bound> = HashMap::new();
        let mut renames: HashMap<String, String> = HashMap::new(); // new name -> old name
        let kept_names: HashSet<&str> = cfg.frontends.iter().map(|f| f.name.as_str()).collect();
        for (i, fe) in cfg.frontends.iter().enumerate() {
            if let Some(old) = self.listeners.get(&fe.name) {
                if old.listen == fe.listen {
                    continue;
                }
            }
            // A renamed frontend on the same address keeps its socket.
            if fe.listen.port() != 0 {
                if let Some((old_name, _)) = self
                    .listeners
                    .iter()
                    .find(|(n, l)| l.listen == fe.listen && !kept_names.contains(n.as_str()))
                {
                    renames.insert(fe.name.clone(), old_name.clone());
                    continue;
                }
            }
            match bind(fe.listen) {
                Ok(b) => {
                    new_listeners.insert(fe.name.clone(), b);
                }
                Err(source) => {
                    return Err(ReloadError::Bind {
                        field: format!("frontends[{i}].listen"),
                        addr: fe.listen,
                        source,
                    })
                }
            }
        }
        let admin_changed = self.admin.as_ref().map(|a| a.listen) != Some(cfg.admin.listen);
        let new_admin = if admin_changed {
            Some(bind(cfg.admin.listen).map_err(|source| ReloadError::Bind {
                field: "admin.listen".into(),
                addr: cfg.admin.listen,
                source,
            })?)
        } else {
            None
        };

        // TLS material of L7 frontends and their pools, read fresh each reload.
        let mut upstreams: HashMap<String, Arc<crate::proxy::upstream::Upstream>> = HashMap::new();
        let mut http_rts: HashMap<String, Arc<crate::proxy::http::HttpRuntime>> = HashMap::new();
        for (i, fe) in cfg.frontends.iter().enumerate() {
            let Some(settings) = &fe.http else { continue };
            let pc = cfg.pool(&fe.pool).expect("validated");
            let up = match upstreams.get(&fe.pool) {
                Some(u) => u.clone(),
                None => {
                    let pi = cfg
                        .pools
                        .iter()
                        .position(|p| p.name == fe.pool)
                        .unwrap_or(0);
                    let u =
                        Arc::new(crate::proxy::upstream::Upstream::new(pc).map_err(|source| {
                            ReloadError::Tls {
                                field: format!("pools[{pi}].tls"),
                                source,
                            }
                        })?);
                    upstreams.insert(fe.pool.clone(), u.clone());
                    u
                }
            };
            let rt = crate::proxy::http::HttpRuntime::new(settings, up).map_err(|source| {
                ReloadError::Tls {
                    field: format!("frontends[{i}].tls"),
                    source,
                }
            })?;
            http_rts.insert(fe.name.clone(), Arc::new(rt));
        }

        // Phase 2: build the next snapshot beside the live one.
        let old = self.shared.snapshot.load_full();
        if self.started && old.config.workers != cfg.workers {
            warn!("workers changed; the runtime keeps its threads until the next restart");
        }
        let metrics = &self.shared.metrics;
        let series = metrics.series.write().unwrap_or_else(|p| p.into_inner());
        let mut removed: Vec<Arc<Backend>> = Vec::new();
        for (name, pool) in &old.pools {
            let new_pool = cfg.pool(name);
            for b in &pool.backends {
                let stays = new_pool.is_some_and(|np| np.servers.iter().any(|s| *s == b.server));
                if !stays {
                    metrics.remove_backend(name, &b.server.key);
                    removed.push(b.clone());
                }
            }
            if new_pool.is_none() {
                metrics.remove_pool(name);
                self.pool_states.remove(&**name);
            }
        }
        let mut pools: HashMap<Arc<str>, Arc<Pool>> = HashMap::new();
        for pc in &cfg.pools {
            let name: Arc<str> = pc.name.as_str().into();
            let old_pool = old.pools.get(&name);
            let backends = pc
                .servers
                .iter()
                .map(|s| {
                    let kept = old_pool.and_then(|op| op.backends.iter().find(|b| b.server == *s));
                    match kept {
                        Some(b) => b.clone(),
                        None => {
                            // At process start backends begin up; one added
                            // by a reload begins down until its first success.
                            let up = !self.started || pc.health.check == CheckKind::None;
                            Arc::new(Backend::new(
                                name.clone(),
                                s.clone(),
                                up,
                                metrics.backend(&name, &s.key),
                            ))
                        }
                    }
                })
                .collect();
            let state = self.pool_states.entry(pc.name.clone()).or_default().clone();
            pools.insert(name, Arc::new(Pool::new(pc.clone(), backends, state)));
        }
        let old_fe_names: Vec<String> = self.frontend_stats.keys().cloned().collect();
        for n in old_fe_names {
            if !kept_names.contains(n.as_str()) {
                self.frontend_stats.remove(&n);
                metrics.remove_frontend(&n);
            }
        }
        let mut frontends = HashMap::new();
        for fe in &cfg.frontends {
            let stats = self
                .frontend_stats
                .entry(fe.name.clone())
                .or_insert_with(|| {
                    Arc::new(FrontendStats {
                        active: AtomicUsize::new(0),
                        metrics: metrics.frontend(&fe.name),
                    })
                })
                .clone();
            stats.metrics.max.set(fe.max_connections as i64);
            let bound = match new_listeners.get(&fe.name) {
                Some(b) => b.bound,
                None => {
                    let from = renames.get(&fe.name).unwrap_or(&fe.name);
                    self.listeners[from].bound
                }
            };
            let name: Arc<str> = fe.name.as_str().into();
            frontends.insert(
                name.clone(),
                Arc::new(Frontend {
                    name,
                    config: fe.clone(),
                    pool: pools[fe.pool.as_str()].clone(),
                    bound,
                    stats,
                    http: http_rts.remove(&fe.name),
                }),
            );
        }
        let admin_addr = match &new_admin {
            Some(b) => Some(b.bound),
            None => self.admin.as_ref().map(|a| a.bound),
        };
        let health_cfgs: Vec<(Arc<Backend>, HealthConfig)> = cfg
            .pools
            .iter()
            .flat_map(|pc| {
                pools[pc.name.as_str()]
                    .backends
                    .iter()
                    .map(|b| (b.clone(), pc.health.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let drains: HashMap<String, Option<Duration>> = old
            .pools
            .keys()
            .map(|n| (n.to_string(), cfg.pool(n).and_then(|p| p.drain_timeout)))
            .collect();
        let next = Snapshot {
            config: Arc::new(cfg),
            pools,
            frontends,
            admin_addr,
        };

        // Phase 3: publish, then reconcile tasks. Nothing below can fail.
        self.shared.snapshot.store(Arc::new(next));
        drop(series);
        metrics.last_reload_ok.set(1);
        metrics.last_reload_ts.set(unix_now() as f64);
        if bytes.is_some() {
            self.last_bytes = bytes;
        }

        let shutdown = &self.shared.shutdown;
        for (new_name, old_name) in renames {
            if let Some(task) = self.listeners.remove(&old_name) {
                task.name.store(Arc::new(new_name.clone()));
                info!(from = %old_name, to = %new_name, "frontend renamed; listener kept");
                self.listeners.insert(new_name, task);
            }
        }
        let snap = self.shared.snapshot.load_full();
        for (name, b) in new_listeners {
            let fe = &snap.frontends[name.as_str()];
            let stop = shutdown.child_token();
            let name_cell = Arc::new(ArcSwap::from_pointee(name.clone()));
            let listener = TcpListener::from_std(b.listener).expect("inside the runtime");
            let mode = if fe.http.is_some() { "http" } else { "tcp" };
            info!(frontend = %name, addr = %b.bound, mode, pool = %fe.config.pool, "frontend listening");
            tokio::spawn(proxy::tcp::serve(
                listener,
                name_cell.clone(),
                self.shared.clone(),
                stop.clone(),
            ));
            if let Some(old) = self.listeners.insert(
                name.clone(),
                ListenerTask {
                    listen: fe.config.listen,
                    bound: b.bound,
                    name: name_cell,
                    stop,
                },
            ) {
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
        if let Some(b) = new_admin {
            // Not a child of `shutdown`: /readyz must answer 503 and /metrics
            // stay scrapeable while connections drain; `stop_admin` ends it.
            let stop = CancellationToken::new();
            let listener = TcpListener::from_std(b.listener).expect("inside the runtime");
            info!(addr = %b.bound, "admin listening");
            tokio::spawn(admin::serve(listener, self.shared.clone(), stop.clone()));
            if let Some(old) = self.admin.replace(AdminTask {
                listen: snap.config.admin.listen,
                bound: b.bound,
                stop,
            }) {
                old.stop.cancel();
            }
        }

        let mut live: HashSet<(String, String)> = HashSet::new();
        for (b, hc) in health_cfgs {
            let key = (
                b.pool.to_string(),
                format!("{}@{}", b.server.key, b.server.addr),
            );
            live.insert(key.clone());
            if let Some(t) = self.probes.get(&key) {
                if t.cfg == hc {
                    continue;
                }
                t.stop.cancel();
            }
            let stop = shutdown.child_token();
            health::spawn(self.shared.clone(), b, hc.clone(), stop.clone());
            self.probes.insert(key, ProbeTask { cfg: hc, stop });
        }
        self.probes.retain(|k, t| {
            let keep = live.contains(k);
            if !keep {
                t.stop.cancel();
            }
            keep
        });

        for b in removed {
            b.mark_removed();
            let open = b.active();
            info!(pool = %b.pool, server = %b.server.key, open, "server removed; no new connections, open ones continue");
            if let Some(Some(after)) = drains.get(&*b.pool) {
                let after = *after;
                let stop = shutdown.clone();
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
        for name in snap.pools.keys() {
            self.shared.pool_changed(name);
        }
        self.started = true;
        Ok(())
    }

    pub fn stop_admin(&mut self) {
        if let Some(a) = self.admin.take() {
            a.stop.cancel();
        }
    }
}

/// Watches the config file's directory (and the directory of the file a
/// symlink points to) so editors' write-and-rename and a ConfigMap's `..data`
/// swap are both seen; sends one reload per burst of events.
pub(crate) fn watch_file(path: PathBuf, control: mpsc::Sender<Command>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let parent = |p: &Path| {
        p.parent().map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        })
    };
    dirs.extend(parent(&path));
    if let Ok(real) = std::fs::canonicalize(&path) {
        if let Some(d) = parent(&real) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !ev.kind.is_access() {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return;
        }
    };
    for d in &dirs {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            warn!(dir = %d.display(), error = %e, "cannot watch config directory; reload with SIGHUP");
        }
    }
    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and unwatched) when this task ends
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = rx.recv() => if ev.is_none() { return },
            }
            // Debounce: wait until the burst is over.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    ev = rx.recv() => if ev.is_none() { return },
                }
            }
            if control
                .send(Command::Reload {
                    force: false,
                    reply: None,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
}
