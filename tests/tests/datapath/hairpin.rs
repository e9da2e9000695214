//! A pod reaching itself through a Service (docs/design.md, "Hairpin"):
//! its `from_pod` marks the packet with its hairpin tag, kube-proxy DNATs
//! it back to the pod and masquerades it to the node's address, and its
//! `to_pod`, finding its own tag on a packet from no local endpoint, judges
//! the flow as from the pod to itself: its egress (on its deferred entry)
//! and its ingress with the pod, not the node, as the peer.
use super::*;
use sluice_common::{
    CT_HAIRPIN, CT_KEY_DEFERRED, EGRESS_DEFERRED_MARK, EGRESS_SENDER_TAG_MASK, hairpin_tag_bits,
};

const SVC4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 9);
const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 9);
/// The node's addresses, which kube-proxy's masquerade puts on a hairpin.
const NODE4: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 1);
const TAG: u32 = 37;
const OWN_IDENTITY: u32 = 1000;
/// Mark bits of others: kept through both programs.
const OTHER_BITS: u32 = 0x1;

/// The pod (EP_ID at the loopback) with its tag, its addresses in the
/// ipcache, the node's and the Service's.
fn pod(dp: &mut Datapath, flags: u32) -> EndpointInfo {
    let ep = endpoint(flags | hairpin_tag_bits(TAG));
    dp.set_endpoint(&ep);
    for a in [v4(POD4), v6(POD6)] {
        dp.set_ipcache_ep(mapped(a), OWN_IDENTITY, EP_ID);
    }
    for a in [v4(NODE4), v6(NODE6)] {
        dp.set_ipcache(mapped(a), 128, IDENTITY_HOST);
    }
    for a in [v4(SVC4), v6(SVC6)] {
        dp.add_service(mapped(a));
    }
    ep
}

/// The pod's own entry and its deferred (after NAT) entry of a tuple.
fn keys(src: IpAddr, sp: u16, dst: IpAddr, dp_: u16) -> (CtKey, CtKey) {
    let own = ct_key(src, sp, dst, dp_, proto::TCP);
    let deferred = CtKey {
        kind: CT_KEY_DEFERRED,
        ..own
    };
    (own, deferred)
}

/// One hairpin SYN through the Service: the pod's from_pod (to the
/// ClusterIP, port 80) and, with the mark it left, its to_pod of the
/// translated, masqueraded packet (node:`masq_port` -> pod:`port`). The
/// to_pod verdict and mark.
fn hairpin_syn(
    dp: &Datapath,
    pod: IpAddr,
    svc: IpAddr,
    node: IpAddr,
    sport: u16,
    port: u16,
) -> (u32, u32) {
    let syn = Packet::tcp(pod, sport, svc, 80, TCP_SYN).frame();
    let (v, mark) = dp.run_marked(DIR_EGRESS, &syn, OTHER_BITS);
    assert_eq!(v, TC_ACT_OK, "from_pod defers");
    assert_eq!(
        mark,
        OTHER_BITS | EGRESS_DEFERRED_MARK | hairpin_tag_bits(TAG),
        "the deferred bit and the pod's tag ORed in"
    );
    let masq_port = sport + 10_000;
    let dnat = Packet::tcp(node, masq_port, pod, port, TCP_SYN).frame();
    dp.run_marked(DIR_INGRESS, &dnat, mark)
}

fn families() -> [(IpAddr, IpAddr, IpAddr); 2] {
    [
        (v4(POD4), v4(SVC4), v4(NODE4)),
        (v6(POD6), v6(SVC6), v6(NODE6)),
    ]
}

#[test]
fn a_hairpin_is_judged_as_the_pods_egress_to_itself_and_the_reply_passes() {
    with_datapath(|dp| {
        let mut ep = pod(dp, EP_EGRESS_ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, OWN_IDENTITY, proto::TCP, 8080, 16);
        for (pod_ip, svc, node) in families() {
            // Allowed: the pod may reach itself on 8080.
            let (v, mark) = hairpin_syn(dp, pod_ip, svc, node, 41000, 8080);
            assert_eq!(v, TC_ACT_OK, "{pod_ip}: egress to itself on 8080 allowed");
            assert_eq!(mark & EGRESS_SENDER_TAG_MASK, 0, "the tag is cleared");
            let (own, deferred) = keys(node, 51000, pod_ip, 8080);
            let d = dp.ct(&deferred).expect("the egress entry, after NAT");
            assert_eq!(d.flags & CT_ORIG_EGRESS, CT_ORIG_EGRESS);
            let o = dp.ct(&own).expect("the pod's own ingress entry, apart");
            assert_eq!(o.flags & (CT_ORIG_EGRESS | CT_HAIRPIN), CT_HAIRPIN);
            // The reply leaves the pod on its ingress entry (to the node's
            // address), and comes back translated to the Service address on
            // the deferred entry of its from_pod.
            let reply = Packet::tcp(pod_ip, 8080, node, 51000, TCP_SYN | TCP_ACK).frame();
            assert_eq!(dp.run_marked(DIR_EGRESS, &reply, 0), (TC_ACT_OK, 0));
            let back = Packet::tcp(svc, 80, pod_ip, 41000, TCP_SYN | TCP_ACK).frame();
            assert_eq!(dp.run_marked(DIR_INGRESS, &back, 0), (TC_ACT_OK, 0));

            // Denied: 9090 is not allowed to itself; dropped as the pod's
            // egress, reported from the pod to itself.
            let (v, _) = hairpin_syn(dp, pod_ip, svc, node, 42000, 9090);
            assert_eq!(v, TC_ACT_SHOT, "{pod_ip}: egress to itself on 9090 denied");
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 2);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
        let ev = dp.events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        for (e, pod_ip) in ev.iter().zip([v4(POD4), v6(POD6)]) {
            assert_eq!((e.ep_id, e.dir), (EP_ID, DIR_EGRESS));
            assert_eq!((e.saddr, e.daddr), (mapped(pod_ip), mapped(pod_ip)));
            assert_eq!((e.dport, e.peer_identity), (9090, OWN_IDENTITY));
        }
        // Reaching its own address directly never leaves the pod; unmarked,
        // the same tuple from the node is the node's (always admitted).
        let p = Packet::tcp(v4(NODE4), 51000, v4(POD4), 9090, TCP_SYN).frame();
        assert_eq!(dp.run_marked(DIR_INGRESS, &p, 0), (TC_ACT_OK, 0));
    });
}

#[test]
fn a_hairpins_ingress_has_the_pod_itself_as_its_peer_not_the_node() {
    with_datapath(|dp| {
        let mut ep = pod(dp, EP_INGRESS_ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, OWN_IDENTITY, proto::TCP, 8080, 16);
        for (pod_ip, svc, node) in families() {
            let (v, _) = hairpin_syn(dp, pod_ip, svc, node, 41000, 8080);
            assert_eq!(v, TC_ACT_OK, "{pod_ip}: admitted from itself on 8080");
            let (v, _) = hairpin_syn(dp, pod_ip, svc, node, 42000, 9090);
            assert_eq!(v, TC_ACT_SHOT, "{pod_ip}: not admitted from itself on 9090");
            // The node itself on 9090 (a kubelet probe): admitted as always.
            let probe = Packet::tcp(node, 43000, pod_ip, 9090, TCP_SYN).frame();
            assert_eq!(dp.run_marked(DIR_INGRESS, &probe, 0), (TC_ACT_OK, 0));
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 2);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 0);
        let ev = dp.events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0].peer_identity, OWN_IDENTITY, "the pod, not the node");
        assert_eq!(ev[0].saddr, mapped(v4(POD4)));

        // The allow goes: the established hairpin, judged again in the new
        // epoch with the pod as its peer, is revoked.
        let key = PolicyKey {
            ep_id: EP_ID,
            identity: OWN_IDENTITY,
            port: 8080,
            proto: proto::TCP,
            dir: DIR_INGRESS,
            plen: 16,
            _pad: [0; 3],
        };
        dp.policy.remove(&key).expect("the allow");
        dp.bump_epoch();
        let mark = EGRESS_DEFERRED_MARK | hairpin_tag_bits(TAG);
        let ack = Packet::tcp(v4(NODE4), 51000, v4(POD4), 8080, TCP_ACK).frame();
        assert_eq!(dp.run_marked(DIR_INGRESS, &ack, mark).0, TC_ACT_SHOT);
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_INGRESS).0, 1);
    });
}

#[test]
fn another_pods_tag_on_a_masqueraded_packet_is_no_hairpin() {
    with_datapath(|dp| {
        // Isolated both ways, nothing allowed: a hairpin would be dropped.
        let _ = pod(dp, ISOLATED);
        for (pod_ip, _, node) in families() {
            // kube-proxy's masqueradeAll: another pod's flow to this one
            // comes from the node's address with that pod's tag. Not this
            // pod's egress; its ingress admits the node, as without tags.
            for tag in [TAG + 1, 0] {
                let p = Packet::tcp(node, 51000, pod_ip, 8080, TCP_SYN).frame();
                let mark = OTHER_BITS | EGRESS_DEFERRED_MARK | hairpin_tag_bits(tag);
                assert_eq!(
                    dp.run_marked(DIR_INGRESS, &p, mark),
                    (TC_ACT_OK, OTHER_BITS),
                    "{pod_ip} tag {tag}: passes, our bits cleared"
                );
            }
            // Its own tag: a hairpin, denied both ways (egress first).
            let p = Packet::tcp(node, 51001, pod_ip, 8080, TCP_SYN).frame();
            let mark = EGRESS_DEFERRED_MARK | hairpin_tag_bits(TAG);
            assert_eq!(dp.run_marked(DIR_INGRESS, &p, mark).0, TC_ACT_SHOT);
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 2);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
    });
}
