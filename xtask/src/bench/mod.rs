//! `cargo xtask bench <name>`: one subcommand per benchmark, each with its
//! own options (docs/performance.md). `compiler` is pure code; the others
//! need root, and all but `datapath` run the release agent and plugin.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

mod agent;
mod cni;
mod cni_attach;
mod cni_report;
mod compiler;
mod compiler_cnp;
mod compiler_scale;
mod cut;
mod datapath;
mod flood;
mod nodes;
mod propagation;
mod rules;
mod throughput;
mod util;

#[derive(Subcommand)]
pub enum Bench {
    /// The NetworkPolicy compiler on a synthetic cluster (no root, no kernel).
    Compiler(compiler::Args),
    /// Per-packet cost of the TC programs via BPF_PROG_TEST_RUN (root).
    Datapath(datapath::Args),
    /// Two pods on one node: rate, latency and CPU against baselines (root).
    Throughput(throughput::Args),
    /// New connections against allowlists of growing size (root).
    Rules(rules::Args),
    /// CNI ADD and DEL latency as a runtime sees it (root).
    Cni(cni::Args),
    /// From a policy change to its enforcement (root).
    Propagation(propagation::Args),
    /// A denied UDP flood: CPU per dropped packet against nftables and
    /// iptables drop rules (root).
    Flood(flood::Args),
    /// The agent on one node of a large cluster: start to ready, RSS, map
    /// fills, changes through the watch, fail closed (root).
    Agent(agent::Args),
}

pub fn run(bench: &Bench) -> Result<()> {
    match bench {
        Bench::Compiler(args) => compiler::run(args),
        Bench::Datapath(args) => {
            crate::require_root("bench datapath")?;
            datapath::run(args)
        }
        // Kernel benches: real namespaces, agent and plugin (release
        // builds, so latencies mean something), traffic.
        Bench::Throughput(args) => with_release_bins("throughput", || throughput::run(args)),
        Bench::Rules(args) => with_release_bins("rules", || rules::run(args)),
        Bench::Cni(args) => with_release_bins("cni", || cni::run(args)),
        Bench::Propagation(args) => with_release_bins("propagation", || propagation::run(args)),
        Bench::Flood(args) => with_release_bins("flood", || flood::run(args)),
        Bench::Agent(args) => with_release_bins("agent", || agent::run(args)),
    }
}

/// Where the test harness takes the binaries from, and the agents' log
/// level: read by `sluice_tests` from the environment.
const BIN_DIR: &str = "SLUICE_BIN_DIR";
const AGENT_LOG: &str = "SLUICE_AGENT_LOG";

/// Runs `bench` against release builds of the agent and plugin (latencies of
/// a debug build say little) whose agents log at `warn` (their info lines
/// would drown the results), unless SLUICE_BIN_DIR and SLUICE_AGENT_LOG say
/// otherwise. `sluice_tests` reads both from the environment, which this
/// process does not modify (`set_var` is unsound once threads run): when
/// one is missing, the release binaries are built and xtask runs itself
/// again with both set on the child's command.
fn with_release_bins(name: &str, bench: impl FnOnce() -> Result<()>) -> Result<()> {
    crate::require_root(&format!("bench {name}"))?;
    let (bin_dir, agent_log) = (std::env::var_os(BIN_DIR), std::env::var_os(AGENT_LOG));
    if bin_dir.is_some() && agent_log.is_some() {
        return bench();
    }
    let bin_dir = match bin_dir {
        Some(dir) => dir,
        None => {
            crate::cargo(&["build", "--release", "--bins"])?;
            // Where that build put them: cargo passes CARGO_TARGET_DIR on.
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(
                    || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
                    PathBuf::from,
                )
                .join("release")
                .into_os_string()
        }
    };
    let me = std::env::current_exe().context("locating xtask itself")?;
    let status = Command::new(me)
        .args(std::env::args_os().skip(1))
        .env(BIN_DIR, bin_dir)
        .env(
            AGENT_LOG,
            agent_log.as_deref().unwrap_or(OsStr::new("warn")),
        )
        .status()
        .context("running the bench")?;
    if !status.success() {
        bail!("bench {name} failed ({status})");
    }
    Ok(())
}
