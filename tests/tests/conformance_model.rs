//! The reachability cases run through the compiler and its lookup model, in
//! IPv4 and in IPv6: no kernel, no namespaces, milliseconds. The cases of
//! `tests/conformance/upstream` always, plus every directory listed in
//! `SLUICE_CASES` (separated by `:`).
//!
//! The model cluster is `tests/conformance/model-default.yaml` with synthetic
//! addresses; every pod is a local endpoint. A probe succeeds when the
//! compiled policy lets the flow through (`Compiler::would_allow`) and the
//! server has a container port for the protocol and port. Services are not
//! modelled: policy is judged after DNAT, so `target: service` and `target:
//! pod` give the same answer here.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use sluice_agent::policy::{
    Compiler, Locality, ObjectRef,
    k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus},
};
use sluice_tests::cases::{
    self, Case, Family, Kind, Matrix, Object, ObjectKey, Protocol, Step, diff, parse_objects,
    parse_refs, substitute,
};

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// The objects of `model-default.yaml`, parsed once.
fn default_model() -> Result<&'static [Object]> {
    static MODEL: OnceLock<Result<Vec<Object>, String>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = conformance_dir().join("model-default.yaml");
            std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| parse_objects(&t))
                .map_err(|e| format!("{}: {e:#}", path.display()))
        })
        .as_deref()
        .map_err(|e| anyhow::anyhow!("{e}"))
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
    next_host: u32,
    diagnostics: Vec<String>,
}

impl Model {
    fn new(family: Family) -> Result<Self> {
        let mut m = Self {
            family,
            compiler: Compiler::new(Locality::All),
            pods: BTreeMap::new(),
            next_host: 0,
            diagnostics: Vec::new(),
        };
        for obj in default_model()? {
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
            Object::Namespace(ns) => self.compiler.upsert_namespace(&ns),
            Object::NetworkPolicy(np) => self.compiler.upsert_policy(&np),
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
                        let ip = self.allocate();
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
                self.compiler.delete_namespace(&key.name);
            }
            Kind::NetworkPolicy => {
                self.compiler.delete_policy(&key.namespace, &key.name);
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

    fn probe(&self, from: &str, to: &str, proto: Protocol, port: u16) -> bool {
        let obj = |s: &str| {
            let (ns, name) = s.split_once('/').unwrap_or((s, ""));
            ObjectRef::new(ns, name)
        };
        self.serves(to, proto, port)
            && self
                .compiler
                .would_allow(&obj(from), &obj(to), proto.number(), port)
    }
}

/// Runs one case in one family; returns the failures, one text each.
fn run(case: &Case, family: Family) -> Result<Vec<String>> {
    let mut m = Model::new(family)?;
    let mut failures = Vec::new();
    for (i, step) in case.steps.iter().enumerate() {
        match step {
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
                let actual = Matrix::from_fn(&e.matrix.pods, |from, to| {
                    m.probe(from, to, e.protocol, e.port)
                });
                if let Some(d) = diff(&e.matrix, &actual) {
                    failures.push(format!("step {i} ({} {}):\n{d}", e.protocol.name(), e.port));
                }
                // The incremental state must be what a recompute from the
                // objects gives.
                let recomputed = m.compiler.recompute_all();
                if !recomputed.endpoints.is_empty() || !recomputed.ipcache.is_empty() {
                    failures.push(format!(
                        "step {i}: a full recompute changed {:?}",
                        recomputed.endpoints
                    ));
                }
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
