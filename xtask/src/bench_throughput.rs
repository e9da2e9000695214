//! `bench throughput`: two pods on one simulated node, four data paths side
//! by side: (a) the plugin's routed veths with no program attached (the
//! limit of this machine), (b) Sluice with no policy selecting the pods,
//! (c) Sluice with both pods isolated and an allow in force (server ingress
//! from the client, client egress to the server), (d) the reference
//! `bridge` plugin with `host-local`. Per round, each path in turn runs
//! iperf3 with 1 and with 4 streams, then a TCP request/response latency
//! test (sockperf ping-pong, 64-byte messages; a built-in equivalent if
//! sockperf is missing). Ratios are to (a): the median over rounds of the
//! per-round ratio, so that slow phases of the shared machine cancel out.
//!
//! `cargo xtask bench throughput [--seconds 3] [--rounds 5]`
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_common::{DIR_EGRESS, DIR_INGRESS};

use crate::bench_util::{self as u, Kind, Pair, Proc};

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 11111;
const METRICS: [(&str, bool); 4] = [
    ("TCP, 1 stream (Gbit/s)", true),
    ("TCP, 4 streams (Gbit/s)", true),
    ("latency p50 (us)", false),
    ("latency p99 (us)", false),
];

pub fn run(args: &[String]) -> Result<()> {
    let (mut seconds, mut rounds) = (3.0, 5.0);
    u::options(
        args,
        &mut [("--seconds", &mut seconds), ("--rounds", &mut rounds)],
    )?;
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
            "iperf3",
            &["-s", "-p", &IPERF_PORT.to_string()],
        )?);
        if sockperf {
            let ip = p.server_ip.to_string();
            servers.push(Proc::spawn_in(
                &p.server,
                "sockperf",
                &["sr", "--tcp", "-i", &ip, "-p", &RR_PORT.to_string()],
            )?);
        } else {
            echo.push(sluice_tests::Server::start(&p.server, RR_PORT)?);
        }
        u::wait_listening(&p.server, IPERF_PORT)?;
        u::wait_listening(&p.server, RR_PORT)?;
    }
    println!(
        "iperf3 -t {secs} (-P 1, -P 4); latency: {} for {secs} s, 64-byte messages, one-way = RTT/2; {} rounds, order (a) (b) (c) (d) each round",
        if sockperf {
            "sockperf ping-pong"
        } else {
            "built-in TCP request/response (sockperf not installed)"
        },
        rounds as usize
    );
    // values[kind][metric][round]
    let mut values = vec![vec![Vec::new(); METRICS.len()]; kinds.len()];
    for round in 0..rounds as usize {
        for (k, p) in pairs.iter().enumerate() {
            let t1 = iperf(p, 1, &secs)?;
            let t4 = iperf(p, 4, &secs)?;
            let (p50, p99) = if sockperf {
                sockperf_pp(p, &secs)?
            } else {
                builtin_rr(p, seconds)?
            };
            for (m, v) in [t1, t4, p50, p99].into_iter().enumerate() {
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
    Ok(())
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

fn iperf(p: &Pair, streams: u32, secs: &str) -> Result<f64> {
    let ip = p.server_ip.to_string();
    let out = u::output_in(
        &p.client,
        "iperf3",
        &[
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
    Ok(bps / 1e9)
}

/// sockperf's p50 and p99 (one-way, RTT/2, microseconds).
fn sockperf_pp(p: &Pair, secs: &str) -> Result<(f64, f64)> {
    let ip = p.server_ip.to_string();
    let out = u::output_in(
        &p.client,
        "sockperf",
        &[
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
    // Per-round ratio of kind k to (a), median over rounds.
    let ratio = |k: usize, m: usize, base: usize| -> f64 {
        let r: Vec<f64> = values[k][m]
            .iter()
            .zip(&values[base][m])
            .map(|(x, b)| x / b)
            .collect();
        u::median(&r)
    };
    println!();
    println!("medians over rounds:");
    print!("  {:<26}", "");
    for (name, _) in METRICS {
        print!(" {name:>24}");
    }
    println!();
    for (kind, per_metric) in kinds.iter().zip(values) {
        print!("  {:<26}", kind.label());
        for v in per_metric {
            print!(" {:>24.2}", u::median(v));
        }
        println!();
    }
    println!();
    println!(
        "ratio to (a) (median of per-round ratios; throughput: higher is better, latency: lower is better):"
    );
    for (k, kind) in kinds.iter().enumerate() {
        print!("  {:<26}", kind.label());
        for m in 0..METRICS.len() {
            print!(" {:>24.3}", ratio(k, m, 0));
        }
        println!();
    }
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
    let at_least_d = METRICS
        .iter()
        .zip(&cd)
        .all(|((_, higher_better), r)| if *higher_better { *r >= 1.0 } else { *r <= 1.0 });
    println!(
        "  (c) at least (d): (c)/(d) = {:.3}, {:.3} (throughput), {:.3}, {:.3} (latency): {}",
        cd[0],
        cd[1],
        cd[2],
        cd[3],
        u::verdict(at_least_d)
    );
    println!("  {}", u::SHARED_NOTE);
}
