//! Egress through a Service address, judged after kube-proxy's DNAT
//! (docs/design.md, "Services"): `from_pod` lets a new flow to an address
//! in SERVICES through, tracked as deferred and marked; the backend's
//! `to_pod` clears the mark and judges the sender's egress on the
//! translated tuple, then the backend's own ingress. Here the DNAT is done
//! by hand: the test builds the packet as it leaves netfilter.
//!
//! BPF_PROG_TEST_RUN runs every program on the loopback, so whoever the
//! program under test serves is ENDPOINTS[LOOPBACK]; the other endpoint of
//! a flow lives at a made-up ifindex (only the maps are read).
use super::*;
use sluice_common::{CT_EGRESS_DEFERRED, EGRESS_DEFERRED_MARK, EndpointInfo};

const SVC4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0xa);
/// Mark bits of others (kube-proxy's masquerade bit, and one more): kept.
const OTHER_BITS: u32 = 0x4000 | 0x1;
/// The sender of service traffic when the program under test is the
/// backend's `to_pod`: PEER4/PEER6, endpoint id and identity of its own.
const SENDER_IFINDEX: u32 = 77;
const SENDER_EP: u32 = 500;
const SENDER_IDENTITY: u32 = 5000;
/// The backend (POD4/POD6 at the loopback, endpoint EP_ID).
const BACKEND_IDENTITY: u32 = 1000;

fn ct_key_of(ep_id: u32, a: IpAddr, ap: u16, b: IpAddr, bp: u16, l4: u8) -> CtKey {
    CtKey {
        ep_id,
        ..ct_key(a, ap, b, bp, l4)
    }
}

/// The sender's entry for the translated tuple, judged after NAT: a key of
/// its own kind, apart from the endpoints' own entries.
fn deferred_key_of(ep_id: u32, a: IpAddr, ap: u16, b: IpAddr, bp: u16, l4: u8) -> CtKey {
    CtKey {
        kind: sluice_common::CT_KEY_DEFERRED,
        ..ct_key_of(ep_id, a, ap, b, bp, l4)
    }
}

/// The sender's endpoint (PEER4/PEER6), not yet written.
fn sender(flags: u32) -> EndpointInfo {
    EndpointInfo {
        ep_id: SENDER_EP,
        flags: flags | EP_HAS_IPV4 | EP_HAS_IPV6,
        identity: SENDER_IDENTITY,
        ipv4: PEER4.octets(),
        ipv6: PEER6.octets(),
        port_plens: [0, 0],
    }
}

/// Allows the sender's egress to `identity` on one port, and (re)writes the
/// sender at SENDER_IFINDEX.
fn allow_sender_egress(dp: &mut Datapath, s: &mut EndpointInfo, identity: u32, l4: u8, port: u16) {
    dp.allow(
        PolicyKey {
            ep_id: s.ep_id,
            identity,
            port,
            proto: l4,
            dir: DIR_EGRESS,
            plen: 16,
            _pad: [0; 3],
        },
        11,
    );
    s.port_plens[usize::from(DIR_EGRESS)] |= sluice_common::plen_bits(identity, l4, 16);
    dp.set_endpoint_at(SENDER_IFINDEX, s);
}

/// Backend at the loopback (not isolated unless `flags` says so), sender at
/// SENDER_IFINDEX, both in the ipcache as local endpoints.
fn backend_and_sender(dp: &mut Datapath, backend_flags: u32, sender_flags: u32) -> EndpointInfo {
    dp.set_endpoint(&endpoint(backend_flags));
    let s = sender(sender_flags);
    dp.set_endpoint_at(SENDER_IFINDEX, &s);
    for a in [v4(POD4), v6(POD6)] {
        dp.set_ipcache_ep(mapped(a), BACKEND_IDENTITY, EP_ID);
    }
    for a in [v4(PEER4), v6(PEER6)] {
        dp.set_ipcache_ep(mapped(a), SENDER_IDENTITY, SENDER_EP);
    }
    s
}

#[test]
fn a_new_flow_to_a_service_address_leaves_from_pod_unjudged_marked_and_tracked_as_deferred() {
    with_datapath(|dp| {
        // Egress-isolated without a single rule: everything else it opens
        // is denied here.
        dp.set_endpoint(&endpoint(ISOLATED));
        let mut drops = 0;
        for (pod, svc, peer) in [
            (v4(POD4), v4(SVC4), v4(PEER4)),
            (v6(POD6), v6(SVC6), v6(PEER6)),
        ] {
            dp.add_service(mapped(svc));
            for (l4, syn) in [
                (proto::TCP, Packet::tcp(pod, 40000, svc, 80, TCP_SYN)),
                (proto::UDP, Packet::udp(pod, 40000, svc, 53)),
            ] {
                assert_eq!(
                    dp.run_marked(DIR_EGRESS, &syn.frame(), OTHER_BITS),
                    (TC_ACT_OK, OTHER_BITS | EGRESS_DEFERRED_MARK),
                    "{syn:?}: passes, the bit ORed into the mark"
                );
                let port = if l4 == proto::TCP { 80 } else { 53 };
                let e = dp.ct(&ct_key(pod, 40000, svc, port, l4)).unwrap();
                assert_eq!(
                    e.flags & (CT_EGRESS_DEFERRED | CT_ORIG_EGRESS),
                    CT_EGRESS_DEFERRED | CT_ORIG_EGRESS
                );
            }
            // Every later packet of the flow is marked too: each is judged
            // after NAT.
            let ack = Packet::tcp(pod, 40000, svc, 80, TCP_ACK).frame();
            assert_eq!(
                dp.run_marked(DIR_EGRESS, &ack, 0),
                (TC_ACT_OK, EGRESS_DEFERRED_MARK)
            );
            // Replies, translated back to the service address, pass the
            // pod's to_pod on the same entry, and are not marked.
            let reply = Packet::tcp(svc, 80, pod, 40000, TCP_SYN | TCP_ACK).frame();
            assert_eq!(dp.run_marked(DIR_INGRESS, &reply, 0), (TC_ACT_OK, 0));
            let reply = Packet::udp(svc, 53, pod, 40000).frame();
            assert_eq!(dp.run_marked(DIR_INGRESS, &reply, 0), (TC_ACT_OK, 0));
            // So does an ICMP error about the flow (kube-proxy rejecting a
            // port the service does not have).
            let query = Packet::udp(pod, 40000, svc, 53);
            let unreach = if pod.is_ipv4() { 3 } else { 1 };
            let err = Packet::icmp_error(router_of(pod), pod, unreach, 3, &query).frame();
            assert_eq!(dp.run_marked(DIR_INGRESS, &err, 0), (TC_ACT_OK, 0));
            // Another destination is judged here as before: denied, and the
            // mark is left alone.
            let other = Packet::tcp(pod, 40001, peer, 80, TCP_SYN).frame();
            assert_eq!(
                dp.run_marked(DIR_EGRESS, &other, OTHER_BITS),
                (TC_ACT_SHOT, OTHER_BITS)
            );
            drops += 1;
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, drops);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
    });
}

/// A router address of the family of `a` (the source of ICMP errors).
fn router_of(a: IpAddr) -> IpAddr {
    if a.is_ipv4() { v4(OTHER4) } else { v6(OTHER6) }
}

#[test]
fn flows_of_ordinary_entries_are_not_marked_and_a_fail_closed_pod_reaches_no_service() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        dp.add_service(mapped(v4(SVC4)));
        let (pod, peer) = (v4(POD4), v4(PEER4));
        let syn = Packet::tcp(pod, 40000, peer, 80, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_EGRESS, &syn, OTHER_BITS),
            (TC_ACT_OK, OTHER_BITS)
        );
        let ack = Packet::tcp(pod, 40000, peer, 80, TCP_ACK).frame();
        assert_eq!(dp.run_marked(DIR_EGRESS, &ack, 0), (TC_ACT_OK, 0));
        let v = dp.ct(&ct_key(pod, 40000, peer, 80, proto::TCP)).unwrap();
        assert_eq!(v.flags & CT_EGRESS_DEFERRED, 0);
        // Fail-closed and spoofed come first: nothing is deferred.
        ep.flags |= EP_FAIL_CLOSED;
        dp.set_endpoint(&ep);
        let to_svc = Packet::tcp(pod, 40001, v4(SVC4), 80, TCP_SYN).frame();
        assert_eq!(dp.run_marked(DIR_EGRESS, &to_svc, 0), (TC_ACT_SHOT, 0));
        assert_eq!(dp.drops(EP_ID, reason::FAIL_CLOSED, DIR_EGRESS).0, 1);
        ep.flags &= !EP_FAIL_CLOSED;
        dp.set_endpoint(&ep);
        let spoofed = Packet::tcp(v4(OTHER4), 40002, v4(SVC4), 80, TCP_SYN).frame();
        assert_eq!(dp.run_marked(DIR_EGRESS, &spoofed, 0), (TC_ACT_SHOT, 0));
        assert_eq!(dp.drops(EP_ID, reason::SPOOFED_SOURCE, DIR_EGRESS).0, 1);
    });
}

#[test]
fn the_backends_to_pod_judges_the_senders_egress_on_the_translated_tuple() {
    with_datapath(|dp| {
        let mut s = backend_and_sender(dp, 0, EP_EGRESS_ISOLATED);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::TCP, 8080);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::UDP, 53);
        let marked = OTHER_BITS | EGRESS_DEFERRED_MARK;
        for (src, dst) in [(v4(PEER4), v4(POD4)), (v6(PEER6), v6(POD6))] {
            // Allowed: passes with the bit cleared and the other bits kept;
            // the sender has an entry for the translated tuple, the backend
            // its own.
            for (l4, p) in [
                (proto::TCP, Packet::tcp(src, 40000, dst, 8080, TCP_SYN)),
                (proto::UDP, Packet::udp(src, 40000, dst, 53)),
            ] {
                assert_eq!(
                    dp.run_marked(DIR_INGRESS, &p.frame(), marked),
                    (TC_ACT_OK, OTHER_BITS),
                    "{p:?}"
                );
                let port = if l4 == proto::TCP { 8080 } else { 53 };
                let e = dp
                    .ct(&deferred_key_of(SENDER_EP, src, 40000, dst, port, l4))
                    .expect("the sender's entry for the translated tuple");
                assert_eq!(e.flags & CT_ORIG_EGRESS, CT_ORIG_EGRESS);
                assert_eq!(e.rule_id, 11);
                assert!(
                    dp.ct(&ct_key_of(EP_ID, src, 40000, dst, port, l4))
                        .is_some()
                );
            }
            // Another port or protocol: the sender's egress denies, here.
            for p in [
                Packet::tcp(src, 40001, dst, 9090, TCP_SYN),
                Packet::udp(src, 40001, dst, 54),
            ] {
                assert_eq!(
                    dp.run_marked(DIR_INGRESS, &p.frame(), EGRESS_DEFERRED_MARK),
                    (TC_ACT_SHOT, 0),
                    "{p:?}"
                );
            }
            // Unmarked, the same packet is nobody's deferred egress: the
            // backend is open.
            let p = Packet::tcp(src, 40001, dst, 9090, TCP_SYN).frame();
            assert_eq!(dp.run_marked(DIR_INGRESS, &p, 0), (TC_ACT_OK, 0));
        }
        assert_eq!(
            dp.drops(SENDER_EP, reason::POLICY_DENIED, DIR_EGRESS).0,
            4,
            "counted as the sender's egress drops"
        );
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
        let ev = dp.events();
        assert_eq!(ev.len(), 4, "{ev:?}");
        let e = &ev[0];
        assert_eq!(
            (e.ep_id, e.dir, e.reason),
            (SENDER_EP, DIR_EGRESS, reason::POLICY_DENIED)
        );
        assert_eq!((e.saddr, e.daddr), (mapped(v4(PEER4)), mapped(v4(POD4))));
        assert_eq!((e.sport, e.dport, e.proto), (40001, 9090, proto::TCP));
        assert_eq!(e.peer_identity, BACKEND_IDENTITY, "the real destination");
    });
}

#[test]
fn the_backends_own_ingress_policy_still_applies_after_the_senders_egress() {
    with_datapath(|dp| {
        let mut backend = endpoint(EP_INGRESS_ISOLATED);
        allow(
            dp,
            &mut backend,
            DIR_INGRESS,
            SENDER_IDENTITY,
            proto::TCP,
            8080,
            16,
        );
        let _ = backend_and_sender(dp, EP_INGRESS_ISOLATED, 0);
        dp.set_endpoint(&backend);
        let (src, dst) = (v4(PEER4), v4(POD4));
        let ok = Packet::tcp(src, 40000, dst, 8080, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &ok, EGRESS_DEFERRED_MARK),
            (TC_ACT_OK, 0)
        );
        let no = Packet::tcp(src, 40001, dst, 9090, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &no, EGRESS_DEFERRED_MARK),
            (TC_ACT_SHOT, 0)
        );
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(SENDER_EP, reason::POLICY_DENIED, DIR_EGRESS).0, 0);
    });
}

#[test]
fn an_established_deferred_flow_passes_on_the_senders_translated_entry() {
    with_datapath(|dp| {
        let mut s = backend_and_sender(dp, 0, EP_EGRESS_ISOLATED);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::TCP, 8080);
        let (src, dst) = (v4(PEER4), v4(POD4));
        let key = deferred_key_of(SENDER_EP, src, 40000, dst, 8080, proto::TCP);
        let syn = Packet::tcp(src, 40000, dst, 8080, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &syn, EGRESS_DEFERRED_MARK).0,
            TC_ACT_OK
        );
        assert!(secs_left(&dp.ct(&key).unwrap()) <= ct_timeout::TCP_OPENING);
        // Only the sender's packets meet this entry; its ACK means it has
        // seen the reply, so the flow is established.
        let ack = Packet::tcp(src, 40000, dst, 8080, TCP_ACK).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &ack, EGRESS_DEFERRED_MARK).0,
            TC_ACT_OK
        );
        let v = dp.ct(&key).unwrap();
        assert_eq!(v.flags & CT_SEEN_REPLY, CT_SEEN_REPLY);
        assert!(secs_left(&v) > ct_timeout::TCP_OPENING);
        // The rule goes: the established flow stays, a new one is denied.
        dp.policy
            .remove(&PolicyKey {
                ep_id: SENDER_EP,
                identity: BACKEND_IDENTITY,
                port: 8080,
                proto: proto::TCP,
                dir: DIR_EGRESS,
                plen: 16,
                _pad: [0; 3],
            })
            .unwrap();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &ack, EGRESS_DEFERRED_MARK).0,
            TC_ACT_OK
        );
        let syn2 = Packet::tcp(src, 40001, dst, 8080, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &syn2, EGRESS_DEFERRED_MARK).0,
            TC_ACT_SHOT
        );
    });
}

#[test]
fn a_marked_packet_whose_source_is_no_local_endpoint_passes_with_the_bit_cleared() {
    with_datapath(|dp| {
        let _ = backend_and_sender(dp, EP_INGRESS_ISOLATED, ISOLATED);
        // A hairpin masqueraded by kube-proxy comes from the node's address
        // (IDENTITY_HOST, no endpoint): there is no sender to judge; the
        // backend admits the node as always.
        let node = Ipv4Addr::new(10, 255, 255, 1);
        dp.set_ipcache(mapped(v4(node)), 128, IDENTITY_HOST);
        let p = Packet::tcp(v4(node), 40000, v4(POD4), 8080, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &p, OTHER_BITS | EGRESS_DEFERRED_MARK),
            (TC_ACT_OK, OTHER_BITS)
        );
        // An address the ipcache does not know: no sender either; the
        // backend's own policy decides (denied here, as its ingress).
        let p = Packet::tcp(v4(OTHER4), 40000, v4(POD4), 8080, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &p, EGRESS_DEFERRED_MARK),
            (TC_ACT_SHOT, 0)
        );
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 1);
        // Non-IP traffic only loses the bit.
        let (v, mark) = dp.run_marked(
            DIR_INGRESS,
            &arp(PEER4.octets(), POD4.octets()),
            EGRESS_DEFERRED_MARK,
        );
        assert_eq!((v, mark), (TC_ACT_OK, 0));
    });
}

#[test]
fn a_local_sender_missing_from_the_endpoint_maps_fails_closed() {
    with_datapath(|dp| {
        let _ = backend_and_sender(dp, 0, 0);
        // The ipcache says endpoint 600; EP_BY_ID has nothing for it.
        let ghost = Ipv4Addr::new(10, 2, 0, 9);
        dp.set_ipcache_ep(mapped(v4(ghost)), SENDER_IDENTITY, 600);
        let p = Packet::tcp(v4(ghost), 40000, v4(POD4), 8080, TCP_SYN).frame();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &p, EGRESS_DEFERRED_MARK),
            (TC_ACT_SHOT, 0)
        );
        assert_eq!(dp.drops(600, reason::UNKNOWN_ENDPOINT, DIR_EGRESS).0, 1);
        // EP_BY_ID points at an interface now holding another endpoint.
        dp.ep_by_id.insert(&600, &SENDER_IFINDEX, 0).unwrap();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &p, EGRESS_DEFERRED_MARK),
            (TC_ACT_SHOT, 0)
        );
        assert_eq!(dp.drops(600, reason::UNKNOWN_ENDPOINT, DIR_EGRESS).0, 2);
        // Unmarked, the backend (open) takes it.
        assert_eq!(dp.run_marked(DIR_INGRESS, &p, 0), (TC_ACT_OK, 0));
    });
}

#[test]
fn the_whole_path_sender_from_pod_dnat_backend_to_pod_and_the_reply_back() {
    with_datapath(|dp| {
        // The sender's and the backend's views: whichever program runs has
        // its endpoint at the loopback.
        let mut s = sender(EP_EGRESS_ISOLATED);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::TCP, 8080);
        let mut b = endpoint(EP_INGRESS_ISOLATED);
        allow(
            dp,
            &mut b,
            DIR_INGRESS,
            SENDER_IDENTITY,
            proto::TCP,
            8080,
            16,
        );
        for a in [v4(POD4), v6(POD6)] {
            dp.set_ipcache_ep(mapped(a), BACKEND_IDENTITY, EP_ID);
        }
        for a in [v4(PEER4), v6(PEER6)] {
            dp.set_ipcache_ep(mapped(a), SENDER_IDENTITY, SENDER_EP);
        }
        let as_sender = |dp: &mut Datapath| dp.set_endpoint(&s);
        let as_backend = |dp: &mut Datapath| {
            dp.set_endpoint(&b);
            dp.set_endpoint_at(SENDER_IFINDEX, &s);
        };
        for (src, svc, dst) in [
            (v4(PEER4), v4(SVC4), v4(POD4)),
            (v6(PEER6), v6(SVC6), v6(POD6)),
        ] {
            dp.add_service(mapped(svc));
            for (dport, allowed) in [(8080, true), (9090, false)] {
                let sport = 41000 + dport / 1000;
                // 1. The sender's from_pod: to the service, port 80.
                as_sender(dp);
                let syn = Packet::tcp(src, sport, svc, 80, TCP_SYN).frame();
                let (v, mark) = dp.run_marked(DIR_EGRESS, &syn, 0);
                assert_eq!((v, mark), (TC_ACT_OK, EGRESS_DEFERRED_MARK));
                // 2. kube-proxy: DNAT to the backend; the mark stays.
                let dnat = Packet::tcp(src, sport, dst, dport, TCP_SYN).frame();
                // 3. The backend's to_pod.
                as_backend(dp);
                let (v, mark) = dp.run_marked(DIR_INGRESS, &dnat, mark);
                assert_eq!(mark, 0);
                assert_eq!(v == TC_ACT_OK, allowed, "{dst} port {dport}");
                if !allowed {
                    continue;
                }
                // 4. The reply: the backend's from_pod passes it on its own
                //    entry; translated back, it reaches the sender's to_pod
                //    from the service address and passes on the deferred
                //    entry.
                let reply = Packet::tcp(dst, dport, src, sport, TCP_SYN | TCP_ACK).frame();
                assert_eq!(dp.run_marked(DIR_EGRESS, &reply, 0), (TC_ACT_OK, 0));
                as_sender(dp);
                let back = Packet::tcp(svc, 80, src, sport, TCP_SYN | TCP_ACK).frame();
                assert_eq!(dp.run_marked(DIR_INGRESS, &back, 0), (TC_ACT_OK, 0));
                // 5. The sender's next packet is marked and judged again
                //    (on its entry) at the backend.
                let ack = Packet::tcp(src, sport, svc, 80, TCP_ACK).frame();
                let (v, mark) = dp.run_marked(DIR_EGRESS, &ack, 0);
                assert_eq!((v, mark), (TC_ACT_OK, EGRESS_DEFERRED_MARK));
                as_backend(dp);
                let ack = Packet::tcp(src, sport, dst, dport, TCP_ACK).frame();
                assert_eq!(dp.run_marked(DIR_INGRESS, &ack, mark), (TC_ACT_OK, 0));
            }
        }
        assert_eq!(dp.drops(SENDER_EP, reason::POLICY_DENIED, DIR_EGRESS).0, 2);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
    });
}

#[test]
fn fragments_of_a_deferred_datagram_are_marked_and_follow_the_first_ones_verdict() {
    with_datapath(|dp| {
        // from_pod: the first fragment to the service is deferred; the
        // later one, without ports, is marked as its first was.
        dp.set_endpoint(&sender(EP_EGRESS_ISOLATED));
        let (src, svc, dst) = (v4(PEER4), v4(SVC4), v4(POD4));
        dp.add_service(mapped(svc));
        let (first, later) = fragments(src, svc, 53, 61);
        assert_eq!(
            dp.run_marked(DIR_EGRESS, &first.frame(), 0),
            (TC_ACT_OK, EGRESS_DEFERRED_MARK)
        );
        assert_eq!(
            dp.run_marked(DIR_EGRESS, &later.frame(), OTHER_BITS),
            (TC_ACT_OK, OTHER_BITS | EGRESS_DEFERRED_MARK)
        );
        // to_pod, after DNAT: the sender may send UDP 53 to the backend,
        // not 54. Later fragments take the verdict of their first.
        let mut s = backend_and_sender(dp, 0, EP_EGRESS_ISOLATED);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::UDP, 53);
        for (dport, id, ok) in [(53, 62, TC_ACT_OK), (54, 63, TC_ACT_SHOT)] {
            let (first, later) = fragments(src, dst, dport, id);
            let m = EGRESS_DEFERRED_MARK;
            assert_eq!(dp.run_marked(DIR_INGRESS, &first.frame(), m), (ok, 0));
            assert_eq!(dp.run_marked(DIR_INGRESS, &later.frame(), m), (ok, 0));
        }
        assert_eq!(dp.drops(SENDER_EP, reason::POLICY_DENIED, DIR_EGRESS).0, 1);
    });
}

#[test]
fn to_host_judges_the_senders_deferred_egress_of_packets_delivered_to_the_node_itself() {
    // kube-proxy sent the flow to a host-network backend: after DNAT the
    // destination is the node's address, and no to_pod sees it; to_host
    // (cgroup skb ingress of the node's sockets) judges the sender.
    const NODE4: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);
    const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 1);
    with_datapath(|dp| {
        let mut s = backend_and_sender(dp, 0, EP_EGRESS_ISOLATED);
        for node in [v4(NODE4), v6(NODE6)] {
            dp.set_ipcache(mapped(node), 128, IDENTITY_HOST);
        }
        allow_sender_egress(dp, &mut s, IDENTITY_HOST, proto::TCP, 6443);
        for (src, node) in [(v4(PEER4), v4(NODE4)), (v6(PEER6), v6(NODE6))] {
            let allowed = Packet::tcp(src, 40000, node, 6443, TCP_SYN).frame();
            let denied = Packet::tcp(src, 40001, node, 22, TCP_SYN).frame();
            // Unmarked (not a Service flow of a pod): passes unjudged.
            assert_eq!(dp.run_host(&denied, OTHER_BITS), 1, "{node}");
            // Marked: the sender's egress policy decides.
            assert_eq!(dp.run_host(&allowed, EGRESS_DEFERRED_MARK), 1, "{node}");
            let e = dp
                .ct(&deferred_key_of(
                    SENDER_EP,
                    src,
                    40000,
                    node,
                    6443,
                    proto::TCP,
                ))
                .expect("the sender's entry for the translated tuple");
            assert_eq!(e.rule_id, 11);
            assert_eq!(
                dp.run_host(&denied, EGRESS_DEFERRED_MARK | OTHER_BITS),
                0,
                "{node}"
            );
            // UDP alike.
            let udp = Packet::udp(src, 40002, node, 53).frame();
            assert_eq!(dp.run_host(&udp, EGRESS_DEFERRED_MARK), 0, "{node}");
        }
        assert_eq!(dp.drops(SENDER_EP, reason::POLICY_DENIED, DIR_EGRESS).0, 4);
    });
}

#[test]
fn a_service_flow_whose_senders_egress_is_revoked_is_dropped_at_the_backend_and_the_node() {
    // The sender's translated entry (at the backend's to_pod, or at to_host
    // for a host-network backend) is judged again in a new epoch, against
    // the sender's egress policy: the rule gone, its next packet is
    // dropped as revoked, counted as the sender's egress.
    const NODE4: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);
    with_datapath(|dp| {
        let mut s = backend_and_sender(dp, 0, EP_EGRESS_ISOLATED);
        dp.set_ipcache(mapped(v4(NODE4)), 128, IDENTITY_HOST);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::TCP, 8080);
        allow_sender_egress(dp, &mut s, BACKEND_IDENTITY, proto::UDP, 53);
        allow_sender_egress(dp, &mut s, IDENTITY_HOST, proto::TCP, 6443);
        let (src, dst, node) = (v4(PEER4), v4(POD4), v4(NODE4));
        let m = EGRESS_DEFERRED_MARK;
        let tcp = |flags| Packet::tcp(src, 40000, dst, 8080, flags).frame();
        let udp = Packet::udp(src, 40001, dst, 53).frame();
        let host = |flags| Packet::tcp(src, 40002, node, 6443, flags).frame();
        assert_eq!(dp.run_marked(DIR_INGRESS, &tcp(TCP_SYN), m), (TC_ACT_OK, 0));
        assert_eq!(dp.run_marked(DIR_INGRESS, &udp, m), (TC_ACT_OK, 0));
        assert_eq!(dp.run_host(&host(TCP_SYN), m), 1);
        let rule = |l4, port| PolicyKey {
            ep_id: SENDER_EP,
            identity: BACKEND_IDENTITY,
            port,
            proto: l4,
            dir: DIR_EGRESS,
            plen: 16,
            _pad: [0; 3],
        };
        dp.policy.remove(&rule(proto::TCP, 8080)).unwrap();
        dp.policy.remove(&rule(proto::UDP, 53)).unwrap();
        dp.policy
            .remove(&PolicyKey {
                identity: IDENTITY_HOST,
                ..rule(proto::TCP, 6443)
            })
            .unwrap();
        // Same epoch: the entries still pass them.
        assert_eq!(dp.run_marked(DIR_INGRESS, &tcp(TCP_ACK), m), (TC_ACT_OK, 0));
        dp.bump_epoch();
        assert_eq!(
            dp.run_marked(DIR_INGRESS, &tcp(TCP_ACK), m),
            (TC_ACT_SHOT, 0)
        );
        assert_eq!(dp.run_marked(DIR_INGRESS, &udp, m), (TC_ACT_SHOT, 0));
        assert_eq!(dp.run_host(&host(TCP_ACK), m), 0);
        assert_eq!(dp.drops(SENDER_EP, reason::REVOKED, DIR_EGRESS).0, 3);
        assert_eq!(dp.drops(SENDER_EP, reason::POLICY_DENIED, DIR_EGRESS).0, 0);
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_INGRESS).0, 0);
    });
}

#[test]
fn a_service_flow_whose_backends_ingress_is_revoked_is_dropped_as_revoked() {
    with_datapath(|dp| {
        let mut b = endpoint(EP_INGRESS_ISOLATED);
        backend_and_sender(dp, EP_INGRESS_ISOLATED, 0);
        allow(dp, &mut b, DIR_INGRESS, SENDER_IDENTITY, proto::UDP, 53, 16);
        let (src, dst) = (v4(PEER4), v4(POD4));
        let udp = Packet::udp(src, 40001, dst, 53).frame();
        let m = EGRESS_DEFERRED_MARK;
        assert_eq!(dp.run_marked(DIR_INGRESS, &udp, m), (TC_ACT_OK, 0));
        dp.policy
            .remove(&PolicyKey {
                ep_id: EP_ID,
                identity: SENDER_IDENTITY,
                port: 53,
                proto: proto::UDP,
                dir: DIR_INGRESS,
                plen: 16,
                _pad: [0; 3],
            })
            .unwrap();
        dp.bump_epoch();
        assert_eq!(dp.run_marked(DIR_INGRESS, &udp, m), (TC_ACT_SHOT, 0));
        // The backend's reply, judged as the flow's ingress, too.
        let reply = Packet::udp(dst, 53, src, 40001).frame();
        assert_eq!(dp.run_marked(DIR_EGRESS, &reply, 0).0, TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_EGRESS).0, 1);
    });
}
