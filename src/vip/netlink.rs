//! Adding and removing the VIP on an interface through rtnetlink (raw sockets via libc),
//! and the capability check done before `run` starts.
//!
//! Two requests are all apilb needs (RTM_NEWADDR, RTM_DELADDR, each acknowledged), so a
//! netlink crate would add more code than it saves.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::VipError;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RT_SCOPE_UNIVERSE: u8 = 0;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

/// The index of a network interface by name.
pub fn ifindex(name: &str) -> Result<u32, VipError> {
    let c = std::ffi::CString::new(name).map_err(|_| VipError::Interface {
        name: name.to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(VipError::Interface {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

/// Adds `addr/prefix` to the interface; already present counts as success.
pub fn add_address(ifindex: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), VipError> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    match request(RTM_NEWADDR, flags, ifindex, addr, prefix) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(VipError::Netlink {
            op: "add",
            addr,
            source,
        }),
    }
}

/// Removes `addr/prefix` from the interface. Returns whether it was there.
pub fn remove_address(ifindex: u32, addr: Ipv4Addr, prefix: u8) -> Result<bool, VipError> {
    match request(
        RTM_DELADDR,
        NLM_F_REQUEST | NLM_F_ACK,
        ifindex,
        addr,
        prefix,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(source) => Err(VipError::Netlink {
            op: "remove",
            addr,
            source,
        }),
    }
}

/// Sends one address request and waits for the kernel's acknowledgement.
fn request(kind: u16, flags: u16, ifindex: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked before being wrapped.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let msg = address_message(kind, flags, ifindex, addr, prefix);
    // SAFETY: `msg` is valid for `msg.len()` bytes; the kernel is the peer (no address).
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_ack(&buf[..n as usize])
}

/// nlmsghdr + ifaddrmsg + IFA_LOCAL + IFA_ADDRESS, as `ip addr add A/P dev D` sends.
fn address_message(kind: u16, flags: u16, ifindex: u32, addr: Ipv4Addr, prefix: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len: 16 + 8 + 2 * 8
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.extend_from_slice(&[libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    for attr in [IFA_LOCAL, IFA_ADDRESS] {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&attr.to_ne_bytes());
        m.extend_from_slice(&addr.octets());
    }
    m
}

/// The kernel answers with NLMSG_ERROR carrying 0 (success) or a negative errno.
fn parse_ack(buf: &[u8]) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    if buf.len() < 20 {
        return Err(bad());
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind != NLMSG_ERROR {
        return Err(bad());
    }
    let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    match code {
        0 => Ok(()),
        c => Err(io::Error::from_raw_os_error(-c)),
    }
}

/// Fails unless this process has CAP_NET_ADMIN (addresses) and CAP_NET_RAW (ARP).
pub fn check_capabilities() -> Result<(), VipError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(VipError::Capabilities)?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_NET_RAW, "CAP_NET_RAW"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(VipError::MissingCapabilities(missing.join(" and ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_matches_the_kernel_layout() {
        let m = address_message(RTM_NEWADDR, 5, 7, Ipv4Addr::new(10, 0, 0, 100), 24);
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(m[17], 24, "prefix length");
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(&m[28..32], &[10, 0, 0, 100]);
        assert_eq!(&m[36..40], &[10, 0, 0, 100]);
    }

    #[test]
    fn ack_codes_become_errors() {
        let mut a = vec![0u8; 36];
        a[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(parse_ack(&a).is_ok());
        a[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(
            parse_ack(&a).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert!(parse_ack(&a[..10]).is_err());
    }
}
