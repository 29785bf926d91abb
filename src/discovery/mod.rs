//! Backends from the cluster itself (issue 13): list, then watch, the
//! `discovery.k8s.io/v1` EndpointSlices of a Service (`default/kubernetes`
//! by default) through the pool's own backends, and report the set of ready
//! servers upward on a channel. Discovery never touches the snapshot: the
//! reconciler turns an `Update` into a reload of the desired state.
//!
//! It never shrinks a pool to nothing: an empty list, an API error or a
//! watch that cannot be re-established keeps the last known set, which is
//! also written to `cache_file`.

pub mod cache;
mod client;
pub mod slices;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::discovery::KubernetesDiscovery;
use crate::metrics::DiscoveryMetrics;

pub use slices::servers_of;

/// A pool's new set of servers, as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub pool: String,
    /// Sorted, never empty.
    pub servers: Vec<SocketAddr>,
}

/// Gives the addresses the API client may connect to: the pool's up
/// backends, or all of them when none is up. Called per new connection.
pub type Backends = Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{0}")]
    Config(String),
    #[error("list: {0}")]
    List(String),
    #[error("watch: {0}")]
    Watch(String),
}

impl DiscoveryError {
    /// The `reason` label of `apilb_discovery_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            DiscoveryError::Config(_) => "config",
            DiscoveryError::List(_) => "list",
            DiscoveryError::Watch(_) => "watch",
        }
    }
}

/// Everything one pool's discovery task needs.
pub struct Task {
    pub pool: String,
    pub config: KubernetesDiscovery,
    /// Discovered servers are IPs: their certificates are checked against this.
    pub server_name: String,
    pub connect_timeout: Duration,
    pub backends: Backends,
    /// The set the pool runs with now (from the cache or an earlier task):
    /// the same set found again is not reported.
    pub known: Vec<SocketAddr>,
    pub updates: mpsc::Sender<Update>,
    pub metrics: DiscoveryMetrics,
    pub cancel: CancellationToken,
}

/// Starts the list/watch loop; it ends when `task.cancel` is cancelled.
pub fn spawn(task: Task) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch::run(task))
}
