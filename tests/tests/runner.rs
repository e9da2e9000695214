//! The conformance runner on a real node, judged itself: a case whose
//! expected matrix is wrong must fail, and say where.
use anyhow::{Context as _, Result, ensure};
use sluice_tests::{
    TempDir,
    cases::Family,
    conformance::{self, Options, ProbeTarget},
};

#[test]
fn a_case_whose_expected_matrix_is_wrong_fails_with_the_differing_cells_marked() -> Result<()> {
    // 002 (default deny in x) claiming that x/a still reaches x/b.
    let upstream = Options::default()
        .case_dirs
        .first()
        .context("the repo's case directories")?
        .join("002-default-deny-all.yaml");
    let text = std::fs::read_to_string(&upstream)?;
    let right = "x/a .   X   X   X   X   X   X   X   X";
    ensure!(text.contains(right), "002 changed: {upstream:?}");
    let dir = TempDir::new("sluice-wrong-case-")?;
    std::fs::write(
        dir.0.join("002-wrong.yaml"),
        text.replace(right, "x/a .   .   X   X   X   X   X   X   X"),
    )?;
    let outcomes = conformance::run(&Options {
        case_dirs: vec![dir.0.clone()],
        families: vec![Family::Ipv4],
        targets: vec![ProbeTarget::Pod],
        nodes: 1,
        ..Options::default()
    })?;
    assert_eq!(
        conformance::summary(&outcomes),
        "0 passed, 1 failed, 0 skipped"
    );
    let detail = &outcomes[0].detail;
    for part in [
        "1 cell(s) differ",
        "expected:\n",
        "actual (* = differs):\n",
        "x/a -> x/b: expected ., got X",
    ] {
        assert!(detail.contains(part), "{part:?} not in:\n{detail}");
    }
    Ok(())
}
