//! Gratuitous ARP for the VIP through an AF_PACKET socket, so neighbours and switches
//! move the address to this node at once instead of after their cache times out.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

const ETH_P_ARP: u16 = 0x0806;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
/// Gaps before each packet pair: a quick burst, then repeats for peers that missed it.
const SCHEDULE_MS: [u64; 6] = [0, 50, 100, 1000, 2000, 4000];

/// Sends the burst and repeats until done or `stop` fires. Failures are logged, never fatal:
/// the address is up either way and neighbours will re-resolve it eventually.
pub async fn announce(ifname: String, ifindex: u32, addr: Ipv4Addr, stop: CancellationToken) {
    let mut sent = 0;
    for gap in SCHEDULE_MS {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(gap)) => {}
        }
        match send_pair(&ifname, ifindex, addr) {
            Ok(()) => sent += 2,
            Err(e) => {
                tracing::warn!(interface = %ifname, vip = %addr, error = %e, "gratuitous ARP failed");
                return;
            }
        }
    }
    tracing::debug!(interface = %ifname, vip = %addr, packets = sent, "gratuitous ARP done");
}

/// One unsolicited request and one unsolicited reply: some stacks only heed one kind.
fn send_pair(ifname: &str, ifindex: u32, addr: Ipv4Addr) -> io::Result<()> {
    // SAFETY: plain socket(2); checked before wrapping.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mac = hardware_address(&sock, ifname)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut dest: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    dest.sll_family = libc::AF_PACKET as u16;
    dest.sll_protocol = ETH_P_ARP.to_be();
    dest.sll_ifindex = ifindex as i32;
    dest.sll_halen = 6;
    dest.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for op in [1u16, 2] {
        let pkt = packet(op, mac, addr);
        // SAFETY: `pkt` and `dest` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&dest as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The interface's MAC address (SIOCGIFHWADDR).
fn hardware_address(sock: &OwnedFd, ifname: &str) -> io::Result<[u8; 6]> {
    // struct ifreq: 16 bytes of name, then a sockaddr (2 bytes family + 14 data), padded.
    let mut ifr = [0u8; 40];
    let name = ifname.as_bytes();
    if name.len() >= 16 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    ifr[..name.len()].copy_from_slice(name);
    // SAFETY: `ifr` is large enough for struct ifreq and lives across the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFHWADDR as _, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&ifr[18..24]);
    Ok(mac)
}

/// An ARP packet announcing `addr` at `mac` (sender and target IP both the VIP).
fn packet(op: u16, mac: [u8; 6], addr: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&addr.octets());
    let target_mac = if op == 2 { [0xff; 6] } else { [0; 6] };
    p[18..24].copy_from_slice(&target_mac);
    p[24..28].copy_from_slice(&addr.octets());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_request_names_the_vip_twice() {
        let mac = [2, 0, 0, 0, 0, 9];
        let p = packet(1, mac, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(&p[6..8], &[0, 1]);
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[14..18], &p[24..28], "sender IP = target IP");
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&packet(2, mac, Ipv4Addr::LOCALHOST)[18..24], &[0xff; 6]);
    }
}
