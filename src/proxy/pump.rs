//! Byte pumping between two TCP sockets, both ways, half-close aware.
//!
//! A direction waits for readiness first and only then borrows a buffer from
//! a per-thread pool, giving it back as soon as the bytes are written: an idle
//! connection (a watch waiting for its next event) holds no buffer at all.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::IntCounter;
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

/// Relays bytes both ways until both directions finish, one side errors, the
/// idle timeout fires, or a stop token is cancelled.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    counters: Counters<'_>,
    idle_timeout: Option<Duration>,
    backend_kill: &CancellationToken,
    hard_stop: &CancellationToken,
) -> Relayed {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte either way, for idle_timeout.
    let last = AtomicU64::new(0);
    let up_total = AtomicU64::new(0);
    let down_total = AtomicU64::new(0);
    let up = one_way(
        client,
        backend,
        counters.to_backend,
        &up_total,
        &last,
        start,
    );
    let down = one_way(
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
    tokio::pin!(idle);
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
            _ = backend_kill.cancelled() => break End::BackendClosed,
            _ = hard_stop.cancelled() => break End::Shutdown,
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

/// One direction: read when readable, write everything, and on EOF send FIN
/// onward (the other direction keeps flowing).
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    counter: &IntCounter,
    total: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> Result<(), Side> {
    loop {
        from.readable().await.map_err(Side::Read)?;
        let mut buf = Buf::take();
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                drop(buf);
                match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                    Err(e) => return Err(Side::Write(e)),
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Side::Read(e)),
        };
        write_all(to, &buf[..n]).await.map_err(Side::Write)?;
        drop(buf);
        counter.inc_by(n as u64);
        total.fetch_add(n as u64, Relaxed);
        last.store(start.elapsed().as_millis() as u64, Relaxed);
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
