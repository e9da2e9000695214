//! `bench throughput`: two pods on one simulated node, four data paths side
//! by side: (a) the plugin's routed veths with no program attached (the
//! limit of this machine), (b) Sluice with no policy selecting the pods,
//! (c) Sluice with both pods isolated and an allow in force (server ingress
//! from the client, client egress to the server), (d) the reference
//! `bridge` plugin with `host-local`. Per round, each path in turn runs
//! iperf3 with 1 and with 4 streams, then a TCP request/response latency
//! test (sockperf ping-pong, 64-byte messages; a built-in equivalent if
//! sockperf is missing). The client runs on CPU 0, the server on CPU 1.
//! Ratios are to (a): the median over rounds of the per-round ratio, so that
//! slow phases of the shared machine cancel out, with the p25-p75 of those
//! ratios to show what the machine can resolve. Besides the rates, the CPU
//! time iperf3's two ends spend per Gbit/s: the per-packet cost of each
//! data path, which other tenants disturb much less than the rate.
//!
//! Then, in the same run, across two nodes (`nodes.rs`): the direct route
//! and the VXLAN tunnel (nodes in two subnets) against (a).
//!
//! `cargo xtask bench throughput [--seconds 3] [--rounds 7]`
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_common::{DIR_EGRESS, DIR_INGRESS};

use super::util::{self as u, Kind, Pair, Proc};

const IPERF_PORT: u16 = 5201;
/// Client and server are pinned to one CPU each, the same for every path,
/// so that the scheduler's placement does not vary between runs.
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";
const RR_PORT: u16 = 11111;
/// (name, higher is better). The CPU figures are the iperf3 client's and
/// server's CPU time (user + system, which here includes the softirq work
/// of the veths and programs) per Gbit/s moved: a cost that contention on
/// a shared machine disturbs much less than the rate itself.
const METRICS: [(&str, bool); 6] = [
    ("TCP 1 stream, Gbit/s", true),
    ("TCP 4 streams, Gbit/s", true),
    ("latency p50, us", false),
    ("latency p99, us", false),
    ("CPU %/(Gbit/s), 1 stream", false),
    ("CPU %/(Gbit/s), 4 streams", false),
];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run and per latency test (at least 1).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds; each runs every data path in turn.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let &Args { seconds, rounds } = args;
    let secs = format!("{}", seconds.max(1.0).round());
    let sockperf = which("sockperf");
    u::header(
        "Sluice bench throughput: two pods on one node",
        &["iperf3", "sockperf", "containernetworking-plugins"],
    );
    let kinds = [Kind::Bare, Kind::Sluice, Kind::Policy, Kind::Bridge];
    let pairs: Vec<Pair> = kinds.iter().map(|&k| Pair::new(k)).collect::<Result<_>>()?;
    enforce(&pairs[2])?;
    let mut servers = Vec::new();
    let mut echo = Vec::new();
    for p in &pairs {
        servers.push(Proc::spawn_in(
            &p.server,
            "taskset",
            &[
                "-c",
                SERVER_CPU,
                "iperf3",
                "-s",
                "-p",
                &IPERF_PORT.to_string(),
            ],
        )?);
        if sockperf {
            let ip = p.server_ip.to_string();
            servers.push(Proc::spawn_in(
                &p.server,
                "taskset",
                &[
                    "-c",
                    SERVER_CPU,
                    "sockperf",
                    "sr",
                    "--tcp",
                    "-i",
                    &ip,
                    "-p",
                    &RR_PORT.to_string(),
                ],
            )?);
        } else {
            echo.push(sluice_tests::Server::start(&p.server, RR_PORT)?);
        }
        u::wait_listening(&p.server, IPERF_PORT)?;
        u::wait_listening(&p.server, RR_PORT)?;
    }
    println!(
        "client pinned to CPU {CLIENT_CPU}, server to CPU {SERVER_CPU}; iperf3 -t {secs} (-P 1, -P 4); latency: {} for {secs} s, 64-byte messages, one-way = RTT/2; {} rounds, order (a) (b) (c) (d) each round",
        if sockperf {
            "sockperf ping-pong"
        } else {
            "built-in TCP request/response (sockperf not installed)"
        },
        rounds
    );
    // values[kind][metric][round]
    let mut values = vec![vec![Vec::new(); METRICS.len()]; kinds.len()];
    for round in 0..rounds {
        for (k, p) in pairs.iter().enumerate() {
            let (t1, c1) = iperf(p, 1, &secs)?;
            let (t4, c4) = iperf(p, 4, &secs)?;
            let (p50, p99) = if sockperf {
                sockperf_pp(p, &secs)?
            } else {
                builtin_rr(p, seconds)?
            };
            for (m, v) in [t1, t4, p50, p99, c1, c4].into_iter().enumerate() {
                values[k][m].push(v);
            }
            eprintln!(
                "round {} {:<26} {t1:6.2} {t4:6.2} Gbit/s  p50 {p50:7.2} us  p99 {p99:7.2} us",
                round + 1,
                kinds[k].label()
            );
        }
    }
    drop((servers, echo));
    report(&kinds, &values);
    // Then across two nodes: the direct route against the VXLAN tunnel.
    super::nodes::run(&pairs[0], &secs, rounds)
}

/// (c): the server admits only the client on the two test ports, the
/// client may open only those; checked by a denied port before measuring.
fn enforce(p: &Pair) -> Result<()> {
    let (cid, sid) = (p.identity_of(p.client_ip)?, p.identity_of(p.server_ip)?);
    let rules = |dir, id| -> Vec<Value> {
        [IPERF_PORT, RR_PORT]
            .iter()
            .enumerate()
            .map(|(i, &port)| u::allow_tcp(dir, id, port, i as u32 + 1))
            .collect()
    };
    p.set_policy(
        true,
        json!({"ingress_isolated": true, "rules": rules(DIR_INGRESS, cid)}),
    )?;
    p.set_policy(
        false,
        json!({"egress_isolated": true, "rules": rules(DIR_EGRESS, sid)}),
    )?;
    // Nothing listens on 12345: refused means the SYN got through.
    let to = SocketAddr::new(p.server_ip, 12345);
    let denied = p.client.run(move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(300))
            .err()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    })?;
    if !denied {
        bail!("(c): a port outside the allow was not denied; the policy is not in force");
    }
    Ok(())
}

/// Gbit/s received, and the CPU cost: client + server CPU % per Gbit/s.
fn iperf(p: &Pair, streams: u32, secs: &str) -> Result<(f64, f64)> {
    let ip = p.server_ip.to_string();
    let out = u::output_in(
        &p.client,
        "taskset",
        &[
            "-c",
            CLIENT_CPU,
            "iperf3",
            "-c",
            &ip,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            secs,
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received")?;
    let cpu = &v["end"]["cpu_utilization_percent"];
    let total = cpu["host_total"]
        .as_f64()
        .context("iperf3: no cpu_utilization_percent")?
        + cpu["remote_total"].as_f64().unwrap_or(0.0);
    Ok((bps / 1e9, total / (bps / 1e9)))
}

/// sockperf's p50 and p99 (one-way, RTT/2, microseconds).
fn sockperf_pp(p: &Pair, secs: &str) -> Result<(f64, f64)> {
    let ip = p.server_ip.to_string();
    let out = u::output_in(
        &p.client,
        "taskset",
        &[
            "-c",
            CLIENT_CPU,
            "sockperf",
            "pp",
            "--tcp",
            "-i",
            &ip,
            "-p",
            &RR_PORT.to_string(),
            "-t",
            secs,
            "-m",
            "64",
        ],
    )?;
    let find = |pct: &str| -> Result<f64> {
        out.lines()
            .find(|l| l.contains(&format!("percentile {pct} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("sockperf printed no percentile {pct}: {out}"))
    };
    Ok((find("50.000")?, find("99.000")?))
}

/// Without sockperf: 64-byte request/response round trips on one
/// connection for `seconds`; p50 and p99 of RTT/2 in microseconds.
fn builtin_rr(p: &Pair, seconds: f64) -> Result<(f64, f64)> {
    let to = SocketAddr::new(p.server_ip, RR_PORT);
    let samples = p.client.run(move || -> Result<Vec<f64>> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        let (msg, mut back) = ([1u8; 64], [0u8; 64]);
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < end {
            let t0 = Instant::now();
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
            out.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
        }
        Ok(out)
    })??;
    Ok((u::pct(&samples, 50.0), u::pct(&samples, 99.0)))
}

fn which(program: &str) -> bool {
    sluice_tests::sh("sh", &["-c", &format!("command -v {program}")]).is_ok()
}

fn report(kinds: &[Kind], values: &[Vec<Vec<f64>>]) {
    // Per-round ratios of kind k to `base`.
    let ratios = |k: usize, m: usize, base: usize| -> Vec<f64> {
        values[k][m]
            .iter()
            .zip(&values[base][m])
            .map(|(x, b)| x / b)
            .collect()
    };
    let ratio = |k: usize, m: usize, base: usize| u::median(&ratios(k, m, base));
    let head = || {
        print!("  {:<30}", "");
        for kind in kinds {
            print!(" {:>20}", kind.short());
        }
        println!();
    };
    println!();
    println!("medians over rounds:");
    head();
    for (m, (name, _)) in METRICS.iter().enumerate() {
        print!("  {name:<30}");
        for per_kind in values {
            print!(" {:>20.2}", u::median(&per_kind[m]));
        }
        println!();
    }
    println!();
    println!("ratio to (a): median of the per-round ratios [their p25-p75]:");
    head();
    for (m, (name, higher)) in METRICS.iter().enumerate() {
        print!(
            "  {:<30}",
            format!("{name} {}", if *higher { "(+)" } else { "(-)" })
        );
        for k in 0..kinds.len() {
            let r = ratios(k, m, 0);
            let cell = format!(
                "{:.3} [{:.2}-{:.2}]",
                u::median(&r),
                u::pct(&r, 25.0),
                u::pct(&r, 75.0)
            );
            print!(" {cell:>20}");
        }
        println!();
    }
    println!(
        "  (+) higher is better, (-) lower is better; a p25-p75 spread wider than a target's margin"
    );
    println!("  means this machine does not resolve that target");
    let (c, d) = (2, 3);
    let t1 = ratio(c, 0, 0);
    let t4 = ratio(c, 1, 0);
    let l50 = ratio(c, 2, 0);
    let l99 = ratio(c, 3, 0);
    println!();
    println!("targets:");
    println!(
        "  (c) throughput >= 0.95 of (a): 1 stream {t1:.3}, 4 streams {t4:.3}: {}",
        u::verdict(t1 >= 0.95 && t4 >= 0.95)
    );
    println!(
        "  (c) latency <= 1.05 of (a): p50 {l50:.3}: {}; p99 {l99:.3}: {}",
        u::verdict(l50 <= 1.05),
        u::verdict(l99 <= 1.05)
    );
    let cd: Vec<f64> = (0..METRICS.len()).map(|m| ratio(c, m, d)).collect();
    let at_least_d = cd[0] >= 1.0 && cd[1] >= 1.0 && cd[2] <= 1.0;
    println!(
        "  (c) at least (d): (c)/(d) throughput {:.3} (1 stream), {:.3} (4 streams), latency p50 {:.3}: {}",
        cd[0],
        cd[1],
        cd[2],
        u::verdict(at_least_d)
    );
    println!(
        "  CPU cost of (c), x (a): {:.3} (1 stream), {:.3} (4 streams); of (d): {:.3}, {:.3}",
        ratio(c, 4, 0),
        ratio(c, 5, 0),
        ratio(d, 4, 0),
        ratio(d, 5, 0)
    );
    println!("  {}", u::SHARED_NOTE);
}
