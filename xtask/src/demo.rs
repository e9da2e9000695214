//! `cargo xtask demo`: one node in a network namespace with the real agent,
//! three pods wired by the real CNI plugin, TCP/80 reachability before and
//! after a policy, and the drop events of the denied probes. Everything it
//! makes is removed at the end (the guards also clean up on failure).
use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use sluice_agent::datapath::ipcache_key;
use sluice_common::{DIR_INGRESS, proto};
use sluice_proto::{Request, Response};
use sluice_tests::{Node, Pod, Server, conflist_config, tcp_ok};

const PORT: u16 = 80;

fn matrix(pods: &[(&str, &Pod)]) -> Result<()> {
    print!("{:>8}", "from\\to");
    for (name, _) in pods {
        print!("{name:>6}");
    }
    println!();
    for (from, p) in pods {
        print!("{from:>8}");
        for (to, q) in pods {
            let cell = if from == to {
                "-"
            } else {
                let ip = q.ipv4.context("pod without IPv4")?;
                if tcp_ok(&p.ns, ip, PORT, Duration::from_millis(300)) {
                    "."
                } else {
                    "X"
                }
            };
            print!("{cell:>6}");
        }
        println!();
    }
    println!("  (. = TCP/{PORT} connects, X = blocked)\n");
    Ok(())
}

fn identity_of(node: &Node, ip: IpAddr) -> Result<u32> {
    let maps = node.maps()?;
    let net = ipnetwork::IpNetwork::from(ip);
    Ok(maps
        .ipcache
        .get(&ipcache_key(net), 0)
        .context("pod address not in the ipcache")?
        .identity)
}

pub fn run() -> Result<()> {
    println!("== Sluice demo: one node, three pods, one policy ==\n");
    let mut node = Node::new()?;
    node.start_agent()?;
    println!(
        "agent running in netns {} (bpffs {})",
        node.ns.name,
        node.bpffs.dir.display()
    );
    let config = conflist_config(&node, Some("10.96.0.0/24"), Some("fd00:96::/64"));
    let a = Pod::add(&node, &config)?;
    let b = Pod::add(&node, &config)?;
    let c = Pod::add(&node, &config)?;
    let _servers = [
        Server::start(&a.ns, PORT)?,
        Server::start(&b.ns, PORT)?,
        Server::start(&c.ns, PORT)?,
    ];
    let pods = [("a", &a), ("b", &b), ("c", &c)];
    for (n, p) in &pods {
        println!(
            "pod {n}: {} {} via {}",
            fmt_ip(p.ipv4),
            fmt_ip(p.ipv6),
            p.host_ifname
        );
    }
    println!("\nNo policy: every pod reaches every pod.");
    matrix(&pods)?;

    let a_ip = a.ipv4.context("pod a has no IPv4")?;
    let policy = serde_json::json!({
        "ingress_isolated": true,
        "rules": [{
            "dir": DIR_INGRESS, "identity": identity_of(&node, a_ip)?,
            "l4": {"ports": {"proto": proto::TCP, "first": PORT, "last": PORT}}, "rule_id": 1
        }]
    });
    println!("Policy for pod c: ingress isolated, allow TCP/{PORT} from pod a only:\n  {policy}");
    match node.request(&Request::SetPolicy {
        attachment: c.attachment(),
        policy,
    })? {
        Response::Ok => {}
        other => bail!("agent refused the policy: {other:?}"),
    }
    matrix(&pods)?;

    println!("Drop events the agent printed (JSON lines on its stdout):");
    let c_ip = c.ipv4.context("pod c has no IPv4")?;
    let drops = node.events_matching(|e| e["dst"].as_str() == Some(c_ip.to_string().as_str()));
    if drops.is_empty() {
        bail!("expected drop events for probes to pod c, saw none");
    }
    for d in &drops {
        println!("  {d}");
    }
    println!("\nTearing down (CNI DEL for each pod, then the node).");
    for p in [&a, &b, &c] {
        let out = p.del(&node, &config)?;
        if out.code != 0 {
            bail!("DEL failed: {out:?}");
        }
    }
    Ok(())
}

fn fmt_ip(ip: Option<IpAddr>) -> String {
    ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
}
