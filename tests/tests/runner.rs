//! The conformance runner on a real node, judged itself: a case whose
//! expected matrix is wrong must fail and say where; a matrix may name any
//! of the cluster's pods in any order; a matrix naming a pod that does not
//! exist is a failure that says so.
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
