//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, field for field
//! as the network-policy-api v0.2.0 CRDs (deploy/crds/) define it, standard
//! and experimental channels.
//!
//! The types read leniently on purpose: everything the schema constrains
//! (enums, one-of fields, required selectors, ranges) is checked by
//! [`crate::validate()`], not by serde, so that one bad object reaches the
//! agent as a typed error it can report on that object (a Warning Event)
//! instead of failing a whole list. In particular:
//! - `tier` and `action` keep an unknown value as `Unknown(String)`;
//! - one-of objects (subject, peers, protocols, ports) are structs of
//!   options, as in the upstream Go types, and [`validate()`] checks that
//!   exactly one is set; their `kind()` accessors give the one that is;
//! - fields this version does not know land in `unknown` (a newer CRD's
//!   fields), which validation rejects, so they fail closed rather than being
//!   silently ignored.
//!
//! [`validate()`]: crate::validate()
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Fields the schema does not define, by name.
pub type UnknownFields = BTreeMap<String, serde_json::Value>;

/// The API group.
pub const GROUP: &str = "policy.networking.k8s.io";
/// The API version.
pub const VERSION: &str = "v1alpha2";

/// Spec of a ClusterNetworkPolicy: a cluster-wide network policy, in the
/// Admin tier (before NetworkPolicy) or the Baseline tier (after it).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    plural = "clusternetworkpolicies",
    singular = "clusternetworkpolicy",
    shortname = "cnp",
    status = "ClusterNetworkPolicyStatus",
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    pub tier: Tier,
    /// 0..=1000; lower numbers take precedence within a tier.
    pub priority: i32,
    /// The pods the policy applies to.
    pub subject: Subject,
    /// Ingress rules in precedence order (first match decides); at most 25.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    /// Egress rules in precedence order (first match decides); at most 25.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// Status, as the CRD defines it (Sluice does not write it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The policy's tier.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Before NetworkPolicy; `Accept` and `Deny` are final.
    #[default]
    Admin,
    /// After NetworkPolicy, for endpoints it does not isolate.
    Baseline,
    /// A value the schema does not allow; [`crate::validate()`] rejects it.
    #[serde(untagged)]
    Unknown(String),
}

/// What a matching rule does.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Action {
    #[default]
    Accept,
    Deny,
    /// Skip the rest of this tier.
    Pass,
    /// A value the schema does not allow; [`crate::validate()`] rejects it.
    #[serde(untagged)]
    Unknown(String),
}

/// The pods a policy applies to: exactly one of the fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// All pods of the namespaces this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// The pods this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// Pods by namespace and pod labels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Absent or empty selects every namespace (the Go type is not a pointer,
    /// so absent reads as empty upstream too).
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    /// Required by the schema ([`crate::validate()`] checks it); empty
    /// selects every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// An ingress rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Optional, at most 100 characters; names the rule in drops and metrics.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub action: Action,
    /// Sources; 1..=25 peers.
    #[serde(default)]
    pub from: Vec<IngressPeer>,
    /// Absent matches every protocol and port; else 1..=25 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<Protocol>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// An egress rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Optional, at most 100 characters; names the rule in drops and metrics.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub action: Action,
    /// Destinations; 1..=25 peers.
    #[serde(default)]
    pub to: Vec<EgressPeer>,
    /// Absent matches every protocol and port; else 1..=25 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<Protocol>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A source of an ingress rule: exactly one of the fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressPeer {
    /// All (non host-network) pods of the namespaces this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// The (non host-network) pods this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A destination of an egress rule: exactly one of the fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressPeer {
    /// All (non host-network) pods of the namespaces this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// The (non host-network) pods this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// Experimental: the addresses (`status.addresses`) of the nodes this
    /// selects; empty selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// CIDRs, IPv4 or IPv6 (1..=25); also match pod and node addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    /// Experimental, and not supported by Sluice: parsed so that
    /// [`crate::validate()`] can reject it by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A protocol match: exactly one of the fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<PortMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<PortMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<PortMatch>,
    /// Experimental: a container port name on the destination pod (any
    /// protocol that port declares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// The port part of a TCP, UDP or SCTP match. The schema requires at least
/// one property (`minProperties: 1`), so `destinationPort` is in practice
/// always set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A destination port: exactly one of the fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// 1..=65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A port range, both ends included; the schema wants `start < end`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub start: i32,
    pub end: i32,
}

/// The one field a valid [`Subject`] sets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SubjectKind<'a> {
    Namespaces(&'a LabelSelector),
    Pods(&'a NamespacedPod),
}

/// The one field a valid [`IngressPeer`] sets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum IngressPeerKind<'a> {
    Namespaces(&'a LabelSelector),
    Pods(&'a NamespacedPod),
}

/// The one field a valid [`EgressPeer`] sets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EgressPeerKind<'a> {
    Namespaces(&'a LabelSelector),
    Pods(&'a NamespacedPod),
    Nodes(&'a LabelSelector),
    Networks(&'a [String]),
    DomainNames(&'a [String]),
}

/// The one field a valid [`Protocol`] sets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProtocolKind<'a> {
    Tcp(Option<PortKind>),
    Udp(Option<PortKind>),
    Sctp(Option<PortKind>),
    NamedPort(&'a str),
}

/// A valid destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortKind {
    Number(u16),
    /// Both ends included, `start < end`.
    Range {
        start: u16,
        end: u16,
    },
}

/// The only element of `options` that is `Some`, if exactly one is and
/// nothing unknown is set beside it.
fn only<T: Copy>(options: &[Option<T>], unknown: &UnknownFields) -> Option<T> {
    let mut set = options.iter().flatten();
    match (set.next(), set.next()) {
        (Some(one), None) if unknown.is_empty() => Some(*one),
        _ => None,
    }
}

impl Subject {
    /// The field set, or `None` if not exactly one is (invalid).
    pub fn kind(&self) -> Option<SubjectKind<'_>> {
        only(
            &[
                self.namespaces.as_ref().map(SubjectKind::Namespaces),
                self.pods.as_ref().map(SubjectKind::Pods),
            ],
            &self.unknown,
        )
    }
}

impl IngressPeer {
    /// The field set, or `None` if not exactly one is (invalid).
    pub fn kind(&self) -> Option<IngressPeerKind<'_>> {
        only(
            &[
                self.namespaces.as_ref().map(IngressPeerKind::Namespaces),
                self.pods.as_ref().map(IngressPeerKind::Pods),
            ],
            &self.unknown,
        )
    }
}

impl EgressPeer {
    /// The field set, or `None` if not exactly one is (invalid).
    pub fn kind(&self) -> Option<EgressPeerKind<'_>> {
        only(
            &[
                self.namespaces.as_ref().map(EgressPeerKind::Namespaces),
                self.pods.as_ref().map(EgressPeerKind::Pods),
                self.nodes.as_ref().map(EgressPeerKind::Nodes),
                self.networks.as_deref().map(EgressPeerKind::Networks),
                self.domain_names
                    .as_deref()
                    .map(EgressPeerKind::DomainNames),
            ],
            &self.unknown,
        )
    }
}

impl Protocol {
    /// The field set, or `None` if not exactly one is or its port is
    /// invalid.
    pub fn kind(&self) -> Option<ProtocolKind<'_>> {
        // Some(None): the protocol with no port; None: invalid.
        let port = |m: &PortMatch| -> Option<Option<PortKind>> {
            if !m.unknown.is_empty() {
                return None;
            }
            match &m.destination_port {
                None => Some(None),
                Some(p) => p.kind().map(Some),
            }
        };
        let kind = |m: &Option<PortMatch>, f: fn(Option<PortKind>) -> ProtocolKind<'static>| {
            m.as_ref().map(|m| port(m).map(f))
        };
        let options = [
            kind(&self.tcp, ProtocolKind::Tcp),
            kind(&self.udp, ProtocolKind::Udp),
            kind(&self.sctp, ProtocolKind::Sctp),
            self.destination_named_port
                .as_deref()
                .map(|n| Some(ProtocolKind::NamedPort(n))),
        ];
        only(&options, &self.unknown).flatten()
    }
}

impl Port {
    /// The port, or `None` if not exactly one field is set or a value is out
    /// of range.
    pub fn kind(&self) -> Option<PortKind> {
        let number = self.number.map(|n| valid_port(n).map(PortKind::Number));
        let range = self
            .range
            .map(|r| match (valid_port(r.start), valid_port(r.end)) {
                (Some(start), Some(end)) if start < end => Some(PortKind::Range { start, end }),
                _ => None,
            });
        only(&[number, range], &self.unknown).flatten()
    }
}

/// A port number in 1..=65535.
pub(crate) fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}
