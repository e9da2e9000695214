//! Isolation, selection and ports, rule by rule.
use super::*;

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
