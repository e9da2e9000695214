//! `bench compiler`, issue 15: the targets at 100,000 pods and the curve.
//!
//! The targets (full compile under 2 s, peak memory under 1 GiB, every
//! incremental change with a median under 1 ms and a p99 under 20 ms) are
//! judged on **a node of the cluster**: 100,000 pods, 20,000 policies, and
//! the node's own pods as endpoints, at most a kubelet's default `maxPods`
//! (110; `--local-every 910`). That is what one agent compiles. The run
//! with every pod local (the default of `--local-every`) is a stress row:
//! its verdicts are printed, labelled as such, never as the target.
//!
//! `--curve` runs each size (1k, 10k, 50k, 100k pods; namespaces and
//! policies in the proportion given) in its own process, so each peak
//! memory is that size's alone, and prints one table per configuration.
use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::compiler::{Dist, NODE_PODS};

const TARGET_COMPILE: Duration = Duration::from_secs(2);
const TARGET_PEAK_MIB: f64 = 1024.0;
const TARGET_MEDIAN: Duration = Duration::from_millis(1);
const TARGET_P99: Duration = Duration::from_millis(20);
const CURVE: [usize; 4] = [1_000, 10_000, 50_000, 100_000];

/// One compile's results: NetworkPolicies only, or with
/// ClusterNetworkPolicies on top.
pub(super) struct Part {
    pub(super) full: Duration,
    /// VmHWM; for the ClusterNetworkPolicy part, reset before it.
    pub(super) peak_mib: f64,
    /// Of the peak, the input objects before the compiler ran.
    pub(super) inputs_mib: f64,
    pub(super) endpoints: usize,
    /// Policy map keys of the endpoints (each endpoint counted).
    pub(super) keys: usize,
    /// Keys of the ClusterNetworkPolicy profiles, written once each.
    pub(super) shared_keys: usize,
    pub(super) events: Vec<Dist>,
}

pub(super) struct Report {
    pub(super) pods: usize,
    pub(super) namespaces: usize,
    pub(super) policies: usize,
    pub(super) cluster_policies: usize,
    pub(super) np: Part,
    pub(super) cnp: Option<Part>,
}

/// The cluster whose curve is drawn.
pub(super) struct Shape {
    pub(super) pods: usize,
    pub(super) namespaces: usize,
    pub(super) policies: usize,
    pub(super) cluster_policies: usize,
    pub(super) rounds: usize,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Part {
    fn keys_per_endpoint(&self) -> f64 {
        self.keys as f64 / self.endpoints.max(1) as f64
    }

    fn to_json(&self) -> Value {
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|d| json!([d.name, us(d.median), us(d.p99), us(d.max)]))
            .collect();
        json!({
            "full_us": us(self.full), "peak_mib": self.peak_mib, "inputs_mib": self.inputs_mib,
            "endpoints": self.endpoints, "keys": self.keys, "shared_keys": self.shared_keys,
            "events": events,
        })
    }

    fn from_json(v: &Value) -> Result<Self> {
        let f = |k: &str| v[k].as_f64().with_context(|| format!("{k} in a bench row"));
        let d = |x: &Value| Duration::from_secs_f64(x.as_f64().unwrap_or(f64::NAN).max(0.0) / 1e6);
        let events = v["events"]
            .as_array()
            .context("events in a bench row")?
            .iter()
            .map(|e| Dist {
                name: e[0].as_str().unwrap_or("?").to_owned(),
                median: d(&e[1]),
                p99: d(&e[2]),
                max: d(&e[3]),
            })
            .collect();
        Ok(Self {
            full: Duration::from_secs_f64(f("full_us")? / 1e6),
            peak_mib: f("peak_mib")?,
            inputs_mib: f("inputs_mib")?,
            endpoints: f("endpoints")? as usize,
            keys: f("keys")? as usize,
            shared_keys: f("shared_keys")? as usize,
            events,
        })
    }
}

impl Report {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "pods": self.pods, "namespaces": self.namespaces, "policies": self.policies,
            "cluster_policies": self.cluster_policies,
            "np": self.np.to_json(),
            "cnp": self.cnp.as_ref().map(Part::to_json),
        })
    }

    fn from_json(v: &Value) -> Result<Self> {
        let n = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .with_context(|| format!("{k} in a bench row"))
        };
        Ok(Self {
            pods: n("pods")?,
            namespaces: n("namespaces")?,
            policies: n("policies")?,
            cluster_policies: n("cluster_policies")?,
            np: Part::from_json(&v["np"])?,
            cnp: match &v["cnp"] {
                Value::Null => None,
                c => Some(Part::from_json(c)?),
            },
        })
    }

    /// As many endpoints as a node has (a kubelet's default maxPods, with
    /// room for a raised limit), not every pod of the cluster.
    fn is_node(&self) -> bool {
        self.np.endpoints <= 2 * NODE_PODS
    }
}

/// Prints the targets block for one run.
pub(super) fn targets(r: &Report) {
    let at_scale = r.pods >= 100_000 && r.policies >= 20_000;
    let (what, verdict): (&str, fn(bool) -> &'static str) = match (at_scale, r.is_node()) {
        (false, _) => (
            "not judged: below 100,000 pods and 20,000 policies",
            |_| "(not judged)",
        ),
        (true, true) => (
            "judged: a node of the cluster (its own pods as endpoints)",
            |ok| if ok { "met" } else { "NOT met" },
        ),
        (true, false) => (
            "stress row: more endpoints than a node has (every pod local?); \
             NOT the configuration the targets are judged on",
            |ok| {
                if ok {
                    "would be met"
                } else {
                    "would NOT be met"
                }
            },
        ),
    };
    println!(
        "targets (issue 15), {} pods, {} local endpoints, {} policies, {} cluster policies: {what}",
        r.pods, r.np.endpoints, r.policies, r.cluster_policies
    );
    let mut parts = vec![("NetworkPolicies", &r.np)];
    if let Some(c) = &r.cnp {
        parts.push(("with ClusterNetworkPolicies", c));
    }
    for (name, p) in parts {
        println!(
            "  [{name}] full compile {:.3?} < {TARGET_COMPILE:?}: {}",
            p.full,
            verdict(p.full < TARGET_COMPILE)
        );
        println!(
            "  [{name}] peak memory {:.1} MiB < {TARGET_PEAK_MIB} MiB: {}",
            p.peak_mib,
            verdict(p.peak_mib < TARGET_PEAK_MIB)
        );
        for d in &p.events {
            println!(
                "  [{name}] {}: median {:.3?} < {TARGET_MEDIAN:?}: {}; p99 {:.3?} < {TARGET_P99:?}: {}",
                d.name,
                d.median,
                verdict(d.median < TARGET_MEDIAN),
                d.p99,
                verdict(d.p99 < TARGET_P99)
            );
        }
    }
}

/// Runs one size in a child process (this binary, `--row`) and reads its
/// results back.
fn child(s: &Shape, pods: usize, local_every: usize) -> Result<Report> {
    let scale = |n: usize| (n * pods / s.pods.max(1)).max(1);
    let args = [
        "bench".to_owned(),
        "compiler".into(),
        format!("--pods={pods}"),
        format!("--namespaces={}", scale(s.namespaces).min(pods)),
        format!("--policies={}", scale(s.policies)),
        format!("--cluster-policies={}", s.cluster_policies),
        format!("--local-every={local_every}"),
        format!("--rounds={}", s.rounds),
        "--row".into(),
    ];
    eprintln!("curve: xtask {}", args.join(" "));
    let me = std::env::current_exe().context("locating xtask itself")?;
    let out = Command::new(me)
        .args(&args)
        .output()
        .context("running a curve point")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "curve point {pods} pods failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("bench-row: "))
        .context("no bench-row line from a curve point")?;
    Report::from_json(&serde_json::from_str(line)?)
}

fn event(p: &Part, name: &str) -> String {
    p.events
        .iter()
        .find(|d| d.name == name)
        .map_or("-".into(), |d| format!("{:.3?} / {:.3?}", d.median, d.p99))
}

/// Prints one configuration's curve, with growth per size step: the
/// factor of the compile time and of the peak over the factor of pods
/// (1.00 is linear, below is better).
fn table(title: &str, rows: &[Report]) {
    println!("{title}");
    println!(
        "| pods | endpoints | full compile | peak MiB (inputs) | keys/endpoint | growth time, memory | pod relabel | wide-peer relabel | policy change | namespace relabel |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut prev: Option<&Report> = None;
    for r in rows {
        let growth = prev.map_or("-".into(), |p| {
            let f = r.pods as f64 / p.pods as f64;
            format!(
                "{:.2}, {:.2}",
                r.np.full.as_secs_f64() / p.np.full.as_secs_f64() / f,
                r.np.peak_mib / p.np.peak_mib / f
            )
        });
        println!(
            "| {} | {} | {:.3?} | {:.0} ({:.0}) | {:.0} | {growth} | {} | {} | {} | {} |",
            r.pods,
            r.np.endpoints,
            r.np.full,
            r.np.peak_mib,
            r.np.inputs_mib,
            r.np.keys_per_endpoint(),
            event(&r.np, "pod relabel"),
            event(&r.np, "pod relabel (wide peer)"),
            event(&r.np, "policy change"),
            event(&r.np, "namespace relabel"),
        );
        prev = Some(r);
    }
    if rows.iter().any(|r| r.cnp.is_some()) {
        println!(
            "| pods | with {} ClusterNetworkPolicies: full compile | peak MiB | keys/endpoint + shared | CNP change | relabel (CNP subject) |",
            rows.first().map_or(0, |r| r.cluster_policies)
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in rows {
            if let Some(c) = &r.cnp {
                println!(
                    "| {} | {:.3?} | {:.0} | {:.0} + {} | {} | {} |",
                    r.pods,
                    c.full,
                    c.peak_mib,
                    c.keys_per_endpoint(),
                    c.shared_keys,
                    event(c, "CNP change"),
                    event(c, "relabel (CNP subject)"),
                );
            }
        }
    }
    println!("(incremental cells: median / p99)");
}

pub(super) fn curve(s: &Shape) -> Result<()> {
    super::util::header("bench compiler --curve", &[]);
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {}", load.trim());
    }
    let mut node = Vec::new();
    let mut all = Vec::new();
    for pods in CURVE {
        node.push(child(s, pods, pods.div_ceil(NODE_PODS))?);
        all.push(child(s, pods, 1)?);
    }
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at end: {}", load.trim());
    }
    table(
        &format!("a node of the cluster ({NODE_PODS} local pods; the targets' configuration):"),
        &node,
    );
    println!();
    table("every pod local (stress):", &all);
    println!();
    for r in node.iter().chain(&all).filter(|r| r.pods == 100_000) {
        targets(r);
    }
    Ok(())
}
