//! The loop check: is a pool server one of apilb's own listening addresses?
//!
//! A pool that names apilb itself fans one client connection out until every
//! connect attempt and file descriptor is used. `validate()` refuses such a
//! server; servers that arrive by other means (discovery) are checked with the
//! same pure function when they arrive.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether connecting to `server` would reach one of `listens` (apilb's
/// frontend and admin addresses). A wildcard listen (`0.0.0.0:8443`, and
/// `[::]:8443`, which also accepts IPv4 on Linux) covers every loopback address
/// and every address in `local_ips` on its port; connecting to an unspecified
/// address reaches the local host. Listens on port 0 are skipped (the kernel
/// picks a free port).
pub fn is_self_address(server: SocketAddr, listens: &[SocketAddr], local_ips: &[IpAddr]) -> bool {
    let ip = canonical(server.ip());
    let is_local = |a: IpAddr| a.is_loopback() || a.is_unspecified() || local_ips.contains(&a);
    listens.iter().any(|l| {
        if l.port() == 0 || l.port() != server.port() {
            return false;
        }
        let lip = canonical(l.ip());
        if lip == ip {
            return true;
        }
        if lip.is_unspecified() {
            // [::] is dual-stack by default; 0.0.0.0 takes IPv4 only.
            let family = l.is_ipv6() || ip.is_ipv4();
            return family && is_local(ip);
        }
        // A connect to 0.0.0.0 or [::] goes to the local host.
        ip.is_unspecified() && is_local(lip)
    })
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Every address of the host's interfaces (getifaddrs); empty if it fails.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; each entry's
    // address is read according to its family before the list is freed.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn wildcards_cover_local_addresses_on_their_port() {
        let local: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let listens = [a("0.0.0.0:8443"), a("127.0.0.1:8404"), a("[::]:9443")];
        for (server, want) in [
            ("127.0.0.1:8443", true),
            ("127.0.0.2:8443", true),
            ("10.0.0.5:8443", true),
            ("0.0.0.0:8443", true),
            ("10.0.0.6:8443", false),
            ("127.0.0.1:8444", false),
            ("127.0.0.1:8404", true),
            ("10.0.0.5:8404", false),
            ("[::1]:9443", true),
            ("[fd00::5]:9443", true),
            ("127.0.0.1:9443", true),
            ("[::ffff:127.0.0.1]:8443", true),
            ("[::1]:8443", false),
            ("[fd00::6]:9443", false),
        ] {
            assert_eq!(
                is_self_address(a(server), &listens, &local),
                want,
                "{server}"
            );
        }
        assert!(!is_self_address(
            a("127.0.0.1:5"),
            &[a("127.0.0.1:0")],
            &local
        ));
    }

    #[test]
    fn the_host_has_a_loopback_address() {
        assert!(local_addresses().iter().any(|ip| ip.is_loopback()));
    }
}
