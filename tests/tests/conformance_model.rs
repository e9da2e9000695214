//! The reachability cases run through the compiler and its lookup model, in
//! IPv4 and in IPv6: no kernel, no namespaces, milliseconds. The cases of
//! `tests/conformance/upstream` and `tests/conformance/cnp` always, plus
//! every directory listed in `SLUICE_CASES` (separated by `:`).
//!
//! The model cluster is the case's model file (`tests/conformance/model-*.yaml`)
//! with synthetic addresses and two Nodes; every pod is a local endpoint,
//! except host-network pods, which have their node's address (pods are put
//! on the nodes in turn, as the runner does on two nodes). Two judges, each
//! held to every expectation: the compiled policy (`Compiler::verdict`, the
//! data path's decision from the maps) and the oracle written from the API
//! texts (`tests/src/oracle.rs`, `oracle/cnp.rs`); a probe succeeds when the
//! judge lets the flow through and the server has a container port for the
//! protocol and port. SCTP is judged too (no kernel needed).
//! Services are not modelled: policy is judged after DNAT, so `target:
//! service` and `target: pod` give the same answer here.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use sluice_agent::policy::{
    Compiler, Locality,
    k8s_openapi::{
        api::{
            core::v1::{Namespace, Node, NodeAddress, NodeStatus, Pod, PodIP, PodStatus},
            networking::v1::NetworkPolicy,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    },
};
use sluice_tests::cases::{
    self, Case, Family, Kind, Matrix, Model as CaseModel, Object, ObjectKey, Protocol, Step, diff,
    parse_objects, parse_refs, substitute,
};
use sluice_tests::oracle::{Oracle, Proto, World};

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// The objects of a model file, parsed once.
fn model_objects(model: CaseModel) -> Result<&'static [Object]> {
    static MODELS: OnceLock<BTreeMap<CaseModel, Result<Vec<Object>, String>>> = OnceLock::new();
    let all = MODELS.get_or_init(|| {
        [CaseModel::Default, CaseModel::Cnp]
            .into_iter()
            .map(|m| {
                let path = conformance_dir().join(m.file_name());
                let objects = std::fs::read_to_string(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|t| parse_objects(&t))
                    .map_err(|e| format!("{}: {e:#}", path.display()));
                (m, objects)
            })
            .collect()
    });
    match all.get(&model) {
        Some(Ok(objects)) => Ok(objects),
        Some(Err(e)) => bail!("{e}"),
        None => bail!("no model {model:?}"),
    }
}

/// The model's Nodes: two, labelled as kubelet labels them, with the
/// addresses the runner gives its nodes.
const NODES: usize = 2;

fn node_ip(i: usize, family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1 + i as u8)),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 1 + i as u16)),
    }
}

fn node(i: usize) -> Node {
    let name = format!("node-{i}");
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", "amd64"),
                    ("kubernetes.io/hostname", name.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(
                [Family::Ipv4, Family::Ipv6]
                    .into_iter()
                    .map(|f| NodeAddress {
                        type_: "InternalIP".into(),
                        address: node_ip(i, f).to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn is_host_network(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

struct ModelPod {
    pod: Pod,
    ip: IpAddr,
}

/// One run of one case in one family.
struct Model {
    family: Family,
    compiler: Compiler,
    pods: BTreeMap<String, ModelPod>,
    /// The objects as the oracle reads them (pods are in `pods`).
    namespaces: BTreeMap<String, Namespace>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
    cluster_policies: BTreeMap<String, sluice_api::ClusterNetworkPolicy>,
    next_host: u32,
    /// Pods created so far: the next one goes on node `created % NODES`.
    created: usize,
    diagnostics: Vec<String>,
}

impl Model {
    fn new(model: CaseModel, family: Family) -> Result<Self> {
        let mut m = Self {
            family,
            compiler: Compiler::new(Locality::All),
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            policies: BTreeMap::new(),
            cluster_policies: BTreeMap::new(),
            next_host: 0,
            created: 0,
            diagnostics: Vec::new(),
        };
        for i in 0..NODES {
            let changes = m.compiler.upsert_node(&node(i));
            m.diagnostics
                .extend(changes.diagnostics.iter().map(|d| d.to_string()));
        }
        for obj in model_objects(model)? {
            m.apply(obj.clone());
        }
        Ok(m)
    }

    /// A fresh address: 10.244.0.0/16 or fd00:10:244::/64, so that every
    /// pod shares the prefixes the cases build (`${POD_CIDR4:..}`).
    fn allocate(&mut self) -> IpAddr {
        self.next_host += 1;
        let n = self.next_host;
        match self.family {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(
                10,
                244,
                (n / 200) as u8,
                (n % 200 + 10) as u8,
            )),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, n as u16)),
        }
    }

    fn apply(&mut self, obj: Object) {
        let changes = match obj {
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, (*ns).clone());
                self.compiler.upsert_namespace(&ns)
            }
            Object::NetworkPolicy(np) => {
                let key = (
                    np.metadata.namespace.clone().unwrap_or_default(),
                    np.metadata.name.clone().unwrap_or_default(),
                );
                self.policies.insert(key, (*np).clone());
                self.compiler.upsert_policy(&np)
            }
            Object::ClusterNetworkPolicy(cnp) => {
                let name = cnp.metadata.name.clone().unwrap_or_default();
                self.cluster_policies.insert(name, (*cnp).clone());
                self.compiler.upsert_cluster_policy(&cnp)
            }
            Object::Pod(new) => {
                let key = new.metadata.namespace.clone().unwrap_or_default()
                    + "/"
                    + new.metadata.name.as_deref().unwrap_or_default();
                // An existing pod only changes labels: its address and its
                // containers stay.
                let entry = match self.pods.remove(&key) {
                    Some(mut old) => {
                        old.pod.metadata.labels = new.metadata.labels;
                        old
                    }
                    None => {
                        // A host-network pod has its node's address.
                        let ip = if is_host_network(&new) {
                            node_ip(self.created % NODES, self.family)
                        } else {
                            self.allocate()
                        };
                        self.created += 1;
                        let mut pod = *new;
                        pod.status = Some(PodStatus {
                            pod_ip: Some(ip.to_string()),
                            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
                            phase: Some("Running".into()),
                            ..Default::default()
                        });
                        ModelPod { pod, ip }
                    }
                };
                let changes = self.compiler.upsert_pod(&entry.pod);
                self.pods.insert(key, entry);
                changes
            }
        };
        self.diagnostics
            .extend(changes.diagnostics.iter().map(|d| d.to_string()));
    }

    fn delete(&mut self, key: &ObjectKey) {
        match key.kind {
            Kind::Namespace => {
                self.namespaces.remove(&key.name);
                self.compiler.delete_namespace(&key.name);
            }
            Kind::NetworkPolicy => {
                self.policies
                    .remove(&(key.namespace.clone(), key.name.clone()));
                self.compiler.delete_policy(&key.namespace, &key.name);
            }
            Kind::ClusterNetworkPolicy => {
                self.cluster_policies.remove(&key.name);
                self.compiler.delete_cluster_policy(&key.name);
            }
            Kind::Pod => {
                self.pods.remove(&format!("{}/{}", key.namespace, key.name));
                self.compiler.delete_pod(&key.namespace, &key.name);
            }
        }
    }

    fn serves(&self, pod: &str, proto: Protocol, port: u16) -> bool {
        let Some(p) = self.pods.get(pod) else {
            return false;
        };
        p.pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .any(|cp| {
                cp.container_port == i32::from(port)
                    && cp.protocol.as_deref().unwrap_or("TCP") == proto.name()
            })
    }

    /// The objects now, as the oracle reads them.
    fn world(&self) -> World {
        World {
            namespaces: self.namespaces.values().cloned().collect(),
            pods: self.pods.values().map(|p| p.pod.clone()).collect(),
            policies: self.policies.values().cloned().collect(),
            node_ips: (0..NODES)
                .flat_map(|i| [Family::Ipv4, Family::Ipv6].map(|f| node_ip(i, f)))
                .collect(),
            cluster_policies: self.cluster_policies.values().cloned().collect(),
            nodes: (0..NODES).map(node).collect(),
        }
    }

    /// From `from`'s address to `to`'s (a host-network pod's is its
    /// node's): (the data path's decision from the compiled maps, the
    /// oracle's). A pod that is not in the model is an error.
    fn probe(
        &self,
        oracle: &Oracle<'_>,
        from: &str,
        to: &str,
        proto: Protocol,
        port: u16,
    ) -> Result<(bool, bool)> {
        let ip = |p: &str| {
            self.pods
                .get(p)
                .map(|p| p.ip)
                .with_context(|| format!("{p} is no pod of the model"))
        };
        let (src, dst) = (ip(from)?, ip(to)?);
        let serves = self.serves(to, proto, port);
        let o = match proto {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Sctp => Proto::Sctp,
        };
        Ok((
            serves && self.compiler.verdict(src, dst, proto.number(), port),
            serves && oracle.allowed(src, dst, o, port),
        ))
    }
}

/// Runs one case in one family; returns the failures, one text each (a
/// failure in a subtest names it).
fn run(case: &Case, family: Family) -> Result<Vec<String>> {
    let mut m = Model::new(case.model, family)?;
    let mut failures = Vec::new();
    let mut subtest: Option<&str> = None;
    let fail = |failures: &mut Vec<String>, subtest: Option<&str>, text: String| {
        failures.push(match subtest {
            Some(s) => format!("subtest {s:?}: {text}"),
            None => text,
        });
    };
    for (i, step) in case.steps.iter().enumerate() {
        match step {
            Step::Subtest(name) => subtest = Some(name),
            Step::Probe(probes) => {
                let world = m.world();
                let oracle = Oracle::new(&world);
                let mut wrong = Vec::new();
                for p in probes {
                    let (compiled, oracle) =
                        m.probe(&oracle, &p.from, &p.to, p.protocol, p.port)?;
                    for (judge, got) in [("compiler", compiled), ("oracle", oracle)] {
                        if got != p.connects {
                            wrong.push(format!("  {judge}: {}", p.describe(got)));
                        }
                    }
                }
                if !wrong.is_empty() {
                    fail(
                        &mut failures,
                        subtest,
                        format!("step {i}: probes differ:\n{}", wrong.join("\n")),
                    );
                }
            }
            Step::Apply(text) => {
                let text = substitute(text, family, |pod, f| {
                    m.pods
                        .get(pod)
                        .map(|p| p.ip)
                        .filter(|ip| Family::of(*ip) == f)
                })
                .with_context(|| format!("step {i}"))?;
                for obj in parse_objects(&text).with_context(|| format!("step {i}"))? {
                    m.apply(obj);
                }
            }
            Step::Delete(text) => {
                for key in parse_refs(text).with_context(|| format!("step {i}"))? {
                    m.delete(&key);
                }
            }
            Step::Expect(e) => {
                let world = m.world();
                let oracle = Oracle::new(&world);
                let verdicts = |which: fn((bool, bool)) -> bool| {
                    Matrix::from_fn(&e.matrix.pods, |from, to| {
                        m.probe(&oracle, from, to, e.protocol, e.port)
                            .map(which)
                            .unwrap_or(false)
                    })
                };
                let diffs: Vec<String> = [
                    ("compiler", verdicts(|v| v.0)),
                    ("oracle", verdicts(|v| v.1)),
                ]
                .into_iter()
                .filter_map(|(judge, actual)| {
                    diff(&e.matrix, &actual).map(|d| format!("{judge}:\n{d}"))
                })
                .collect();
                if !diffs.is_empty() {
                    fail(
                        &mut failures,
                        subtest,
                        format!(
                            "step {i} ({} {}):\n{}",
                            e.protocol.name(),
                            e.port,
                            diffs.join("\n")
                        ),
                    );
                }
            }
        }
        if matches!(step, Step::Expect(_) | Step::Probe(_)) {
            // The incremental state must be what a recompute from the
            // objects gives.
            let recomputed = m.compiler.recompute_all();
            if !recomputed.endpoints.is_empty() || !recomputed.ipcache.is_empty() {
                fail(
                    &mut failures,
                    subtest,
                    format!(
                        "step {i}: a full recompute changed {:?}",
                        recomputed.endpoints
                    ),
                );
            }
        }
    }
    if !m.diagnostics.is_empty() {
        eprintln!(
            "{} [{family:?}]: diagnostics: {:#?}",
            case.name, m.diagnostics
        );
    }
    Ok(failures)
}

fn run_dir(dir: &Path) -> Result<(usize, Vec<String>)> {
    let loaded = cases::load_dir(dir)?;
    let mut failures = Vec::new();
    for (path, case) in &loaded {
        for family in case.family.families() {
            let started = Instant::now();
            match run(case, family) {
                Ok(f) if f.is_empty() => {}
                Ok(f) => failures.push(format!(
                    "{} [{family:?}] {}:\n{}",
                    path.display(),
                    case.name,
                    f.join("\n")
                )),
                Err(e) => failures.push(format!(
                    "{} [{family:?}] {}: {e:#}",
                    path.display(),
                    case.name
                )),
            }
            let took = started.elapsed();
            if took.as_millis() > 100 {
                eprintln!("{}: {family:?} took {took:?}", path.display());
            }
        }
    }
    Ok((loaded.len(), failures))
}

#[test]
fn every_upstream_case_and_every_sluice_cases_case_holds_in_the_model_in_both_families()
-> Result<()> {
    let started = Instant::now();
    let (n, mut failures) = run_dir(&conformance_dir().join("upstream"))?;
    eprintln!("{n} upstream cases in {:?}", started.elapsed());
    if n != 48 {
        bail!("expected the 48 upstream cases, found {n}");
    }
    // Extra directories, `:`-separated, as the other runners take them.
    for dir in std::env::var_os("SLUICE_CASES")
        .map(|d| std::env::split_paths(&d).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let (n, f) = run_dir(&dir)?;
        eprintln!("{}: {n} cases", dir.display());
        if n == 0 {
            bail!("{} holds no case", dir.display());
        }
        failures.extend(f);
    }
    if !failures.is_empty() {
        bail!(
            "{} failure(s):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

#[test]
fn the_model_blocks_what_a_deny_all_policy_denies_so_the_runner_can_fail() -> Result<()> {
    // A runner that always answered "connects" would pass most cases; this
    // case expects the opposite of what its policy does and must fail.
    let text =
        std::fs::read_to_string(conformance_dir().join("upstream/002-default-deny-all.yaml"))?;
    let mut case = cases::parse_case(&text)?;
    for step in &mut case.steps {
        if let Step::Expect(e) = step {
            e.matrix = Matrix::from_fn(&e.matrix.pods, |_, _| true);
        }
    }
    for family in [Family::Ipv4, Family::Ipv6] {
        let failures = run(&case, family)?;
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("x/a -> x/b: expected ., got X"),
            "{}",
            failures[0]
        );
    }
    Ok(())
}

/// The subtests of the cases in `dir`.
fn subtests(dir: &Path) -> Result<usize> {
    Ok(cases::load_dir(dir)?
        .iter()
        .flat_map(|(_, c)| c.steps.iter())
        .filter(|s| matches!(s, Step::Subtest(_)))
        .count())
}

#[test]
fn every_ported_network_policy_api_case_holds_in_the_model_in_both_families() -> Result<()> {
    // tests/conformance/cnp: the 24 tests (92 subtests) of
    // kubernetes-sigs/network-policy-api's conformance suite, SCTP included
    // (the compiler needs no kernel support for it).
    let dir = conformance_dir().join("cnp");
    let started = Instant::now();
    let (n, failures) = run_dir(&dir)?;
    let subtests = subtests(&dir)?;
    eprintln!(
        "{n} network-policy-api cases, {subtests} subtests, in {:?}",
        started.elapsed()
    );
    if (n, subtests) != (24, 92) {
        bail!("expected 24 cases with 92 subtests, found {n} with {subtests}");
    }
    if !failures.is_empty() {
        bail!(
            "{} failure(s):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

#[test]
fn the_model_fails_a_ported_case_whose_probe_expects_what_an_admin_deny_blocks() -> Result<()> {
    // As above for probes: every expectation of the Admin-tier TCP egress
    // case turned around must fail, each subtest on its own.
    let text =
        std::fs::read_to_string(conformance_dir().join("cnp/001-admin-tier-egress-tcp.yaml"))?;
    let mut case = cases::parse_case(&text)?;
    let mut probes = 0;
    for step in &mut case.steps {
        if let Step::Probe(ps) = step {
            for p in ps {
                p.connects = !p.connects;
                probes += 1;
            }
        }
    }
    for family in [Family::Ipv4, Family::Ipv6] {
        let failures = run(&case, family)?;
        assert_eq!(failures.len(), 6, "{failures:#?}");
        // Both judges, the compiler and the oracle, see each one.
        let wrong = failures
            .iter()
            .map(|f| f.matches(": expected ").count())
            .sum::<usize>();
        assert_eq!(wrong, 2 * probes, "{failures:#?}");
        assert!(
            failures[1].starts_with("subtest \"Should support an 'allow-egress' policy for TCP protocol at the specified port\""),
            "{}",
            failures[1]
        );
    }
    Ok(())
}
