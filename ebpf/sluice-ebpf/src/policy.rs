//! Policy of a new flow: peer identity from the ipcache, then the policy map,
//! in the order the numbered comment in `allowed` states.
use aya_ebpf::maps::lpm_trie::Key;
use sluice_common::{
    CIDR_KEY_FIXED_BITS, DIR_INGRESS, EndpointInfo, IDENTITY_ANY, IDENTITY_WORLD, IpcacheKey,
    PLEN_ANY_PEER_BIT, PLEN_ANY_PROTO_BIT, PLEN_CIDR_PEER_BIT, POLICY_ADMIN,
    POLICY_ADMIN_ACTION_MASK, POLICY_ADMIN_ACTION_SHIFT, POLICY_ALLOW, POLICY_BASELINE,
    POLICY_BASELINE_DENY, PROFILE_KEY_FLAG, PolicyKey, PolicyValue, action, port_mask, reason,
};

use crate::{
    conntrack::denied_by,
    keys::{cidr_key, policy_key},
    maps::{CIDRS, IPCACHE, PEER_CLASSES, POLICY, TIER_PROFILES, TIER_SCRATCH},
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
/// NetworkPolicy allow, the lowest-rank Admin and Baseline rule, each with
/// a "found" flag). It lives in `TIER_SCRATCH` (see there why).
#[repr(C)]
pub struct Tiers {
    /// The POLICY key being looked up (here too: no stack for it).
    key: PolicyKey,
    ep_id: u32,
    /// The peer's CIDR group (0: none) and whether the endpoint is
    /// isolated by a NetworkPolicy: kept here, not in registers spilled
    /// around the calls (the stack of the call chain is near 512 bytes).
    group: u32,
    /// The peer's identity (for its class, after the per-endpoint folds).
    peer: u32,
    isolated: u32,
    plens: u32,
    port: u16,
    dir: u8,
    l4: u8,
    np: u32,
    np_rule: u32,
    admin: u32,
    admin_rank: u32,
    admin_rule: u32,
    admin_action: u32,
    base: u32,
    base_rank: u32,
    base_rule: u32,
    base_deny: u32,
}

/// One hit folded in.
#[inline(always)]
fn fold(t: &mut Tiers, v: &PolicyValue) {
    if v.flags & POLICY_ALLOW != 0 && t.np == 0 {
        t.np = 1;
        t.np_rule = v.rule_id;
    }
    if v.flags & POLICY_ADMIN != 0 && (t.admin == 0 || v.admin_rank < t.admin_rank) {
        t.admin = 1;
        t.admin_rank = v.admin_rank;
        t.admin_rule = v.admin_rule;
        t.admin_action = (v.flags & POLICY_ADMIN_ACTION_MASK) >> POLICY_ADMIN_ACTION_SHIFT;
    }
    if v.flags & POLICY_BASELINE != 0 && (t.base == 0 || v.baseline_rank < t.base_rank) {
        t.base = 1;
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
    t.key = policy_key(t.ep_id, identity, 0, t.l4, t.dir, 0);
    let plens = t.plens;
    for i in 0..=16u8 {
        let plen = 16 - i;
        if plens & (1 << plen) != 0 {
            // Read each time, not kept in a register: one spill less (the
            // call chain's stack is at the verifier's 512 bytes).
            // SAFETY: a field of a live reference.
            let port = unsafe { core::ptr::read_volatile(&t.port) };
            t.key.port = port & port_mask(plen);
            t.key.plen = plen;
            // SAFETY: the value is copied out at once.
            if let Some(v) = unsafe { POLICY.get(&t.key) } {
                fold(t, v);
            }
        }
    }
    if plens & (1 << PLEN_ANY_PROTO_BIT) != 0 {
        t.key.port = 0;
        t.key.proto = 0;
        t.key.plen = 0;
        // SAFETY: as above.
        if let Some(v) = unsafe { POLICY.get(&t.key) } {
            fold(t, v);
        }
    }
}

/// 9t. The verdict of a new flow at an endpoint with ClusterNetworkPolicy
///     entries in `dir` (`EP_*_TIERED`): the same keys as `allowed` (the
///     peer's identity, any peer, the CIDR group), then the peer's class in
///     the endpoint's profile (`TIER_PROFILES`, `PEER_CLASSES`), every hit
///     folded; then the tiers in order. A rule id, or `denied_by(reason, rule)`.
///
///     The fold is the costly part to verify (17 port prefix lengths times
///     three peer classes, no early exit), so it lives in a BPF *global*
///     function (`sluice_tiered`, below), which the verifier checks once,
///     on its own, with unknown arguments, instead of once per state of
///     every caller. Its arguments are scalars (global functions take no
///     stack pointers): the CIDR group is looked up here.
#[inline(always)]
pub fn tiered(ep: &EndpointInfo, dir: u8, peer: &Addr, peer_id: u32, flow: Flow) -> u64 {
    let plens = plens_for(ep, dir);
    let group = if plens & (1 << PLEN_CIDR_PEER_BIT) != 0 {
        cidr_group(ep.ep_id, dir, peer)
    } else {
        0
    };
    sluice_tiered(
        u64::from(ep.ep_id) | (u64::from(dir) << 32) | (flow.packed() << 40),
        u64::from(peer_id) | (u64::from(group) << 32),
        u64::from(plens) | (u64::from(flow.isolated) << 32),
    )
}

/// The flow a tiered lookup judges.
#[derive(Clone, Copy)]
pub struct Flow {
    pub port: u16,
    pub l4: u8,
    /// The endpoint is isolated in this direction by a NetworkPolicy.
    pub isolated: bool,
}

impl Flow {
    /// Port, then protocol: 24 bits.
    #[inline(always)]
    fn packed(self) -> u64 {
        u64::from(self.port) | (u64::from(self.l4) << 16)
    }
}

/// The tiers in order: the best Admin rule (Accept allows, Deny drops,
/// Pass goes on), NetworkPolicy where isolated (an allow, else the default
/// deny), the best Baseline rule (Accept, Deny), else allowed.
///
/// Three packed arguments, so that they and the scratch pointer fit in the
/// four callee-saved registers and nothing is spilled (the call chain's
/// stack is near the verifier's 512 bytes): `ep`: endpoint id, direction
/// << 32, `Flow::packed` << 40; `peers`: the peer's identity, its CIDR
/// group (0: none) << 32; `plens`: the direction's `port_plens`, isolated
/// << 32. A BPF global function (external linkage in BTF): verified once
/// per program, independently of its callers.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn sluice_tiered(ep: u64, peers: u64, plens: u64) -> u64 {
    let Some(t) = TIER_SCRATCH.get_ptr_mut(0) else {
        // Unreachable (index 0 of a one-entry array); fail closed.
        return denied_by(reason::POLICY_DENIED, 0);
    };
    // SAFETY: this CPU's slot, used by this program run only (TC and
    // cgroup skb programs do not nest on a CPU).
    let t = unsafe { &mut *t };
    // Field by field: a struct literal becomes calls to `memset`, a
    // frame of its own on a call chain near the 512-byte stack limit.
    t.ep_id = ep as u32;
    t.dir = (ep >> 32) as u8;
    t.port = (ep >> 40) as u16;
    t.l4 = (ep >> 56) as u8;
    t.peer = peers as u32;
    t.group = (peers >> 32) as u32;
    t.plens = plens as u32;
    t.isolated = ((plens >> 32) & 1) as u32;
    t.np = 0;
    t.admin = 0;
    t.base = 0;
    fold_identity(t, peers as u32);
    if t.plens & (1 << PLEN_ANY_PEER_BIT) != 0 {
        fold_identity(t, IDENTITY_ANY);
    }
    if t.group != 0 {
        fold_identity(t, t.group);
    }
    // The entries shared by the endpoints of the same ClusterNetworkPolicy
    // profile, keyed by the peer's class: pod peers of the tiers.
    // SAFETY: the values are copied out at once.
    if let Some(&profile) = unsafe { TIER_PROFILES.get(&t.ep_id) }
        && let Some(&class) = unsafe { PEER_CLASSES.get(&t.peer) }
    {
        t.ep_id = PROFILE_KEY_FLAG | profile;
        fold_identity(t, class);
    }
    if t.admin != 0 {
        if t.admin_action == action::ACCEPT {
            return u64::from(t.admin_rule);
        }
        // Deny, or an action this program does not know: fail closed.
        if t.admin_action != action::PASS {
            return denied_by(reason::ADMIN_DENIED, t.admin_rule);
        }
    }
    if t.isolated != 0 {
        if t.np != 0 {
            return u64::from(t.np_rule);
        }
        return denied_by(reason::POLICY_DENIED, 0);
    }
    if t.base != 0 {
        if t.base_deny != 0 {
            return denied_by(reason::BASELINE_DENIED, t.base_rule);
        }
        return u64::from(t.base_rule);
    }
    0
}
