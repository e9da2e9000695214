//! The command line of `sluice status|wait|observe`, parsed without I/O.
use std::path::PathBuf;
use std::time::Duration;

use sluice_proto::ObserveFilter;

pub const USAGE: &str = "\
usage: sluice status  [--socket PATH] [-o text|json]
       sluice wait    KIND/NAMESPACE/NAME[@RV] | KIND/NAME[@RV] ...
                      [--gone] [--timeout 30s] [--socket PATH]
       sluice observe [--namespace NS] [--pod NAME|NS/NAME] [--verdict dropped]
                      [--direction ingress|egress] [-o text|json] [--socket PATH]

As a CNI plugin, sluice is run with CNI_COMMAND set (ADD, DEL, CHECK, VERSION,
STATUS, GC). Without it, it talks to the node agent:

  status   is the agent ready, has it synced the cluster, and which objects
           are programmed (KIND NAMESPACE/NAME RESOURCEVERSION); exit 0 if
           ready, 1 if not
  wait     until every object named is programmed at resourceVersion RV or
           later (any version without @RV), or is gone (--gone, once the agent
           has synced); exit 1 on timeout (units ms, s, m, h; bare number: s)
  observe  stream the drops the agent sees, filtered, until interrupted

--socket defaults to /run/sluice/agent.sock.";

/// Default of `wait --timeout`.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// One object `wait` waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As the agent keys `Programmed`: `Kind/namespace/name` or `Kind/name`
    /// (the kind spelled as the agent spells it when it is a known one).
    pub key: String,
    /// Programmed at this resourceVersion or later; `None`: any.
    pub min_rv: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cli {
    Help,
    Status {
        socket: PathBuf,
        format: Format,
    },
    Wait {
        socket: PathBuf,
        targets: Vec<Target>,
        gone: bool,
        timeout: Duration,
    },
    Observe {
        socket: PathBuf,
        filter: ObserveFilter,
        format: Format,
    },
}

/// Why the command line is not one: printed with the usage, exit 2.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Cli, UsageError> {
    let Some((verb, rest)) = args.split_first() else {
        return Err(usage("no command given"));
    };
    match verb.as_str() {
        "-h" | "--help" | "help" => return Ok(Cli::Help),
        "status" | "wait" | "observe" => {}
        other => return Err(usage(format!("unknown command {other:?}"))),
    }
    let mut socket = PathBuf::from(sluice_proto::DEFAULT_SOCKET);
    let mut format = Format::Text;
    let mut gone = false;
    let mut timeout = DEFAULT_WAIT_TIMEOUT;
    let mut targets = Vec::new();
    let mut filter = ObserveFilter::default();

    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Cli::Help);
        }
        // `--opt=value`, `-ovalue` and `--opt value` alike.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ if arg.starts_with("-o") && arg.len() > 2 => {
                ("-o", Some(arg[2..].trim_start_matches('=').to_string()))
            }
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, UsageError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| usage(format!("{name} needs a value"))),
            }
        };
        let not_empty = |v: String| {
            if v.is_empty() {
                Err(usage(format!("{name} must not be empty")))
            } else {
                Ok(v)
            }
        };
        match (verb.as_str(), name) {
            (_, "--socket") => socket = PathBuf::from(not_empty(value()?)?),
            ("status" | "observe", "-o" | "--output") => format = parse_format(&value()?)?,
            ("wait", "--gone") if inline.is_none() => gone = true,
            ("wait", "--timeout") => timeout = parse_duration(&value()?)?,
            ("observe", "-n" | "--namespace") => filter.namespace = Some(not_empty(value()?)?),
            ("observe", "--pod") => filter.pod = Some(parse_pod(&value()?)?),
            ("observe", "--verdict") => {
                let v = value()?;
                if v.eq_ignore_ascii_case("forwarded") {
                    // Honest rather than silent: nothing would ever match.
                    return Err(usage(
                        "--verdict forwarded: the agent streams drops only; forwarded packets \
                         are counted in sluice_forwarded_packets_total",
                    ));
                }
                filter.verdict = Some(one_of(name, &v, &["dropped"])?);
            }
            ("observe", "--direction") => {
                filter.direction = Some(one_of(name, &value()?, &["ingress", "egress"])?);
            }
            (_, n) if n.starts_with('-') && n.len() > 1 => {
                return Err(usage(format!("{verb}: unknown option {arg:?}")));
            }
            ("wait", _) => targets.push(parse_target(arg)?),
            _ => return Err(usage(format!("{verb}: unexpected argument {arg:?}"))),
        }
    }
    Ok(match verb.as_str() {
        "status" => Cli::Status { socket, format },
        "wait" => {
            if targets.is_empty() {
                return Err(usage("wait: name at least one object, KIND/NAMESPACE/NAME"));
            }
            if gone && targets.iter().any(|t| t.min_rv.is_some()) {
                return Err(usage("wait: --gone takes no @RV"));
            }
            Cli::Wait {
                socket,
                targets,
                gone,
                timeout,
            }
        }
        _ => Cli::Observe {
            socket,
            filter,
            format,
        },
    })
}

fn parse_format(v: &str) -> Result<Format, UsageError> {
    match v {
        "text" => Ok(Format::Text),
        "json" => Ok(Format::Json),
        _ => Err(usage(format!("-o is text or json, not {v:?}"))),
    }
}

fn one_of(name: &str, v: &str, allowed: &[&str]) -> Result<String, UsageError> {
    let lower = v.to_ascii_lowercase();
    if allowed.contains(&lower.as_str()) {
        Ok(lower)
    } else {
        Err(usage(format!(
            "{name} is one of {}, not {v:?}",
            allowed.join(", ")
        )))
    }
}

fn parse_pod(v: &str) -> Result<String, UsageError> {
    let ok = match v.split_once('/') {
        Some((ns, name)) => !ns.is_empty() && !name.is_empty() && !name.contains('/'),
        None => !v.is_empty(),
    };
    if ok {
        Ok(v.to_string())
    } else {
        Err(usage(format!("--pod is NAME or NAMESPACE/NAME, not {v:?}")))
    }
}

/// `30s`, `500ms`, `2m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(v: &str) -> Result<Duration, UsageError> {
    let bad = || {
        usage(format!(
            "--timeout: {v:?} is not a duration like 30s or 500ms"
        ))
    };
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
];

/// `KIND/NAMESPACE/NAME[@RV]` or, cluster-scoped, `KIND/NAME[@RV]`.
pub fn parse_target(v: &str) -> Result<Target, UsageError> {
    let bad = |why: &str| {
        usage(format!(
            "wait: {v:?} {why} (expected KIND/NAMESPACE/NAME[@RV] or KIND/NAME[@RV])"
        ))
    };
    let (path, rv) = match v.split_once('@') {
        Some((p, rv)) => (
            p,
            Some(
                rv.parse::<u64>()
                    .map_err(|_| bad("has a resourceVersion that is not a number"))?,
            ),
        ),
        None => (v, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(bad("is not an object reference"));
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

    fn p(args: &[&str]) -> Result<Cli, UsageError> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&v)
    }

    fn default_socket() -> PathBuf {
        PathBuf::from(sluice_proto::DEFAULT_SOCKET)
    }

    #[test]
    fn status_defaults_and_options() {
        assert_eq!(
            p(&["status"]),
            Ok(Cli::Status {
                socket: default_socket(),
                format: Format::Text
            })
        );
        let want = Ok(Cli::Status {
            socket: PathBuf::from("/tmp/a.sock"),
            format: Format::Json,
        });
        assert_eq!(
            p(&["status", "--socket", "/tmp/a.sock", "-o", "json"]),
            want
        );
        assert_eq!(p(&["status", "-ojson", "--socket=/tmp/a.sock"]), want);
        assert_eq!(p(&["status", "-o=json", "--socket=/tmp/a.sock"]), want);
        assert_eq!(
            p(&["status", "--output=json", "--socket=/tmp/a.sock"]),
            want
        );
    }

    #[test]
    fn wait_targets_versions_gone_and_timeout() {
        let got = p(&[
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
            Ok(Cli::Wait {
                socket: PathBuf::from("/s"),
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
        let Ok(Cli::Wait { gone, timeout, .. }) = p(&["wait", "--gone", "netpol/x/y"]) else {
            panic!("wait --gone");
        };
        assert!(gone);
        assert_eq!(timeout, DEFAULT_WAIT_TIMEOUT);
        // Unknown kinds are kept as typed.
        assert_eq!(
            parse_target("Widget/a/b@7").map(|t| t.key),
            Ok("Widget/a/b".into())
        );
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
            &["wait", "Pod/a/b", "--frob"],
            &["wait", "Pod/a/b", "-o", "json"],
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn observe_builds_the_filter() {
        let got = p(&[
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
        ]);
        assert_eq!(
            got,
            Ok(Cli::Observe {
                socket: default_socket(),
                filter: ObserveFilter {
                    namespace: Some("x".into()),
                    pod: Some("x/web".into()),
                    verdict: Some("dropped".into()),
                    direction: Some("ingress".into()),
                },
                format: Format::Json,
            })
        );
        assert_eq!(
            p(&["observe"]),
            Ok(Cli::Observe {
                socket: default_socket(),
                filter: ObserveFilter::default(),
                format: Format::Text,
            })
        );
        for bad in [
            &["observe", "--direction", "sideways"][..],
            &["observe", "--verdict", "maybe"],
            &["observe", "--verdict", "forwarded"],
            &["observe", "--pod", "a/b/c"],
            &["observe", "--pod", "/b"],
            &["observe", "--namespace"],
            &["observe", "--namespace", ""],
            &["observe", "-o", "yaml"],
            &["observe", "stray"],
            &["observe", "--gone"],
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn anything_else_is_a_usage_error_and_help_is_help() {
        assert!(p(&[]).is_err());
        assert!(p(&["ADD"]).is_err());
        assert!(p(&["frob", "status"]).is_err());
        assert!(p(&["status", "extra"]).is_err());
        assert!(p(&["status", "--socket="]).is_err());
        assert_eq!(p(&["--help"]), Ok(Cli::Help));
        assert_eq!(p(&["wait", "-h"]), Ok(Cli::Help));
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
}
