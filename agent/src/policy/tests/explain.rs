//! `Compiler::explain`: its verdict is the lookup model's on random worlds
//! (NetworkPolicies, ClusterNetworkPolicies, pods on this node and
//! elsewhere, addresses outside the cluster), and it names the deciding
//! rule and why the others do not match.
use k8s_openapi::api::core::v1::Node;
use sluice_api::ClusterNetworkPolicy;

use super::{
    random::{NAMESPACES, Rng, random_namespace, random_pod, random_policy},
    *,
};
use crate::policy::explain::{DecidedBy, Explanation, Party, render};

/// One change, applied alike to both compilers.
type Event = Box<dyn Fn(&mut Compiler)>;

pub(super) fn random_cnp(rng: &mut Rng, name: &str) -> ClusterNetworkPolicy {
    let admin = rng.below(3) != 0;
    let subject = rng
        .pick(&[
            json!({"namespaces": {}}),
            json!({"namespaces": {"matchLabels": {"team": "a"}}}),
            json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}}),
        ])
        .clone();
    let pods_peers = [
        json!({"namespaces": {}}),
        json!({"namespaces": {"matchLabels": {"env": "prod"}}}),
        json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}),
        json!({"namespaces": {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}}),
    ];
    let protocols = [
        json!(null),
        json!(null),
        json!([{"tcp": {"destinationPort": {"number": 80}}}]),
        json!([{"udp": {"destinationPort": {"range": {"start": 50, "end": 60}}}}]),
        json!([{"destinationNamedPort": "http"}]),
        json!([{"sctp": {"destinationPort": {"number": 1050}}}, {"destinationNamedPort": "dns"}]),
    ];
    let rule = |rng: &mut Rng, i: usize, egress: bool| {
        let act = match rng.below(3) {
            0 => "Accept",
            1 if admin => "Pass",
            _ => "Deny",
        };
        let mut r = json!({"name": format!("r{i}"), "action": act});
        let cidr_peer = egress && rng.below(3) == 0;
        let peer = if cidr_peer {
            rng.pick(&[
                json!({"networks": ["10.0.0.0/30", "10.0.1.0/24"]}),
                json!({"nodes": {"matchLabels": {"zone": "a"}}}),
            ])
            .clone()
        } else {
            rng.pick(&pods_peers).clone()
        };
        r[if egress { "to" } else { "from" }] = json!([peer]);
        let p = if cidr_peer {
            rng.pick(&protocols[..4]).clone()
        } else {
            rng.pick(&protocols).clone()
        };
        if !p.is_null() {
            r["protocols"] = p;
        }
        r
    };
    let ingress: Vec<Value> = (0..1 + rng.below(2)).map(|i| rule(rng, i, false)).collect();
    let egress: Vec<Value> = (0..rng.below(3)).map(|i| rule(rng, i, true)).collect();
    let spec = json!({
        "tier": if admin { "Admin" } else { "Baseline" },
        "priority": *rng.pick(&[1, 5, 5, 10]),
        "subject": subject,
        "ingress": ingress,
        "egress": egress,
    });
    serde_json::from_value(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

pub(super) fn node(zone: &str, ip: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }))
    .unwrap()
}

/// The explanation's own consistency: a side that decides has its rule
/// marked, and the verdict is the AND of the sides.
fn check_shape(e: &Explanation) {
    for s in [&e.egress, &e.ingress].into_iter().flatten() {
        let marked = s
            .admin
            .iter()
            .chain(&s.baseline)
            .filter(|r| r.decides)
            .count();
        let cluster = matches!(s.decided_by, DecidedBy::Cluster { .. });
        assert_eq!(marked, usize::from(cluster), "{}", render(e));
    }
}

#[test]
fn explained_verdicts_equal_the_lookup_model_on_random_worlds() {
    let mut rng = Rng(0x0e8b_1a1e_5eed_0002);
    // Pods on node n1 are endpoints; the others are judged elsewhere.
    let mut c = Compiler::new(Locality::Node("n1".into()));
    let mut all = Compiler::new(Locality::All);
    let addrs: Vec<IpAddr> = (0..2)
        .flat_map(|s| (1..=10).map(move |i| IpAddr::from([10, 0, s, i])))
        .chain(["10.0.0.200", "192.0.2.7", "10.0.1.99"].map(|a| a.parse().unwrap()))
        .collect();
    let (mut probes, mut allowed, mut by_cluster, mut by_np, mut isolated) = (0, 0, 0, 0, 0);
    let ports = [53u16, 55, 80, 81, 1050, 8080];
    for step in 0..300 {
        let ns = *rng.pick(&NAMESPACES);
        let mut events: Vec<Event> = Vec::new();
        match rng.below(15) {
            0 => {
                let n = random_namespace(&mut rng, ns);
                events.push(Box::new(move |c| {
                    c.upsert_namespace(&n);
                }));
            }
            1..=3 => {
                let i = rng.below(10);
                // Pod names are unique across namespaces: delete first.
                let p = random_pod(&mut rng, ns, i);
                events.push(Box::new(move |c| {
                    for n in NAMESPACES {
                        c.delete_pod(n, &format!("p{i}"));
                    }
                    c.upsert_pod(&p);
                }));
            }
            4..=6 => {
                let name = format!("pol{}", rng.below(4));
                let p = random_policy(&mut rng, ns, &name);
                events.push(Box::new(move |c| {
                    c.upsert_policy(&p);
                }));
            }
            7 => {
                let name = format!("pol{}", rng.below(4));
                events.push(Box::new(move |c| {
                    c.delete_policy(ns, &name);
                }));
            }
            8..=11 => {
                let name = format!("cnp{}", rng.below(4));
                let p = random_cnp(&mut rng, &name);
                events.push(Box::new(move |c| {
                    c.upsert_cluster_policy(&p);
                }));
            }
            12 => {
                let name = format!("cnp{}", rng.below(4));
                events.push(Box::new(move |c| {
                    c.delete_cluster_policy(&name);
                }));
            }
            _ => {
                let n = node(rng.pick(&["a", "b"]), rng.pick(&["10.0.0.3", "10.0.1.200"]));
                events.push(Box::new(move |c| {
                    c.upsert_node(&n);
                }));
            }
        }
        for e in &events {
            e(&mut c);
            e(&mut all);
        }
        for _ in 0..15 {
            let (src, dst) = (*rng.pick(&addrs), *rng.pick(&addrs));
            let proto = *rng.pick(&[TCP, UDP, SCTP]);
            let port = *rng.pick(&ports);
            let e = c.explain_addrs(src, dst, proto, port);
            assert_eq!(
                e.allowed_here,
                c.verdict(src, dst, proto, port),
                "step {step}: node n1\n{}",
                render(&e)
            );
            check_shape(&e);
            let e = all.explain_addrs(src, dst, proto, port);
            assert_eq!(
                e.allowed,
                all.verdict(src, dst, proto, port),
                "step {step}: every pod local\n{}",
                render(&e)
            );
            assert_eq!(e.allowed, e.allowed_here);
            check_shape(&e);
            probes += 1;
            allowed += usize::from(e.allowed);
            for s in [&e.egress, &e.ingress].into_iter().flatten() {
                match s.decided_by {
                    DecidedBy::Cluster { .. } => by_cluster += 1,
                    DecidedBy::NetworkPolicy { .. } => by_np += 1,
                    DecidedBy::Isolation { .. } => isolated += 1,
                    _ => {}
                }
            }
        }
    }
    // Every kind of decision must be common, or the agreement says little.
    assert!(probes >= 4000, "{probes}");
    assert!(
        allowed * 10 > probes && allowed * 10 < probes * 9,
        "{allowed}/{probes}"
    );
    eprintln!(
        "{probes} probes, {allowed} allowed; decided by a cluster rule {by_cluster}, a NetworkPolicy rule {by_np}, isolation {isolated}"
    );
    assert!(
        by_cluster > 250 && by_np > 300 && isolated > 300,
        "{by_cluster} {by_np} {isolated}"
    );
}

fn explain(w: &World, from: &str, to: &str, proto: u8, port: u16) -> Explanation {
    let e =
        w.c.explain(&Party::Pod(obj(from)), &Party::Pod(obj(to)), proto, port)
            .unwrap();
    assert_eq!(e.allowed, w.allows(from, to, proto, port), "{}", render(&e));
    e
}

#[test]
fn a_network_policy_denial_names_the_isolating_policies_and_why_each_rule_fails() {
    let mut w = World::new();
    w.c.upsert_namespace(&namespace("y", &[("team", "b"), ("env", "dev")]));
    w.apply("x", "deny", json!({"podSelector": {}}));
    w.apply(
        "x",
        "web",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], "ports": [{"port": 80, "endPort": 81}]},
            {"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}], "ports": [{"port": "metrics"}]},
        ]}),
    );
    let e = explain(&w, "y/a", "x/a", TCP, 8080);
    assert!(!e.allowed);
    let ing = e.ingress.as_ref().unwrap();
    assert_eq!(
        ing.decided_by,
        DecidedBy::Isolation {
            policies: vec!["x/deny".into(), "x/web".into()]
        }
    );
    let text = render(&e);
    for want in [
        "namespace label `env` is `dev` (wants env=prod)",
        "port 8080 not in 80-81",
        "namespace is `y`, the rule selects pods of `x` only",
        "pod label `tier` missing (wants tier=front)",
        "named port `metrics` not on the destination pod x/a",
        "x/deny (no ingress rules: allows nothing)",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Egress at y/a: nothing isolates it.
    assert_eq!(e.egress.as_ref().unwrap().decided_by, DecidedBy::Default);

    // The namespace relabelled: the first rule allows, and says so.
    w.c.upsert_namespace(&namespace("y", &[("team", "b"), ("env", "prod")]));
    let e = explain(&w, "y/a", "x/a", TCP, 81);
    assert_eq!(
        e.ingress.unwrap().decided_by,
        DecidedBy::NetworkPolicy {
            policy: "x/web".into(),
            rule: "ingress[0]".into()
        }
    );
    // A protocol that differs.
    let e = explain(&w, "y/a", "x/a", UDP, 80);
    assert!(render(&e).contains("protocol differs: the rule has TCP, the flow is UDP"));
}

#[test]
fn a_cluster_rule_decides_in_tier_order_and_pass_goes_on() {
    let mut w = World::new();
    let cnp = |name: &str, spec: Value| -> ClusterNetworkPolicy {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let x_a = json!({"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}, "podSelector": {"matchLabels": {"app": "a"}}}});
    w.c.upsert_cluster_policy(&cnp(
        "pass-y",
        json!({"tier": "Admin", "priority": 1, "subject": x_a, "ingress": [
            {"name": "web-only", "action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "nope"}]},
            {"name": "let-np-decide", "action": "Pass", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]},
        ]}),
    ));
    w.c.upsert_cluster_policy(&cnp(
        "base",
        json!({"tier": "Baseline", "priority": 3, "subject": x_a, "ingress": [
            {"name": "deny-rest", "action": "Deny", "from": [{"namespaces": {}}]},
        ]}),
    ));
    let e = explain(&w, "y/b", "x/a", TCP, 80);
    assert!(!e.allowed);
    let ing = e.ingress.as_ref().unwrap();
    assert_eq!(
        ing.decided_by,
        DecidedBy::Cluster {
            tier: Tier::Baseline,
            policy: "base".into(),
            rule: "deny-rest".into(),
            action: "Deny".into()
        }
    );
    assert_eq!(ing.admin.len(), 2);
    assert!(ing.admin[1].matched.is_some() && !ing.admin[1].decides);
    assert!(ing.baseline[0].decides);
    assert!(render(&e).contains("named port `nope` not on the destination pod x/a"));
    // A NetworkPolicy allowing it comes before the Baseline.
    w.apply("x", "open", json!({"podSelector": {}, "ingress": [{}]}));
    let e = explain(&w, "y/b", "x/a", TCP, 80);
    assert!(e.allowed);
    // From an address outside the cluster: no egress side; the Admin
    // rules' peers are pods, so they do not match it.
    let e =
        w.c.explain(
            &Party::Address("192.0.2.1".parse().unwrap()),
            &Party::Pod(obj("x/a")),
            TCP,
            80,
        )
        .unwrap();
    assert!(e.egress.is_none() && e.allowed);
    assert!(render(&e).contains("192.0.2.1 is not a pod address"));
}

#[test]
fn explaining_a_pod_to_itself_tells_a_hairpin_through_a_service_from_its_own_address() {
    use k8s_openapi::api::core::v1::Service;

    use crate::policy::explain::{Spec, explain_specs};
    let mut w = World::new();
    // x/a admits no one, itself included.
    w.apply("x", "deny", json!({"podSelector": {}}));
    let pods = [pod("x", "a", json!({"app": "a"}), "10.0.1.1")];
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "web"},
        "spec": {"selector": {"app": "a"},
                 "ports": [{"port": 8080, "targetPort": 80, "protocol": "TCP"}]}}))
    .unwrap();
    let a = Spec::Pod(obj("x/a"));
    let web = Spec::Service(obj("x/web"));
    let through = explain_specs(&w.c, (&a, &web), (TCP, 8080), |_| Some(&svc), &pods).unwrap();
    assert_eq!(through.len(), 1);
    let e = &through[0];
    assert!(!e.allowed, "{}", render(e));
    assert!(
        e.notes
            .iter()
            .any(|n| n.starts_with("a hairpin: x/a reaches itself")),
        "{:?}",
        e.notes
    );
    // Its own address: the same verdict, and a note that no policy
    // applies to it there.
    let direct = explain_specs(&w.c, (&a, &a), (TCP, 80), |_| None, &pods).unwrap();
    assert_eq!(direct[0].allowed, e.allowed);
    assert!(
        direct[0]
            .notes
            .iter()
            .any(|n| n.contains("never leaves the pod")),
        "{:?}",
        direct[0].notes
    );
    // Another pod through the same Service: no such notes.
    let other = Spec::Pod(obj("x/b"));
    let from_b = explain_specs(&w.c, (&other, &web), (TCP, 8080), |_| Some(&svc), &pods).unwrap();
    assert!(
        !from_b[0].notes.iter().any(|n| n.contains("hairpin")),
        "{:?}",
        from_b[0].notes
    );
}
