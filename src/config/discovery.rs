//! `pools[].discovery`: where a pool learns its members from the cluster
//! (issue 13). Raw serde types as written, and their check into
//! `KubernetesDiscovery`.

use std::path::PathBuf;

use serde::Deserialize;

use super::FieldError;

/// The namespace of the Service whose EndpointSlices list the apiservers.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The Service every apiserver publishes itself under.
pub const DEFAULT_SERVICE: &str = "kubernetes";
/// The EndpointSlice port the servers are taken at.
pub const DEFAULT_PORT_NAME: &str = "https";
/// The name discovered servers' certificates are checked against when the
/// pool's `tls.server_name` is unset: apiserver certificates carry it.
pub const DEFAULT_SERVER_NAME: &str = "kubernetes";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    pub kubeconfig: Option<String>,
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub cache_file: Option<String>,
}

/// Where a pool's servers came from (`/status` shows it per backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Members {
    /// `servers` as written in the file.
    #[default]
    Seeds,
    /// The EndpointSlices, as last listed or watched.
    Discovery,
    /// `cache_file`, read at start before discovery answered.
    Cache,
}

impl Members {
    pub fn as_str(self) -> &'static str {
        match self {
            Members::Seeds => "seeds",
            Members::Discovery => "discovery",
            Members::Cache => "cache",
        }
    }
}

/// A pool's members from the EndpointSlices of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesDiscovery {
    /// Credentials; `None` means the pod's service account.
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    /// The last known set is kept here and read at start.
    pub cache_file: Option<PathBuf>,
}

/// Checks `pools[i].discovery`; pushes problems with their field path.
pub(super) fn check(
    base: &str,
    raw: &RawDiscovery,
    errs: &mut Vec<FieldError>,
) -> Option<KubernetesDiscovery> {
    let base = format!("{base}.discovery");
    let mut push = |path: String, message: String| errs.push(FieldError { path, message });
    let Some(k) = &raw.kubernetes else {
        push(format!("{base}.kubernetes"), "is required".into());
        return None;
    };
    let base = format!("{base}.kubernetes");
    let mut name = |field: &str, value: &Option<String>, default: &str| {
        let v = value.as_deref().unwrap_or(default).trim().to_string();
        if !is_dns_label(&v) {
            push(
                format!("{base}.{field}"),
                format!("{v:?} is not a DNS label (a-z, 0-9 and '-', at most 63)"),
            );
        }
        v
    };
    let namespace = name("namespace", &k.namespace, DEFAULT_NAMESPACE);
    let service = name("service", &k.service, DEFAULT_SERVICE);
    let port_name = name("port_name", &k.port_name, DEFAULT_PORT_NAME);
    let kubeconfig = k.kubeconfig.as_ref().map(PathBuf::from);
    if let Some(path) = &kubeconfig {
        if let Err(e) = kube::config::Kubeconfig::read_from(path) {
            push(
                format!("{base}.kubeconfig"),
                format!("cannot read {}: {e}", path.display()),
            );
        }
    }
    let cache_file = k.cache_file.as_ref().map(PathBuf::from);
    if let Some(dir) = cache_file.as_ref().and_then(|c| c.parent()) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            push(
                format!("{base}.cache_file"),
                format!("directory {} does not exist", dir.display()),
            );
        }
    }
    Some(KubernetesDiscovery {
        kubeconfig,
        namespace,
        service,
        port_name,
        cache_file,
    })
}

/// RFC 1123 label: what namespace, Service and port names must be.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml: &str) -> (Option<KubernetesDiscovery>, Vec<String>) {
        let raw: RawDiscovery = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        let d = check("pools[0]", &raw, &mut errs);
        (d, errs.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn defaults_name_the_kubernetes_service() {
        let (d, errs) = run("kubernetes: {}");
        assert!(errs.is_empty(), "{errs:?}");
        let d = d.unwrap();
        assert_eq!(d.kubeconfig, None);
        assert_eq!(
            (
                d.namespace.as_str(),
                d.service.as_str(),
                d.port_name.as_str()
            ),
            ("default", "kubernetes", "https")
        );
        assert_eq!(d.cache_file, None);
    }

    #[test]
    fn bad_fields_carry_their_paths() {
        let (_, errs) = run(
            "kubernetes: {kubeconfig: /nonexistent/kc, service: Bad_Name, cache_file: /nonexistent/dir/c.json}",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("pools[0].discovery.kubernetes.service: "),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with(
                "pools[0].discovery.kubernetes.kubeconfig: cannot read /nonexistent/kc"
            ),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("pools[0].discovery.kubernetes.cache_file: "),
            "{errs:?}"
        );
    }

    #[test]
    fn a_pool_carries_its_discovery_and_errors_name_the_pool() {
        let yaml = |d: &str| {
            format!(
                "frontends: [{{name: f, listen: '127.0.0.1:0', pool: p}}]\n\
                 pools: [{{name: p, servers: ['127.0.0.1:6443'], discovery: {d}}}]\n"
            )
        };
        let cfg = crate::config::parse(&yaml("{kubernetes: {cache_file: c.json}}")).unwrap();
        let d = cfg.pools[0].discovery.as_ref().unwrap();
        assert_eq!(
            d.cache_file.as_deref(),
            Some(std::path::Path::new("c.json"))
        );
        let err = crate::config::parse(&yaml("{kubernetes: {kubeconfig: /nonexistent}}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("pools[0].discovery.kubernetes.kubeconfig: cannot read /nonexistent"),
            "{err}"
        );
    }

    #[test]
    fn kubernetes_section_is_required_and_keys_are_checked() {
        let (d, errs) = run("{}");
        assert!(d.is_none());
        assert_eq!(errs, ["pools[0].discovery.kubernetes: is required"]);
        assert!(serde_yaml::from_str::<RawDiscovery>("kubernetes: {namespce: x}").is_err());
    }
}
