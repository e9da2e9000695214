//! ClusterNetworkPolicy tiers through the lookup model: Admin, then
//! NetworkPolicy, then Baseline; Pass; priority and name ties; networks,
//! nodes and named ports; invalid input failing closed; incremental ==
//! recompute.
use k8s_openapi::api::core::v1::Node;
use sluice_api::ClusterNetworkPolicy;

use super::*;
use crate::policy::verdict::Decision;
use sluice_common::reason;

fn cnp(name: &str, spec: Value) -> ClusterNetworkPolicy {
    let mut v = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
    });
    v["spec"] = spec;
    serde_json::from_value(v).unwrap()
}

fn ns_sel(ns: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": ns}})
}

/// Subject: pod `app: <pod>` of namespace `ns`.
fn subject(ns: &str, pod: &str) -> Value {
    json!({"pods": {"namespaceSelector": ns_sel(ns), "podSelector": {"matchLabels": {"app": pod}}}})
}

impl World {
    fn apply_cnp(&mut self, name: &str, spec: Value) -> Changes {
        self.c.upsert_cluster_policy(&cnp(name, spec))
    }

    /// The decision of `to`'s ingress for a TCP flow from `from`.
    fn ingress(&self, from: &str, to: &str, port: u16) -> Decision {
        let peer = self.ip(from);
        self.c
            .decision(&obj(to), DIR_INGRESS, peer, TCP, port)
            .unwrap()
    }
}

fn admin_ingress(from_ns: &str, action: &str, prio: u32, to: (&str, &str)) -> Value {
    json!({
        "tier": "Admin", "priority": prio, "subject": subject(to.0, to.1),
        "ingress": [{"name": "r", "action": action, "from": [{"namespaces": ns_sel(from_ns)}]}],
    })
}

#[test]
fn an_admin_deny_drops_what_a_network_policy_allows() {
    let mut w = World::new();
    w.apply("x", "open", json!({"podSelector": {}, "ingress": [{}]}));
    assert!(w.allows("y/a", "x/a", TCP, 80));
    w.apply_cnp("no-y", admin_ingress("y", "Deny", 10, ("x", "a")));
    assert!(!w.allows("y/a", "x/a", TCP, 80) && !w.allows("y/b", "x/a", UDP, 53));
    assert!(w.allows("x/b", "x/a", TCP, 80), "other peers still pass");
    assert!(w.allows("y/a", "x/b", TCP, 80), "other subjects too");
    match w.ingress("y/a", "x/a", 80) {
        Decision::Deny { reason: r, rule } => {
            assert_eq!(r, reason::ADMIN_DENIED);
            let o = w.c.cnp_rule_origin(rule).unwrap();
            assert_eq!(
                (o.policy.as_str(), o.rule.as_str(), o.tier, o.priority),
                ("no-y", "r", Tier::Admin, 10)
            );
        }
        d => panic!("{d:?}"),
    }
    w.c.delete_cluster_policy("no-y");
    assert!(
        w.allows("y/a", "x/a", TCP, 80),
        "gone, the NetworkPolicy decides again"
    );
}

#[test]
fn an_admin_accept_passes_into_a_network_policy_isolated_pod() {
    let mut w = World::new();
    w.apply("x", "deny-all", json!({"podSelector": {}}));
    assert!(!w.allows("y/a", "x/a", TCP, 80));
    w.apply_cnp("let-y", admin_ingress("y", "Accept", 5, ("x", "a")));
    assert!(w.allows("y/a", "x/a", TCP, 80));
    assert!(!w.allows("x/b", "x/a", TCP, 80), "not a peer of the Accept");
    assert!(!w.allows("y/a", "x/b", TCP, 80), "not a subject");
    assert_eq!(
        w.ingress("x/b", "x/a", 80),
        Decision::Deny {
            reason: reason::POLICY_DENIED,
            rule: 0
        }
    );
}

#[test]
fn lower_priority_numbers_decide_first_and_ties_go_by_name_then_rule_order() {
    let mut w = World::new();
    w.apply_cnp("b-deny", admin_ingress("y", "Deny", 10, ("x", "a")));
    w.apply_cnp("a-accept", admin_ingress("y", "Accept", 10, ("x", "a")));
    assert!(
        w.allows("y/a", "x/a", TCP, 80),
        "same priority: a-accept sorts first"
    );
    w.apply_cnp("a-accept", admin_ingress("y", "Accept", 11, ("x", "a")));
    assert!(
        !w.allows("y/a", "x/a", TCP, 80),
        "now b-deny's 10 comes first"
    );
    w.apply_cnp("0-deny", admin_ingress("y", "Deny", 11, ("x", "a")));
    w.c.delete_cluster_policy("b-deny");
    assert!(
        !w.allows("y/a", "x/a", TCP, 80),
        "0-deny sorts before a-accept"
    );
    // Inside one policy the first matching rule decides.
    let rules = |first: &str, second: &str| {
        json!({
            "tier": "Admin", "priority": 1, "subject": subject("x", "a"),
            "ingress": [
                {"name": "one", "action": first, "from": [{"pods": {"namespaceSelector": ns_sel("y"), "podSelector": {"matchLabels": {"app": "a"}}}}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                {"name": "two", "action": second, "from": [{"namespaces": ns_sel("y")}]},
            ],
        })
    };
    w.apply_cnp("ordered", rules("Accept", "Deny"));
    assert!(w.allows("y/a", "x/a", TCP, 80));
    assert!(!w.allows("y/a", "x/a", TCP, 81) && !w.allows("y/b", "x/a", TCP, 80));
    w.apply_cnp("ordered", rules("Deny", "Accept"));
    assert!(!w.allows("y/a", "x/a", TCP, 80));
    assert!(w.allows("y/a", "x/a", TCP, 81) && w.allows("y/b", "x/a", TCP, 80));
}

#[test]
fn pass_skips_the_rest_of_admin_to_network_policy_then_baseline() {
    let mut w = World::new();
    w.apply_cnp("pass-y", admin_ingress("y", "Pass", 5, ("x", "a")));
    w.apply_cnp(
        "deny-all",
        json!({
            "tier": "Admin", "priority": 50, "subject": subject("x", "a"),
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        }),
    );
    w.apply_cnp(
        "base-deny",
        json!({
            "tier": "Baseline", "priority": 0, "subject": subject("x", "a"),
            "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}],
        }),
    );
    assert!(!w.allows("x/b", "x/a", TCP, 80), "the later Admin Deny");
    assert!(!w.ingress("x/b", "x/a", 80).allowed());
    // y passes Admin; no NetworkPolicy: the Baseline deny decides.
    match w.ingress("y/a", "x/a", 80) {
        Decision::Deny { reason: r, rule } => {
            assert_eq!(r, reason::BASELINE_DENIED);
            assert_eq!(w.c.cnp_rule_origin(rule).unwrap().rule, "default-deny");
        }
        d => panic!("{d:?}"),
    }
    // A NetworkPolicy now decides for y, before Baseline.
    w.apply("x", "from-y", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}));
    assert!(w.allows("y/a", "x/a", TCP, 80));
    assert!(!w.allows("x/b", "x/a", TCP, 80));
}

#[test]
fn baseline_decides_only_where_no_network_policy_isolates() {
    let mut w = World::new();
    w.apply_cnp(
        "base",
        json!({
            "tier": "Baseline", "priority": 3, "subject": {"namespaces": ns_sel("x")},
            "egress": [
                {"action": "Accept", "to": [{"namespaces": ns_sel("x")}]},
                {"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]},
            ],
        }),
    );
    assert!(w.allows("x/a", "x/b", TCP, 80));
    assert!(
        !w.allows("x/a", "y/a", TCP, 80),
        "Baseline deny via networks"
    );
    assert!(
        !w.c.verdict(w.ip("x/a"), "fd00::9".parse().unwrap(), TCP, 443),
        "IPv6 too"
    );
    assert!(w.allows("y/a", "x/a", TCP, 80), "ingress untouched");
    w.apply(
        "x",
        "eg",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    );
    assert!(
        w.allows("x/a", "y/a", TCP, 80),
        "NetworkPolicy allows before Baseline"
    );
    assert!(
        !w.allows("x/a", "x/b", TCP, 80),
        "and its default deny beats the Baseline Accept"
    );
    assert!(
        !w.allows("x/b", "y/a", TCP, 80),
        "x/b is not isolated: Baseline"
    );
}

#[test]
fn networks_nodes_and_named_ports_match_egress() {
    let mut w = World::new();
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "cp1", "labels": {"role": "cp"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}, {"type": "InternalIP", "address": "fd00:1::10"}, {"type": "Hostname", "address": "cp1"}]},
    })).unwrap();
    w.c.upsert_node(&node);
    w.apply(
        "x",
        "open",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
    );
    w.apply_cnp("block-metadata", json!({
        "tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
        "egress": [
            {"name": "deny-imds", "action": "Deny", "to": [{"networks": ["169.254.169.254/32", "fd00:ec2::254/128"]}]},
            {"name": "deny-cp", "action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "cp"}}}], "protocols": [{"tcp": {"destinationPort": {"range": {"start": 6000, "end": 7000}}}}]},
            {"name": "deny-http", "action": "Deny", "to": [{"namespaces": ns_sel("y")}], "protocols": [{"destinationNamedPort": "http"}]},
        ],
    }));
    let src = w.ip("x/a");
    let v = |dst: &str, port| w.c.verdict(src, dst.parse().unwrap(), TCP, port);
    assert!(!v("169.254.169.254", 80) && !v("fd00:ec2::254", 80));
    assert!(v("169.254.169.253", 80));
    assert!(!v("192.168.0.10", 6443) && !v("fd00:1::10", 7000));
    assert!(v("192.168.0.10", 5999) && v("192.168.0.11", 6443));
    assert!(!w.allows("x/a", "y/a", TCP, 80) && w.allows("x/a", "y/a", TCP, 81));
    w.c.delete_node("cp1");
    let v = |dst: &str, port| w.c.verdict(src, dst.parse().unwrap(), TCP, port);
    assert!(v("192.168.0.10", 6443), "the node is gone");
    assert!(!v("169.254.169.254", 80));
}

#[test]
fn invalid_rules_and_policies_fail_closed() {
    let mut w = World::new();
    // A Deny rule with a bad CIDR denies everything at its place.
    let ch = w.apply_cnp("bad-deny", json!({
        "tier": "Baseline", "priority": 1, "subject": subject("x", "a"),
        "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchExpressions": [{"key": "k", "operator": "Bogus"}]}}]}],
    }));
    assert!(!ch.diagnostics.is_empty());
    assert!(!w.allows("x/b", "x/a", TCP, 80) && !w.allows("y/a", "x/a", TCP, 80));
    // An Accept rule that does not parse matches nothing.
    w.apply_cnp(
        "bad-accept",
        json!({
            "tier": "Admin", "priority": 1, "subject": subject("x", "b"),
            "egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/33"]}]}],
        }),
    );
    w.apply(
        "x",
        "iso",
        json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"]}),
    );
    assert!(!w.allows("x/b", "y/a", TCP, 80));
    // An unknown tier: Admin Deny-all for the subjects.
    w.apply("y", "open", json!({"podSelector": {}, "ingress": [{}]}));
    w.apply_cnp(
        "bad-tier",
        json!({
            "tier": "Middle", "priority": 7, "subject": subject("y", "a"),
            "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}],
        }),
    );
    assert!(!w.allows("x/a", "y/a", TCP, 80) && !w.allows("y/a", "y/b", TCP, 80));
    assert!(w.allows("x/a", "y/b", TCP, 80));
    // A subject that cannot be determined keeps the previous version.
    w.apply_cnp(
        "bad-tier",
        json!({"tier": "Admin", "priority": 7, "subject": {}}),
    );
    assert!(!w.allows("x/a", "y/a", TCP, 80));
    assert!(
        w.c.diagnostics()
            .iter()
            .any(|d| d.object.name == "bad-tier")
    );
    // Never seen before: no effect, but reported.
    let ch = w.apply_cnp(
        "no-subject",
        json!({"tier": "Admin", "priority": 0, "subject": {},
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    );
    assert!(ch.endpoints.is_empty() && !ch.diagnostics.is_empty());
}

#[test]
fn incremental_changes_equal_a_recompute_and_a_fresh_build() {
    let mut w = World::new();
    let specs = [
        ("a1", admin_ingress("y", "Deny", 10, ("x", "a"))),
        ("a2", admin_ingress("x", "Pass", 10, ("x", "a"))),
        (
            "b1",
            json!({"tier": "Baseline", "priority": 0, "subject": {"namespaces": {}},
            "egress": [{"action": "Deny", "to": [{"networks": ["10.0.2.0/24"]}]}]}),
        ),
    ];
    for (n, s) in &specs {
        w.apply_cnp(n, s.clone());
    }
    w.apply("x", "eg", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/25"]}}]}]}));
    w.c.upsert_pod(&pod("y", "c", json!({"app": "c"}), "10.0.2.3"));
    w.c.upsert_namespace(&namespace("y", &[("team", "c")]));
    w.c.delete_cluster_policy("a2");
    let before: Vec<_> = ["x/a", "x/b", "y/a", "y/b", "y/c"]
        .iter()
        .map(|p| w.ep(p))
        .collect();
    let ch = w.c.recompute_all();
    assert!(
        ch.endpoints.is_empty(),
        "recompute found differences: {:?}",
        ch.endpoints
    );
    let after: Vec<_> = ["x/a", "x/b", "y/a", "y/b", "y/c"]
        .iter()
        .map(|p| w.ep(p))
        .collect();
    assert_eq!(before, after);
    assert!(after[0].profile != 0 && w.c.profile_policy(after[0].profile).is_some());
    let summary = |w: &World| {
        (
            w.allowed(TCP, 80),
            w.c.verdict(w.ip("x/a"), w.ip("y/c"), TCP, 80),
        )
    };
    let mut fresh = World::new();
    fresh
        .c
        .upsert_pod(&pod("y", "c", json!({"app": "c"}), "10.0.2.3"));
    fresh.c.upsert_namespace(&namespace("y", &[("team", "c")]));
    fresh.apply("x", "eg", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/25"]}}]}]}));
    for (n, s) in specs.iter().filter(|(n, _)| *n != "a2") {
        fresh.apply_cnp(n, s.clone());
    }
    assert_eq!(summary(&w), summary(&fresh));
}

/// Pod peers are written per profile and peer class, not per endpoint and
/// identity: 40 namespaces of one team, every pod selected and every pod a
/// peer, compile to one profile and one class, and a new pod of an
/// existing shape changes no shared entry.
#[test]
fn wide_subjects_and_peers_share_one_profile_and_one_class() {
    let mut c = Compiler::new(Locality::All);
    for n in 0..40 {
        let ns = format!("t{n}");
        c.upsert_namespace(&namespace(&ns, &[("team", "a")]));
        for p in 0..3 {
            let ip = format!("10.1.{n}.{p}");
            c.upsert_pod(&pod(
                &ns,
                &format!("p{p}"),
                json!({"app": format!("a{p}")}),
                &ip,
            ));
        }
    }
    let team = json!({"matchLabels": {"team": "a"}});
    c.upsert_cluster_policy(&cnp(
        "wide",
        json!({"tier": "Admin", "priority": 5, "subject": {"namespaces": team},
               "ingress": [{"name": "no-81", "action": "Deny", "from": [{"namespaces": team}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 81}}}]}]}),
    ));
    let stats = c.stats();
    assert_eq!((stats.profiles, stats.peer_classes), (1, 1));
    let ep = c.endpoint_policy(&obj("t3/p1")).unwrap();
    assert!(ep.tier_rules.is_empty(), "nothing per endpoint");
    let shared = c.profile_policy(ep.profile).unwrap();
    assert_eq!(shared.tier_rules.len(), 1, "{:?}", shared.tier_rules);
    let (a, b) = (obj("t3/p1"), obj("t9/p2"));
    assert!(!c.would_allow(&a, &b, TCP, 81) && c.would_allow(&a, &b, TCP, 80));
    // Another pod of an existing shape: a new address, no shared change.
    let ch = c.upsert_pod(&pod("t5", "p9", json!({"app": "a1"}), "10.1.5.9"));
    assert!(ch.profiles.is_empty() && ch.classes.is_empty(), "{ch:?}");
    assert!(!c.would_allow(&obj("t5/p9"), &a, TCP, 81));
    // A pod of a new shape outside the peers gets no class, and passes.
    c.upsert_namespace(&namespace("other", &[("team", "b")]));
    let ch = c.upsert_pod(&pod("other", "o", json!({"app": "o"}), "10.2.0.1"));
    assert!(ch.classes.is_empty(), "{ch:?}");
    assert!(c.would_allow(&obj("other/o"), &a, TCP, 81));
    // Moving it into the team gives its identity the class.
    let ch = c.upsert_namespace(&namespace("other", &[("team", "a")]));
    assert_eq!(
        ch.classes.values().filter(|c| c.is_some()).count(),
        1,
        "{ch:?}"
    );
    assert!(!c.would_allow(&obj("other/o"), &a, TCP, 81));
    let ch = c.recompute_all();
    assert!(ch.endpoints.is_empty() && ch.profiles.is_empty(), "{ch:?}");
}

/// Peer classes are settled per identity: when a policy moves its pod peer
/// to other namespaces, gives it an egress named port, or goes, the
/// identities concerned change class and the classes equal a recompute.
#[test]
fn peer_classes_follow_a_change_of_peers_as_a_recompute_does() {
    let mut c = Compiler::new(Locality::All);
    for (n, ns) in ["a", "b"].iter().enumerate() {
        c.upsert_namespace(&namespace(ns, &[("team", ns)]));
        for p in 0..2 {
            let ip = format!("10.3.{n}.{p}");
            c.upsert_pod(&pod(
                ns,
                &format!("p{p}"),
                json!({"app": format!("x{p}")}),
                &ip,
            ));
        }
    }
    let to_team = |team: &str, named: bool| {
        let proto = if named {
            json!({"destinationNamedPort": "http"})
        } else {
            json!({"tcp": {"destinationPort": {"number": 80}}})
        };
        cnp(
            "p",
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                   "egress": [{"action": "Deny", "to": [{"namespaces": {"matchLabels": {"team": team}}}],
                               "protocols": [proto]}]}),
        )
    };
    let classed = |c: &Compiler| -> Vec<bool> {
        ["a/p0", "a/p1", "b/p0", "b/p1"]
            .iter()
            .map(|p| {
                let id = c.identity_of(&obj(p)).unwrap();
                c.peer_class(id.0).is_some()
            })
            .collect()
    };
    let agrees = |c: &mut Compiler| {
        let classes = c.peer_classes();
        let ch = c.recompute_all();
        assert!(
            ch.endpoints.is_empty() && ch.profiles.is_empty() && ch.classes.is_empty(),
            "{ch:?}"
        );
        assert_eq!(c.peer_classes(), classes);
    };
    c.upsert_cluster_policy(&to_team("a", false));
    assert_eq!(classed(&c), [true, true, false, false]);
    agrees(&mut c);
    let ch = c.upsert_cluster_policy(&to_team("b", false));
    assert_eq!(ch.classes.len(), 4, "{ch:?}");
    assert_eq!(classed(&c), [false, false, true, true]);
    agrees(&mut c);
    // A named port: the class keys now hold named ports (none here), so
    // the same members get new classes.
    let before = c.peer_classes();
    c.upsert_cluster_policy(&to_team("b", true));
    assert_eq!(classed(&c), [false, false, true, true]);
    assert_ne!(c.peer_classes(), before);
    agrees(&mut c);
    let ch = c.delete_cluster_policy("p");
    assert_eq!(ch.classes.values().filter(|c| c.is_none()).count(), 2);
    assert_eq!(classed(&c), [false; 4]);
    agrees(&mut c);
}
