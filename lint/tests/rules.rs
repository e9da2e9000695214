//! Every rule against its fixtures: `tests/fixtures/<rule id>/trigger*.yaml`
//! must produce exactly the findings listed here for that rule, and
//! `clean*.yaml` none of that rule.
#![expect(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
use std::path::{Path, PathBuf};

use sluice_api::files::load;
use sluice_lint::{Finding, RULES, Severity, lint};

fn dir(rule: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rule)
}

fn run(path: &Path) -> Vec<Finding> {
    let loaded = load(path).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    lint(&loaded.objects)
}

/// (object, path, severity) of each finding of `rule` in `file`.
fn of_rule(rule: &str, file: &str) -> Vec<(String, String, Severity)> {
    run(&dir(rule).join(file))
        .into_iter()
        .filter(|f| f.rule == rule)
        .map(|f| (f.object.to_string(), f.path, f.severity))
        .collect()
}

fn files(rule: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir(rule))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".yaml"))
        .collect();
    v.sort();
    v
}

fn w(obj: &str, path: &str) -> (String, String, Severity) {
    (obj.to_owned(), path.to_owned(), Severity::Warning)
}

fn e(obj: &str, path: &str) -> (String, String, Severity) {
    (obj.to_owned(), path.to_owned(), Severity::Error)
}

#[test]
fn every_rule_has_a_triggering_and_a_clean_fixture_and_the_clean_ones_are_clean() {
    for r in RULES {
        assert!(
            !files(r.id, "trigger").is_empty(),
            "{}: no trigger fixture",
            r.id
        );
        let clean = files(r.id, "clean");
        assert!(!clean.is_empty(), "{}: no clean fixture", r.id);
        for f in clean {
            assert_eq!(of_rule(r.id, &f), [], "{}/{f}", r.id);
        }
    }
}

#[test]
fn two_item_peer_flags_a_namespace_item_next_to_a_pod_item() {
    assert_eq!(
        of_rule("two-item-peer", "trigger.yaml"),
        [w(
            "NetworkPolicy/shop/from-client",
            "spec.ingress[0].from[0]"
        )]
    );
}

#[test]
fn policy_selects_nothing_flags_network_and_cluster_policies() {
    assert_eq!(
        of_rule("policy-selects-nothing", "trigger.yaml"),
        [
            w("ClusterNetworkPolicy/no-such-ns", "spec.subject"),
            w("NetworkPolicy/shop/api-only", "spec.podSelector"),
        ]
    );
}

#[test]
fn peer_selects_nothing_flags_a_misspelt_pod_label_and_an_unknown_namespace_label() {
    let all = run(&dir("peer-selects-nothing").join("trigger.yaml"));
    let msgs: Vec<&str> = all
        .iter()
        .filter(|f| f.rule == "peer-selects-nothing")
        .map(|f| f.message.as_str())
        .collect();
    assert_eq!(
        of_rule("peer-selects-nothing", "trigger.yaml"),
        [
            w("NetworkPolicy/shop/web", "spec.ingress[0].from[0]"),
            w("NetworkPolicy/shop/web", "spec.ingress[1].from[0]"),
        ]
    );
    assert!(
        msgs[0].contains("podSelector matches no pod of namespace shop"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].contains("namespaceSelector matches no namespace"),
        "{msgs:?}"
    );
}

#[test]
fn named_port_unexposed_names_the_protocol() {
    let all = run(&dir("named-port-unexposed").join("trigger.yaml"));
    let f: Vec<&Finding> = all
        .iter()
        .filter(|f| f.rule == "named-port-unexposed")
        .collect();
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0].path, "spec.ingress[0].ports[0]");
    assert!(
        f[0].message.contains("\"metrics\" with protocol TCP"),
        "{}",
        f[0].message
    );
    assert_eq!(f[1].path, "spec.ingress[0].ports[1]");
    assert!(
        f[1].message
            .contains("\"http\" with protocol UDP (it is declared, but not for UDP)"),
        "{}",
        f[1].message
    );
}

#[test]
fn named_port_unexposed_checks_cluster_network_policy_destination_named_ports() {
    assert_eq!(
        of_rule("named-port-unexposed", "trigger-cnp.yaml"),
        [w(
            "ClusterNetworkPolicy/web-metrics",
            "spec.ingress[0].protocols[0]"
        )]
    );
}

#[test]
fn egress_without_dns_flags_isolated_egress_with_no_port_53() {
    assert_eq!(
        of_rule("egress-without-dns", "trigger.yaml"),
        [w("NetworkPolicy/shop/web-to-db", "spec.egress")]
    );
}

#[test]
fn allow_all_rule_flags_an_empty_ingress_rule() {
    assert_eq!(
        of_rule("allow-all-rule", "trigger.yaml"),
        [w("NetworkPolicy/shop/default-deny", "spec.ingress[0]")]
    );
}

#[test]
fn policy_types_surprise_flags_ignored_rules_and_surprising_inference() {
    assert_eq!(
        of_rule("policy-types-surprise", "trigger.yaml"),
        [
            w("NetworkPolicy/shop/empty-egress", "spec.egress"),
            w("NetworkPolicy/shop/inferred", "spec.policyTypes"),
            w("NetworkPolicy/shop/listed", "spec.policyTypes"),
        ]
    );
}

#[test]
fn ipblock_covers_pods_names_the_pods() {
    let all = run(&dir("ipblock-covers-pods").join("trigger.yaml"));
    let f: Vec<&Finding> = all
        .iter()
        .filter(|f| f.rule == "ipblock-covers-pods")
        .collect();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].path, "spec.ingress[0].from[0].ipBlock");
    assert!(
        f[0].message.contains("shop/web-0, shop/client-0"),
        "{}",
        f[0].message
    );
}

#[test]
fn except_outside_cidr_is_an_error_on_the_except_entry() {
    assert_eq!(
        of_rule("except-outside-cidr", "trigger.yaml"),
        [e(
            "NetworkPolicy/shop/lan",
            "spec.ingress[0].from[0].ipBlock.except[0]"
        )]
    );
}

#[test]
fn invalid_object_reports_bad_selectors_and_schema_errors() {
    assert_eq!(
        of_rule("invalid-object", "trigger.yaml"),
        [
            e("ClusterNetworkPolicy/bad-priority", "spec.priority"),
            e("NetworkPolicy/shop/bad-selector", "spec.podSelector"),
        ]
    );
}

#[test]
fn cnp_rule_shadowed_by_a_wider_earlier_rule_is_a_warning_or_info_when_redundant() {
    let all = run(&dir("cnp-rule-shadowed").join("trigger.yaml"));
    let f: Vec<&Finding> = all
        .iter()
        .filter(|f| f.rule == "cnp-rule-shadowed")
        .collect();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].object.to_string(), "ClusterNetworkPolicy/allow-web");
    assert_eq!(f[0].path, "spec.ingress[0]");
    assert!(
        f[0].message
            .contains("ClusterNetworkPolicy/deny-all-ingress spec.ingress[0] (deny-everything)"),
        "{}",
        f[0].message
    );
    assert_eq!(
        of_rule("cnp-rule-shadowed", "trigger-redundant.yaml"),
        [(
            "ClusterNetworkPolicy/no-ssh".to_owned(),
            "spec.ingress[1]".to_owned(),
            Severity::Info
        )]
    );
}

#[test]
fn np_denied_by_admin_names_the_deny() {
    let all = run(&dir("np-denied-by-admin").join("trigger.yaml"));
    let f: Vec<&Finding> = all
        .iter()
        .filter(|f| f.rule == "np-denied-by-admin")
        .collect();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        f[0].object.to_string(),
        "NetworkPolicy/shop/web-from-client"
    );
    assert!(
        f[0].message
            .contains("ClusterNetworkPolicy/quarantine-shop spec.ingress[0]"),
        "{}",
        f[0].message
    );
    assert_eq!(
        of_rule("np-denied-by-admin", "trigger-defined-namespace.yaml"),
        [w("NetworkPolicy/shop/web-from-client", "spec")]
    );
}

#[test]
fn findings_carry_where_the_object_was_read() {
    let f = run(&dir("two-item-peer").join("trigger.yaml"));
    let origin = f[0].origin.as_ref().unwrap();
    assert!(origin.file.ends_with("two-item-peer/trigger.yaml"));
    assert_eq!(origin.line, Some(4));
}
