//! `bench cni`'s report: latencies, batch walls against `bridge`, where an
//! ADD's time goes, the kernel's attach floor, and the targets.
use super::{
    cni::{Batch, PhaseSamples, Results},
    util as u,
};

/// The phases in the order an ADD runs them.
const PHASES: [&str; 10] = [
    "plugin: ipam",
    "plugin: veth",
    "plugin: agent",
    "agent: queued",
    "agent: maps",
    "agent: policy",
    "agent: attach_wait",
    "agent: attach",
    "plugin: pod_side",
    "plugin: host_routes",
];

pub fn report(res: &Results, seq: usize) {
    println!();
    println!("latency per call, ms (all rounds pooled):");
    println!(
        "  {:<22} {:<24} {:>8} {:>8} {:>8} {:>8}",
        "plugin", "", "p50", "p99", "max", "n"
    );
    let row = |plugin: &str, name: &str, v: &[f64]| {
        if !v.is_empty() {
            println!(
                "  {plugin:<22} {name:<24} {:>8.1} {:>8.1} {:>8.1} {:>8}",
                u::pct(v, 50.0),
                u::pct(v, 99.0),
                u::pct(v, 100.0),
                v.len()
            );
        }
    };
    let plugins = ["sluice", "bridge", "sluice, agent stubbed"];
    for (k, plugin) in plugins.iter().enumerate() {
        for (v, verb) in ["ADD", "DEL"].iter().enumerate() {
            row(
                plugin,
                &format!("{verb}, {seq} in sequence"),
                &res.seq[k][v],
            );
        }
        for b in res.par.iter().filter(|_| k < 2) {
            for (v, verb) in ["ADD", "DEL"].iter().enumerate() {
                row(
                    plugin,
                    &format!("{verb}, {} in parallel", b.n),
                    &b.each[k][v],
                );
            }
        }
    }

    println!();
    println!("whole batch, ms (median over rounds; ratio: median of the per-round ratios):");
    println!(
        "  {:<6} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7}",
        "batch", "sluice ADD", "bridge ADD", "ratio", "sluice DEL", "bridge DEL", "ratio"
    );
    for b in &res.par {
        println!(
            "  {:<6} {:>10.0} {:>10.0} {:>7.2} {:>10.0} {:>10.0} {:>7.2}",
            b.n,
            u::median(&b.walls[0][0]),
            u::median(&b.walls[1][0]),
            ratio(b, 0),
            u::median(&b.walls[0][1]),
            u::median(&b.walls[1][1]),
            ratio(b, 1),
        );
    }

    println!();
    println!(
        "where a sluice ADD's time goes, ms (p50 / p99; agent: its own split of `plugin: agent`):"
    );
    let mut header = format!("  {:<28} {:>15}", "phase", format!("{seq} in sequence"));
    for b in &res.par {
        header.push_str(&format!(" {:>15}", format!("{} at once", b.n)));
    }
    println!("{header}");
    let cols: Vec<&PhaseSamples> = std::iter::once(&res.seq_phases)
        .chain(res.par.iter().map(|b| &b.phases))
        .collect();
    for phase in PHASES {
        let mut line = format!("  {phase:<28}");
        for c in &cols {
            line.push_str(&format!(" {:>15}", p50_p99(c.get(phase))));
        }
        println!("{line}");
    }

    println!();
    println!("where a sluice DEL's time goes, {seq} in sequence, ms (p50 / p99):");
    println!("  {:<28} {:>15} {:>15}", "phase", "agent", "agent stubbed");
    for (phase, v) in &res.seq_del_phases {
        println!(
            "  {phase:<28} {:>15} {:>15}",
            p50_p99(Some(v)),
            p50_p99(res.stub_del_phases.get(phase))
        );
    }

    let f = &res.floor;
    let hook = u::pct(&f.seq_hook, 50.0);
    println!();
    println!(
        "kernel floor: TCX attaches alone (BPF_LINK_CREATE, a pass program, fresh veths; no agent):"
    );
    println!(
        "  one hook, veths one after the other: p50 {hook:.1} ms, p99 {:.1} ms ({} hooks)",
        u::pct(&f.seq_hook, 99.0),
        f.seq_hook.len()
    );
    for (n, walls, each) in &f.par {
        let wall = u::median(walls);
        println!(
            "  {n} veths x 2 hooks at once: batch {wall:.0} ms (if serialized: {:.0} ms = {} x one hook's p50); each hook p50 {:.1}, max {:.1} ms",
            2.0 * *n as f64 * hook,
            2 * n,
            u::pct(each, 50.0),
            u::pct(each, 100.0)
        );
    }

    println!();
    println!("targets:");
    for b in &res.par {
        let r = ratio(b, 0);
        println!(
            "  {} ADDs in parallel within 2x of bridge's batch: {:.0} vs {:.0} ms ({r:.2}x): {}",
            b.n,
            u::median(&b.walls[0][0]),
            u::median(&b.walls[1][0]),
            u::verdict(r <= 2.0)
        );
        if let Some((_, walls, _)) = f.par.iter().find(|(n, ..)| *n == b.n) {
            println!(
                "    (the attaches alone of {} pods take {:.0} ms: {:.2}x bridge's batch)",
                b.n,
                u::median(walls),
                u::median(walls) / u::median(&b.walls[1][0])
            );
        }
    }
    let (add50, del50) = (u::pct(&res.seq[0][0], 50.0), u::pct(&res.seq[0][1], 50.0));
    println!(
        "  DEL in sequence no slower than ADD (p50): DEL {del50:.1} ms, ADD {add50:.1} ms: {}",
        u::verdict(del50 <= add50)
    );
    if let Some(down) = res.seq_del_phases.get("plugin: down") {
        println!(
            "    (DEL sets the host end down, p50 {:.1} ms, and the agent deletes the veth after answering)",
            u::pct(down, 50.0)
        );
    }
    if let Some(veth) = res.seq_del_phases.get("plugin: veth") {
        println!(
            "    (the veth deletion alone: p50 {:.1} ms; with the TCX links on it the kernel waits a grace period per hook, under RTNL; the whole DEL against a stub agent, no links: {:.1} ms)",
            u::pct(veth, 50.0),
            u::pct(&res.seq[2][1], 50.0)
        );
    }
    let p99 = u::pct(&res.seq[0][0], 99.0);
    println!(
        "  sequential ADD p99 < 50 ms: {p99:.1} ms: {}",
        u::verdict(p99 < 50.0)
    );
    let plugin_p50 = u::pct(&res.seq[2][0], 50.0);
    println!(
        "  where it goes (p50): the plugin's own work {plugin_p50:.1} ms (agent stubbed), the agent's answer ~{:.1} ms, of which the attaches {:.1} ms",
        add50 - plugin_p50,
        u::pct(
            res.seq_phases
                .get("agent: attach")
                .map_or(&[][..], Vec::as_slice),
            50.0
        )
    );
    println!(
        "  (reference) bridge + host-local sequential ADD p99 {:.1} ms: no agent, no policy",
        u::pct(&res.seq[1][0], 99.0)
    );
    println!("  {}", u::SHARED_NOTE);
}

/// Median over rounds of sluice's batch wall over bridge's (`v`: 0 ADD,
/// 1 DEL).
fn ratio(b: &Batch, v: usize) -> f64 {
    let per_round: Vec<f64> = b.walls[0][v]
        .iter()
        .zip(&b.walls[1][v])
        .map(|(s, br)| s / br)
        .collect();
    u::median(&per_round)
}

/// "p50 / p99", or "-" when the binaries report no phases (before them).
fn p50_p99(v: Option<&Vec<f64>>) -> String {
    match v {
        Some(v) if !v.is_empty() => format!("{:.1} / {:.1}", u::pct(v, 50.0), u::pct(v, 99.0)),
        _ => "-".into(),
    }
}
