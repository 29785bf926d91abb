//! Scale figures for docs/performance.md: as many concurrent L4 connections
//! as the open-files limit allows (accept rate, memory, latency of new
//! requests while they are open), and reloads of a config with 50 frontends
//! and 500 servers (time to apply, latency of traffic meanwhile).
//! `cargo bench --bench scale`; `APILB_SCALE_CONNS=N` bounds the connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// New requests timed per measurement (connect, 1 KiB echoed, close).
const SAMPLES: usize = 1000;
const FRONTENDS: usize = 50;
const SERVERS_PER_POOL: usize = 10;
const RELOADS: usize = 20;

fn main() {
    if let Ok(addr) = std::env::var("APILB_SCALE_BACKEND") {
        return echo_backend(addr.parse().expect("backend address"));
    }
    let nofile = raise_nofile();
    // apilb holds two descriptors per proxied connection.
    let limit = (nofile.saturating_sub(1000) / 2) as usize;
    let conns = std::env::var("APILB_SCALE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9000)
        .min(limit);
    let dir = tempfile::tempdir().unwrap();
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _backend = Proc {
        child: Command::new(std::env::current_exe().unwrap())
            .env("APILB_SCALE_BACKEND", backend_addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the echo backend"),
    };
    assert!(
        listening_within_15s(backend_addr),
        "the echo backend did not listen"
    );
    let (front, admin) = (free_port(), free_port());
    let cfg = dir.path().join("apilb.yaml");
    std::fs::write(&cfg, config(&[front], admin, backend_addr, 0)).unwrap();
    let apilb = start_apilb(&cfg, dir.path());
    let front = SocketAddr::from(([127, 0, 0, 1], front));
    assert!(
        listening_within_15s(front),
        "apilb did not listen on {front}"
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));

    println!("# Scale figures\n");
    println!(
        "{} cores, open files limit {nofile}, apilb with its default workers (one per core), \
         unpinned; the echo backend runs in a process of its own.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    connections(&apilb, front, conns);
    reloads(&apilb, &cfg, front, admin, backend_addr);
}

/// Opens `n` proxied connections (each completes a round trip), holds them,
/// and times new requests before and while they are open.
fn connections(apilb: &Proc, front: SocketAddr, n: usize) {
    let idle = latency(front, SAMPLES);
    let before = pss_kib(apilb.pid());
    let t = Instant::now();
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(front).expect("connect through apilb");
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        open.push(s);
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let with = pss_kib(apilb.pid());
    let busy = latency(front, SAMPLES);
    drop(open);
    println!("## {n} concurrent L4 connections\n");
    println!("| metric | value |\n|---|---|");
    println!(
        "| connections opened one after another (connect + 1-byte round trip) | {:.0} per second |",
        n as f64 / took.as_secs_f64()
    );
    println!(
        "| apilb PSS | {before:.0} KiB before, {with:.0} KiB with them open: {:.2} KiB per connection |",
        (with - before) / n as f64
    );
    println!(
        "| new request (connect, 1 KiB echoed, close), {SAMPLES} in a row, p50 / p99 | {} / {} µs with none open, {} / {} µs with {n} open |\n",
        idle.0, idle.1, busy.0, busy.1
    );
}

/// Reloads between two configs of 50 frontends and 500 servers; times each
/// reload and the new requests made meanwhile.
fn reloads(apilb: &Proc, cfg: &Path, front: SocketAddr, admin: SocketAddr, backend: SocketAddr) {
    let mut ports = vec![front.port()];
    ports.extend((1..FRONTENDS).map(|_| free_port()));
    let yaml = |variant| config(&ports, admin.port(), backend, variant);
    let reload = |i: usize, variant: usize| {
        std::fs::write(cfg, yaml(variant)).unwrap();
        let seen = reload_count(admin);
        let t = Instant::now();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(apilb.pid() as i32, libc::SIGHUP) };
        while reload_count(admin) == seen {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "reload {i} not applied"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        t.elapsed().as_secs_f64() * 1000.0
    };
    let first = reload(0, 0);
    let mut applied = Vec::new();
    let baseline = latency(front, SAMPLES);
    let load = std::thread::spawn(move || latency(front, SAMPLES * 4));
    for i in 1..=RELOADS {
        applied.push(reload(i, i % 2));
    }
    let during = load.join().unwrap();
    applied.sort_by(f64::total_cmp);
    println!(
        "## Reloads of {FRONTENDS} frontends and {} servers\n",
        FRONTENDS * SERVERS_PER_POOL
    );
    println!("| metric | value |\n|---|---|");
    println!(
        "| first reload, from 1 frontend to {FRONTENDS} (binds 49 listeners) | {first:.1} ms |"
    );
    println!(
        "| SIGHUP to `apilb_config_reloads_total` counting it, {RELOADS} reloads (one server per pool changes each time), median / max | {:.1} / {:.1} ms |",
        applied[applied.len() / 2],
        applied[applied.len() - 1]
    );
    println!(
        "| new requests on frontend 0, p50 / p99 | {} / {} µs without reloads, {} / {} µs while reloading |",
        baseline.0, baseline.1, during.0, during.1
    );
}

/// A frontend per port (the first proxying to `backend`), each with a pool
/// of 10 servers; `variant` changes one server per pool.
fn config(ports: &[u16], admin: u16, backend: SocketAddr, variant: usize) -> String {
    let mut y = format!("admin:\n  listen: 127.0.0.1:{admin}\nshutdown_grace: 1s\nfrontends:\n");
    for (f, port) in ports.iter().enumerate() {
        y += &format!(
            "  - {{name: fe{f}, listen: '127.0.0.1:{port}', pool: p{f}, max_connections: 20000}}\n"
        );
    }
    y += "pools:\n";
    for f in 0..ports.len() {
        y += &format!("  - name: p{f}\n    health: {{check: none}}\n    servers:\n");
        if f == 0 {
            y += &format!("      - {backend}\n");
            continue;
        }
        for s in 0..SERVERS_PER_POOL {
            let last = if s == 0 { variant } else { s + 1 };
            y += &format!("      - 127.0.{f}.{last}:6443\n");
        }
    }
    y
}

fn reload_count(admin: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with("apilb_config_reloads_total{result=\"success\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// p50 and p99 in µs of `n` new requests made one after another.
fn latency(front: SocketAddr, n: usize) -> (u64, u64) {
    let payload = [b'k'; 1024];
    let mut us: Vec<u64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let mut s = TcpStream::connect(front).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&payload).unwrap();
            let mut back = [0u8; 1024];
            s.read_exact(&mut back).unwrap();
            t.elapsed().as_micros() as u64
        })
        .collect();
    us.sort_unstable();
    (us[n / 2], us[n * 99 / 100])
}

/// Echoes every connection's bytes back; runs as a child process.
fn echo_backend(addr: SocketAddr) {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

fn start_apilb(cfg: &Path, dir: &Path) -> Proc {
    let log = std::fs::File::create(dir.join("apilb.log")).unwrap();
    Proc {
        child: Command::new(env!("CARGO_BIN_EXE_apilb"))
            .args(["--log-level", "warn", "run", "--no-watch", "-c"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start apilb"),
    }
}
