//! Config validation: the shipped examples pass, a table of broken files fails
//! with the field named, and `apilb check`/`run` report the same way.

mod common;

use std::process::Command;

use common::*;

const GOOD_POOL: &str = "pools:\n  - name: p\n    servers: ['127.0.0.1:6443']\n";
const GOOD_FE: &str = "frontends:\n  - name: f\n    listen: 127.0.0.1:0\n    pool: p\n";

#[test]
fn every_file_in_config_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let cfg = apilb::config::load(&path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        assert!(!cfg.frontends.is_empty());
        let out = Command::new(apilb_bin())
            .arg("check")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("ok: 1 frontends, 1 pools, 3 servers"),
            "{stdout}"
        );
    }
    assert!(n >= 2, "config/apilb.yaml and config/etcd.yaml at least");
}

/// Each case: YAML text, and the field path the error must name.
fn invalid_cases(tmp: &std::path::Path) -> Vec<(String, &'static str)> {
    let missing = tmp.join("missing-ca.crt");
    let garbage = tmp.join("garbage.crt");
    std::fs::write(&garbage, "this is not PEM").unwrap();
    // A probe certificate with the key of another certificate.
    let ca = apilb::demo::Ca::new("table-ca").unwrap();
    let ca_file = ca.write(tmp, "ca").unwrap();
    let (probe_crt, _) = ca
        .client("probe", None)
        .unwrap()
        .write(tmp, "probe")
        .unwrap();
    let (_, other_key) = ca
        .client("other", None)
        .unwrap()
        .write(tmp, "other")
        .unwrap();
    let probe_tls = |extra: &str| {
        format!("{GOOD_FE}{GOOD_POOL}    health:\n      check: https\n      tls:\n        ca_file: {}\n{extra}", ca_file.display())
    };
    let http_fe = format!("frontends:\n  - name: f\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    tls:\n      cert_file: {0}\n      key_file: {1}\n", probe_crt.display(), other_key.display());
    let fifo = tmp.join("fifo.crt");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    vec![
        (probe_tls("        server_name: 'bad name!'\n"), "pools[0].health.tls.server_name"),
        (
            format!("{GOOD_FE}{GOOD_POOL}    tls:\n      insecure_skip_verify: true\n      server_name: 'bad name!'\n"),
            "pools[0].tls.server_name",
        ),
        (
            probe_tls(&format!("        cert_file: {}\n        key_file: {}\n", probe_crt.display(), other_key.display())),
            "pools[0].health.tls.key_file: the private key does not match the certificate",
        ),
        (
            format!("{GOOD_FE}{GOOD_POOL}    tls:\n      insecure_skip_verify: true\n      front_proxy_cert_file: {}\n      front_proxy_key_file: {}\n", probe_crt.display(), other_key.display()),
            "pools[0].tls.front_proxy_key_file: the private key does not match",
        ),
        (
            format!("{http_fe}{GOOD_POOL}    tls:\n      insecure_skip_verify: true\n"),
            "frontends[0].tls.key_file: the private key does not match",
        ),
        (
            "frontends:\n  - {name: f, listen: '0.0.0.0:7443', pool: p}\npools:\n  - name: p\n    servers: ['10.9.9.9:7443', '127.0.0.1:7443']\n".to_string(),
            "pools[0].servers[1]: 127.0.0.1:7443 (127.0.0.1:7443) is one of apilb's own listen addresses",
        ),
        (
            format!("admin:\n  listen: 127.0.0.1:7404\n{GOOD_FE}pools:\n  - name: p\n    servers: ['localhost:7404']\n"),
            "pools[0].servers[0]: localhost:7404",
        ),
        (
            format!("frontends:\n  - {{name: f, listen: '[::]:7443', pool: p}}\n{GOOD_POOL}  - name: q\n    servers: ['127.0.0.1:7443']\n"),
            "pools[1].servers[0]",
        ),
        (
            format!("frontends:\n  - {{name: f, listen: '127.0.0.1:0', pool: p, strip_headers: ['x-ok', 'bad header']}}\n{GOOD_POOL}"),
            "frontends[0].strip_headers",
        ),
        (
            format!("{http_fe}{GOOD_POOL}    tls:\n      insecure_skip_verify: true\n").replace("mode: http\n", "mode: http\n    forwarded_for: prepend\n    strip_headers: ['bad header']\n"),
            "frontends[0].forwarded_for: unknown value \"prepend\": expected replace or append",
        ),
        (
            format!("{http_fe}{GOOD_POOL}    tls:\n      insecure_skip_verify: true\n").replace("mode: http\n", "mode: http\n    splice: true\n"),
            "frontends[0].splice: only used with mode: tcp",
        ),
        (
            format!("frontends:\n  - {{name: f, listen: '127.0.0.1:0', pool: p, splice: sometimes}}\n{GOOD_POOL}"),
            "splice",
        ),
        (format!("{GOOD_FE}{GOOD_POOL}x: {}\n", "[".repeat(200)), "invalid YAML: nesting deeper than 64 levels at line 8 column"),
        (probe_tls("").replace(&ca_file.display().to_string(), "/dev/zero"), "pools[0].health.tls.ca_file: cannot read /dev/zero: it is a character device"),
        (probe_tls("").replace(&ca_file.display().to_string(), &fifo.display().to_string()), "pools[0].health.tls.ca_file: cannot read"),
        (format!("{GOOD_FE}{GOOD_POOL}bogus: 1\n"), "unknown field `bogus`"),
        (format!("{GOOD_FE}{GOOD_POOL}  - name: p\n    servers: ['127.0.0.1:1']\n"), "pools[1].name"),
        (
            format!("{GOOD_FE}  - name: f\n    listen: 127.0.0.1:1\n    pool: p\n{GOOD_POOL}"),
            "frontends[1].name",
        ),
        (
            format!("frontends:\n  - name: f\n    listen: 127.0.0.1:0\n    pool: nope\n{GOOD_POOL}"),
            "frontends[0].pool",
        ),
        (
            format!("frontends:\n  - {{name: a, listen: '127.0.0.1:7000', pool: p}}\n  - {{name: b, listen: '127.0.0.1:7000', pool: p}}\n{GOOD_POOL}"),
            "frontends[1].listen: 127.0.0.1:7000 is already used by frontends[0]",
        ),
        (
            format!("admin:\n  listen: 127.0.0.1:7404\nfrontends:\n  - {{name: f, listen: '127.0.0.1:7404', pool: p}}\n{GOOD_POOL}"),
            "frontends[0].listen: 127.0.0.1:7404 is already used by admin.listen",
        ),
        (
            format!("frontends:\n  - name: f\n    listen: localhost-8443\n    pool: p\n{GOOD_POOL}"),
            "frontends[0].listen",
        ),
        (format!("{GOOD_FE}pools:\n  - name: p\n    servers: ['no-port-here']\n"), "pools[0].servers[0]"),
        (format!("{GOOD_FE}pools:\n  - name: p\n    servers: ['127.0.0.1:99999']\n"), "pools[0].servers[0]"),
        (format!("{GOOD_FE}pools:\n  - name: p\n    servers: []\n"), "pools[0].servers"),
        (
            format!("{GOOD_FE}pools:\n  - name: p\n    servers: ['127.0.0.1:6443', 'https://127.0.0.1:6443']\n"),
            "pools[0].servers[1]",
        ),
        (format!("{GOOD_FE}{GOOD_POOL}    connect_timeout: five\n"), "pools[0].connect_timeout"),
        (format!("{GOOD_FE}{GOOD_POOL}shutdown_grace: soon\n"), "shutdown_grace"),
        (format!("{GOOD_FE}{GOOD_POOL}    health:\n      rise: 0\n"), "pools[0].health.rise"),
        (format!("{GOOD_FE}{GOOD_POOL}    upstream:\n      max_connections_per_server: 0\n"), "pools[0].upstream.max_connections_per_server"),
        (format!("{GOOD_FE}{GOOD_POOL}    upstream:\n      queue_timeout: 0s\n"), "pools[0].upstream.queue_timeout"),
        (format!("{GOOD_FE}{GOOD_POOL}    upstream:\n      max_queue: 5\n"), "unknown field `max_queue`"),
        (format!("{GOOD_FE}{GOOD_POOL}    health:\n      fall: 0\n"), "pools[0].health.fall"),
        (
            format!("{GOOD_FE}{GOOD_POOL}    health:\n      interval: 1s\n      timeout: 1s\n"),
            "pools[0].health.timeout",
        ),
        (
            format!("{GOOD_FE}{GOOD_POOL}    health:\n      check: https\n      tls:\n        ca_file: {}\n", missing.display()),
            "pools[0].health.tls.ca_file",
        ),
        (
            format!("{GOOD_FE}{GOOD_POOL}    health:\n      check: https\n      tls:\n        ca_file: {}\n", garbage.display()),
            "pools[0].health.tls.ca_file",
        ),
        (format!("{GOOD_FE}{GOOD_POOL}    health:\n      check: https\n"), "pools[0].health.tls.ca_file"),
        (format!("{GOOD_FE}{GOOD_POOL}    health:\n      check: icmp\n"), "pools[0].health.check: unknown check \"icmp\": expected tcp, http, https or none"),
        (format!("{GOOD_FE}{GOOD_POOL}    balance: random\n"), "pools[0].balance: unknown balance \"random\": expected round-robin or least-connections"),
        (format!("{GOOD_FE}{GOOD_POOL}    when_all_down: panic\n"), "pools[0].when_all_down: unknown policy \"panic\": expected try-all or reject"),
        (format!("{GOOD_FE}{GOOD_POOL}    connect_attempts: 0\n"), "pools[0].connect_attempts"),
        (
            format!("frontends:\n  - name: f\n    listen: 127.0.0.1:0\n    pool: p\n    max_connections: 0\n{GOOD_POOL}"),
            "frontends[0].max_connections",
        ),
        (
            format!("frontends:\n  - name: f\n    listen: 127.0.0.1:0\n    pool: p\n    mode: udp\n{GOOD_POOL}"),
            "frontends[0].mode: unknown mode \"udp\": expected tcp or http",
        ),
        (format!("{GOOD_FE}{GOOD_POOL}    health:\n      rize: 2\n"), "unknown field `rize`"),
        (format!("{GOOD_FE}{GOOD_POOL}    health:\n      path: readyz\n"), "pools[0].health.path"),
        (GOOD_POOL.to_string(), "frontends"),
        (String::new(), "config is empty"),
        ("frontends: [\n".to_string(), "invalid YAML"),
        (format!("{GOOD_FE}---\n{GOOD_POOL}"), "a second document starts at line 5 column 1"),
        (format!("admin:\n  listen: 'nope'\n{GOOD_FE}{GOOD_POOL}"), "admin.listen"),
        (
            format!("{GOOD_FE}{GOOD_POOL}    health:\n      check: https\n      tls:\n        insecure_skip_verify: true\n        cert_file: {}\n", garbage.display()),
            "pools[0].health.tls.key_file",
        ),
    ]
}

#[test]
fn invalid_configs_fail_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = invalid_cases(tmp.path());
    assert!(cases.len() >= 15);
    for (i, (yaml, field)) in cases.iter().enumerate() {
        match apilb::config::parse(yaml) {
            Ok(_) => panic!("case {i} was accepted:\n{yaml}"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains(field),
                    "case {i}: error does not name {field:?}:\n{text}\n--- yaml:\n{yaml}"
                );
            }
        }
    }
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let yaml = "frontends:\n  - name: f\n    listen: bad\n    pool: nope\npools:\n  - name: p\n    servers: []\n    health:\n      rise: 0\n";
    let e = apilb::config::parse(yaml).unwrap_err();
    let paths: Vec<_> = e.errors.iter().map(|f| f.path.as_str()).collect();
    for want in [
        "frontends[0].listen",
        "frontends[0].pool",
        "pools[0].servers",
        "pools[0].health.rise",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
}

#[test]
fn check_and_run_refuse_a_bad_file_with_exit_78() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!("{GOOD_FE}{GOOD_POOL}    health:\n      rise: 0\n      fall: 0\n"),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = Command::new(apilb_bin())
            .arg(cmd)
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("pools[0].health.rise: must be at least 1"),
            "{cmd}: {err}"
        );
        assert!(
            err.contains("pools[0].health.fall: must be at least 1"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn a_missing_config_names_its_path() {
    let out = Command::new(apilb_bin())
        .args(["check", "-c", "/nonexistent/apilb.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/apilb.yaml") && err.contains("cannot read config"),
        "{err}"
    );
}

#[test]
fn version_and_help() {
    let out = Command::new(apilb_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(apilb_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["run", "check", "demo"] {
        assert!(help.contains(sub), "--help lists {sub}: {help}");
    }
}

#[test]
fn servers_accept_etcd_form_and_resolve_hostnames() {
    let yaml = format!("{GOOD_FE}pools:\n  - name: p\n    servers: ['https://localhost:2379', '[::1]:2380', '127.0.0.1:2381']\n");
    let cfg = apilb::config::parse(&yaml).unwrap();
    let s = &cfg.pools[0].servers;
    assert_eq!(s[0].key, "localhost:2379");
    assert!(s[0].addr.ip().is_loopback());
    assert_eq!(s[1].key, "[::1]:2380");
    assert_eq!(s[2].addr.to_string(), "127.0.0.1:2381");
    let bad = format!("{GOOD_FE}pools:\n  - name: p\n    servers: ['no-such-host.invalid:6443']\n");
    let e = apilb::config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("pools[0].servers[0]: cannot resolve"), "{e}");
}

#[test]
fn word_fields_take_their_defaults_and_aliases() {
    use apilb::config::{AllDownPolicy, Balance, CheckKind, Mode};
    let c = apilb::config::parse(&format!("{GOOD_FE}{GOOD_POOL}")).unwrap();
    let (f, p) = (&c.frontends[0], &c.pools[0]);
    assert_eq!(f.mode, Mode::Tcp);
    assert_eq!(p.balance, Balance::RoundRobin);
    assert_eq!(p.when_all_down, AllDownPolicy::TryAll);
    assert_eq!(p.health.check, CheckKind::Tcp);
    for (word, want) in [
        ("roundrobin", Balance::RoundRobin),
        ("leastconn", Balance::LeastConnections),
        ("least-connections", Balance::LeastConnections),
    ] {
        let c =
            apilb::config::parse(&format!("{GOOD_FE}{GOOD_POOL}    balance: {word}\n")).unwrap();
        assert_eq!(c.pools[0].balance, want, "{word}");
    }
    let c = apilb::config::parse(&format!(
        "{GOOD_FE}{GOOD_POOL}    when_all_down: reject\n    health:\n      check: none\n"
    ))
    .unwrap();
    assert_eq!(c.pools[0].when_all_down, AllDownPolicy::Reject);
    assert_eq!(c.pools[0].health.check, CheckKind::None);
}
