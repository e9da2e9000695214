//! `bench flood`: what a flood of denied packets costs the node. One pod
//! sends UDP as fast as one core allows to another pod of the same node
//! whose ingress denies it, on three layouts built alike (the plugin's
//! routed veths): (s) Sluice, the server isolated for ingress with only TCP
//! allowed from the client, so the flood is dropped by `to_pod`; (n) no
//! program, an nftables `drop` rule in the node's forward hook; (i) no
//! program, an iptables `DROP` rule in FORWARD. Each round runs every
//! layout in turn for `--seconds`. The sender is pinned to CPU 0, where the
//! whole path runs (the veth hands the packet to the backlog of the sending
//! CPU, whose softirq routes and drops it), so CPU 0's busy time over the
//! run, from /proc/stat, divided by the packets the filter dropped (its own
//! counter), is the CPU cost per dropped packet. Ratios are per round, to
//! (n), then the median over rounds.
//!
//! `cargo xtask bench flood [--seconds 3] [--rounds 5]`
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sluice_common::{DIR_INGRESS, reason};

use super::util::{self as u, Kind, Pair};

/// The flood's destination port (nothing listens; nothing arrives).
const FLOOD_PORT: u16 = 9999;
/// The TCP port the Sluice layout allows, so the server is isolated by an
/// allowlist that does not cover the flood.
const ALLOWED_TCP: u16 = 5201;
/// Where the sender runs and whose time is counted.
const SENDER_CPU: usize = 0;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per layout per round (at least 1).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds; each runs every layout in turn.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Sluice,
    Nftables,
    Iptables,
}

impl Layout {
    const ALL: [Layout; 3] = [Layout::Sluice, Layout::Nftables, Layout::Iptables];

    fn label(self) -> &'static str {
        match self {
            Layout::Sluice => "(s) sluice, to_pod deny",
            Layout::Nftables => "(n) nftables drop rule",
            Layout::Iptables => "(i) iptables DROP rule",
        }
    }
}

/// One layout's run: what was dropped and what it cost.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    sent: u64,
    dropped: u64,
    seconds: f64,
    busy_seconds: f64,
}

impl Sample {
    fn drops_per_second(&self) -> f64 {
        self.dropped as f64 / self.seconds
    }

    /// CPU milliseconds per million dropped packets.
    fn cpu_ms_per_million(&self) -> f64 {
        if self.dropped == 0 {
            f64::NAN
        } else {
            self.busy_seconds * 1e3 / (self.dropped as f64 / 1e6)
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let seconds = args.seconds.max(1.0);
    u::header(
        "Sluice bench flood: a denied UDP flood between two pods of one node",
        &["nftables", "iptables"],
    );
    let layouts = [
        (Layout::Sluice, sluice_layout()?),
        (Layout::Nftables, filter_layout(Layout::Nftables)?),
        (Layout::Iptables, filter_layout(Layout::Iptables)?),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Layout::ALL.len()];
    for round in 0..args.rounds.max(1) {
        for (i, (layout, pair)) in layouts.iter().enumerate() {
            let s = flood(*layout, pair, seconds)?;
            println!(
                "round {round} {:<26} sent {:>10} dropped {:>10} ({:.0}/s) CPU {:.0} ms per million drops",
                layout.label(),
                s.sent,
                s.dropped,
                s.drops_per_second(),
                s.cpu_ms_per_million()
            );
            samples[i].push(s);
        }
    }
    report(&samples)
}

fn report(samples: &[Vec<Sample>]) -> Result<()> {
    println!();
    println!(
        "{:<26} {:>14} {:>20} {:>16}",
        "", "drops/s (med)", "CPU ms/M drops (med)", "CPU vs nftables"
    );
    let nft = &samples[1];
    let mut rows = Vec::new();
    let mut sluice_ratio = f64::NAN;
    for (layout, s) in Layout::ALL.iter().zip(samples) {
        let rate = u::median(&s.iter().map(Sample::drops_per_second).collect::<Vec<_>>());
        let cost = u::median(&s.iter().map(Sample::cpu_ms_per_million).collect::<Vec<_>>());
        // Per round, then the median: slow phases of the machine cancel out.
        let ratios: Vec<f64> = s
            .iter()
            .zip(nft)
            .map(|(a, b)| a.cpu_ms_per_million() / b.cpu_ms_per_million())
            .collect();
        let ratio = u::median(&ratios);
        if *layout == Layout::Sluice {
            sluice_ratio = ratio;
        }
        println!(
            "{:<26} {:>14.0} {:>20.0} {:>15.2}x",
            layout.label(),
            rate,
            cost,
            ratio
        );
        rows.push(vec![
            layout.label().to_owned(),
            format!("{rate:.0}"),
            format!("{cost:.1}"),
            format!("{ratio:.3}"),
        ]);
    }
    let path = u::write_csv("flood", &rows)?;
    println!();
    println!(
        "target: Sluice's CPU per dropped packet no worse than nftables' (ratio <= 1.00): {:.2}x  {}",
        sluice_ratio,
        u::verdict(sluice_ratio <= 1.0)
    );
    println!("rows: {}", path.display());
    Ok(())
}

/// Sluice with the server isolated for ingress: TCP from the client is
/// allowed, the flood is not.
fn sluice_layout() -> Result<Pair> {
    let p = Pair::new(Kind::Sluice)?;
    let cid = p.identity_of(p.client_ip)?;
    p.set_policy(
        true,
        json!({"ingress_isolated": true,
               "rules": [u::allow_tcp(DIR_INGRESS, cid, ALLOWED_TCP, 1)]}),
    )?;
    Ok(p)
}

/// No program; a drop rule of `layout` in the node's forward path.
fn filter_layout(layout: Layout) -> Result<Pair> {
    let p = Pair::new(Kind::Bare)?;
    let ns = p.node_ns().context("the node namespace")?;
    let port = FLOOD_PORT.to_string();
    match layout {
        Layout::Nftables => {
            let rules = format!(
                "table inet flood {{\n  chain forward_drop {{\n    type filter hook forward priority 0;\n    udp dport {port} counter drop\n  }}\n}}\n"
            );
            let dir = sluice_tests::TempDir::new("sluice-bench-flood-")?;
            let file = dir.0.join("flood.nft");
            std::fs::write(&file, rules)?;
            u::output_in(ns, "nft", &["-f", &file.display().to_string()])?;
        }
        Layout::Iptables => {
            u::output_in(
                ns,
                "iptables",
                &["-A", "FORWARD", "-p", "udp", "--dport", &port, "-j", "DROP"],
            )?;
        }
        Layout::Sluice => bail!("not a filter layout"),
    }
    Ok(p)
}

/// Packets the layout's filter has dropped so far.
fn dropped(layout: Layout, pair: &Pair) -> Result<u64> {
    match layout {
        Layout::Sluice => {
            let node = pair.node.as_ref().context("the Sluice node")?;
            Ok(node
                .maps()?
                .drop_counters()?
                .iter()
                .filter(|(k, _)| k.reason == reason::POLICY_DENIED)
                .map(|(_, v)| v.packets)
                .sum())
        }
        Layout::Nftables => {
            let ns = pair.node_ns().context("the node namespace")?;
            let out = u::output_in(
                ns,
                "nft",
                &["-j", "list", "chain", "inet", "flood", "forward_drop"],
            )?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let packets = v["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o["rule"]["expr"].as_array())
                .flatten()
                .find_map(|e| e["counter"]["packets"].as_u64());
            packets.context("no counter in the nftables rule")
        }
        Layout::Iptables => {
            let ns = pair.node_ns().context("the node namespace")?;
            let out = u::output_in(ns, "iptables", &["-L", "FORWARD", "-v", "-x", "-n"])?;
            out.lines()
                .find(|l| l.contains("DROP") && l.contains(&format!("dpt:{FLOOD_PORT}")))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .context("no DROP rule counter in FORWARD")
        }
    }
}

/// CPU `cpu`'s busy time so far (all but idle and iowait), in seconds.
fn busy_seconds(cpu: usize) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{cpu} ");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&name))
        .with_context(|| format!("no {name}in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // USER_HZ is 100 on Linux.
    Ok(busy as f64 / 100.0)
}

/// Floods the server from the client for `seconds`, pinned to CPU 0.
fn flood(layout: Layout, pair: &Pair, seconds: f64) -> Result<Sample> {
    let to = SocketAddr::new(pair.server_ip, FLOOD_PORT);
    let before = dropped(layout, pair)?;
    let busy_before = busy_seconds(SENDER_CPU)?;
    let started = Instant::now();
    let sent = pair.client.run(move || -> Result<u64> {
        let mut set = nix::sched::CpuSet::new();
        set.set(SENDER_CPU)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(to)?;
        let payload = [0u8; 18];
        let deadline = started + Duration::from_secs_f64(seconds);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            // A batch between clock reads keeps the loop about the packets.
            for _ in 0..64 {
                if sock.send(&payload).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })??;
    let elapsed = started.elapsed().as_secs_f64();
    let busy = busy_seconds(SENDER_CPU)? - busy_before;
    let dropped = dropped(layout, pair)? - before;
    Ok(Sample {
        sent,
        dropped,
        seconds: elapsed,
        busy_seconds: busy,
    })
}
