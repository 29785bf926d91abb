//! A real three-member etcd cluster (Debian's etcd-server and etcd-client) on
//! 127.0.0.1 with TLS and client-certificate auth, fronted by apilb in tcp mode
//! with https probes on /health that present a client certificate.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Every etcd process this test started; all are killed on drop.
struct Cluster {
    etcd: PathBuf,
    dir: PathBuf,
    clients: Vec<SocketAddr>,
    peers: Vec<SocketAddr>,
    procs: Vec<Option<Child>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Ports nothing listens on right now (bound, then released).
fn free_ports(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

impl Cluster {
    fn spawn(&self, i: usize) -> Child {
        let dir = &self.dir;
        let initial: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(j, p)| format!("m{j}=https://{p}"))
            .collect();
        let log = std::fs::File::create(dir.join(format!("m{i}.log"))).unwrap();
        Command::new(&self.etcd)
            .arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(dir.join(format!("m{i}.etcd")))
            .arg("--listen-client-urls")
            .arg(format!("https://{}", self.clients[i]))
            .arg("--advertise-client-urls")
            .arg(format!("https://{}", self.clients[i]))
            .arg("--listen-peer-urls")
            .arg(format!("https://{}", self.peers[i]))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("https://{}", self.peers[i]))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "apilb-test",
            ])
            .arg("--cert-file")
            .arg(dir.join("server.crt"))
            .arg("--key-file")
            .arg(dir.join("server.key"))
            .arg("--trusted-ca-file")
            .arg(dir.join("ca.crt"))
            .arg("--client-cert-auth")
            .arg("--peer-cert-file")
            .arg(dir.join("peer.crt"))
            .arg("--peer-key-file")
            .arg(dir.join("peer.key"))
            .arg("--peer-trusted-ca-file")
            .arg(dir.join("ca.crt"))
            .arg("--peer-client-cert-auth")
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd")
    }
}

fn etcdctl(bin: &Path, dir: &Path, endpoint: SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://{endpoint}"))
        .arg(format!("--cacert={}", dir.join("ca.crt").display()))
        .arg(format!("--cert={}", dir.join("client.crt").display()))
        .arg(format!("--key={}", dir.join("client.key").display()))
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_through_apilb_survives_a_killed_member() {
    let Some(etcd) = require_tool("etcd") else {
        return;
    };
    let Some(ctl) = require_tool("etcdctl") else {
        return;
    };
    let pki = Pki::new();
    let dir = pki.dir.path().to_path_buf();
    pki.ca
        .peer(&["127.0.0.1", "localhost"], "etcd-peer")
        .unwrap()
        .write(&dir, "peer")
        .unwrap();
    pki.ca
        .client("root", None)
        .unwrap()
        .write(&dir, "client")
        .unwrap();
    let probe = pki.ca.client("apilb-probe", None).unwrap();
    let (probe_crt, probe_key) = probe.write(&dir, "probe").unwrap();

    let ports = free_ports(6);
    let mut cluster = Cluster {
        etcd,
        dir: dir.clone(),
        clients: ports[..3].to_vec(),
        peers: ports[3..].to_vec(),
        procs: Vec::new(),
    };
    for i in 0..3 {
        let c = cluster.spawn(i);
        cluster.procs.push(Some(c));
    }

    let (interval_ms, timeout_ms, fall) = (500u64, 300u64, 2u64);
    let health = format!(
        "    health:\n      check: https\n      path: /health\n      interval: {interval_ms}ms\n      timeout: {timeout_ms}ms\n      rise: 2\n      fall: {fall}\n      tls:\n        ca_file: {}\n        cert_file: {}\n        key_file: {}\n",
        pki.ca_file.display(),
        probe_crt.display(),
        probe_key.display()
    );
    let servers: Vec<SocketAddr> = cluster.clients.clone();
    // The --etcd-servers form: https://host:port.
    let yaml = l4_yaml(&servers, &health);
    let yaml = servers.iter().fold(yaml, |y, s| {
        y.replace(&format!("- {s}\n"), &format!("- https://{s}\n"))
    });
    let h = start_yaml(&yaml).await;
    let lb = fe(&h);

    // Wait for the cluster to form and every member to pass /health via apilb's probes.
    wait_for(
        "etcd cluster healthy behind apilb",
        Duration::from_secs(60),
        || async {
            let s = h.shared().snapshot.load();
            s.pools["p"]
                .backends
                .iter()
                .all(|b| b.is_healthy() && b.metrics.checks_ok.get() >= 1)
                .then_some(())
        },
    )
    .await;

    let out = etcdctl(&ctl, &dir, lb, &["put", "name", "john"]);
    assert!(
        out.status.success(),
        "put: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let out = etcdctl(&ctl, &dir, lb, &["get", "name"]);
    assert!(
        out.status.success(),
        "get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "name\njohn\n");
    // Every key ("" with --prefix): the key "name" is listed.
    let out = etcdctl(&ctl, &dir, lb, &["get", "", "--prefix", "--keys-only"]);
    assert!(out.status.success());
    let keys: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(keys, ["name"]);

    // SIGKILL one member.
    let t = Instant::now();
    let mut victim = cluster.procs[1].take().unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();
    let bound = Duration::from_millis(fall * interval_ms + timeout_ms) + Duration::from_secs(1);
    wait_for("the killed member to be marked down", bound, || async {
        (!backend_up(&h, "p", 1)).then_some(())
    })
    .await;
    assert!(t.elapsed() <= bound);
    for i in 0..100 {
        let out = etcdctl(&ctl, &dir, lb, &["get", "name", "--print-value-only"]);
        assert!(
            out.status.success(),
            "get {i} after the kill failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "john");
    }

    // Restart it on the same data dir: it rejoins and is marked up again.
    let c = cluster.spawn(1);
    cluster.procs[1] = Some(c);
    wait_for(
        "the restarted member to be marked up",
        Duration::from_secs(30),
        || async { backend_up(&h, "p", 1).then_some(()) },
    )
    .await;
    h.shutdown();
    h.wait().await;
    drop(cluster);
}
