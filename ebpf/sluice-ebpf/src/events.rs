//! What happens on every drop: a per-CPU counter by (endpoint, reason,
//! direction), and a drop event in the ring buffer, at most one per flow,
//! direction and EVENT_FLOW_INTERVAL_NS.
use sluice_common::{
    CounterKey, CounterValue, DropEvent, EVENT_FLOW_INTERVAL_NS, FLOW_EVENTS_INDEX, reason, stat,
};

use crate::{
    conntrack::{now_ns, precise_now_ns, side_le},
    keys::ct_key,
    maps::{DENY_RULE, DROP_COUNTERS, DROP_EVENTS, EVENT_RATE, FLOW_EVENTS, RULE_DROPS, count},
    parse::{FAMILY_NONE, Packet},
    policy::identity_of,
};

/// BPF_NOEXIST
const NOEXIST: u64 = 1;

/// Counts and reports a drop of `pkt` (as far as it was parsed). Not
/// inlined: the drop path is cold and has its own stack frame.
#[inline(never)]
pub fn record_drop(ep_id: u32, dir: u8, reason: u8, pkt: &Packet, len: u32) {
    count_drop(ep_id, dir, reason, len);
    // The rule of a policy drop: the judgment just made on this CPU.
    let rule = if reason == reason::ADMIN_DENIED
        || reason == reason::BASELINE_DENIED
        || reason == reason::REVOKED
    {
        deny_rule()
    } else {
        0
    };
    if rule != 0 {
        count_rule_drop(rule, len);
    }
    // The per-flow limit is a second: the jiffy clock (one read, shared
    // with conntrack) is precise enough for it; the event itself carries
    // the precise time.
    if !event_due(ep_id, dir, pkt, now_ns()) {
        count(stat::EVENTS_RATE_LIMITED);
        return;
    }
    let Some(mut entry) = DROP_EVENTS.reserve::<DropEvent>(0) else {
        count(stat::EVENTS_LOST);
        return;
    };
    let peer = if pkt.family == FAMILY_NONE {
        0
    } else {
        peer_identity(dir, pkt)
    };
    entry.write(event(ep_id, dir, pkt, peer, (reason, len, rule)));
    entry.submit(0);
    count(stat::EVENTS_SENT);
}

/// Does the agent want an event per allowed new flow (`FLOW_EVENTS`)? One
/// array lookup, which the verifier inlines: all an unobserved node pays.
#[inline(always)]
pub fn flows_on() -> bool {
    match FLOW_EVENTS.get(FLOW_EVENTS_INDEX) {
        Some(on) => *on != 0,
        None => false,
    }
}

/// Reports an allowed new flow (its conntrack entry was just created):
/// a `DropEvent` with reason `FORWARDED` and the allowing rule, in the
/// drop ring buffer. Not rate-limited (one per new flow already); a full
/// ring counts it lost. Called only while `flows_on`; its own frame.
#[inline(never)]
pub fn record_flow(ep_id: u32, dir: u8, pkt: &Packet, rule: u32) {
    let Some(mut entry) = DROP_EVENTS.reserve::<DropEvent>(0) else {
        count(stat::EVENTS_LOST);
        return;
    };
    let peer = peer_identity(dir, pkt);
    entry.write(event(ep_id, dir, pkt, peer, (reason::FORWARDED, 0, rule)));
    entry.submit(0);
}

/// The peer's identity: the source's for ingress, the destination's for
/// egress (on a hairpin both are the endpoint's own).
#[inline(always)]
fn peer_identity(dir: u8, pkt: &Packet) -> u32 {
    let peer = if dir == sluice_common::DIR_INGRESS {
        pkt.judged_saddr()
    } else {
        &pkt.daddr
    };
    identity_of(peer)
}

/// The event of `pkt` at endpoint `ep_id`: `(reason, packet length, rule)`.
/// A hairpin's source is shown as judged: the endpoint's own address, not
/// the node's that kube-proxy's masquerade put on the packet.
#[inline(always)]
fn event(
    ep_id: u32,
    dir: u8,
    pkt: &Packet,
    peer: u32,
    (reason, len, rule): (u8, u32, u32),
) -> DropEvent {
    DropEvent {
        ts_ns: precise_now_ns(),
        ep_id,
        peer_identity: peer,
        saddr: pkt.judged_saddr().bytes(),
        daddr: pkt.daddr.bytes(),
        sport: pkt.sport,
        dport: pkt.dport,
        family: pkt.family,
        proto: pkt.proto,
        dir,
        reason,
        pkt_len: len,
        icmp_type: pkt.icmp_type,
        icmp_code: pkt.icmp_code,
        _pad: 0,
        rule_id: rule,
        _pad2: 0,
    }
}

/// Notes the rule of a deny for the drop that follows (`DENY_RULE`).
#[inline(always)]
pub fn note_deny_rule(rule: u32) {
    if let Some(p) = DENY_RULE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; read back in the same program run.
        unsafe { *p = rule };
    }
}

#[inline(always)]
fn deny_rule() -> u32 {
    match DENY_RULE.get(0) {
        Some(r) => *r,
        None => 0,
    }
}

/// Per ClusterNetworkPolicy rule: packets and bytes dropped.
#[inline(always)]
fn count_rule_drop(rule: u32, len: u32) {
    if let Some(c) = RULE_DROPS.get_ptr_mut(&rule) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
        return;
    }
    let first = CounterValue {
        packets: 1,
        bytes: u64::from(len),
    };
    let _lost = RULE_DROPS.insert(&rule, &first, NOEXIST);
}

#[inline(always)]
fn count_drop(ep_id: u32, dir: u8, reason: u8, len: u32) {
    let key = CounterKey {
        ep_id,
        reason,
        dir,
        _pad: 0,
    };
    if let Some(c) = DROP_COUNTERS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
        return;
    }
    let first = CounterValue {
        packets: 1,
        bytes: u64::from(len),
    };
    // NOEXIST: another CPU may have created the key since the lookup; then
    // add to the entry it made.
    if DROP_COUNTERS.insert(&key, &first, NOEXIST).is_err() {
        if let Some(c) = DROP_COUNTERS.get_ptr_mut(&key) {
            // SAFETY: as above.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += u64::from(len);
            }
        }
    }
}

/// Whether the flow of `pkt` may have an event now; if so, takes the slot.
#[inline(always)]
fn event_due(ep_id: u32, dir: u8, pkt: &Packet, now: u64) -> bool {
    let (s, d) = ((&pkt.saddr, pkt.sport), (&pkt.daddr, pkt.dport));
    let key = if side_le(s.0, s.1, d.0, d.1) {
        ct_key(ep_id, s, d, pkt.proto, dir)
    } else {
        ct_key(ep_id, d, s, pkt.proto, dir)
    };
    if let Some(last) = EVENT_RATE.get_ptr_mut(&key) {
        // SAFETY: a u64 in a map value; a race lets at most one extra event
        // through.
        let last = unsafe { &mut *last };
        if now.wrapping_sub(*last) < EVENT_FLOW_INTERVAL_NS {
            return false;
        }
        *last = now;
        return true;
    }
    // An LRU map evicts instead of failing; should the insert fail anyway,
    // this one event still goes out.
    let _unlimited = EVENT_RATE.insert(&key, &now, 0);
    true
}
