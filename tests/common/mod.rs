//! Shared test harness: certificates, fake apiservers, raw TCP backends, an
//! HTTPS client, starting apilb in-process or as the built binary, and helpers
//! to wait for conditions with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apilb::demo::{Ca, FakeApiserver, FakeOptions, Leaf};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Returns the path of an external program, or `None` after printing why the
/// test is skipped. With `APILB_REQUIRE_TOOLS=1` a missing program fails.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("APILB_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{name} is required (APILB_REQUIRE_TOOLS=1) but not on PATH");
        }
        eprintln!("SKIPPED: {name} is not installed; this test needs it (set APILB_REQUIRE_TOOLS=1 to fail instead)");
    }
    found
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A CA, a serving certificate for 127.0.0.1/localhost/kubernetes, and a temp
/// dir holding `ca.crt`, `server.crt`, `server.key`.
pub struct Pki {
    pub ca: Ca,
    pub serving: Leaf,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("apilb-test-ca").unwrap();
        let ca_file = ca.write(dir.path(), "ca").unwrap();
        let serving = ca
            .server(&["127.0.0.1", "localhost", "kubernetes"])
            .unwrap();
        serving.write(dir.path(), "server").unwrap();
        Pki {
            ca,
            serving,
            dir,
            ca_file,
        }
    }

    pub fn fake_options(&self, name: &str) -> FakeOptions {
        FakeOptions::new(name, &self.serving.cert_pem, &self.serving.key_pem)
    }

    /// Starts `n` fakes named `api-1`...
    pub async fn fakes(&self, n: usize) -> Vec<FakeApiserver> {
        let mut v = Vec::new();
        for i in 1..=n {
            v.push(
                FakeApiserver::start(self.fake_options(&format!("api-{i}")))
                    .await
                    .unwrap(),
            );
        }
        v
    }

    /// A rustls client config trusting this CA, optionally with a client cert.
    pub fn client_config(&self, identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        let origin = Path::new("test");
        apilb::tls::ClientMaterial {
            ca: Some(apilb::tls::certs_from_pem(self.ca.cert_pem.as_bytes(), origin).unwrap()),
            identity: identity.map(|l| {
                (
                    apilb::tls::certs_from_pem(l.cert_pem.as_bytes(), origin).unwrap(),
                    apilb::tls::key_from_pem(l.key_pem.as_bytes(), origin).unwrap(),
                )
            }),
            insecure_skip_verify: false,
            alpn: vec![b"http/1.1".to_vec()],
        }
        .build()
        .unwrap()
    }
}

/// One HTTP/1.1 response.
pub struct Resp {
    pub status: u16,
    pub server: Option<String>,
    pub body: Bytes,
}

/// An HTTP/1.1 client connection over a fresh TLS connection (SNI "kubernetes").
pub async fn tls_http1<B>(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

/// Sends a GET over a fresh TLS connection and returns the response head
/// with its (unread) body.
async fn https_response(
    addr: SocketAddr,
    path: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut send = tls_http1(addr, tls).await?;
    let req = hyper::Request::get(path)
        .header("host", "kubernetes")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))
}

/// The fake apiserver that answered.
fn fake_server(resp: &hyper::Response<hyper::body::Incoming>) -> Option<String> {
    resp.headers()
        .get("x-fake-server")
        .map(|v| v.to_str().unwrap().to_string())
}

/// GET over a fresh TLS connection (no pooling: every call is a new connection).
pub async fn https_get(
    addr: SocketAddr,
    path: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Resp, String> {
    let resp = https_response(addr, path, tls).await?;
    let status = resp.status().as_u16();
    let server = fake_server(&resp);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Resp {
        status,
        server,
        body,
    })
}

/// Plain HTTP GET to the admin server; returns (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, "GET", path).await
}

pub async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    try_http(addr, method, path)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// A plain HTTP/1.1 request with `Connection: close`; `Err` if it cannot connect.
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one sample in Prometheus text (exact name and label set).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A raw TCP backend: on accept it writes its name and a newline, then echoes.
/// Counts accepted connections and open ones.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EchoBackend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let stop = CancellationToken::new();
        let (a, o, st, n) = (
            accepted.clone(),
            open.clone(),
            stop.clone(),
            name.to_string(),
        );
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                a.fetch_add(1, Relaxed);
                o.fetch_add(1, Relaxed);
                let (o, st, n) = (o.clone(), st.clone(), n.clone());
                tokio::spawn(async move {
                    let _ = s.write_all(format!("{n}\n").as_bytes()).await;
                    let mut buf = [0u8; 4096];
                    loop {
                        let r = tokio::select! {
                            _ = st.cancelled() => break,
                            r = s.read(&mut buf) => r,
                        };
                        match r {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                if s.write_all(&buf[..k]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    o.fetch_sub(1, Relaxed);
                });
            }
        });
        EchoBackend {
            addr,
            name: name.to_string(),
            accepted,
            open,
            stop,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Relaxed)
    }
}

/// Connects through apilb to an `EchoBackend` and returns the stream and the
/// backend's name (its greeting).
pub async fn echo_connect(addr: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let mut name = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no greeting"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            break;
        }
        name.push(b[0]);
    }
    Ok((s, String::from_utf8(name).unwrap()))
}

/// Sends a line and expects it echoed back.
pub async fn echo_roundtrip(s: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    s.write_all(msg.as_bytes()).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    assert_eq!(back, msg.as_bytes());
    Ok(())
}

/// An address nothing listens on (bound then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A pool's `servers:` block lines.
pub fn servers_yaml(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| format!("      - {a}\n")).collect()
}

/// A one-frontend, one-pool L4 config; `pool_extra` is indented pool keys.
pub fn l4_yaml(addrs: &[SocketAddr], pool_extra: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 2s\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    pool: p\n\
         pools:\n  - name: p\n    servers:\n{}{}",
        servers_yaml(addrs),
        pool_extra
    )
}

/// Starts apilb in-process from YAML text.
pub async fn start_yaml(yaml: &str) -> apilb::Handle {
    let cfg =
        apilb::config::parse(yaml).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{yaml}"));
    apilb::start(cfg).await.unwrap()
}

/// The `fe` frontend's address of an in-process apilb.
pub fn fe(h: &apilb::Handle) -> SocketAddr {
    h.frontend_addr("fe").expect("frontend fe")
}

/// The built binary, started with JSON logs; its stderr lines are collected.
pub struct Daemon {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn apilb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_apilb")
}

impl Daemon {
    pub fn start(config: &Path) -> Self {
        Self::start_args(config, &[])
    }

    /// Starts `apilb run -c CONFIG EXTRA...`.
    pub fn start_args(config: &Path, extra: &[&str]) -> Self {
        Self::spawn(config, extra, None)
    }

    /// Starts the daemon with at most `nofile` open files (RLIMIT_NOFILE).
    pub fn start_with_nofile(config: &Path, nofile: u64) -> Self {
        Self::spawn(config, &[], Some(nofile))
    }

    fn spawn(config: &Path, extra: &[&str], nofile: Option<u64>) -> Self {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(apilb_bin());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(["--log-format", "json", "--log-level", "debug", "run", "-c"])
            .arg(config)
            .args(extra);
        Self::spawn_command(cmd)
    }

    /// Spawns a prepared command (another binary path, inherited sockets)
    /// and collects its stderr lines.
    pub fn spawn_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Daemon { child, lines }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own; no memory is involved.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// The first JSON log line whose `message` is `msg` and, if given, whose
    /// `field` equals `value`.
    pub fn find(&self, msg: &str, field: Option<(&str, &str)>) -> Option<serde_json::Value> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            if v["message"] != msg {
                return None;
            }
            if let Some((k, want)) = field {
                if v[k].as_str() != Some(want) {
                    return None;
                }
            }
            Some(v)
        })
    }

    /// Waits for a log line and returns it.
    pub async fn wait_log(&self, msg: &str, field: Option<(&str, &str)>) -> serde_json::Value {
        wait_for(
            &format!("log line {msg:?} {field:?}"),
            Duration::from_secs(20),
            || async { self.find(msg, field) },
        )
        .await
    }

    /// The address a frontend is listening on, from its log line.
    pub async fn frontend_addr(&self, name: &str) -> SocketAddr {
        let v = self
            .wait_log("frontend listening", Some(("frontend", name)))
            .await;
        v["addr"].as_str().unwrap().parse().unwrap()
    }

    pub async fn admin_addr(&self) -> SocketAddr {
        let v = self.wait_log("admin listening", None).await;
        v["addr"].as_str().unwrap().parse().unwrap()
    }

    /// Waits for the process to exit and returns its code.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > end {
                panic!("apilb did not exit within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// Opens a streaming GET (a watch) over a fresh TLS connection; returns the
/// serving fake's name and the body to read frames from.
pub async fn https_stream(
    addr: SocketAddr,
    path: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(Option<String>, hyper::body::Incoming), String> {
    let resp = https_response(addr, path, tls).await?;
    let server = fake_server(&resp);
    Ok((server, resp.into_body()))
}

/// The next data frame of a streaming body within `deadline`: `Some(bytes)`,
/// or `None` when the stream ended or failed.
pub async fn next_frame(body: &mut hyper::body::Incoming, deadline: Duration) -> Option<Bytes> {
    loop {
        let f = tokio::time::timeout(deadline, body.frame())
            .await
            .expect("no frame and no end within the deadline");
        match f {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    return Some(d);
                }
            }
            _ => return None,
        }
    }
}

/// Whether backend `i` of pool `p` is up in an in-process apilb.
pub fn backend_up(h: &apilb::Handle, pool: &str, i: usize) -> bool {
    h.shared().snapshot.load().pools[pool].backends[i].is_healthy()
}

/// Replaces a file atomically (write beside, then rename), as editors and
/// config-management tools do.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Successful and failed reloads counted so far by an in-process apilb.
pub fn reloads(h: &apilb::Handle) -> (u64, u64) {
    let m = &h.shared().metrics;
    (
        m.reloads.with_label_values(&["success"]).get(),
        m.reloads.with_label_values(&["failure"]).get(),
    )
}

/// Starts apilb in-process from a config file (so the file is watched).
pub async fn start_file(path: &Path) -> apilb::Handle {
    let cfg = apilb::config::load(path).unwrap_or_else(|e| panic!("{e}"));
    apilb::start(cfg).await.unwrap()
}

/// `kubectl --kubeconfig KUBECONFIG get --raw PATH`.
pub async fn kubectl_raw(kubectl: &Path, kubeconfig: &Path, path: &str) -> std::process::Output {
    tokio::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["get", "--raw", path])
        .output()
        .await
        .unwrap()
}

/// Waits until a new connection through `addr` reaches the echo backend `name`.
pub async fn wait_serves(addr: SocketAddr, name: &str) {
    wait_for(
        &format!("{name} to serve"),
        Duration::from_secs(5),
        || async {
            let (_, got) = echo_connect(addr).await.unwrap();
            (got == name).then_some(())
        },
    )
    .await;
}
