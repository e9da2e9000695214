//! The selector cache: every peer selector of every policy, interned once
//! with the identities it selects and the rule parts that use it. A new
//! identity is matched against the cache (each distinct namespace selector
//! evaluated once); the users of a selector are told when a member joins or
//! leaves (by the facade, which owns the policies).
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use rustc_hash::FxHashMap;

use super::{
    identities::{Identities, IdentityKey},
    repository::PolicyId,
    selector::{Labels, NsMatch, PeerSelector, Selector},
};

pub(super) type SelId = u32;

/// A rule part using a selector: (policy, rule position, part position).
pub(super) type User = (PolicyId, usize, usize);

struct SelectorEntry {
    sel: PeerSelector,
    /// Parts that reference it.
    refs: u32,
    members: BTreeSet<u32>,
    users: BTreeSet<User>,
}

#[derive(Default)]
pub(super) struct SelectorCache {
    entries: FxHashMap<SelId, SelectorEntry>,
    by_value: HashMap<PeerSelector, SelId>,
    /// Selectors without a namespace selector, by the namespace they cover.
    own: HashMap<String, BTreeSet<SelId>>,
    /// Selectors with a namespace selector, grouped by it, so that a new
    /// identity evaluates each distinct namespace selector once.
    by_ns_sel: HashMap<Selector, BTreeSet<SelId>>,
    next: SelId,
}

impl SelectorCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every selector, in interning order.
    pub fn ids(&self) -> Vec<SelId> {
        let mut ids: Vec<SelId> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The selector itself (`sluice explain` says why it does not match).
    pub fn selector(&self, s: SelId) -> Option<&PeerSelector> {
        self.entries.get(&s).map(|e| &e.sel)
    }

    /// Does one reference keep `s` (its release removes it)?
    pub fn last_reference(&self, s: SelId) -> bool {
        self.entries.get(&s).is_some_and(|e| e.refs == 1)
    }

    pub fn members(&self, s: SelId) -> Option<&BTreeSet<u32>> {
        self.entries.get(&s).map(|e| &e.members)
    }

    pub fn user_count(&self, s: SelId) -> usize {
        self.entries.get(&s).map_or(0, |e| e.users.len())
    }

    pub fn users_iter(&self, s: SelId) -> impl Iterator<Item = User> + '_ {
        self.entries
            .get(&s)
            .into_iter()
            .flat_map(|e| e.users.iter().copied())
    }

    pub fn add_user(&mut self, s: SelId, u: User) {
        if let Some(e) = self.entries.get_mut(&s) {
            e.users.insert(u);
        }
    }

    pub fn remove_user(&mut self, s: SelId, u: User) {
        if let Some(e) = self.entries.get_mut(&s) {
            e.users.remove(&u);
        }
    }

    pub fn add_member(&mut self, s: SelId, id: u32) {
        if let Some(e) = self.entries.get_mut(&s) {
            e.members.insert(id);
        }
    }

    pub fn remove_member(&mut self, s: SelId, id: u32) {
        if let Some(e) = self.entries.get_mut(&s) {
            e.members.remove(&id);
        }
    }

    pub fn set_members(&mut self, s: SelId, members: BTreeSet<u32>) {
        if let Some(e) = self.entries.get_mut(&s) {
            e.members = members;
        }
    }

    /// The selectors an identity with this key is in, sorted.
    pub fn matching(&self, key: &IdentityKey) -> Vec<SelId> {
        let mut hits = Vec::new();
        let pod_matches = |s: &SelId| {
            self.entries
                .get(s)
                .is_some_and(|e| e.sel.pod.matches(&key.labels))
        };
        for &s in self.own.get(&key.namespace).into_iter().flatten() {
            if pod_matches(&s) {
                hits.push(s);
            }
        }
        for (ns_sel, sids) in &self.by_ns_sel {
            if !ns_sel.matches(&key.ns_labels) {
                continue;
            }
            hits.extend(sids.iter().copied().filter(|s| pod_matches(s)));
        }
        hits.sort_unstable();
        hits
    }

    /// The identities selector `s` selects, from the identities alone.
    pub fn evaluate(&self, s: SelId, identities: &Identities) -> BTreeSet<u32> {
        let Some(e) = self.entries.get(&s) else {
            return BTreeSet::new();
        };
        let mut out = BTreeSet::new();
        let mut check = |ids: &BTreeSet<u32>| {
            // The identities of a namespace share its labels (one Arc),
            // except briefly while it is relabelled: cache by pointer.
            let mut last: Option<(*const Labels, bool)> = None;
            for &id in ids {
                let Some(i) = identities.get(id) else {
                    continue;
                };
                let ns_ok = match &e.sel.ns {
                    NsMatch::Own(ns) => *ns == i.key.namespace,
                    NsMatch::Labels(sel) => {
                        let ptr = Arc::as_ptr(&i.key.ns_labels);
                        match last {
                            Some((p, ok)) if p == ptr => ok,
                            _ => {
                                let ok = sel.matches(&i.key.ns_labels);
                                last = Some((ptr, ok));
                                ok
                            }
                        }
                    }
                };
                if ns_ok && e.sel.pod.matches(&i.key.labels) {
                    out.insert(id);
                }
            }
        };
        match &e.sel.ns {
            NsMatch::Own(ns) => {
                if let Some(ids) = identities.in_namespace(ns) {
                    check(ids);
                }
            }
            NsMatch::Labels(sel) => {
                for (ids, maps) in identities.by_namespace() {
                    // When none of the namespace's label maps matches, none
                    // of its identities can: skipped without a lookup each.
                    if maps.iter().any(|(m, _)| sel.matches(m)) {
                        check(ids);
                    }
                }
            }
        }
        out
    }

    /// Takes a reference on `sel`, interning it (with its members, which
    /// learn they are in it) if new.
    pub fn intern(&mut self, sel: PeerSelector, identities: &mut Identities) -> SelId {
        if let Some(&s) = self.by_value.get(&sel)
            && let Some(e) = self.entries.get_mut(&s)
        {
            e.refs += 1;
            return s;
        }
        let s = self.next;
        self.next += 1;
        match &sel.ns {
            NsMatch::Own(ns) => self.own.entry(ns.clone()).or_default(),
            NsMatch::Labels(ns_sel) => self.by_ns_sel.entry(ns_sel.clone()).or_default(),
        }
        .insert(s);
        self.by_value.insert(sel.clone(), s);
        self.entries.insert(
            s,
            SelectorEntry {
                sel,
                refs: 1,
                members: BTreeSet::new(),
                users: BTreeSet::new(),
            },
        );
        let members = self.evaluate(s, identities);
        for &x in &members {
            identities.add_selector(x, s);
        }
        self.set_members(s, members);
        s
    }

    /// Drops a reference on `s`; the last one removes it (and it from its
    /// members).
    pub fn release(&mut self, s: SelId, identities: &mut Identities) {
        let Some(e) = self.entries.get_mut(&s) else {
            return;
        };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let Some(e) = self.entries.remove(&s) else {
            return;
        };
        for &x in &e.members {
            identities.remove_selector(x, s);
        }
        self.by_value.remove(&e.sel);
        match &e.sel.ns {
            NsMatch::Own(ns) => remove_from_index(&mut self.own, ns, s),
            NsMatch::Labels(sel) => remove_from_index(&mut self.by_ns_sel, sel, s),
        }
    }
}

fn remove_from_index<K: Eq + std::hash::Hash>(
    index: &mut HashMap<K, BTreeSet<SelId>>,
    key: &K,
    s: SelId,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(&s);
        if set.is_empty() {
            index.remove(key);
        }
    }
}
