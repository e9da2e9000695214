//! `bench rules`: the cost of a new connection as the allowlist grows.
//! A server pod admits N = 1, 100, 1,000, 10,000 peers, each a (peer, TCP
//! port) pair: half pod identities (for iptables: the pod's /32), half /24
//! CIDRs; the client's own allow (its identity or address, port 8080) is
//! one of them, and the last one in an iptables chain. Four data paths on
//! the same routed veth layout, each in its own node namespace:
//!
//! - `none`: no program, no rule (the floor);
//! - `sluice`: the server pod's ingress policy (SetPolicy, N rules);
//! - `iptables`: programs detached, the allowlist as a chain of N rules in
//!   FORWARD of the node namespace, behind an ESTABLISHED accept;
//! - `ipset`: the same with one `hash:net,port` set of N entries, one rule.
//!
//! A client makes new connections one after the other for `--seconds`
//! (connect, one byte each way, close with RST): the rate and the connect()
//! latency. Per N, the four alternate, `--rounds` times.
//!
//! `cargo xtask bench rules [--seconds 2] [--rounds 5]`; the curve goes to
//! bench-results/rules.csv and, with gnuplot, bench-results/rules.png.
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sluice_common::{DIR_INGRESS, IDENTITY_CIDR_FLAG};
use sluice_tests::NetNs;

use super::util::{self as u, Acceptor, Kind, Pair};

const PORT: u16 = 8080;
/// Not allowed for anyone: a denied probe before every measurement.
const DENIED_PORT: u16 = 8081;
const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];
const IMPLS: [&str; 4] = ["none", "sluice", "iptables", "ipset"];
const SET: &str = "sl-allow";

/// One allowlist entry other than the client's.
enum Peer {
    /// A pod identity and, for iptables, its address.
    Pod(u32, Ipv4Addr),
    /// A /24 and its CIDR group number.
    Cidr(Ipv4Addr, u32),
}

fn others(n: usize) -> Vec<(Peer, u16)> {
    (0..n.saturating_sub(1))
        .map(|i| {
            let port = 1024 + (i * 7 % 50_000) as u16;
            let k = (i / 2) as u32;
            let peer = if i % 2 == 0 {
                Peer::Pod(
                    100_000 + k,
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + k),
                )
            } else {
                Peer::Cidr(
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (k << 8)),
                    k + 1,
                )
            };
            (peer, port)
        })
        .collect()
}

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of new connections per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds; each measures every N and implementation in turn.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let &Args { seconds, rounds } = args;
    u::header(
        "Sluice bench rules: new connections vs allowlist size",
        &["iptables", "ipset", "gnuplot-nox"],
    );
    let pairs = [
        Pair::new(Kind::Bare)?,
        Pair::new(Kind::Sluice)?,
        Pair::new(Kind::Bare)?,
        Pair::new(Kind::Bare)?,
    ];
    let _servers: Vec<Acceptor> = pairs
        .iter()
        .map(|p| Acceptor::start(&p.server, PORT, true))
        .collect::<Result<_>>()?;
    let client_id = pairs[1].identity_of(pairs[1].client_ip)?;
    create_ipset(&pairs[3])?;
    println!(
        "sequential new connections for {seconds} s per measurement (connect, 1 byte each way, RST); \
         {} rounds, each round N = 1, 100, 1,000, 10,000 in turn (reloaded), and per N none, sluice, iptables, ipset in turn",
        rounds
    );
    // results[n][impl][round] = (conn/s, connect p50, connect p99)
    let mut results = vec![vec![Vec::new(); IMPLS.len()]; SIZES.len()];
    for round in 0..rounds {
        for (n, &size) in SIZES.iter().enumerate() {
            let entries = others(size);
            let mut loads = Vec::new();
            for (i, p) in pairs.iter().enumerate().skip(1) {
                let t0 = Instant::now();
                match i {
                    1 => load_sluice(p, &entries, client_id)?,
                    2 => load_iptables(p, &entries)?,
                    _ => load_ipset(p, &entries)?,
                }
                loads.push(format!("{} {:.0} ms", IMPLS[i], u::ms(t0.elapsed())));
                check(p, true)?;
            }
            if round == 0 {
                check(&pairs[0], false)?;
                eprintln!("N = {size}: loaded in {}", loads.join(", "));
            }
            for (i, p) in pairs.iter().enumerate() {
                let (rate, lat) = measure(p, seconds)?;
                let (p50, p99) = (u::pct(&lat, 50.0), u::pct(&lat, 99.0));
                results[n][i].push((rate, p50, p99));
                eprintln!(
                    "  round {} N = {size:>5} {:<8} {rate:8.0} conn/s, connect p50 {p50:6.1} us p99 {p99:6.1} us",
                    round + 1,
                    IMPLS[i],
                );
            }
        }
    }
    report(&results)
}

fn load_sluice(p: &Pair, entries: &[(Peer, u16)], client_id: u32) -> Result<()> {
    let mut rules = vec![u::allow_tcp(DIR_INGRESS, client_id, PORT, 1)];
    let mut cidrs = Vec::new();
    for (i, (peer, port)) in entries.iter().enumerate() {
        let rule_id = i as u32 + 2;
        match peer {
            Peer::Pod(id, _) => rules.push(u::allow_tcp(DIR_INGRESS, *id, *port, rule_id)),
            Peer::Cidr(net, group) => {
                let group = IDENTITY_CIDR_FLAG | group;
                cidrs.push(json!({"dir": DIR_INGRESS, "net": format!("{net}/24"), "group": group}));
                rules.push(u::allow_tcp(DIR_INGRESS, group, *port, rule_id));
            }
        }
    }
    p.set_policy(
        true,
        json!({"ingress_isolated": true, "rules": rules, "cidrs": cidrs}),
    )
}

/// The allowlist as one chain, the client's rule last (first match wins,
/// so that is the rule every new connection of the client walks to).
fn load_iptables(p: &Pair, entries: &[(Peer, u16)]) -> Result<()> {
    let mut t = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:SL-INGRESS - [0:0]\n",
    );
    t += "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    t += &format!("-A FORWARD -o {} -j SL-INGRESS\n", p.server_host_if);
    for (peer, port) in entries {
        let src = match peer {
            Peer::Pod(_, ip) => format!("{ip}/32"),
            Peer::Cidr(net, _) => format!("{net}/24"),
        };
        t += &format!("-A SL-INGRESS -s {src} -p tcp -m tcp --dport {port} -j ACCEPT\n");
    }
    t += &format!(
        "-A SL-INGRESS -s {}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT\n",
        p.client_ip
    );
    t += "-A SL-INGRESS -j DROP\nCOMMIT\n";
    pipe_in(node_ns(p)?, "iptables-restore", &[], &t)
}

/// One `hash:net,port` set and the rule that matches it (loaded once).
fn create_ipset(p: &Pair) -> Result<()> {
    let ns = node_ns(p)?;
    let set = format!("create {SET} hash:net,port family inet hashsize 16384 maxelem 65536\n");
    pipe_in(ns, "ipset", &["restore"], &set)?;
    let t = format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FORWARD -o {if_} -m set --match-set {SET} src,dst -j ACCEPT\n\
         -A FORWARD -o {if_} -j DROP\nCOMMIT\n",
        if_ = p.server_host_if
    );
    pipe_in(ns, "iptables-restore", &[], &t)
}

/// The set's members: the allowlist.
fn load_ipset(p: &Pair, entries: &[(Peer, u16)]) -> Result<()> {
    let mut s = format!("flush {SET}\n");
    for (peer, port) in entries {
        match peer {
            Peer::Pod(_, ip) => s += &format!("add {SET} {ip},tcp:{port}\n"),
            Peer::Cidr(net, _) => s += &format!("add {SET} {net}/24,tcp:{port}\n"),
        }
    }
    s += &format!("add {SET} {},tcp:{PORT}\n", p.client_ip);
    pipe_in(node_ns(p)?, "ipset", &["restore"], &s)
}

fn node_ns(p: &Pair) -> Result<&NetNs> {
    p.node_ns().context("no node namespace")
}

fn pipe_in(ns: &NetNs, program: &str, args: &[&str], stdin: &str) -> Result<()> {
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The client gets through; with a policy, a port nobody allows does not
/// (a timeout: without a policy nothing listening means a refusal).
fn check(p: &Pair, enforced: bool) -> Result<()> {
    let (ok, denied) = p.client.run({
        let ip = p.server_ip;
        move || {
            let ok =
                u::connect_once(SocketAddr::new(ip, PORT), true, Duration::from_secs(2)).is_some();
            let denied = std::net::TcpStream::connect_timeout(
                &SocketAddr::new(ip, DENIED_PORT),
                Duration::from_millis(300),
            )
            .err()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
            (ok, denied)
        }
    })?;
    if !ok || denied != enforced {
        bail!(
            "{}: allowed connection {ok}, other port denied {denied} (expected {enforced})",
            p.client.name
        );
    }
    Ok(())
}

/// Sequential new connections for `seconds` after a short warm-up: the
/// rate (per second) and each connect() in microseconds.
fn measure(p: &Pair, seconds: f64) -> Result<(f64, Vec<f64>)> {
    let to = SocketAddr::new(p.server_ip, PORT);
    p.client.run(move || -> Result<(f64, Vec<f64>)> {
        for _ in 0..50 {
            u::connect_once(to, true, Duration::from_secs(1))
                .context("warm-up connection failed")?;
        }
        let mut lat = Vec::new();
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(seconds);
        while Instant::now() < end {
            let d =
                u::connect_once(to, true, Duration::from_secs(1)).context("connection failed")?;
            lat.push(d.as_secs_f64() * 1e6);
        }
        Ok((lat.len() as f64 / t0.elapsed().as_secs_f64(), lat))
    })?
}

/// Per N and implementation, medians over rounds: conn/s, connect p50
/// and p99 (us), and two figures relative to `none` measured just before in
/// the same round (so that the machine's slow and fast phases cancel):
/// the rate as a fraction of none's, and the connect p50 added to none's.
struct Point {
    rate: f64,
    p50: f64,
    p99: f64,
    rate_vs_none: f64,
    added_us: f64,
}

/// results[n][impl][round] = (conn/s, connect p50 us, connect p99 us)
type Runs = [Vec<Vec<(f64, f64, f64)>>];

fn points(results: &Runs) -> Vec<Vec<Point>> {
    results
        .iter()
        .map(|per_impl| {
            let none = &per_impl[0];
            per_impl
                .iter()
                .map(|runs| {
                    let col = |f: fn(&(f64, f64, f64)) -> f64| {
                        u::median(&runs.iter().map(f).collect::<Vec<_>>())
                    };
                    let rel: Vec<f64> = runs.iter().zip(none).map(|(r, n)| r.0 / n.0).collect();
                    let added: Vec<f64> = runs.iter().zip(none).map(|(r, n)| r.1 - n.1).collect();
                    Point {
                        rate: col(|r| r.0),
                        p50: col(|r| r.1),
                        p99: col(|r| r.2),
                        rate_vs_none: u::median(&rel),
                        added_us: u::median(&added),
                    }
                })
                .collect()
        })
        .collect()
}

fn report(results: &Runs) -> Result<()> {
    let pts = points(results);
    let table = |title: &str, cell: &dyn Fn(&Point, &Point) -> String| {
        println!();
        println!("{title}");
        print!("  {:>6}", "N");
        for name in IMPLS {
            print!(" {name:>17}");
        }
        println!();
        for (size, row) in SIZES.iter().zip(&pts) {
            print!("  {size:>6}");
            for (p, p1) in row.iter().zip(&pts[0]) {
                print!(" {:>17}", cell(p, p1));
            }
            println!();
        }
    };
    table(
        "new connections per second (median over rounds), and x its own rate at N = 1:",
        &|p, p1| format!("{:.0}  x{:.3}", p.rate, p.rate / p1.rate),
    );
    table(
        "connect() latency, us: p50 / p99 (medians over rounds):",
        &|p, _| format!("{:.1} / {:.1}", p.p50, p.p99),
    );
    table(
        "relative to `none` in the same round: rate as a fraction of none's; connect p50 added (us):",
        &|p, _| format!("{:.3}  {:+.1}", p.rate_vs_none, p.added_us),
    );
    let last = SIZES.len() - 1;
    let (s1, s10k) = (&pts[0][1], &pts[last][1]);
    let drift_free = s10k.rate_vs_none / s1.rate_vs_none;
    println!();
    println!("targets:");
    println!(
        "  sluice within 10% from N = 1 to 10,000: rate (vs none, same round) x{drift_free:.3}, connect p50 {:+.1} us ({:.1} -> {:.1} us); raw rate x{:.3}: {}",
        s10k.p50 - s1.p50,
        s1.p50,
        s10k.p50,
        s10k.rate / s1.rate,
        u::verdict(drift_free >= 0.9)
    );
    for (i, name) in IMPLS.iter().enumerate().skip(2) {
        let rel = |n: usize| pts[n][i].rate_vs_none / pts[0][i].rate_vs_none;
        match (1..SIZES.len()).find(|&n| rel(n) < 0.9) {
            Some(n) => println!(
                "  {name}: bends at N = {} (rate x{:.3} of its N = 1, vs none), x{:.3} at 10,000; connect p50 +{:.1} us over none at 10,000",
                SIZES[n],
                rel(n),
                rel(last),
                pts[last][i].added_us
            ),
            None => println!(
                "  {name}: within 10% of its N = 1 rate up to 10,000 (x{:.3}); connect p50 +{:.1} us over none at 10,000",
                rel(last),
                pts[last][i].added_us
            ),
        }
    }
    println!("  {}", u::SHARED_NOTE);

    let mut rows = vec![
        [
            "n",
            "implementation",
            "conn_per_s",
            "rate_vs_none",
            "connect_p50_us",
            "connect_p99_us",
            "added_p50_us_vs_none",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (n, size) in SIZES.iter().enumerate() {
        for (i, name) in IMPLS.iter().enumerate() {
            let p = &pts[n][i];
            rows.push(vec![
                size.to_string(),
                (*name).to_owned(),
                format!("{:.0}", p.rate),
                format!("{:.4}", p.rate_vs_none),
                format!("{:.1}", p.p50),
                format!("{:.1}", p.p99),
                format!("{:.1}", p.added_us),
            ]);
        }
    }
    let csv = u::write_csv("rules.csv", &rows)?;
    println!();
    println!("curve: {}", csv.display());
    match plot(&csv) {
        Ok(png) => println!("plot:  {}", png.display()),
        Err(e) => println!("plot:  not drawn ({e:#})"),
    }
    Ok(())
}

/// rules.png next to the CSV (and the gnuplot script, rules.gp): rate and
/// connect p50 against N, log scale.
fn plot(csv: &std::path::Path) -> Result<std::path::PathBuf> {
    let png = csv.with_extension("png");
    let series = |col: u32| -> String {
        // Rows go N by N, the implementations in IMPLS order within each.
        IMPLS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                format!(
                    "'{}' every {}::{i} using 1:{col} with linespoints lw 2 title '{name}'",
                    csv.display(),
                    IMPLS.len()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let script = format!(
        "set terminal pngcairo size 1100,450\nset output '{}'\nset datafile separator ','\n\
         set key autotitle columnhead left bottom\nset logscale x\nset xrange [0.7:14000]\nset xlabel 'allowed peers N'\nset grid\n\
         set multiplot layout 1,2 title 'new TCP connections to a pod admitting N peers (shared 2-core machine)'\n\
         set ylabel 'connections/s'\nset yrange [0:*]\nplot {}\n\
         set ylabel 'connect() p50, us (log)'\nset logscale y\nset yrange [10:*]\nset key left top\nplot {}\nunset multiplot\n",
        png.display(),
        series(3),
        series(5)
    );
    let gp = csv.with_extension("gp");
    std::fs::write(&gp, script)?;
    let out = std::process::Command::new("gnuplot")
        .arg(&gp)
        .output()
        .context("gnuplot not installed")?;
    if !out.status.success() {
        bail!("gnuplot: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(png)
}
