//! The optional `vip:` section: raw serde types, the checked `VipConfig`, and its validation.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::validate::Errors;

/// Defaults of Kubernetes' own leader election (kube-controller-manager, kube-scheduler).
pub const DEFAULT_VIP_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_VIP_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_VIP_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Prefix of the election key when `vip.etcd.key` is not set; the address follows.
pub const DEFAULT_VIP_KEY_PREFIX: &str = "/apilb/vip/";
/// etcd leases are whole seconds and etcd raises shorter TTLs to about 1.5 s.
pub const MIN_VIP_LEASE_DURATION: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    pub address: Option<String>,
    pub interface: Option<String>,
    pub identity: Option<String>,
    pub lease_duration: Option<String>,
    pub renew_deadline: Option<String>,
    pub retry_period: Option<String>,
    pub require_ready: Option<bool>,
    pub etcd: Option<RawVipEtcd>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVipEtcd {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub key: Option<String>,
}

/// A checked `vip:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct VipConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub interface: String,
    /// Written into the election key: who holds the VIP (`/status` shows it).
    pub identity: String,
    /// TTL of the etcd lease (whole seconds).
    pub lease_duration: Duration,
    /// The holder drops the VIP when no renewal succeeded for this long.
    pub renew_deadline: Duration,
    /// Keepalive interval of the holder; candidates' retry interval.
    pub retry_period: Duration,
    /// Campaign and hold only while a pool has an up backend.
    pub require_ready: bool,
    pub etcd: VipEtcd,
}

impl VipConfig {
    /// `10.0.0.100/24`, as written in the file.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VipEtcd {
    pub endpoints: Vec<EtcdEndpoint>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The election key.
    pub key: String,
}

/// One etcd client URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Checks `vip:`; problems go to `errs` with their field path.
pub(super) fn validate(errs: &mut Errors, v: &RawVip) -> Option<VipConfig> {
    let cidr = errs
        .required("vip.address".into(), &v.address)
        .and_then(|a| address(a).map_err(|m| errs.push("vip.address", m)).ok());
    let interface = errs.required("vip.interface".into(), &v.interface);
    if let Some(i) = interface {
        if i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
            errs.push("vip.interface", format!("invalid interface name {i:?}"));
        }
    }
    let identity = match v.identity.as_deref().map(str::trim) {
        Some("") => {
            errs.push("vip.identity", "must not be empty");
            String::new()
        }
        Some(id) => id.to_string(),
        None => hostname(),
    };
    let (lease_duration, renew_deadline, retry_period) = durations(errs, v);
    let etcd = match &v.etcd {
        Some(e) => etcd(errs, e, cidr.map(|c| c.0)),
        None => {
            errs.push("vip.etcd", "is required (endpoints and TLS files)");
            None
        }
    };
    let (address, prefix_len) = cidr?;
    Some(VipConfig {
        address,
        prefix_len,
        interface: interface?.to_string(),
        identity,
        lease_duration,
        renew_deadline,
        retry_period,
        require_ready: v.require_ready.unwrap_or(true),
        etcd: etcd?,
    })
}

fn durations(errs: &mut Errors, v: &RawVip) -> (Duration, Duration, Duration) {
    let lease = errs.duration(
        "vip.lease_duration".into(),
        &v.lease_duration,
        DEFAULT_VIP_LEASE_DURATION,
    );
    let renew = errs.duration(
        "vip.renew_deadline".into(),
        &v.renew_deadline,
        DEFAULT_VIP_RENEW_DEADLINE,
    );
    let retry = errs.duration(
        "vip.retry_period".into(),
        &v.retry_period,
        DEFAULT_VIP_RETRY_PERIOD,
    );
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if lease.subsec_nanos() != 0 || lease < MIN_VIP_LEASE_DURATION {
        errs.push(
            "vip.lease_duration",
            format!(
                "must be whole seconds and at least {} (etcd lease TTLs), got {}",
                show(MIN_VIP_LEASE_DURATION),
                show(lease)
            ),
        );
    }
    if renew >= lease {
        errs.push(
            "vip.renew_deadline",
            format!(
                "must be shorter than lease_duration ({} >= {}): the holder must drop the VIP before its lease can expire",
                show(renew),
                show(lease)
            ),
        );
    }
    if retry >= renew {
        errs.push(
            "vip.retry_period",
            format!(
                "must be shorter than renew_deadline ({} >= {})",
                show(retry),
                show(renew)
            ),
        );
    }
    (lease, renew, retry)
}

/// `A.B.C.D/N`; IPv6 is refused (it would need unsolicited neighbour advertisements).
fn address(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} needs a prefix length: write e.g. 10.0.0.100/24"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    let IpAddr::V4(ip) = ip else {
        return Err("IPv6 VIPs are not supported (apilb announces the VIP with ARP, which is IPv4 only); use an IPv4 address".into());
    };
    let prefix: u8 = match prefix.parse() {
        Ok(p) if (1..=32).contains(&p) => p,
        _ => return Err(format!("prefix length {prefix:?} is not 1-32")),
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(format!("{ip} cannot be a VIP"));
    }
    Ok((ip, prefix))
}

fn etcd(errs: &mut Errors, e: &RawVipEtcd, addr: Option<Ipv4Addr>) -> Option<VipEtcd> {
    if e.endpoints.is_empty() {
        errs.push("vip.etcd.endpoints", "at least one endpoint is required");
    }
    let mut endpoints = Vec::new();
    for (i, text) in e.endpoints.iter().enumerate() {
        match endpoint(text) {
            Ok(ep) => endpoints.push(ep),
            Err(m) => errs.push(format!("vip.etcd.endpoints[{i}]"), m),
        }
    }
    let any_tls = endpoints.iter().any(|ep| ep.tls);
    let (cert_file, key_file) = errs.pair(
        "vip.etcd",
        ("cert_file", &e.cert_file),
        ("key_file", &e.key_file),
    );
    let ca_file = e
        .ca_file
        .as_ref()
        .and_then(|_| errs.cert_file("vip.etcd.ca_file".into(), &e.ca_file));
    if any_tls {
        for (name, set) in [
            ("ca_file", e.ca_file.is_some()),
            ("cert_file", e.cert_file.is_some()),
            ("key_file", e.key_file.is_some()),
        ] {
            if !set {
                errs.push(
                    format!("vip.etcd.{name}"),
                    "is required for https:// endpoints (etcd verifies client certificates)",
                );
            }
        }
    } else if e.ca_file.is_some() || e.cert_file.is_some() || e.key_file.is_some() {
        errs.push(
            "vip.etcd",
            "ca_file, cert_file and key_file are only used with https:// endpoints",
        );
    }
    let key = match (&e.key, addr) {
        (Some(k), _) if k.trim().is_empty() => {
            errs.push("vip.etcd.key", "must not be empty");
            return None;
        }
        (Some(k), _) => k.trim().to_string(),
        (None, Some(a)) => format!("{DEFAULT_VIP_KEY_PREFIX}{a}"),
        (None, None) => return None,
    };
    Some(VipEtcd {
        endpoints,
        ca_file,
        cert_file,
        key_file,
        key,
    })
}

/// `http://host:port` or `https://host:port`.
fn endpoint(text: &str) -> Result<EtcdEndpoint, String> {
    let t = text.trim();
    let (tls, rest) = if let Some(r) = t.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = t.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "invalid endpoint {text:?}: write https://host:port (or http://host:port without TLS)"
        ));
    };
    let server = super::validate::server(rest.trim_end_matches('/'))?;
    Ok(EtcdEndpoint {
        tls,
        host: server.host,
        port: server.port,
    })
}

/// This machine's host name (the default identity).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "apilb".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            address("10.0.0.100/24").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 100), 24)
        );
        assert!(address("10.0.0.100").unwrap_err().contains("prefix"));
        assert!(address("fd00::1/64").unwrap_err().contains("IPv6"));
        assert!(address("10.0.0.1/33").is_err());
        assert!(address("127.0.0.1/8").is_err());
    }

    #[test]
    fn endpoints() {
        let e = endpoint("https://127.0.0.1:2379").unwrap();
        assert!(e.tls);
        assert_eq!(e.to_string(), "https://127.0.0.1:2379");
        assert!(!endpoint("http://127.0.0.1:2379/").unwrap().tls);
        assert!(endpoint("127.0.0.1:2379").is_err());
        assert!(endpoint("https://127.0.0.1").is_err());
    }
}
