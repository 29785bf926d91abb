//! Open-loop HTTP/1.1 or HTTP/2 load: requests fall due on a fixed
//! schedule, spread round-robin over keep-alive connections, and latency
//! counts from when a request was due, so a slow answer is charged for the
//! requests it held back (no coordinated omission). Over HTTP/2 a
//! connection carries up to a set number of streams at once (h2load's
//! `-m`); over HTTP/1.1, one request at a time.
//!
//! wrk keeps every connection busy: at saturation its latency is mostly the
//! queue on the load generator's own CPU. At a fixed rate below what every
//! arm sustains, the latency a proxy adds over the direct arm is its own.
//! One thread drives every connection through epoll, woken by an absolute
//! timerfd at each due time (µs precision; wrk2 does the same job and is not
//! packaged here), so the generator adds one runnable thread to its CPU.
//! Several targets share one run in turns of a short slice each, in a new
//! pseudo-random order every cycle, so a stall of the shared host lands on
//! all of them alike and no target always follows the same one (the direct
//! arm leaves the proxies' CPU idle; whether that slows the next slice is
//! reported, not assumed); each target's summary has the median over its
//! slices of the slice's own p99 next to the whole run's percentiles, and
//! the share of its slices that a stall hit.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustls::{ClientConfig, ClientConnection};

mod h2;

/// What to send and how fast, per target.
pub struct Load {
    /// Keep-alive connections to each target.
    pub conns: usize,
    /// Requests per second while a target has the load.
    pub rate: f64,
    /// Seconds of load each target receives.
    pub secs: f64,
    /// Targets take turns holding the load for this long each.
    pub slice: Duration,
    /// HTTP/2 (over TLS with ALPN h2) with at most this many streams in
    /// flight per connection; `None` is HTTP/1.1, one request at a time.
    pub h2_streams: Option<usize>,
}

/// Where to send: an address, TLS when a client config is given.
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<Arc<ClientConfig>>,
}

/// Latency from due time to the response's last byte, in microseconds.
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// The median over slices of each slice's own p99: a stall of the host
    /// that hits a few slices moves p99 and p99.9 but hardly this.
    pub slice_p99_us: f64,
    /// The same median over only the slices that followed the `quiet`
    /// target, and over the others.
    pub slice_p99_after_quiet_us: f64,
    pub slice_p99_after_busy_us: f64,
    /// The share of slices (0-1) in which some response came more than
    /// [`STALL_NS`] after it was due: how often a stall hit this target.
    pub stalled_slices: f64,
}

/// A response this late (2 ms) marks its slice as stalled.
pub const STALL_NS: u64 = 2_000_000;

const TIMER: Token = Token(usize::MAX);

/// Runs `load` against every target, GET `path` on every connection.
///
/// The targets take turns in slices of `load.slice` (in a new order every
/// cycle), so a disturbance of the shared host lasting longer than a few
/// slices lands on every target alike instead of on whichever ran at that
/// moment; only one target is loaded at a time, so they do not queue behind
/// each other either. Slices that followed target `quiet` are also
/// summarized apart. Returns one latency summary per target.
pub fn run(targets: &[Target], path: &str, load: &Load, quiet: usize) -> io::Result<Vec<Latency>> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(targets.len() * load.conns);
    for (t, target) in targets.iter().enumerate() {
        for _ in 0..load.conns {
            let token = Token(conns.len());
            let proto = match load.h2_streams {
                None => Proto::H1 {
                    request: format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", target.addr)
                        .into_bytes(),
                    busy: false,
                },
                Some(m) => Proto::H2(h2::Session::new(path, &target.addr.to_string(), m)),
            };
            conns.push(Conn::open(target, proto, t, poll.registry(), token)?);
        }
    }
    let timer = Timer::new()?;
    poll.registry().register(
        &mut SourceFd(&timer.fd.as_raw_fd()),
        TIMER,
        Interest::READABLE,
    )?;
    let n = targets.len() as u64;
    let step = (1e9 / load.rate) as u64;
    let per_slice = (load.slice.as_nanos() as u64 / step).max(1);
    let total = (load.secs * load.rate) as u64 * n;
    let begin = now_ns() + 20_000_000;
    let give_up = begin + total * step + 10_000_000_000;
    let mut lat: Vec<Vec<(u64, u64)>> = targets.iter().map(|_| Vec::new()).collect();
    let mut order = Order::new(targets.len());
    let mut sent = vec![0u64; targets.len()];
    let mut done = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut next = 0u64; // the next request to fall due
    while done < total as usize {
        let now = now_ns();
        if now > give_up {
            return Err(io::Error::other(format!(
                "{done} of {total} responses after the run and 10 s more"
            )));
        }
        while next < total && begin + next * step <= now {
            let slice = next / per_slice;
            let t = order.target(slice);
            let c = &mut conns[t * load.conns + (sent[t] % load.conns as u64) as usize];
            sent[t] += 1;
            c.due.push_back((begin + next * step, slice));
            c.send_due()?;
            next += 1;
        }
        if next < total {
            timer.arm(begin + next * step)?;
        }
        poll.poll(&mut events, Some(Duration::from_secs(1)))?;
        for ev in events.iter() {
            if ev.token() == TIMER {
                timer.drain();
                continue;
            }
            let c = &mut conns[ev.token().0];
            done += c.on_ready(&mut lat[c.target])?;
        }
    }
    Ok(lat
        .into_iter()
        .map(|l| summarize(l, |slice| order.before(slice) == Some(quiet)))
        .collect())
}

/// Which target holds each slice: cycle `k` is a permutation of the targets
/// drawn by a fixed-seed xorshift (the same sequence every run), so each
/// target follows each other one about equally often.
struct Order {
    n: usize,
    cycles: Vec<Vec<usize>>,
    rng: u64,
}

impl Order {
    fn new(n: usize) -> Self {
        Order {
            n,
            cycles: Vec::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn target(&mut self, slice: u64) -> usize {
        let cycle = (slice / self.n as u64) as usize;
        while self.cycles.len() <= cycle {
            let mut p: Vec<usize> = (0..self.n).collect();
            for i in (1..self.n).rev() {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                p.swap(i, (self.rng % (i as u64 + 1)) as usize);
            }
            self.cycles.push(p);
        }
        self.cycles[cycle][(slice % self.n as u64) as usize]
    }

    /// The target of the slice before `slice`, if that slice was drawn.
    fn before(&self, slice: u64) -> Option<usize> {
        let prev = slice.checked_sub(1)?;
        let cycle = self.cycles.get((prev / self.n as u64) as usize)?;
        Some(cycle[(prev % self.n as u64) as usize])
    }
}

/// Percentiles of `(slice, latency)` samples, and the median of per-slice
/// p99s overall, after the quiet target, and after any other.
fn summarize(mut lat: Vec<(u64, u64)>, after_quiet: impl Fn(u64) -> bool) -> Latency {
    lat.sort_unstable();
    let (mut all, mut quiet, mut busy) = (Vec::new(), Vec::new(), Vec::new());
    let mut stalled = 0;
    for chunk in lat.chunk_by(|a, b| a.0 == b.0) {
        let mut ns: Vec<u64> = chunk.iter().map(|x| x.1).collect();
        let p = percentile(&mut ns, 0.99);
        stalled += usize::from(ns.last().is_some_and(|&worst| worst > STALL_NS));
        all.push(p);
        if after_quiet(chunk[0].0) {
            quiet.push(p)
        } else {
            busy.push(p)
        }
    }
    let stalled_slices = stalled as f64 / all.len().max(1) as f64;
    let mut ns: Vec<u64> = lat.into_iter().map(|x| x.1).collect();
    Latency {
        stalled_slices,
        p50_us: percentile(&mut ns, 0.50),
        p99_us: percentile(&mut ns, 0.99),
        p999_us: percentile(&mut ns, 0.999),
        slice_p99_us: median(all),
        slice_p99_after_quiet_us: median(quiet),
        slice_p99_after_busy_us: median(busy),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `p` quantile of nanosecond samples, in microseconds (sorts them).
fn percentile(lat: &mut [u64], p: f64) -> f64 {
    lat.sort_unstable();
    lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A CLOCK_MONOTONIC timerfd armed at absolute times.
struct Timer {
    fd: OwnedFd,
}

impl Timer {
    fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create has no preconditions; a valid fd is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by timerfd_create and nothing else owns it.
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn arm(&self, at_ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: the fd is a timerfd we own; spec outlives the call.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn drain(&self) {
        let mut n = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a buffer of 8.
        unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
    }
}

/// One keep-alive connection: the due times of its requests not yet
/// answered.
struct Conn {
    sock: TcpStream,
    tls: Option<ClientConnection>,
    proto: Proto,
    /// Index of the target this connection goes to.
    target: usize,
    buf: Vec<u8>,
    /// Due time and slice of each request not yet sent (HTTP/2), or not yet
    /// answered, the front one on the wire when `busy` (HTTP/1.1).
    due: VecDeque<(u64, u64)>,
}

enum Proto {
    H1 { request: Vec<u8>, busy: bool },
    H2(h2::Session),
}

impl Conn {
    /// Connects and answers one request blocking (handshake and lazily
    /// built state stay out of the measurement), then goes non-blocking.
    fn open(
        to: &Target,
        proto: Proto,
        target: usize,
        registry: &mio::Registry,
        token: Token,
    ) -> io::Result<Self> {
        let addr = to.addr;
        let std_sock = std::net::TcpStream::connect(addr)?;
        std_sock.set_nodelay(true)?;
        std_sock.set_nonblocking(true)?;
        let tls = match &to.tls {
            None => None,
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                Some(ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?)
            }
        };
        let mut c = Conn {
            sock: TcpStream::from_std(std_sock),
            tls,
            proto,
            target,
            buf: Vec::with_capacity(4096),
            due: VecDeque::new(),
        };
        if let Proto::H2(s) = &c.proto {
            let mut preface = Vec::new();
            s.preface(&mut preface);
            c.write(&preface)?;
        }
        c.warm_up()?;
        registry.register(&mut c.sock, token, Interest::READABLE)?;
        Ok(c)
    }

    fn warm_up(&mut self) -> io::Result<()> {
        // Its own poll until answered: the run's poll has not started.
        let mut poll = Poll::new()?;
        poll.registry()
            .register(&mut self.sock, Token(0), Interest::READABLE)?;
        self.due.push_back((now_ns(), 0));
        self.send_due()?;
        let mut sink = Vec::new();
        let mut events = Events::with_capacity(4);
        while sink.is_empty() {
            poll.poll(&mut events, Some(Duration::from_secs(5)))?;
            if events.is_empty() {
                return Err(io::Error::other("no answer to the warm-up request in 5 s"));
            }
            self.on_ready(&mut sink)?;
        }
        poll.registry().deregister(&mut self.sock)
    }

    /// Sends the due requests the connection has room for: over HTTP/1.1
    /// the next one once the last was answered, over HTTP/2 as many as free
    /// streams allow, in one write.
    fn send_due(&mut self) -> io::Result<()> {
        match &mut self.proto {
            Proto::H1 { request, busy } => {
                if *busy || self.due.is_empty() {
                    return Ok(());
                }
                *busy = true;
                send(&mut self.sock, self.tls.as_mut(), request)
            }
            Proto::H2(s) => {
                let mut out = Vec::new();
                while s.has_room() {
                    let Some(due) = self.due.pop_front() else {
                        break;
                    };
                    s.request(due, &mut out);
                }
                self.write(&out)
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        send(&mut self.sock, self.tls.as_mut(), bytes)
    }

    /// Reads what arrived; every complete response records its latency,
    /// and the requests due that now fit are sent. Returns how many
    /// responses completed.
    fn on_ready(&mut self, lat: &mut Vec<(u64, u64)>) -> io::Result<usize> {
        self.read_available()?;
        let n = match &mut self.proto {
            Proto::H1 { busy, .. } => {
                let mut n = 0;
                while *busy {
                    let Some(len) = response_len(&self.buf)? else {
                        break;
                    };
                    if self.buf.len() < len {
                        break;
                    }
                    self.buf.drain(..len);
                    let (due, slice) = self.due.pop_front().expect("a request was on the wire");
                    lat.push((slice, now_ns().saturating_sub(due)));
                    *busy = false;
                    n += 1;
                }
                n
            }
            Proto::H2(s) => {
                let mut out = Vec::new();
                let before = lat.len();
                let now = now_ns();
                s.receive(&mut self.buf, &mut out, |(due, slice)| {
                    lat.push((slice, now.saturating_sub(due)))
                })?;
                self.write(&out)?;
                lat.len() - before
            }
        };
        self.send_due()?;
        Ok(n)
    }

    fn read_available(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match &mut self.tls {
                None => self.sock.read(&mut chunk),
                Some(t) => t.read_tls(&mut self.sock),
            };
            match n {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
                Ok(n) => match &mut self.tls {
                    None => self.buf.extend_from_slice(&chunk[..n]),
                    Some(t) => {
                        t.process_new_packets().map_err(io::Error::other)?;
                        t.reader().read_to_end(&mut self.buf).or_else(would_block)?;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(t) = self.tls.as_mut().filter(|t| t.wants_write()) {
            flush_tls(&mut self.sock, t)?; // handshake messages, key updates
        }
        Ok(())
    }
}

fn would_block(e: io::Error) -> io::Result<usize> {
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Writes `bytes` whole, through TLS when the connection has it.
fn send(sock: &mut TcpStream, tls: Option<&mut ClientConnection>, bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    match tls {
        None => write_all_nb(sock, bytes),
        Some(t) => {
            t.writer().write_all(bytes)?;
            flush_tls(sock, t)
        }
    }
}

fn flush_tls(sock: &mut TcpStream, t: &mut ClientConnection) -> io::Result<()> {
    while t.wants_write() {
        match t.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(sock)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_all_nb(sock: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match sock.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(sock)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A request is a few dozen bytes: a full send buffer means the peer stopped
/// reading, so waiting here (briefly, blocking the generator) is the honest
/// outcome.
fn wait_writable(sock: &TcpStream) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
    match rc {
        1 => Ok(()),
        0 => Err(io::Error::other("send buffer full for 5 s")),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Whole response length once the head is in: head + Content-Length.
fn response_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(io::Error::other)?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| io::Error::other(format!("response without Content-Length: {head}")))?;
    Ok(Some(head_end + 4 + len))
}
