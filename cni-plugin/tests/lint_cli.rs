//! `sluice lint` as a user runs it: the built binary on the lint fixtures
//! (lint/tests/fixtures), checking the exit status and the text, JSON and
//! SARIF output. Offline: no agent, no root.
//!
//! Run: `cargo test -p sluice-cni --test lint_cli` (cargo builds the binary
//! for this test; CARGO_BIN_EXE_sluice is its path).
#![expect(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs `sluice lint ARGS` from the workspace root, so that fixture paths
/// (and SARIF URIs) are relative to it.
fn lint(args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("lint")
        .args(args)
        .current_dir(root)
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap()
}

fn fixture(rel: &str) -> String {
    format!("lint/tests/fixtures/{rel}")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn text_output_names_rule_object_path_and_fix_and_warnings_exit_1() {
    let o = lint(&["-f", &fixture("two-item-peer/trigger.yaml")]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.starts_with(
            "lint/tests/fixtures/two-item-peer/trigger.yaml:4: warning[two-item-peer] NetworkPolicy/shop/from-client spec.ingress[0].from[0]: from[0] (namespaceSelector) and from[1] (podSelector) are two peers"
        ),
        "{out}"
    );
    assert!(
        out.contains("\n  fix: put namespaceSelector and podSelector in one item"),
        "{out}"
    );
    assert!(
        out.ends_with("0 error(s), 1 warning(s), 0 info; 1 file(s), 1 object(s) read\n"),
        "{out}"
    );
}

#[test]
fn a_clean_file_exits_0_and_says_so() {
    let o = lint(&["-f", &fixture("two-item-peer/clean.yaml")]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o),
        "0 error(s), 0 warning(s), 0 info; 1 file(s), 1 object(s) read\n"
    );
}

#[test]
fn info_findings_alone_exit_0() {
    let o = lint(&["-f", &fixture("cnp-rule-shadowed/trigger-redundant.yaml")]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("info[cnp-rule-shadowed] ClusterNetworkPolicy/no-ssh spec.ingress[1]"),
        "{out}"
    );
}

#[test]
fn json_output_lists_findings_with_file_and_line_and_errors_exit_3() {
    let o = lint(&[
        "-f",
        &fixture("except-outside-cidr/trigger.yaml"),
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let f = &v["findings"][0];
    assert_eq!(f["rule"], "except-outside-cidr");
    assert_eq!(f["severity"], "error");
    assert_eq!(f["object"], "NetworkPolicy/shop/lan");
    assert_eq!(f["path"], "spec.ingress[0].from[0].ipBlock.except[0]");
    assert_eq!(f["file"], fixture("except-outside-cidr/trigger.yaml"));
    assert_eq!(f["line"], 1);
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("sub-range of 10.0.0.0/8")
    );
    assert_eq!(v["findings"].as_array().unwrap().len(), 1);
    assert_eq!(v["summary"]["error"], 1);
    assert_eq!(v["errors"], Value::Array(vec![]));
}

fn sarif(file: &str, want_exit: i32) -> Value {
    let o = lint(&["-f", &fixture(file), "-o", "sarif"]);
    assert_eq!(o.status.code(), Some(want_exit), "{file}");
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn sarif_output_is_a_sarif_2_1_0_log_whose_results_point_at_rules_and_files() {
    let v = sarif("cnp-rule-shadowed/trigger.yaml", 1);
    assert_eq!(v["version"], "2.1.0");
    assert!(v["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    let run = &v["runs"][0];
    assert_eq!(run["tool"]["driver"]["name"], "sluice");
    let rules = run["tool"]["driver"]["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .all(|r| r["id"].is_string() && r["shortDescription"]["text"].is_string())
    );
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{results:?}");
    let r = &results[0];
    assert_eq!(r["ruleId"], "cnp-rule-shadowed");
    assert_eq!(r["level"], "warning");
    let i = usize::try_from(r["ruleIndex"].as_u64().unwrap()).unwrap();
    assert_eq!(rules[i]["id"], r["ruleId"]);
    assert!(
        r["message"]["text"]
            .as_str()
            .unwrap()
            .contains("Fix: give this policy a lower priority")
    );
    let loc = &r["locations"][0]["physicalLocation"];
    assert_eq!(
        loc["artifactLocation"]["uri"],
        fixture("cnp-rule-shadowed/trigger.yaml")
    );
    assert_eq!(loc["region"]["startLine"], 18);
    assert_eq!(
        r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"],
        "ClusterNetworkPolicy/allow-web"
    );
}

#[test]
fn sarif_levels_are_error_warning_and_note() {
    let level = |file, exit| {
        let v = sarif(file, exit);
        v["runs"][0]["results"][0]["level"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(level("cnp-rule-shadowed/trigger-redundant.yaml", 0), "note");
    assert_eq!(level("except-outside-cidr/trigger.yaml", 3), "error");
    let clean = sarif("except-outside-cidr/clean.yaml", 0);
    assert_eq!(clean["runs"][0]["results"], Value::Array(vec![]));
}

#[test]
fn a_document_that_does_not_parse_is_an_error_with_its_place_and_exits_3() {
    let o = lint(&["-f", "api/tests/fixtures/files/bad.yaml", "-o", "sarif"]);
    assert_eq!(o.status.code(), Some(3));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let results = v["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(
        results
            .iter()
            .all(|r| r["ruleId"] == "invalid-document" && r["level"] == "error")
    );
    let text = stdout(&lint(&["-f", "api/tests/fixtures/files/bad.yaml"]));
    assert!(
        text.contains("bad.yaml:7: error[invalid-document] document 2: invalid Pod"),
        "{text}"
    );
}

#[test]
fn a_missing_path_or_no_path_is_a_usage_error_exit_2() {
    let o = lint(&["-f", "lint/tests/fixtures/no-such-dir"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("sluice: lint: lint/tests/fixtures/no-such-dir: "),
        "{err}"
    );
    let o = lint(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Usage: sluice lint"));
    assert_eq!(lint(&["-f", "x", "-o", "xml"]).status.code(), Some(2));
}

#[test]
fn the_demo_example_shows_the_two_item_trap_and_nothing_else() {
    let o = lint(&["-f", "deploy/examples/lint/"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let findings: Vec<&str> = out.lines().filter(|l| !l.starts_with("  ")).collect();
    assert_eq!(findings.len(), 2, "one finding and the summary: {out}");
    assert!(
        findings[0].contains(
            "warning[two-item-peer] NetworkPolicy/x/allow-web-from-y-b spec.ingress[0].from[0]"
        ),
        "{out}"
    );
}

#[test]
fn several_paths_are_linted_together() {
    // One set of objects: both files' policies are linted, against the pods
    // of the first.
    let o = lint(&[
        "-f",
        &fixture("peer-selects-nothing/trigger.yaml"),
        "-f",
        &fixture("two-item-peer/trigger.yaml"),
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["files"], 2);
    let rules: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert!(rules.contains(&"two-item-peer"), "{rules:?}");
    assert!(rules.contains(&"peer-selects-nothing"), "{rules:?}");
}
