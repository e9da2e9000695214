//! `sluice explain`: why a flow passes or not, and the reachability matrix.
//!
//! Offline (`-f FILE|DIR`) it reads the objects with `sluice_api::files`
//! and runs the agent's own compiler (`sluice_agent::policy`) on them, every
//! pod taken as local so that both directions are judged; live it asks the
//! agent, which answers from the compiler that programmed its maps. Either
//! way the explanation is the same code's (`policy::explain`), which a test
//! holds equal to the data path's verdict.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodStatus};
use sluice_agent::policy::{
    Compiler, Locality, Resync,
    explain::{Explanation, Spec, explain_specs, parse_flow, parse_spec, render},
};
use sluice_proto::{Request, Response};

use super::args::{Format, Socket};
use crate::agent::Agent;

/// How long the agent may take to explain.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct ExplainArgs {
    /// Read Namespaces, Pods, NetworkPolicies, ClusterNetworkPolicies,
    /// Services and Nodes from YAML files (a file, or a directory walked
    /// for *.yaml, *.yml, *.json; `kubectl get -o yaml` output works)
    /// instead of asking the agent.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR")]
    pub files: Option<PathBuf>,
    /// Print the reachability matrix of every pod pair on --port (the
    /// conformance format: rows from, columns to, `.` passes, `X` blocked);
    /// needs -f.
    #[arg(long)]
    pub matrix: bool,
    /// The flow of --matrix.
    #[arg(long, value_name = "PORT/PROTO", default_value = "80/TCP", value_parser = flow)]
    pub port: (u8, u16),
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// The client: NAMESPACE/POD or an address.
    #[arg(value_name = "FROM", value_parser = spec)]
    pub from: Option<Spec>,
    /// The server: NAMESPACE/POD, svc/NAMESPACE/NAME (each backend, on the
    /// target port) or an address.
    #[arg(value_name = "TO", value_parser = spec)]
    pub to: Option<Spec>,
    /// PORT/PROTO, e.g. 80/TCP (TCP when the protocol is left out).
    #[arg(value_name = "PORT/PROTO", value_parser = flow)]
    pub flow: Option<(u8, u16)>,
    #[command(flatten)]
    pub socket: Socket,
}

fn spec(v: &str) -> Result<Spec, super::args::UsageError> {
    parse_spec(v).map_err(super::args::UsageError)
}

fn flow(v: &str) -> Result<(u8, u16), super::args::UsageError> {
    parse_flow(v).map_err(super::args::UsageError)
}

impl ExplainArgs {
    /// What is wrong with the combination, if anything.
    pub fn check(&self) -> Result<(), &'static str> {
        let flow_given = self.from.is_some() || self.to.is_some() || self.flow.is_some();
        if self.matrix {
            if self.files.is_none() {
                return Err("--matrix needs -f FILE|DIR");
            }
            if flow_given {
                return Err(
                    "--matrix takes no FROM TO PORT/PROTO (it probes every pod pair on --port)",
                );
            }
        } else if self.flow.is_none() {
            return Err("expected FROM TO PORT/PROTO (or --matrix -f DIR)");
        }
        Ok(())
    }
}

/// The objects of the files compiled as one cluster whose every pod is local.
pub struct Offline {
    pub compiler: Compiler,
    pub pods: Vec<Pod>,
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
    /// What the files left out and was made up (addresses, namespaces).
    pub notes: Vec<String>,
}

/// Addresses for pods the files give none (RFC 2544's benchmarking range,
/// unlikely to be a pod CIDR): 198.18.0.1 and on.
fn made_up_address(n: usize) -> IpAddr {
    let n = u32::try_from(n + 1).unwrap_or(u32::MAX) & 0x1_ffff;
    IpAddr::from((u32::from_be_bytes([198, 18, 0, 0]) | n).to_be_bytes())
}

impl Offline {
    pub fn load(path: &Path) -> Result<Self, String> {
        let loaded = sluice_api::files::load(path).map_err(|e| e.to_string())?;
        if let Some(e) = loaded.errors.first() {
            return Err(format!(
                "{e}{}",
                match loaded.errors.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ));
        }
        Ok(Self::new(loaded.objects))
    }

    pub fn new(o: sluice_api::files::Objects) -> Self {
        let mut notes = Vec::new();
        // The API server labels every namespace with its name; a namespace
        // the files only mention is made, with that label only.
        let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
        for ns in o.namespaces {
            let name = ns.metadata.name.clone().unwrap_or_default();
            namespaces.insert(name, ns);
        }
        let mut pods = o.pods;
        for p in &pods {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            namespaces.entry(ns.clone()).or_insert_with(|| {
                notes.push(format!(
                    "namespace {ns} is not in the files: taken with no labels but its name"
                ));
                let mut n = Namespace::default();
                n.metadata.name = Some(ns.clone());
                n
            });
        }
        for (name, ns) in namespaces.iter_mut() {
            ns.metadata
                .labels
                .get_or_insert_with(Default::default)
                .entry("kubernetes.io/metadata.name".into())
                .or_insert_with(|| name.clone());
        }
        let mut made_up = 0;
        for p in &mut pods {
            let st = p.status.get_or_insert_with(PodStatus::default);
            let has = st.pod_ip.is_some() || st.pod_ips.as_ref().is_some_and(|v| !v.is_empty());
            if !has {
                let ip = made_up_address(made_up).to_string();
                made_up += 1;
                notes.push(format!(
                    "pod {}/{} has no address in the files: given {ip} (ipBlock rules are judged on it)",
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default()
                ));
                st.pod_ip = Some(ip.clone());
                st.pod_ips = Some(vec![PodIP { ip }]);
            }
        }
        let namespaces: Vec<Namespace> = namespaces.into_values().collect();
        let mut compiler = Compiler::new(Locality::All);
        compiler.resync(Resync {
            namespaces: Some(&namespaces),
            pods: Some(&pods),
            policies: Some(&o.network_policies),
            cluster_policies: Some(&o.cluster_network_policies),
            nodes: Some(&o.nodes),
        });
        for d in compiler.diagnostics() {
            notes.push(format!("{}: {}", d.object, d.reason));
        }
        Self {
            compiler,
            pods,
            services: o.services,
            notes,
        }
    }

    pub fn explain(
        &self,
        from: &Spec,
        to: &Spec,
        flow: (u8, u16),
    ) -> Result<Vec<Explanation>, String> {
        let service = |o: &sluice_agent::policy::ObjectRef| {
            self.services.iter().find(|s| {
                s.metadata.namespace.as_deref() == Some(o.namespace.as_str())
                    && s.metadata.name.as_deref() == Some(o.name.as_str())
            })
        };
        explain_specs(&self.compiler, (from, to), flow, service, self.pods.iter())
    }

    /// `ns/name` of every pod the compiler knows (a finished or
    /// host-network pod is no pod for policy), sorted.
    pub fn pod_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pods
            .iter()
            .map(|p| {
                sluice_agent::policy::ObjectRef::new(
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                )
            })
            .filter(|o| self.compiler.identity_of(o).is_some())
            .map(|o| o.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The matrix over every pod on `flow`, rendered as the conformance
    /// runner renders one.
    pub fn matrix(&self, flow: (u8, u16)) -> Result<String, String> {
        let pods = self.pod_names();
        if pods.is_empty() {
            return Err("the files hold no pod".into());
        }
        let mut cells = Vec::new();
        for from in &pods {
            let mut row = Vec::new();
            for to in &pods {
                let (Some(f), Some(t)) = (spec_of(from), spec_of(to)) else {
                    return Err(format!("{from} -> {to}: not pods"));
                };
                let e = self.explain(&f, &t, flow)?;
                row.push(e.iter().all(|e| e.allowed));
            }
            cells.push(row);
        }
        Ok(render_matrix(&pods, &cells))
    }
}

fn spec_of(name: &str) -> Option<Spec> {
    parse_spec(name).ok()
}

/// `- <pod>...` then a row per pod, `.` or `X` per column, each column as
/// wide as the longest name plus one (as `tests/src/cases.rs` prints).
pub fn render_matrix(pods: &[String], cells: &[Vec<bool>]) -> String {
    let width = pods.iter().map(String::len).max().unwrap_or(1) + 1;
    let line = |first: &str, rest: Vec<&str>| {
        let mut s = format!("{first:<width$}");
        for c in rest {
            s.push_str(&format!("{c:<width$}"));
        }
        format!("{}\n", s.trim_end())
    };
    let mut out = line("-", pods.iter().map(String::as_str).collect());
    for (from, row) in pods.iter().zip(cells) {
        out.push_str(&line(
            from,
            row.iter().map(|&ok| if ok { "." } else { "X" }).collect(),
        ));
    }
    out
}

fn print_all(list: &[Explanation], notes: &[String], format: Format) -> Result<String, String> {
    Ok(match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(list).map_err(|e| e.to_string())?;
            s.push('\n');
            s
        }
        Format::Text => {
            let mut s: String = list.iter().map(render).collect::<Vec<_>>().join("\n");
            for n in notes {
                s.push_str(&format!("note: {n}\n"));
            }
            s
        }
    })
}

/// Runs `sluice explain`: the text to print, or the error to report.
pub fn run(a: &ExplainArgs) -> Result<String, String> {
    let flow = a.flow.unwrap_or(a.port);
    match (&a.files, a.matrix, &a.from, &a.to) {
        (Some(path), true, _, _) => {
            let off = Offline::load(path)?;
            let m = off.matrix(a.port)?;
            Ok(match a.format {
                Format::Text => {
                    // The matrix alone on stdout, as the conformance
                    // format has it.
                    for n in &off.notes {
                        eprintln!("note: {n}");
                    }
                    m
                }
                Format::Json => {
                    let v = serde_json::json!({
                        "protocol": sluice_agent::policy::explain::flow_name(a.port.0, a.port.1),
                        "pods": off.pod_names(),
                        "matrix": m,
                        "notes": off.notes,
                    });
                    format!("{v}\n")
                }
            })
        }
        (Some(path), false, Some(from), Some(to)) => {
            let off = Offline::load(path)?;
            let list = off.explain(from, to, flow)?;
            print_all(&list, &off.notes, a.format)
        }
        (None, false, Some(from), Some(to)) => {
            let agent = Agent::new(&a.socket.path, TIMEOUT);
            let req = Request::Explain {
                from: from.to_string(),
                to: to.to_string(),
                flow: format!("{}/{}", flow.1, proto_word(flow.0)),
            };
            match agent.call(&req).map_err(|e| super::explain(&e))? {
                Response::Explain { explanations } => {
                    let list = explanations
                        .into_iter()
                        .map(serde_json::from_value)
                        .collect::<Result<Vec<Explanation>, _>>()
                        .map_err(|e| format!("the agent's explanation does not parse: {e}"))?;
                    print_all(&list, &[], a.format)
                }
                Response::Error { msg, details, .. } => Err(format!("the agent: {msg}: {details}")),
                other => Err(format!("unexpected answer to Explain: {other:?}")),
            }
        }
        _ => Err("expected FROM TO PORT/PROTO".into()),
    }
}

fn proto_word(p: u8) -> &'static str {
    match p {
        17 => "UDP",
        132 => "SCTP",
        _ => "TCP",
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use sluice_agent::policy::explain::DecidedBy;

    use super::*;
    use crate::cli::args::{Command, parse};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/explain")
    }

    fn args(line: &[&str]) -> Result<ExplainArgs, clap::Error> {
        let mut v = vec!["explain"];
        v.extend(line);
        match parse(v.into_iter().map(OsString::from))?.command {
            Command::Explain(a) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line_takes_a_flow_or_a_matrix() {
        let a = args(&["x/a", "svc/y/web", "80/udp", "-f", "dir", "-o", "json"]).unwrap();
        assert_eq!(
            a.from,
            Some(Spec::Pod(sluice_agent::policy::ObjectRef::new("x", "a")))
        );
        assert_eq!(
            a.to,
            Some(Spec::Service(sluice_agent::policy::ObjectRef::new(
                "y", "web"
            )))
        );
        assert_eq!(a.flow, Some((17, 80)));
        assert_eq!(
            (a.format, a.files),
            (Format::Json, Some(PathBuf::from("dir")))
        );
        let a = args(&["10.0.0.1", "fd00::1", "443"]).unwrap();
        assert_eq!(a.flow, Some((6, 443)));
        let a = args(&["--matrix", "-f", "d", "--port", "81/SCTP"]).unwrap();
        assert_eq!(a.port, (132, 81));
        for bad in [
            &[][..],
            &["x/a", "x/b"],
            &["x/a", "x/b", "80/ICMP"],
            &["x/a", "x/b", "0"],
            &["a/b/c", "x/b", "80"],
            &["--matrix"],
            &["--matrix", "-f", "d", "x/a", "x/b", "80"],
        ] {
            let e = args(bad).map(|a| format!("{a:?}")).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn offline_the_files_are_compiled_and_each_decision_is_named() {
        let off = Offline::load(&fixtures()).unwrap();
        let pod = |s: &str| parse_spec(s).unwrap();
        let one = |from: &str, to: &str, flow: &str| {
            let mut v = off
                .explain(&pod(from), &pod(to), parse_flow(flow).unwrap())
                .unwrap();
            assert_eq!(v.len(), 1);
            v.remove(0)
        };
        let e = one("shop/front", "shop/web", "8080/TCP");
        assert!(e.allowed, "{}", render(&e));
        let text = render(&e);
        assert!(
            text.contains("namespace label `env` is `prod` (wants env=dev)"),
            "{text}"
        );
        let e = one("dev/tester", "shop/web", "8080/TCP");
        assert!(!e.allowed);
        assert!(matches!(
            &e.ingress.as_ref().unwrap().decided_by,
            DecidedBy::Cluster { policy, rule, .. } if policy == "no-dev-to-shop" && rule == "deny-dev"
        ));
        let e = one("shop/front", "shop/web", "80/TCP");
        assert!(!e.allowed);
        assert!(
            render(&e).contains("named port `http` is TCP/8080 on shop/web: port 80 is not 8080"),
            "{}",
            render(&e)
        );
        // The Service's port 80 leads to the backend's 8080.
        let v = off
            .explain(&pod("shop/front"), &pod("svc/shop/web"), (6, 80))
            .unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].allowed && v[0].port == 8080, "{}", render(&v[0]));
        assert!(v[0].notes[0].contains("leads to backend shop/web port 8080"));
        // The pod without an address was given one, and said so.
        assert!(
            off.notes
                .iter()
                .any(|n| n.contains("dev/tester has no address"))
        );
    }

    #[test]
    fn offline_the_matrix_is_in_the_conformance_format() {
        let off = Offline::load(&fixtures()).unwrap();
        assert_eq!(
            off.matrix((6, 8080)).unwrap(),
            "-          dev/tester shop/front shop/web\n\
             dev/tester .          X          X\n\
             shop/front .          .          .\n\
             shop/web   .          .          .\n"
        );
    }
}
