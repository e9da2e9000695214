//! The TC programs on crafted packets, through BPF_PROG_TEST_RUN. Each test
//! gets its own network namespace and bpffs (see `datapath/harness.rs`);
//! run as root: `cargo test -p sluice-tests --test datapath`.

#[path = "datapath/flows.rs"]
mod flows;
#[path = "datapath/hairpin.rs"]
mod hairpin;
#[path = "datapath/harness.rs"]
mod harness;
#[path = "datapath/model.rs"]
mod model;
#[path = "datapath/packet.rs"]
mod packet;
#[path = "datapath/revoke.rs"]
mod revoke;
#[path = "datapath/services.rs"]
mod services;
#[path = "datapath/tiers.rs"]
mod tiers;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use harness::{Datapath, LOOPBACK, TC_ACT_OK, TC_ACT_SHOT, with_datapath};
use packet::*;
use sluice_common::{
    CT_ORIG_EGRESS, CT_ORIG_IS_LO, CT_SEEN_REPLY, CT_TCP_FIN_ORIG, CT_TCP_FIN_REPLY, CT_TCP_RST,
    CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_FAIL_CLOSED, EP_HAS_IPV4,
    EP_HAS_IPV6, EP_INGRESS_ISOLATED, EndpointInfo, IDENTITY_ANY, IDENTITY_CIDR_FLAG,
    IDENTITY_HOST, IDENTITY_WORLD, PolicyKey, ct_timeout, proto, reason, stat,
};

const EP_ID: u32 = LOOPBACK;
const POD4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 7);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 7);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);
const PEER_ID: u32 = 300;
const ISOLATED: u32 = EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED;

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

fn endpoint(flags: u32) -> EndpointInfo {
    EndpointInfo {
        ep_id: EP_ID,
        flags: flags | EP_HAS_IPV4 | EP_HAS_IPV6,
        identity: 1000,
        ipv4: POD4.octets(),
        ipv6: POD6.octets(),
        port_plens: [0, 0],
    }
}

/// Writes an allow entry for `port` (masked to `plen`) and marks the plen in
/// the endpoint.
fn allow(
    dp: &mut Datapath,
    ep: &mut EndpointInfo,
    dir: u8,
    identity: u32,
    l4: u8,
    port: u16,
    plen: u8,
) {
    let mask = if plen == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(plen))
    };
    dp.allow(
        PolicyKey {
            ep_id: ep.ep_id,
            identity,
            port: port & mask,
            proto: l4,
            dir,
            plen,
            _pad: [0; 3],
        },
        7,
    );
    ep.port_plens[usize::from(dir)] |= sluice_common::plen_bits(identity, l4, plen);
    dp.set_endpoint(ep);
}

fn allow_any_proto(dp: &mut Datapath, ep: &mut EndpointInfo, dir: u8, identity: u32) {
    dp.allow(
        PolicyKey {
            ep_id: ep.ep_id,
            identity,
            port: 0,
            proto: 0,
            dir,
            plen: 0,
            _pad: [0; 3],
        },
        8,
    );
    ep.port_plens[usize::from(dir)] |= sluice_common::plen_bits(identity, 0, 0);
    dp.set_endpoint(ep);
}

/// The conntrack key the data path uses: sides sorted by (address bytes,
/// port).
fn ct_key(a: IpAddr, ap: u16, b: IpAddr, bp: u16, l4: u8) -> CtKey {
    let (sa, sb) = ((mapped(a), ap), (mapped(b), bp));
    let (lo, hi) = if sa <= sb { (sa, sb) } else { (sb, sa) };
    CtKey {
        ep_id: EP_ID,
        addr_lo: lo.0,
        addr_hi: hi.0,
        port_lo: lo.1,
        port_hi: hi.1,
        proto: l4,
        kind: sluice_common::CT_KEY_OWN,
        _pad: [0; 2],
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The lifetime left in a conntrack entry, in whole seconds (rounded up).
fn secs_left(v: &CtValue) -> u64 {
    v.expires_ns
        .saturating_sub(mono_ns())
        .div_ceil(1_000_000_000)
}

fn pass(dp: &Datapath, dir: u8, p: &Packet) -> bool {
    dp.passes(dir, &p.frame())
}

/// Every IP packet the test suite builds a case from, for one family.
fn all_protocols(pod: IpAddr, peer: IpAddr, outgoing: bool) -> Vec<Packet> {
    let (s, d) = if outgoing { (pod, peer) } else { (peer, pod) };
    let echo = if pod.is_ipv4() { 8 } else { 128 };
    vec![
        Packet::tcp(s, 40000, d, 80, TCP_SYN),
        Packet::udp(s, 40001, d, 53),
        Packet::sctp(s, 40002, d, 9000),
        Packet::icmp(s, d, echo, 0, 77),
        Packet::raw(s, d, 47, vec![0; 8]),
    ]
}

#[test]
fn every_ip_protocol_passes_a_non_isolated_endpoint_in_both_directions_and_is_tracked() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        for (pod, peer) in [(v4(POD4), v4(PEER4)), (v6(POD6), v6(PEER6))] {
            for (dir, outgoing) in [(DIR_EGRESS, true), (DIR_INGRESS, false)] {
                for p in all_protocols(pod, peer, outgoing) {
                    assert!(pass(dp, dir, &p), "{p:?} dir {dir}");
                }
            }
            // The ports of each protocol were read where they are: SCTP
            // like UDP, ICMP echo from its id, GRE without any.
            assert!(
                dp.ct(&ct_key(pod, 40002, peer, 9000, proto::SCTP))
                    .is_some()
            );
            assert!(dp.ct(&ct_key(pod, 40001, peer, 53, proto::UDP)).is_some());
            let icmp = if pod.is_ipv4() {
                proto::ICMP
            } else {
                proto::ICMPV6
            };
            assert!(dp.ct(&ct_key(pod, 77, peer, 77, icmp)).is_some());
            assert!(dp.ct(&ct_key(pod, 0, peer, 0, 47)).is_some());
        }
        // One entry per flow and direction: 5 protocols x 2 directions x 2
        // families (the ingress flows come from the peer's port 40000.. to
        // the pod, a different tuple from the egress ones only for TCP, UDP
        // and SCTP; ICMP and GRE meet their egress entry).
        assert_eq!(dp.stat(stat::CT_CREATED), 2 * (5 + 3));
        // Forwarded, counted by direction: 5 protocols x 2 families each.
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            assert_eq!(dp.stat(stat::FORWARDED + u32::from(dir)), 2 * 5);
        }
    });
}

#[test]
fn arp_passes_even_when_both_directions_are_isolated_without_rules() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED | EP_FAIL_CLOSED));
        let frame = arp(POD4.octets(), PEER4.octets());
        assert_eq!(dp.run(DIR_EGRESS, &frame), TC_ACT_OK);
        assert_eq!(dp.run(DIR_INGRESS, &frame), TC_ACT_OK);
    });
}

#[test]
fn non_ip_ethertypes_pass_only_in_a_direction_that_is_not_isolated() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(EP_INGRESS_ISOLATED));
        let lldp = eth(0x88cc, &[0u8; 46]);
        assert_eq!(dp.run(DIR_EGRESS, &lldp), TC_ACT_OK);
        assert_eq!(dp.run(DIR_INGRESS, &lldp), TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::UNSUPPORTED_L3, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::UNSUPPORTED_L3, DIR_EGRESS).0, 0);
        let ev = dp.events();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].family, ev[0].reason), (0, reason::UNSUPPORTED_L3));
    });
}

#[test]
fn neighbour_discovery_and_mld_pass_under_deny_all_and_skip_anti_spoofing() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED | EP_FAIL_CLOSED));
        let unspecified = v6(Ipv6Addr::UNSPECIFIED);
        let link_local = v6("fe80::1".parse().unwrap());
        let router = v6("fe80::ff".parse().unwrap());
        let solicited = v6("ff02::1:ff00:5".parse().unwrap());
        let all_nodes = v6("ff02::1".parse().unwrap());
        let mld_routers = v6("ff02::16".parse().unwrap());
        // DAD: a neighbour solicitation from ::, then router solicitation,
        // neighbour advertisement and an MLDv2 report from the link-local
        // address (none of them the pod's address).
        for (src, dst, ty) in [
            (unspecified, solicited, 135),
            (link_local, all_nodes, 133),
            (link_local, router, 136),
            (link_local, mld_routers, 143),
            (link_local, mld_routers, 131),
        ] {
            assert!(
                pass(dp, DIR_EGRESS, &Packet::icmp(src, dst, ty, 0, 0)),
                "type {ty}"
            );
        }
        for ty in [134, 135, 136, 137, 130, 132] {
            let p = Packet::icmp(router, v6(POD6), ty, 0, 0);
            assert!(pass(dp, DIR_INGRESS, &p), "type {ty}");
        }
        // Not ND: an echo request, and an ND type in a fragment.
        let echo = Packet::icmp(router, v6(POD6), 128, 0, 1);
        assert!(!pass(dp, DIR_INGRESS, &echo));
        let fragmented = Packet::icmp(router, v6(POD6), 135, 0, 0).with_frag(0, true, 9);
        assert!(!pass(dp, DIR_INGRESS, &fragmented));
        assert_eq!(dp.drops(EP_ID, reason::FAIL_CLOSED, DIR_INGRESS).0, 2);
    });
}

#[test]
fn truncated_headers_are_dropped_as_malformed_even_where_not_isolated() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        let (pod, peer) = (v4(POD4), v4(PEER4));
        let (pod6, peer6) = (v6(POD6), v6(PEER6));
        // (packet, bytes kept): each cut inside a header the program must
        // read (L4 headers in full: TCP 20, UDP 8, SCTP 12, ICMP 8). A cut
        // inside the fixed IPv4/IPv6 header cannot be tested here:
        // BPF_PROG_TEST_RUN itself refuses such frames with EINVAL.
        let cases = [
            (Packet::tcp(peer, 1, pod, 80, TCP_SYN), 14 + 20 + 19),
            (Packet::tcp(peer, 1, pod, 80, TCP_SYN), 14 + 20 + 4),
            (Packet::udp(peer, 1, pod, 53), 14 + 20 + 7),
            (Packet::sctp(peer, 1, pod, 9), 14 + 20 + 11),
            (Packet::icmp(peer, pod, 8, 0, 1), 14 + 20 + 7),
            (Packet::tcp(peer6, 1, pod6, 80, TCP_SYN), 14 + 40 + 12),
            (Packet::udp(peer6, 1, pod6, 53), 14 + 40 + 7),
            (Packet::icmp(peer6, pod6, 128, 0, 1), 14 + 40 + 5),
            // Options announced by IHL but cut off (no L4 read needed).
            (
                Packet::raw(peer, pod, 47, vec![]).with_v4_options(&[1; 8]),
                14 + 24,
            ),
            // An extension header cut in the middle.
            (
                Packet::udp(peer6, 1, pod6, 53).with_ext(&[EXT_HOP, EXT_DEST]),
                14 + 40 + 8 + 4,
            ),
        ];
        for (i, (p, keep)) in cases.iter().enumerate() {
            let frame = p.frame();
            assert!(*keep < frame.len(), "case {i} does not truncate");
            assert_eq!(
                dp.run(DIR_INGRESS, &frame[..*keep]),
                TC_ACT_SHOT,
                "case {i}"
            );
            // The whole packet passes: the cut alone is the difference.
            assert_eq!(dp.run(DIR_INGRESS, &frame), TC_ACT_OK, "case {i} whole");
        }
        assert_eq!(
            dp.drops(EP_ID, reason::MALFORMED, DIR_INGRESS).0,
            cases.len() as u64
        );
        // The pod's own truncated packets are malformed too (not spoofed).
        let cut = Packet::udp(pod, 1, peer, 53).frame();
        assert_eq!(dp.run(DIR_EGRESS, &cut[..cut.len() - 6]), TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::MALFORMED, DIR_EGRESS).0, 1);
    });
}

#[test]
fn an_ipv4_header_with_ihl_below_five_or_a_wrong_version_is_malformed() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        let good = Packet::tcp(v4(PEER4), 1, v4(POD4), 80, TCP_SYN);
        assert_eq!(dp.run(DIR_INGRESS, &good.frame()), TC_ACT_OK);
        for ihl in [0, 1, 4] {
            let p = good.clone().with_ihl(ihl);
            assert_eq!(dp.run(DIR_INGRESS, &p.frame()), TC_ACT_SHOT, "ihl {ihl}");
        }
        let mut frame = good.frame();
        frame[14] = 0x65; // version 6 in an IPv4 ethertype
        assert_eq!(dp.run(DIR_INGRESS, &frame), TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::MALFORMED, DIR_INGRESS).0, 4);
    });
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        // NOP options: read as ports they would be 257.
        for opts in [&[1u8; 4][..], &[1; 8], &[1; 40]] {
            let ok = Packet::tcp(v4(PEER4), 1, v4(POD4), 80, TCP_SYN).with_v4_options(opts);
            assert!(pass(dp, DIR_INGRESS, &ok), "{} option bytes", opts.len());
            let no = Packet::tcp(v4(PEER4), 2, v4(POD4), 81, TCP_SYN).with_v4_options(opts);
            assert!(!pass(dp, DIR_INGRESS, &no), "{} option bytes", opts.len());
        }
    });
}

#[test]
fn ipv6_extension_header_chains_are_walked_to_the_l4_header() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        let chains: [&[u8]; 4] = [
            &[EXT_HOP],
            &[EXT_HOP, EXT_ROUTING, EXT_DEST],
            &[EXT_HOP, EXT_AUTH, EXT_DEST],
            &[
                EXT_HOP,
                EXT_DEST,
                EXT_ROUTING,
                EXT_AUTH,
                EXT_DEST,
                EXT_DEST,
                EXT_DEST,
                EXT_DEST,
            ],
        ];
        for (i, chain) in chains.iter().enumerate() {
            let sport = 1000 + i as u16;
            let ok = Packet::tcp(v6(PEER6), sport, v6(POD6), 80, TCP_SYN).with_ext(chain);
            assert!(pass(dp, DIR_INGRESS, &ok), "chain {chain:?}");
            let no = Packet::tcp(v6(PEER6), sport, v6(POD6), 81, TCP_SYN).with_ext(chain);
            assert!(!pass(dp, DIR_INGRESS, &no), "chain {chain:?}");
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 4);
        assert_eq!(dp.drops(EP_ID, reason::MALFORMED, DIR_INGRESS).0, 0);
    });
}

#[test]
fn headers_beyond_the_first_kilobyte_are_read_through_the_helper() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        // One 1032-byte hop-by-hop header puts TCP at offset 1086, past the
        // range read from the packet pointer (see parse::load).
        let big = |dport| {
            Packet::tcp(v6(PEER6), 1, v6(POD6), dport, TCP_SYN)
                .with_ext(&[EXT_HOP])
                .with_ext_units(128)
        };
        assert_eq!(big(80).ip_header_len(), 40 + 1032);
        assert!(pass(dp, DIR_INGRESS, &big(80)));
        assert!(!pass(dp, DIR_INGRESS, &big(81)));
        let frame = big(80).frame();
        assert_eq!(dp.run(DIR_INGRESS, &frame[..frame.len() - 1]), TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::MALFORMED, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 1);
    });
}

#[test]
fn an_ipv6_chain_of_more_than_eight_extension_headers_is_malformed() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        let eight = [EXT_DEST; 8];
        let ok = Packet::udp(v6(PEER6), 1, v6(POD6), 53).with_ext(&eight);
        assert!(pass(dp, DIR_INGRESS, &ok));
        let nine = [EXT_DEST; 9];
        let deep = Packet::udp(v6(PEER6), 1, v6(POD6), 53).with_ext(&nine);
        assert!(!pass(dp, DIR_INGRESS, &deep));
        // Seven plus a fragment header is eight; eight plus one is nine.
        let frag = Packet::udp(v6(PEER6), 1, v6(POD6), 53)
            .with_ext(&eight[..7])
            .with_frag(0, true, 5);
        assert!(pass(dp, DIR_INGRESS, &frag));
        let deep_frag = Packet::udp(v6(PEER6), 1, v6(POD6), 53)
            .with_ext(&eight)
            .with_frag(0, true, 6);
        assert!(!pass(dp, DIR_INGRESS, &deep_frag));
        assert_eq!(dp.drops(EP_ID, reason::MALFORMED, DIR_INGRESS).0, 2);
    });
}

/// A datagram's first fragment (ports included) and a later one.
fn fragments(src: IpAddr, dst: IpAddr, dport: u16, id: u32) -> (Packet, Packet) {
    let first = Packet::udp(src, 5555, dst, dport).with_frag(0, true, id);
    let later = Packet::raw(src, dst, proto::UDP, vec![0xab; 16]).with_frag(3, false, id);
    (first, later)
}

#[test]
fn a_later_fragment_takes_the_ports_and_verdict_of_its_first_fragment() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::UDP, 53, 16);
        for (n, (peer, pod)) in [(v4(PEER4), v4(POD4)), (v6(PEER6), v6(POD6))]
            .into_iter()
            .enumerate()
        {
            let (first, later) = fragments(peer, pod, 53, 41);
            assert!(pass(dp, DIR_INGRESS, &first));
            assert!(pass(dp, DIR_INGRESS, &later));
            let (first, later) = fragments(peer, pod, 54, 42);
            assert!(!pass(dp, DIR_INGRESS, &first));
            assert!(!pass(dp, DIR_INGRESS, &later));
            let ev = dp.events();
            assert_eq!(ev.len(), 1, "one flow, one event: {ev:?}");
            assert_eq!((ev[0].sport, ev[0].dport), (5555, 54));
            // The later fragment of the denied datagram counted as denied,
            // with the first fragment's ports (same flow: rate-limited).
            assert_eq!(dp.stat(stat::EVENTS_RATE_LIMITED), n as u64 + 1);
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 4);
        assert_eq!(dp.drops(EP_ID, reason::FRAGMENT_UNKNOWN, DIR_INGRESS).0, 0);
    });
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_only_where_isolated() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(EP_INGRESS_ISOLATED));
        for (peer, pod) in [(v4(PEER4), v4(POD4)), (v6(PEER6), v6(POD6))] {
            let (_, later_in) = fragments(peer, pod, 53, 50);
            assert!(!pass(dp, DIR_INGRESS, &later_in));
            let (_, later_out) = fragments(pod, peer, 53, 51);
            assert!(pass(dp, DIR_EGRESS, &later_out));
        }
        assert_eq!(dp.drops(EP_ID, reason::FRAGMENT_UNKNOWN, DIR_INGRESS).0, 2);
    });
}

#[test]
fn spoofed_source_addresses_are_dropped_on_egress_whether_isolated_or_not() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v4(POD4), 1, v4(PEER4), 53)
        ));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v6(POD6), 1, v6(PEER6), 53)
        ));
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v4(OTHER4), 1, v4(PEER4), 53)
        ));
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v6(OTHER6), 1, v6(PEER6), 53)
        ));
        // Ingress from anyone is not spoofing.
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::udp(v4(OTHER4), 1, v4(POD4), 53)
        ));
        assert_eq!(dp.drops(EP_ID, reason::SPOOFED_SOURCE, DIR_EGRESS).0, 2);
        // An endpoint without an IPv6 address owns no IPv6 source.
        let mut ep = endpoint(0);
        ep.flags &= !EP_HAS_IPV6;
        dp.set_endpoint(&ep);
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v6(POD6), 1, v6(PEER6), 53)
        ));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v4(POD4), 2, v4(PEER4), 53)
        ));
        // Isolated with an allow-all egress rule: still spoofing.
        let mut ep = endpoint(ISOLATED);
        allow_any_proto(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY);
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v4(OTHER4), 9, v4(PEER4), 53)
        ));
        assert_eq!(dp.drops(EP_ID, reason::SPOOFED_SOURCE, DIR_EGRESS).0, 4);
        let ev = dp.events();
        assert!(ev.iter().all(|e| e.reason == reason::SPOOFED_SOURCE));
        assert_eq!(ev[0].saddr, mapped(v4(OTHER4)));
    });
}

#[test]
fn a_fail_closed_endpoint_drops_all_ip_but_not_arp() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(EP_FAIL_CLOSED));
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::udp(v4(POD4), 1, v4(PEER4), 53)
        ));
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(v6(PEER6), 1, v6(POD6), 80, TCP_SYN)
        ));
        assert_eq!(
            dp.run(DIR_INGRESS, &arp(PEER4.octets(), POD4.octets())),
            TC_ACT_OK
        );
        assert_eq!(dp.drops(EP_ID, reason::FAIL_CLOSED, DIR_EGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::FAIL_CLOSED, DIR_INGRESS).0, 1);
    });
}

#[test]
fn an_unregistered_interface_drops_everything_as_unknown_endpoint() {
    with_datapath(|dp| {
        let p = Packet::tcp(v4(PEER4), 1234, v4(POD4), 80, TCP_SYN);
        assert!(!pass(dp, DIR_INGRESS, &p));
        assert_eq!(
            dp.run(DIR_EGRESS, &arp(POD4.octets(), PEER4.octets())),
            TC_ACT_SHOT
        );
        assert_eq!(dp.drops(0, reason::UNKNOWN_ENDPOINT, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(0, reason::UNKNOWN_ENDPOINT, DIR_EGRESS).0, 1);
        let ev = dp.events();
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].ep_id, ev[0].dport, ev[0].family), (0, 80, 4));
        assert_eq!(ev[1].family, 0);
    });
}

#[test]
fn an_isolated_endpoint_drops_new_flows_that_no_rule_allows() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED));
        for (pod, peer) in [(v4(POD4), v4(PEER4)), (v6(POD6), v6(PEER6))] {
            for p in all_protocols(pod, peer, true) {
                assert!(!pass(dp, DIR_EGRESS, &p), "{p:?}");
            }
            for p in all_protocols(pod, peer, false) {
                assert!(!pass(dp, DIR_INGRESS, &p), "{p:?}");
            }
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 10);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 10);
        assert_eq!(dp.stat(stat::CT_CREATED), 0);
    });
}

#[test]
fn isolation_in_one_direction_leaves_the_other_open() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(EP_INGRESS_ISOLATED));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1, v4(PEER4), 80, TCP_SYN)
        ));
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(v4(PEER4), 1, v4(POD4), 80, TCP_SYN)
        ));
        dp.set_endpoint(&endpoint(EP_EGRESS_ISOLATED));
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 2, v4(PEER4), 80, TCP_SYN)
        ));
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(v4(PEER4), 2, v4(POD4), 80, TCP_SYN)
        ));
    });
}

#[test]
fn a_rule_for_the_peer_identity_allows_that_identity_protocol_and_port_only() {
    with_datapath(|dp| {
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        dp.set_ipcache(mapped(v6("fd00:2::".parse().unwrap())), 64, PEER_ID);
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, PEER_ID, proto::TCP, 80, 16);
        allow(dp, &mut ep, DIR_EGRESS, PEER_ID, proto::UDP, 53, 16);
        for (pod, peer, other) in [
            (v4(POD4), v4(PEER4), v4(OTHER4)),
            (v6(POD6), v6(PEER6), v6(OTHER6)),
        ] {
            assert!(pass(
                dp,
                DIR_INGRESS,
                &Packet::tcp(peer, 1, pod, 80, TCP_SYN)
            ));
            assert!(!pass(
                dp,
                DIR_INGRESS,
                &Packet::tcp(other, 1, pod, 80, TCP_SYN)
            ));
            assert!(!pass(
                dp,
                DIR_INGRESS,
                &Packet::tcp(peer, 1, pod, 81, TCP_SYN)
            ));
            assert!(!pass(dp, DIR_INGRESS, &Packet::udp(peer, 1, pod, 80)));
            assert!(pass(dp, DIR_EGRESS, &Packet::udp(pod, 1, peer, 53)));
            assert!(!pass(dp, DIR_EGRESS, &Packet::udp(pod, 1, other, 53)));
            assert!(!pass(
                dp,
                DIR_EGRESS,
                &Packet::tcp(pod, 1, peer, 53, TCP_SYN)
            ));
        }
        // The entry that allowed a flow is remembered in conntrack.
        let v = dp
            .ct(&ct_key(v4(PEER4), 1, v4(POD4), 80, proto::TCP))
            .unwrap();
        assert_eq!(v.rule_id, 7);
        // Denied events name the peer's identity: WORLD when unknown.
        let ev = dp.events();
        let other = ev.iter().find(|e| e.saddr == mapped(v4(OTHER4))).unwrap();
        assert_eq!(other.peer_identity, IDENTITY_WORLD);
        let port81 = ev.iter().find(|e| e.dport == 81).unwrap();
        assert_eq!(port81.peer_identity, PEER_ID);
    });
}

#[test]
fn a_rule_for_any_identity_allows_every_peer_on_its_port() {
    with_datapath(|dp| {
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 443, 16);
        for peer in [v4(PEER4), v4(OTHER4)] {
            assert!(pass(
                dp,
                DIR_INGRESS,
                &Packet::tcp(peer, 1, v4(POD4), 443, TCP_SYN)
            ));
            assert!(!pass(
                dp,
                DIR_INGRESS,
                &Packet::tcp(peer, 1, v4(POD4), 444, TCP_SYN)
            ));
        }
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1, v4(PEER4), 443, TCP_SYN)
        ));
    });
}

#[test]
fn a_port_range_written_as_prefix_blocks_matches_inside_the_range_only() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        // 8000-8017 = 8000/12 (8000-8015) + 8016/15 (8016-8017).
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 8000, 12);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 8016, 15);
        for port in [7999u16, 8000, 8007, 8015, 8016, 8017, 8018, 8032, 0, 65535] {
            let p = Packet::tcp(v4(PEER4), 1, v4(POD4), port, TCP_SYN);
            let inside = (8000..=8017).contains(&port);
            assert_eq!(pass(dp, DIR_INGRESS, &p), inside, "port {port}");
        }
        // An entry whose prefix length is not announced in port_plens is
        // never looked at.
        ep.port_plens[usize::from(DIR_INGRESS)] &= !(1 << 15);
        dp.set_endpoint(&ep);
        let p = Packet::tcp(v4(PEER4), 2, v4(POD4), 8017, TCP_SYN);
        assert!(!pass(dp, DIR_INGRESS, &p));
        // Any port of a protocol: prefix length 0.
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::UDP, 0, 0);
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::udp(v4(PEER4), 1, v4(POD4), 31337)
        ));
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::sctp(v4(PEER4), 1, v4(POD4), 31337)
        ));
    });
}

#[test]
fn an_any_protocol_rule_allows_every_protocol_and_port_and_needs_its_bit() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow_any_proto(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY);
        for p in all_protocols(v6(POD6), v6(PEER6), false) {
            assert!(pass(dp, DIR_INGRESS, &p), "{p:?}");
        }
        ep.port_plens[usize::from(DIR_INGRESS)] = 0;
        dp.set_endpoint(&ep);
        for p in all_protocols(v4(POD4), v4(PEER4), false) {
            assert!(!pass(dp, DIR_INGRESS, &p), "{p:?}");
        }
    });
}

#[test]
fn a_cidr_group_allows_its_prefix_except_the_hole() {
    with_datapath(|dp| {
        let group = IDENTITY_CIDR_FLAG | 5;
        let net4 = mapped(v4(Ipv4Addr::new(10, 3, 0, 0)));
        let hole4 = mapped(v4(Ipv4Addr::new(10, 3, 5, 0)));
        dp.set_cidr(EP_ID, DIR_EGRESS, net4, 96 + 16, group);
        dp.set_cidr(EP_ID, DIR_EGRESS, hole4, 96 + 24, 0);
        let net6 = mapped(v6("fd00:3::".parse().unwrap()));
        let hole6 = mapped(v6("fd00:3:0:5::".parse().unwrap()));
        dp.set_cidr(EP_ID, DIR_EGRESS, net6, 48, group);
        dp.set_cidr(EP_ID, DIR_EGRESS, hole6, 64, 0);
        // The same prefix for the other direction belongs to no group.
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, group, proto::TCP, 443, 16);
        allow(dp, &mut ep, DIR_INGRESS, group, proto::TCP, 443, 16);
        let cases = [
            ("10.3.1.1", true),
            ("10.3.255.254", true),
            ("10.3.5.1", false),
            ("10.4.0.1", false),
            ("fd00:3::1", true),
            ("fd00:3:0:5::1", false),
            ("fd00:4::1", false),
        ];
        for (addr, allowed) in cases {
            let peer: IpAddr = addr.parse().unwrap();
            let pod = if peer.is_ipv4() { v4(POD4) } else { v6(POD6) };
            let p = Packet::tcp(pod, 1, peer, 443, TCP_SYN);
            assert_eq!(pass(dp, DIR_EGRESS, &p), allowed, "{addr}");
            let back = Packet::tcp(peer, 2, pod, 443, TCP_SYN);
            assert!(!pass(dp, DIR_INGRESS, &back), "{addr} ingress");
        }
    });
}

#[test]
fn ingress_from_the_host_identity_is_always_allowed() {
    with_datapath(|dp| {
        let node = Ipv4Addr::new(192, 168, 1, 10);
        dp.set_ipcache(mapped(v4(node)), 128, IDENTITY_HOST);
        dp.set_endpoint(&endpoint(ISOLATED));
        let probe = Packet::tcp(v4(node), 50000, v4(POD4), 8080, TCP_SYN);
        assert!(pass(dp, DIR_INGRESS, &probe));
        // Not the other way round: egress to the node needs a rule.
        let out = Packet::tcp(v4(POD4), 50001, v4(node), 10250, TCP_SYN);
        assert!(!pass(dp, DIR_EGRESS, &out));
    });
}

#[test]
fn the_reply_of_an_allowed_flow_passes_where_new_flows_are_denied() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53, 16);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::ICMP, 0, 0);
        let (pod, peer) = (v4(POD4), v4(PEER4));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 40000, peer, 80, TCP_SYN)
        ));
        let key = ct_key(pod, 40000, peer, 80, proto::TCP);
        let v = dp.ct(&key).unwrap();
        // 10.1.0.5 < 10.2.0.7: the pod, which opened it, is the lo side.
        assert_eq!(v.flags, CT_ORIG_IS_LO | CT_ORIG_EGRESS);
        assert!(secs_left(&v) <= ct_timeout::TCP_OPENING);
        assert!(secs_left(&v) >= ct_timeout::TCP_OPENING - 2);
        let synack = Packet::tcp(peer, 80, pod, 40000, TCP_SYN | TCP_ACK);
        assert!(pass(dp, DIR_INGRESS, &synack));
        let v = dp.ct(&key).unwrap();
        assert_eq!(v.flags & CT_SEEN_REPLY, CT_SEEN_REPLY);
        assert!(secs_left(&v) > ct_timeout::TCP_OPENING);
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 40000, peer, 80, TCP_ACK)
        ));
        // The same peer opening its own connection is a new, denied flow.
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 80, pod, 40001, TCP_SYN)
        ));
        // UDP and ICMP echo replies likewise.
        assert!(pass(dp, DIR_EGRESS, &Packet::udp(pod, 5353, peer, 53)));
        assert!(pass(dp, DIR_INGRESS, &Packet::udp(peer, 53, pod, 5353)));
        assert!(!pass(dp, DIR_INGRESS, &Packet::udp(peer, 53, pod, 5354)));
        assert!(pass(dp, DIR_EGRESS, &Packet::icmp(pod, peer, 8, 0, 99)));
        assert!(pass(dp, DIR_INGRESS, &Packet::icmp(peer, pod, 0, 0, 99)));
        assert!(!pass(dp, DIR_INGRESS, &Packet::icmp(peer, pod, 0, 0, 98)));
        assert!(!pass(dp, DIR_INGRESS, &Packet::icmp(peer, pod, 8, 0, 97)));
        let v = dp.ct(&ct_key(pod, 99, peer, 99, proto::ICMP)).unwrap();
        assert!(secs_left(&v) <= ct_timeout::ICMP);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 4);
    });
}

#[test]
fn a_flow_allowed_while_not_isolated_survives_isolation() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        let (pod, peer) = (v6(POD6), v6(PEER6));
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 999, pod, 22, TCP_SYN)
        ));
        dp.set_endpoint(&endpoint(ISOLATED));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 22, peer, 999, TCP_SYN | TCP_ACK)
        ));
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 999, pod, 22, TCP_ACK)
        ));
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 998, pod, 22, TCP_SYN)
        ));
        let v = dp.ct(&ct_key(peer, 999, pod, 22, proto::TCP)).unwrap();
        assert_eq!(v.flags & CT_ORIG_EGRESS, 0);
    });
}

#[test]
fn a_tcp_reset_or_fins_from_both_sides_shorten_the_lifetime_to_closing() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        let (pod, peer) = (v4(POD4), v4(PEER4));
        let open = |dp: &Datapath, sport: u16| {
            assert!(pass(
                dp,
                DIR_EGRESS,
                &Packet::tcp(pod, sport, peer, 80, TCP_SYN)
            ));
            let synack = Packet::tcp(peer, 80, pod, sport, TCP_SYN | TCP_ACK);
            assert!(pass(dp, DIR_INGRESS, &synack));
            let v = dp.ct(&ct_key(pod, sport, peer, 80, proto::TCP)).unwrap();
            assert!(secs_left(&v) > ct_timeout::TCP_ESTABLISHED - 5);
        };
        open(dp, 1000);
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 80, pod, 1000, TCP_RST)
        ));
        let v = dp.ct(&ct_key(pod, 1000, peer, 80, proto::TCP)).unwrap();
        assert_eq!(v.flags & CT_TCP_RST, CT_TCP_RST);
        assert!(secs_left(&v) <= ct_timeout::TCP_CLOSING);

        open(dp, 1001);
        let key = ct_key(pod, 1001, peer, 80, proto::TCP);
        let fin = TCP_FIN | TCP_ACK;
        assert!(pass(dp, DIR_EGRESS, &Packet::tcp(pod, 1001, peer, 80, fin)));
        let v = dp.ct(&key).unwrap();
        assert_eq!(
            v.flags & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY),
            CT_TCP_FIN_ORIG
        );
        assert!(
            secs_left(&v) > ct_timeout::TCP_ESTABLISHED - 5,
            "one FIN only"
        );
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 80, pod, 1001, fin)
        ));
        let v = dp.ct(&key).unwrap();
        assert_eq!(v.flags & CT_TCP_FIN_REPLY, CT_TCP_FIN_REPLY);
        assert!(secs_left(&v) <= ct_timeout::TCP_CLOSING);
        // The last ACK still passes (and keeps it closing).
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 1001, peer, 80, TCP_ACK)
        ));
        assert!(secs_left(&dp.ct(&key).unwrap()) <= ct_timeout::TCP_CLOSING);
    });
}

#[test]
fn a_syn_reusing_the_tuple_of_a_tracked_flow_meets_the_policy_as_a_new_flow() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(0));
        let (pod, peer) = (v4(POD4), v4(PEER4));
        let key = ct_key(pod, 1000, peer, 80, proto::TCP);
        // A connection opened while nothing isolates the pod, then reset:
        // its entry lives on, closing.
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 1000, peer, 80, TCP_SYN)
        ));
        let synack = Packet::tcp(peer, 80, pod, 1000, TCP_SYN | TCP_ACK);
        assert!(pass(dp, DIR_INGRESS, &synack));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 1000, peer, 80, TCP_RST)
        ));
        assert!(dp.ct(&key).is_some_and(|v| v.flags & CT_TCP_RST != 0));
        // A deny in force now: the same tuple's new SYN, from either side,
        // is judged (and dropped), though the entry is alive.
        dp.set_endpoint(&endpoint(ISOLATED));
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 1000, peer, 80, TCP_SYN)
        ));
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 80, pod, 1000, TCP_SYN)
        ));
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 1);
        // Packets of the old connection still find it.
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 80, pod, 1000, TCP_ACK)
        ));
        // Allowed again: the SYN opens a fresh entry (its state reset).
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 1000, peer, 80, TCP_SYN)
        ));
        let v = dp.ct(&key).unwrap();
        assert_eq!(v.flags, CT_ORIG_IS_LO | CT_ORIG_EGRESS);
        assert!(secs_left(&v) > ct_timeout::TCP_CLOSING);
    });
}

#[test]
fn an_expired_conntrack_entry_counts_as_missing() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED));
        let (pod, peer) = (v4(POD4), v4(PEER4));
        let key = ct_key(pod, 4000, peer, 80, proto::TCP);
        let reply = Packet::tcp(peer, 80, pod, 4000, TCP_ACK);
        let entry = |expires_ns| CtValue {
            expires_ns,
            flags: CT_ORIG_IS_LO | CT_ORIG_EGRESS | CT_SEEN_REPLY,
            rule_id: 0,
            ..CtValue::default()
        };
        // Expired 50 ms ago: conntrack's clock is exact to a jiffy (see
        // now_ns in conntrack.rs).
        dp.conntrack
            .insert(&key, &entry(mono_ns() - 50_000_000), 0)
            .unwrap();
        assert!(!pass(dp, DIR_INGRESS, &reply));
        dp.conntrack
            .insert(&key, &entry(mono_ns() + 60_000_000_000), 0)
            .unwrap();
        assert!(pass(dp, DIR_INGRESS, &reply));
    });
}

#[test]
fn an_icmp_error_about_a_tracked_flow_passes_and_others_meet_the_policy() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53, 16);
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::UDP, 7, 16);
        for (pod, peer, router, unreach) in [
            (v4(POD4), v4(PEER4), v4(OTHER4), 3),
            (v6(POD6), v6(PEER6), v6(OTHER6), 1),
        ] {
            let query = Packet::udp(pod, 5353, peer, 53);
            assert!(pass(dp, DIR_EGRESS, &query));
            // From a router on the way, and from the peer itself.
            let err = Packet::icmp_error(router, pod, unreach, 0, &query);
            assert!(pass(dp, DIR_INGRESS, &err));
            let err = Packet::icmp_error(peer, pod, unreach, 3, &query);
            assert!(pass(dp, DIR_INGRESS, &err));
            let ttl = if pod.is_ipv4() { 11 } else { 3 };
            assert!(pass(
                dp,
                DIR_INGRESS,
                &Packet::icmp_error(router, pod, ttl, 0, &query)
            ));
            // About a flow never seen: a new ICMP flow, denied.
            let unknown = Packet::udp(pod, 5354, peer, 53);
            let err = Packet::icmp_error(router, pod, unreach, 0, &unknown);
            assert!(!pass(dp, DIR_INGRESS, &err));
            // Quoting a tracked flow the receiver did not send: denied.
            let reversed = Packet::udp(peer, 53, pod, 5353);
            let err = Packet::icmp_error(router, pod, unreach, 0, &reversed);
            assert!(!pass(dp, DIR_INGRESS, &err));
            // The pod answering an allowed ingress flow with an error.
            let echo = Packet::udp(peer, 999, pod, 7);
            assert!(pass(dp, DIR_INGRESS, &echo));
            let err = Packet::icmp_error(pod, peer, unreach, 3, &echo);
            assert!(pass(dp, DIR_EGRESS, &err));
            // ...but not about a flow to someone else.
            let elsewhere = Packet::udp(router, 999, pod, 7);
            let err = Packet::icmp_error(pod, peer, unreach, 3, &elsewhere);
            assert!(!pass(dp, DIR_EGRESS, &err));
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 4);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 2);
    });
}

#[test]
fn drops_are_counted_by_endpoint_reason_and_direction_with_their_bytes() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED));
        let p = Packet::udp(v4(PEER4), 1, v4(POD4), 53);
        let len = p.frame().len() as u64;
        for _ in 0..3 {
            assert!(!pass(dp, DIR_INGRESS, &p));
        }
        let spoofed = Packet::udp(v4(OTHER4), 1, v4(PEER4), 53);
        assert!(!pass(dp, DIR_EGRESS, &spoofed));
        assert_eq!(
            dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS),
            (3, 3 * len)
        );
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS), (0, 0));
        assert_eq!(
            dp.drops(EP_ID, reason::SPOOFED_SOURCE, DIR_EGRESS),
            (1, len)
        );
        assert_eq!(dp.drops(EP_ID, reason::SPOOFED_SOURCE, DIR_INGRESS), (0, 0));
    });
}

#[test]
fn drop_events_carry_the_five_tuple_of_the_dropped_packet() {
    with_datapath(|dp| {
        dp.set_ipcache(mapped(v6(PEER6)), 128, PEER_ID);
        dp.set_endpoint(&endpoint(ISOLATED));
        let before = mono_ns();
        let p = Packet::tcp(v6(PEER6), 43210, v6(POD6), 8443, TCP_SYN);
        assert!(!pass(dp, DIR_INGRESS, &p));
        let q = Packet::sctp(v4(POD4), 3868, v4(PEER4), 3869);
        assert!(!pass(dp, DIR_EGRESS, &q));
        let ev = dp.events();
        assert_eq!(ev.len(), 2);
        let e = &ev[0];
        assert_eq!(e.saddr, mapped(v6(PEER6)));
        assert_eq!(e.daddr, mapped(v6(POD6)));
        assert_eq!((e.sport, e.dport), (43210, 8443));
        assert_eq!((e.family, e.proto, e.dir), (6, proto::TCP, DIR_INGRESS));
        assert_eq!((e.reason, e.ep_id), (reason::POLICY_DENIED, EP_ID));
        assert_eq!(e.peer_identity, PEER_ID);
        assert_eq!(e.pkt_len as usize, p.frame().len());
        assert!(e.ts_ns >= before && e.ts_ns <= mono_ns());
        let e = &ev[1];
        assert_eq!((e.saddr, e.daddr), (mapped(v4(POD4)), mapped(v4(PEER4))));
        assert_eq!((e.sport, e.dport), (3868, 3869));
        assert_eq!((e.family, e.proto, e.dir), (4, proto::SCTP, DIR_EGRESS));
        assert_eq!(e.peer_identity, IDENTITY_WORLD);
        assert_eq!(dp.stat(stat::EVENTS_SENT), 2);
    });
}

#[test]
fn many_identical_drops_make_one_event_per_flow_and_direction() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED));
        let p = Packet::udp(v4(PEER4), 1, v4(POD4), 53).frame();
        // One BPF_PROG_TEST_RUN call: well within EVENT_FLOW_INTERVAL_NS.
        assert_eq!(dp.run_repeat(DIR_INGRESS, &p, 1000), TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 1000);
        assert_eq!(dp.events().len(), 1);
        assert_eq!(dp.stat(stat::EVENTS_SENT), 1);
        assert_eq!(dp.stat(stat::EVENTS_RATE_LIMITED), 999);
        // The reply direction of the same flow, and another flow: new events.
        let back = Packet::udp(v4(POD4), 53, v4(PEER4), 1).frame();
        assert_eq!(dp.run_repeat(DIR_EGRESS, &back, 10), TC_ACT_SHOT);
        let other = Packet::udp(v4(PEER4), 2, v4(POD4), 53).frame();
        assert_eq!(dp.run_repeat(DIR_INGRESS, &other, 10), TC_ACT_SHOT);
        assert_eq!(dp.events().len(), 2);
        assert_eq!(dp.stat(stat::EVENTS_LOST), 0);
    });
}

#[test]
fn established_flows_pass_many_times_in_one_run() {
    with_datapath(|dp| {
        dp.set_endpoint(&endpoint(ISOLATED));
        let (pod, peer) = (v4(POD4), v4(PEER4));
        let key = ct_key(pod, 4000, peer, 80, proto::TCP);
        let value = CtValue {
            expires_ns: mono_ns() + 60_000_000_000,
            flags: CT_ORIG_IS_LO | CT_ORIG_EGRESS | CT_SEEN_REPLY,
            rule_id: 0,
            ..CtValue::default()
        };
        dp.conntrack.insert(&key, &value, 0).unwrap();
        let frame = Packet::tcp(peer, 80, pod, 4000, TCP_ACK).frame();
        assert_eq!(dp.run_repeat(DIR_INGRESS, &frame, 10_000), TC_ACT_OK);
        assert_eq!(dp.stat(stat::FORWARDED + u32::from(DIR_INGRESS)), 10_000);
        assert_eq!(dp.stat(stat::FORWARDED + u32::from(DIR_EGRESS)), 0);
        assert!(secs_left(&dp.ct(&key).unwrap()) > ct_timeout::TCP_ESTABLISHED - 5);
    });
}

#[test]
fn randomized_packets_never_pass_unless_the_policy_model_allows_them() {
    let seed = std::env::var("SLUICE_DP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001);
    with_datapath(|dp| model::run_random(dp, seed, 100_000));
}

#[test]
fn keys_and_counters_use_the_endpoint_id_from_its_entry_not_the_ifindex() {
    with_datapath(|dp| {
        // Endpoint ids are never reused, so they differ from ifindexes.
        let mut ep = endpoint(ISOLATED);
        ep.ep_id = 4242;
        allow(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        let (pod, peer) = (v4(POD4), v4(PEER4));
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 1, pod, 80, TCP_SYN)
        ));
        let mut key = ct_key(peer, 1, pod, 80, proto::TCP);
        assert!(dp.ct(&key).is_none());
        key.ep_id = 4242;
        assert!(dp.ct(&key).is_some());
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 1, pod, 81, TCP_SYN)
        ));
        assert_eq!(dp.drops(4242, reason::POLICY_DENIED, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
        assert_eq!(dp.events()[0].ep_id, 4242);
        // An entry for the ifindex as endpoint id is not this endpoint's.
        let mut other = endpoint(ISOLATED);
        allow(
            dp,
            &mut other,
            DIR_INGRESS,
            IDENTITY_ANY,
            proto::TCP,
            82,
            16,
        );
        dp.set_endpoint(&ep);
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 1, pod, 82, TCP_SYN)
        ));
    });
}
