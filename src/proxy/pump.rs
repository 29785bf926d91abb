//! Byte pumping between two TCP sockets, both ways, half-close aware.
//!
//! A direction waits for readiness first and only then borrows a pipe (for
//! splice(2): the bytes never enter user space) or, where splice is not
//! available, a buffer, both from per-thread pools, giving it back as soon as
//! the bytes are written: an idle connection (a watch waiting for its next
//! event) holds neither.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes moved per read; also the size of pooled buffers.
pub const BUF_SIZE: usize = 32 * 1024;
/// Buffers a thread keeps for reuse; more are freed.
const POOL_PER_THREAD: usize = 64;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A pooled buffer, returned to the current thread's pool on drop.
struct Buf(Option<Box<[u8]>>);

impl Buf {
    fn take() -> Self {
        let b = BUFFERS
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        Buf(Some(b))
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("present until drop")
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            BUFFERS.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_PER_THREAD {
                    p.push(b);
                }
            });
        }
    }
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed their sending half (FIN both ways).
    Closed,
    ClientError(io::Error),
    BackendError(io::Error),
    IdleTimeout,
    /// The backend's connections were closed (drain, `close_after_down`).
    BackendClosed,
    /// The shutdown grace ran out.
    Shutdown,
}

impl End {
    pub fn as_str(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientError(_) => "client_error",
            End::BackendError(_) => "backend_error",
            End::IdleTimeout => "idle_timeout",
            End::BackendClosed => "backend_closed",
            End::Shutdown => "shutdown",
        }
    }
}

/// What one relay did.
pub struct Relayed {
    pub to_backend: u64,
    pub to_client: u64,
    pub end: End,
}

/// Counters a relay updates as it goes.
pub struct Counters<'a> {
    pub to_backend: &'a IntCounter,
    pub to_client: &'a IntCounter,
}

/// How bytes move from one socket to the other. A `tcp` frontend copies
/// (`Buffer`) unless it sets `splice: true` (`Auto`): splice spends about
/// 30 % less CPU per GiB, but copying moved ~20 % more per second in
/// the loopback benchmarks (scenario a), where the reader, not the proxy,
/// is the bottleneck (docs/performance.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// Buffer for small messages, splice while a bulk transfer runs: a read
    /// that fills the buffer switches to splice, a splice that moves less than
    /// `SPLICE_MIN` switches back (splice costs two calls per message, which
    /// only pays off for large ones; HAProxy's `splice-auto` does the same).
    Auto,
    /// splice(2) through a pooled pipe (Linux); falls back to `Buffer` on a
    /// socket that refuses it.
    Splice,
    /// read(2) into a pooled buffer, write(2) out.
    Buffer,
}

/// Below this many bytes per splice, `Auto` goes back to the buffer.
const SPLICE_MIN: usize = 16 * 1024;

/// Relays bytes both ways until both directions finish, one side errors, the
/// idle timeout fires, or a stop token is cancelled.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    counters: Counters<'_>,
    idle_timeout: Option<Duration>,
    copy: Copy,
    backend_kill: &CancellationToken,
    hard_stop: &CancellationToken,
) -> Relayed {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte either way, for idle_timeout.
    let last = AtomicU64::new(0);
    let up_total = AtomicU64::new(0);
    let down_total = AtomicU64::new(0);
    let up = one_way(
        copy,
        client,
        backend,
        counters.to_backend,
        &up_total,
        &last,
        start,
    );
    let down = one_way(
        copy,
        backend,
        client,
        counters.to_client,
        &down_total,
        &last,
        start,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle = tokio::time::sleep(idle_timeout.unwrap_or(Duration::MAX / 4));
    // Made once, outside the loop: each new `cancelled()` future registers
    // a waiter (a lock on the token, shared by every connection) when first
    // polled and removes it when dropped.
    let (killed, stopped) = (backend_kill.cancelled(), hard_stop.cancelled());
    tokio::pin!(idle, killed, stopped);
    let end = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(Side::Read(e)) => break End::ClientError(e),
                Err(Side::Write(e)) => break End::BackendError(e),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(Side::Read(e)) => break End::BackendError(e),
                Err(Side::Write(e)) => break End::ClientError(e),
            },
            _ = &mut idle, if idle_timeout.is_some() => {
                let t = idle_timeout.expect("guarded");
                let since = Duration::from_millis(last.load(Relaxed));
                let quiet = start.elapsed().saturating_sub(since);
                if quiet >= t {
                    break End::IdleTimeout;
                }
                idle.as_mut().reset(start + since + t);
            }
            _ = &mut killed => break End::BackendClosed,
            _ = &mut stopped => break End::Shutdown,
        }
        if up_done && down_done {
            break End::Closed;
        }
    };
    Relayed {
        to_backend: up_total.load(Relaxed),
        to_client: down_total.load(Relaxed),
        end,
    }
}

/// Which socket an error came from.
enum Side {
    Read(io::Error),
    Write(io::Error),
}

/// One direction: move bytes when readable, and on EOF send FIN onward (the
/// other direction keeps flowing).
async fn one_way(
    method: Copy,
    from: &TcpStream,
    to: &TcpStream,
    counter: &IntCounter,
    total: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> Result<(), Side> {
    let adaptive = method == Copy::Auto;
    // Splicing right now? (`Auto` starts with the buffer.)
    let mut splicing = cfg!(target_os = "linux") && method == Copy::Splice;
    loop {
        from.readable().await.map_err(Side::Read)?;
        #[cfg(target_os = "linux")]
        let moved = if splicing {
            match splice::once(from, to).await {
                Err(splice::Error::Unsupported) => {
                    splicing = false;
                    continue;
                }
                Err(splice::Error::Read(e)) => return Err(Side::Read(e)),
                Err(splice::Error::Write(e)) => return Err(Side::Write(e)),
                Ok(n) => {
                    if adaptive && n.is_some_and(|n| n > 0 && n < SPLICE_MIN) {
                        splicing = false;
                    }
                    n
                }
            }
        } else {
            let n = copy_once(from, to).await?;
            if adaptive && n == Some(BUF_SIZE) {
                splicing = true;
            }
            n
        };
        #[cfg(not(target_os = "linux"))]
        let moved = {
            let _ = (adaptive, &mut splicing);
            copy_once(from, to).await?
        };
        match moved {
            None => continue, // spurious readiness
            Some(0) => {
                return match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    Err(e) => Err(Side::Write(e)),
                };
            }
            Some(n) => {
                counter.inc_by(n as u64);
                total.fetch_add(n as u64, Relaxed);
                last.store(start.elapsed().as_millis() as u64, Relaxed);
            }
        }
    }
}

/// One read into a pooled buffer and a full write: `Some(0)` at EOF, `None`
/// when the readiness was spurious.
async fn copy_once(from: &TcpStream, to: &TcpStream) -> Result<Option<usize>, Side> {
    let mut buf = Buf::take();
    let n = match read_draining(from, &mut buf) {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(None),
        Err(e) => return Err(Side::Read(e)),
    };
    write_all(to, &buf[..n]).await.map_err(Side::Write)?;
    Ok(Some(n))
}

/// A read that fills less than the buffer emptied the socket (TCP returns
/// all it holds), so, as tokio's own `poll_read` does with edge-triggered
/// pollers, the readiness is cleared: the next wait goes to the poller
/// instead of costing a `recv` that only says EAGAIN (one syscall of the
/// three each direction of a small request/response used to take).
/// `Some(0)` at EOF, `None` when nothing was readable.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    const SHORT_READ_DRAINS: bool = cfg!(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    ));
    let len = buf.len();
    let mut n = 0;
    let r = from.try_io(Interest::READABLE, || {
        n = from.try_read(buf)?;
        if SHORT_READ_DRAINS && 0 < n && n < len {
            // Reported as WouldBlock only so that try_io clears readiness
            // (for this event: one that arrived meanwhile stays set).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((n > 0).then_some(n)),
        Err(e) => Err(e),
    }
}

#[cfg(target_os = "linux")]
mod splice {
    //! splice(2) from socket to pipe to socket; the pipe is pooled per thread
    //! and only ever returned empty.

    use std::cell::RefCell;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Bytes moved per splice (the default pipe capacity).
    const CHUNK: usize = 64 * 1024;
    const POOL_PER_THREAD: usize = 64;

    pub enum Error {
        /// The socket does not support splice: use the copy loop.
        Unsupported,
        Read(io::Error),
        Write(io::Error),
    }

    struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    thread_local! {
        static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    impl Pipe {
        fn take() -> io::Result<Pipe> {
            if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
                return Ok(p);
            }
            let mut fds = [0 as RawFd; 2];
            // SAFETY: pipe2 writes two descriptors into the array we own.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned only here.
            Ok(unsafe {
                Pipe {
                    r: OwnedFd::from_raw_fd(fds[0]),
                    w: OwnedFd::from_raw_fd(fds[1]),
                }
            })
        }

        /// Back to the pool; only called when the pipe is empty.
        fn give_back(self) {
            PIPES.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_PER_THREAD {
                    p.push(self);
                }
            });
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain descriptors, null offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Moves what is readable now from `from` to `to`: `Some(0)` at EOF,
    /// `None` when nothing was readable after all.
    pub async fn once(from: &TcpStream, to: &TcpStream) -> Result<Option<usize>, Error> {
        let pipe = match Pipe::take() {
            Ok(p) => p,
            // Out of descriptors: let the copy loop carry this connection.
            Err(_) => return Err(Error::Unsupported),
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.w.as_raw_fd(), CHUNK)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                pipe.give_back();
                return Err(Error::Unsupported);
            }
            Err(e) => {
                pipe.give_back();
                return Err(Error::Read(e));
            }
        };
        let mut left = n;
        while left > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(k) => left -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await.map_err(Error::Write)?
                }
                // The pipe still holds bytes: it is dropped, not pooled.
                Err(e) => return Err(Error::Write(e)),
            }
        }
        pipe.give_back();
        Ok(Some(n))
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Whether `from` reports readable without waiting (one poll, no waker).
    fn ready_now(from: &TcpStream) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let f = std::pin::pin!(from.readable());
        f.poll(&mut cx).is_ready()
    }

    /// A read that fills the buffer keeps the socket readable (more may be
    /// there); a short one clears it, so the next wait costs no EAGAIN
    /// `recv`, and bytes that arrive afterwards wake it again, none lost.
    #[tokio::test]
    async fn a_short_read_clears_readiness_and_new_bytes_set_it_again() {
        let (mut src, from) = pair().await;
        let mut buf = vec![0u8; 1024];
        src.write_all(&[1u8; 1500]).await.unwrap();
        let deadline = Duration::from_secs(5);
        tokio::time::timeout(deadline, from.readable())
            .await
            .unwrap()
            .unwrap();
        // 1,500 bytes in a 1,024-byte buffer: full, so still readable.
        assert_eq!(read_draining(&from, &mut buf).unwrap(), Some(1024));
        assert!(
            ready_now(&from),
            "a full read must leave the socket readable"
        );
        assert_eq!(read_draining(&from, &mut buf).unwrap(), Some(476));
        assert!(!ready_now(&from), "a short read must clear readiness");
        src.write_all(&[2u8; 10]).await.unwrap();
        tokio::time::timeout(deadline, from.readable())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read_draining(&from, &mut buf).unwrap(), Some(10));
        assert_eq!(&buf[..10], &[2u8; 10]);
        drop(src);
        tokio::time::timeout(deadline, from.readable())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read_draining(&from, &mut buf).unwrap(), Some(0), "EOF");
    }

    /// 8 MiB through one direction with each method: bytes intact, FIN passed on.
    #[tokio::test]
    async fn both_methods_move_bytes_intact_and_pass_fin() {
        for method in [Copy::Auto, Copy::Splice, Copy::Buffer] {
            let (mut src, from) = pair().await;
            let (to, mut dst) = pair().await;
            let data: Vec<u8> = (0..8 * 1024 * 1024u32)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect();
            let expect = data.clone();
            let writer = tokio::spawn(async move {
                src.write_all(&data).await.unwrap();
                src.shutdown().await.unwrap();
                src
            });
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                dst.read_to_end(&mut got).await.unwrap();
                got
            });
            let counter = IntCounter::new("t", "t").unwrap();
            let (total, last) = (AtomicU64::new(0), AtomicU64::new(0));
            one_way(method, &from, &to, &counter, &total, &last, Instant::now())
                .await
                .unwrap_or_else(|_| panic!("{method:?} failed"));
            let got = reader.await.unwrap();
            writer.await.unwrap();
            assert_eq!(got.len(), expect.len(), "{method:?}");
            assert!(got == expect, "{method:?}: bytes differ");
            assert_eq!(counter.get(), expect.len() as u64);
            assert_eq!(total.load(Relaxed), expect.len() as u64);
        }
    }
}
