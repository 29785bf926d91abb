//! Health checking against fake apiservers: /readyz transitions within their
//! bounds, hung and killed backends, TLS verification failures, fail-open.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const INTERVAL_MS: u64 = 500;
const TIMEOUT_MS: u64 = 200;
const RISE: u64 = 2;
const FALL: u64 = 2;

fn https_health(pki: &Pki, extra: &str) -> String {
    format!(
        "    health:\n      check: https\n      path: /readyz\n      interval: {INTERVAL_MS}ms\n      timeout: {TIMEOUT_MS}ms\n      rise: {RISE}\n      fall: {FALL}\n{extra}      tls:\n        ca_file: {}\n        server_name: kubernetes\n",
        pki.ca_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_failure_stops_new_connections_within_bound_and_recovery_returns_them() {
    let pki = Pki::new();
    let fakes = pki.fakes(3).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&l4_yaml(&addrs, &https_health(&pki, ""))).await;
    let tls = pki.client_config(None);
    // Let every backend pass a probe first.
    wait_for("first probes", Duration::from_secs(5), || async {
        let s = h.shared().snapshot.load();
        s.pools["p"]
            .backends
            .iter()
            .all(|b| b.metrics.checks_ok.get() >= 1)
            .then_some(())
    })
    .await;

    let down_bound = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS);
    let t0 = Instant::now();
    fakes[1].set_ready(500);
    let mut last_hit = None;
    let mut after = 0;
    while t0.elapsed() < down_bound + Duration::from_secs(2) {
        let started = t0.elapsed();
        let r = https_get(fe(&h), "/whoami", tls.clone()).await.unwrap();
        if r.server.as_deref() == Some("api-2") {
            last_hit = Some(started);
        } else if started > down_bound + Duration::from_secs(1) {
            after += 1;
        }
    }
    let last_hit = last_hit.expect("api-2 served before it was marked down");
    assert!(
        last_hit <= down_bound + Duration::from_secs(1),
        "api-2 got a new connection {last_hit:?} after /readyz failed; bound {down_bound:?} + 1s"
    );
    assert!(
        after >= 10,
        "enough connections after the bound to prove it ({after})"
    );
    assert!(!backend_up(&h, "p", 1));

    let up_bound = Duration::from_millis(RISE * INTERVAL_MS) + Duration::from_secs(1);
    let t1 = Instant::now();
    fakes[1].set_ready(200);
    let first = loop {
        let started = t1.elapsed();
        assert!(
            started < up_bound + Duration::from_secs(2),
            "api-2 never came back"
        );
        let r = https_get(fe(&h), "/whoami", tls.clone()).await.unwrap();
        if r.server.as_deref() == Some("api-2") {
            break started;
        }
    };
    assert!(
        first <= up_bound,
        "api-2 came back after {first:?}; bound {up_bound:?}"
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_hung_backend_goes_down_by_probe_timeout() {
    let pki = Pki::new();
    let fakes = pki.fakes(2).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&l4_yaml(&addrs, &https_health(&pki, ""))).await;
    fakes[0].set_hang(true);
    let bound = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS) + Duration::from_secs(1);
    wait_for("the hung backend to go down", bound, || async {
        (!backend_up(&h, "p", 0)).then_some(())
    })
    .await;
    let (_, status) = admin_get(h.admin_addr().unwrap(), "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let b = &v["pools"][0]["backends"][0];
    assert_eq!(b["state"], "down");
    assert_eq!(b["last_probe"]["detail"], "timeout after 200ms", "{b}");
    assert!(backend_up(&h, "p", 1), "the other backend is untouched");
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_killed_backend_ends_its_streams_and_new_connections_all_succeed() {
    let pki = Pki::new();
    let fakes = pki.fakes(3).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&l4_yaml(&addrs, &https_health(&pki, ""))).await;
    let tls = pki.client_config(None);
    let mut streams = Vec::new();
    for _ in 0..6 {
        let (server, mut body) = https_stream(fe(&h), "/api/v1/namespaces?watch=true", tls.clone())
            .await
            .unwrap();
        assert!(next_frame(&mut body, Duration::from_secs(5))
            .await
            .is_some());
        streams.push((server.unwrap(), body));
    }
    fakes[0].kill();
    for (server, body) in &mut streams {
        // The killed server's streams end; the others keep delivering events.
        let mut ended = false;
        for _ in 0..5 {
            if next_frame(body, Duration::from_secs(5)).await.is_none() {
                ended = true;
                break;
            }
        }
        assert_eq!(
            ended,
            server == "api-1",
            "stream from {server}: ended={ended}"
        );
    }
    for i in 0..200 {
        let r = https_get(fe(&h), "/version", tls.clone())
            .await
            .unwrap_or_else(|e| panic!("request {i} after the kill failed: {e}"));
        assert_eq!(r.status, 200);
        assert_ne!(r.server.as_deref(), Some("api-1"));
    }
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn close_after_down_cuts_connections_to_a_hung_backend() {
    let pki = Pki::new();
    let fakes = pki.fakes(1).await;
    let h = start_yaml(&l4_yaml(
        &[fakes[0].addr()],
        &https_health(&pki, "      close_after_down: 1s\n"),
    ))
    .await;
    let tls = pki.client_config(None);
    let (_, mut body) = https_stream(fe(&h), "/api/v1/namespaces?watch=true", tls)
        .await
        .unwrap();
    assert!(next_frame(&mut body, Duration::from_secs(5))
        .await
        .is_some());
    // New probe connections hang: the backend goes down, and 1 s later
    // apilb closes the client's stream although the fake still sends.
    fakes[0].set_hang(true);
    let t = Instant::now();
    while next_frame(&mut body, Duration::from_secs(10))
        .await
        .is_some()
    {
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "stream was never closed"
        );
    }
    let took = t.elapsed();
    let min = Duration::from_millis(FALL * INTERVAL_MS - INTERVAL_MS) + Duration::from_secs(1);
    assert!(
        took >= min,
        "closed only after down + close_after_down ({took:?})"
    );
    h.shutdown();
    h.wait().await;
}

/// Probes verify against a CA that did not sign the servers: every probe fails
/// naming the TLS error. try-all keeps traffic flowing; reject closes.
#[tokio::test]
async fn ca_mismatch_fails_probes_loudly_and_policy_decides_traffic() {
    let pki = Pki::new();
    let other = apilb::demo::Ca::new("some-other-ca").unwrap();
    let other_ca = other.write(pki.dir.path(), "other-ca").unwrap();
    let fakes = pki.fakes(2).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    for policy in ["try-all", "reject"] {
        let health = https_health(&pki, "").replace(
            &pki.ca_file.display().to_string(),
            &other_ca.display().to_string(),
        );
        let cfg = pki.dir.path().join(format!("{policy}.yaml"));
        std::fs::write(
            &cfg,
            l4_yaml(&addrs, &format!("    when_all_down: {policy}\n{health}")),
        )
        .unwrap();
        let d = Daemon::start(&cfg);
        let addr = d.frontend_addr("fe").await;
        let down = d.wait_log("backend down", None).await;
        let reason = down["reason"].as_str().unwrap();
        assert!(
            reason.contains("invalid peer certificate") && reason.contains("UnknownIssuer"),
            "{reason}"
        );
        wait_for("the all-down warning", Duration::from_secs(5), || async {
            d.logs()
                .contains("no backend of the pool is up")
                .then_some(())
        })
        .await;
        wait_for("both backends down", Duration::from_secs(5), || async {
            d.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("\"backend down\""))
                .count()
                .eq(&2)
                .then_some(())
        })
        .await;
        match policy {
            "try-all" => {
                for _ in 0..10 {
                    let r = https_get(addr, "/version", pki.client_config(None))
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "fail open: traffic still flows");
                }
            }
            _ => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut b = [0u8; 1];
                let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                    .await
                    .unwrap();
                assert!(
                    matches!(r, Ok(0) | Err(_)),
                    "reject closes new connections: {r:?}"
                );
                assert!(https_get(addr, "/version", pki.client_config(None))
                    .await
                    .is_err());
            }
        }
        let admin = d.admin_addr().await;
        let (_, m) = admin_get(admin, "/metrics").await;
        assert_eq!(metric(&m, "apilb_pool_all_down{pool=\"p\"}"), Some(1.0));
        assert_eq!(metric(&m, "apilb_pool_up_backends{pool=\"p\"}"), Some(0.0));
        let failures = metric(
            &m,
            &format!(
                "apilb_health_checks_total{{pool=\"p\",result=\"failure\",server=\"{}\"}}",
                addrs[0]
            ),
        )
        .unwrap();
        assert!(failures >= 2.0);
        assert_eq!(
            d.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("no backend of the pool is up"))
                .count(),
            1,
            "the all-down warning is logged once per transition"
        );
    }
}

#[tokio::test]
async fn an_unreadable_ca_file_fails_probes_without_crashing() {
    let pki = Pki::new();
    let fakes = pki.fakes(1).await;
    let ca_copy = pki.dir.path().join("ca-copy.crt");
    std::fs::copy(&pki.ca_file, &ca_copy).unwrap();
    let health = https_health(&pki, "").replace(
        &pki.ca_file.display().to_string(),
        &ca_copy.display().to_string(),
    );
    let h = start_yaml(&l4_yaml(&[fakes[0].addr()], &health)).await;
    wait_for("a passing probe", Duration::from_secs(5), || async {
        (h.shared().snapshot.load().pools["p"].backends[0]
            .metrics
            .checks_ok
            .get()
            >= 1)
            .then_some(())
    })
    .await;
    std::fs::remove_file(&ca_copy).unwrap();
    wait_for("the backend to go down", Duration::from_secs(5), || async {
        (!backend_up(&h, "p", 0)).then_some(())
    })
    .await;
    let (_, status) = admin_get(h.admin_addr().unwrap(), "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let detail = v["pools"][0]["backends"][0]["last_probe"]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("tls.ca_file") && detail.contains("ca-copy.crt"),
        "{detail}"
    );
    // Put it back: probes recover.
    std::fs::copy(&pki.ca_file, &ca_copy).unwrap();
    wait_for(
        "the backend to come back",
        Duration::from_secs(5),
        || async { backend_up(&h, "p", 0).then_some(()) },
    )
    .await;
    h.shutdown();
    h.wait().await;
}
