//! The programs of `cargo xtask bench datapath` (and of the data path test
//! harness): baselines and the breakdowns of the established-flow and the
//! denied new-flow paths. Built
//! only with the `bench` feature, into `sluice-tc-bench`: the production
//! object `sluice-tc` carries no program the agent never attaches
//! (agent/build.rs checks that).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use sluice_common::{DIR_INGRESS, EP_FAIL_CLOSED};

use crate::{
    conntrack::flow_key,
    maps::{CONNTRACK, ENDPOINTS},
    parse::{L3, Packet, parse},
    policy::{allowed, identity_of},
};

/// Does nothing, as a cgroup skb program: the baseline of `to_host` in
/// `cargo xtask bench datapath`. The agent never attaches it.
#[cgroup_skb(ingress)]
pub fn bench_host_noop(_ctx: SkBuffContext) -> i32 {
    1
}

/// Does nothing: the baseline of `cargo xtask bench datapath` (what
/// BPF_PROG_TEST_RUN itself costs). The agent never attaches it.
#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// `cargo xtask bench datapath`'s breakdown of the established-flow path:
/// parsing only. The agent never attaches the `bench_*` programs.
#[classifier]
pub fn bench_parse(ctx: TcContext) -> i32 {
    let mut pkt = Packet::empty();
    let parsed = parse(&ctx, &mut pkt);
    // Keeps the parsed fields alive, as the real path uses them.
    let pkt = core::hint::black_box(pkt);
    match parsed {
        Ok(L3::Ip) if pkt.sport != 0 => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// The breakdown's second step: parsing and the ENDPOINTS lookup.
#[classifier]
pub fn bench_endpoint(ctx: TcContext) -> i32 {
    let mut pkt = Packet::empty();
    let parsed = parse(&ctx, &mut pkt);
    let pkt = core::hint::black_box(pkt);
    // SAFETY: the context of a TC program is a valid __sk_buff.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    // SAFETY: a map value, read-only here.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ifindex) }) else {
        return TC_ACT_SHOT;
    };
    match parsed {
        Ok(L3::Ip) if pkt.sport != 0 && ep.flags & EP_FAIL_CLOSED == 0 => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// The breakdown's third step: parsing, ENDPOINTS, the conntrack key and
/// its lookup (no refresh, no other check).
#[classifier]
pub fn bench_lookups(ctx: TcContext) -> i32 {
    let mut pkt = Packet::empty();
    let parsed = parse(&ctx, &mut pkt);
    // SAFETY: as in bench_endpoint.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    // SAFETY: as in bench_endpoint.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ifindex) }) else {
        return TC_ACT_SHOT;
    };
    if !matches!(parsed, Ok(L3::Ip)) || ep.flags & EP_FAIL_CLOSED != 0 {
        return TC_ACT_SHOT;
    }
    let (key, _) = flow_key(
        ep.ep_id,
        &pkt.saddr,
        pkt.sport,
        &pkt.daddr,
        pkt.dport,
        (pkt.proto, sluice_common::CT_KEY_OWN),
    );
    match CONNTRACK.get_ptr(&key) {
        Some(_) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// The denied path's steps, up to the peer's identity: parsing, ENDPOINTS,
/// the conntrack miss and the IPCACHE lookup (no policy, no drop).
#[classifier]
pub fn bench_deny_identity(ctx: TcContext) -> i32 {
    let Some((ep, pkt)) = missed(&ctx) else {
        return TC_ACT_OK;
    };
    let peer_id = identity_of(&pkt.saddr);
    if core::hint::black_box(peer_id) == 0 || ep.flags & EP_FAIL_CLOSED != 0 {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// The denied path's steps, up to the verdict: as `bench_deny_identity`,
/// then the policy lookups of a new ingress flow (no drop recorded).
#[classifier]
pub fn bench_deny_judge(ctx: TcContext) -> i32 {
    let Some((ep, pkt)) = missed(&ctx) else {
        return TC_ACT_OK;
    };
    let peer_id = identity_of(&pkt.saddr);
    match allowed(ep, DIR_INGRESS, &pkt.saddr, peer_id, pkt.proto, pkt.dport) {
        Some(_) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// Parsing, ENDPOINTS and a conntrack lookup that misses: the endpoint and
/// packet of a new flow, or None (not IP, no endpoint, or tracked).
#[inline(always)]
fn missed(ctx: &TcContext) -> Option<(&'static sluice_common::EndpointInfo, Packet)> {
    let mut pkt = Packet::empty();
    let parsed = parse(ctx, &mut pkt);
    // SAFETY: as in bench_endpoint.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    // SAFETY: as in bench_endpoint.
    let ep = unsafe { ENDPOINTS.get(&ifindex) }?;
    if !matches!(parsed, Ok(L3::Ip)) {
        return None;
    }
    let (key, _) = flow_key(
        ep.ep_id,
        &pkt.saddr,
        pkt.sport,
        &pkt.daddr,
        pkt.dport,
        (pkt.proto, sluice_common::CT_KEY_OWN),
    );
    match CONNTRACK.get_ptr(&key) {
        Some(_) => None,
        None => Some((ep, pkt)),
    }
}
