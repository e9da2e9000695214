//! Connection tracking: one entry per (endpoint, connection), both
//! directions under one key, so a packet costs a single lookup.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};
use sluice_common::{
    CT_ORIG_EGRESS, CT_ORIG_IS_LO, CT_SEEN_REPLY, CT_TCP_FIN_ORIG, CT_TCP_FIN_REPLY, CT_TCP_RST,
    CtKey, CtValue, DIR_EGRESS, EPOCH_INDEX, ct_timeout, proto, stat,
};

use crate::{
    keys::ct_key,
    maps::{CONNTRACK, EPOCH, count},
    parse::{Addr, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// How far the lifetime of an established flow's entry must move before
/// the entry is rewritten (see `hit_and_refresh`).
const REFRESH_NS: u64 = NS_PER_SEC;

#[inline(always)]
pub fn addr_eq(a: &Addr, b: &Addr) -> bool {
    a.words[0] == b.words[0] && a.words[1] == b.words[1]
}

/// Is side (a, ap) ordered at or before side (b, bp)? By address bytes
/// (compared as big-endian words), then port; ties (a packet to itself)
/// count as lo.
#[inline(always)]
pub fn side_le(a: &Addr, ap: u16, b: &Addr, bp: u16) -> bool {
    let (ah, al) = (u64::from_be(a.words[0]), u64::from_be(a.words[1]));
    let (bh, bl) = (u64::from_be(b.words[0]), u64::from_be(b.words[1]));
    ah < bh || (ah == bh && (al < bl || (al == bl && ap <= bp)))
}

/// The conntrack key of `kind` (`CT_KEY_*`) of a packet (saddr:sport ->
/// daddr:dport) seen on endpoint `ep_id`, and whether the source is its
/// `lo` side.
#[inline(always)]
pub fn flow_key(
    ep_id: u32,
    saddr: &Addr,
    sport: u16,
    daddr: &Addr,
    dport: u16,
    (l4, kind): (u8, u8),
) -> (CtKey, bool) {
    let src_is_lo = side_le(saddr, sport, daddr, dport);
    let key = if src_is_lo {
        ct_key(ep_id, (saddr, sport), (daddr, dport), l4, kind)
    } else {
        ct_key(ep_id, (daddr, dport), (saddr, sport), l4, kind)
    };
    (key, src_is_lo)
}

/// The address of side `addr_hi` (0: lo, 1: hi) of a conntrack key and the
/// port of side `port_hi`, read at a computed offset (`addr_hi` follows
/// `addr_lo`, `port_hi` follows `port_lo`) instead of chosen by a branch.
#[inline(always)]
pub fn ct_side(key: &CtKey, addr_hi: u32, port_hi: u32) -> ([u8; 16], u16) {
    use core::mem::{offset_of, size_of};
    const _: () = assert!(
        offset_of!(CtKey, addr_hi) == offset_of!(CtKey, addr_lo) + size_of::<[u8; 16]>()
            && offset_of!(CtKey, port_hi) == offset_of!(CtKey, port_lo) + size_of::<u16>()
    );
    let addrs = core::ptr::addr_of!(key.addr_lo);
    let ports = core::ptr::addr_of!(key.port_lo);
    // SAFETY: indices 0 or 1 of two adjacent fields of `key` (asserted
    // above); plain integers, read unaligned.
    unsafe {
        (
            core::ptr::read_unaligned(addrs.add((addr_hi & 1) as usize)),
            core::ptr::read_unaligned(ports.add((port_hi & 1) as usize)),
        )
    }
}

/// Lifetime of an entry in seconds, from its protocol and state flags.
#[inline(always)]
pub fn lifetime_secs(l4: u8, flags: u32) -> u64 {
    match l4 {
        proto::TCP => {
            if flags & CT_TCP_RST != 0
                || flags & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY)
                    == CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY
            {
                ct_timeout::TCP_CLOSING
            } else if flags & CT_SEEN_REPLY == 0 {
                ct_timeout::TCP_OPENING
            } else {
                ct_timeout::TCP_ESTABLISHED
            }
        }
        proto::UDP => ct_timeout::UDP,
        proto::ICMP | proto::ICMPV6 => ct_timeout::ICMP,
        _ => ct_timeout::OTHER,
    }
}

/// Flags after a packet from the originator (`from_orig`) or the other
/// side with TCP flags `tcp_flags` (0 for other protocols).
#[inline(always)]
pub fn track(flags: u32, from_orig: bool, tcp_flags: u8) -> u32 {
    let mut f = flags;
    if !from_orig {
        f |= CT_SEEN_REPLY;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= CT_TCP_RST;
    }
    if tcp_flags & TCP_FIN != 0 {
        f |= if from_orig {
            CT_TCP_FIN_ORIG
        } else {
            CT_TCP_FIN_REPLY
        };
    }
    f
}

/// bpf_ktime_get_ns(), exactly: for drop events.
#[inline(always)]
pub fn precise_now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// (jiffies, bpf_ktime_get_ns() read during that jiffy), shared by all CPUs.
/// Global data: the program reads it through a direct map value pointer.
static mut CLOCK: [u64; 2] = [0, 0];

/// bpf_ktime_get_ns() to within a jiffy, for conntrack lifetimes (seconds).
///
/// bpf_ktime_get_ns is a helper call (about 27 ns on the benchmark machine,
/// as much as an empty program), while bpf_jiffies64 is inlined by the
/// verifier into one load. So the clock is read once per jiffy (per CPU
/// that notices the new jiffy) and cached. Writers store the time before
/// the jiffy, so a reader that sees the jiffy it expects sees a time from
/// that jiffy (or a later one); the races between CPUs are benign: at worst
/// an entry lives or is refreshed a jiffy (1 to 10 ms) off.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: bpf_jiffies64 takes no arguments; CLOCK is only accessed with
    // volatile word reads and writes (no references), and any value read is
    // a valid u64.
    unsafe {
        let jiffies = bpf_jiffies64();
        let clock = &raw mut CLOCK;
        if core::ptr::read_volatile(&raw const (*clock)[0]) == jiffies {
            return core::ptr::read_volatile(&raw const (*clock)[1]);
        }
        let now = bpf_ktime_get_ns();
        core::ptr::write_volatile(&raw mut (*clock)[1], now);
        core::ptr::write_volatile(&raw mut (*clock)[0], jiffies);
        now
    }
}

/// Does this TCP packet open a connection (SYN without ACK)? Such a packet
/// is a new flow whatever conntrack holds for its 4-tuple: a client may
/// reuse the tuple of a connection closed moments ago (whose entry lives on
/// as `TCP_CLOSING`), and the new connection must meet today's policy, as
/// netfilter's conntrack treats it. (`tcp_flags` is 0 for other protocols.)
#[inline(always)]
pub fn opens_connection(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The policy epoch in force (`EPOCH`). Read before a flow is judged, so
/// that an entry never records an epoch newer than the policy that judged
/// it (the agent writes the policy, then bumps).
#[inline(always)]
pub fn current_epoch() -> u32 {
    match EPOCH.get(EPOCH_INDEX) {
        Some(e) => *e,
        None => 0,
    }
}

/// A judgment of a flow: the rule id that allows it (bits 0..32), or, with
/// `DENIED_BIT` set, the drop reason (bits 32..40) and the rule that denies
/// it (bits 0..32; 0 for a NetworkPolicy default deny).
pub const DENIED_BIT: u64 = 1 << 63;

/// The judgment "denied for `reason` by `rule`".
#[inline(always)]
pub const fn denied_by(reason: u8, rule: u32) -> u64 {
    DENIED_BIT | ((reason as u64) << 32) | rule as u64
}

#[inline(always)]
pub const fn is_denied(v: u64) -> bool {
    v & DENIED_BIT != 0
}

/// What the conntrack lookup of a packet found.
pub enum Tracked {
    /// No live entry (or a packet that opens a TCP connection).
    Miss,
    /// A live entry of the current epoch (or judged again and allowed):
    /// its flags after this packet.
    Hit(u32),
    /// A live entry of an older epoch whose flow today's policy denies.
    Revoked,
}

/// Looks the flow up; on a live entry updates its state (with `implied`
/// flags ORed in) and lifetime and returns its flags. `src_is_lo` says
/// which side sent this packet. A packet that opens a TCP connection never
/// hits: it is judged as a new flow, and `create` replaces the entry.
///
/// An entry of another epoch than `epoch` has its flow judged again by
/// `rejudge(key, flags)` (a rule id, or a judgment with `DENIED_BIT`): allowed, the entry takes
/// the epoch and the rule and the packet goes on as a hit; denied, the
/// entry is left as it is (not refreshed: each later packet is judged
/// again, until a policy allows the flow or the entry expires). The
/// established path pays one compare for this.
#[inline(always)]
pub fn hit_and_refresh(
    key: &CtKey,
    src_is_lo: bool,
    tcp_flags: u8,
    implied: u32,
    now: u64,
    epoch: u32,
    rejudge: impl FnOnce(&CtKey, u32) -> u64,
) -> Tracked {
    if opens_connection(tcp_flags) {
        return Tracked::Miss;
    }
    let Some(v) = CONNTRACK.get_ptr_mut(key) else {
        return Tracked::Miss;
    };
    // SAFETY: a pointer into a map value, valid for this program run;
    // concurrent updates from another CPU at worst lose a flag or a refresh.
    let v = unsafe { &mut *v };
    if now >= v.expires_ns {
        return Tracked::Miss;
    }
    if v.epoch != epoch {
        let rule = rejudge(key, v.flags);
        if is_denied(rule) {
            return Tracked::Revoked;
        }
        v.epoch = epoch;
        v.rule_id = rule as u32;
    }
    let from_orig = src_is_lo == (v.flags & CT_ORIG_IS_LO != 0);
    let flags = track(v.flags, from_orig, tcp_flags) | implied;
    let expires = now + lifetime_secs(key.proto, flags) * NS_PER_SEC;
    // The entry is written only when its state changes or its lifetime
    // moves by REFRESH_NS or more: not every packet (a store dirties the
    // entry's cache line, which both directions' CPUs then trade). So a
    // flow's entry may expire up to REFRESH_NS before its last packet's
    // lifetime says; lifetimes are 10 s and more.
    if flags != v.flags {
        v.flags = flags;
        v.expires_ns = expires;
    } else if expires.saturating_sub(v.expires_ns) >= REFRESH_NS {
        v.expires_ns = expires;
    }
    Tracked::Hit(flags)
}

/// The flags and epoch of the live entry for this key, if any. (No
/// refresh: used for the flows that ICMP errors quote.)
#[inline(always)]
pub fn live(key: &CtKey, now: u64) -> Option<(u32, u32)> {
    let v = CONNTRACK.get_ptr(key)?;
    // SAFETY: as in hit_and_refresh; copied out at once.
    let v = unsafe { &*v };
    if now < v.expires_ns {
        Some((v.flags, v.epoch))
    } else {
        None
    }
}

/// Creates the entry of an allowed new flow, with `extra` flags, judged in
/// policy epoch `epoch`. A failed insert is counted; the packet passes
/// anyway (its replies then meet the policy).
#[inline(always)]
pub fn create(
    key: &CtKey,
    src_is_lo: bool,
    dir: u8,
    tcp_flags: u8,
    rule_id: u32,
    extra: u32,
    now: u64,
    epoch: u32,
) {
    let mut flags = extra;
    if src_is_lo {
        flags |= CT_ORIG_IS_LO;
    }
    if dir == DIR_EGRESS {
        flags |= CT_ORIG_EGRESS;
    }
    let flags = track(flags, true, tcp_flags);
    let value = CtValue {
        expires_ns: now + lifetime_secs(key.proto, flags) * NS_PER_SEC,
        flags,
        rule_id,
        epoch,
        _pad: 0,
    };
    // BPF_ANY: an expired entry of the same key is replaced.
    match CONNTRACK.insert(key, &value, 0) {
        Ok(()) => count(stat::CT_CREATED),
        Err(_) => count(stat::CT_INSERT_FAILED),
    }
}
