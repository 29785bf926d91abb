//! Open-loop HTTP/1.1 or HTTP/2 load: requests fall due on a fixed
//! schedule, spread round-robin over keep-alive connections, and latency
//! counts from when a request was due, so a slow answer is charged for the
//! requests it held back (no coordinated omission). Over HTTP/2 a
//! connection carries up to a set number of streams at once (h2load's
//! `-m`); over HTTP/1.1, one request at a time. The same client also runs a
//! closed loop ([`Pace::Closed`]): every stream asks again once answered,
//! a request due the moment its stream freed.
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
    /// When requests fall due.
    pub pace: Pace,
    /// Seconds of load each target receives.
    pub secs: f64,
    /// Targets take turns holding the load for this long each.
    pub slice: Duration,
    /// HTTP/2 (over TLS with ALPN h2) with at most this many streams in
    /// flight per connection; `None` is HTTP/1.1, one request at a time.
    pub h2_streams: Option<usize>,
}

/// When requests fall due.
#[derive(Clone, Copy)]
pub enum Pace {
    /// At this many requests per second while a target has the load,
    /// whatever the answers do (open loop).
    Rate(f64),
    /// As soon as a stream (an HTTP/1.1 connection) is free: every one the
    /// target has stays busy while it holds the load, as in h2load or wrk
    /// (closed loop). A request is due the moment its stream freed, so the
    /// time it waits inside this client counts too, which h2load leaves
    /// out: it stamps a request when it serializes its HEADERS frame.
    Closed,
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
    /// Responses per second of the time this target held the load.
    pub per_sec: f64,
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
    let mut r = Run::open(targets, path, load)?;
    match load.pace {
        Pace::Rate(rate) => r.at_rate(rate, load)?,
        Pace::Closed => r.closed(load)?,
    }
    let order = r.order;
    Ok(r.lat
        .into_iter()
        .map(|l| summarize(l, load.secs, |slice| order.before(slice) == Some(quiet)))
        .collect())
}

/// One run's connections (`per_target` to each target, in target order),
/// its timer, the slices' order and the latencies so far, per target.
struct Run {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    per_target: usize,
    timer: Timer,
    order: Order,
    lat: Vec<Vec<(u64, u64)>>,
}

impl Run {
    fn open(targets: &[Target], path: &str, load: &Load) -> io::Result<Self> {
        let poll = Poll::new()?;
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
        Ok(Run {
            poll,
            events: Events::with_capacity(1024),
            conns,
            per_target: load.conns,
            timer,
            order: Order::new(targets.len()),
            lat: targets.iter().map(|_| Vec::new()).collect(),
        })
    }

    /// Waits (up to a second) for the timer or for connections to become
    /// readable, and reads them: `completed` gets each connection that
    /// finished responses, with how many and when they were read.
    fn turn(&mut self, completed: &mut Vec<(usize, usize, u64)>) -> io::Result<()> {
        self.poll
            .poll(&mut self.events, Some(Duration::from_secs(1)))?;
        for ev in self.events.iter() {
            if ev.token() == TIMER {
                self.timer.drain();
                continue;
            }
            let c = &mut self.conns[ev.token().0];
            let n = c.on_ready(&mut self.lat[c.target])?;
            if n > 0 {
                completed.push((ev.token().0, n, now_ns()));
            }
        }
        Ok(())
    }

    /// Open loop: requests fall due every `1 / rate` s, round-robin over
    /// the connections of the target holding the slice.
    fn at_rate(&mut self, rate: f64, load: &Load) -> io::Result<()> {
        let n = self.lat.len() as u64;
        let step = (1e9 / rate) as u64;
        let per_slice = (load.slice.as_nanos() as u64 / step).max(1);
        let total = (load.secs * rate) as u64 * n;
        let begin = now_ns() + 20_000_000;
        let give_up = begin + total * step + 10_000_000_000;
        let mut sent = vec![0u64; n as usize];
        let (mut done, mut completed) = (0usize, Vec::new());
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
                let t = self.order.target(slice);
                let c = &mut self.conns
                    [t * self.per_target + (sent[t] % self.per_target as u64) as usize];
                sent[t] += 1;
                c.due.push_back((begin + next * step, slice));
                c.send_due()?;
                next += 1;
            }
            if next < total {
                self.timer.arm(begin + next * step)?;
            }
            self.turn(&mut completed)?;
            done += completed.drain(..).map(|(_, k, _)| k).sum::<usize>();
        }
        Ok(())
    }

    /// Closed loop: while a target holds the slice, each of its connections
    /// keeps its window (streams, or one HTTP/1.1 request) full, a request
    /// due the moment its stream freed; the other targets' requests in
    /// flight finish without being replaced.
    fn closed(&mut self, load: &Load) -> io::Result<()> {
        let slice_ns = load.slice.as_nanos() as u64;
        let slices = ((load.secs * 1e9) as u64 / slice_ns).max(1) * self.lat.len() as u64;
        let window = load.h2_streams.unwrap_or(1);
        let begin = now_ns() + 20_000_000;
        let end = begin + slices * slice_ns;
        let mut completed = Vec::new();
        let mut held = None; // the slice whose target has been topped up
        loop {
            let now = now_ns();
            if now >= end && self.conns.iter().all(|c| c.outstanding() == 0) {
                return Ok(());
            }
            if now > end + 10_000_000_000 {
                return Err(io::Error::other(
                    "responses still missing 10 s after the run",
                ));
            }
            let slice = (now >= begin && now < end).then(|| (now - begin) / slice_ns);
            if let Some(s) = slice.filter(|&s| held != Some(s)) {
                held = Some(s);
                let t = self.order.target(s);
                for c in (0..self.per_target).map(|i| t * self.per_target + i) {
                    self.conns[c].top_up(window, (now, s))?;
                }
            }
            if now < end {
                self.timer
                    .arm(begin + (slice.map_or(0, |s| s + 1)) * slice_ns)?;
            }
            self.turn(&mut completed)?;
            // A freed stream's next request is due when its answer was read,
            // not after the rest of the turn.
            for (c, _, at) in completed.drain(..) {
                if at < begin || at >= end {
                    continue;
                }
                let s = (at - begin) / slice_ns;
                if self.conns[c].target == self.order.target(s) {
                    self.conns[c].top_up(window, (at, s))?;
                }
            }
        }
    }
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
fn summarize(mut lat: Vec<(u64, u64)>, secs: f64, after_quiet: impl Fn(u64) -> bool) -> Latency {
    let per_sec = lat.len() as f64 / secs;
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
        per_sec,
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

    /// Requests due, on the wire or in flight, not yet answered.
    fn outstanding(&self) -> usize {
        match &self.proto {
            Proto::H1 { .. } => self.due.len(),
            Proto::H2(s) => self.due.len() + s.in_flight(),
        }
    }

    /// Makes requests due now until `window` are outstanding, and sends
    /// them.
    fn top_up(&mut self, window: usize, due: (u64, u64)) -> io::Result<()> {
        for _ in self.outstanding()..window {
            self.due.push_back(due);
        }
        self.send_due()
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
