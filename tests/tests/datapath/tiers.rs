//! ClusterNetworkPolicy tiers in the data path: POLICY values carrying the
//! best Admin and Baseline rule per key, folded over every hit of a new
//! flow, decided Admin, NetworkPolicy, Baseline; drops named by reason and
//! rule.
use sluice_common::{
    EP_EGRESS_TIERED, EP_INGRESS_TIERED, POLICY_ADMIN, POLICY_ADMIN_ACTION_SHIFT, POLICY_ALLOW,
    POLICY_BASELINE, POLICY_BASELINE_DENY, PolicyValue, RULE_CNP_FLAG, action, proto,
};

use super::*;

fn key(dir: u8, identity: u32, l4: u8, port: u16, plen: u8) -> PolicyKey {
    PolicyKey {
        ep_id: EP_ID,
        identity,
        port,
        proto: l4,
        dir,
        plen,
        _pad: [0; 3],
    }
}

fn admin(act: u32, rank: u32, rule: u32) -> PolicyValue {
    PolicyValue {
        flags: POLICY_ADMIN | (act << POLICY_ADMIN_ACTION_SHIFT),
        admin_rank: rank,
        admin_rule: RULE_CNP_FLAG | rule,
        ..PolicyValue::default()
    }
}

fn baseline(deny: bool, rank: u32, rule: u32) -> PolicyValue {
    PolicyValue {
        flags: POLICY_BASELINE | if deny { POLICY_BASELINE_DENY } else { 0 },
        baseline_rank: rank,
        baseline_rule: RULE_CNP_FLAG | rule,
        ..PolicyValue::default()
    }
}

fn put(dp: &mut Datapath, ep: &mut EndpointInfo, k: PolicyKey, v: PolicyValue) {
    dp.set_policy(k, v);
    ep.port_plens[usize::from(k.dir)] |= sluice_common::plen_bits(k.identity, k.proto, k.plen);
    dp.set_endpoint(ep);
}

#[test]
fn an_admin_deny_drops_what_a_network_policy_allows_and_names_its_rule_in_both_families() {
    with_datapath(|dp| {
        let mut ep = endpoint(EP_INGRESS_ISOLATED | EP_INGRESS_TIERED);
        dp.set_endpoint(&ep);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        dp.set_ipcache(mapped(v6(PEER6)), 128, PEER_ID);
        allow_any_proto(dp, &mut ep, DIR_INGRESS, IDENTITY_ANY);
        // The Admin Deny shares the exact-port key with nothing: its own.
        put(
            dp,
            &mut ep,
            key(DIR_INGRESS, PEER_ID, proto::TCP, 80, 16),
            admin(action::DENY, 10 << 22, 5),
        );
        for (peer, pod) in [(v4(PEER4), v4(POD4)), (v6(PEER6), v6(POD6))] {
            assert!(!pass(
                dp,
                DIR_INGRESS,
                &Packet::tcp(peer, 1000, pod, 80, TCP_SYN)
            ));
            assert!(
                pass(dp, DIR_INGRESS, &Packet::tcp(peer, 1000, pod, 81, TCP_SYN)),
                "NP allows the rest"
            );
        }
        assert_eq!(dp.drops(EP_ID, reason::ADMIN_DENIED, DIR_INGRESS).0, 2);
        let ev = dp.events();
        assert_eq!(ev.len(), 2);
        assert!(
            ev.iter()
                .all(|e| e.reason == reason::ADMIN_DENIED && e.rule_id == RULE_CNP_FLAG | 5)
        );
    });
}

#[test]
fn an_admin_accept_passes_into_an_isolated_endpoint_with_no_allow() {
    with_datapath(|dp| {
        let mut ep = endpoint(EP_INGRESS_ISOLATED | EP_INGRESS_TIERED);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        put(
            dp,
            &mut ep,
            key(DIR_INGRESS, PEER_ID, 0, 0, 0),
            admin(action::ACCEPT, 1, 1),
        );
        assert!(pass(
            dp,
            DIR_INGRESS,
            &Packet::udp(v4(PEER4), 1000, v4(POD4), 53)
        ));
        assert!(!pass(
            dp,
            DIR_INGRESS,
            &Packet::udp(v4(OTHER4), 1000, v4(POD4), 53)
        ));
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 1);
    });
}

#[test]
fn the_lowest_rank_over_every_hit_decides_and_pass_falls_through_to_baseline() {
    with_datapath(|dp| {
        // Not isolated by a NetworkPolicy; tiered egress.
        let mut ep = endpoint(EP_EGRESS_TIERED);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        // Admin: Pass (rank 5) for the peer on TCP 80, Deny-all (rank 10)
        // for any peer; Baseline: Deny for the peer.
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, proto::TCP, 80, 16),
            admin(action::PASS, 5, 1),
        );
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, IDENTITY_ANY, 0, 0, 0),
            admin(action::DENY, 10, 2),
        );
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, 0, 0, 0),
            baseline(true, 0, 3),
        );
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1000, v4(PEER4), 80, TCP_SYN)
        ));
        assert_eq!(
            dp.drops(EP_ID, reason::BASELINE_DENIED, DIR_EGRESS).0,
            1,
            "Pass, then Baseline"
        );
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1000, v4(PEER4), 81, TCP_SYN)
        ));
        assert_eq!(
            dp.drops(EP_ID, reason::ADMIN_DENIED, DIR_EGRESS).0,
            1,
            "no Pass on 81"
        );
        // A Baseline Accept instead: the passed flow is allowed.
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, 0, 0, 0),
            baseline(false, 0, 3),
        );
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1000, v4(PEER4), 80, TCP_SYN)
        ));
        // An Admin Accept ranked before the Pass wins over it.
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, proto::TCP, 0, 0),
            admin(action::ACCEPT, 4, 4),
        );
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1001, v4(PEER4), 81, TCP_SYN)
        ));
        let _ = POLICY_ALLOW;
    });
}

#[test]
fn an_admin_deny_to_a_cidr_group_blocks_the_metadata_address() {
    with_datapath(|dp| {
        let mut ep = endpoint(EP_EGRESS_TIERED);
        let group = IDENTITY_CIDR_FLAG | 9;
        let imds = Ipv4Addr::new(169, 254, 169, 254);
        dp.set_cidr(EP_ID, DIR_EGRESS, mapped(v4(imds)), 128, group);
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, group, 0, 0, 0),
            admin(action::DENY, 10 << 22, 7),
        );
        assert!(!pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1000, v4(imds), 80, TCP_SYN)
        ));
        assert!(pass(
            dp,
            DIR_EGRESS,
            &Packet::tcp(v4(POD4), 1000, v4(OTHER4), 80, TCP_SYN)
        ));
        let ev = dp.events();
        assert_eq!(
            ev.iter().map(|e| (e.reason, e.rule_id)).collect::<Vec<_>>(),
            [(reason::ADMIN_DENIED, RULE_CNP_FLAG | 7)]
        );
    });
}

/// (pod, peer, other) addresses of both families.
fn families() -> [(IpAddr, IpAddr, IpAddr); 2] {
    [
        (v4(POD4), v4(PEER4), v4(OTHER4)),
        (v6(POD6), v6(PEER6), v6(OTHER6)),
    ]
}

/// A new TCP flow between the pod and `peer`, opened in `dir`.
fn syn(dir: u8, pod: IpAddr, peer: IpAddr, sport: u16, port: u16) -> Packet {
    if dir == DIR_EGRESS {
        Packet::tcp(pod, sport, peer, port, TCP_SYN)
    } else {
        Packet::tcp(peer, sport, pod, port, TCP_SYN)
    }
}

#[test]
fn a_baseline_deny_decides_only_where_no_network_policy_isolates_in_both_directions() {
    with_datapath(|dp| {
        let mut ep = endpoint(EP_INGRESS_TIERED | EP_EGRESS_TIERED);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        dp.set_ipcache(mapped(v6(PEER6)), 128, PEER_ID);
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            put(
                dp,
                &mut ep,
                key(dir, IDENTITY_ANY, 0, 0, 0),
                baseline(true, 3, 20 + u32::from(dir)),
            );
        }
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for (pod, peer, _) in families() {
                assert!(
                    !pass(dp, dir, &syn(dir, pod, peer, 1000, 80)),
                    "{dir} {peer}"
                );
            }
            assert_eq!(dp.drops(EP_ID, reason::BASELINE_DENIED, dir).0, 2);
        }
        let ev = dp.events();
        assert_eq!(ev.len(), 4);
        assert!(ev.iter().all(|e| e.reason == reason::BASELINE_DENIED
            && e.rule_id == RULE_CNP_FLAG | (20 + u32::from(e.dir))));
        // A NetworkPolicy isolates ingress and allows the peer: NetworkPolicy
        // decides there (the peer passes, another address hits its default
        // deny, not the Baseline); egress is still the Baseline's.
        ep.flags |= EP_INGRESS_ISOLATED;
        put(
            dp,
            &mut ep,
            key(DIR_INGRESS, PEER_ID, proto::TCP, 80, 16),
            PolicyValue {
                flags: POLICY_ALLOW,
                rule_id: 7,
                ..PolicyValue::default()
            },
        );
        for (pod, peer, other) in families() {
            assert!(pass(
                dp,
                DIR_INGRESS,
                &syn(DIR_INGRESS, pod, peer, 1001, 80)
            ));
            assert!(!pass(
                dp,
                DIR_INGRESS,
                &syn(DIR_INGRESS, pod, other, 1001, 80)
            ));
            assert!(!pass(dp, DIR_EGRESS, &syn(DIR_EGRESS, pod, peer, 1001, 80)));
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_INGRESS).0, 2);
        assert_eq!(dp.drops(EP_ID, reason::BASELINE_DENIED, DIR_INGRESS).0, 2);
        assert_eq!(dp.drops(EP_ID, reason::BASELINE_DENIED, DIR_EGRESS).0, 4);
    });
}

#[test]
fn admin_accept_and_pass_in_egress_of_both_families_against_an_isolating_network_policy() {
    with_datapath(|dp| {
        let mut ep = endpoint(EP_EGRESS_ISOLATED | EP_EGRESS_TIERED);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        dp.set_ipcache(mapped(v6(PEER6)), 128, PEER_ID);
        // Accept TCP 443 to the peer; Pass TCP 80 to anyone; a Baseline
        // Accept for everything, never consulted under isolation.
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, proto::TCP, 443, 16),
            admin(action::ACCEPT, 2, 1),
        );
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, IDENTITY_ANY, proto::TCP, 80, 16),
            admin(action::PASS, 1, 2),
        );
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, IDENTITY_ANY, 0, 0, 0),
            baseline(false, 0, 3),
        );
        for (pod, peer, other) in families() {
            assert!(pass(dp, DIR_EGRESS, &syn(DIR_EGRESS, pod, peer, 1000, 443)));
            assert!(!pass(
                dp,
                DIR_EGRESS,
                &syn(DIR_EGRESS, pod, other, 1000, 443)
            ));
            assert!(!pass(dp, DIR_EGRESS, &syn(DIR_EGRESS, pod, peer, 1000, 80)));
        }
        assert_eq!(dp.drops(EP_ID, reason::POLICY_DENIED, DIR_EGRESS).0, 4);
        // The NetworkPolicy allows port 80 to the peer: Pass, then NP.
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, proto::TCP, 80, 16),
            PolicyValue {
                flags: POLICY_ALLOW,
                rule_id: 7,
                ..PolicyValue::default()
            },
        );
        for (pod, peer, other) in families() {
            assert!(pass(dp, DIR_EGRESS, &syn(DIR_EGRESS, pod, peer, 1001, 80)));
            assert!(!pass(
                dp,
                DIR_EGRESS,
                &syn(DIR_EGRESS, pod, other, 1001, 80)
            ));
        }
        // An NP allow and an Admin rule on the same key: the Admin Deny
        // ranked first wins over both the Pass and the allow.
        put(
            dp,
            &mut ep,
            key(DIR_EGRESS, PEER_ID, proto::TCP, 80, 16),
            PolicyValue {
                rule_id: 7,
                ..admin(action::DENY, 0, 4)
            },
        );
        for (pod, peer, _) in families() {
            assert!(!pass(dp, DIR_EGRESS, &syn(DIR_EGRESS, pod, peer, 1002, 80)));
        }
        assert_eq!(dp.drops(EP_ID, reason::ADMIN_DENIED, DIR_EGRESS).0, 2);
    });
}

#[test]
fn a_new_admin_deny_revokes_an_established_flow_and_names_its_rule() {
    with_datapath(|dp| {
        let mut ep = endpoint(EP_INGRESS_ISOLATED);
        dp.set_ipcache(mapped(v4(PEER4)), 128, PEER_ID);
        dp.set_ipcache(mapped(v6(PEER6)), 128, PEER_ID);
        allow(dp, &mut ep, DIR_INGRESS, PEER_ID, proto::TCP, 80, 16);
        for (pod, peer, _) in families() {
            assert!(pass(
                dp,
                DIR_INGRESS,
                &syn(DIR_INGRESS, pod, peer, 40000, 80)
            ));
            let synack = Packet::tcp(pod, 80, peer, 40000, TCP_SYN | TCP_ACK);
            assert!(pass(dp, DIR_EGRESS, &synack));
        }
        // The Admin Deny arrives (the endpoint becomes tiered), the agent
        // bumps the epoch: the established flows are judged again.
        ep.flags |= EP_INGRESS_TIERED;
        put(
            dp,
            &mut ep,
            key(DIR_INGRESS, PEER_ID, 0, 0, 0),
            admin(action::DENY, 5, 11),
        );
        dp.events();
        dp.bump_epoch();
        for (pod, peer, _) in families() {
            let data_in = Packet::tcp(peer, 40000, pod, 80, TCP_ACK);
            let data_out = Packet::tcp(pod, 80, peer, 40000, TCP_ACK);
            assert!(!pass(dp, DIR_INGRESS, &data_in), "{peer}");
            assert!(!pass(dp, DIR_EGRESS, &data_out), "{peer}: the reply side");
        }
        let ev = dp.events();
        assert!(!ev.is_empty());
        assert!(
            ev.iter()
                .all(|e| e.reason == reason::REVOKED && e.rule_id == RULE_CNP_FLAG | 11),
            "{ev:?}"
        );
    });
}
