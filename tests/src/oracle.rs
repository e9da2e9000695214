//! A reference NetworkPolicy evaluator, written from the text of the
//! networking.k8s.io/v1 API (the field descriptions of NetworkPolicySpec,
//! NetworkPolicyIngressRule/EgressRule, NetworkPolicyPeer,
//! NetworkPolicyPort, IPBlock) and of meta/v1 LabelSelector. It shares no
//! code with the agent's compiler: its own selector matching, port and
//! ipBlock logic, no identities, no maps. It answers one question,
//! [`Oracle::allowed`], by reading the objects every time: slow and plain.
//!
//! # What the API text says, as implemented here
//!
//! - A pod is isolated for a direction iff some policy of its namespace
//!   selects it (`podSelector`, `{}` = every pod of the namespace) and has
//!   that direction in `policyTypes`. `policyTypes` unset (or empty):
//!   Ingress, plus Egress when the policy has egress rules.
//! - A connection is allowed iff the source's egress allows it and the
//!   destination's ingress allows it; a side that is not isolated allows
//!   everything; an isolated side allows what some rule of some policy
//!   selecting it (that direction) allows.
//! - A rule with no (or an empty) `from`/`to` matches every peer, inside
//!   the cluster or not; with peers it matches a peer that matches one of
//!   them. A peer: `podSelector` alone = pods of the policy's namespace;
//!   `namespaceSelector` alone = every pod of the selected namespaces (`{}`
//!   = all namespaces' pods, never an address that is no pod); both = pods
//!   matching both; `ipBlock` = addresses in `cidr` and in no `except`, pod
//!   addresses included.
//! - A rule with no (or empty) `ports` matches every port and protocol. A
//!   port: protocol defaults to TCP; no `port` = every port of that
//!   protocol; a number, up to `endPort` when set; a name is resolved on
//!   the destination pod (ingress: the selected pod; egress: the pod that
//!   owns the destination address, whatever the peer, ipBlock included),
//!   as a container port of that name and protocol. An address that is no
//!   pod has no named ports.
//! - Label selectors: `matchLabels` `k: v` is `k In (v)`; requirements are
//!   ANDed; `In` needs the key with one of the values, `NotIn` matches when
//!   the key is absent or has another value, `Exists`/`DoesNotExist` test
//!   the key only. An empty selector matches everything.
//!
//! # Where the API text is silent: the product's documented semantics
//!
//! Each of these mirrors what `agent/src/policy` documents (module docs of
//! `mod.rs`, `parse.rs`, `events.rs`, and the data path's `new_flow`) and
//! is marked "product:" below.
//! - Invalid input (an unknown selector operator, `In` without values,
//!   `Exists` with values, an unknown protocol, a port out of range,
//!   `endPort` without `port` or below it or with a named port, a bad port
//!   name, an unparsable CIDR or an `except` not strictly inside its
//!   `cidr`, a peer with both ipBlock and a selector or with nothing):
//!   the rule concerned is dropped, denying what it would have allowed. An
//!   invalid `podSelector` selects every pod of the namespace and the
//!   policy has no rules. An unknown policy type isolates both directions.
//!   Label keys and values are taken as valid (the generator makes only
//!   valid ones).
//! - Host-network pods and finished pods (phase Succeeded/Failed) are not
//!   pods for policy: they are neither selected nor selectable, and their
//!   addresses are plain addresses (a host-network pod's are the node's).
//! - Traffic from the node's own addresses (kubelet probes) always passes
//!   the destination's ingress; the node's egress is not judged.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod},
        networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};
use sluice_api::{ClusterNetworkPolicy, Tier};

mod cnp;
use cnp::{Peer, TierVerdict};

/// The objects the oracle reads, and the node's own addresses.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct World {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    pub node_ips: Vec<IpAddr>,
    /// ClusterNetworkPolicies ([`cnp`]); absent from older saved cases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_policies: Vec<ClusterNetworkPolicy>,
    /// The Nodes `nodes` peers select.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Node>,
}

/// A transport protocol as NetworkPolicy names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }

    /// The API's protocol field: unset is TCP; anything else unknown.
    fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Proto::Tcp),
            Some("UDP") => Some(Proto::Udp),
            Some("SCTP") => Some(Proto::Sctp),
            Some(_) => None,
        }
    }
}

/// A rule's peers and ports, whichever direction.
type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

pub struct Oracle<'a> {
    world: &'a World,
    ns_labels: BTreeMap<&'a str, BTreeMap<String, String>>,
}

/// A pod that policy applies to (running or pending, not host-network).
fn is_policy_pod(p: &Pod) -> bool {
    let host = p.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    // product: finished and host-network pods are not endpoints nor peers.
    !host && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let st = p.status.as_ref();
    let mut out: Vec<IpAddr> = st
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if out.is_empty()
        && let Some(ip) = st
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|s| s.parse().ok())
    {
        out.push(ip);
    }
    out
}

fn labels_of(p: &Pod) -> BTreeMap<String, String> {
    p.metadata.labels.clone().unwrap_or_default()
}

fn ns_of(p: &Pod) -> &str {
    p.metadata.namespace.as_deref().unwrap_or_default()
}

/// A label selector's verdict: `None` when the selector is invalid.
fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Option<bool> {
    let mut all = true;
    for (k, v) in sel.match_labels.iter().flatten() {
        all &= labels.get(k) == Some(v);
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" if !values.is_empty() => have.is_some_and(|v| values.contains(v)),
            "NotIn" if !values.is_empty() => !have.is_some_and(|v| values.contains(v)),
            "Exists" if values.is_empty() => have.is_some(),
            "DoesNotExist" if values.is_empty() => have.is_none(),
            _ => return None,
        };
        all &= ok;
    }
    Some(all)
}

/// An address and a prefix length, parsed from "a.b.c.d/n" or "x::/n".
#[derive(Clone, Copy)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Self> {
        let (a, l) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let len: u8 = l.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Self { addr, len })
    }

    /// The address in the top bits of 128, so one mask serves both
    /// families.
    fn bits(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        };
        Self::bits(ip) & mask == Self::bits(self.addr) & mask
    }

    /// Strictly inside: same family, longer prefix, contained.
    fn strictly_inside(&self, outer: &Cidr) -> bool {
        self.addr.is_ipv4() == outer.addr.is_ipv4()
            && self.len > outer.len
            && outer.contains(self.addr)
    }
}

/// IANA_SVC_NAME as the API text states it: at most 15 characters of
/// a-z, 0-9 and '-', at least one letter, no '-' at either end nor "--".
fn is_svc_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// One `ports` entry, checked: `None` when invalid.
enum PortMatch {
    /// Every port of the protocol.
    All(Proto),
    Range(Proto, u16, u16),
    Named(Proto, String),
}

fn parse_port(p: &NetworkPolicyPort) -> Option<PortMatch> {
    let proto = Proto::parse(p.protocol.as_deref())?;
    let valid = |n: i32| (1..=65535).contains(&n);
    match (&p.port, p.end_port) {
        (None, None) => Some(PortMatch::All(proto)),
        (None, Some(_)) => None,
        (Some(IntOrString::Int(n)), None) if valid(*n) => {
            Some(PortMatch::Range(proto, *n as u16, *n as u16))
        }
        (Some(IntOrString::Int(n)), Some(e)) if valid(*n) && valid(e) && e >= *n => {
            Some(PortMatch::Range(proto, *n as u16, e as u16))
        }
        (Some(IntOrString::String(name)), None) if is_svc_name(name) => {
            Some(PortMatch::Named(proto, name.clone()))
        }
        _ => None,
    }
}

/// One peer, checked: `None` when invalid.
enum PeerMatch<'a> {
    Block(Cidr, Vec<Cidr>),
    Pods {
        ns: Option<&'a LabelSelector>,
        pods: Option<&'a LabelSelector>,
    },
}

fn parse_block(b: &IPBlock) -> Option<PeerMatch<'static>> {
    let cidr = Cidr::parse(&b.cidr)?;
    let mut except = Vec::new();
    for e in b.except.iter().flatten() {
        let c = Cidr::parse(e)?;
        if !c.strictly_inside(&cidr) {
            return None;
        }
        except.push(c);
    }
    Some(PeerMatch::Block(cidr, except))
}

fn parse_peer(p: &NetworkPolicyPeer) -> Option<PeerMatch<'_>> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => parse_block(b),
        (Some(_), _, _) | (None, None, None) => None,
        (None, ns, pods) => {
            let valid = |s: &Option<LabelSelector>| {
                s.as_ref()
                    .is_none_or(|s| selector_matches(s, &BTreeMap::new()).is_some())
            };
            (valid(ns) && valid(pods)).then_some(PeerMatch::Pods {
                ns: ns.as_ref(),
                pods: pods.as_ref(),
            })
        }
    }
}

impl<'a> Oracle<'a> {
    pub fn new(world: &'a World) -> Self {
        let ns_labels = world
            .namespaces
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.as_deref()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        Self { world, ns_labels }
    }

    /// The pod that owns an address, if any (policy pods only).
    pub fn pod_at(&self, ip: IpAddr) -> Option<&'a Pod> {
        self.world
            .pods
            .iter()
            .filter(|p| is_policy_pod(p))
            .find(|p| pod_ips(p).contains(&ip))
    }

    /// Would a new connection from `src` to `dst` (protocol, destination
    /// port) be allowed?
    pub fn allowed(&self, src: IpAddr, dst: IpAddr, proto: Proto, port: u16) -> bool {
        let (src_pod, dst_pod) = (self.pod_at(src), self.pod_at(dst));
        let egress = match src_pod {
            Some(p) => self.side(p, Dir::Egress, dst, dst_pod, dst_pod, proto, port),
            // An address outside the cluster, or the node (product: its
            // egress is not judged).
            None => true,
        };
        let ingress = match dst_pod {
            // product: the node may always reach its pods.
            Some(_) if self.world.node_ips.contains(&src) => true,
            Some(p) => self.side(p, Dir::Ingress, src, src_pod, Some(p), proto, port),
            None => true,
        };
        egress && ingress
    }

    /// One end, all tiers: Admin, then NetworkPolicy where it isolates
    /// `me`, then Baseline, else allowed ([`cnp`]).
    #[expect(clippy::too_many_arguments, reason = "one question, spelled out")]
    fn side(
        &self,
        me: &Pod,
        dir: Dir,
        peer: IpAddr,
        peer_pod: Option<&Pod>,
        dst_pod: Option<&Pod>,
        proto: Proto,
        port: u16,
    ) -> bool {
        let other = Peer {
            ip: peer,
            pod: peer_pod,
            dst_pod,
            proto,
            port,
        };
        match self.tier_verdict(&Tier::Admin, me, dir, &other) {
            TierVerdict::Accept => return true,
            TierVerdict::Deny => return false,
            TierVerdict::Undecided => {}
        }
        let isolated = self
            .selecting(me)
            .iter()
            .any(|(_, i, e, _)| if dir == Dir::Ingress { *i } else { *e });
        if isolated {
            return self.side_allows(me, dir, peer, peer_pod, dst_pod, proto, port);
        }
        self.tier_verdict(&Tier::Baseline, me, dir, &other) != TierVerdict::Deny
    }

    /// The policies of `pod`'s namespace that select it, with their
    /// (ingress, egress) isolation and whether their rules count.
    fn selecting(&self, pod: &Pod) -> Vec<(&'a NetworkPolicy, bool, bool, bool)> {
        let labels = labels_of(pod);
        let mut out = Vec::new();
        for np in &self.world.policies {
            if np.metadata.namespace.as_deref() != Some(ns_of(pod)) {
                continue;
            }
            let spec = np.spec.clone().unwrap_or_default();
            let (selects, rules_count) = match &spec.pod_selector {
                None => (true, true),
                Some(sel) => match selector_matches(sel, &labels) {
                    Some(m) => (m, true),
                    // product: an invalid podSelector selects every pod
                    // of the namespace, with no rules.
                    None => (true, false),
                },
            };
            if !selects {
                continue;
            }
            let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            let (ingress, egress) = match spec.policy_types.as_deref() {
                None | Some([]) => (true, has_egress),
                Some(types) => {
                    if types.iter().any(|t| t != "Ingress" && t != "Egress") {
                        // product: an unknown type isolates both ways.
                        (true, true)
                    } else {
                        (
                            types.iter().any(|t| t == "Ingress"),
                            types.iter().any(|t| t == "Egress"),
                        )
                    }
                }
            };
            out.push((np, ingress, egress, rules_count));
        }
        out
    }

    /// One side: `me` judges a connection to/from `peer` (address and pod),
    /// whose destination pod (for named ports) is `dst_pod`.
    #[expect(clippy::too_many_arguments, reason = "one question, spelled out")]
    fn side_allows(
        &self,
        me: &Pod,
        dir: Dir,
        peer: IpAddr,
        peer_pod: Option<&Pod>,
        dst_pod: Option<&Pod>,
        proto: Proto,
        port: u16,
    ) -> bool {
        let policies = self.selecting(me);
        let isolating: Vec<_> = policies
            .iter()
            .filter(|(_, i, e, _)| if dir == Dir::Ingress { *i } else { *e })
            .collect();
        if isolating.is_empty() {
            return true;
        }
        isolating.iter().any(|(np, _, _, rules_count)| {
            if !rules_count {
                return false;
            }
            let spec = np.spec.clone().unwrap_or_default();
            let ns = np.metadata.namespace.as_deref().unwrap_or_default();
            let rules: Vec<RuleParts> = if dir == Dir::Ingress {
                spec.ingress
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.from, r.ports))
                    .collect()
            } else {
                spec.egress
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.to, r.ports))
                    .collect()
            };
            rules.iter().any(|(peers, ports)| {
                self.rule_allows(
                    ns,
                    peers.as_deref(),
                    ports.as_deref(),
                    peer,
                    peer_pod,
                    dst_pod,
                    proto,
                    port,
                )
            })
        })
    }

    #[expect(clippy::too_many_arguments, reason = "one question, spelled out")]
    fn rule_allows(
        &self,
        policy_ns: &str,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        peer: IpAddr,
        peer_pod: Option<&Pod>,
        dst_pod: Option<&Pod>,
        proto: Proto,
        port: u16,
    ) -> bool {
        // Validity first: an invalid rule allows nothing (product).
        let parsed_ports: Option<Vec<PortMatch>> =
            ports.unwrap_or_default().iter().map(parse_port).collect();
        let parsed_peers: Option<Vec<PeerMatch<'_>>> =
            peers.unwrap_or_default().iter().map(parse_peer).collect();
        let (Some(ports), Some(peers)) = (parsed_ports, parsed_peers) else {
            return false;
        };
        let peer_ok = peers.is_empty()
            || peers.iter().any(|m| match m {
                PeerMatch::Block(cidr, except) => {
                    cidr.contains(peer) && !except.iter().any(|e| e.contains(peer))
                }
                PeerMatch::Pods { ns, pods } => {
                    self.pods_peer_matches(policy_ns, *ns, *pods, peer_pod)
                }
            });
        if !peer_ok {
            return false;
        }
        ports.is_empty()
            || ports.iter().any(|m| match m {
                PortMatch::All(p) => *p == proto,
                PortMatch::Range(p, lo, hi) => *p == proto && (*lo..=*hi).contains(&port),
                PortMatch::Named(p, name) => {
                    *p == proto && dst_pod.is_some_and(|d| has_named_port(d, name, *p, port))
                }
            })
    }

    /// A selector peer (selectors already checked valid) against the
    /// peer's pod; an address that is no pod matches no selector.
    fn pods_peer_matches(
        &self,
        policy_ns: &str,
        ns: Option<&LabelSelector>,
        pods: Option<&LabelSelector>,
        peer_pod: Option<&Pod>,
    ) -> bool {
        let Some(p) = peer_pod else {
            return false;
        };
        let empty = BTreeMap::new();
        let ns_ok = match ns {
            None => ns_of(p) == policy_ns,
            Some(sel) => {
                let labels = self.ns_labels.get(ns_of(p)).unwrap_or(&empty);
                selector_matches(sel, labels) == Some(true)
            }
        };
        ns_ok && pods.is_none_or(|sel| selector_matches(sel, &labels_of(p)) == Some(true))
    }
}

/// Does the pod have a container port named `name`, of protocol `proto`,
/// numbered `port`? Sidecars (init containers with restartPolicy Always)
/// serve like containers.
fn has_named_port(pod: &Pod, name: &str, proto: Proto, port: u16) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers.iter().chain(sidecars).any(|c| {
        c.ports.iter().flatten().any(|cp| {
            cp.name.as_deref() == Some(name)
                && Proto::parse(cp.protocol.as_deref()) == Some(proto)
                && cp.container_port == i32::from(port)
        })
    })
}
