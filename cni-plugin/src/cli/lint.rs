//! `sluice lint -f DIR|FILE [-f ...] [-o text|json|sarif]`: findings on the
//! NetworkPolicies and ClusterNetworkPolicies of manifest files, offline
//! (no agent, no cluster). Reading is `sluice_api::files`, the rules are
//! `sluice_lint`, rendering is [`render`]; this module only glues them.
//!
//! Exit status by the worst finding: 0 none or info only, 1 warnings, 3
//! errors (an error finding, or a document that does not parse); 2 usage (a
//! malformed command line, or a -f path that cannot be read).
use std::path::PathBuf;

use clap::ValueEnum;
use serde_json::{Value, json};
use sluice_api::files::{DocError, Loaded, Origin};
use sluice_lint::{Finding, RULES, Severity};

/// Exit statuses of `lint`.
pub const CLEAN: u8 = 0;
pub const WARNINGS: u8 = 1;
pub const USAGE: u8 = 2;
pub const ERRORS: u8 = 3;

/// The pseudo rule of a document that does not parse.
pub const INVALID_DOCUMENT: &str = "invalid-document";

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct LintArgs {
    /// A manifest file, or a directory read recursively for *.yaml, *.yml
    /// and *.json (multi-document YAML and `kind: List` understood);
    /// repeatable, all linted together.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "DIR|FILE",
        required_unless_present = "live"
    )]
    pub paths: Vec<PathBuf>,
    /// Lint what the node agent sees of the cluster (every object it
    /// watches) instead of files; with -f, both together.
    #[arg(long)]
    pub live: bool,
    #[command(flatten)]
    pub socket: super::args::Socket,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = LintFormat::Text)]
    pub format: LintFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LintFormat {
    Text,
    Json,
    /// SARIF 2.1.0, for code-scanning tools.
    Sarif,
}

/// Reads, lints, prints; the exit status.
pub fn run(args: &LintArgs) -> u8 {
    let mut loaded = match sluice_api::files::load_all(&args.paths) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice: lint: {e}");
            return USAGE;
        }
    };
    if args.live {
        match live_objects(&args.socket.path) {
            Ok(text) => {
                let origin = PathBuf::from(format!("agent:{}", args.socket.path.display()));
                sluice_api::files::load_text(&mut loaded, &origin, &text);
            }
            Err(e) => {
                eprintln!("sluice: lint: {e}");
                return ERRORS;
            }
        }
    }
    let findings = sluice_lint::lint(&loaded.objects);
    let text = render(args.format, &loaded, &findings);
    // A closed stdout changes nothing about the verdict.
    let _printed = super::print(&text).is_ok();
    exit_code(&loaded, &findings)
}

/// The agent's objects (`Request::Objects`), as the JSON text of a List.
fn live_objects(socket: &std::path::Path) -> Result<String, String> {
    let agent = crate::agent::Agent::new(socket, std::time::Duration::from_secs(10));
    match agent
        .call(&sluice_proto::Request::Objects)
        .map_err(|e| super::explain(&e))?
    {
        sluice_proto::Response::Objects { list } => Ok(list.to_string()),
        sluice_proto::Response::Error { msg, details, .. } => {
            Err(format!("the agent: {msg}: {details}"))
        }
        other => Err(format!("unexpected answer to Objects: {other:?}")),
    }
}

/// The exit status for these findings and load errors.
pub fn exit_code(loaded: &Loaded, findings: &[Finding]) -> u8 {
    if !loaded.errors.is_empty() {
        return ERRORS;
    }
    match sluice_lint::worst(findings) {
        Some(Severity::Error) => ERRORS,
        Some(Severity::Warning) => WARNINGS,
        Some(Severity::Info) | None => CLEAN,
    }
}

pub fn render(format: LintFormat, loaded: &Loaded, findings: &[Finding]) -> String {
    match format {
        LintFormat::Text => text(loaded, findings),
        LintFormat::Json => format!("{:#}\n", json_report(loaded, findings)),
        LintFormat::Sarif => format!("{:#}\n", sarif(loaded, findings)),
    }
}

/// `FILE:LINE: ` or `FILE: ` (nothing if unknown).
fn place(origin: Option<&Origin>) -> String {
    match origin {
        Some(Origin {
            file,
            line: Some(l),
            ..
        }) => format!("{}:{l}: ", file.display()),
        Some(o) => format!("{}: ", o.file.display()),
        None => String::new(),
    }
}

/// One finding per paragraph, then a summary line.
fn text(loaded: &Loaded, findings: &[Finding]) -> String {
    let mut out = String::new();
    for e in &loaded.errors {
        out.push_str(&format!(
            "{}error[{INVALID_DOCUMENT}] document {}: {}\n  fix: correct the document (kubectl apply --dry-run=client -f FILE shows the same)\n",
            place(Some(&e.origin)),
            e.origin.document,
            e.message
        ));
    }
    for f in findings {
        out.push_str(&format!(
            "{}{}[{}] {} {}: {}\n  fix: {}\n",
            place(f.origin.as_ref()),
            f.severity,
            f.rule,
            f.object,
            f.path,
            f.message,
            f.fix
        ));
    }
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let objects = object_count(loaded);
    out.push_str(&format!(
        "{} error(s), {} warning(s), {} info; {} file(s), {objects} object(s) read{}\n",
        count(Severity::Error) + loaded.errors.len(),
        count(Severity::Warning),
        count(Severity::Info),
        loaded.files.len(),
        skipped(loaded),
    ));
    out
}

fn object_count(l: &Loaded) -> usize {
    let o = &l.objects;
    o.namespaces.len()
        + o.pods.len()
        + o.network_policies.len()
        + o.cluster_network_policies.len()
        + o.services.len()
        + o.nodes.len()
}

/// ", N of other kinds skipped" or nothing.
fn skipped(l: &Loaded) -> String {
    let n: usize = l.skipped.values().sum();
    if n == 0 {
        String::new()
    } else {
        format!(", {n} of other kinds skipped")
    }
}

fn doc_error_json(e: &DocError) -> Value {
    json!({
        "file": e.origin.file.display().to_string(),
        "document": e.origin.document,
        "line": e.origin.line,
        "message": e.message,
    })
}

/// `{"findings": [..], "errors": [..], "skipped": {..}, "summary": {..}}`.
fn json_report(loaded: &Loaded, findings: &[Finding]) -> Value {
    let items: Vec<Value> = findings
        .iter()
        .map(|f| {
            json!({
                "rule": f.rule,
                "severity": f.severity,
                "object": f.object.to_string(),
                "path": f.path,
                "message": f.message,
                "fix": f.fix,
                "file": f.origin.as_ref().map(|o| o.file.display().to_string()),
                "line": f.origin.as_ref().and_then(|o| o.line),
            })
        })
        .collect();
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    json!({
        "findings": items,
        "errors": loaded.errors.iter().map(doc_error_json).collect::<Vec<_>>(),
        "skipped": loaded.skipped,
        "summary": {
            "error": count(Severity::Error) + loaded.errors.len(),
            "warning": count(Severity::Warning),
            "info": count(Severity::Info),
            "files": loaded.files.len(),
            "objects": object_count(loaded),
        },
    })
}

fn sarif_level(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "note",
    }
}

/// A relative path as is (forward slashes), an absolute one as a file URI.
fn uri(path: &std::path::Path) -> String {
    let s = path.display().to_string().replace('\\', "/");
    if path.is_absolute() {
        format!("file://{s}")
    } else {
        s
    }
}

fn sarif_location(origin: Option<&Origin>, object: &str) -> Value {
    let mut loc = json!({
        "logicalLocations": [{"fullyQualifiedName": object, "kind": "object"}],
    });
    if let Some(o) = origin {
        let mut physical = json!({"artifactLocation": {"uri": uri(&o.file)}});
        if let Some(line) = o.line {
            physical["region"] = json!({"startLine": line});
        }
        loc["physicalLocation"] = physical;
    }
    loc
}

/// A minimal valid SARIF 2.1.0 log: one run, the rules, one result per
/// finding (and per document that does not parse).
fn sarif(loaded: &Loaded, findings: &[Finding]) -> Value {
    let mut rules: Vec<Value> = RULES
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "shortDescription": {"text": r.summary},
                "defaultConfiguration": {"level": sarif_level(r.severity)},
            })
        })
        .collect();
    rules.push(json!({
        "id": INVALID_DOCUMENT,
        "shortDescription": {"text": "a document that does not parse, or does not fit its kind"},
        "defaultConfiguration": {"level": "error"},
    }));
    let index = |id: &str| RULES.iter().position(|r| r.id == id).unwrap_or(RULES.len());
    let mut results: Vec<Value> = loaded
        .errors
        .iter()
        .map(|e| {
            json!({
                "ruleId": INVALID_DOCUMENT,
                "ruleIndex": RULES.len(),
                "level": "error",
                "message": {"text": format!("document {}: {}", e.origin.document, e.message)},
                "locations": [sarif_location(Some(&e.origin), &format!("document {}", e.origin.document))],
            })
        })
        .collect();
    results.extend(findings.iter().map(|f| {
        let object = f.object.to_string();
        json!({
            "ruleId": f.rule,
            "ruleIndex": index(f.rule),
            "level": sarif_level(f.severity),
            "message": {"text": format!("{object} {}: {} Fix: {}", f.path, f.message, f.fix)},
            "locations": [sarif_location(f.origin.as_ref(), &object)],
        })
    }));
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "sluice",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules,
            }},
            "results": results,
        }],
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::Path;

    use super::*;
    use crate::cli::args::{Command, parse};

    fn command(args: &[&str]) -> Result<Command, clap::Error> {
        parse(args.iter().map(OsString::from)).map(|c| c.command)
    }

    #[test]
    fn lint_takes_a_path_and_an_output_format() {
        let want = |path: &str, format| {
            Command::Lint(LintArgs {
                paths: vec![PathBuf::from(path)],
                format,
                live: false,
                socket: crate::cli::args::Socket {
                    path: PathBuf::from(sluice_proto::DEFAULT_SOCKET),
                },
            })
        };
        assert_eq!(
            command(&["lint", "-f", "dir"]).unwrap(),
            want("dir", LintFormat::Text)
        );
        assert_eq!(
            command(&["lint", "--filename=a.yaml", "-o", "sarif"]).unwrap(),
            want("a.yaml", LintFormat::Sarif)
        );
        assert_eq!(
            command(&["lint", "-ojson", "-f", "d"]).unwrap(),
            want("d", LintFormat::Json)
        );
        assert_eq!(command(&["lint"]).unwrap_err().exit_code(), 2);
        let two = command(&["lint", "-f", "a", "-f", "b"]).unwrap();
        let Command::Lint(two) = two else {
            panic!("{two:?}")
        };
        assert_eq!(two.paths, [PathBuf::from("a"), PathBuf::from("b")]);
        let live = command(&["lint", "--live", "--socket", "/s"]).unwrap();
        let Command::Lint(live) = live else {
            panic!("{live:?}")
        };
        assert!(live.live && live.paths.is_empty());
        assert_eq!(live.socket.path, PathBuf::from("/s"));
    }

    #[test]
    fn exit_status_follows_the_worst_severity_and_load_errors() {
        let mut loaded = Loaded::default();
        let finding = |severity| Finding {
            rule: "two-item-peer",
            severity,
            object: sluice_api::files::ObjectRef::new("NetworkPolicy", "a", "b"),
            path: "spec".into(),
            message: "m".into(),
            fix: "f".into(),
            origin: None,
        };
        assert_eq!(exit_code(&loaded, &[]), CLEAN);
        assert_eq!(exit_code(&loaded, &[finding(Severity::Info)]), CLEAN);
        let mixed = [finding(Severity::Info), finding(Severity::Warning)];
        assert_eq!(exit_code(&loaded, &mixed), WARNINGS);
        assert_eq!(
            exit_code(
                &loaded,
                &[finding(Severity::Error), finding(Severity::Warning)]
            ),
            ERRORS
        );
        loaded.errors.push(DocError {
            origin: Origin {
                file: "f.yaml".into(),
                document: 1,
                line: None,
                item: None,
            },
            message: "bad".into(),
        });
        assert_eq!(exit_code(&loaded, &[]), ERRORS);
    }

    #[test]
    fn sarif_uris_are_relative_paths_or_file_uris() {
        assert_eq!(uri(Path::new("deploy/x.yaml")), "deploy/x.yaml");
        assert_eq!(uri(Path::new("/srv/x.yaml")), "file:///srv/x.yaml");
    }
}
