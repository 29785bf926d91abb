//! Graceful shutdown of the built binary on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A backend that, given "N\n", sends N numbered lines 100 ms apart, then closes
/// (N = 0: forever).
async fn streaming_backend() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let n: u64 = line.trim().parse().unwrap_or(0);
                let mut i = 0;
                while n == 0 || i < n {
                    if w.write_all(format!("line {i}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// The built binary in front of `backend` with this `shutdown_grace`.
fn daemon_with_grace(backend: std::net::SocketAddr, grace: &str) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("apilb.yaml");
    let yaml = l4_yaml(&[backend], "    health:\n      check: none\n")
        .replace("shutdown_grace: 2s", &format!("shutdown_grace: {grace}"));
    std::fs::write(&cfg, yaml).unwrap();
    let d = Daemon::start(&cfg);
    (tmp, d)
}

/// Reads lines until EOF or error; returns how many and when it ended.
async fn drain_lines(s: TcpStream) -> (usize, Instant) {
    let mut r = BufReader::new(s);
    let mut n = 0;
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return (n, Instant::now()),
            Ok(_) => n += 1,
        }
    }
}

#[tokio::test]
async fn sigterm_drains_within_grace_and_exits_zero() {
    let backend = streaming_backend().await;
    let (_tmp, mut d) = daemon_with_grace(backend, "3s");
    let addr = d.frontend_addr("fe").await;
    let admin = d.admin_addr().await;

    // A short stream (20 lines, ~2 s) and an endless one.
    let mut short = TcpStream::connect(addr).await.unwrap();
    short.write_all(b"20\n").await.unwrap();
    let mut long = TcpStream::connect(addr).await.unwrap();
    long.write_all(b"0\n").await.unwrap();
    let mut first = [0u8; 7];
    short.read_exact(&mut first).await.unwrap();
    long.read_exact(&mut first).await.unwrap();

    let sent = Instant::now();
    d.signal(libc::SIGTERM);
    let short_task = tokio::spawn(drain_lines(short));
    let long_task = tokio::spawn(drain_lines(long));

    // Accepting stops at once.
    wait_for("the listener to close", Duration::from_secs(2), || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    // The admin server stays up through the drain and says why it is not ready.
    let (code, body) = admin_get(admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("shutting down"), "{body}");

    let (short_lines, short_end) = short_task.await.unwrap();
    assert_eq!(
        short_lines, 19,
        "the short stream finished whole (first line read before)"
    );
    assert!(
        short_end.duration_since(sent) < Duration::from_secs(3),
        "it finished inside the grace"
    );

    let (_, long_end) = long_task.await.unwrap();
    let cut = long_end.duration_since(sent);
    assert!(
        cut >= Duration::from_millis(2500) && cut < Duration::from_secs(5),
        "the endless stream is closed at the grace deadline (3 s), was {cut:?}"
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        d.find(
            "shutdown grace is over; closing the connections still open",
            None
        )
        .is_some(),
        "{}",
        d.logs()
    );
}

#[tokio::test]
async fn sigterm_with_nothing_open_exits_at_once() {
    let backend = streaming_backend().await;
    let (_tmp, mut d) = daemon_with_grace(backend, "30s");
    d.frontend_addr("fe").await;
    let t = Instant::now();
    d.signal(libc::SIGINT);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "no open connection: no wait for the 30 s grace"
    );
}
