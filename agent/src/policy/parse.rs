//! A NetworkPolicy, checked the way the API server validates it, turned into
//! rules made of parts: one peer source and the ports it may use. Anything
//! invalid is reported and its rule dropped (which denies what the rule would
//! have allowed); the policy still isolates the pods it selects.
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use sluice_common::{DIR_EGRESS, DIR_INGRESS, proto};

use super::selector::{NsMatch, PeerSelector, Selector};
use crate::policy::{L4, canonical};

/// The ports of a part: fixed L4 matches, and named ports (name, protocol)
/// that are resolved on a pod (the selected pod for ingress, the peer for
/// egress).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    pub fixed: Vec<L4>,
    pub named: Vec<(String, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
}

/// Where the peers of a part come from; `S` is a peer selector, interned
/// later by the compiler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer<S> {
    /// No `from`/`to`: every peer, inside the cluster or not.
    Any,
    Pods(S),
    Blocks(Vec<Block>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part<S> {
    pub peer: Peer<S>,
    pub ports: Ports,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedRule<S> {
    pub dir: u8,
    /// Position in `spec.ingress` / `spec.egress`.
    pub index: usize,
    pub parts: Vec<Part<S>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPolicy<S> {
    /// `None`: the pod selector is invalid, so the policy is taken to select
    /// every pod of its namespace (isolating them, with no rules).
    pub target: Option<Selector>,
    pub ingress: bool,
    pub egress: bool,
    pub rules: Vec<ParsedRule<S>>,
}

pub fn parse_policy(np: &NetworkPolicy) -> (ParsedPolicy<PeerSelector>, Vec<String>) {
    let ns = np.metadata.namespace.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let spec = np.spec.clone().unwrap_or_default();

    let target = match spec.pod_selector.as_ref().map(Selector::parse) {
        None => Some(Selector::everything()),
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            problems.push(format!(
                "spec.podSelector: {e}; the policy isolates every pod of namespace {ns} and allows nothing"
            ));
            None
        }
    };

    let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (mut ingress, mut egress) = (false, false);
    match spec.policy_types.as_deref() {
        // Defaulting, as the API server does it: Ingress always, Egress when
        // there are egress rules.
        None | Some([]) => (ingress, egress) = (true, has_egress_rules),
        Some(types) => {
            for t in types {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        // Not knowing which direction was meant, isolate both.
                        problems.push(format!(
                            "spec.policyTypes: unknown type {other:?}; the policy isolates both directions"
                        ));
                        (ingress, egress) = (true, true);
                    }
                }
            }
        }
    }

    let mut rules = Vec::new();
    if target.is_some() {
        if ingress {
            for (i, r) in spec.ingress.iter().flatten().enumerate() {
                match parse_rule(&ns, DIR_INGRESS, r.from.as_deref(), r.ports.as_deref()) {
                    Ok(parts) => {
                        rules.push(ParsedRule {
                            dir: DIR_INGRESS,
                            index: i,
                            parts,
                        });
                    }
                    Err(e) => problems.push(format!("ingress[{i}]: {e}; rule dropped")),
                }
            }
        }
        if egress {
            for (i, r) in spec.egress.iter().flatten().enumerate() {
                match parse_rule(&ns, DIR_EGRESS, r.to.as_deref(), r.ports.as_deref()) {
                    Ok(parts) => {
                        rules.push(ParsedRule {
                            dir: DIR_EGRESS,
                            index: i,
                            parts,
                        });
                    }
                    Err(e) => problems.push(format!("egress[{i}]: {e}; rule dropped")),
                }
            }
        }
    }
    (
        ParsedPolicy {
            target,
            ingress,
            egress,
            rules,
        },
        problems,
    )
}

fn parse_rule(
    ns: &str,
    dir: u8,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Vec<Part<PeerSelector>>, String> {
    let ports = parse_ports(ports)?;
    let mut parts = Vec::new();
    match peers {
        None | Some([]) => {
            if dir == DIR_INGRESS {
                // Named ports resolve on the selected pod itself.
                parts.push(Part {
                    peer: Peer::Any,
                    ports,
                });
            } else {
                // Numbers go to every destination; a named port only exists
                // on pods, resolved pod by pod, so it goes to every pod.
                if !ports.fixed.is_empty() {
                    parts.push(Part {
                        peer: Peer::Any,
                        ports: Ports {
                            fixed: ports.fixed.clone(),
                            named: vec![],
                        },
                    });
                }
                if !ports.named.is_empty() {
                    parts.push(Part {
                        peer: Peer::Pods(PeerSelector::all_pods()),
                        ports: Ports {
                            fixed: vec![],
                            named: ports.named,
                        },
                    });
                }
            }
        }
        Some(peers) => {
            let mut blocks = Vec::new();
            for (j, p) in peers.iter().enumerate() {
                match p {
                    NetworkPolicyPeer {
                        ip_block: Some(b),
                        namespace_selector: None,
                        pod_selector: None,
                    } => blocks.push(parse_block(b).map_err(|e| format!("peer {j}: {e}"))?),
                    NetworkPolicyPeer {
                        ip_block: Some(_), ..
                    } => {
                        return Err(format!(
                            "peer {j}: ipBlock cannot be combined with a pod or namespace selector"
                        ));
                    }
                    NetworkPolicyPeer {
                        ip_block: None,
                        namespace_selector: None,
                        pod_selector: None,
                    } => return Err(format!("peer {j} names no selector and no ipBlock")),
                    NetworkPolicyPeer {
                        ip_block: None,
                        namespace_selector,
                        pod_selector,
                    } => {
                        let ns_match = match namespace_selector {
                            None => NsMatch::Own(ns.to_string()),
                            Some(s) => NsMatch::Labels(
                                Selector::parse(s)
                                    .map_err(|e| format!("peer {j} namespaceSelector: {e}"))?,
                            ),
                        };
                        let pod = match pod_selector {
                            None => Selector::everything(),
                            Some(s) => Selector::parse(s)
                                .map_err(|e| format!("peer {j} podSelector: {e}"))?,
                        };
                        parts.push(Part {
                            peer: Peer::Pods(PeerSelector { ns: ns_match, pod }),
                            ports: ports.clone(),
                        });
                    }
                }
            }
            if !blocks.is_empty() {
                // An egress named port resolves on the pod that owns each
                // destination address (see `cidr::compute`).
                parts.push(Part {
                    peer: Peer::Blocks(blocks),
                    ports,
                });
            }
        }
    }
    Ok(parts)
}

fn parse_ports(ports: Option<&[NetworkPolicyPort]>) -> Result<Ports, String> {
    let mut out = Ports::default();
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        out.fixed.push(L4::Any);
        return Ok(out);
    };
    for (k, p) in ports.iter().enumerate() {
        let proto =
            parse_protocol(p.protocol.as_deref()).map_err(|e| format!("ports[{k}]: {e}"))?;
        match (&p.port, p.end_port) {
            (None, None) => out.fixed.push(L4::Proto(proto)),
            (None, Some(_)) => return Err(format!("ports[{k}]: endPort without port")),
            (Some(IntOrString::Int(n)), end) => {
                let first = port_number(*n).ok_or(format!("ports[{k}]: port {n} out of range"))?;
                let last = match end {
                    None => first,
                    Some(e) => {
                        let last = port_number(e)
                            .ok_or(format!("ports[{k}]: endPort {e} out of range"))?;
                        if last < first {
                            return Err(format!("ports[{k}]: endPort {e} is below port {n}"));
                        }
                        last
                    }
                };
                out.fixed.push(L4::Ports { proto, first, last });
            }
            (Some(IntOrString::String(name)), end) => {
                if end.is_some() {
                    return Err(format!("ports[{k}]: endPort with the named port {name:?}"));
                }
                if !is_port_name(name) {
                    return Err(format!("ports[{k}]: {name:?} is not a valid port name"));
                }
                out.named.push((name.clone(), proto));
            }
        }
    }
    out.fixed.sort();
    out.fixed.dedup();
    out.named.sort();
    out.named.dedup();
    Ok(out)
}

pub fn parse_protocol(p: Option<&str>) -> Result<u8, String> {
    match p {
        None | Some("TCP") => Ok(proto::TCP),
        Some("UDP") => Ok(proto::UDP),
        Some("SCTP") => Ok(proto::SCTP),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// IANA service name: 1-15 of `[a-z0-9-]`, at least one letter, no leading,
/// trailing or double hyphen.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn parse_block(b: &IPBlock) -> Result<Block, String> {
    // Host bits are accepted and dropped, as `net.ParseCIDR` does.
    let cidr = parse_cidr(&b.cidr)?;
    let mut except = Vec::new();
    for e in b.except.iter().flatten() {
        let ex = parse_cidr(e)?;
        if !strictly_within(ex, cidr) {
            return Err(format!("except {e} is not strictly inside {}", b.cidr));
        }
        except.push(ex);
    }
    except.sort();
    except.dedup();
    Ok(Block { cidr, except })
}

fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    if !s.contains('/') {
        return Err(format!("{s:?} is not a CIDR"));
    }
    s.parse::<IpNetwork>()
        .map(canonical)
        .map_err(|e| format!("{s:?} is not a CIDR: {e}"))
}

/// `inner` lies within `outer` (same family, at least as long a prefix).
pub fn within(inner: IpNetwork, outer: IpNetwork) -> bool {
    match (inner.network(), outer.network()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            inner.prefix() >= outer.prefix() && outer.contains(inner.network())
        }
        _ => false,
    }
}

fn strictly_within(inner: IpNetwork, outer: IpNetwork) -> bool {
    within(inner, outer) && inner.prefix() > outer.prefix()
}
