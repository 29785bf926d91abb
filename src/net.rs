//! Sockets without policy: connect with a timeout, TCP tuning, binding
//! listeners, and telling a backend's fault from one of our own.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Keepalive on both sockets: a peer that vanished (power loss, partition) is
/// found within about two minutes instead of the kernel's two hours.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const KEEPALIVE_RETRIES: u32 = 4;
/// Listen backlog for frontends: a reconnect storm after an apiserver restart
/// must not overflow it.
pub const LISTEN_BACKLOG: i32 = 4096;

/// TCP_NODELAY and keepalive on a connected stream.
pub fn tune(sock: &TcpStream) {
    tune_socket(&SockRef::from(sock));
}

/// TCP_NODELAY and keepalive; on a listener, inherited by accepted sockets.
pub fn tune_socket(s: &socket2::Socket) {
    let _ = s.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = s.set_tcp_keepalive(&ka);
}

/// A listening socket and the address it really got (port 0 resolved).
pub struct Bound {
    pub listener: std::net::TcpListener,
    pub bound: SocketAddr,
}

impl Bound {
    /// Wraps a listener that is already bound (inherited or handed over).
    pub fn from_listener(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        Ok(Bound { listener, bound })
    }
}

/// Binds a tuned, non-blocking listener with `LISTEN_BACKLOG`.
pub fn bind(addr: SocketAddr) -> io::Result<Bound> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY and keepalive from the listener
    // (Linux): no per-connection setsockopt on the accept path.
    tune_socket(&sock);
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Bound::from_listener(sock.into())
}

/// Why a connect (or an upstream handshake) failed, as far as health cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The backend (or the path to it) did it: counts as a failed check.
    Backend,
    /// Our own side did it; never marks a backend down. The reason is a
    /// metric label.
    Local(&'static str),
}

/// Local-fault reasons (metric label values of `apilb_local_errors_total`).
pub mod local {
    pub const FD_LIMIT: &str = "fd_limit";
    pub const ADDR_UNAVAILABLE: &str = "addr_unavailable";
    pub const NO_BUFFERS: &str = "no_buffers";
    pub const TLS_VERIFY: &str = "tls_verify";
    pub const OTHER: &str = "other";
    pub const ALL: [&str; 5] = [FD_LIMIT, ADDR_UNAVAILABLE, NO_BUFFERS, TLS_VERIFY, OTHER];
}

/// Classifies a connect or handshake error. Backend faults are what the
/// backend or the network did: refused, timed out, unreachable, reset or
/// closed, a TLS alert or protocol violation from the peer. Running out of
/// descriptors, ports or buffers, and failing to verify the peer's
/// certificate (the active probe judges certificates), are ours.
pub fn classify(e: &io::Error) -> Fault {
    use io::ErrorKind as K;
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return classify_tls(tls);
    }
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => return Fault::Local(local::FD_LIMIT),
        Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => {
            return Fault::Local(local::ADDR_UNAVAILABLE)
        }
        Some(libc::ENOBUFS | libc::ENOMEM) => return Fault::Local(local::NO_BUFFERS),
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
            return Fault::Backend
        }
        _ => {}
    }
    match e.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::TimedOut
        | K::UnexpectedEof
        | K::BrokenPipe
        | K::HostUnreachable
        | K::NetworkUnreachable => Fault::Backend,
        _ => Fault::Local(local::OTHER),
    }
}

/// A TLS error during an upstream handshake: certificate verification is
/// ours to judge (the probe does it with `health.tls`); anything the peer
/// sent or broke is the backend's.
pub fn classify_tls(e: &rustls::Error) -> Fault {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType => Fault::Local(local::TLS_VERIFY),
        rustls::Error::General(_) | rustls::Error::Other(_) => Fault::Local(local::OTHER),
        _ => Fault::Backend,
    }
}

/// Connects within `timeout`; the error says what happened in one line.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            tune(&s);
            Ok(s)
        }
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(io::Error),
    #[error("connect: timeout after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl ConnectError {
    pub fn fault(&self) -> Fault {
        match self {
            ConnectError::Io(e) => classify(e),
            ConnectError::Timeout(_) => Fault::Backend,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_faults_are_not_the_backends() {
        for (errno, want) in [
            (libc::EMFILE, Fault::Local(local::FD_LIMIT)),
            (libc::ENFILE, Fault::Local(local::FD_LIMIT)),
            (libc::EADDRNOTAVAIL, Fault::Local(local::ADDR_UNAVAILABLE)),
            (libc::ENOBUFS, Fault::Local(local::NO_BUFFERS)),
            (libc::ECONNREFUSED, Fault::Backend),
            (libc::EHOSTUNREACH, Fault::Backend),
            (libc::ENETUNREACH, Fault::Backend),
            (libc::ECONNRESET, Fault::Backend),
        ] {
            assert_eq!(
                classify(&io::Error::from_raw_os_error(errno)),
                want,
                "{errno}"
            );
        }
        let bad_cert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(classify(&bad_cert), Fault::Local(local::TLS_VERIFY));
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        assert_eq!(classify(&alert), Fault::Backend);
        assert_eq!(
            ConnectError::Timeout(Duration::from_secs(1)).fault(),
            Fault::Backend
        );
    }

    /// The accept path relies on Linux copying these options from the
    /// listener to every accepted socket.
    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let b = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let _c = std::net::TcpStream::connect(b.bound).unwrap();
        let acc = loop {
            match b.listener.accept() {
                Ok((s, _)) => break socket2::Socket::from(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(acc.nodelay().unwrap());
        assert!(acc.keepalive().unwrap());
        assert_eq!(acc.keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(acc.keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(acc.keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
    }
}
