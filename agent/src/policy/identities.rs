//! Security identities and the number allocator.
//!
//! Pods with the same namespace, namespace labels, pod labels and named-port
//! table share one identity; this room numbers them, counts their pods,
//! indexes them by namespace, and holds the per-identity state of the local
//! ones ([`LocalState`]). Which selectors an identity is in is written here by
//! the selector cache ([`super::selectors`]), which owns the selectors.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use rustc_hash::FxHashMap;
use sluice_common::{IDENTITY_CIDR_FLAG, IDENTITY_FIRST_USER};

use super::{
    contributions::LocalState,
    selector::Labels,
    selectors::{SelId, SelectorCache},
};
use crate::model::ObjectRef;

/// (name, protocol, port) of a pod's named container ports, sorted.
pub(super) type NamedPorts = Vec<(String, u8, u16)>;

/// What makes two pods share an identity: every selector is a function of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct IdentityKey {
    pub namespace: String,
    pub ns_labels: Arc<Labels>,
    pub labels: Labels,
    pub ports: NamedPorts,
}

pub(super) struct IdentityState {
    pub key: Arc<IdentityKey>,
    /// Pods with this identity, local or not.
    pods: u32,
    /// Interned selectors that select it.
    in_selectors: Vec<SelId>,
    pub local_pods: BTreeSet<ObjectRef>,
    /// Present while the identity has local pods.
    pub local: Option<Box<LocalState>>,
}

/// Numbers from `first` up to `limit`, then reused; never two live at once.
pub(super) struct Allocator {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
}

impl Allocator {
    pub fn new(first: u32, limit: u32) -> Self {
        Self {
            next: first,
            limit,
            free: BTreeSet::new(),
        }
    }

    /// Fresh numbers first, so that a released number is not handed out
    /// again while stale map entries may still name it.
    pub fn alloc(&mut self) -> u32 {
        if self.next < self.limit {
            self.next += 1;
            self.next - 1
        } else {
            #[expect(
                clippy::expect_used,
                reason = "2^31 live identities or groups cannot fit in memory first"
            )]
            self.free.pop_first().expect("identity space exhausted")
        }
    }

    pub fn release(&mut self, n: u32) {
        self.free.insert(n);
    }

    /// Sets aside the numbers a previous run handed out: fresh numbers
    /// start above them, and [`Self::claim`] takes one back.
    pub fn reserve_up_to(&mut self, n: u32) {
        self.next = self.next.max(n.saturating_add(1)).min(self.limit);
    }

    /// Takes number `n` (which the caller knows is not live) when it is in
    /// range and not yet handed out fresh.
    pub fn claim(&mut self, n: u32, first: u32) -> bool {
        if n < first || n >= self.limit {
            return false;
        }
        if n >= self.next {
            self.next = n + 1;
        }
        self.free.remove(&n);
        true
    }
}

/// Every identity in use, by number, by key and by namespace.
pub(super) struct Identities {
    map: FxHashMap<u32, IdentityState>,
    by_key: HashMap<Arc<IdentityKey>, u32>,
    by_ns: HashMap<String, BTreeSet<u32>>,
    /// The namespace label maps the identities of each namespace carry,
    /// with how many carry each (one map, except inside a relabel): a
    /// selector whose namespace part matches none of them skips the
    /// namespace whole (`SelectorCache::evaluate`).
    ns_label_maps: HashMap<String, Vec<(Arc<Labels>, u32)>>,
    /// Identities with local pods, by namespace.
    local_by_ns: HashMap<String, BTreeSet<u32>>,
    /// Identities with local pods: a node has few among many.
    local_ids: BTreeSet<u32>,
    numbers: Allocator,
    /// The number each address had before a restart (read from the
    /// pinned ipcache), until everything listed is in: a pod whose
    /// identity is new takes its address's old number back when free, so
    /// a restart renumbers nothing (docs/design.md, "Numbers survive a
    /// restart").
    restored: HashMap<IpAddr, u32>,
}

impl Identities {
    pub fn new() -> Self {
        Self {
            map: FxHashMap::default(),
            by_key: HashMap::new(),
            by_ns: HashMap::new(),
            ns_label_maps: HashMap::new(),
            local_by_ns: HashMap::new(),
            local_ids: BTreeSet::new(),
            numbers: Allocator::new(IDENTITY_FIRST_USER, IDENTITY_CIDR_FLAG),
            restored: HashMap::new(),
        }
    }

    /// Remembers the numbers of a previous run (address -> identity).
    /// Numbers outside the pod range (the host, the world) are ignored.
    pub fn restore(&mut self, numbers: impl IntoIterator<Item = (IpAddr, u32)>) {
        let range = IDENTITY_FIRST_USER..IDENTITY_CIDR_FLAG;
        self.restored = numbers
            .into_iter()
            .filter(|(_, n)| range.contains(n))
            .collect();
        if let Some(&max) = self.restored.values().max() {
            self.numbers.reserve_up_to(max);
        }
    }

    /// Numbers not taken back by now are not (they stay out of use until
    /// the number space wraps).
    pub fn forget_restored(&mut self) {
        self.restored = HashMap::new();
    }

    /// The number for a new identity of a pod with addresses `ips`.
    fn number_for(&mut self, ips: &[IpAddr]) -> u32 {
        let old = ips.iter().find_map(|ip| self.restored.get(ip).copied());
        if let Some(n) = old
            && !self.map.contains_key(&n)
            && self.numbers.claim(n, IDENTITY_FIRST_USER)
        {
            return n;
        }
        self.numbers.alloc()
    }

    pub fn get(&self, id: u32) -> Option<&IdentityState> {
        self.map.get(&id)
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut IdentityState> {
        self.map.get_mut(&id)
    }

    pub fn local(&self, id: u32) -> Option<&LocalState> {
        self.map.get(&id)?.local.as_deref()
    }

    pub fn local_mut(&mut self, id: u32) -> Option<&mut LocalState> {
        self.map.get_mut(&id)?.local.as_deref_mut()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Identities with local pods, sorted.
    pub fn locals(&self) -> Vec<u32> {
        self.local_ids.iter().copied().collect()
    }

    pub fn local_count(&self) -> usize {
        self.local_ids.len()
    }

    /// Every identity, in no order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.map.keys().copied()
    }

    /// The interned selectors identity `id` is in (empty when unknown).
    pub fn in_selectors(&self, id: u32) -> &[SelId] {
        self.map.get(&id).map_or(&[], |i| i.in_selectors.as_slice())
    }

    pub fn locals_in(&self, ns: &str) -> Vec<u32> {
        self.local_by_ns
            .get(ns)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn in_namespace(&self, ns: &str) -> Option<&BTreeSet<u32>> {
        self.by_ns.get(ns)
    }

    /// The identities of each namespace, with the namespace label maps
    /// they carry.
    pub fn by_namespace(&self) -> impl Iterator<Item = (&BTreeSet<u32>, &[(Arc<Labels>, u32)])> {
        self.by_ns.iter().map(|(ns, ids)| {
            let maps = self.ns_label_maps.get(ns).map_or(&[][..], Vec::as_slice);
            (ids, maps)
        })
    }

    /// Notes that identity `id` is in selector `s`.
    pub fn add_selector(&mut self, id: u32, s: SelId) {
        if let Some(i) = self.map.get_mut(&id) {
            i.in_selectors.push(s);
        }
    }

    pub fn remove_selector(&mut self, id: u32, s: SelId) {
        if let Some(i) = self.map.get_mut(&id) {
            i.in_selectors.retain(|&t| t != s);
        }
    }

    pub fn clear_selectors(&mut self) {
        for ident in self.map.values_mut() {
            ident.in_selectors.clear();
        }
    }

    /// Takes a pod reference on the identity of `key`. A new identity comes
    /// with the selectors that select it (already listed in it), which the
    /// caller adds it to.
    pub fn acquire(
        &mut self,
        key: IdentityKey,
        ips: &[IpAddr],
        selectors: &SelectorCache,
    ) -> (u32, Vec<SelId>) {
        if let Some(&id) = self.by_key.get(&key)
            && let Some(i) = self.map.get_mut(&id)
        {
            i.pods += 1;
            return (id, Vec::new());
        }
        let id = self.number_for(ips);
        let key = Arc::new(key);
        let hits = selectors.matching(&key);
        self.by_key.insert(key.clone(), id);
        self.by_ns
            .entry(key.namespace.clone())
            .or_default()
            .insert(id);
        let maps = self.ns_label_maps.entry(key.namespace.clone()).or_default();
        match maps
            .iter_mut()
            .find(|(m, _)| Arc::ptr_eq(m, &key.ns_labels))
        {
            Some((_, n)) => *n += 1,
            None => maps.push((key.ns_labels.clone(), 1)),
        }
        self.map.insert(
            id,
            IdentityState {
                key,
                pods: 1,
                in_selectors: hits.clone(),
                local_pods: BTreeSet::new(),
                local: None,
            },
        );
        (id, hits)
    }

    /// Drops a pod reference. When it was the last, returns the selectors
    /// the identity was in: the caller takes it out of them, then calls
    /// [`Self::remove`].
    pub fn release(&mut self, id: u32) -> Option<Vec<SelId>> {
        let ident = self.map.get_mut(&id)?;
        ident.pods -= 1;
        (ident.pods == 0).then(|| std::mem::take(&mut ident.in_selectors))
    }

    pub fn remove(&mut self, id: u32) {
        self.local_ids.remove(&id);
        if let Some(ident) = self.map.remove(&id) {
            self.by_key.remove(&ident.key);
            if let Some(set) = self.by_ns.get_mut(&ident.key.namespace) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_ns.remove(&ident.key.namespace);
                }
            }
            if let Some(maps) = self.ns_label_maps.get_mut(&ident.key.namespace) {
                for (m, n) in maps.iter_mut() {
                    if Arc::ptr_eq(m, &ident.key.ns_labels) {
                        *n = n.saturating_sub(1);
                    }
                }
                maps.retain(|(_, n)| *n > 0);
                if maps.is_empty() {
                    self.ns_label_maps.remove(&ident.key.namespace);
                }
            }
        }
        self.numbers.release(id);
    }

    /// Adds a local pod to `id`; true when the identity just became local
    /// (with an empty [`LocalState`]).
    pub fn add_local_pod(&mut self, id: u32, obj: &ObjectRef) -> bool {
        let Some(ident) = self.map.get_mut(&id) else {
            return false;
        };
        ident.local_pods.insert(obj.clone());
        if ident.local.is_some() {
            return false;
        }
        ident.local = Some(Box::default());
        self.local_ids.insert(id);
        self.local_by_ns
            .entry(ident.key.namespace.clone())
            .or_default()
            .insert(id);
        true
    }

    /// Removes a local pod from `id`; returns the identity's local state
    /// when that was its last local pod.
    pub fn remove_local_pod(&mut self, id: u32, obj: &ObjectRef) -> Option<Box<LocalState>> {
        let ident = self.map.get_mut(&id)?;
        ident.local_pods.remove(obj);
        if !ident.local_pods.is_empty() {
            return None;
        }
        let st = ident.local.take()?;
        self.local_ids.remove(&id);
        let ns = &ident.key.namespace;
        if let Some(set) = self.local_by_ns.get_mut(ns) {
            set.remove(&id);
            if set.is_empty() {
                self.local_by_ns.remove(ns);
            }
        }
        Some(st)
    }
}
