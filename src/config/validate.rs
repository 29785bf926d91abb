//! Turns a `RawConfig` into a checked `Config`, collecting every error with its path.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::raw::*;
use super::*;
use crate::tls;

/// Collects errors while walking the raw config, and the certificate files
/// read on the way (for expiry warnings).
pub(super) struct Errors(Vec<FieldError>, Vec<CertExpiry>);

impl Errors {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        path: String,
        value: &Option<String>,
        default: Duration,
    ) -> Duration {
        self.opt_duration(path, value).unwrap_or(default)
    }

    fn opt_duration(&mut self, path: String, value: &Option<String>) -> Option<Duration> {
        let text = value.as_deref()?;
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.push(path, "must be longer than 0");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.push(
                    path,
                    format!("invalid duration {text:?} ({e}); write e.g. 500ms, 2s, 1m"),
                );
                None
            }
        }
    }

    fn socket_addr(&mut self, path: String, value: &str) -> Option<SocketAddr> {
        match value.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    path,
                    format!("invalid address {value:?}: write IP:port, e.g. 0.0.0.0:8443"),
                );
                None
            }
        }
    }

    pub(super) fn required<'a>(
        &mut self,
        path: String,
        value: &'a Option<String>,
    ) -> Option<&'a str> {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.push(path, "is required");
                None
            }
        }
    }

    /// A file that must exist and hold PEM certificates.
    pub(super) fn cert_file(&mut self, path: String, value: &Option<String>) -> Option<PathBuf> {
        self.certs(path, value).map(|(file, _)| file)
    }

    /// [`Self::cert_file`], also returning the certificates when they load.
    fn certs(
        &mut self,
        path: String,
        value: &Option<String>,
    ) -> Option<(PathBuf, Option<Vec<CertificateDer<'static>>>)> {
        let file = PathBuf::from(value.as_deref()?);
        match tls::load_certs(&file) {
            Ok(certs) => {
                if let Some(not_after) = tls::earliest_expiry(&certs) {
                    self.1.push(CertExpiry {
                        field: path,
                        file: file.clone(),
                        not_after,
                    });
                }
                Some((file, Some(certs)))
            }
            Err(e) => {
                self.push(path, e.to_string());
                Some((file, None))
            }
        }
    }

    /// A file that must exist and hold a PEM private key.
    fn key_file(
        &mut self,
        path: String,
        value: &Option<String>,
    ) -> Option<(PathBuf, Option<PrivateKeyDer<'static>>)> {
        let file = PathBuf::from(value.as_deref()?);
        match tls::load_key(&file) {
            Ok(k) => Some((file, Some(k))),
            Err(e) => {
                self.push(path, e.to_string());
                Some((file, None))
            }
        }
    }

    /// A certificate and its key, which must belong together.
    fn cert_and_key(
        &mut self,
        (cert_path, cert): (String, &Option<String>),
        (key_path, key): (String, &Option<String>),
    ) -> (Option<PathBuf>, Option<PathBuf>) {
        let c = self.certs(cert_path, cert);
        let k = self.key_file(key_path.clone(), key);
        if let (Some((cf, Some(certs))), Some((_, Some(key)))) = (&c, &k) {
            if let Err(e) = tls::check_key_matches(certs, key.clone_key()) {
                self.push(key_path, format!("{e} in {}", cf.display()));
            }
        }
        (c.map(|(f, _)| f), k.map(|(f, _)| f))
    }

    /// A TLS `server_name`: a DNS name or an IP address.
    fn server_name(&mut self, path: String, value: &Option<String>) -> Option<String> {
        let name = value.as_ref()?;
        if tls::server_name(name).is_err() {
            self.push(
                path,
                format!("{name:?} is neither a DNS name nor an IP address"),
            );
        }
        Some(name.clone())
    }

    /// One of a fixed set of words (the first is the default when unset), or
    /// an error naming the words accepted.
    fn choice<T: Copy>(
        &mut self,
        path: String,
        (what, expected): (&str, &str),
        value: Option<&str>,
        words: &[(&str, T)],
    ) -> Option<T> {
        let v = value.unwrap_or(words[0].0);
        let found = words.iter().find(|(w, _)| *w == v).map(|(_, t)| *t);
        if found.is_none() {
            self.push(path, format!("unknown {what} {v:?}: expected {expected}"));
        }
        found
    }

    /// A cert/key pair: both or neither.
    pub(super) fn pair(
        &mut self,
        base: &str,
        (cert_name, cert): (&str, &Option<String>),
        (key_name, key): (&str, &Option<String>),
    ) -> (Option<PathBuf>, Option<PathBuf>) {
        match (cert, key) {
            (Some(_), None) => self.push(
                format!("{base}.{key_name}"),
                format!("is required when {cert_name} is set"),
            ),
            (None, Some(_)) => self.push(
                format!("{base}.{cert_name}"),
                format!("is required when {key_name} is set"),
            ),
            _ => {}
        }
        self.cert_and_key(
            (format!("{base}.{cert_name}"), cert),
            (format!("{base}.{key_name}"), key),
        )
    }
}

/// Checks a raw config; returns every problem found, not just the first.
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigError> {
    let mut errs = Errors(Vec::new(), Vec::new());

    let admin_listen = raw
        .admin
        .as_ref()
        .and_then(|a| a.listen.clone())
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
    let admin_addr = errs.socket_addr("admin.listen".into(), &admin_listen);
    let shutdown_grace = errs.duration(
        "shutdown_grace".into(),
        &raw.shutdown_grace,
        DEFAULT_SHUTDOWN_GRACE,
    );
    if let Some(w) = raw.workers {
        if w == 0 || w > MAX_WORKERS {
            errs.push("workers", format!("must be between 1 and {MAX_WORKERS}"));
        }
    }

    let pools = pools(&mut errs, raw);
    let frontends = frontends(&mut errs, raw, admin_addr);
    let mut listens: Vec<SocketAddr> = frontends.iter().map(|f| f.listen).collect();
    listens.extend(admin_addr);
    loop_check(&mut errs, &pools, &listens);

    let vip = raw
        .vip
        .as_ref()
        .and_then(|v| super::vip::validate(&mut errs, v));
    if !errs.0.is_empty() {
        return Err(ConfigError { errors: errs.0 });
    }
    Ok(Config {
        source: None,
        admin: AdminConfig {
            listen: admin_addr.expect("checked above"),
        },
        shutdown_grace,
        workers: raw.workers,
        frontends,
        pools,
        vip,
        certificates: errs.1,
    })
}

/// Every valid pool, and an error for each name used twice.
fn pools(errs: &mut Errors, raw: &RawConfig) -> Vec<PoolConfig> {
    let pools = raw
        .pools
        .iter()
        .enumerate()
        .filter_map(|(i, p)| pool(errs, i, p))
        .collect();
    let mut names = HashSet::new();
    for (i, p) in raw.pools.iter().enumerate() {
        if let Some(name) = p.name.as_deref() {
            if !names.insert(name) {
                errs.push(
                    format!("pools[{i}].name"),
                    format!("duplicate pool name {name:?}"),
                );
            }
        }
    }
    pools
}

/// What the frontends checked so far have taken, so that no two share it.
struct Taken<'a> {
    names: HashSet<&'a str>,
    /// Listen address → the frontend's index (`usize::MAX`: admin.listen).
    addrs: HashMap<SocketAddr, usize>,
}

/// Every valid frontend; refuses names and listen addresses used twice.
fn frontends(errs: &mut Errors, raw: &RawConfig, admin: Option<SocketAddr>) -> Vec<FrontendConfig> {
    let mut taken = Taken {
        names: HashSet::new(),
        addrs: HashMap::new(),
    };
    // Port 0 asks the kernel for a free port: never a clash (tests use it).
    if let Some(a) = admin.filter(|a| a.port() != 0) {
        taken.addrs.insert(a, usize::MAX);
    }
    if raw.frontends.is_empty() {
        errs.push("frontends", "at least one frontend is required");
    }
    raw.frontends
        .iter()
        .enumerate()
        .filter_map(|(i, f)| frontend(errs, raw, &mut taken, i, f))
        .collect()
}

fn frontend<'a>(
    errs: &mut Errors,
    raw: &RawConfig,
    taken: &mut Taken<'a>,
    i: usize,
    f: &'a RawFrontend,
) -> Option<FrontendConfig> {
    let base = format!("frontends[{i}]");
    let name = errs.required(format!("{base}.name"), &f.name);
    if let Some(n) = name.filter(|n| !taken.names.insert(*n)) {
        errs.push(
            format!("{base}.name"),
            format!("duplicate frontend name {n:?}"),
        );
    }
    let listen = errs
        .required(format!("{base}.listen"), &f.listen)
        .and_then(|l| errs.socket_addr(format!("{base}.listen"), l));
    if let Some(a) = listen.filter(|a| a.port() != 0) {
        let used_by = match taken.addrs.insert(a, i) {
            Some(usize::MAX) => Some("admin.listen".to_string()),
            Some(j) => Some(format!("frontends[{j}]")),
            None => None,
        };
        if let Some(u) = used_by {
            errs.push(
                format!("{base}.listen"),
                format!("{a} is already used by {u}"),
            );
        }
    }
    let mode = errs.choice(
        format!("{base}.mode"),
        ("mode", "tcp or http"),
        f.mode.as_deref(),
        &[("tcp", Mode::Tcp), ("http", Mode::Http)],
    );
    let http = mode_fields(errs, &base, mode, f);
    let pool = frontend_pool(errs, raw, (&base, f), mode, name);
    let max_connections = f.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        errs.push(format!("{base}.max_connections"), "must be at least 1");
    }
    let idle_timeout = errs.opt_duration(format!("{base}.idle_timeout"), &f.idle_timeout);
    Some(FrontendConfig {
        idle_timeout,
        name: name?.to_string(),
        listen: listen?,
        mode: mode?,
        pool: pool?.to_string(),
        max_connections,
        splice: f.splice.unwrap_or(false),
        http,
    })
}

/// The fields of the frontend's mode; the other mode's fields are errors.
fn mode_fields(
    errs: &mut Errors,
    base: &str,
    mode: Option<Mode>,
    f: &RawFrontend,
) -> Option<HttpFrontend> {
    let only_with = |errs: &mut Errors, mode: &str, fields: &[(&str, bool)]| {
        for (key, _) in fields.iter().filter(|(_, set)| *set) {
            errs.push(
                format!("{base}.{key}"),
                format!("only used with mode: {mode}"),
            );
        }
    };
    if mode == Some(Mode::Http) {
        let tcp_only = [
            ("idle_timeout", f.idle_timeout.is_some()),
            ("splice", f.splice.is_some()),
        ];
        only_with(errs, "tcp", &tcp_only);
        return http_frontend(errs, base, f);
    }
    if f.tls.is_some() {
        errs.push(
            format!("{base}.tls"),
            "only http frontends terminate TLS; a tcp frontend passes it through",
        );
    }
    let http_only = [
        ("request_timeout", f.request_timeout.is_some()),
        ("header_timeout", f.header_timeout.is_some()),
        ("max_header_bytes", f.max_header_bytes.is_some()),
        (
            "http2_max_concurrent_streams",
            f.http2_max_concurrent_streams.is_some(),
        ),
        (
            "http2_keepalive_interval",
            f.http2_keepalive_interval.is_some(),
        ),
        (
            "http2_keepalive_timeout",
            f.http2_keepalive_timeout.is_some(),
        ),
        ("strip_headers", f.strip_headers.is_some()),
        ("forwarded_for", f.forwarded_for.is_some()),
    ];
    only_with(errs, "http", &http_only);
    None
}

/// The frontend's pool: it must exist, and an http frontend's pool must be
/// able to verify the apiservers' certificates.
fn frontend_pool<'a>(
    errs: &mut Errors,
    raw: &RawConfig,
    (base, f): (&str, &'a RawFrontend),
    mode: Option<Mode>,
    name: Option<&str>,
) -> Option<&'a str> {
    let p = errs.required(format!("{base}.pool"), &f.pool)?;
    let Some(pi) = raw
        .pools
        .iter()
        .position(|rp| rp.name.as_deref() == Some(p))
    else {
        errs.push(format!("{base}.pool"), format!("no pool named {p:?}"));
        return Some(p);
    };
    let t = raw.pools[pi].tls.as_ref();
    if mode == Some(Mode::Http) && !t.is_some_and(|t| t.ca_file.is_some() || t.insecure_skip_verify)
    {
        errs.push(
            format!("pools[{pi}].tls.ca_file"),
            format!("is required: http frontend {:?} sends requests to this pool over TLS (or set insecure_skip_verify: true)", name.unwrap_or("")),
        );
    }
    Some(p)
}

/// Refuses pool servers that are apilb's own frontend or admin addresses.
fn loop_check(errs: &mut Errors, pools: &[PoolConfig], listens: &[SocketAddr]) {
    if listens.iter().all(|l| l.port() == 0) {
        return;
    }
    let local = local_addresses();
    for (i, p) in pools.iter().enumerate() {
        for (j, s) in p.servers.iter().enumerate() {
            if is_self_address(s.addr, listens, &local) {
                errs.push(
                    format!("pools[{i}].servers[{j}]"),
                    format!(
                        "{} ({}) is one of apilb's own listen addresses: a loop",
                        s.key, s.addr
                    ),
                );
            }
        }
    }
}

fn pool(errs: &mut Errors, i: usize, p: &RawPool) -> Option<PoolConfig> {
    let base = format!("pools[{i}]");
    let name = errs.required(format!("{base}.name"), &p.name);
    let balance = errs.choice(
        format!("{base}.balance"),
        ("balance", "round-robin or least-connections"),
        p.balance.as_deref(),
        &[
            ("round-robin", Balance::RoundRobin),
            ("roundrobin", Balance::RoundRobin),
            ("least-connections", Balance::LeastConnections),
            ("leastconn", Balance::LeastConnections),
        ],
    );
    if p.servers.is_empty() {
        errs.push(format!("{base}.servers"), "at least one server is required");
    }
    let mut servers = Vec::new();
    let mut seen = HashSet::new();
    for (j, s) in p.servers.iter().enumerate() {
        let path = format!("{base}.servers[{j}]");
        match server(s) {
            Ok(sc) => {
                if !seen.insert(sc.key.clone()) {
                    errs.push(path, format!("duplicate server {:?} in this pool", sc.key));
                } else {
                    servers.push(sc);
                }
            }
            Err(msg) => errs.push(path, msg),
        }
    }
    let connect_timeout = errs.duration(
        format!("{base}.connect_timeout"),
        &p.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let connect_attempts = p.connect_attempts.unwrap_or(DEFAULT_CONNECT_ATTEMPTS);
    if !(1..=MAX_CONNECT_ATTEMPTS).contains(&connect_attempts) {
        errs.push(
            format!("{base}.connect_attempts"),
            format!("must be between 1 and {MAX_CONNECT_ATTEMPTS}"),
        );
    }
    let when_all_down = errs.choice(
        format!("{base}.when_all_down"),
        ("policy", "try-all or reject"),
        p.when_all_down.as_deref(),
        &[
            ("try-all", AllDownPolicy::TryAll),
            ("reject", AllDownPolicy::Reject),
        ],
    );
    let drain_timeout = errs.opt_duration(format!("{base}.drain_timeout"), &p.drain_timeout);
    let tls = p.tls.as_ref().map(|t| upstream_tls(errs, &base, t));
    let health = health(errs, &base, p.health.as_ref());
    let upstream = upstream_limits(errs, &base, p.upstream.as_ref());
    let discovery = p
        .discovery
        .as_ref()
        .and_then(|d| super::discovery::check(&base, d, &mut errs.0));
    Some(PoolConfig {
        name: name?.to_string(),
        balance: balance?,
        servers,
        connect_timeout,
        connect_attempts,
        when_all_down: when_all_down?,
        drain_timeout,
        tls,
        health: health?,
        discovery,
        members: Default::default(),
        upstream,
    })
}

/// A pool's `tls`: how apilb verifies the apiservers and proves itself to them.
fn upstream_tls(errs: &mut Errors, base: &str, t: &RawUpstreamTls) -> UpstreamTls {
    let tb = format!("{base}.tls");
    let ca_file = t
        .ca_file
        .as_ref()
        .and_then(|_| errs.cert_file(format!("{tb}.ca_file"), &t.ca_file));
    let (front_proxy_cert_file, front_proxy_key_file) = errs.pair(
        &tb,
        ("front_proxy_cert_file", &t.front_proxy_cert_file),
        ("front_proxy_key_file", &t.front_proxy_key_file),
    );
    let server_name = errs.server_name(format!("{tb}.server_name"), &t.server_name);
    if t.insecure_skip_verify && t.ca_file.is_some() {
        errs.push(
            format!("{tb}.insecure_skip_verify"),
            "contradicts ca_file: set one or the other",
        );
    }
    UpstreamTls {
        ca_file,
        server_name,
        front_proxy_cert_file,
        front_proxy_key_file,
        insecure_skip_verify: t.insecure_skip_verify,
    }
}

fn upstream_limits(
    errs: &mut Errors,
    base: &str,
    u: Option<&super::raw::RawUpstreamLimits>,
) -> UpstreamLimits {
    let mut l = UpstreamLimits::default();
    let Some(u) = u else { return l };
    let b = format!("{base}.upstream");
    for (key, value, slot) in [
        (
            "max_connections_per_server",
            u.max_connections_per_server,
            &mut l.max_connections_per_server,
        ),
        ("max_queued", u.max_queued, &mut l.max_queued),
    ] {
        match value {
            Some(0) => errs.push(format!("{b}.{key}"), "must be at least 1"),
            Some(v) => *slot = v,
            None => {}
        }
    }
    if let Some(t) = errs.opt_duration(format!("{b}.queue_timeout"), &u.queue_timeout) {
        if t.is_zero() {
            errs.push(format!("{b}.queue_timeout"), "must be longer than 0s");
        } else {
            l.queue_timeout = t;
        }
    }
    l
}

fn http_frontend(errs: &mut Errors, base: &str, f: &RawFrontend) -> Option<HttpFrontend> {
    let request_timeout = errs.duration(
        format!("{base}.request_timeout"),
        &f.request_timeout,
        DEFAULT_REQUEST_TIMEOUT,
    );
    let header_timeout = errs.duration(
        format!("{base}.header_timeout"),
        &f.header_timeout,
        DEFAULT_HEADER_TIMEOUT,
    );
    let max_header_bytes = f.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        errs.push(
            format!("{base}.max_header_bytes"),
            "must be between 1024 and 1048576",
        );
    }
    let streams = f
        .http2_max_concurrent_streams
        .unwrap_or(DEFAULT_HTTP2_MAX_STREAMS);
    if !(1..=10_000).contains(&streams) {
        errs.push(
            format!("{base}.http2_max_concurrent_streams"),
            "must be between 1 and 10000",
        );
    }
    let (keepalive_interval, keepalive_timeout) = keepalive(errs, base, f);
    let Some(t) = &f.tls else {
        errs.push(
            format!("{base}.tls"),
            "is required for mode: http (cert_file and key_file)",
        );
        return None;
    };
    let tb = format!("{base}.tls");
    let cert = errs
        .required(format!("{tb}.cert_file"), &t.cert_file)
        .map(|_| ());
    let key = errs
        .required(format!("{tb}.key_file"), &t.key_file)
        .map(|_| ());
    let (cert_file, key_file) = match (cert, key) {
        (Some(()), Some(())) => errs.cert_and_key(
            (format!("{tb}.cert_file"), &t.cert_file),
            (format!("{tb}.key_file"), &t.key_file),
        ),
        _ => (None, None),
    };
    let client_ca_file = t
        .client_ca_file
        .as_ref()
        .and_then(|_| errs.cert_file(format!("{tb}.client_ca_file"), &t.client_ca_file));
    let strip_headers = header_names(errs, base, f.strip_headers.as_deref().unwrap_or(&[]));
    let forwarded_for = errs
        .choice(
            format!("{base}.forwarded_for"),
            ("value", "replace or append"),
            f.forwarded_for.as_deref(),
            &[
                ("replace", ForwardedFor::Replace),
                ("append", ForwardedFor::Append),
            ],
        )
        .unwrap_or_default();
    Some(HttpFrontend {
        strip_headers,
        forwarded_for,
        cert_file: cert_file?,
        key_file: key_file?,
        client_ca_file,
        request_timeout,
        header_timeout,
        max_header_bytes,
        http2_max_concurrent_streams: streams,
        http2_keepalive_interval: keepalive_interval,
        http2_keepalive_timeout: keepalive_timeout,
    })
}

/// `http2_keepalive_interval` and `_timeout`: above zero, at most 24h (a
/// larger one would overflow the clock when added to now).
fn keepalive(errs: &mut Errors, base: &str, f: &RawFrontend) -> (Duration, Duration) {
    let mut read = |key: &str, value: &Option<String>, default: Duration| {
        let d = errs.duration(format!("{base}.{key}"), value, default);
        if d > MAX_HTTP2_KEEPALIVE {
            errs.push(format!("{base}.{key}"), "must be at most 24h");
        }
        d
    };
    (
        read(
            "http2_keepalive_interval",
            &f.http2_keepalive_interval,
            DEFAULT_HTTP2_KEEPALIVE_INTERVAL,
        ),
        read(
            "http2_keepalive_timeout",
            &f.http2_keepalive_timeout,
            DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
        ),
    )
}

/// `strip_headers`: valid header names, kept lowercase.
fn header_names(errs: &mut Errors, base: &str, names: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (k, n) in names.iter().enumerate() {
        match http::HeaderName::from_bytes(n.trim().as_bytes()) {
            Ok(h) => out.push(h.as_str().to_string()),
            Err(_) => errs.push(
                format!("{base}.strip_headers[{k}]"),
                format!("{n:?} is not a valid header name"),
            ),
        }
    }
    out
}

fn health(errs: &mut Errors, pool_base: &str, h: Option<&RawHealth>) -> Option<HealthConfig> {
    let base = format!("{pool_base}.health");
    let empty = RawHealth::default();
    let h = h.unwrap_or(&empty);
    let check = errs.choice(
        format!("{base}.check"),
        ("check", "tcp, http, https or none"),
        h.check.as_deref(),
        &[
            ("tcp", CheckKind::Tcp),
            ("http", CheckKind::Http),
            ("https", CheckKind::Https),
            ("none", CheckKind::None),
        ],
    );
    let path = h
        .path
        .clone()
        .unwrap_or_else(|| DEFAULT_HEALTH_PATH.to_string());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        errs.push(
            format!("{base}.path"),
            format!("invalid path {path:?}: must start with / and hold no spaces"),
        );
    }
    let interval = errs.duration(
        format!("{base}.interval"),
        &h.interval,
        DEFAULT_HEALTH_INTERVAL,
    );
    let timeout = errs.duration(
        format!("{base}.timeout"),
        &h.timeout,
        DEFAULT_HEALTH_TIMEOUT,
    );
    if timeout >= interval {
        errs.push(
            format!("{base}.timeout"),
            format!(
                "must be shorter than interval ({} >= {})",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        );
    }
    let rise = h.rise.unwrap_or(DEFAULT_HEALTH_RISE);
    if rise < 1 {
        errs.push(format!("{base}.rise"), "must be at least 1");
    }
    let fall = h.fall.unwrap_or(DEFAULT_HEALTH_FALL);
    if fall < 1 {
        errs.push(format!("{base}.fall"), "must be at least 1");
    }
    let close_after_down =
        errs.opt_duration(format!("{base}.close_after_down"), &h.close_after_down);
    let tls = match &h.tls {
        None => ProbeTls::default(),
        Some(t) => {
            if check != Some(CheckKind::Https) {
                errs.push(format!("{base}.tls"), "only used with check: https");
            }
            probe_tls(errs, &base, t)
        }
    };
    if check == Some(CheckKind::Https) && tls.ca_file.is_none() && !tls.insecure_skip_verify {
        errs.push(
            format!("{base}.tls.ca_file"),
            "is required for https checks (the cluster CA), or set insecure_skip_verify: true",
        );
    }
    Some(HealthConfig {
        check: check?,
        path,
        interval,
        timeout,
        rise,
        fall,
        close_after_down,
        tls,
    })
}

/// A health check's `tls`: how an https probe verifies the server and proves
/// itself to it.
fn probe_tls(errs: &mut Errors, base: &str, t: &RawProbeTls) -> ProbeTls {
    let tb = format!("{base}.tls");
    let ca_file = t
        .ca_file
        .as_ref()
        .and_then(|_| errs.cert_file(format!("{tb}.ca_file"), &t.ca_file));
    if t.insecure_skip_verify && ca_file.is_some() {
        errs.push(
            format!("{tb}.insecure_skip_verify"),
            "contradicts ca_file: set one or the other",
        );
    }
    let (cert_file, key_file) =
        errs.pair(&tb, ("cert_file", &t.cert_file), ("key_file", &t.key_file));
    ProbeTls {
        ca_file,
        server_name: errs.server_name(format!("{tb}.server_name"), &t.server_name),
        cert_file,
        key_file,
        insecure_skip_verify: t.insecure_skip_verify,
    }
}

/// Parses `host:port`, `[v6]:port` or `https://host:port`, and resolves the host.
pub(crate) fn server(text: &str) -> Result<ServerConfig, String> {
    let t = text.trim();
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("http://"))
        .unwrap_or(t);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains("://") {
        return Err(format!(
            "invalid server {text:?}: write host:port or https://host:port"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6
            .split_once("]:")
            .ok_or_else(|| format!("invalid server {text:?}: write [v6-address]:port"))?;
        (h, p)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| format!("invalid server {text:?}: a port is required (host:port)"))?
    };
    if host.is_empty() {
        return Err(format!("invalid server {text:?}: the host is empty"));
    }
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(format!(
                "invalid server {text:?}: port {port:?} is not 1-65535"
            ))
        }
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} resolved to no address"))?;
    let key = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(ServerConfig {
        key,
        host: host.to_string(),
        port,
        addr,
    })
}
