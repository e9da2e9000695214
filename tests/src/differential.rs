//! The differential check: random clusters and NetworkPolicies, random
//! probes, the oracle's verdict ([`crate::oracle`]) against the whole
//! pipeline's ([`crate::pipeline`]); then random changes applied one watch
//! event at a time and every probe compared again. A divergence is shrunk
//! to the smallest world that still diverges and saved as a regression
//! case (JSON: the world before and after the change, the probe, the
//! oracle's verdict) that the test replays every run.
//!
//! Used by `tests/tests/differential.rs` (a fixed seed set) and `cargo xtask
//! fuzz-policy` (new seeds for as long as asked).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus},
        networking::v1::{
            IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
            NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, Serialize};

pub mod cnp;

use crate::{
    oracle::{Oracle, Proto, World},
    pipeline::Pipeline,
    rng::Rng,
};

const NAMESPACES: &[&str] = &["ns-a", "ns-b", "ns-c"];
const NS_LABELS: &[(&str, &[&str])] = &[("team", &["red", "blue"]), ("env", &["prod", "dev"])];
const POD_LABELS: &[(&str, &[&str])] = &[
    ("app", &["web", "db", "api"]),
    ("tier", &["front", "back"]),
    ("canary", &["yes"]),
];
const PORT_NAMES: &[&str] = &["http", "dns", "metrics", "admin"];
const PORTS: &[u16] = &[53, 80, 81, 443, 5000, 5003, 8080, 9000];
const NODE4: &str = "10.255.0.1";
const NODE6: &str = "fd00:255::1";
/// Addresses that belong to no pod: outside every pod range, and inside.
const EXTERNAL: &[&str] = &[
    "192.168.1.7",
    "192.168.2.9",
    "8.8.8.8",
    "10.0.9.9",
    "2001:db8::5",
    "2606:4700::1",
    "fd00::9:9",
];
/// CIDRs of ipBlocks, covering pods (10.0.<ns>.x, fd00::<ns>:x), the node
/// and the external addresses in different ways.
const CIDRS: &[&str] = &[
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.2.0/24",
    "10.0.1.0/28",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "192.168.0.0/16",
    "192.168.1.0/24",
    "10.255.0.1/32",
    "fd00::/16",
    "fd00::1:0/112",
    "fd00::2:0/112",
    "fd00::1:0/124",
    "::/0",
    "2001:db8::/32",
    "fd00:255::1/128",
];

fn meta(ns: Option<&str>, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(str::to_string),
        name: Some(name.to_string()),
        labels: (!labels.is_empty()).then_some(labels),
        ..ObjectMeta::default()
    }
}

fn labels(rng: &mut Rng, table: &[(&str, &[&str])]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, vs) in table {
        if rng.chance(55) {
            out.insert((*k).to_string(), rng.pick(vs).to_string());
        }
    }
    out
}

fn selector(rng: &mut Rng, table: &[(&str, &[&str])]) -> LabelSelector {
    let mut s = LabelSelector::default();
    match rng.below(4) {
        0 => {}
        1 => {
            let (k, vs) = rng.pick(table);
            s.match_labels = Some(BTreeMap::from([(k.to_string(), rng.pick(vs).to_string())]));
        }
        _ => {
            let mut exprs = Vec::new();
            for _ in 0..=rng.below(2) {
                let (k, vs) = rng.pick(table);
                let values: Vec<String> = vs
                    .iter()
                    .filter(|_| rng.chance(60))
                    .map(|v| v.to_string())
                    .collect();
                let values = if values.is_empty() {
                    vec![vs[0].to_string()]
                } else {
                    values
                };
                let (op, values) = match rng.below(40) {
                    0..=9 => ("In", Some(values)),
                    10..=19 => ("NotIn", Some(values)),
                    20..=28 => ("Exists", None),
                    29..=37 => ("DoesNotExist", None),
                    // Invalid: what the compiler documents (rule dropped).
                    38 => ("Equals", Some(values)),
                    _ => ("In", Some(vec![])),
                };
                exprs.push(LabelSelectorRequirement {
                    key: k.to_string(),
                    operator: op.to_string(),
                    values,
                });
            }
            s.match_expressions = Some(exprs);
            if rng.chance(30) {
                let (k, vs) = rng.pick(table);
                s.match_labels = Some(BTreeMap::from([(k.to_string(), rng.pick(vs).to_string())]));
            }
        }
    }
    s
}

fn pod_ip(ns: usize, n: u32, v6: bool) -> String {
    if v6 {
        format!("fd00::{ns}:{n:x}")
    } else {
        format!("10.0.{ns}.{}", n % 250 + 1)
    }
}

fn pod(rng: &mut Rng, ns: usize, name: &str, serial: &mut u32) -> Pod {
    let mut ports = Vec::new();
    for name in PORT_NAMES {
        if rng.chance(40) {
            ports.push(ContainerPort {
                name: Some((*name).to_string()),
                container_port: i32::from(rng.pick(PORTS)),
                protocol: match rng.below(4) {
                    0 => None,
                    1 => Some("TCP".into()),
                    2 => Some("UDP".into()),
                    _ => Some("SCTP".into()),
                },
                ..ContainerPort::default()
            });
        }
    }
    let host_network = rng.chance(6);
    let (v4, v6) = match rng.below(4) {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    *serial += 1;
    let ips: Vec<String> = if host_network {
        vec![NODE4.into(), NODE6.into()]
    } else {
        [(v4, false), (v6, true)]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, six)| pod_ip(ns, *serial, six))
            .collect()
    };
    let phase = match rng.below(20) {
        0 => "Succeeded",
        1 => "Pending",
        _ => "Running",
    };
    Pod {
        metadata: meta(Some(NAMESPACES[ns]), name, labels(rng, POD_LABELS)),
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            host_network: host_network.then_some(true),
            containers: vec![Container {
                name: "main".into(),
                ports: (!ports.is_empty()).then_some(ports),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: ips.first().cloned(),
            pod_ips: Some(ips.into_iter().map(|ip| PodIP { ip }).collect()),
            ..PodStatus::default()
        }),
    }
}

fn port(rng: &mut Rng) -> NetworkPolicyPort {
    let protocol = match rng.below(20) {
        0..=5 => None,
        6..=9 => Some("TCP".into()),
        10..=14 => Some("UDP".into()),
        15..=18 => Some("SCTP".into()),
        _ => Some("ICMP".into()),
    };
    let (port, end_port) = match rng.below(20) {
        0..=2 => (None, None),
        3..=9 => (Some(IntOrString::Int(i32::from(rng.pick(PORTS)))), None),
        10..=13 => {
            let a = rng.pick(PORTS);
            let b = if rng.chance(10) {
                a.saturating_sub(1)
            } else {
                a + rng.below(3000) as u16
            };
            (Some(IntOrString::Int(i32::from(a))), Some(i32::from(b)))
        }
        14..=18 => (Some(IntOrString::String(rng.pick(PORT_NAMES).into())), None),
        _ => (None, Some(90)),
    };
    NetworkPolicyPort {
        protocol,
        port,
        end_port,
    }
}

fn ip_block(rng: &mut Rng) -> IPBlock {
    let cidr = rng.pick(CIDRS);
    let outer = crate_cidr(cidr);
    let inside: Vec<&str> = CIDRS
        .iter()
        .copied()
        .filter(|c| {
            let i = crate_cidr(c);
            i.1 > outer.1 && outer.0.is_ipv4() == i.0.is_ipv4() && in_prefix(i.0, outer)
        })
        .collect();
    let except = if !inside.is_empty() && rng.chance(40) {
        Some(vec![rng.pick(&inside).to_string()])
    } else if rng.chance(3) {
        // Invalid: not inside.
        Some(vec![rng.pick(CIDRS).to_string()])
    } else {
        None
    };
    IPBlock {
        cidr: cidr.to_string(),
        except,
    }
}

fn crate_cidr(s: &str) -> (IpAddr, u8) {
    let (a, l) = s.split_once('/').unwrap_or((s, "0"));
    (
        a.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        l.parse().unwrap_or(0),
    )
}

fn in_prefix(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let bits = |a: IpAddr| match a {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    };
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    ip.is_ipv4() == net.is_ipv4() && bits(ip) & mask == bits(net) & mask
}

fn peers(rng: &mut Rng) -> Option<Vec<NetworkPolicyPeer>> {
    match rng.below(10) {
        0 => None,
        1 => Some(vec![]),
        _ => Some(
            (0..=rng.below(2))
                .map(|_| match rng.below(10) {
                    0..=2 => NetworkPolicyPeer {
                        pod_selector: Some(selector(rng, POD_LABELS)),
                        ..NetworkPolicyPeer::default()
                    },
                    3..=4 => NetworkPolicyPeer {
                        namespace_selector: Some(selector(rng, NS_LABELS)),
                        ..NetworkPolicyPeer::default()
                    },
                    5..=6 => NetworkPolicyPeer {
                        namespace_selector: Some(selector(rng, NS_LABELS)),
                        pod_selector: Some(selector(rng, POD_LABELS)),
                        ..NetworkPolicyPeer::default()
                    },
                    _ => NetworkPolicyPeer {
                        ip_block: Some(ip_block(rng)),
                        ..NetworkPolicyPeer::default()
                    },
                })
                .collect(),
        ),
    }
}

fn ports(rng: &mut Rng) -> Option<Vec<NetworkPolicyPort>> {
    match rng.below(6) {
        0 => None,
        1 => Some(vec![]),
        _ => Some((0..=rng.below(2)).map(|_| port(rng)).collect()),
    }
}

fn policy(rng: &mut Rng, name: &str) -> NetworkPolicy {
    let ns = rng.pick(NAMESPACES);
    let ingress = (rng.chance(75)).then(|| {
        (0..rng.below(3))
            .map(|_| NetworkPolicyIngressRule {
                from: peers(rng),
                ports: ports(rng),
            })
            .collect()
    });
    let egress = (rng.chance(60)).then(|| {
        (0..rng.below(3))
            .map(|_| {
                let to = peers(rng);
                let ports = ports(rng);
                NetworkPolicyEgressRule { to, ports }
            })
            .collect()
    });
    let policy_types = match rng.below(12) {
        0..=4 => None,
        5 => Some(vec![]),
        6..=7 => Some(vec!["Ingress".into()]),
        8..=9 => Some(vec!["Egress".into()]),
        10 => Some(vec!["Ingress".into(), "Egress".into()]),
        _ => Some(vec!["Egress".into(), "Sideways".into()]),
    };
    NetworkPolicy {
        metadata: meta(Some(ns), name, BTreeMap::new()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(rng, POD_LABELS)),
            policy_types,
            ingress,
            egress,
        }),
    }
}

/// A random cluster: namespaces with labels, 2-4 pods each, 1-4 policies.
pub fn world(rng: &mut Rng, serial: &mut u32) -> World {
    let namespaces = NAMESPACES
        .iter()
        .map(|n| Namespace {
            metadata: meta(None, n, labels(rng, NS_LABELS)),
            ..Namespace::default()
        })
        .collect();
    let mut pods = Vec::new();
    for ns in 0..NAMESPACES.len() {
        for i in 0..2 + rng.below(3) {
            pods.push(pod(rng, ns, &format!("p{i}"), serial));
        }
    }
    let policies = (0..1 + rng.below(4))
        .map(|i| policy(rng, &format!("np{i}")))
        .collect();
    World {
        namespaces,
        pods,
        policies,
        node_ips: vec![
            NODE4.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            NODE6.parse().unwrap_or(IpAddr::from([0; 16])),
        ],
        ..World::default()
    }
}

/// One random change: relabel a pod or a namespace, add, remove or
/// replace a policy, give a pod new addresses, or replace a pod.
pub fn mutate(rng: &mut Rng, w: &World, serial: &mut u32) -> World {
    let mut w = w.clone();
    match rng.below(7) {
        0 => {
            let i = rng.below(w.pods.len());
            w.pods[i].metadata.labels = Some(labels(rng, POD_LABELS)).filter(|l| !l.is_empty());
        }
        1 => {
            let i = rng.below(w.namespaces.len());
            w.namespaces[i].metadata.labels =
                Some(labels(rng, NS_LABELS)).filter(|l| !l.is_empty());
        }
        2 => {
            let name = format!("np{}", 10 + rng.below(1000));
            let mut p = policy(rng, &name);
            // A name its namespace does not have yet: the API holds one
            // object per name, and the oracle and the compiler must see
            // the same world.
            let taken = |p: &NetworkPolicy| {
                w.policies.iter().any(|q| {
                    q.metadata.namespace == p.metadata.namespace
                        && q.metadata.name == p.metadata.name
                })
            };
            let mut k = 1000;
            while taken(&p) {
                k += 1;
                p.metadata.name = Some(format!("np{k}"));
            }
            w.policies.push(p);
        }
        3 if !w.policies.is_empty() => {
            let i = rng.below(w.policies.len());
            w.policies.remove(i);
        }
        4 if !w.policies.is_empty() => {
            let i = rng.below(w.policies.len());
            let (ns, name) = (
                w.policies[i].metadata.namespace.clone(),
                w.policies[i].metadata.name.clone().unwrap_or_default(),
            );
            let mut p = policy(rng, &name);
            p.metadata.namespace = ns;
            w.policies[i] = p;
        }
        5 => {
            // New addresses (the pod was re-created under the same name).
            let i = rng.below(w.pods.len());
            let ns = NAMESPACES
                .iter()
                .position(|n| w.pods[i].metadata.namespace.as_deref() == Some(n))
                .unwrap_or(0);
            let name = w.pods[i].metadata.name.clone().unwrap_or_default();
            let mut fresh = pod(rng, ns, &name, serial);
            fresh.metadata.labels = w.pods[i].metadata.labels.clone();
            w.pods[i] = fresh;
        }
        _ => {
            let i = rng.below(w.pods.len());
            let ns = NAMESPACES
                .iter()
                .position(|n| w.pods[i].metadata.namespace.as_deref() == Some(n))
                .unwrap_or(0);
            let name = w.pods[i].metadata.name.clone().unwrap_or_default();
            w.pods[i] = pod(rng, ns, &name, serial);
        }
    }
    w
}

/// One connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub port: u16,
}

fn addresses(p: &Pod) -> Vec<IpAddr> {
    p.status
        .iter()
        .flat_map(|s| s.pod_ips.iter().flatten())
        .filter_map(|i| i.ip.parse().ok())
        .collect()
}

/// Random probes over the world: pod to pod in both families, pod to an
/// external address or the node, external address or node to pod.
pub fn probes(rng: &mut Rng, w: &World, n: usize) -> Vec<Probe> {
    let pod_addrs: Vec<IpAddr> = w
        .pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true))
        .flat_map(addresses)
        .collect();
    let mut outside: Vec<IpAddr> = EXTERNAL.iter().filter_map(|s| s.parse().ok()).collect();
    outside.extend(w.node_ips.iter().copied());
    let mut out = Vec::new();
    if pod_addrs.is_empty() {
        return out;
    }
    while out.len() < n {
        let a = rng.pick(&pod_addrs);
        let same_family = |x: &IpAddr| x.is_ipv4() == a.is_ipv4();
        let (src, dst) = match rng.below(10) {
            0..=5 => {
                let others: Vec<IpAddr> = pod_addrs
                    .iter()
                    .copied()
                    .filter(|x| same_family(x) && *x != a)
                    .collect();
                if others.is_empty() {
                    continue;
                }
                (a, rng.pick(&others))
            }
            6..=7 => {
                let o: Vec<IpAddr> = outside.iter().copied().filter(same_family).collect();
                (a, rng.pick(&o))
            }
            _ => {
                let o: Vec<IpAddr> = outside.iter().copied().filter(same_family).collect();
                (rng.pick(&o), a)
            }
        };
        out.push(Probe {
            src,
            dst,
            proto: rng.pick(&Proto::ALL),
            port: if rng.chance(85) {
                rng.pick(PORTS)
            } else {
                rng.pick(PORTS) + 1 + rng.below(3000) as u16
            },
        });
    }
    out
}

/// A divergence, or a saved regression case: the world the pipeline
/// started from (`before`, if the divergence came after changes), the
/// world it was moved to, the probe and the oracle's verdict.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<World>,
    pub world: World,
    pub probe: Probe,
    /// The oracle's verdict.
    pub expected: bool,
    /// A divergence known and accepted for now: replayed, reported, not
    /// failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_issue: Option<String>,
}

/// Runs the pipeline on a case; its verdict.
pub fn pipeline_verdict(pin_root: &Path, n: &mut u32, case: &Case) -> Result<bool> {
    *n += 1;
    let dir = pin_root.join(format!("c{n}"));
    std::fs::create_dir_all(&dir)?;
    let start = case.before.as_ref().unwrap_or(&case.world);
    let verdict = (|| {
        let mut p = Pipeline::new(&dir, start)?;
        if case.before.is_some() {
            p.set_world(&case.world)?;
        }
        p.allowed(
            case.probe.src,
            case.probe.dst,
            case.probe.proto,
            case.probe.port,
        )
    })();
    unpin(&dir);
    verdict
}

/// Removes a pipeline's pins (its maps go when their last fd closes):
/// shrinking loads hundreds of pipelines into one bpffs.
pub(crate) fn unpin(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("unpin {}: {e}", dir.display());
    }
}

fn diverges(pin_root: &Path, n: &mut u32, case: &Case) -> Result<bool> {
    let expected = Oracle::new(&case.world).allowed(
        case.probe.src,
        case.probe.dst,
        case.probe.proto,
        case.probe.port,
    );
    Ok(pipeline_verdict(pin_root, n, case)? != expected)
}

/// Every way to make a world smaller by one thing.
fn smaller(w: &World) -> Vec<World> {
    let mut out = cnp::reductions(w);
    without_each(w, &mut out, w.policies.len(), |x| Some(&mut x.policies));
    without_each(w, &mut out, w.pods.len(), |x| Some(&mut x.pods));
    for i in 0..w.policies.len() {
        let Some(spec) = w.policies[i].spec.as_ref() else {
            continue;
        };
        let ingress = spec.ingress.as_deref().unwrap_or_default();
        without_each(w, &mut out, ingress.len(), |x| ingress_of(x, i));
        for (r, rule) in ingress.iter().enumerate() {
            let peers = rule.from.as_ref().map_or(0, Vec::len);
            without_each(w, &mut out, peers, |x| ingress_of(x, i)?[r].from.as_mut());
            let ports = rule.ports.as_ref().map_or(0, Vec::len);
            without_each(w, &mut out, ports, |x| ingress_of(x, i)?[r].ports.as_mut());
        }
        let egress = spec.egress.as_deref().unwrap_or_default();
        without_each(w, &mut out, egress.len(), |x| egress_of(x, i));
        for (r, rule) in egress.iter().enumerate() {
            let peers = rule.to.as_ref().map_or(0, Vec::len);
            without_each(w, &mut out, peers, |x| egress_of(x, i)?[r].to.as_mut());
            let ports = rule.ports.as_ref().map_or(0, Vec::len);
            without_each(w, &mut out, ports, |x| egress_of(x, i)?[r].ports.as_mut());
        }
    }
    for i in 0..w.pods.len() {
        for k in w.pods[i].metadata.labels.iter().flat_map(|l| l.keys()) {
            let mut x = w.clone();
            if let Some(l) = x.pods[i].metadata.labels.as_mut() {
                l.remove(k);
            }
            out.push(x);
        }
    }
    for i in 0..w.namespaces.len() {
        for k in w.namespaces[i]
            .metadata
            .labels
            .iter()
            .flat_map(|l| l.keys())
        {
            let mut x = w.clone();
            if let Some(l) = x.namespaces[i].metadata.labels.as_mut() {
                l.remove(k);
            }
            out.push(x);
        }
    }
    out
}

/// One copy of `w` per element of the list `list` reaches (`len` of them),
/// with that element removed.
fn without_each<T>(
    w: &World,
    out: &mut Vec<World>,
    len: usize,
    list: impl Fn(&mut World) -> Option<&mut Vec<T>>,
) {
    for k in 0..len {
        let mut x = w.clone();
        if let Some(v) = list(&mut x) {
            v.remove(k);
        }
        out.push(x);
    }
}

fn ingress_of(w: &mut World, policy: usize) -> Option<&mut Vec<NetworkPolicyIngressRule>> {
    w.policies[policy].spec.as_mut()?.ingress.as_mut()
}

fn egress_of(w: &mut World, policy: usize) -> Option<&mut Vec<NetworkPolicyEgressRule>> {
    w.policies[policy].spec.as_mut()?.egress.as_mut()
}

/// The smallest case that still diverges: first without the history (the
/// final world loaded at once), then one thing at a time removed while
/// the divergence stays. `before`, when kept, shrinks along with `world`
/// only by dropping it whole.
pub fn shrink(pin_root: &Path, case: Case) -> Result<Case> {
    let mut n = 0;
    let mut best = case;
    if best.before.is_some() {
        let flat = Case {
            before: None,
            ..best.clone()
        };
        if diverges(pin_root, &mut n, &flat)? {
            best = flat;
        }
    }
    loop {
        let mut progressed = false;
        for w in smaller(&best.world) {
            let c = Case {
                world: w,
                ..best.clone()
            };
            if diverges(pin_root, &mut n, &c)? {
                best = c;
                progressed = true;
                break;
            }
        }
        if !progressed {
            break;
        }
    }
    best.expected = Oracle::new(&best.world).allowed(
        best.probe.src,
        best.probe.dst,
        best.probe.proto,
        best.probe.port,
    );
    Ok(best)
}

/// What one seed did.
#[derive(Debug, Default)]
pub struct SeedReport {
    pub probes: usize,
    pub allowed: usize,
    pub divergence: Option<Case>,
}

/// One seed: a world, `rounds` of probes, each round after a change.
pub fn run_seed(pin_root: &Path, seed: u64, rounds: usize, per_round: usize) -> Result<SeedReport> {
    let mut rng = Rng::seeded(seed);
    let mut serial = 0;
    let w = world(&mut rng, &mut serial);
    let dir = pin_root.join(format!("seed-{seed}"));
    std::fs::create_dir_all(&dir)?;
    let report = seed_rounds(&dir, &mut rng, &mut serial, w, mutate, rounds, per_round);
    unpin(&dir);
    report
}

/// A world, then `rounds` of probes through the pipeline pinned in `dir`,
/// each round after a change drawn by `mutate`; stops at the first
/// divergence from the oracle.
pub(crate) fn seed_rounds(
    dir: &Path,
    rng: &mut Rng,
    serial: &mut u32,
    mut w: World,
    mutate: fn(&mut Rng, &World, &mut u32) -> World,
    rounds: usize,
    per_round: usize,
) -> Result<SeedReport> {
    let mut p = Pipeline::new(dir, &w)?;
    let mut report = SeedReport::default();
    let mut before: Option<World> = None;
    for round in 0..rounds {
        if round > 0 {
            let next = mutate(rng, &w, serial);
            p.set_world(&next)?;
            before = Some(std::mem::replace(&mut w, next));
        }
        let oracle = Oracle::new(&w);
        for probe in probes(rng, &w, per_round) {
            let expected = oracle.allowed(probe.src, probe.dst, probe.proto, probe.port);
            let got = p.allowed(probe.src, probe.dst, probe.proto, probe.port)?;
            report.probes += 1;
            report.allowed += usize::from(got);
            if got != expected {
                // The history that led here: the world at the seed's start
                // would be exact, the one before the last change is
                // usually enough; shrinking tries without any first.
                report.divergence = Some(Case {
                    before,
                    world: w.clone(),
                    probe,
                    expected,
                    known_issue: None,
                });
                return Ok(report);
            }
        }
    }
    Ok(report)
}

/// The regression cases saved in `dir`, by file name.
pub fn regressions(dir: &Path) -> Result<Vec<(PathBuf, Case)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&path)?;
            let case: Case =
                serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
            out.push((path, case));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Saves a shrunk case as `dir/seed-<seed>.json`; returns its path.
pub fn save(dir: &Path, seed: u64, case: &Case) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("seed-{seed}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(case)? + "\n")?;
    Ok(path)
}

/// Replays one saved case: an error when the pipeline and the oracle
/// disagree, or the oracle no longer gives the recorded verdict.
pub fn replay(pin_root: &Path, n: &mut u32, case: &Case) -> Result<()> {
    let oracle = Oracle::new(&case.world).allowed(
        case.probe.src,
        case.probe.dst,
        case.probe.proto,
        case.probe.port,
    );
    if oracle != case.expected {
        return Err(anyhow!(
            "the oracle now says {oracle}, the case recorded {}",
            case.expected
        ));
    }
    let got = pipeline_verdict(pin_root, n, case)?;
    if got != oracle {
        return Err(anyhow!("pipeline says {got}, oracle says {oracle}"));
    }
    Ok(())
}

/// Where the regression cases live.
pub fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/regressions")
}

/// Where the ClusterNetworkPolicy regression cases live (judged by the
/// compiler, `tests/tests/oracle_cnp.rs`).
pub fn cnp_regressions_dir() -> PathBuf {
    regressions_dir().join("cnp")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count<T>(v: Option<&Vec<T>>) -> usize {
        v.map_or(0, Vec::len)
    }

    /// Shrinking tries each single removal once: every policy, pod, rule,
    /// peer, port and label.
    #[test]
    fn a_world_shrinks_by_each_single_thing_it_holds() {
        let mut serial = 0;
        let w = world(&mut Rng::seeded(7), &mut serial);
        let mut want = w.policies.len() + w.pods.len();
        for p in &w.policies {
            let Some(spec) = p.spec.as_ref() else {
                continue;
            };
            for r in spec.ingress.iter().flatten() {
                want += 1 + count(r.from.as_ref()) + count(r.ports.as_ref());
            }
            for r in spec.egress.iter().flatten() {
                want += 1 + count(r.to.as_ref()) + count(r.ports.as_ref());
            }
        }
        let labels = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.labels.as_ref().map_or(0, |l| l.len())
        };
        want += w.pods.iter().map(|p| labels(&p.metadata)).sum::<usize>();
        want += w
            .namespaces
            .iter()
            .map(|n| labels(&n.metadata))
            .sum::<usize>();
        let candidates = smaller(&w);
        assert_eq!(candidates.len(), want);
        assert!(want > 10, "a world worth shrinking: {want}");
    }
}
