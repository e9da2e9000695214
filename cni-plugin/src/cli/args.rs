//! The command line of `sluice status|wait|observe|explain|lint|assert|completions` (clap derive; one
//! `Args` struct per subcommand), parsed without I/O.
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ErrorKind};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use sluice_proto::{ObserveFilter, Replay};

/// After the generated option list of `sluice --help`.
const AFTER_HELP: &str = "\
As a CNI plugin, sluice is run with CNI_COMMAND set (ADD, DEL, CHECK, VERSION,
STATUS, GC). Without it, it talks to the node agent, or (lint) reads files
(exit 2 on a malformed command line).";

#[derive(Clone, Debug, PartialEq, Eq, Parser)]
#[command(name = "sluice", about = "Sluice's CNI plugin, and a client of its node agent", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Is the agent ready, how it runs (standalone or cluster), has it
    /// synced the cluster, and which objects are programmed (KIND
    /// NAMESPACE/NAME RESOURCEVERSION); exit 0 if ready, 1 if it answers
    /// but is not ready (cluster mode: not synced), 3 if it does not answer.
    Status(StatusArgs),
    /// Until every object named is programmed at resourceVersion RV or later
    /// (any version without @RV), or is gone (--gone, once the agent has
    /// synced); exit 1 on timeout.
    Wait(WaitArgs),
    /// Stream the drops the agent sees, filtered, until interrupted.
    Observe(ObserveArgs),
    /// Why FROM may or may not reach TO on PORT/PROTO: per direction the
    /// ClusterNetworkPolicy rules (Admin, Baseline) and NetworkPolicies
    /// that select each end, the rule that decides, and why the others do
    /// not match. Asks the agent, or with -f compiles YAML files offline;
    /// --matrix -f prints the reachability matrix of every pod pair.
    Explain(super::explain::ExplainArgs),
    /// Check the NetworkPolicies and ClusterNetworkPolicies of manifest
    /// files for likely mistakes (offline); exit 0 clean or info only, 1
    /// warnings, 3 errors or unparsable documents.
    Lint(super::lint::LintArgs),
    /// Run the connectivity assertions of a YAML file (docs/assert.md):
    /// each probe from inside its source pod's network namespace, by the
    /// agent of the pod's node (repeat --socket for every node's agent);
    /// TAP version 13 or JSON; exit 0 all held, 1 any failed, 2 usage or a
    /// bad file.
    Assert(super::assert::AssertArgs),
    /// Print the shell completion script for SHELL on stdout, e.g.
    /// `sluice completions bash > /etc/bash_completion.d/sluice`.
    Completions(CompletionsArgs),
}

/// The agent's socket; every subcommand takes it.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Socket {
    /// The node agent's socket.
    #[arg(long = "socket", value_name = "PATH", default_value = sluice_proto::DEFAULT_SOCKET, value_parser = non_empty_path)]
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// The completion script of `sluice` for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "sluice", &mut out);
    out
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: Socket,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct WaitArgs {
    /// KIND/NAMESPACE/NAME[@RV] or, cluster-scoped, KIND/NAME[@RV]; kinds
    /// case-insensitive, `po`, `ns`, `netpol` understood.
    #[arg(required = true, value_name = "KIND/[NAMESPACE/]NAME[@RV]", value_parser = parse_target)]
    pub targets: Vec<Target>,
    /// Wait until the objects are gone instead (takes no @RV).
    #[arg(long)]
    pub gone: bool,
    /// How long to wait: units ms, s, m, h; a bare number is seconds.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub socket: Socket,
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct ObserveArgs {
    /// Only drops to or from pods in this namespace.
    #[arg(short = 'n', long, value_name = "NS", value_parser = non_empty)]
    pub namespace: Option<String>,
    /// Only drops to or from this pod.
    #[arg(long, value_name = "NAME|NS/NAME", value_parser = parse_pod)]
    pub pod: Option<String>,
    /// Which records: dropped (the default), forwarded (allowed new
    /// flows, one per flow), would-drop (flows an audit-mode policy would
    /// drop), or all. Forwarded flows are reported by the data path only
    /// while someone observes them.
    #[arg(long, value_name = "forwarded|dropped|would-drop|all", value_parser = parse_verdict)]
    pub verdict: Option<String>,
    /// First replay the kept records (the agent keeps the last 10,000) of
    /// this long ago until now: units ms, s, m, h.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// First replay the last N kept records that pass the filters (with
    /// --since: the last N of those).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Only this direction, as the pod sees it.
    #[arg(long, value_enum, ignore_case = true)]
    pub direction: Option<Direction>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Exit (0) when the agent closes the stream instead of reconnecting.
    #[arg(long)]
    pub no_reconnect: bool,
    #[command(flatten)]
    pub socket: Socket,
}

impl ObserveArgs {
    /// What the agent is asked to stream.
    pub fn filter(&self) -> ObserveFilter {
        ObserveFilter {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            verdict: self.verdict.clone(),
            direction: self.direction.map(|d| d.as_str().to_owned()),
        }
    }

    /// The past records asked for.
    pub fn replay(&self) -> Replay {
        Replay {
            since_ms: self
                .since
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            last: self.last,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// As the agent's filter spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Default of `wait --timeout`.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// One object `wait` waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As the agent keys `Programmed`: `Kind/namespace/name` or `Kind/name`
    /// (the kind spelled as the agent spells it when it is a known one).
    pub key: String,
    /// Programmed at this resourceVersion or later; `None`: any.
    pub min_rv: Option<u64>,
}

/// Why a value is not one: clap prints it after the option's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments after the program name. A `clap::Error` is the
/// usage (exit 2) or, for `--help`, the help (exit 0): `Error::exit_code`,
/// `Error::print`. Every usage error names the subcommand's usage.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
    let args: Vec<OsString> = args.into_iter().collect();
    let verb = args
        .first()
        .and_then(|a| a.to_str())
        .unwrap_or_default()
        .to_owned();
    let cli = Cli::try_parse_from(std::iter::once(OsString::from("sluice")).chain(args))
        .map_err(|e| with_usage(e, &verb))?;
    if let Command::Explain(a) = &cli.command
        && let Err(why) = a.check()
    {
        return Err(subcommand_error(
            "explain",
            ErrorKind::MissingRequiredArgument,
            why,
        ));
    }
    if let Command::Wait(w) = &cli.command
        && w.gone
        && w.targets.iter().any(|t| t.min_rv.is_some())
    {
        return Err(subcommand_error(
            "wait",
            ErrorKind::ArgumentConflict,
            "--gone takes no @RV",
        ));
    }
    Ok(cli)
}

/// Clap leaves the usage out of some errors (a value its parser refused);
/// those get the usage of `verb` (the subcommand, if it is one).
fn with_usage(e: clap::Error, verb: &str) -> clap::Error {
    // The help printed for a missing subcommand is its own usage.
    if !e.use_stderr()
        || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        || e.get(ContextKind::Usage).is_some()
    {
        return e;
    }
    let text = e.render().to_string();
    let (msg, _tip) = text
        .split_once("\n\nFor more information")
        .unwrap_or((&text, ""));
    subcommand_error(verb, e.kind(), msg.trim_start_matches("error: ").trim_end())
}

/// A usage error of `sluice <verb>`, with that subcommand's usage line (the
/// top level's if `verb` is none).
fn subcommand_error(verb: &str, kind: ErrorKind, msg: &str) -> clap::Error {
    let mut cmd = Cli::command();
    // Gives the subcommands their full name, `sluice wait`, for the usage.
    cmd.build();
    match cmd.find_subcommand_mut(verb) {
        Some(sub) => sub.error(kind, msg),
        None => cmd.error(kind, msg),
    }
}

fn non_empty(v: &str) -> Result<String, UsageError> {
    if v.is_empty() {
        Err(usage("must not be empty"))
    } else {
        Ok(v.to_owned())
    }
}

fn non_empty_path(v: &str) -> Result<PathBuf, UsageError> {
    non_empty(v).map(PathBuf::from)
}

fn parse_verdict(v: &str) -> Result<String, UsageError> {
    ["forwarded", "dropped", "would-drop", "all"]
        .into_iter()
        .find(|k| v.eq_ignore_ascii_case(k))
        .map(str::to_owned)
        .ok_or_else(|| usage("a verdict is forwarded, dropped, would-drop or all"))
}

fn parse_pod(v: &str) -> Result<String, UsageError> {
    let ok = match v.split_once('/') {
        Some((ns, name)) => !ns.is_empty() && !name.is_empty() && !name.contains('/'),
        None => !v.is_empty(),
    };
    if ok {
        Ok(v.to_string())
    } else {
        Err(usage("expected NAME or NAMESPACE/NAME"))
    }
}

/// `30s`, `500ms`, `2m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(v: &str) -> Result<Duration, UsageError> {
    let bad = || usage("not a duration like 30s or 500ms");
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(ms_per_unit)
            .map(Duration::from_millis)
            .ok_or_else(bad);
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    // Whole nanoseconds, so that 1.5s is exactly 1500ms.
    let ns = (n * ms_per_unit as f64 * 1e6).round();
    if !(0.0..=u64::MAX as f64).contains(&ns) {
        return Err(bad());
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// Kinds the agent reports, with the spellings kubectl users type.
const KINDS: &[(&str, &[&str])] = &[
    ("Pod", &["pod", "pods", "po"]),
    ("Namespace", &["namespace", "namespaces", "ns"]),
    (
        "NetworkPolicy",
        &["networkpolicy", "networkpolicies", "netpol"],
    ),
    ("Node", &["node", "nodes", "no"]),
    (
        "ClusterNetworkPolicy",
        &["clusternetworkpolicy", "clusternetworkpolicies", "cnp"],
    ),
];

/// `KIND/NAMESPACE/NAME[@RV]` or, cluster-scoped, `KIND/NAME[@RV]`.
pub fn parse_target(v: &str) -> Result<Target, UsageError> {
    let bad = |why: &str| {
        usage(format!(
            "{why} (expected KIND/NAMESPACE/NAME[@RV] or KIND/NAME[@RV])"
        ))
    };
    let (path, rv) = match v.split_once('@') {
        Some((p, rv)) => (
            p,
            Some(
                rv.parse::<u64>()
                    .map_err(|_| bad("the resourceVersion is not a number"))?,
            ),
        ),
        None => (v, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(bad("not an object reference"));
    }
    let lower = parts[0].to_ascii_lowercase();
    let kind = KINDS
        .iter()
        .find(|(_, aliases)| aliases.contains(&lower.as_str()))
        .map_or(parts[0], |(k, _)| k);
    let mut key = kind.to_string();
    for p in &parts[1..] {
        key.push('/');
        key.push_str(p);
    }
    Ok(Target { key, min_rv: rv })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, clap::Error> {
        parse(args.iter().map(OsString::from))
    }

    fn command(args: &[&str]) -> Command {
        p(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).command
    }

    fn socket(path: &str) -> Socket {
        Socket {
            path: PathBuf::from(path),
        }
    }

    fn default_socket() -> Socket {
        socket(sluice_proto::DEFAULT_SOCKET)
    }

    #[test]
    fn status_defaults_and_options() {
        assert_eq!(
            command(&["status"]),
            Command::Status(StatusArgs {
                socket: default_socket(),
                format: Format::Text
            })
        );
        let want = Command::Status(StatusArgs {
            socket: socket("/tmp/a.sock"),
            format: Format::Json,
        });
        assert_eq!(
            command(&["status", "--socket", "/tmp/a.sock", "-o", "json"]),
            want
        );
        assert_eq!(command(&["status", "-ojson", "--socket=/tmp/a.sock"]), want);
        assert_eq!(
            command(&["status", "-o=json", "--socket=/tmp/a.sock"]),
            want
        );
        assert_eq!(
            command(&["status", "--output=json", "--socket=/tmp/a.sock"]),
            want
        );
    }

    #[test]
    fn wait_targets_versions_gone_and_timeout() {
        let got = command(&[
            "wait",
            "NetworkPolicy/x/allow-a@42",
            "--timeout",
            "500ms",
            "ns/x",
            "--socket",
            "/s",
        ]);
        assert_eq!(
            got,
            Command::Wait(WaitArgs {
                socket: socket("/s"),
                targets: vec![
                    Target {
                        key: "NetworkPolicy/x/allow-a".into(),
                        min_rv: Some(42)
                    },
                    Target {
                        key: "Namespace/x".into(),
                        min_rv: None
                    },
                ],
                gone: false,
                timeout: Duration::from_millis(500),
            })
        );
        let Command::Wait(w) = command(&["wait", "--gone", "netpol/x/y"]) else {
            panic!("wait --gone");
        };
        assert!(w.gone);
        assert_eq!(w.timeout, DEFAULT_WAIT_TIMEOUT);
        // Cluster-scoped ClusterNetworkPolicy, by any of its names.
        for kind in ["cnp", "clusternetworkpolicies", "ClusterNetworkPolicy"] {
            assert_eq!(
                parse_target(&format!("{kind}/block-metadata@9")),
                Ok(Target {
                    key: "ClusterNetworkPolicy/block-metadata".into(),
                    min_rv: Some(9)
                })
            );
        }
        // Unknown kinds are kept as typed.
        assert_eq!(
            parse_target("Widget/a/b@7").map(|t| t.key),
            Ok("Widget/a/b".into())
        );
    }

    /// A usage error: exit 2, as before clap.
    fn is_usage_error(r: &Result<Cli, clap::Error>) -> bool {
        matches!(r, Err(e) if e.exit_code() == 2 && e.use_stderr())
    }

    #[test]
    fn bad_wait_lines_are_usage_errors() {
        for bad in [
            &["wait"][..],
            &["wait", "Pod"],
            &["wait", "Pod/a/b/c"],
            &["wait", "Pod//b"],
            &["wait", "Pod/a/b@x"],
            &["wait", "Pod/a/b@"],
            &["wait", "Pod/a/b", "--timeout"],
            &["wait", "Pod/a/b", "--timeout", "soon"],
            &["wait", "Pod/a/b", "--timeout", "5d"],
            &["wait", "--gone", "Pod/a/b@3"],
            &["wait", "--gone=yes", "Pod/a/b"],
            &["wait", "Pod/a/b", "--frob"],
            &["wait", "Pod/a/b", "-o", "json"],
        ] {
            assert!(is_usage_error(&p(bad)), "{bad:?}");
        }
    }

    #[test]
    fn observe_takes_every_verdict_and_a_replay() {
        for (v, want) in [
            ("forwarded", "forwarded"),
            ("Dropped", "dropped"),
            ("WOULD-DROP", "would-drop"),
            ("all", "all"),
        ] {
            let Command::Observe(got) = command(&["observe", "--verdict", v]) else {
                panic!("not observe");
            };
            assert_eq!(got.filter().verdict.as_deref(), Some(want));
            assert!(got.replay().is_none());
        }
        let Command::Observe(got) = command(&["observe", "--since", "5m", "--last", "20"]) else {
            panic!("not observe");
        };
        assert_eq!(
            got.replay(),
            Replay {
                since_ms: Some(300_000),
                last: Some(20)
            }
        );
    }

    #[test]
    fn observe_builds_the_filter() {
        let Command::Observe(got) = command(&[
            "observe",
            "--namespace",
            "x",
            "--pod",
            "x/web",
            "--verdict",
            "DROPPED",
            "--direction=ingress",
            "-o",
            "json",
        ]) else {
            panic!("not observe");
        };
        assert_eq!(
            got.filter(),
            ObserveFilter {
                namespace: Some("x".into()),
                pod: Some("x/web".into()),
                verdict: Some("dropped".into()),
                direction: Some("ingress".into()),
            }
        );
        assert_eq!((got.format, got.socket), (Format::Json, default_socket()));
        let Command::Observe(got) = command(&["observe", "-n", "y", "--direction", "EGRESS"])
        else {
            panic!("not observe");
        };
        assert_eq!(
            got.filter(),
            ObserveFilter {
                namespace: Some("y".into()),
                direction: Some("egress".into()),
                ..ObserveFilter::default()
            }
        );
        assert_eq!(
            command(&["observe"]),
            Command::Observe(ObserveArgs {
                namespace: None,
                pod: None,
                verdict: None,
                since: None,
                last: None,
                direction: None,
                format: Format::Text,
                no_reconnect: false,
                socket: default_socket(),
            })
        );
        for bad in [
            &["observe", "--direction", "sideways"][..],
            &["observe", "--verdict", "maybe"],
            &["observe", "--since", "yesterday"],
            &["observe", "--last", "-1"],
            &["observe", "--pod", "a/b/c"],
            &["observe", "--pod", "/b"],
            &["observe", "--namespace"],
            &["observe", "--namespace", ""],
            &["observe", "-o", "yaml"],
            &["observe", "stray"],
            &["observe", "--gone"],
        ] {
            assert!(is_usage_error(&p(bad)), "{bad:?}");
        }
    }

    #[test]
    fn anything_else_is_a_usage_error_and_help_is_help() {
        for bad in [
            &[][..],
            &["ADD"],
            &["frob", "status"],
            &["status", "extra"],
            &["status", "--socket="],
        ] {
            assert!(is_usage_error(&p(bad)), "{bad:?}");
        }
        for help in [&["--help"][..], &["wait", "-h"], &["help", "observe"]] {
            let Err(e) = p(help) else {
                panic!("{help:?} parsed");
            };
            assert!(e.exit_code() == 0 && !e.use_stderr(), "{help:?}");
        }
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("30s", 30_000),
            ("30", 30_000),
            ("250ms", 250),
            ("1.5s", 1500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("0", 0),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "s", "-1s", "1.2.3s", "1 s", "10x"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn completions_cover_every_subcommand_for_each_shell() {
        let cli = parse(["completions", "zsh"].map(OsString::from)).unwrap();
        assert_eq!(
            cli.command,
            Command::Completions(CompletionsArgs {
                shell: clap_complete::Shell::Zsh
            })
        );
        assert_eq!(
            parse(["completions", "tcsh"].map(OsString::from))
                .unwrap_err()
                .exit_code(),
            2
        );
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Fish] {
            let script = String::from_utf8(completions(shell)).unwrap();
            for verb in ["status", "wait", "observe", "explain", "lint", "assert"] {
                assert!(script.contains(verb), "{shell}: {verb}");
            }
        }
    }
}
