//! The oracle (written from the networking.k8s.io/v1 API text) against the
//! whole pipeline: the agent's compiler, the agent's map writer and the
//! real `from_pod`/`to_pod` programs through BPF_PROG_TEST_RUN. Random
//! worlds and probes from a fixed seed set, random changes applied one
//! event at a time, and the saved regression cases
//! (`tests/conformance/regressions/*.json`). Run as root: `cargo test -p
//! sluice-tests --test differential`; longer: `cargo xtask fuzz-policy`.
use std::path::Path;

use sluice_tests::{
    Bpffs, NetNs,
    differential::{self as d, Case},
};

/// Runs `f` on a thread inside a fresh netns, with a fresh bpffs.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper outside #[test] fns: a panic is the failure report"
)]
fn in_sandbox<T: Send>(f: impl FnOnce(&Path) -> T + Send) -> T {
    let ns = NetNs::new("sl-diff-").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(|| {
            sluice_tests::enter(&path).unwrap();
            f(&bpffs.dir)
        })
        .join()
        .unwrap()
    })
}

/// Seeds, rounds (the first on the initial world, each later one after a
/// change) and probes per round: about 6,000 probes.
const SEEDS: std::ops::Range<u64> = 1..16;
const ROUNDS: usize = 10;
const PER_ROUND: usize = 40;

/// Runs every seed of SEEDS through `run_seed` in a sandbox; a divergence
/// is shrunk, saved and reported. Both verdicts must be common, or the
/// comparison says little.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper outside #[test] fns: a panic is the failure report"
)]
fn every_seed(run_seed: fn(&Path, u64, usize, usize) -> anyhow::Result<d::SeedReport>) {
    let report = in_sandbox(|pins| {
        let (mut probes, mut allowed) = (0, 0);
        for seed in SEEDS {
            let r = run_seed(pins, seed, ROUNDS, PER_ROUND).unwrap();
            probes += r.probes;
            allowed += r.allowed;
            if let Some(case) = r.divergence {
                let small = d::shrink(pins, case).unwrap();
                let path = d::save(&std::env::temp_dir(), seed, &small).unwrap();
                panic!(
                    "seed {seed} diverges; smallest case (saved as {}; move it to {} to keep it):\n{}",
                    path.display(),
                    d::regressions_dir().display(),
                    serde_json::to_string_pretty(&small).unwrap()
                );
            }
        }
        (probes, allowed)
    });
    eprintln!("{} probes, {} allowed", report.0, report.1);
    assert!(report.0 >= 5000, "{report:?}");
    assert!(
        report.1 * 10 > report.0 && report.1 * 10 < report.0 * 9,
        "{report:?}"
    );
}

#[test]
fn the_pipeline_gives_the_oracles_verdict_on_random_policies_and_changes() {
    every_seed(d::run_seed);
}

#[test]
fn the_pipeline_gives_the_oracles_verdict_on_random_cluster_network_policies() {
    // As above with random Admin and Baseline ClusterNetworkPolicies and a
    // labelled Node in every world (tests/src/differential/cnp.rs); the
    // kernel folds the tiers.
    every_seed(d::cnp::run_seed_pipeline);
}

#[test]
fn saved_regression_cases_still_give_the_oracles_verdict() {
    let cases = d::regressions(&d::regressions_dir()).unwrap();
    assert!(!cases.is_empty(), "no regression cases found");
    let failures = in_sandbox(|pins| {
        let mut n = 0;
        let mut failures = Vec::new();
        for (path, case) in &cases {
            let Case { known_issue, .. } = case;
            match (d::replay(pins, &mut n, case), known_issue) {
                (Ok(()), None) => {}
                (Ok(()), Some(issue)) => eprintln!(
                    "{}: known issue {issue:?} no longer diverges; drop its known_issue",
                    path.display()
                ),
                (Err(e), Some(issue)) => {
                    eprintln!("{}: known issue {issue:?}: {e}", path.display());
                }
                (Err(e), None) => failures.push(format!("{}: {e}", path.display())),
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{failures:#?}");
}
