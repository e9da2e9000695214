//! Two nodes in different subnets behind a router namespace (the routed
//! topology of `cargo xtask conformance --topology routed`): the agents run
//! with `--tunnel auto`, find the peer off-link and reach it through the
//! `sluice-vxlan` device. Pod to pod across nodes in both families (IPv6
//! pods over the IPv4 underlay), a policy deny judged on the inner pod
//! addresses with the drop event naming the pods, and a Service flow
//! across nodes.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use sluice_tests::{
    cases::{Family, Protocol},
    conformance::{Cluster, ProbeTarget, ROUTED_POD_MTU, Topology},
};

const TIMEOUT: Duration = Duration::from_secs(1);

fn model() -> Result<String> {
    Ok(std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conformance/model-default.yaml"
    ))?)
}

/// x/a and x/b: pods are spread over the nodes in model order, so these
/// two are on different nodes.
fn cross(c: &Cluster, family: Family, target: ProbeTarget, proto: Protocol) -> Result<bool> {
    let pairs = [("x/a".to_owned(), "x/b".to_owned(), proto, 80)];
    let r = c.probe_pairs(&pairs, family, target, TIMEOUT)?;
    Ok(r.first().copied().unwrap_or(false))
}

#[test]
fn routed_nodes_reach_each_others_pods_through_vxlan_and_policy_judges_the_inner_addresses()
-> Result<()> {
    let mut c = Cluster::start_topology(2, Topology::Routed, &model()?, true)?;
    // The agents chose VXLAN: the device exists on both nodes with the
    // MTU of the 1500-byte underlay less 50, the pods' MTU.
    for i in 0..2 {
        let node = c.node(i).context("node")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let other = 2 - i;
        // The device first, then its routes, in one sync of the agent:
        // wait for all three.
        let (link, routes, routes6) = loop {
            let shown = (
                node.ns.ip(&["-d", "link", "show", "sluice-vxlan"]),
                node.ns.ip(&["route", "show", "dev", "sluice-vxlan"]),
                node.ns.ip(&["-6", "route", "show", "dev", "sluice-vxlan"]),
            );
            if let (Ok(link), Ok(routes), Ok(routes6)) = shown {
                let complete = routes
                    .contains(&format!("10.244.{other}.0/24 via 10.244.{other}.0"))
                    && routes6.contains(&format!("fd00:244:{other}::/64 via fe80::"));
                if complete || Instant::now() > deadline {
                    break (link, routes, routes6);
                }
            } else if Instant::now() > deadline {
                bail!("node {i} has no sluice-vxlan");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(link.contains("vxlan id 7"), "{link}");
        assert!(link.contains(&format!("mtu {ROUTED_POD_MTU}")), "{link}");
        assert!(
            routes.contains(&format!("10.244.{other}.0/24 via 10.244.{other}.0")),
            "{routes}"
        );
        assert!(
            routes6.contains(&format!("fd00:244:{other}::/64 via fe80::")),
            "{routes6}"
        );
    }
    for family in [Family::Ipv4, Family::Ipv6] {
        for target in [ProbeTarget::Pod, ProbeTarget::Service] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !cross(&c, family, target, proto)? {
                    if Instant::now() > deadline {
                        bail!("x/a -> x/b {family:?} {target:?} {proto:?} across the tunnel");
                    }
                }
            }
        }
    }

    // A deny on x/b: judged on the pod addresses inside the tunnel.
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-b\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes:\n  - Ingress\n";
    let keys = c.apply_text(deny, Family::Ipv4)?;
    c.wait_programmed(&keys)?;
    for family in [Family::Ipv4, Family::Ipv6] {
        for target in [ProbeTarget::Pod, ProbeTarget::Service] {
            assert!(
                !cross(&c, family, target, Protocol::Tcp)?,
                "{family:?} {target:?} passed a deny"
            );
        }
        // x/c (on x/a's node) still reaches y/a on the other node: only x/b
        // is isolated.
        let pairs = [("x/c".to_owned(), "y/a".to_owned(), Protocol::Tcp, 80)];
        assert_eq!(
            c.probe_pairs(&pairs, family, ProbeTarget::Pod, TIMEOUT)?,
            [true]
        );
    }
    // x/b's node reports the drops: its pod named, the source the inner
    // address of x/a (the outer one would be node 1's 10.253.1.2), in both
    // families. (Names are given to the node's own pods only.)
    let b_node = c.node(1).context("node 2")?;
    for family in [Family::Ipv4, Family::Ipv6] {
        let a = c.ip_of("x/a", family).context("x/a")?.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while b_node
            .events_matching(|e| {
                e["dst_namespace"] == "x"
                    && e["dst_pod"] == "b"
                    && e["src"] == a.as_str()
                    && e["reason"] == "policy-denied"
            })
            .is_empty()
        {
            if Instant::now() > deadline {
                bail!(
                    "no drop event of {a} -> x/b: {:?}",
                    b_node.events_matching(|_| true)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}
