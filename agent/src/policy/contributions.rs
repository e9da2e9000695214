//! Per-endpoint (per local identity) contributions: for each map rule
//! (direction, peer identity, L4), how many (rule part, peer) pairs of which
//! rules produce it. A rule key is written while some count is left, with the
//! lowest contributing rule id; the CIDR part is recomputed whole (see
//! [`super::cidr`]).
use std::{
    collections::{BTreeMap, BTreeSet, btree_map},
    sync::{Arc, OnceLock},
};

use sluice_common::{DIR_INGRESS, IDENTITY_ANY};

use super::{
    cnps::CnpId,
    identities::{Identities, NamedPorts},
    mapstate::{CidrEntry, EndpointPolicy, L4, Rule, TierRule},
    parse::{Peer, Ports},
    repository::{PolicyId, Repository},
    selectors::SelectorCache,
};

/// (direction, peer identity, L4): one policy map rule.
pub(super) type RuleKey = (u8, u32, L4);

/// The policy of a local identity, kept as contribution counts.
#[derive(Default)]
pub(super) struct LocalState {
    selected_by: BTreeSet<PolicyId>,
    /// Number of selecting policies with type Ingress / Egress.
    ingress: u32,
    egress: u32,
    /// Rule key -> how many (part, member) pairs of each rule produce it.
    contrib: BTreeMap<RuleKey, Counts>,
    cidrs: Vec<CidrEntry>,
    cidr_rules: Vec<Rule>,
    /// CIDR groups this identity holds a reference on.
    groups: Vec<u32>,
    /// ClusterNetworkPolicies whose subject selects it.
    cnps: BTreeSet<CnpId>,
    /// Their matches of pod peers (the tier part).
    tier_rules: Vec<TierRule>,
    /// Their matches of CIDR groups (from the CIDR part).
    cidr_tier_rules: Vec<TierRule>,
    /// Its ClusterNetworkPolicy profile (`profiles`): id, `EP_*_TIERED`
    /// bits and prefix-length masks of the profile's entries.
    profile: Option<(u32, (u32, [u32; 2]))>,
    cached: OnceLock<Arc<EndpointPolicy>>,
}

/// Contribution counts of one rule key by rule id; most keys have one
/// contributing rule, kept inline.
#[derive(Clone, Debug)]
pub(super) enum Counts {
    One {
        rule: u32,
        n: u32,
    },
    /// Sorted by rule id, every count > 0, at least two entries.
    Many(Vec<(u32, u32)>),
}

impl Counts {
    /// The rule id written for the key: the lowest contributing rule.
    fn rule_id(&self) -> u32 {
        match self {
            Self::One { rule, .. } => *rule,
            Self::Many(v) => v.first().map_or(0, |&(r, _)| r),
        }
    }

    fn add(&mut self, rid: u32) {
        match self {
            Self::One { rule, n } if *rule == rid => *n += 1,
            Self::One { rule, n } => {
                let mut v = vec![(*rule, *n), (rid, 1)];
                v.sort_unstable();
                *self = Self::Many(v);
            }
            Self::Many(v) => match v.binary_search_by_key(&rid, |&(r, _)| r) {
                Ok(i) => v[i].1 += 1,
                Err(i) => v.insert(i, (rid, 1)),
            },
        }
    }

    /// Removes one contribution of `rid`; true when none is left.
    fn remove(&mut self, rid: u32) -> bool {
        match self {
            Self::One { rule, n } => {
                debug_assert_eq!(*rule, rid, "removing a contribution that was never added");
                *n -= 1;
                *n == 0
            }
            Self::Many(v) => {
                if let Ok(i) = v.binary_search_by_key(&rid, |&(r, _)| r) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        v.remove(i);
                    }
                } else {
                    debug_assert!(false, "removing a contribution that was never added");
                }
                if let [(rule, n)] = v[..] {
                    *self = Self::One { rule, n };
                }
                false
            }
        }
    }
}

/// The CIDR part of a local identity: its prefixes, the rules of its groups,
/// and the groups it holds a reference on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct CidrPart {
    pub cidrs: Vec<CidrEntry>,
    pub rules: Vec<Rule>,
    pub tier_rules: Vec<TierRule>,
    pub groups: Vec<u32>,
}

impl LocalState {
    /// The rule id written for a rule key, if any.
    pub fn value(&self, k: RuleKey) -> Option<u32> {
        self.contrib.get(&k).map(Counts::rule_id)
    }

    /// Every written rule key with its rule id.
    pub fn values(&self) -> impl Iterator<Item = (RuleKey, u32)> + '_ {
        self.contrib.iter().map(|(&k, c)| (k, c.rule_id()))
    }

    /// Whether ingress / egress is isolated.
    pub fn isolation(&self) -> (bool, bool) {
        (self.ingress > 0, self.egress > 0)
    }

    pub fn selected_by(&self) -> &BTreeSet<PolicyId> {
        &self.selected_by
    }

    /// Policy `pid` (of these types) selects (`sign` 1) or no longer
    /// selects (-1) this identity. Its rules are counted separately.
    pub fn attach(&mut self, pid: PolicyId, ingress: bool, egress: bool, sign: i32) {
        let (i, e) = (u32::from(ingress), u32::from(egress));
        if sign > 0 {
            self.selected_by.insert(pid);
            self.ingress += i;
            self.egress += e;
        } else {
            self.selected_by.remove(&pid);
            self.ingress -= i;
            self.egress -= e;
        }
    }

    /// The ClusterNetworkPolicies selecting this identity.
    pub fn cnps(&self) -> &BTreeSet<CnpId> {
        &self.cnps
    }

    pub fn set_cnp(&mut self, id: CnpId, selects: bool) {
        if selects {
            self.cnps.insert(id);
        } else {
            self.cnps.remove(&id);
        }
    }

    /// Sets the profile (id, and the shape of its entries).
    pub fn set_profile(&mut self, profile: Option<(u32, (u32, [u32; 2]))>) {
        self.profile = profile;
    }

    /// Installs a recomputed tier part; true when it differs.
    pub fn replace_tiers(&mut self, new: Vec<TierRule>) -> bool {
        if self.tier_rules == new {
            return false;
        }
        self.tier_rules = new;
        true
    }

    /// Forgets every policy and contribution (the CIDR and tier parts stay
    /// until they are recomputed).
    pub fn clear(&mut self) {
        self.cnps.clear();
        self.selected_by.clear();
        self.contrib.clear();
        self.ingress = 0;
        self.egress = 0;
    }

    /// Adds (`sign` 1) or removes (-1) one contribution of rule `rid` to
    /// `key`; returns the rule id the key had before (`None`: not written).
    pub fn bump(&mut self, key: RuleKey, rid: u32, sign: i32) -> Option<u32> {
        match self.contrib.entry(key) {
            btree_map::Entry::Vacant(v) => {
                debug_assert!(sign > 0, "removing a contribution that was never added");
                if sign > 0 {
                    v.insert(Counts::One { rule: rid, n: 1 });
                }
                None
            }
            btree_map::Entry::Occupied(mut o) => {
                let before = o.get().rule_id();
                if sign > 0 {
                    o.get_mut().add(rid);
                } else if o.get_mut().remove(rid) {
                    o.remove();
                }
                Some(before)
            }
        }
    }

    /// The CIDR prefixes and group rules, for comparison with an old part.
    pub fn cidrs_equal(&self, old: &CidrPart) -> bool {
        self.cidrs == old.cidrs
            && self.cidr_rules == old.rules
            && self.cidr_tier_rules == old.tier_rules
    }

    /// Installs a recomputed CIDR part; returns the one it replaces.
    pub fn replace_cidrs(&mut self, new: CidrPart) -> CidrPart {
        CidrPart {
            cidrs: std::mem::replace(&mut self.cidrs, new.cidrs),
            rules: std::mem::replace(&mut self.cidr_rules, new.rules),
            tier_rules: std::mem::replace(&mut self.cidr_tier_rules, new.tier_rules),
            groups: std::mem::replace(&mut self.groups, new.groups),
        }
    }

    /// The groups this identity holds, handed back when it stops being local.
    pub fn into_groups(self) -> Vec<u32> {
        self.groups
    }

    /// The map contents, built once per change and shared by the endpoints
    /// of the identity.
    pub fn policy(&self) -> Arc<EndpointPolicy> {
        self.cached
            .get_or_init(|| Arc::new(self.materialize()))
            .clone()
    }

    /// Drops the built map contents after a change.
    pub fn invalidate(&mut self) {
        self.cached = OnceLock::new();
    }

    fn materialize(&self) -> EndpointPolicy {
        let mut rules: Vec<Rule> = Vec::with_capacity(self.contrib.len() + self.cidr_rules.len());
        for (&(dir, identity, l4), counts) in &self.contrib {
            rules.push(Rule {
                dir,
                identity,
                l4,
                rule_id: counts.rule_id(),
            });
        }
        rules.extend(self.cidr_rules.iter().cloned());
        rules.sort_by_key(|r| (r.dir, r.identity, r.l4));
        let mut tier_rules: Vec<TierRule> = self
            .tier_rules
            .iter()
            .chain(&self.cidr_tier_rules)
            .cloned()
            .collect();
        tier_rules.sort();
        EndpointPolicy {
            ingress_isolated: self.ingress > 0,
            egress_isolated: self.egress > 0,
            rules,
            cidrs: self.cidrs.clone(),
            tier_rules,
            profile: self.profile.map_or(0, |(p, _)| p),
            profile_tiered: self.profile.map_or(0, |(_, (t, _))| t),
            profile_plens: self.profile.map_or([0; 2], |(_, (_, p))| p),
        }
    }
}

/// The L4 matches of `ports` on a pod with these named ports: the fixed
/// ones, plus each named port that the pod has with that protocol (a name
/// that does not resolve gives nothing).
pub(super) fn resolve(ports: &Ports, table: &NamedPorts) -> Vec<L4> {
    let mut out = ports.fixed.clone();
    if !ports.named.is_empty() {
        resolve_named(&ports.named, table, &mut out);
        out.sort();
        out.dedup();
    }
    out
}

/// Pushes the port of each (name, protocol) that the table has.
pub(super) fn resolve_named(named: &[(String, u8)], table: &NamedPorts, out: &mut Vec<L4>) {
    for (name, proto) in named {
        for (n, p, port) in table {
            // Protocol 0: a ClusterNetworkPolicy `destinationNamedPort`,
            // which matches the name whatever the protocol.
            if n == name && (p == proto || *proto == 0) {
                out.push(L4::Ports {
                    proto: *p,
                    first: *port,
                    last: *port,
                });
            }
        }
    }
}

/// One rule part of a policy, as the facade names it: (policy, rule
/// position, part position).
pub(super) type PartRef = (PolicyId, usize, usize);

/// What rule part `part` gives local identity `l`: (rule key, rule id) for
/// all its peers, or only for peer identity `only`. CIDR peers give nothing
/// here: they are recomputed per identity at commit.
pub(super) fn part_contribs(
    repo: &Repository,
    identities: &Identities,
    selectors: &SelectorCache,
    (pid, ri, pi): PartRef,
    l: u32,
    only: Option<u32>,
    out: &mut Vec<(RuleKey, u32)>,
) {
    let Some(rule) = repo.get(pid).and_then(|p| p.rules.get(ri)) else {
        return;
    };
    let Some(part) = rule.parts.get(pi) else {
        return;
    };
    let Some(own) = identities.get(l) else {
        return;
    };
    let (dir, rid) = (rule.dir, rule.id);
    match &part.peer {
        Peer::Any => {
            for l4 in resolve(&part.ports, &own.key.ports) {
                out.push(((dir, IDENTITY_ANY, l4), rid));
            }
        }
        Peer::Pods(s) => {
            // Ingress named ports resolve on the selected pod, egress
            // ones on each destination.
            let shared = (dir == DIR_INGRESS || part.ports.named.is_empty())
                .then(|| resolve(&part.ports, &own.key.ports));
            let mut each = |x: u32| {
                let l4s = match &shared {
                    Some(l4s) => l4s.clone(),
                    None => match identities.get(x) {
                        Some(peer) => resolve(&part.ports, &peer.key.ports),
                        None => Vec::new(),
                    },
                };
                for l4 in l4s {
                    out.push(((dir, x, l4), rid));
                }
            };
            match only {
                Some(x) => each(x),
                None => {
                    for &x in selectors.members(*s).into_iter().flatten() {
                        each(x);
                    }
                }
            }
        }
        Peer::Blocks(_) => {}
    }
}
