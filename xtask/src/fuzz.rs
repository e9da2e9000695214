//! `cargo xtask fuzz-policy`: the differential check of
//! `tests/tests/differential.rs` (sluice_tests::differential) on new seeds
//! for as long as asked. A divergence is shrunk, printed and saved as a
//! regression case, which the test then replays every run.
//!
//! `--cnp`: the ClusterNetworkPolicy check of `tests/tests/oracle_cnp.rs`
//! instead (random Admin and Baseline policies mixed with NetworkPolicies,
//! the compiler's data-path verdict against the oracle; no kernel), its
//! regressions saved under `regressions/cnp/`.
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use sluice_tests::differential as d;

#[derive(clap::Args)]
pub struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The first seed (default: from the clock); each next seed is one more.
    #[arg(long)]
    seed: Option<u64>,
    /// Changes per seed (each followed by a round of probes).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Probes per round.
    #[arg(long, default_value_t = 40)]
    probes: usize,
    /// ClusterNetworkPolicies with NetworkPolicies, against the compiler.
    #[arg(long)]
    cnp: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.cnp {
        let first = match args.seed {
            Some(s) => s,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64,
        };
        return fuzz_cnp(args, first);
    }
    let ns = sluice_tests::NetNs::new("sl-fuzz-")?;
    let bpffs = sluice_tests::Bpffs::new()?;
    let path = ns.path();
    let first = match args.seed {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    // BPF_PROG_TEST_RUN runs on the loopback of the caller's netns.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            sluice_tests::enter(&path)?;
            fuzz(args, first, &bpffs.dir)
        })
        .join()
        .map_err(|_| anyhow!("fuzzing thread panicked"))?
    })
}

fn fuzz_cnp(args: &Args, first: u64) -> Result<()> {
    let check = Check {
        name: "fuzz-policy --cnp",
        judge: "the compiler",
        dir: d::cnp_regressions_dir(),
    };
    check.run(
        args,
        first,
        |seed| d::cnp::run_seed_compiler(seed, args.rounds, args.probes),
        |case| Ok(d::cnp::shrink_in_compiler(case)),
    )
}

fn fuzz(args: &Args, first: u64, pins: &std::path::Path) -> Result<()> {
    let check = Check {
        name: "fuzz-policy",
        judge: "the pipeline",
        dir: d::regressions_dir(),
    };
    check.run(
        args,
        first,
        |seed| d::run_seed(pins, seed, args.rounds, args.probes),
        |case| d::shrink(pins, case),
    )
}

/// One differential check over new seeds: what it is called, what is
/// judged against the oracle, where its regressions are saved.
struct Check {
    name: &'static str,
    judge: &'static str,
    dir: std::path::PathBuf,
}

impl Check {
    /// Seeds from `first` on until the time is up; the first divergence
    /// is shrunk, printed, saved and reported as an error.
    fn run(
        &self,
        args: &Args,
        first: u64,
        mut run_seed: impl FnMut(u64) -> Result<d::SeedReport>,
        mut shrink: impl FnMut(d::Case) -> Result<d::Case>,
    ) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(args.seconds);
        let (mut seeds, mut probes, mut allowed) = (0u64, 0, 0);
        let mut seed = first;
        while Instant::now() < until {
            let r = run_seed(seed)?;
            seeds += 1;
            probes += r.probes;
            allowed += r.allowed;
            if let Some(case) = r.divergence {
                println!("seed {seed} diverges; shrinking");
                let small = shrink(case)?;
                println!("{}", serde_json::to_string_pretty(&small)?);
                let saved = d::save(&self.dir, seed, &small)?;
                bail!(
                    "seed {seed}: {} and the oracle disagree (case saved as {})",
                    self.judge,
                    saved.display()
                );
            }
            seed = seed.wrapping_add(1);
        }
        println!(
            "{}: seeds {first}..{seed} ({seeds} seeds), {probes} probes ({allowed} allowed), no divergence",
            self.name
        );
        Ok(())
    }
}
