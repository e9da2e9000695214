//! A ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`), checked
//! with `sluice_api::validate` and our selector parser, turned into rules
//! of one tier. Invalid input never opens traffic (docs/design.md, "Tiers:
//! invalid input"):
//!
//! - a rule with a problem fails closed as the CRD's peer description asks:
//!   an `Accept` rule matches nothing (it is dropped), a `Deny` or `Pass`
//!   rule (or one whose action is unknown) becomes "Deny all" at its place;
//! - a problem outside the rules (tier, priority, subject fields, too many
//!   rules, an unknown field) makes the whole policy an Admin-tier "Deny
//!   all" of both directions for its subjects, at its priority (clamped to
//!   0..=1000), if its subject can be determined;
//! - a subject that cannot be determined (no or several kinds, a selector
//!   that does not parse) selects nothing: `subject` is `None` and the
//!   compiler keeps the previous version of the policy, if any.
use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use sluice_api::{
    Action, ClusterNetworkPolicy, EgressPeerKind, IngressPeerKind, NamespacedPod, PortKind,
    Protocol, ProtocolKind, SubjectKind, Tier as ApiTier, validate,
};
use sluice_common::{DIR_EGRESS, DIR_INGRESS, action, proto};

use super::{
    mapstate::{L4, Tier, canonical},
    parse::Ports,
    selector::{NsMatch, PeerSelector, Selector},
};

/// Largest priority; policy-level problems clamp to it.
pub const MAX_PRIORITY: u32 = 1000;

/// Who a policy applies to: pods whose namespace labels match `ns` and
/// whose labels match `pod`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpSubject {
    pub ns: Selector,
    pub pod: Selector,
}

/// A rule's peers; `S` is a peer selector, interned by the compiler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CnpPeer<S> {
    /// Every peer (only from failing closed: "Deny all").
    Any,
    Pods(S),
    Networks(Vec<IpNetwork>),
    /// Nodes by label: their addresses, as host prefixes.
    Nodes(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpRule<S> {
    pub dir: u8,
    /// Position in `spec.ingress` / `spec.egress`: the order inside the
    /// policy.
    pub index: usize,
    /// `name`, or `ingress[i]` / `egress[i]` when it has none.
    pub name: String,
    pub action: u32,
    pub peers: Vec<CnpPeer<S>>,
    /// Named ports carry protocol 0: a `destinationNamedPort` matches the
    /// container port of that name whatever its protocol.
    pub ports: Ports,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCnp {
    pub tier: Tier,
    pub priority: u32,
    pub subject: Option<CnpSubject>,
    pub rules: Vec<CnpRule<PeerSelector>>,
    pub problems: Vec<String>,
}

/// Where a validation error lies: in one rule, or in the policy as a whole.
fn rule_of(path: &str) -> Option<(u8, usize)> {
    let (dir, rest) = match path.strip_prefix("spec.ingress[") {
        Some(r) => (DIR_INGRESS, r),
        None => (DIR_EGRESS, path.strip_prefix("spec.egress[")?),
    };
    let (idx, _) = rest.split_once(']')?;
    Some((dir, idx.parse().ok()?))
}

fn dir_name(dir: u8) -> &'static str {
    if dir == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// "Deny all" of `dir` at position `index`.
fn deny_all(dir: u8, index: usize, name: String) -> CnpRule<PeerSelector> {
    CnpRule {
        dir,
        index,
        name,
        action: action::DENY,
        peers: vec![CnpPeer::Any],
        ports: Ports {
            fixed: vec![L4::Any],
            named: Vec::new(),
        },
    }
}

pub fn parse_cnp(cnp: &ClusterNetworkPolicy) -> ParsedCnp {
    let spec = &cnp.spec;
    let mut problems = Vec::new();
    let mut bad_rules: Vec<(u8, usize)> = Vec::new();
    let mut policy_bad = false;
    if let Err(errors) = validate(spec) {
        for e in errors {
            match rule_of(&e.path) {
                Some(r) => bad_rules.push(r),
                None => policy_bad = true,
            }
            problems.push(e.to_string());
        }
    }
    let subject = match parse_subject(spec.subject.kind()) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(format!(
                "spec.subject: {e}; the policy applies to no pod (a previous version stays in force)"
            ));
            None
        }
    };
    let priority = u32::try_from(spec.priority.clamp(0, 1000)).unwrap_or(MAX_PRIORITY);
    let tier = match spec.tier {
        ApiTier::Baseline => Tier::Baseline,
        ApiTier::Admin | ApiTier::Unknown(_) => Tier::Admin,
    };
    if policy_bad {
        problems.push(format!(
            "the policy is invalid: it denies all traffic of its subjects (Admin tier, priority {priority})"
        ));
        return ParsedCnp {
            tier: Tier::Admin,
            priority,
            subject,
            rules: vec![
                deny_all(DIR_INGRESS, 0, "invalid-policy".into()),
                deny_all(DIR_EGRESS, 0, "invalid-policy".into()),
            ],
            problems,
        };
    }
    let mut rules = Vec::new();
    let ingress = spec.ingress.iter().map(|r| {
        let peers: Vec<_> = r
            .from
            .iter()
            .map(|p| match p.kind() {
                Some(IngressPeerKind::Namespaces(s)) => PeerSpec::Namespaces(s),
                Some(IngressPeerKind::Pods(p)) => PeerSpec::Pods(p),
                None => PeerSpec::Invalid,
            })
            .collect();
        (
            DIR_INGRESS,
            &r.name,
            &r.action,
            peers,
            r.protocols.as_deref(),
        )
    });
    let egress = spec.egress.iter().map(|r| {
        let peers: Vec<_> =
            r.to.iter()
                .map(|p| match p.kind() {
                    Some(EgressPeerKind::Namespaces(s)) => PeerSpec::Namespaces(s),
                    Some(EgressPeerKind::Pods(p)) => PeerSpec::Pods(p),
                    Some(EgressPeerKind::Nodes(s)) => PeerSpec::Nodes(s),
                    Some(EgressPeerKind::Networks(n)) => PeerSpec::Networks(n),
                    Some(EgressPeerKind::DomainNames(_)) | None => PeerSpec::Invalid,
                })
                .collect();
        (
            DIR_EGRESS,
            &r.name,
            &r.action,
            peers,
            r.protocols.as_deref(),
        )
    });
    let mut counters = [0usize; 2];
    for (dir, name, act, peers, protocols) in ingress.chain(egress) {
        let index = counters[usize::from(dir)];
        counters[usize::from(dir)] += 1;
        let name = if name.is_empty() {
            format!("{}[{index}]", dir_name(dir))
        } else {
            name.clone()
        };
        let act = match act {
            Action::Accept => Some(action::ACCEPT),
            Action::Deny => Some(action::DENY),
            Action::Pass => Some(action::PASS),
            Action::Unknown(_) => None,
        };
        let parsed = if bad_rules.contains(&(dir, index)) {
            Err(String::new())
        } else {
            parse_rule(&peers, protocols)
        };
        match (parsed, act) {
            (Ok((peers, ports)), Some(action)) => rules.push(CnpRule {
                dir,
                index,
                name,
                action,
                peers,
                ports,
            }),
            (parsed, act) => {
                if let Err(e) = &parsed
                    && !e.is_empty()
                {
                    problems.push(format!("spec.{}[{index}]: {e}", dir_name(dir)));
                }
                if act == Some(action::ACCEPT) {
                    problems.push(format!(
                        "spec.{}[{index}] ({name}): invalid Accept rule, it matches nothing",
                        dir_name(dir)
                    ));
                } else {
                    problems.push(format!(
                        "spec.{d}[{index}] ({name}): invalid rule, it denies all {d} traffic at its place",
                        d = dir_name(dir)
                    ));
                    rules.push(deny_all(dir, index, name));
                }
            }
        }
    }
    ParsedCnp {
        tier,
        priority,
        subject,
        rules,
        problems,
    }
}

enum PeerSpec<'a> {
    Namespaces(&'a LabelSelector),
    Pods(&'a NamespacedPod),
    Nodes(&'a LabelSelector),
    Networks(&'a [String]),
    Invalid,
}

fn parse_subject(kind: Option<SubjectKind<'_>>) -> Result<CnpSubject, String> {
    match kind {
        None => Err("exactly one of namespaces, pods must be set".into()),
        Some(SubjectKind::Namespaces(s)) => Ok(CnpSubject {
            ns: Selector::parse(s)?,
            pod: Selector::everything(),
        }),
        Some(SubjectKind::Pods(p)) => {
            let (ns, pod) = pods_selectors(p)?;
            Ok(CnpSubject { ns, pod })
        }
    }
}

fn pods_selectors(p: &NamespacedPod) -> Result<(Selector, Selector), String> {
    let ns = Selector::parse(&p.namespace_selector)?;
    let pod = match &p.pod_selector {
        Some(s) => Selector::parse(s)?,
        None => Selector::everything(),
    };
    Ok((ns, pod))
}

type RuleParts = (Vec<CnpPeer<PeerSelector>>, Ports);

fn parse_rule(peers: &[PeerSpec<'_>], protocols: Option<&[Protocol]>) -> Result<RuleParts, String> {
    let ports = parse_protocols(protocols)?;
    let mut out = Vec::new();
    let mut networks = Vec::new();
    for (j, p) in peers.iter().enumerate() {
        match p {
            PeerSpec::Namespaces(s) => out.push(CnpPeer::Pods(PeerSelector {
                ns: NsMatch::Labels(Selector::parse(s).map_err(|e| format!("peer {j}: {e}"))?),
                pod: Selector::everything(),
            })),
            PeerSpec::Pods(p) => {
                let (ns, pod) = pods_selectors(p).map_err(|e| format!("peer {j}: {e}"))?;
                out.push(CnpPeer::Pods(PeerSelector {
                    ns: NsMatch::Labels(ns),
                    pod,
                }));
            }
            PeerSpec::Nodes(s) => out.push(CnpPeer::Nodes(
                Selector::parse(s).map_err(|e| format!("peer {j}: {e}"))?,
            )),
            PeerSpec::Networks(list) => {
                for n in list.iter() {
                    networks.push(parse_network(n).map_err(|e| format!("peer {j}: {e}"))?);
                }
            }
            PeerSpec::Invalid => return Err(format!("peer {j}: not a peer this agent supports")),
        }
    }
    if !networks.is_empty() {
        networks.sort();
        networks.dedup();
        out.push(CnpPeer::Networks(networks));
    }
    if !ports.named.is_empty() && out.iter().any(|p| !matches!(p, CnpPeer::Pods(_))) {
        return Err("a named port cannot apply to networks or nodes peers".into());
    }
    if out.is_empty() {
        return Err("no peers".into());
    }
    Ok((out, ports))
}

fn parse_network(s: &str) -> Result<IpNetwork, String> {
    if !s.contains('/') {
        return Err(format!("{s:?} is not a CIDR"));
    }
    s.parse::<IpNetwork>()
        .map(canonical)
        .map_err(|e| format!("{s:?} is not a CIDR: {e}"))
}

fn parse_protocols(protocols: Option<&[Protocol]>) -> Result<Ports, String> {
    let mut out = Ports::default();
    let Some(list) = protocols else {
        out.fixed.push(L4::Any);
        return Ok(out);
    };
    if list.is_empty() {
        return Err("protocols is empty".into());
    }
    for (k, p) in list.iter().enumerate() {
        let (proto, port) = match p.kind() {
            Some(ProtocolKind::Tcp(port)) => (proto::TCP, port),
            Some(ProtocolKind::Udp(port)) => (proto::UDP, port),
            Some(ProtocolKind::Sctp(port)) => (proto::SCTP, port),
            Some(ProtocolKind::NamedPort(name)) => {
                out.named.push((name.to_string(), 0));
                continue;
            }
            None => return Err(format!("protocols[{k}]: exactly one protocol must be set")),
        };
        out.fixed.push(match port {
            None => L4::Proto(proto),
            Some(PortKind::Number(n)) => L4::Ports {
                proto,
                first: n,
                last: n,
            },
            Some(PortKind::Range { start, end }) => L4::Ports {
                proto,
                first: start,
                last: end,
            },
        });
    }
    out.fixed.sort();
    out.fixed.dedup();
    out.named.sort();
    out.named.dedup();
    Ok(out)
}
