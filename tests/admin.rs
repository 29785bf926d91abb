//! The admin server and metrics: endpoints, bad requests, series lifecycle,
//! `promtool check metrics`, and a real Prometheus scraping apilb.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn pool_cfg(pki: &Pki, servers: &[SocketAddr]) -> String {
    l4_yaml(
        servers,
        &format!(
            "    health:\n      check: https\n      interval: 500ms\n      timeout: 250ms\n      rise: 1\n      fall: 2\n      tls:\n        ca_file: {}\n",
            pki.ca_file.display()
        ),
    )
}

#[tokio::test]
async fn admin_endpoints_answer_and_refuse_what_they_should() {
    let pki = Pki::new();
    let fakes = pki.fakes(2).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&pool_cfg(&pki, &addrs)).await;
    let admin = h.admin_addr().unwrap();

    assert_eq!(
        admin_get(admin, "/healthz").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    let (code, body) = admin_get(admin, "/nope").await;
    assert_eq!(code, 404, "{body}");
    // The admin port never proxies: an absolute-form proxy request is a 404 too.
    assert_eq!(
        admin_get(admin, &format!("http://{}/version", addrs[0]))
            .await
            .0,
        404
    );
    for m in ["POST", "PUT", "DELETE"] {
        assert_eq!(admin_request(admin, m, "/metrics").await.0, 405, "{m}");
    }

    // /status: frontends, pools, each backend's state and last probe.
    let s: serde_json::Value = wait_for(
        "a probe result in /status",
        Duration::from_secs(5),
        || async {
            let (_, body) = admin_get(admin, "/status").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["pools"][0]["backends"][1]["last_probe"]["ok"]
                .as_bool()
                .map(|_| v)
        },
    )
    .await;
    assert_eq!(s["frontends"][0]["name"], "fe");
    assert_eq!(s["frontends"][0]["bound"], fe(&h).to_string());
    let b = &s["pools"][0]["backends"][1];
    assert_eq!(b["server"], addrs[1].to_string());
    assert_eq!(b["state"], "up");
    assert!(b["since"].as_u64().unwrap() > 1_700_000_000);
    assert!(b["last_probe"]["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(b["last_probe"]["detail"], "status 200");

    // /readyz turns 503 with the reason when a pool has no up backend.
    for f in &fakes {
        f.set_ready(500);
    }
    let (code, body) = wait_for("/readyz to fail", Duration::from_secs(5), || async {
        let r = admin_get(admin, "/readyz").await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("pool p has no up backend"), "{body}");
    let (_, status) = admin_get(admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["pools"][0]["all_down"], true);
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn every_contract_metric_is_exported_and_removed_backends_lose_their_series() {
    let pki = Pki::new();
    let fakes = pki.fakes(3).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    write_atomic(&path, &pool_cfg(&pki, &addrs));
    let h = start_file(&path).await;
    let admin = h.admin_addr().unwrap();
    // Some traffic so counters and histograms have samples.
    for _ in 0..3 {
        https_get(fe(&h), "/version", pki.client_config(None))
            .await
            .unwrap();
    }
    let (_, m) = admin_get(admin, "/metrics").await;
    for name in [
        "apilb_backend_up{",
        "apilb_backend_active_connections{",
        "apilb_backend_connections_total{",
        "apilb_backend_connect_failures_total{",
        "apilb_backend_bytes_total{",
        "apilb_backend_connect_duration_seconds_bucket{",
        "apilb_health_checks_total{",
        "apilb_health_check_duration_seconds_bucket{",
        "apilb_frontend_connections_total{",
        "apilb_frontend_active_connections{",
        "apilb_config_last_reload_successful ",
        "apilb_config_last_reload_success_timestamp_seconds ",
        "apilb_build_info{",
        "apilb_pool_up_backends{",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}");
    }
    let srv = addrs[2].to_string();
    assert!(m.contains(&format!("server=\"{srv}\"")));
    // Remove the third server: its series go.
    write_atomic(&path, &pool_cfg(&pki, &addrs[..2]));
    wait_for("the reload", Duration::from_secs(5), || async {
        (reloads(&h).0 >= 1).then_some(())
    })
    .await;
    let (_, m) = admin_get(admin, "/metrics").await;
    assert!(
        !m.contains(&format!("server=\"{srv}\"")),
        "series of a removed backend remain"
    );
    assert!(m.contains(&format!("server=\"{}\"", addrs[0])));

    if let Some(promtool) = require_tool("promtool") {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.trim().is_empty(),
            "promtool check metrics:\n{text}"
        );
    }
    h.shutdown();
    h.wait().await;
}

/// A Prometheus server of our own, killed on drop.
struct Prom(Child);

impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `apilb_backend_up` per server as Prometheus reports it.
async fn prom_backend_up(prom: SocketAddr) -> Vec<(String, String)> {
    let Ok((200, body)) = try_http(prom, "GET", "/api/v1/query?query=apilb_backend_up").await
    else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = v["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["metric"]["server"].as_str().unwrap_or("").to_string(),
                r["value"][1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_backends_go_down() {
    let Some(prometheus) = require_tool("prometheus") else {
        return;
    };
    let pki = Pki::new();
    let fakes = pki.fakes(3).await;
    let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
    let h = start_yaml(&pool_cfg(&pki, &addrs)).await;
    let admin = h.admin_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: apilb\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let web = closed_port().await;
    let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let prom = Prom(
        Command::new(prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut want: Vec<(String, String)> = addrs
        .iter()
        .map(|a| (a.to_string(), "1".to_string()))
        .collect();
    want.sort();
    wait_for(
        "Prometheus to show three backends up",
        Duration::from_secs(60),
        || async { (prom_backend_up(web).await == want).then_some(()) },
    )
    .await;
    fakes[1].kill();
    let dead = addrs[1].to_string();
    wait_for(
        "Prometheus to show the killed backend at 0",
        Duration::from_secs(30),
        || async {
            let v = prom_backend_up(web).await;
            v.iter()
                .any(|(s, val)| *s == dead && val == "0")
                .then_some(())
        },
    )
    .await;
    let v = prom_backend_up(web).await;
    assert_eq!(v.iter().filter(|(_, val)| val == "1").count(), 2, "{v:?}");
    drop(prom);
    h.shutdown();
    h.wait().await;
}

/// The servers that carry a series of `family` in one scrape.
fn servers_in(text: &str, family: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter_map(|l| {
            l.split("server=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(String::from)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_reloads_sees_a_consistent_set_of_series() {
    let b: Vec<EchoBackend> = vec![
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    ];
    let all: Vec<SocketAddr> = b.iter().map(|x| x.addr).collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    let text = |n: usize| l4_yaml(&all[..n], "    health:\n      check: none\n");
    write_atomic(&path, &text(3));
    let h = start_file(&path).await;
    let admin = h.admin_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut scrapes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (_, m) = admin_get(admin, "/metrics").await;
                let up = servers_in(&m, "apilb_backend_up");
                for family in [
                    "apilb_backend_active_connections",
                    "apilb_backend_connections_total",
                    "apilb_backend_bytes_total",
                    "apilb_health_checks_total",
                ] {
                    assert_eq!(
                        servers_in(&m, family),
                        up,
                        "{family} disagrees with apilb_backend_up in one scrape"
                    );
                }
                assert!(up.len() == 2 || up.len() == 3, "{up:?}");
                scrapes += 1;
            }
            scrapes
        })
    };
    for i in 0..20u64 {
        write_atomic(&path, &text(if i % 2 == 0 { 2 } else { 3 }));
        wait_for("the reload", Duration::from_secs(5), || async {
            (reloads(&h).0 > i).then_some(())
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.await.unwrap();
    assert!(scrapes >= 20, "scraped during the reloads ({scrapes})");
    h.shutdown();
    h.wait().await;
}
