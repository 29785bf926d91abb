//! Client traffic, as services handed an accepted socket: `tcp` relays L4
//! connections through `pump`; `http` serves L7 frontends over `upstream`
//! connections (`coalesce` gathering each flush's writes, `readahead` taking
//! what an upstream socket holds in one read), HTTP/2 clients
//! through `h2serve` (`h2body` moving bodies both ways), with `h1guard` checking HTTP/1 request heads first, `headers`
//! doing header hygiene and `handles` keeping its metric handles resolved. None of
//! them accepts, reads files or looks at the snapshot: what they need is
//! passed in (`Env` for the process, a service value per frontend).

pub mod coalesce;
pub mod h1guard;
pub mod h2body;
pub mod h2frames;
pub mod h2serve;
pub mod handles;
pub mod headers;
pub mod http;
pub mod pump;
pub mod readahead;
pub mod tcp;
pub mod upstream;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::balancer::Backend;
use crate::metrics::Metrics;
use crate::net::Fault;

/// What every connection needs from the process around it.
#[derive(Clone)]
pub struct Env {
    pub metrics: Arc<Metrics>,
    /// Cancelled when shutdown begins: no new upstream attempts.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace is over: every open connection closes.
    pub hard_stop: CancellationToken,
    /// Client connection tasks (and tunnels), waited for during the grace.
    pub tasks: TaskTracker,
}

impl Env {
    /// A connect or upstream handshake to `b` failed: a backend fault feeds
    /// passive health, a local one is only counted.
    pub fn upstream_failed(&self, b: &Backend, fault: Fault, detail: &str) {
        b.metrics.connect_failures.inc();
        match fault {
            Fault::Backend => b.report_failure(detail),
            Fault::Local(reason) => {
                self.metrics.local_error(reason);
                debug!(backend.addr = %b.server.key, reason, error = detail,
                    "local error reaching a backend; not counted against it");
            }
        }
    }
}
