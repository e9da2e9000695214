//! Reachability cases (`shared/conformance/FORMAT.md`, with the extensions
//! of `docs/conformance.md`: the `cnp` model, `subtest` and `probe` steps): a
//! case file, its steps, the Kubernetes objects of `apply`/`delete`,
//! placeholders, the expected matrix with a diff that marks the cells that
//! differ, and single-pair probes. Pure: the runners (the model, the real
//! data path) live elsewhere.
//!
//! The format is a contract: a key it does not document is an error, never
//! skipped.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::Deserialize;
use sluice_api::ClusterNetworkPolicy;

mod probe;
pub use probe::Probe;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub source: Option<String>,
    pub model: Model,
    pub family: CaseFamily,
    pub target: Target,
    pub uncertain: Option<String>,
    pub steps: Vec<Step>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// `model-default.yaml`: namespaces x, y, z with pods a, b, c.
    Default,
    /// `model-cnp.yaml`: network-policy-api's conformance cluster (the
    /// house namespaces, two pods each, two host-network pods).
    Cnp,
}

impl Model {
    /// The model's file in `tests/conformance/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Default => "model-default.yaml",
            Self::Cnp => "model-cnp.yaml",
        }
    }

    /// Whether every (non host-network) pod gets its own ClusterIP
    /// Service `s-<ns>-<pod>`; only the default model has them.
    pub fn has_services(self) -> bool {
        self == Self::Default
    }
}

/// The families a case must hold in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseFamily {
    #[default]
    Any,
    Ipv4,
    Ipv6,
}

impl CaseFamily {
    pub fn families(self) -> Vec<Family> {
        match self {
            Self::Any => vec![Family::Ipv4, Family::Ipv6],
            Self::Ipv4 => vec![Family::Ipv4],
            Self::Ipv6 => vec![Family::Ipv6],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::Ipv4 } else { Self::Ipv6 }
    }
}

/// What a probe connects to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Both.
    #[default]
    Any,
    /// The server pod's ClusterIP Service.
    Service,
    /// The server pod's address.
    Pod,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Multi-document YAML, placeholders not yet replaced.
    Apply(String),
    /// Multi-document YAML naming the objects.
    Delete(String),
    Expect(Expect),
    /// Probes of single (from, to) pairs, each on its own protocol and port.
    Probe(Vec<Probe>),
    /// Starts a named part of the case: the steps up to the next `subtest`
    /// are judged together and reported under this name.
    Subtest(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub protocol: Protocol,
    pub port: u16,
    pub matrix: Matrix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// As Kubernetes writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    source: Option<String>,
    model: Model,
    #[serde(default)]
    family: CaseFamily,
    #[serde(default)]
    target: Target,
    uncertain: Option<String>,
    steps: Vec<RawStep>,
}

/// A step is a map with exactly one of these keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    apply: Option<String>,
    delete: Option<String>,
    expect: Option<RawExpect>,
    probe: Option<String>,
    subtest: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    protocol: Protocol,
    port: u16,
    matrix: String,
}

/// Parses one case file.
pub fn parse_case(text: &str) -> Result<Case> {
    let raw: RawCase = serde_yaml_ng::from_str(text)?;
    ensure!(!raw.name.trim().is_empty(), "name is empty");
    ensure!(!raw.steps.is_empty(), "no steps");
    let steps = raw
        .steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let keys = [
                s.apply.is_some(),
                s.delete.is_some(),
                s.expect.is_some(),
                s.probe.is_some(),
                s.subtest.is_some(),
            ];
            ensure!(
                keys.iter().filter(|k| **k).count() == 1,
                "step {i}: needs exactly one of apply, delete, expect, probe, subtest"
            );
            Ok(match s {
                RawStep { apply: Some(t), .. } => Step::Apply(t),
                RawStep {
                    delete: Some(t), ..
                } => Step::Delete(t),
                RawStep {
                    expect: Some(e), ..
                } => Step::Expect(Expect {
                    protocol: e.protocol,
                    port: e.port,
                    matrix: Matrix::parse(&e.matrix).with_context(|| format!("step {i}"))?,
                }),
                RawStep { probe: Some(t), .. } => {
                    Step::Probe(Probe::parse_lines(&t).with_context(|| format!("step {i}"))?)
                }
                RawStep {
                    subtest: Some(n), ..
                } => {
                    ensure!(!n.trim().is_empty(), "step {i}: subtest name is empty");
                    Step::Subtest(n)
                }
                _ => bail!("step {i}: needs exactly one of apply, delete, expect, probe, subtest"),
            })
        })
        .collect::<Result<Vec<Step>>>()?;
    ensure!(
        raw.model.has_services() || raw.target == Target::Pod,
        "the {:?} model has no Services: its cases say `target: pod`",
        raw.model
    );
    Ok(Case {
        name: raw.name,
        source: raw.source,
        model: raw.model,
        family: raw.family,
        target: raw.target,
        uncertain: raw.uncertain,
        steps,
    })
}

/// Every `*.yaml` of a directory, by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<(PathBuf, Case)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let case = parse_case(&text).with_context(|| format!("parsing {}", p.display()))?;
            Ok((p, case))
        })
        .collect()
}

// ----- objects -----

/// An object of an `apply` step.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
    ClusterNetworkPolicy(Box<ClusterNetworkPolicy>),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Self::Namespace(o) => (Kind::Namespace, &o.metadata),
            Self::Pod(o) => (Kind::Pod, &o.metadata),
            Self::NetworkPolicy(o) => (Kind::NetworkPolicy, &o.metadata),
            Self::ClusterNetworkPolicy(o) => (Kind::ClusterNetworkPolicy, &o.metadata),
        };
        ObjectKey {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    /// Cluster-scoped, as a Namespace is.
    ClusterNetworkPolicy,
}

impl Kind {
    /// Whether objects of this kind live outside namespaces.
    pub fn cluster_scoped(self) -> bool {
        matches!(self, Self::Namespace | Self::ClusterNetworkPolicy)
    }
}

/// Kind, namespace (empty for a cluster-scoped kind) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

fn kind_of(api_version: &str, kind: &str) -> Result<Kind> {
    Ok(match (api_version, kind) {
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Pod") => Kind::Pod,
        ("networking.k8s.io/v1", "NetworkPolicy") => Kind::NetworkPolicy,
        ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy") => Kind::ClusterNetworkPolicy,
        _ => bail!("unsupported object {api_version} {kind}"),
    })
}

/// The non-empty documents of a multi-document YAML text.
fn documents(text: &str) -> Result<Vec<serde_yaml_ng::Value>> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml_ng::Value::deserialize(de).with_context(|| format!("document {i}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn str_at<'a>(v: &'a serde_yaml_ng::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The header of a document: its kind and name, checked.
fn header(i: usize, doc: &serde_yaml_ng::Value) -> Result<ObjectKey> {
    let api = str_at(doc, &["apiVersion"]).with_context(|| format!("document {i}: apiVersion"))?;
    let kind = str_at(doc, &["kind"]).with_context(|| format!("document {i}: kind"))?;
    let kind = kind_of(api, kind).with_context(|| format!("document {i}"))?;
    let name = str_at(doc, &["metadata", "name"])
        .with_context(|| format!("document {i}: metadata.name"))?;
    let namespace = str_at(doc, &["metadata", "namespace"]);
    let namespace = match (kind.cluster_scoped(), namespace) {
        (true, None) => String::new(),
        (true, Some(_)) => bail!("document {i}: a cluster-scoped {kind:?} has no namespace"),
        (_, Some(ns)) => ns.to_string(),
        (_, None) => bail!("document {i}: metadata.namespace is required"),
    };
    Ok(ObjectKey {
        kind,
        namespace,
        name: name.to_string(),
    })
}

/// The objects of an `apply` text (placeholders already replaced).
pub fn parse_objects(text: &str) -> Result<Vec<Object>> {
    documents(text)?
        .into_iter()
        .enumerate()
        .map(|(i, doc)| {
            let key = header(i, &doc)?;
            let ctx = || format!("document {i} ({:?} {})", key.kind, key.name);
            Ok(match key.kind {
                Kind::Namespace => {
                    Object::Namespace(Box::new(serde_yaml_ng::from_value(doc).with_context(ctx)?))
                }
                Kind::Pod => {
                    Object::Pod(Box::new(serde_yaml_ng::from_value(doc).with_context(ctx)?))
                }
                Kind::NetworkPolicy => Object::NetworkPolicy(Box::new(
                    serde_yaml_ng::from_value(doc).with_context(ctx)?,
                )),
                Kind::ClusterNetworkPolicy => Object::ClusterNetworkPolicy(Box::new(
                    serde_yaml_ng::from_value(doc).with_context(ctx)?,
                )),
            })
        })
        .collect()
}

/// The objects a `delete` text names.
pub fn parse_refs(text: &str) -> Result<Vec<ObjectKey>> {
    documents(text)?
        .iter()
        .enumerate()
        .map(|(i, doc)| header(i, doc))
        .collect()
}

// ----- placeholders -----

/// Replaces `${POD_IP:ns/pod}`, `${POD_CIDR32:ns/pod}` and
/// `${POD_CIDR<n>:ns/pod}` (n < 32) in `family`; `ip_of` gives a pod's
/// address in a family. Anything else in `${...}` is an error.
pub fn substitute(
    text: &str,
    family: Family,
    ip_of: impl Fn(&str, Family) -> Option<IpAddr>,
) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .with_context(|| format!("unterminated placeholder at {:?}", &rest[start..]))?;
        out.push_str(&expand(&after[..end], family, &ip_of)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand(
    placeholder: &str,
    family: Family,
    ip_of: &impl Fn(&str, Family) -> Option<IpAddr>,
) -> Result<String> {
    let (what, pod) = placeholder
        .split_once(':')
        .with_context(|| format!("placeholder ${{{placeholder}}} names no pod"))?;
    ensure!(
        pod.split_once('/')
            .is_some_and(|(ns, p)| !ns.is_empty() && !p.is_empty() && !p.contains('/')),
        "placeholder ${{{placeholder}}}: {pod:?} is not ns/pod"
    );
    let ip = ip_of(pod, family)
        .with_context(|| format!("placeholder ${{{placeholder}}}: no {family:?} address"))?;
    ensure!(
        Family::of(ip) == family,
        "placeholder ${{{placeholder}}}: {ip} is not {family:?}"
    );
    let host_len = if family == Family::Ipv4 { 32 } else { 128 };
    Ok(match what {
        "POD_IP" => ip.to_string(),
        "POD_CIDR32" => format!("{ip}/{host_len}"),
        _ => {
            let n: u8 = what
                .strip_prefix("POD_CIDR")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .filter(|&n| n < 32)
                .with_context(|| format!("unknown placeholder ${{{placeholder}}}"))?;
            let net = IpNetwork::new(ip, n)?;
            format!("{}/{n}", net.network())
        }
    })
}

// ----- matrices -----

/// Rows are clients (from), columns servers (to); `true` = connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    /// `ns/pod`, in the order of the header.
    pub pods: Vec<String>,
    /// `cells[from][to]`, indices into `pods`.
    pub cells: Vec<Vec<bool>>,
}

impl Matrix {
    /// The text form: a header `- <pod>...`, then one row per pod in any
    /// order, `.` (connects) or `X` (blocked) per column.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header: Vec<&str> = lines
            .next()
            .context("matrix is empty")?
            .split_whitespace()
            .collect();
        ensure!(
            header.first() == Some(&"-"),
            "matrix header must start with '-'"
        );
        let pods: Vec<String> = header[1..].iter().map(|s| s.to_string()).collect();
        ensure!(!pods.is_empty(), "matrix has no columns");
        let mut seen = BTreeSet::new();
        for p in &pods {
            ensure!(
                p.split_once('/')
                    .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty()),
                "matrix column {p:?} is not ns/pod"
            );
            ensure!(seen.insert(p.as_str()), "matrix column {p} appears twice");
        }
        let index: BTreeMap<&str, usize> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i))
            .collect();
        let mut cells: Vec<Option<Vec<bool>>> = vec![None; pods.len()];
        for line in lines {
            let mut tokens = line.split_whitespace();
            let from = tokens.next().unwrap_or_default();
            let &row = index
                .get(from)
                .with_context(|| format!("matrix row {from:?} is not a column"))?;
            ensure!(cells[row].is_none(), "matrix row {from} appears twice");
            let values = tokens
                .map(|t| match t {
                    "." => Ok(true),
                    "X" => Ok(false),
                    other => bail!("matrix row {from}: cell {other:?} is neither '.' nor 'X'"),
                })
                .collect::<Result<Vec<bool>>>()?;
            ensure!(
                values.len() == pods.len(),
                "matrix row {from} has {} cells for {} columns",
                values.len(),
                pods.len()
            );
            cells[row] = Some(values);
        }
        let cells = cells
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.with_context(|| format!("matrix row {} is missing", pods[i])))
            .collect::<Result<_>>()?;
        Ok(Self { pods, cells })
    }

    /// A matrix over `pods` filled by `f(from, to)`.
    pub fn from_fn(pods: &[String], mut f: impl FnMut(&str, &str) -> bool) -> Self {
        let cells = pods
            .iter()
            .map(|from| pods.iter().map(|to| f(from, to)).collect())
            .collect();
        Self {
            pods: pods.to_vec(),
            cells,
        }
    }

    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        let i = self.pods.iter().position(|p| p == from)?;
        let j = self.pods.iter().position(|p| p == to)?;
        Some(self.cells[i][j])
    }

    /// The text form, with `mark(from, to)` appending `*` to a cell.
    fn render_marked(&self, mark: impl Fn(usize, usize) -> bool) -> String {
        let width = self.pods.iter().map(String::len).max().unwrap_or(1).max(1) + 1;
        let mut s = format!("{:<width$}", "-");
        for p in &self.pods {
            s.push_str(&format!("{p:<width$}"));
        }
        s = s.trim_end().to_string();
        s.push('\n');
        for (i, from) in self.pods.iter().enumerate() {
            let mut line = format!("{from:<width$}");
            for j in 0..self.pods.len() {
                let cell = format!(
                    "{}{}",
                    if self.cells[i][j] { "." } else { "X" },
                    if mark(i, j) { "*" } else { "" }
                );
                line.push_str(&format!("{cell:<width$}"));
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    pub fn render(&self) -> String {
        self.render_marked(|_, _| false)
    }
}

/// `None` when `actual` agrees with `expected` off the diagonal (a pod to
/// itself is not compared); else both matrices, the actual one with `*` on
/// every cell that differs, and the list of those cells.
pub fn diff(expected: &Matrix, actual: &Matrix) -> Option<String> {
    if expected.pods != actual.pods {
        return Some(format!(
            "the matrices are over different pods: expected {:?}, got {:?}\n",
            expected.pods, actual.pods
        ));
    }
    let n = expected.pods.len();
    let differs = |i: usize, j: usize| i != j && expected.cells[i][j] != actual.cells[i][j];
    let cells: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .filter(|&(i, j)| differs(i, j))
        .collect();
    if cells.is_empty() {
        return None;
    }
    let mut s = format!(
        "{} cell(s) differ (rows: from, columns: to; '.' connects, 'X' blocked)\nexpected:\n{}actual (* = differs):\n{}",
        cells.len(),
        expected.render(),
        actual.render_marked(differs)
    );
    for (i, j) in cells {
        s.push_str(&format!(
            "  {} -> {}: expected {}, got {}\n",
            expected.pods[i],
            expected.pods[j],
            if expected.cells[i][j] { "." } else { "X" },
            if actual.cells[i][j] { "." } else { "X" },
        ));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASE: &str = r#"
name: "example"
model: default
steps:
  - apply: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata:
        name: p
        namespace: x
      spec:
        podSelector: {}
      ---
      apiVersion: v1
      kind: Namespace
      metadata:
        name: y
  - delete: |
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata:
        name: p
        namespace: x
  - expect:
      protocol: UDP
      port: 81
      matrix: |
        -   x/a x/b
        x/a .   X
        x/b .   .
"#;

    fn v4(pod: &str, f: Family) -> Option<IpAddr> {
        match (pod, f) {
            ("x/a", Family::Ipv4) => "10.244.1.10".parse().ok(),
            ("x/a", Family::Ipv6) => "fd00:10:244::1:a".parse().ok(),
            _ => None,
        }
    }

    #[test]
    fn a_case_parses_into_its_steps_with_defaults_for_family_and_target() {
        let c = parse_case(CASE).unwrap();
        assert_eq!(c.name, "example");
        assert_eq!(c.family, CaseFamily::Any);
        assert_eq!(c.target, Target::Any);
        assert_eq!(c.steps.len(), 3);
        let Step::Apply(text) = &c.steps[0] else {
            panic!("first step is not apply")
        };
        let objs = parse_objects(text).unwrap();
        assert_eq!(
            objs.iter().map(Object::key).collect::<Vec<_>>(),
            vec![
                ObjectKey {
                    kind: Kind::NetworkPolicy,
                    namespace: "x".into(),
                    name: "p".into()
                },
                ObjectKey {
                    kind: Kind::Namespace,
                    namespace: String::new(),
                    name: "y".into()
                }
            ]
        );
        let Step::Delete(text) = &c.steps[1] else {
            panic!("second step is not delete")
        };
        assert_eq!(parse_refs(text).map(|r| r.len()).ok(), Some(1));
        let Step::Expect(e) = &c.steps[2] else {
            panic!("third step is not expect")
        };
        assert_eq!((e.protocol, e.port), (Protocol::Udp, 81));
        assert_eq!(e.matrix.get("x/a", "x/b"), Some(false));
        assert_eq!(e.matrix.get("x/b", "x/a"), Some(true));
    }

    #[test]
    fn undocumented_keys_are_errors_at_every_level() {
        let top = CASE.replace("model: default", "model: default\ncolour: blue");
        assert!(parse_case(&top).is_err());
        let step = CASE.replace("  - delete: |", "  - remove: |");
        assert!(parse_case(&step).is_err());
        let expect = CASE.replace("      port: 81", "      port: 81\n      timeout: 3");
        assert!(parse_case(&expect).is_err());
        let bad_model = CASE.replace("model: default", "model: big");
        assert!(parse_case(&bad_model).is_err());
        let no_name = CASE.replace("name: \"example\"\n", "");
        assert!(parse_case(&no_name).is_err());
        let bad_proto = CASE.replace("protocol: UDP", "protocol: ICMP");
        assert!(parse_case(&bad_proto).is_err());
        let two_in_one = CASE.replace("  - delete: |", "    delete: |");
        assert!(parse_case(&two_in_one).is_err());
    }

    #[test]
    fn family_and_target_accept_only_their_documented_values() {
        let with =
            |k: &str, v: &str| CASE.replace("model: default", &format!("model: default\n{k}: {v}"));
        assert_eq!(
            parse_case(&with("family", "ipv6")).map(|c| c.family).ok(),
            Some(CaseFamily::Ipv6)
        );
        assert_eq!(
            parse_case(&with("target", "pod")).map(|c| c.target).ok(),
            Some(Target::Pod)
        );
        assert!(parse_case(&with("family", "ipv5")).is_err());
        assert!(parse_case(&with("target", "node")).is_err());
        assert_eq!(CaseFamily::Any.families(), vec![Family::Ipv4, Family::Ipv6]);
    }

    #[test]
    fn placeholders_become_addresses_and_canonical_prefixes_in_the_family() {
        let s = substitute(
            "a ${POD_IP:x/a} b ${POD_CIDR32:x/a} c ${POD_CIDR4:x/a} d ${POD_CIDR16:x/a}",
            Family::Ipv4,
            v4,
        );
        assert_eq!(
            s.ok().as_deref(),
            Some("a 10.244.1.10 b 10.244.1.10/32 c 0.0.0.0/4 d 10.244.0.0/16")
        );
        let s6 = substitute("${POD_CIDR32:x/a} ${POD_CIDR4:x/a}", Family::Ipv6, v4);
        assert_eq!(s6.ok().as_deref(), Some("fd00:10:244::1:a/128 f000::/4"));
    }

    #[test]
    fn unknown_or_unresolvable_placeholders_are_errors() {
        for bad in [
            "${POD_IP:x/zz}",
            "${POD_MAC:x/a}",
            "${POD_CIDR33:x/a}",
            "${POD_CIDR:x/a}",
            "${POD_IP:x}",
            "${POD_IP}",
            "${POD_IP:x/a",
        ] {
            assert!(substitute(bad, Family::Ipv4, v4).is_err(), "{bad}");
        }
        assert_eq!(
            substitute("no placeholders $HOME", Family::Ipv4, v4)
                .ok()
                .as_deref(),
            Some("no placeholders $HOME")
        );
    }

    #[test]
    fn malformed_matrices_are_rejected() {
        for bad in [
            "",
            "x/a x/b\nx/a . .\nx/b . .",
            "- x/a x/b\nx/a . .",
            "- x/a x/b\nx/a . .\nx/b . o",
            "- x/a x/b\nx/a . .\nx/b .",
            "- x/a x/b\nx/a . .\nx/a . .",
            "- x/a x/b\nx/a . .\nx/c . .",
            "- x/a x/a\nx/a . .\nx/a . .",
        ] {
            assert!(Matrix::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_diff_ignores_the_diagonal_and_marks_each_differing_cell() {
        let e = Matrix::parse("- x/a x/b\nx/a . X\nx/b . .").unwrap();
        let same_off_diagonal = Matrix::parse("- x/a x/b\nx/a X X\nx/b . X").unwrap();
        assert_eq!(diff(&e, &same_off_diagonal), None);
        let a = Matrix::parse("- x/a x/b\nx/a . .\nx/b . .").unwrap();
        let d = diff(&e, &a).unwrap();
        assert!(d.contains("1 cell(s) differ"), "{d}");
        assert!(d.contains("x/a -> x/b: expected X, got ."), "{d}");
        assert!(d.contains("x/a .   .*"), "{d}");
    }

    #[test]
    fn a_rendered_matrix_parses_back_to_itself() {
        let pods: Vec<String> = ["x/a", "x/b", "y/a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = Matrix::from_fn(&pods, |f, t| f < t);
        assert_eq!(Matrix::parse(&m.render()).ok(), Some(m));
    }

    #[test]
    fn objects_of_unsupported_kinds_or_without_names_are_errors() {
        assert!(
            parse_objects("apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  namespace: x\n")
                .is_err()
        );
        assert!(parse_objects("apiVersion: v1\nkind: Pod\nmetadata:\n  namespace: x\n").is_err());
        assert!(parse_objects("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n").is_err());
        assert!(
            parse_refs("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  namespace: b\n")
                .is_err()
        );
        assert_eq!(parse_objects("---\n---\n").map(|v| v.len()).ok(), Some(0));
    }
}
