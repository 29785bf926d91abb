//! Discovery's overlay on the config: per pool with `discovery`, the set it
//! (or its cache) gave, which replaces the pool's seeds in the desired state
//! the reconciler plans on. The file defines the pool, discovery its members;
//! a reload and a discovery change compose. Also owns the discovery tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::discovery::{KubernetesDiscovery, Members, DEFAULT_SERVER_NAME};
use crate::config::{self, Config, ServerConfig};
use crate::discovery::{self, cache, Update};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

type Set = (Vec<SocketAddr>, Members);

/// What a discovery task runs with; a change restarts the task.
#[derive(Debug, Clone, PartialEq)]
struct TaskKey {
    config: KubernetesDiscovery,
    server_name: String,
    connect_timeout: Duration,
}

struct Running {
    key: TaskKey,
    stop: CancellationToken,
}

pub(super) struct Overlay {
    /// The config as last applied from the file (or memory), without overlay.
    base: Option<Config>,
    sets: HashMap<String, Set>,
    tasks: HashMap<String, Running>,
    updates: mpsc::Sender<Update>,
}

impl Overlay {
    pub fn new(updates: mpsc::Sender<Update>) -> Self {
        Overlay {
            base: None,
            sets: HashMap::new(),
            tasks: HashMap::new(),
            updates,
        }
    }

    pub fn base(&self) -> Option<&Config> {
        self.base.as_ref()
    }

    /// Records the applied config; sets of pools without discovery go.
    pub fn set_base(&mut self, cfg: Config) {
        self.sets
            .retain(|p, _| cfg.pool(p).is_some_and(|pc| pc.discovery.is_some()));
        self.base = Some(cfg);
    }

    /// Reads the `cache_file` of discovered pools that have no set yet.
    pub fn load_caches(&mut self, cfg: &Config) {
        for pc in &cfg.pools {
            let Some(path) = pc.discovery.as_ref().and_then(|d| d.cache_file.as_ref()) else {
                continue;
            };
            if self.sets.contains_key(&pc.name) {
                continue;
            }
            match cache::read(path, &pc.name) {
                Ok(Some(servers)) => {
                    info!(pool = %pc.name, servers = ?servers, "starting from the discovery cache");
                    self.sets.insert(pc.name.clone(), (servers, Members::Cache));
                }
                Ok(None) => {}
                Err(e) => warn!(pool = %pc.name, error = %e, "ignoring the discovery cache"),
            }
        }
    }

    /// `cfg` with each discovered pool's seeds replaced by its set, less
    /// apilb's own addresses (a loop). A set left empty keeps the seeds.
    pub fn desired(&self, cfg: &Config, snap: &Snapshot) -> Config {
        let mut out = cfg.clone();
        let own = own_addresses(cfg, snap);
        let local_ips = config::local_addresses();
        for pc in &mut out.pools {
            let Some((set, from)) = self.sets.get(&pc.name).filter(|_| pc.discovery.is_some())
            else {
                continue;
            };
            let servers: Vec<ServerConfig> = set
                .iter()
                .filter(|a| {
                    let mine = config::is_self_address(**a, &own, &local_ips);
                    if mine {
                        warn!(pool = %pc.name, server = %a, "refusing a discovered server that is apilb's own listen address (a loop)");
                    }
                    !mine
                })
                .map(|a| server(*a))
                .collect();
            if !servers.is_empty() {
                pc.servers = servers;
                pc.members = *from;
            }
        }
        out
    }

    /// Takes a discovered set. `None` when it changes nothing (or concerns
    /// no discovered pool); else the previous entry, for `restore`.
    pub fn record(&mut self, u: &Update) -> Option<Option<Set>> {
        self.base.as_ref()?.pool(&u.pool)?.discovery.as_ref()?;
        let new = (u.servers.clone(), Members::Discovery);
        if u.servers.is_empty() || self.sets.get(&u.pool) == Some(&new) {
            return None;
        }
        Some(self.sets.insert(u.pool.clone(), new))
    }

    /// Puts back what `record` replaced (the apply failed).
    pub fn restore(&mut self, pool: &str, prev: Option<Set>) {
        match prev {
            Some(s) => self.sets.insert(pool.to_string(), s),
            None => self.sets.remove(pool),
        };
    }

    /// One task per pool with discovery, restarted when its settings change.
    pub fn reconcile(
        &mut self,
        shutdown: &CancellationToken,
        metrics: &Metrics,
        backends: impl Fn(&str) -> discovery::Backends,
    ) {
        let Some(base) = &self.base else { return };
        let wanted: HashMap<String, TaskKey> = base
            .pools
            .iter()
            .filter_map(|pc| {
                let key = TaskKey {
                    config: pc.discovery.clone()?,
                    server_name: pc
                        .tls
                        .as_ref()
                        .and_then(|t| t.server_name.clone())
                        .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_string()),
                    connect_timeout: pc.connect_timeout,
                };
                Some((pc.name.clone(), key))
            })
            .collect();
        self.tasks.retain(|pool, t| {
            let keep = wanted.get(pool) == Some(&t.key);
            if !keep {
                info!(pool = %pool, "discovery stopped");
                t.stop.cancel();
                if !wanted.contains_key(pool) {
                    metrics.remove_discovery(pool);
                }
            }
            keep
        });
        for (pool, key) in wanted {
            if self.tasks.contains_key(&pool) {
                continue;
            }
            let stop = shutdown.child_token();
            info!(pool = %pool, namespace = %key.config.namespace, service = %key.config.service, "discovery started");
            discovery::spawn(discovery::Task {
                pool: pool.clone(),
                config: key.config.clone(),
                server_name: key.server_name.clone(),
                connect_timeout: key.connect_timeout,
                backends: backends(&pool),
                known: self
                    .sets
                    .get(&pool)
                    .map(|s| s.0.clone())
                    .unwrap_or_default(),
                updates: self.updates.clone(),
                metrics: metrics.discovery(&pool),
                cancel: stop.clone(),
            });
            self.tasks.insert(pool, Running { key, stop });
        }
    }
}

/// Every address apilb listens on: as configured and as bound.
fn own_addresses(cfg: &Config, snap: &Snapshot) -> Vec<SocketAddr> {
    let configured = cfg.frontends.iter().map(|f| f.listen);
    let bound = snap.frontends.values().map(|f| f.bound);
    configured
        .chain(bound)
        .chain([cfg.admin.listen])
        .chain(snap.admin_addr)
        .collect()
}

/// A discovered address as a server: its key is `ip:port`.
fn server(addr: SocketAddr) -> ServerConfig {
    ServerConfig {
        key: addr.to_string(),
        host: addr.ip().to_string(),
        port: addr.port(),
        addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::config::parse(
            "frontends: [{name: f, listen: '127.0.0.1:7443', pool: api}]\n\
             pools:\n\
             - {name: api, servers: ['127.0.0.1:6443'], discovery: {kubernetes: {}}}\n\
             - {name: plain, servers: ['127.0.0.1:6444']}\n",
        )
        .unwrap()
    }

    fn update(pool: &str, servers: &[&str]) -> Update {
        Update {
            pool: pool.into(),
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn discovered_set_replaces_seeds_and_skips_own_addresses() {
        let (tx, _rx) = mpsc::channel(1);
        let mut o = Overlay::new(tx);
        o.set_base(cfg());
        let snap = Snapshot::empty();
        assert_eq!(o.desired(&cfg(), &snap), cfg(), "no set yet: the seeds");
        let u = update("api", &["10.0.0.1:6443", "10.0.0.2:6443", "127.0.0.1:7443"]);
        assert_eq!(o.record(&u), Some(None));
        assert_eq!(o.record(&u), None, "the same set again changes nothing");
        assert_eq!(
            o.record(&update("plain", &["10.0.0.9:1"])),
            None,
            "pool without discovery"
        );
        let d = o.desired(&cfg(), &snap);
        let keys: Vec<&str> = d.pools[0].servers.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            ["10.0.0.1:6443", "10.0.0.2:6443"],
            "own frontend address refused"
        );
        assert_eq!(d.pools[0].members, Members::Discovery);
        assert_eq!(d.pools[1], cfg().pools[1]);
        o.record(&update("api", &["127.0.0.1:7443"]));
        let d = o.desired(&cfg(), &snap);
        assert_eq!(
            d.pools[0].servers,
            cfg().pools[0].servers,
            "nothing left: seeds stay"
        );
    }
}
