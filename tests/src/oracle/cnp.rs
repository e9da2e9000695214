//! The ClusterNetworkPolicy part of the oracle, written from the text of
//! `policy.networking.k8s.io/v1alpha2` (the field descriptions of the
//! v0.2.0 CRDs in `deploy/crds/`: ClusterNetworkPolicySpec, its subject,
//! rules, peers and protocols). Like the NetworkPolicy part it shares no code
//! with the compiler: its own subject and peer matching over the objects,
//! read every time; only the data types are the API crate's.
//!
//! # What the API text says, as implemented here
//!
//! - For each direction of a connection, on each end that is a pod: the
//!   Admin tier, then NetworkPolicy, then the Baseline tier. A tier's
//!   policies that select the pod (`subject.namespaces`: every pod of the
//!   selected namespaces; `subject.pods`: pods matching both selectors) are
//!   taken by `priority`, lower first; each policy's rules of that
//!   direction in order; the first rule that matches decides: `Accept`
//!   allows, `Deny` drops, `Pass` (Admin only) leaves the tier undecided.
//! - Undecided by Admin: if NetworkPolicy isolates the pod in that
//!   direction, NetworkPolicy decides; otherwise the Baseline tier does the
//!   same, and with no Baseline match the connection is allowed.
//! - A rule matches when one of its peers matches the other end and, when
//!   it has `protocols`, one of them matches the connection. Peers:
//!   `namespaces` = pods of the selected namespaces; `pods` = pods matching
//!   both selectors; host-network pods are never such peers; `networks` =
//!   addresses in one of the CIDRs (pod addresses included); `nodes` = the
//!   addresses of the selected Nodes. Protocols: `tcp`/`udp`/`sctp` with a
//!   `destinationPort` `number`, or a `range` with both ends included; `destinationNamedPort` = the destination pod's
//!   container port of that name (its protocol and number).
//!
//! # Where the API text leaves it to the implementation: product choices
//!
//! - Ties of priority within a tier go by policy name, then rule order
//!   (the API: "the implementation can apply any of the matching policies").
//! - Traffic from the node's own addresses to a pod passes its ingress,
//!   as for NetworkPolicy (see the parent module).
//! - The generator writes only valid policies: validation and its
//!   fail-closed behaviour are the compiler's tests, not the oracle's.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use sluice_api::{Action, ClusterNetworkPolicy, NamespacedPod, Protocol, Tier};

use super::{Cidr, Dir, Oracle, Proto, has_named_port, is_policy_pod, labels_of, ns_of};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A tier's answer for one end in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TierVerdict {
    Accept,
    Deny,
    /// `Pass`, or no rule of the tier matched.
    Undecided,
}

/// The other end of a connection, as one end's rules see it.
pub(super) struct Peer<'p> {
    pub ip: IpAddr,
    pub pod: Option<&'p Pod>,
    /// The connection's destination pod (named ports resolve on it).
    pub dst_pod: Option<&'p Pod>,
    pub proto: Proto,
    pub port: u16,
}

impl Oracle<'_> {
    fn selects(&self, sel: &LabelSelector, ns: &str) -> bool {
        let empty = Default::default();
        let labels = self.ns_labels.get(ns).unwrap_or(&empty);
        super::selector_matches(sel, labels) == Some(true)
    }

    fn namespaced_pod_matches(&self, np: &NamespacedPod, pod: &Pod) -> bool {
        self.selects(&np.namespace_selector, ns_of(pod))
            && np
                .pod_selector
                .as_ref()
                .is_some_and(|s| super::selector_matches(s, &labels_of(pod)) == Some(true))
    }

    fn subject_selects(&self, cnp: &ClusterNetworkPolicy, pod: &Pod) -> bool {
        let s = &cnp.spec.subject;
        match (&s.namespaces, &s.pods) {
            (Some(ns), None) => self.selects(ns, ns_of(pod)),
            (None, Some(np)) => self.namespaced_pod_matches(np, pod),
            _ => false,
        }
    }

    /// Pods of the selected namespaces / matching pods: policy pods only.
    fn pod_peer(
        &self,
        ns: Option<&LabelSelector>,
        pods: Option<&NamespacedPod>,
        peer: &Peer<'_>,
    ) -> bool {
        let Some(p) = peer.pod.filter(|p| is_policy_pod(p)) else {
            return false;
        };
        ns.is_some_and(|s| self.selects(s, ns_of(p)))
            || pods.is_some_and(|np| self.namespaced_pod_matches(np, p))
    }

    fn node_peer(&self, sel: &LabelSelector, ip: IpAddr) -> bool {
        self.world.nodes.iter().any(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            super::selector_matches(sel, &labels) == Some(true)
                && n.status
                    .iter()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .any(|a| a.address.parse() == Ok(ip))
        })
    }

    fn protocols_match(&self, protocols: Option<&[Protocol]>, peer: &Peer<'_>) -> bool {
        let Some(list) = protocols else {
            return true;
        };
        list.iter().any(|p| {
            if let Some(name) = &p.destination_named_port {
                return peer
                    .dst_pod
                    .is_some_and(|d| has_named_port(d, name, peer.proto, peer.port));
            }
            let (want, pm) = match (&p.tcp, &p.udp, &p.sctp) {
                (Some(m), None, None) => (Proto::Tcp, m),
                (None, Some(m), None) => (Proto::Udp, m),
                (None, None, Some(m)) => (Proto::Sctp, m),
                _ => return false,
            };
            let port = i32::from(peer.port);
            want == peer.proto
                && match &pm.destination_port {
                    None => true,
                    Some(d) => match (d.number, &d.range) {
                        (Some(n), None) => n == port,
                        (None, Some(r)) => (r.start..=r.end).contains(&port),
                        _ => false,
                    },
                }
        })
    }

    /// The first matching rule of `tier` for `me` in `dir`.
    pub(super) fn tier_verdict(
        &self,
        tier: &Tier,
        me: &Pod,
        dir: Dir,
        peer: &Peer<'_>,
    ) -> TierVerdict {
        let mut policies: Vec<&ClusterNetworkPolicy> = self
            .world
            .cluster_policies
            .iter()
            .filter(|c| &c.spec.tier == tier && self.subject_selects(c, me))
            .collect();
        // product: equal priorities go by name.
        policies.sort_by(|a, b| {
            (a.spec.priority, a.metadata.name.as_deref())
                .cmp(&(b.spec.priority, b.metadata.name.as_deref()))
        });
        for cnp in policies {
            let rules: Vec<(&Action, bool)> =
                match dir {
                    Dir::Ingress => cnp
                        .spec
                        .ingress
                        .iter()
                        .map(|r| {
                            let peer_ok = r.from.iter().any(|f| {
                                self.pod_peer(f.namespaces.as_ref(), f.pods.as_ref(), peer)
                            });
                            (
                                &r.action,
                                peer_ok && self.protocols_match(r.protocols.as_deref(), peer),
                            )
                        })
                        .collect(),
                    Dir::Egress => cnp
                        .spec
                        .egress
                        .iter()
                        .map(|r| {
                            let peer_ok = r.to.iter().any(|t| {
                                self.pod_peer(t.namespaces.as_ref(), t.pods.as_ref(), peer)
                                    || t.nodes.as_ref().is_some_and(|n| self.node_peer(n, peer.ip))
                                    || t.networks.iter().flatten().any(|c| {
                                        Cidr::parse(c).is_some_and(|c| c.contains(peer.ip))
                                    })
                            });
                            (
                                &r.action,
                                peer_ok && self.protocols_match(r.protocols.as_deref(), peer),
                            )
                        })
                        .collect(),
                };
            if let Some((action, _)) = rules.into_iter().find(|(_, m)| *m) {
                return match action {
                    Action::Accept => TierVerdict::Accept,
                    Action::Deny => TierVerdict::Deny,
                    _ => TierVerdict::Undecided,
                };
            }
        }
        TierVerdict::Undecided
    }
}
