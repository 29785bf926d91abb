//! VIP ownership: leader election on etcd v3, the address on an interface, gratuitous ARP.
//!
//! One task per process (`spawn`) campaigns for the election key and, while it holds it,
//! holds the address. Safety rule: the holder drops the address as soon as no renewal of
//! its lease succeeded within `renew_deadline` (measured from when the renewal was *sent*),
//! which is before etcd can expire the lease at `lease_duration` and let another node win.
//!
//! The election logic (`election`) is written against the `Store` and `Address` traits so
//! its timing is unit-tested with paused time; `etcd` and `netlink`/`arp` implement them.
//!
//! Hand-over to a re-executed successor (SIGUSR2): `VipHandle::hand_over` stops the task
//! without removing the address or revoking the lease and returns the lease id; the new
//! process passes it as `Options::inherit_lease` and, if that lease still holds the key,
//! carries on renewing it with the address left in place.

pub mod arp;
mod election;
pub mod etcd;
#[allow(clippy::all, missing_docs)]
pub mod etcdpb;
pub mod netlink;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::VipConfig;
pub use etcd::{EtcdError, LeaseId};
pub use netlink::check_capabilities;

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("vip.interface {name:?}: {source}")]
    Interface {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot {op} address {addr}: {source}")]
    Netlink {
        op: &'static str,
        addr: Ipv4Addr,
        source: std::io::Error,
    },
    #[error("cannot read this process's capabilities: {0}")]
    Capabilities(std::io::Error),
    #[error("the vip section needs CAP_NET_ADMIN (to add the address) and CAP_NET_RAW (gratuitous ARP); missing: {0}. Run as root, or grant them (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW; static pod: securityContext.capabilities.add)")]
    MissingCapabilities(String),
    #[error("vip.etcd: {0}")]
    Etcd(#[from] EtcdError),
}

/// The VIP metrics, registered once per registry; the runtime keeps them across reloads.
#[derive(Clone)]
pub struct VipMetrics {
    leader: IntGaugeVec,
    transitions: IntCounterVec,
    errors: IntCounter,
}

impl VipMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<VipMetrics> {
        let leader = IntGaugeVec::new(
            Opts::new(
                "apilb_vip_leader",
                "1 while this node holds the VIP, 0 otherwise",
            ),
            &["address"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "apilb_vip_transitions_total",
                "VIP ownership changes of this node (acquired, released, lost)",
            ),
            &["address", "event"],
        )?;
        let errors = IntCounter::new(
            "apilb_vip_election_errors_total",
            "Failed etcd calls of the VIP election",
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(VipMetrics {
            leader,
            transitions,
            errors,
        })
    }

    /// Drops the series of an address no longer configured (after a reload).
    pub fn forget(&self, address: Ipv4Addr) {
        let a = address.to_string();
        let _ = self.leader.remove_label_values(&[&a]);
        for event in ["acquired", "released", "lost"] {
            let _ = self.transitions.remove_label_values(&[&a, event]);
        }
    }
}

/// What `/status` shows under `"vip"`.
#[derive(Debug, Clone, PartialEq)]
pub struct VipStatus {
    /// `10.0.0.100/24`
    pub address: String,
    pub interface: String,
    /// Whether this node holds the address.
    pub leader: bool,
    /// The identity in the election key, when this node last saw one.
    pub holder: Option<String>,
    /// When `leader` or `holder` last changed.
    pub since: SystemTime,
}

impl VipStatus {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "interface": self.interface,
            "leader": self.leader,
            "holder": self.holder,
            "since": humantime::format_rfc3339_seconds(self.since).to_string(),
        })
    }
}

/// How the election task starts.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A lease handed over by the process this one replaced (`VipHandle::hand_over`):
    /// if it still holds the election key, keep renewing it and keep the address.
    pub inherit_lease: Option<LeaseId>,
}

/// The running election task.
pub struct VipHandle {
    config: VipConfig,
    status: watch::Receiver<VipStatus>,
    quit: CancellationToken,
    hand_over: Arc<AtomicBool>,
    task: JoinHandle<Option<LeaseId>>,
}

impl VipHandle {
    pub fn config(&self) -> &VipConfig {
        &self.config
    }

    pub fn status(&self) -> VipStatus {
        self.status.borrow().clone()
    }

    /// Changes of the status (tests and the admin server may await them).
    pub fn watch_status(&self) -> watch::Receiver<VipStatus> {
        self.status.clone()
    }

    /// Stops the task: removes the address and revokes the lease so another node takes
    /// over within `retry_period`. Returns when both are done (or failed and were logged).
    pub async fn release(self) {
        self.quit.cancel();
        let _ = self.task.await;
    }

    /// Stops the task but leaves the address and the lease alone; returns the lease id
    /// when this node held the VIP. The caller must hand it to its successor, which has
    /// until the lease's renew deadline to renew it.
    pub async fn hand_over(self) -> Option<LeaseId> {
        self.hand_over.store(true, Ordering::SeqCst);
        self.quit.cancel();
        self.task.await.ok().flatten()
    }
}

/// An election ready to start: the checks that can fail are done (capabilities,
/// interface, etcd TLS files), so a reload can refuse before it changes anything.
pub struct Prepared {
    cfg: VipConfig,
    store: etcd::Client,
    address: election::NetAddress,
}

impl Prepared {
    pub fn config(&self) -> &VipConfig {
        &self.cfg
    }
}

/// Checks what starting an election for `cfg` needs, without starting it.
pub fn prepare(cfg: VipConfig) -> Result<Prepared, VipError> {
    netlink::check_capabilities()?;
    let ifindex = netlink::ifindex(&cfg.interface)?;
    let store = etcd::Client::new(&cfg.etcd, rpc_timeout(&cfg))?;
    let address = election::NetAddress {
        ifname: cfg.interface.clone(),
        ifindex,
        addr: cfg.address,
        prefix: cfg.prefix_len,
    };
    Ok(Prepared {
        cfg,
        store,
        address,
    })
}

/// `prepare` then `start`.
pub fn spawn(
    cfg: VipConfig,
    metrics: VipMetrics,
    ready: watch::Receiver<bool>,
    stop: CancellationToken,
    options: Options,
) -> Result<VipHandle, VipError> {
    Ok(prepare(cfg)?.start(metrics, ready, stop, options))
}

impl Prepared {
    /// Starts the election task. `ready` says whether this node can serve (some pool has
    /// an up backend); with `require_ready` the node only campaigns and holds while it
    /// is true. `stop` ends the task like `VipHandle::release`.
    pub fn start(
        self,
        metrics: VipMetrics,
        ready: watch::Receiver<bool>,
        stop: CancellationToken,
        options: Options,
    ) -> VipHandle {
        let cfg = self.cfg;
        let (status_tx, status) = watch::channel(VipStatus {
            address: cfg.cidr(),
            interface: cfg.interface.clone(),
            leader: false,
            holder: None,
            since: SystemTime::now(),
        });
        let quit = stop.child_token();
        let hand_over = Arc::new(AtomicBool::new(false));
        let e = election::Election {
            cfg: cfg.clone(),
            store: self.store,
            address: self.address,
            metrics,
            status: status_tx,
            ready,
            quit: quit.clone(),
            hand_over: hand_over.clone(),
        };
        let task = tokio::spawn(e.run(options.inherit_lease));
        VipHandle {
            config: cfg,
            status,
            quit,
            hand_over,
            task,
        }
    }
}

/// Removes the configured VIP from its interface if it is there (`apilb vip-down`,
/// run by systemd after the process ended). Returns whether it was there.
pub fn remove_address(cfg: &VipConfig) -> Result<bool, VipError> {
    let ifindex = netlink::ifindex(&cfg.interface)?;
    netlink::remove_address(ifindex, cfg.address, cfg.prefix_len)
}

/// Time allowed for one etcd call: a retry period, at least one second.
fn rpc_timeout(cfg: &VipConfig) -> std::time::Duration {
    cfg.retry_period.max(std::time::Duration::from_secs(1))
}
