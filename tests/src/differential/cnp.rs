//! ClusterNetworkPolicies in the differential check: random Admin and
//! Baseline policies (valid ones: validation is the compiler's own tests'
//! business) mixed with the random NetworkPolicies, a labelled Node for
//! `nodes` peers, random changes to them, and the oracle against the
//! compiler's data-path verdict (`Compiler::verdict`, the decision the TC
//! programs make from the maps, computed from the maps' contents).
//!
//! The same worlds also go through the whole pipeline
//! ([`run_seed_pipeline`]: the compiler, the map writer and the TC programs
//! through BPF_PROG_TEST_RUN, which fold the tiers in the kernel).
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;
use k8s_openapi::{
    api::{
        core::v1::{Node, NodeAddress, NodeStatus},
        networking::v1::{NetworkPolicy, NetworkPolicySpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use sluice_agent::policy::{Compiler, Locality, Resync};
use sluice_api::{
    Action, ClusterNetworkPolicy, ClusterNetworkPolicySpec, EgressPeer, EgressRule, IngressPeer,
    IngressRule, NamespacedPod, Port, PortMatch, PortRange, Protocol, Subject, Tier,
};

use super::{
    CIDRS, Case, NAMESPACES, NS_LABELS, POD_LABELS, PORT_NAMES, PORTS, SeedReport, labels, meta,
    mutate, probes, smaller, world,
};
use crate::{
    oracle::{Oracle, World},
    rng::Rng,
};

const NODE_LABELS: &[(&str, &[&str])] = &[
    ("kubernetes.io/os", &["linux", "windows"]),
    ("zone", &["a", "b"]),
];
const PRIORITIES: &[i32] = &[0, 1, 5, 5, 10, 1000];

/// A valid selector: empty, one label, or one or two requirements.
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
                let (op, values) = match rng.below(4) {
                    0 => ("In", Some(vec![rng.pick(vs).to_string()])),
                    1 => ("NotIn", Some(vec![rng.pick(vs).to_string()])),
                    2 => ("Exists", None),
                    _ => ("DoesNotExist", None),
                };
                exprs.push(LabelSelectorRequirement {
                    key: k.to_string(),
                    operator: op.to_string(),
                    values,
                });
            }
            s.match_expressions = Some(exprs);
        }
    }
    s
}

fn namespaced_pod(rng: &mut Rng) -> NamespacedPod {
    NamespacedPod {
        namespace_selector: selector(rng, NS_LABELS),
        pod_selector: Some(selector(rng, POD_LABELS)),
        ..NamespacedPod::default()
    }
}

/// `named`: whether a named port may appear (only with pod peers).
fn protocols(rng: &mut Rng, named: bool) -> Option<Vec<Protocol>> {
    if rng.chance(45) {
        return None;
    }
    let mut out = Vec::new();
    for _ in 0..=rng.below(2) {
        let mut p = Protocol::default();
        if named && rng.chance(20) {
            p.destination_named_port = Some(rng.pick(PORT_NAMES).to_string());
            out.push(p);
            continue;
        }
        // The schema requires a destinationPort (minProperties: 1).
        let destination_port = match rng.below(2) {
            0 => Some(Port {
                number: Some(i32::from(rng.pick(PORTS))),
                ..Port::default()
            }),
            _ => {
                // The schema wants start < end.
                let a = i32::from(rng.pick(PORTS));
                let b = i32::from(rng.pick(PORTS));
                Some(Port {
                    range: Some(PortRange {
                        start: a.min(b),
                        end: a.max(b) + i32::from(a == b),
                    }),
                    ..Port::default()
                })
            }
        };
        let m = Some(PortMatch {
            destination_port,
            ..PortMatch::default()
        });
        match rng.below(3) {
            0 => p.tcp = m,
            1 => p.udp = m,
            _ => p.sctp = m,
        }
        out.push(p);
    }
    Some(out)
}

fn action(rng: &mut Rng, tier: &Tier) -> Action {
    match (tier, rng.below(3)) {
        (_, 0) => Action::Accept,
        (Tier::Admin, 1) => Action::Pass,
        _ => Action::Deny,
    }
}

/// A random valid ClusterNetworkPolicy.
pub fn cluster_policy(rng: &mut Rng, name: &str) -> ClusterNetworkPolicy {
    let tier = if rng.chance(60) {
        Tier::Admin
    } else {
        Tier::Baseline
    };
    let subject = if rng.chance(50) {
        Subject {
            namespaces: Some(selector(rng, NS_LABELS)),
            ..Subject::default()
        }
    } else {
        Subject {
            pods: Some(namespaced_pod(rng)),
            ..Subject::default()
        }
    };
    let ingress = (0..rng.below(4))
        .map(|i| IngressRule {
            name: format!("in-{i}"),
            action: action(rng, &tier),
            from: (0..=rng.below(2))
                .map(|_| {
                    if rng.chance(50) {
                        IngressPeer {
                            namespaces: Some(selector(rng, NS_LABELS)),
                            ..IngressPeer::default()
                        }
                    } else {
                        IngressPeer {
                            pods: Some(namespaced_pod(rng)),
                            ..IngressPeer::default()
                        }
                    }
                })
                .collect(),
            protocols: protocols(rng, true),
            ..IngressRule::default()
        })
        .collect();
    let egress = (0..rng.below(4))
        .map(|i| {
            let to: Vec<EgressPeer> = (0..=rng.below(2))
                .map(|_| match rng.below(4) {
                    0 => EgressPeer {
                        namespaces: Some(selector(rng, NS_LABELS)),
                        ..EgressPeer::default()
                    },
                    1 => EgressPeer {
                        pods: Some(namespaced_pod(rng)),
                        ..EgressPeer::default()
                    },
                    2 => EgressPeer {
                        networks: Some({
                            // Distinct CIDRs (the schema's listType: set).
                            let mut n: Vec<String> = (0..=rng.below(2))
                                .map(|_| rng.pick(CIDRS).to_string())
                                .collect();
                            n.sort();
                            n.dedup();
                            n
                        }),
                        ..EgressPeer::default()
                    },
                    _ => EgressPeer {
                        nodes: Some(selector(rng, NODE_LABELS)),
                        ..EgressPeer::default()
                    },
                })
                .collect();
            let named = to.iter().all(|p| p.networks.is_none() && p.nodes.is_none());
            EgressRule {
                name: format!("out-{i}"),
                action: action(rng, &tier),
                to,
                protocols: protocols(rng, named),
                ..EgressRule::default()
            }
        })
        .collect();
    let mut cnp = ClusterNetworkPolicy::new(
        name,
        ClusterNetworkPolicySpec {
            tier,
            priority: rng.pick(PRIORITIES),
            subject,
            ingress,
            egress,
            ..ClusterNetworkPolicySpec::default()
        },
    );
    cnp.metadata.labels = None;
    cnp
}

/// The world's Node ("node-a", where every pod runs), with its addresses.
fn node(rng: &mut Rng, ips: &[IpAddr]) -> Node {
    Node {
        metadata: meta(None, "node-a", labels(rng, NODE_LABELS)),
        status: Some(NodeStatus {
            addresses: Some(
                ips.iter()
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// A random world ([`world`]) with 1-4 ClusterNetworkPolicies and a Node.
pub fn world_with_cnps(rng: &mut Rng, serial: &mut u32) -> World {
    let mut w = world(rng, serial);
    // A default deny both ways in one namespace, often: what an Admin
    // `Accept` or `Pass` has to get past.
    if rng.chance(60) {
        w.policies.push(NetworkPolicy {
            metadata: meta(Some(rng.pick(NAMESPACES)), "deny-all", BTreeMap::new()),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ..NetworkPolicySpec::default()
            }),
        });
    }
    w.nodes = vec![node(rng, &w.node_ips)];
    w.cluster_policies = (0..1 + rng.below(4))
        .map(|i| cluster_policy(rng, &format!("cnp{i}")))
        .collect();
    w
}

/// One random change: half the time to the ClusterNetworkPolicies (added,
/// removed, replaced, reprioritised) or the Node's labels, else [`mutate`].
pub fn mutate_with_cnps(rng: &mut Rng, w: &World, serial: &mut u32) -> World {
    if rng.chance(50) {
        return mutate(rng, w, serial);
    }
    let mut w = w.clone();
    let n = w.cluster_policies.len();
    match rng.below(5) {
        0 => {
            // A name not taken yet: the API holds one object per name, and
            // the oracle and the compiler must see the same world.
            let mut k = 10 + rng.below(1000);
            let taken = |k: usize| {
                let name = format!("cnp{k}");
                w.cluster_policies
                    .iter()
                    .any(|c| c.metadata.name.as_deref() == Some(&name))
            };
            while taken(k) {
                k += 1;
            }
            w.cluster_policies
                .push(cluster_policy(rng, &format!("cnp{k}")));
        }
        1 if n > 0 => {
            w.cluster_policies.remove(rng.below(n));
        }
        2 if n > 0 => {
            let i = rng.below(n);
            let name = w.cluster_policies[i]
                .metadata
                .name
                .clone()
                .unwrap_or_default();
            w.cluster_policies[i] = cluster_policy(rng, &name);
        }
        3 if n > 0 => {
            let i = rng.below(n);
            w.cluster_policies[i].spec.priority = rng.pick(PRIORITIES);
        }
        _ => {
            w.nodes = vec![node(rng, &w.node_ips)];
        }
    }
    w
}

/// The compiler fed as the agent feeds it: one list, then one watch event
/// per changed object.
pub struct CompiledWorld {
    pub compiler: Compiler,
    world: World,
}

fn name_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

impl CompiledWorld {
    pub fn new(world: &World) -> Self {
        let mut compiler = Compiler::new(Locality::All);
        compiler.resync(Resync {
            namespaces: Some(&world.namespaces),
            pods: Some(&world.pods),
            policies: Some(&world.policies),
            cluster_policies: Some(&world.cluster_policies),
            nodes: Some(&world.nodes),
        });
        Self {
            compiler,
            world: world.clone(),
        }
    }

    /// Moves to `world`: deletions then upserts, Nodes and Namespaces
    /// first, policies last.
    pub fn set_world(&mut self, world: &World) {
        let old = std::mem::replace(&mut self.world, world.clone());
        let c = &mut self.compiler;
        let gone = |old: Vec<(String, String)>, new: Vec<(String, String)>| {
            old.into_iter().filter(move |k| !new.contains(k))
        };
        let keys = |v: Vec<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>| {
            v.into_iter().map(name_of).collect::<Vec<_>>()
        };
        for (_, n) in gone(
            keys(old.nodes.iter().map(|n| &n.metadata).collect()),
            keys(world.nodes.iter().map(|n| &n.metadata).collect()),
        ) {
            c.delete_node(&n);
        }
        for n in world.nodes.iter().filter(|n| !old.nodes.contains(n)) {
            c.upsert_node(n);
        }
        for (_, n) in gone(
            keys(old.namespaces.iter().map(|n| &n.metadata).collect()),
            keys(world.namespaces.iter().map(|n| &n.metadata).collect()),
        ) {
            c.delete_namespace(&n);
        }
        for n in world
            .namespaces
            .iter()
            .filter(|n| !old.namespaces.contains(n))
        {
            c.upsert_namespace(n);
        }
        for (ns, n) in gone(
            keys(old.pods.iter().map(|p| &p.metadata).collect()),
            keys(world.pods.iter().map(|p| &p.metadata).collect()),
        ) {
            c.delete_pod(&ns, &n);
        }
        for p in world.pods.iter().filter(|p| !old.pods.contains(p)) {
            c.upsert_pod(p);
        }
        for (ns, n) in gone(
            keys(old.policies.iter().map(|p| &p.metadata).collect()),
            keys(world.policies.iter().map(|p| &p.metadata).collect()),
        ) {
            c.delete_policy(&ns, &n);
        }
        for p in world.policies.iter().filter(|p| !old.policies.contains(p)) {
            c.upsert_policy(p);
        }
        for (_, n) in gone(
            keys(old.cluster_policies.iter().map(|p| &p.metadata).collect()),
            keys(world.cluster_policies.iter().map(|p| &p.metadata).collect()),
        ) {
            c.delete_cluster_policy(&n);
        }
        for p in world
            .cluster_policies
            .iter()
            .filter(|p| !old.cluster_policies.contains(p))
        {
            c.upsert_cluster_policy(p);
        }
    }

    /// The data path's verdict from the maps. The node's addresses are
    /// HOST in the data path's ipcache (which the compiler's model leaves
    /// out): the node's egress is not judged and its pods' ingress lets it
    /// in, so a probe from the node passes.
    pub fn allowed(
        &self,
        src: IpAddr,
        dst: IpAddr,
        proto: crate::oracle::Proto,
        port: u16,
    ) -> bool {
        let number = match proto {
            crate::oracle::Proto::Tcp => 6,
            crate::oracle::Proto::Udp => 17,
            crate::oracle::Proto::Sctp => 132,
        };
        self.world.node_ips.contains(&src) || self.compiler.verdict(src, dst, number, port)
    }
}

/// One seed: a world with ClusterNetworkPolicies, `rounds` of probes, each
/// round after a change; the first divergence between the oracle and the
/// compiler's verdict.
pub fn run_seed_compiler(seed: u64, rounds: usize, per_round: usize) -> Result<SeedReport> {
    let mut rng = Rng::seeded(seed);
    let mut serial = 0;
    let mut w = world_with_cnps(&mut rng, &mut serial);
    let mut c = CompiledWorld::new(&w);
    let mut report = SeedReport::default();
    let mut before: Option<World> = None;
    for round in 0..rounds {
        if round > 0 {
            let next = mutate_with_cnps(&mut rng, &w, &mut serial);
            c.set_world(&next);
            before = Some(std::mem::replace(&mut w, next));
        }
        let oracle = Oracle::new(&w);
        for probe in probes(&mut rng, &w, per_round) {
            let expected = oracle.allowed(probe.src, probe.dst, probe.proto, probe.port);
            let got = c.allowed(probe.src, probe.dst, probe.proto, probe.port);
            report.probes += 1;
            report.allowed += usize::from(got);
            if got != expected {
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

/// One seed through the whole pipeline (root, a bpffs under `pin_root`):
/// as [`run_seed_compiler`], judged by the kernel.
pub fn run_seed_pipeline(
    pin_root: &std::path::Path,
    seed: u64,
    rounds: usize,
    per_round: usize,
) -> Result<SeedReport> {
    let mut rng = Rng::seeded(seed);
    let mut serial = 0;
    let w = world_with_cnps(&mut rng, &mut serial);
    let dir = pin_root.join(format!("cnp-seed-{seed}"));
    std::fs::create_dir_all(&dir)?;
    let report = super::seed_rounds(
        &dir,
        &mut rng,
        &mut serial,
        w,
        mutate_with_cnps,
        rounds,
        per_round,
    );
    super::unpin(&dir);
    report
}

/// The compiler's verdict on a case, from scratch (`before` then `world`
/// as events when the case has a history).
pub fn compiler_verdict(case: &Case) -> bool {
    let mut c = CompiledWorld::new(case.before.as_ref().unwrap_or(&case.world));
    if case.before.is_some() {
        c.set_world(&case.world);
    }
    c.allowed(
        case.probe.src,
        case.probe.dst,
        case.probe.proto,
        case.probe.port,
    )
}

/// Does the compiler still diverge from the oracle on `case`?
pub fn diverges_in_compiler(case: &Case) -> bool {
    let expected = Oracle::new(&case.world).allowed(
        case.probe.src,
        case.probe.dst,
        case.probe.proto,
        case.probe.port,
    );
    compiler_verdict(case) != expected
}

/// Every way to make a world's ClusterNetworkPolicies or Node smaller by
/// one thing (the first reductions [`super::shrink`] tries).
pub(super) fn reductions(w: &World) -> Vec<World> {
    let mut out = Vec::new();
    for i in 0..w.cluster_policies.len() {
        let mut x = w.clone();
        x.cluster_policies.remove(i);
        out.push(x);
        let spec = &w.cluster_policies[i].spec;
        for r in 0..spec.ingress.len() {
            let mut x = w.clone();
            x.cluster_policies[i].spec.ingress.remove(r);
            out.push(x);
            for k in 0..spec.ingress[r].from.len().saturating_sub(1) {
                let mut x = w.clone();
                x.cluster_policies[i].spec.ingress[r].from.remove(k);
                out.push(x);
            }
            if spec.ingress[r].protocols.is_some() {
                let mut x = w.clone();
                x.cluster_policies[i].spec.ingress[r].protocols = None;
                out.push(x);
            }
        }
        for r in 0..spec.egress.len() {
            let mut x = w.clone();
            x.cluster_policies[i].spec.egress.remove(r);
            out.push(x);
            for k in 0..spec.egress[r].to.len().saturating_sub(1) {
                let mut x = w.clone();
                x.cluster_policies[i].spec.egress[r].to.remove(k);
                out.push(x);
            }
            if spec.egress[r].protocols.is_some() {
                let mut x = w.clone();
                x.cluster_policies[i].spec.egress[r].protocols = None;
                out.push(x);
            }
        }
    }
    if !w.nodes.is_empty() {
        let mut x = w.clone();
        x.nodes.clear();
        out.push(x);
    }
    out
}

/// The smallest case on which the compiler still diverges from the oracle
/// (as [`super::shrink`] does against the pipeline).
pub fn shrink_in_compiler(case: Case) -> Case {
    let mut best = case;
    if best.before.is_some() {
        let flat = Case {
            before: None,
            ..best.clone()
        };
        if diverges_in_compiler(&flat) {
            best = flat;
        }
    }
    while let Some(c) = smaller(&best.world)
        .into_iter()
        .map(|w| Case {
            world: w,
            ..best.clone()
        })
        .find(diverges_in_compiler)
    {
        best = c;
    }
    best.expected = Oracle::new(&best.world).allowed(
        best.probe.src,
        best.probe.dst,
        best.probe.proto,
        best.probe.port,
    );
    best
}
