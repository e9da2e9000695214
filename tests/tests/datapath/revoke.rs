//! Policy changes reach established flows (docs/design.md, "Policy changes
//! reach established flows"): a conntrack entry records the policy epoch
//! it was judged in; once the agent bumps `EPOCH`, the next packet of the
//! flow, from either side, has the flow judged again as a new flow of its
//! original direction. Still allowed: the entry takes the new epoch (and
//! rule). Denied: the packet is dropped as `revoked`. The harness bumps the
//! epoch as the agent does after a programming pass.
use super::*;
use sluice_common::CT_EGRESS_DEFERRED;

/// The POLICY key `allow` writes for an exact port.
fn exact(ep_id: u32, dir: u8, identity: u32, l4: u8, port: u16) -> PolicyKey {
    PolicyKey {
        ep_id,
        identity,
        port,
        proto: l4,
        dir,
        plen: 16,
        _pad: [0; 3],
    }
}

fn remove(dp: &mut Datapath, key: PolicyKey) {
    if let Err(e) = dp.policy.remove(&key) {
        panic!("POLICY remove {key:?}: {e:?}");
    }
}

fn epoch_of(dp: &Datapath, key: &CtKey) -> u32 {
    match dp.ct(key) {
        Some(v) => v.epoch,
        None => panic!("no conntrack entry {key:?}"),
    }
}

#[test]
fn an_entry_from_an_older_epoch_still_allowed_takes_the_new_epoch_and_rule() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        let (pod, peer) = (v4(POD4), v4(PEER4));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 40000, peer, 80, TCP_SYN)
        ));
        let key = ct_key(pod, 40000, peer, 80, proto::TCP);
        assert_eq!((epoch_of(dp, &key), dp.ct(&key).unwrap().rule_id), (0, 7));
        // Another rule now allows it; until the epoch moves the entry is
        // not looked at again.
        dp.allow(exact(EP_ID, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80), 9);
        let ack = Packet::tcp(pod, 40000, peer, 80, TCP_ACK);
        assert!(pass(dp, DIR_EGRESS, &ack));
        assert_eq!(dp.ct(&key).unwrap().rule_id, 7);
        let epoch = dp.bump_epoch();
        // A reply is the next packet: it has the flow (the pod's egress)
        // judged again.
        let reply = Packet::tcp(peer, 80, pod, 40000, TCP_ACK);
        assert!(pass(dp, DIR_INGRESS, &reply));
        let v = dp.ct(&key).unwrap();
        assert_eq!((v.epoch, v.rule_id), (epoch, 9));
        assert_eq!(v.flags & CT_SEEN_REPLY, CT_SEEN_REPLY, "tracked as a hit");
        assert!(pass(dp, DIR_EGRESS, &ack));
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_INGRESS).0, 0);
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_EGRESS).0, 0);
    });
}

#[test]
fn tcp_and_udp_flows_whose_rule_is_removed_are_dropped_as_revoked_from_both_sides() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80, 16);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53, 16);
        let flows = [(v4(POD4), v4(PEER4)), (v6(POD6), v6(PEER6))];
        for (pod, peer) in flows {
            assert!(pass(
                dp,
                DIR_EGRESS,
                &Packet::tcp(pod, 40000, peer, 80, TCP_SYN)
            ));
            let synack = Packet::tcp(peer, 80, pod, 40000, TCP_SYN | TCP_ACK);
            assert!(pass(dp, DIR_INGRESS, &synack));
            assert!(pass(dp, DIR_EGRESS, &Packet::udp(pod, 5353, peer, 53)));
            assert!(pass(dp, DIR_INGRESS, &Packet::udp(peer, 53, pod, 5353)));
        }
        remove(dp, exact(EP_ID, DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80));
        remove(dp, exact(EP_ID, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53));
        // Before the bump the flows live on (what `--established keep`
        // leaves in force for good).
        for (pod, peer) in flows {
            assert!(pass(
                dp,
                DIR_EGRESS,
                &Packet::tcp(pod, 40000, peer, 80, TCP_ACK)
            ));
            assert!(pass(dp, DIR_EGRESS, &Packet::udp(pod, 5353, peer, 53)));
        }
        dp.events();
        dp.bump_epoch();
        for (pod, peer) in flows {
            let tcp_out = Packet::tcp(pod, 40000, peer, 80, TCP_ACK);
            let tcp_in = Packet::tcp(peer, 80, pod, 40000, TCP_ACK);
            let udp_out = Packet::udp(pod, 5353, peer, 53);
            let udp_in = Packet::udp(peer, 53, pod, 5353);
            assert!(!pass(dp, DIR_EGRESS, &tcp_out), "{pod}: TCP from the pod");
            assert!(!pass(dp, DIR_INGRESS, &tcp_in), "{pod}: TCP reply");
            assert!(!pass(dp, DIR_EGRESS, &udp_out), "{pod}: UDP from the pod");
            assert!(!pass(dp, DIR_INGRESS, &udp_in), "{pod}: UDP reply");
            // The entry stays as it was: each later packet is judged again.
            let key = ct_key(pod, 5353, peer, 53, proto::UDP);
            assert_eq!(epoch_of(dp, &key), 0);
            assert!(!pass(dp, DIR_EGRESS, &udp_out));
        }
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_EGRESS).0, 6);
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_INGRESS).0, 4);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 0);
        let events = dp.events();
        assert!(!events.is_empty());
        assert!(
            events.iter().all(|e| e.reason == reason::REVOKED),
            "{events:?}"
        );
        // The rule back, and another pass: the flows resume.
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53, 16);
        let epoch = dp.bump_epoch();
        for (pod, peer) in flows {
            assert!(pass(dp, DIR_INGRESS, &Packet::udp(peer, 53, pod, 5353)));
            assert_eq!(
                epoch_of(dp, &ct_key(pod, 5353, peer, 53, proto::UDP)),
                epoch
            );
            assert!(!pass(
                dp,
                DIR_EGRESS,
                &Packet::tcp(pod, 40000, peer, 80, TCP_ACK)
            ));
        }
    });
}

#[test]
fn a_flow_the_peer_opened_is_judged_again_as_ingress_whichever_side_sends() {
    with_datapath(|dp| {
        // Isolated for ingress only: as a new egress flow the pod's reply
        // would pass; only the original direction can deny it.
        let mut ep = endpoint(EP_INGRESS_ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, PEER_ID, proto::TCP, 22, 16);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        dp.set_ipcache(mapped(v4(OTHER4)), 128, IDENTITY_HOST);
        let (pod, peer, node) = (v4(POD4), v4(PEER4), v4(OTHER4));
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(peer, 999, pod, 22, TCP_SYN)
        ));
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::tcp(node, 999, pod, 8080, TCP_SYN)
        ));
        remove(dp, exact(EP_ID, DIR_INGRESS, PEER_ID, proto::TCP, 22));
        dp.bump_epoch();
        let synack = Packet::tcp(pod, 22, peer, 999, TCP_SYN | TCP_ACK);
        assert!(!pass(dp, DIR_EGRESS, &synack));
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_EGRESS).0, 1);
        // The node (kubelet probes) is admitted, as for a new flow.
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(pod, 8080, node, 999, TCP_SYN | TCP_ACK)
        ));
    });
}

#[test]
fn an_icmp_error_about_a_revoked_flow_is_dropped_as_revoked() {
    with_datapath(|dp| {
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53, 16);
        let (pod, peer, router) = (v4(POD4), v4(PEER4), v4(OTHER4));
        let query = Packet::udp(pod, 5353, peer, 53);
        assert!(pass(dp, DIR_EGRESS, &query));
        let err = Packet::icmp_error(router, pod, 3, 3, &query);
        // A new epoch that still allows the flow: the error is related.
        dp.bump_epoch();
        assert!(pass(dp, DIR_INGRESS, &err));
        remove(dp, exact(EP_ID, DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53));
        dp.bump_epoch();
        assert!(!pass(dp, DIR_INGRESS, &err));
        assert_eq!(dp.drops(EP_ID, reason::REVOKED, DIR_INGRESS).0, 1);
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 0);
    });
}

#[test]
fn a_deferred_service_entry_holds_no_verdict_and_stays_marked_in_a_new_epoch() {
    with_datapath(|dp| {
        // Egress-isolated without a rule: a verdict here would deny.
        dp.set_endpoint(&endpoint(ISOLATED));
        let svc = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        dp.add_service(mapped(svc));
        let pod = v4(POD4);
        let syn = Packet::tcp(pod, 40000, svc, 80, TCP_SYN).frame();
        assert_eq!(dp.run_marked(DIR_EGRESS, &syn, 0).0, TC_ACT_OK);
        let key = ct_key(pod, 40000, svc, 80, proto::TCP);
        assert_eq!(
            dp.ct(&key).unwrap().flags & CT_EGRESS_DEFERRED,
            CT_EGRESS_DEFERRED
        );
        let epoch = dp.bump_epoch();
        let ack = Packet::tcp(pod, 40000, svc, 80, TCP_ACK).frame();
        assert_eq!(
            dp.run_marked(DIR_EGRESS, &ack, 0),
            (TC_ACT_OK, sluice_common::EGRESS_DEFERRED_MARK),
            "judged after NAT, at the backend, as every packet of the flow"
        );
        assert_eq!(epoch_of(dp, &key), epoch);
    });
}
