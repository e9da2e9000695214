//! Flow events (docs/design.md, "Flows"): while the agent turns
//! `FLOW_EVENTS` on, every allowed new flow (its conntrack entry just
//! created) is reported once in the drop ring buffer, with reason
//! `FORWARDED` and the rule that allowed it; established packets, and
//! everything while the switch is off, report nothing.
use super::*;

#[test]
fn an_allowed_new_flow_is_reported_once_only_while_the_switch_is_on() {
    with_datapath(|dp| {
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        let mut ep = endpoint(ISOLATED);
        allow(dp, &mut ep, DIR_INGRESS, PEER_ID, proto::TCP, 80, 16);
        // Off (the default): an allowed flow is tracked, not reported.
        let syn = Packet::tcp(v4(PEER4), 1000, v4(POD4), 80, TCP_SYN);
        assert!(pass(dp, DIR_INGRESS, &syn));
        assert!(dp.events().is_empty());
        dp.set_flow_events(true);
        let syn = Packet::tcp(v4(PEER4), 1001, v4(POD4), 80, TCP_SYN);
        assert!(pass(dp, DIR_INGRESS, &syn));
        // Its later packets hit conntrack: no more events.
        let ack = Packet::tcp(v4(PEER4), 1001, v4(POD4), 80, TCP_ACK);
        assert!(pass(dp, DIR_INGRESS, &ack));
        let reply = Packet::tcp(v4(POD4), 80, v4(PEER4), 1001, TCP_SYN | TCP_ACK);
        assert!(pass(dp, DIR_EGRESS, &reply));
        let ev = dp.events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        let e = &ev[0];
        assert_eq!(e.reason, reason::FORWARDED);
        assert_eq!(
            (e.ep_id, e.dir, e.peer_identity),
            (EP_ID, DIR_INGRESS, PEER_ID)
        );
        assert_eq!(
            (e.sport, e.dport, e.proto, e.family),
            (1001, 80, proto::TCP, 4)
        );
        assert_eq!((e.saddr, e.daddr), (mapped(v4(PEER4)), mapped(v4(POD4))));
        // The rule `allow` wrote, the one conntrack remembers.
        let ct = dp
            .ct(&ct_key(v4(PEER4), 1001, v4(POD4), 80, proto::TCP))
            .unwrap();
        assert_eq!(e.rule_id, ct.rule_id);
        assert_ne!(e.rule_id, 0);
        // A denied flow is still a drop, not a forwarded event.
        let denied = Packet::tcp(v4(PEER4), 1002, v4(POD4), 81, TCP_SYN);
        assert!(!pass(dp, DIR_INGRESS, &denied));
        let ev = dp.events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].reason, reason::POLICY_DENIED);
        // A direction that is not isolated: reported with rule 0.
        let out = Packet::udp(v4(POD4), 5000, v4(PEER4), 53);
        dp.set_endpoint(&EndpointInfo {
            flags: ep.flags & !EP_EGRESS_ISOLATED,
            ..ep
        });
        assert!(pass(dp, DIR_EGRESS, &out));
        let ev = dp.events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].reason, ev[0].rule_id, ev[0].dir),
            (reason::FORWARDED, 0, DIR_EGRESS)
        );
        // Off again: nothing.
        dp.set_flow_events(false);
        let syn = Packet::tcp(v4(PEER4), 1003, v4(POD4), 80, TCP_SYN);
        assert!(pass(dp, DIR_INGRESS, &syn));
        assert!(dp.events().is_empty());
    });
}
