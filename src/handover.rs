//! Restarts that refuse no connection: listening sockets inherited from
//! systemd socket activation or from the apilb that re-executed us, sd_notify,
//! and starting the successor on SIGUSR2 and waiting until it serves.
//!
//! Layer 2: imports nothing from the crate. Protocols:
//!
//! - systemd: `LISTEN_PID` (must be ours), `LISTEN_FDS` (count, from fd 3),
//!   `LISTEN_FDNAMES` (colon-separated, for logs only); matched to the config
//!   by the socket's local address (wildcard and port exactly).
//! - re-exec: `APILB_HANDOVER_FDS` lists `FD,CONFIGURED_ADDR,HEX(LABEL)` per
//!   socket, `;`-separated; the label (`frontend/NAME`, `admin`) and the
//!   configured address (port 0 stays 0) find the socket again.
//!   `APILB_HANDOVER_READY_FD` is the write end of a pipe on which the
//!   successor writes `READY PID` once it serves, or `ERROR LINE`s before it
//!   exits; `APILB_GENERATION` counts re-execs.
//!
//! Every inherited descriptor gets FD_CLOEXEC, and the variables are removed
//! from the environment once read, so nothing leaks into later children.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{debug, warn};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
pub const LISTEN_FDS_START: RawFd = 3;
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
pub const ENV_FDS: &str = "APILB_HANDOVER_FDS";
pub const ENV_READY_FD: &str = "APILB_HANDOVER_READY_FD";
pub const ENV_GENERATION: &str = "APILB_GENERATION";
/// The VIP election lease the predecessor stopped renewing for us to go on.
pub const ENV_VIP_LEASE: &str = "APILB_VIP_LEASE";
/// How long the old process waits for its successor to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many `ERROR` lines of a failed successor are kept.
const MAX_REASON_LINES: usize = 20;
const READY_WORD: &str = "READY";
const ERROR_PREFIX: &str = "ERROR ";

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the binary path recorded at start is unusable: {0}")]
    NoExe(String),
    #[error("cannot create the readiness pipe: {0}")]
    Pipe(io::Error),
    #[error("cannot start {}: {source}", exe.display())]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("the new process (pid {pid}) {status} before it was ready{}", reasons_suffix(.reasons))]
    Exited {
        pid: u32,
        status: ExitStatus,
        reasons: Vec<String>,
    },
    #[error("the new process (pid {pid}) was not ready within {}; it was killed", humantime::format_duration(*.after))]
    Timeout { pid: u32, after: Duration },
    #[error("waiting for the new process failed: {0}")]
    Wait(io::Error),
    #[error("apilb began stopping during the re-exec; the new process was killed")]
    Abandoned,
}

fn reasons_suffix(reasons: &[String]) -> String {
    if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", reasons.join("; "))
    }
}

/// Who handed a socket to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Systemd,
    Predecessor,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Systemd => "systemd socket activation",
            Origin::Predecessor => "the previous apilb process",
        })
    }
}

/// A descriptor named in the environment, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub fd: RawFd,
    pub origin: Origin,
    /// systemd: the LISTEN_FDNAMES entry (for logs); re-exec: the label.
    pub label: Option<String>,
    /// re-exec only: the `listen` the socket was bound for.
    pub configured: Option<SocketAddr>,
}

/// The descriptors systemd passed, if `LISTEN_PID` names `my_pid`. A
/// missing or foreign `LISTEN_PID` means the variables are not for us.
pub fn parse_listen_fds(
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
    my_pid: u32,
) -> Result<Vec<Candidate>, String> {
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("{ENV_LISTEN_PID}={pid:?} is not a process id"))?;
    if pid != my_pid {
        return Ok(Vec::new());
    }
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| format!("{ENV_LISTEN_FDS}={count:?} is not a descriptor count"))?;
    let names: Vec<&str> = names.map(|s| s.split(':').collect()).unwrap_or_default();
    let names_fit = names.len() == n as usize;
    Ok((0..n)
        .map(|i| Candidate {
            fd: LISTEN_FDS_START + i,
            origin: Origin::Systemd,
            label: names_fit.then(|| names[i as usize].to_string()),
            configured: None,
        })
        .collect())
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A socket handed to the successor.
pub struct Handed<'a> {
    pub fd: BorrowedFd<'a>,
    /// `frontend/NAME` or `admin`.
    pub label: String,
    /// The `listen` of the config (port 0 stays 0).
    pub configured: SocketAddr,
}

/// The `APILB_HANDOVER_FDS` value for `sockets`.
pub fn encode_handed(sockets: &[Handed<'_>]) -> String {
    sockets
        .iter()
        .map(|s| format!("{},{},{}", s.fd.as_raw_fd(), s.configured, hex(&s.label)))
        .collect::<Vec<_>>()
        .join(";")
}

/// Parses an `APILB_HANDOVER_FDS` value.
pub fn parse_handed(value: &str) -> Result<Vec<Candidate>, String> {
    value
        .split(';')
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let bad = || format!("{ENV_FDS}: malformed entry {entry:?}");
            let mut parts = entry.splitn(3, ',');
            let fd: RawFd = parts.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
            let configured: SocketAddr =
                parts.next().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
            let label = parts.next().and_then(unhex).ok_or_else(bad)?;
            if fd < LISTEN_FDS_START {
                return Err(bad());
            }
            Ok(Candidate {
                fd,
                origin: Origin::Predecessor,
                label: Some(label),
                configured: Some(configured),
            })
        })
        .collect()
}

/// Whether `fd` is open in this process.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags; EBADF if not open.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// An inherited listening socket waiting to be taken.
struct Entry {
    listener: TcpListener,
    local: SocketAddr,
    origin: Origin,
    label: Option<String>,
    configured: Option<SocketAddr>,
}

/// An inherited socket no listener of the config took.
pub struct Leftover {
    pub local: SocketAddr,
    pub origin: Origin,
    pub label: Option<String>,
    pub listener: TcpListener,
}

/// Listening sockets this process inherited, until the config takes them.
#[derive(Default)]
pub struct Inherited {
    entries: Mutex<Vec<Entry>>,
}

impl fmt::Debug for Inherited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Inherited({} sockets)", self.len())
    }
}

impl Inherited {
    /// Takes ownership of every candidate that is an open TCP listening
    /// socket (FD_CLOEXEC set, non-blocking); others are closed with a
    /// warning. Duplicates and descriptors in `exclude` are skipped.
    pub fn adopt(candidates: Vec<Candidate>, exclude: &[RawFd]) -> Self {
        let mut seen: HashSet<RawFd> = exclude.iter().copied().collect();
        let mut entries = Vec::new();
        for c in candidates {
            if !seen.insert(c.fd) {
                warn!(fd = c.fd, from = %c.origin, "inherited descriptor listed twice; using it once");
                continue;
            }
            if !is_open(c.fd) {
                warn!(fd = c.fd, from = %c.origin, "inherited descriptor is not open; ignored");
                continue;
            }
            match adopt_one(&c) {
                Ok(e) => entries.push(e),
                Err(e) => {
                    warn!(fd = c.fd, from = %c.origin, error = %e, "closing an inherited descriptor that is not a listening TCP socket")
                }
            }
        }
        Inherited {
            entries: Mutex::new(entries),
        }
    }

    /// The listener for the config entry `label` (`frontend/NAME`, `admin`)
    /// with `listen: configured`: the socket our predecessor bound for the
    /// same label and address, else (port not 0) any inherited socket whose
    /// local address is exactly `configured`.
    pub fn take(&self, label: &str, configured: SocketAddr) -> Option<TcpListener> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let i = entries
            .iter()
            .position(|e| e.label.as_deref() == Some(label) && e.configured == Some(configured))
            .or_else(|| {
                (configured.port() != 0)
                    .then(|| entries.iter().position(|e| e.local == configured))
                    .flatten()
            })?;
        let e = entries.swap_remove(i);
        debug!(addr = %e.local, from = %e.origin, label, "using an inherited listening socket");
        Some(e.listener)
    }

    /// Removes and returns every socket not taken (the caller closes them).
    pub fn leftovers(&self) -> Vec<Leftover> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .drain(..)
            .map(|e| Leftover {
                local: e.local,
                origin: e.origin,
                label: e.label,
                listener: e.listener,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn adopt_one(c: &Candidate) -> io::Result<Entry> {
    // SAFETY: the descriptor is open and was handed to this process alone
    // (systemd or our predecessor listed it for us; duplicates were skipped),
    // so this socket becomes its only owner and closes it exactly once.
    let sock = unsafe { socket2::Socket::from_raw_fd(c.fd) };
    sock.set_cloexec(true)?;
    let not_tcp = || io::Error::new(io::ErrorKind::InvalidInput, "not a TCP socket");
    if sock.r#type()? != socket2::Type::STREAM {
        return Err(not_tcp());
    }
    let domain = sock.domain()?;
    if domain != socket2::Domain::IPV4 && domain != socket2::Domain::IPV6 {
        return Err(not_tcp());
    }
    if !sock.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket is not listening",
        ));
    }
    let local = sock.local_addr()?.as_socket().ok_or_else(not_tcp)?;
    sock.set_nonblocking(true)?;
    Ok(Entry {
        listener: sock.into(),
        local,
        origin: c.origin,
        label: c.label.clone(),
        configured: c.configured,
    })
}

/// Facts about this process: its re-exec generation, when it started, and
/// how to start it again.
#[derive(Debug, Clone)]
pub struct Process {
    /// 0 for a fresh start, +1 per re-exec.
    pub generation: u64,
    pub started: SystemTime,
    /// The binary path as it was at start (after the file is replaced,
    /// /proc/self/exe names the deleted inode).
    exe: Result<PathBuf, String>,
    args: Vec<OsString>,
}

impl Process {
    /// This process as a fresh start (generation 0).
    pub fn current() -> Self {
        Process {
            generation: 0,
            started: SystemTime::now(),
            exe: std::env::current_exe().map_err(|e| e.to_string()),
            args: std::env::args_os().collect(),
        }
    }

    /// A process that re-executes `exe` with `args` (argv[0] first).
    pub fn with_command(exe: PathBuf, args: Vec<OsString>) -> Self {
        Process {
            exe: Ok(exe),
            args,
            ..Self::current()
        }
    }

    pub fn exe(&self) -> Option<&Path> {
        self.exe.as_deref().ok()
    }

    /// Start time in seconds since the Unix epoch.
    pub fn started_unix(&self) -> f64 {
        self.started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// The successor's side of the readiness pipe.
#[derive(Debug, Default)]
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// True when a predecessor waits for this process.
    pub fn is_handover(&self) -> bool {
        self.pipe.is_some()
    }

    /// Tells the predecessor this process serves; it then stops accepting.
    pub fn ready(&mut self) {
        if let Some(mut f) = self.pipe.take() {
            if let Err(e) = writeln!(f, "{READY_WORD} {}", std::process::id()) {
                warn!(error = %e, "cannot tell the previous apilb process that this one is ready");
            }
        }
    }

    /// Tells the predecessor why this process is about to exit.
    pub fn failed(&mut self, lines: &[String]) {
        if let Some(mut f) = self.pipe.take() {
            for l in lines {
                let _ = writeln!(f, "{ERROR_PREFIX}{}", l.replace('\n', " "));
            }
        }
    }
}

/// What a starting process takes from its environment.
#[derive(Debug)]
pub struct Startup {
    pub process: Process,
    pub inherited: Inherited,
    pub readiness: Readiness,
}

impl Startup {
    /// Reads (and removes) the systemd and re-exec variables and adopts the
    /// descriptors they name. Call before any thread is started: it changes
    /// the environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        let mut process = Process::current();
        process.generation = var(ENV_GENERATION)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let mut candidates = parse_listen_fds(
            var(ENV_LISTEN_PID).as_deref(),
            var(ENV_LISTEN_FDS).as_deref(),
            var(ENV_LISTEN_FDNAMES).as_deref(),
            std::process::id(),
        )
        .unwrap_or_else(|e| {
            warn!("ignoring socket activation: {e}");
            Vec::new()
        });
        if let Some(v) = var(ENV_FDS) {
            match parse_handed(&v) {
                Ok(c) => candidates.extend(c),
                Err(e) => warn!("ignoring the sockets of the previous apilb process: {e}"),
            }
        }
        let ready_fd = var(ENV_READY_FD)
            .and_then(|f| f.parse::<RawFd>().ok())
            .filter(|&fd| fd >= LISTEN_FDS_START && is_open(fd));
        let readiness = Readiness {
            pipe: ready_fd.map(|fd| {
                // SAFETY: the predecessor passed this open pipe end to us
                // alone; it is excluded from the sockets adopted below.
                let f = unsafe { File::from_raw_fd(fd) };
                // SAFETY: F_SETFD on a descriptor we own.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                f
            }),
        };
        let exclude: Vec<RawFd> = ready_fd.into_iter().collect();
        for k in [
            ENV_LISTEN_PID,
            ENV_LISTEN_FDS,
            ENV_LISTEN_FDNAMES,
            ENV_FDS,
            ENV_READY_FD,
            ENV_GENERATION,
        ] {
            std::env::remove_var(k);
        }
        Startup {
            process,
            inherited: Inherited::adopt(candidates, &exclude),
            readiness,
        }
    }
}

/// Sends `state` (`READY=1`, `STATUS=...`, newline-separated) to the service
/// manager when `$NOTIFY_SOCKET` is set. Returns whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match notify_to(&socket, state) {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, socket = ?socket, "sd_notify failed");
            false
        }
    }
}

/// sd_notify to an explicit socket: a path, or `@name` for an abstract one.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else if bytes.starts_with(b"/") {
        sock.send_to(state.as_bytes(), Path::new(socket))?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "NOTIFY_SOCKET is neither a path nor an abstract name",
        ));
    }
    Ok(())
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Clears FD_CLOEXEC on `fds`; runs in the child between fork and exec, so
/// it only calls fcntl (async-signal-safe) and allocates nothing.
fn keep_across_exec(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl on descriptors the parent kept open across the fork.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills the child if the wait is abandoned (timeout, shutdown) before it
/// reported ready.
struct KillUnlessReady(Option<tokio::process::Child>);

impl Drop for KillUnlessReady {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// Reads and unsets the VIP lease a predecessor handed over, if any.
pub fn take_vip_lease() -> Option<i64> {
    let v = std::env::var(ENV_VIP_LEASE).ok()?;
    // SAFETY: called once at start, before the runtime starts other threads.
    unsafe { std::env::remove_var(ENV_VIP_LEASE) };
    v.parse().ok()
}

/// Starts the binary recorded at start with the same arguments, hands it
/// `sockets`, and waits up to `timeout` until it reports ready. Returns its
/// pid; on any failure the child is gone and the caller keeps serving.
pub async fn spawn_successor(
    process: &Process,
    sockets: &[Handed<'_>],
    timeout: Duration,
) -> Result<u32, HandoverError> {
    spawn_successor_with(process, sockets, &[], timeout).await
}

/// `spawn_successor` with extra environment variables for the successor
/// (the VIP lease it takes over).
pub async fn spawn_successor_with(
    process: &Process,
    sockets: &[Handed<'_>],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<u32, HandoverError> {
    let exe = process.exe.clone().map_err(HandoverError::NoExe)?;
    let (read, write) = cloexec_pipe().map_err(HandoverError::Pipe)?;
    let mut keep: Vec<RawFd> = sockets.iter().map(|s| s.fd.as_raw_fd()).collect();
    keep.push(write.as_raw_fd());
    let mut cmd = tokio::process::Command::new(&exe);
    if let Some((argv0, rest)) = process.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env(ENV_FDS, encode_handed(sockets))
        .env(ENV_READY_FD, write.as_raw_fd().to_string())
        .env(ENV_GENERATION, (process.generation + 1).to_string())
        .env_remove(ENV_LISTEN_PID)
        .env_remove(ENV_LISTEN_FDS)
        .env_remove(ENV_LISTEN_FDNAMES)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec; it only calls fcntl on
    // descriptors that `sockets` and `write` keep open during this call.
    unsafe {
        cmd.pre_exec(move || keep_across_exec(&keep));
    }
    let child = cmd
        .spawn()
        .map_err(|source| HandoverError::Spawn { exe, source })?;
    drop(write); // EOF on `read` once the child is gone
    let pid = child.id().unwrap_or(0);
    let mut guard = KillUnlessReady(Some(child));
    let child = guard.0.as_mut().expect("just set");
    match tokio::time::timeout(timeout, wait_ready(read, child, pid)).await {
        Ok(Ok(())) => {
            // Ready: let it run on (tokio reaps it if it ever exits first).
            guard.0 = None;
            Ok(pid)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let _ = child.kill().await;
            Err(HandoverError::Timeout {
                pid,
                after: timeout,
            })
        }
    }
}

/// Reads the readiness pipe until `READY` or EOF; at EOF the child is
/// exiting: returns its status and the `ERROR` lines it sent.
async fn wait_ready(
    read: OwnedFd,
    child: &mut tokio::process::Child,
    pid: u32,
) -> Result<(), HandoverError> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read).map_err(HandoverError::Pipe)?;
    let mut lines = BufReader::new(rx).lines();
    let mut reasons = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.split_whitespace().next() == Some(READY_WORD) {
            return Ok(());
        }
        if reasons.len() < MAX_REASON_LINES {
            let l = line.strip_prefix(ERROR_PREFIX).unwrap_or(&line);
            reasons.push(l.to_string());
        }
    }
    let status = child.wait().await.map_err(HandoverError::Wait)?;
    Err(HandoverError::Exited {
        pid,
        status,
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, IntoRawFd};

    #[test]
    fn listen_fds_for_this_pid_start_at_3_with_names() {
        let c = parse_listen_fds(Some("42"), Some("2"), Some("fe:admin"), 42).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].fd, c[1].fd), (3, 4));
        assert_eq!(c[0].label.as_deref(), Some("fe"));
        assert_eq!(c[1].label.as_deref(), Some("admin"));
        assert!(c
            .iter()
            .all(|c| c.origin == Origin::Systemd && c.configured.is_none()));
    }

    #[test]
    fn listen_fds_for_another_pid_or_unset_are_ignored() {
        assert!(parse_listen_fds(Some("41"), Some("2"), None, 42)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(None, Some("2"), None, 42)
            .unwrap()
            .is_empty());
        assert!(parse_listen_fds(Some("42"), None, None, 42)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_listen_fds_are_errors_and_odd_names_are_dropped() {
        assert!(parse_listen_fds(Some("x"), Some("1"), None, 42).is_err());
        assert!(parse_listen_fds(Some("42"), Some("-1"), None, 42).is_err());
        assert!(parse_listen_fds(Some("42"), Some("many"), None, 42).is_err());
        let c = parse_listen_fds(Some("42"), Some("3"), Some("a:b"), 42).unwrap();
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|c| c.label.is_none()), "2 names for 3 fds");
    }

    #[test]
    fn handed_sockets_round_trip_with_any_label() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpListener::bind("[::1]:0").unwrap();
        let label = "frontend/odd, name; ü";
        let v = encode_handed(&[
            Handed {
                fd: l.as_fd(),
                label: label.into(),
                configured: "127.0.0.1:0".parse().unwrap(),
            },
            Handed {
                fd: a.as_fd(),
                label: "admin".into(),
                configured: "[::1]:8404".parse().unwrap(),
            },
        ]);
        let c = parse_handed(&v).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].fd, l.as_raw_fd());
        assert_eq!(c[0].label.as_deref(), Some(label));
        assert_eq!(c[0].configured, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c[1].configured, Some("[::1]:8404".parse().unwrap()));
        assert_eq!(c[1].origin, Origin::Predecessor);
        assert!(parse_handed("7,127.0.0.1:1").is_err());
        assert!(parse_handed("x,127.0.0.1:1,61").is_err());
        assert!(parse_handed("1,127.0.0.1:1,61").is_err(), "below fd 3");
        assert!(parse_handed("").unwrap().is_empty());
    }

    fn systemd(fd: RawFd) -> Candidate {
        Candidate {
            fd,
            origin: Origin::Systemd,
            label: None,
            configured: None,
        }
    }

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads flags only.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn systemd_sockets_match_by_exact_local_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd = l.into_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on our own descriptor, as systemd hands it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let inh = Inherited::adopt(vec![systemd(fd), systemd(fd)], &[]);
        assert_eq!(inh.len(), 1, "a descriptor listed twice is adopted once");
        assert!(cloexec(fd), "adopted descriptors get FD_CLOEXEC");
        let wildcard: SocketAddr = format!("0.0.0.0:{}", addr.port()).parse().unwrap();
        assert!(
            inh.take("frontend/fe", wildcard).is_none(),
            "wildcard != 127.0.0.1"
        );
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(inh.take("frontend/fe", other).is_none(), "port differs");
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(
            inh.take("frontend/fe", any_port).is_none(),
            "port 0 never matches systemd"
        );
        let got = inh.take("frontend/fe", addr).expect("exact address");
        assert_eq!(got.local_addr().unwrap(), addr);
        assert!(inh.is_empty());
        assert!(inh.leftovers().is_empty());
    }

    #[test]
    fn predecessor_sockets_match_by_label_and_configured_address() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let port0: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let cand = |l: TcpListener, label: &str| Candidate {
            fd: l.into_raw_fd(),
            origin: Origin::Predecessor,
            label: Some(label.into()),
            configured: Some(port0),
        };
        let inh = Inherited::adopt(vec![cand(a, "frontend/a"), cand(b, "frontend/b")], &[]);
        let got_b = inh.take("frontend/b", port0).unwrap();
        assert_eq!(got_b.local_addr().unwrap(), addr_b);
        assert!(inh.take("frontend/c", port0).is_none());
        let left = inh.leftovers();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].local, addr_a);
        assert_eq!(left[0].origin, Origin::Predecessor);
        assert!(inh.is_empty());
    }

    #[test]
    fn descriptors_that_are_not_listening_tcp_sockets_are_closed() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let udp = udp.into_raw_fd();
        let unbound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .unwrap()
            .into_raw_fd();
        let excluded = TcpListener::bind("127.0.0.1:0").unwrap();
        let inh = Inherited::adopt(
            vec![
                systemd(udp),
                systemd(unbound),
                systemd(excluded.as_raw_fd()),
            ],
            &[excluded.as_raw_fd()],
        );
        assert!(inh.is_empty());
        // Closed with a warning: the UDP port is free again.
        assert!(std::net::UdpSocket::bind(udp_addr).is_ok());
        assert!(
            is_open(excluded.as_raw_fd()),
            "an excluded fd is not touched"
        );
    }

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nMAINPID=42").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nMAINPID=42");
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("apilb-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to(OsStr::new("relative"), "READY=1").is_err());
    }

    fn sh(script: &str) -> Process {
        Process::with_command(
            "/bin/sh".into(),
            vec!["sh".into(), "-c".into(), script.into()],
        )
    }

    #[tokio::test]
    async fn successor_gets_the_sockets_and_reports_ready() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        // The child checks the socket is open in it and that the variables
        // name it, then reports ready.
        let script = format!(
            "[ -e /proc/self/fd/{fd} ] && case \"$APILB_HANDOVER_FDS\" in {fd},127.0.0.1:0,*) ;; *) exit 9;; esac \
             && [ \"$APILB_GENERATION\" = 1 ] && echo READY $$ >/dev/fd/$APILB_HANDOVER_READY_FD && sleep 0.2"
        );
        let handed = [Handed {
            fd: l.as_fd(),
            label: "frontend/fe".into(),
            configured: "127.0.0.1:0".parse().unwrap(),
        }];
        let pid = spawn_successor(&sh(&script), &handed, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(pid > 0);
        assert!(cloexec(fd), "the parent's descriptor keeps FD_CLOEXEC");
    }

    #[tokio::test]
    async fn successor_that_exits_reports_status_and_reasons() {
        let p = sh(
            "echo 'ERROR frontends[0].listen: in use' >/dev/fd/$APILB_HANDOVER_READY_FD; exit 78",
        );
        let e = spawn_successor(&p, &[], Duration::from_secs(10))
            .await
            .unwrap_err();
        match &e {
            HandoverError::Exited {
                status, reasons, ..
            } => {
                assert_eq!(status.code(), Some(78));
                assert_eq!(reasons, &["frontends[0].listen: in use".to_string()]);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().contains("exit status: 78"), "{e}");
    }

    #[tokio::test]
    async fn successor_that_never_reports_is_killed_at_the_timeout() {
        let started = std::time::Instant::now();
        let e = spawn_successor(&sh("sleep 30"), &[], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, HandoverError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error() {
        let p = Process::with_command("/nonexistent/apilb".into(), vec!["apilb".into()]);
        let e = spawn_successor(&p, &[], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, HandoverError::Spawn { .. }), "{e}");
    }
}
