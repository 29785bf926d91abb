//! apilb: a load balancer for highly available Kubernetes control planes.
//!
//! Map of the crate, bottom layer first; every `crate::` import points down
//! (`tests/layers.rs` checks it; DESIGN.md and ARCHITECTURE.md say why):
//!
//! 0. [`config`] (the YAML schema and `validate()`), [`tls`] (rustls configs
//!    from PEM), [`metrics`] (the Prometheus registry and handles), [`fsread`]
//!    (bounded reads of regular files: config, certificates, keys).
//! 1. [`balancer`]: pools, backends (health flag, open connections), `pick()`.
//! 2. [`health`]: per-backend monitors (rise/fall, the only writer of the
//!    health flag) and probe tasks; [`net`]: connect, tuning, binding, fault
//!    classification; [`handover`]: inherited listening sockets (systemd,
//!    re-exec), sd_notify, starting the re-exec successor.
//! 3. [`proxy`]: services handed an accepted socket: `tcp` (L4 relay through
//!    `pump`), `http` (L7 over `upstream` pools, `h1guard`); beside it
//!    [`discovery`]: pool members from EndpointSlices, reported upward on a
//!    channel (issue 13), and [`vip`]: VIP ownership through etcd leader
//!    election, netlink and gratuitous ARP, reporting through watch channels.
//! 4. [`snapshot`]: the published `Snapshot`, `Frontend`/`FrontendKind`, and
//!    `Shared`, the process-wide state.
//! 5. [`listener`]: accept loops, `max_connections`, dispatch by kind.
//! 6. [`reload`]: `plan` → `prepare` → `commit`; file watching.
//! 7. [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! 8. [`runtime`]: the control loop, drain, and the `Handle`.
//!
//! [`demo`] (fake apiservers, a throwaway CA) stands aside: `apilb demo` and
//! the tests use it; nothing in the daemon imports it.

pub mod admin;
pub mod balancer;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod fsread;
pub mod handover;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod snapshot;
pub mod tls;
pub mod vip;

pub use runtime::{start, start_with, Handle, Options};

/// Exit code for configuration errors (sysexits.h EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
