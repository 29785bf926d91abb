//! The files under deploy/ are accepted by the tools that consume them:
//! promtool (rules, rule tests, scrape config), systemd-analyze (the unit),
//! and parsers for the static pod and the Grafana dashboard.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn prometheus_rules_check_and_their_tests_pass() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let p = deploy().join("prometheus");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(p.join("apilb-rules.yaml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "apilb-rules.test.yaml"])
            .current_dir(&p),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(p.join("scrape.yaml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert the issue names exists.
    let rules = std::fs::read_to_string(p.join("apilb-rules.yaml")).unwrap();
    for alert in [
        "ApilbBackendDown",
        "ApilbPoolAllDown",
        "ApilbConfigReloadFailing",
        "ApilbFrontendAtConnectionLimit",
        "ApilbCertificateExpiringSoon",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
}

#[test]
fn systemd_units_verify() {
    let unit = deploy().join("systemd/apilb.service");
    let socket = deploy().join("systemd/apilb.socket");
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in ["Type=notify", "NotifyAccess=all", "apilb.socket"] {
        assert!(text.contains(key), "apilb.service lacks {key}");
    }
    // The socket unit holds exactly the listen addresses of the example config.
    let sock_text = std::fs::read_to_string(&socket).unwrap();
    let example =
        apilb::config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/apilb.yaml"))
            .unwrap();
    let mut want: Vec<String> = example
        .frontends
        .iter()
        .map(|f| f.listen.to_string())
        .chain([example.admin.listen.to_string()])
        .collect();
    let mut got: Vec<String> = sock_text
        .lines()
        .filter_map(|l| l.strip_prefix("ListenStream="))
        .map(str::to_string)
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "apilb.socket ListenStream= vs config/apilb.yaml");
    assert!(sock_text.contains("Backlog=4096"));
    verify_unit(&unit, &[socket]);
}

#[test]
fn node_local_systemd_unit_verifies() {
    let unit = deploy().join("node-local/apilb-node-local.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in ["StateDirectory=apilb", "Before=kubelet.service"] {
        assert!(text.contains(key), "apilb-node-local.service lacks {key}");
    }
    verify_unit(&unit, &[]);
}

/// The unit has the hardening every apilb unit needs and passes
/// `systemd-analyze verify` (together with `also`, e.g. its socket unit)
/// without a finding.
fn verify_unit(unit: &Path, also: &[PathBuf]) {
    let Some(_) = require_tool("systemd-analyze") else {
        return;
    };
    let text = std::fs::read_to_string(unit).unwrap();
    for key in [
        "User=apilb",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
        "LimitNOFILE=",
    ] {
        assert!(text.contains(key), "{} lacks {key}", unit.display());
    }
    // verify checks that ExecStart's binary exists: put a stand-in at
    // /usr/local/bin/apilb inside a private mount namespace only (needs root).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || require_tool("unshare").is_none() {
        if std::env::var("APILB_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("systemd-analyze verify needs root and unshare here");
        }
        eprintln!("SKIPPED: systemd-analyze verify needs root and unshare");
        return;
    }
    let stand_in = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/true", stand_in.path().join("apilb")).unwrap();
    let units: Vec<String> = std::iter::once(unit)
        .chain(also.iter().map(PathBuf::as_path))
        .map(|u| format!("'{}'", u.display()))
        .collect();
    let script = format!(
        "mount --bind '{}' /usr/local/bin && systemd-analyze verify {}",
        stand_in.path().display(),
        units.join(" ")
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // verify exits 0 on warnings such as unknown keys: any output is a finding.
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify reported:\n{text}"
    );
}

#[test]
fn static_pod_is_a_kubeadm_ready_pod() {
    let text = std::fs::read_to_string(deploy().join("kubernetes/apilb-static-pod.yaml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(v["kind"], "Pod");
    assert_eq!(v["metadata"]["namespace"], "kube-system");
    assert_eq!(v["spec"]["hostNetwork"], true);
    let c = &v["spec"]["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    let mounts = serde_yaml::to_string(&c["volumeMounts"]).unwrap();
    assert!(mounts.contains("/etc/apilb"), "{mounts}");
    if let Some(kubectl) = require_tool("kubectl") {
        run_ok(
            Command::new(kubectl)
                .args(["label", "--local", "--dry-run=client", "-o", "yaml", "-f"])
                .arg(deploy().join("kubernetes/apilb-static-pod.yaml"))
                .arg("verify=ok"),
        );
    }
}

#[test]
fn grafana_dashboard_is_valid_and_uses_the_datasource_input() {
    let text = std::fs::read_to_string(deploy().join("grafana/apilb-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap_or("").to_string())
        .collect();
    let all = exprs.join("\n");
    for m in [
        "apilb_backend_up",
        "apilb_backend_active_connections",
        "apilb_backend_bytes_total",
        "apilb_backend_connect_duration_seconds_bucket",
        "apilb_health_check_duration_seconds_bucket",
        "apilb_config_reloads_total",
    ] {
        assert!(all.contains(m), "no panel shows {m}");
    }
}

#[test]
fn containerfile_builds_apilb_into_a_minimal_image() {
    let text = std::fs::read_to_string(deploy().join("Containerfile")).unwrap();
    assert!(text.matches("FROM ").count() >= 2, "multi-stage");
    assert!(text.contains("cargo build --release --locked"));
    assert!(text.contains("distroless"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/apilb\"]"));
}

#[test]
fn node_local_manifests_parse_and_grant_only_endpointslices() {
    let dir = deploy().join("node-local");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    // The config uses only keys apilb knows, and the node-local address.
    let raw: apilb::config::raw::RawConfig = serde_yaml::from_str(&read("apilb.yaml")).unwrap();
    assert_eq!(raw.frontends[0].listen.as_deref(), Some("127.0.0.1:7445"));
    let k = raw.pools[0]
        .discovery
        .as_ref()
        .unwrap()
        .kubernetes
        .as_ref()
        .unwrap();
    assert_eq!(
        k.kubeconfig.as_deref(),
        Some("/etc/apilb/discovery.kubeconfig")
    );
    let kc = kube::config::Kubeconfig::from_yaml(&read("discovery.kubeconfig")).unwrap();
    assert_eq!(kc.current_context.as_deref(), Some("apilb-discovery"));
    // RBAC: one Role in default with get/list/watch on endpointslices only.
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&read("rbac.yaml"))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Secret", "Role", "RoleBinding"]);
    let role = &docs[2];
    assert_eq!(role["metadata"]["namespace"], "default");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "one rule, nothing else");
    assert_eq!(serde_yaml::to_string(&rules[0]).unwrap(),
        "apiGroups:\n- discovery.k8s.io\nresources:\n- endpointslices\nverbs:\n- get\n- list\n- watch\n");
    assert_eq!(docs[3]["roleRef"]["name"], "apilb-discovery");
    // The static pod keeps a writable cache directory.
    let pod: serde_yaml::Value = serde_yaml::from_str(&read("apilb-static-pod.yaml")).unwrap();
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["spec"]["hostNetwork"], true);
    let vols = serde_yaml::to_string(&pod["spec"]["volumes"]).unwrap();
    assert!(vols.contains("/var/lib/apilb"), "{vols}");
    if let Some(kubectl) = require_tool("kubectl") {
        for f in ["rbac.yaml", "apilb-static-pod.yaml"] {
            let out = run_ok(
                Command::new(&kubectl)
                    .args(["label", "--local", "--dry-run=client", "-o", "name", "-f"])
                    .arg(dir.join(f))
                    .arg("verify=ok"),
            );
            assert!(!out.trim().is_empty(), "{f}: {out}");
        }
    }
}
