//! The policy repository: every NetworkPolicy as parsed, its rules with
//! their ids, the local identities it selects, its problems, and where each
//! rule id comes from.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use rustc_hash::FxHashMap;

use sluice_common::DIR_EGRESS;

use super::{
    parse::{Part, Peer},
    selector::Selector,
    selectors::SelId,
    txn::Diagnostic,
};
use crate::model::{Kind, ObjKey, ObjectRef};

pub(super) type PolicyId = u32;

pub(super) struct RuleState {
    pub id: u32,
    pub dir: u8,
    /// Position in `spec.ingress` or `spec.egress`.
    pub index: usize,
    pub parts: Vec<Part<SelId>>,
}

pub(super) struct PolicyState {
    pub object: ObjectRef,
    pub target: Option<Selector>,
    pub ingress: bool,
    pub egress: bool,
    pub rules: Vec<RuleState>,
    /// Local identities it selects.
    targets: BTreeSet<u32>,
    pub problems: Vec<String>,
}

impl PolicyState {
    pub fn new(
        object: ObjectRef,
        target: Option<Selector>,
        (ingress, egress): (bool, bool),
        rules: Vec<RuleState>,
        problems: Vec<String>,
    ) -> Self {
        Self {
            object,
            target,
            ingress,
            egress,
            rules,
            targets: BTreeSet::new(),
            problems,
        }
    }
}

/// Where a `rule_id` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleOrigin {
    pub policy: ObjectRef,
    pub dir: u8,
    /// Position in `spec.ingress` or `spec.egress`.
    pub index: usize,
}

pub(super) struct Repository {
    policies: FxHashMap<PolicyId, PolicyState>,
    by_ref: HashMap<ObjectRef, PolicyId>,
    by_ns: HashMap<String, BTreeSet<PolicyId>>,
    next_policy: PolicyId,
    rule_origins: FxHashMap<u32, (PolicyId, u8, usize)>,
    next_rule: u32,
    /// Policies with an egress named port towards an ipBlock: their CIDR
    /// part depends on which pod owns which address with which ports.
    named_blocks: BTreeSet<PolicyId>,
    /// Moves on whenever a policy, its policyTypes or the local identities
    /// it selects may have changed: when to ask `isolators` again.
    generation: u64,
    /// Policies that select a local identity (a node has few).
    targeted: BTreeSet<PolicyId>,
}

impl Repository {
    pub fn new() -> Self {
        Self {
            policies: FxHashMap::default(),
            by_ref: HashMap::new(),
            by_ns: HashMap::new(),
            next_policy: 0,
            rule_origins: FxHashMap::default(),
            next_rule: 1,
            named_blocks: BTreeSet::new(),
            generation: 0,
            targeted: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn get(&self, pid: PolicyId) -> Option<&PolicyState> {
        self.policies.get(&pid)
    }

    pub fn get_mut(&mut self, pid: PolicyId) -> Option<&mut PolicyState> {
        self.policies.get_mut(&pid)
    }

    pub fn id_of(&self, policy: &ObjectRef) -> Option<PolicyId> {
        self.by_ref.get(policy).copied()
    }

    /// Every policy, by its namespace and name.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectRef> {
        self.by_ref.keys()
    }

    /// The policies of a namespace.
    pub fn in_namespace(&self, ns: &str) -> Vec<PolicyId> {
        self.by_ns
            .get(ns)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// A number for a policy not seen before.
    pub fn new_id(&mut self) -> PolicyId {
        self.next_policy += 1;
        self.next_policy - 1
    }

    /// Gives `rules` of policy `pid` their ids: the old id of the same
    /// (direction, position), so that an unchanged rule keeps its map
    /// values, else a new one. Ids of old rules no longer there are dropped.
    pub fn assign_rule_ids(
        &mut self,
        pid: PolicyId,
        rules: &mut [RuleState],
        mut old_ids: BTreeMap<(u8, usize), u32>,
    ) {
        for r in rules {
            r.id = match old_ids.remove(&(r.dir, r.index)) {
                Some(id) => id,
                None => {
                    let id = self.next_rule;
                    self.next_rule += 1;
                    self.rule_origins.insert(id, (pid, r.dir, r.index));
                    id
                }
            };
        }
        self.forget_rule_ids(old_ids.into_values());
    }

    pub fn forget_rule_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            self.rule_origins.remove(&id);
        }
    }

    pub fn insert(&mut self, pid: PolicyId, pol: PolicyState) {
        let named_blocks = pol.rules.iter().any(|r| {
            r.dir == DIR_EGRESS
                && r.parts
                    .iter()
                    .any(|p| matches!(p.peer, Peer::Blocks(_)) && !p.ports.named.is_empty())
        });
        if named_blocks {
            self.named_blocks.insert(pid);
        } else {
            self.named_blocks.remove(&pid);
        }
        self.generation += 1;
        self.by_ref.insert(pol.object.clone(), pid);
        self.by_ns
            .entry(pol.object.namespace.clone())
            .or_default()
            .insert(pid);
        self.policies.insert(pid, pol);
    }

    pub fn remove(&mut self, pid: PolicyId) {
        self.named_blocks.remove(&pid);
        self.targeted.remove(&pid);
        let Some(pol) = self.policies.remove(&pid) else {
            return;
        };
        self.generation += 1;
        self.by_ref.remove(&pol.object);
        let ns = &pol.object.namespace;
        if let Some(set) = self.by_ns.get_mut(ns) {
            set.remove(&pid);
            if set.is_empty() {
                self.by_ns.remove(ns);
            }
        }
    }

    /// The local identities policy `pid` selects, without a copy.
    pub fn targets_iter(&self, pid: PolicyId) -> impl Iterator<Item = u32> + '_ {
        self.policies
            .get(&pid)
            .into_iter()
            .flat_map(|p| p.targets.iter().copied())
    }

    /// The local identities policy `pid` selects.
    pub fn targets(&self, pid: PolicyId) -> Vec<u32> {
        self.policies
            .get(&pid)
            .map(|p| p.targets.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many policies select a local identity.
    pub fn targeted_count(&self) -> usize {
        self.targeted.len()
    }

    /// Every (rule part using selector `s`, local identity its policy
    /// selects), found from the policies that select local identities.
    pub fn parts_using(&self, s: SelId) -> Vec<((PolicyId, usize, usize), u32)> {
        let mut out = Vec::new();
        for &pid in &self.targeted {
            let Some(p) = self.policies.get(&pid) else {
                continue;
            };
            for (ri, r) in p.rules.iter().enumerate() {
                for (pi, part) in r.parts.iter().enumerate() {
                    if matches!(part.peer, Peer::Pods(t) if t == s) {
                        out.extend(p.targets.iter().map(|&l| ((pid, ri, pi), l)));
                    }
                }
            }
        }
        out
    }

    /// The local identities selected by a policy with an egress named port
    /// towards an ipBlock (usually none).
    pub fn named_block_targets(&self) -> BTreeSet<u32> {
        self.named_blocks
            .iter()
            .filter_map(|pid| self.policies.get(pid))
            .flat_map(|p| p.targets.iter().copied())
            .collect()
    }

    /// Notes that policy `pid` selects (or no longer selects) local identity `l`.
    pub fn set_target(&mut self, pid: PolicyId, l: u32, selects: bool) {
        if let Some(p) = self.policies.get_mut(&pid) {
            let changed = if selects {
                p.targets.insert(l)
            } else {
                p.targets.remove(&l)
            };
            if changed {
                self.generation += 1;
                if p.targets.is_empty() {
                    self.targeted.remove(&pid);
                } else {
                    self.targeted.insert(pid);
                }
            }
        }
    }

    pub fn clear_targets(&mut self) {
        self.generation += 1;
        self.targeted.clear();
        for p in self.policies.values_mut() {
            p.targets.clear();
        }
    }

    /// See the field.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Local identity -> the policies that isolate it, [ingress, egress],
    /// each sorted by namespace and name. Identities no policy selects are
    /// not in it.
    pub fn isolators(&self) -> FxHashMap<u32, [Vec<ObjectRef>; 2]> {
        let mut out: FxHashMap<u32, [Vec<ObjectRef>; 2]> = FxHashMap::default();
        // Only the policies that select a local identity have targets.
        for p in self
            .targeted
            .iter()
            .filter_map(|pid| self.policies.get(pid))
        {
            for &l in &p.targets {
                let lists = out.entry(l).or_default();
                if p.ingress {
                    lists[0].push(p.object.clone());
                }
                if p.egress {
                    lists[1].push(p.object.clone());
                }
            }
        }
        for lists in out.values_mut() {
            lists[0].sort();
            lists[1].sort();
        }
        out
    }

    /// Does the policy select a local identity?
    pub fn selects_local(&self, policy: &ObjectRef) -> bool {
        self.id_of(policy)
            .and_then(|pid| self.policies.get(&pid))
            .is_some_and(|p| !p.targets.is_empty())
    }

    /// Every NetworkPolicy rule id with where it comes from.
    pub fn rule_origins(&self) -> Vec<(u32, RuleOrigin)> {
        self.rule_origins
            .keys()
            .filter_map(|&id| self.rule_origin(id).map(|o| (id, o)))
            .collect()
    }

    /// Changes whenever a rule id is given or forgotten (ids are never
    /// reused, so the next id and the count say it).
    pub fn rule_generation(&self) -> (u32, usize) {
        (self.next_rule, self.rule_origins.len())
    }

    pub fn rule_origin(&self, rule_id: u32) -> Option<RuleOrigin> {
        let &(pid, dir, index) = self.rule_origins.get(&rule_id)?;
        Some(RuleOrigin {
            policy: self.policies.get(&pid)?.object.clone(),
            dir,
            index,
        })
    }

    /// The problems of the policies as they are now, sorted.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut out: Vec<Diagnostic> = self
            .policies
            .values()
            .flat_map(|p| {
                p.problems.iter().map(|reason| Diagnostic {
                    object: ObjKey::new(
                        Kind::NetworkPolicy,
                        p.object.namespace.clone(),
                        p.object.name.clone(),
                    ),
                    reason: reason.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.object, &a.reason).cmp(&(&b.object, &b.reason)));
        out
    }
}
