//! ipBlocks, and input that cannot be used as written.
use super::*;

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

/// The data path keys IPv4 as IPv4-mapped IPv6: an IPv6 block around
/// `::ffff:0:0/96` must give IPv4 addresses a prefix of their own, with no
/// rule, or it lets all of IPv4 through (found by the oracle; regression
/// case tests/conformance/regressions/ipv6-any-block-let-ipv4-through.json).
#[test]
fn an_ipv6_block_that_covers_the_mapped_ipv4_range_allows_no_ipv4_address() {
    let mut w = World::new();
    w.apply(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "::/0"}}]}]}),
    );
    let ep = w.ep("x/a");
    let all_v4: ipnetwork::IpNetwork = "0.0.0.0/0".parse().unwrap();
    let v4 = ep
        .cidrs
        .iter()
        .find(|c| c.net == all_v4)
        .expect("IPv4 gets a prefix of its own");
    assert!(
        !ep.rules
            .iter()
            .any(|r| v4.group != 0 && r.identity == v4.group),
        "no rule for IPv4: {ep:?}"
    );
    let v6 = ep.cidrs.iter().find(|c| c.net.is_ipv6()).unwrap();
    assert!(ep.rules.iter().any(|r| r.identity == v6.group));
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

/// `World` plus y/c (http on TCP 8080) and y/d (no port named http), and
/// x/a allowed egress to 10.0.0.0/16 except y/b, on `http` and UDP 53.
fn named_block_world() -> World {
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
    let ch = w.apply(
        "x",
        "named-cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.2/32"]}}],
             "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]}),
    );
    assert!(ch.diagnostics.is_empty(), "{:?}", ch.diagnostics);
    w
}

#[test]
fn an_egress_named_port_towards_an_ip_block_resolves_on_the_pod_that_owns_the_address() {
    let w = named_block_world();
    assert!(w.allows("x/a", "x/b", TCP, 80) && w.allows("x/a", "y/a", TCP, 80));
    assert!(w.allows("x/a", "y/c", TCP, 8080) && !w.allows("x/a", "y/c", TCP, 80));
    assert!(
        !w.allows("x/a", "y/d", TCP, 80),
        "y/d has no port named http"
    );
    assert!(!w.allows("x/a", "y/b", TCP, 80), "y/b is an except");
    // The block's numbered port still covers every address of it.
    assert!(w.allows("x/a", "y/d", UDP, 53) && w.allows("x/a", "y/c", UDP, 53));
    assert!(!w.allows("x/a", "y/b", UDP, 53));
    // An address that no pod owns has no named ports.
    let a = w.ip("x/a");
    let nobody: IpAddr = "10.0.9.9".parse().unwrap();
    assert!(!w.c.verdict(a, nobody, TCP, 80) && !w.c.verdict(a, nobody, TCP, 8080));
    assert!(w.c.verdict(a, nobody, UDP, 53));
    // Outside the block, nothing.
    let outside: IpAddr = "192.0.2.9".parse().unwrap();
    assert!(!w.c.verdict(a, outside, TCP, 80) && !w.c.verdict(a, outside, UDP, 53));
}

#[test]
fn an_egress_named_port_towards_an_ip_block_matches_only_with_its_protocol() {
    let mut w = World::new();
    w.apply(
        "x",
        "named-cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
             "ports": [{"port": "dns"}, {"port": "http", "protocol": "UDP"}]}]}),
    );
    for (proto, port) in [(TCP, 53), (UDP, 53), (TCP, 80), (UDP, 80)] {
        assert!(!w.allows("x/a", "y/a", proto, port), "{proto}/{port}");
    }
    w.apply(
        "x",
        "named-cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
             "ports": [{"port": "dns", "protocol": "UDP"}]}]}),
    );
    assert!(w.allows("x/a", "y/a", UDP, 53) && !w.allows("x/a", "y/a", TCP, 53));
}

#[test]
fn an_egress_named_port_towards_an_ip_block_follows_the_pod_that_owns_the_address() {
    let mut w = named_block_world();
    let a = w.ip("x/a");
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let reported = |ch: &Changes| ch.endpoints.contains(&obj("x/a"));

    // A new address: the old one is nobody's, the new one serves 8080.
    let ch = w.c.upsert_pod(&pod_with(
        "y",
        "c",
        json!({"app": "c"}),
        "10.0.2.5",
        &[("http", "TCP", 8080)],
    ));
    assert!(reported(&ch));
    assert!(!w.c.verdict(a, ip("10.0.2.3"), TCP, 8080));
    assert!(w.c.verdict(a, ip("10.0.2.5"), TCP, 8080));

    // A new port number.
    let ch = w.c.upsert_pod(&pod_with(
        "y",
        "c",
        json!({"app": "c"}),
        "10.0.2.5",
        &[("http", "TCP", 9090)],
    ));
    assert!(reported(&ch));
    assert!(w.c.verdict(a, ip("10.0.2.5"), TCP, 9090));
    assert!(!w.c.verdict(a, ip("10.0.2.5"), TCP, 8080));

    // Another pod, without the port, takes the address (the last pod to
    // claim an address owns it).
    let ch = w.c.upsert_pod(&pod_with(
        "y",
        "e",
        json!({"app": "e"}),
        "10.0.2.5",
        &[("web", "TCP", 9090)],
    ));
    assert!(reported(&ch));
    assert!(!w.c.verdict(a, ip("10.0.2.5"), TCP, 9090));
    w.c.delete_pod("y", "c");
    assert!(!w.c.verdict(a, ip("10.0.2.5"), TCP, 9090));

    // A pod leaving the block.
    let ch = w.c.upsert_pod(&pod_with(
        "y",
        "a",
        json!({"app": "a"}),
        "10.1.2.1",
        &[("http", "TCP", 80)],
    ));
    assert!(reported(&ch));
    assert!(!w.allows("x/a", "y/a", TCP, 80));

    // A pod going away.
    assert!(w.allows("x/a", "x/b", TCP, 80));
    let ch = w.c.delete_pod("x", "b");
    assert!(reported(&ch));
    assert!(!w.c.verdict(a, ip("10.0.1.2"), TCP, 80));

    // And the incremental state is what a recompute gives.
    let re = w.c.recompute_all();
    assert!(re.endpoints.is_empty(), "{re:?}");
}

#[test]
fn a_pod_event_does_not_touch_identities_without_an_egress_named_port_towards_an_ip_block() {
    let mut w = World::new();
    w.apply(
        "x",
        "cidr",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": 80}]}]}),
    );
    let ch =
        w.c.upsert_pod(&pod("y", "c", json!({"app": "c"}), "10.0.2.3"));
    assert!(!ch.endpoints.contains(&obj("x/a")), "{ch:?}");
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
