//! Each ClusterNetworkPolicy's share of the profile entries (`profiles`).
//!
//! A profile's entries are, per (direction, class, L4, tier), the best
//! (lowest-rank) match of the rules of its policies. A policy's share is
//! that best over its own rules alone: it depends on the policy, the peer
//! classes and, when an ingress rule of it names a port, the subject's
//! named ports, never on the profile. So a share is computed once for every
//! profile that holds the policy, and kept until the policy or the classes
//! change.
//!
//! A profile's entries are the first minimum of its policies' shares taken
//! in the order of its key, as the rebuild from the rules found it: when one
//! policy changes, only the keys of its old and new share are looked at
//! again ([`patch`]), and only those its old share won are recomputed from
//! the other shares. That is the cost of a ClusterNetworkPolicy change
//! (issue 15): it was a rebuild of every profile holding the policy from
//! all its policies' rules.
use std::{cmp::Ordering, collections::hash_map::Entry, sync::Arc};

use rustc_hash::FxHashMap;
use sluice_common::DIR_INGRESS;

use super::{
    Compiler,
    cnp::CnpPeer,
    cnps::CnpId,
    contributions::resolve,
    identities::NamedPorts,
    mapstate::{L4, Tier, TierRule},
    selectors::SelId,
};

/// What a profile entry is unique by.
pub(super) type EntryKey = (u8, u32, L4, Tier);

pub(super) fn entry_key(t: &TierRule) -> EntryKey {
    (t.dir, t.identity, t.l4, t.tier)
}

/// One policy's share, sorted by [`EntryKey`], one entry per key.
pub(super) type Share = Arc<[TierRule]>;

/// The shares of the policies, by policy: one share, or (a policy with an
/// ingress named port) one per subject named-port table.
#[derive(Default)]
pub(super) struct Shares {
    by_cnp: FxHashMap<CnpId, Vec<(Option<NamedPorts>, Share)>>,
    /// Profiles patched rather than merged (tests: that the patch ran).
    pub patched: u64,
}

impl Shares {
    /// The share of `id` for a subject with these named ports.
    pub fn get(&self, id: CnpId, subject_ports: Option<&NamedPorts>) -> Option<&Share> {
        self.by_cnp
            .get(&id)?
            .iter()
            .find(|(k, _)| k.is_none() || k.as_ref() == subject_ports)
            .map(|(_, s)| s)
    }

    pub fn clear(&mut self) {
        self.by_cnp.clear();
    }

    /// Forgets the shares of `id`, returning them.
    pub fn take(&mut self, id: CnpId) -> Vec<(Option<NamedPorts>, Share)> {
        self.by_cnp.remove(&id).unwrap_or_default()
    }

    /// Keeps only the named-port shares some profile still uses.
    pub fn retain_named(&mut self, used: impl Fn(CnpId, &NamedPorts) -> bool) {
        for (&id, v) in &mut self.by_cnp {
            v.retain(|(k, _)| k.as_ref().is_none_or(|p| used(id, p)));
        }
        self.by_cnp.retain(|_, v| !v.is_empty());
    }

    pub fn has_named(&self) -> bool {
        self.by_cnp.values().flatten().any(|(k, _)| k.is_some())
    }
}

/// The share of `id` among `old` (as taken by [`Shares::take`]).
pub(super) fn find_share<'a>(
    old: &'a [(Option<NamedPorts>, Share)],
    subject_ports: Option<&NamedPorts>,
) -> Option<&'a Share> {
    old.iter()
        .find(|(k, _)| k.is_none() || k.as_ref() == subject_ports)
        .map(|(_, s)| s)
}

/// The entries of a profile from the shares of its policies, in the order
/// of its key: per key the first of the lowest rank.
pub(super) fn merge(shares: &[&[TierRule]]) -> Vec<TierRule> {
    let mut all: Vec<TierRule> = shares.iter().flat_map(|s| s.iter().cloned()).collect();
    // Stable: among equal ranks the earlier policy stays first.
    all.sort_by_key(|t| (entry_key(t), t.rank));
    all.dedup_by_key(|t| entry_key(t));
    all
}

/// The entries of a profile after one of its policies changed from `old`
/// to `new` (its shares): `entries` are the current ones (from [`merge`]
/// or an earlier patch), `shares` the profile's shares in the order of its
/// key, the changed one's new share among them. `None`: nothing changed.
pub(super) fn patch(
    entries: &[TierRule],
    old: &[TierRule],
    new: &[TierRule],
    shares: &[&[TierRule]],
) -> Option<Vec<TierRule>> {
    // (key, entry now, entry wanted; `None` in `again`: merged below),
    // sorted by key, as the walk goes.
    let mut edits: Vec<(EntryKey, Option<&TierRule>, Option<TierRule>)> = Vec::new();
    let mut again: Vec<usize> = Vec::new();
    let (mut i, mut j, mut at) = (0, 0, 0);
    while i < old.len() || j < new.len() {
        let (o, n) = match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) => match entry_key(o).cmp(&entry_key(n)) {
                Ordering::Less => (Some(o), None),
                Ordering::Greater => (None, Some(n)),
                Ordering::Equal => (Some(o), Some(n)),
            },
            (o, n) => (o, n),
        };
        i += usize::from(o.is_some());
        j += usize::from(n.is_some());
        let Some(k) = o.or(n).map(entry_key) else {
            break;
        };
        at += entries
            .get(at..)
            .unwrap_or_default()
            .partition_point(|t| entry_key(t) < k);
        let now = entries.get(at).filter(|t| entry_key(t) == k);
        let wanted = match (now, o, n) {
            // The changed policy held the key, or ties with its holder:
            // the order of the policies decides, as a merge would.
            (Some(w), Some(o), _) if w == o => {
                again.push(edits.len());
                None
            }
            (Some(w), _, Some(n)) if n.rank == w.rank => {
                again.push(edits.len());
                None
            }
            (Some(w), _, Some(n)) => Some(if n.rank < w.rank { n } else { w }.clone()),
            (None, _, Some(n)) => Some(n.clone()),
            // Its old entry did not hold the key: nothing moves.
            (now, _, _) => now.cloned(),
        };
        edits.push((k, now, wanted));
    }
    // The keys to merge again, walked along each share once (a share is
    // sorted, and so are the keys): a lookup per key and share cost more
    // than the rest of the event.
    let mut best: Vec<Option<&TierRule>> = vec![None; again.len()];
    for s in shares {
        let mut p = 0;
        for (b, &e) in best.iter_mut().zip(&again) {
            let Some((k, ..)) = edits.get(e) else {
                continue;
            };
            while s.get(p).is_some_and(|t| entry_key(t) < *k) {
                p += 1;
            }
            if let Some(t) = s.get(p).filter(|t| entry_key(t) == *k)
                && b.is_none_or(|b| t.rank < b.rank)
            {
                *b = Some(t);
            }
        }
    }
    for (b, e) in best.into_iter().zip(again) {
        if let Some(edit) = edits.get_mut(e) {
            edit.2 = b.cloned();
        }
    }
    edits.retain(|(_, now, wanted)| wanted.as_ref() != *now);
    if edits.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(entries.len() + edits.len());
    let mut rest = entries;
    for (k, _, wanted) in edits {
        let at = rest.partition_point(|t| entry_key(t) < k);
        let (before, after) = rest.split_at(at);
        out.extend_from_slice(before);
        rest = match after.first() {
            Some(t) if entry_key(t) == k => after.get(1..).unwrap_or_default(),
            _ => after,
        };
        out.extend(wanted);
    }
    out.extend_from_slice(rest);
    Some(out)
}

impl Compiler {
    /// The share of policy `id` (see the module doc): for each rule and
    /// each pod peer, every class containing the peer's selector, with the
    /// rule's L4 matches (named ports resolved on the subject for ingress,
    /// on the class for egress); per key the first of the lowest rank.
    pub(super) fn compute_share(
        &self,
        id: CnpId,
        subject_ports: &NamedPorts,
        sel_classes: &FxHashMap<SelId, Vec<u32>>,
    ) -> Vec<TierRule> {
        let empty = NamedPorts::new();
        // Keeping the best as they come is much cheaper than sorting them
        // all: the peers of a policy's rules overlap.
        let mut best: FxHashMap<EntryKey, TierRule> = FxHashMap::default();
        let Some(c) = self.cnps.get(id) else {
            return Vec::new();
        };
        for r in &c.rules {
            let rank = c.rank(r.index);
            let shared = (r.dir == DIR_INGRESS || r.ports.named.is_empty())
                .then(|| resolve(&r.ports, subject_ports));
            for p in &r.peers {
                let CnpPeer::Pods(s) = p else {
                    continue;
                };
                for &class in sel_classes.get(s).into_iter().flatten() {
                    let owned;
                    let l4s: &[L4] = match &shared {
                        Some(v) => v,
                        None => {
                            let ports = self.profiles.class_ports(class).unwrap_or(&empty);
                            owned = resolve(&r.ports, ports);
                            &owned
                        }
                    };
                    for &l4 in l4s {
                        let rule = TierRule {
                            dir: r.dir,
                            identity: class,
                            l4,
                            tier: c.tier,
                            rank,
                            action: r.action,
                            rule_id: r.id,
                        };
                        match best.entry(entry_key(&rule)) {
                            Entry::Occupied(mut e) => {
                                if rank < e.get().rank {
                                    e.insert(rule);
                                }
                            }
                            Entry::Vacant(e) => {
                                e.insert(rule);
                            }
                        }
                    }
                }
            }
        }
        let mut out: Vec<TierRule> = best.into_values().collect();
        out.sort_unstable_by_key(entry_key);
        out
    }

    /// Does an ingress rule of policy `id` name a port (its share then
    /// depends on the subject's named ports)?
    pub(super) fn cnp_ingress_named(&self, id: CnpId) -> bool {
        self.cnps.get(id).is_some_and(|c| {
            c.rules
                .iter()
                .any(|r| r.dir == DIR_INGRESS && !r.ports.named.is_empty())
        })
    }

    /// Makes sure the shares of every policy of a profile are there.
    pub(super) fn ensure_shares(
        &mut self,
        cnps: &[CnpId],
        subject_ports: Option<&NamedPorts>,
        sel_classes: &FxHashMap<SelId, Vec<u32>>,
    ) {
        let empty = NamedPorts::new();
        for &id in cnps {
            if self.profiles.shares.get(id, subject_ports).is_some() {
                continue;
            }
            let named = self.cnp_ingress_named(id);
            let ports = if named {
                subject_ports.unwrap_or(&empty)
            } else {
                &empty
            };
            let share: Share = self.compute_share(id, ports, sel_classes).into();
            let key = named.then(|| ports.clone());
            self.profiles.shares.insert(id, key, share);
        }
    }
}

impl Shares {
    fn insert(&mut self, id: CnpId, key: Option<NamedPorts>, share: Share) {
        self.by_cnp.entry(id).or_default().push((key, share));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(identity: u32, rank: u32, rule_id: u32) -> TierRule {
        TierRule {
            dir: DIR_INGRESS,
            identity,
            l4: L4::Any,
            tier: Tier::Admin,
            rank,
            action: 0,
            rule_id,
        }
    }

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        /// A random share of policy `p`: some of six classes, ranks that
        /// tie across policies, two rules.
        fn share(&mut self, p: u32) -> Vec<TierRule> {
            let mut s = Vec::new();
            for class in 0..6 {
                if self.below(2) == 0 {
                    let rank = self.below(4) as u32;
                    s.push(rule(class, rank, p * 10 + self.below(2) as u32));
                }
            }
            s
        }
    }

    /// A patch after one policy's share changed equals a merge of all the
    /// shares, on random shares with ties of rank.
    #[test]
    fn patching_one_share_equals_merging_them_all_again() {
        let mut rng = Rng(0x5eed_5a7e_0000_0001);
        let mut patched = 0;
        for _ in 0..2000 {
            let policies = 1 + rng.below(4) as u32;
            let mut shares: Vec<Vec<TierRule>> = (0..policies).map(|p| rng.share(p)).collect();
            let refs: Vec<&[TierRule]> = shares.iter().map(Vec::as_slice).collect();
            let entries = merge(&refs);
            let c = rng.below(u64::from(policies)) as u32;
            let new = rng.share(c);
            let old = std::mem::replace(&mut shares[c as usize], new);
            let refs: Vec<&[TierRule]> = shares.iter().map(Vec::as_slice).collect();
            let want = merge(&refs);
            match patch(&entries, &old, &shares[c as usize], &refs) {
                Some(got) => {
                    assert_eq!(got, want);
                    patched += 1;
                }
                None => assert_eq!(entries, want),
            }
        }
        assert!(patched > 500, "{patched}");
    }
}
