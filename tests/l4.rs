//! L4 proxying through the real daemon (in-process) over loopback sockets.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn round_robin_300_connections_land_100_each() {
    let b = [
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    ];
    let addrs: Vec<_> = b.iter().map(|x| x.addr).collect();
    let h = start_yaml(&l4_yaml(&addrs, "    health:\n      check: none\n")).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (mut s, name) = echo_connect(fe(&h)).await.unwrap();
        echo_roundtrip(&mut s, "x").await.unwrap();
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&100), "{counts:?}");
    assert_eq!(
        [b[0].accepted(), b[1].accepted(), b[2].accepted()],
        [100, 100, 100]
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn least_connections_sends_to_fewest_open() {
    let b = [
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    ];
    let addrs: Vec<_> = b.iter().map(|x| x.addr).collect();
    let h = start_yaml(&l4_yaml(
        &addrs,
        "    balance: least-connections\n    health:\n      check: none\n",
    ))
    .await;
    // Three connections held open land on three different servers.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(echo_connect(fe(&h)).await.unwrap());
    }
    let mut names: Vec<_> = held.iter().map(|(_, n)| n.clone()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    // Two more on top of "a" and "b" by closing "c"'s and re-opening: the new
    // one must go to "c", the only server with nothing open.
    let idx_c = held.iter().position(|(_, n)| n == "c").unwrap();
    let (s, _) = held.remove(idx_c);
    drop(s);
    wait_for(
        "c's connection to close",
        Duration::from_secs(5),
        || async { (b[2].open.load(std::sync::atomic::Ordering::Relaxed) == 0).then_some(()) },
    )
    .await;
    wait_for(
        "apilb to count c's close",
        Duration::from_secs(5),
        || async {
            let snap = h.shared().snapshot.load();
            (snap.pools["p"].backends[2].active() == 0).then_some(())
        },
    )
    .await;
    let (_s2, name) = echo_connect(fe(&h)).await.unwrap();
    assert_eq!(name, "c");
    // Now a:1 b:1 c:1 — open an extra to a's side and check the next avoids it.
    let mut extra = Vec::new();
    for _ in 0..3 {
        extra.push(echo_connect(fe(&h)).await.unwrap());
    }
    let mut names: Vec<_> = extra.iter().map(|(_, n)| n.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "b", "c"],
        "each round of ties covers all three"
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn closed_port_200_connections_all_succeed() {
    let a = EchoBackend::start("a").await;
    let c = EchoBackend::start("c").await;
    let dead = closed_port().await;
    let h = start_yaml(&l4_yaml(
        &[a.addr, dead, c.addr],
        "    health:\n      check: tcp\n      interval: 30s\n      timeout: 1s\n",
    ))
    .await;
    for i in 0..200 {
        let (mut s, name) = echo_connect(fe(&h))
            .await
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        assert!(name == "a" || name == "c");
        echo_roundtrip(&mut s, "ping").await.unwrap();
    }
    let (_, body) = admin_get(h.admin_addr().unwrap(), "/metrics").await;
    let fails = metric(
        &body,
        &format!("apilb_backend_connect_failures_total{{pool=\"p\",server=\"{dead}\"}}"),
    )
    .unwrap();
    assert!(fails >= 1.0, "the dead server was tried and counted");
    // Passive health took it down (fall 3 by default) so it is no longer tried.
    assert!(
        fails <= 5.0,
        "passive health stops retrying a dead server: {fails}"
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn mtls_passes_through_and_backend_sees_client_cn() {
    let pki = Pki::new();
    let mut opts = pki.fake_options("api-1");
    opts.client_ca_pem = Some(pki.ca.cert_pem.clone());
    opts.require_client_cert = true;
    let fake = apilb::demo::FakeApiserver::start(opts).await.unwrap();
    let h = start_yaml(&l4_yaml(&[fake.addr()], "    health:\n      check: tcp\n")).await;
    let alice = pki.ca.client("alice", Some("dev")).unwrap();
    let r = https_get(fe(&h), "/whoami", pki.client_config(Some(&alice)))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["client_cn"], "alice");
    assert_eq!(fake.last_client_cn().as_deref(), Some("alice"));
    // Without a certificate the backend's own TLS refuses: nothing in between.
    assert!(https_get(fe(&h), "/whoami", pki.client_config(None))
        .await
        .is_err());
    h.shutdown();
    h.wait().await;
}

/// 64 KiB of deterministic pseudo-random bytes, chunk `i` of stream `seed`.
fn chunk(seed: u8, i: u64) -> Vec<u8> {
    let mut out = vec![0u8; 64 * 1024];
    fastrand::Rng::with_seed(((seed as u64) << 56) ^ i).fill(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_256_mib_each_way_is_byte_identical() {
    bulk_each_way(false).await;
}

/// `splice: true`: bulk moves through pipes (splice(2)), small messages
/// through the buffer, switching as the transfer goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_256_mib_each_way_is_byte_identical_with_splice() {
    bulk_each_way(true).await;
}

async fn bulk_each_way(splice: bool) {
    const CHUNKS: u64 = 256 * 16; // 64 KiB each
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = listener.local_addr().unwrap();
    // Backend: hashes what it receives while sending its own stream.
    let backend = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let send = tokio::spawn(async move {
            let mut h = Sha256::new();
            for i in 0..CHUNKS {
                let c = chunk(2, i);
                h.update(&c);
                w.write_all(&c).await.unwrap();
            }
            w.shutdown().await.unwrap();
            h.finalize().to_vec()
        });
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            n += k as u64;
            h.update(&buf[..k]);
        }
        (n, h.finalize().to_vec(), send.await.unwrap())
    });
    let yaml = l4_yaml(&[baddr], "    health:\n      check: none\n");
    let yaml = if splice {
        yaml.replace("    pool: p\n", "    pool: p\n    splice: true\n")
    } else {
        yaml
    };
    let h = start_yaml(&yaml).await;
    let s = TcpStream::connect(fe(&h)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let send = tokio::spawn(async move {
        let mut h = Sha256::new();
        for i in 0..CHUNKS {
            let c = chunk(1, i);
            h.update(&c);
            w.write_all(&c).await.unwrap();
        }
        w.shutdown().await.unwrap();
        h.finalize().to_vec()
    });
    let mut hr = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got += k as u64;
        hr.update(&buf[..k]);
    }
    let sent_hash = send.await.unwrap();
    let (backend_got, backend_hash, backend_sent_hash) = backend.await.unwrap();
    assert_eq!(backend_got, CHUNKS * 64 * 1024);
    assert_eq!(got, CHUNKS * 64 * 1024);
    assert_eq!(backend_hash, sent_hash, "client -> backend bytes differ");
    assert_eq!(
        hr.finalize().to_vec(),
        backend_sent_hash,
        "backend -> client bytes differ"
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn half_closed_client_still_receives_whole_response() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Read the whole request (until the client's FIN), then answer 4 MiB.
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request-body");
        for i in 0..64u64 {
            s.write_all(&chunk(3, i)).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let h = start_yaml(&l4_yaml(&[baddr], "    health:\n      check: none\n")).await;
    let mut s = TcpStream::connect(fe(&h)).await.unwrap();
    s.write_all(b"request-body").await.unwrap();
    s.shutdown().await.unwrap(); // FIN: we are done sending
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let want: Vec<u8> = (0..64u64).flat_map(|i| chunk(3, i)).collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "response bytes differ");
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn max_connections_closes_the_extra_one_and_keeps_the_rest() {
    let a = EchoBackend::start("a").await;
    let yaml = l4_yaml(&[a.addr], "    health:\n      check: none\n")
        .replace("    pool: p\n", "    pool: p\n    max_connections: 5\n");
    let h = start_yaml(&yaml).await;
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(echo_connect(fe(&h)).await.unwrap().0);
    }
    // The sixth is closed at once without reaching the backend.
    let mut extra = TcpStream::connect(fe(&h)).await.unwrap();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut b))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the extra connection must be closed, got {n:?}"
    );
    assert_eq!(a.accepted(), 5);
    for s in &mut open {
        echo_roundtrip(s, "still here").await.unwrap();
    }
    let (_, body) = admin_get(h.admin_addr().unwrap(), "/metrics").await;
    assert_eq!(
        metric(
            &body,
            "apilb_frontend_rejected_connections_total{frontend=\"fe\",reason=\"max_connections\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&body, "apilb_frontend_active_connections{frontend=\"fe\"}"),
        Some(5.0)
    );
    // A slot frees when one closes.
    drop(open.pop());
    wait_for("a slot to free", Duration::from_secs(5), || async {
        (h.shared().snapshot.load().frontends["fe"]
            .stats
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 4)
            .then_some(())
    })
    .await;
    let (mut s, _) = echo_connect(fe(&h)).await.unwrap();
    echo_roundtrip(&mut s, "again").await.unwrap();
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn garbage_passes_through_and_nothing_breaks() {
    let pki = Pki::new();
    let fakes = pki.fakes(1).await;
    let h = start_yaml(&l4_yaml(
        &[fakes[0].addr()],
        "    health:\n      check: tcp\n",
    ))
    .await;
    for junk in [
        &b"\x00\xff\x16\x03garbage-not-tls\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x16u8; 100_000][..],
    ] {
        let mut s = TcpStream::connect(fe(&h)).await.unwrap();
        let _ = s.write_all(junk).await;
        let mut sink = Vec::new();
        // The fake's TLS stack rejects it and closes; apilb relays the close.
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "the connection must end, not hang");
    }
    let r = https_get(fe(&h), "/version", pki.client_config(None))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "apilb still serves after garbage");
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_hung_backend_holds_only_its_own_clients() {
    let pki = Pki::new();
    let fakes = pki.fakes(3).await;
    fakes[1].set_hang(true);
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&l4_yaml(&addrs, "    health:\n      check: none\n")).await;
    let tls = pki.client_config(None);
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (addr, tls) = (fe(&h), tls.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(3), https_get(addr, "/whoami", tls)).await
        }));
    }
    let (mut ok, mut hung) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(Ok(r)) => {
                assert_ne!(r.server.as_deref(), Some("api-2"));
                ok += 1;
            }
            Ok(Err(e)) => panic!("unexpected error: {e}"),
            Err(_) => hung += 1,
        }
    }
    assert_eq!(
        (ok, hung),
        (20, 10),
        "round-robin: a third hang, the rest are served"
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn kubectl_get_raw_version_through_apilb() {
    let Some(kubectl) = require_tool("kubectl") else {
        return;
    };
    let pki = Pki::new();
    let fakes = pki.fakes(3).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&l4_yaml(&addrs, "    health:\n      check: tcp\n")).await;
    let kc = pki.dir.path().join("kubeconfig");
    apilb::demo::write_kubeconfig(
        &kc,
        &format!("https://{}", fe(&h)),
        &pki.ca_file,
        "test-token",
    )
    .unwrap();
    let out = kubectl_raw(&kubectl, &kc, "/version").await;
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gitVersion"], apilb::demo::fake::FAKE_GIT_VERSION);
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn accept_errors_back_off_and_the_listener_survives_emfile() {
    let a = EchoBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("apilb.yaml");
    std::fs::write(&cfg, l4_yaml(&[a.addr], "    health:\n      check: none\n")).unwrap();
    // 64 descriptors: a few dozen proxied connections exhaust them.
    let d = Daemon::start_with_nofile(&cfg, 64);
    let addr = d.frontend_addr("fe").await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let line = d.wait_log("accept failed; backing off", None).await;
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("Too many open files"),
        "{line}"
    );
    drop(held);
    // Descriptors free up: the same listener serves again.
    wait_for("apilb to serve again", Duration::from_secs(10), || async {
        match echo_connect(addr).await {
            Ok((mut s, _)) => echo_roundtrip(&mut s, "back").await.ok(),
            Err(_) => None,
        }
    })
    .await;
    for i in 0..20 {
        let (mut s, _) = echo_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        echo_roundtrip(&mut s, "ok").await.unwrap();
    }
}
