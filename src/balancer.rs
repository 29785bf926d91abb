//! Pools and backends: the health flag, open-connection counts and `pick()`.
//!
//! Everything here is read on the accept path, so it is atomics only: `pick()`
//! takes no lock and allocates nothing. The health state machine lives in
//! `health`; a backend only holds the flag it publishes and a weak callback
//! through which traffic reports connect failures (passive health).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{AllDownPolicy, Balance, PoolConfig, ServerConfig};
use crate::metrics::BackendMetrics;

/// Where client traffic reports a backend fault (implemented by `health`).
pub trait HealthSink: Send + Sync {
    /// A connect or upstream handshake failed because of the backend.
    fn passive_failure(&self, detail: &str);
}

/// One server of one pool. Shared (by `Arc`) between the snapshot, the health
/// task and every connection to it; carried across reloads while the server stays.
pub struct Backend {
    pub pool: Arc<str>,
    pub server: ServerConfig,
    /// Read by `pick()`; written only by this backend's health monitor, under
    /// its state-machine lock, so flag and state never disagree.
    healthy: AtomicBool,
    /// Open client connections (and connects in flight): least-connections reads it.
    active: AtomicUsize,
    /// Unix seconds of the last state change; for `/status`.
    since: AtomicU64,
    /// The health monitor, attached once; weak so a removed backend's
    /// monitor can go away while connections still hold the backend.
    sink: OnceLock<Weak<dyn HealthSink>>,
    /// Cancelled to close every open connection to this backend (drain after
    /// removal, `close_after_down`); replaced by a fresh token each time.
    kill: ArcSwap<CancellationToken>,
    /// Set once a reload removed it: its state changes then concern nobody.
    removed: AtomicBool,
    pub metrics: BackendMetrics,
}

impl Backend {
    pub fn new(
        pool: Arc<str>,
        server: ServerConfig,
        healthy: bool,
        metrics: BackendMetrics,
    ) -> Self {
        metrics.up.set(healthy as i64);
        Backend {
            pool,
            server,
            healthy: AtomicBool::new(healthy),
            active: AtomicUsize::new(0),
            since: AtomicU64::new(unix_now()),
            sink: OnceLock::new(),
            kill: ArcSwap::from_pointee(CancellationToken::new()),
            removed: AtomicBool::new(false),
            metrics,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Only the health monitor calls this, holding its state-machine lock.
    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Relaxed);
        self.since.store(unix_now(), Relaxed);
        self.metrics.up.set(up as i64);
    }

    /// Unix time of the last up/down change (or of creation).
    pub fn since(&self) -> u64 {
        self.since.load(Relaxed)
    }

    /// Attaches the health monitor (once; later calls are ignored).
    pub fn attach_health(&self, sink: Weak<dyn HealthSink>) {
        let _ = self.sink.set(sink);
    }

    /// Client traffic saw a backend fault: feeds passive health.
    pub fn report_failure(&self, detail: &str) {
        if let Some(sink) = self.sink.get().and_then(Weak::upgrade) {
            sink.passive_failure(detail);
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// Counts a connection (or a connect in flight) until the guard drops.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        self.metrics.active.inc();
        ActiveGuard(self.clone())
    }

    /// The token open connections watch; cancelled by `close_connections`.
    pub fn kill_token(&self) -> CancellationToken {
        (**self.kill.load()).clone()
    }

    /// Closes every connection open to this backend now; later ones are unaffected.
    pub fn close_connections(&self) {
        let old = self.kill.swap(Arc::new(CancellationToken::new()));
        old.cancel();
    }

    pub fn mark_removed(&self) {
        self.removed.store(true, Relaxed);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Relaxed)
    }
}

/// Decrements the backend's open-connection count when dropped.
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.metrics.active.dec();
    }
}

/// Pool-wide state that outlives a reload (keyed by pool name).
#[derive(Default)]
pub struct PoolState {
    /// True while no backend is up; flips produce exactly one log line each.
    pub all_down: AtomicBool,
    /// Round-robin position; `fetch_add(1, Relaxed)` per pick. Kept across
    /// reloads so a reload does not send the next connection to server 0.
    rr: AtomicUsize,
}

/// A pool as the current snapshot sees it.
pub struct Pool {
    pub name: Arc<str>,
    pub config: PoolConfig,
    pub backends: Vec<Arc<Backend>>,
    pub state: Arc<PoolState>,
}

impl Pool {
    pub fn new(config: PoolConfig, backends: Vec<Arc<Backend>>, state: Arc<PoolState>) -> Self {
        Pool {
            name: config.name.as_str().into(),
            config,
            backends,
            state,
        }
    }

    pub fn up_count(&self) -> usize {
        self.backends.iter().filter(|b| b.is_healthy()).count()
    }

    /// Picks a backend index for a new connection, skipping the servers in `tried`.
    ///
    /// Healthy servers first. When none is left, `try-all` falls back to every
    /// untried server (fail open) and `reject` gives `None`.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let healthy = |i: usize| !tried.contains(&i) && self.backends[i].is_healthy();
        if let Some(i) = self.choose(healthy) {
            return Some(i);
        }
        match self.config.when_all_down {
            AllDownPolicy::TryAll => self.choose(|i| !tried.contains(&i)),
            AllDownPolicy::Reject => None,
        }
    }

    fn choose(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len();
        match self.config.balance {
            Balance::RoundRobin => {
                // The k-th eligible server, so a down server's share is spread
                // evenly instead of landing on its neighbour.
                let count = (0..n).filter(|&i| eligible(i)).count();
                if count == 0 {
                    return None;
                }
                let k = self.state.rr.fetch_add(1, Relaxed) % count;
                // Health may flip between the two passes: then any server
                // still eligible serves, never a spurious `None`.
                let mut first = None;
                for (seen, i) in (0..n).filter(|&i| eligible(i)).enumerate() {
                    if seen == k {
                        return Some(i);
                    }
                    first.get_or_insert(i);
                }
                first
            }
            Balance::LeastConnections => {
                // Ties rotate so equal servers share the load.
                let start = self.state.rr.fetch_add(1, Relaxed);
                let mut best: Option<(usize, usize)> = None;
                for j in 0..n {
                    let i = (start + j) % n;
                    if !eligible(i) {
                        continue;
                    }
                    let load = self.backends[i].active();
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((i, load));
                    }
                }
                best.map(|(i, _)| i)
            }
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::metrics::Metrics;

    fn pool(balance: &str, policy: &str) -> (Pool, Metrics) {
        pool_with_state(balance, policy, Default::default())
    }

    fn pool_with_state(balance: &str, policy: &str, state: Arc<PoolState>) -> (Pool, Metrics) {
        let yaml = format!(
            "frontends: [{{name: f, listen: '127.0.0.1:0', pool: p}}]\n\
             pools: [{{name: p, balance: {balance}, when_all_down: {policy},\n\
             servers: ['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3']}}]"
        );
        let cfg = config::parse(&yaml).unwrap();
        let m = Metrics::new();
        let pc = cfg.pools[0].clone();
        let backends = pc
            .servers
            .iter()
            .map(|s| {
                Arc::new(Backend::new(
                    "p".into(),
                    s.clone(),
                    true,
                    m.backend("p", &s.key),
                ))
            })
            .collect();
        (Pool::new(pc, backends, state), m)
    }

    #[test]
    fn round_robin_is_even_and_skips_down() {
        let (p, _m) = pool("round-robin", "try-all");
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[p.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        p.backends[1].set_healthy(false);
        let mut counts = [0; 3];
        for _ in 0..200 {
            counts[p.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 0, 100]);
    }

    #[test]
    fn tried_servers_are_skipped_then_policy_applies() {
        let (p, _m) = pool("round-robin", "try-all");
        p.backends[0].set_healthy(false);
        assert_eq!(
            p.pick(&[1, 2]),
            Some(0),
            "try-all falls back to a down server"
        );
        assert_eq!(p.pick(&[0, 1, 2]), None);
        let (r, _m) = pool("round-robin", "reject");
        for b in &r.backends {
            b.set_healthy(false);
        }
        assert_eq!(r.pick(&[]), None, "reject gives nothing when all are down");
    }

    #[test]
    fn least_connections_prefers_fewest_open() {
        let (p, _m) = pool("least-connections", "try-all");
        let _g1 = p.backends[0].enter();
        let _g2 = p.backends[0].enter();
        let _g3 = p.backends[2].enter();
        assert_eq!(p.pick(&[]), Some(1));
        let _g4 = p.backends[1].enter();
        let _g5 = p.backends[1].enter();
        assert_eq!(p.pick(&[]), Some(2));
        let tie = p.pick(&[2]).unwrap();
        assert!(tie == 0 || tie == 1, "equal loads: either, got {tie}");
    }

    #[test]
    fn round_robin_position_survives_a_rebuilt_pool() {
        let state: Arc<PoolState> = Default::default();
        let (p, _m) = pool_with_state("round-robin", "try-all", state.clone());
        assert_eq!(p.pick(&[]), Some(0));
        // A reload builds a new Pool with the same state: it goes on at 1.
        let (p2, _m2) = pool_with_state("round-robin", "try-all", state);
        assert_eq!(p2.pick(&[]), Some(1));
    }

    #[test]
    fn pick_never_answers_none_while_a_server_is_up_under_flapping() {
        let (p, _m) = pool("round-robin", "reject");
        let p = Arc::new(p);
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut up = false;
                while !stop.load(Relaxed) {
                    p.backends[1].set_healthy(up);
                    p.backends[2].set_healthy(!up);
                    up = !up;
                }
            })
        };
        // Server 0 stays up throughout: every pick must find a server.
        for i in 0..200_000 {
            assert!(p.pick(&[]).is_some(), "pick {i} found nothing");
        }
        stop.store(true, Relaxed);
        flipper.join().unwrap();
    }

    #[test]
    fn close_connections_cancels_only_current_token() {
        let (p, _m) = pool("round-robin", "try-all");
        let b = &p.backends[0];
        let before = b.kill_token();
        b.close_connections();
        assert!(before.is_cancelled());
        assert!(!b.kill_token().is_cancelled());
    }
}
