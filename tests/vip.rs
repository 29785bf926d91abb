//! VIP ownership end to end: network namespaces on a private bridge made (and deleted)
//! by each test, etcd (Debian's etcd-server) in its own namespace, three apilb nodes (the
//! built binary under `ip netns exec`) and a client namespace. Addresses are in
//! 10.213.0.0/16, inside the namespaces and on the test's own bridge only.
//!
//! Needs root, `ip`, `etcd` and `curl`; skips loudly without them (fails under
//! APILB_REQUIRE_TOOLS=1). Durations: lease 3s, renew deadline 2s, retry 500ms.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apilb::config::vip::{EtcdEndpoint, VipEtcd};
use apilb::vip::etcd::{Campaign, Client};
use common::*;

const LEASE: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(500);
const ADMIN_PORT: u16 = 8404;

/// Runs `cmd`; panics with its output when it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this machine can run the namespace tests; prints why not.
fn lab_possible() -> bool {
    for tool in ["ip", "etcd", "curl"] {
        if require_tool(tool).is_none() {
            return false;
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("APILB_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("the VIP tests need root (network namespaces) and APILB_REQUIRE_TOOLS=1");
        }
        eprintln!("SKIPPED: the VIP tests need root to create network namespaces");
        return false;
    }
    true
}

/// A process started in a namespace; its stderr lines are kept; killed on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(ns: &str, args: &[String]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child (`ip netns exec` execs the program).
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The namespaces, bridge and processes of one test; all removed on drop, pass or fail.
struct Lab {
    id: u32,
    bridge: String,
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
    etcd: Vec<Proc>,
    nodes: Vec<Option<Proc>>,
    /// Per node: the backend its pool probes (a listener in this process).
    /// Accept loops (they take and drop connections); aborting one closes its port.
    backends: Vec<tokio::task::JoinHandle<()>>,
    backend_addrs: Vec<SocketAddr>,
    /// lease_duration, renew_deadline, retry_period as written in the configs.
    timing: [&'static str; 3],
}

impl Drop for Lab {
    fn drop(&mut self) {
        for b in &self.backends {
            b.abort();
        }
        self.nodes.clear();
        self.etcd.clear();
        for ns in &self.namespaces {
            // A process no `Proc` owns (the successor of a SIGUSR2 re-exec)
            // would outlive the test in a deleted namespace.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a process in this test's own namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// A bridge 10.213.ID.1/24 in the root namespace (this process reaches every node).
    fn new() -> Lab {
        let id = (std::process::id() % 40) * 6 + NEXT.fetch_add(1, Ordering::SeqCst) % 6 + 1;
        let bridge = format!("avbr{id}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        let lab = Lab {
            id,
            bridge: bridge.clone(),
            namespaces: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            etcd: Vec::new(),
            nodes: Vec::new(),
            backends: Vec::new(),
            backend_addrs: Vec::new(),
            timing: ["3s", "2s", "500ms"],
        };
        let gw = format!("10.213.{id}.1/24");
        sh(&["ip", "addr", "add", &gw, "dev", &bridge]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        lab
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.id as u8, host)
    }

    fn vip(&self) -> Ipv4Addr {
        self.ip(100)
    }

    /// A namespace with `eth0` = 10.213.ID.HOST/24 on the bridge.
    fn namespace(&mut self, role: &str, host: u8) -> String {
        let ns = format!("av{}-{role}", self.id);
        let veth = format!("av{}{role}", self.id);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "link", "set", &veth, "master", &self.bridge, "up"]);
        let addr = format!("{}/24", self.ip(host));
        sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn etcd_url(&self, member: usize) -> String {
        format!("http://{}:2379", self.ip(2 + member as u8))
    }

    /// `members` etcd members, each in its own namespace (10.213.ID.2, .3, ...).
    async fn start_etcd(&mut self, members: usize) {
        let peers: Vec<String> = (0..members)
            .map(|m| format!("e{m}=http://{}:2380", self.ip(2 + m as u8)))
            .collect();
        for m in 0..members {
            let ns = self.namespace(&format!("e{m}"), 2 + m as u8);
            let ip = self.ip(2 + m as u8);
            let args: Vec<String> = [
                "etcd",
                "--name",
                &format!("e{m}"),
                "--data-dir",
                &self.dir.path().join(format!("e{m}")).display().to_string(),
                "--listen-client-urls",
                &format!("http://{ip}:2379"),
                "--advertise-client-urls",
                &format!("http://{ip}:2379"),
                "--listen-peer-urls",
                &format!("http://{ip}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
                "--initial-cluster",
                &peers.join(","),
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "500",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            self.etcd.push(Proc::spawn(&ns, &args));
        }
        etcd_ready(&mut self.client(None), "/probe").await;
    }

    /// An etcd client from this process (root namespace) to one member or all.
    fn client(&self, member: Option<usize>) -> Client {
        let members = member.map_or(self.etcd.len().max(1), |_| 1);
        let endpoints = (0..members)
            .map(|m| EtcdEndpoint {
                tls: false,
                host: self.ip(2 + member.unwrap_or(m) as u8).to_string(),
                port: 2379,
            })
            .collect();
        let cfg = VipEtcd {
            endpoints,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key: String::new(),
        };
        Client::new(&cfg, Duration::from_secs(2)).unwrap()
    }

    /// The config of node `i` (identity node-i, address 10.213.ID.(11+i)).
    fn node_config(&self, i: usize) -> PathBuf {
        self.node_config_with(i, self.vip(), "eth0")
    }

    fn node_config_with(&self, i: usize, vip: Ipv4Addr, interface: &str) -> PathBuf {
        let endpoints: Vec<String> = (0..self.etcd.len())
            .map(|m| format!("\"{}\"", self.etcd_url(m)))
            .collect();
        let yaml = format!(
            r#"admin:
  listen: 0.0.0.0:{ADMIN_PORT}
shutdown_grace: 1s
frontends:
  - name: api
    listen: 0.0.0.0:8443
    pool: api
pools:
  - name: api
    servers: ["{backend}"]
    health:
      check: tcp
      interval: 500ms
      timeout: 400ms
      rise: 1
      fall: 2
vip:
  address: {vip}/24
  interface: {interface}
  identity: node-{i}
  lease_duration: {lease}
  renew_deadline: {renew}
  retry_period: {retry}
  require_ready: true
  etcd:
    endpoints: [{endpoints}]
"#,
            backend = self.backend_addrs[i],
            lease = self.timing[0],
            renew = self.timing[1],
            retry = self.timing[2],
            endpoints = endpoints.join(", "),
        );
        let path = self.dir.path().join(format!("node-{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Starts `n` nodes, each with a backend listener of its own in this process.
    fn start_nodes(&mut self, n: usize) {
        for i in 0..n {
            let l = std::net::TcpListener::bind((self.ip(1), 0)).unwrap();
            l.set_nonblocking(true).unwrap();
            self.backend_addrs.push(l.local_addr().unwrap());
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            self.backends.push(tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            }));
            self.namespace(&format!("n{i}"), 11 + i as u8);
            self.nodes.push(None);
            self.start_node(i);
        }
    }

    fn start_node(&mut self, i: usize) {
        let cfg = self.node_config(i);
        let args = vec![
            apilb_bin().to_string(),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            "debug".into(),
            "run".into(),
            "-c".into(),
            cfg.display().to_string(),
        ];
        let ns = format!("av{}-n{i}", self.id);
        self.nodes[i] = Some(Proc::spawn(&ns, &args));
    }

    /// Which node namespaces have the VIP on eth0 right now (the kernel's view).
    fn holders(&self) -> Vec<usize> {
        self.holders_of(self.vip())
    }

    /// Namespaces are read one after another, a few ms apart, so a hand-over
    /// (remove on one node, add on another ~1 ms later) could look like an
    /// overlap. Every node seen holding but read before the last holder is read
    /// again: only a node that still holds after the later one was seen counts.
    fn holders_of(&self, addr: Ipv4Addr) -> Vec<usize> {
        let holds = |i: usize| {
            let ns = format!("av{}-n{i}", self.id);
            sh(&["ip", "-n", &ns, "-4", "addr", "show", "dev", "eth0"])
                .contains(&format!("inet {addr}/"))
        };
        let seen: Vec<usize> = (0..self.nodes.len()).filter(|&i| holds(i)).collect();
        match seen.split_last() {
            Some((&last, earlier)) if !earlier.is_empty() => {
                let mut still: Vec<usize> = earlier.iter().copied().filter(|&i| holds(i)).collect();
                still.push(last);
                still
            }
            _ => seen,
        }
    }

    /// Samples every 50 ms until `f(holders)`; asserts there are never two holders.
    async fn until_holders(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&[usize]) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let h = self.holders();
            assert!(
                h.len() <= 1,
                "two nodes hold the VIP at once: {h:?}\n{}",
                self.all_logs()
            );
            if f(&h) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; holders now {h:?}\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all_logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                n.as_ref()
                    .map(|n| format!("--- node-{i}:\n{}", tail(&n.logs())))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// GET http://ADDR:8404/PATH from the client namespace (1 s limit).
    fn client_get(&self, addr: Ipv4Addr, path: &str) -> Option<String> {
        let ns = format!("av{}-client", self.id);
        let url = format!("http://{addr}:{ADMIN_PORT}{path}");
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-sf", "-m", "1", &url])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The identity of the node that answers on the VIP, seen from the client.
    fn reached_through_vip(&self) -> Option<String> {
        let body = self.client_get(self.vip(), "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["vip"]["leader"] == true).then(|| v["vip"]["holder"].as_str().unwrap_or("").to_string())
    }

    /// `apilb_vip_leader` as node `i` reports it (from this process, on its own address).
    async fn leader_metric(&self, i: usize) -> Option<f64> {
        let addr = SocketAddr::from((self.ip(11 + i as u8), ADMIN_PORT));
        // A node still starting refuses the connection: not an answer yet.
        let (code, body) =
            tokio::time::timeout(Duration::from_secs(1), try_http(addr, "GET", "/metrics"))
                .await
                .ok()?
                .ok()?;
        if code != 200 {
            return None;
        }
        metric(
            &body,
            &format!("apilb_vip_leader{{address=\"{}\"}}", self.vip()),
        )
    }

    /// Waits until every node's metric says exactly `holder` leads.
    async fn metrics_agree(&self, holder: usize, nodes: &[usize]) {
        wait_for(
            "apilb_vip_leader agrees on every node",
            Duration::from_secs(5),
            || async {
                for &i in nodes {
                    let want = if i == holder { 1.0 } else { 0.0 };
                    if self.leader_metric(i).await != Some(want) {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
    }

    fn node(&self, i: usize) -> &Proc {
        self.nodes[i].as_ref().unwrap()
    }
}

/// Reads `key` until etcd answers (20 s at most).
async fn etcd_ready(c: &mut Client, key: &str) -> apilb::vip::etcd::KeyState {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match c.get(key).await {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < end, "etcd does not answer: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One etcd member, three nodes and a client.
async fn lab(etcd_members: usize) -> Lab {
    lab_timed(etcd_members, ["3s", "2s", "500ms"]).await
}

async fn lab_timed(etcd_members: usize, timing: [&'static str; 3]) -> Lab {
    let mut lab = Lab::new();
    lab.timing = timing;
    lab.namespace("client", 50);
    lab.start_etcd(etcd_members).await;
    lab.start_nodes(3);
    lab
}

/// Serialises the namespace tests: each runs etcd and three daemons, and its timing
/// assertions need the CPU (the machine may have two cores).
static LAB_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn one_holder_survives_sigkill_and_the_restarted_node_stays_out() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    let mut lab = lab(1).await;
    lab.until_holders("first holder", Duration::from_secs(10), |h| h.len() == 1)
        .await;
    let first = lab.holders()[0];
    lab.metrics_agree(first, &[0, 1, 2]).await;
    let reached = wait_for(
        "the client reaches the holder through the VIP",
        Duration::from_secs(3),
        || async { lab.reached_through_vip() },
    )
    .await;
    assert_eq!(reached, format!("node-{first}"));

    // SIGKILL: the address stays in the dead node's namespace, as after a crash.
    lab.node(first).signal(libc::SIGKILL);
    let killed_at = Instant::now();
    let took = lab
        .until_holders_ignoring(
            first,
            "takeover after SIGKILL",
            LEASE + Duration::from_secs(1),
        )
        .await;
    let second = lab.holders_except(first)[0];
    eprintln!("SIGKILL of the holder: node-{second} holds the VIP after {took:?}");
    let acquired_at = Instant::now();
    let reached = wait_for(
        "the client reaches the new holder (no ARP flush)",
        Duration::from_secs(3),
        || async {
            lab.reached_through_vip()
                .filter(|h| *h == format!("node-{second}"))
        },
    )
    .await;
    let via_client = acquired_at.elapsed();
    eprintln!(
        "client reached {reached} {via_client:?} after the takeover ({:?} after the kill)",
        killed_at.elapsed()
    );
    assert!(
        via_client <= Duration::from_secs(1),
        "client needed {via_client:?}"
    );

    // Restart: the stale address goes, and the healthy holder keeps the VIP.
    lab.start_node(first);
    wait_for(
        "the restarted node removes its stale VIP",
        Duration::from_secs(5),
        || async { (!lab.holders().contains(&first)).then_some(()) },
    )
    .await;
    // The log line follows the removal, and reaches the test through a pipe.
    wait_for(
        "the restarted node logs the removal",
        Duration::from_secs(5),
        || async { (lab.node(first).count("removed a stale VIP") > 0).then_some(()) },
    )
    .await;
    assert!(
        lab.node(first).count("removed a stale VIP") == 1,
        "{}",
        lab.node(first).logs()
    );
    let settle = Instant::now() + LEASE + RENEW;
    while Instant::now() < settle {
        assert_eq!(
            lab.holders(),
            vec![second],
            "the VIP stays with node-{second}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab.metrics_agree(second, &[0, 1, 2]).await;
}

impl Lab {
    /// `etcdctl endpoint status` of member `m`: (its member id, the leader's id).
    fn etcd_status(&self, m: usize) -> (u64, u64) {
        let out = sh(&[
            "etcdctl",
            "--endpoints",
            &self.etcd_url(m),
            "endpoint",
            "status",
            "-w",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let st = &v[0]["Status"];
        (
            st["header"]["member_id"].as_u64().unwrap(),
            st["leader"].as_u64().unwrap(),
        )
    }

    /// Moves etcd's leadership away from member `m` if it has it.
    fn etcd_leader_not(&self, m: usize) {
        let (id, leader) = self.etcd_status(m);
        if id == leader {
            let (other, _) = self.etcd_status((m + 1) % self.etcd.len());
            sh(&[
                "etcdctl",
                "--endpoints",
                &self.etcd_url(m),
                "move-leader",
                &format!("{other:x}"),
            ]);
        }
        let (id, leader) = self.etcd_status(m);
        assert_ne!(id, leader, "etcd member {m} is still the leader");
    }

    /// Like `until_holders`, but node `dead` (SIGKILLed, address left behind) is not
    /// counted: waits until another node holds, never two live holders.
    async fn until_holders_ignoring(&self, dead: usize, what: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let h = self.holders_except(dead);
            assert!(h.len() <= 1, "two live nodes hold the VIP: {h:?}");
            if h.len() == 1 {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn holders_except(&self, dead: usize) -> Vec<usize> {
        self.holders().into_iter().filter(|&i| i != dead).collect()
    }
}

#[tokio::test]
async fn sigterm_hands_over_and_a_holder_cut_from_etcd_drops_first() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    let lab = lab(1).await;
    lab.until_holders("first holder", Duration::from_secs(10), |h| h.len() == 1)
        .await;
    let first = lab.holders()[0];

    // SIGTERM: the address is removed and the lease revoked: hand-over within retry + 1 s.
    lab.node(first).signal(libc::SIGTERM);
    let took = lab
        .until_holders(
            "hand-over after SIGTERM",
            RETRY + Duration::from_secs(1),
            |h| h.len() == 1 && h[0] != first,
        )
        .await;
    let second = lab.holders()[0];
    eprintln!("SIGTERM of the holder: node-{second} holds the VIP after {took:?}");

    // Cut the holder off from etcd: it must drop before its lease can expire.
    let ns = format!("av{}-n{second}", lab.id);
    let etcd_ip = format!("{}/32", lab.ip(2));
    sh(&["ip", "-n", &ns, "route", "add", "blackhole", &etcd_ip]);
    let dropped = lab
        .until_holders("the cut-off holder drops", LEASE, |h| h.is_empty())
        .await;
    eprintln!("holder cut from etcd dropped the VIP after {dropped:?}");
    assert!(
        dropped < LEASE,
        "dropped after {dropped:?}, lease {LEASE:?}"
    );
    let third = lab
        .until_holders(
            "another node takes over",
            LEASE + Duration::from_secs(2),
            |h| h.len() == 1,
        )
        .await;
    let holder = lab.holders()[0];
    assert!(holder != second && holder != first);
    eprintln!("node-{holder} took over {third:?} after the drop");
    assert!(lab.node(second).count("lost the VIP; removed the address") >= 1);
}

#[tokio::test]
async fn require_ready_moves_the_vip_to_a_node_with_up_backends() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    let lab = lab(1).await;
    lab.until_holders("first holder", Duration::from_secs(10), |h| h.len() == 1)
        .await;
    let first = lab.holders()[0];
    // Its only backend stops accepting: the tcp probe fails, the pool is down.
    lab.backends[first].abort();
    let took = lab
        .until_holders("resignation", Duration::from_secs(5), |h| {
            h.len() == 1 && h[0] != first
        })
        .await;
    eprintln!(
        "holder with no up backend resigned; node-{} took over after {took:?}",
        lab.holders()[0]
    );
    assert!(
        lab.node(first)
            .count("released the VIP: no pool has an up backend")
            == 1
    );
}

#[tokio::test]
async fn reload_applies_a_new_address_and_refuses_a_missing_interface() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    let lab = lab(1).await;
    lab.until_holders("first holder", Duration::from_secs(10), |h| h.len() == 1)
        .await;
    let first = lab.holders()[0];

    // A vip section naming an interface this node lacks: refused, nothing changes.
    lab.node_config_with(first, lab.vip(), "nosuch0");
    lab.node(first).signal(libc::SIGHUP);
    wait_for("the reload is refused", Duration::from_secs(5), || async {
        (lab.node(first).count("config reload refused") > 0).then_some(())
    })
    .await;
    assert!(lab.node(first).logs().contains("nosuch0"));
    assert_eq!(lab.holders(), vec![first], "a refused reload keeps the VIP");

    // A new address: the node releases the old VIP (another node takes it) and
    // campaigns for the new one under its own key.
    let other_vip = lab.ip(101);
    lab.node_config_with(first, other_vip, "eth0");
    lab.node(first).signal(libc::SIGHUP);
    let took = lab
        .until_holders(
            "the old VIP moves on",
            RETRY + Duration::from_secs(2),
            |h| h.len() == 1 && h[0] != first,
        )
        .await;
    wait_for("the new VIP is held", Duration::from_secs(3), || async {
        (lab.holders_of(other_vip) == [first]).then_some(())
    })
    .await;
    eprintln!("reload with a new address: the old VIP moved after {took:?}");
}

/// Three etcd members; the one every client starts with dies: the holder keeps
/// renewing through the others and keeps the VIP; a later SIGKILL still fails over.
#[tokio::test]
async fn three_etcd_members_one_killed() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    let mut lab = lab(3).await;
    lab.until_holders("first holder", Duration::from_secs(10), |h| h.len() == 1)
        .await;
    let first = lab.holders()[0];
    // Member 0 (every node's first endpoint) must not be the raft leader: a leader
    // election takes etcd about as long as this test's 2 s renew deadline.
    lab.etcd_leader_not(0);
    lab.etcd[0].signal(libc::SIGKILL);
    let until = Instant::now() + LEASE + RENEW;
    while Instant::now() < until {
        assert_eq!(
            lab.holders(),
            vec![first],
            "the holder keeps the VIP with 2 of 3 members\n{}",
            lab.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lab.node(first).count("lost the VIP"), 0);
    lab.nodes[first] = None; // SIGKILL (the address stays behind)
    let took = lab
        .until_holders_ignoring(
            first,
            "takeover with 2 of 3 members",
            LEASE + Duration::from_secs(1),
        )
        .await;
    eprintln!("with one etcd member dead, SIGKILL of the holder: takeover after {took:?}");
    // What systemd's ExecStopPost runs after a crash: the stale address goes.
    assert!(
        lab.holders().contains(&first),
        "the killed node's address stays behind"
    );
    let ns = format!("av{}-n{first}", lab.id);
    let cfg = lab.node_config(first).display().to_string();
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &ns,
        apilb_bin(),
        "vip-down",
        "-c",
        &cfg,
    ]);
    assert!(out.contains("removed from eth0"), "{out}");
    assert!(!lab.holders().contains(&first));
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &ns,
        apilb_bin(),
        "vip-down",
        "-c",
        &cfg,
    ]);
    assert!(out.contains("was not on eth0"), "{out}");
}

/// Failover times for the docs (docs/vip.md), for the default durations and for
/// 5s/3s/1s: `cargo test --test vip -- --ignored --nocapture measure_failover`.
#[tokio::test]
#[ignore = "measurement for docs/vip.md; about two minutes"]
async fn measure_failover() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    for timing in [
        ["15s", "10s", "2s"],
        ["5s", "3s", "1s"],
        ["3s", "2s", "500ms"],
    ] {
        let lease = humantime::parse_duration(timing[0]).unwrap();
        let limit = lease * 2 + Duration::from_secs(5);
        let mut lab = lab_timed(1, timing).await;
        lab.until_holders("first holder", limit, |h| h.len() == 1)
            .await;
        let a = lab.holders()[0];
        lab.nodes[a] = None; // SIGKILL
        let kill = lab
            .until_holders_ignoring(a, "takeover after SIGKILL", limit)
            .await;
        let t = Instant::now();
        let b = lab.holders_except(a)[0];
        wait_for(
            "client reaches the new holder",
            Duration::from_secs(5),
            || async {
                lab.reached_through_vip()
                    .filter(|h| *h == format!("node-{b}"))
            },
        )
        .await;
        let client = t.elapsed();
        lab.start_node(a);
        wait_for("stale address removed", limit, || async {
            (!lab.holders().contains(&a)).then_some(())
        })
        .await;
        lab.node(b).signal(libc::SIGTERM);
        let term = lab
            .until_holders("hand-over after SIGTERM", limit, |h| {
                h.len() == 1 && h[0] != b
            })
            .await;
        let c = lab.holders()[0];
        lab.start_node(b);
        let ns = format!("av{}-n{c}", lab.id);
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "blackhole",
            &format!("{}/32", lab.ip(2)),
        ]);
        let drop = lab
            .until_holders("cut-off holder drops", limit, |h| h.is_empty())
            .await;
        let again = lab
            .until_holders("takeover after the drop", limit, |h| h.len() == 1)
            .await;
        eprintln!(
            "MEASURED lease {} renew {} retry {}: SIGKILL takeover {kill:.2?} (+client {client:.2?}), \
             SIGTERM hand-over {term:.2?}, cut-off holder drops after {drop:.2?}, next holder {:.2?} later",
            timing[0], timing[1], timing[2], again
        );
        if std::env::var_os("APILB_VIP_LOGS").is_some() {
            eprintln!("{}", lab.all_logs());
        }
    }
}

#[tokio::test]
async fn etcd_client_speaks_the_v3_api() {
    let Some(etcd) = require_tool("etcd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let client_url = format!("http://127.0.0.1:{}", ports[0]);
    let peer_url = format!("http://127.0.0.1:{}", ports[1]);
    let mut child = Command::new(etcd)
        .args(["--data-dir", &dir.path().join("d").display().to_string()])
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("default={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cfg = VipEtcd {
        endpoints: vec![
            // A dead endpoint first: the client must move on to the next one.
            EtcdEndpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: closed_port().await.port(),
            },
            EtcdEndpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: ports[0],
            },
        ],
        ca_file: None,
        cert_file: None,
        key_file: None,
        key: String::new(),
    };
    let mut c = Client::new(&cfg, Duration::from_secs(2)).unwrap();
    let key = "/apilb/vip/test";
    let state = etcd_ready(&mut c, key).await;
    assert_eq!(state.holder, None);
    let (lease, ttl) = c.grant(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ttl, 5);
    assert_eq!(
        c.campaign(key, "node-a", lease).await.unwrap(),
        Campaign::Won
    );
    let (lease_b, _) = c.grant(Duration::from_secs(5)).await.unwrap();
    match c.campaign(key, "node-b", lease_b).await.unwrap() {
        Campaign::Lost { holder, revision } => {
            assert_eq!(holder, "node-a");
            assert!(revision > 0);
        }
        other => panic!("second campaign: {other:?}"),
    }
    let state = c.get(key).await.unwrap();
    assert_eq!(state.holder, Some(("node-a".to_string(), lease)));
    assert!(c.keepalive(lease).await.unwrap() > 0);
    let (left, keys) = c.time_to_live(lease).await.unwrap();
    assert!(left > 0 && left <= 5);
    assert_eq!(keys, vec![key.as_bytes().to_vec()]);
    // A watcher sees the key go when the lease is revoked.
    let mut w = Client::new(&cfg, Duration::from_secs(2)).unwrap();
    let rev = state.revision + 1;
    let watch = tokio::spawn(async move { w.wait_deleted(key, rev).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.revoke(lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), watch)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(c.get(key).await.unwrap().holder, None);
    assert!(
        c.keepalive(lease).await.unwrap() <= 0,
        "a revoked lease is gone"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn run_without_capabilities_exits_with_a_clear_error() {
    let Some(setpriv) = require_tool("setpriv") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apilb.yaml");
    std::fs::write(
        &path,
        "admin: {listen: 127.0.0.1:0}\nfrontends: [{name: api, listen: 127.0.0.1:0, pool: api}]\n\
         pools: [{name: api, servers: [127.0.0.1:6443]}]\n\
         vip: {address: 10.213.250.100/24, interface: lo, etcd: {endpoints: [http://127.0.0.1:2379]}}\n",
    )
    .unwrap();
    let out = Command::new(setpriv)
        .args([
            "--inh-caps=-all",
            "--bounding-set=-net_admin,-net_raw",
            "--",
        ])
        .arg(apilb_bin())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
}

#[test]
fn check_validates_the_vip_section() {
    let base = "frontends: [{name: api, listen: 127.0.0.1:0, pool: api}]\n\
                pools: [{name: api, servers: [127.0.0.1:6443]}]\n";
    let errors = |vip: &str| -> Vec<String> {
        match apilb::config::parse(&format!("{base}vip:\n{vip}")) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    };
    let ok = "  address: 10.0.0.100/24\n  interface: eth0\n  etcd: {endpoints: [http://10.0.0.1:2379]}\n";
    assert_eq!(errors(ok), Vec::<String>::new());
    let cfg = apilb::config::parse(&format!("{base}vip:\n{ok}")).unwrap();
    let v = cfg.vip.unwrap();
    assert_eq!(v.etcd.key, "/apilb/vip/10.0.0.100");
    assert_eq!(
        (v.lease_duration, v.renew_deadline, v.retry_period),
        (
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2)
        )
    );
    assert!(v.require_ready);

    let e = errors(
        "  address: fd00::100/64\n  interface: eth0\n  etcd: {endpoints: [http://10.0.0.1:2379]}\n",
    );
    assert!(
        e.iter().any(|m| m.starts_with("vip.address: IPv6")),
        "{e:?}"
    );
    let e = errors("  address: 10.0.0.100/24\n  interface: eth0\n  lease_duration: 5s\n  renew_deadline: 5s\n  retry_period: 6s\n  etcd: {endpoints: [http://10.0.0.1:2379]}\n");
    assert!(
        e.iter()
            .any(|m| m.starts_with("vip.renew_deadline: must be shorter than lease_duration")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("vip.retry_period: must be shorter than renew_deadline")),
        "{e:?}"
    );
    let e = errors("  address: 10.0.0.100/24\n  interface: eth0\n  etcd: {endpoints: [https://10.0.0.1:2379]}\n");
    for f in ["ca_file", "cert_file", "key_file"] {
        assert!(
            e.iter()
                .any(|m| m.starts_with(&format!("vip.etcd.{f}: is required"))),
            "{e:?}"
        );
    }
    let e = errors("  address: 10.0.0.100\n  interface: eth0\n  etcd: {endpoints: [10.0.0.1:2379]}\n  lease: 3s\n");
    assert_eq!(e.len(), 1, "unknown key is a YAML error: {e:?}");
    let e = errors(
        "  address: 10.0.0.100\n  etcd: {endpoints: [10.0.0.1:2379]}\n  lease_duration: 2500ms\n",
    );
    assert!(e.iter().any(|m| m.starts_with("vip.address:")), "{e:?}");
    assert!(
        e.iter()
            .any(|m| m.starts_with("vip.interface: is required")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.starts_with("vip.etcd.endpoints[0]:")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("vip.lease_duration: must be whole seconds")),
        "{e:?}"
    );
}

/// An etcd started by a test on loopback; killed on drop.
struct LocalEtcd(Child);

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The least-privilege setup docs/vip.md recommends, tested: etcd with TLS, client
/// certificates and auth on; apilb's certificate (CN apilb-vip) maps to a user whose
/// only role grants the election key prefix.
#[tokio::test]
async fn etcd_client_over_tls_with_a_role_limited_to_the_prefix() {
    let (Some(etcd), Some(ctl)) = (require_tool("etcd"), require_tool("etcdctl")) else {
        return;
    };
    let pki = Pki::new();
    let dir = pki.dir.path().to_path_buf();
    pki.ca
        .client("root", None)
        .unwrap()
        .write(&dir, "root")
        .unwrap();
    let (crt, key) = pki
        .ca
        .client("apilb-vip", None)
        .unwrap()
        .write(&dir, "apilb")
        .unwrap();
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let client_url = format!("https://127.0.0.1:{}", ports[0]);
    let peer_url = format!("http://127.0.0.1:{}", ports[1]);
    let path = |f: &str| dir.join(f).display().to_string();
    let _etcd = LocalEtcd(
        Command::new(etcd)
            .args(["--data-dir", &path("data")])
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args([
                "--cert-file",
                &path("server.crt"),
                "--key-file",
                &path("server.key"),
            ])
            .args(["--trusted-ca-file", &path("ca.crt"), "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let root = |args: &[&str]| -> std::process::Output {
        Command::new(&ctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={client_url}"))
            .arg(format!("--cacert={}", path("ca.crt")))
            .arg(format!("--cert={}", path("root.crt")))
            .arg(format!("--key={}", path("root.key")))
            .args(args)
            .output()
            .unwrap()
    };
    let end = Instant::now() + Duration::from_secs(20);
    while !root(&["endpoint", "health"]).status.success() {
        assert!(Instant::now() < end, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The example of docs/vip.md, step by step.
    for args in [
        &[
            "user",
            "add",
            "root",
            "--new-user-password=unused-with-certs",
        ][..],
        &["role", "add", "apilb-vip"],
        &[
            "role",
            "grant-permission",
            "apilb-vip",
            "--prefix=true",
            "readwrite",
            "/apilb/vip/",
        ],
        &["user", "add", "apilb-vip", "--no-password"],
        &["user", "grant-role", "apilb-vip", "apilb-vip"],
        &["put", "/registry/secrets/kube-system/token", "secret"],
        &["auth", "enable"],
    ] {
        let out = root(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let cfg = VipEtcd {
        endpoints: vec![EtcdEndpoint {
            tls: true,
            host: "127.0.0.1".into(),
            port: ports[0],
        }],
        ca_file: Some(pki.ca_file.clone()),
        cert_file: Some(crt),
        key_file: Some(key),
        key: String::new(),
    };
    let mut c = Client::new(&cfg, Duration::from_secs(2)).unwrap();
    let key = "/apilb/vip/10.0.0.100";
    let (lease, _) = c.grant(Duration::from_secs(5)).await.unwrap();
    assert_eq!(c.campaign(key, "cp-1", lease).await.unwrap(), Campaign::Won);
    assert!(c.keepalive(lease).await.unwrap() > 0);
    assert_eq!(
        c.get(key).await.unwrap().holder,
        Some(("cp-1".to_string(), lease))
    );
    // Outside the prefix: refused by etcd, with the status it sends.
    let err = c
        .get("/registry/secrets/kube-system/token")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    c.revoke(lease).await.unwrap();
    assert_eq!(c.get(key).await.unwrap().holder, None);
}

/// deploy/ carries what a `vip` section needs (tests/deploy.rs verifies the files
/// with systemd-analyze and kubectl).
#[test]
fn deploy_files_grant_the_vip_capabilities() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/apilb.service")).unwrap();
    for line in [
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "ExecStopPost=-/usr/local/bin/apilb vip-down -c /etc/apilb/apilb.yaml",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK AF_PACKET",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "apilb.service lacks {line}"
        );
    }
    let pod =
        std::fs::read_to_string(root.join("deploy/kubernetes/apilb-static-pod.yaml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&pod).unwrap();
    assert_eq!(v["spec"]["hostNetwork"], true);
    let caps = &v["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(caps["drop"][0], "ALL");
    let add: Vec<&str> = caps["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(add, ["NET_ADMIN", "NET_RAW"]);
}

/// A re-exec (SIGUSR2) keeps the VIP on the node: the old process stops
/// renewing without a release, the new one takes over the same lease, and
/// sampled every 50 ms the address never leaves the node nor appears on
/// another one.
#[tokio::test]
async fn sigusr2_keeps_the_vip_on_the_node_through_a_reexec() {
    if !lab_possible() {
        return;
    }
    let _serial = LAB_LOCK.lock().await;
    let lab = lab(1).await;
    lab.until_holders("first holder", Duration::from_secs(10), |h| h.len() == 1)
        .await;
    let first = lab.holders()[0];
    lab.node(first).signal(libc::SIGUSR2);
    let start = Instant::now();
    // Three lease lengths: long enough for a lease nobody renews to expire.
    while start.elapsed() < LEASE * 3 {
        let h = lab.holders();
        assert_eq!(
            h,
            [first],
            "the VIP left node-{first} during the re-exec\n{}",
            lab.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = lab.node(first).logs();
    assert!(
        logs.contains("took over the VIP lease from the previous process"),
        "the successor did not take over the lease:\n{}",
        tail(&logs)
    );
    assert!(
        logs.contains("re-exec: the new process serves; draining"),
        "{}",
        tail(&logs)
    );
    assert!(
        !logs.contains("removed a stale VIP"),
        "the successor removed the address it inherited:\n{}",
        tail(&logs)
    );
}
