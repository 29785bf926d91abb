//! The YAML schema exactly as written in the file: serde types, no checks beyond syntax.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored
//! setting. Defaults live in named `DEFAULT_*` constants in `config::mod` so the
//! README and the code cannot drift apart.

use serde::Deserialize;

/// The top of the file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub admin: Option<RawAdmin>,
    /// Written as a duration (`30s`); kept as text so a bad value gets a field path.
    pub shutdown_grace: Option<String>,
    /// Runtime worker threads; default: one per core.
    pub workers: Option<usize>,
    #[serde(default)]
    pub frontends: Vec<RawFrontend>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    /// Optional VIP ownership (`config::vip`).
    pub vip: Option<super::vip::RawVip>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrontend {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub mode: Option<String>,
    pub pool: Option<String>,
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<String>,
    /// `tcp` only: splice(2) during bulk transfers instead of copying.
    pub splice: Option<bool>,
    pub tls: Option<RawFrontendTls>,
    pub request_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub http2_keepalive_interval: Option<String>,
    pub http2_keepalive_timeout: Option<String>,
    /// Extra client header names to remove (custom `--requestheader-*-headers`).
    pub strip_headers: Option<Vec<String>>,
    /// `replace` (default) or `append`: what happens to a client's X-Forwarded-For.
    pub forwarded_for: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrontendTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Option<String>,
    pub balance: Option<String>,
    #[serde(default)]
    pub servers: Vec<String>,
    pub connect_timeout: Option<String>,
    pub connect_attempts: Option<u32>,
    pub when_all_down: Option<String>,
    pub drain_timeout: Option<String>,
    pub tls: Option<RawUpstreamTls>,
    pub health: Option<RawHealth>,
    pub discovery: Option<super::discovery::RawDiscovery>,
    pub upstream: Option<RawUpstreamLimits>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamLimits {
    pub max_connections_per_server: Option<usize>,
    pub max_queued: Option<usize>,
    pub queue_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub front_proxy_cert_file: Option<String>,
    pub front_proxy_key_file: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub check: Option<String>,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub close_after_down: Option<String>,
    pub tls: Option<RawProbeTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbeTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}
