//! A restarted agent keeps every number the data path holds: identities
//! (IPCACHE), ClusterNetworkPolicy peer classes (PEER_CLASSES) and
//! profiles (TIER_PROFILES), ipBlock CIDR groups (CIDRS). A number that changed would be rewritten in
//! one map before the others, and in between a flow is judged by entries
//! that meant another peer (docs/design.md, "Numbers survive a restart").
use std::{collections::BTreeMap, net::IpAddr};

use super::*;

fn cnp(mut obj: Value) -> Value {
    obj["apiVersion"] = json!("policy.networking.k8s.io/v1alpha2");
    obj["kind"] = json!("ClusterNetworkPolicy");
    obj
}

/// (address -> identity, identity -> class, endpoint -> profile,
/// (endpoint, direction, prefix) -> CIDR group).
type Numbers = (
    BTreeMap<IpAddr, u32>,
    BTreeMap<u32, u32>,
    BTreeMap<u32, u32>,
    BTreeMap<(u32, u8, String), u32>,
);

fn numbers(node: &Node, pods: &[&Pod]) -> Result<Numbers> {
    let maps = node.maps()?;
    let mut ips = BTreeMap::new();
    for ip in pods.iter().flat_map(|p| p.ipv4.into_iter().chain(p.ipv6)) {
        ips.insert(ip, maps.ipcache_get(ip).context("in the ipcache")?.identity);
    }
    Ok((
        ips,
        maps.peer_classes().into_iter().collect(),
        maps.tier_profiles().into_iter().collect(),
        maps.cidr_groups()
            .into_iter()
            .map(|(ep, dir, net, g)| ((ep, dir, net.to_string()), g))
            .collect(),
    ))
}

#[test]
fn a_restarted_agent_keeps_every_identity_class_and_profile_number() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("r")?;
    api.create_namespace("s")?;
    // Created in an order their names do not sort in (a list is sorted).
    let names = [
        ("s", "zed"),
        ("r", "web"),
        ("s", "mid"),
        ("r", "api"),
        ("r", "cli"),
    ];
    for (ns, name) in names {
        create(&api, pod(ns, name, name))?;
    }
    node.start_agent()?;
    let pods: Vec<Pod> = names
        .iter()
        .map(|&p| Pod::add_as(&node, &config, Some(p)))
        .collect::<Result<_>>()?;
    // Policies one at a time, so classes and profiles are numbered as
    // they come, not all at once as a restarted agent sees them.
    let policies = [
        (
            "p1",
            json!({"tier": "Admin", "priority": 5,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "web"}}}},
            "ingress": [{"name": "cli", "action": "Accept",
                         "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "cli"}}}}]},
                        {"name": "rest", "action": "Deny", "from": [{"namespaces": {}}]}]}),
        ),
        (
            "p2",
            json!({"tier": "Admin", "priority": 6,
            "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "s"}}},
            "egress": [{"name": "api", "action": "Deny",
                        "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "api"}}}}]}]}),
        ),
        (
            "p3",
            json!({"tier": "Baseline", "priority": 1,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "zed"}}}},
            "ingress": [{"name": "mid", "action": "Deny",
                         "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "mid"}}}}]}]}),
        ),
    ];
    // ipBlocks of two endpoints, the later-sorting policy first: CIDR
    // groups are numbered as the policies come.
    for (name, target, cidr, port) in [
        ("zz", "zed", "192.0.2.0/24", 80),
        ("aa", "api", "198.51.100.0/24", 443),
    ] {
        let ns = if target == "zed" { "s" } else { "r" };
        let rv = create(
            &api,
            json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"pod": target}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"port": port}]}]}}),
        )?;
        node.wait_programmed(&format!("NetworkPolicy/{ns}/{name}"), Some(&rv), WAIT)?;
    }
    let mut last = String::new();
    for (name, spec) in policies {
        last = create(&api, cnp(json!({"metadata": {"name": name}, "spec": spec})))?;
        node.wait_programmed(&format!("ClusterNetworkPolicy/{name}"), Some(&last), WAIT)?;
    }
    let all: Vec<&Pod> = pods.iter().collect();
    let before = numbers(&node, &all)?;
    assert!(before.1.len() >= 3 && before.2.len() >= 3, "{before:?}");
    assert!(before.3.len() >= 2, "{before:?}");
    for _ in 0..2 {
        node.kill_agent()?;
        node.start_agent()?;
        node.wait_programmed("ClusterNetworkPolicy/p3", Some(&last), WAIT)?;
        assert_eq!(numbers(&node, &all)?, before, "numbers after a restart");
    }
    Ok(())
}
