//! The Prometheus registry and every metric handle apilb records into.
//!
//! Labels are pool, server (as written in the config), frontend, direction and
//! small fixed enums; never paths or client addresses. Per-backend and
//! per-frontend handles are resolved once (`backend()`, `frontend()`) so the
//! byte path touches a plain atomic, never a label lookup.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const BACKEND_UP: &str = "apilb_backend_up";
pub const BACKEND_ACTIVE: &str = "apilb_backend_active_connections";
pub const BACKEND_CONNECTIONS: &str = "apilb_backend_connections_total";
pub const BACKEND_CONNECT_FAILURES: &str = "apilb_backend_connect_failures_total";
pub const BACKEND_UPSTREAM_CONNECTIONS: &str = "apilb_backend_upstream_connections";
pub const BACKEND_UPSTREAM_STREAMS: &str = "apilb_backend_upstream_streams";
pub const BACKEND_QUEUED: &str = "apilb_backend_queued_requests";
pub const BACKEND_REFUSED_RETRIED: &str = "apilb_backend_refused_retried_total";
pub const BACKEND_BYTES: &str = "apilb_backend_bytes_total";
pub const BACKEND_CONNECT_DURATION: &str = "apilb_backend_connect_duration_seconds";
pub const HEALTH_CHECKS: &str = "apilb_health_checks_total";
pub const HEALTH_CHECK_DURATION: &str = "apilb_health_check_duration_seconds";
pub const POOL_UP_BACKENDS: &str = "apilb_pool_up_backends";
pub const POOL_ALL_DOWN: &str = "apilb_pool_all_down";
pub const FRONTEND_CONNECTIONS: &str = "apilb_frontend_connections_total";
pub const FRONTEND_ACTIVE: &str = "apilb_frontend_active_connections";
pub const FRONTEND_REJECTED: &str = "apilb_frontend_rejected_connections_total";
pub const FRONTEND_MAX: &str = "apilb_frontend_max_connections";
pub const CONFIG_RELOADS: &str = "apilb_config_reloads_total";
pub const CONFIG_LAST_OK: &str = "apilb_config_last_reload_successful";
pub const CONFIG_LAST_OK_TS: &str = "apilb_config_last_reload_success_timestamp_seconds";
pub const BUILD_INFO: &str = "apilb_build_info";
pub const HTTP_REQUESTS: &str = "apilb_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "apilb_http_request_duration_seconds";
pub const HTTP_ACTIVE_STREAMS: &str = "apilb_http_active_streams";
pub const HTTP_ACTIVE_TUNNELS: &str = "apilb_http_active_tunnels";
pub const LOCAL_ERRORS: &str = "apilb_local_errors_total";
pub const DISCOVERY_ENDPOINTS: &str = "apilb_discovery_endpoints";
pub const DISCOVERY_ERRORS: &str = "apilb_discovery_errors_total";
pub const DISCOVERY_LAST_SYNC: &str = "apilb_discovery_last_sync_timestamp_seconds";
pub const TLS_CERT_EXPIRY: &str = "apilb_tls_certificate_expiry_timestamp_seconds";
pub const REEXECS: &str = "apilb_reexec_total";
pub const PROCESS_GENERATION: &str = "apilb_process_generation";
pub const PROCESS_STARTED: &str = "apilb_process_start_time_seconds";

/// Method label values: anything else is counted as `OTHER`, so a client
/// cannot create series at will.
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "OTHER",
];

/// The bounded method label of a request.
pub fn method_label(m: &http::Method) -> &'static str {
    HTTP_METHODS
        .iter()
        .find(|k| **k == m.as_str())
        .copied()
        .unwrap_or("OTHER")
}

/// Why a client connection was closed without reaching a backend.
pub mod reject {
    pub const MAX_CONNECTIONS: &str = "max_connections";
    pub const ALL_DOWN: &str = "all_down";
    pub const CONNECT_FAILED: &str = "connect_failed";
    pub const SHUTDOWN: &str = "shutting_down";
    /// L7: the TLS handshake failed or did not finish within header_timeout.
    pub const TLS_HANDSHAKE: &str = "tls_handshake";
    /// L7: a malformed or smuggling-shaped HTTP/1 request (answered 400/431).
    pub const BAD_REQUEST: &str = "bad_request";
    /// Every reason, for removing a frontend's series.
    pub const ALL: [&str; 6] = [
        MAX_CONNECTIONS,
        ALL_DOWN,
        CONNECT_FAILED,
        SHUTDOWN,
        TLS_HANDSHAKE,
        BAD_REQUEST,
    ];
}

pub struct Metrics {
    pub registry: Registry,
    /// Held for writing while a reload adds and removes series, and for
    /// reading while a scrape gathers: a scrape never sees half a reload.
    pub series: std::sync::RwLock<()>,
    backend_up: IntGaugeVec,
    backend_active: IntGaugeVec,
    backend_connections: IntCounterVec,
    backend_connect_failures: IntCounterVec,
    backend_bytes: IntCounterVec,
    backend_upstream_conns: IntGaugeVec,
    backend_upstream_streams: IntGaugeVec,
    backend_queued: IntGaugeVec,
    backend_refused_retried: IntCounterVec,
    backend_connect_duration: HistogramVec,
    health_checks: IntCounterVec,
    health_check_duration: HistogramVec,
    pool_up: IntGaugeVec,
    pool_all_down: IntGaugeVec,
    frontend_connections: IntCounterVec,
    frontend_active: IntGaugeVec,
    frontend_rejected: IntCounterVec,
    frontend_max: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    http_active: IntGaugeVec,
    http_tunnels: IntGaugeVec,
    local_errors: IntCounterVec,
    pub reloads: IntCounterVec,
    pub last_reload_ok: IntGauge,
    pub last_reload_ts: Gauge,
    cert_expiry: GaugeVec,
    discovery_endpoints: IntGaugeVec,
    discovery_errors: IntCounterVec,
    discovery_last_sync: GaugeVec,
    /// SIGUSR2 re-execs by result (success, failure).
    pub reexecs: IntCounterVec,
    /// 0 for a fresh start, +1 per re-exec.
    pub generation: IntGauge,
    /// When this process started (Unix seconds).
    pub started: Gauge,
}

/// Handles for one pool's EndpointSlice discovery.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    pub endpoints: IntGauge,
    pub last_sync: Gauge,
    errors: IntCounterVec,
    pool: String,
}

impl DiscoveryMetrics {
    /// `reason` is one of a few fixed words (config, list, watch, gone, empty, cache).
    pub fn error(&self, reason: &str) {
        self.errors.with_label_values(&[&self.pool, reason]).inc();
    }
}

/// Handles for one backend, resolved once.
#[derive(Clone)]
pub struct BackendMetrics {
    pub up: IntGauge,
    pub active: IntGauge,
    pub connections: IntCounter,
    pub connect_failures: IntCounter,
    pub bytes_to_backend: IntCounter,
    pub bytes_to_client: IntCounter,
    pub connect_duration: Histogram,
    pub checks_ok: IntCounter,
    pub checks_failed: IntCounter,
    pub check_duration: Histogram,
    /// L7: upstream connections open, streams in use, requests waiting for
    /// a stream, requests refused unprocessed and sent again.
    pub upstream_connections: IntGauge,
    pub upstream_streams: IntGauge,
    pub queued: IntGauge,
    pub refused_retried: IntCounter,
}

/// Handles for one frontend, resolved once.
#[derive(Clone)]
pub struct FrontendMetrics {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub max: IntGauge,
    rejected: IntCounterVec,
    name: String,
}

impl FrontendMetrics {
    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[&self.name, reason]).inc();
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let iv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let hv = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            reg(
                &r,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).unwrap(),
            )
        };
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let ps = &["pool", "server"];
        let m = Metrics {
            backend_up: iv(
                BACKEND_UP,
                "1 if the backend is up (passing health checks), else 0",
                ps,
            ),
            backend_active: iv(BACKEND_ACTIVE, "Client connections open to the backend", ps),
            backend_connections: cv(
                BACKEND_CONNECTIONS,
                "Client connections established to the backend",
                ps,
            ),
            backend_connect_failures: cv(
                BACKEND_CONNECT_FAILURES,
                "Connects to the backend that were refused or timed out",
                ps,
            ),
            backend_upstream_conns: iv(
                BACKEND_UPSTREAM_CONNECTIONS,
                "L7: upstream connections open to the backend",
                ps,
            ),
            backend_upstream_streams: iv(
                BACKEND_UPSTREAM_STREAMS,
                "L7: upstream streams (requests) in use on the backend's connections",
                ps,
            ),
            backend_queued: iv(
                BACKEND_QUEUED,
                "L7: requests waiting for a free upstream stream to the backend",
                ps,
            ),
            backend_refused_retried: cv(
                BACKEND_REFUSED_RETRIED,
                "L7: requests the backend refused unprocessed (REFUSED_STREAM, GOAWAY) and apilb sent again",
                ps,
            ),
            backend_bytes: cv(
                BACKEND_BYTES,
                "Bytes relayed, by direction (to_backend, to_client)",
                &["pool", "server", "direction"],
            ),
            backend_connect_duration: hv(
                BACKEND_CONNECT_DURATION,
                "Time to establish a TCP connection to the backend",
                ps,
                latency.clone(),
            ),
            health_checks: cv(
                HEALTH_CHECKS,
                "Health probes by result (success, failure)",
                &["pool", "server", "result"],
            ),
            health_check_duration: hv(
                HEALTH_CHECK_DURATION,
                "Time a health probe took",
                ps,
                latency,
            ),
            pool_up: iv(
                POOL_UP_BACKENDS,
                "Backends of the pool that are up",
                &["pool"],
            ),
            pool_all_down: iv(
                POOL_ALL_DOWN,
                "1 while no backend of the pool is up (when_all_down applies)",
                &["pool"],
            ),
            frontend_connections: cv(
                FRONTEND_CONNECTIONS,
                "Client connections accepted",
                &["frontend"],
            ),
            frontend_active: iv(FRONTEND_ACTIVE, "Client connections open", &["frontend"]),
            frontend_rejected: cv(
                FRONTEND_REJECTED,
                "Client connections closed without reaching a backend, by reason",
                &["frontend", "reason"],
            ),
            frontend_max: iv(
                FRONTEND_MAX,
                "The frontend's max_connections",
                &["frontend"],
            ),
            http_requests: cv(
                HTTP_REQUESTS,
                "L7 requests answered, by backend, method and status code",
                &["frontend", "pool", "server", "method", "code"],
            ),
            http_duration: hv(
                HTTP_REQUEST_DURATION,
                "L7 request duration until the response ends (long-running requests excluded)",
                &["frontend", "method"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ],
            ),
            http_tunnels: iv(
                HTTP_ACTIVE_TUNNELS,
                "L7: upgraded connections (exec, attach, port-forward, WebSocket) open",
                &["frontend"],
            ),
            http_active: iv(
                HTTP_ACTIVE_STREAMS,
                "L7 requests in flight (streams open)",
                &["frontend"],
            ),
            local_errors: cv(
                LOCAL_ERRORS,
                "Failures reaching a backend that were apilb's own (descriptor or port \
                 exhaustion, no buffers, certificate verification); never counted against a backend",
                &["reason"],
            ),
            reloads: cv(
                CONFIG_RELOADS,
                "Config reloads by result (success, failure)",
                &["result"],
            ),
            last_reload_ok: reg(
                &r,
                IntGauge::new(CONFIG_LAST_OK, "1 if the last config reload succeeded").unwrap(),
            ),
            last_reload_ts: reg(
                &r,
                Gauge::new(
                    CONFIG_LAST_OK_TS,
                    "Unix time of the last successful config load",
                )
                .unwrap(),
            ),
            cert_expiry: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        TLS_CERT_EXPIRY,
                        "Unix time at which the earliest certificate in a file named by the config expires",
                    ),
                    &["file"],
                )
                .unwrap(),
            ),
            discovery_endpoints: iv(
                DISCOVERY_ENDPOINTS,
                "Servers the pool's EndpointSlice discovery last reported",
                &["pool"],
            ),
            discovery_errors: cv(
                DISCOVERY_ERRORS,
                "EndpointSlice discovery failures by reason (config, list, watch, gone, empty, cache)",
                &["pool", "reason"],
            ),
            discovery_last_sync: reg(
                &r,
                GaugeVec::new(
                    Opts::new(DISCOVERY_LAST_SYNC, "Unix time of the last successful list or watch event"),
                    &["pool"],
                )
                .unwrap(),
            ),
            reexecs: cv(
                REEXECS,
                "SIGUSR2 re-execs by result: success (the new process took the sockets) or failure (this process kept serving)",
                &["result"],
            ),
            generation: reg(
                &r,
                IntGauge::new(
                    PROCESS_GENERATION,
                    "Re-execs since the last fresh start (0 for a fresh start)",
                )
                .unwrap(),
            ),
            started: reg(
                &r,
                Gauge::new(PROCESS_STARTED, "Unix time this apilb process started").unwrap(),
            ),
            registry: r,
            series: std::sync::RwLock::new(()),
        };
        for result in ["success", "failure"] {
            m.reexecs.with_label_values(&[result]);
        }
        let build = reg(
            &m.registry,
            IntGaugeVec::new(
                Opts::new(BUILD_INFO, "Build information; always 1"),
                &["version"],
            )
            .unwrap(),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        m
    }

    /// Replaces the certificate expiry series with those of the running config.
    /// `certs`: each file with its earliest `notAfter` (Unix seconds).
    pub fn set_cert_expiries<'a>(
        &self,
        certs: impl IntoIterator<Item = (&'a std::path::Path, i64)>,
    ) {
        self.cert_expiry.reset();
        for (file, not_after) in certs {
            self.cert_expiry
                .with_label_values(&[&file.display().to_string()])
                .set(not_after as f64);
        }
    }

    pub fn backend(&self, pool: &str, server: &str) -> BackendMetrics {
        let l = &[pool, server];
        BackendMetrics {
            up: self.backend_up.with_label_values(l),
            active: self.backend_active.with_label_values(l),
            connections: self.backend_connections.with_label_values(l),
            connect_failures: self.backend_connect_failures.with_label_values(l),
            bytes_to_backend: self
                .backend_bytes
                .with_label_values(&[pool, server, "to_backend"]),
            bytes_to_client: self
                .backend_bytes
                .with_label_values(&[pool, server, "to_client"]),
            connect_duration: self.backend_connect_duration.with_label_values(l),
            checks_ok: self
                .health_checks
                .with_label_values(&[pool, server, "success"]),
            checks_failed: self
                .health_checks
                .with_label_values(&[pool, server, "failure"]),
            check_duration: self.health_check_duration.with_label_values(l),
            upstream_connections: self.backend_upstream_conns.with_label_values(l),
            upstream_streams: self.backend_upstream_streams.with_label_values(l),
            queued: self.backend_queued.with_label_values(l),
            refused_retried: self.backend_refused_retried.with_label_values(l),
        }
    }

    /// Drops a removed backend's series so dashboards don't show ghosts.
    pub fn remove_backend(&self, pool: &str, server: &str) {
        let l = &[pool, server];
        let _ = self.backend_up.remove_label_values(l);
        let _ = self.backend_active.remove_label_values(l);
        let _ = self.backend_connections.remove_label_values(l);
        let _ = self.backend_connect_failures.remove_label_values(l);
        let _ = self.backend_connect_duration.remove_label_values(l);
        let _ = self.health_check_duration.remove_label_values(l);
        let _ = self.backend_upstream_conns.remove_label_values(l);
        let _ = self.backend_upstream_streams.remove_label_values(l);
        let _ = self.backend_queued.remove_label_values(l);
        let _ = self.backend_refused_retried.remove_label_values(l);
        for d in ["to_backend", "to_client"] {
            let _ = self.backend_bytes.remove_label_values(&[pool, server, d]);
        }
        for r in ["success", "failure"] {
            let _ = self.health_checks.remove_label_values(&[pool, server, r]);
        }
        self.remove_http_backend(pool, server);
    }

    /// Removes every `apilb_http_requests_total` series of one backend: the
    /// method and code labels are bounded, so all combinations are tried.
    fn remove_http_backend(&self, pool: &str, server: &str) {
        let frontends: Vec<String> = {
            let fams = prometheus::core::Collector::collect(&self.http_requests);
            let mut names: Vec<String> = fams
                .iter()
                .flat_map(|f| f.get_metric().iter())
                .filter_map(|m| {
                    let l = m.get_label();
                    let has = |k: &str, v: &str| l.iter().any(|p| p.name() == k && p.value() == v);
                    if has("pool", pool) && has("server", server) {
                        l.iter()
                            .find(|p| p.name() == "frontend")
                            .map(|p| p.value().to_string())
                    } else {
                        None
                    }
                })
                .collect();
            names.sort();
            names.dedup();
            names
        };
        for fe in &frontends {
            for m in HTTP_METHODS {
                for code in 100..600u16 {
                    let c = code.to_string();
                    let _ = self
                        .http_requests
                        .remove_label_values(&[fe, pool, server, m, &c]);
                }
            }
        }
    }

    /// The in-flight gauge of an L7 frontend.
    /// Counts a local failure (see `net::local` for the reasons).
    pub fn local_error(&self, reason: &str) {
        self.local_errors.with_label_values(&[reason]).inc();
    }

    pub fn http_tunnels(&self, frontend: &str) -> IntGauge {
        self.http_tunnels.with_label_values(&[frontend])
    }

    pub fn http_active(&self, frontend: &str) -> IntGauge {
        self.http_active.with_label_values(&[frontend])
    }

    pub fn pool_gauges(&self, pool: &str) -> (IntGauge, IntGauge) {
        (
            self.pool_up.with_label_values(&[pool]),
            self.pool_all_down.with_label_values(&[pool]),
        )
    }

    pub fn remove_pool(&self, pool: &str) {
        let _ = self.pool_up.remove_label_values(&[pool]);
        let _ = self.pool_all_down.remove_label_values(&[pool]);
    }

    /// Drops a pool's discovery gauges when its discovery stops (the error
    /// counters stay: they only ever grow).
    pub fn remove_discovery(&self, pool: &str) {
        let _ = self.discovery_endpoints.remove_label_values(&[pool]);
        let _ = self.discovery_last_sync.remove_label_values(&[pool]);
    }

    pub fn discovery(&self, pool: &str) -> DiscoveryMetrics {
        DiscoveryMetrics {
            endpoints: self.discovery_endpoints.with_label_values(&[pool]),
            last_sync: self.discovery_last_sync.with_label_values(&[pool]),
            errors: self.discovery_errors.clone(),
            pool: pool.to_string(),
        }
    }

    pub fn frontend(&self, name: &str) -> FrontendMetrics {
        FrontendMetrics {
            connections: self.frontend_connections.with_label_values(&[name]),
            active: self.frontend_active.with_label_values(&[name]),
            max: self.frontend_max.with_label_values(&[name]),
            rejected: self.frontend_rejected.clone(),
            name: name.to_string(),
        }
    }

    pub fn remove_frontend(&self, name: &str) {
        let _ = self.http_active.remove_label_values(&[name]);
        let _ = self.http_tunnels.remove_label_values(&[name]);
        for m in HTTP_METHODS {
            let _ = self.http_duration.remove_label_values(&[name, m]);
        }
        let _ = self.frontend_connections.remove_label_values(&[name]);
        let _ = self.frontend_active.remove_label_values(&[name]);
        let _ = self.frontend_max.remove_label_values(&[name]);
        for r in reject::ALL {
            let _ = self.frontend_rejected.remove_label_values(&[name, r]);
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = {
            let _consistent = self.series.read().unwrap_or_else(|p| p.into_inner());
            self.registry.gather()
        };
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}
