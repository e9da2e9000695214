//! The across-nodes part of `bench throughput`: pod x/a on node 1 to pod
//! x/b on node 2 of the model cluster (the real agents, no policy), the two
//! nodes joined by one link (the direct route via the peer's InternalIP) or
//! in two subnets behind a router namespace (`--tunnel auto`: VXLAN, pod
//! MTU 1450), against the bare path of the one-node table ((a): routed
//! veths, no program), all in one run, interleaved per round. TCP, one
//! stream, IPv4 and IPv6 (over the IPv4 underlay).
use anyhow::{Context as _, Result};
use serde_json::Value;
use sluice_tests::{
    NetNs,
    cases::Family,
    conformance::{Cluster, Topology},
};

use super::util::{self as u, Pair, Proc};

const PORT: u16 = 5202;

/// Gbit/s received over one iperf3 stream from `client` to `ip`.
fn iperf(client: &NetNs, ip: std::net::IpAddr, secs: &str) -> Result<f64> {
    let ip = ip.to_string();
    let out = u::output_in(
        client,
        "iperf3",
        &["-c", &ip, "-p", &PORT.to_string(), "-t", secs, "-J"],
    )?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received")?
        / 1e9)
}

pub fn run(bare: &Pair, secs: &str, rounds: usize) -> Result<()> {
    let model = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/conformance/model-default.yaml"
    ))?;
    let direct = Cluster::start_topology(2, Topology::Link, &model, false)?;
    let tunnel = Cluster::start_topology(2, Topology::Routed, &model, false)?;
    let mut servers = Vec::new();
    for ns in [&bare.server].into_iter().chain(
        [&direct, &tunnel]
            .map(|c| c.pod_netns("x/b"))
            .into_iter()
            .flatten(),
    ) {
        servers.push(Proc::spawn_in(
            ns,
            "iperf3",
            &["-s", "-p", &PORT.to_string()],
        )?);
        u::wait_listening(ns, PORT)?;
    }
    let mut paths: Vec<(&NetNs, std::net::IpAddr)> = vec![(&bare.client, bare.server_ip)];
    for c in [&direct, &tunnel] {
        for f in [Family::Ipv4, Family::Ipv6] {
            let from = c.pod_netns("x/a").context("x/a")?;
            paths.push((from, c.ip_of("x/b", f).context("x/b")?));
        }
    }
    let names = [
        "(a) bare veths, one node",
        "direct route IPv4",
        "direct route IPv6",
        "VXLAN IPv4 (inner)",
        "VXLAN IPv6 over IPv4",
    ];
    let mut values = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        for (i, (client, ip)) in paths.iter().enumerate() {
            let g = iperf(client, *ip, secs)?;
            eprintln!("nodes round {} {:<24} {g:6.2} Gbit/s", round + 1, names[i]);
            values[i].push(g);
        }
    }
    drop(servers);
    println!();
    println!(
        "Across nodes: x/a (node 1) -> x/b (node 2), TCP 1 stream, iperf3 -t {secs}, {rounds} rounds, median (ratio to (a), median of per-round ratios)"
    );
    println!("{:<26} {:>10} {:>8}", "path", "Gbit/s", "ratio");
    for (i, v) in values.iter().enumerate() {
        let ratios: Vec<f64> = v.iter().zip(&values[0]).map(|(x, a)| x / a).collect();
        println!(
            "{:<26} {:>10.2} {:>8.2}",
            names[i],
            u::median(v),
            u::median(&ratios)
        );
    }
    Ok(())
}
