//! Why a flow passes or not (`sluice explain`), from the compiler's own
//! state: the policies as parsed (the NetworkPolicy repository, the
//! ClusterNetworkPolicy store), the interned selectors, the identities and
//! their named ports, the pods' addresses and the Nodes. Pure: no I/O.
//!
//! Per direction (egress at the source pod, ingress at the destination
//! pod) it walks the tiers in the order the data path folds them: the
//! Admin rules of the ClusterNetworkPolicies whose subject selects the pod,
//! by rank (the lowest matching rule decides: Accept, Deny; Pass goes on);
//! then the NetworkPolicies of the pod's namespace that select it (any
//! rule of any of them allows; none: the isolation denies); then the
//! Baseline rules. For every rule it says what matched (peer and port) or
//! why not. The checks mirror what the compiler writes, and a test holds
//! the verdict here equal to the lookup model's ([`Compiler::verdict`]) on
//! random worlds, so an explanation agrees with the maps.
mod target;
mod text;
mod why;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sluice_common::{DIR_EGRESS, DIR_INGRESS, action};

use self::why::{Check, Peer, l4_name, proto_name};
pub use self::{
    target::{Spec, explain_specs, parse_flow, parse_spec, service_backends},
    text::render,
};
use super::{
    Compiler, Tier,
    cnp::{CnpPeer, CnpSubject},
    identities::IdentityKey,
    parse::Peer as NpPeer,
};
use crate::model::ObjectRef;

/// One end of a flow to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    Pod(ObjectRef),
    Address(IpAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("pod {0} is not known")]
    UnknownPod(String),
    #[error("pod {0} has no address")]
    NoAddress(String),
    #[error("{0} and {1} share no address family")]
    NoCommonFamily(String, String),
}

/// One end as explained: its address and the pod that owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub address: IpAddr,
    /// `ns/name` of the pod owning the address, if any.
    pub pod: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub from: End,
    pub to: End,
    pub protocol: String,
    pub port: u16,
    /// Both directions as the policies say.
    pub allowed: bool,
    /// Only the directions judged by this compiler's endpoints (the local
    /// pods): what this node's data path decides.
    pub allowed_here: bool,
    /// At the source pod (absent: the source is no pod).
    pub egress: Option<Side>,
    /// At the destination pod (absent: the destination is no pod).
    pub ingress: Option<Side>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One pod, one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub pod: String,
    /// The pod is an endpoint of this compiler (live: of this node).
    pub enforced_here: bool,
    pub allowed: bool,
    pub decided_by: DecidedBy,
    /// Admin rules of the policies selecting the pod, by rank.
    pub admin: Vec<CnpRuleCheck>,
    pub network_policy: NpCheck,
    /// Baseline rules of the policies selecting the pod, by rank.
    pub baseline: Vec<CnpRuleCheck>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum DecidedBy {
    /// A ClusterNetworkPolicy rule (Accept or Deny).
    Cluster {
        tier: Tier,
        policy: String,
        rule: String,
        action: String,
    },
    /// A NetworkPolicy rule allows.
    NetworkPolicy { policy: String, rule: String },
    /// Isolated by these NetworkPolicies, and no rule of theirs allows.
    Isolation { policies: Vec<String> },
    /// Nothing isolates the pod and no ClusterNetworkPolicy rule decides.
    Default,
    /// The endpoint's policy cannot be programmed: the data path drops.
    FailClosed { reason: String },
}

/// What matched: the peer and the port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    pub peer: String,
    pub port: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnpRuleCheck {
    pub policy: String,
    pub priority: u32,
    pub rule: String,
    pub action: String,
    /// `None`: no match, see `why_not`.
    pub matched: Option<Match>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub why_not: Vec<String>,
    /// This is the rule whose action was taken.
    pub decides: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpCheck {
    /// Some policy of this direction's type selects the pod.
    pub isolated: bool,
    /// Those policies, by name.
    pub policies: Vec<NpPolicyCheck>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpPolicyCheck {
    pub policy: String,
    pub rules: Vec<NpRuleCheck>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpRuleCheck {
    /// `ingress[i]` / `egress[i]`.
    pub rule: String,
    pub matched: Option<Match>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub why_not: Vec<String>,
}

fn action_name(a: u32) -> String {
    match a {
        action::ACCEPT => "Accept".into(),
        action::DENY => "Deny".into(),
        action::PASS => "Pass".into(),
        other => format!("unknown action {other}"),
    }
}

fn dir_name(dir: u8) -> &'static str {
    if dir == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn subject_matches(s: &CnpSubject, key: &IdentityKey) -> bool {
    s.ns.matches(&key.ns_labels) && s.pod.matches(&key.labels)
}

/// Folds the per-part checks of a rule: the first match, else every
/// reason (deduplicated, in order).
fn first_match(
    checks: impl IntoIterator<Item = Result<Match, Vec<String>>>,
) -> (Option<Match>, Vec<String>) {
    let mut why: Vec<String> = Vec::new();
    for c in checks {
        match c {
            Ok(m) => return (Some(m), Vec::new()),
            Err(w) => {
                for x in w {
                    if !why.contains(&x) {
                        why.push(x);
                    }
                }
            }
        }
    }
    (None, why)
}

/// Peer and ports: both must match; every reason when not.
fn both(peer: Check, ports: impl FnOnce() -> Check) -> Result<Match, Vec<String>> {
    match (peer, ports()) {
        (Ok(peer), Ok(port)) => Ok(Match { peer, port }),
        (Ok(_), Err(why)) | (Err(why), Ok(_)) => Err(why),
        (Err(mut a), Err(b)) => {
            a.extend(b);
            Err(a)
        }
    }
}

impl Compiler {
    /// Explains a flow between two parties: a pod by name (its address of
    /// the other end's family) or an address.
    pub fn explain(
        &self,
        from: &Party,
        to: &Party,
        proto: u8,
        port: u16,
    ) -> Result<Explanation, ExplainError> {
        let addrs = |p: &Party| -> Result<Vec<IpAddr>, ExplainError> {
            match p {
                Party::Address(a) => Ok(vec![*a]),
                Party::Pod(o) => match self.addresses_of(o) {
                    None => Err(ExplainError::UnknownPod(o.to_string())),
                    Some([]) => Err(ExplainError::NoAddress(o.to_string())),
                    Some(a) => Ok(a.to_vec()),
                },
            }
        };
        let (src, dst) = (addrs(from)?, addrs(to)?);
        let pair = src.iter().find_map(|s| {
            dst.iter()
                .find(|d| d.is_ipv4() == s.is_ipv4())
                .map(|d| (*s, *d))
        });
        let name = |p: &Party| match p {
            Party::Pod(o) => o.to_string(),
            Party::Address(a) => a.to_string(),
        };
        let (s, d) = pair.ok_or_else(|| ExplainError::NoCommonFamily(name(from), name(to)))?;
        let mut e = self.explain_addrs(s, d, proto, port);
        for (party, end) in [(from, &e.from), (to, &e.to)] {
            if let Party::Pod(o) = party
                && end.pod.as_deref() != Some(o.to_string().as_str())
            {
                let now = end.pod.clone().unwrap_or_else(|| "no pod".into());
                e.notes.push(format!(
                    "{} of {o} is claimed by {now} now: explained for {now}",
                    end.address
                ));
            }
        }
        Ok(e)
    }

    /// Explains a flow from `src` to `dst`: the verdict of
    /// [`Compiler::verdict`] when every pod is local (`allowed_here` in
    /// any case), and the chain of rules behind it.
    pub fn explain_addrs(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Explanation {
        let end = |ip: IpAddr| End {
            address: ip,
            pod: self.pods.owner(ip).map(|(o, _)| o.to_string()),
        };
        let egress = self.explain_side(src, dst, DIR_EGRESS, proto, port);
        let ingress = self.explain_side(dst, src, DIR_INGRESS, proto, port);
        let sides = [&egress, &ingress];
        let allowed = sides.iter().all(|s| s.as_ref().is_none_or(|s| s.allowed));
        let allowed_here = sides
            .iter()
            .all(|s| s.as_ref().is_none_or(|s| s.allowed || !s.enforced_here));
        let mut notes = Vec::new();
        for (s, dir) in [(&egress, "egress"), (&ingress, "ingress")] {
            if let Some(s) = s.as_ref().filter(|s| !s.enforced_here) {
                notes.push(format!(
                    "{} is not an endpoint of this node: its {dir} is enforced on its own node",
                    s.pod
                ));
            }
        }
        Explanation {
            from: end(src),
            to: end(dst),
            protocol: proto_name(proto),
            port,
            allowed,
            allowed_here,
            egress,
            ingress,
            notes,
        }
    }

    /// The side of the pod at `me` in `dir`, the flow's other end at `peer`.
    fn explain_side(
        &self,
        me: IpAddr,
        peer: IpAddr,
        dir: u8,
        proto: u8,
        port: u16,
    ) -> Option<Side> {
        let (obj, st) = self.pods.owner(me)?;
        let key = self.identities.get(st.identity)?.key.clone();
        let peer_key = self
            .pods
            .owner(peer)
            .and_then(|(_, p)| self.identities.get(p.identity))
            .map(|i| i.key.clone());
        let p = Peer {
            addr: peer,
            key: peer_key.as_deref(),
            name: self
                .pods
                .owner(peer)
                .map_or_else(|| peer.to_string(), |(o, _)| o.to_string()),
        };
        let me_name = obj.to_string();
        let (admin, baseline) = self.cnp_checks(&key, &me_name, &p, dir, proto, port);
        let network_policy = self.np_checks(&key, &me_name, &p, dir, proto, port);

        let best = |rules: &[CnpRuleCheck]| rules.iter().position(|r| r.matched.is_some());
        let mut admin = admin;
        let mut baseline = baseline;
        let mut decided_by = None;
        if let Some(i) = best(&admin) {
            let r = &mut admin[i];
            if r.action != "Pass" {
                r.decides = true;
                decided_by = Some((
                    r.action == "Accept",
                    DecidedBy::Cluster {
                        tier: Tier::Admin,
                        policy: r.policy.clone(),
                        rule: r.rule.clone(),
                        action: r.action.clone(),
                    },
                ));
            }
        }
        if decided_by.is_none() && network_policy.isolated {
            let allow = network_policy.policies.iter().find_map(|pol| {
                pol.rules
                    .iter()
                    .find(|r| r.matched.is_some())
                    .map(|r| (pol.policy.clone(), r.rule.clone()))
            });
            decided_by = Some(match allow {
                Some((policy, rule)) => (true, DecidedBy::NetworkPolicy { policy, rule }),
                None => (
                    false,
                    DecidedBy::Isolation {
                        policies: network_policy
                            .policies
                            .iter()
                            .map(|p| p.policy.clone())
                            .collect(),
                    },
                ),
            });
        }
        if decided_by.is_none()
            && let Some(i) = best(&baseline)
        {
            let r = &mut baseline[i];
            r.decides = true;
            decided_by = Some((
                r.action == "Accept",
                DecidedBy::Cluster {
                    tier: Tier::Baseline,
                    policy: r.policy.clone(),
                    rule: r.rule.clone(),
                    action: r.action.clone(),
                },
            ));
        }
        let (mut allowed, mut decided_by) = decided_by.unwrap_or((true, DecidedBy::Default));
        let enforced_here = st.local;
        if enforced_here {
            // The data path drops for a local endpoint whose policy cannot
            // be programmed (the lookup model does the same).
            let failed = match self.endpoint_policy(obj) {
                None => Some("the endpoint has no compiled policy".to_string()),
                Some(pol) => pol.compile(1).err().map(|e| e.to_string()),
            };
            let judged = self.endpoint_policy(obj).is_none_or(|pol| {
                pol.tier_rules.iter().any(|t| t.dir == dir)
                    || if dir == DIR_INGRESS {
                        pol.ingress_isolated
                    } else {
                        pol.egress_isolated
                    }
            });
            if let Some(reason) = failed.filter(|_| judged) {
                allowed = false;
                decided_by = DecidedBy::FailClosed { reason };
            }
        }
        Some(Side {
            pod: me_name,
            enforced_here,
            allowed,
            decided_by,
            admin,
            network_policy,
            baseline,
        })
    }

    /// The rules of `dir` of the ClusterNetworkPolicies whose subject
    /// selects `key`, Admin and Baseline, each by rank.
    fn cnp_checks(
        &self,
        key: &IdentityKey,
        me: &str,
        peer: &Peer<'_>,
        dir: u8,
        proto: u8,
        port: u16,
    ) -> (Vec<CnpRuleCheck>, Vec<CnpRuleCheck>) {
        let mut ranked: Vec<(Tier, u32, CnpRuleCheck)> = Vec::new();
        for id in self.cnps.ids() {
            let Some(c) = self.cnps.get(id) else {
                continue;
            };
            if !subject_matches(&c.subject, key) {
                continue;
            }
            for r in c.rules.iter().filter(|r| r.dir == dir) {
                // Named ports resolve on the subject for ingress, on the
                // destination pod for egress (as `compute_tiers` does).
                let (table, whose) = if dir == DIR_INGRESS {
                    (Some(&key.ports), me.to_string())
                } else {
                    (peer.key.map(|k| &k.ports), peer.name.clone())
                };
                let table = table.map(|t| (t, whose.as_str()));
                let fixed = || why::ports(&r.ports.fixed, &[], None, proto, port);
                let checks = r.peers.iter().map(|p| match p {
                    CnpPeer::Any => both(Ok("any peer".into()), fixed),
                    CnpPeer::Pods(s) => match self.selectors.selector(*s) {
                        Some(sel) => both(why::peer_selector(sel, peer), || {
                            why::ports(&r.ports.fixed, &r.ports.named, table, proto, port)
                        }),
                        None => Err(vec!["selector not interned".into()]),
                    },
                    CnpPeer::Networks(nets) => {
                        both(why::networks(nets, peer.addr, "networks"), fixed)
                    }
                    CnpPeer::Nodes(sel) => {
                        let nets: Vec<ipnetwork::IpNetwork> = self
                            .cnps
                            .nodes
                            .values()
                            .filter(|n| sel.matches(&n.labels))
                            .flat_map(|n| {
                                n.addresses.iter().map(|&a| ipnetwork::IpNetwork::from(a))
                            })
                            .collect();
                        let what = format!("addresses of nodes {}", why::selector_name(sel));
                        both(why::networks(&nets, peer.addr, &what), fixed)
                    }
                });
                let (matched, why_not) = first_match(checks);
                ranked.push((
                    c.tier,
                    c.rank(r.index),
                    CnpRuleCheck {
                        policy: c.name.clone(),
                        priority: c.priority,
                        rule: r.name.clone(),
                        action: action_name(r.action),
                        matched,
                        why_not,
                        decides: false,
                    },
                ));
            }
        }
        ranked.sort_by_key(|a| (a.0, a.1));
        let (mut admin, mut baseline) = (Vec::new(), Vec::new());
        for (tier, _, r) in ranked {
            match tier {
                Tier::Admin => admin.push(r),
                Tier::Baseline => baseline.push(r),
            }
        }
        (admin, baseline)
    }

    /// The NetworkPolicies of `key`'s namespace that select it with this
    /// direction's type, and each of their rules of `dir`.
    fn np_checks(
        &self,
        key: &IdentityKey,
        me: &str,
        peer: &Peer<'_>,
        dir: u8,
        proto: u8,
        port: u16,
    ) -> NpCheck {
        let mut out = NpCheck::default();
        let mut pids = self.repo.in_namespace(&key.namespace);
        pids.sort_by_key(|&pid| self.repo.get(pid).map(|p| p.object.name.clone()));
        for pid in pids {
            let Some(pol) = self.repo.get(pid) else {
                continue;
            };
            // An invalid pod selector selects the whole namespace.
            let selects = pol.target.as_ref().is_none_or(|t| t.matches(&key.labels));
            let typed = if dir == DIR_INGRESS {
                pol.ingress
            } else {
                pol.egress
            };
            if !selects || !typed {
                continue;
            }
            out.isolated = true;
            let own = (&key.ports, me);
            let dest = peer.key.map(|k| (&k.ports, peer.name.as_str()));
            let rules = pol
                .rules
                .iter()
                .filter(|r| r.dir == dir)
                .map(|r| {
                    let checks = r.parts.iter().map(|part| {
                        // Ingress named ports resolve on the selected pod,
                        // egress ones on the destination.
                        let table = if dir == DIR_INGRESS { Some(own) } else { dest };
                        let ports =
                            || why::ports(&part.ports.fixed, &part.ports.named, table, proto, port);
                        match &part.peer {
                            NpPeer::Any => both(Ok("any peer".into()), || {
                                why::ports(
                                    &part.ports.fixed,
                                    &part.ports.named,
                                    Some(own),
                                    proto,
                                    port,
                                )
                            }),
                            NpPeer::Pods(s) => match self.selectors.selector(*s) {
                                Some(sel) => both(why::peer_selector(sel, peer), ports),
                                None => Err(vec!["selector not interned".into()]),
                            },
                            NpPeer::Blocks(bs) => both(why::blocks(bs, peer.addr), ports),
                        }
                    });
                    let (matched, why_not) = first_match(checks);
                    NpRuleCheck {
                        rule: format!("{}[{}]", dir_name(dir), r.index),
                        matched,
                        why_not,
                    }
                })
                .collect();
            out.policies.push(NpPolicyCheck {
                policy: pol.object.to_string(),
                rules,
            });
        }
        out
    }
}

/// `TCP/80` of a flow.
pub fn flow_name(proto: u8, port: u16) -> String {
    l4_name(super::L4::Ports {
        proto,
        first: port,
        last: port,
    })
}
