//! The module graph stays layered: every `crate::` (or `super::`) import in
//! `src/` points to a module of a lower layer (or inside the same module).
//! The table below is the map of `src/lib.rs` and ARCHITECTURE.md; a new
//! module must be placed in it, or this test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Module → layer, bottom first. Submodules belong to their parent's layer
/// unless listed themselves.
const LAYERS: &[(&str, u32)] = &[
    ("fsread", 0),
    ("tls", 1),
    ("metrics", 1),
    ("config", 2),
    ("balancer", 3),
    ("health", 4),
    ("net", 4),
    ("handover", 4),
    ("proxy", 5),
    ("vip", 6),
    ("discovery", 6),
    ("snapshot", 7),
    ("listener", 8),
    ("reload", 9),
    ("admin", 10),
    ("runtime", 11),
    ("demo", 12),
];

fn layer_of(module: &str) -> Option<u32> {
    let top = module.split("::").next()?;
    LAYERS.iter().find(|(m, _)| *m == top).map(|(_, l)| *l)
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/proxy/http.rs` → `proxy::http`; `src/reload/mod.rs` → `reload`.
fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// Every module a file names through `crate::x` or `super::x` (outside tests).
fn imports(module: &str, text: &str) -> Vec<String> {
    let code = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = Vec::new();
    let parent = module.rsplit_once("::").map(|(p, _)| p).unwrap_or("");
    for (prefix, base) in [("crate::", ""), ("super::", parent)] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let after = &rest[i + prefix.len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                // `crate::{a, b}`: take every name in the braces.
                if let Some(list) = after.strip_prefix('{') {
                    let end = list.find('}').unwrap_or(list.len());
                    for n in list[..end].split(',') {
                        let n: String = n
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if !n.is_empty() && n != "self" {
                            out.push(join(base, &n));
                        }
                    }
                }
            } else {
                out.push(join(base, &name));
            }
            rest = &after[name.len()..];
        }
    }
    out
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}::{name}")
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut violations: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unplaced = Vec::new();
    for f in files {
        let module = module_path(&src, &f);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            unplaced.push(module);
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        let own_top = module.split("::").next().unwrap();
        for target in imports(&module, &text) {
            let top = target.split("::").next().unwrap();
            if top == own_top {
                continue; // inside the same module
            }
            match layer_of(&target) {
                Some(l) if l < own => {}
                Some(l) => violations
                    .entry(module.clone())
                    .or_default()
                    .push(format!("{target} (layer {l} >= {own})")),
                None => {} // a re-export of lib.rs such as EXIT_CONFIG
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS in tests/layers.rs: {unplaced:?}"
    );
    assert!(
        violations.is_empty(),
        "imports that point up or sideways: {violations:#?}"
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    let bad = "use crate::runtime::Shared;\nuse crate::{metrics, admin};\n";
    let found = imports("balancer", bad);
    assert!(found.contains(&"runtime".to_string()), "{found:?}");
    assert!(found.contains(&"admin".to_string()), "{found:?}");
    assert_eq!(imports("proxy::tcp", "use super::pump;"), ["proxy::pump"]);
}
