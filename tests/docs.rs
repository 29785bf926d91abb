//! The documentation stays true to the code: every config key in the serde
//! types under `src/config/` has a row in docs/configuration.md and every row
//! names a real key; every relative link in the repository's Markdown resolves;
//! README.md fits on a few screens. Pure file checks: no tools, no sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The struct the YAML file deserializes into.
const ROOT_STRUCT: &str = "RawConfig";
const REFERENCE: &str = "docs/configuration.md";
const README_MAX_LINES: usize = 300;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Length of the raw string literal (`r"..."`, `r#"..."#`) starting at `i`.
fn raw_string_len(src: &str, i: usize) -> Option<usize> {
    let rest = src[i..].strip_prefix('r')?;
    let hashes = rest.len() - rest.trim_start_matches('#').len();
    let body = rest[hashes..].strip_prefix('"')?;
    let close = format!("\"{}", "#".repeat(hashes));
    let end = body.find(&close)?;
    Some(1 + hashes + 1 + end + close.len())
}

/// Length of the char literal (`'x'`, `'\''`) starting at `i`; lifetimes are not.
fn char_literal_len(src: &str, i: usize) -> Option<usize> {
    let rest = &src[i + 1..];
    if rest.starts_with('\\') {
        return Some(2 + 2 + rest.get(2..)?.find('\'')?);
    }
    let skip = rest.chars().next()?.len_utf8();
    rest[skip..].starts_with('\'').then_some(skip + 2)
}

/// Removes `//` and `/* */` comments (doc comments included), keeping string
/// and char literals intact.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let (mut out, mut i) = (String::with_capacity(src.len()), 0);
    while i < b.len() {
        let ident_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let literal = match b[i] {
            b'r' if !ident_before => raw_string_len(src, i),
            b'\'' => char_literal_len(src, i),
            _ => None,
        };
        if let Some(n) = literal {
            out.push_str(&src[i..i + n]);
            i += n;
        } else if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            out.push_str(&src[start..i]);
        } else if src[i..].starts_with("//") {
            i = src[i..].find('\n').map_or(b.len(), |n| i + n);
        } else if src[i..].starts_with("/*") {
            i = src[i + 2..].find("*/").map_or(b.len(), |n| i + n + 4);
            out.push(' ');
        } else {
            let c = src[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Index just past the bracket that closes the one at `open`.
fn matching(s: &str, open: usize) -> usize {
    let (mut depth, mut in_str) = (0i32, false);
    for (i, c) in s[open..].char_indices() {
        match c {
            '"' => in_str = !in_str,
            '(' | '[' | '{' | '<' if !in_str => depth += 1,
            ')' | ']' | '}' | '>' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced brackets in {:?}", &s[open..]);
}

/// Splits on commas outside of brackets and strings.
fn split_top(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut depth, mut in_str, mut start) = (Vec::new(), 0i32, false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '(' | '[' | '{' | '<' if !in_str => depth += 1,
            ')' | ']' | '}' | '>' if !in_str => depth -= 1,
            c if c == sep && depth == 0 && !in_str => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Leading `#[...]` attributes and the rest of the item.
fn take_attrs(mut s: &str) -> (Vec<String>, &str) {
    let mut attrs = Vec::new();
    loop {
        s = s.trim_start();
        if !s.starts_with("#[") {
            return (attrs, s);
        }
        let end = matching(s, 1);
        attrs.push(
            s[2..end - 1]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
        s = &s[end..];
    }
}

/// The value of `key = "value"` inside a `serde(...)` attribute.
fn serde_arg(attrs: &[String], key: &str) -> Option<String> {
    attrs
        .iter()
        .filter_map(|a| a.strip_prefix("serde"))
        .flat_map(|a| split_top(a.trim().trim_start_matches('(').trim_end_matches(')'), ','))
        .find_map(|arg| {
            let (k, v) = arg.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
}

fn serde_flag(attrs: &[String], flag: &str) -> bool {
    attrs
        .iter()
        .filter_map(|a| a.strip_prefix("serde"))
        .flat_map(|a| split_top(a.trim().trim_start_matches('(').trim_end_matches(')'), ','))
        .any(|arg| arg.trim() == flag)
}

/// A snake_case field name as serde's `rename_all` writes it.
fn rename_all(name: &str, rule: &str) -> String {
    let words: Vec<&str> = name.split('_').filter(|w| !w.is_empty()).collect();
    let cap = |w: &str| w[..1].to_uppercase() + &w[1..];
    match rule {
        "lowercase" => name.replace('_', ""),
        "UPPERCASE" => name.replace('_', "").to_uppercase(),
        "PascalCase" => words.iter().map(|w| cap(w)).collect(),
        "camelCase" => {
            let pascal: String = words.iter().map(|w| cap(w)).collect();
            pascal[..1].to_lowercase() + &pascal[1..]
        }
        "SCREAMING_SNAKE_CASE" => name.to_uppercase(),
        "kebab-case" => name.replace('_', "-"),
        "SCREAMING-KEBAB-CASE" => name.replace('_', "-").to_uppercase(),
        _ => name.to_string(),
    }
}

#[derive(Debug)]
struct Field {
    key: String,
    ty: String,
    flatten: bool,
}

/// Every struct that derives `Deserialize` in one source file, by name.
fn deserialize_structs(src: &str, out: &mut HashMap<String, Vec<Field>>) {
    let src = strip_comments(src);
    let mut rest = src.as_str();
    while let Some(at) = rest.find("#[") {
        let (attrs, item) = take_attrs(&rest[at..]);
        let consumed = rest.len() - item.len();
        let derives = attrs
            .iter()
            .any(|a| a.starts_with("derive") && a.contains("Deserialize"));
        let item = item
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub ");
        let (Some(decl), true) = (item.strip_prefix("struct "), derives) else {
            rest = &rest[consumed.max(at + 2)..];
            continue;
        };
        let name: String = decl
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let Some(open) = decl
            .find(['{', ';', '('])
            .filter(|&i| decl[i..].starts_with('{'))
        else {
            rest = &rest[consumed..];
            continue;
        };
        let close = matching(decl, open);
        let rule = serde_arg(&attrs, "rename_all");
        let fields = split_top(&decl[open + 1..close - 1], ',')
            .into_iter()
            .filter(|f| !f.trim().is_empty())
            .filter_map(|f| field(f, rule.as_deref()))
            .collect();
        out.insert(name, fields);
        rest = &decl[close..];
    }
}

fn field(text: &str, rule: Option<&str>) -> Option<Field> {
    let (attrs, f) = take_attrs(text);
    if serde_flag(&attrs, "skip") || serde_flag(&attrs, "skip_deserializing") {
        return None;
    }
    let f = f.trim();
    let f = match f.strip_prefix("pub") {
        Some(r) if r.starts_with('(') => &r[matching(r, 0)..],
        Some(r) if r.starts_with(char::is_whitespace) => r,
        _ => f,
    };
    let (name, ty) = f.split_once(':')?;
    let name = name.trim().trim_start_matches("r#");
    let key = serde_arg(&attrs, "rename")
        .unwrap_or_else(|| rule.map_or(name.to_string(), |r| rename_all(name, r)));
    let ty = ty.split_whitespace().collect();
    let flatten = serde_flag(&attrs, "flatten");
    Some(Field { key, ty, flatten })
}

/// The named struct a field type leads to, with `[]` for each list level;
/// `None` for scalars, enums and maps (leaves).
fn unwrap_type<'a>(
    ty: &'a str,
    structs: &HashMap<String, Vec<Field>>,
) -> (String, Option<&'a str>) {
    let (mut ty, mut suffix) = (ty.trim().trim_start_matches('&'), String::new());
    loop {
        let base = ty
            .split('<')
            .next()
            .unwrap()
            .rsplit("::")
            .next()
            .unwrap()
            .trim();
        let inner = ty.find('<').map(|i| &ty[i + 1..matching(ty, i) - 1]);
        match (base, inner) {
            ("Vec" | "VecDeque" | "BTreeSet" | "HashSet", Some(i)) => {
                suffix.push_str("[]");
                ty = i.trim();
            }
            ("Option" | "Box" | "Arc" | "Rc", Some(i)) => ty = i.trim(),
            (b, None) if structs.contains_key(b) => return (suffix, Some(b)),
            _ => return (suffix, None),
        }
    }
}

/// Every key path under `prefix` (section keys and leaves alike).
fn walk(
    name: &str,
    prefix: &str,
    structs: &HashMap<String, Vec<Field>>,
    seen: &mut Vec<String>,
    out: &mut BTreeSet<String>,
) {
    assert!(
        !seen.contains(&name.to_string()),
        "recursive config type {name}"
    );
    seen.push(name.to_string());
    for f in &structs[name] {
        let (suffix, next) = unwrap_type(&f.ty, structs);
        if f.flatten {
            let next = next.unwrap_or_else(|| panic!("flattened field {} is not a struct", f.key));
            walk(next, prefix, structs, seen, out);
            continue;
        }
        let path = format!("{prefix}{}", f.key);
        out.insert(path.clone());
        if let Some(next) = next {
            walk(next, &format!("{path}{suffix}."), structs, seen, out);
        }
    }
    seen.pop();
}

/// The key paths the code accepts, from every `.rs` file in `src/config/`.
fn code_keys() -> BTreeSet<String> {
    let mut structs = HashMap::new();
    let mut files = Vec::new();
    rs_files(&repo().join("src/config"), &mut files);
    for f in files {
        deserialize_structs(&std::fs::read_to_string(&f).unwrap(), &mut structs);
    }
    assert!(
        structs.contains_key(ROOT_STRUCT),
        "no {ROOT_STRUCT} under src/config"
    );
    let mut out = BTreeSet::new();
    walk(ROOT_STRUCT, "", &structs, &mut Vec::new(), &mut out);
    out
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

/// Cells of a Markdown table row, or `None` for other lines.
fn cells(line: &str) -> Option<Vec<String>> {
    let l = line.trim();
    let inner = l.strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_string()).collect())
}

/// The backticked first cells of the rows of every table whose first header
/// cell is `key`.
fn reference_keys(md: &str) -> BTreeMap<String, usize> {
    let (mut out, mut in_key_table) = (BTreeMap::new(), false);
    for (n, line) in md.lines().enumerate() {
        let Some(row) = cells(line) else {
            in_key_table = false;
            continue;
        };
        if row[0] == "key" {
            in_key_table = true;
        } else if in_key_table && !row[0].starts_with("---") {
            let key = row[0].strip_prefix('`').and_then(|k| k.strip_suffix('`'));
            let key =
                key.unwrap_or_else(|| panic!("{REFERENCE}:{}: first cell is not one `key`", n + 1));
            assert!(
                out.insert(key.to_string(), n + 1).is_none(),
                "{REFERENCE}:{}: `{key}` has two rows",
                n + 1
            );
        }
    }
    out
}

#[test]
fn configuration_reference_matches_the_serde_types() {
    let code = code_keys();
    // RawConfig alone has 5 keys, frontends[] 11, pools[] 9: far more than 20.
    assert!(
        code.len() > 20,
        "parsed too few keys from src/config: {code:?}"
    );
    assert!(code.contains("pools[].health.tls.ca_file"), "{code:?}");
    let md = std::fs::read_to_string(repo().join(REFERENCE)).unwrap();
    let docs = reference_keys(&md);
    let undocumented: Vec<_> = code.iter().filter(|k| !docs.contains_key(*k)).collect();
    let unknown: Vec<_> = docs.iter().filter(|(k, _)| !code.contains(*k)).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "{REFERENCE} and src/config disagree.\n  keys in the code without a row: {undocumented:?}\n  rows (key, line) the code does not accept: {unknown:?}"
    );
}

#[test]
fn serde_parser_follows_renames_lists_and_flatten() {
    let src = r#"
        /// doc with a } brace
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct RawConfig {
            pub first_key: Option<String>,
            #[serde(rename = "renamed")]
            pub other: Vec<Box<Inner>>,
            #[serde(flatten)]
            pub extra: Extra,
            #[serde(skip)]
            pub hidden: u8,
            pub map: HashMap<String, Inner>,
        }
        #[derive(Deserialize)]
        struct Inner { pub(crate) deep_one: Option<super::raw::Leaf>, r#type: String }
        #[derive(Deserialize)]
        struct Extra { pub flat: bool }
        #[derive(Deserialize)]
        enum Leaf { A { x: u8 } }
        #[derive(Debug)]
        struct NotSerde { pub no: u8 }
    "#;
    let mut structs = HashMap::new();
    deserialize_structs(src, &mut structs);
    assert!(!structs.contains_key("NotSerde"));
    let mut out = BTreeSet::new();
    walk(ROOT_STRUCT, "", &structs, &mut Vec::new(), &mut out);
    let want = [
        "first-key",
        "renamed",
        "renamed[].deep_one",
        "renamed[].type",
        "flat",
        "map",
    ];
    assert_eq!(out, want.iter().map(|s| s.to_string()).collect());
}

#[test]
fn operations_page_lists_every_metric() {
    let src = std::fs::read_to_string(repo().join("src/metrics.rs")).unwrap();
    let names: Vec<&str> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("apilb_") && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect();
    // 21 apilb_* metrics today; fewer means the scan broke.
    assert!(names.len() >= 21, "found only {names:?} in src/metrics.rs");
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !ops.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not describe {missing:?}"
    );
}

/// Every `.md` file, plus `.txt` files under deploy/ (which may hold links).
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" {
                markdown_files(&p, out);
            }
        } else if name.ends_with(".md")
            || (name.ends_with(".txt") && p.starts_with(repo().join("deploy")))
        {
            out.push(p);
        }
    }
}

/// Lines outside fenced code blocks, with inline code spans blanked.
fn prose_lines(md: &str) -> Vec<(usize, String)> {
    let (mut out, mut fence) = (Vec::new(), None::<String>);
    for (n, line) in md.lines().enumerate() {
        let t = line.trim_start();
        if let Some(f) = &fence {
            if t.starts_with(f.as_str()) {
                fence = None;
            }
            continue;
        }
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = Some(t.chars().take_while(|c| *c == '`' || *c == '~').collect());
            continue;
        }
        let parts: Vec<&str> = line.split('`').collect();
        let text = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i % 2 == 1 && i + 1 < parts.len() {
                    ""
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join("");
        out.push((n + 1, text));
    }
    out
}

/// Link targets: inline `[text](target)` and reference definitions `[x]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let end = matching(&rest[i + 1..], 0) - 1;
        let target = after[..end - 1].trim();
        let target = target.split_whitespace().next().unwrap_or("");
        out.push(
            target
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string(),
        );
        rest = &after[end - 1..];
    }
    let t = line.trim_start();
    if t.starts_with('[') {
        if let Some((label, target)) = t.split_once("]:") {
            if !label.contains("](") {
                out.push(target.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase; letters, digits, `-`, `_` and
/// spaces kept (spaces become `-`); duplicates get `-1`, `-2`, ...
fn slugs(md: &str) -> BTreeSet<String> {
    let (mut out, mut count) = (BTreeSet::new(), HashMap::<String, usize>::new());
    let mut fence = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
        }
        let Some(h) = line.strip_prefix('#').filter(|_| !fence) else {
            continue;
        };
        let text = h.trim_start_matches('#');
        if !text.is_empty() && !text.starts_with(' ') {
            continue;
        }
        let text = text.trim();
        let base: String = text
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = count.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// Checks one link from `file`; returns a problem or `None`.
fn check_link(file: &Path, target: &str) -> Option<String> {
    if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let dest = if path.is_empty() {
        file.to_path_buf()
    } else if let Some(abs) = path.strip_prefix('/') {
        repo().join(abs)
    } else {
        file.parent().unwrap().join(path)
    };
    if !dest.exists() {
        return Some(format!("{target}: no such file {}", dest.display()));
    }
    let inside = dest
        .canonicalize()
        .ok()?
        .starts_with(repo().canonicalize().unwrap());
    if !inside {
        return Some(format!("{target}: points outside the repository"));
    }
    let anchor = anchor.filter(|_| dest.extension().is_some_and(|x| x == "md"))?;
    let slugs = slugs(&std::fs::read_to_string(&dest).unwrap());
    (!slugs.contains(anchor))
        .then(|| format!("{target}: no heading #{anchor} in {}", dest.display()))
}

#[test]
fn relative_links_resolve() {
    let mut files = Vec::new();
    markdown_files(&repo(), &mut files);
    let names: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(repo()).unwrap().to_owned())
        .collect();
    for must in [
        "README.md",
        "ARCHITECTURE.md",
        "CONTRIBUTING.md",
        "docs/configuration.md",
    ] {
        assert!(
            names.contains(&PathBuf::from(must)),
            "{must} missing; found {names:?}"
        );
    }
    let (mut problems, mut checked) = (Vec::new(), 0);
    for f in &files {
        let md = std::fs::read_to_string(f).unwrap();
        for (n, line) in prose_lines(&md) {
            for t in link_targets(&line) {
                checked += 1;
                if let Some(p) = check_link(f, &t) {
                    problems.push(format!(
                        "{}:{n}: {p}",
                        f.strip_prefix(repo()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        checked >= 20,
        "found only {checked} links; is the link parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn link_checker_sees_links_anchors_and_code() {
    let md = "# Top\n## A `b` c\n## A b c\n```\n[x](nowhere.md)\n```\nsee [y](#a-b-c-1) and `[z](gone.md)`\n[r]: ./docs\n";
    let links: Vec<String> = prose_lines(md)
        .iter()
        .flat_map(|(_, l)| link_targets(l))
        .collect();
    assert_eq!(links, ["#a-b-c-1", "./docs"]);
    assert_eq!(
        slugs(md),
        ["top", "a-b-c", "a-b-c-1"].map(String::from).into()
    );
    let readme = repo().join("README.md");
    assert!(check_link(&readme, "#no-such-heading").is_some());
    assert!(check_link(&readme, "docs/no-such-page.md").is_some());
    assert!(check_link(&readme, "../outside.md").is_some());
    assert!(check_link(&readme, "https://no-color.org").is_none());
}

#[test]
fn readme_fits_on_a_few_screens() {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let n = text.lines().count();
    assert!(
        n <= README_MAX_LINES,
        "README.md has {n} lines; at most {README_MAX_LINES}"
    );
}
