//! Passive health sees only what the backend did: apilb's own faults
//! (descriptor exhaustion, a wrong upstream CA) never take a backend down,
//! and they are counted in `apilb_local_errors_total{reason}` instead.

mod common;

use std::time::Duration;

use common::*;
use tokio::net::TcpStream;

/// Under a 64-descriptor limit, connects to the backend fail with EMFILE.
/// With `fall: 1`, one such failure counted against the backend would take
/// it down; it must stay up and the fault must be counted as local.
#[tokio::test]
async fn emfile_on_upstream_connect_never_marks_the_backend_down() {
    let a = EchoBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("apilb.yaml");
    let health = "    health:\n      check: tcp\n      interval: 1m\n      timeout: 5s\n      rise: 1\n      fall: 1\n";
    std::fs::write(&cfg, l4_yaml(&[a.addr], health)).unwrap();
    let d = Daemon::start_with_nofile(&cfg, 64);
    let addr = d.frontend_addr("fe").await;
    let admin = d.admin_addr().await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let line = d
        .wait_log(
            "local error reaching a backend; not counted against it",
            None,
        )
        .await;
    assert_eq!(line["reason"], "fd_limit", "{line}");
    drop(held);
    wait_for("apilb to serve again", Duration::from_secs(10), || async {
        match echo_connect(addr).await {
            Ok((mut s, _)) => echo_roundtrip(&mut s, "back").await.ok(),
            Err(_) => None,
        }
    })
    .await;
    assert!(
        d.find("backend down", None).is_none(),
        "a local EMFILE took the backend down:\n{}",
        d.logs()
    );
    let (_, text) = admin_get(admin, "/metrics").await;
    let up = format!("apilb_backend_up{{pool=\"p\",server=\"{}\"}}", a.addr);
    assert_eq!(metric(&text, &up), Some(1.0), "{text}");
    let local = metric(&text, "apilb_local_errors_total{reason=\"fd_limit\"}").unwrap_or(0.0);
    assert!(local >= 1.0, "fd_limit not counted:\n{text}");
}

/// A wrong `pools[].tls.ca_file` breaks the L7 frontend's upstream TLS, but
/// the probe (with the right `health.tls`) says the backends are fine: the
/// L4 frontend of the same pool keeps working even with
/// `when_all_down: reject`, which would close it if the TLS failures had
/// taken the backends down.
#[tokio::test]
async fn upstream_certificate_errors_do_not_feed_passive_health() {
    let pki = Pki::new();
    let other = apilb::demo::Ca::new("some-other-ca").unwrap();
    let wrong_ca = other.write(pki.dir.path(), "other-ca").unwrap();
    let fakes = pki.fakes(2).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let dir = pki.dir.path();
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 2s\nfrontends:\n\
         \x20 - name: l4\n    listen: 127.0.0.1:0\n    pool: p\n\
         \x20 - name: l7\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    tls:\n      cert_file: {}\n      key_file: {}\n\
         pools:\n  - name: p\n    when_all_down: reject\n    servers:\n{}    tls:\n      ca_file: {}\n      server_name: kubernetes\n\
         \x20   health:\n      check: https\n      interval: 200ms\n      timeout: 150ms\n      rise: 1\n      fall: 2\n      tls:\n        ca_file: {}\n        server_name: kubernetes\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display(),
        servers_yaml(&addrs),
        wrong_ca.display(),
        pki.ca_file.display(),
    );
    let h = start_yaml(&yaml).await;
    let snap = h.shared().snapshot.load();
    let l7 = snap.frontends["l7"].bound;
    let l4 = snap.frontends["l4"].bound;
    drop(snap);
    // 20 L7 requests, each trying both servers: 40 certificate failures.
    for i in 0..20 {
        let r = https_get(l7, "/version", pki.client_config(None))
            .await
            .unwrap();
        assert_eq!(r.status, 502, "request {i}: the upstream CA is wrong");
    }
    let m = String::from_utf8(h.shared().metrics.render()).unwrap();
    let local = metric(&m, "apilb_local_errors_total{reason=\"tls_verify\"}").unwrap_or(0.0);
    assert!(local >= 20.0, "tls_verify counted {local}:\n{m}");
    assert!(backend_up(&h, "p", 0) && backend_up(&h, "p", 1));
    // The L4 frontend of the same pool still reaches the apiservers.
    for i in 0..10 {
        let r = https_get(l4, "/version", pki.client_config(None))
            .await
            .unwrap_or_else(|e| panic!("l4 request {i}: {e}"));
        assert_eq!(r.status, 200);
    }
    h.shutdown();
    h.wait().await;
}
