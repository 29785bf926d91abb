//! Health checking: one `Monitor` per backend owns the rise/fall state machine
//! and is the only writer of the backend's up flag; one probe task per
//! backend feeds it, client traffic reports passive failures to it, and it
//! tells its owner about transitions through `Events`. Logs state changes only.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::balancer::{unix_now, Backend, HealthSink};
use crate::config::{CheckKind, HealthConfig, ProbeTls};
use crate::tls::{self, ClientMaterial};

/// The most of a probe response apilb reads: status line and headers.
pub const MAX_PROBE_RESPONSE: usize = 8 * 1024;

/// The rise/fall state machine of one backend.
#[derive(Debug, Clone)]
pub struct HealthState {
    up: bool,
    /// Added by a reload and not yet seen healthy: one success brings it up.
    fresh: bool,
    ok_streak: u32,
    fail_streak: u32,
    /// When it went down (tokio clock), for `close_after_down`.
    down_since: Option<Instant>,
    /// Connections were already closed for this down period.
    closed_this_down: bool,
}

impl HealthState {
    pub fn new(up: bool) -> Self {
        HealthState {
            up,
            fresh: !up,
            ok_streak: 0,
            fail_streak: 0,
            down_since: (!up).then(Instant::now),
            closed_this_down: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.fail_streak = 0;
            self.ok_streak = self.ok_streak.saturating_add(1);
            if !self.up && (self.fresh || self.ok_streak >= rise) {
                self.up = true;
                self.fresh = false;
                self.down_since = None;
                self.closed_this_down = false;
                return Some(true);
            }
        } else {
            self.ok_streak = 0;
            self.fail_streak = self.fail_streak.saturating_add(1);
            if self.up && self.fail_streak >= fall {
                self.up = false;
                self.down_since = Some(Instant::now());
                return Some(false);
            }
        }
        None
    }

    /// A connect failure on client traffic: counts as a failed probe, so it
    /// can take a backend down sooner but never brings one up.
    pub fn passive_failure(&mut self, fall: u32) -> Option<bool> {
        self.observe(false, u32::MAX, fall)
    }

    /// True once per down period, when the backend has been down for `after`.
    pub fn should_close_connections(&mut self, after: Duration) -> bool {
        match self.down_since {
            Some(t) if !self.closed_this_down && t.elapsed() >= after => {
                self.closed_this_down = true;
                true
            }
            _ => false,
        }
    }
}

/// The outcome of the last probe, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeReport {
    /// Unix seconds.
    pub at: u64,
    pub ok: bool,
    pub latency_ms: f64,
    /// `200`, `status 500`, `timeout after 1s`, the TLS error, ...
    pub detail: String,
}

/// Told about every up/down transition of a backend (the pool gauges and the
/// all-down log line live with the owner of the pools).
pub trait Events: Send + Sync {
    fn backend_changed(&self, backend: &Backend, up: bool);
}

/// The health of one backend: its state machine, its last probe, and the
/// settings probes and passive reports are judged by.
pub struct Monitor {
    backend: Arc<Backend>,
    cfg: ArcSwap<HealthConfig>,
    /// A std Mutex: probes and connect failures update it (never the byte
    /// path) and nothing awaits while holding it. The backend's flag is
    /// written under it, so the two never disagree.
    state: Mutex<HealthState>,
    last_probe: Mutex<Option<ProbeReport>>,
    events: Arc<dyn Events>,
}

impl Monitor {
    /// A monitor for `backend`, attached to it for passive reports. `up` is
    /// the state the backend starts in (its flag is set to match).
    pub fn new(
        backend: Arc<Backend>,
        cfg: HealthConfig,
        up: bool,
        events: Arc<dyn Events>,
    ) -> Arc<Self> {
        backend.set_healthy(up);
        let m = Arc::new(Monitor {
            backend,
            cfg: ArcSwap::from_pointee(cfg),
            state: Mutex::new(HealthState::new(up)),
            last_probe: Mutex::new(None),
            events,
        });
        let sink: Arc<dyn HealthSink> = m.clone();
        m.backend.attach_health(Arc::downgrade(&sink));
        m
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// New rise/fall/probe settings from a reload; the state carries over.
    pub fn set_config(&self, cfg: HealthConfig) {
        self.cfg.store(Arc::new(cfg));
    }

    pub fn last_probe(&self) -> Option<ProbeReport> {
        lock(&self.last_probe).clone()
    }

    fn record(&self, ok: bool, passive: bool, detail: &str) {
        let cfg = self.cfg.load();
        let b = &self.backend;
        let change = {
            let mut st = lock(&self.state);
            let change = if passive {
                st.passive_failure(cfg.fall)
            } else {
                st.observe(ok, cfg.rise, cfg.fall)
            };
            if let Some(up) = change {
                b.set_healthy(up);
            }
            change
        };
        let Some(up) = change else { return };
        if b.is_removed() {
            return;
        }
        let source = if passive { "connect" } else { "probe" };
        if up {
            info!(pool = %b.pool, server = %b.server.key, reason = detail, "backend up");
        } else {
            warn!(pool = %b.pool, server = %b.server.key, source, reason = detail, "backend down");
        }
        self.events.backend_changed(b, up);
    }

    /// Closes the backend's client connections once per down period, when
    /// `close_after_down` has passed.
    fn close_if_down_too_long(&self, after: Duration) {
        let b = &self.backend;
        let close = lock(&self.state).should_close_connections(after);
        if close && b.active() > 0 {
            warn!(pool = %b.pool, server = %b.server.key, open = b.active(),
                "closing client connections to a backend down for {}", humantime::format_duration(after));
            b.close_connections();
        }
    }
}

impl HealthSink for Monitor {
    fn passive_failure(&self, detail: &str) {
        // With `check: none` nothing would ever bring it back up.
        if self.cfg.load().check != CheckKind::None {
            self.record(false, true, detail);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the probe loop of a monitor with its current settings. It stops
/// when `stop` is cancelled (a reload that changes the settings restarts it).
pub fn spawn(monitor: Arc<Monitor>, stop: CancellationToken) {
    let cfg = (**monitor.cfg.load()).clone();
    if cfg.check == CheckKind::None {
        return;
    }
    tokio::spawn(async move {
        let backend = monitor.backend.clone();
        let mut prober = Prober::new(&backend, &cfg);
        // Spread first probes so pools don't fire in lockstep, yet start at once.
        let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
        let mut ticks = tokio::time::interval_at(Instant::now() + jitter, cfg.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let started = Instant::now();
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(cfg.timeout, prober.probe()) => match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("timeout after {}", humantime::format_duration(cfg.timeout))),
                },
            };
            let took = started.elapsed();
            backend.metrics.check_duration.observe(took.as_secs_f64());
            let (ok, detail) = match result {
                Ok(d) => {
                    backend.metrics.checks_ok.inc();
                    (true, d)
                }
                Err(e) => {
                    backend.metrics.checks_failed.inc();
                    (false, e)
                }
            };
            *lock(&monitor.last_probe) = Some(ProbeReport {
                at: unix_now(),
                ok,
                latency_ms: took.as_secs_f64() * 1000.0,
                detail: detail.clone(),
            });
            monitor.record(ok, false, &detail);
            if let Some(after) = cfg.close_after_down {
                monitor.close_if_down_too_long(after);
            }
        }
    });
}

/// Runs one kind of probe against one backend.
struct Prober {
    kind: CheckKind,
    addr: std::net::SocketAddr,
    request: Vec<u8>,
    server_name: String,
    tls: Option<TlsSource>,
}

impl Prober {
    fn new(backend: &Backend, cfg: &HealthConfig) -> Self {
        let host = &backend.server.host;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: apilb/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            cfg.path,
            backend.server.key,
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes();
        Prober {
            kind: cfg.check,
            addr: backend.server.addr,
            request,
            server_name: cfg.tls.server_name.clone().unwrap_or_else(|| host.clone()),
            tls: (cfg.check == CheckKind::Https).then(|| TlsSource::new(cfg.tls.clone())),
        }
    }

    /// `Ok(detail)` when healthy, `Err(reason)` otherwise.
    async fn probe(&mut self) -> Result<String, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match self.kind {
            CheckKind::Tcp => Ok("connected".into()),
            CheckKind::Http => http_get(tcp, &self.request).await,
            CheckKind::Https => {
                let config = self.tls.as_mut().expect("https has tls").config().await?;
                let name = tls::server_name(&self.server_name).map_err(|e| e.to_string())?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                http_get(stream, &self.request).await
            }
            CheckKind::None => Ok("not checked".into()),
        }
    }
}

/// Sends a GET and reads the status line and headers (at most `MAX_PROBE_RESPONSE`).
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> Result<String, String> {
    s.write_all(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; MAX_PROBE_RESPONSE];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(format!(
                "response header larger than {MAX_PROBE_RESPONSE} bytes"
            ));
        }
        let n = s
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(if len == 0 {
                "connection closed before a response".into()
            } else {
                "connection closed mid-header".into()
            });
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let code = resp.code.unwrap_or(0);
                return if (200..300).contains(&code) {
                    Ok(format!("status {code}"))
                } else {
                    Err(format!("status {code}"))
                };
            }
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => {
                return Err("response has too many headers".into())
            }
            Err(e) => return Err(format!("not an HTTP response: {e}")),
        }
    }
}

/// Probe TLS material, re-read whenever one of its files changes (certificate
/// rotation), failing loudly when a file becomes unreadable.
struct TlsSource {
    files: ProbeTls,
    cached: Option<(Vec<SystemTime>, Arc<ClientConfig>)>,
}

impl TlsSource {
    fn new(files: ProbeTls) -> Self {
        TlsSource {
            files,
            cached: None,
        }
    }

    fn paths(&self) -> Vec<(&'static str, PathBuf)> {
        let f = &self.files;
        [
            ("ca_file", &f.ca_file),
            ("cert_file", &f.cert_file),
            ("key_file", &f.key_file),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.clone().map(|p| (n, p)))
        .collect()
    }

    async fn config(&mut self) -> Result<Arc<ClientConfig>, String> {
        let mut stamps = Vec::new();
        for (name, path) in self.paths() {
            let m = tokio::fs::metadata(&path)
                .await
                .and_then(|m| m.modified())
                .map_err(|e| format!("tls.{name} {}: {e}", path.display()))?;
            stamps.push(m);
        }
        if let Some((s, cfg)) = &self.cached {
            if *s == stamps {
                return Ok(cfg.clone());
            }
        }
        let f = self.files.clone();
        let cfg = tokio::task::spawn_blocking(move || {
            ClientMaterial::from_files(
                f.ca_file.as_deref(),
                f.cert_file.as_deref(),
                f.key_file.as_deref(),
                f.insecure_skip_verify,
            )
            .and_then(ClientMaterial::build)
        })
        .await
        .map_err(|e| format!("tls material: {e}"))?
        .map_err(|e| format!("tls material: {e}"))?;
        self.cached = Some((stamps, cfg.clone()));
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fall_then_rise() {
        let mut s = HealthState::new(true);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), Some(false));
        assert!(!s.is_up());
        assert_eq!(s.observe(false, 2, 3), None, "no second transition");
        assert_eq!(s.observe(true, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), Some(true));
        assert!(s.is_up());
    }

    #[tokio::test(start_paused = true)]
    async fn flapping_input_never_flips() {
        let mut s = HealthState::new(true);
        for i in 0..100 {
            assert_eq!(s.observe(i % 2 == 0, 2, 2), None, "step {i}");
        }
        assert!(s.is_up());
        let mut d = HealthState::new(true);
        for _ in 0..2 {
            d.observe(false, 2, 2);
        }
        assert!(!d.is_up());
        for i in 0..100 {
            assert_eq!(d.observe(i % 2 == 0, 2, 2), None, "step {i}");
        }
        assert!(!d.is_up());
    }

    #[tokio::test(start_paused = true)]
    async fn passive_failure_downs_but_never_raises() {
        let mut s = HealthState::new(true);
        assert_eq!(s.passive_failure(2), None);
        assert_eq!(s.passive_failure(2), Some(false));
        assert_eq!(s.passive_failure(2), None);
        // A probe success after passive failures still needs `rise` in a row.
        assert_eq!(s.observe(true, 3, 2), None);
        assert_eq!(s.observe(true, 3, 2), None);
        assert_eq!(s.observe(true, 3, 2), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_backend_comes_up_on_first_success() {
        let mut s = HealthState::new(false);
        assert!(!s.is_up());
        assert_eq!(s.observe(true, 5, 3), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn close_after_down_fires_once_per_down_period() {
        let mut s = HealthState::new(true);
        s.observe(false, 1, 1);
        let after = Duration::from_secs(30);
        assert!(!s.should_close_connections(after));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!s.should_close_connections(after));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(s.should_close_connections(after));
        assert!(!s.should_close_connections(after), "only once");
        s.observe(true, 1, 1);
        s.observe(false, 1, 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(
            s.should_close_connections(after),
            "again after a new down period"
        );
    }

    struct NoEvents;
    impl Events for NoEvents {
        fn backend_changed(&self, _: &Backend, _: bool) {}
    }

    /// Probe results and passive failures racing from many threads never
    /// leave the flag opposite to the state machine: one writer, one lock.
    #[tokio::test]
    async fn flag_and_state_never_disagree_under_racing_reports() {
        let cfg = crate::config::parse(
            "frontends: [{name: f, listen: '127.0.0.1:0', pool: p}]\n\
             pools: [{name: p, servers: ['127.0.0.1:1'], health: {rise: 1, fall: 1}}]",
        )
        .unwrap();
        let pc = &cfg.pools[0];
        let metrics = crate::metrics::Metrics::new();
        let b = Arc::new(Backend::new(
            "p".into(),
            pc.servers[0].clone(),
            true,
            metrics.backend("p", "x"),
        ));
        let m = Monitor::new(b.clone(), pc.health.clone(), true, Arc::new(NoEvents));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        if (i + t) % 3 == 0 {
                            m.passive_failure("refused");
                        } else {
                            m.record(i % 2 == 0, false, "probe");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.is_healthy(), lock(&m.state).is_up());
        // The weak link from the backend reaches the same monitor.
        let before = lock(&m.state).is_up();
        for _ in 0..3 {
            b.report_failure("refused");
        }
        assert!(
            !lock(&m.state).is_up() && !b.is_healthy(),
            "was up: {before}"
        );
    }

    #[tokio::test]
    async fn http_parsing_of_bad_responses() {
        use tokio::io::duplex;
        let req = b"GET / HTTP/1.1\r\n\r\n";
        for (resp, want) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
                Ok("status 200".to_string()),
            ),
            (
                b"HTTP/1.1 500 Internal\r\n\r\n",
                Err("status 500".to_string()),
            ),
            (
                b"SSH-2.0-OpenSSH\r\n\r\n",
                Err("not an HTTP response: invalid HTTP version".to_string()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nX-Foo: b",
                Err("connection closed mid-header".to_string()),
            ),
            (b"", Err("connection closed before a response".to_string())),
        ] {
            let (a, mut b) = duplex(64 * 1024);
            let task = tokio::spawn(async move {
                let mut sink = [0u8; 64];
                let _ = b.read(&mut sink).await;
                b.write_all(resp).await.unwrap();
                drop(b);
            });
            assert_eq!(http_get(a, req).await, want);
            task.await.unwrap();
        }
        // Endless header: cut at the limit.
        let (a, mut b) = duplex(64 * 1024);
        tokio::spawn(async move {
            let mut sink = [0u8; 64];
            let _ = b.read(&mut sink).await;
            let _ = b.write_all(b"HTTP/1.1 200 OK\r\n").await;
            loop {
                if b.write_all(b"X-Endless: aaaaaaaaaaaaaaaaaaaaaaaa\r\n")
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let r = http_get(a, req).await.unwrap_err();
        assert!(
            r.contains("too many headers") || r.contains("larger than"),
            "{r}"
        );
    }
}
