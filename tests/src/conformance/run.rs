//! Running cases: one cluster per model the selected cases use, each case
//! in each selected variant (family, target), and a verdict per case or,
//! for a case with `subtest` steps, per subtest (docs/conformance.md).
use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{Cluster, Options, ProbeTarget};
use crate::cases::{self, Case, Family, Model, Protocol, Step, Target};

/// One case (or one subtest of it) in one variant.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub case: String,
    /// The subtest, for a case that has `subtest` steps.
    pub subtest: Option<String>,
    pub file: String,
    pub family: String,
    pub target: String,
    pub nodes: usize,
    /// PASS, FAIL or SKIP (every expectation needs a protocol this kernel
    /// lacks); `detail` says which steps were skipped.
    pub result: &'static str,
    pub detail: String,
    pub seconds: f64,
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

/// A part of a case: the steps before the first `subtest` (unnamed), or
/// one subtest's steps. Indices are into `case.steps`.
struct Part {
    name: Option<String>,
    steps: Vec<usize>,
}

fn parts(case: &Case) -> Vec<Part> {
    let mut out = vec![Part {
        name: None,
        steps: Vec::new(),
    }];
    for (i, s) in case.steps.iter().enumerate() {
        match s {
            Step::Subtest(n) => out.push(Part {
                name: Some(n.clone()),
                steps: Vec::new(),
            }),
            _ => {
                if let Some(p) = out.last_mut() {
                    p.steps.push(i);
                }
            }
        }
    }
    out
}

/// What one part came to.
struct Verdict {
    subtest: Option<String>,
    result: &'static str,
    detail: String,
}

/// The probes of a step a kernel without SCTP cannot make, and how many
/// probes the step has.
fn sctp_counts(step: &Step) -> (usize, usize) {
    match step {
        Step::Expect(e) => (usize::from(e.protocol == Protocol::Sctp), 1),
        Step::Probe(ps) => (
            ps.iter().filter(|p| p.protocol == Protocol::Sctp).count(),
            ps.len(),
        ),
        _ => (0, 0),
    }
}

/// Runs one expectation step; `Some(detail)` when it fails. Without SCTP
/// here, SCTP expectations are skipped (`skip_sctp`).
fn judge(
    c: &Cluster,
    step: &Step,
    number: usize,
    family: Family,
    target: ProbeTarget,
    opts: &Options,
    skip_sctp: bool,
) -> Result<Option<String>> {
    let deadline = Instant::now()
        + if opts.eventual {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
    loop {
        let failure = match step {
            Step::Expect(e) if skip_sctp && e.protocol == Protocol::Sctp => None,
            Step::Expect(e) => {
                // The pods the case names, in its order (a case may list
                // them in any order, or only some).
                let actual = c.probe(
                    &e.matrix.pods,
                    family,
                    target,
                    e.protocol,
                    e.port,
                    opts.probe_timeout,
                )?;
                cases::diff(&e.matrix, &actual)
                    .map(|d| format!("step {number} ({} {}):\n{d}", e.protocol.name(), e.port))
            }
            Step::Probe(ps) => {
                let run: Vec<&cases::Probe> = ps
                    .iter()
                    .filter(|p| !(skip_sctp && p.protocol == Protocol::Sctp))
                    .collect();
                let pairs: Vec<super::Pair> = run
                    .iter()
                    .map(|p| (p.from.clone(), p.to.clone(), p.protocol, p.port))
                    .collect();
                let got = c.probe_pairs(&pairs, family, target, opts.probe_timeout)?;
                let wrong: Vec<String> = run
                    .iter()
                    .zip(got)
                    .filter(|(p, ok)| p.connects != *ok)
                    .map(|(p, ok)| format!("  {}\n", p.describe(ok)))
                    .collect();
                (!wrong.is_empty()).then(|| {
                    format!(
                        "step {number}: {} of {} probe(s) differ ('.' connects, 'X' blocked)\n{}",
                        wrong.len(),
                        run.len(),
                        wrong.concat()
                    )
                })
            }
            _ => None,
        };
        match failure {
            Some(_) if Instant::now() < deadline => continue,
            f => return Ok(f),
        }
    }
}

/// Runs one case in one variant against the cluster: a verdict for the
/// whole case, or, when it has subtests, one per subtest. A subtest that
/// fails does not stop the next (its `apply` and `delete` steps still run,
/// as upstream's changes persist across its subtests); an error (an object
/// the API refuses, an agent that never reports it programmed) fails the
/// part it happens in and every part after it.
fn run_case(
    c: &mut Cluster,
    case: &Case,
    family: Family,
    target: ProbeTarget,
    opts: &Options,
) -> Vec<Verdict> {
    let all = parts(case);
    let has_subtests = all.len() > 1;
    let mut out = Vec::new();
    let mut error: Option<String> = match c.reset() {
        Ok(()) => None,
        Err(e) => Some(format!("error: {e:#}")),
    };
    for part in all {
        let (mut sctp, mut probes) = (0, 0);
        // Steps with SCTP probes, as the note names them.
        let mut sctp_steps = Vec::new();
        for &i in &part.steps {
            let (s, n) = sctp_counts(&case.steps[i]);
            sctp += s;
            probes += n;
            match (s, &case.steps[i]) {
                (0, _) => {}
                (_, Step::Probe(_)) if s < n => {
                    sctp_steps.push(format!("{} (its SCTP probes)", i + 1));
                }
                _ => sctp_steps.push((i + 1).to_string()),
            }
        }
        // The unnamed part of a case with subtests only sets up: it is
        // reported only when it judges something.
        let reported = !has_subtests || part.name.is_some() || probes > 0;
        let skip_sctp = !c.sctp && sctp > 0;
        let note = if skip_sctp {
            format!(
                "SCTP steps {} skipped: this kernel has no SCTP",
                sctp_steps.join(", ")
            )
        } else {
            String::new()
        };
        let mut verdict = if skip_sctp && sctp == probes {
            ("SKIP", "this kernel has no SCTP".to_owned())
        } else {
            ("PASS", note.clone())
        };
        if let Some(e) = &error {
            verdict = ("FAIL", e.clone());
        } else {
            for &i in &part.steps {
                let step = &case.steps[i];
                let r = match step {
                    Step::Apply(text) => c
                        .apply_text(text, family)
                        .and_then(|keys| c.wait(&keys))
                        .map(|()| None),
                    Step::Delete(text) => cases::parse_refs(text)
                        .and_then(|refs| {
                            refs.iter()
                                .map(|k| c.delete_object(k))
                                .collect::<Result<Vec<_>>>()
                        })
                        .and_then(|keys| c.wait(&keys))
                        .map(|()| None),
                    // After a failure in this part, only its changes run.
                    Step::Expect(_) | Step::Probe(_) if verdict.0 == "FAIL" => Ok(None),
                    _ => judge(c, step, i + 1, family, target, opts, skip_sctp),
                };
                match r {
                    Ok(None) => {}
                    Ok(Some(detail)) => {
                        let detail = if note.is_empty() {
                            detail
                        } else {
                            format!("{note}\n{detail}")
                        };
                        verdict = ("FAIL", detail);
                    }
                    Err(e) => {
                        let e = format!("error: {e:#}");
                        verdict = ("FAIL", e.clone());
                        error = Some(format!("not run after an earlier {e}"));
                        break;
                    }
                }
            }
        }
        if reported {
            out.push(Verdict {
                subtest: part.name,
                result: verdict.0,
                detail: verdict.1,
            });
        } else if verdict.0 == "FAIL" && error.is_none() {
            error = Some(verdict.1);
        }
    }
    out
}

/// Runs every selected case and variant, one cluster per model in turn;
/// prints a line per case (or subtest) and variant; returns the outcomes.
/// The closing `N passed, N failed, N skipped` line is [`summary`]'s.
pub fn run(opts: &Options) -> Result<Vec<Outcome>> {
    let mut all = Vec::new();
    for dir in &opts.case_dirs {
        all.extend(
            cases::load_dir(dir)
                .with_context(|| format!("loading cases from {}", dir.display()))?,
        );
    }
    if let Some(f) = &opts.filter {
        all.retain(|(path, case)| {
            case.name.contains(f.as_str()) || path.to_string_lossy().contains(f.as_str())
        });
    }
    let mut by_model: BTreeMap<Model, Vec<(PathBuf, Case)>> = BTreeMap::new();
    for (p, c) in all {
        by_model.entry(c.model).or_default().push((p, c));
    }
    let mut outcomes = Vec::new();
    for (model, cases) in &by_model {
        let text = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("conformance")
                .join(model.file_name()),
        )?;
        let started = Instant::now();
        let mut cluster =
            Cluster::start_topology(opts.nodes, opts.topology, &text, model.has_services())
                .with_context(|| format!("starting the {model:?} model"))?;
        eprintln!(
            "cluster of {} node(s) ({:?}), {:?} model, up in {:.1}s",
            opts.nodes,
            opts.topology,
            model,
            started.elapsed().as_secs_f64()
        );
        for (path, case) in cases {
            run_variants(&mut cluster, path, case, opts, &mut outcomes);
        }
    }
    Ok(outcomes)
}

fn run_variants(
    cluster: &mut Cluster,
    path: &std::path::Path,
    case: &Case,
    opts: &Options,
    outcomes: &mut Vec<Outcome>,
) {
    for &family in &opts.families {
        if !case.family.families().contains(&family) {
            continue;
        }
        for &target in &opts.targets {
            let wanted = match case.target {
                Target::Any => true,
                Target::Pod => target == ProbeTarget::Pod,
                Target::Service => target == ProbeTarget::Service,
            };
            if !wanted {
                continue;
            }
            let t0 = Instant::now();
            let verdicts = run_case(cluster, case, family, target, opts);
            let seconds = t0.elapsed().as_secs_f64() / verdicts.len().max(1) as f64;
            let tname = if target == ProbeTarget::Pod {
                "pod"
            } else {
                "service"
            };
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            for v in verdicts {
                let mut line = format!(
                    "{} {file} [{} {tname} {}node] {}",
                    v.result,
                    family_name(family),
                    opts.nodes,
                    case.name
                );
                if let Some(s) = &v.subtest {
                    line.push_str(&format!(" / {s}"));
                }
                if v.result == "PASS" && !v.detail.is_empty() {
                    // A pass with a note (steps skipped): one line.
                    line.push_str(&format!(" ({})", v.detail));
                } else if !v.detail.is_empty() {
                    line.push('\n');
                    line.push_str(&v.detail);
                }
                println!("{line}");
                outcomes.push(Outcome {
                    case: case.name.clone(),
                    subtest: v.subtest,
                    file: file.clone(),
                    family: family_name(family).into(),
                    target: tname.into(),
                    nodes: opts.nodes,
                    result: v.result,
                    detail: v.detail,
                    seconds,
                });
            }
        }
    }
}

/// The closing line.
pub fn summary(outcomes: &[Outcome]) -> String {
    let n = |r: &str| outcomes.iter().filter(|o| o.result == r).count();
    format!(
        "{} passed, {} failed, {} skipped",
        n("PASS"),
        n("FAIL"),
        n("SKIP")
    )
}
