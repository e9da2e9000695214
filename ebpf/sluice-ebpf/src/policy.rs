//! Policy of a new flow: peer identity from the ipcache, then the policy map,
//! in the order the numbered comment in `allowed` states.
use aya_ebpf::maps::lpm_trie::Key;
use sluice_common::{
    CIDR_KEY_FIXED_BITS, DIR_INGRESS, EndpointInfo, IDENTITY_ANY, IDENTITY_WORLD, IpcacheKey,
    PLEN_ANY_PEER_BIT, PLEN_ANY_PROTO_BIT, PLEN_CIDR_PEER_BIT, POLICY_ADMIN,
    POLICY_ADMIN_ACTION_MASK, POLICY_ADMIN_ACTION_SHIFT, POLICY_ALLOW, POLICY_BASELINE,
    POLICY_BASELINE_DENY, PolicyKey, PolicyValue, action, port_mask, reason,
};

use crate::{
    conntrack::denied_by,
    keys::{cidr_key, policy_key},
    maps::{CIDRS, IPCACHE, POLICY},
    parse::Addr,
};

/// Identity of an address: longest ipcache prefix, else WORLD.
#[inline(always)]
pub fn identity_of(addr: &Addr) -> u32 {
    let key = Key::new(128, IpcacheKey { addr: addr.bytes() });
    match IPCACHE.get(&key) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// The CIDR group (ipBlock) of `addr` for this endpoint and direction; 0
/// when none matches or the longest match is an `except` hole.
#[inline(always)]
fn cidr_group(ep_id: u32, dir: u8, addr: &Addr) -> u32 {
    let key = Key::new(CIDR_KEY_FIXED_BITS + 128, cidr_key(ep_id, dir, addr));
    match CIDRS.get(&key) {
        Some(v) => v.group,
        None => 0,
    }
}

/// Port prefix lengths with entries, for a direction.
#[inline(always)]
fn plens_for(ep: &EndpointInfo, dir: u8) -> u32 {
    if dir == DIR_INGRESS {
        ep.port_plens[0]
    } else {
        ep.port_plens[1]
    }
}

/// Rule allowing (`identity`, `l4`, `port`): each port prefix length that
/// has entries, longest first, then any-protocol.
#[inline(always)]
fn lookup_identity(
    ep_id: u32,
    dir: u8,
    plens: u32,
    identity: u32,
    l4: u8,
    port: u16,
) -> Option<u32> {
    let mut key = policy_key(ep_id, identity, 0, l4, dir, 0);
    // Bounded: 17 prefix lengths, 16 down to 0.
    for i in 0..=16u8 {
        let plen = 16 - i;
        if plens & (1 << plen) != 0 {
            key.port = port & port_mask(plen);
            key.plen = plen;
            if let Some(rule) = allows(&key) {
                return Some(rule);
            }
        }
    }
    if plens & (1 << PLEN_ANY_PROTO_BIT) != 0 {
        key.port = 0;
        key.proto = 0;
        key.plen = 0;
        return allows(&key);
    }
    None
}

#[inline(always)]
fn allows(key: &PolicyKey) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    let v = unsafe { POLICY.get(key) }?;
    if v.flags & POLICY_ALLOW != 0 {
        Some(v.rule_id)
    } else {
        None
    }
}

/// The rule that allows a new flow with a peer of identity `peer_id` at
/// `peer` (its address), or None: POLICY_DENIED.
#[inline(always)]
pub fn allowed(
    ep: &EndpointInfo,
    dir: u8,
    peer: &Addr,
    peer_id: u32,
    l4: u8,
    port: u16,
) -> Option<u32> {
    let plens = plens_for(ep, dir);
    // 9a. The peer's own identity.
    if let Some(rule) = lookup_identity(ep.ep_id, dir, plens, peer_id, l4, port) {
        return Some(rule);
    }
    // 9b. Any peer, where such entries exist.
    if plens & (1 << PLEN_ANY_PEER_BIT) != 0
        && let Some(rule) = lookup_identity(ep.ep_id, dir, plens, IDENTITY_ANY, l4, port)
    {
        return Some(rule);
    }
    // 9c. The CIDR group of the peer's address (ipBlock), unless the
    //     longest prefix is an `except` hole (group 0), where group entries
    //     exist.
    if plens & (1 << PLEN_CIDR_PEER_BIT) == 0 {
        return None;
    }
    let group = cidr_group(ep.ep_id, dir, peer);
    if group != 0 {
        return lookup_identity(ep.ep_id, dir, plens, group, l4, port);
    }
    None
}

/// A tiered lookup: what it looks up, and the hits folded so far (any
/// NetworkPolicy allow, the lowest-rank Admin and Baseline rule; ranks are
/// below `u32::MAX`, which stands for "none"). One struct passed by
/// reference: BPF calls take at most five arguments.
struct Tiers {
    ep_id: u32,
    plens: u32,
    port: u16,
    dir: u8,
    l4: u8,
    np_rule: u32,
    np: u32,
    admin_rank: u32,
    admin_rule: u32,
    admin_action: u32,
    base_rank: u32,
    base_rule: u32,
    base_deny: u32,
}

#[inline(always)]
fn fold(t: &mut Tiers, v: &PolicyValue) {
    if v.flags & POLICY_ALLOW != 0 && t.np == 0 {
        t.np = 1;
        t.np_rule = v.rule_id;
    }
    if v.flags & POLICY_ADMIN != 0 && v.admin_rank < t.admin_rank {
        t.admin_rank = v.admin_rank;
        t.admin_rule = v.admin_rule;
        t.admin_action = (v.flags & POLICY_ADMIN_ACTION_MASK) >> POLICY_ADMIN_ACTION_SHIFT;
    }
    if v.flags & POLICY_BASELINE != 0 && v.baseline_rank < t.base_rank {
        t.base_rank = v.baseline_rank;
        t.base_rule = v.baseline_rule;
        t.base_deny = v.flags & POLICY_BASELINE_DENY;
    }
}

/// Folds every entry of `identity`: each port prefix length that has
/// entries, then any-protocol. Unlike `lookup_identity` it does not stop at
/// the first hit: a later key may hold a better rank.
#[inline(never)]
fn fold_identity(t: &mut Tiers, identity: u32) {
    let mut key = policy_key(t.ep_id, identity, 0, t.l4, t.dir, 0);
    let (plens, port) = (t.plens, t.port);
    for i in 0..=16u8 {
        let plen = 16 - i;
        if plens & (1 << plen) != 0 {
            key.port = port & port_mask(plen);
            key.plen = plen;
            // SAFETY: the value is copied out at once.
            if let Some(v) = unsafe { POLICY.get(&key) } {
                fold(t, v);
            }
        }
    }
    if plens & (1 << PLEN_ANY_PROTO_BIT) != 0 {
        key.port = 0;
        key.proto = 0;
        key.plen = 0;
        // SAFETY: as above.
        if let Some(v) = unsafe { POLICY.get(&key) } {
            fold(t, v);
        }
    }
}

/// The flow a tiered lookup judges.
pub struct Query {
    pub peer_id: u32,
    pub port: u16,
    pub l4: u8,
    /// The endpoint is isolated in this direction by a NetworkPolicy.
    pub isolated: bool,
}

/// 9t. The verdict of a new flow at an endpoint with ClusterNetworkPolicy
///     entries in `dir` (`EP_*_TIERED`): the same keys as `allowed` (the
///     peer's identity, any peer, the CIDR group), every hit folded; then
///     the tiers in order: the best Admin rule (Accept allows, Deny drops,
///     Pass goes on), NetworkPolicy where isolated (an allow, else the
///     default deny), the best Baseline rule (Accept, Deny), else allowed.
///     A rule id, or `denied_by(reason, rule)`.
#[inline(never)]
pub fn tiered(ep: &EndpointInfo, dir: u8, peer: &Addr, q: &Query) -> u64 {
    let plens = plens_for(ep, dir);
    let mut t = Tiers {
        ep_id: ep.ep_id,
        plens,
        port: q.port,
        dir,
        l4: q.l4,
        np_rule: 0,
        np: 0,
        admin_rank: u32::MAX,
        admin_rule: 0,
        admin_action: 0,
        base_rank: u32::MAX,
        base_rule: 0,
        base_deny: 0,
    };
    fold_identity(&mut t, q.peer_id);
    if plens & (1 << PLEN_ANY_PEER_BIT) != 0 {
        fold_identity(&mut t, IDENTITY_ANY);
    }
    if plens & (1 << PLEN_CIDR_PEER_BIT) != 0 {
        let group = cidr_group(ep.ep_id, dir, peer);
        if group != 0 {
            fold_identity(&mut t, group);
        }
    }
    if t.admin_rank != u32::MAX {
        if t.admin_action == action::ACCEPT {
            return u64::from(t.admin_rule);
        }
        // Deny, or an action this program does not know: fail closed.
        if t.admin_action != action::PASS {
            return denied_by(reason::ADMIN_DENIED, t.admin_rule);
        }
    }
    if q.isolated {
        if t.np != 0 {
            return u64::from(t.np_rule);
        }
        return denied_by(reason::POLICY_DENIED, 0);
    }
    if t.base_rank != u32::MAX {
        if t.base_deny != 0 {
            return denied_by(reason::BASELINE_DENIED, t.base_rule);
        }
        return u64::from(t.base_rule);
    }
    0
}
