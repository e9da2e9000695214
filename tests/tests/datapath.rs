//! The TC programs on crafted packets, through BPF_PROG_TEST_RUN. Each test
//! gets its own network namespace and bpffs (see `datapath/harness.rs`);
//! run as root: `cargo test -p sluice-tests --test datapath`.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

#[path = "datapath/harness.rs"]
mod harness;
#[path = "datapath/packet.rs"]
mod packet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use harness::{Datapath, LOOPBACK, with_datapath};
use packet::*;
use sluice_common::*;

const EP_ID: u32 = LOOPBACK;
const POD4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 7);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 7);

fn pod4() -> IpAddr {
    IpAddr::V4(POD4)
}
fn pod6() -> IpAddr {
    IpAddr::V6(POD6)
}
fn peer4() -> IpAddr {
    IpAddr::V4(PEER4)
}
fn peer6() -> IpAddr {
    IpAddr::V6(PEER6)
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

const ISOLATED: u32 = EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED;

#[test]
fn a_tcp_packet_of_a_registered_non_isolated_endpoint_passes_both_ways() {
    with_datapath(|dp: &mut Datapath| {
        dp.set_endpoint(&endpoint(0));
        assert!(dp.passes(
            DIR_EGRESS,
            &Packet::tcp(pod4(), 40000, peer4(), 80, TCP_SYN).frame()
        ));
        assert!(dp.passes(
            DIR_INGRESS,
            &Packet::tcp(peer6(), 40000, pod6(), 80, TCP_SYN).frame()
        ));
    });
}
