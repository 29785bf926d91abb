//! The election's timing with paused time, against an in-memory etcd with leases.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::*;
use crate::config::vip::{EtcdEndpoint, VipEtcd};

/// An etcd with one key and expiring leases; nodes listed in `cut` get timeouts.
#[derive(Default)]
struct Etcd {
    leases: HashMap<LeaseId, Instant>,
    ttls: HashMap<LeaseId, Duration>,
    key: Option<(String, LeaseId)>,
    revision: i64,
    next_lease: LeaseId,
    cut: Vec<usize>,
}

impl Etcd {
    fn expire(&mut self) {
        let now = Instant::now();
        self.leases.retain(|_, at| *at > now);
        if let Some((_, l)) = &self.key {
            if !self.leases.contains_key(l) {
                self.key = None;
                self.revision += 1;
            }
        }
    }
}

struct FakeStore {
    node: usize,
    etcd: Arc<Mutex<Etcd>>,
}

impl FakeStore {
    /// Every call takes 5 ms; a cut-off node waits 1 s and fails, like a timeout.
    async fn with<T>(&self, f: impl FnOnce(&mut Etcd) -> T) -> Result<T, EtcdError> {
        sleep(Duration::from_millis(5)).await;
        if self.etcd.lock().unwrap().cut.contains(&self.node) {
            sleep(Duration::from_secs(1)).await;
            return Err(EtcdError::Protocol {
                endpoint: "fake".into(),
                method: "any",
                detail: "timed out".into(),
            });
        }
        let mut e = self.etcd.lock().unwrap();
        e.expire();
        Ok(f(&mut e))
    }
}

impl Store for FakeStore {
    async fn get(&mut self, _key: &str) -> Result<KeyState, EtcdError> {
        self.with(|e| KeyState {
            holder: e.key.clone(),
            revision: e.revision,
        })
        .await
    }
    async fn grant(&mut self, ttl: Duration) -> Result<(LeaseId, i64), EtcdError> {
        self.with(|e| {
            e.next_lease += 1;
            e.leases.insert(e.next_lease, Instant::now() + ttl);
            e.ttls.insert(e.next_lease, ttl);
            (e.next_lease, ttl.as_secs() as i64)
        })
        .await
    }
    async fn campaign(
        &mut self,
        _k: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Campaign, EtcdError> {
        self.with(|e| match &e.key {
            Some((holder, _)) => Campaign::Lost {
                holder: holder.clone(),
                revision: e.revision,
            },
            None => {
                e.key = Some((value.to_string(), lease));
                e.revision += 1;
                Campaign::Won
            }
        })
        .await
    }
    async fn keepalive(&mut self, lease: LeaseId) -> Result<i64, EtcdError> {
        self.with(|e| {
            let ttl = e.ttls.get(&lease).copied().unwrap_or_default();
            match e.leases.get_mut(&lease) {
                Some(at) => {
                    *at = Instant::now() + ttl;
                    ttl.as_secs() as i64
                }
                None => -1,
            }
        })
        .await
    }
    async fn revoke(&mut self, lease: LeaseId) -> Result<(), EtcdError> {
        self.with(|e| {
            e.leases.remove(&lease);
            e.expire();
        })
        .await
    }
    async fn wait_deleted(&mut self, _key: &str, revision: i64) -> Result<(), EtcdError> {
        loop {
            let gone = self
                .with(|e| e.key.is_none() || e.revision >= revision)
                .await?;
            if gone {
                return Ok(());
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

struct FakeAddress(Arc<AtomicBool>);

impl Address for FakeAddress {
    fn add(&mut self) -> Result<(), VipError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn remove(&mut self) -> Result<bool, VipError> {
        Ok(self.0.swap(false, Ordering::SeqCst))
    }
    fn announce(&self, _stop: CancellationToken) {}
}

fn config(identity: &str, require_ready: bool) -> VipConfig {
    VipConfig {
        address: Ipv4Addr::new(10, 213, 0, 100),
        prefix_len: 24,
        interface: "eth0".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
        require_ready,
        etcd: VipEtcd {
            endpoints: vec![EtcdEndpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: 2379,
            }],
            ca_file: None,
            cert_file: None,
            key_file: None,
            key: "/apilb/vip/test".into(),
        },
    }
}

/// One node of the fake cluster: its address flag, readiness, and task.
struct Node {
    held: Arc<AtomicBool>,
    ready: watch::Sender<bool>,
    quit: CancellationToken,
    hand_over: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Option<LeaseId>>,
}

fn node(etcd: &Arc<Mutex<Etcd>>, n: usize, require_ready: bool, inherit: Option<LeaseId>) -> Node {
    node_with(
        etcd,
        n,
        require_ready,
        inherit,
        Arc::new(AtomicBool::new(false)),
    )
}

fn node_with(
    etcd: &Arc<Mutex<Etcd>>,
    n: usize,
    require_ready: bool,
    inherit: Option<LeaseId>,
    held: Arc<AtomicBool>,
) -> Node {
    let cfg = config(&format!("node-{n}"), require_ready);
    let (ready_tx, ready) = watch::channel(true);
    let (status, _) = watch::channel(VipStatus {
        address: cfg.cidr(),
        interface: cfg.interface.clone(),
        leader: false,
        holder: None,
        since: SystemTime::now(),
    });
    let quit = CancellationToken::new();
    let hand_over = Arc::new(AtomicBool::new(false));
    let e = Election {
        cfg,
        store: FakeStore {
            node: n,
            etcd: etcd.clone(),
        },
        address: FakeAddress(held.clone()),
        metrics: VipMetrics::register(&prometheus::Registry::new()).unwrap(),
        status,
        ready,
        quit: quit.clone(),
        hand_over: hand_over.clone(),
    };
    Node {
        held,
        ready: ready_tx,
        quit,
        hand_over,
        task: tokio::spawn(e.run(inherit)),
    }
}

fn holders(nodes: &[Node]) -> Vec<usize> {
    (0..nodes.len())
        .filter(|&i| nodes[i].held.load(Ordering::SeqCst))
        .collect()
}

/// Advances time in 50 ms steps until `f` holds (panics after `limit`), checking that
/// no two nodes ever hold the VIP together. Returns how long it took.
async fn until_holds(nodes: &[Node], limit: Duration, f: impl Fn(&[usize]) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let h = holders(nodes);
        assert!(h.len() <= 1, "two holders at once: {h:?}");
        if f(&h) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "not reached within {limit:?}; holders {h:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn exactly_one_of_three_holds_and_keeps_holding() {
    let etcd = Arc::new(Mutex::new(Etcd::default()));
    let nodes: Vec<Node> = (0..3).map(|i| node(&etcd, i, false, None)).collect();
    until_holds(&nodes, Duration::from_secs(2), |h| h.len() == 1).await;
    let first = holders(&nodes);
    // Thirty lease durations later the same node still holds: renewals keep the lease.
    for _ in 0..1800 {
        assert_eq!(holders(&nodes), first);
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn holder_cut_from_etcd_drops_before_its_lease_can_expire() {
    let etcd = Arc::new(Mutex::new(Etcd::default()));
    let nodes: Vec<Node> = (0..3).map(|i| node(&etcd, i, false, None)).collect();
    until_holds(&nodes, Duration::from_secs(2), |h| h.len() == 1).await;
    let old = holders(&nodes)[0];
    etcd.lock().unwrap().cut.push(old);
    let cut_at = Instant::now();
    // Dropped within renew_deadline of the last successful renewal (<= 2 s after the cut).
    let dropped = until_holds(&nodes, Duration::from_secs(3), |h| h.is_empty()).await;
    assert!(
        dropped <= Duration::from_millis(2050),
        "dropped after {dropped:?}"
    );
    // Another node takes over once the lease (3 s) has expired, never overlapping.
    until_holds(&nodes, Duration::from_secs(5), |h| {
        h.len() == 1 && h[0] != old
    })
    .await;
    let took = cut_at.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "took over after {took:?}: before the lease could expire"
    );
    assert!(took <= Duration::from_secs(4), "took over after {took:?}");
    // Back in touch, the old holder stays a candidate.
    etcd.lock().unwrap().cut.clear();
    let _ = timeout(
        Duration::from_secs(10),
        until_holds(&nodes, Duration::from_secs(11), |h| {
            h.len() != 1 || h[0] == old
        }),
    )
    .await;
    assert_ne!(holders(&nodes), vec![old]);
}

#[tokio::test(start_paused = true)]
async fn release_revokes_so_another_takes_over_within_retry_period() {
    let etcd = Arc::new(Mutex::new(Etcd::default()));
    let mut nodes: Vec<Node> = (0..3).map(|i| node(&etcd, i, false, None)).collect();
    until_holds(&nodes, Duration::from_secs(2), |h| h.len() == 1).await;
    let old = holders(&nodes)[0];
    nodes[old].quit.cancel();
    let task = std::mem::replace(&mut nodes[old].task, tokio::spawn(async { None }));
    assert_eq!(task.await.unwrap(), None);
    assert!(
        !nodes[old].held.load(Ordering::SeqCst),
        "address removed on release"
    );
    let took = until_holds(&nodes, Duration::from_secs(1), |h| h.len() == 1).await;
    assert!(
        took <= Duration::from_millis(500),
        "hand-over took {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn require_ready_resigns_to_a_ready_node() {
    let etcd = Arc::new(Mutex::new(Etcd::default()));
    let nodes: Vec<Node> = (0..2).map(|i| node(&etcd, i, true, None)).collect();
    until_holds(&nodes, Duration::from_secs(2), |h| h.len() == 1).await;
    let old = holders(&nodes)[0];
    nodes[old].ready.send(false).unwrap();
    until_holds(&nodes, Duration::from_secs(2), |h| {
        h.len() == 1 && h[0] != old
    })
    .await;
    // Not ready, it does not campaign even when the key is free.
    let other = 1 - old;
    nodes[other].ready.send(false).unwrap();
    until_holds(&nodes, Duration::from_secs(2), |h| h.is_empty()).await;
    sleep(Duration::from_secs(10)).await;
    assert!(holders(&nodes).is_empty());
    nodes[old].ready.send(true).unwrap();
    until_holds(&nodes, Duration::from_secs(2), |h| h == [old]).await;
}

#[tokio::test(start_paused = true)]
async fn hand_over_keeps_the_address_and_the_successor_renews_the_lease() {
    let etcd = Arc::new(Mutex::new(Etcd::default()));
    let mut nodes = vec![node(&etcd, 0, false, None)];
    until_holds(&nodes, Duration::from_secs(2), |h| h == [0]).await;
    nodes.push(node(&etcd, 1, false, None));
    nodes[0].hand_over.store(true, Ordering::SeqCst);
    nodes[0].quit.cancel();
    let task = std::mem::replace(&mut nodes[0].task, tokio::spawn(async { None }));
    let lease = task.await.unwrap().expect("a lease is handed over");
    assert!(
        nodes[0].held.load(Ordering::SeqCst),
        "address kept for the successor"
    );
    // The successor shares the interface (same flag) and inherits the lease.
    let successor = node_with(&etcd, 0, false, Some(lease), nodes[0].held.clone());
    nodes[0] = successor;
    // Well past the lease duration it still holds without a gap: renewals continue.
    for _ in 0..200 {
        assert_eq!(holders(&nodes), vec![0]);
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(etcd.lock().unwrap().key.as_ref().map(|k| k.1), Some(lease));
}
