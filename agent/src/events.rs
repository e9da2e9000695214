//! Drop events as users read them: decoded from the data path's records
//! (`datapath::DropEvents` follows the ring buffer), enriched with pod
//! names, filtered for `sluice observe`. The data path already rate-limits
//! them per flow.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::collections::HashMap;

use serde::Serialize;
use sluice_common::{DIR_EGRESS, DropEvent, RULE_CNP_FLAG, reason};

use crate::{
    model::ObjectRef,
    policy::{CnpRuleOrigin, RuleOrigin, audit::WouldDrop},
};

/// How many isolating policies a drop names; the rest are counted.
pub const ISOLATORS_NAMED: usize = 5;

/// The policy rule an event names: the ClusterNetworkPolicy rule of a
/// drop, or the rule (of either kind) that allowed a forwarded flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleName {
    /// `ClusterNetworkPolicy` or `NetworkPolicy`.
    pub kind: &'static str,
    /// A NetworkPolicy's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The rule's `name`, else `ingress[i]` / `egress[i]`.
    pub rule: String,
    /// `Admin`, `Baseline`, or `NetworkPolicy`.
    pub tier: &'static str,
    /// ClusterNetworkPolicy only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

impl RuleName {
    /// `denied by ClusterNetworkPolicy block-metadata, rule deny-imds
    /// (Admin, priority 10)`.
    pub fn explain(&self) -> String {
        self.said("denied by")
    }

    /// `VERB NetworkPolicy x/allow-a, rule ingress[0]`, or a
    /// ClusterNetworkPolicy rule as `explain` words it.
    pub fn said(&self, verb: &str) -> String {
        match (&self.namespace, self.priority) {
            (Some(ns), _) => format!(
                "{verb} {} {ns}/{}, rule {}",
                self.kind, self.name, self.rule
            ),
            (None, Some(p)) => format!(
                "{verb} {} {}, rule {} ({}, priority {p})",
                self.kind, self.name, self.rule, self.tier
            ),
            (None, None) => format!("{verb} {} {}, rule {}", self.kind, self.name, self.rule),
        }
    }
}

/// Rule id -> its name, as the compiler last knew it: every
/// ClusterNetworkPolicy rule, and (for forwarded flows) every
/// NetworkPolicy rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleNames(HashMap<u32, RuleName>);

impl RuleNames {
    pub fn from_origins(origins: Vec<(u32, CnpRuleOrigin)>) -> Self {
        Self(
            origins
                .into_iter()
                .map(|(id, o)| {
                    let name = RuleName {
                        kind: "ClusterNetworkPolicy",
                        namespace: None,
                        name: o.policy,
                        rule: o.rule,
                        tier: o.tier.name(),
                        priority: Some(o.priority),
                    };
                    (id, name)
                })
                .collect(),
        )
    }

    /// Adds the NetworkPolicy rules (their ids never have `RULE_CNP_FLAG`).
    pub fn with_network_policies(mut self, origins: Vec<(u32, RuleOrigin)>) -> Self {
        for (id, o) in origins {
            let dir = if o.dir == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            };
            let name = RuleName {
                kind: "NetworkPolicy",
                namespace: Some(o.policy.namespace),
                name: o.policy.name,
                rule: format!("{dir}[{}]", o.index),
                tier: "NetworkPolicy",
                priority: None,
            };
            self.0.insert(id, name);
        }
        self
    }

    pub fn get(&self, rule_id: u32) -> Option<&RuleName> {
        self.0.get(&rule_id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The NetworkPolicies that isolate each local endpoint, [ingress,
/// egress], as the compiler last knew them: what a `policy-denied` drop
/// (a NetworkPolicy default deny) names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Isolators(HashMap<ObjectRef, std::sync::Arc<[Vec<ObjectRef>; 2]>>);

impl Isolators {
    pub fn new(pods: Vec<(ObjectRef, std::sync::Arc<[Vec<ObjectRef>; 2]>)>) -> Self {
        Self(pods.into_iter().collect())
    }

    /// The policies isolating `pod` in direction `dir` (`DIR_INGRESS`,
    /// `DIR_EGRESS`); empty when none does or the pod is unknown.
    pub fn of(&self, pod: &ObjectRef, dir: u8) -> &[ObjectRef] {
        self.0
            .get(pod)
            .and_then(|lists| lists.get(usize::from(dir)))
            .map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The NetworkPolicies that isolate the endpoint of a default-deny drop in
/// its direction: the first `ISOLATORS_NAMED` by namespace and name, and
/// how many more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IsolatedBy {
    /// `NetworkPolicy`.
    pub kind: &'static str,
    /// `namespace/name` of each.
    pub policies: Vec<String>,
    /// Isolating policies beyond those listed.
    pub more: usize,
}

impl IsolatedBy {
    pub fn new(policies: &[ObjectRef]) -> Self {
        Self {
            kind: "NetworkPolicy",
            policies: policies
                .iter()
                .take(ISOLATORS_NAMED)
                .map(ToString::to_string)
                .collect(),
            more: policies.len().saturating_sub(ISOLATORS_NAMED),
        }
    }

    /// `denied by default: isolated (ingress) by NetworkPolicy x/deny-all,
    /// x/web` (`and N more` past the first few).
    pub fn explain(&self, direction: &str) -> String {
        let mut s = format!(
            "denied by default: isolated ({direction}) by {} {}",
            self.kind,
            self.policies.join(", ")
        );
        if self.more > 0 {
            s.push_str(&format!(" and {} more", self.more));
        }
        s
    }
}

/// A drop as users read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropRecord {
    /// Monotonic kernel time (bpf_ktime_get_ns) of the drop.
    pub ktime_ns: u64,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub direction: &'static str,
    pub ep_id: u32,
    pub peer_identity: u32,
    pub protocol: String,
    /// The protocol number (not printed: `protocol` names it).
    #[serde(skip)]
    pub l4: u8,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// 0 for protocols without ports (ICMP among them: its echo id is in
    /// `icmp_id`).
    pub src_port: u16,
    pub dst_port: u16,
    /// ICMP and ICMPv6 only: type, code, and the echo id of an echo
    /// request or reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_id: Option<u16>,
    pub length: u32,
    /// The ClusterNetworkPolicy rule behind an admin-denied,
    /// baseline-denied or revoked drop (`RULE_CNP_FLAG` set); the rule that
    /// allowed a forwarded flow (absent: the endpoint is not isolated, or
    /// the peer is the node); for a would-drop, the audit view's rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<u32>,
    /// That rule by name, when the agent knows it (`name_rule`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<RuleName>,
    /// A `policy-denied` drop: the NetworkPolicies isolating the endpoint
    /// in that direction (`name_isolators`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolated_by: Option<IsolatedBy>,
    /// The human reason: `denied by ClusterNetworkPolicy ...`, `denied by
    /// default: isolated (ingress) by NetworkPolicy ...`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<String>,
}

impl DropRecord {
    /// Fills in the namespace and pod of each end that `lookup` knows.
    pub fn enrich(&mut self, lookup: impl Fn(IpAddr) -> Option<(String, String)>) {
        if let Some((ns, pod)) = self.src.and_then(&lookup) {
            self.src_namespace = Some(ns);
            self.src_pod = Some(pod);
        }
        if let Some((ns, pod)) = self.dst.and_then(&lookup) {
            self.dst_namespace = Some(ns);
            self.dst_pod = Some(pod);
        }
    }

    /// Names the rule of the event, if `names` has it: the
    /// ClusterNetworkPolicy rule of a drop, the allowing rule of a
    /// forwarded flow.
    pub fn name_rule(&mut self, names: &RuleNames) {
        let Some(name) = self.rule_id.and_then(|id| names.get(id)) else {
            return;
        };
        self.detail = Some(if self.verdict == FORWARDED {
            name.said("allowed by")
        } else {
            name.explain()
        });
        self.policy = Some(name.clone());
    }

    /// Names the NetworkPolicies isolating the endpoint of a default-deny
    /// drop (`policy-denied`): the destination pod's for ingress, the
    /// source pod's for egress (call after `enrich`).
    pub fn name_isolators(&mut self, isolators: &Isolators) {
        if self.reason != reason::name(reason::POLICY_DENIED) {
            return;
        }
        let (dir, ns, pod) = if self.direction == "egress" {
            (DIR_EGRESS, &self.src_namespace, &self.src_pod)
        } else {
            (
                sluice_common::DIR_INGRESS,
                &self.dst_namespace,
                &self.dst_pod,
            )
        };
        let (Some(ns), Some(pod)) = (ns, pod) else {
            return;
        };
        let policies = isolators.of(&ObjectRef::new(ns.clone(), pod.clone()), dir);
        if policies.is_empty() {
            return;
        }
        let by = IsolatedBy::new(policies);
        self.detail = Some(by.explain(self.direction));
        self.isolated_by = Some(by);
    }

    /// The endpoint's address, the peer's, the direction and the server
    /// port of a forwarded flow, as the audit view judges it.
    pub fn flow(&self) -> Option<(IpAddr, IpAddr, u8, u16)> {
        let (src, dst) = (self.src?, self.dst?);
        let dir = if self.direction == "egress" {
            DIR_EGRESS
        } else {
            sluice_common::DIR_INGRESS
        };
        let (me, peer) = if dir == DIR_EGRESS {
            (src, dst)
        } else {
            (dst, src)
        };
        Some((me, peer, dir, self.dst_port))
    }

    /// The would-drop record of this forwarded flow.
    pub fn would_drop(&self, w: &WouldDrop) -> DropRecord {
        let mut r = self.clone();
        r.verdict = WOULD_DROP;
        r.reason = reason::name(w.reason);
        // The audit view's rule ids are its own: the name says it.
        r.rule_id = None;
        let policy = w.policies.join(", ");
        let (namespace, name) = match (w.kind, w.policies.first()) {
            ("NetworkPolicy", Some(p)) => match p.split_once('/') {
                Some((ns, n)) => (Some(ns.to_owned()), n.to_owned()),
                None => (None, p.clone()),
            },
            (_, Some(p)) => (None, p.clone()),
            (_, None) => (None, String::new()),
        };
        r.policy = Some(RuleName {
            kind: w.kind,
            namespace,
            name,
            rule: if w.rule_name.is_empty() {
                "isolation".into()
            } else {
                w.rule_name.clone()
            },
            tier: w.tier.unwrap_or("NetworkPolicy"),
            priority: None,
        });
        r.detail = Some(match w.tier {
            Some(tier) => format!(
                "would be denied by {} {policy}, rule {} ({tier}; audit mode)",
                w.kind, w.rule_name
            ),
            None => format!(
                "would be denied: isolated for {} by {} {policy} (audit mode)",
                self.direction, w.kind
            ),
        });
        r
    }

    /// Is this a forwarded (allowed new flow) record?
    pub fn is_forwarded(&self) -> bool {
        self.verdict == FORWARDED
    }

    /// Prints the record as one JSON line on stdout. A closed stdout must
    /// not stop enforcement (the counters still count): it is only logged.
    pub fn print(&self) {
        use std::io::Write as _;
        if let Ok(line) = serde_json::to_string(self) {
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                tracing::debug!("stdout closed; drop event not printed");
            }
        }
    }

    /// Does this record pass `f`? Every field set in `f` must match.
    pub fn matches(&self, f: &sluice_proto::ObserveFilter) -> bool {
        let ends = [
            (self.src_namespace.as_deref(), self.src_pod.as_deref()),
            (self.dst_namespace.as_deref(), self.dst_pod.as_deref()),
        ];
        let ns_ok = f
            .namespace
            .as_deref()
            .is_none_or(|want| ends.iter().any(|(ns, _)| *ns == Some(want)));
        let pod_ok = f.pod.as_deref().is_none_or(|want| {
            ends.iter().any(|(ns, pod)| match want.split_once('/') {
                Some((wns, wpod)) => *ns == Some(wns) && *pod == Some(wpod),
                None => *pod == Some(want),
            })
        });
        let verdict_ok = verdict_matches(f.verdict.as_deref(), self.verdict);
        let dir_ok = f
            .direction
            .as_deref()
            .is_none_or(|d| d.eq_ignore_ascii_case(self.direction));
        ns_ok && pod_ok && verdict_ok && dir_ok
    }
}

/// The `verdict` of records: a drop, an allowed new flow, a flow that an
/// audit-mode policy would drop.
pub const DROPPED: &str = "DROPPED";
pub const FORWARDED: &str = "FORWARDED";
pub const WOULD_DROP: &str = "WOULD-DROP";

/// Does a record of `verdict` pass the filter's verdict? None is
/// `dropped` (what observe always streamed); `all` is every verdict.
pub fn verdict_matches(want: Option<&str>, verdict: &str) -> bool {
    let want = want.unwrap_or("dropped");
    want.eq_ignore_ascii_case("all") || want.eq_ignore_ascii_case(verdict)
}

/// Does a filter's verdict ask for forwarded flows (or records made from
/// them: would-drop)? Then the data path must report new flows.
pub fn wants_flows(want: Option<&str>) -> bool {
    want.is_some_and(|w| !w.eq_ignore_ascii_case("dropped"))
}

fn addr(family: u8, raw: [u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            raw[12], raw[13], raw[14], raw[15],
        ))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(raw))),
        _ => None,
    }
}

pub fn protocol_name(p: u8) -> String {
    use sluice_common::proto;
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// Echo request or reply (RFC 792, RFC 4443): the data path puts the echo
/// id in both port fields of these.
fn is_echo(proto: u8, icmp_type: u8) -> bool {
    use sluice_common::proto;
    match proto {
        proto::ICMP => matches!(icmp_type, 0 | 8),
        proto::ICMPV6 => matches!(icmp_type, 128 | 129),
        _ => false,
    }
}

impl From<&DropEvent> for DropRecord {
    fn from(e: &DropEvent) -> Self {
        use sluice_common::proto;
        let icmp = e.proto == proto::ICMP || e.proto == proto::ICMPV6;
        let (src_port, dst_port) = if icmp { (0, 0) } else { (e.sport, e.dport) };
        let forwarded = e.reason == reason::FORWARDED;
        // A drop names only ClusterNetworkPolicy rules (a NetworkPolicy
        // default deny has none); a forwarded flow any allowing rule.
        let rule_id = if forwarded {
            (e.rule_id != 0).then_some(e.rule_id)
        } else {
            (e.rule_id & RULE_CNP_FLAG != 0).then_some(e.rule_id)
        };
        Self {
            ktime_ns: e.ts_ns,
            verdict: if forwarded { FORWARDED } else { DROPPED },
            reason: reason::name(e.reason),
            direction: if e.dir == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            },
            ep_id: e.ep_id,
            peer_identity: e.peer_identity,
            protocol: protocol_name(e.proto),
            l4: e.proto,
            src: addr(e.family, e.saddr),
            dst: addr(e.family, e.daddr),
            src_port,
            dst_port,
            icmp_type: icmp.then_some(e.icmp_type),
            icmp_code: icmp.then_some(e.icmp_code),
            icmp_id: is_echo(e.proto, e.icmp_type).then_some(e.sport),
            length: e.pkt_len,
            rule_id,
            policy: None,
            isolated_by: None,
            detail: None,
            src_namespace: None,
            src_pod: None,
            dst_namespace: None,
            dst_pod: None,
        }
    }
}

/// Decodes one ring-buffer record; `None` when it is not a `DropEvent`.
pub fn decode(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: DropEvent is repr(C) plain data valid for any bit pattern and
    // the slice is at least as long; read_unaligned copes with alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_event_reads_as_a_record_with_its_five_tuple() {
        let mut e = DropEvent {
            ep_id: 9,
            family: 4,
            proto: 6,
            dir: DIR_EGRESS,
            reason: reason::POLICY_DENIED,
            sport: 40000,
            dport: 80,
            ..Default::default()
        };
        e.saddr = sluice_common::v4_mapped([10, 0, 0, 2]);
        e.daddr = sluice_common::v4_mapped([10, 0, 0, 3]);
        // SAFETY: viewing a repr(C) value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const DropEvent).cast::<u8>(),
                std::mem::size_of::<DropEvent>(),
            )
        };
        let r = DropRecord::from(&decode(bytes).unwrap());
        assert_eq!(r.src, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(r.dst_port, 80);
        assert_eq!(r.reason, "policy-denied");
        assert_eq!(r.direction, "egress");
        assert_eq!(r.protocol, "TCP");
        assert!(decode(&bytes[..10]).is_none());
    }

    #[test]
    fn icmp_drops_carry_type_code_and_echo_id_and_no_ports() {
        use sluice_common::proto;
        // (proto, type, code, ports as the data path fills them, id)
        for (p, t, c, port, id) in [
            (proto::ICMP, 8, 0, 45, Some(45)),
            (proto::ICMP, 0, 0, 46, Some(46)),
            (proto::ICMP, 3, 1, 0, None),
            (proto::ICMPV6, 128, 0, 47, Some(47)),
            (proto::ICMPV6, 129, 0, 48, Some(48)),
            (proto::ICMPV6, 1, 4, 0, None),
        ] {
            let r = DropRecord::from(&DropEvent {
                family: if p == proto::ICMP { 4 } else { 6 },
                proto: p,
                sport: port,
                dport: port,
                icmp_type: t,
                icmp_code: c,
                ..Default::default()
            });
            assert_eq!((r.src_port, r.dst_port), (0, 0));
            assert_eq!(
                (r.icmp_type, r.icmp_code, r.icmp_id),
                (Some(t), Some(c), id)
            );
        }
        let tcp = DropRecord::from(&DropEvent {
            family: 4,
            proto: proto::TCP,
            sport: 1,
            dport: 2,
            ..Default::default()
        });
        assert_eq!((tcp.src_port, tcp.dst_port, tcp.icmp_type), (1, 2, None));
        let line = serde_json::to_value(&tcp).unwrap();
        assert!(line.get("icmp_type").is_none(), "{line}");
    }

    #[test]
    fn observe_filters_match_either_end_and_every_set_field() {
        let mut r = DropRecord::from(&DropEvent {
            family: 4,
            dir: DIR_EGRESS,
            reason: reason::POLICY_DENIED,
            ..Default::default()
        });
        r.src = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        r.dst = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)));
        r.enrich(|ip| match ip {
            IpAddr::V4(a) if a.octets()[3] == 2 => Some(("x".into(), "a".into())),
            IpAddr::V4(a) if a.octets()[3] == 3 => Some(("y".into(), "b".into())),
            _ => None,
        });
        let f =
            |ns: Option<&str>, pod: Option<&str>, dir: Option<&str>| sluice_proto::ObserveFilter {
                namespace: ns.map(Into::into),
                pod: pod.map(Into::into),
                verdict: None,
                direction: dir.map(Into::into),
            };
        assert!(r.matches(&f(None, None, None)));
        assert!(r.matches(&f(Some("y"), None, None)));
        assert!(r.matches(&f(None, Some("x/a"), Some("egress"))));
        assert!(!r.matches(&f(None, Some("y/a"), None)));
        assert!(!r.matches(&f(Some("z"), None, None)));
        assert!(!r.matches(&f(Some("x"), None, Some("ingress"))));
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;
    use crate::policy::Tier;

    #[test]
    fn a_cnp_drop_names_its_policy_rule_tier_and_priority() {
        let names = RuleNames::from_origins(vec![(
            RULE_CNP_FLAG | 4,
            CnpRuleOrigin {
                policy: "block-metadata".into(),
                rule: "deny-imds".into(),
                tier: Tier::Admin,
                priority: 10,
                dir: DIR_EGRESS,
                index: 0,
                action: sluice_common::action::DENY,
            },
        )]);
        let mut r = DropRecord::from(&DropEvent {
            reason: reason::ADMIN_DENIED,
            rule_id: RULE_CNP_FLAG | 4,
            ..Default::default()
        });
        r.name_rule(&names);
        assert_eq!(
            r.detail.as_deref(),
            Some(
                "denied by ClusterNetworkPolicy block-metadata, rule deny-imds (Admin, priority 10)"
            )
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["policy"]["tier"], "Admin");
        assert_eq!(v["rule_id"], RULE_CNP_FLAG | 4);
        // A NetworkPolicy default deny carries no rule; an unknown id
        // stays a number.
        let mut r = DropRecord::from(&DropEvent {
            reason: reason::POLICY_DENIED,
            ..Default::default()
        });
        r.name_rule(&names);
        assert_eq!((r.rule_id, r.detail), (None, None));
        let mut r = DropRecord::from(&DropEvent {
            reason: reason::REVOKED,
            rule_id: RULE_CNP_FLAG | 5,
            ..Default::default()
        });
        r.name_rule(&names);
        assert_eq!((r.rule_id, r.detail), (Some(RULE_CNP_FLAG | 5), None));
    }
}

#[cfg(test)]
mod isolator_tests {
    use super::*;
    use sluice_common::DIR_INGRESS;

    fn record(dir: u8, why: u8) -> DropRecord {
        let mut r = DropRecord::from(&DropEvent {
            family: 4,
            dir,
            reason: why,
            ..Default::default()
        });
        r.src_namespace = Some("x".into());
        r.src_pod = Some("client".into());
        r.dst_namespace = Some("x".into());
        r.dst_pod = Some("web".into());
        r
    }

    fn names(list: &[&str]) -> Vec<ObjectRef> {
        list.iter().map(|n| ObjectRef::new("x", *n)).collect()
    }

    #[test]
    fn a_default_deny_drop_names_the_policies_isolating_its_endpoint_in_its_direction() {
        let isolators = Isolators::new(vec![
            (
                ObjectRef::new("x", "web"),
                std::sync::Arc::new([names(&["deny-all", "web"]), names(&["web-out"])]),
            ),
            (
                ObjectRef::new("x", "client"),
                std::sync::Arc::new([vec![], names(&["e1", "e2", "e3", "e4", "e5", "e6", "e7"])]),
            ),
        ]);
        // Ingress: the destination's ingress isolators.
        let mut r = record(DIR_INGRESS, reason::POLICY_DENIED);
        r.name_isolators(&isolators);
        assert_eq!(
            r.detail.as_deref(),
            Some("denied by default: isolated (ingress) by NetworkPolicy x/deny-all, x/web")
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["isolated_by"],
            serde_json::json!({"kind": "NetworkPolicy",
                               "policies": ["x/deny-all", "x/web"], "more": 0})
        );
        // Egress: the source's, the first five named and the rest counted.
        let mut r = record(DIR_EGRESS, reason::POLICY_DENIED);
        r.name_isolators(&isolators);
        assert_eq!(
            r.detail.as_deref(),
            Some(
                "denied by default: isolated (egress) by NetworkPolicy x/e1, x/e2, x/e3, x/e4, x/e5 and 2 more"
            )
        );
        assert_eq!(r.isolated_by.as_ref().map(|b| b.more), Some(2));
        // Only a NetworkPolicy default deny; an endpoint nobody isolates
        // (the client's ingress) or an unknown pod gets no names.
        for (dir, why, src_pod) in [
            (DIR_INGRESS, reason::ADMIN_DENIED, "client"),
            (DIR_INGRESS, reason::SPOOFED_SOURCE, "client"),
            (DIR_EGRESS, reason::POLICY_DENIED, "gone"),
        ] {
            let mut r = record(dir, why);
            r.src_pod = Some(src_pod.into());
            r.name_isolators(&isolators);
            assert_eq!((r.detail, r.isolated_by), (None, None), "{why} {src_pod}");
        }
        let mut r = record(DIR_INGRESS, reason::POLICY_DENIED);
        r.dst_pod = Some("client".into());
        r.name_isolators(&isolators);
        assert_eq!(r.detail, None, "the client's ingress is not isolated");
    }
}
