//! Trust boundaries and config safety (issue 11): what `check` and reloads
//! refuse or warn about, bounded file reads, and what clients cannot do to
//! identity headers, forwarding headers and HTTP/1 framing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `apilb check -c PATH` and returns (exit code, stdout, stderr, time taken).
fn check(path: &Path) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let out = Command::new(apilb_bin())
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

/// An L7 config (TLS files in `dir`) whose pool skips upstream verification.
fn http_yaml(cert: &Path, key: &Path, extra_pool: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    tls:\n      cert_file: {}\n      key_file: {}\n\
         pools:\n  - name: p\n    servers: ['127.0.0.1:6443']\n    health:\n      check: none\n    tls:\n      insecure_skip_verify: true\n{extra_pool}",
        cert.display(),
        key.display()
    )
}

/// A serving certificate that expires `days` from now (negative: expired).
fn cert_expiring_in(dir: &Path, name: &str, days: i64) -> (PathBuf, PathBuf, i64) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let not_after = unix_now() + days * 86_400;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    p.not_before = epoch + Duration::from_secs((unix_now() - 400 * 86_400) as u64);
    p.not_after = epoch + Duration::from_secs(not_after as u64);
    let cert = p.self_signed(&key).unwrap();
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, not_after)
}

/// Starts apilb in-process from a file that only explicit reloads re-read.
async fn start_unwatched(path: &Path) -> apilb::Handle {
    let cfg = apilb::config::load(path).unwrap_or_else(|e| panic!("{e}"));
    let opts = apilb::Options {
        watch_config: false,
    };
    apilb::start_with(cfg, opts).await.unwrap()
}

/// Point 4: `check` and a reload refuse a server_name that is no name, and a
/// pool naming apilb's own listen address.
#[tokio::test]
async fn check_and_reload_refuse_bad_server_names_and_loops() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k, _) = cert_expiring_in(tmp.path(), "srv", 300);
    let cfg = tmp.path().join("apilb.yaml");
    let good = http_yaml(&c, &k, "");
    let bad_name = good.replace(
        "insecure_skip_verify: true\n",
        "insecure_skip_verify: true\n      server_name: 'bad name!'\n",
    );
    std::fs::write(&cfg, &bad_name).unwrap();
    let (code, _, err, _) = check(&cfg);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(
            "pools[0].tls.server_name: \"bad name!\" is neither a DNS name nor an IP address"
        ),
        "{err}"
    );

    std::fs::write(&cfg, &good).unwrap();
    let h = start_unwatched(&cfg).await;
    std::fs::write(&cfg, &bad_name).unwrap();
    let e = h.reload().await.unwrap_err().to_string();
    assert!(e.contains("pools[0].tls.server_name"), "{e}");
    // A pool server on the frontend's own (wildcard) port is a loop.
    let port = closed_port().await.port();
    let looped = good
        .replace(
            "listen: 127.0.0.1:0\n    mode",
            &format!("listen: 0.0.0.0:{port}\n    mode"),
        )
        .replace("'127.0.0.1:6443'", &format!("'127.0.0.1:{port}'"));
    std::fs::write(&cfg, &looped).unwrap();
    let e = h.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("pools[0].servers[0]") && e.contains("own listen addresses"),
        "{e}"
    );
    assert_eq!(reloads(&h), (0, 2), "both reloads refused");
    h.shutdown();
    h.wait().await;
}

/// Point 5: `check` warns about a certificate that expires within 30 days or
/// has expired, and the running daemon exports every file's expiry.
#[tokio::test]
async fn expiring_certificates_are_warned_about_and_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k, not_after) = cert_expiring_in(tmp.path(), "soon", 10);
    let (ca, _, ca_after) = cert_expiring_in(tmp.path(), "ca-old", -3);
    let (far, far_key, _) = cert_expiring_in(tmp.path(), "far", 200);
    let cfg = tmp.path().join("apilb.yaml");
    let yaml = http_yaml(&c, &k, "").replace(
        "    tls:\n      insecure_skip_verify: true\n",
        &format!(
            "    tls:\n      ca_file: {}\n      front_proxy_cert_file: {}\n      front_proxy_key_file: {}\n",
            ca.display(),
            far.display(),
            far_key.display()
        ),
    );
    std::fs::write(&cfg, &yaml).unwrap();
    let (code, out, err, _) = check(&cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("ok:"), "{out}");
    assert!(
        err.contains(&format!(
            "warning: frontends[0].tls.cert_file: certificate {} expires in 9 days",
            c.display()
        )) || err.contains(&format!(
            "warning: frontends[0].tls.cert_file: certificate {} expires in 10 days",
            c.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "warning: pools[0].tls.ca_file: certificate {} expired 3 days ago",
            ca.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("far.crt"),
        "200 days left is no warning: {err}"
    );

    let h = start_unwatched(&cfg).await;
    let (_, m) = admin_get(h.admin_addr().unwrap(), "/metrics").await;
    for (file, want) in [(&c, not_after), (&ca, ca_after)] {
        let series = format!(
            "apilb_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}}",
            file.display()
        );
        assert_eq!(metric(&m, &series), Some(want as f64), "{series}\n{m}");
    }
    assert!(m.contains(&format!("file=\"{}\"", far.display())));
    h.shutdown();
    h.wait().await;
}

/// Point 6: a FIFO or a device as a certificate, key or config file gets a
/// clear error at once; a FIFO never wedges later reloads; a symlink to a
/// regular file is fine; deep YAML is refused fast with its line and column.
#[tokio::test]
async fn special_files_and_deep_yaml_are_refused_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k, _) = cert_expiring_in(tmp.path(), "srv", 300);
    let fifo = tmp.path().join("fifo.crt");
    mkfifo(&fifo);
    let link = tmp.path().join("link.crt");
    std::os::unix::fs::symlink(&c, &link).unwrap();
    let cfg = tmp.path().join("apilb.yaml");

    for (cert, key, want) in [
        (&fifo, &k, "frontends[0].tls.cert_file: cannot read"),
        (
            &c,
            &PathBuf::from("/dev/zero"),
            "frontends[0].tls.key_file: cannot read /dev/zero: it is a character device",
        ),
    ] {
        std::fs::write(&cfg, http_yaml(cert, key, "")).unwrap();
        let (code, _, err, took) = check(&cfg);
        assert_eq!(code, Some(78), "{err}");
        assert!(err.contains(want), "{err}");
        assert!(took < Duration::from_secs(1), "check took {took:?}");
    }
    let (code, _, err, took) = check(&fifo);
    assert_eq!(code, Some(78));
    assert!(err.contains("it is a FIFO, not a regular file"), "{err}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // 200 KB of nesting: refused before serde_yaml spends its time on it.
    let deep = tmp.path().join("deep.yaml");
    std::fs::write(&deep, format!("frontends: {}", "[".repeat(200_000))).unwrap();
    let (code, _, err, took) = check(&deep);
    assert_eq!(code, Some(78));
    assert!(
        err.contains("nesting deeper than 64 levels at line 1 column"),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Running: a FIFO in a reload is refused at once, and the next good file loads.
    std::fs::write(&cfg, http_yaml(&link, &k, "")).unwrap();
    let h = start_unwatched(&cfg).await;
    std::fs::write(&cfg, http_yaml(&fifo, &k, "")).unwrap();
    let t = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), h.reload())
        .await
        .expect("a FIFO must not wedge the reload")
        .unwrap_err()
        .to_string();
    assert!(e.contains("FIFO"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
    std::fs::write(&cfg, http_yaml(&link, &k, "    connect_attempts: 2\n")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), h.reload())
        .await
        .unwrap()
        .unwrap();
    h.shutdown();
    h.wait().await;
}
