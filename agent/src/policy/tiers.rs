//! ClusterNetworkPolicy in the compiler: which local identities each policy
//! selects, and per local identity its tier part (the Admin and Baseline
//! matches of pod peers), recomputed whole at commit when something it
//! depends on changed. `networks` and `nodes` peers go into the CIDR part
//! (see [`super::cidr::compute`]), with the NetworkPolicy ipBlocks, so that
//! one longest-prefix match gives every tier's answer.
//!
//! A tier part depends on: the policies that select the identity (added,
//! removed, changed, or renumbered by a neighbour of the same priority), the
//! members of the peer selectors they use (an identity appearing or going),
//! and, for the CIDR part, the Nodes.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Node;
use rustc_hash::FxHashMap;
use sluice_api::ClusterNetworkPolicy;
use sluice_common::IDENTITY_ANY;

use super::{
    Changes, Compiler,
    cnp::{CnpPeer, CnpSubject, parse_cnp},
    cnps::{CnpId, CnpRuleOrigin, CnpRuleState, CnpState, NodeInfo},
    identities::IdentityKey,
    mapstate::TierRule,
    selector::Labels,
    selectors::SelId,
};
use crate::model::{Kind, ObjKey};

fn subject_matches(s: &CnpSubject, key: &IdentityKey) -> bool {
    s.ns.matches(&key.ns_labels) && s.pod.matches(&key.labels)
}

impl Compiler {
    /// A new or changed ClusterNetworkPolicy.
    pub fn upsert_cluster_policy(&mut self, cnp: &ClusterNetworkPolicy) -> Changes {
        self.cnp_event(cnp);
        self.commit()
    }

    pub fn delete_cluster_policy(&mut self, name: &str) -> Changes {
        self.remove_cnp(name);
        self.commit()
    }

    /// A new or changed Node: `nodes` peers match its labels and resolve to
    /// its addresses (InternalIP and ExternalIP).
    pub fn upsert_node(&mut self, node: &Node) -> Changes {
        self.node_event(node);
        self.commit()
    }

    pub fn delete_node(&mut self, name: &str) -> Changes {
        if self.cnps.nodes.remove(name).is_some() {
            self.nodes_changed();
        }
        self.commit()
    }

    /// Changes whenever a ClusterNetworkPolicy or its rules change: when to
    /// fetch `cnp_rule_origins` again.
    pub fn cnp_generation(&self) -> u64 {
        self.cnps.generation()
    }

    /// Every ClusterNetworkPolicy rule id with where it comes from.
    pub fn cnp_rule_origins(&self) -> Vec<(u32, CnpRuleOrigin)> {
        self.cnps.rule_origins()
    }

    /// Where a ClusterNetworkPolicy rule id comes from.
    pub fn cnp_rule_origin(&self, rule_id: u32) -> Option<CnpRuleOrigin> {
        self.cnps.rule_origin(rule_id)
    }

    pub(super) fn node_event(&mut self, node: &Node) {
        let Some(name) = node.metadata.name.clone() else {
            return;
        };
        let mut addresses: Vec<std::net::IpAddr> = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        let info = NodeInfo {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            addresses,
        };
        if self.cnps.nodes.get(&name) != Some(&info) {
            self.cnps.nodes.insert(name, info);
            self.nodes_changed();
        }
    }

    /// Does the ClusterNetworkPolicy select a pod of this node?
    pub fn cnp_selects_local(&self, name: &str) -> bool {
        self.cnps
            .id_of(name)
            .and_then(|id| self.cnps.get(id))
            .is_some_and(|c| !c.targets().is_empty())
    }

    pub(super) fn node_list_changed(&mut self) {
        self.nodes_changed();
    }

    fn nodes_changed(&mut self) {
        for id in self.cnps.with_nodes() {
            self.mark_cnp_targets(id, true);
        }
    }

    pub(super) fn cnp_event(&mut self, cnp: &ClusterNetworkPolicy) {
        let Some(name) = cnp.metadata.name.clone() else {
            self.diagnose(
                ObjKey::new(Kind::ClusterNetworkPolicy, "", ""),
                "no metadata.name",
            );
            return;
        };
        let parsed = parse_cnp(cnp);
        let key = ObjKey::new(Kind::ClusterNetworkPolicy, "", name.clone());
        for p in &parsed.problems {
            self.diagnose(key.clone(), p);
        }
        let Some(subject) = parsed.subject else {
            // Nothing to apply it to; the previous version (if any) stays:
            // dropping it could open what it denied.
            if let Some(id) = self.cnps.id_of(&name) {
                self.cnps.set_problems(id, parsed.problems);
            }
            return;
        };
        // New selectors before the old ones are released.
        let rules: Vec<CnpRuleState> = parsed
            .rules
            .into_iter()
            .map(|r| CnpRuleState {
                id: 0,
                dir: r.dir,
                index: r.index,
                name: r.name,
                action: r.action,
                peers: r
                    .peers
                    .into_iter()
                    .map(|p| match p {
                        CnpPeer::Any => CnpPeer::Any,
                        CnpPeer::Pods(sel) => {
                            CnpPeer::Pods(self.selectors.intern(sel, &mut self.identities))
                        }
                        CnpPeer::Networks(n) => CnpPeer::Networks(n),
                        CnpPeer::Nodes(s) => CnpPeer::Nodes(s),
                    })
                    .collect(),
                ports: r.ports,
            })
            .collect();
        let (id, old_ids) = match self.cnps.id_of(&name) {
            Some(id) => (id, self.uninstall_cnp(id)),
            None => (self.cnps.new_id(), BTreeMap::new()),
        };
        let mut rules = rules;
        self.cnps.assign_rule_ids(id, &mut rules, old_ids);
        let st = CnpState::new(
            name,
            parsed.tier,
            parsed.priority,
            subject,
            rules,
            parsed.problems,
        );
        self.install_cnp(id, st);
    }

    pub(super) fn remove_cnp(&mut self, name: &str) {
        if let Some(id) = self.cnps.id_of(name) {
            self.uninstall_cnp(id);
        }
    }

    fn install_cnp(&mut self, id: CnpId, st: CnpState) {
        let moved = self.cnps.insert(id, st);
        self.txn.settle = true;
        self.txn.changed_cnps.insert(id);
        self.txn.changed_cnps.extend(moved.iter().copied());
        for m in moved {
            self.mark_cnp_targets(m, false);
        }
        let Some(c) = self.cnps.get(id) else {
            return;
        };
        // The namespace selector once per namespace (the identities of a
        // namespace share its label map), the pod selector per identity.
        let mut ns_ok: FxHashMap<*const Labels, bool> = FxHashMap::default();
        let selected: Vec<u32> = self
            .identities
            .locals()
            .into_iter()
            .filter(|&l| {
                self.identities.get(l).is_some_and(|i| {
                    *ns_ok
                        .entry(Arc::as_ptr(&i.key.ns_labels))
                        .or_insert_with(|| c.subject.ns.matches(&i.key.ns_labels))
                        && c.subject.pod.matches(&i.key.labels)
                })
            })
            .collect();
        for l in selected {
            self.attach_cnp(id, l);
        }
    }

    /// Detaches a policy, releases its selectors and removes it; returns
    /// its rule ids by (direction, position).
    fn uninstall_cnp(&mut self, id: CnpId) -> BTreeMap<(u8, usize), u32> {
        let prefixes = self.cnps.get(id).is_some_and(CnpState::has_prefixes);
        let targets: Vec<u32> = self
            .cnps
            .get(id)
            .map(|c| c.targets().iter().copied().collect())
            .unwrap_or_default();
        for l in targets {
            if let Some(st) = self.identities.local_mut(l) {
                st.set_cnp(id, false);
            }
            self.mark_tiers_dirty(l, prefixes);
        }
        let Some((st, moved)) = self.cnps.remove(id) else {
            return BTreeMap::new();
        };
        self.txn.settle = true;
        self.txn.changed_cnps.insert(id);
        self.txn.changed_cnps.extend(moved.iter().copied());
        for m in moved {
            self.mark_cnp_targets(m, false);
        }
        let mut ids = BTreeMap::new();
        for r in st.rules {
            ids.insert((r.dir, r.index), r.id);
            for p in r.peers {
                if let CnpPeer::Pods(s) = p {
                    // A selector about to go no longer holds its members:
                    // their classes are settled again (a surviving one is
                    // checked at commit, `peer_status_changed`).
                    if self.selectors.last_reference(s)
                        && let Some(members) = self.selectors.members(s)
                    {
                        self.txn.class_dirty.extend(members.iter().copied());
                    }
                    self.selectors.release(s, &mut self.identities);
                }
            }
        }
        ids
    }

    /// Policy `id` selects local identity `l`, if its subject says so.
    fn attach_cnp_if_selects(&mut self, id: CnpId, l: u32) {
        let Some(c) = self.cnps.get(id) else {
            return;
        };
        let selects = self
            .identities
            .get(l)
            .is_some_and(|i| subject_matches(&c.subject, &i.key));
        if selects {
            self.attach_cnp(id, l);
        }
    }

    /// Policy `id` selects local identity `l`.
    fn attach_cnp(&mut self, id: CnpId, l: u32) {
        let prefixes = self.cnps.get(id).is_some_and(CnpState::has_prefixes);
        self.cnps.set_target(id, l, true);
        if let Some(st) = self.identities.local_mut(l) {
            st.set_cnp(id, true);
        }
        self.mark_tiers_dirty(l, prefixes);
    }

    /// A local identity appeared: the policies whose subject selects it.
    pub(super) fn attach_matching_cnps(&mut self, l: u32) {
        // Any order: each attach is independent.
        for id in self.cnps.unordered_ids() {
            self.attach_cnp_if_selects(id, l);
        }
    }

    /// A local identity is gone: the policies forget it.
    pub(super) fn detach_cnps(&mut self, l: u32, ids: &[CnpId]) {
        // Its profile goes with it.
        self.txn.settle |= !ids.is_empty();
        for &id in ids {
            self.cnps.set_target(id, l, false);
        }
    }

    /// Identity `x` joined or left selector `s`: when a
    /// ClusterNetworkPolicy uses `s` as a pod peer, the class of `x` is
    /// settled again at commit.
    pub(super) fn cnp_selector_changed(&mut self, s: SelId, x: u32) {
        if self.cnps.is_peer(s) {
            self.txn.settle = true;
            self.txn.class_dirty.insert(x);
        }
    }

    /// The selectors whose use as a pod peer (or with an egress named
    /// port) started or ended in this event: their members' classes are
    /// settled again.
    pub(super) fn peer_status_changed(&mut self) {
        for s in self.cnps.take_status_changed() {
            if let Some(members) = self.selectors.members(s) {
                self.txn.class_dirty.extend(members.iter().copied());
            }
        }
    }

    fn mark_cnp_targets(&mut self, id: CnpId, cidr: bool) {
        let Some(c) = self.cnps.get(id) else {
            return;
        };
        let cidr = cidr || c.has_prefixes();
        let targets: Vec<u32> = c.targets().iter().copied().collect();
        for l in targets {
            self.mark_tiers_dirty(l, cidr);
        }
    }

    pub(super) fn mark_tiers_dirty(&mut self, l: u32, cidr: bool) {
        self.txn.settle = true;
        self.touch(l);
        if let Some(t) = self.txn.touched.get_mut(&l) {
            t.tiers_dirty = true;
        }
        if cidr {
            self.mark_cidr_dirty(l);
        }
    }

    /// The tier part of local identity `l`: for each rule of each policy
    /// selecting it, any peer (a rule that fails closed) with the rule's L4
    /// matches, its tier, rank and action. Pod peers are shared by profile
    /// and class (`profiles`).
    /// Per (direction, peer, L4, tier) only the lowest rank is kept.
    pub(super) fn compute_tiers(&self, l: u32) -> Vec<TierRule> {
        let mut out = Vec::new();
        let Some(ident) = self.identities.get(l) else {
            return out;
        };
        let Some(st) = ident.local.as_deref() else {
            return out;
        };
        for &id in st.cnps() {
            let Some(c) = self.cnps.get(id) else {
                continue;
            };
            for r in &c.rules {
                let rank = c.rank(r.index);
                let push = |out: &mut Vec<TierRule>, identity, l4| {
                    out.push(TierRule {
                        dir: r.dir,
                        identity,
                        l4,
                        tier: c.tier,
                        rank,
                        action: r.action,
                        rule_id: r.id,
                    });
                };
                for p in &r.peers {
                    match p {
                        CnpPeer::Any => {
                            for &l4 in &r.ports.fixed {
                                push(&mut out, IDENTITY_ANY, l4);
                            }
                        }
                        // Pod peers are in the shared profile entries
                        // (`profiles`), CIDR ones in the CIDR part.
                        CnpPeer::Pods(_) | CnpPeer::Networks(_) | CnpPeer::Nodes(_) => {}
                    }
                }
            }
        }
        out.sort_by_key(|t| (t.dir, t.identity, t.l4, t.tier, t.rank));
        out.dedup_by_key(|t| (t.dir, t.identity, t.l4, t.tier));
        out
    }

    /// Recomputes and installs the tier part of `l`; returns the old one
    /// when it differs.
    pub(super) fn recompute_tiers(&mut self, l: u32) -> bool {
        let new = self.compute_tiers(l);
        match self.identities.local_mut(l) {
            Some(st) => st.replace_tiers(new),
            None => false,
        }
    }

    /// The problems of the ClusterNetworkPolicies as they are now.
    pub(super) fn cnp_diagnostics(&self) -> Vec<super::Diagnostic> {
        self.cnps
            .all_problems()
            .flat_map(|(name, problems)| {
                problems.iter().map(move |reason| super::Diagnostic {
                    object: ObjKey::new(Kind::ClusterNetworkPolicy, "", name),
                    reason: reason.clone(),
                })
            })
            .collect()
    }
}
