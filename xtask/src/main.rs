//! Sluice's task runner: what cargo alone cannot do (privileged tests, the
//! demo, benches). `scripts/dev` installs the toolchain first and then calls
//! this.
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench_datapath;
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
    /// Benchmarks: `bench datapath`.
    Bench {
        what: String,
        #[arg(trailing_var_arg = true)]
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
            cargo(&a)
        }
        Cmd::Demo => {
            require_root("the demo")?;
            cargo(&["build", "--bins"])?;
            demo::run()
        }
        Cmd::Bench { what, args } => {
            require_root("benchmarks")?;
            match what.as_str() {
                "datapath" => bench_datapath::run(&args),
                other => bail!("unknown benchmark {other:?} (have: datapath)"),
            }
        }
    }
}
