//! Map keys built without `memset`.
//!
//! bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM, which sets the
//! BPF backend's MaxStoresPerMemset to 0; since LLVM 23 every `llvm.memset`
//! (even the 3 bytes of a `_pad: [0; 3]`) then becomes a call of
//! compiler_builtins' byte loop. So the keys are assembled here from
//! word-sized fields laid out exactly like the shared types, and transmuted.
use sluice_common::{CidrKey, CtKey, FragKey, PolicyKey};

use crate::parse::Addr;

/// One byte followed by three zero bytes, as the u32 they occupy in memory.
#[inline(always)]
const fn byte_pad3(b: u8) -> u32 {
    u32::from_ne_bytes([b, 0, 0, 0])
}

#[repr(C)]
struct CtKeyWords {
    ep_id: u32,
    addr_lo: [u8; 16],
    addr_hi: [u8; 16],
    port_lo: u16,
    port_hi: u16,
    proto_pad: u32,
}

/// A conntrack key of `kind` (`CT_KEY_*`; EVENT_RATE keys put the
/// direction there).
#[inline(always)]
pub fn ct_key(ep_id: u32, lo: (&Addr, u16), hi: (&Addr, u16), l4: u8, kind: u8) -> CtKey {
    let w = CtKeyWords {
        ep_id,
        addr_lo: lo.0.bytes(),
        addr_hi: hi.0.bytes(),
        port_lo: lo.1,
        port_hi: hi.1,
        proto_pad: u32::from_ne_bytes([l4, kind, 0, 0]),
    };
    // SAFETY: same size and field offsets as CtKey (repr(C) both), all
    // plain integers.
    unsafe { core::mem::transmute::<CtKeyWords, CtKey>(w) }
}

#[repr(C)]
struct PolicyKeyWords {
    ep_id: u32,
    identity: u32,
    port: u16,
    proto: u8,
    dir: u8,
    plen_pad: u32,
}

#[inline(always)]
pub fn policy_key(ep_id: u32, identity: u32, port: u16, l4: u8, dir: u8, plen: u8) -> PolicyKey {
    let w = PolicyKeyWords {
        ep_id,
        identity,
        port,
        proto: l4,
        dir,
        plen_pad: byte_pad3(plen),
    };
    // SAFETY: as in ct_key.
    unsafe { core::mem::transmute::<PolicyKeyWords, PolicyKey>(w) }
}

#[repr(C)]
struct FragKeyWords {
    saddr: [u8; 16],
    daddr: [u8; 16],
    id: u32,
    proto_pad: u32,
}

#[inline(always)]
pub fn frag_key(saddr: &Addr, daddr: &Addr, id: u32, l4: u8) -> FragKey {
    let w = FragKeyWords {
        saddr: saddr.bytes(),
        daddr: daddr.bytes(),
        id,
        proto_pad: byte_pad3(l4),
    };
    // SAFETY: as in ct_key.
    unsafe { core::mem::transmute::<FragKeyWords, FragKey>(w) }
}

#[repr(C)]
struct CidrKeyWords {
    ep_id: u32,
    dir_pad: u32,
    addr: [u8; 16],
}

#[inline(always)]
pub fn cidr_key(ep_id: u32, dir: u8, addr: &Addr) -> CidrKey {
    let w = CidrKeyWords {
        ep_id,
        dir_pad: byte_pad3(dir),
        addr: addr.bytes(),
    };
    // SAFETY: as in ct_key.
    unsafe { core::mem::transmute::<CidrKeyWords, CidrKey>(w) }
}
