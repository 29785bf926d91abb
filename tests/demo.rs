//! `apilb demo` does what it prints: its balancer answers with the fake
//! apiservers' version, kubectl works with the kubeconfig it wrote, and
//! Ctrl-C (SIGINT) stops it with exit code 0, removing its temp dir.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test]
async fn the_demo_serves_what_it_prints_and_stops_on_ctrl_c() {
    let mut child = Command::new(apilb_bin())
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut balancer, mut files, mut kubectl_line) = (None, None, None);
    while balancer.is_none() || files.is_none() || kubectl_line.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the demo prints its instructions");
        if let Some(rest) = line.strip_prefix("balancer   https://") {
            balancer = rest
                .split_whitespace()
                .next()
                .map(|a| a.parse::<std::net::SocketAddr>().unwrap());
        } else if let Some(rest) = line.strip_prefix("files      ") {
            files = Some(std::path::PathBuf::from(rest.trim()));
        } else if line.contains("kubectl --kubeconfig") && line.contains("/version") {
            kubectl_line = Some(line.trim().to_string());
        }
    }
    let (addr, dir) = (balancer.unwrap(), files.unwrap());
    // What `curl --cacert DIR/ca.crt https://ADDR/version` does.
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let tls = apilb::tls::ClientMaterial {
        ca: Some(apilb::tls::certs_from_pem(&ca, &dir).unwrap()),
        identity: None,
        insecure_skip_verify: false,
        alpn: vec![b"http/1.1".to_vec()],
    }
    .build()
    .unwrap();
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = https_get(addr, "/version", tls.clone()).await.unwrap();
        assert_eq!(r.status, 200);
        servers.insert(r.server.unwrap());
    }
    assert_eq!(
        servers.len(),
        3,
        "the demo balances over three fakes: {servers:?}"
    );
    // The printed kubectl command, run as printed.
    if require_tool("kubectl").is_some() {
        let args: Vec<&str> = kubectl_line
            .as_deref()
            .unwrap()
            .split_whitespace()
            .collect();
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(apilb::demo::fake::FAKE_GIT_VERSION));
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < end,
            "the demo did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!dir.exists(), "the demo removed its temp dir");
}
