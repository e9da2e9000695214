//! `sluice assert -f FILE [--socket PATH]...`: connectivity assertions
//! (docs/assert.md). The file is parsed (`file`), every test's sources are
//! expanded (a selector asked of the agent, which knows the cluster's
//! pods), DNS names are resolved here, and each probe is sent to the agent
//! of the node where its source pod runs: each `--socket` is asked in turn
//! until one has the pod (the others refuse with code 3). The agent probes
//! from inside the pod's network namespace (`sluice_agent::probe`). The
//! results are printed as TAP version 13 or JSON (`report`).
//!
//! Exit status: 0 every assertion held, 1 any did not (or could not be
//! probed), 2 usage (the command line, or a file that cannot be read or
//! does not parse).
pub mod file;
pub mod report;

use std::net::{IpAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::time::Duration;

use sluice_proto::{Request, Response, code};

use super::args::Format;
use crate::agent::Agent;
use file::{From, Test, To};
use report::{Got, Point};

/// Beyond a probe's own timeout, how long an agent may take to answer.
const SLACK: Duration = Duration::from_secs(10);

const PASSED: u8 = 0;
const FAILED: u8 = 1;
const USAGE: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct AssertArgs {
    /// The assertion file (YAML; docs/assert.md).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// A node agent's socket; repeat it to reach every node's agent (each
    /// probe goes to the one whose node runs the source pod).
    #[arg(long = "socket", value_name = "PATH", default_value = sluice_proto::DEFAULT_SOCKET)]
    pub sockets: Vec<PathBuf>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Reads, probes, prints; the exit status.
pub fn run(a: &AssertArgs) -> u8 {
    let tests = match std::fs::read_to_string(&a.file)
        .map_err(|e| e.to_string())
        .and_then(|text| file::parse(&text))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluice assert: {}: {e}", a.file.display());
            return USAGE;
        }
    };
    let mut agents = Agents::new(&a.sockets);
    let mut points = Vec::new();
    for t in &tests {
        points.extend(agents.run_test(t));
    }
    let text = match a.format {
        Format::Text => report::tap(&points),
        Format::Json => report::json(&points),
    };
    // A closed stdout changes nothing about the verdict.
    let _printed = super::print(&text).is_ok();
    if points.iter().all(Point::ok) {
        PASSED
    } else {
        FAILED
    }
}

/// The agents asked, and which one has each pod seen so far.
struct Agents {
    sockets: Vec<PathBuf>,
    /// `ns/name` -> index in `sockets`.
    home: std::collections::HashMap<String, usize>,
}

/// An answer that stops a point: what to report.
struct Failed {
    address: Option<String>,
    detail: String,
}

fn failed(detail: impl Into<String>) -> Failed {
    Failed {
        address: None,
        detail: detail.into(),
    }
}

impl Agents {
    fn new(sockets: &[PathBuf]) -> Self {
        Self {
            sockets: sockets.to_vec(),
            home: Default::default(),
        }
    }

    /// Every point of one test: one per source pod.
    fn run_test(&mut self, t: &Test) -> Vec<Point> {
        let point = |from: String, r: Result<(bool, String, String), Failed>| match r {
            Ok((open, address, detail)) => Point {
                from,
                test: t.clone(),
                got: if open { Got::Open } else { Got::Closed },
                address: Some(address),
                detail,
            },
            Err(f) => Point {
                from,
                test: t.clone(),
                got: Got::Error,
                address: f.address,
                detail: f.detail,
            },
        };
        let sources = match self.sources(&t.from) {
            Ok(s) => s,
            Err(f) => return vec![point(t.from.to_string(), Err(f))],
        };
        let to = match resolve(&t.to) {
            Ok(to) => to,
            Err(f) => {
                return sources
                    .into_iter()
                    .map(|s| point(s, Err(failed(&f.detail))))
                    .collect();
            }
        };
        sources
            .into_iter()
            .map(|s| {
                let r = self.probe(&s, &to, t);
                point(s, r)
            })
            .collect()
    }

    /// The source pods of a test: the pod named, or the pods a selector
    /// matches (asked of the first agent that answers: every agent knows
    /// every pod of the cluster).
    fn sources(&self, from: &From) -> Result<Vec<String>, Failed> {
        let (namespace, labels, first) = match from {
            From::Pod(p) => return Ok(vec![p.clone()]),
            From::Selector {
                namespace,
                labels,
                first,
            } => (namespace, labels, first),
        };
        let req = Request::Pods {
            namespace: namespace.clone(),
            labels: labels.clone(),
        };
        let mut why = Vec::new();
        for s in &self.sockets {
            match Agent::new(s, SLACK).call(&req) {
                Ok(Response::Pods { mut pods }) => {
                    if pods.is_empty() {
                        return Err(failed(format!("no pod matches {from}")));
                    }
                    if let Some(n) = first {
                        pods.truncate(*n);
                    }
                    return Ok(pods);
                }
                Ok(Response::Error { msg, details, .. }) => {
                    why.push(format!("{}: {msg}: {details}", s.display()));
                }
                Ok(other) => why.push(format!("{}: unexpected answer {other:?}", s.display())),
                Err(e) => why.push(format!("{}: {}", s.display(), super::explain(&e))),
            }
        }
        Err(failed(format!("listing pods: {}", why.join("; "))))
    }

    /// One probe from `from`, at its node's agent.
    fn probe(&mut self, from: &str, to: &str, t: &Test) -> Result<(bool, String, String), Failed> {
        let timeout_ms = u64::try_from(t.timeout.as_millis()).unwrap_or(u64::MAX);
        let req = Request::Probe {
            from: from.to_owned(),
            to: to.to_owned(),
            port: t.port,
            protocol: t.protocol.as_str().to_owned(),
            timeout_ms,
        };
        // The agent that had this pod last time first, then the others.
        let mut order: Vec<usize> = (0..self.sockets.len()).collect();
        if let Some(&h) = self.home.get(from) {
            order.retain(|&i| i != h);
            order.insert(0, h);
        }
        let mut why = Vec::new();
        for i in order {
            let s = &self.sockets[i];
            match Agent::new(s, t.timeout + SLACK).call(&req) {
                Ok(Response::Probe {
                    address,
                    open,
                    detail,
                }) => {
                    self.home.insert(from.to_owned(), i);
                    return Ok((open, address, detail));
                }
                Ok(Response::Error { code: c, .. }) if c == code::CONTAINER_UNKNOWN => {}
                Ok(Response::Error { msg, details, .. }) => {
                    return Err(failed(format!("{}: {msg}: {details}", s.display())));
                }
                Ok(other) => why.push(format!("{}: unexpected answer {other:?}", s.display())),
                Err(e) => why.push(format!("{}: {}", s.display(), super::explain(&e))),
            }
        }
        let mut detail = format!(
            "pod {from} is on the node of no agent asked ({})",
            self.sockets
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !why.is_empty() {
            detail.push_str(&format!("; {}", why.join("; ")));
        }
        Err(failed(detail))
    }
}

/// What the agent is told to connect to: pods and Services by name (the
/// agent resolves them), a DNS name resolved here (IPv4 first), an address.
fn resolve(to: &To) -> Result<String, Failed> {
    match to {
        To::Pod(s) | To::Service(s) => Ok(s.clone()),
        To::Address(ip) => Ok(ip.to_string()),
        To::Dns(name) => {
            let addrs: Vec<IpAddr> = (name.as_str(), 0)
                .to_socket_addrs()
                .map_err(|e| failed(format!("resolving {name}: {e}")))?
                .map(|a| a.ip())
                .collect();
            addrs
                .iter()
                .find(|ip| ip.is_ipv4())
                .or_else(|| addrs.first())
                .map(ToString::to_string)
                .ok_or_else(|| failed(format!("resolving {name}: no address")))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;
    use crate::cli::args::{Command, parse};

    #[test]
    fn the_command_line_takes_a_file_and_any_number_of_sockets() {
        let args = |v: &[&str]| {
            let mut all = vec!["assert"];
            all.extend(v);
            parse(all.into_iter().map(OsString::from))
        };
        let Ok(Command::Assert(a)) = args(&["-f", "t.yaml"]).map(|c| c.command) else {
            panic!("assert -f");
        };
        assert_eq!(a.sockets, vec![PathBuf::from(sluice_proto::DEFAULT_SOCKET)]);
        assert_eq!(a.format, Format::Text);
        let Ok(Command::Assert(a)) = args(&[
            "-f", "t.yaml", "--socket", "/a", "--socket", "/b", "-o", "json",
        ])
        .map(|c| c.command) else {
            panic!("two sockets");
        };
        assert_eq!(a.sockets, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(a.format, Format::Json);
        for bad in [&[][..], &["-f"], &["-f", "t", "-o", "tap"]] {
            assert_eq!(args(bad).map(|_| ()).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn names_resolve_here_and_the_rest_goes_to_the_agent_as_written() {
        assert_eq!(resolve(&To::Pod("x/a".into())).ok(), Some("x/a".into()));
        assert_eq!(
            resolve(&To::Service("svc/x/web".into())).ok(),
            Some("svc/x/web".into())
        );
        assert_eq!(
            resolve(&To::Address("fd00::1".parse().unwrap())).ok(),
            Some("fd00::1".into())
        );
        assert_eq!(
            resolve(&To::Dns("localhost".into())).ok(),
            Some("127.0.0.1".into())
        );
        assert!(resolve(&To::Dns("no-such-host.invalid".into())).is_err());
    }

    #[test]
    fn an_unreachable_agent_is_a_failed_point_not_a_crash() {
        let t =
            file::parse("tests:\n- {from: x/a, to: 10.0.0.1, port: 80, expect: closed}\n").unwrap();
        let mut agents = Agents::new(&[PathBuf::from("/nonexistent/agent.sock")]);
        let points = agents.run_test(&t[0]);
        assert_eq!(points.len(), 1);
        assert!(!points[0].ok());
        assert!(
            points[0]
                .detail
                .contains("is on the node of no agent asked")
                && points[0].detail.contains("cannot connect"),
            "{}",
            points[0].detail
        );
    }
}
