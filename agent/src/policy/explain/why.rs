//! Does one peer or one port match, and if not, why not, in words. Each
//! check mirrors what the compiler writes for it (the module docs of
//! `policy`, `contributions::resolve`, `cidr::compute`, `tiers`), so that a
//! match here is an entry the data path finds.
use std::net::IpAddr;

use sluice_common::proto;

use crate::policy::{
    L4,
    identities::{IdentityKey, NamedPorts},
    parse::Block,
    selector::{Labels, NsMatch, Op, PeerSelector, Requirement, Selector},
};

/// The other end of the flow as the data path sees it: an address, and the
/// pod (identity) that owns it, if any.
pub(super) struct Peer<'a> {
    pub addr: IpAddr,
    pub key: Option<&'a IdentityKey>,
    /// `ns/name` of the owning pod, or the address.
    pub name: String,
}

/// `Ok(what matched)` or `Err(why not)`.
pub(super) type Check = Result<String, Vec<String>>;

pub(super) fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        0 => "any protocol".into(),
        other => format!("protocol {other}"),
    }
}

pub(super) fn l4_name(l4: L4) -> String {
    match l4 {
        L4::Any => "any port".into(),
        L4::Proto(0) => "any protocol".into(),
        L4::Proto(p) => format!("{} (any port)", proto_name(p)),
        L4::Ports { proto, first, last } if first == last => {
            format!("{}/{first}", proto_name(proto))
        }
        L4::Ports { proto, first, last } => format!("{}/{first}-{last}", proto_name(proto)),
    }
}

fn l4_check(l4: L4, p: u8, port: u16) -> Result<(), String> {
    match l4 {
        L4::Any | L4::Proto(0) => Ok(()),
        L4::Proto(q) | L4::Ports { proto: q, .. } if q != p => Err(format!(
            "protocol differs: the rule has {}, the flow is {}",
            proto_name(q),
            proto_name(p)
        )),
        L4::Proto(_) => Ok(()),
        L4::Ports { first, last, .. } if (first..=last).contains(&port) => Ok(()),
        L4::Ports { first, last, .. } if first == last => {
            Err(format!("port {port} is not {first}"))
        }
        L4::Ports { first, last, .. } => Err(format!("port {port} not in {first}-{last}")),
    }
}

/// The ports of a rule (fixed matches, and named ports resolved on `table`,
/// the named ports of the destination pod `whose`; `None`: the destination
/// is no pod). A named port of protocol 0 (a ClusterNetworkPolicy
/// `destinationNamedPort`) matches the name whatever its protocol.
pub(super) fn ports(
    fixed: &[L4],
    named: &[(String, u8)],
    table: Option<(&NamedPorts, &str)>,
    p: u8,
    port: u16,
) -> Check {
    let mut why = Vec::new();
    for &l4 in fixed {
        match l4_check(l4, p, port) {
            Ok(()) => return Ok(l4_name(l4)),
            Err(e) => why.push(e),
        }
    }
    for (name, want) in named {
        let Some((table, whose)) = table else {
            why.push(format!(
                "named port `{name}`: the destination is no pod, it has no named ports"
            ));
            continue;
        };
        let mut found = false;
        for (n, q, number) in table.iter().filter(|(n, ..)| n == name) {
            if *q != *want && *want != 0 {
                continue;
            }
            found = true;
            match l4_check(
                L4::Ports {
                    proto: *q,
                    first: *number,
                    last: *number,
                },
                p,
                port,
            ) {
                Ok(()) => return Ok(format!("named port `{n}` ({}/{number})", proto_name(*q))),
                Err(e) => why.push(format!(
                    "named port `{n}` is {}/{number} on {whose}: {e}",
                    proto_name(*q)
                )),
            }
        }
        if !found {
            let other = table.iter().find(|(n, ..)| n == name);
            why.push(match other {
                Some((_, q, number)) => format!(
                    "named port `{name}` on {whose} is {}/{number}, not {}",
                    proto_name(*q),
                    proto_name(*want)
                ),
                None => format!("named port `{name}` not on the destination pod {whose}"),
            });
        }
    }
    if fixed.is_empty() && named.is_empty() {
        why.push("no port".into());
    }
    Err(why)
}

fn values(v: &std::collections::BTreeSet<String>) -> String {
    v.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

fn requirement_name(r: &Requirement) -> String {
    match &r.op {
        Op::In(v) if v.len() == 1 => format!("{}={}", r.key, values(v)),
        Op::In(v) => format!("{} in ({})", r.key, values(v)),
        Op::NotIn(v) => format!("{} notin ({})", r.key, values(v)),
        Op::Exists => r.key.clone(),
        Op::DoesNotExist => format!("!{}", r.key),
    }
}

/// A selector as kubectl writes one (`{}` selects everything).
pub(super) fn selector_name(s: &Selector) -> String {
    if s.requirements().is_empty() {
        "{}".into()
    } else {
        s.requirements()
            .iter()
            .map(requirement_name)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The requirements of `s` that `labels` fail, in words: `namespace label
/// `env` is `dev` (wants env=prod)`.
pub(super) fn selector_fails(s: &Selector, labels: &Labels, what: &str) -> Vec<String> {
    s.requirements()
        .iter()
        .filter(|r| !Selector::requirement_holds(r, labels))
        .map(|r| {
            let want = requirement_name(r);
            match labels.get(&r.key) {
                Some(v) => format!("{what} label `{}` is `{v}` (wants {want})", r.key),
                None => format!("{what} label `{}` missing (wants {want})", r.key),
            }
        })
        .collect()
}

/// A peer selector of a rule: the peer must be a pod, of a namespace it
/// covers, with labels it matches.
pub(super) fn peer_selector(sel: &PeerSelector, peer: &Peer<'_>) -> Check {
    let pods = match selector_name(&sel.pod) {
        all if all == "{}" => "pods".to_string(),
        s => format!("pods {s}"),
    };
    let name = match &sel.ns {
        NsMatch::Own(ns) => format!("{pods} in {ns}"),
        NsMatch::Labels(n) if n.requirements().is_empty() => format!("{pods} in every namespace"),
        NsMatch::Labels(n) => format!("{pods} in namespaces {}", selector_name(n)),
    };
    let Some(key) = peer.key else {
        return Err(vec![format!("{name}: {} is not a pod address", peer.addr)]);
    };
    let mut why = match &sel.ns {
        NsMatch::Own(ns) if *ns != key.namespace => vec![format!(
            "{}: namespace is `{}`, the rule selects pods of `{ns}` only",
            peer.name, key.namespace
        )],
        NsMatch::Own(_) => Vec::new(),
        NsMatch::Labels(n) => selector_fails(n, &key.ns_labels, "namespace"),
    };
    why.extend(selector_fails(&sel.pod, &key.labels, "pod"));
    if why.is_empty() {
        Ok(name)
    } else {
        Err(why.into_iter().map(|w| format!("{name}: {w}")).collect())
    }
}

/// NetworkPolicy ipBlocks: the address is in a `cidr` and in none of its
/// `except`s.
pub(super) fn blocks(bs: &[Block], addr: IpAddr) -> Check {
    let mut why = Vec::new();
    for b in bs {
        if !b.cidr.contains(addr) {
            why.push(format!("{addr} not in ipBlock {}", b.cidr));
        } else if let Some(e) = b.except.iter().find(|e| e.contains(addr)) {
            why.push(format!(
                "{addr} is in ipBlock {} but in its except {e}",
                b.cidr
            ));
        } else {
            return Ok(format!("ipBlock {}", b.cidr));
        }
    }
    Err(why)
}

/// ClusterNetworkPolicy `networks` (or the host prefixes of `nodes`).
pub(super) fn networks(nets: &[ipnetwork::IpNetwork], addr: IpAddr, what: &str) -> Check {
    match nets.iter().find(|n| n.contains(addr)) {
        Some(n) => Ok(format!("{what} {n}")),
        None => Err(vec![format!(
            "{addr} not in {what} [{}]",
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )]),
    }
}
