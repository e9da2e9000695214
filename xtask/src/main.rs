//! Sluice's task runner: what cargo alone cannot do (privileged tests, the
//! demo, benches). `scripts/dev` installs the toolchain first and then calls
//! this.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_tests::{cases::Family, conformance as c};

mod bench;
mod demo;
mod fuzz;
mod image;

#[derive(Parser)]
#[command(about = "Sluice tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build everything (the eBPF object is built by agent/build.rs). The
    /// default members only: the eBPF crate cannot build for the host, so
    /// nothing here passes --workspace.
    Build,
    /// Unit tests, then the privileged kernel tests (root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Two pods wired by the plugin, a policy written to the maps, drops shown.
    Demo,
    /// The reachability cases against a cluster on this machine.
    Conformance {
        /// A directory of cases (repeatable); default: the repo's upstream cases.
        #[arg(long = "cases")]
        cases: Vec<std::path::PathBuf>,
        /// The address families to run the cases in.
        #[arg(long, value_enum, default_value_t = FamilyArg::All)]
        family: FamilyArg,
        /// Probe pods directly, through Services, or both.
        #[arg(long, value_enum, default_value_t = TargetArg::All)]
        target: TargetArg,
        /// 1 or 2.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// How two nodes are joined: link (one L2 segment) or routed (two
        /// subnets behind a router; the agents tunnel with VXLAN).
        #[arg(long, value_enum, default_value_t = TopologyArg::Link)]
        topology: TopologyArg,
        /// Only cases whose name or file contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Write the outcomes as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Retry a mismatching matrix for up to 10 s, as upstream does.
        #[arg(long)]
        eventual: bool,
    },
    /// Benchmarks: compiler, datapath, throughput, rules, cni, propagation
    /// (docs/performance.md).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// The NetworkPolicy oracle against the whole pipeline on new random
    /// seeds (root; docs/design.md, "The oracle").
    FuzzPolicy(fuzz::Args),
    /// The OCI image the DaemonSet runs (static release binaries, no
    /// registry, no Docker daemon); prints its digest.
    Image(image::Args),
}

/// The address families of the conformance cases.
#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    Ipv4,
    Ipv6,
    All,
}

impl FamilyArg {
    fn families(self) -> Vec<Family> {
        match self {
            FamilyArg::Ipv4 => vec![Family::Ipv4],
            FamilyArg::Ipv6 => vec![Family::Ipv6],
            FamilyArg::All => vec![Family::Ipv4, Family::Ipv6],
        }
    }
}

/// What the conformance probes connect to.
#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    Pod,
    Service,
    All,
}

impl TargetArg {
    fn targets(self) -> Vec<c::ProbeTarget> {
        match self {
            TargetArg::Pod => vec![c::ProbeTarget::Pod],
            TargetArg::Service => vec![c::ProbeTarget::Service],
            TargetArg::All => vec![c::ProbeTarget::Pod, c::ProbeTarget::Service],
        }
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

/// `cargo test`, its output passed through as it comes; returns the lines
/// that say which tests failed and why, so that they can be repeated where
/// a CI log's tail shows them, after the long conformance output.
fn cargo_test(args: &[&str]) -> Result<Vec<String>> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let mut failures = Vec::new();
    let mut after_panic = false;
    let mut after_header = false;
    if let Some(out) = child.stdout.take() {
        // Bytes, not `lines()`: output that is not UTF-8 passes through
        // as it is instead of ending the read.
        for raw in BufReader::new(out).split(b'\n') {
            let raw = raw.context("reading cargo test's output")?;
            let line = String::from_utf8_lossy(&raw).into_owned();
            println!("{line}");
            // A failed test's name, the first line of its output (a
            // returned error) and each panic with its message.
            let header = line.starts_with("---- ") && line.ends_with(" stdout ----");
            let panic = line.contains("panicked at");
            let failed = line.starts_with("test ") && line.ends_with("FAILED");
            if after_header || after_panic || header || panic || failed {
                failures.push(line);
            }
            after_header = header;
            after_panic = panic;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && failures.is_empty() {
        failures.push(format!("cargo {} failed ({status})", args.join(" ")));
    }
    Ok(failures)
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: it creates network namespaces, veths and bpffs mounts");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TopologyArg {
    Link,
    Routed,
}

#[expect(clippy::too_many_arguments, reason = "one per command-line option")]
fn conformance(
    cases: Vec<std::path::PathBuf>,
    family: FamilyArg,
    target: TargetArg,
    nodes: usize,
    topology: TopologyArg,
    filter: Option<String>,
    json: Option<std::path::PathBuf>,
    eventual: bool,
) -> Result<Vec<sluice_tests::conformance::Outcome>> {
    let mut opts = c::Options {
        nodes,
        topology: match topology {
            TopologyArg::Link => c::Topology::Link,
            TopologyArg::Routed => c::Topology::Routed,
        },
        filter,
        json: json.clone(),
        eventual,
        ..c::Options::default()
    };
    if !cases.is_empty() {
        opts.case_dirs = cases;
    }
    opts.families = family.families();
    opts.targets = target.targets();
    let outcomes = c::run(&opts)?;
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&outcomes)?)?;
    }
    println!("{}", c::summary(&outcomes));
    Ok(outcomes)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build => cargo(&["build", "--bins"]),
        Cmd::Test { args } => {
            require_root("the test suite")?;
            cargo(&["build", "--bins"])?;
            let mut a = vec!["test", "--no-fail-fast"];
            if !args.is_empty() {
                a.push("--");
                a.extend(args.iter().map(String::as_str));
            }
            let failed = cargo_test(&a)?;
            if !args.is_empty() {
                if !failed.is_empty() {
                    bail!("cargo test --no-fail-fast failed");
                }
                return Ok(());
            }
            // Then the upstream suite on one and on two nodes; its closing
            // line is the last thing printed.
            let mut all = Vec::new();
            for nodes in [1, 2] {
                all.extend(conformance(
                    Vec::new(),
                    FamilyArg::All,
                    TargetArg::All,
                    nodes,
                    TopologyArg::Link,
                    None,
                    None,
                    false,
                )?);
            }
            if !failed.is_empty() {
                println!("cargo test failures (repeated from above):");
                for line in &failed {
                    println!("  {line}");
                }
            }
            println!("conformance: {}", sluice_tests::conformance::summary(&all));
            if !failed.is_empty() {
                bail!("cargo test --no-fail-fast failed");
            }
            if all.iter().any(|o| o.result == "FAIL") {
                bail!("conformance failures");
            }
            Ok(())
        }
        Cmd::Demo => {
            require_root("the demo")?;
            cargo(&["build", "--bins"])?;
            demo::run()
        }
        Cmd::Conformance {
            cases,
            family,
            target,
            nodes,
            topology,
            filter,
            json,
            eventual,
        } => {
            require_root("the conformance suite")?;
            cargo(&["build", "--bins"])?;
            let outcomes = conformance(
                cases, family, target, nodes, topology, filter, json, eventual,
            )?;
            if outcomes.iter().any(|o| o.result == "FAIL") {
                bail!("conformance failures");
            }
            Ok(())
        }
        Cmd::Bench(b) => bench::run(&b),
        Cmd::Image(args) => image::run(&args),
        Cmd::FuzzPolicy(args) => {
            require_root("fuzz-policy")?;
            fuzz::run(&args)
        }
    }
}
