//! The agent's rooms keep their shape (docs/architecture.md): dependencies
//! between its top-level modules run one way, only `datapath` imports aya,
//! the policy core imports no I/O crate, and no product file grows past
//! what a newcomer reads in one go.
#![expect(clippy::unwrap_used, reason = "tests")]
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Longest product source file, in lines (tests excluded).
const MAX_LINES: usize = 650;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`policy` for
/// src/policy/txn.rs, `server` for src/server.rs).
fn room(path: &Path) -> String {
    let rel = path.strip_prefix(SRC).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn is_test_file(path: &Path) -> bool {
    let s = path.to_string_lossy();
    s.contains("/tests/") || s.ends_with("/tests.rs")
}

/// The text before `#[cfg(test)]`: what the product is built from.
fn product_text(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// Every `crate::<room>` a text names.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    // `use crate::{a, b::c}` groups.
    let mut rest = text;
    while let Some(i) = rest.find("crate::{") {
        rest = &rest[i + "crate::{".len()..];
        let mut depth = 1;
        let mut at_start = true;
        let mut name = String::new();
        for c in rest.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                break;
            }
            if depth == 1 && (c.is_ascii_alphanumeric() || c == '_') {
                if at_start {
                    name.push(c);
                }
            } else {
                if !name.is_empty() {
                    out.insert(std::mem::take(&mut name));
                }
                at_start = depth == 1 && (c == ',' || c.is_whitespace() || c == '{');
            }
        }
    }
    out
}

fn rooms() -> BTreeMap<String, (BTreeSet<String>, String)> {
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    let mut out: BTreeMap<String, (BTreeSet<String>, String)> = BTreeMap::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let r = room(f);
        if r == "main" {
            continue; // the binary wires everything
        }
        let text = product_text(f);
        let e = out.entry(r.clone()).or_default();
        e.0.extend(crate_refs(&text).into_iter().filter(|d| *d != r));
        e.1.push_str(&text);
    }
    out
}

#[test]
fn dependencies_between_the_agents_modules_run_one_way() {
    let rooms = rooms();
    let known: BTreeSet<&String> = rooms.keys().collect();
    // Depth-first search for a cycle.
    fn visit<'a>(
        r: &'a str,
        rooms: &'a BTreeMap<String, (BTreeSet<String>, String)>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(r) {
            return;
        }
        if let Some(i) = path.iter().position(|p| *p == r) {
            panic!("import cycle: {} -> {r}", path[i..].join(" -> "));
        }
        path.push(r);
        if let Some((deps, _)) = rooms.get(r) {
            for d in deps {
                visit(d, rooms, path, done);
            }
        }
        path.pop();
        done.insert(r);
    }
    let mut done = BTreeSet::new();
    for r in &known {
        visit(r, &rooms, &mut Vec::new(), &mut done);
    }
    // The core stays at the bottom.
    for (low, forbidden) in [
        (
            "model",
            &["policy", "cluster", "datapath", "endpoints", "reconcile"][..],
        ),
        (
            "policy",
            &[
                "cluster",
                "datapath",
                "endpoints",
                "reconcile",
                "server",
                "metrics",
            ][..],
        ),
        (
            "datapath",
            &["cluster", "endpoints", "reconcile", "server"][..],
        ),
        ("endpoints", &["cluster", "reconcile", "server"][..]),
        (
            "cluster",
            &["datapath", "endpoints", "reconcile", "server"][..],
        ),
    ] {
        let deps = &rooms[low].0;
        for f in forbidden {
            assert!(!deps.contains(*f), "{low} must not depend on {f}: {deps:?}");
        }
    }
}

#[test]
fn only_the_datapath_imports_aya_and_the_policy_core_does_no_io() {
    for (room, (_, text)) in rooms() {
        if room != "datapath" {
            assert!(!text.contains("aya::"), "{room} imports aya");
        }
        if room == "policy" || room == "model" {
            for io in [
                "tokio::",
                "kube::",
                "aya::",
                "std::fs",
                "std::net::Tcp",
                "nix::",
            ] {
                assert!(!text.contains(io), "{room} uses {io}");
            }
        }
    }
}

#[test]
fn no_product_source_file_is_longer_than_a_newcomer_reads_at_once() {
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|f| !is_test_file(f))
        .map(|f| (f, product_text(f).lines().count()))
        .filter(|(_, n)| *n > MAX_LINES)
        .map(|(f, n)| format!("{} ({n} lines)", f.display()))
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_reference_scanner_sees_grouped_and_plain_paths() {
    let refs = crate_refs(
        "use crate::{\n    cluster::{Change, Cluster},\n    datapath::Datapath,\n};\nlet x = crate::netdev::node_ips();",
    );
    let want: BTreeSet<String> = ["cluster", "datapath", "netdev"].map(String::from).into();
    assert_eq!(refs, want);
}
