//! Drops per ClusterNetworkPolicy rule: `sluice_cnp_rule_dropped_packets`
//! and `_bytes` with labels `tier`, `policy`, `rule`. The data path counts
//! per rule id (RULE_DROPS); the agent's rule names turn ids into labels.
//!
//! Cardinality is bounded: at most `MAX_RULE_SERIES` rules get a series of
//! their own (those with the most dropped packets); the rest, and ids whose
//! policy is gone, are summed into one series per tier with `policy` and
//! `rule` set to `other`. Drops per tier without the rule are
//! `sluice_dropped_packets{reason="admin-denied"|"baseline-denied"}`.
use std::{collections::BTreeMap, fmt};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{MetricType, counter::ConstCounter},
};

use super::family;
use crate::{datapath::counters::Count, events::RuleNames};

/// Series of their own at most; the rest go to `other`.
pub const MAX_RULE_SERIES: usize = 200;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct RuleLabels {
    tier: String,
    policy: String,
    rule: String,
}

/// The labelled counts, largest rules first, capped.
fn series(drops: &BTreeMap<u32, Count>, names: &RuleNames) -> BTreeMap<RuleLabels, Count> {
    let mut named: Vec<(RuleLabels, Count)> = Vec::new();
    let mut other: BTreeMap<RuleLabels, Count> = BTreeMap::new();
    let other_of = |tier: &str| RuleLabels {
        tier: tier.to_string(),
        policy: "other".into(),
        rule: "other".into(),
    };
    for (&id, &c) in drops {
        match names.get(id) {
            Some(n) => named.push((
                RuleLabels {
                    tier: n.tier.to_string(),
                    policy: n.name.clone(),
                    rule: n.rule.clone(),
                },
                c,
            )),
            None => add(other.entry(other_of("unknown")).or_default(), c),
        }
    }
    named.sort_by(|a, b| b.1.packets.cmp(&a.1.packets).then_with(|| a.0.cmp(&b.0)));
    let mut out = BTreeMap::new();
    for (i, (labels, c)) in named.into_iter().enumerate() {
        if i < MAX_RULE_SERIES {
            add(out.entry(labels).or_default(), c);
        } else {
            add(other.entry(other_of(&labels.tier)).or_default(), c);
        }
    }
    out.extend(other);
    out
}

fn add(into: &mut Count, c: Count) {
    into.packets += c.packets;
    into.bytes += c.bytes;
}

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    drops: &BTreeMap<u32, Count>,
    names: &RuleNames,
) -> fmt::Result {
    let by = series(drops, names);
    family(
        enc,
        "sluice_cnp_rule_dropped_packets",
        "Packets dropped by a ClusterNetworkPolicy rule (Admin or Baseline Deny, and revocations), by tier, policy and rule.",
        MetricType::Counter,
        by.iter()
            .map(|(l, v)| (l.clone(), ConstCounter::new(v.packets))),
    )?;
    family(
        enc,
        "sluice_cnp_rule_dropped_bytes",
        "Bytes dropped by a ClusterNetworkPolicy rule, by tier, policy and rule.",
        MetricType::Counter,
        by.iter()
            .map(|(l, v)| (l.clone(), ConstCounter::new(v.bytes))),
    )
}

#[cfg(test)]
mod tests {
    use sluice_common::{DIR_EGRESS, RULE_CNP_FLAG};

    use super::*;
    use crate::policy::{CnpRuleOrigin, Tier};

    fn origin(policy: &str, tier: Tier) -> CnpRuleOrigin {
        CnpRuleOrigin {
            policy: policy.into(),
            rule: "r".into(),
            tier,
            priority: 1,
            dir: DIR_EGRESS,
            index: 0,
            action: sluice_common::action::DENY,
        }
    }

    #[test]
    fn rules_get_series_up_to_the_cap_and_the_rest_sum_into_other() {
        let n = MAX_RULE_SERIES as u32 + 5;
        let names = RuleNames::from_origins(
            (0..n)
                .map(|i| (RULE_CNP_FLAG | i, origin(&format!("p{i:04}"), Tier::Admin)))
                .collect(),
        );
        let mut drops: BTreeMap<u32, Count> = (0..n)
            .map(|i| {
                let c = Count {
                    packets: u64::from(i) + 1,
                    bytes: 100,
                };
                (RULE_CNP_FLAG | i, c)
            })
            .collect();
        drops.insert(
            RULE_CNP_FLAG | 9999,
            Count {
                packets: 7,
                bytes: 1,
            },
        );
        let s = series(&drops, &names);
        assert_eq!(s.len(), MAX_RULE_SERIES + 2);
        let other = |tier: &str| RuleLabels {
            tier: tier.into(),
            policy: "other".into(),
            rule: "other".into(),
        };
        // The five smallest (1..=5 packets) are summed.
        assert_eq!(s[&other("Admin")].packets, 15);
        assert_eq!(s[&other("unknown")].packets, 7);
        assert!(s.keys().any(|l| l.policy == format!("p{:04}", n - 1)));
    }
}
