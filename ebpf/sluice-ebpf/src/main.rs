//! Sluice's TC programs: NetworkPolicy enforcement on the host end of each
//! pod veth. `from_pod` sees what the pod sends (EGRESS), `to_pod` what it
//! receives (INGRESS); both run `try_classify`, which follows the numbered
//! steps below. New flows to a Service address are the exception: their
//! egress is judged after kube-proxy's DNAT, by the backend's `to_pod`
//! (steps 0 and 7a; docs/design.md, "Services"). A conntrack entry from an
//! older policy epoch has its flow judged again (step 7b; docs/design.md,
//! "Policy changes reach established flows"). Modules: `parse` (headers),
//! `conntrack`, `policy` (new flows), `deferred` (Service flows judged
//! after NAT, and the hairpin tag), `events` (drop counters and events),
//! `maps`, `keys`.
//!
//! Layout for the verifier and the benchmark: the established-flow path
//! (parse, endpoint, anti-spoofing, one conntrack lookup, the epoch
//! compare) is inlined into the classifier; new flows, flow judgments, ICMP
//! errors and drops are BPF subprograms with their own stack frames.
#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod bench;
mod conntrack;
mod deferred;
mod events;
mod keys;
mod maps;
mod parse;
mod policy;

use core::num::NonZeroU8;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use sluice_common::{
    CT_EGRESS_DEFERRED, CT_HAIRPIN, CT_KEY_OWN, CT_ORIG_EGRESS, CT_ORIG_IS_LO, CtKey, DIR_EGRESS,
    DIR_INGRESS, EGRESS_DEFERRED_MARK, EGRESS_SENDER_TAG_MASK, EP_EGRESS_ISOLATED,
    EP_EGRESS_TIERED, EP_FAIL_CLOSED, EP_HAIRPIN_TAG_MASK, EP_HAS_IPV4, EP_HAS_IPV6,
    EP_INGRESS_ISOLATED, EP_INGRESS_TIERED, EndpointInfo, FRAG_ALLOWED, FRAG_EGRESS_DEFERRED,
    FragValue, IDENTITY_HOST, ServiceKey, proto, reason, stat,
};

use crate::{
    conntrack::{
        Tracked, addr_eq, create, ct_side, current_epoch, denied_by, flow_key, hit_and_refresh,
        is_denied, live, now_ns,
    },
    deferred::{deferred_egress, hairpin_bit, mark_deferred, marked_deferred},
    keys::frag_key,
    maps::{ENDPOINTS, FRAGS, SERVICES, count},
    parse::{
        Addr, FAMILY_V4, FRAG_FIRST, FRAG_LATER, L3, Packet, Skb, is_icmp_error, is_nd_or_mld,
        parse, parse_icmp_inner, parse_ip,
    },
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_classify(&ctx, DIR_EGRESS) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_classify(&ctx, DIR_INGRESS) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// TC egress of the node's uplinks (the interfaces towards other nodes):
/// judges the sender's egress of packets whose `from_pod` deferred it (a
/// Service address, DNATed to a pod on another node), as `to_pod` does for
/// local backends. Every other packet passes untouched: the receiving
/// node's `to_pod` judges its ingress.
#[classifier]
pub fn to_uplink(ctx: TcContext) -> i32 {
    // SAFETY: the context of a TC program is a valid __sk_buff.
    let mark = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark };
    if mark & EGRESS_DEFERRED_MARK == 0 {
        return TC_ACT_OK;
    }
    ctx.set_mark(mark & !(EGRESS_DEFERRED_MARK | EGRESS_SENDER_TAG_MASK));
    let mut pkt = Packet::empty();
    if !matches!(parse(&ctx, &mut pkt), Ok(L3::Ip)) {
        return TC_ACT_OK;
    }
    match deferred_egress(&ctx, &pkt, None) {
        Ok(()) => TC_ACT_OK,
        Err(ret) => ret,
    }
}

/// cgroup ingress of the node's processes (the cgroup the agent is given,
/// by default the root): judges the sender's egress of packets whose
/// `from_pod` deferred it and that kube-proxy's DNAT delivers to the node
/// itself (a Service backed by a host-network pod or the node's API
/// server), which no TC hook sees. It runs when the packet reaches the
/// socket; every unmarked packet passes at once. 1 passes, 0 drops.
#[cgroup_skb(ingress)]
pub fn to_host(ctx: SkBuffContext) -> i32 {
    // SAFETY: the context of a cgroup skb program is a valid __sk_buff.
    let mark = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark };
    if mark & EGRESS_DEFERRED_MARK == 0 {
        return 1;
    }
    let mut pkt = Packet::empty();
    if parse_ip(&ctx, &mut pkt).is_err() {
        // Its from_pod parsed it; the stack will judge a mangled packet.
        return 1;
    }
    match deferred_egress(&ctx, &pkt, None) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// A drop reason (`sluice_common::reason`, never 0). `Result<(), Reason>`
/// is one byte with no undefined payload: LLVM may spill the payload of a
/// wider `Result` uninitialised, which the verifier rejects.
#[derive(Clone, Copy)]
struct Reason(NonZeroU8);

impl Reason {
    const fn of(r: u8) -> Self {
        match NonZeroU8::new(r) {
            Some(r) => Self(r),
            None => panic!("reason 0"),
        }
    }
}

const POLICY_DENIED: Reason = Reason::of(reason::POLICY_DENIED);
const SPOOFED_SOURCE: Reason = Reason::of(reason::SPOOFED_SOURCE);
const UNKNOWN_ENDPOINT: Reason = Reason::of(reason::UNKNOWN_ENDPOINT);
const MALFORMED: Reason = Reason::of(reason::MALFORMED);
const FRAGMENT_UNKNOWN: Reason = Reason::of(reason::FRAGMENT_UNKNOWN);
const FAIL_CLOSED: Reason = Reason::of(reason::FAIL_CLOSED);
const UNSUPPORTED_L3: Reason = Reason::of(reason::UNSUPPORTED_L3);
const REVOKED: Reason = Reason::of(reason::REVOKED);
const ADMIN_DENIED: Reason = Reason::of(reason::ADMIN_DENIED);
const BASELINE_DENIED: Reason = Reason::of(reason::BASELINE_DENIED);

type Verdict = Result<(), Reason>;

/// Ok(TC_ACT_OK) to pass; Err(TC_ACT_SHOT) once the drop is counted and
/// reported.
#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    let mut pkt = Packet::empty();
    let parsed = parse(ctx, &mut pkt);
    // SAFETY: the context of a TC program is a valid __sk_buff.
    let skb = unsafe { &*ctx.as_ptr().cast::<__sk_buff>() };
    // 1. Endpoint: the interface the program runs on.
    let ifindex = skb.ifindex;
    // SAFETY: a map value, read-only here and valid for this run.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ifindex) }) else {
        return drop_packet(ctx, 0, dir, UNKNOWN_ENDPOINT, pkt);
    };
    // 0. (to_pod) A packet whose sender's egress `from_pod` deferred (step
    //    7a) is judged for that sender first, on the translated tuple. It
    //    carries the sender's hairpin tag: this endpoint's own tag on a
    //    packet whose source is no local endpoint (masqueraded by
    //    kube-proxy) makes it a hairpin, judged as from the endpoint to
    //    itself (its egress here, its ingress below).
    if dir == DIR_INGRESS {
        let mark = skb.mark;
        let marked = mark & EGRESS_DEFERRED_MARK != 0;
        if marked {
            let tag = mark & EGRESS_SENDER_TAG_MASK;
            let own = tag != 0 && tag == ep.flags & EP_HAIRPIN_TAG_MASK;
            // The deferred bit stays set on a hairpin only: the signal
            // read below.
            let keep = if own { EGRESS_DEFERRED_MARK } else { 0 };
            ctx.set_mark(mark & !(EGRESS_DEFERRED_MARK | EGRESS_SENDER_TAG_MASK) | keep);
        }
        // For every packet (one load): see `hairpin_bit`.
        pkt.hairpin = hairpin_bit(ctx);
        if marked && matches!(parsed, Ok(L3::Ip)) {
            deferred_egress(ctx, &pkt, Some(ep))?;
        }
    }
    match decide(ctx, ep, dir, parsed, &mut pkt) {
        Ok(()) => {
            count(stat::FORWARDED + u32::from(dir));
            Ok(TC_ACT_OK)
        }
        Err(why) => drop_packet(ctx, ep.ep_id, dir, why, pkt),
    }
}

/// 11. Every drop is counted and (rate-limited) reported. `pkt` by value:
/// the packet stays in registers on the pass path.
#[inline(always)]
fn drop_packet<C: Skb>(ctx: &C, ep_id: u32, dir: u8, why: Reason, pkt: Packet) -> Result<i32, i32> {
    events::record_drop(ep_id, dir, why.0.get(), &pkt, ctx.len());
    Err(TC_ACT_SHOT as i32)
}

#[inline(always)]
fn isolated(ep: &EndpointInfo, dir: u8) -> bool {
    let bit = if dir == DIR_INGRESS {
        EP_INGRESS_ISOLATED
    } else {
        EP_EGRESS_ISOLATED
    };
    ep.flags & bit != 0
}

/// Is `pkt`'s source the endpoint's own address?
#[inline(always)]
fn source_is_own(ep: &EndpointInfo, pkt: &Packet) -> bool {
    if pkt.family == FAMILY_V4 {
        ep.flags & EP_HAS_IPV4 != 0 && addr_eq(&pkt.saddr, &Addr::v4_mapped(ep.ipv4))
    } else {
        ep.flags & EP_HAS_IPV6 != 0 && addr_eq(&pkt.saddr, &Addr::from_bytes(ep.ipv6))
    }
}

#[inline(always)]
fn decide(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    parsed: Result<L3, parse::Malformed>,
    pkt: &mut Packet,
) -> Verdict {
    // 2. Ethernet: ARP always passes; other non-IP only where not isolated.
    match parsed {
        Err(parse::Malformed) => return Err(MALFORMED),
        Ok(L3::Arp) => return Ok(()),
        Ok(L3::Other) if isolated(ep, dir) => return Err(UNSUPPORTED_L3),
        Ok(L3::Other) => return Ok(()),
        Ok(L3::Ip) => {}
    }
    // 3. IPv6 neighbour discovery and MLD, before anything else.
    if is_nd_or_mld(pkt) {
        return Ok(());
    }
    // 4. Anti-spoofing: what the pod sends carries its own address.
    if dir == DIR_EGRESS && !source_is_own(ep, pkt) {
        return Err(SPOOFED_SOURCE);
    }
    // 5. Fail closed: the endpoint's policy could not be programmed.
    if ep.flags & EP_FAIL_CLOSED != 0 {
        return Err(FAIL_CLOSED);
    }
    // 6. Fragments. A non-first fragment takes the ports and the verdict of
    //    its first fragment (none seen: unknown, dropped where isolated).
    if pkt.frag == FRAG_LATER {
        let key = frag_key(&pkt.saddr, &pkt.daddr, pkt.frag_id, pkt.proto);
        // SAFETY: copied out at once.
        return match unsafe { FRAGS.get(&key) }.copied() {
            Some(first) => {
                pkt.sport = first.sport;
                pkt.dport = first.dport;
                if dir == DIR_EGRESS && first.allowed & FRAG_EGRESS_DEFERRED != 0 {
                    mark_deferred(ctx, ep);
                }
                if first.allowed & FRAG_ALLOWED != 0 {
                    Ok(())
                } else {
                    Err(POLICY_DENIED)
                }
            }
            None if isolated(ep, dir) => Err(FRAGMENT_UNKNOWN),
            None => Ok(()),
        };
    }
    let verdict = flow_verdict(ctx, ep, dir, pkt);
    //    A first fragment records its ports and verdict for the others.
    if pkt.frag == FRAG_FIRST {
        let key = frag_key(&pkt.saddr, &pkt.daddr, pkt.frag_id, pkt.proto);
        let deferred = dir == DIR_EGRESS && verdict.is_ok() && marked_deferred(ctx);
        let value = FragValue {
            sport: pkt.sport,
            dport: pkt.dport,
            allowed: if verdict.is_ok() { FRAG_ALLOWED } else { 0 }
                | if deferred { FRAG_EGRESS_DEFERRED } else { 0 },
        };
        // A lost record makes the later fragments FRAGMENT_UNKNOWN.
        let _unrecorded = FRAGS.insert(&key, &value, 0);
    }
    verdict
}

/// Steps 7 to 10 for a packet with its L4 header.
#[inline(always)]
fn flow_verdict(ctx: &TcContext, ep: &EndpointInfo, dir: u8, pkt: &Packet) -> Verdict {
    let now = now_ns();
    // The policy epoch, read before anything is judged (see current_epoch).
    let epoch = current_epoch();
    // 8. Related ICMP errors pass when the flow they quote is tracked (and,
    //    from an older epoch, still allowed: else revoked); else they are
    //    a new flow without ports (step 9).
    if is_icmp_error(pkt) {
        match related_flow(ctx, ep, *pkt, now) {
            RELATED => return Ok(()),
            RELATED_REVOKED => return Err(REVOKED),
            _ => {}
        }
    }
    // 7. Conntrack, one lookup: both directions share the key. What the
    //    pod sends on a deferred flow (7a) is marked for its backend's
    //    to_pod, every packet, so none passes unjudged after NAT.
    //    7b. An entry from an older policy epoch: its flow is judged again
    //    (`rejudge`), whichever side sent this packet.
    let (key, src_is_lo) = flow_key(
        ep.ep_id,
        &pkt.saddr,
        pkt.sport,
        &pkt.daddr,
        pkt.dport,
        (pkt.proto, CT_KEY_OWN),
    );
    match hit_and_refresh(&key, src_is_lo, pkt.tcp_flags, 0, now, epoch, |k, f| {
        rejudge(ep, k, f)
    }) {
        Tracked::Hit(flags) => {
            if dir == DIR_EGRESS && flags & CT_EGRESS_DEFERRED != 0 {
                mark_deferred(ctx, ep);
            }
            return Ok(());
        }
        Tracked::Revoked => return Err(REVOKED),
        Tracked::Miss => {}
    }
    // 7a. (from_pod) A new flow to a Service address: kube-proxy has not
    //     chosen the real destination yet. Tracked as deferred and marked;
    //     the backend's to_pod judges it (step 0).
    if dir == DIR_EGRESS && is_service(&pkt.daddr) {
        create(
            &key,
            src_is_lo,
            dir,
            pkt.tcp_flags,
            0,
            CT_EGRESS_DEFERRED,
            now,
            epoch,
        );
        mark_deferred(ctx, ep);
        return Ok(());
    }
    // 9. and 10.
    new_flow(ep, dir, *pkt, &key, now)
}

/// Is `addr` a Service address (SERVICES)?
#[inline(always)]
fn is_service(addr: &Addr) -> bool {
    let key = ServiceKey { addr: addr.bytes() };
    // SAFETY: only presence is read.
    unsafe { SERVICES.get(&key) }.is_some()
}

/// `related_flow`'s answers: the quoted flow is not tracked (or not sent by
/// the error's receiver), tracked, or tracked but revoked.
const UNRELATED: u32 = 0;
const RELATED: u32 = 1;
const RELATED_REVOKED: u32 = 2;

/// Does the flow that an ICMP error quotes exist, and was it sent by the
/// one the error goes to? (Without that check a pod could send "errors" to
/// anyone by quoting one of its allowed flows.) An entry of an older epoch
/// counts only if its flow is still allowed (the entry is not updated: the
/// flow's own next packet does that).
#[inline(never)]
fn related_flow(ctx: &TcContext, ep: &EndpointInfo, pkt: Packet, now: u64) -> u32 {
    let epoch = current_epoch();
    let Some(inner) = parse_icmp_inner(ctx, &pkt) else {
        return UNRELATED;
    };
    if !addr_eq(&inner.saddr, &pkt.daddr) {
        return UNRELATED;
    }
    let (key, _) = flow_key(
        ep.ep_id,
        &inner.saddr,
        inner.sport,
        &inner.daddr,
        inner.dport,
        (inner.proto, CT_KEY_OWN),
    );
    match live(&key, now) {
        None => UNRELATED,
        Some((_, e)) if e == epoch => RELATED,
        Some((flags, _)) if !is_denied(rejudge(ep, &key, flags)) => RELATED,
        Some(_) => RELATED_REVOKED,
    }
}

/// 7b. The flow of a conntrack entry from an older policy epoch, judged
///     again as a new flow of its original direction (the entry says who
///     opened it and in which direction; its key holds both sides): a rule
///     id, or `DENIED`. A deferred entry (7a) holds no verdict: the flow's
///     translated entry at the backend's hook is the one judged again.
#[inline(always)]
fn rejudge(ep: &EndpointInfo, key: &CtKey, flags: u32) -> u64 {
    if flags & CT_EGRESS_DEFERRED != 0 {
        return 0;
    }
    // Which side is the peer, and the responder's (server's) port, from
    // the flags by address arithmetic, not branches: each branch here gave
    // `judge` another caller state (a pointer to either side of the key)
    // to be verified in, for every place that judges a flow again.
    let bit = |f: u32| (flags >> f.trailing_zeros()) & 1;
    let (orig_is_lo, egress, hairpin) = (bit(CT_ORIG_IS_LO), bit(CT_ORIG_EGRESS), bit(CT_HAIRPIN));
    // The peer is the originator for ingress, the responder for egress;
    // a hairpin's originator is the node (the masquerade) and its peer the
    // endpoint itself, the responder.
    let peer_is_orig = (egress | hairpin) ^ 1;
    let peer_is_hi = peer_is_orig ^ orig_is_lo;
    // The responder is `hi` when the originator is `lo`.
    let (peer, port) = ct_side(key, peer_is_hi, orig_is_lo);
    // DIR_EGRESS is 1, DIR_INGRESS 0.
    judge(ep, egress as u8, &Addr::from_bytes(peer), key.proto, port)
}

/// 9. A new flow: allowed where the endpoint is not isolated in `dir`, from
///    the node (ingress), or by policy. 10. An allowed one is tracked, and
///    reported while `FLOW_EVENTS` is on (10f). A hairpin's peer is the
///    endpoint itself in both directions (`Packet::judged_saddr`).
#[inline(never)]
fn new_flow(ep: &EndpointInfo, dir: u8, pkt: Packet, key: &CtKey, now: u64) -> Verdict {
    // Before the policy is read: see current_epoch.
    let epoch = current_epoch();
    let peer = if dir == DIR_INGRESS {
        pkt.judged_saddr()
    } else {
        &pkt.daddr
    };
    let rule = judge(ep, dir, peer, pkt.proto, pkt.dport);
    if is_denied(rule) {
        return Err(match (rule >> 32) as u8 {
            reason::ADMIN_DENIED => ADMIN_DENIED,
            reason::BASELINE_DENIED => BASELINE_DENIED,
            _ => POLICY_DENIED,
        });
    }
    let src_is_lo = conntrack::side_le(&pkt.saddr, pkt.sport, &pkt.daddr, pkt.dport);
    // Shifted, not branched on: see hairpin_bit.
    let hairpin = u32::from(pkt.hairpin & 1) << CT_HAIRPIN.trailing_zeros();
    create(
        key,
        src_is_lo,
        dir,
        pkt.tcp_flags,
        rule as u32,
        hairpin,
        now,
        epoch,
    );
    // 10f. Reported while the agent asks for flows (one array lookup).
    if events::flows_on() {
        events::record_flow(ep.ep_id, dir, &pkt, rule as u32);
    }
    Ok(())
}

/// 9. The verdict on a flow with `peer` of `l4` to the server's port
///    `dport`, opened in `dir`: the rule id that allows it (0 where the
///    endpoint is neither isolated nor tiered, or from the node), or
///    `denied_by(reason, rule)`, whose rule the drop reports (`DENY_RULE`).
///    New flows and flows judged again (7b) both come here.
#[inline(never)]
fn judge(ep: &EndpointInfo, dir: u8, peer: &Addr, l4: u8, dport: u16) -> u64 {
    let isolated = isolated(ep, dir);
    let tiered = tiered(ep, dir);
    if !isolated && !tiered {
        return 0;
    }
    let peer_id = policy::identity_of(peer);
    // The node itself (kubelet probes) may always reach its pods.
    if dir == DIR_INGRESS && peer_id == IDENTITY_HOST {
        return 0;
    }
    // The port of a new flow is its destination port, the server's. ICMP
    // has none (echo ids are not ports), nor do ICMP errors that match no
    // tracked flow.
    let port = if l4 == proto::ICMP || l4 == proto::ICMPV6 {
        0
    } else {
        dport
    };
    // 9t. ClusterNetworkPolicy entries: every tier's hits folded. An
    //     endpoint without them keeps the early exit below.
    let verdict = if tiered {
        let flow = policy::Flow { port, l4, isolated };
        policy::tiered(ep, dir, peer, peer_id, flow)
    } else {
        match policy::allowed(ep, dir, peer, peer_id, l4, port) {
            Some(rule) => u64::from(rule),
            None => denied_by(reason::POLICY_DENIED, 0),
        }
    };
    if is_denied(verdict) {
        events::note_deny_rule(verdict as u32);
    }
    verdict
}

#[inline(always)]
fn tiered(ep: &EndpointInfo, dir: u8) -> bool {
    let bit = if dir == DIR_INGRESS {
        EP_INGRESS_TIERED
    } else {
        EP_EGRESS_TIERED
    };
    ep.flags & bit != 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
