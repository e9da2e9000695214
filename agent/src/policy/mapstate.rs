//! The map-state step: what the data path should hold for one endpoint, as
//! pure data ([`EndpointPolicy`]), and its map entries ([`Compiled`]): the
//! interface through which policy reaches the maps, and the user-space model
//! of the data path's lookup. No I/O here.
//!
//! Per direction an endpoint is either not isolated (everything passes, the
//! rules are ignored by the data path) or isolated (default deny, and the
//! union of its rules is the allowlist). A rule names a peer identity
//! (`IDENTITY_ANY` for any peer, a CIDR-group identity for ipBlock) and an
//! L4 match.
pub use sluice_common::port_mask;
use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_EGRESS_TIERED, EP_INGRESS_ISOLATED,
    EP_INGRESS_TIERED, PLEN_ANY_PROTO_BIT, POLICY_ADMIN, POLICY_ADMIN_ACTION_MASK,
    POLICY_ADMIN_ACTION_SHIFT, POLICY_ALLOW, POLICY_BASELINE, POLICY_BASELINE_DENY, PolicyKey,
    PolicyValue, action,
};

/// The L4 part of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L4 {
    /// Every protocol and port (a NetworkPolicy rule with no `ports`).
    Any,
    /// Every port of one protocol (a port entry without `port`).
    Proto(u8),
    /// `first..=last` of one protocol (`port`, optionally `endPort`).
    Ports { proto: u8, first: u16, last: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub dir: u8,
    pub identity: u32,
    pub l4: L4,
    /// Carried into the map value so drops and flows can name their rule.
    pub rule_id: u32,
}

/// The two ClusterNetworkPolicy tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "Admin",
            Self::Baseline => "Baseline",
        }
    }
}

/// A ClusterNetworkPolicy rule's match for one (direction, peer, L4): the
/// tier, the rule's global rank in its tier (lower decides first) and its
/// action (`sluice_common::action`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TierRule {
    pub dir: u8,
    pub identity: u32,
    pub l4: L4,
    pub tier: Tier,
    pub rank: u32,
    pub action: u32,
    /// `RULE_CNP_FLAG` set.
    pub rule_id: u32,
}

/// One prefix of an endpoint's CIDR map: addresses whose longest match is
/// `net` belong to `group` (0 = an `except` hole, no group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidrEntry {
    pub dir: u8,
    pub net: IpNetwork,
    pub group: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointPolicy {
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub rules: Vec<Rule>,
    pub cidrs: Vec<CidrEntry>,
    /// ClusterNetworkPolicy matches; a direction with any is "tiered".
    pub tier_rules: Vec<TierRule>,
    /// The ClusterNetworkPolicy profile whose shared entries also apply
    /// (0: none; `TIER_PROFILES`), with the `EP_*_TIERED` bits and the
    /// prefix-length masks of those entries.
    pub profile: u32,
    pub profile_tiered: u32,
    pub profile_plens: [u32; 2],
}

/// The map contents for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// `EP_*_ISOLATED` and `EP_*_TIERED` bits.
    pub isolation: u32,
    /// `EndpointInfo::port_plens`, by direction.
    pub port_plens: [u32; 2],
    pub entries: BTreeMap<PolicyKey, PolicyValue>,
    /// (dir, prefix) -> group.
    pub cidrs: BTreeMap<(u8, IpNetwork), u32>,
    /// `TIER_PROFILES`: the profile whose entries apply too (0: none).
    pub profile: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("direction {0} is neither ingress nor egress")]
    BadDirection(u8),
    #[error("port range {first}-{last} is empty")]
    EmptyRange { first: u16, last: u16 },
    #[error("protocol 0 cannot carry ports")]
    PortsWithoutProtocol,
}

impl EndpointPolicy {
    pub fn compile(&self, ep_id: u32) -> Result<Compiled, PolicyError> {
        let mut out = self.header()?;
        out.entries = fold_keys(ep_id, &self.rules, &self.tier_rules)?
            .into_iter()
            .collect();
        Ok(out)
    }

    /// Everything of the compiled form but the POLICY entries: the
    /// isolation and tiered bits, the prefix-length masks (the bits of
    /// every rule's keys, `plen_bits_of`), the profile, the CIDR entries.
    pub fn header(&self) -> Result<Compiled, PolicyError> {
        let mut out = Compiled {
            isolation: (if self.ingress_isolated {
                EP_INGRESS_ISOLATED
            } else {
                0
            }) | (if self.egress_isolated {
                EP_EGRESS_ISOLATED
            } else {
                0
            }),
            profile: self.profile,
            port_plens: self.profile_plens,
            ..Compiled::default()
        };
        out.isolation |= self.profile_tiered & (EP_INGRESS_TIERED | EP_EGRESS_TIERED);
        for r in &self.rules {
            check_dir(r.dir)?;
            out.port_plens[usize::from(r.dir)] |= plen_bits_of(r.identity, r.l4);
        }
        for t in &self.tier_rules {
            check_dir(t.dir)?;
            out.isolation |= if t.dir == DIR_INGRESS {
                EP_INGRESS_TIERED
            } else {
                EP_EGRESS_TIERED
            };
            out.port_plens[usize::from(t.dir)] |= plen_bits_of(t.identity, t.l4);
        }
        for c in &self.cidrs {
            check_dir(c.dir)?;
            out.cidrs.insert((c.dir, canonical(c.net)), c.group);
        }
        Ok(out)
    }
}

/// The POLICY entries of these rules and tier rules, sorted by key. Every
/// key with what sets it, rules first, then sorted (stably, so each key
/// sees its rules and then its tier rules in their order) and folded: a
/// map is built from them in one pass instead of a tree insertion per key.
pub(super) fn fold_keys(
    ep_id: u32,
    rules: &[Rule],
    tier_rules: &[TierRule],
) -> Result<Vec<(PolicyKey, PolicyValue)>, PolicyError> {
    let mut keyed: Vec<(PolicyKey, Option<&TierRule>, u32)> = Vec::new();
    for rule in rules {
        check_dir(rule.dir)?;
        for key in policy_keys(ep_id, rule.dir, rule.identity, rule.l4)? {
            keyed.push((key, None, rule.rule_id));
        }
    }
    for t in tier_rules {
        check_dir(t.dir)?;
        for key in policy_keys(ep_id, t.dir, t.identity, t.l4)? {
            keyed.push((key, Some(t), t.rule_id));
        }
    }
    keyed.sort_by_key(|e| e.0);
    let mut folded: Vec<(PolicyKey, PolicyValue)> = Vec::with_capacity(keyed.len());
    for (key, tier, rule_id) in keyed {
        if folded.last().is_none_or(|(k, _)| *k != key) {
            folded.push((key, PolicyValue::default()));
        }
        let Some((_, v)) = folded.last_mut() else {
            continue;
        };
        match tier {
            None => {
                v.flags |= POLICY_ALLOW;
                v.rule_id = rule_id;
            }
            Some(t) => merge_tier(v, t),
        }
    }
    Ok(folded)
}

/// Keeps the best (lowest-rank) rule of `t`'s tier in `v`.
fn merge_tier(v: &mut PolicyValue, t: &TierRule) {
    match t.tier {
        Tier::Admin => {
            if v.flags & POLICY_ADMIN == 0 || t.rank < v.admin_rank {
                v.flags = (v.flags & !POLICY_ADMIN_ACTION_MASK)
                    | POLICY_ADMIN
                    | ((t.action << POLICY_ADMIN_ACTION_SHIFT) & POLICY_ADMIN_ACTION_MASK);
                v.admin_rank = t.rank;
                v.admin_rule = t.rule_id;
            }
        }
        Tier::Baseline => {
            if v.flags & POLICY_BASELINE == 0 || t.rank < v.baseline_rank {
                // Baseline knows Accept and Deny; anything else (a Pass
                // the API refuses in this tier) denies: fail closed.
                let deny = if t.action == action::ACCEPT {
                    0
                } else {
                    POLICY_BASELINE_DENY
                };
                v.flags = (v.flags & !POLICY_BASELINE_DENY) | POLICY_BASELINE | deny;
                v.baseline_rank = t.rank;
                v.baseline_rule = t.rule_id;
            }
        }
    }
}

fn check_dir(dir: u8) -> Result<(), PolicyError> {
    if dir == DIR_INGRESS || dir == DIR_EGRESS {
        Ok(())
    } else {
        Err(PolicyError::BadDirection(dir))
    }
}

/// The network of `net` with host bits zeroed.
pub fn canonical(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

/// Which bit of `port_plens` a key needs.
pub fn plen_bit(key: &PolicyKey) -> u32 {
    sluice_common::plen_bits(key.identity, key.proto, key.plen)
}

/// The policy keys that allow `l4` from/to `identity`.
pub fn policy_keys(
    ep_id: u32,
    dir: u8,
    identity: u32,
    l4: L4,
) -> Result<Vec<PolicyKey>, PolicyError> {
    let key = |proto, port, plen| PolicyKey {
        ep_id,
        identity,
        port,
        proto,
        dir,
        plen,
        _pad: [0; 3],
    };
    Ok(match l4 {
        L4::Any => vec![key(0, 0, 0)],
        L4::Proto(0) => vec![key(0, 0, 0)],
        L4::Proto(p) => vec![key(p, 0, 0)],
        L4::Ports { proto: 0, .. } => return Err(PolicyError::PortsWithoutProtocol),
        L4::Ports { proto, first, last } => {
            if first > last {
                return Err(PolicyError::EmptyRange { first, last });
            }
            port_blocks(first, last)
                .into_iter()
                .map(|(port, plen)| key(proto, port, plen))
                .collect()
        }
    })
}

/// The fewest aligned blocks `(base, prefix length)` that cover
/// `first..=last` exactly: a block of prefix length `p` covers the
/// `2^(16-p)` ports that share the top `p` bits of `base`.
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    each_port_block(first, last, |base, plen| out.push((base, plen)));
    out
}

/// The `port_plens` bits that the keys of (`identity`, `l4`) need: the OR
/// of [`plen_bit`] over [`policy_keys`], without building the keys (none
/// for an L4 that does not compile).
pub fn plen_bits_of(identity: u32, l4: L4) -> u32 {
    use sluice_common::plen_bits;
    match l4 {
        L4::Any | L4::Proto(0) => plen_bits(identity, 0, 0),
        L4::Proto(p) => plen_bits(identity, p, 0),
        L4::Ports { proto: 0, .. } => 0,
        L4::Ports { first, last, .. } if first > last => 0,
        L4::Ports { proto, first, last } => {
            let mut bits = 0;
            each_port_block(first, last, |_, plen| {
                bits |= plen_bits(identity, proto, plen);
            });
            bits
        }
    }
}

/// Calls `f(base, prefix length)` for each block of [`port_blocks`].
fn each_port_block(first: u16, last: u16, mut f: impl FnMut(u16, u8)) {
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // Largest block aligned at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let plen = 16 - size.trailing_zeros();
        f(lo as u16, plen as u8);
        lo += size;
    }
}

/// Would the entries allow (`identity`, `proto`, `port`) in `dir`? The
/// data path's per-identity lookup, in user space: tries each prefix length
/// present in `port_plens` then any-protocol, as the program does.
pub fn lookup(c: &Compiled, ep_id: u32, dir: u8, identity: u32, proto: u8, port: u16) -> bool {
    let plens = c.port_plens[usize::from(dir) & 1];
    let hit = |proto, port, plen| {
        c.entries
            .get(&PolicyKey {
                ep_id,
                identity,
                port,
                proto,
                dir,
                plen,
                _pad: [0; 3],
            })
            .is_some_and(|v| v.flags & POLICY_ALLOW != 0)
    };
    (0..=16u8)
        .rev()
        .filter(|p| plens & (1 << p) != 0)
        .any(|p| hit(proto, port & port_mask(p), p))
        || (plens & (1 << PLEN_ANY_PROTO_BIT) != 0 && hit(0, 0, 0))
}

/// What the hits of one flow's lookups say, folded as the data path folds
/// them: any NetworkPolicy allow, the lowest-rank Admin and Baseline rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fold {
    /// NetworkPolicy rule id that allows (first found).
    pub np_rule: Option<u32>,
    /// (rank, action, rule id) of the best Admin rule.
    pub admin: Option<(u32, u32, u32)>,
    /// (rank, deny, rule id) of the best Baseline rule.
    pub baseline: Option<(u32, bool, u32)>,
}

impl Fold {
    pub fn add(&mut self, v: &PolicyValue) {
        if v.flags & POLICY_ALLOW != 0 && self.np_rule.is_none() {
            self.np_rule = Some(v.rule_id);
        }
        if v.flags & POLICY_ADMIN != 0 && self.admin.is_none_or(|(r, _, _)| v.admin_rank < r) {
            let act = (v.flags & POLICY_ADMIN_ACTION_MASK) >> POLICY_ADMIN_ACTION_SHIFT;
            self.admin = Some((v.admin_rank, act, v.admin_rule));
        }
        if v.flags & POLICY_BASELINE != 0
            && self.baseline.is_none_or(|(r, _, _)| v.baseline_rank < r)
        {
            let deny = v.flags & POLICY_BASELINE_DENY != 0;
            self.baseline = Some((v.baseline_rank, deny, v.baseline_rule));
        }
    }
}

/// Folds every entry (`identity`, `proto`, `port`) hits in `dir`: each
/// prefix length present in `port_plens`, then any-protocol.
pub fn fold(
    c: &Compiled,
    ep_id: u32,
    dir: u8,
    identity: u32,
    proto: u8,
    port: u16,
    into: &mut Fold,
) {
    let plens = c.port_plens[usize::from(dir) & 1];
    let get = |proto, port, plen| {
        c.entries.get(&PolicyKey {
            ep_id,
            identity,
            port,
            proto,
            dir,
            plen,
            _pad: [0; 3],
        })
    };
    for p in (0..=16u8).rev().filter(|p| plens & (1 << p) != 0) {
        if let Some(v) = get(proto, port & port_mask(p), p) {
            into.add(v);
        }
    }
    if plens & (1 << PLEN_ANY_PROTO_BIT) != 0
        && let Some(v) = get(0, 0, 0)
    {
        into.add(v);
    }
}

/// How many map entries an endpoint's policy takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCount {
    /// Policy map keys (a port range takes one key per aligned block).
    pub policy: usize,
    /// CIDR map prefixes.
    pub cidr: usize,
}

pub fn entry_count(p: &EndpointPolicy) -> EntryCount {
    let mut keys = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        // A rule that does not compile takes no entry (`compile` refuses it).
        for k in policy_keys(0, r.dir, r.identity, r.l4).unwrap_or_default() {
            keys.push((k.dir, k.identity, k.proto, k.port, k.plen));
        }
    }
    for r in &p.tier_rules {
        for k in policy_keys(0, r.dir, r.identity, r.l4).unwrap_or_default() {
            keys.push((k.dir, k.identity, k.proto, k.port, k.plen));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    EntryCount {
        policy: keys.len(),
        cidr: p.cidrs.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::proto;

    fn covered(blocks: &[(u16, u8)]) -> Vec<u32> {
        let mut v: Vec<u32> = blocks
            .iter()
            .flat_map(|&(base, plen)| {
                let size = 1u32 << (16 - u32::from(plen));
                (u32::from(base)..u32::from(base) + size).collect::<Vec<_>>()
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn port_blocks_cover_a_range_exactly_and_nothing_else() {
        for (first, last) in [
            (80, 80),
            (1000, 2000),
            (0, 65535),
            (1, 65535),
            (32768, 32768),
            (5, 17),
            (65535, 65535),
        ] {
            let blocks = port_blocks(first, last);
            let want: Vec<u32> = (u32::from(first)..=u32::from(last)).collect();
            assert_eq!(covered(&blocks), want, "{first}-{last}");
            for (base, plen) in blocks {
                assert_eq!(base & !port_mask(plen), 0, "block {base}/{plen} is aligned");
            }
        }
    }

    /// The data path skips the any-peer and CIDR-group lookups of a
    /// direction whose mask lacks their bit: every such entry must set it.
    #[test]
    fn masks_announce_any_peer_and_cidr_group_entries_per_direction() {
        use sluice_common::{
            DIR_EGRESS, IDENTITY_ANY, IDENTITY_CIDR_FLAG, PLEN_ANY_PEER_BIT, PLEN_CIDR_PEER_BIT,
        };
        let rule = |dir, identity| Rule {
            dir,
            identity,
            l4: L4::Ports {
                proto: proto::TCP,
                first: 80,
                last: 80,
            },
            rule_id: 1,
        };
        let p = EndpointPolicy {
            ingress_isolated: true,
            egress_isolated: true,
            rules: vec![
                rule(DIR_INGRESS, IDENTITY_ANY),
                rule(DIR_EGRESS, IDENTITY_CIDR_FLAG | 3),
                rule(DIR_EGRESS, 300),
            ],
            ..EndpointPolicy::default()
        };
        let c = p.compile(7).unwrap();
        let (any, cidr) = (1 << PLEN_ANY_PEER_BIT, 1 << PLEN_CIDR_PEER_BIT);
        let [ingress, egress] = c.port_plens;
        assert_eq!((ingress & any, ingress & cidr), (any, 0));
        assert_eq!((egress & any, egress & cidr), (0, cidr));
        assert_ne!(egress & (1 << 16), 0, "the exact port's length too");
    }

    #[test]
    fn a_single_port_is_one_exact_block_and_the_full_range_is_any_port() {
        assert_eq!(port_blocks(443, 443), vec![(443, 16)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert!(port_blocks(1000, 2000).len() <= 2 * 16);
    }

    #[test]
    fn lookup_allows_exactly_what_the_rules_name() {
        let p = EndpointPolicy {
            ingress_isolated: true,
            egress_isolated: false,
            rules: vec![
                Rule {
                    dir: DIR_INGRESS,
                    identity: 300,
                    l4: L4::Ports {
                        proto: proto::TCP,
                        first: 80,
                        last: 80,
                    },
                    rule_id: 1,
                },
                Rule {
                    dir: DIR_INGRESS,
                    identity: 301,
                    l4: L4::Ports {
                        proto: proto::UDP,
                        first: 1000,
                        last: 1999,
                    },
                    rule_id: 2,
                },
                Rule {
                    dir: DIR_INGRESS,
                    identity: 302,
                    l4: L4::Any,
                    rule_id: 3,
                },
                Rule {
                    dir: DIR_INGRESS,
                    identity: 303,
                    l4: L4::Proto(proto::SCTP),
                    rule_id: 4,
                },
            ],
            ..EndpointPolicy::default()
        };
        let c = p.compile(7).unwrap_or_default();
        assert_eq!(c.isolation, EP_INGRESS_ISOLATED);
        let l = |id, pr, port| lookup(&c, 7, DIR_INGRESS, id, pr, port);
        assert!(l(300, proto::TCP, 80));
        assert!(!l(300, proto::TCP, 81));
        assert!(!l(300, proto::UDP, 80));
        assert!(l(301, proto::UDP, 1000) && l(301, proto::UDP, 1999) && l(301, proto::UDP, 1500));
        assert!(!l(301, proto::UDP, 999) && !l(301, proto::UDP, 2000));
        assert!(l(302, proto::ICMP, 0) && l(302, proto::TCP, 9));
        assert!(l(303, proto::SCTP, 1) && !l(303, proto::TCP, 1));
        assert!(!l(304, proto::TCP, 80));
        assert!(!lookup(&c, 7, DIR_EGRESS, 300, proto::TCP, 80));
        assert!(!lookup(&c, 8, DIR_INGRESS, 300, proto::TCP, 80));
    }

    #[test]
    fn bad_rules_are_errors_not_entries() {
        let bad = |l4| {
            EndpointPolicy {
                rules: vec![Rule {
                    dir: DIR_INGRESS,
                    identity: 1,
                    l4,
                    rule_id: 0,
                }],
                ..Default::default()
            }
            .compile(1)
        };
        assert_eq!(
            bad(L4::Ports {
                proto: 6,
                first: 9,
                last: 8
            }),
            Err(PolicyError::EmptyRange { first: 9, last: 8 })
        );
        assert_eq!(
            bad(L4::Ports {
                proto: 0,
                first: 1,
                last: 1
            }),
            Err(PolicyError::PortsWithoutProtocol)
        );
        let wrong_dir = EndpointPolicy {
            rules: vec![Rule {
                dir: 5,
                identity: 1,
                l4: L4::Any,
                rule_id: 0,
            }],
            ..Default::default()
        };
        assert_eq!(wrong_dir.compile(1), Err(PolicyError::BadDirection(5)));
    }
}
