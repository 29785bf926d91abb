//! Log output of the built binary: ANSI colour only on a terminal without
//! `NO_COLOR`, never in pipes or files; `--log-format json` gives one JSON
//! object per line.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{apilb_bin, Daemon};

const ESC: &str = "\x1b[";

/// A config whose frontend listens on `listen`; the pool's only server is
/// never contacted (`check: none`, no client connects).
fn config(dir: &Path, listen: &str) -> std::path::PathBuf {
    let path = dir.join("apilb.yaml");
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 1s\nfrontends:\n  - name: fe\n    listen: {listen}\n    pool: p\n\
         pools:\n  - name: p\n    servers: [127.0.0.1:9]\n    health:\n      check: none\n"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Waits up to `deadline` for the child to exit and returns its code.
fn wait_exit(child: &mut Child, deadline: Duration) -> Option<i32> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(
            Instant::now() < end,
            "apilb did not exit within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `apilb run` on a frontend address another socket holds: it logs
/// "apilb starting" (info) and "cannot start" (error) through tracing, then
/// exits 1. `stderr` receives its log output.
fn run_on_busy_port(env: &[(&str, &str)], stderr: Stdio) -> (Child, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = config(tmp.path(), &busy.local_addr().unwrap().to_string());
    let mut cmd = Command::new(apilb_bin());
    cmd.args(["--log-level", "info", "run", "--no-watch", "-c"])
        .arg(&cfg)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(20));
    drop(busy);
    assert_eq!(code, Some(1), "a busy frontend address must exit 1");
    (child, tmp)
}

#[test]
fn text_logs_to_a_pipe_have_no_colour() {
    let (mut child, _tmp) = run_on_busy_port(&[], Stdio::piped());
    let mut out = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        out.contains("INFO") && out.contains("apilb starting"),
        "{out}"
    );
    assert!(
        out.contains("ERROR") && out.contains("Address already in use"),
        "{out}"
    );
    assert!(!out.contains(ESC), "colour codes in a pipe: {out:?}");
}

#[test]
fn text_logs_to_a_file_have_no_colour() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let (_child, _cfg) = run_on_busy_port(&[], Stdio::from(file));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("apilb starting"), "{out}");
    assert!(!out.contains(ESC), "colour codes in a file: {out:?}");
}

/// Opens a pseudo-terminal; returns (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    // SAFETY: plain libc calls on descriptors this function owns; every return
    // value is checked before use.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = OwnedFd::from_raw_fd(m);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let s = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(
            s >= 0,
            "open pty slave: {}",
            std::io::Error::last_os_error()
        );
        (master, OwnedFd::from_raw_fd(s))
    }
}

/// Runs the busy-port case with stderr on a terminal and returns what it wrote.
fn on_terminal(env: &[(&str, &str)]) -> String {
    let (master, slave) = pty();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master ends with EIO once the last slave descriptor closes.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let (_child, _tmp) = run_on_busy_port(env, Stdio::from(slave));
    reader.join().unwrap()
}

#[test]
fn text_logs_on_a_terminal_are_coloured_unless_no_color() {
    let plain = on_terminal(&[]);
    assert!(plain.contains("apilb starting"), "{plain:?}");
    assert!(plain.contains(ESC), "no colour on a terminal: {plain:?}");

    let empty = on_terminal(&[("NO_COLOR", "")]);
    assert!(
        empty.contains(ESC),
        "an empty NO_COLOR must not disable colour: {empty:?}"
    );

    let no_color = on_terminal(&[("NO_COLOR", "1")]);
    assert!(no_color.contains("apilb starting"), "{no_color:?}");
    assert!(
        !no_color.contains(ESC),
        "colour despite NO_COLOR=1: {no_color:?}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "127.0.0.1:0");
    let mut d = Daemon::start(&cfg);
    d.frontend_addr("fe").await;
    d.admin_addr().await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).await, Some(0));
    let logs = d.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 3, "too few log lines: {logs}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
        assert!(!l.contains(ESC), "colour codes in JSON: {l:?}");
    }
}
