#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]
//! Each NetworkPolicy rule on a small cluster, judged through the lookup
//! model (`would_allow`, `verdict`), plus invalid input, identities, the
//! ipcache, change reporting, and incremental == recompute == fresh build on
//! random event sequences.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_CIDR_FLAG, IDENTITY_FIRST_USER, IDENTITY_HOST,
    IDENTITY_WORLD, proto,
};

use super::{verdict::direction_allows, *};

const TCP: u8 = proto::TCP;
const UDP: u8 = proto::UDP;
const SCTP: u8 = proto::SCTP;
const ICMP: u8 = proto::ICMP;

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut l: BTreeMap<&str, &str> = labels.iter().copied().collect();
    l.insert("kubernetes.io/metadata.name", name);
    serde_json::from_value(json!({"metadata": {"name": name, "labels": l}})).unwrap()
}

/// Every pod serves `http` (TCP 80) and `dns` (UDP 53) unless told
/// otherwise.
fn pod_with(ns: &str, name: &str, labels: Value, ip: &str, ports: &[(&str, &str, u16)]) -> Pod {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, port)| json!({"name": n, "protocol": p, "containerPort": port}))
        .collect();
    let mut v = json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    });
    v["metadata"]["labels"] = labels;
    serde_json::from_value(v).unwrap()
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str) -> Pod {
    pod_with(
        ns,
        name,
        labels,
        ip,
        &[("http", "TCP", 80), ("dns", "UDP", 53)],
    )
}

fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    let mut v = json!({"metadata": {"namespace": ns, "name": name}});
    v["spec"] = spec;
    serde_json::from_value(v).unwrap()
}

fn obj(s: &str) -> ObjectRef {
    let (ns, name) = s.split_once('/').unwrap();
    ObjectRef::new(ns, name)
}

/// Namespaces `x` (team a) and `y` (team b); pods x/a, x/b, y/a, y/b labelled
/// `app: <name>`, addresses 10.0.<ns>.<n>.
struct World {
    c: Compiler,
}

impl World {
    fn new() -> Self {
        let mut c = Compiler::new(Locality::All);
        c.upsert_namespace(&namespace("x", &[("team", "a")]));
        c.upsert_namespace(&namespace("y", &[("team", "b")]));
        for (ns, n, ip) in [
            ("x", "a", "10.0.1.1"),
            ("x", "b", "10.0.1.2"),
            ("y", "a", "10.0.2.1"),
            ("y", "b", "10.0.2.2"),
        ] {
            c.upsert_pod(&pod(ns, n, json!({"app": n}), ip));
        }
        Self { c }
    }

    fn apply(&mut self, ns: &str, name: &str, spec: Value) -> Changes {
        self.c.upsert_policy(&policy(ns, name, spec))
    }

    fn allows(&self, from: &str, to: &str, proto: u8, port: u16) -> bool {
        self.c.would_allow(&obj(from), &obj(to), proto, port)
    }

    fn ep(&self, pod: &str) -> Arc<EndpointPolicy> {
        self.c.endpoint_policy(&obj(pod)).unwrap()
    }

    fn ip(&self, pod: &str) -> IpAddr {
        self.c.addresses_of(&obj(pod)).unwrap()[0]
    }

    /// Every ordered pair of pods allowed on (proto, port), as "from>to".
    fn allowed(&self, proto: u8, port: u16) -> BTreeSet<String> {
        let pods = ["x/a", "x/b", "y/a", "y/b"];
        let mut out = BTreeSet::new();
        for f in pods {
            for t in pods {
                if f != t && self.allows(f, t, proto, port) {
                    out.insert(format!("{f}>{t}"));
                }
            }
        }
        out
    }
}

fn pairs(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn all_pairs() -> BTreeSet<String> {
    let pods = ["x/a", "x/b", "y/a", "y/b"];
    pods.iter()
        .flat_map(|f| {
            pods.iter()
                .filter(move |t| *t != f)
                .map(move |t| format!("{f}>{t}"))
        })
        .collect()
}

/// Pairs that end at `to`, from everyone else.
fn into(to: &str) -> BTreeSet<String> {
    all_pairs()
        .into_iter()
        .filter(|p| p.ends_with(&format!(">{to}")))
        .collect()
}

fn minus(a: &BTreeSet<String>, b: &BTreeSet<String>) -> BTreeSet<String> {
    a.difference(b).cloned().collect()
}

// ----- isolation and selection -----

#[test]
fn pods_that_no_policy_selects_are_not_isolated_and_get_no_rules() {
    let w = World::new();
    let p = w.ep("x/a");
    assert!(!p.ingress_isolated && !p.egress_isolated);
    assert!(p.rules.is_empty() && p.cidrs.is_empty());
    assert_eq!(w.allowed(TCP, 80), all_pairs());
}

#[test]
fn an_empty_pod_selector_isolates_every_pod_of_the_policy_namespace_and_no_other() {
    let mut w = World::new();
    w.apply("x", "deny", json!({"podSelector": {}}));
    assert!(w.ep("x/a").ingress_isolated && w.ep("x/b").ingress_isolated);
    assert!(!w.ep("y/a").ingress_isolated);
    assert!(!w.ep("x/a").egress_isolated);
    let want = minus(&minus(&all_pairs(), &into("x/a")), &into("x/b"));
    assert_eq!(w.allowed(TCP, 80), want);
}

#[test]
fn a_policy_with_a_type_and_no_rules_denies_that_direction_entirely() {
    let mut w = World::new();
    w.apply(
        "x",
        "deny-egress",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}),
    );
    let p = w.ep("x/a");
    assert!(p.egress_isolated && !p.ingress_isolated && p.rules.is_empty());
    assert!(!w.allows("x/a", "y/a", TCP, 80) && !w.allows("x/a", "x/b", ICMP, 0));
    assert!(w.allows("x/b", "x/a", TCP, 80));
    // Egress to an address outside the cluster is denied too.
    let outside: IpAddr = "192.0.2.9".parse().unwrap();
    assert!(!w.c.verdict(w.ip("x/a"), outside, TCP, 443));
}

#[test]
fn policy_types_default_to_ingress_plus_egress_only_when_there_are_egress_rules() {
    let mut w = World::new();
    w.apply(
        "x",
        "with-egress",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
    );
    let p = w.ep("x/a");
    assert!(p.ingress_isolated && p.egress_isolated);
    w.apply(
        "x",
        "empty-egress",
        json!({"podSelector": {"matchLabels": {"app": "b"}}, "egress": []}),
    );
    let p = w.ep("x/b");
    assert!(p.ingress_isolated && !p.egress_isolated);
}

#[test]
fn explicit_policy_types_are_honoured_and_rules_of_other_directions_ignored() {
    let mut w = World::new();
    w.apply(
        "x",
        "egress-only",
        json!({
            "podSelector": {"matchLabels": {"app": "a"}},
            "policyTypes": ["Egress"],
            "ingress": [{}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}],
        }),
    );
    let p = w.ep("x/a");
    assert!(!p.ingress_isolated && p.egress_isolated);
    assert!(p.rules.iter().all(|r| r.dir == DIR_EGRESS));
    assert!(w.allows("x/a", "x/b", TCP, 80) && !w.allows("x/a", "y/b", TCP, 80));
}

#[test]
fn a_pod_selector_peer_alone_means_pods_of_the_policy_namespace() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-b",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
    );
    assert!(w.allows("x/b", "x/a", TCP, 80));
    assert!(
        !w.allows("y/b", "x/a", TCP, 80),
        "y/b has app=b but another namespace"
    );
    assert!(!w.allows("y/a", "x/a", TCP, 80));
}

#[test]
fn a_namespace_selector_alone_selects_every_pod_of_the_matching_namespaces() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-team-b",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    );
    assert_eq!(
        minus(&into("x/a"), &w.allowed(TCP, 80)),
        pairs(&["x/b>x/a"])
    );
}

#[test]
fn an_empty_namespace_selector_means_every_pod_but_not_addresses_outside_the_cluster() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-cluster",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    assert_eq!(w.allowed(TCP, 80), all_pairs());
    let outside: IpAddr = "192.0.2.9".parse().unwrap();
    assert!(!w.c.verdict(outside, w.ip("x/a"), TCP, 80));
}

#[test]
fn pod_and_namespace_selectors_in_one_peer_are_anded_and_separate_peers_are_ored() {
    let mut w = World::new();
    w.apply(
        "x",
        "and",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "b"}}}
        ]}]}),
    );
    assert_eq!(
        w.allowed(TCP, 80)
            .intersection(&into("x/a"))
            .cloned()
            .collect::<BTreeSet<_>>(),
        pairs(&["y/b>x/a"])
    );
    w.apply(
        "x",
        "and",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "b"}}},
            {"podSelector": {"matchLabels": {"app": "b"}}}
        ]}]}),
    );
    assert_eq!(
        w.allowed(TCP, 80)
            .intersection(&into("x/a"))
            .cloned()
            .collect::<BTreeSet<_>>(),
        pairs(&["y/b>x/a", "y/a>x/a", "x/b>x/a"])
    );
}

#[test]
fn match_expressions_select_with_in_notin_exists_and_doesnotexist() {
    let mut w = World::new();
    w.c.upsert_pod(&pod(
        "y",
        "c",
        json!({"app": "c", "canary": "yes"}),
        "10.0.2.3",
    ));
    let from = |expr: Value| {
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchExpressions": [expr]}}
        ]}]})
    };
    let sources = |w: &World| -> BTreeSet<&str> {
        ["x/b", "y/a", "y/b", "y/c"]
            .into_iter()
            .filter(|s| w.allows(s, "x/a", TCP, 80))
            .collect()
    };
    w.apply(
        "x",
        "p",
        from(json!({"key": "app", "operator": "In", "values": ["b", "c"]})),
    );
    assert_eq!(sources(&w), BTreeSet::from(["x/b", "y/b", "y/c"]));
    w.apply(
        "x",
        "p",
        from(json!({"key": "app", "operator": "NotIn", "values": ["b"]})),
    );
    assert_eq!(sources(&w), BTreeSet::from(["y/a", "y/c"]));
    w.apply(
        "x",
        "p",
        from(json!({"key": "canary", "operator": "Exists"})),
    );
    assert_eq!(sources(&w), BTreeSet::from(["y/c"]));
    w.apply(
        "x",
        "p",
        from(json!({"key": "canary", "operator": "DoesNotExist"})),
    );
    assert_eq!(sources(&w), BTreeSet::from(["x/b", "y/a", "y/b"]));
    // NotIn matches pods without the key at all.
    w.apply(
        "x",
        "p",
        from(json!({"key": "canary", "operator": "NotIn", "values": ["yes"]})),
    );
    assert_eq!(sources(&w), BTreeSet::from(["x/b", "y/a", "y/b"]));
}

#[test]
fn a_rule_without_peers_allows_every_peer_including_addresses_outside_the_cluster() {
    let mut w = World::new();
    w.apply(
        "x",
        "any-80",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    let p = w.ep("x/a");
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].identity, IDENTITY_ANY);
    let outside: IpAddr = "192.0.2.9".parse().unwrap();
    assert!(w.c.verdict(outside, w.ip("x/a"), TCP, 80));
    assert!(!w.c.verdict(outside, w.ip("x/a"), TCP, 81));
    assert!(w.allows("y/b", "x/a", TCP, 80));
    // `from: []` is the same as no `from`.
    w.apply(
        "x",
        "any-80",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [], "ports": [{"port": 80}]}]}),
    );
    assert!(w.c.verdict(outside, w.ip("x/a"), TCP, 80));
}

#[test]
fn ports_select_by_protocol_number_and_range_with_tcp_by_default() {
    let mut w = World::new();
    let with_ports = |ports: Value| json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": ports}]});
    w.apply("x", "p", with_ports(json!([{"port": 80}])));
    assert!(w.allows("x/b", "x/a", TCP, 80));
    assert!(!w.allows("x/b", "x/a", UDP, 80) && !w.allows("x/b", "x/a", SCTP, 80));
    assert!(!w.allows("x/b", "x/a", TCP, 81) && !w.allows("x/b", "x/a", ICMP, 0));

    w.apply("x", "p", with_ports(json!([{"protocol": "UDP"}])));
    assert!(w.allows("x/b", "x/a", UDP, 1) && w.allows("x/b", "x/a", UDP, 65535));
    assert!(!w.allows("x/b", "x/a", TCP, 80));
    assert_eq!(w.ep("x/a").rules[0].l4, L4::Proto(UDP));

    w.apply(
        "x",
        "p",
        with_ports(json!([{"protocol": "SCTP", "port": 1000, "endPort": 2000}])),
    );
    for (port, ok) in [
        (999, false),
        (1000, true),
        (1500, true),
        (2000, true),
        (2001, false),
    ] {
        assert_eq!(w.allows("x/b", "x/a", SCTP, port), ok, "SCTP {port}");
    }
    assert!(!w.allows("x/b", "x/a", TCP, 1500));
}

#[test]
fn a_rule_without_ports_allows_every_protocol_including_icmp() {
    let mut w = World::new();
    w.apply(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    assert!(w.ep("x/a").rules.iter().all(|r| r.l4 == L4::Any));
    for (proto, port) in [(TCP, 80), (UDP, 53), (SCTP, 9), (ICMP, 0)] {
        assert!(w.allows("x/b", "x/a", proto, port), "{proto}/{port}");
        assert!(!w.allows("y/b", "x/a", proto, port), "{proto}/{port}");
    }
}

#[test]
fn ingress_named_ports_resolve_on_the_selected_pod_itself() {
    let mut w = World::new();
    w.c.upsert_pod(&pod_with(
        "x",
        "c",
        json!({"app": "c"}),
        "10.0.1.3",
        &[("http", "TCP", 8080)],
    ));
    w.c.upsert_pod(&pod_with(
        "x",
        "d",
        json!({"app": "d"}),
        "10.0.1.4",
        &[("web", "TCP", 80)],
    ));
    w.apply(
        "x",
        "named",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
    );
    assert!(w.allows("y/a", "x/a", TCP, 80) && !w.allows("y/a", "x/a", TCP, 8080));
    assert!(w.allows("y/a", "x/c", TCP, 8080) && !w.allows("y/a", "x/c", TCP, 80));
    // x/d has no port named http: nothing is allowed to it.
    assert!(!w.allows("y/a", "x/d", TCP, 80));
    assert!(w.ep("x/d").ingress_isolated && w.ep("x/d").rules.is_empty());
}

#[test]
fn egress_named_ports_resolve_on_each_destination_and_nowhere_else() {
    let mut w = World::new();
    w.c.upsert_pod(&pod_with(
        "y",
        "c",
        json!({"app": "c"}),
        "10.0.2.3",
        &[("http", "TCP", 8080)],
    ));
    w.c.upsert_pod(&pod_with(
        "y",
        "d",
        json!({"app": "d"}),
        "10.0.2.4",
        &[("web", "TCP", 80)],
    ));
    w.apply(
        "x",
        "named",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"ports": [{"port": "http"}]}]}),
    );
    assert!(w.allows("x/a", "y/a", TCP, 80));
    assert!(w.allows("x/a", "y/c", TCP, 8080) && !w.allows("x/a", "y/c", TCP, 80));
    assert!(
        !w.allows("x/a", "y/d", TCP, 80),
        "y/d has no port named http"
    );
    // A name resolves only on pods: never on an address outside the cluster.
    let outside: IpAddr = "192.0.2.9".parse().unwrap();
    assert!(!w.c.verdict(w.ip("x/a"), outside, TCP, 80));
    // With a peer selector too.
    w.apply(
        "x",
        "named",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "c"}}}],
                           "ports": [{"port": "http"}]}]}),
    );
    assert!(w.allows("x/a", "y/c", TCP, 8080) && !w.allows("x/a", "y/a", TCP, 80));
}

#[test]
fn a_named_port_matches_only_with_its_protocol() {
    let mut w = World::new();
    w.apply(
        "x",
        "named",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [
            {"port": "dns", "protocol": "UDP"}, {"port": "http", "protocol": "UDP"}
        ]}]}),
    );
    assert!(w.allows("x/b", "x/a", UDP, 53));
    assert!(!w.allows("x/b", "x/a", UDP, 80) && !w.allows("x/b", "x/a", TCP, 80));
}

#[test]
fn several_policies_selecting_a_pod_are_additive() {
    let mut w = World::new();
    let spec = |from: &str, port: u16| {
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{
            "from": [{"podSelector": {"matchLabels": {"app": from}}}], "ports": [{"port": port}]}]})
    };
    w.apply("x", "one", spec("b", 80));
    assert!(w.allows("x/b", "x/a", TCP, 80) && !w.allows("x/b", "x/a", TCP, 81));
    w.apply("x", "two", spec("b", 81));
    assert!(w.allows("x/b", "x/a", TCP, 80) && w.allows("x/b", "x/a", TCP, 81));
    w.c.delete_policy("x", "one");
    assert!(!w.allows("x/b", "x/a", TCP, 80) && w.allows("x/b", "x/a", TCP, 81));
    w.c.delete_policy("x", "two");
    assert!(!w.ep("x/a").ingress_isolated);
}

#[test]
fn a_connection_needs_the_source_egress_and_the_destination_ingress() {
    let mut w = World::new();
    w.apply(
        "x",
        "in",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
    );
    w.apply(
        "x",
        "out",
        json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}]}),
    );
    assert!(!w.allows("x/b", "x/a", TCP, 80), "x/b's egress denies");
    w.apply(
        "x",
        "out",
        json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}),
    );
    assert!(w.allows("x/b", "x/a", TCP, 80));
    assert!(!w.allows("y/a", "x/a", TCP, 80), "x/a's ingress denies");
}

// ----- ipBlock -----

#[test]
fn an_ip_block_allows_its_cidr_minus_its_excepts_for_pods_and_outside_addresses() {
    let mut w = World::new();
    w.apply(
        "x",
        "cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}},
                   {"ipBlock": {"cidr": "192.0.2.0/24"}}],
            "ports": [{"port": 80}]}]}),
    );
    assert!(w.allows("x/a", "x/b", TCP, 80));
    assert!(
        !w.allows("x/a", "y/a", TCP, 80),
        "10.0.2.1 is in the except"
    );
    assert!(!w.allows("x/a", "x/b", TCP, 81));
    let src = w.ip("x/a");
    let v = |dst: &str, port| w.c.verdict(src, dst.parse().unwrap(), TCP, port);
    assert!(v("10.0.7.7", 80) && v("192.0.2.200", 80));
    assert!(!v("10.0.2.200", 80) && !v("10.1.0.1", 80) && !v("192.0.3.1", 80));
    let p = w.ep("x/a");
    let groups: BTreeMap<String, u32> = p
        .cidrs
        .iter()
        .map(|c| (c.net.to_string(), c.group))
        .collect();
    assert_eq!(groups["10.0.2.0/24"], 0, "an except is a hole");
    let g = groups["10.0.0.0/16"];
    assert_ne!(g & IDENTITY_CIDR_FLAG, 0);
    assert_eq!(groups["192.0.2.0/24"], g, "same (rule, L4) set, same group");
    assert!(p.rules.iter().any(|r| r.identity == g
        && r.l4
            == L4::Ports {
                proto: TCP,
                first: 80,
                last: 80
            }));
}

#[test]
fn overlapping_ip_blocks_of_different_rules_give_each_prefix_the_rules_that_cover_it() {
    let mut w = World::new();
    w.apply(
        "x",
        "cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 80}]},
            {"to": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}}], "ports": [{"port": 443}]},
            {"to": [{"ipBlock": {"cidr": "10.1.2.128/25"}}], "ports": [{"port": 22}]},
        ]}),
    );
    let src = w.ip("x/a");
    let v = |dst: &str, port| w.c.verdict(src, dst.parse().unwrap(), TCP, port);
    // 10.9.0.1: rule 0 only.
    assert!(v("10.9.0.1", 80) && !v("10.9.0.1", 443));
    // 10.1.0.1: rule 1 only (rule 0 excepts it).
    assert!(!v("10.1.0.1", 80) && v("10.1.0.1", 443));
    // 10.1.2.1: in rule 0's except and rule 1's except.
    assert!(!v("10.1.2.1", 80) && !v("10.1.2.1", 443) && !v("10.1.2.1", 22));
    // 10.1.2.200: rule 2 only.
    assert!(v("10.1.2.200", 22) && !v("10.1.2.200", 443) && !v("10.1.2.200", 80));
    let groups: BTreeSet<u32> = w
        .ep("x/a")
        .cidrs
        .iter()
        .map(|c| c.group)
        .filter(|&g| g != 0)
        .collect();
    assert_eq!(groups.len(), 3, "three distinct (rule, L4) sets");
}

#[test]
fn ip_blocks_on_ingress_match_sources_and_work_in_ipv6() {
    let mut c = Compiler::new(Locality::All);
    c.upsert_namespace(&namespace("x", &[]));
    c.upsert_pod(&pod("x", "a", json!({"app": "a"}), "fd00::1:1"));
    c.upsert_pod(&pod("x", "b", json!({"app": "b"}), "fd00::2:1"));
    c.upsert_policy(&policy(
        "x",
        "v6",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::2:0/112"]}},
            {"ipBlock": {"cidr": "2001:db8::/32"}}]}]}),
    ));
    let a: IpAddr = "fd00::1:1".parse().unwrap();
    assert!(!c.would_allow(&obj("x/b"), &obj("x/a"), TCP, 80));
    assert!(c.verdict("fd00::3:1".parse().unwrap(), a, UDP, 5));
    assert!(c.verdict("2001:db8::9".parse().unwrap(), a, ICMP, 0));
    assert!(!c.verdict("2001:db9::9".parse().unwrap(), a, TCP, 80));
    assert!(!c.verdict("10.0.0.1".parse().unwrap(), a, TCP, 80));
}

#[test]
fn cidr_group_ids_survive_an_update_that_keeps_the_same_rules() {
    let mut w = World::new();
    let spec = |extra: &str| {
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
            {"to": [{"podSelector": {"matchLabels": {"app": extra}}}]}]})
    };
    w.apply("x", "p", spec("b"));
    let before = w.ep("x/a").cidrs.clone();
    let changes = w.apply("x", "p", spec("nobody"));
    assert!(changes.endpoints.contains(&obj("x/a")));
    assert_eq!(w.ep("x/a").cidrs, before);
}

// ----- invalid input -----

#[test]
fn invalid_rules_are_reported_and_deny_what_they_would_allow_while_valid_rules_still_apply() {
    let bad_peers: Vec<(&str, Value)> = vec![
        (
            "unknown operator",
            json!([{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["b"]}]}}]),
        ),
        (
            "In without values",
            json!([{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}]),
        ),
        (
            "Exists with values",
            json!([{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["b"]}]}}]),
        ),
        (
            "bad label key",
            json!([{"podSelector": {"matchLabels": {"-bad-": "b"}}}]),
        ),
        (
            "bad label value",
            json!([{"namespaceSelector": {"matchLabels": {"team": "b c"}}}]),
        ),
        ("bad CIDR", json!([{"ipBlock": {"cidr": "10.0.0.300/24"}}])),
        (
            "CIDR without length",
            json!([{"ipBlock": {"cidr": "10.0.1.2"}}]),
        ),
        (
            "except outside",
            json!([{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]),
        ),
        (
            "except equal",
            json!([{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]),
        ),
        (
            "except other family",
            json!([{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}]),
        ),
        ("empty peer", json!([{}])),
        (
            "ipBlock with selector",
            json!([{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]),
        ),
    ];
    let bad_ports: Vec<(&str, Value)> = vec![
        (
            "unknown protocol",
            json!([{"port": 80, "protocol": "ICMP"}]),
        ),
        (
            "lower-case protocol",
            json!([{"port": 80, "protocol": "tcp"}]),
        ),
        ("bad port name", json!([{"port": "Http_Port"}])),
        ("numeric string", json!([{"port": "80"}])),
        (
            "port name too long",
            json!([{"port": "a-very-long-port-name"}]),
        ),
        ("endPort below port", json!([{"port": 90, "endPort": 80}])),
        (
            "endPort with a name",
            json!([{"port": "http", "endPort": 90}]),
        ),
        ("endPort without port", json!([{"endPort": 90}])),
        ("port zero", json!([{"port": 0}])),
        ("port too large", json!([{"port": 70000}])),
    ];
    let cases = bad_peers
        .into_iter()
        .map(|(what, from)| (what, json!({"from": from})))
        .chain(bad_ports.into_iter().map(|(what, ports)| {
            (
                what,
                json!({"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": ports}),
            )
        }));
    for (what, bad_rule) in cases {
        let mut w = World::new();
        let ch = w.apply(
            "x",
            "bad",
            json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [
                bad_rule,
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "a"}}}]}
            ]}),
        );
        assert!(
            ch.diagnostics
                .iter()
                .any(|d| d.object == ObjKey::new(Kind::NetworkPolicy, "x", "bad")
                    && d.reason.contains("ingress[0]")),
            "{what}: {:?}",
            ch.diagnostics
        );
        assert!(w.ep("x/a").ingress_isolated, "{what}");
        assert!(
            !w.allows("x/b", "x/a", TCP, 80),
            "{what}: the bad rule allows nothing"
        );
        assert!(
            w.allows("y/a", "x/a", TCP, 80),
            "{what}: the valid rule still applies"
        );
        assert_eq!(w.c.diagnostics().len(), ch.diagnostics.len(), "{what}");
    }
}

#[test]
fn an_invalid_pod_selector_isolates_the_whole_namespace_and_allows_nothing() {
    let mut w = World::new();
    let ch = w.apply(
        "x",
        "bad-target",
        json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Maybe"}]},
               "ingress": [{}], "policyTypes": ["Ingress"]}),
    );
    assert_eq!(ch.diagnostics.len(), 1);
    assert!(ch.diagnostics[0].reason.contains("spec.podSelector"));
    assert_eq!(
        w.allowed(TCP, 80),
        minus(&minus(&all_pairs(), &into("x/a")), &into("x/b"))
    );
}

#[test]
fn an_unknown_policy_type_isolates_both_directions() {
    let mut w = World::new();
    let ch = w.apply(
        "x",
        "typo",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egres"]}),
    );
    assert_eq!(ch.diagnostics.len(), 1);
    let p = w.ep("x/a");
    assert!(p.ingress_isolated && p.egress_isolated);
}

#[test]
fn an_egress_named_port_towards_an_ip_block_allows_nothing_there_and_says_so() {
    let mut w = World::new();
    let ch = w.apply(
        "x",
        "named-cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]}),
    );
    assert_eq!(ch.diagnostics.len(), 1);
    assert!(!w.allows("x/a", "x/b", TCP, 80));
    assert!(w.allows("x/a", "x/b", UDP, 53));
}

#[test]
fn pods_with_bad_addresses_or_ports_are_reported_and_the_rest_is_used() {
    let mut c = Compiler::new(Locality::All);
    let mut p = pod_with(
        "x",
        "a",
        json!({}),
        "10.0.0.1",
        &[("http", "QUIC", 80), ("ok", "TCP", 81)],
    );
    if let Some(s) = p.status.as_mut() {
        s.pod_ips = Some(vec![
            k8s_openapi::api::core::v1::PodIP {
                ip: "10.0.0.1".into(),
            },
            k8s_openapi::api::core::v1::PodIP {
                ip: "not-an-ip".into(),
            },
        ]);
    }
    let ch = c.upsert_pod(&p);
    assert_eq!(ch.diagnostics.len(), 2, "{:?}", ch.diagnostics);
    assert_eq!(
        c.addresses_of(&obj("x/a")),
        Some(&["10.0.0.1".parse().unwrap()][..])
    );
}

// ----- identities, ipcache, changes -----

#[test]
fn pods_alike_share_one_identity_so_a_rule_over_many_pods_is_one_entry() {
    let mut w = World::new();
    for i in 0..50 {
        w.c.upsert_pod(&pod(
            "y",
            &format!("web-{i}"),
            json!({"app": "web"}),
            &format!("10.0.3.{i}"),
        ));
    }
    let ids: BTreeSet<u32> = (0..50)
        .map(|i| w.c.identity_of(&obj(&format!("y/web-{i}"))).unwrap().0)
        .collect();
    assert_eq!(ids.len(), 1);
    let id = *ids.first().unwrap();
    assert!(id >= IDENTITY_FIRST_USER && id & IDENTITY_CIDR_FLAG == 0);
    w.apply(
        "x",
        "from-web",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 80}]}]}),
    );
    assert_eq!(
        w.ep("x/a").rules,
        vec![Rule {
            dir: DIR_INGRESS,
            identity: id,
            l4: L4::Ports {
                proto: TCP,
                first: 80,
                last: 80
            },
            rule_id: w.ep("x/a").rules[0].rule_id,
        }]
    );
    // Different named-port tables make different identities.
    w.c.upsert_pod(&pod_with(
        "y",
        "web-x",
        json!({"app": "web"}),
        "10.0.3.200",
        &[("http", "TCP", 8080)],
    ));
    assert_ne!(w.c.identity_of(&obj("y/web-x")), Some(Identity(id)));
}

#[test]
fn identities_are_released_when_their_last_pod_goes() {
    let mut w = World::new();
    let before = w.c.stats().identities;
    w.c.upsert_pod(&pod("x", "new", json!({"app": "new"}), "10.0.1.50"));
    assert_eq!(w.c.stats().identities, before + 1);
    w.c.delete_pod("x", "new");
    assert_eq!(w.c.stats().identities, before);
    for p in ["x/a", "x/b", "y/a", "y/b"] {
        let o = obj(p);
        w.c.delete_pod(&o.namespace, &o.name);
    }
    assert_eq!(w.c.stats().identities, 0);
    assert!(w.c.ipcache().is_empty());
}

#[test]
fn the_ipcache_maps_pod_addresses_and_reports_each_change() {
    let mut w = World::new();
    let ip = w.ip("x/a");
    let id = w.c.identity_of(&obj("x/a")).unwrap();
    assert_eq!(w.c.ipcache().get(&ip), Some(&id));
    assert_eq!(w.c.ip_identity(ip), Some(id));
    let ch =
        w.c.upsert_pod(&pod("x", "a", json!({"app": "a", "v": "2"}), "10.0.1.1"));
    let new_id = w.c.identity_of(&obj("x/a")).unwrap();
    assert_ne!(new_id, id);
    assert_eq!(ch.ipcache, BTreeMap::from([(ip, Some(new_id))]));
    let ch = w.c.delete_pod("x", "a");
    assert_eq!(ch.ipcache, BTreeMap::from([(ip, None)]));
    assert!(ch.endpoints.contains(&obj("x/a")));
    assert!(w.c.endpoint_policy(&obj("x/a")).is_none());
}

#[test]
fn an_address_taken_over_by_a_new_pod_stays_with_it_when_the_old_pod_goes() {
    let mut w = World::new();
    let ip = w.ip("x/a");
    w.c.upsert_pod(&pod("y", "new", json!({"app": "new"}), "10.0.1.1"));
    let new_id = w.c.identity_of(&obj("y/new")).unwrap();
    assert_eq!(w.c.ip_identity(ip), Some(new_id));
    let ch = w.c.delete_pod("x", "a");
    assert!(ch.ipcache.is_empty(), "{:?}", ch.ipcache);
    assert_eq!(w.c.ip_identity(ip), Some(new_id));
}

#[test]
fn a_relabel_reports_exactly_the_endpoints_whose_policy_changed() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-canary",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"canary": "yes"}}}]}]}),
    );
    assert!(!w.allows("y/b", "x/a", TCP, 80));
    let ch = w.c.upsert_pod(&pod(
        "y",
        "b",
        json!({"app": "b", "canary": "yes"}),
        "10.0.2.2",
    ));
    assert_eq!(
        ch.endpoints.iter().cloned().collect::<Vec<_>>(),
        vec![obj("x/a"), obj("y/b")]
    );
    assert!(w.allows("y/b", "x/a", TCP, 80));
    // Same labels again: nothing to do.
    let ch = w.c.upsert_pod(&pod(
        "y",
        "b",
        json!({"app": "b", "canary": "yes"}),
        "10.0.2.2",
    ));
    assert!(ch.is_empty(), "{ch:?}");
}

#[test]
fn a_namespace_relabel_moves_its_pods_to_new_identities_and_updates_selectors() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-green",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"colour": "green"}}}]}]}),
    );
    assert!(!w.allows("y/a", "x/a", TCP, 80));
    let old = w.c.identity_of(&obj("y/a"));
    let ch =
        w.c.upsert_namespace(&namespace("y", &[("team", "b"), ("colour", "green")]));
    assert_ne!(w.c.identity_of(&obj("y/a")), old);
    assert!(ch.endpoints.contains(&obj("x/a")) && ch.endpoints.contains(&obj("y/a")));
    assert_eq!(ch.ipcache.len(), 2);
    assert!(w.allows("y/a", "x/a", TCP, 80) && w.allows("y/b", "x/a", TCP, 80));
    w.c.delete_namespace("y");
    assert!(!w.allows("y/a", "x/a", TCP, 80));
}

#[test]
fn a_policy_update_that_changes_no_output_reports_nothing_and_keeps_rule_ids() {
    let mut w = World::new();
    let spec = json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [{"port": 80}]}]});
    w.apply("x", "p", spec.clone());
    let rules = w.ep("x/a").rules.clone();
    let ch = w.apply("x", "p", spec);
    assert!(ch.endpoints.is_empty(), "{ch:?}");
    assert_eq!(w.ep("x/a").rules, rules);
    let origin = w.c.rule_origin(rules[0].rule_id).unwrap();
    assert_eq!(
        origin,
        RuleOrigin {
            policy: obj("x/p"),
            dir: DIR_INGRESS,
            index: 0
        }
    );
    w.c.delete_policy("x", "p");
    assert_eq!(w.c.rule_origin(rules[0].rule_id), None);
}

#[test]
fn host_network_and_finished_pods_are_not_endpoints_nor_peers() {
    let mut w = World::new();
    let mut host = pod("x", "h", json!({"app": "h"}), "192.168.0.10");
    if let Some(s) = host.spec.as_mut() {
        s.host_network = Some(true);
    }
    w.c.upsert_pod(&host);
    assert!(w.c.endpoint_policy(&obj("x/h")).is_none());
    assert_eq!(w.c.ip_identity("192.168.0.10".parse().unwrap()), None);
    let mut done = pod("x", "a", json!({"app": "a"}), "10.0.1.1");
    if let Some(s) = done.status.as_mut() {
        s.phase = Some("Succeeded".into());
    }
    let ch = w.c.upsert_pod(&done);
    assert!(ch.endpoints.contains(&obj("x/a")));
    assert!(w.c.endpoint_policy(&obj("x/a")).is_none());
    assert_eq!(w.c.ip_identity("10.0.1.1".parse().unwrap()), None);
}

#[test]
fn only_pods_of_this_node_are_endpoints_but_every_pod_is_a_peer() {
    let mut c = Compiler::new(Locality::Node("n1".into()));
    c.upsert_namespace(&namespace("x", &[]));
    c.upsert_pod(&pod("x", "a", json!({"app": "a"}), "10.0.0.1"));
    let mut remote = pod("x", "b", json!({"app": "b"}), "10.0.0.2");
    if let Some(s) = remote.spec.as_mut() {
        s.node_name = Some("n2".into());
    }
    let ch = c.upsert_pod(&remote);
    assert!(ch.endpoints.is_empty());
    assert!(c.endpoint_policy(&obj("x/b")).is_none());
    assert_eq!(c.endpoints().cloned().collect::<Vec<_>>(), vec![obj("x/a")]);
    c.upsert_policy(&policy(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
    ));
    let b_id = c.identity_of(&obj("x/b")).unwrap().0;
    let p = c.endpoint_policy(&obj("x/a")).unwrap();
    assert!(p.rules.iter().any(|r| r.identity == b_id));
}

#[test]
fn ingress_from_the_host_is_always_allowed_and_unknown_sources_are_world() {
    let p = EndpointPolicy {
        ingress_isolated: true,
        egress_isolated: true,
        ..Default::default()
    };
    let addr: IpAddr = "192.168.0.1".parse().unwrap();
    assert!(direction_allows(
        &p,
        DIR_INGRESS,
        IDENTITY_HOST,
        addr,
        TCP,
        10250
    ));
    assert!(!direction_allows(
        &p,
        DIR_EGRESS,
        IDENTITY_HOST,
        addr,
        TCP,
        10250
    ));
    assert!(!direction_allows(
        &p,
        DIR_INGRESS,
        IDENTITY_WORLD,
        addr,
        TCP,
        80
    ));
}

#[test]
fn entry_counts_include_port_blocks_and_cidr_prefixes() {
    let mut w = World::new();
    w.apply(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": 1000, "endPort": 2000}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}),
    );
    let n = w.c.entry_count(&obj("x/a")).unwrap();
    // 1000..=2000 takes 8 aligned blocks; the CIDR group one any-protocol key.
    assert_eq!(crate::policy::port_blocks(1000, 2000).len(), 8);
    assert_eq!(n, EntryCount { policy: 9, cidr: 2 });
}

// ----- incremental == recompute == fresh build -----

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 3] = ["n0", "n1", "n2"];

fn random_namespace(rng: &mut Rng, name: &str) -> Namespace {
    let team = *rng.pick(&["a", "b"]);
    let mut labels = vec![("team", team)];
    if rng.below(3) == 0 {
        labels.push(("env", "prod"));
    }
    namespace(name, &labels)
}

fn random_pod(rng: &mut Rng, ns: &str, i: usize) -> Pod {
    let app = *rng.pick(&["web", "db", "cache"]);
    let labels = if rng.below(4) == 0 {
        json!({"app": app, "canary": "yes"})
    } else {
        json!({"app": app})
    };
    let ports: &[(&str, &str, u16)] = match rng.below(3) {
        0 => &[("http", "TCP", 80), ("dns", "UDP", 53)],
        1 => &[("http", "TCP", 8080)],
        _ => &[],
    };
    let mut p = pod_with(
        ns,
        &format!("p{i}"),
        labels,
        &format!("10.0.0.{}", i + 1),
        ports,
    );
    if rng.below(5) == 0
        && let Some(s) = p.spec.as_mut()
    {
        s.node_name = Some("elsewhere".into());
    }
    p
}

fn random_policy(rng: &mut Rng, ns: &str, name: &str) -> NetworkPolicy {
    let target = rng
        .pick(&[
            json!({}),
            json!({"matchLabels": {"app": "web"}}),
            json!({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}),
        ])
        .clone();
    let peers = rng
        .pick(&[
            json!(null),
            json!([{"podSelector": {"matchLabels": {"app": "db"}}}]),
            json!([{"namespaceSelector": {"matchLabels": {"team": "a"}}}]),
            json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"canary": "yes"}}}]),
            json!([{"ipBlock": {"cidr": "10.0.0.0/29", "except": ["10.0.0.4/30"]}}]),
            json!([{"ipBlock": {"cidr": "10.0.0.0/28"}}, {"podSelector": {}}]),
            json!([{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}}]),
        ])
        .clone();
    let ports = rng
        .pick(&[
            json!(null),
            json!([{"port": 80}]),
            json!([{"port": "http"}]),
            json!([{"port": "dns", "protocol": "UDP"}, {"port": 1000, "endPort": 1100}]),
            json!([{"protocol": "SCTP"}]),
        ])
        .clone();
    let mut rule = serde_json::Map::new();
    if !ports.is_null() {
        rule.insert("ports".into(), ports);
    }
    let dir = rng.below(3);
    if !peers.is_null() {
        rule.insert(if dir == 1 { "to" } else { "from" }.into(), peers);
    }
    let rules = if rng.below(5) == 0 {
        json!([])
    } else {
        json!([Value::Object(rule)])
    };
    let spec = match dir {
        0 => json!({"podSelector": target, "ingress": rules}),
        1 => json!({"podSelector": target, "egress": rules, "policyTypes": ["Egress"]}),
        _ => {
            json!({"podSelector": target, "ingress": rules, "egress": rules, "policyTypes": ["Ingress", "Egress"]})
        }
    };
    policy(ns, name, spec)
}

/// An endpoint's policy with identities and CIDR groups replaced by what
/// they stand for (the pods of an identity, the L4s of a group), so that
/// two compilers that numbered them differently can be compared. Rule ids
/// are left out: with several contributing rules, the lowest id depends on
/// allocation order.
fn normalize(c: &Compiler, p: &EndpointPolicy) -> String {
    let mut pods_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (o, p) in c.pods.iter() {
        pods_of.entry(p.identity).or_default().push(o.to_string());
    }
    let group_l4s = |g: u32| -> Vec<(u8, L4)> {
        let mut v: Vec<(u8, L4)> = p
            .rules
            .iter()
            .filter(|r| r.identity == g)
            .map(|r| (r.dir, r.l4))
            .collect();
        v.sort();
        v
    };
    let peer = |id: u32| -> String {
        if id == IDENTITY_ANY {
            "any".into()
        } else if id & IDENTITY_CIDR_FLAG != 0 {
            format!("cidr{:?}", group_l4s(id))
        } else {
            let mut v = pods_of.get(&id).cloned().unwrap_or_default();
            v.sort();
            format!("{v:?}")
        }
    };
    let mut rules: Vec<String> = p
        .rules
        .iter()
        .map(|r| format!("{} {} {:?}", r.dir, peer(r.identity), r.l4))
        .collect();
    rules.sort();
    let mut cidrs: Vec<String> = p
        .cidrs
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.dir,
                e.net,
                if e.group == 0 {
                    "hole".into()
                } else {
                    peer(e.group)
                }
            )
        })
        .collect();
    cidrs.sort();
    format!(
        "in={} out={}\n{}\n{}",
        p.ingress_isolated,
        p.egress_isolated,
        rules.join("\n"),
        cidrs.join("\n")
    )
}

/// What a map writer holds for one endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
struct Written {
    isolation: (bool, bool),
    rules: BTreeMap<(u8, u32, L4), u32>,
    cidrs: BTreeMap<(u8, ipnetwork::IpNetwork), u32>,
}

impl Written {
    fn of(p: &EndpointPolicy) -> Self {
        Self {
            isolation: (p.ingress_isolated, p.egress_isolated),
            rules: p
                .rules
                .iter()
                .map(|r| ((r.dir, r.identity, r.l4), r.rule_id))
                .collect(),
            cidrs: p.cidrs.iter().map(|c| ((c.dir, c.net), c.group)).collect(),
        }
    }
}

/// Rewrites the reported endpoints, the way the agent's writer does.
fn write(c: &Compiler, written: &mut BTreeMap<ObjectRef, Written>, ch: &Changes) {
    for ep in &ch.endpoints {
        match c.endpoint_policy(ep) {
            Some(p) => {
                written.insert(ep.clone(), Written::of(&p));
            }
            None => {
                written.remove(ep);
            }
        }
    }
}

fn snapshot(c: &Compiler) -> BTreeMap<ObjectRef, Arc<EndpointPolicy>> {
    c.endpoints()
        .filter_map(|o| c.endpoint_policy(o).map(|p| (o.clone(), p)))
        .collect()
}

#[test]
fn incremental_updates_equal_a_full_recompute_and_a_fresh_build_on_random_event_sequences() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut c = Compiler::new(Locality::Node("n1".into()));
    let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut policies: BTreeMap<String, NetworkPolicy> = BTreeMap::new();
    let mut checked_changes = 0;
    let mut written: BTreeMap<ObjectRef, Written> = BTreeMap::new();
    let mut rewrites = 0;
    for step in 0..600 {
        let before = snapshot(&c);
        let identities_before: BTreeMap<ObjectRef, Option<Identity>> = before
            .keys()
            .map(|o| (o.clone(), c.identity_of(o)))
            .collect();
        let ips_before = c.ipcache();
        let ns = *rng.pick(&NAMESPACES);
        let ch = match rng.below(10) {
            0 => {
                let n = random_namespace(&mut rng, ns);
                namespaces.insert(ns.into(), n.clone());
                c.upsert_namespace(&n)
            }
            1..=3 => {
                let i = rng.below(10);
                let key = format!("p{i}");
                // A pod keeps its namespace: delete it first if it moves.
                if let Some(old) = pods.get(&key)
                    && old.metadata.namespace.as_deref() != Some(ns)
                {
                    let old_ns = old.metadata.namespace.clone().unwrap();
                    pods.remove(&key);
                    c.delete_pod(&old_ns, &key)
                } else {
                    let p = random_pod(&mut rng, ns, i);
                    pods.insert(key, p.clone());
                    c.upsert_pod(&p)
                }
            }
            4 => {
                let i = rng.below(10);
                match pods.remove(&format!("p{i}")) {
                    Some(p) => {
                        c.delete_pod(p.metadata.namespace.as_deref().unwrap(), &format!("p{i}"))
                    }
                    None => Changes::default(),
                }
            }
            5..=8 => {
                let name = format!("pol{}", rng.below(4));
                let p = random_policy(&mut rng, ns, &name);
                policies.insert(format!("{ns}/{name}"), p.clone());
                c.upsert_policy(&p)
            }
            _ => {
                let key = format!("{ns}/pol{}", rng.below(4));
                match policies.remove(&key) {
                    Some(_) => c.delete_policy(ns, key.split_once('/').unwrap().1),
                    None => Changes::default(),
                }
            }
        };

        // Every endpoint whose output changed is reported.
        let after = snapshot(&c);
        for (o, p) in &after {
            if before.get(o) != Some(p) {
                assert!(
                    ch.endpoints.contains(o),
                    "step {step}: {o} changed unreported"
                );
                checked_changes += 1;
            }
        }
        for o in before.keys() {
            if !after.contains_key(o) {
                assert!(
                    ch.endpoints.contains(o),
                    "step {step}: {o} vanished unreported"
                );
            }
        }
        // And nothing else: a reported endpoint kept on the same identity
        // has a different policy.
        for o in &ch.endpoints {
            if let Some(id) = identities_before.get(o)
                && *id == c.identity_of(o)
                && after.contains_key(o)
            {
                assert_ne!(
                    before.get(o),
                    after.get(o),
                    "step {step}: {o} reported unchanged"
                );
                rewrites += 1;
            }
        }
        // And the ipcache changes are exactly the difference.
        let ips_after = c.ipcache();
        let mut diff = BTreeMap::new();
        for ip in ips_before.keys().chain(ips_after.keys()) {
            if ips_before.get(ip) != ips_after.get(ip) {
                diff.insert(*ip, ips_after.get(ip).copied());
            }
        }
        assert_eq!(ch.ipcache, diff, "step {step}");

        // A writer that applies only the reported changes holds exactly
        // the compiled policies.
        write(&c, &mut written, &ch);
        let expected: BTreeMap<ObjectRef, Written> = after
            .iter()
            .map(|(o, p)| (o.clone(), Written::of(p)))
            .collect();
        assert_eq!(written, expected, "step {step}");

        // A recompute on the same state finds nothing to change.
        let re = c.recompute_all();
        assert!(
            re.endpoints.is_empty() && re.ipcache.is_empty(),
            "step {step}: {re:?}"
        );
        assert_eq!(snapshot(&c), after, "step {step}");

        // A compiler fed only the final objects agrees.
        if step % 10 == 9 {
            let mut fresh = Compiler::new(Locality::Node("n1".into()));
            if step % 20 == 9 {
                // One event per object, policies first, namespaces last.
                for p in policies.values() {
                    fresh.upsert_policy(p);
                }
                for p in pods.values() {
                    fresh.upsert_pod(p);
                }
                for n in namespaces.values() {
                    fresh.upsert_namespace(n);
                }
            } else {
                let ns: Vec<Namespace> = namespaces.values().cloned().collect();
                let ps: Vec<Pod> = pods.values().cloned().collect();
                let nps: Vec<NetworkPolicy> = policies.values().cloned().collect();
                let ch = fresh.resync(Resync {
                    namespaces: Some(&ns),
                    pods: Some(&ps),
                    policies: Some(&nps),
                });
                let all: BTreeSet<&ObjectRef> = fresh.endpoints().collect();
                assert_eq!(
                    ch.endpoints.iter().collect::<BTreeSet<_>>(),
                    all,
                    "step {step}"
                );
            }
            let mine: BTreeMap<_, _> = after
                .iter()
                .map(|(o, p)| (o.clone(), normalize(&c, p)))
                .collect();
            let theirs: BTreeMap<_, _> = snapshot(&fresh)
                .iter()
                .map(|(o, p)| (o.clone(), normalize(&fresh, p)))
                .collect();
            assert_eq!(mine, theirs, "step {step}");
            assert_eq!(
                c.stats().identities,
                fresh.stats().identities,
                "step {step}"
            );
        }
    }
    assert!(
        checked_changes > 100,
        "the sequence exercised {checked_changes} changes"
    );
    assert!(
        rewrites > 100,
        "the sequence exercised {rewrites} rewrites of endpoints that kept their identity"
    );
}
