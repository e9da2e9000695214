//! ipBlocks of one endpoint and direction as longest-prefix-match entries.
//!
//! The prefixes are every `cidr` and every `except` (and, for an egress
//! named port, a host prefix per pod address that resolves it: see
//! [`compute`]). The set of a prefix P is
//! every (rule, L4) of a block whose `cidr` contains P and none of whose
//! `except`s contains P. For an address A whose longest matching prefix is P,
//! a block allows A iff it is in P's set: a block's `cidr` contains A, so it
//! is in the list and P (as long or longer) lies inside it; an `except` that
//! holds A is in the list too, so P lies inside that except. An empty set is
//! an `except` hole (group 0).
//!
//! Each distinct set is a CIDR group: a peer identity (`IDENTITY_CIDR_FLAG`
//! set) shared by the local identities whose policies give the same set, kept
//! while one of them holds it.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnetwork::IpNetwork;
use rustc_hash::FxHashMap;
use sluice_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_CIDR_FLAG, RULE_CNP_FLAG};

use super::{
    cnp::CnpPeer,
    cnps::CnpStore,
    contributions::{CidrPart, LocalState, resolve, resolve_named},
    identities::{Allocator, Identities, NamedPorts},
    mapstate::{CidrEntry, L4, Rule, TierRule},
    parse::{Block, Peer, Ports, within},
    pods::Pods,
    repository::Repository,
};

/// The blocks of one rule and the L4 matches they carry.
#[derive(Clone, Debug)]
pub(super) struct RuleBlocks<'a> {
    pub rule_id: u32,
    pub blocks: &'a [Block],
    pub l4s: Vec<L4>,
}

/// The set of (rule, L4) that covers addresses whose longest match is that
/// prefix; sorted by prefix, each set sorted.
pub(super) type Grouped = Vec<(IpNetwork, Vec<(u32, L4)>)>;

pub(super) fn group_prefixes(rules: &[RuleBlocks<'_>]) -> Grouped {
    let mut prefixes: Vec<IpNetwork> = rules
        .iter()
        .filter(|r| !r.l4s.is_empty())
        .flat_map(|r| r.blocks.iter())
        .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
        .collect();
    // The data path keys IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), so an
    // IPv6 prefix of 96 bits or less around ::ffff:0:0 would match IPv4
    // addresses there (`::/0` allowed all of IPv4). A 0.0.0.0/0 prefix
    // (the mapped ::ffff:0:0/96) gives those addresses their own set,
    // empty unless a block holds 0.0.0.0/0.
    if let (Ok(mapped), Ok(all_v4)) = (
        ipnetwork::Ipv6Network::new(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96),
        ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
    ) && prefixes
        .iter()
        .any(|p| p.is_ipv6() && within(IpNetwork::V6(mapped), *p))
    {
        prefixes.push(IpNetwork::V4(all_v4));
    }
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

/// The CIDR groups in use, by their (rule, L4) set and by number.
pub(super) struct CidrGroups {
    by_set: HashMap<Vec<(u32, L4)>, (u32, u32)>,
    sets: FxHashMap<u32, Vec<(u32, L4)>>,
    numbers: Allocator,
    /// (local identity, direction, prefix) -> its group before a restart
    /// (`Compiler::restore`): a new group takes that number back when free.
    restored: HashMap<(u32, u8, IpNetwork), u32>,
}

impl CidrGroups {
    pub fn new() -> Self {
        Self {
            by_set: HashMap::new(),
            sets: FxHashMap::default(),
            numbers: Allocator::new(1, IDENTITY_CIDR_FLAG),
            restored: HashMap::new(),
        }
    }

    pub fn restore(&mut self, groups: Vec<(u32, u8, IpNetwork, u32)>) {
        self.restored = groups
            .into_iter()
            .filter(|&(.., g)| g & IDENTITY_CIDR_FLAG != 0)
            .map(|(l, dir, net, g)| ((l, dir, net), g & !IDENTITY_CIDR_FLAG))
            .collect();
        if let Some(&max) = self.restored.values().max() {
            self.numbers.reserve_up_to(max);
        }
    }

    pub fn forget_restored(&mut self) {
        self.restored = HashMap::new();
    }

    pub fn len(&self) -> usize {
        self.by_set.len()
    }

    /// Takes a reference on the group of `set`, numbering it if new (with
    /// the number `at` had before a restart, when free).
    pub fn intern(&mut self, set: &[(u32, L4)], at: (u32, u8, IpNetwork)) -> u32 {
        if let Some((g, refs)) = self.by_set.get_mut(set) {
            *refs += 1;
            return *g;
        }
        let n = match self.restored.get(&at) {
            Some(&n)
                if !self.sets.contains_key(&(IDENTITY_CIDR_FLAG | n))
                    && self.numbers.claim(n, 1) =>
            {
                n
            }
            _ => self.numbers.alloc(),
        };
        let g = IDENTITY_CIDR_FLAG | n;
        self.by_set.insert(set.to_vec(), (g, 1));
        self.sets.insert(g, set.to_vec());
        g
    }

    pub fn release(&mut self, g: u32) {
        let Some(set) = self.sets.get(&g) else {
            return;
        };
        if let Some(entry) = self.by_set.get_mut(set) {
            entry.1 -= 1;
            if entry.1 > 0 {
                return;
            }
            self.by_set.remove(set);
        }
        self.sets.remove(&g);
        self.numbers.release(g & !IDENTITY_CIDR_FLAG);
    }
}

/// The CIDR part of a local identity (with these named ports) from the
/// ipBlocks of the policies selecting it. The groups of the result are
/// referenced in `groups`; the caller releases those of the part it
/// replaces (after, so that a set that survives keeps its number).
///
/// An egress named port resolves on the pod that owns the destination
/// address: each pod address inside a block (outside its excepts) whose
/// owner has the port becomes a host prefix carrying the resolved port, and
/// the grouping gives that prefix the other rules that cover it as well. An
/// address no pod owns has no named ports, so a name matches nothing there.
///
/// ClusterNetworkPolicy `networks` (and `nodes`, as a host prefix per
/// address of each matching Node) are blocks of their rule too, so a
/// group's set names the rules of every tier that cover its prefix; the
/// group's entries carry the NetworkPolicy allow and the best Admin and
/// Baseline rule of the set, per L4.
pub(super) fn compute(
    (l, st): (u32, &LocalState),
    ports: &NamedPorts,
    (repo, cnps): (&Repository, &CnpStore),
    (pods, identities): (&Pods, &Identities),
    groups: &mut CidrGroups,
) -> CidrPart {
    let mut grouped = Vec::new();
    // (rule id, blocks, L4s) of ClusterNetworkPolicy prefixes, per direction.
    let mut cnp_blocks: Vec<(u8, u32, Vec<Block>, Vec<L4>)> = Vec::new();
    for &id in st.cnps() {
        let Some(c) = cnps.get(id) else {
            continue;
        };
        for r in &c.rules {
            let mut blocks = Vec::new();
            for p in &r.peers {
                match p {
                    CnpPeer::Networks(nets) => blocks.extend(nets.iter().map(|&n| Block {
                        cidr: n,
                        except: Vec::new(),
                    })),
                    CnpPeer::Nodes(sel) => {
                        for node in cnps.nodes.values().filter(|n| sel.matches(&n.labels)) {
                            blocks.extend(node.addresses.iter().map(|&a| Block {
                                cidr: IpNetwork::from(a),
                                except: Vec::new(),
                            }));
                        }
                    }
                    CnpPeer::Any | CnpPeer::Pods(_) => {}
                }
            }
            if !blocks.is_empty() {
                cnp_blocks.push((r.dir, r.id, blocks, r.ports.fixed.clone()));
            }
        }
    }
    for dir in [DIR_INGRESS, DIR_EGRESS] {
        let mut parts: Vec<(u32, &[Block], &Ports)> = Vec::new();
        for &pid in st.selected_by() {
            let Some(pol) = repo.get(pid) else {
                continue;
            };
            for r in pol.rules.iter().filter(|r| r.dir == dir) {
                for part in &r.parts {
                    if let Peer::Blocks(blocks) = &part.peer {
                        parts.push((r.id, blocks, &part.ports));
                    }
                }
            }
        }
        let mut hosts: Vec<(u32, Block, Vec<L4>)> = Vec::new();
        if dir == DIR_EGRESS {
            for &(rule_id, blocks, p) in parts.iter().filter(|(_, _, p)| !p.named.is_empty()) {
                for ip in pods.addresses() {
                    let inside = blocks
                        .iter()
                        .any(|b| b.cidr.contains(ip) && !b.except.iter().any(|e| e.contains(ip)));
                    if !inside {
                        continue;
                    }
                    let Some(owner) = pods.owner(ip).and_then(|(_, o)| identities.get(o.identity))
                    else {
                        continue;
                    };
                    let table = &owner.key.ports;
                    let mut l4s = Vec::new();
                    resolve_named(&p.named, table, &mut l4s);
                    if !l4s.is_empty() {
                        let host = Block {
                            cidr: IpNetwork::from(ip),
                            except: Vec::new(),
                        };
                        hosts.push((rule_id, host, l4s));
                    }
                }
            }
        }
        let mut rbs: Vec<RuleBlocks<'_>> = parts
            .iter()
            .map(|&(rule_id, blocks, p)| RuleBlocks {
                rule_id,
                blocks,
                // Ingress named ports resolve on the selected pod itself;
                // egress ones on the destinations, above.
                l4s: if dir == DIR_INGRESS {
                    resolve(p, ports)
                } else {
                    p.fixed.clone()
                },
            })
            .collect();
        rbs.extend(hosts.iter().map(|(rule_id, host, l4s)| RuleBlocks {
            rule_id: *rule_id,
            blocks: std::slice::from_ref(host),
            l4s: l4s.clone(),
        }));
        rbs.extend(cnp_blocks.iter().filter(|(d, ..)| *d == dir).map(
            |(_, rule_id, blocks, l4s)| RuleBlocks {
                rule_id: *rule_id,
                blocks,
                l4s: l4s.clone(),
            },
        ));
        grouped.push((dir, group_prefixes(&rbs)));
    }
    let mut out = CidrPart::default();
    for (dir, prefixes) in grouped {
        let mut done = BTreeSet::new();
        for (net, set) in prefixes {
            let group = if set.is_empty() {
                0
            } else {
                let g = groups.intern(&set, (l, dir, net));
                out.groups.push(g);
                if done.insert(g) {
                    let mut by_l4: BTreeMap<L4, u32> = BTreeMap::new();
                    for &(rid, l4) in &set {
                        if rid & RULE_CNP_FLAG != 0 {
                            if let Some((tier, rank, action)) = cnps.rule_rank(rid) {
                                out.tier_rules.push(TierRule {
                                    dir,
                                    identity: g,
                                    l4,
                                    tier,
                                    rank,
                                    action,
                                    rule_id: rid,
                                });
                            }
                            continue;
                        }
                        by_l4.entry(l4).or_insert(rid);
                    }
                    out.rules
                        .extend(by_l4.into_iter().map(|(l4, rule_id)| Rule {
                            dir,
                            identity: g,
                            l4,
                            rule_id,
                        }));
                }
                g
            };
            out.cidrs.push(CidrEntry { dir, net, group });
        }
    }
    out.rules.sort_by_key(|r| (r.dir, r.identity, r.l4));
    out.tier_rules
        .sort_by_key(|t| (t.dir, t.identity, t.l4, t.tier, t.rank));
    out.tier_rules
        .dedup_by_key(|t| (t.dir, t.identity, t.l4, t.tier));
    out
}
