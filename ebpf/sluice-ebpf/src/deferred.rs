//! Service flows whose egress `from_pod` deferred (steps 0 and 7a;
//! docs/design.md, "Services" and "Hairpin"): the mark that carries them
//! past kube-proxy's NAT, with the sender's hairpin tag, and the sender's
//! egress judged where the translated packet shows up (`to_pod`,
//! `to_uplink`, `to_host`).
use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, maps::lpm_trie::Key, programs::TcContext};
use sluice_common::{
    CT_KEY_DEFERRED, CT_SEEN_REPLY, DIR_EGRESS, EGRESS_DEFERRED_MARK, EGRESS_SENDER_TAG_MASK,
    EP_HAIRPIN_TAG_MASK, EndpointInfo, FragValue, IpcacheKey,
};

use crate::{
    REVOKED, UNKNOWN_ENDPOINT,
    conntrack::{Tracked, current_epoch, flow_key, hit_and_refresh, now_ns},
    drop_packet,
    keys::frag_key,
    maps::{ENDPOINTS, EP_BY_ID, FRAGS, IPCACHE},
    new_flow,
    parse::{FRAG_FIRST, FRAG_LATER, Packet, Skb, TCP_ACK},
    rejudge,
};

/// ORs `EGRESS_DEFERRED_MARK` and the endpoint's hairpin tag
/// (`EGRESS_SENDER_TAG_MASK`) into the packet's mark (other bits are kept:
/// kube-proxy and others use them).
#[inline(always)]
pub fn mark_deferred(ctx: &TcContext, ep: &EndpointInfo) {
    // SAFETY: the context of a TC program is a valid __sk_buff.
    let mark = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark };
    let tag = ep.flags & EP_HAIRPIN_TAG_MASK;
    ctx.set_mark(mark & !EGRESS_SENDER_TAG_MASK | EGRESS_DEFERRED_MARK | tag);
}

/// 1 on a hairpin (`to_pod` step 0 left `EGRESS_DEFERRED_MARK` set), else
/// 0: read back from the mark with a shift, on every packet `to_pod`
/// sees, so that the verifier sees one unknown bit, not constants: a
/// constant 0 on some paths and another value on others, once a branch
/// depends on it, keeps the paths apart and has the rest of the program
/// verified once for each (docs/design.md, "Hairpin": with the flag set on
/// marked packets only and the peer chosen by a branch, to_pod took 996k
/// verified instructions instead of 844k).
#[inline(always)]
pub fn hairpin_bit(ctx: &TcContext) -> u8 {
    mark_hairpin_bit(ctx)
}

/// `hairpin_bit` of any skb program's context (a fresh load each time).
#[inline(always)]
fn mark_hairpin_bit<C: Skb>(ctx: &C) -> u8 {
    // SAFETY: TC and cgroup skb contexts are valid __sk_buffs.
    let mark = unsafe { core::ptr::read_volatile(&(*ctx.as_ptr().cast::<__sk_buff>()).mark) };
    ((mark >> EGRESS_DEFERRED_MARK.trailing_zeros()) & 1) as u8
}

/// Is the packet's mark carrying `EGRESS_DEFERRED_MARK`?
#[inline(always)]
pub fn marked_deferred(ctx: &TcContext) -> bool {
    // SAFETY: as in mark_deferred.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark & EGRESS_DEFERRED_MARK != 0 }
}

/// 0. The sender's EGRESS of a packet marked `EGRESS_DEFERRED_MARK`, judged
///    in the backend's `to_pod` after kube-proxy's DNAT: the sender is found
///    by its address (ipcache: a local endpoint's id, then EP_BY_ID and
///    ENDPOINTS); conntrack of the sender on the translated tuple (its
///    `CT_KEY_DEFERRED` entry), else its egress policy against the real
///    destination and port. A drop is counted and reported as the sender's
///    egress drop. A source that is not a local endpoint (kube-proxy
///    masqueraded it to the node's address) is the sender `own` (the
///    receiver, in `to_pod`) on a hairpin, when the packet carried that
///    endpoint's own tag; else it cannot be judged here and passes.
#[inline(always)]
pub fn deferred_egress<C: Skb>(
    ctx: &C,
    pkt: &Packet,
    own: Option<&EndpointInfo>,
) -> Result<(), i32> {
    let src = Key::new(
        128,
        IpcacheKey {
            addr: pkt.saddr.bytes(),
        },
    );
    let ep_id = match IPCACHE.get(&src) {
        Some(v) => v.ep_id,
        None => 0,
    };
    // A hairpin (`Packet::hairpin`, not a branch of the caller's: see
    // `hairpin_bit`) comes from `own`, the receiving endpoint.
    let sender = if ep_id != 0 {
        // SAFETY: map values, read-only for this run.
        let found = match unsafe { EP_BY_ID.get(&ep_id) } {
            Some(ifindex) => unsafe { ENDPOINTS.get(ifindex) },
            None => None,
        };
        let Some(found) = found.filter(|s| s.ep_id == ep_id) else {
            // The ipcache says local, the endpoint maps disagree: the
            // sender is going away. Fail closed.
            return drop_packet(ctx, ep_id, DIR_EGRESS, UNKNOWN_ENDPOINT, *pkt).map(|_| ());
        };
        found
    } else {
        match own {
            // Read again from the mark, not from `pkt`: a branch on
            // `pkt.hairpin` here would tell the verifier its value for the
            // rest of the program (see `hairpin_bit`).
            Some(own) if mark_hairpin_bit(ctx) != 0 => own,
            _ => return Ok(()),
        }
    };
    let ep_id = sender.ep_id;
    // A later fragment follows its first, whose verdict (this one's and the
    // backend's) the backend's FRAGS entry holds (step 6).
    if pkt.frag == FRAG_LATER {
        return Ok(());
    }
    let now = now_ns();
    let (key, src_is_lo) = flow_key(
        ep_id,
        &pkt.saddr,
        pkt.sport,
        &pkt.daddr,
        pkt.dport,
        (pkt.proto, CT_KEY_DEFERRED),
    );
    // Only the sender's packets meet this entry (replies are translated
    // back before they reach it): an ACK from the sender stands for the
    // reply it has seen.
    let implied = if pkt.tcp_flags & TCP_ACK != 0 {
        CT_SEEN_REPLY
    } else {
        0
    };
    let epoch = current_epoch();
    let tracked = hit_and_refresh(
        &key,
        src_is_lo,
        pkt.tcp_flags,
        implied,
        now,
        epoch,
        |k, f| rejudge(sender, k, f),
    );
    let verdict = match tracked {
        Tracked::Hit(_) => return Ok(()),
        Tracked::Revoked => Err(REVOKED),
        Tracked::Miss => new_flow(sender, DIR_EGRESS, *pkt, &key, now),
    };
    match verdict {
        Ok(()) => Ok(()),
        Err(why) => {
            if pkt.frag == FRAG_FIRST {
                let key = frag_key(&pkt.saddr, &pkt.daddr, pkt.frag_id, pkt.proto);
                let denied = FragValue {
                    sport: pkt.sport,
                    dport: pkt.dport,
                    allowed: 0,
                };
                let _unrecorded = FRAGS.insert(&key, &denied, 0);
            }
            drop_packet(ctx, ep_id, DIR_EGRESS, why, *pkt).map(|_| ())
        }
    }
}
