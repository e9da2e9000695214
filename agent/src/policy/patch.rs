//! An endpoint's map entries patched from one policy to the next: only the
//! (direction, peer identity) groups whose rules differ are compiled again.
//! Exact because a POLICY key holds its direction and peer identity, so the
//! keys of different groups never merge (`fold_keys`), and the rest of the
//! compiled form (`EndpointPolicy::header`) is cheap to build whole.
//!
//! A namespace relabel changes a few entries of every local endpoint that
//! selects its pods, each of which may hold thousands: compiling them whole
//! and diffing against what is programmed was the agent's main cost
//! (docs/performance.md, `bench agent`).
use std::cmp::Ordering;

use itertools::{EitherOrBoth, merge_join_by};
use sluice_common::{PolicyKey, PolicyValue};

use super::mapstate::{Compiled, EndpointPolicy, PolicyError, fold_keys};

/// What a patch changed in the POLICY entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Entries to write, and whether each key was programmed before (a
    /// rewritten key may admit less).
    pub set: Vec<(PolicyKey, PolicyValue, bool)>,
    /// Keys to remove.
    pub removed: Vec<PolicyKey>,
}

impl Delta {
    /// What turns the entries of `old` into those of `new`, found by one
    /// walk along both (a whole replacement's delta).
    pub fn between(old: &Compiled, new: &Compiled) -> Self {
        let mut delta = Self::default();
        for e in merge_join_by(&old.entries, &new.entries, |a, b| a.0.cmp(b.0)) {
            match e {
                EitherOrBoth::Left((k, _)) => delta.removed.push(*k),
                EitherOrBoth::Right((k, v)) => delta.set.push((*k, *v, false)),
                EitherOrBoth::Both((_, was), (k, v)) if was != v => {
                    delta.set.push((*k, *v, true));
                }
                EitherOrBoth::Both(..) => {}
            }
        }
        delta
    }
}

/// (direction, peer identity).
type Group = (u8, u32);

impl EndpointPolicy {
    /// Patches `programmed`, which must be `old.compile(ep_id)`, into
    /// `self.compile(ep_id)`; returns what changed in its entries. `None`
    /// (nothing touched): a policy's rules are not sorted by group, so the
    /// caller compiles whole. On an error `programmed` is left as it was.
    pub fn patch(
        &self,
        old: &EndpointPolicy,
        ep_id: u32,
        programmed: &mut Compiled,
    ) -> Result<Option<Delta>, PolicyError> {
        let Some(groups) = changed_groups(old, self) else {
            return Ok(None);
        };
        // Everything is compiled before `programmed` is touched, so that
        // an error leaves it as it was.
        let header = self.header()?;
        let mut news = Vec::with_capacity(groups.len());
        for &(dir, identity) in &groups {
            let rules = of_group(&self.rules, (dir, identity), |r| (r.dir, r.identity));
            let tiers = of_group(&self.tier_rules, (dir, identity), |t| (t.dir, t.identity));
            news.push(fold_keys(ep_id, rules, tiers)?);
        }
        let mut delta = Delta::default();
        for ((dir, identity), new) in groups.into_iter().zip(news) {
            let bound = |fill: u8| PolicyKey {
                ep_id,
                identity,
                port: u16::from(fill) * 0x0101,
                proto: fill,
                dir: fill,
                plen: fill,
                _pad: [fill; 3],
            };
            let old: Vec<(PolicyKey, PolicyValue)> = programmed
                .entries
                .range(bound(0)..=bound(u8::MAX))
                .filter(|(k, _)| k.dir == dir)
                .map(|(k, v)| (*k, *v))
                .collect();
            for e in merge_join_by(old, new, |a, b| a.0.cmp(&b.0)) {
                match e {
                    EitherOrBoth::Left((k, _)) => {
                        programmed.entries.remove(&k);
                        delta.removed.push(k);
                    }
                    EitherOrBoth::Right((k, v)) => {
                        programmed.entries.insert(k, v);
                        delta.set.push((k, v, false));
                    }
                    EitherOrBoth::Both((_, was), (k, v)) if was != v => {
                        programmed.entries.insert(k, v);
                        delta.set.push((k, v, true));
                    }
                    EitherOrBoth::Both(..) => {}
                }
            }
        }
        programmed.isolation = header.isolation;
        programmed.port_plens = header.port_plens;
        programmed.profile = header.profile;
        programmed.cidrs = header.cidrs;
        Ok(Some(delta))
    }
}

/// The groups whose rules or tier rules differ between `a` and `b`, sorted;
/// `None` when either policy's rules are not sorted by group.
fn changed_groups(a: &EndpointPolicy, b: &EndpointPolicy) -> Option<Vec<Group>> {
    let sorted = |p: &EndpointPolicy| {
        p.rules.is_sorted_by_key(|r| (r.dir, r.identity))
            && p.tier_rules.is_sorted_by_key(|t| (t.dir, t.identity))
    };
    if !sorted(a) || !sorted(b) {
        return None;
    }
    let mut out = Vec::new();
    differing(&a.rules, &b.rules, |r| (r.dir, r.identity), &mut out);
    differing(
        &a.tier_rules,
        &b.tier_rules,
        |t| (t.dir, t.identity),
        &mut out,
    );
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Adds to `out` each group whose run in `a` differs from its run in `b`
/// (both sorted by group).
fn differing<'a, T: PartialEq>(
    a: &'a [T],
    b: &'a [T],
    group: impl Fn(&T) -> Group + Copy,
    out: &mut Vec<Group>,
) {
    let first = |run: &[T]| run.first().map(group);
    let by_group = |x: &&[T], y: &&[T]| -> Ordering { first(x).cmp(&first(y)) };
    let runs = |s: &'a [T]| s.chunk_by(move |x, y| group(x) == group(y));
    for e in merge_join_by(runs(a), runs(b), by_group) {
        match e {
            EitherOrBoth::Both(x, y) if x == y => {}
            EitherOrBoth::Both(x, _) | EitherOrBoth::Left(x) => out.extend(first(x)),
            EitherOrBoth::Right(y) => out.extend(first(y)),
        }
    }
}

/// The run of `items` (sorted by group) that belongs to group `g`.
fn of_group<T>(items: &[T], g: Group, group: impl Fn(&T) -> Group) -> &[T] {
    let start = items.partition_point(|x| group(x) < g);
    let len = items
        .get(start..)
        .map_or(0, |rest| rest.partition_point(|x| group(x) == g));
    items.get(start..start + len).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use sluice_common::{DIR_EGRESS, DIR_INGRESS};

    use super::*;
    use crate::policy::{
        mapstate::{L4, Rule, Tier, TierRule, plen_bit},
        tests::random::Rng,
    };

    fn l4(rng: &mut Rng) -> L4 {
        match rng.below(4) {
            0 => L4::Any,
            1 => L4::Proto(17),
            _ => {
                let first = [80, 1000, 8080, 0][rng.below(4)];
                L4::Ports {
                    proto: 6,
                    first,
                    last: first + [0, 1, 24, 1000][rng.below(4)],
                }
            }
        }
    }

    /// A random policy over few identities and ports, so that groups and
    /// keys overlap, sorted as the compiler materializes them.
    fn policy(rng: &mut Rng) -> EndpointPolicy {
        let dir = |rng: &mut Rng| [DIR_INGRESS, DIR_EGRESS][rng.below(2)];
        let mut rules: Vec<Rule> = (0..rng.below(12))
            .map(|_| Rule {
                dir: dir(rng),
                identity: 100 + rng.below(5) as u32,
                l4: l4(rng),
                rule_id: 1 + rng.below(3) as u32,
            })
            .collect();
        rules.sort_by_key(|r| (r.dir, r.identity, r.l4));
        let mut tier_rules: Vec<TierRule> = (0..rng.below(8))
            .map(|_| TierRule {
                dir: dir(rng),
                identity: 100 + rng.below(5) as u32,
                l4: l4(rng),
                tier: [Tier::Admin, Tier::Baseline][rng.below(2)],
                rank: rng.below(4) as u32,
                action: rng.below(3) as u32,
                rule_id: 0x8000_0000 | rng.below(4) as u32,
            })
            .collect();
        tier_rules.sort();
        EndpointPolicy {
            ingress_isolated: rng.below(2) == 0,
            egress_isolated: rng.below(2) == 0,
            rules,
            tier_rules,
            profile: rng.below(2) as u32,
            ..EndpointPolicy::default()
        }
    }

    #[test]
    fn a_patch_gives_what_compiling_whole_gives_and_the_delta_between() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut patched = 0;
        for _ in 0..3000 {
            let (a, b) = (policy(&mut rng), policy(&mut rng));
            // Half of the pairs differ in one group only, as most changes do.
            let b = if rng.below(2) == 0 {
                let mut near = a.clone();
                near.rules
                    .retain(|r| r.identity != 100 + rng.below(5) as u32);
                near
            } else {
                b
            };
            let before = a.compile(7).unwrap();
            let whole = b.compile(7).unwrap();
            let mut programmed = before.clone();
            let delta = b.patch(&a, 7, &mut programmed).unwrap().unwrap();
            patched += 1;
            assert_eq!(programmed, whole, "{a:?} -> {b:?}");
            // The delta is exactly the difference of the two entry sets.
            let mut after = before.entries.clone();
            for k in &delta.removed {
                assert!(!whole.entries.contains_key(k));
                assert!(after.remove(k).is_some());
            }
            for (k, v, existed) in &delta.set {
                assert_eq!(before.entries.contains_key(k), *existed);
                assert_ne!(before.entries.get(k), Some(v));
                after.insert(*k, *v);
            }
            assert_eq!(after, whole.entries);
            // And it is what a whole replacement writes and removes (in
            // key order there, group by group here).
            let sorted = |mut d: Delta| {
                d.set.sort_by_key(|e| e.0);
                d.removed.sort();
                d
            };
            assert_eq!(sorted(delta), sorted(Delta::between(&before, &whole)));
            // The masks from the rules are the bits of the keys.
            let mut plens = [b.profile_plens[0], b.profile_plens[1]];
            for k in whole.entries.keys() {
                plens[usize::from(k.dir)] |= plen_bit(k);
            }
            assert_eq!(whole.port_plens, plens);
        }
        assert_eq!(patched, 3000);
    }

    #[test]
    fn unsorted_rules_are_not_patched() {
        let rule = |identity| Rule {
            dir: DIR_INGRESS,
            identity,
            l4: L4::Any,
            rule_id: 1,
        };
        let unsorted = EndpointPolicy {
            rules: vec![rule(2), rule(1)],
            ..EndpointPolicy::default()
        };
        let mut programmed = unsorted.compile(1).unwrap();
        let kept = programmed.clone();
        let none = EndpointPolicy::default();
        assert_eq!(none.patch(&unsorted, 1, &mut programmed), Ok(None));
        assert_eq!(programmed, kept);
    }
}
