//! The ClusterNetworkPolicy rules: validation, selectors that match
//! nothing, rules shadowed by earlier ones, and NetworkPolicies an Admin
//! Deny makes useless.
//!
//! Order of evaluation (network-policy-api): the Admin tier, then
//! NetworkPolicy, then the Baseline tier; within a tier lower `priority`
//! first, ties broken here by name (the API leaves ties to the
//! implementation; Sluice orders by name), and within a policy the rules in
//! order. The first matching rule decides: Accept and Deny are final, Pass
//! skips the rest of its tier.
use k8s_openapi::{
    api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use sluice_api::{
    Action, ClusterNetworkPolicy, EgressPeerKind, IngressPeerKind, NamespacedPod, PortKind,
    ProtocolKind, SubjectKind, Tier,
    files::{ObjectRef, Objects},
};

use crate::{
    Severity, Sink,
    cidr::Cidr,
    netpol::{self, Np, NpRule},
    selector::Selector,
    world::{NsScope, World},
};

/// Pods by namespace selector, and pod selector (everything for a
/// `namespaces` subject or peer).
#[derive(Clone, Debug, PartialEq)]
struct Pods {
    ns: Selector,
    pod: Selector,
}

impl Pods {
    fn of_namespaces(
        s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> Option<Self> {
        Some(Self {
            ns: Selector::parse(s).ok()?,
            pod: Selector::everything(),
        })
    }

    fn of_pods(p: &NamespacedPod) -> Option<Self> {
        Some(Self {
            ns: Selector::parse(&p.namespace_selector).ok()?,
            pod: Selector::parse(p.pod_selector.as_ref()?).ok()?,
        })
    }

    fn covers(&self, other: &Pods) -> bool {
        self.ns.covers(&other.ns) && self.pod.covers(&other.pod)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Peer {
    Pods(Pods),
    Nodes(Selector),
    Networks(Vec<Cidr>),
}

impl Peer {
    fn covers(&self, other: &Peer) -> bool {
        match (self, other) {
            (Peer::Pods(a), Peer::Pods(b)) => a.covers(b),
            (Peer::Nodes(a), Peer::Nodes(b)) => a.covers(b),
            (Peer::Networks(a), Peer::Networks(b)) => {
                b.iter().all(|b| a.iter().any(|a| a.contains(b)))
            }
            _ => false,
        }
    }
}

/// One rule of a valid ClusterNetworkPolicy, in evaluation order.
struct Rule<'a> {
    obj: ObjectRef,
    tier: Tier,
    egress: bool,
    index: usize,
    name: &'a str,
    action: Action,
    subject: Pods,
    peers: Vec<Peer>,
    /// `None`: every protocol and port.
    protocols: Option<Vec<ProtocolKind<'a>>>,
}

impl Rule<'_> {
    fn path(&self) -> String {
        let dir = if self.egress { "egress" } else { "ingress" };
        format!("spec.{dir}[{}]", self.index)
    }

    fn label(&self) -> String {
        let name = if self.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.name)
        };
        format!("{} {}{name}", self.obj, self.path())
    }

    /// Whether this rule matches every packet `other` matches.
    fn covers(&self, other: &Rule<'_>) -> bool {
        self.egress == other.egress
            && self.subject.covers(&other.subject)
            && other
                .peers
                .iter()
                .all(|b| self.peers.iter().any(|a| a.covers(b)))
            && match (&self.protocols, &other.protocols) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => b.iter().all(|b| a.iter().any(|a| proto_covers(a, b))),
            }
    }
}

fn proto_covers(a: &ProtocolKind<'_>, b: &ProtocolKind<'_>) -> bool {
    match (a, b) {
        (ProtocolKind::Tcp(a), ProtocolKind::Tcp(b))
        | (ProtocolKind::Udp(a), ProtocolKind::Udp(b))
        | (ProtocolKind::Sctp(a), ProtocolKind::Sctp(b)) => port_covers(*a, *b),
        (ProtocolKind::NamedPort(a), ProtocolKind::NamedPort(b)) => a == b,
        _ => false,
    }
}

fn port_covers(a: Option<PortKind>, b: Option<PortKind>) -> bool {
    let range = |p: PortKind| match p {
        PortKind::Number(n) => (n, n),
        PortKind::Range { start, end } => (start, end),
    };
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => {
            let ((a0, a1), (b0, b1)) = (range(a), range(b));
            a0 <= b0 && b1 <= a1
        }
    }
}

fn tier_rank(t: &Tier) -> u8 {
    match t {
        Tier::Admin => 0,
        _ => 1,
    }
}

/// The protocols of a rule: `Some(None)` for every protocol, `None` if
/// one is invalid.
fn protocols(p: &Option<Vec<sluice_api::Protocol>>) -> Option<Option<Vec<ProtocolKind<'_>>>> {
    match p {
        None => Some(None),
        Some(list) => list
            .iter()
            .map(|p| p.kind())
            .collect::<Option<Vec<_>>>()
            .map(Some),
    }
}

/// The rules of the valid policies, in evaluation order.
fn rules(objects: &Objects) -> Vec<Rule<'_>> {
    let mut policies: Vec<&ClusterNetworkPolicy> = objects
        .cluster_network_policies
        .iter()
        .filter(|c| sluice_api::validate(&c.spec).is_ok())
        .collect();
    policies.sort_by(|a, b| {
        (tier_rank(&a.spec.tier), a.spec.priority, &a.metadata.name).cmp(&(
            tier_rank(&b.spec.tier),
            b.spec.priority,
            &b.metadata.name,
        ))
    });
    let mut out = Vec::new();
    for c in policies {
        let obj = ObjectRef::new(
            "ClusterNetworkPolicy",
            "",
            c.metadata.name.as_deref().unwrap_or_default(),
        );
        let subject = match c.spec.subject.kind() {
            Some(SubjectKind::Namespaces(s)) => Pods::of_namespaces(s),
            Some(SubjectKind::Pods(p)) => Pods::of_pods(p),
            None => None,
        };
        let Some(subject) = subject else { continue };
        let mut push = |egress, index, name, action: &Action, peers: Option<Vec<Peer>>, protos| {
            if let (Some(peers), Some(protocols)) = (peers, protos) {
                out.push(Rule {
                    obj: obj.clone(),
                    tier: c.spec.tier.clone(),
                    egress,
                    index,
                    name,
                    action: action.clone(),
                    subject: subject.clone(),
                    peers,
                    protocols,
                });
            }
        };
        for (i, r) in c.spec.ingress.iter().enumerate() {
            let peers = r
                .from
                .iter()
                .map(|p| match p.kind()? {
                    IngressPeerKind::Namespaces(s) => Pods::of_namespaces(s).map(Peer::Pods),
                    IngressPeerKind::Pods(p) => Pods::of_pods(p).map(Peer::Pods),
                })
                .collect();
            push(
                false,
                i,
                r.name.as_str(),
                &r.action,
                peers,
                protocols(&r.protocols),
            );
        }
        for (i, r) in c.spec.egress.iter().enumerate() {
            let peers =
                r.to.iter()
                    .map(|p| match p.kind()? {
                        EgressPeerKind::Namespaces(s) => Pods::of_namespaces(s).map(Peer::Pods),
                        EgressPeerKind::Pods(p) => Pods::of_pods(p).map(Peer::Pods),
                        EgressPeerKind::Nodes(s) => Selector::parse(s).ok().map(Peer::Nodes),
                        EgressPeerKind::Networks(n) => n
                            .iter()
                            .map(|s| Cidr::parse(s).ok())
                            .collect::<Option<Vec<_>>>()
                            .map(Peer::Networks),
                        EgressPeerKind::DomainNames(_) => None,
                    })
                    .collect();
            push(
                true,
                i,
                r.name.as_str(),
                &r.action,
                peers,
                protocols(&r.protocols),
            );
        }
    }
    out
}

pub(crate) fn check(sink: &mut Sink<'_>, world: &World, objects: &Objects) {
    for c in &objects.cluster_network_policies {
        let obj = ObjectRef::new(
            "ClusterNetworkPolicy",
            "",
            c.metadata.name.as_deref().unwrap_or_default(),
        );
        if let Err(errors) = sluice_api::validate(&c.spec) {
            for e in errors {
                sink.push(
                    "invalid-object",
                    obj.clone(),
                    e.path.clone(),
                    format!("{}: the API server (or Sluice) rejects this policy", e.kind),
                    "fix the field as the ClusterNetworkPolicy CRD defines it".into(),
                );
            }
        }
    }
    let rules = rules(objects);
    pod_checks(sink, world, &rules);
    shadowed(sink, &rules);
    denied_by_admin(sink, world, objects, &rules);
}

/// The rules that look at the files' pods: selectors matching none, and
/// named ports none declares.
fn pod_checks(sink: &mut Sink<'_>, world: &World, rules: &[Rule<'_>]) {
    if !world.has_pods() {
        return;
    }
    let none = |p: &Pods| {
        world
            .pods(NsScope::Selected(&p.ns), &p.pod)
            .next()
            .is_none()
    };
    let mut seen = Vec::new();
    for r in rules {
        if !seen.contains(&&r.obj) && none(&r.subject) {
            sink.push(
                "policy-selects-nothing",
                r.obj.clone(),
                "spec.subject".into(),
                "the subject matches no pod in the files".into(),
                "check the labels against the pods' and namespaces' (kubectl get pods,ns --show-labels)".into(),
            );
        }
        seen.push(&r.obj);
        let field = if r.egress { "to" } else { "from" };
        for (j, p) in r.peers.iter().enumerate() {
            if let Peer::Pods(p) = p
                && none(p)
            {
                sink.push(
                    "peer-selects-nothing",
                    r.obj.clone(),
                    format!("{}.{field}[{j}]", r.path()),
                    "this peer matches no pod in the files".into(),
                    "check the labels against the pods' and namespaces' (kubectl get pods,ns --show-labels)".into(),
                );
            }
        }
        named_ports(sink, world, r);
    }
}

/// `destinationNamedPort`s that no destination pod declares (in any
/// protocol): ingress, the subject's pods; egress, the pods of the rule's
/// peers (skipped if a peer is not a pod selector: a network may hold pods).
fn named_ports(sink: &mut Sink<'_>, world: &World, r: &Rule<'_>) {
    let Some(protocols) = &r.protocols else {
        return;
    };
    let scopes: Vec<&Pods> = if r.egress {
        let pods: Vec<&Pods> = r
            .peers
            .iter()
            .filter_map(|p| match p {
                Peer::Pods(p) => Some(p),
                _ => None,
            })
            .collect();
        if pods.len() != r.peers.len() {
            return;
        }
        pods
    } else {
        vec![&r.subject]
    };
    let targets: Vec<_> = scopes
        .iter()
        .flat_map(|p| world.pods(NsScope::Selected(&p.ns), &p.pod))
        .collect();
    if targets.is_empty() {
        return;
    }
    for (k, p) in protocols.iter().enumerate() {
        let ProtocolKind::NamedPort(name) = p else {
            continue;
        };
        if targets
            .iter()
            .any(|t| t.ports.iter().any(|np| np.name == *name))
        {
            continue;
        }
        let whose = if r.egress {
            "destination pod"
        } else {
            "subject pod"
        };
        sink.push(
            "named-port-unexposed",
            r.obj.clone(),
            format!("{}.protocols[{k}]", r.path()),
            format!("no {whose} in the files declares a containerPort named {name:?} (any protocol): the rule matches nothing on it"),
            format!("name the container port {name:?} in the pods, or match a protocol and number"),
        );
    }
}

/// A rule that an earlier rule always decides first: Accept and Deny are
/// final everywhere after them, Pass only within its tier.
fn shadowed(sink: &mut Sink<'_>, rules: &[Rule<'_>]) {
    for (k, later) in rules.iter().enumerate() {
        let earlier = rules[..k]
            .iter()
            .filter(|e| e.action != Action::Pass || e.tier == later.tier)
            .find(|e| e.covers(later));
        let Some(e) = earlier else { continue };
        let same = e.action == later.action;
        let severity = if same {
            Severity::Info
        } else {
            Severity::Warning
        };
        let effect = if same {
            format!("redundant: both are {:?}", e.action)
        } else {
            format!(
                "its {:?} never applies: {:?} decides first",
                later.action, e.action
            )
        };
        sink.push_at(
            "cnp-rule-shadowed",
            severity,
            later.obj.clone(),
            later.path(),
            format!("this rule matches only traffic that {} matches earlier (same or wider subject, peers and ports); {effect}", e.label()),
            if same {
                "delete the rule".into()
            } else {
                format!("give this policy a lower priority number than {} (or narrow the earlier rule)", e.obj.name)
            },
        );
    }
}

/// Whether `subject` provably holds every pod `np_pods` selects in
/// namespace `ns`.
fn subject_holds(subject: &Pods, world: &World, ns: &str, np_pods: &Selector) -> bool {
    world.ns_surely_matches(&subject.ns, ns) && subject.pod.covers(np_pods)
}

/// The Admin rules that decide before any Accept or Pass of their
/// direction: their Denys are final for everything they match.
fn leading_admin_denies<'r, 'a>(rules: &'r [Rule<'a>], egress: bool) -> Vec<&'r Rule<'a>> {
    rules
        .iter()
        .filter(|r| r.egress == egress && r.tier == Tier::Admin)
        .take_while(|r| r.action == Action::Deny)
        .collect()
}

fn denied_by_admin(sink: &mut Sink<'_>, world: &World, objects: &Objects, rules: &[Rule<'_>]) {
    let denies = [
        leading_admin_denies(rules, false),
        leading_admin_denies(rules, true),
    ];
    for np in objects.network_policies.iter().filter_map(Np::new) {
        let dirs = [
            (np.isolates_ingress, &np.ingress, &denies[0]),
            (np.isolates_egress, &np.egress, &denies[1]),
        ];
        let active: Vec<(&NpRule<'_>, &Vec<&Rule<'_>>)> = dirs
            .iter()
            .filter(|(on, _, _)| *on)
            .flat_map(|(_, rs, d)| rs.iter().map(move |r| (r, *d)))
            .collect();
        if active.is_empty() {
            continue;
        }
        let mut by = Vec::new();
        let all_covered = active.iter().all(|(r, denies)| {
            let hit = denies.iter().find(|d| {
                subject_holds(&d.subject, world, np.ns, &np.pods)
                    && np_rule_covered(d, r, &np, world)
            });
            if let Some(d) = hit {
                by.push(d.label());
            }
            hit.is_some()
        });
        if all_covered {
            by.dedup();
            sink.push(
                "np-denied-by-admin",
                np.obj.clone(),
                "spec".into(),
                format!(
                    "every rule of this policy allows only traffic that an Admin-tier Deny drops first ({}): its allows never apply, it only isolates the pods",
                    netpol::list(&by)
                ),
                "delete the policy, or narrow the ClusterNetworkPolicy Deny (or add an Admin Accept/Pass before it)".into(),
            );
        }
    }
}

/// Whether Deny rule `d` matches every packet NetworkPolicy rule `r` allows.
fn np_rule_covered(d: &Rule<'_>, r: &NpRule<'_>, np: &Np<'_>, world: &World) -> bool {
    let peer_ok = |p: &NetworkPolicyPeer| -> bool {
        if let Some(b) = &p.ip_block {
            let Ok(c) = Cidr::parse(&b.cidr) else {
                return false;
            };
            return d
                .peers
                .iter()
                .any(|dp| matches!(dp, Peer::Networks(n) if n.iter().any(|n| n.contains(&c))));
        }
        let Some((ns, pod)) = netpol::peer_selectors(p) else {
            return false;
        };
        d.peers.iter().any(|dp| match (dp, &ns) {
            (Peer::Pods(dp), None) => world.ns_surely_matches(&dp.ns, np.ns) && dp.pod.covers(&pod),
            (Peer::Pods(dp), Some(ns)) => dp.ns.covers(ns) && dp.pod.covers(&pod),
            _ => false,
        })
    };
    let peers_ok = if r.peers.is_empty() {
        // Every peer, outside the cluster too: only networks cover that.
        let all = |s: &str| Cidr::parse(s).ok();
        let (v4, v6) = (all("0.0.0.0/0"), all("::/0"));
        let has = |c: Option<Cidr>| {
            c.is_some_and(|c| {
                d.peers
                    .iter()
                    .any(|dp| matches!(dp, Peer::Networks(n) if n.contains(&c)))
            })
        };
        has(v4) && has(v6)
    } else {
        r.peers.iter().all(peer_ok)
    };
    peers_ok && ports_covered(d.protocols.as_deref(), r.ports)
}

fn ports_covered(protocols: Option<&[ProtocolKind<'_>]>, ports: &[NetworkPolicyPort]) -> bool {
    let Some(protocols) = protocols else {
        return true;
    };
    if ports.is_empty() {
        return false;
    }
    ports.iter().all(|pt| {
        let proto = pt.protocol.as_deref().unwrap_or("TCP");
        let same_proto = |p: &ProtocolKind<'_>| -> Option<Option<PortKind>> {
            match (p, proto) {
                (ProtocolKind::Tcp(k), "TCP")
                | (ProtocolKind::Udp(k), "UDP")
                | (ProtocolKind::Sctp(k), "SCTP") => Some(*k),
                _ => None,
            }
        };
        protocols.iter().any(|p| {
            if let (ProtocolKind::NamedPort(n), Some(IntOrString::String(s))) = (p, &pt.port) {
                return n == s;
            }
            let Some(k) = same_proto(p) else { return false };
            let wanted = match &pt.port {
                None => None,
                Some(IntOrString::String(_)) => return k.is_none(),
                Some(IntOrString::Int(n)) => {
                    let Ok(start) = u16::try_from(*n) else {
                        return false;
                    };
                    match pt.end_port.map(u16::try_from) {
                        Some(Ok(end)) if end > start => Some(PortKind::Range { start, end }),
                        Some(_) | None => Some(PortKind::Number(start)),
                    }
                }
            };
            port_covers(k, wanted)
        })
    })
}

/// Whether an Admin Accept egress rule lets pods `pods` of namespace `ns`
/// reach port 53 (anywhere), ahead of NetworkPolicy.
pub(crate) fn admin_accepts_dns(
    objects: &Objects,
    world: &World,
    ns: &str,
    pods: &Selector,
) -> bool {
    let dns = |p: &ProtocolKind<'_>| match p {
        ProtocolKind::Tcp(k) | ProtocolKind::Udp(k) => port_covers(*k, Some(PortKind::Number(53))),
        ProtocolKind::NamedPort(n) => n.to_ascii_lowercase().contains("dns"),
        ProtocolKind::Sctp(_) => false,
    };
    rules(objects).iter().any(|r| {
        r.egress
            && r.tier == Tier::Admin
            && r.action == Action::Accept
            && subject_holds(&r.subject, world, ns, pods)
            && r.protocols.as_ref().is_none_or(|ps| ps.iter().any(dns))
    })
}
