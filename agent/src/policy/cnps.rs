//! The ClusterNetworkPolicy repository: every policy as parsed, its rules
//! with their ids and ranks, the local identities it selects, and the
//! Nodes (labels, addresses) that `nodes` peers resolve against.
//!
//! # Ranks
//!
//! A rule's rank orders it inside its tier, lower first:
//! `priority << 22 | position << 6 | index`, where `position` is the
//! policy's place among the policies of the same tier and priority sorted
//! by name, and `index` the rule's place in its direction's list. So ties
//! of priority go by policy name, then rule order. Ranks are sparse: a new
//! policy renumbers only the policies of its own tier and priority.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use rustc_hash::FxHashMap;
use sluice_common::{DIR_INGRESS, RULE_CNP_FLAG};

use super::{
    cnp::{CnpPeer, CnpSubject},
    mapstate::Tier,
    parse::Ports,
    selector::Labels,
    selectors::SelId,
};

pub(super) type CnpId = u32;

/// Bits of a rank: position and rule index below the priority.
const POSITION_SHIFT: u32 = 6;
const PRIORITY_SHIFT: u32 = 22;
const MAX_POSITION: u32 = (1 << (PRIORITY_SHIFT - POSITION_SHIFT)) - 1;
const MAX_INDEX: u32 = (1 << POSITION_SHIFT) - 1;

pub(super) struct CnpRuleState {
    pub id: u32,
    pub dir: u8,
    pub index: usize,
    pub name: String,
    pub action: u32,
    pub peers: Vec<CnpPeer<SelId>>,
    pub ports: Ports,
}

pub(super) struct CnpState {
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    pub subject: CnpSubject,
    pub rules: Vec<CnpRuleState>,
    pub problems: Vec<String>,
    /// Place among the policies of its tier and priority, by name.
    position: u32,
    /// Local identities it selects.
    targets: BTreeSet<u32>,
}

impl CnpState {
    pub fn new(
        name: String,
        tier: Tier,
        priority: u32,
        subject: CnpSubject,
        rules: Vec<CnpRuleState>,
        problems: Vec<String>,
    ) -> Self {
        Self {
            name,
            tier,
            priority,
            subject,
            rules,
            problems,
            position: 0,
            targets: BTreeSet::new(),
        }
    }

    pub fn rank(&self, index: usize) -> u32 {
        let index = u32::try_from(index).unwrap_or(MAX_INDEX).min(MAX_INDEX);
        (self.priority << PRIORITY_SHIFT)
            | (self.position.min(MAX_POSITION) << POSITION_SHIFT)
            | index
    }

    /// Does a rule resolve CIDR prefixes (networks or nodes)?
    pub fn has_prefixes(&self) -> bool {
        self.rules.iter().any(|r| {
            r.peers
                .iter()
                .any(|p| matches!(p, CnpPeer::Networks(_) | CnpPeer::Nodes(_)))
        })
    }

    pub fn has_nodes(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.peers.iter().any(|p| matches!(p, CnpPeer::Nodes(_))))
    }

    pub fn targets(&self) -> &BTreeSet<u32> {
        &self.targets
    }
}

/// Where a ClusterNetworkPolicy rule id comes from, for reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpRuleOrigin {
    pub policy: String,
    pub rule: String,
    pub tier: Tier,
    pub priority: u32,
    pub dir: u8,
    pub index: usize,
    pub action: u32,
}

/// A Node as `nodes` peers see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
}

#[derive(Default)]
pub(super) struct CnpStore {
    cnps: FxHashMap<CnpId, CnpState>,
    by_name: HashMap<String, CnpId>,
    next: CnpId,
    /// (tier, priority) -> names in order, for positions.
    order: BTreeMap<(Tier, u32), BTreeMap<String, CnpId>>,
    /// Peer selector -> the policies whose rules use it.
    sel_users: FxHashMap<SelId, BTreeSet<CnpId>>,
    /// Peer selector -> how many egress rules with a named port use it.
    named_users: FxHashMap<SelId, u32>,
    /// Selectors whose use as a pod peer (or by an egress rule with a
    /// named port) was touched since last taken, with that use before
    /// (`take_status_changed`).
    status_before: FxHashMap<SelId, (bool, bool)>,
    rule_origins: FxHashMap<u32, (CnpId, usize)>,
    next_rule: u32,
    /// Bumped by every change of a policy or its rules (names for drops).
    generation: u64,
    pub nodes: BTreeMap<String, NodeInfo>,
}

impl CnpStore {
    pub fn len(&self) -> usize {
        self.cnps.len()
    }

    pub fn get(&self, id: CnpId) -> Option<&CnpState> {
        self.cnps.get(&id)
    }

    pub fn id_of(&self, name: &str) -> Option<CnpId> {
        self.by_name.get(name).copied()
    }

    pub fn ids(&self) -> Vec<CnpId> {
        let mut v: Vec<CnpId> = self.cnps.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn unordered_ids(&self) -> Vec<CnpId> {
        self.cnps.keys().copied().collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn new_id(&mut self) -> CnpId {
        self.next += 1;
        self.next - 1
    }

    /// Gives rules their ids: the old id of the same (direction, position)
    /// when there was one, else a new one; returns the ids no longer used.
    pub fn assign_rule_ids(
        &mut self,
        id: CnpId,
        rules: &mut [CnpRuleState],
        mut old: BTreeMap<(u8, usize), u32>,
    ) -> Vec<u32> {
        self.generation += 1;
        for (ri, r) in rules.iter_mut().enumerate() {
            r.id = match old.remove(&(r.dir, r.index)) {
                Some(rid) => rid,
                None => {
                    self.next_rule += 1;
                    RULE_CNP_FLAG | self.next_rule
                }
            };
            self.rule_origins.insert(r.id, (id, ri));
        }
        let gone: Vec<u32> = old.into_values().collect();
        for rid in &gone {
            self.rule_origins.remove(rid);
        }
        gone
    }

    /// Inserts a policy; returns the other policies whose position (and so
    /// ranks) changed.
    pub fn insert(&mut self, id: CnpId, st: CnpState) -> Vec<CnpId> {
        self.generation += 1;
        for r in &st.rules {
            let named = r.dir != DIR_INGRESS && !r.ports.named.is_empty();
            for p in &r.peers {
                if let CnpPeer::Pods(s) = p {
                    self.note_status(*s);
                    self.sel_users.entry(*s).or_default().insert(id);
                    if named {
                        *self.named_users.entry(*s).or_default() += 1;
                    }
                }
            }
        }
        let slot = (st.tier, st.priority);
        self.by_name.insert(st.name.clone(), id);
        self.order
            .entry(slot)
            .or_default()
            .insert(st.name.clone(), id);
        self.cnps.insert(id, st);
        self.renumber(slot, id)
    }

    /// Removes a policy; returns it and the policies whose position changed.
    pub fn remove(&mut self, id: CnpId) -> Option<(CnpState, Vec<CnpId>)> {
        let st = self.cnps.remove(&id)?;
        self.generation += 1;
        self.by_name.remove(&st.name);
        for r in &st.rules {
            self.rule_origins.remove(&r.id);
            let named = r.dir != DIR_INGRESS && !r.ports.named.is_empty();
            for p in &r.peers {
                let CnpPeer::Pods(s) = p else {
                    continue;
                };
                let s = *s;
                self.note_status(s);
                if let Some(users) = self.sel_users.get_mut(&s) {
                    users.remove(&id);
                    if users.is_empty() {
                        self.sel_users.remove(&s);
                    }
                }
                if named && let Some(n) = self.named_users.get_mut(&s) {
                    *n -= 1;
                    if *n == 0 {
                        self.named_users.remove(&s);
                    }
                }
            }
        }
        let slot = (st.tier, st.priority);
        if let Some(names) = self.order.get_mut(&slot) {
            names.remove(&st.name);
            if names.is_empty() {
                self.order.remove(&slot);
            }
        }
        let moved = self.renumber(slot, id);
        Some((st, moved))
    }

    fn renumber(&mut self, slot: (Tier, u32), except: CnpId) -> Vec<CnpId> {
        let mut moved = Vec::new();
        let Some(names) = self.order.get(&slot) else {
            return moved;
        };
        for (pos, &id) in names.values().enumerate() {
            let pos = u32::try_from(pos).unwrap_or(MAX_POSITION);
            if let Some(st) = self.cnps.get_mut(&id)
                && st.position != pos
            {
                st.position = pos;
                if id != except {
                    moved.push(id);
                }
            }
        }
        moved
    }

    /// Is `s` used as a pod peer?
    pub fn is_peer(&self, s: SelId) -> bool {
        self.sel_users.contains_key(&s)
    }

    /// Is `s` the pod peer of an egress rule with a named port (its
    /// members' named ports decide what that rule matches)?
    pub fn is_named(&self, s: SelId) -> bool {
        self.named_users.contains_key(&s)
    }

    fn status(&self, s: SelId) -> (bool, bool) {
        (self.is_peer(s), self.is_named(s))
    }

    /// Keeps the use of `s` before its first change since last taken.
    fn note_status(&mut self, s: SelId) {
        if !self.status_before.contains_key(&s) {
            let before = self.status(s);
            self.status_before.insert(s, before);
        }
    }

    /// The selectors whose pod-peer use started or ended (or whose use by
    /// an egress named port did) since last asked.
    pub fn take_status_changed(&mut self) -> Vec<SelId> {
        let before = std::mem::take(&mut self.status_before);
        let mut v: Vec<SelId> = before
            .into_iter()
            .filter(|&(s, was)| self.status(s) != was)
            .map(|(s, _)| s)
            .collect();
        v.sort_unstable();
        v
    }

    /// Policies with a `nodes` peer.
    pub fn with_nodes(&self) -> Vec<CnpId> {
        self.cnps
            .iter()
            .filter(|(_, c)| c.has_nodes())
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn set_problems(&mut self, id: CnpId, problems: Vec<String>) {
        if let Some(c) = self.cnps.get_mut(&id) {
            c.problems = problems;
        }
    }

    pub fn set_target(&mut self, id: CnpId, l: u32, selects: bool) {
        if let Some(c) = self.cnps.get_mut(&id) {
            if selects {
                c.targets.insert(l);
            } else {
                c.targets.remove(&l);
            }
        }
    }

    pub fn clear_targets(&mut self) {
        for c in self.cnps.values_mut() {
            c.targets.clear();
        }
    }

    pub fn rule_origin(&self, rule_id: u32) -> Option<CnpRuleOrigin> {
        let &(id, ri) = self.rule_origins.get(&rule_id)?;
        let c = self.cnps.get(&id)?;
        let r = c.rules.get(ri)?;
        Some(CnpRuleOrigin {
            policy: c.name.clone(),
            rule: r.name.clone(),
            tier: c.tier,
            priority: c.priority,
            dir: r.dir,
            index: r.index,
            action: r.action,
        })
    }

    /// Changes with every policy or rule change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every rule id with where it comes from.
    pub fn rule_origins(&self) -> Vec<(u32, CnpRuleOrigin)> {
        self.rule_origins
            .keys()
            .filter_map(|&rid| Some((rid, self.rule_origin(rid)?)))
            .collect()
    }

    /// (tier, rank, action) of a rule id.
    pub fn rule_rank(&self, rule_id: u32) -> Option<(Tier, u32, u32)> {
        let &(id, ri) = self.rule_origins.get(&rule_id)?;
        let c = self.cnps.get(&id)?;
        let r = c.rules.get(ri)?;
        Some((c.tier, c.rank(r.index), r.action))
    }

    pub fn all_problems(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.cnps
            .values()
            .map(|c| (c.name.as_str(), c.problems.as_slice()))
    }
}
