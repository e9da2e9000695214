//! Sluice's task runner: what cargo alone cannot do (privileged tests, the
//! demo, benches). `scripts/dev` installs the toolchain first and then calls
//! this.
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench_cni;
mod bench_compiler;
mod bench_datapath;
mod bench_propagation;
mod bench_rules;
mod bench_throughput;
mod bench_util;
mod demo;

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
        /// ipv4, ipv6 or all.
        #[arg(long, default_value = "all")]
        family: String,
        /// service, pod or all.
        #[arg(long, default_value = "all")]
        target: String,
        /// 1 or 2.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
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
    Bench {
        what: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: it creates network namespaces, veths and bpffs mounts");
    }
    Ok(())
}

fn conformance(
    cases: Vec<std::path::PathBuf>,
    family: &str,
    target: &str,
    nodes: usize,
    filter: Option<String>,
    json: Option<std::path::PathBuf>,
    eventual: bool,
) -> Result<Vec<sluice_tests::conformance::Outcome>> {
    use sluice_tests::{cases::Family, conformance as c};
    let mut opts = c::Options {
        nodes,
        filter,
        json: json.clone(),
        eventual,
        ..c::Options::default()
    };
    if !cases.is_empty() {
        opts.case_dirs = cases;
    }
    opts.families = match family {
        "ipv4" => vec![Family::Ipv4],
        "ipv6" => vec![Family::Ipv6],
        "all" => vec![Family::Ipv4, Family::Ipv6],
        other => bail!("--family {other}: ipv4, ipv6 or all"),
    };
    opts.targets = match target {
        "pod" => vec![c::ProbeTarget::Pod],
        "service" => vec![c::ProbeTarget::Service],
        "all" => vec![c::ProbeTarget::Pod, c::ProbeTarget::Service],
        other => bail!("--target {other}: service, pod or all"),
    };
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
            let unit_and_kernel = cargo(&a);
            if !args.is_empty() {
                return unit_and_kernel;
            }
            // Then the upstream suite on one and on two nodes; its closing
            // line is the last thing printed.
            let mut all = Vec::new();
            for nodes in [1, 2] {
                all.extend(conformance(
                    Vec::new(),
                    "all",
                    "all",
                    nodes,
                    None,
                    None,
                    false,
                )?);
            }
            println!("conformance: {}", sluice_tests::conformance::summary(&all));
            unit_and_kernel?;
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
            filter,
            json,
            eventual,
        } => {
            require_root("the conformance suite")?;
            cargo(&["build", "--bins"])?;
            let outcomes = conformance(cases, &family, &target, nodes, filter, json, eventual)?;
            if outcomes.iter().any(|o| o.result == "FAIL") {
                bail!("conformance failures");
            }
            Ok(())
        }
        Cmd::Bench { what, args } => match what.as_str() {
            // Pure code: no root, no kernel.
            "compiler" => bench_compiler::run(&args),
            "datapath" => {
                require_root("bench datapath")?;
                bench_datapath::run(&args)
            }
            // Kernel benches: real namespaces, agent and plugin (release
            // builds, so latencies mean something), traffic.
            "throughput" | "rules" | "cni" | "propagation" => {
                require_root(&format!("bench {what}"))?;
                bench_util::release_bins()?;
                match what.as_str() {
                    "throughput" => bench_throughput::run(&args),
                    "rules" => bench_rules::run(&args),
                    "cni" => bench_cni::run(&args),
                    _ => bench_propagation::run(&args),
                }
            }
            other => bail!(
                "unknown benchmark {other:?} (have: compiler, datapath, throughput, rules, cni, propagation)"
            ),
        },
    }
}
