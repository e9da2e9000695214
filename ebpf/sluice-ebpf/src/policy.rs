//! Policy of a new flow: peer identity from the ipcache, then the policy map,
//! in the order the numbered comment in `allowed` states.
use aya_ebpf::maps::lpm_trie::Key;
use sluice_common::{
    CIDR_KEY_FIXED_BITS, DIR_INGRESS, EndpointInfo, IDENTITY_ANY, IDENTITY_WORLD, IpcacheKey,
    PLEN_ANY_PEER_BIT, PLEN_ANY_PROTO_BIT, PLEN_CIDR_PEER_BIT, POLICY_ALLOW, PolicyKey, port_mask,
};

use crate::{
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
