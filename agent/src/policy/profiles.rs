//! ClusterNetworkPolicy entries shared across endpoints and peers.
//!
//! A ClusterNetworkPolicy's pod peers are wide (namespaces by label, every
//! pod of an app), and its subjects too: written per endpoint and per peer
//! identity they grow as endpoints x peers (23,000 keys per endpoint, 233
//! million for 10,000 endpoints in `bench compiler`). Two things make them
//! small, and the data path does two more hash lookups for them:
//!
//! - **Profiles**: local identities selected by the same set of
//!   ClusterNetworkPolicies (and, when one of them has an ingress named
//!   port, with the same named ports) share one profile. Its entries are
//!   written once, keyed by `PROFILE_KEY_FLAG | profile` in the endpoint
//!   field of `PolicyKey`; `TIER_PROFILES` gives each endpoint its profile.
//! - **Peer classes**: identities that are members of the same set of the
//!   selectors used as ClusterNetworkPolicy pod peers (and, when one of
//!   those is used with an egress named port, with the same named ports)
//!   share one class. A profile's entries are keyed by class, not by
//!   identity; `PEER_CLASSES` gives each identity its class.
//!
//! So a rule over thousands of peer pods is one entry per (profile, class,
//! port block): the matches of a rule depend only on the class and the
//! profile, never on which identity of the class it is. Any-peer and CIDR
//! peers stay per endpoint (`tiers`, `cidr`): they are per rule, not per
//! peer, and few.
//!
//! The tables are settled at commit when something they depend on changed:
//! the class of an identity is recomputed when it joins or leaves a
//! ClusterNetworkPolicy pod-peer selector, or when a selector it is in
//! starts or stops being one (so a pod event costs its own identities, not
//! a pass over every peer; at 100,000 pods that pass was the event),
//! profiles from the local identities' policy sets; a profile's entries are
//! merged from its policies' shares (`shares`) when it is new or when
//! classes appeared or went, and patched when one of its policies changed
//! (only that policy's share is computed again, once for every profile
//! holding it).
use std::{
    collections::{BTreeMap, BTreeSet},
    mem::take,
    sync::Arc,
};

use rustc_hash::{FxHashMap, FxHashSet};
use sluice_common::{DIR_INGRESS, EP_EGRESS_TIERED, EP_INGRESS_TIERED};

use super::{
    Compiler,
    cnps::CnpId,
    identities::NamedPorts,
    mapstate::{EndpointPolicy, TierRule, plen_bits_of},
    selectors::SelId,
    shares::{Share, Shares, find_share, merge, patch},
};

/// The set of ClusterNetworkPolicies selecting an identity, and its named
/// ports when an ingress rule of one of them names a port.
type ProfileKey = (Vec<CnpId>, Option<NamedPorts>);
/// The ClusterNetworkPolicy peer selectors an identity is in, and its named
/// ports when one of them is used with an egress named port.
type ClassKey = (Vec<SelId>, Option<NamedPorts>);

struct Profile {
    key: ProfileKey,
    /// Local identities with this profile.
    users: BTreeSet<u32>,
    /// The entries (peer = class), as an endpoint policy with tier rules
    /// only, so that it compiles to map entries like any other.
    policy: Arc<EndpointPolicy>,
    /// `shape(&policy)`.
    shape: (u32, [u32; 2]),
}

#[derive(Default)]
pub(super) struct Profiles {
    by_key: FxHashMap<ProfileKey, u32>,
    profiles: FxHashMap<u32, Profile>,
    /// Profile numbers, by the local identity a profile is made for.
    profile_numbers: Numbers,
    class_by_key: FxHashMap<ClassKey, u32>,
    class_keys: FxHashMap<u32, ClassKey>,
    /// Class numbers, by an identity in the class.
    class_numbers: Numbers,
    /// Identity -> class.
    class_of: FxHashMap<u32, u32>,
    /// Class -> how many identities have it.
    class_size: FxHashMap<u32, u32>,
    /// Local identity -> profile.
    profile_of: FxHashMap<u32, u32>,
    /// Each policy's share of the entries (`shares`).
    pub shares: Shares,
}

/// Numbers for classes or profiles: a new one takes back the number its
/// identity's had before a restart (`Compiler::restore`) when no live one
/// has it, else the next fresh one.
#[derive(Default)]
struct Numbers {
    last: u32,
    /// Identity -> its number before a restart.
    restored: FxHashMap<u32, u32>,
}

impl Numbers {
    fn restore(&mut self, pairs: Vec<(u32, u32)>) {
        self.restored = pairs.into_iter().collect();
        // Fresh numbers start above every restored one.
        self.last = self
            .last
            .max(self.restored.values().copied().max().unwrap_or(0));
    }

    fn take(&mut self, of: u32, live: impl Fn(u32) -> bool) -> u32 {
        match self.restored.get(&of) {
            Some(&n) if !live(n) => n,
            _ => {
                self.last += 1;
                self.last
            }
        }
    }
}

/// What one settle changed, for [`super::Changes`].
#[derive(Default)]
pub(super) struct Settled {
    pub profiles: BTreeSet<u32>,
    pub classes: BTreeMap<u32, Option<u32>>,
    /// Local identities whose profile, or its prefix lengths or tiered
    /// directions, changed.
    pub identities: FxHashSet<u32>,
}

impl Profiles {
    pub fn restore(&mut self, classes: Vec<(u32, u32)>, profiles: Vec<(u32, u32)>) {
        self.class_numbers.restore(classes);
        self.profile_numbers.restore(profiles);
    }

    pub fn forget_restored(&mut self) {
        self.class_numbers.restored = FxHashMap::default();
        self.profile_numbers.restored = FxHashMap::default();
    }

    /// A number for a new class that identity `x` is in.
    fn new_class(&mut self, x: u32) -> u32 {
        let live = &self.class_keys;
        self.class_numbers.take(x, |c| live.contains_key(&c))
    }

    /// A number for a new profile of local identity `l`.
    fn new_profile(&mut self, l: u32) -> u32 {
        let live = &self.profiles;
        self.profile_numbers.take(l, |p| live.contains_key(&p))
    }

    pub fn policy(&self, id: u32) -> Option<Arc<EndpointPolicy>> {
        self.profiles.get(&id).map(|p| p.policy.clone())
    }

    pub fn ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.profiles.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn class_of(&self, identity: u32) -> Option<u32> {
        self.class_of.get(&identity).copied()
    }

    pub fn classes(&self) -> BTreeMap<u32, u32> {
        self.class_of.iter().map(|(&i, &c)| (i, c)).collect()
    }

    pub fn profile_of(&self, l: u32) -> Option<u32> {
        self.profile_of.get(&l).copied()
    }

    /// The entries' shape of profile `id` ([`shape`]).
    pub fn shape_of(&self, id: u32) -> Option<(u32, [u32; 2])> {
        self.profiles.get(&id).map(|p| p.shape)
    }

    /// The named ports of class `c`'s key, when it has them.
    pub fn class_ports(&self, c: u32) -> Option<&NamedPorts> {
        self.class_keys.get(&c).and_then(|k| k.1.as_ref())
    }

    pub fn len(&self) -> (usize, usize) {
        (self.profiles.len(), self.class_keys.len())
    }
}

/// `EP_*_TIERED` bits and per-direction prefix-length masks of a profile's
/// entries.
pub(super) fn shape(p: &EndpointPolicy) -> (u32, [u32; 2]) {
    let mut tiered = 0;
    let mut plens = [0u32; 2];
    for t in &p.tier_rules {
        tiered |= if t.dir == DIR_INGRESS {
            EP_INGRESS_TIERED
        } else {
            EP_EGRESS_TIERED
        };
        plens[usize::from(t.dir) & 1] |= plen_bits_of(t.identity, t.l4);
    }
    (tiered, plens)
}

impl Compiler {
    /// Settles profiles and classes after an event that may have changed
    /// them; `changed_cnps`: policies whose rules or ranks changed.
    pub(super) fn settle_profiles(&mut self, changed_cnps: &BTreeSet<CnpId>) -> Settled {
        let mut out = Settled::default();
        // A recompute rebuilds every profile from fresh shares.
        let full = self.txn.classes_all;
        let classes_moved = self.settle_classes(&mut out);
        // Shares of changed policies go (kept aside to patch the profiles
        // holding them); all of them when classes appeared or went.
        let mut old_shares = FxHashMap::default();
        if classes_moved || full {
            self.profiles.shares.clear();
        } else {
            for &c in changed_cnps {
                old_shares.insert(c, self.profiles.shares.take(c));
            }
        }
        // Class index: selector -> classes containing it.
        let mut sel_classes: FxHashMap<SelId, Vec<u32>> = FxHashMap::default();
        for (&c, (sels, _)) in &self.profiles.class_keys {
            for &s in sels {
                sel_classes.entry(s).or_default().push(c);
            }
        }
        for v in sel_classes.values_mut() {
            v.sort_unstable();
        }
        // Profiles of the local identities.
        let mut wanted: FxHashMap<u32, ProfileKey> = FxHashMap::default();
        for l in self.identities.locals() {
            let Some(ident) = self.identities.get(l) else {
                continue;
            };
            let Some(st) = ident.local.as_deref() else {
                continue;
            };
            if st.cnps().is_empty() {
                continue;
            }
            let cnps: Vec<CnpId> = st.cnps().iter().copied().collect();
            let named = cnps.iter().any(|&id| self.cnp_ingress_named(id));
            wanted.insert(l, (cnps, named.then(|| ident.key.ports.clone())));
        }
        let mut fresh: BTreeSet<u32> = BTreeSet::new();
        let mut users: FxHashMap<u32, BTreeSet<u32>> = FxHashMap::default();
        for (&l, key) in &wanted {
            let id = match self.profiles.by_key.get(key) {
                Some(&id) => id,
                None => {
                    let id = self.profiles.new_profile(l);
                    self.profiles.by_key.insert(key.clone(), id);
                    self.profiles.profiles.insert(
                        id,
                        Profile {
                            key: key.clone(),
                            users: BTreeSet::new(),
                            policy: Arc::default(),
                            shape: (0, [0; 2]),
                        },
                    );
                    fresh.insert(id);
                    id
                }
            };
            users.entry(id).or_default().insert(l);
            if self.profiles.profile_of.insert(l, id) != Some(id) {
                out.identities.insert(l);
            }
        }
        let gone_locals: Vec<u32> = self
            .profiles
            .profile_of
            .keys()
            .filter(|l| !wanted.contains_key(l))
            .copied()
            .collect();
        for l in gone_locals {
            self.profiles.profile_of.remove(&l);
            out.identities.insert(l);
        }
        // Unused profiles go; the others get their users and, where needed,
        // their entries.
        let ids = self.profiles.ids();
        for id in ids {
            let Some(u) = users.remove(&id) else {
                if let Some(p) = self.profiles.profiles.remove(&id) {
                    self.profiles.by_key.remove(&p.key);
                }
                out.profiles.insert(id);
                continue;
            };
            let Some(p) = self.profiles.profiles.get(&id) else {
                continue;
            };
            let stale = classes_moved
                || fresh.contains(&id)
                || p.key.0.iter().any(|c| changed_cnps.contains(c));
            let policy = if stale {
                let key = p.key.clone();
                let current = p.policy.clone();
                self.ensure_shares(&key.0, key.1.as_ref(), &sel_classes);
                let mut changed = key.0.iter().filter(|c| changed_cnps.contains(c));
                // Patched when one of its policies changed and its old
                // share is known; merged from all the shares otherwise.
                let one = match (changed.next(), changed.next()) {
                    (Some(c), None) if !fresh.contains(&id) => old_shares
                        .get(c)
                        .and_then(|v| find_share(v, key.1.as_ref()))
                        .map(|old| (*c, old)),
                    _ => None,
                };
                self.profiles.shares.patched += u64::from(one.is_some());
                match self.profile_rules(&key, &current.tier_rules, one) {
                    Some(rules) => Arc::new(EndpointPolicy {
                        tier_rules: rules,
                        ..EndpointPolicy::default()
                    }),
                    None => current,
                }
            } else {
                p.policy.clone()
            };
            let Some(p) = self.profiles.profiles.get_mut(&id) else {
                continue;
            };
            let same = Arc::ptr_eq(&policy, &p.policy) || *policy == *p.policy;
            if !same || fresh.contains(&id) {
                let new_shape = shape(&policy);
                if new_shape != p.shape || fresh.contains(&id) {
                    out.identities.extend(u.iter().copied());
                }
                out.profiles.insert(id);
                p.policy = policy;
                p.shape = new_shape;
            }
            p.users = u;
        }
        // Shares for subject named ports no profile has any more go.
        if !out.profiles.is_empty() && self.profiles.shares.has_named() {
            let profiles = &self.profiles.profiles;
            self.profiles.shares.retain_named(|c, ports| {
                profiles
                    .values()
                    .any(|p| p.key.1.as_ref() == Some(ports) && p.key.0.contains(&c))
            });
        }
        out
    }

    /// The entries of a profile from its policies' shares: patched from
    /// `current` when only `one` changed (its id and old share), merged
    /// from all the shares otherwise. `None`: the patch changed nothing.
    fn profile_rules(
        &self,
        key: &ProfileKey,
        current: &[TierRule],
        one: Option<(CnpId, &Share)>,
    ) -> Option<Vec<TierRule>> {
        let shares: Vec<&[TierRule]> = key
            .0
            .iter()
            .map(|&c| {
                self.profiles
                    .shares
                    .get(c, key.1.as_ref())
                    .map_or(&[][..], |s| &s[..])
            })
            .collect();
        let Some((c, old)) = one else {
            return Some(merge(&shares));
        };
        let new = key
            .0
            .iter()
            .position(|&x| x == c)
            .and_then(|i| shares.get(i).copied())
            .unwrap_or_default();
        patch(current, old, new, &shares)
    }

    /// Settles the class of each identity whose class may have changed
    /// (every identity after `recompute_all`): an identity's class depends
    /// only on the ClusterNetworkPolicy pod-peer selectors it is in, so it
    /// changes when it joins or leaves one, or when a selector it is in
    /// starts or stops being such a peer. True when a class appeared or
    /// went (profile entries are keyed by class).
    fn settle_classes(&mut self, out: &mut Settled) -> bool {
        self.peer_status_changed();
        let dirty: Vec<u32> = if take(&mut self.txn.classes_all) {
            self.txn.class_dirty.clear();
            let mut all: FxHashSet<u32> = self.identities.ids().collect();
            all.extend(self.profiles.class_of.keys().copied());
            all.into_iter().collect()
        } else {
            self.txn.class_dirty.drain().collect()
        };
        let mut moved = false;
        // New classes first, then the old ones released, so that a class
        // one identity leaves and another joins in the same event stays.
        let mut released = Vec::new();
        for x in dirty {
            let new = match self.class_key(x) {
                None => None,
                Some(key) => Some(match self.profiles.class_by_key.get(&key) {
                    Some(&c) => c,
                    None => {
                        let c = self.profiles.new_class(x);
                        self.profiles.class_by_key.insert(key.clone(), c);
                        self.profiles.class_keys.insert(c, key);
                        moved = true;
                        c
                    }
                }),
            };
            let old = match new {
                Some(c) => self.profiles.class_of.insert(x, c),
                None => self.profiles.class_of.remove(&x),
            };
            if old == new {
                continue;
            }
            if let Some(c) = new {
                *self.profiles.class_size.entry(c).or_default() += 1;
            }
            released.extend(old);
            out.classes.insert(x, new);
        }
        for c in released {
            let Some(n) = self.profiles.class_size.get_mut(&c) else {
                continue;
            };
            *n -= 1;
            if *n == 0 {
                self.profiles.class_size.remove(&c);
                if let Some(k) = self.profiles.class_keys.remove(&c) {
                    self.profiles.class_by_key.remove(&k);
                }
                moved = true;
            }
        }
        moved
    }

    /// The class key of identity `x` now (`None`: in no pod-peer selector,
    /// or gone).
    fn class_key(&self, x: u32) -> Option<ClassKey> {
        let ident = self.identities.get(x)?;
        let mut sels: Vec<SelId> = self
            .identities
            .in_selectors(x)
            .iter()
            .copied()
            .filter(|&s| self.cnps.is_peer(s))
            .collect();
        if sels.is_empty() {
            return None;
        }
        sels.sort_unstable();
        sels.dedup();
        let named = sels.iter().any(|&s| self.cnps.is_named(s));
        Some((sels, named.then(|| ident.key.ports.clone())))
    }
}
