//! The kernel ABI of Sluice: every type and constant that the TC programs and
//! user space both read. `no_std`, `#[repr(C)]`, no `bool`/`Option`/enums in
//! map values: flags are `u32` with named constants and every struct has its
//! padding spelled out, so the layout is the same on both sides of the
//! syscall. With the `user` feature the types also implement `aya::Pod`.
//!
//! Addresses are stored as 16 bytes in network order; IPv4 addresses are
//! IPv4-mapped (`::ffff:a.b.c.d`), so one LPM trie serves both families and
//! an IPv4 prefix of length `n` is stored with length `96 + n` (module
//! `addr`).
//!
//! Besides the ABI, the few helpers both sides (or several host crates)
//! would otherwise each write: `port_mask`, `addr`, and with the `std`
//! feature `not_found_ok`, with `netlink` `netlink::errno`.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

/// Map names, as declared by the TC programs and pinned by name in bpffs.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const IPCACHE: &str = "IPCACHE";
    pub const POLICY: &str = "POLICY";
    pub const CIDRS: &str = "CIDRS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FRAGS: &str = "FRAGS";
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    pub const DROP_EVENTS: &str = "DROP_EVENTS";
    pub const EVENT_RATE: &str = "EVENT_RATE";
    pub const STATS: &str = "STATS";
    pub const SERVICES: &str = "SERVICES";
    pub const EP_BY_ID: &str = "EP_BY_ID";
    pub const EPOCH: &str = "EPOCH";
    pub const RULE_DROPS: &str = "RULE_DROPS";
    pub const TIER_PROFILES: &str = "TIER_PROFILES";
    pub const PEER_CLASSES: &str = "PEER_CLASSES";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
}

/// Program names (the `#[classifier]` and `#[cgroup_skb]` functions).
pub mod programs {
    /// TC ingress on the host end of a pod's veth: packets the pod sends.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress on the host end of a pod's veth: packets sent to the pod.
    pub const TO_POD: &str = "to_pod";
    /// TC egress of the node's uplinks: deferred (Service) egress to pods
    /// on other nodes.
    pub const TO_UPLINK: &str = "to_uplink";
    /// cgroup skb ingress (a `#[cgroup_skb]`): deferred (Service) egress
    /// delivered to the node itself.
    pub const TO_HOST: &str = "to_host";
}

/// Default map sizes; the agent may override them at load time.
pub mod sizes {
    pub const ENDPOINTS: u32 = 16_384;
    pub const IPCACHE: u32 = 262_144;
    pub const POLICY: u32 = 1_048_576;
    pub const CIDRS: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGS: u32 = 8_192;
    pub const DROP_COUNTERS: u32 = 65_536;
    pub const DROP_EVENTS_BYTES: u32 = 1 << 20;
    pub const EVENT_RATE: u32 = 65_536;
    pub const SERVICES: u32 = 65_536;
    /// ClusterNetworkPolicy rules that dropped something.
    pub const RULE_DROPS: u32 = 65_536;
    /// `EP_BY_ID` holds one entry per endpoint, like `ENDPOINTS`.
    pub const EP_BY_ID: u32 = ENDPOINTS;
    /// `TIER_PROFILES`: at most one entry per endpoint.
    pub const TIER_PROFILES: u32 = ENDPOINTS;
    /// `PEER_CLASSES`: at most one entry per identity.
    pub const PEER_CLASSES: u32 = 65_536;
}

/// Traffic direction, from the pod's point of view (as NetworkPolicy says it).
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Reserved identities. Identities from the agent start at `IDENTITY_FIRST_USER`.
pub const IDENTITY_ANY: u32 = 0; // wildcard peer in a policy key
pub const IDENTITY_HOST: u32 = 1; // the node itself (kubelet probes)
pub const IDENTITY_WORLD: u32 = 2; // an address the ipcache does not know
pub const IDENTITY_FIRST_USER: u32 = 256;
/// Identities of per-endpoint CIDR groups (ipBlock) carry this bit, so they
/// can never collide with a pod identity.
pub const IDENTITY_CIDR_FLAG: u32 = 1 << 31;

/// `PolicyKey::ep_id` of the entries of a ClusterNetworkPolicy profile
/// (the entries shared by every endpoint selected by the same set of
/// ClusterNetworkPolicies, docs/design.md "Tiers"): this bit and the profile
/// id. Their `identity` is a peer class (`PEER_CLASSES`), not an identity.
/// Endpoint ids never have this bit.
pub const PROFILE_KEY_FLAG: u32 = 1 << 31;

/// `EndpointInfo::flags`
pub const EP_INGRESS_ISOLATED: u32 = 1 << 0;
pub const EP_EGRESS_ISOLATED: u32 = 1 << 1;
/// Deny all IP traffic of this endpoint (its policy could not be programmed).
pub const EP_FAIL_CLOSED: u32 = 1 << 2;
pub const EP_HAS_IPV4: u32 = 1 << 3;
pub const EP_HAS_IPV6: u32 = 1 << 4;
/// ClusterNetworkPolicy (Admin or Baseline tier) entries exist for this
/// endpoint's ingress / egress: the data path then folds the tiers of every
/// hit (docs/design.md, "Tiers"). Without it a direction is judged by
/// NetworkPolicy alone, with the early exit of the first allowing hit.
pub const EP_INGRESS_TIERED: u32 = 1 << 5;
pub const EP_EGRESS_TIERED: u32 = 1 << 6;
/// The endpoint's hairpin tag (docs/design.md, "Hairpin"): a number in
/// 1..=`HAIRPIN_TAG_MAX` that no other live endpoint of the node has (0:
/// none), kept in these bits of `flags`, the same bits that carry it in
/// `skb->mark` (`EGRESS_SENDER_TAG_MASK`).
pub const EP_HAIRPIN_TAG_MASK: u32 = EGRESS_SENDER_TAG_MASK;
/// Shift of the hairpin tag in `EndpointInfo::flags` and in the mark.
pub const HAIRPIN_TAG_SHIFT: u32 = 22;
/// The largest hairpin tag (10 bits).
pub const HAIRPIN_TAG_MAX: u32 = EGRESS_SENDER_TAG_MASK >> HAIRPIN_TAG_SHIFT;

/// The `flags` bits of hairpin tag `tag` (0 for none; larger tags than
/// `HAIRPIN_TAG_MAX` are none too).
pub const fn hairpin_tag_bits(tag: u32) -> u32 {
    if tag > HAIRPIN_TAG_MAX {
        0
    } else {
        tag << HAIRPIN_TAG_SHIFT
    }
}

/// Bit of `EndpointInfo::port_plens[dir]` that says any-protocol entries
/// (a rule with no ports) exist; bits 0..=16 say that entries with that
/// port prefix length exist.
pub const PLEN_ANY_PROTO_BIT: u32 = 17;
/// Bit of `EndpointInfo::port_plens[dir]`: entries for any peer
/// (`IDENTITY_ANY`) exist. Without it the data path skips that lookup.
pub const PLEN_ANY_PEER_BIT: u32 = 18;
/// Bit of `EndpointInfo::port_plens[dir]`: entries for CIDR groups
/// (ipBlock) exist. Without it the data path skips the CIDRS lookup: a
/// prefix whose group has no entry can allow nothing.
pub const PLEN_CIDR_PEER_BIT: u32 = 19;

/// The `port_plens` bits a policy entry needs: its port prefix length (or
/// any-protocol) and, for any-peer and CIDR-group entries, their peer bit.
pub const fn plen_bits(identity: u32, proto: u8, plen: u8) -> u32 {
    let len = if proto == 0 {
        1 << PLEN_ANY_PROTO_BIT
    } else {
        1u32 << (plen & 31)
    };
    let peer = if identity == IDENTITY_ANY {
        1 << PLEN_ANY_PEER_BIT
    } else if identity & IDENTITY_CIDR_FLAG != 0 {
        1 << PLEN_CIDR_PEER_BIT
    } else {
        0
    };
    len | peer
}

/// One pod interface, keyed by the ifindex of the host end of its veth (the
/// program reads it from the skb). `ep_id` is not the ifindex: the agent
/// allocates it from a counter it persists, so an id is never reused, and it
/// keys the endpoint in the other maps; `EP_BY_ID` maps it back to the
/// ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ep_id: u32,
    pub flags: u32,
    /// The pod's own identity (for events; peers are found in the ipcache).
    pub identity: u32,
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    /// Per direction: which port prefix lengths have entries (see
    /// `PLEN_ANY_PROTO_BIT`). The program only looks up those.
    pub port_plens: [u32; 2],
}

/// Policy map key (hash). A rule allowing `port..=end_port` is written as the
/// aligned blocks that cover the range, each with its prefix length
/// (`plen` 16 = one port, 0 = any port of `proto`). `proto` 0 with `plen` 0 is
/// "any protocol, any port". `port` is in host order and masked to `plen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub ep_id: u32,
    pub identity: u32,
    pub port: u16,
    pub proto: u8,
    pub dir: u8,
    pub plen: u8,
    pub _pad: [u8; 3],
}

/// `PolicyValue::flags`: a NetworkPolicy rule allows this key.
pub const POLICY_ALLOW: u32 = 1 << 0;
/// An Admin-tier ClusterNetworkPolicy rule matches this key:
/// `admin_rank`, `admin_rule` and the action in `POLICY_ADMIN_ACTION_*`.
pub const POLICY_ADMIN: u32 = 1 << 1;
/// A Baseline-tier rule matches this key: `baseline_rank`, `baseline_rule`
/// and `POLICY_BASELINE_DENY` (else Accept).
pub const POLICY_BASELINE: u32 = 1 << 2;
/// The Admin action, two bits at `POLICY_ADMIN_ACTION_SHIFT`.
pub const POLICY_ADMIN_ACTION_SHIFT: u32 = 3;
pub const POLICY_ADMIN_ACTION_MASK: u32 = 3 << POLICY_ADMIN_ACTION_SHIFT;
pub const POLICY_BASELINE_DENY: u32 = 1 << 5;

/// ClusterNetworkPolicy actions, as stored in `PolicyValue::flags`.
pub mod action {
    pub const ACCEPT: u32 = 0;
    pub const DENY: u32 = 1;
    pub const PASS: u32 = 2;
}

/// Value of a policy key: what each tier says about the traffic the key
/// matches. One lookup answers for every tier; the data path folds the
/// values of the keys a flow hits (lowest rank per tier, any NetworkPolicy
/// allow) and decides Admin, then NetworkPolicy, then Baseline.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub flags: u32,
    /// Opaque id of the NetworkPolicy rule that allows the key (with
    /// `POLICY_ALLOW`), for observability.
    pub rule_id: u32,
    /// Global order of the best (first) Admin rule matching the key: lower
    /// is earlier (priority, then policy name, then rule index).
    pub admin_rank: u32,
    pub admin_rule: u32,
    /// The same for the Baseline tier.
    pub baseline_rank: u32,
    pub baseline_rule: u32,
}

/// Rule ids of ClusterNetworkPolicy rules carry this bit (NetworkPolicy
/// rule ids never do), so one id space names both in events and conntrack.
pub const RULE_CNP_FLAG: u32 = 1 << 31;

/// LPM data of the per-endpoint CIDR map. Prefix length counts the 64 bits of
/// `ep_id`, `dir` and padding, then the address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKey {
    pub ep_id: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
pub const CIDR_KEY_FIXED_BITS: u32 = 64;

/// Value of the CIDR map: a CIDR-group identity (`IDENTITY_CIDR_FLAG` set),
/// looked up in the policy map like a peer identity. 0 marks an `except`
/// hole: the address matches no group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrValue {
    pub group: u32,
}

/// LPM data of the ipcache (address -> identity).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKey {
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Endpoint id when the address is a local pod, else 0.
    pub ep_id: u32,
}

/// Conntrack key: one entry per (endpoint, connection), with the two sides
/// sorted (`lo` < `hi` by address then port) so that both directions of a
/// connection find the same entry with a single lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    pub ep_id: u32,
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    /// Which judgment of the endpoint the entry holds: `CT_KEY_OWN` or
    /// `CT_KEY_DEFERRED`. (`EVENT_RATE`, keyed by the same struct, puts
    /// the direction here.)
    pub kind: u8,
    pub _pad: [u8; 2],
}

/// `CtKey::kind` of the endpoint's own entries: what its `from_pod` and
/// `to_pod` judge.
pub const CT_KEY_OWN: u8 = 0;
/// `CtKey::kind` of a sender's entry for the translated tuple of a flow
/// whose egress was deferred (step 0, after kube-proxy's NAT). Kept apart
/// from the endpoint's own entries: in a hairpin (a pod reaching itself
/// through a Service) the sender's egress entry and its own ingress entry
/// have the same endpoint and tuple.
pub const CT_KEY_DEFERRED: u8 = 1;

/// `CtValue::flags`
pub const CT_ORIG_IS_LO: u32 = 1 << 0; // the originator is the `lo` side
pub const CT_ORIG_EGRESS: u32 = 1 << 1; // the pod opened the connection
pub const CT_SEEN_REPLY: u32 = 1 << 2;
pub const CT_TCP_FIN_ORIG: u32 = 1 << 3;
pub const CT_TCP_FIN_REPLY: u32 = 1 << 4;
pub const CT_TCP_RST: u32 = 1 << 5;
/// A new flow of the pod to a Service address, let through by `from_pod`
/// unjudged: its egress is judged after kube-proxy's DNAT, by the `to_pod`
/// of the backend (docs/design.md, "Services"). Every packet `from_pod`
/// matches to such an entry carries `EGRESS_DEFERRED_MARK`.
pub const CT_EGRESS_DEFERRED: u32 = 1 << 6;
/// The entry of a hairpin (docs/design.md, "Hairpin"): the flow's peer is
/// the endpoint itself, though the packets come from the node's address
/// (kube-proxy's masquerade). A flow judged again (7b) is judged with the
/// endpoint's own address as the peer.
pub const CT_HAIRPIN: u32 = 1 << 7;

/// Bit of `skb->mark` that `from_pod` sets (ORed in: other bits are kept)
/// on packets whose egress is judged after NAT, and that `to_pod` clears
/// (except on a hairpin, where it stays set as the signal of one until the
/// veth clears the mark, entering the pod's namespace). Outside
/// kube-proxy's bits (0x4000 masquerade, 0x8000 drop).
pub const EGRESS_DEFERRED_MARK: u32 = 0x0020_0000;
/// Bits of `skb->mark` that carry the sender's hairpin tag
/// (`EP_HAIRPIN_TAG_MASK`) along with `EGRESS_DEFERRED_MARK`: `from_pod`
/// writes them, `to_pod` and `to_uplink` clear them. A `to_pod` that finds
/// its own endpoint's tag on a packet whose source is no local endpoint
/// (kube-proxy masqueraded it to the node's address) knows the sender is
/// that endpoint: a hairpin. Outside kube-proxy's bits and those of the
/// tools known to share the node (kube-router 0x30000, Weave 0x60000, AWS
/// VPC CNI 0x80, netavark 0x2000); Tailscale's mask 0xff0000 covers bits
/// 21..23, but it marks only its own interface's traffic.
pub const EGRESS_SENDER_TAG_MASK: u32 = 0xffc0_0000;

/// Key of the `SERVICES` map: a Service address (ClusterIP), 16-byte form.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
}

/// `SERVICES` values: what kind of Service address this is.
pub const SERVICE_CLUSTER_IP: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` after which the entry is dead.
    pub expires_ns: u64,
    pub flags: u32,
    /// Rule that allowed the connection (from `PolicyValue::rule_id`).
    pub rule_id: u32,
    /// The policy epoch (`EPOCH`) the flow was last judged in. A packet
    /// meeting an entry of another epoch has the flow judged again, as a
    /// new flow of its original direction (docs/design.md, "Policy changes
    /// reach established flows").
    pub epoch: u32,
    pub _pad: u32,
}

/// The one index of the `EPOCH` array: the policy epoch, which the agent
/// bumps after each programming pass that changed anything.
pub const EPOCH_INDEX: u32 = 0;

/// Conntrack lifetimes by protocol and state, in seconds.
pub mod ct_timeout {
    pub const TCP_OPENING: u64 = 60;
    pub const TCP_ESTABLISHED: u64 = 21_600;
    pub const TCP_CLOSING: u64 = 10;
    pub const UDP: u64 = 60;
    pub const ICMP: u64 = 30;
    pub const OTHER: u64 = 60;
}

/// Fragment tracking: the first fragment records the ports that later
/// fragments of the same datagram (which carry no L4 header) inherit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
    /// `FRAG_ALLOWED` when the first fragment was allowed (0 when it was
    /// dropped), plus `FRAG_EGRESS_DEFERRED` when its egress was deferred.
    pub allowed: u32,
}

/// `FragValue::allowed`
pub const FRAG_ALLOWED: u32 = 1 << 0;
/// The first fragment carried `EGRESS_DEFERRED_MARK`; later ones get it too.
pub const FRAG_EGRESS_DEFERRED: u32 = 1 << 1;

/// Why a packet was dropped. Stable numbers: they appear in counters,
/// events and metrics.
pub mod reason {
    pub const POLICY_DENIED: u8 = 1;
    pub const SPOOFED_SOURCE: u8 = 2;
    pub const UNKNOWN_ENDPOINT: u8 = 3;
    pub const MALFORMED: u8 = 4;
    pub const FRAGMENT_UNKNOWN: u8 = 5;
    pub const FAIL_CLOSED: u8 = 6;
    pub const UNSUPPORTED_L3: u8 = 7;
    /// A packet of an established flow that a policy change since its
    /// entry was written denies (the flow, judged again, is not allowed).
    pub const REVOKED: u8 = 8;
    /// An Admin-tier ClusterNetworkPolicy rule with action Deny matched
    /// (the event carries the rule id).
    pub const ADMIN_DENIED: u8 = 9;
    /// A Baseline-tier Deny rule matched, and neither Admin nor a
    /// NetworkPolicy decided.
    pub const BASELINE_DENIED: u8 = 10;
    pub const MAX: u8 = 10;
    /// Not a drop: a `DropEvent` of a new flow that policy allowed (sent
    /// only while `FLOW_EVENTS` is on; `rule_id` is the allowing rule).
    /// Outside 1..=MAX, so no drop counter ever has it.
    pub const FORWARDED: u8 = 0x40;

    pub fn name(r: u8) -> &'static str {
        match r {
            POLICY_DENIED => "policy-denied",
            SPOOFED_SOURCE => "spoofed-source",
            UNKNOWN_ENDPOINT => "unknown-endpoint",
            MALFORMED => "malformed",
            FRAGMENT_UNKNOWN => "fragment-unknown",
            FAIL_CLOSED => "fail-closed",
            UNSUPPORTED_L3 => "unsupported-l3",
            REVOKED => "revoked",
            ADMIN_DENIED => "admin-denied",
            BASELINE_DENIED => "baseline-denied",
            FORWARDED => "forwarded",
            _ => "unknown",
        }
    }
}

/// Per-CPU drop counter key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ep_id: u32,
    pub reason: u8,
    pub dir: u8,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Global per-CPU statistics (array indices).
pub mod stat {
    pub const EVENTS_SENT: u32 = 0;
    /// Drop events not sent because the flow (or the CPU) is over its rate.
    pub const EVENTS_RATE_LIMITED: u32 = 1;
    /// Drop events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 2;
    pub const CT_CREATED: u32 = 3;
    pub const CT_INSERT_FAILED: u32 = 4;
    /// Packets passed, by direction: `FORWARDED + DIR_INGRESS` (to the
    /// pod) and `FORWARDED + DIR_EGRESS` (from it).
    pub const FORWARDED: u32 = 5;
    pub const COUNT: u32 = 8;
}

/// `FLOW_EVENTS[FLOW_EVENTS_INDEX]`: non-zero while the agent wants an
/// event for every allowed new flow (someone observes forwarded flows, an
/// audit-mode policy is in force, or `--flow-events`).
pub const FLOW_EVENTS_INDEX: u32 = 0;

/// At most one drop event per flow per this many nanoseconds.
pub const EVENT_FLOW_INTERVAL_NS: u64 = 1_000_000_000;

/// A drop event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub ts_ns: u64,
    pub ep_id: u32,
    /// Identity of the peer (source for ingress, destination for egress).
    pub peer_identity: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6; 0 when the packet was not IP.
    pub family: u8,
    pub proto: u8,
    pub dir: u8,
    pub reason: u8,
    pub pkt_len: u32,
    /// ICMP/ICMPv6 type and code (0 for other protocols). For echo
    /// request/reply `sport` and `dport` both hold the echo id.
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad: u16,
    /// The rule that decided the drop: a ClusterNetworkPolicy rule
    /// (`RULE_CNP_FLAG` set) for `ADMIN_DENIED` / `BASELINE_DENIED`, else 0.
    /// For `FORWARDED`, the rule that allowed the flow (a NetworkPolicy
    /// rule id, or a ClusterNetworkPolicy one with `RULE_CNP_FLAG`; 0 when
    /// the endpoint is not isolated or the peer is the node).
    pub rule_id: u32,
    pub _pad2: u32,
}

/// IP protocol numbers the data path knows.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Maps an IPv4 address (network order) into the 16-byte form.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Prefix length of a mapped IPv4 prefix.
pub const V4_MAPPED_PLEN_OFFSET: u32 = 96;

/// Mask of a port prefix length, as the policy map's `port` is masked: 16
/// keeps the whole port, 0 none of it; above 16 counts as 16.
#[inline(always)]
pub const fn port_mask(plen: u8) -> u16 {
    let plen = if plen > 16 { 16 } else { plen };
    if plen == 0 {
        0
    } else {
        u16::MAX << (16 - plen as u32)
    }
}

/// Addresses and prefixes in the 16-byte form the maps key on (IPv4
/// mapped into `::ffff:0:0/96`), and back.
pub mod addr {
    use core::net::{IpAddr, Ipv6Addr};

    /// The 16-byte form of an address.
    #[inline]
    pub fn mapped_addr(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V4(a) => super::v4_mapped(a.octets()),
            IpAddr::V6(a) => a.octets(),
        }
    }

    /// The address a 16-byte form stands for: IPv4 if it is IPv4-mapped.
    #[inline]
    pub fn unmapped_addr(a: [u8; 16]) -> IpAddr {
        let v6 = Ipv6Addr::from(a);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// The 16-byte form of a prefix (its network address) with its length
    /// in that form (`96 + n` for IPv4).
    #[cfg(feature = "std")]
    pub fn mapped(net: ipnetwork::IpNetwork) -> ([u8; 16], u32) {
        match net {
            ipnetwork::IpNetwork::V4(n) => (
                super::v4_mapped(n.network().octets()),
                super::V4_MAPPED_PLEN_OFFSET + u32::from(n.prefix()),
            ),
            ipnetwork::IpNetwork::V6(n) => (n.network().octets(), u32::from(n.prefix())),
        }
    }

    /// The prefix a 16-byte form and length stand for: IPv4 if the address
    /// is IPv4-mapped and the length covers the mapping. A length too long
    /// for the family gives the host prefix.
    #[cfg(feature = "std")]
    pub fn unmapped(addr: [u8; 16], plen: u32) -> ipnetwork::IpNetwork {
        use ipnetwork::IpNetwork;
        let v6 = Ipv6Addr::from(addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if plen >= super::V4_MAPPED_PLEN_OFFSET => {
                let p = u8::try_from(plen - super::V4_MAPPED_PLEN_OFFSET).unwrap_or(u8::MAX);
                IpNetwork::new(IpAddr::V4(v4), p).unwrap_or(IpNetwork::V4(v4.into()))
            }
            _ => {
                let p = u8::try_from(plen.min(128)).unwrap_or(128);
                IpNetwork::new(IpAddr::V6(v6), p).unwrap_or(IpNetwork::V6(v6.into()))
            }
        }
    }
}

/// A missing file is fine: `Ok(None)` for `NotFound` (a file already
/// removed, a state file not written yet), the value or any other error as
/// it was.
#[cfg(feature = "std")]
pub fn not_found_ok<T>(r: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Matching the kernel's answer to an rtnetlink request.
#[cfg(feature = "netlink")]
pub mod netlink {
    /// The errno of a netlink NACK, positive (`EEXIST`, not `-EEXIST`);
    /// `None` for any other error.
    pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
        match e {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().saturating_abs()),
            _ => None,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, with explicit padding and no
    // pointers; any bit pattern is a valid value.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for CidrValue {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for ServiceKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_structs_have_the_sizes_the_kernel_side_assumes() {
        assert_eq!(size_of::<EndpointInfo>(), 40);
        assert_eq!(size_of::<PolicyKey>(), 16);
        assert_eq!(size_of::<PolicyValue>(), 24);
        assert_eq!(size_of::<CidrKey>(), 24);
        assert_eq!(size_of::<IpcacheKey>(), 16);
        assert_eq!(size_of::<CtKey>(), 44);
        assert_eq!(size_of::<CtValue>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<CounterKey>(), 8);
        assert_eq!(size_of::<DropEvent>(), 72);
        assert_eq!(size_of::<ServiceKey>(), 16);
    }

    #[test]
    fn the_hairpin_tag_has_its_own_mark_bits_and_fits_the_flags_beside_the_others() {
        assert_eq!(EGRESS_SENDER_TAG_MASK & EGRESS_DEFERRED_MARK, 0);
        assert_eq!(EGRESS_SENDER_TAG_MASK & (0x4000 | 0x8000), 0);
        assert_eq!(HAIRPIN_TAG_MAX, 1023);
        assert_eq!(hairpin_tag_bits(1), 1 << 22);
        assert_eq!(hairpin_tag_bits(HAIRPIN_TAG_MAX), EP_HAIRPIN_TAG_MASK);
        assert_eq!(hairpin_tag_bits(HAIRPIN_TAG_MAX + 1), 0);
        let others = EP_INGRESS_ISOLATED
            | EP_EGRESS_ISOLATED
            | EP_FAIL_CLOSED
            | EP_HAS_IPV4
            | EP_HAS_IPV6
            | EP_INGRESS_TIERED
            | EP_EGRESS_TIERED;
        assert_eq!(others & EP_HAIRPIN_TAG_MASK, 0);
        assert_eq!(CT_HAIRPIN & (CT_EGRESS_DEFERRED | CT_TCP_RST), 0);
        assert_eq!(core::mem::offset_of!(CtKey, kind), 41);
    }

    #[test]
    fn conntrack_values_keep_the_epoch_after_the_rule_with_explicit_padding() {
        use core::mem::{align_of, offset_of};
        assert_eq!(align_of::<CtValue>(), 8);
        assert_eq!(offset_of!(CtValue, flags), 8);
        assert_eq!(offset_of!(CtValue, rule_id), 12);
        assert_eq!(offset_of!(CtValue, epoch), 16);
        assert_eq!(offset_of!(CtValue, _pad), 20);
    }

    #[test]
    fn tier_flags_do_not_overlap() {
        let bits = [
            POLICY_ALLOW,
            POLICY_ADMIN,
            POLICY_BASELINE,
            POLICY_ADMIN_ACTION_MASK,
            POLICY_BASELINE_DENY,
        ];
        for (i, a) in bits.iter().enumerate() {
            for b in &bits[i + 1..] {
                assert_eq!(a & b, 0);
            }
        }
        assert_eq!(
            action::PASS << POLICY_ADMIN_ACTION_SHIFT & !POLICY_ADMIN_ACTION_MASK,
            0
        );
        assert_eq!(core::mem::offset_of!(DropEvent, rule_id), 64);
    }

    #[test]
    fn every_drop_reason_up_to_max_has_a_name() {
        for r in 1..=reason::MAX {
            assert_ne!(reason::name(r), "unknown", "reason {r}");
        }
        assert_eq!(reason::name(reason::REVOKED), "revoked");
    }

    #[test]
    fn ipv4_addresses_map_into_the_ffff_prefix() {
        assert_eq!(v4_mapped([10, 0, 0, 1])[10..], [0xff, 0xff, 10, 0, 0, 1]);
    }

    #[test]
    fn port_masks_keep_the_prefix_bits_of_the_port() {
        assert_eq!(port_mask(0), 0);
        assert_eq!(port_mask(1), 0x8000);
        assert_eq!(port_mask(8), 0xff00);
        assert_eq!(port_mask(16), 0xffff);
        assert_eq!(port_mask(17), 0xffff);
        // Usable where a constant is needed.
        const EXACT: u16 = port_mask(16);
        assert_eq!(8080 & EXACT, 8080);
    }

    #[test]
    fn addresses_round_trip_through_the_mapped_form() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7));
        assert_eq!(addr::mapped_addr(v4), v4_mapped([10, 0, 0, 1]));
        assert_eq!(addr::mapped_addr(v6)[..2], [0xfd, 0]);
        for a in [v4, v6] {
            assert_eq!(addr::unmapped_addr(addr::mapped_addr(a)), a);
        }
    }
}

#[cfg(test)]
#[cfg(feature = "std")]
mod std_tests {
    use super::*;
    use ipnetwork::IpNetwork;

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("a prefix literal")
    }

    #[test]
    fn prefixes_map_to_the_network_address_and_a_mapped_length() {
        assert_eq!(
            addr::mapped(net("10.1.2.3/16")),
            (v4_mapped([10, 1, 0, 0]), 96 + 16)
        );
        let (a, plen) = addr::mapped(net("fd00::1/64"));
        assert_eq!((a[0], a[1], a[15], plen), (0xfd, 0, 0, 64));
    }

    #[test]
    fn prefixes_round_trip_and_odd_lengths_become_host_prefixes() {
        for p in [
            "10.1.0.0/16",
            "0.0.0.0/0",
            "fd00::/64",
            "::/0",
            "10.0.0.1/32",
        ] {
            let (a, plen) = addr::mapped(net(p));
            assert_eq!(addr::unmapped(a, plen), net(p), "{p}");
        }
        let (a, _) = addr::mapped(net("10.0.0.1/32"));
        assert_eq!(addr::unmapped(a, 96 + 40), net("10.0.0.1/32"));
        // A mapped address under a length shorter than the mapping is an
        // IPv6 prefix.
        assert_eq!(addr::unmapped(a, 80), net("::ffff:10.0.0.1/80"));
        assert_eq!(addr::unmapped([0; 16], 200), net("::/128"));
    }

    #[test]
    fn only_a_missing_file_is_fine() {
        use std::io::{Error, ErrorKind};
        assert_eq!(not_found_ok(Ok(3)).ok(), Some(Some(3)));
        assert_eq!(
            not_found_ok::<()>(Err(Error::from(ErrorKind::NotFound))).ok(),
            Some(None)
        );
        let denied = not_found_ok::<()>(Err(Error::from(ErrorKind::PermissionDenied)));
        assert_eq!(
            denied.map_err(|e| e.kind()),
            Err(ErrorKind::PermissionDenied)
        );
    }
}
