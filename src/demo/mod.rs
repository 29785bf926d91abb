//! `apilb demo`: three fake apiservers behind a real apilb on 127.0.0.1, a CA
//! and a kubeconfig in a temp dir, and the commands to try. No file, no root.

pub mod fake;
pub mod fake_endpoints;
mod h2strict;
pub mod pki;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::config;
use crate::reload::ReloadError;
use crate::runtime;

pub use fake::{FakeApiserver, FakeError, FakeOptions};
pub use fake_endpoints::{EndpointStore, FakeEndpoint};
pub use pki::{Ca, Leaf};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error(transparent)]
    Fake(#[from] FakeError),
    #[error("demo config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("demo: {0}")]
    Start(#[from] ReloadError),
}

/// Writes a kubeconfig for `server` that trusts `ca` and sends a bearer token.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> std::io::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: apilb\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: demo\n  user:\n    token: {token}\ncontexts:\n- name: apilb\n  context:\n    cluster: apilb\n    user: demo\n\
         current-context: apilb\n",
        ca = ca.display()
    );
    std::fs::write(path, text)
}

/// Runs the demo until `shutdown` completes, then stops everything.
pub async fn run(shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    let dir = tempfile::Builder::new().prefix("apilb-demo-").tempdir()?;
    let ca = Ca::new("apilb-demo-ca")?;
    let ca_file = ca.write(dir.path(), "ca")?;
    let serving = ca.server(&["127.0.0.1", "localhost", "kubernetes"])?;
    let mut fakes = Vec::new();
    for i in 1..=3 {
        fakes.push(
            FakeApiserver::start(FakeOptions {
                watch_interval: Duration::from_secs(1),
                ..FakeOptions::new(
                    &format!("apiserver-{i}"),
                    &serving.cert_pem,
                    &serving.key_pem,
                )
            })
            .await?,
        );
    }
    let servers: Vec<String> = fakes
        .iter()
        .map(|f| format!("      - {}", f.addr()))
        .collect();
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 2s\nfrontends:\n  - name: kube-apiserver\n    listen: 127.0.0.1:0\n    pool: apiservers\n\
         pools:\n  - name: apiservers\n    servers:\n{}\n    health:\n      check: https\n      path: /readyz\n      interval: 1s\n      timeout: 500ms\n      rise: 2\n      fall: 2\n      tls:\n        ca_file: {}\n        server_name: kubernetes\n",
        servers.join("\n"),
        ca_file.display()
    );
    let cfg = config::parse(&yaml)?;
    let handle = runtime::start(cfg).await?;
    let lb = handle
        .frontend_addr("kube-apiserver")
        .expect("frontend is listening");
    let admin = handle.admin_addr().expect("admin is listening");
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &format!("https://{lb}"),
        &ca_file,
        "demo-token",
    )?;
    let (ca_s, kc) = (ca_file.display(), kubeconfig.display());
    println!(
        "apilb demo: three fake kube-apiservers behind apilb (L4, TLS passes through).\n\n\
         balancer   https://{lb}  ->  {}\n\
         admin      http://{admin}  (/metrics /status /readyz /healthz)\n\
         files      {}\n\n\
         Try:\n  \
         curl --cacert {ca_s} https://{lb}/version\n  \
         curl --cacert {ca_s} -N 'https://{lb}/api/v1/namespaces?watch=true'\n  \
         kubectl --kubeconfig {kc} get --raw /version\n  \
         kubectl --kubeconfig {kc} get --raw '/api/v1/namespaces?watch=true'\n  \
         curl -s http://{admin}/status\n  \
         curl -s http://{admin}/metrics | grep apilb_backend\n\n\
         Each response names its server in the X-Fake-Server header (curl -i).\n\
         Ctrl-C stops the demo.",
        fakes
            .iter()
            .map(|f| f.addr().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        dir.path().display(),
    );
    shutdown.await;
    handle.shutdown();
    handle.wait().await;
    drop(fakes);
    Ok(())
}
