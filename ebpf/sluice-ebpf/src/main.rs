//! Sluice's TC programs: NetworkPolicy enforcement on the host end of each
//! pod veth. `from_pod` sees what the pod sends (EGRESS), `to_pod` what it
//! receives (INGRESS); both run `try_classify`, which follows the numbered
//! steps below. Modules: `parse` (headers), `conntrack`, `policy` (new
//! flows), `events` (drop counters and events), `maps`, `keys`.
//!
//! Layout for the verifier and the benchmark: the established-flow path
//! (parse, endpoint, anti-spoofing, one conntrack lookup) is inlined into
//! the classifier; new flows, ICMP errors and drops are BPF subprograms with
//! their own stack frames.
#![no_std]
#![no_main]

mod conntrack;
mod events;
mod keys;
mod maps;
mod parse;
mod policy;

use core::num::NonZeroU8;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_FAIL_CLOSED, EP_HAS_IPV4, EP_HAS_IPV6,
    EP_INGRESS_ISOLATED, EndpointInfo, FragValue, IDENTITY_HOST, proto, reason, stat,
};

use crate::{
    conntrack::{addr_eq, create, exists, flow_key, hit_and_refresh, now_ns},
    keys::frag_key,
    maps::{ENDPOINTS, FRAGS, count},
    parse::{
        Addr, FAMILY_V4, FRAG_FIRST, FRAG_LATER, L3, Packet, is_icmp_error, is_nd_or_mld, parse,
        parse_icmp_inner,
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

/// Does nothing: the baseline of `cargo xtask bench datapath` (what
/// BPF_PROG_TEST_RUN itself costs). The agent never attaches it.
#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
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

type Verdict = Result<(), Reason>;

/// Ok(TC_ACT_OK) to pass; Err(TC_ACT_SHOT) once the drop is counted and
/// reported.
#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    let mut pkt = Packet::empty();
    let parsed = parse(ctx, &mut pkt);
    // 1. Endpoint: the interface the program runs on.
    // SAFETY: the context of a TC program is a valid __sk_buff.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    // SAFETY: a map value, read-only here and valid for this run.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ifindex) }) else {
        return drop_packet(ctx, 0, dir, UNKNOWN_ENDPOINT, pkt);
    };
    match decide(ctx, ep, dir, parsed, &mut pkt) {
        Ok(()) => {
            count(stat::FORWARDED);
            Ok(TC_ACT_OK)
        }
        Err(why) => drop_packet(ctx, ep.ep_id, dir, why, pkt),
    }
}

/// 11. Every drop is counted and (rate-limited) reported. `pkt` by value:
/// the packet stays in registers on the pass path.
#[inline(always)]
fn drop_packet(ctx: &TcContext, ep_id: u32, dir: u8, why: Reason, pkt: Packet) -> Result<i32, i32> {
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
                if first.allowed != 0 {
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
        let value = FragValue {
            sport: pkt.sport,
            dport: pkt.dport,
            allowed: u32::from(verdict.is_ok()),
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
    // 8. Related ICMP errors pass when the flow they quote is tracked;
    //    else they are a new flow without ports (step 9).
    if is_icmp_error(pkt) && related_flow_tracked(ctx, ep.ep_id, *pkt, now) {
        return Ok(());
    }
    // 7. Conntrack, one lookup: both directions share the key.
    let (key, src_is_lo) = flow_key(
        ep.ep_id, &pkt.saddr, pkt.sport, &pkt.daddr, pkt.dport, pkt.proto,
    );
    if hit_and_refresh(&key, src_is_lo, pkt.tcp_flags, now) {
        return Ok(());
    }
    // 9. and 10.
    new_flow(ep, dir, *pkt, &key, now)
}

/// Does the flow that an ICMP error quotes exist, and was it sent by the
/// one the error goes to? (Without that check a pod could send "errors" to
/// anyone by quoting one of its allowed flows.)
#[inline(never)]
fn related_flow_tracked(ctx: &TcContext, ep_id: u32, pkt: Packet, now: u64) -> bool {
    let Some(inner) = parse_icmp_inner(ctx, &pkt) else {
        return false;
    };
    if !addr_eq(&inner.saddr, &pkt.daddr) {
        return false;
    }
    let (key, _) = flow_key(
        ep_id,
        &inner.saddr,
        inner.sport,
        &inner.daddr,
        inner.dport,
        inner.proto,
    );
    exists(&key, now)
}

/// 9. A new flow: allowed where the endpoint is not isolated in `dir`, from
///    the node (ingress), or by policy. 10. An allowed one is tracked.
#[inline(never)]
fn new_flow(
    ep: &EndpointInfo,
    dir: u8,
    pkt: Packet,
    key: &sluice_common::CtKey,
    now: u64,
) -> Verdict {
    let rule_id = if isolated(ep, dir) {
        let peer = if dir == DIR_INGRESS {
            &pkt.saddr
        } else {
            &pkt.daddr
        };
        let peer_id = policy::identity_of(peer);
        // The node itself (kubelet probes) may always reach its pods.
        if dir == DIR_INGRESS && peer_id == IDENTITY_HOST {
            0
        } else {
            // The port of a new flow is its destination port, the server's.
            // ICMP has none (echo ids are not ports), nor do ICMP errors that
            // match no tracked flow.
            let port = if pkt.proto == proto::ICMP || pkt.proto == proto::ICMPV6 {
                0
            } else {
                pkt.dport
            };
            match policy::allowed(ep, dir, peer, peer_id, pkt.proto, port) {
                Some(rule) => rule,
                None => return Err(POLICY_DENIED),
            }
        }
    } else {
        0
    };
    let src_is_lo = conntrack::side_le(&pkt.saddr, pkt.sport, &pkt.daddr, pkt.dport);
    create(key, src_is_lo, dir, pkt.tcp_flags, rule_id, now);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
