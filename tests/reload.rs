//! Hot reload: file changes and SIGHUP applied in place, open connections
//! untouched, bad configs refused with the old one still serving.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::net::TcpStream;

/// A two-frontend-capable config: `fe` (and optionally `fe2`) over `servers`.
fn cfg(servers: &[SocketAddr], balance: &str, extra_frontend: Option<&str>) -> String {
    let mut y = String::from(
        "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 2s\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    pool: p\n",
    );
    if let Some(listen) = extra_frontend {
        y.push_str(&format!(
            "  - name: fe2\n    listen: {listen}\n    pool: p\n"
        ));
    }
    y.push_str(&format!(
        "pools:\n  - name: p\n    balance: {balance}\n    servers:\n{}    health:\n      check: tcp\n      interval: 200ms\n      timeout: 100ms\n",
        servers_yaml(servers)
    ));
    y
}

async fn wait_successes(h: &apilb::Handle, n: u64) {
    wait_for(
        &format!("{n} successful reloads"),
        Duration::from_secs(10),
        || async { (reloads(h).0 >= n).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing() {
    let backends = [
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
        EchoBackend::start("d").await,
    ];
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    write_atomic(&path, &cfg(&all[..3], "round-robin", None));
    let h = start_file(&path).await;
    let addr = fe(&h);

    // 50 long-lived streams, each echoing its own numbered messages throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for i in 0..50 {
        let stop = stop.clone();
        let (mut s, _) = echo_connect(addr).await.unwrap();
        streams.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                echo_roundtrip(&mut s, &format!("stream {i} message {n}\n"))
                    .await
                    .unwrap_or_else(|e| panic!("stream {i} cut after {n} messages: {e}"));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        }));
    }
    // Short connections from two loops until 2,000 are done and reloads end.
    let done = Arc::new(AtomicUsize::new(0));
    let mut shorts = Vec::new();
    for _ in 0..2 {
        let (done, stop) = (done.clone(), stop.clone());
        shorts.push(tokio::spawn(async move {
            while !stop.load(Relaxed) || done.load(Relaxed) < 2000 {
                let (mut s, _) = echo_connect(addr).await.expect("short connection failed");
                echo_roundtrip(&mut s, "short\n")
                    .await
                    .expect("short connection echo failed");
                done.fetch_add(1, Relaxed);
            }
        }));
    }
    // 50 rewrites: servers added and removed, balance switched.
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..50 {
        let mut set: Vec<SocketAddr> = all.iter().copied().filter(|_| rng.bool()).collect();
        if set.is_empty() {
            set.push(all[i % 4]);
        }
        let balance = if i % 2 == 0 {
            "least-connections"
        } else {
            "round-robin"
        };
        write_atomic(&path, &cfg(&set, balance, None));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_for(
        "the last rewrite to apply",
        Duration::from_secs(5),
        || async {
            let (ok, _) = reloads(&h);
            (ok >= 30).then_some(())
        },
    )
    .await;
    stop.store(true, Relaxed);
    for s in shorts {
        s.await.unwrap();
    }
    let mut messages = 0;
    for s in streams {
        messages += s.await.unwrap();
    }
    assert!(done.load(Relaxed) >= 2000);
    assert!(
        messages >= 50 * 100,
        "streams kept talking through the reloads ({messages})"
    );
    let (ok, failed) = reloads(&h);
    assert_eq!(failed, 0);
    assert!(
        ok >= 30,
        "most rewrites were applied as separate reloads ({ok})"
    );
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_removed_server_gets_no_new_connections_one_second_after_the_write() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    write_atomic(&path, &cfg(&[a.addr, b.addr], "round-robin", None));
    let h = start_file(&path).await;
    // A stream to b opened before the removal keeps working.
    let mut to_b = loop {
        let (s, name) = echo_connect(fe(&h)).await.unwrap();
        if name == "b" {
            break s;
        }
    };
    write_atomic(&path, &cfg(&[a.addr], "round-robin", None));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = b.accepted();
    for _ in 0..100 {
        let (mut s, name) = echo_connect(fe(&h)).await.unwrap();
        assert_eq!(name, "a");
        echo_roundtrip(&mut s, "x").await.unwrap();
    }
    assert_eq!(b.accepted(), before, "b got a connection after its removal");
    echo_roundtrip(&mut to_b, "still flowing\n").await.unwrap();
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn corrupt_writes_are_refused_and_the_old_config_keeps_serving() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let pki = Pki::new();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    let good = cfg(&[a.addr], "round-robin", None);
    write_atomic(&path, &good);
    let h = start_file(&path).await;
    let admin = h.admin_addr().unwrap();
    let missing_ca = format!(
        "{}      tls: {{ca_file: {}}}\n",
        good.replace("check: tcp", "check: https"),
        pki.dir.path().join("nope.crt").display()
    );
    let bad = [
        ("truncated", good[..good.len() / 2].to_string()),
        (
            "unknown key",
            good.replace(
                "shutdown_grace: 2s",
                "shutdown_grace: 2s\nshutdown_grase: 3s",
            ),
        ),
        (
            "duplicate pool",
            format!("{good}  - name: p\n    servers: ['{}']\n", b.addr),
        ),
        ("missing CA file", missing_ca),
        ("empty", String::new()),
    ];
    for (i, (what, text)) in bad.iter().enumerate() {
        write_atomic(&path, text);
        wait_for(
            &format!("{what} to be refused"),
            Duration::from_secs(5),
            || async { (reloads(&h).1 == i as u64 + 1).then_some(()) },
        )
        .await;
        let (_, m) = admin_get(admin, "/metrics").await;
        assert_eq!(
            metric(&m, "apilb_config_last_reload_successful"),
            Some(0.0),
            "{what}"
        );
        assert_eq!(
            metric(&m, "apilb_config_reloads_total{result=\"failure\"}"),
            Some(i as f64 + 1.0)
        );
        let (mut s, name) = echo_connect(fe(&h)).await.unwrap();
        assert_eq!(name, "a", "{what}: the old config still serves");
        echo_roundtrip(&mut s, "ok").await.unwrap();
    }
    let (_, m) = admin_get(admin, "/metrics").await;
    let ts_before = metric(&m, "apilb_config_last_reload_success_timestamp_seconds").unwrap();
    write_atomic(&path, &cfg(&[b.addr], "round-robin", None));
    wait_successes(&h, 1).await;
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "apilb_config_last_reload_successful"), Some(1.0));
    assert!(metric(&m, "apilb_config_last_reload_success_timestamp_seconds").unwrap() >= ts_before);
    wait_serves(fe(&h), "b").await;
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_configmap_style_data_symlink_swap_is_applied() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The kubelet's layout: apilb.yaml -> ..data/apilb.yaml, ..data -> ..<timestamp>
    let v1 = root.join("..2026_11_21_10_00_00.000000001");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("apilb.yaml"), cfg(&[a.addr], "round-robin", None)).unwrap();
    std::os::unix::fs::symlink(v1.file_name().unwrap(), root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/apilb.yaml", root.join("apilb.yaml")).unwrap();
    let h = start_file(&root.join("apilb.yaml")).await;
    assert_eq!(echo_connect(fe(&h)).await.unwrap().1, "a");

    let v2 = root.join("..2026_11_21_10_05_00.000000002");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("apilb.yaml"), cfg(&[b.addr], "round-robin", None)).unwrap();
    std::os::unix::fs::symlink(v2.file_name().unwrap(), root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    wait_successes(&h, 1).await;
    wait_serves(fe(&h), "b").await;
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn sighup_applies_a_file_whose_mtime_did_not_change() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    let (mut old, mut new) = (
        cfg(&[a.addr], "round-robin", None),
        cfg(&[b.addr], "round-robin", None),
    );
    // Same size too (ports may differ in digit count): pad with a comment.
    let width = old.len().max(new.len()) + 2;
    for text in [&mut old, &mut new] {
        let pad = width - text.len() - 1;
        text.push_str(&format!("#{}", "x".repeat(pad)));
    }
    assert_eq!(old.len(), new.len(), "same size too");
    std::fs::write(&path, &old).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    // --no-watch: only the signal can reload, so this proves SIGHUP did it.
    let d = Daemon::start_args(&path, &["--no-watch"]);
    let addr = d.frontend_addr("fe").await;
    assert_eq!(echo_connect(addr).await.unwrap().1, "a");
    std::fs::write(&path, &new).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", None).await;
    let (_, name) = echo_connect(addr).await.unwrap();
    assert_eq!(name, "b");
}

#[tokio::test]
async fn frontends_come_and_go_without_touching_open_streams() {
    let a = EchoBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    write_atomic(&path, &cfg(&[a.addr], "round-robin", None));
    let h = start_file(&path).await;
    // A new frontend appears and serves.
    write_atomic(&path, &cfg(&[a.addr], "round-robin", Some("127.0.0.1:0")));
    wait_successes(&h, 1).await;
    let fe2 = h.frontend_addr("fe2").expect("fe2 listens");
    let (mut stream, _) = echo_connect(fe2).await.unwrap();
    echo_roundtrip(&mut stream, "via fe2").await.unwrap();
    // Removed: new connections are refused, the open stream keeps flowing.
    write_atomic(&path, &cfg(&[a.addr], "round-robin", None));
    wait_successes(&h, 2).await;
    assert!(h.frontend_addr("fe2").is_none());
    wait_for("fe2 to stop accepting", Duration::from_secs(5), || async {
        TcpStream::connect(fe2).await.is_err().then_some(())
    })
    .await;
    for i in 0..20 {
        echo_roundtrip(&mut stream, &format!("after removal {i}\n"))
            .await
            .unwrap();
    }
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn a_changed_listen_address_moves_and_a_bind_failure_changes_nothing() {
    let a = EchoBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    let p1 = closed_port().await;
    write_atomic(&path, &cfg(&[a.addr], "round-robin", Some(&p1.to_string())));
    let h = start_file(&path).await;
    assert_eq!(h.frontend_addr("fe2"), Some(p1));
    let (mut held, _) = echo_connect(p1).await.unwrap();

    // A port someone else holds: the whole reload fails, nothing moves.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    write_atomic(
        &path,
        &cfg(&[a.addr], "round-robin", Some(&taken.to_string())),
    );
    wait_for("the bind failure", Duration::from_secs(5), || async {
        (reloads(&h).1 == 1).then_some(())
    })
    .await;
    assert_eq!(h.frontend_addr("fe2"), Some(p1));
    assert!(
        echo_connect(p1).await.is_ok(),
        "the old address still serves"
    );

    // A free port: the new address listens, the old one closes, the open
    // connection on the old address keeps flowing.
    let p2 = closed_port().await;
    write_atomic(&path, &cfg(&[a.addr], "round-robin", Some(&p2.to_string())));
    wait_successes(&h, 1).await;
    assert_eq!(h.frontend_addr("fe2"), Some(p2));
    assert!(echo_connect(p2).await.is_ok());
    wait_for(
        "the old address to close",
        Duration::from_secs(5),
        || async { TcpStream::connect(p1).await.is_err().then_some(()) },
    )
    .await;
    echo_roundtrip(&mut held, "kept\n").await.unwrap();
    drop(squatter);
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn the_admin_server_moves_with_admin_listen() {
    let a = EchoBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    write_atomic(&path, &cfg(&[a.addr], "round-robin", None));
    let h = start_file(&path).await;
    let old = h.admin_addr().unwrap();
    let new = closed_port().await;
    write_atomic(
        &path,
        &cfg(&[a.addr], "round-robin", None).replace(
            "listen: 127.0.0.1:0\nshutdown",
            &format!("listen: {new}\nshutdown"),
        ),
    );
    wait_successes(&h, 1).await;
    assert_eq!(h.admin_addr(), Some(new));
    assert_eq!(admin_get(new, "/healthz").await.0, 200);
    wait_for(
        "the old admin port to close",
        Duration::from_secs(5),
        || async { TcpStream::connect(old).await.is_err().then_some(()) },
    )
    .await;
    h.shutdown();
    h.wait().await;
}

#[tokio::test]
async fn health_state_survives_an_unrelated_reload() {
    let pki = Pki::new();
    let fakes = pki.fakes(2).await;
    fakes[0].set_ready(500);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    let text = |grace: &str| {
        format!(
            "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: {grace}\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    pool: p\n\
             pools:\n  - name: p\n    servers:\n{}    health:\n      check: https\n      interval: 5s\n      timeout: 1s\n      rise: 2\n      fall: 1\n      tls:\n        ca_file: {}\n",
            servers_yaml(&[fakes[0].addr(), fakes[1].addr()]),
            pki.ca_file.display()
        )
    };
    write_atomic(&path, &text("2s"));
    let h = start_file(&path).await;
    wait_for("api-1 down", Duration::from_secs(8), || async {
        (!backend_up(&h, "p", 0)).then_some(())
    })
    .await;
    assert!(backend_up(&h, "p", 1));
    // An unrelated change; probes run only every 5 s, so a reset would show.
    write_atomic(&path, &text("3s"));
    wait_successes(&h, 1).await;
    assert!(
        !backend_up(&h, "p", 0),
        "a down backend stays down across a reload"
    );
    assert!(
        backend_up(&h, "p", 1),
        "an up backend stays up across a reload"
    );
    // And traffic still avoids the down one.
    for _ in 0..10 {
        let r = https_get(fe(&h), "/whoami", pki.client_config(None))
            .await
            .unwrap();
        assert_eq!(r.server.as_deref(), Some("api-2"));
    }
    h.shutdown();
    h.wait().await;
}

/// A refused edit that is reverted to the bytes that run clears the failure:
/// `apilb_config_last_reload_successful` and `/status` go back to healthy
/// without a SIGHUP (the file equals the running config, so nothing is
/// re-applied).
#[tokio::test]
async fn reverting_a_refused_edit_clears_the_failure() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apilb.yaml");
    write_atomic(&path, &cfg(&[a.addr], "round-robin", None));
    let h = start_file(&path).await;
    let admin = h.admin_addr().unwrap();
    let running = cfg(&[b.addr], "round-robin", None);
    write_atomic(&path, &running);
    wait_successes(&h, 1).await;
    write_atomic(&path, "pools: [this is not valid");
    wait_for(
        "the bad edit to be refused",
        Duration::from_secs(5),
        || async { (reloads(&h).1 == 1).then_some(()) },
    )
    .await;
    let (_, st) = admin_get(admin, "/status").await;
    assert!(st.contains("\"last_reload_successful\":false"), "{st}");
    write_atomic(&path, &running);
    wait_for("the failure to clear", Duration::from_secs(5), || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        (metric(&m, "apilb_config_last_reload_successful") == Some(1.0)).then_some(())
    })
    .await;
    let (_, st) = admin_get(admin, "/status").await;
    assert!(st.contains("\"last_reload_successful\":true"), "{st}");
    assert_eq!(reloads(&h), (1, 1), "nothing was re-applied");
    wait_serves(fe(&h), "b").await;
    h.shutdown();
    h.wait().await;
}
