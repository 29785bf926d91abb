//! Restarts and upgrades that refuse no connection (issue 16), through the
//! built binary: SIGUSR2 re-exec under load, failed re-execs, sockets from
//! systemd-style socket activation, and SIGHUP after a re-exec.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Stops a process this test caused to exist (the re-exec'd successor is not
/// our child) when the test ends, pass or fail.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid this test's daemon spawned.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (directly or through SIGUSR2).
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = admin_get(admin, "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn metric_value(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = admin_get(admin, "/metrics").await;
    metric(&body, series)
}

/// Waits until the admin server answers with `generation` and returns that
/// process's pid.
async fn wait_generation(admin: SocketAddr, generation: u64) -> i32 {
    wait_for(
        &format!("generation {generation} on /status"),
        Duration::from_secs(20),
        || async move {
            let s = status(admin).await;
            (s["process"]["generation"] == generation)
                .then(|| s["process"]["pid"].as_i64().unwrap() as i32)
        },
    )
    .await
}

/// New-connection clients: each round connects, reads the backend's
/// greeting, echoes a line and closes. Counts successes and failures.
struct Load {
    ok: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Self {
        let ok = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let tasks = (0..clients)
            .map(|_| {
                let (ok, errors, stop) = (ok.clone(), errors.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let r = async {
                            let (mut s, _) = echo_connect(addr).await?;
                            echo_roundtrip(&mut s, "ping\n").await
                        }
                        .await;
                        match r {
                            Ok(()) => ok.fetch_add(1, Relaxed),
                            Err(e) => {
                                errors.lock().unwrap().push(e.to_string());
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            ok,
            errors,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Relaxed)
    }

    /// Waits until `n` more requests than now succeeded.
    async fn wait_more(&self, n: usize) {
        let target = self.ok() + n;
        wait_for(
            &format!("{n} more successful requests"),
            Duration::from_secs(20),
            || async { (self.ok() >= target).then_some(()) },
        )
        .await;
    }

    /// Stops the clients; returns (successes, failures).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Relaxed), errors)
    }
}

/// A long-lived stream: echoes a line every 50 ms until told to stop,
/// counting round trips in `n`; returns the first error, if any.
fn long_stream(
    mut s: TcpStream,
    n: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> JoinHandle<Option<String>> {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            if let Err(e) = echo_roundtrip(&mut s, "tick\n").await {
                return Some(e.to_string());
            }
            n.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    })
}

/// An L4 config in front of echo backends, health checks off.
fn write_config(
    dir: &Path,
    backends: &[SocketAddr],
    listen: &str,
    grace: &str,
) -> std::path::PathBuf {
    let yaml = l4_yaml(backends, "    health:\n      check: none\n")
        .replace("shutdown_grace: 2s", &format!("shutdown_grace: {grace}"))
        .replace(
            "    listen: 127.0.0.1:0\n",
            &format!("    listen: {listen}\n"),
        );
    let path = dir.join("apilb.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigusr2_under_load_refuses_nothing_and_cuts_no_stream() {
    let (b1, b2) = (
        EchoBackend::start("b1").await,
        EchoBackend::start("b2").await,
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &[b1.addr, b2.addr], "127.0.0.1:0", "10s");
    let mut d = Daemon::start_args(&cfg, &["--no-watch"]);
    let addr = d.frontend_addr("fe").await;
    let admin = d.admin_addr().await;
    assert_eq!(wait_generation(admin, 0).await, d.pid());

    // 10 long-lived streams and 4 loops of new-connection requests.
    let streams_stop = CancellationToken::new();
    let mut streams = Vec::new();
    let trips: Vec<Arc<AtomicUsize>> = (0..10).map(|_| Arc::default()).collect();
    for n in &trips {
        let (s, _) = echo_connect(addr).await.unwrap();
        streams.push(long_stream(s, n.clone(), streams_stop.clone()));
    }
    let load = Load::start(addr, 4);
    load.wait_more(50).await;

    let sent = Instant::now();
    d.signal(libc::SIGUSR2);
    let new_pid = wait_generation(admin, 1).await;
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, d.pid(), "a new process serves the admin port");
    d.wait_log("re-exec: the new process serves; draining", None)
        .await;
    // A stray USR2 to the draining process starts nothing.
    d.signal(libc::SIGUSR2);
    d.wait_log(
        "SIGUSR2 ignored: this process is draining (stopping, or handed over)",
        None,
    )
    .await;
    // Load keeps flowing through the new process while the old one drains
    // the ten streams, which keep working: 10 more round trips each (0.5 s).
    let at_handover: Vec<usize> = trips.iter().map(|n| n.load(Relaxed)).collect();
    load.wait_more(100).await;
    wait_for(
        "10 more round trips on every stream",
        Duration::from_secs(10),
        || async {
            trips
                .iter()
                .zip(&at_handover)
                .all(|(n, before)| n.load(Relaxed) >= before + 10)
                .then_some(())
        },
    )
    .await;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the old process waits for its open streams"
    );
    let (ok, errors) = load.finish().await;
    streams_stop.cancel();
    for (s, n) in streams.into_iter().zip(&trips) {
        let err = s.await.unwrap();
        assert!(
            err.is_none(),
            "a stream was cut after {n:?} round trips: {err:?}"
        );
    }
    let closed = Instant::now();
    assert_eq!(d.wait_exit(Duration::from_secs(8)).await, Some(0));
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "the old process exits once its connections end, not at the 10 s grace"
    );
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {:?}",
        errors.len(),
        ok + errors.len(),
        &errors[..errors.len().min(5)]
    );
    println!(
        "re-exec under load: {ok} requests ok, 0 failed, 10 streams intact; old exited {:?} after SIGUSR2",
        sent.elapsed()
    );
    // The new process serves on its own, with the generation in the metrics.
    wait_serves(addr, "b1").await;
    assert_eq!(status(admin).await["process"]["pid"], new_pid);
    assert_eq!(
        metric_value(admin, "apilb_process_generation").await,
        Some(1.0)
    );
    assert!(
        status(admin).await["process"]["started_at"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

/// Replaces the file at `path` (a running binary) atomically.
fn replace_file(path: &Path, content: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_reexec_keeps_the_old_process_serving() {
    let b1 = EchoBackend::start("b1").await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &[b1.addr], "127.0.0.1:0", "2s");
    // Run a copy of the binary, so the test can replace "the binary on disk".
    let bin = tmp.path().join("apilb");
    let real = std::fs::read(apilb_bin()).unwrap();
    replace_file(&bin, &real);
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "run",
        "--no-watch",
        "-c",
    ])
    .arg(&cfg);
    // Another test forking while the copy was written may hold it open for
    // writing a moment longer (ETXTBSY): wait until it runs.
    wait_for(
        "the copied binary to run",
        Duration::from_secs(10),
        || async {
            Command::new(&bin)
                .arg("--version")
                .output()
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let d = Daemon::spawn_command(cmd);
    let addr = d.frontend_addr("fe").await;
    let admin = d.admin_addr().await;
    let load = Load::start(addr, 2);
    load.wait_more(20).await;
    let failures = "apilb_reexec_total{result=\"failure\"}";

    // 1. A binary that exits after a moment; a second SIGUSR2 meanwhile is ignored.
    replace_file(&bin, b"#!/bin/sh\nsleep 1\nexit 1\n");
    d.signal(libc::SIGUSR2);
    d.wait_log("re-exec: starting the new process", None).await;
    d.signal(libc::SIGUSR2);
    d.wait_log("SIGUSR2 ignored: a re-exec is already in progress", None)
        .await;
    wait_for(
        "the failure in the metric",
        Duration::from_secs(10),
        || async { (metric_value(admin, failures).await == Some(1.0)).then_some(()) },
    )
    .await;
    let v = d
        .wait_log("re-exec failed; this process keeps serving", None)
        .await;
    assert!(
        v["error"].as_str().unwrap().contains("exit status: 1"),
        "{v}"
    );

    // 2. The real binary, but the config on disk is broken.
    replace_file(&bin, &real);
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("pool: p", "pool: nope")).unwrap();
    d.signal(libc::SIGUSR2);
    wait_for("the second failure", Duration::from_secs(10), || async {
        (metric_value(admin, failures).await == Some(2.0)).then_some(())
    })
    .await;
    let logs = d.logs();
    assert!(
        logs.contains("frontends[0].pool") && logs.contains("exit status: 78"),
        "the reason names the config error and the exit status:\n{logs}"
    );

    load.wait_more(20).await;
    let (ok, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {:?}",
        errors.len(),
        ok + errors.len(),
        &errors[..errors.len().min(5)]
    );
    let s = status(admin).await;
    assert_eq!(
        s["process"]["pid"],
        d.pid(),
        "the old process still serves admin"
    );
    assert_eq!(s["process"]["generation"], 0);
    assert_eq!(
        metric_value(admin, "apilb_reexec_total{result=\"success\"}").await,
        Some(0.0)
    );
}

/// `apilb run` started the way systemd starts a socket-activated service:
/// `held` as fds 3.. with LISTEN_FDS, LISTEN_PID set to apilb's own pid (the
/// shell's `$$`, kept by `exec`).
fn socket_activated(cfg: &Path, held: &[&std::net::TcpListener]) -> Daemon {
    let fds: Vec<i32> = held.iter().map(|l| l.as_raw_fd()).collect();
    let n = fds.len();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS={n} exec \"$0\" --log-format json --log-level debug run --no-watch -c \"$1\""
        ))
        .arg(apilb_bin())
        .arg(cfg);
    // SAFETY: between fork and exec only dup2/fcntl (async-signal-safe) run,
    // on descriptors the test keeps open.
    unsafe {
        cmd.pre_exec(move || {
            // Move them above the target range first, so dup2 cannot
            // overwrite one still to be moved.
            let mut high = [0i32; 8];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..fds.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
    Daemon::spawn_command(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socket_activation_uses_held_sockets_and_a_restart_refuses_nothing() {
    let b1 = EchoBackend::start("b1").await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &[b1.addr], &addr.to_string(), "2s");

    let mut d1 = socket_activated(&cfg, &[&held, &unused]);
    assert_eq!(d1.frontend_addr("fe").await, addr);
    let v = d1
        .wait_log("frontend listening", Some(("frontend", "fe")))
        .await;
    assert_eq!(v["socket"], "inherited", "{v}");
    let w = d1
        .wait_log(
            "closing an inherited socket no listener of the config uses",
            None,
        )
        .await;
    assert_eq!(w["addr"], unused.local_addr().unwrap().to_string());
    wait_serves(addr, "b1").await;

    // Restart as systemd does with a .socket unit: stop, wait for the exit,
    // start again. The test holds the socket throughout.
    let load = Load::start(addr, 2);
    load.wait_more(20).await;
    d1.signal(libc::SIGTERM);
    assert_eq!(d1.wait_exit(Duration::from_secs(10)).await, Some(0));
    // No apilb runs now: a new connection still completes (kernel backlog)
    // and waits for the next process.
    let waiting = TcpStream::connect(addr).await.expect("the backlog accepts");
    let d2 = socket_activated(&cfg, &[&held, &unused]);
    d2.frontend_addr("fe").await;
    let mut waiting = tokio::time::timeout(Duration::from_secs(10), async move {
        let mut s = waiting;
        let mut greeting = [0u8; 3];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut greeting)
            .await
            .unwrap();
        assert_eq!(&greeting, b"b1\n");
        s
    })
    .await
    .expect("the connection made while no apilb ran is served");
    echo_roundtrip(&mut waiting, "late\n").await.unwrap();
    load.wait_more(50).await;
    let (ok, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} of {} requests failed across the restart: {:?}",
        errors.len(),
        ok + errors.len(),
        &errors[..errors.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_after_a_reexec() {
    let (b1, b2) = (
        EchoBackend::start("b1").await,
        EchoBackend::start("b2").await,
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &[b1.addr], "127.0.0.1:0", "2s");
    let mut d = Daemon::start_args(&cfg, &["--no-watch"]);
    let addr = d.frontend_addr("fe").await;
    let admin = d.admin_addr().await;
    wait_serves(addr, "b1").await;
    d.signal(libc::SIGUSR2);
    let new_pid = wait_generation(admin, 1).await;
    let _new = KillOnDrop(new_pid);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).await, Some(0));

    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(&b1.addr.to_string(), &b2.addr.to_string()),
    )
    .unwrap();
    signal(new_pid, libc::SIGHUP);
    wait_serves(addr, "b2").await;
    assert_eq!(
        metric_value(admin, "apilb_config_reloads_total{result=\"success\"}").await,
        Some(1.0)
    );
    assert_eq!(status(admin).await["process"]["pid"], new_pid);
}

/// Datagrams sent to a NOTIFY_SOCKET the test owns, as systemd would get them.
struct Notifications {
    got: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Notifications {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                g.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Notifications {
            got,
            _dir: dir,
            path,
        }
    }

    async fn wait(&self, want: &str) {
        wait_for(
            &format!("sd_notify {want:?}"),
            Duration::from_secs(10),
            || async {
                self.got
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|m| m.contains(want))
                    .then_some(())
            },
        )
        .await;
    }

    fn any(&self, want: &str) -> bool {
        self.got.lock().unwrap().iter().any(|m| m.contains(want))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sd_notify_follows_the_new_process() {
    let b1 = EchoBackend::start("b1").await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &[b1.addr], "127.0.0.1:0", "2s");
    let notes = Notifications::bind();
    let mut cmd = Command::new(apilb_bin());
    cmd.env("NOTIFY_SOCKET", &notes.path)
        .args(["--log-format", "json", "run", "--no-watch", "-c"])
        .arg(&cfg);
    let mut d = Daemon::spawn_command(cmd);
    let admin = d.admin_addr().await;
    notes.wait(&format!("READY=1\nMAINPID={}", d.pid())).await;

    d.signal(libc::SIGUSR2);
    let new_pid = wait_generation(admin, 1).await;
    let _new = KillOnDrop(new_pid);
    // The old main process names its successor; the successor announces itself.
    notes
        .wait(&format!("MAINPID={new_pid}\nSTATUS=handed over"))
        .await;
    notes.wait(&format!("READY=1\nMAINPID={new_pid}")).await;
    assert_eq!(d.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        !notes.any("STOPPING=1"),
        "the old process drained without telling systemd the service stops"
    );
    // A plain stop of the new main process does say so.
    signal(new_pid, libc::SIGTERM);
    notes.wait("STOPPING=1").await;
}
