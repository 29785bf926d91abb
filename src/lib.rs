//! apilb: a load balancer for highly available Kubernetes control planes.
//!
//! Map of the crate (one owner per module, see DESIGN.md):
//!
//! - [`config`]: the YAML schema and `validate()`, every error with its field path.
//! - [`balancer`]: pools, backends (health flag, open connections), `pick()`.
//! - [`health`]: probe tasks, the rise/fall state machine, passive failures.
//! - [`proxy`]: L4 accept loops, connect with failover, byte pumping.
//! - [`tls`]: rustls configs from PEM.
//! - [`reload`]: file watching, building and publishing snapshots, listeners.
//! - [`runtime`]: shared state, the control task, shutdown, the `Handle`.
//! - [`metrics`]: the Prometheus registry and metric handles.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`demo`]: fake apiservers and a throwaway CA for `apilb demo` and tests.

pub mod admin;
pub mod balancer;
pub mod config;
pub mod demo;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod tls;

pub use runtime::{start, start_with, Handle, Options};

/// Exit code for configuration errors (sysexits.h EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
