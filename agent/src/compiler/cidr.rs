//! ipBlocks of one endpoint and direction as longest-prefix-match entries.
//!
//! The prefixes are every `cidr` and every `except`. The set of a prefix P is
//! every (rule, L4) of a block whose `cidr` contains P and none of whose
//! `except`s contains P. For an address A whose longest matching prefix is P,
//! a block allows A iff it is in P's set: a block's `cidr` contains A, so it
//! is in the list and P (as long or longer) lies inside it; an `except` that
//! holds A is in the list too, so P lies inside that except. An empty set is
//! an `except` hole (group 0).
use ipnetwork::IpNetwork;

use super::parse::{Block, within};
use crate::policy::L4;

/// The blocks of one rule and the L4 matches they carry.
#[derive(Clone, Debug)]
pub struct RuleBlocks<'a> {
    pub rule_id: u32,
    pub blocks: &'a [Block],
    pub l4s: Vec<L4>,
}

/// The set of (rule, L4) that covers addresses whose longest match is that
/// prefix; sorted by prefix, each set sorted.
pub type Grouped = Vec<(IpNetwork, Vec<(u32, L4)>)>;

pub fn group_prefixes(rules: &[RuleBlocks<'_>]) -> Grouped {
    let mut prefixes: Vec<IpNetwork> = rules
        .iter()
        .filter(|r| !r.l4s.is_empty())
        .flat_map(|r| r.blocks.iter())
        .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
        .into_iter()
        .map(|p| {
            let mut set: Vec<(u32, L4)> = rules
                .iter()
                .filter(|r| {
                    r.blocks
                        .iter()
                        .any(|b| within(p, b.cidr) && !b.except.iter().any(|&e| within(p, e)))
                })
                .flat_map(|r| r.l4s.iter().map(|&l4| (r.rule_id, l4)))
                .collect();
            set.sort();
            set.dedup();
            (p, set)
        })
        .collect()
}
