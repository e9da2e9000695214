//! The conformance runner on a real node, judged itself: a case whose
//! expected matrix is wrong must fail and say where; a matrix may name any
//! of the cluster's pods in any order; a matrix naming a pod that does not
//! exist is a failure that says so; a case with SCTP steps runs its TCP
//! and UDP steps on a kernel without SCTP and says which it skipped.
use anyhow::{Context as _, Result, ensure};
use sluice_tests::{
    TempDir,
    cases::Family,
    conformance::{self, Options, ProbeTarget},
};

#[test]
fn the_runner_fails_wrong_matrices_and_unknown_pods_and_takes_any_pods_in_any_order() -> Result<()>
{
    // 002: default deny (ingress and egress) in x.
    let upstream = Options::default()
        .case_dirs
        .first()
        .context("the repo's case directories")?
        .join("002-default-deny-all.yaml");
    let text = std::fs::read_to_string(&upstream)?;
    let right = "x/a .   X   X   X   X   X   X   X   X";
    ensure!(text.contains(right), "002 changed: {upstream:?}");
    let (head, _) = text.split_once("      matrix: |").context("002's matrix")?;
    let with_matrix = |m: &str| format!("{head}      matrix: |\n{m}");
    let dir = TempDir::new("sluice-runner-cases-")?;
    let cases = [
        // Claims that x/a still reaches x/b.
        (
            "a-wrong.yaml",
            text.replace(right, "x/a .   .   X   X   X   X   X   X   X"),
        ),
        // Three pods, not in the model's order: right.
        (
            "b-subset.yaml",
            with_matrix(
                "        -   z/a x/b x/a\n        z/a .   X   X\n        x/b X   .   X\n        x/a X   X   .\n",
            ),
        ),
        // A pod the cluster does not have.
        (
            "c-unknown-pod.yaml",
            with_matrix("        -   x/a q/zz\n        x/a .   X\n        q/zz X   .\n"),
        ),
    ];
    for (name, body) in &cases {
        std::fs::write(dir.0.join(name), body)?;
    }
    let outcomes = conformance::run(&Options {
        case_dirs: vec![dir.0.clone()],
        families: vec![Family::Ipv4],
        targets: vec![ProbeTarget::Pod],
        nodes: 1,
        // Single tries that must all connect (an exact count of differing
        // cells follows): room for a loaded 2-core machine.
        probe_timeout: std::time::Duration::from_secs(2),
        ..Options::default()
    })?;
    assert_eq!(
        conformance::summary(&outcomes),
        "1 passed, 2 failed, 0 skipped"
    );
    let of = |file: &str| {
        outcomes
            .iter()
            .find(|o| o.file == file)
            .with_context(|| format!("{file} in {outcomes:?}"))
    };
    let wrong = of("a-wrong.yaml")?;
    assert_eq!(wrong.result, "FAIL");
    for part in [
        "1 cell(s) differ",
        "expected:\n",
        "actual (* = differs):\n",
        "x/a -> x/b: expected ., got X",
    ] {
        assert!(
            wrong.detail.contains(part),
            "{part:?} not in:\n{}",
            wrong.detail
        );
    }
    assert_eq!(
        of("b-subset.yaml")?.result,
        "PASS",
        "{:?}",
        of("b-subset.yaml")?
    );
    let unknown = of("c-unknown-pod.yaml")?;
    assert_eq!(unknown.result, "FAIL");
    assert!(unknown.detail.contains("q/zz"), "{}", unknown.detail);
    Ok(())
}

#[test]
fn a_case_with_sctp_steps_runs_its_tcp_steps_on_a_kernel_without_sctp_and_says_which_were_skipped()
-> Result<()> {
    if conformance::sctp_available() {
        // This kernel probes SCTP itself; nothing is skipped here.
        eprintln!("this kernel has SCTP: the skipping is not exercised");
        return Ok(());
    }
    // 047: only SCTP 81 from namespace y may reach x/a.
    let upstream = Options::default()
        .case_dirs
        .first()
        .context("the repo's case directories")?
        .join("047-sctp-ports.yaml");
    let text = std::fs::read_to_string(&upstream)?;
    let (head, _) = text
        .split_once("  - expect:\n      protocol: SCTP")
        .context("047's SCTP step")?;
    let sctp = "  - expect:\n      protocol: SCTP\n      port: 81\n      matrix: |\n        -   x/a y/a z/a\n        x/a .   .   .\n        y/a .   .   .\n        z/a X   .   .\n";
    let tcp = |y_to_a: &str| {
        format!(
            "  - expect:\n      protocol: TCP\n      port: 81\n      matrix: |\n        -   x/a y/a z/a\n        x/a .   .   .\n        y/a {y_to_a}   .   .\n        z/a X   .   .\n"
        )
    };
    let dir = TempDir::new("sluice-runner-sctp-")?;
    let cases = [
        // SCTP only: nothing to run.
        ("a-sctp-only.yaml", format!("{head}{sctp}")),
        // TCP 81 is blocked for everyone: right.
        ("b-mixed.yaml", format!("{head}{sctp}{}", tcp("X"))),
        // Claims TCP 81 from y/a passes: wrong, and only running it shows.
        ("c-mixed-wrong.yaml", format!("{head}{sctp}{}", tcp("."))),
    ];
    for (name, body) in &cases {
        std::fs::write(dir.0.join(name), body)?;
    }
    let outcomes = conformance::run(&Options {
        case_dirs: vec![dir.0.clone()],
        families: vec![Family::Ipv4],
        targets: vec![ProbeTarget::Pod],
        nodes: 1,
        // Single tries that must all connect (an exact count of differing
        // cells follows): room for a loaded 2-core machine.
        probe_timeout: std::time::Duration::from_secs(2),
        ..Options::default()
    })?;
    assert_eq!(
        conformance::summary(&outcomes),
        "1 passed, 1 failed, 1 skipped",
        "{outcomes:?}"
    );
    let of = |file: &str| {
        outcomes
            .iter()
            .find(|o| o.file == file)
            .with_context(|| format!("{file} in {outcomes:?}"))
    };
    assert_eq!(of("a-sctp-only.yaml")?.result, "SKIP");
    let mixed = of("b-mixed.yaml")?;
    assert_eq!(mixed.result, "PASS", "{mixed:?}");
    assert_eq!(
        mixed.detail,
        "SCTP steps 2 skipped: this kernel has no SCTP"
    );
    let wrong = of("c-mixed-wrong.yaml")?;
    assert_eq!(wrong.result, "FAIL");
    assert!(
        wrong.detail.contains("step 3 (TCP 81)") && wrong.detail.contains("y/a -> x/a"),
        "{}",
        wrong.detail
    );
    Ok(())
}
