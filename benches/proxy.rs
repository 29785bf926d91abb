//! Side-by-side benchmark following the protocol in docs/performance.md: apilb against
//! HAProxy, nginx (stream, and http for L7) and a direct connection, in one
//! run on one machine, arms interleaved, only ratios reported.
//!
//! `cargo bench --bench proxy` runs the full protocol (20 s runs, a warm-up
//! and 5 measured runs per arm). `APILB_BENCH_QUICK=1` makes one short run
//! per arm (a smoke test for CI). `APILB_BENCH_SECS` and `APILB_BENCH_RUNS`
//! override the duration and the number of measured runs; `APILB_BENCH_ONLY`
//! (e.g. `d,e`) runs only those scenarios and writes
//! `target/bench-partial-RESULTS.md`; `APILB_BENCH_WRK=0` leaves out scenario
//! b's wrk runs (only its open loop); `APILB_BENCH_TWINS=1` adds a second,
//! identical apilb and HAProxy arm (`apilb-twin`, `haproxy-twin`): how far the
//! host moves two copies of one proxy apart in the same run, the floor under
//! any apilb ÷ HAProxy difference; `APILB_BENCH_KEEP=1` keeps the temp dir
//! with every proxy's config and log.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apilb::demo::fake::Filler;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};

mod common;
use common::*;
mod openloop;

const LARGE: u64 = 1 << 30; // 1 GiB, streamed
const SMALL: usize = 1024;
const IDLE_CONNS: usize = 5000;
/// Scenario f: open L7 watches (500 in quick mode), 100 per HTTP/2 connection.
const WATCHES: usize = 5000;
const WATCHES_QUICK: usize = 500;
const STREAMS_PER_CONN: usize = 100;
const ARMS: [&str; 4] = ["direct", "apilb", "haproxy", "nginx"];

struct Opts {
    quick: bool,
    secs: u64,
    runs: usize,
    only: Option<String>,
    /// Scenario b's open-loop rate, requests per second over all connections.
    rate: f64,
    /// Scenario e's open-loop rate (16 HTTP/2 connections, 32 streams each).
    e_rate: f64,
    /// Scenario b's wrk (closed-loop) runs; off leaves only the open loop.
    wrk: bool,
    /// A second, identical apilb and HAProxy arm (the run's noise floor).
    twins: bool,
}

impl Opts {
    fn wants(&self, scenario: char) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(scenario))
    }
}

fn opts() -> Opts {
    let quick = std::env::var("APILB_BENCH_QUICK").as_deref() == Ok("1");
    let num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    Opts {
        quick,
        secs: num("APILB_BENCH_SECS", if quick { 1 } else { 20 }),
        runs: num("APILB_BENCH_RUNS", if quick { 1 } else { 5 }) as usize,
        rate: num("APILB_BENCH_RATE", 10_000) as f64,
        e_rate: num("APILB_BENCH_E_RATE", 20_000) as f64,
        wrk: std::env::var("APILB_BENCH_WRK").as_deref() != Ok("0"),
        twins: std::env::var("APILB_BENCH_TWINS").as_deref() == Ok("1"),
        only: std::env::var("APILB_BENCH_ONLY")
            .ok()
            .filter(|v| !v.is_empty()),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let t = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            t.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
    // only touch the set we own and the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// How often the host takes CPU 1 away while both CPUs are busy, as the
/// benchmark keeps them: a thread spins on CPU 0 while another, on CPU 1,
/// reads the clock in a loop for `secs`. Returns the share (%) of 100 ms
/// windows with a gap over [`openloop::STALL_NS`], and the longest gap in
/// ms. A proxy on CPU 1 stalls as long as such a gap, whichever proxy it is.
fn host_stalls(secs: f64) -> (f64, f64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spin = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin_current_thread(0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let probe = std::thread::spawn(move || {
        pin_current_thread(1);
        let (start, mut prev) = (Instant::now(), Instant::now());
        let (mut windows, mut longest) = (std::collections::BTreeSet::new(), Duration::ZERO);
        while prev - start < Duration::from_secs_f64(secs) {
            let now = Instant::now();
            let gap = now - prev;
            if gap.as_nanos() > u128::from(openloop::STALL_NS) {
                windows.insert((now - start).as_millis() / 100);
            }
            longest = longest.max(gap);
            prev = now;
        }
        (
            windows.len() as f64 / (secs * 10.0) * 100.0,
            longest.as_secs_f64() * 1e3,
        )
    });
    let got = probe.join().expect("the host probe thread");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spin.join().expect("the spinning thread");
    got
}

fn tune_sysctls() -> Vec<String> {
    let mut notes = Vec::new();
    for (k, v) in [
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "1"),
        ("net/core/somaxconn", "4096"),
    ] {
        let path = format!("/proc/sys/{k}");
        if std::fs::write(&path, v).is_err() {
            notes.push(format!(
                "sysctl {} = {v} refused (kept {:?})",
                k.replace('/', "."),
                std::fs::read_to_string(&path).unwrap_or_default().trim()
            ));
        }
    }
    notes
}

const HALT_POLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// In a KVM guest whose cpuidle driver is haltpoll with polling off (this
/// Firecracker VM boots with `haltpoll.guest_halt_poll_ns=0`), every wake-up
/// of an idle vCPU goes through the hypervisor: ~100 µs, twice per proxied
/// message, so latency rows measured the host, not the proxies. Polling
/// 200 µs before halting (the driver's own default) removes that for every
/// arm alike; the old value comes back when the guard drops. The parameter
/// exists whenever the driver is built in, but only matters while it is the
/// cpuidle driver in use: with none, an idle vCPU halts and nothing here can
/// change that, which the note says.
struct HaltPoll {
    old: Option<String>,
}

const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";

impl HaltPoll {
    fn set() -> (Self, Option<String>) {
        let Ok(old) = std::fs::read_to_string(HALT_POLL) else {
            return (HaltPoll { old: None }, None);
        };
        let driver = std::fs::read_to_string(CPUIDLE_DRIVER).unwrap_or_default();
        let driver = driver.trim();
        if driver != "haltpoll" {
            let note = format!(
                "cpuidle driver `{driver}`, not haltpoll: an idle vCPU halts and its wake-up goes through the hypervisor for every arm (guest_halt_poll_ns unused)"
            );
            return (HaltPoll { old: None }, Some(note));
        }
        let old = old.trim().to_string();
        if std::fs::write(HALT_POLL, "200000").is_err() {
            let note = format!("guest_halt_poll_ns = 200000 refused (kept {old})");
            return (HaltPoll { old: None }, Some(note));
        }
        let note = format!("guest_halt_poll_ns {old} → 200000 for the run (haltpoll cpuidle)");
        (HaltPoll { old: Some(old) }, Some(note))
    }
}

impl Drop for HaltPoll {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = std::fs::write(HALT_POLL, old);
        }
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime [11], stime [12].
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Times a process's threads were switched out (voluntary and involuntary
/// context switches): each is a sleep and a wake-up, or a preemption.
fn switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    let mut n = 0.0;
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if line.contains("ctxt_switches:") {
                n += line
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    n
}

// ---------------------------------------------------------------- backends

/// A watch (`/api/v1/pods?watch=true`, which apilb knows as long-running,
/// as it knows a real one): one event at once, then silence until the
/// client leaves (the body is never woken again, so it costs nothing while
/// open).
struct Watch {
    sent: bool,
}

impl Body for Watch {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            b"{\"type\":\"ADDED\"}\n",
        )))))
    }
}

async fn backend_handle(
    req: hyper::Request<hyper::body::Incoming>,
    chunk: Bytes,
    small: Bytes,
) -> Result<hyper::Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let body = match req.uri().path() {
        "/large" => BoxBody::new(Filler::new(LARGE, chunk)),
        "/readyz" => Full::new(Bytes::from_static(b"ok")).boxed(),
        "/api/v1/pods" => BoxBody::new(Watch { sent: false }),
        _ => Full::new(small).boxed(),
    };
    Ok(hyper::Response::new(body))
}

/// Three plain HTTP and three TLS (h2 + http/1.1) backends on CPU 0, in a
/// thread of their own.
struct Backends {
    plain: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
}

fn start_backends(cert_pem: &str, key_pem: &str) -> Backends {
    let listeners: Vec<TcpListener> = (0..6)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let tls_cfg = apilb::tls::server_config(
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        apilb::tls::ClientAuth::None,
        &[b"h2", b"http/1.1"],
    )
    .unwrap();
    std::thread::spawn(move || {
        pin_current_thread(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
            let small = Bytes::from(vec![b's'; SMALL]);
            for (i, l) in listeners.into_iter().enumerate() {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let acceptor = (i >= 3).then(|| tokio_rustls::TlsAcceptor::from(tls_cfg.clone()));
                let (chunk, small) = (chunk.clone(), small.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok((s, _)) = l.accept().await else {
                            continue;
                        };
                        let _ = s.set_nodelay(true);
                        let (chunk, small, acceptor) =
                            (chunk.clone(), small.clone(), acceptor.clone());
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |r| {
                                backend_handle(r, chunk.clone(), small.clone())
                            });
                            let b =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            match acceptor {
                                None => {
                                    let _ = b.serve_connection(TokioIo::new(s), svc).await;
                                }
                                Some(a) => {
                                    if let Ok(t) = a.accept(s).await {
                                        let _ = b.serve_connection(TokioIo::new(t), svc).await;
                                    }
                                }
                            }
                        });
                    }
                });
            }
            std::future::pending::<()>().await;
        });
    });
    Backends {
        plain: addrs[..3].to_vec(),
        tls: addrs[3..].to_vec(),
    }
}

// ----------------------------------------------------------------- proxies

/// Where one arm listens for each kind of traffic.
#[derive(Clone, Copy, Default)]
struct Ports {
    plain: u16,
    tls: u16,
    l7: u16,
}

fn wait_listening(port: u16, what: &str, log: &Path) {
    if !listening_within_15s(SocketAddr::from(([127, 0, 0, 1], port))) {
        panic!(
            "{what} did not listen on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

fn spawn_pinned(name: &str, program: &Path, args: &[String], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    // mimalloc asks for transparent huge pages, so the heap grows in 2 MiB
    // steps (±0.4 KiB in a figure per 5,000): a process whose memory is
    // measured asks for none, and its figure is the heap's own.
    let mut cmd = Command::new("taskset");
    if name.ends_with("-pss") {
        cmd.env("MIMALLOC_ALLOW_THP", "0");
    }
    let child = cmd
        .arg("-c")
        .arg("1")
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Proc { child }
}

/// Three `nghttpd` (HTTP/2 over TLS, serving `/1k` from a directory) on CPU 0.
struct Nghttpd {
    addrs: Vec<SocketAddr>,
    _procs: Vec<Proc>,
}

fn start_nghttpd(bin: &Path, dir: &Path, cert: &Path, key: &Path) -> Nghttpd {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("1k"), vec![b's'; SMALL]).unwrap();
    let mut addrs = Vec::new();
    let mut procs = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let log = dir.join(format!("nghttpd-{i}.log"));
        let child = Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin)
            .arg("-d")
            .arg(&www)
            .arg(port.to_string())
            .arg(key)
            .arg(cert)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start nghttpd: {e}"));
        procs.push(Proc { child });
        wait_listening(port, "nghttpd", &log);
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Nghttpd {
        addrs,
        _procs: procs,
    }
}

fn servers(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| format!("      - {a}\n")).collect()
}

fn start_apilb(
    dir: &Path,
    b: &Backends,
    ca: &Path,
    cert: &Path,
    key: &Path,
    variant: &str,
) -> (Proc, Ports) {
    let health = variant == "hc";
    let p = Ports {
        plain: free_port(),
        tls: free_port(),
        l7: free_port(),
    };
    let hc = |kind: &str| {
        if health {
            format!("    health:\n      check: {kind}\n      path: /readyz\n      interval: 2s\n      timeout: 1s\n{}", if kind == "https" { format!("      tls:\n        ca_file: {}\n", ca.display()) } else { String::new() })
        } else {
            "    health:\n      check: none\n".into()
        }
    };
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nworkers: 1\nshutdown_grace: 1s\nfrontends:\n\
         \x20 - {{name: plain, listen: '127.0.0.1:{}', pool: plain, max_connections: 50000}}\n\
         \x20 - {{name: tls, listen: '127.0.0.1:{}', pool: tls, max_connections: 50000}}\n\
         \x20 - name: l7\n    listen: 127.0.0.1:{}\n    mode: http\n    pool: tls\n    max_connections: 50000\n    tls:\n      cert_file: {}\n      key_file: {}\n\
         pools:\n  - name: plain\n    connect_timeout: 5s\n    servers:\n{}{}\
         \x20 - name: tls\n    connect_timeout: 5s\n    servers:\n{}    tls:\n      ca_file: {}\n{}",
        p.plain,
        p.tls,
        p.l7,
        cert.display(),
        key.display(),
        servers(&b.plain),
        hc("http"),
        servers(&b.tls),
        ca.display(),
        hc("https"),
    );
    let name = match variant {
        "" => "apilb".to_string(),
        v => format!("apilb-{v}"),
    };
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml).unwrap();
    let args = vec![
        "--log-level".into(),
        "warn".into(),
        "run".into(),
        "--no-watch".into(),
        "-c".into(),
        cfg.display().to_string(),
    ];
    let proc = spawn_pinned(
        &name,
        Path::new(env!("CARGO_BIN_EXE_apilb")),
        &args,
        &dir.join(format!("{name}.log")),
    );
    for port in [p.plain, p.tls, p.l7] {
        wait_listening(port, &name, &dir.join(format!("{name}.log")));
    }
    (proc, p)
}

fn start_haproxy(bin: &Path, dir: &Path, b: &Backends, pem: &Path, variant: &str) -> (Proc, Ports) {
    let p = Ports {
        plain: free_port(),
        tls: free_port(),
        l7: free_port(),
    };
    let (global_extra, check_plain) = match variant {
        "nosplice" => ("    nosplice\n", ""),
        "hc" => ("", " check inter 2s"),
        _ => ("", ""),
    };
    let srv = |addrs: &[SocketAddr], extra: &str| -> String {
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("    server s{i} {a}{extra}\n"))
            .collect()
    };
    let cfg = format!(
        "global\n    nbthread 1\n    maxconn 7500\n{global_extra}\
         defaults\n    mode tcp\n    maxconn 7500\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n    timeout client-fin 5s\n    timeout server-fin 5s\n    option splice-auto\n\
         frontend fe_plain\n    bind 127.0.0.1:{}\n    backlog 4096\n    default_backend be_plain\n\
         backend be_plain\n    balance roundrobin\n{}{}\
         frontend fe_tls\n    bind 127.0.0.1:{}\n    backlog 4096\n    default_backend be_tls\n\
         backend be_tls\n    balance roundrobin\n{}\
         frontend fe_l7\n    mode http\n    bind 127.0.0.1:{} ssl crt {} alpn h2,http/1.1\n    default_backend be_l7\n\
         backend be_l7\n    mode http\n    balance roundrobin\n    option forwardfor\n    http-reuse always\n{}",
        p.plain,
        if variant == "hc" { "    option httpchk GET /readyz\n" } else { "" },
        srv(&b.plain, check_plain),
        p.tls,
        srv(&b.tls, ""),
        p.l7,
        pem.display(),
        srv(&b.tls, " ssl verify none alpn h2"),
    );
    let name = format!(
        "haproxy{}",
        if variant.is_empty() {
            String::new()
        } else {
            format!("-{variant}")
        }
    );
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, cfg).unwrap();
    let args = vec!["-db".into(), "-f".into(), path.display().to_string()];
    let proc = spawn_pinned(&name, bin, &args, &dir.join(format!("{name}.log")));
    for port in [p.plain, p.tls, p.l7] {
        wait_listening(port, &name, &dir.join(format!("{name}.log")));
    }
    (proc, p)
}

fn start_nginx(bin: &Path, dir: &Path, b: &Backends, cert: &Path, key: &Path) -> (Proc, Ports) {
    let p = Ports {
        plain: free_port(),
        tls: free_port(),
        l7: free_port(),
    };
    let ups = |addrs: &[SocketAddr]| -> String {
        addrs
            .iter()
            .map(|a| format!("        server {a} max_fails=0;\n"))
            .collect()
    };
    let d = dir.join("nginx");
    std::fs::create_dir_all(&d).unwrap();
    let cfg = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 1;\nmaster_process off;\ndaemon off;\nworker_rlimit_nofile 20000;\nerror_log /dev/null crit;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 16000; }}\n\
         stream {{\n    upstream api {{\n{}    }}\n    upstream api_tls {{\n{}    }}\n\
         \x20   server {{ listen 127.0.0.1:{} backlog=4096; proxy_pass api; proxy_connect_timeout 5s; proxy_timeout 1h; tcp_nodelay on; }}\n\
         \x20   server {{ listen 127.0.0.1:{} backlog=4096; proxy_pass api_tls; proxy_connect_timeout 5s; proxy_timeout 1h; tcp_nodelay on; }}\n}}\n\
         http {{\n    access_log off;\n    keepalive_requests 10000000;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         \x20   upstream api_https {{\n{}        keepalive 1024;\n        keepalive_requests 10000000;\n    }}\n\
         \x20   server {{\n        listen 127.0.0.1:{} ssl http2 backlog=4096;\n        ssl_certificate {};\n        ssl_certificate_key {};\n\
         \x20       location / {{ proxy_pass https://api_https; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_verify off; proxy_buffering off; proxy_read_timeout 1h; }}\n    }}\n}}\n",
        ups(&b.plain),
        ups(&b.tls),
        p.plain,
        p.tls,
        ups(&b.tls),
        p.l7,
        cert.display(),
        key.display(),
        d = d.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg).unwrap();
    let args = vec![
        "-p".into(),
        d.display().to_string(),
        "-c".into(),
        path.display().to_string(),
    ];
    let proc = spawn_pinned("nginx", bin, &args, &dir.join("nginx.log"));
    for port in [p.plain, p.tls, p.l7] {
        wait_listening(port, "nginx", &dir.join("nginx.log"));
    }
    (proc, p)
}

// ------------------------------------------------------------ load and parse

/// A size in wrk's notation ("1.23GB", "512.00KB", "12B") in bytes.
fn wrk_bytes(s: &str) -> f64 {
    let s = s.trim();
    let (num, mul) = [
        ("TB", 1u64 << 40),
        ("GB", 1 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim().parse::<f64>().unwrap_or(f64::NAN) * mul as f64
}

/// A latency in wrk's notation ("123.45us", "1.20ms", "2.00s") in microseconds.
fn wrk_micros(s: &str) -> f64 {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("us") {
        v.parse().unwrap_or(f64::NAN)
    } else if let Some(v) = s.strip_suffix("ms") {
        v.parse::<f64>().unwrap_or(f64::NAN) * 1e3
    } else if let Some(v) = s.strip_suffix('s') {
        v.parse::<f64>().unwrap_or(f64::NAN) * 1e6
    } else {
        f64::NAN
    }
}

#[derive(Default, Debug)]
struct WrkOut {
    rps: f64,
    requests: f64,
    bytes: f64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_wrk(out: &str) -> WrkOut {
    let mut w = WrkOut {
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        ..Default::default()
    };
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_us = wrk_micros(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_us = wrk_micros(v);
        } else if t.contains(" requests in ") && t.ends_with(" read") {
            // "1234 requests in 20.00s, 1.23GB read"
            let (reqs, rest) = t.split_once(" requests in ").unwrap();
            let (dur, size) = rest.split_once(", ").unwrap_or(("", ""));
            w.requests = reqs.trim().parse().unwrap_or(f64::NAN);
            w.secs = wrk_micros(dur) / 1e6;
            w.bytes = wrk_bytes(size.trim_end_matches(" read"));
        }
    }
    w
}

fn wrk(secs: u64, conns: usize, url: &str, extra: &[&str]) -> WrkOut {
    let out = Command::new("taskset")
        .args(["-c", "0", "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .args(extra)
        .arg(url)
        .output()
        .expect("run wrk");
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// h2load: requests per second, and (with `latency`) p50/p99 in µs from its log.
fn h2load(
    secs: u64,
    warm: u64,
    conns: usize,
    streams: usize,
    url: &str,
    log: &Path,
) -> (f64, f64, f64) {
    let _ = std::fs::remove_file(log);
    let out = Command::new("taskset")
        .args(["-c", "0", "h2load", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-m{streams}"))
        .arg(format!("-D{secs}"))
        .arg(format!("--warm-up-time={warm}"))
        .arg(format!("--log-file={}", log.display()))
        .arg(url)
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .unwrap_or(f64::NAN);
    let mut lat: Vec<f64> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2).and_then(|v| v.trim().parse().ok()))
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize]
        }
    };
    (rps, pct(0.50), pct(0.99))
}

/// curl downloading the large body once: GiB/s.
fn curl_one(url: &str) -> f64 {
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download}",
        ])
        .arg(url)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .unwrap_or(f64::NAN)
        / (1u64 << 30) as f64
}

/// Opens `n` connections that each make one small request and stay open;
/// returns them (drop to close).
fn open_idle(addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    let req = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = std::net::TcpStream::connect(addr).expect("idle connection");
        s.write_all(req).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers then a 1 KiB body.
        let complete = |got: &[u8]| {
            got.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .is_some_and(|p| got.len() >= p + 4 + SMALL)
        };
        while !complete(&got) {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0, "connection closed before its response");
            got.extend_from_slice(&buf[..k]);
        }
        conns.push(s);
    }
    conns
}

/// `n` HTTP/2 watches over TLS (100 streams per connection), held open by a
/// thread on CPU 0 until dropped.
struct Watches {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_watches(addr: SocketAddr, ca: &Path, n: usize) -> Watches {
    let mut m = apilb::tls::ClientMaterial::from_files(Some(ca), None, None, false).unwrap();
    m.alpn = vec![b"h2".to_vec()];
    let cfg = m.build().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<usize>();
    let thread = std::thread::spawn(move || {
        pin_current_thread(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n.div_ceil(STREAMS_PER_CONN) {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = apilb::tls::server_name("127.0.0.1").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .unwrap();
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let want = STREAMS_PER_CONN.min(n - held.len());
                let mut pending = Vec::with_capacity(want);
                for _ in 0..want {
                    let mut s = send.clone();
                    let req = hyper::Request::get(format!("https://{addr}/api/v1/pods?watch=true"))
                        .body(http_body_util::Empty::<Bytes>::new())
                        .unwrap();
                    pending.push(tokio::spawn(async move { s.send_request(req).await }));
                }
                for p in pending {
                    if let Ok(Ok(resp)) = p.await {
                        held.push(resp);
                    }
                }
            }
            let _ = ready_tx.send(held.len());
            let _ = stopped.await;
        });
    });
    let opened = ready.recv().unwrap_or(0);
    assert_eq!(
        opened, n,
        "only {opened} of {n} watches opened through {addr}"
    );
    Watches {
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Where the open-loop client reaches each arm for load of `kind`.
fn load_targets(
    arms: &[&(String, Option<Proc>, Ports)],
    kind: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Vec<openloop::Target> {
    arms.iter()
        .map(|(_, _, ports)| {
            let (port, tls) = match kind {
                "plain" => (ports.plain, None),
                "h2" => (ports.l7, Some(tls.clone())),
                _ => (ports.tls, Some(tls.clone())),
            };
            openloop::Target {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                tls,
            }
        })
        .collect()
}

/// Scenario e's closed loop through this harness's own client: 16
/// connections keep 32 streams each busy, as h2load `-c16 -m32`, but a
/// request is due the moment its stream freed, so its wait inside the client
/// counts (h2load's stamp leaves it out). The arms take turns in 500 ms
/// slices: each slice begins with 512 requests at a proxy idle since its
/// last, a ramp that 100 ms slices made a tenth of the samples. Returns
/// ((scenario, metric, arm), value): each arm's req/s and each proxy's
/// added p50 and p99 over the direct arm.
fn closed_loop<'a>(
    arms: impl IntoIterator<Item = &'a (String, Option<Proc>, Ports)>,
    secs: u64,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Vec<((String, String, String), f64)> {
    let arms: Vec<_> = arms.into_iter().collect();
    let load = openloop::Load {
        conns: 16,
        pace: openloop::Pace::Closed,
        secs: secs as f64,
        slice: Duration::from_millis(500),
        h2_streams: Some(32),
    };
    let direct = arms
        .iter()
        .position(|(n, ..)| n == "direct")
        .expect("a direct arm");
    let got = openloop::run(&load_targets(&arms, "h2", tls), "/1k", &load, direct)
        .unwrap_or_else(|e| panic!("closed loop (h2, c16 m32): {e}"));
    let s = "e HTTP/2 L7".to_string();
    let mut out = Vec::new();
    for ((name, ..), l) in arms.iter().zip(&got) {
        eprintln!(
            "  closed loop h2 c16 m32 {name}: {:.0} req/s, p50 {:.0} p99 {:.0} µs",
            l.per_sec, l.p50_us, l.p99_us
        );
        let m = "req/s (own client, closed loop c16 m32)".to_string();
        out.push(((s.clone(), m, name.clone()), l.per_sec));
        if *name == "direct" {
            continue;
        }
        for (q, v, base) in [
            ("p50", l.p50_us, got[direct].p50_us),
            ("p99", l.p99_us, got[direct].p99_us),
        ] {
            let m = format!("added {q} µs (own client, closed loop c16 m32)");
            out.push(((s.clone(), m, name.clone()), v - base));
        }
    }
    out
}

/// Scenario b (`kind` plain or tls) or e (`kind` h2: up to 32 streams per
/// connection, as h2load `-m32`) at a fixed rate (open loop) through every
/// arm, the arms taking turns in 100 ms slices: added p50, p99, p99.9 and
/// median-slice p99 over the direct arm, each arm's share of stalled slices
/// and each proxy's context switches per request, as ((scenario, metric,
/// arm), value).
fn fixed_rate<'a>(
    arms: impl IntoIterator<Item = &'a (String, Option<Proc>, Ports)>,
    kind: &str,
    conns: usize,
    rate: f64,
    secs: u64,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Vec<((String, String, String), f64)> {
    let arms: Vec<_> = arms.into_iter().collect();
    let load = openloop::Load {
        conns,
        pace: openloop::Pace::Rate(rate),
        secs: secs as f64,
        slice: Duration::from_millis(100),
        h2_streams: (kind == "h2").then_some(32),
    };
    let targets = load_targets(&arms, kind, tls);
    let pids: Vec<Option<u32>> = arms
        .iter()
        .map(|(_, p, _)| p.as_ref().map(Proc::pid))
        .collect();
    let direct = arms
        .iter()
        .position(|(n, ..)| n == "direct")
        .expect("a direct arm");
    let sw0: Vec<f64> = pids.iter().map(|p| p.map_or(f64::NAN, switches)).collect();
    let got = openloop::run(&targets, "/1k", &load, direct)
        .unwrap_or_else(|e| panic!("open-loop load ({kind}, c={conns}): {e}"));
    let served = rate * secs as f64;
    let s = match kind {
        "h2" => "e HTTP/2 L7".to_string(),
        _ => format!("b keep-alive 1 KiB, {kind}, c={conns}"),
    };
    let k = rate / 1000.0;
    let base = [
        got[direct].p50_us,
        got[direct].p99_us,
        got[direct].p999_us,
        got[direct].slice_p99_us,
    ];
    let mut out = Vec::new();
    for (a, ((name, ..), l)) in arms.iter().zip(&got).enumerate() {
        let v = [l.p50_us, l.p99_us, l.p999_us, l.slice_p99_us];
        eprintln!(
            "  open loop {rate} req/s {kind} c={conns} {name}: p50 {:.0} p99 {:.0} p99.9 {:.0} µs, median slice p99 {:.0} µs ({:.0} after direct, {:.0} after a proxy), {:.1} % of slices stalled",
            v[0], v[1], v[2], v[3], l.slice_p99_after_quiet_us, l.slice_p99_after_busy_us, l.stalled_slices * 100.0
        );
        let m = format!(
            "% of 100 ms slices with a response over {} ms late at {k:.0}k req/s",
            openloop::STALL_NS / 1_000_000
        );
        out.push(((s.clone(), m, name.clone()), l.stalled_slices * 100.0));
        if name == "direct" {
            continue;
        }
        for (i, q) in ["p50", "p99", "p99.9", "median-slice p99"]
            .iter()
            .enumerate()
        {
            let m = match kind {
                "h2" => format!("added {q} µs at {k:.0}k req/s (open loop, c{conns} m32)"),
                _ => format!("added {q} µs at {k:.0}k req/s (open loop)"),
            };
            out.push(((s.clone(), m, name.clone()), v[i] - base[i]));
        }
        if let Some(pid) = pids[a] {
            let m = format!("proxy context switches per request at {k:.0}k req/s");
            out.push((
                (s.clone(), m, name.clone()),
                (switches(pid) - sw0[a]) / served,
            ));
        }
    }
    out
}

// ----------------------------------------------------------------- results

#[derive(Default)]
struct Results {
    /// (scenario, metric) -> arm -> values
    data: BTreeMap<(String, String), BTreeMap<String, Vec<f64>>>,
}

impl Results {
    fn add(&mut self, scenario: &str, metric: &str, arm: &str, v: f64) {
        if v.is_finite() {
            self.data
                .entry((scenario.into(), metric.into()))
                .or_default()
                .entry(arm.into())
                .or_default()
                .push(v);
        }
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// The median of the per-round ratios a[i] ÷ b[i]: arms run one after the
/// other within a round, so neighbours share the host's load of the moment,
/// which a ratio of medians taken over the whole run does not cancel.
/// `None` unless both have one value per round (more than one round).
fn paired(a: Option<&Vec<f64>>, b: Option<&Vec<f64>>) -> Option<f64> {
    let (a, b) = (a?, b?);
    if a.len() != b.len() || a.len() < 2 || b.contains(&0.0) {
        return None;
    }
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    Some(stats(&r).0)
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn render(r: &Results) -> String {
    let mut out = String::new();
    out.push_str("| scenario | metric | direct | apilb | haproxy | nginx | apilb÷direct | apilb÷haproxy | apilb÷nginx |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for ((scenario, metric), arms) in &r.data {
        let med = |a: &str| arms.get(a).map(|v| stats(v).0);
        let cell = |a: &str| match arms.get(a) {
            None => "—".to_string(),
            Some(v) => {
                let (m, lo, hi) = stats(v);
                let spread = if m != 0.0 { (hi - lo) / m.abs() } else { 0.0 };
                let flag = if v.len() > 1 && spread > 0.05 {
                    " ⚠"
                } else {
                    ""
                };
                if v.len() > 1 {
                    format!("{} ({}–{}){flag}", fmt(m), fmt(lo), fmt(hi))
                } else {
                    fmt(m)
                }
            }
        };
        let latency = metric.starts_with("added");
        let ratio = |other: &str| match (med("apilb"), med(other)) {
            (Some(a), Some(o)) if o != 0.0 => match paired(arms.get("apilb"), arms.get(other)) {
                Some(p) => format!("{:.2} ({p:.2})", a / o),
                None => format!("{:.2}", a / o),
            },
            _ => "—".into(),
        };
        let (rd, rh, rn) = if latency {
            ("—".to_string(), ratio("haproxy"), ratio("nginx"))
        } else {
            (ratio("direct"), ratio("haproxy"), ratio("nginx"))
        };
        let extra: Vec<String> = arms
            .keys()
            .filter(|k| !ARMS.contains(&k.as_str()))
            .map(|k| format!("{k}: {}", cell(k)))
            .collect();
        let metric_cell = if extra.is_empty() {
            metric.clone()
        } else {
            format!("{metric} [{}]", extra.join("; "))
        };
        out.push_str(&format!(
            "| {scenario} | {metric_cell} | {} | {} | {} | {} | {rd} | {rh} | {rn} |\n",
            cell("direct"),
            cell("apilb"),
            cell("haproxy"),
            cell("nginx")
        ));
    }
    out
}

// -------------------------------------------------------------------- main

fn main() {
    // `cargo bench` passes --bench; a filter argument may follow.
    let o = opts();
    let started = Instant::now();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let nofile = raise_nofile();
    let mut sysctl_notes = tune_sysctls();
    let (_halt_poll, note) = HaltPoll::set();
    sysctl_notes.extend(note);
    let probe_secs = if o.quick { 1.0 } else { 10.0 };
    let (stalled, longest) = host_stalls(probe_secs);
    let have = |n: &str| which(n);
    for tool in ["taskset", "wrk", "curl"] {
        if have(tool).is_none() {
            eprintln!("SKIPPED: the proxy benchmark needs {tool}");
            return;
        }
    }
    let h2 = have("h2load");
    let haproxy = have("haproxy");
    let nginx =
        have("nginx").filter(|_| Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists());
    let mut skipped = Vec::new();
    if haproxy.is_none() {
        skipped.push("haproxy (not installed)");
    }
    if nginx.is_none() {
        skipped.push("nginx (nginx or libnginx-mod-stream not installed)");
    }
    if h2.is_none() {
        skipped.push("scenarios e and f (h2load not installed)");
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = apilb::demo::Ca::new("apilb-bench-ca").unwrap();
    let ca_file = ca.write(d, "ca").unwrap();
    let leaf = ca.server(&["127.0.0.1", "localhost"]).unwrap();
    let (cert, key) = leaf.write(d, "server").unwrap();
    let pem = d.join("haproxy.pem");
    std::fs::write(&pem, format!("{}{}", leaf.cert_pem, leaf.key_pem)).unwrap();

    let b = start_backends(&leaf.cert_pem, &leaf.key_pem);
    pin_current_thread(0);

    let mut arms: Vec<(String, Option<Proc>, Ports)> = vec![(
        "direct".into(),
        None,
        Ports {
            plain: b.plain[0].port(),
            tls: b.tls[0].port(),
            l7: b.tls[0].port(),
        },
    )];
    let (p, ports) = start_apilb(d, &b, &ca_file, &cert, &key, "");
    arms.push(("apilb".into(), Some(p), ports));
    if let Some(bin) = &haproxy {
        let (p, ports) = start_haproxy(bin, d, &b, &pem, "");
        arms.push(("haproxy".into(), Some(p), ports));
    }
    if let Some(bin) = &nginx {
        let (p, ports) = start_nginx(bin, d, &b, &cert, &key);
        arms.push(("nginx".into(), Some(p), ports));
    }
    if o.twins {
        // A/A: a second, identical apilb and HAProxy measure how far the host
        // moves two copies of the same proxy apart within one run.
        let (p, ports) = start_apilb(d, &b, &ca_file, &cert, &key, "twin");
        arms.push(("apilb-twin".into(), Some(p), ports));
        if let Some(bin) = &haproxy {
            let (p, ports) = start_haproxy(bin, d, &b, &pem, "twin");
            arms.push(("haproxy-twin".into(), Some(p), ports));
        }
    }
    // Extra lines: HAProxy without splice (scenario a), health checks on (scenario b).
    let mut extras: Vec<(String, Proc, Ports)> = Vec::new();
    if let Some(bin) = &haproxy {
        let (p, ports) = start_haproxy(bin, d, &b, &pem, "nosplice");
        extras.push(("haproxy-nosplice".into(), p, ports));
        let (p, ports) = start_haproxy(bin, d, &b, &pem, "hc");
        extras.push(("haproxy+checks".into(), p, ports));
    }
    let (p, ports) = start_apilb(d, &b, &ca_file, &cert, &key, "hc");
    extras.push(("apilb+checks".into(), p, ports));
    // e: behind nghttpd when installed (C, fast enough that the proxy, not the
    // backends, is measured); nginx cannot speak HTTP/2 upstream, so it has no
    // arm there. Without nghttpd, e uses the in-process backends and every arm.
    let nghttpd = have("nghttpd").map(|bin| start_nghttpd(&bin, d, &cert, &key));
    let e_arms: Vec<(String, Option<Proc>, Ports)> = match &nghttpd {
        Some(n) => {
            let eb = Backends {
                plain: b.plain.clone(),
                tls: n.addrs.clone(),
            };
            let direct = Ports {
                l7: n.addrs[0].port(),
                ..Ports::default()
            };
            let mut v = vec![("direct".into(), None, direct)];
            let dir_e = d.join("e");
            std::fs::create_dir_all(&dir_e).unwrap();
            let (p, ports) = start_apilb(&dir_e, &eb, &ca_file, &cert, &key, "");
            v.push(("apilb".into(), Some(p), ports));
            if let Some(bin) = &haproxy {
                let (p, ports) = start_haproxy(bin, &dir_e, &eb, &pem, "");
                v.push(("haproxy".into(), Some(p), ports));
            }
            v
        }
        None => Vec::new(),
    };

    let client = |alpn: &[u8]| {
        let mut m =
            apilb::tls::ClientMaterial::from_files(Some(&ca_file), None, None, false).unwrap();
        m.alpn = vec![alpn.to_vec()];
        m.build().unwrap()
    };
    let (tls_client, h2_client) = (client(b"http/1.1"), client(b"h2"));
    let mut r = Results::default();
    let secs = o.secs;
    let rounds = if o.quick { o.runs } else { o.runs + 1 }; // first round warms up
    let small_conc: &[usize] = if o.quick { &[16] } else { &[1, 16, 64] };
    for round in 0..rounds {
        let keep = o.quick || round > 0;
        let rec = |r: &mut Results, s: &str, m: &str, arm: &str, v: f64| {
            if keep {
                r.add(s, m, arm, v);
            }
        };
        eprintln!(
            "round {}/{rounds}{}",
            round + 1,
            if keep { "" } else { " (warm-up)" }
        );
        // a: bulk throughput, L4 plain.
        let bulk_arms: Vec<(&str, Option<u32>, u16)> = arms
            .iter()
            .map(|(n, p, ports)| (n.as_str(), p.as_ref().map(Proc::pid), ports.plain))
            .chain(
                extras
                    .iter()
                    .filter(|(n, ..)| n == "haproxy-nosplice")
                    .map(|(n, p, ports)| (n.as_str(), Some(p.pid()), ports.plain)),
            )
            .collect();
        for (name, pid, port) in bulk_arms.iter().filter(|_| o.wants('a')) {
            let cpu0 = pid.map(cpu_secs);
            let w = wrk(secs, 4, &format!("http://127.0.0.1:{port}/large"), &[]);
            let gib = w.bytes / (1u64 << 30) as f64;
            rec(&mut r, "a bulk L4", "GiB/s (wrk -c4)", name, gib / w.secs);
            if let (Some(pid), Some(c0)) = (pid, cpu0) {
                rec(
                    &mut r,
                    "a bulk L4",
                    "proxy CPU-s per GiB",
                    name,
                    (cpu_secs(*pid) - c0) / gib,
                );
            }
            rec(
                &mut r,
                "a bulk L4",
                "GiB/s (curl, one stream)",
                name,
                curl_one(&format!("http://127.0.0.1:{port}/large")),
            );
        }
        // b: keep-alive small requests, plain and TLS passthrough.
        for &c in small_conc.iter().filter(|_| o.wants('b')) {
            for (kind, scheme) in [("plain", "http"), ("tls", "https")] {
                let mut direct = (f64::NAN, f64::NAN);
                for (name, proc, ports) in arms.iter().filter(|_| o.wrk) {
                    let port = if kind == "plain" {
                        ports.plain
                    } else {
                        ports.tls
                    };
                    let cpu0 = proc.as_ref().map(|p| cpu_secs(p.pid()));
                    let w = wrk(secs, c, &format!("{scheme}://127.0.0.1:{port}/1k"), &[]);
                    let s = format!("b keep-alive 1 KiB, {kind}, c={c}");
                    rec(&mut r, &s, "req/s", name, w.rps);
                    if let (Some(p), Some(c0)) = (proc, cpu0) {
                        // Less at the mercy of CPU 0's queueing than latency.
                        let us = (cpu_secs(p.pid()) - c0) * 1e6 / w.requests;
                        rec(&mut r, &s, "proxy CPU-µs per request", name, us);
                    }
                    if name == "direct" {
                        direct = (w.p50_us, w.p99_us);
                    } else {
                        rec(&mut r, &s, "added p50 µs", name, w.p50_us - direct.0);
                        rec(&mut r, &s, "added p99 µs", name, w.p99_us - direct.1);
                    }
                }
                if c > 1 {
                    for (m, v) in fixed_rate(&arms, kind, c, o.rate, secs, &tls_client) {
                        rec(&mut r, &m.0, &m.1, &m.2, v);
                    }
                }
            }
        }
        for (name, _, ports) in extras
            .iter()
            .filter(|(n, ..)| n.ends_with("+checks") && o.wants('b') && o.wrk)
        {
            let w = wrk(
                secs,
                16,
                &format!("http://127.0.0.1:{}/1k", ports.plain),
                &[],
            );
            rec(
                &mut r,
                "b keep-alive 1 KiB, plain, c=16",
                "req/s",
                name,
                w.rps,
            );
        }
        // c: new connections.
        for (name, p, ports) in arms.iter().filter(|_| o.wants('c')) {
            let pid = p.as_ref().map(Proc::pid);
            let cpu0 = pid.map(cpu_secs);
            let w = wrk(
                secs,
                32,
                &format!("http://127.0.0.1:{}/1k", ports.plain),
                &["-H", "Connection: close"],
            );
            rec(&mut r, "c new connections", "connections/s", name, w.rps);
            if let (Some(pid), Some(c0)) = (pid, cpu0) {
                rec(
                    &mut r,
                    "c new connections",
                    "proxy CPU-µs per connection",
                    name,
                    (cpu_secs(pid) - c0) * 1e6 / w.requests,
                );
            }
        }
        // A fresh process of one arm, for the memory rows of d and f: a
        // process that once held thousands of connections keeps its heap.
        let fresh = |name: &str| match name {
            "apilb" => Some(start_apilb(d, &b, &ca_file, &cert, &key, "pss")),
            "haproxy" => haproxy
                .as_ref()
                .map(|bin| start_haproxy(bin, d, &b, &pem, "")),
            _ => nginx
                .as_ref()
                .map(|bin| start_nginx(bin, d, &b, &cert, &key)),
        };
        // d: idle long-lived connections, in fresh processes.
        if o.wants('d') {
            for name in ["apilb", "haproxy", "nginx"] {
                let Some((p, ports)) = fresh(name) else {
                    continue;
                };
                let addr = SocketAddr::from(([127, 0, 0, 1], ports.plain));
                // One connection first, so lazily built state is not counted.
                drop(open_idle(addr, 1));
                std::thread::sleep(Duration::from_millis(200));
                let before = pss_kib(p.pid());
                let conns = open_idle(addr, IDLE_CONNS);
                std::thread::sleep(Duration::from_millis(500));
                let with = pss_kib(p.pid());
                drop(conns);
                std::thread::sleep(Duration::from_secs(1));
                let after = pss_kib(p.pid());
                rec(
                    &mut r,
                    "d 5,000 idle connections",
                    "KiB PSS per connection",
                    name,
                    (with - before) / IDLE_CONNS as f64,
                );
                rec(
                    &mut r,
                    "d 5,000 idle connections",
                    "KiB PSS kept after they left (total)",
                    name,
                    after - before,
                );
            }
        }
        // e: HTTP/2 over TLS, L7.
        if h2.is_some() && o.wants('e') {
            let warm = if o.quick { 0 } else { 3 };
            // Latency over the direct arm's, at c1 m1 and at c16 m32.
            let mut direct = [(f64::NAN, f64::NAN); 2];
            let e_arms = if e_arms.is_empty() { &arms } else { &e_arms };
            for (name, _, ports) in e_arms {
                let url = format!("https://127.0.0.1:{}/1k", ports.l7);
                let (rps, p50m, p99m) = h2load(secs, warm, 16, 32, &url, &d.join("h2.log"));
                rec(&mut r, "e HTTP/2 L7", "req/s (c16 m32)", name, rps);
                let (_, p50, p99) = h2load(secs, warm, 1, 1, &url, &d.join("h2.log"));
                let got = [(p50, p99), (p50m, p99m)];
                if name == "direct" {
                    direct = got;
                    continue;
                }
                let loads = ["c1 m1", "c16 m32"].into_iter().zip(got).zip(direct);
                for ((load, (p50, p99)), base) in loads {
                    let s = "e HTTP/2 L7";
                    rec(
                        &mut r,
                        s,
                        &format!("added p50 µs ({load})"),
                        name,
                        p50 - base.0,
                    );
                    rec(
                        &mut r,
                        s,
                        &format!("added p99 µs ({load})"),
                        name,
                        p99 - base.1,
                    );
                }
            }
            // Below every arm's capacity, where h2load's closed loop keeps
            // each proxy saturated and its latency mostly queue.
            for (m, v) in fixed_rate(e_arms.iter(), "h2", 16, o.e_rate, secs, &h2_client) {
                rec(&mut r, &m.0, &m.1, &m.2, v);
            }
            // h2load's closed loop again, counting each request's wait
            // inside the client too.
            for (m, v) in closed_loop(e_arms.iter(), secs, &h2_client) {
                rec(&mut r, &m.0, &m.1, &m.2, v);
            }
        }
        // f: L7 GETs while many watches are open (apilb vs HAProxy).
        if h2.is_some() && o.wants('f') {
            let n = if o.quick { WATCHES_QUICK } else { WATCHES };
            let warm = if o.quick { 0 } else { 3 };
            let s = format!("f L7 with {n} watches");
            // Memory per watch in fresh processes, as d measures idle
            // connections: a process that served h2load reuses that heap.
            for name in ["apilb", "haproxy"] {
                let Some((p, ports)) = fresh(name) else {
                    continue;
                };
                let addr = SocketAddr::from(([127, 0, 0, 1], ports.l7));
                // One watch first, so lazily built state is not counted.
                drop(open_watches(addr, &ca_file, 1));
                std::thread::sleep(Duration::from_millis(200));
                let before = pss_kib(p.pid());
                let watches = open_watches(addr, &ca_file, n);
                std::thread::sleep(Duration::from_millis(500));
                let with = pss_kib(p.pid());
                drop(watches);
                rec(
                    &mut r,
                    &s,
                    "KiB PSS per watch",
                    name,
                    (with - before) / n as f64,
                );
            }
            for (name, _, ports) in arms.iter().filter(|(n, ..)| n != "nginx") {
                let addr = SocketAddr::from(([127, 0, 0, 1], ports.l7));
                let url = format!("https://{addr}/1k");
                let (_, _, p99_without) = h2load(secs, warm, 16, 32, &url, &d.join("h2.log"));
                let watches = open_watches(addr, &ca_file, n);
                std::thread::sleep(Duration::from_millis(500));
                let (_, _, p99_with) = h2load(secs, warm, 16, 32, &url, &d.join("h2.log"));
                drop(watches);
                rec(
                    &mut r,
                    &s,
                    "GET p99 µs without watches (c16 m32)",
                    name,
                    p99_without,
                );
                rec(
                    &mut r,
                    &s,
                    "GET p99 µs with watches (c16 m32)",
                    name,
                    p99_with,
                );
                rec(
                    &mut r,
                    &s,
                    "p99 with ÷ without",
                    name,
                    p99_with / p99_without,
                );
            }
            // The same GETs at scenario e's fixed rate, below saturation,
            // with the watches open through both proxies at once.
            let f_arms = arms.iter().filter(|(n, ..)| n != "nginx");
            let _watches: Vec<Watches> = f_arms
                .clone()
                .filter(|(n, ..)| n != "direct")
                .map(|(_, _, ports)| open_watches(([127, 0, 0, 1], ports.l7).into(), &ca_file, n))
                .collect();
            for ((_, m, arm), v) in fixed_rate(f_arms, "h2", 16, o.e_rate, secs, &h2_client) {
                rec(&mut r, &s, &format!("{m}, watches open"), &arm, v);
            }
        }
    }

    let table = render(&r);
    let cmd = format!(
        "{}cargo bench --bench proxy",
        [
            ("APILB_BENCH_QUICK", o.quick.then(|| "1".to_string())),
            ("APILB_BENCH_SECS", std::env::var("APILB_BENCH_SECS").ok()),
            ("APILB_BENCH_RUNS", std::env::var("APILB_BENCH_RUNS").ok()),
            ("APILB_BENCH_ONLY", std::env::var("APILB_BENCH_ONLY").ok()),
            ("APILB_BENCH_WRK", std::env::var("APILB_BENCH_WRK").ok()),
            ("APILB_BENCH_TWINS", std::env::var("APILB_BENCH_TWINS").ok()),
            ("APILB_BENCH_RATE", std::env::var("APILB_BENCH_RATE").ok()),
            (
                "APILB_BENCH_E_RATE",
                std::env::var("APILB_BENCH_E_RATE").ok()
            ),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v} ")))
        .collect::<String>()
    );
    let uname = version("uname", &["-sr"]);
    let report = format!(
        "# Benchmark results\n\n\
         Date: {date} · machine: {cpus} cores, {uname} · command: `{cmd}`\n\n\
         Protocol: docs/performance.md. Proxies pinned to CPU 1 with one worker (apilb `workers: 1`, HAProxy `nbthread 1`, nginx `worker_processes 1`); \
         wrk/h2load/curl and the backends (three plain HTTP and three TLS listeners in one process) on CPU 0. \
         {runs} measured run(s) of {secs} s per arm{warm}, arms interleaved; cells are median (min–max); ⚠ marks a spread above 5 %. \
         Health checks off except in the `+checks` lines (2 s). HAProxy runs with `maxconn 7500` instead of the protocol's 50000, which would need 125,000 descriptors against this machine's hard limit of 20,000. nginx's L7 arm speaks HTTP/1.1 keep-alive upstream (nginx 1.22 cannot do HTTP/2 upstream) with `keepalive 1024` idle upstream connections and `keepalive_requests` raised (its default of 1,000 closes busy HTTP/2 client connections mid-run); apilb and HAProxy use HTTP/2 upstream. Scenario d, and f's memory row, start fresh proxy processes each round (a process that once held 5,000 connections keeps its heap), apilb's with `MIMALLOC_ALLOW_THP=0` so that its heap does not grow in 2 MiB huge pages. \
         Scenario e's `own client` rows run h2load's closed loop (c16 m32) through this harness's HTTP/2 client, each request timed from the moment its stream freed (h2load times a request from when it serializes it, which leaves out the wait in its own queue), the arms taking turns in 500 ms slices. \
         Latency rows are microseconds added over the direct arm; their ratio columns are apilb's added latency ÷ the other's. A ratio in parentheses is the median of the per-round ratios (each round runs the arms back to back, so a pair shares the host's load of that moment; the ratio of medians before it does not cancel the drift between rounds).\n\n\
         Versions: apilb {apilb} · {haproxy} · {nginx} · {wrk} · {h2load} · open files limit {nofile}.\n\
         {e_backends}\n{sysctl}{skipped}\
         Host stalls: with both CPUs busy, a thread on CPU 1 lost the CPU for over {stall_ms} ms in {stalled:.0} % of 100 ms windows over {probe_secs} s (longest gap {longest:.1} ms), measured before the scenarios; every arm that runs on CPU 1 shares them.\n\n\
         {table}\n\
         Whole run: {total:.0} s.\n",
        date = version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpus = cpus,
        runs = o.runs,
        secs = secs,
        warm = if o.quick { " (quick mode: no warm-up)" } else { " after one warm-up run" },
        apilb = env!("CARGO_PKG_VERSION"),
        haproxy = version("haproxy", &["-v"]),
        nginx = version("nginx", &["-v"]),
        wrk = version("wrk", &["--version"]).split(" Copyright").next().unwrap_or(""),
        h2load = version("h2load", &["--version"]),
        e_backends = if nghttpd.is_some() {
            format!("Scenario e: the backends are three `nghttpd` ({}) serving a 1 KiB file over TLS HTTP/2 on CPU 0, so the direct arm is far above any proxy; nginx has no e arm (no HTTP/2 upstream). HAProxy's L7 backend sets X-Forwarded-For (`option forwardfor`) as apilb does by default, and shares upstream connections (`http-reuse always`).", version("nghttpd", &["--version"]))
        } else {
            "Scenario e: nghttpd is not installed; e uses the in-process backends, which saturate before HAProxy does.".to_string()
        },
        sysctl = if sysctl_notes.is_empty() { String::new() } else { format!("Sysctls: {}.\n", sysctl_notes.join("; ")) },
        skipped = if skipped.is_empty() { String::new() } else { format!("Skipped: {}.\n", skipped.join("; ")) },
        total = started.elapsed().as_secs_f64(),
        stall_ms = openloop::STALL_NS / 1_000_000,
    );
    println!("{report}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS.md");
    if o.only.is_some() {
        let partial = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-partial-RESULTS.md");
        let _ = std::fs::write(&partial, &report);
        eprintln!("partial run: wrote {}", partial.display());
    } else if o.quick {
        // A smoke run proves the harness works; it does not replace the results.
        let quick = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-quick-RESULTS.md");
        let _ = std::fs::write(&quick, &report);
        eprintln!("quick mode: wrote {}", quick.display());
    } else {
        let notes = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| {
                t.split_once("\n## Analysis")
                    .map(|(_, a)| format!("\n## Analysis{a}"))
            })
            .unwrap_or_default();
        std::fs::write(&path, format!("{report}{notes}")).unwrap();
        eprintln!("wrote {}", path.display());
    }
    drop(extras);
    drop(arms);
    if std::env::var("APILB_BENCH_KEEP").as_deref() == Ok("1") {
        eprintln!("kept {}", dir.keep().display());
    }
}
