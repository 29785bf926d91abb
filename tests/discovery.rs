//! EndpointSlice discovery (issue 13) against fake apiservers that serve
//! list and watch as the real one does. The fakes listen on 127.0.0.1-4
//! with one port, as apiservers on four nodes would; the kubeconfig's
//! `server` points nowhere, so discovery must reach the API through the
//! pool's own backends.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use apilb::demo::{EndpointStore, FakeApiserver, FakeEndpoint};
use common::{admin_get, https_get, metric, wait_for, Pki};

/// Four fake apiservers sharing one EndpointStore (the cluster's etcd).
struct Cluster {
    pki: Pki,
    fakes: Vec<FakeApiserver>,
    store: Arc<EndpointStore>,
    port: u16,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

fn ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, i as u8])
}

impl Cluster {
    async fn new() -> Self {
        let pki = Pki::new();
        let mut opts = pki.fake_options("api-1");
        opts.client_ca_pem = Some(pki.ca.cert_pem.clone());
        let first = FakeApiserver::start(opts.clone()).await.unwrap();
        let port = first.addr().port();
        let store = EndpointStore::new("default", "kubernetes", "https", port);
        let mut fakes = vec![first];
        for i in 2..=4 {
            opts.name = format!("api-{i}");
            let f = FakeApiserver::start_on(opts.clone(), SocketAddr::new(ip(i), port))
                .await
                .unwrap();
            fakes.push(f);
        }
        for f in &fakes {
            f.serve_endpoints(store.clone());
        }
        let dir = pki.dir.path();
        let client = pki.ca.client("system:apilb-discovery", None).unwrap();
        let (cert, key) = client.write(dir, "discovery").unwrap();
        let kubeconfig = dir.join("discovery.kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.9:1\n    certificate-authority: {}\n\
             users:\n- name: u\n  user:\n    client-certificate: {}\n    client-key: {}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
            pki.ca_file.display(),
            cert.display(),
            key.display()
        );
        std::fs::write(&kubeconfig, text).unwrap();
        let cache = dir.join("apiservers.json");
        Cluster {
            pki,
            fakes,
            store,
            port,
            kubeconfig,
            cache,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(ip(i), self.port)
    }

    /// The `kubernetes` slice holds these nodes (1-based), ready unless listed in `not_ready`.
    fn set(&self, nodes: &[usize], not_ready: &[usize]) {
        let eps: Vec<FakeEndpoint> = nodes
            .iter()
            .map(|&i| FakeEndpoint {
                ip: ip(i),
                ready: Some(!not_ready.contains(&i)),
            })
            .collect();
        self.store.upsert("kubernetes", &eps);
    }

    /// One seed (node 1), discovery with a cache file, https probes.
    fn yaml(&self) -> String {
        format!(
            "admin: {{listen: '127.0.0.1:0'}}\nshutdown_grace: 1s\n\
             frontends:\n  - {{name: fe, listen: '127.0.0.1:0', pool: p}}\n\
             pools:\n  - name: p\n    servers: ['{}']\n    connect_timeout: 1s\n\
             \x20   health: {{check: https, path: /readyz, interval: 300ms, timeout: 250ms, rise: 1, fall: 2, tls: {{ca_file: {}, server_name: kubernetes}}}}\n\
             \x20   discovery:\n      kubernetes:\n        kubeconfig: {}\n        cache_file: {}\n",
            self.addr(1),
            self.pki.ca_file.display(),
            self.kubeconfig.display(),
            self.cache.display()
        )
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        self.pki.client_config(None)
    }
}

/// The pool's servers as (address, up, source), sorted.
async fn members(h: &apilb::Handle) -> Vec<(String, bool, String)> {
    let (_, body) = admin_get(h.admin_addr().unwrap(), "/status").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out: Vec<(String, bool, String)> = v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["server"].as_str().unwrap().to_string(),
                b["state"] == "up",
                b["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Waits until the pool is exactly `nodes`, all up, from `source`.
async fn wait_members(h: &apilb::Handle, c: &Cluster, nodes: &[usize], source: &str) {
    let want: Vec<(String, bool, String)> = {
        let mut w: Vec<_> = nodes
            .iter()
            .map(|&i| (c.addr(i).to_string(), true, source.to_string()))
            .collect();
        w.sort();
        w
    };
    wait_for(
        &format!("pool = {nodes:?} up from {source}"),
        Duration::from_secs(10),
        || async { (members(h).await == want).then_some(()) },
    )
    .await;
}

/// Which fakes answer `n` new connections through the frontend.
async fn served_by(h: &apilb::Handle, c: &Cluster, n: usize) -> Vec<String> {
    let fe = common::fe(h);
    let mut names = Vec::new();
    for _ in 0..n {
        let r = https_get(fe, "/version", c.client()).await.unwrap();
        assert_eq!(r.status, 200);
        names.push(r.server.unwrap());
    }
    names.sort();
    names.dedup();
    names
}

async fn metrics(h: &apilb::Handle) -> String {
    admin_get(h.admin_addr().unwrap(), "/metrics").await.1
}

#[tokio::test]
async fn one_seed_becomes_three_discovered_backends_all_probed_and_used() {
    let c = Cluster::new().await;
    c.set(&[1, 2, 3], &[]);
    let h = common::start_yaml(&c.yaml()).await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    assert_eq!(served_by(&h, &c, 12).await, ["api-1", "api-2", "api-3"]);
    let m = metrics(&h).await;
    assert_eq!(
        metric(&m, "apilb_discovery_endpoints{pool=\"p\"}"),
        Some(3.0)
    );
    assert!(
        metric(
            &m,
            "apilb_discovery_last_sync_timestamp_seconds{pool=\"p\"}"
        )
        .unwrap()
            > 0.0
    );
    let cached = std::fs::read_to_string(&c.cache).unwrap();
    for i in 1..=3 {
        assert!(cached.contains(&c.addr(i).to_string()), "{cached}");
    }
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn not_ready_then_deleted_endpoint_gets_no_new_connections_and_returns_probed() {
    let c = Cluster::new().await;
    c.set(&[1, 2, 3], &[]);
    let h = common::start_yaml(&c.yaml()).await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;

    c.set(&[1, 2, 3], &[3]);
    let gone = || async {
        let m = members(&h).await;
        (!m.iter().any(|(a, _, _)| *a == c.addr(3).to_string())).then_some(())
    };
    wait_for(
        "not-ready node 3 leaves the pool",
        Duration::from_secs(2),
        gone,
    )
    .await;
    c.set(&[1, 2], &[]);
    tokio::time::sleep(Duration::from_millis(300)).await; // let in-flight probes of node 3 end
    let before = c.fakes[2].connections();
    assert_eq!(served_by(&h, &c, 12).await, ["api-1", "api-2"]);
    assert_eq!(
        c.fakes[2].connections(),
        before,
        "no new connection to a removed server"
    );

    c.set(&[1, 2, 3], &[]);
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    assert!(c.fakes[2].connections() > before, "probed before use");
    assert_eq!(served_by(&h, &c, 12).await, ["api-1", "api-2", "api-3"]);
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn api_gone_keeps_the_set_and_a_restart_starts_from_the_cache() {
    let c = Cluster::new().await;
    c.set(&[1, 2, 3], &[]);
    let h = common::start_yaml(&c.yaml()).await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;

    c.store.set_serving(false);
    wait_for("discovery errors", Duration::from_secs(10), || async {
        let m = metrics(&h).await;
        let n = metric(
            &m,
            "apilb_discovery_errors_total{pool=\"p\",reason=\"list\"}",
        )
        .unwrap_or(0.0);
        (n >= 2.0).then_some(())
    })
    .await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    assert_eq!(served_by(&h, &c, 9).await, ["api-1", "api-2", "api-3"]);
    h.shutdown();
    h.wait().await;

    let h = common::start_yaml(&c.yaml()).await;
    assert_eq!(
        members(&h).await,
        (1..=3)
            .map(|i| (c.addr(i).to_string(), true, "cache".to_string()))
            .collect::<Vec<_>>(),
        "started from cache_file, not the seed"
    );
    assert_eq!(served_by(&h, &c, 9).await, ["api-1", "api-2", "api-3"]);
    c.store.set_serving(true);
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn gone_watch_relists_without_flapping() {
    let c = Cluster::new().await;
    c.set(&[1, 2, 3], &[]);
    let h = common::start_yaml(&c.yaml()).await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    let before: Vec<_> = h.shared().snapshot.load().pools["p"].backends.clone();

    c.store.expire();
    wait_for("410 seen", Duration::from_secs(5), || async {
        let m = metrics(&h).await;
        metric(
            &m,
            "apilb_discovery_errors_total{pool=\"p\",reason=\"gone\"}",
        )
        .map(|_| ())
    })
    .await;
    // The relisted watch still follows changes.
    c.set(&[1, 2, 3, 4], &[]);
    wait_members(&h, &c, &[1, 2, 3, 4], "discovery").await;
    let after = h.shared().snapshot.load().pools["p"].backends.clone();
    for b in &before {
        let kept = after.iter().find(|a| a.server == b.server).unwrap();
        assert!(
            Arc::ptr_eq(b, kept),
            "{} kept across the relist",
            b.server.key
        );
        assert_eq!(kept.since(), b.since(), "{} never flapped", b.server.key);
    }
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn continuous_connections_through_tcp_frontend_while_the_set_changes() {
    let c = Cluster::new().await;
    c.set(&[1, 2, 3], &[]);
    let h = common::start_yaml(&c.yaml()).await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    let fe = common::fe(&h);
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (ok, failed, stop, tls) = (ok.clone(), failed.clone(), stop.clone(), c.client());
        clients.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match https_get(fe, "/version", tls.clone()).await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Relaxed),
                    _ => failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for (set, not_ready) in [
        (&[1, 2, 3, 4][..], &[][..]),
        (&[2, 3, 4], &[]),
        (&[2, 3, 4], &[2]),
        (&[1, 3, 4], &[]),
        (&[1, 2, 3], &[]),
    ] {
        c.set(set, not_ready);
        let want: Vec<usize> = set
            .iter()
            .copied()
            .filter(|i| !not_ready.contains(i))
            .collect();
        wait_members(&h, &c, &want, "discovery").await;
    }
    stop.cancel();
    for t in clients {
        t.await.unwrap();
    }
    assert!(ok.load(Relaxed) > 50, "{} requests", ok.load(Relaxed));
    assert_eq!(failed.load(Relaxed), 0, "failures while the set changed");
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_yaml_reload_and_discovery_compose() {
    let c = Cluster::new().await;
    c.set(&[1, 2, 3], &[]);
    let path = c.pki.dir.path().join("apilb.yaml");
    std::fs::write(&path, c.yaml()).unwrap();
    let h = common::start_file(&path).await;
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    let before = h.shared().snapshot.load().pools["p"].backends.clone();

    // A new seed in the file: discovery's members stay, with their health.
    let reseeded = c
        .yaml()
        .replace(&c.addr(1).to_string(), &c.addr(4).to_string());
    common::write_atomic(&path, &reseeded);
    h.reload().await.unwrap();
    wait_members(&h, &c, &[1, 2, 3], "discovery").await;
    let after = h.shared().snapshot.load().pools["p"].backends.clone();
    assert!(before.iter().zip(&after).all(|(b, a)| Arc::ptr_eq(b, a)));

    // Discovery still changes the members after the reload.
    c.set(&[2, 3], &[]);
    wait_members(&h, &c, &[2, 3], "discovery").await;

    // Without the discovery section the file's seeds are the pool again.
    let plain = reseeded.split("    discovery:").next().unwrap().to_string();
    common::write_atomic(&path, &plain);
    h.reload().await.unwrap();
    wait_members(&h, &c, &[4], "seeds").await;
    let m = metrics(&h).await;
    assert_eq!(
        metric(&m, "apilb_discovery_endpoints{pool=\"p\"}"),
        None,
        "gauge dropped"
    );
    h.shutdown();
    h.wait().await;
}
