//! The configuration: the checked `Config` the rest of apilb runs on, and `load()`.
//!
//! `raw` holds the serde types that mirror the file; `validate` turns them into a
//! `Config`, collecting every problem with its field path. Nothing here opens a
//! socket or starts a task.

pub mod discovery;
pub mod raw;
mod selfaddr;
mod validate;
pub mod vip;
mod yamldepth;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use selfaddr::{is_self_address, local_addresses};
pub use validate::validate;
pub use vip::VipConfig;
pub use yamldepth::MAX_YAML_DEPTH;

/// Where the admin server listens when `admin.listen` is not set.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8404";
/// How long open connections may finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Open client connections per frontend before new ones are refused.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Time allowed for one TCP connect to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Distinct servers tried for one client connection.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;
/// Probe path: `/readyz` fails as soon as an apiserver begins shutting down.
pub const DEFAULT_HEALTH_PATH: &str = "/readyz";
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTH_RISE: u32 = 2;
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// L7: time allowed for a response to a request that is not long-running
/// (watch, logs -f, exec, attach, port-forward and proxy have none).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// L7: a client must send its request headers (and finish TLS) within this.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// L7: total request header size; OIDC bearer tokens run to several KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// L7: concurrent HTTP/2 streams per client connection (the apiserver's own default).
pub const DEFAULT_HTTP2_MAX_STREAMS: u32 = 250;
/// How often a PING goes to each HTTP/2 client.
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING's answer may take before the connection is closed as dead.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest keep-alive interval or timeout accepted.
pub const MAX_HTTP2_KEEPALIVE: Duration = Duration::from_secs(24 * 3600);
/// L7 upstream: connections (HTTP/2 and HTTP/1.1) per server and identity;
/// 256 × 100 streams holds 20,000 watches with room to spare.
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS_PER_SERVER: usize = 256;
/// L7 upstream: requests that may wait for a free stream per server and
/// identity; beyond it they get 503 at once.
pub const DEFAULT_UPSTREAM_MAX_QUEUED: usize = 4096;
/// L7 upstream: how long a request waits for a free stream before its 503.
pub const DEFAULT_UPSTREAM_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on `connect_attempts`; more only delays the client's own retry.
pub const MAX_CONNECT_ATTEMPTS: u32 = 16;
/// Upper bound on `workers`.
pub const MAX_WORKERS: usize = 256;
/// `check` and every reload warn about certificates that expire within this.
pub const CERT_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// A whole, checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, when there is one (reloads re-read it).
    pub source: Option<PathBuf>,
    pub admin: AdminConfig,
    pub shutdown_grace: Duration,
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    pub frontends: Vec<FrontendConfig>,
    pub pools: Vec<PoolConfig>,
    /// VIP ownership through etcd leader election; `None`: apilb holds no address.
    pub vip: Option<VipConfig>,
    /// Every certificate file named, with its earliest expiry: for the expiry
    /// warnings and the `apilb_tls_certificate_expiry_timestamp_seconds` metric.
    pub certificates: Vec<CertExpiry>,
}

/// When the certificates of one file named in the config expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    /// The field that names the file (`frontends[0].tls.cert_file`).
    pub field: String,
    pub file: PathBuf,
    /// The earliest `notAfter` in the file, Unix seconds.
    pub not_after: i64,
}

impl Config {
    /// No frontends, no pools: what runs before the first config applies.
    pub fn empty() -> Self {
        Config {
            source: None,
            admin: AdminConfig {
                listen: ([127, 0, 0, 1], 0).into(),
            },
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            workers: None,
            frontends: Vec::new(),
            pools: Vec::new(),
            vip: None,
            certificates: Vec::new(),
        }
    }

    /// One line per certificate that expires within [`CERT_EXPIRY_WARNING`]
    /// of `now` (Unix seconds) or already has.
    pub fn expiry_warnings(&self, now: i64) -> Vec<String> {
        let window = CERT_EXPIRY_WARNING.as_secs() as i64;
        let mut seen = HashSet::new();
        self.certificates
            .iter()
            .filter(|c| c.not_after - now < window && seen.insert(&c.file))
            .map(|c| {
                let left = c.not_after - now;
                let when = if left <= 0 {
                    format!("expired {} days ago", -left / 86_400)
                } else {
                    format!("expires in {} days", left / 86_400)
                };
                format!(
                    "{}: certificate {} {when} (notAfter {})",
                    c.field,
                    c.file.display(),
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(c.not_after.max(0) as u64)
                    )
                )
            })
            .collect()
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The one-line summary `apilb check` prints.
    pub fn summary(&self) -> String {
        let servers: usize = self.pools.iter().map(|p| p.servers.len()).sum();
        format!(
            "ok: {} frontends, {} pools, {} servers",
            self.frontends.len(),
            self.pools.len(),
            servers
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes pass through untouched; TLS stays end to end.
    Tcp,
    /// TLS ends at apilb; every HTTP request is balanced on its own.
    Http,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub mode: Mode,
    pub pool: String,
    pub max_connections: usize,
    /// Close a connection after this long with no byte either way; off by default
    /// because watches and `logs -f` sit idle for minutes.
    pub idle_timeout: Option<Duration>,
    /// `tcp` only: move bulk transfers with splice(2) (less CPU per byte)
    /// instead of copying through a buffer (more throughput on loopback).
    pub splice: bool,
    /// `mode: http` only.
    pub http: Option<HttpFrontend>,
}

/// Settings of an L7 (`mode: http`) frontend.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpFrontend {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Verify client certificates against this CA; verified clients are sent
    /// upstream with front-proxy identity headers.
    pub client_ca_file: Option<PathBuf>,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub http2_max_concurrent_streams: u32,
    /// A PING to each HTTP/2 client this often; no answer within the
    /// timeout closes the connection (a peer gone without a FIN or RST).
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Client header names removed besides `X-Remote-*` (lowercase).
    pub strip_headers: Vec<String>,
    pub forwarded_for: ForwardedFor,
}

/// What an L7 frontend does with client-sent X-Forwarded-For, X-Real-Ip and Forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedFor {
    /// Drop them and send X-Forwarded-For with the client's address only: the
    /// apiserver's audit log takes `sourceIPs` from it.
    #[default]
    Replace,
    /// Keep them and append the client's address (a trusted proxy is in front).
    Append,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDownPolicy {
    /// Fail open: keep spreading over every server when none looks healthy.
    TryAll,
    /// Close new connections at once when no server is healthy.
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<ServerConfig>,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub when_all_down: AllDownPolicy,
    /// After a reload removes a server, close its open connections after this
    /// long; `None` lets them run until they end by themselves.
    pub drain_timeout: Option<Duration>,
    /// Upstream TLS for L7 frontends; checked here so a reload can refuse it.
    pub tls: Option<UpstreamTls>,
    pub health: HealthConfig,
    /// Members from the cluster (issue 13): they replace `servers` (the
    /// seeds) once discovery or its cache has given a set.
    pub discovery: Option<discovery::KubernetesDiscovery>,
    /// Where `servers` came from: the file, or discovery's overlay.
    pub members: discovery::Members,
    /// Bounds of the L7 upstream connection pools.
    pub upstream: UpstreamLimits,
}

/// `pools[].upstream`: how far an L7 frontend's upstream pools may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    pub max_connections_per_server: usize,
    pub max_queued: usize,
    pub queue_timeout: Duration,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            max_connections_per_server: DEFAULT_UPSTREAM_MAX_CONNECTIONS_PER_SERVER,
            max_queued: DEFAULT_UPSTREAM_MAX_QUEUED,
            queue_timeout: DEFAULT_UPSTREAM_QUEUE_TIMEOUT,
        }
    }
}

/// One backend as written in `servers`, with the address it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `host:port` as written (without a scheme): the identity used for metrics
    /// labels, logs and carrying state across reloads.
    pub key: String,
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamTls {
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub front_proxy_cert_file: Option<PathBuf>,
    pub front_proxy_key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Http,
    Https,
    None,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::None => "none",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub check: CheckKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Close client connections to a backend that stayed down this long.
    pub close_after_down: Option<Duration>,
    pub tls: ProbeTls,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeTls {
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// One problem in a config file, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `pools[1].health.rise`, or the file path for problems with the file itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one config; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub errors: Vec<FieldError>,
}

impl ConfigError {
    pub fn single(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates a config file. Blocking (file I/O and DNS):
/// async callers run it on `spawn_blocking`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    from_bytes(path, &read_file(path)?)
}

/// Reads a config file through the bounded reader: a regular file (or a
/// symlink to one) of at most 1 MiB. Blocking.
pub fn read_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    crate::fsread::read_bounded(path).map_err(|e| {
        ConfigError::single(
            path.display().to_string(),
            format!("cannot read config: {e}"),
        )
    })
}

/// Parses and validates the bytes of the file at `path` (used for errors and
/// recorded as the config's source). Blocking: it resolves host names.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ConfigError::single(path.display().to_string(), format!("not UTF-8 text: {e}"))
    })?;
    let mut cfg = parse(text).map_err(|mut e| {
        for fe in &mut e.errors {
            if fe.path.is_empty() {
                fe.path = path.display().to_string();
            }
        }
        e
    })?;
    cfg.source = Some(path.to_path_buf());
    Ok(cfg)
}

/// Parses and validates YAML text. Relative TLS paths are taken as written.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::single("", "config is empty"));
    }
    yamldepth::check(text).map_err(|e| ConfigError::single("", format!("invalid YAML: {e}")))?;
    let raw: raw::RawConfig = serde_yaml::from_str(text).map_err(|e| yaml_error(text, &e))?;
    validate(&raw)
}

/// serde_yaml's error with its place: serde_yaml names the field path itself
/// ("pools[0].rise: ...") and the place for most errors; add it where not.
fn yaml_error(text: &str, e: &serde_yaml::Error) -> ConfigError {
    let msg = e.to_string();
    let located = match e.location() {
        Some(l) if !msg.contains(" line ") => {
            format!("{msg} at line {} column {}", l.line(), l.column())
        }
        None if msg.contains("more than one document") => match yamldepth::second_document(text) {
            Some((line, column)) => format!(
                "a second document starts at line {line} column {column}; apilb reads one document per file"
            ),
            None => msg,
        },
        _ => msg,
    };
    ConfigError::single("", format!("invalid YAML: {located}"))
}
