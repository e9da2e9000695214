//! Header parsing. Every read is a copy (`load`: from the bounds-checked
//! packet pointer, or `ctx.load` where the header is not in the linear
//! data), so a truncated packet shows up as a failed load, which the caller
//! reports as MALFORMED.
use aya_ebpf::{
    EbpfContext as _,
    programs::{SkBuffContext, TcContext},
};
use sluice_common::proto;

/// A socket buffer the parser reads: TC's starts at the Ethernet header, a
/// cgroup program's at the IP header.
pub trait Skb: aya_ebpf::EbpfContext {
    /// Where the IP header starts.
    const L3_OFF: u32;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn len(&self) -> u32;
}

impl Skb for TcContext {
    const L3_OFF: u32 = ETH_HLEN;
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
}

impl Skb for SkBuffContext {
    const L3_OFF: u32 = 0;
    #[inline(always)]
    fn data(&self) -> usize {
        SkBuffContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        SkBuffContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        SkBuffContext::len(self)
    }
}

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

pub const FAMILY_NONE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `Packet::frag`
pub const FRAG_NONE: u8 = 0;
/// Offset 0 with more fragments to come: carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// Offset != 0: no L4 header.
pub const FRAG_LATER: u8 = 2;

/// IPv6 extension headers walked before giving up (MALFORMED).
pub const MAX_EXT_HDRS: u32 = 8;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A 16-byte address (IPv4 mapped), kept as two words in memory (network)
/// order: it compares as two u64 and is built without byte stores.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Addr {
    pub words: [u64; 2],
}

impl Addr {
    pub const ZERO: Self = Self { words: [0, 0] };

    #[inline(always)]
    pub fn from_bytes(b: [u8; 16]) -> Self {
        // SAFETY: 16 bytes to two u64, every bit pattern valid.
        Self {
            words: unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(b) },
        }
    }

    /// `::ffff:a.b.c.d`
    #[inline(always)]
    pub fn v4_mapped(a: [u8; 4]) -> Self {
        Self {
            words: [
                0,
                u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]),
            ],
        }
    }

    #[inline(always)]
    pub fn bytes(&self) -> [u8; 16] {
        // SAFETY: as in from_bytes.
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(self.words) }
    }
}

/// What the parser found, as far as it got. Addresses are 16-byte (IPv4
/// mapped); ports are in host order. For ICMP echo both ports hold the echo
/// id, so that a request and its reply share a conntrack key.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: Addr,
    pub daddr: Addr,
    pub frag_id: u32,
    /// Offset of the L4 header (for FRAG_LATER: of the payload).
    pub l4_off: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub frag: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Not parsed: set by `to_pod` (step 0) on a hairpin, a packet from
    /// the endpoint itself that kube-proxy masqueraded to the node's
    /// address. Its peer is then the destination (the endpoint's own
    /// address) in both directions. 0 or 1.
    pub hairpin: u8,
}

impl Packet {
    pub const fn empty() -> Self {
        Self {
            saddr: Addr::ZERO,
            daddr: Addr::ZERO,
            frag_id: 0,
            l4_off: 0,
            sport: 0,
            dport: 0,
            family: FAMILY_NONE,
            proto: 0,
            frag: FRAG_NONE,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            hairpin: 0,
        }
    }

    /// The address of the flow's source as judged: the sender's own
    /// (the destination) on a hairpin. Chosen by address arithmetic, not
    /// a branch: `daddr` follows `saddr`, and the verifier sees one stack
    /// pointer with an unknown offset of 0 or 16, where a branch on
    /// `hairpin` would make it check every later step (the whole policy
    /// judgment) once for each way (docs/design.md, "Hairpin").
    #[inline(always)]
    pub fn judged_saddr(&self) -> &Addr {
        const _: () = assert!(
            core::mem::offset_of!(Packet, daddr)
                == core::mem::offset_of!(Packet, saddr) + core::mem::size_of::<Addr>()
        );
        let first = core::ptr::addr_of!(self.saddr);
        // SAFETY: `hairpin & 1` is 0 or 1, and the Addr after `saddr` is
        // `daddr` (asserted above): the pointer is to a field of `self`.
        unsafe { &*first.add(usize::from(self.hairpin & 1)) }
    }
}

pub enum L3 {
    Arp,
    /// Neither ARP nor IP.
    Other,
    Ip,
}

/// Parse failure: a truncated or inconsistent header.
pub struct Malformed;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    vtc: u8,
    flow: [u8; 3],
    payload_len: [u8; 2],
    nexthdr: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// The verifier only accepts a packet pointer whose variable offset it can
/// bound: headers further in than this take the helper.
const MAX_DIRECT_OFF: u32 = 1024;

/// The `T` at `off`, read where it lies. A header in the linear part of the
/// skb (the usual case) is returned in place, behind the bounds-checked
/// packet pointer, so its fields are read straight into registers; the rest
/// is copied into `buf` with bpf_skb_load_bytes. (Copying every header to
/// the stack, as `load` does, cost about 25 ns per packet on the benchmark
/// machine: byte-wise stores, then wider loads of the same bytes.)
#[inline(always)]
pub fn header<'a, T, C: Skb>(
    ctx: &C,
    off: u32,
    buf: &'a mut core::mem::MaybeUninit<T>,
) -> Result<&'a T, Malformed> {
    let at = ctx.data() + off as usize;
    if off <= MAX_DIRECT_OFF && at + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: [at, at + size_of::<T>()) lies inside the packet's linear
        // data (checked just above, and by the verifier), which lives for
        // the program run; T is a plain byte array or a struct of them
        // (alignment 1), valid for any bytes.
        return Ok(unsafe { &*(at as *const T) });
    }
    // SAFETY: the helper writes exactly size_of::<T>() bytes into buf or
    // fails; T is valid for any bytes.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            aya_ebpf::EbpfContext::as_ptr(ctx),
            off,
            buf.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    if ret != 0 {
        return Err(Malformed);
    }
    // SAFETY: initialised by the helper.
    Ok(unsafe { buf.assume_init_ref() })
}

/// A copy of the `T` at `off` (see `header`; for the rare paths, where a
/// copy on the stack does not matter).
#[inline(always)]
pub fn load<T: Copy, C: Skb>(ctx: &C, off: u32) -> Result<T, Malformed> {
    let mut buf = core::mem::MaybeUninit::uninit();
    header(ctx, off, &mut buf).copied()
}

/// Parses Ethernet, IP and L4 headers into `pkt`. On `Err`, `pkt` holds
/// what was parsed before the failure (for the drop event).
#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<L3, Malformed> {
    let mut buf = core::mem::MaybeUninit::uninit();
    let ethertype = be16(*header::<[u8; 2], _>(ctx, 12, &mut buf)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, pkt)?,
        ETH_P_IPV6 => parse_ipv6(ctx, pkt)?,
        ETH_P_ARP => return Ok(L3::Arp),
        _ => return Ok(L3::Other),
    }
    if pkt.frag != FRAG_LATER {
        parse_l4(ctx, pkt)?;
    }
    Ok(L3::Ip)
}

/// Parses IP and L4 headers of a packet that starts at its IP header (a
/// cgroup program's view), as `parse` does after Ethernet.
#[inline(always)]
pub fn parse_ip(ctx: &SkBuffContext, pkt: &mut Packet) -> Result<(), Malformed> {
    // The family from skb->protocol (an ethertype, network order): the
    // verifier grants no range for a direct read at offset 0 bounded by
    // `data < data_end`, the form a one-byte check compiles to.
    // SAFETY: the context of a cgroup skb program is a valid __sk_buff.
    let protocol = unsafe { (*ctx.as_ptr().cast::<aya_ebpf::bindings::__sk_buff>()).protocol };
    if protocol == u32::from(ETH_P_IP.to_be()) {
        parse_ipv4(ctx, pkt)?;
    } else if protocol == u32::from(ETH_P_IPV6.to_be()) {
        parse_ipv6(ctx, pkt)?;
    } else {
        return Err(Malformed);
    }
    if pkt.frag != FRAG_LATER {
        parse_l4(ctx, pkt)?;
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv4<C: Skb>(ctx: &C, pkt: &mut Packet) -> Result<(), Malformed> {
    let mut buf = core::mem::MaybeUninit::uninit();
    let h: &Ipv4Hdr = header(ctx, C::L3_OFF, &mut buf)?;
    pkt.family = FAMILY_V4;
    pkt.saddr = Addr::v4_mapped(h.saddr);
    pkt.daddr = Addr::v4_mapped(h.daddr);
    pkt.proto = h.proto;
    let ihl = u32::from(h.vihl & 0x0f);
    if h.vihl >> 4 != 4 || ihl < 5 {
        return Err(Malformed);
    }
    pkt.l4_off = C::L3_OFF + ihl * 4;
    // Options must be there even when nothing after them is read.
    if pkt.l4_off > ctx.len() {
        return Err(Malformed);
    }
    pkt.frag = ipv4_frag(be16(h.frag_off));
    pkt.frag_id = u32::from(be16(h.id));
    Ok(())
}

/// Fragment state of an IPv4 `frag_off` field (flags and offset).
#[inline(always)]
pub fn ipv4_frag(frag_off: u16) -> u8 {
    const MF: u16 = 0x2000;
    const OFFSET: u16 = 0x1fff;
    if frag_off & OFFSET != 0 {
        FRAG_LATER
    } else if frag_off & MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

#[inline(always)]
fn parse_ipv6<C: Skb>(ctx: &C, pkt: &mut Packet) -> Result<(), Malformed> {
    let mut buf = core::mem::MaybeUninit::uninit();
    let h: &Ipv6Hdr = header(ctx, C::L3_OFF, &mut buf)?;
    pkt.family = FAMILY_V6;
    pkt.saddr = Addr::from_bytes(h.saddr);
    pkt.daddr = Addr::from_bytes(h.daddr);
    if h.vtc >> 4 != 6 {
        return Err(Malformed);
    }
    let mut nexthdr = h.nexthdr;
    let mut off = C::L3_OFF + 40;
    // Walk at most MAX_EXT_HDRS extension headers; a chain that is still
    // going after that is MALFORMED (a bounded loop for the verifier, and
    // no legitimate packet needs more).
    for _ in 0..MAX_EXT_HDRS {
        match nexthdr {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e: [u8; 2] = load(ctx, off)?;
                nexthdr = e[0];
                off += (u32::from(e[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e: [u8; 2] = load(ctx, off)?;
                nexthdr = e[0];
                off += (u32::from(e[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let f: [u8; 8] = load(ctx, off)?;
                nexthdr = f[0];
                off += 8;
                let fo = be16([f[2], f[3]]);
                pkt.frag_id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
                if fo >> 3 != 0 {
                    // No more headers: what follows is a piece of payload.
                    pkt.frag = FRAG_LATER;
                    break;
                }
                // Offset 0 without M is an atomic fragment (RFC 6946): a
                // whole datagram.
                pkt.frag = if fo & 1 != 0 { FRAG_FIRST } else { FRAG_NONE };
            }
            _ => break,
        }
    }
    if pkt.frag != FRAG_LATER && is_ext_hdr(nexthdr) {
        return Err(Malformed);
    }
    pkt.proto = nexthdr;
    pkt.l4_off = off;
    if pkt.l4_off > ctx.len() {
        return Err(Malformed);
    }
    Ok(())
}

#[inline(always)]
fn is_ext_hdr(nexthdr: u8) -> bool {
    matches!(
        nexthdr,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}

#[inline(always)]
fn parse_l4<C: Skb>(ctx: &C, pkt: &mut Packet) -> Result<(), Malformed> {
    match pkt.proto {
        proto::TCP => {
            // The whole fixed header must be there, not only the ports.
            let mut buf = core::mem::MaybeUninit::uninit();
            let t: &[u8; 20] = header(ctx, pkt.l4_off, &mut buf)?;
            pkt.sport = be16([t[0], t[1]]);
            pkt.dport = be16([t[2], t[3]]);
            pkt.tcp_flags = t[13];
        }
        proto::UDP => {
            let mut buf = core::mem::MaybeUninit::uninit();
            let u: &[u8; 8] = header(ctx, pkt.l4_off, &mut buf)?;
            pkt.sport = be16([u[0], u[1]]);
            pkt.dport = be16([u[2], u[3]]);
        }
        proto::SCTP => {
            // Common header: ports as in UDP, then tag and checksum.
            let mut buf = core::mem::MaybeUninit::uninit();
            let s: &[u8; 12] = header(ctx, pkt.l4_off, &mut buf)?;
            pkt.sport = be16([s[0], s[1]]);
            pkt.dport = be16([s[2], s[3]]);
        }
        proto::ICMP | proto::ICMPV6 if icmp_matches_family(pkt.proto, pkt.family) => {
            let mut buf = core::mem::MaybeUninit::uninit();
            let i: &[u8; 8] = header(ctx, pkt.l4_off, &mut buf)?;
            pkt.icmp_type = i[0];
            pkt.icmp_code = i[1];
            if is_echo(pkt.proto, i[0]) {
                let id = be16([i[4], i[5]]);
                pkt.sport = id;
                pkt.dport = id;
            }
        }
        // Other protocols have no ports: port 0.
        _ => {}
    }
    Ok(())
}

/// ICMP belongs to IPv4 and ICMPv6 to IPv6; the other pairings are just
/// unknown protocols (port 0).
#[inline(always)]
pub fn icmp_matches_family(l4: u8, family: u8) -> bool {
    (l4 == proto::ICMP && family == FAMILY_V4) || (l4 == proto::ICMPV6 && family == FAMILY_V6)
}

/// Echo request or reply (the id then stands in for both ports).
#[inline(always)]
pub fn is_echo(l4: u8, icmp_type: u8) -> bool {
    match l4 {
        proto::ICMP => icmp_type == 0 || icmp_type == 8,
        proto::ICMPV6 => icmp_type == 128 || icmp_type == 129,
        _ => false,
    }
}

/// ICMP errors that quote a packet of an existing flow: destination
/// unreachable, time exceeded, parameter problem (and packet too big in v6).
#[inline(always)]
pub fn is_icmp_error(pkt: &Packet) -> bool {
    if !icmp_matches_family(pkt.proto, pkt.family) || pkt.frag == FRAG_LATER {
        return false;
    }
    match pkt.proto {
        proto::ICMP => matches!(pkt.icmp_type, 3 | 11 | 12),
        _ => matches!(pkt.icmp_type, 1..=4),
    }
}

/// IPv6 neighbour discovery and MLD (router/neighbour solicitation and
/// advertisement, redirect, MLD query/report/done, MLDv2 report). Only
/// whole datagrams: RFC 6980 forbids fragmented ND.
#[inline(always)]
pub fn is_nd_or_mld(pkt: &Packet) -> bool {
    pkt.family == FAMILY_V6
        && pkt.proto == proto::ICMPV6
        && pkt.frag == FRAG_NONE
        && matches!(pkt.icmp_type, 130..=137 | 143)
}

/// The 5-tuple of the packet an ICMP error quotes (source, destination as
/// the quoted packet had them).
pub struct Inner {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parses the IP header and first 8 bytes of L4 quoted by an ICMP error.
/// IPv6 quotes with extension headers are not followed (their key has the
/// extension header as protocol and matches no flow).
#[inline(never)]
pub fn parse_icmp_inner<C: Skb>(ctx: &C, pkt: &Packet) -> Option<Inner> {
    let off = pkt.l4_off + 8;
    let mut inner = Inner {
        saddr: Addr::ZERO,
        daddr: Addr::ZERO,
        sport: 0,
        dport: 0,
        proto: 0,
    };
    let l4_off;
    if pkt.family == FAMILY_V4 {
        let h: Ipv4Hdr = load(ctx, off).ok()?;
        let ihl = u32::from(h.vihl & 0x0f);
        if h.vihl >> 4 != 4 || ihl < 5 || be16(h.frag_off) & 0x1fff != 0 {
            return None;
        }
        inner.saddr = Addr::v4_mapped(h.saddr);
        inner.daddr = Addr::v4_mapped(h.daddr);
        inner.proto = h.proto;
        l4_off = off + ihl * 4;
    } else {
        let h: Ipv6Hdr = load(ctx, off).ok()?;
        if h.vtc >> 4 != 6 {
            return None;
        }
        inner.saddr = Addr::from_bytes(h.saddr);
        inner.daddr = Addr::from_bytes(h.daddr);
        inner.proto = h.nexthdr;
        l4_off = off + 40;
    }
    match inner.proto {
        proto::TCP | proto::UDP | proto::SCTP => {
            let p: [u8; 8] = load(ctx, l4_off).ok()?;
            inner.sport = be16([p[0], p[1]]);
            inner.dport = be16([p[2], p[3]]);
        }
        proto::ICMP | proto::ICMPV6 if icmp_matches_family(inner.proto, pkt.family) => {
            let p: [u8; 8] = load(ctx, l4_off).ok()?;
            if is_echo(inner.proto, p[0]) {
                let id = be16([p[4], p[5]]);
                inner.sport = id;
                inner.dport = id;
            }
        }
        // No ports; an IPv6 quote with extension headers lands here too and
        // simply matches no flow.
        _ => {}
    }
    Some(inner)
}
