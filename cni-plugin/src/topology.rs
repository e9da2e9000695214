//! The routed layout of one pod, as data (no I/O). ADD applies it, CHECK
//! compares the kernel against it, the result reports it.
//!
//! There is no bridge and no per-node subnet on any link: the pod gets its
//! address as /32 (/128) and reaches everything through a link-local
//! gateway that every pod sees at the same address:
//!
//! - IPv4: `169.254.1.1/32 dev eth0 scope link`, then `default via
//!   169.254.1.1 dev eth0`. Nobody owns 169.254.1.1; the pod has a permanent
//!   neighbour entry mapping it to the host end's MAC, so no ARP is ever
//!   needed for the gateway and the host end needs no IPv4 address (the
//!   Calico trick, minus proxy ARP).
//! - IPv6: `default via fe80::1 dev eth0`. The host end owns `fe80::1/64`
//!   (link-local addresses are per link, so every host end can) and the pod
//!   also has a permanent neighbour entry for it.
//! - Host: `<pod ip>/32 dev <host end>` and `<pod ip6>/128 dev <host end>`,
//!   with forwarding on in the node namespace.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Prefix of `fe80::1` on the host end.
pub const GATEWAY_V6_PREFIX: u8 = 64;
/// `RT_SCOPE_LINK`, as CNI 1.1.0 routes spell scopes.
pub const SCOPE_LINK: u8 = 253;

/// A route inside the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRoute {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    /// Scope link, no gateway: the route that makes the v4 gateway on-link.
    pub link_scope: bool,
}

/// The pod's routes for the families it has, in the order ADD adds them
/// (the on-link route to the IPv4 gateway must precede the default route
/// through it).
pub fn pod_routes(v4: bool, v6: bool) -> Vec<PodRoute> {
    let mut out = Vec::new();
    if v4 {
        out.push(PodRoute {
            dst: host_net(IpAddr::V4(GATEWAY_V4)),
            gw: None,
            link_scope: true,
        });
        out.push(PodRoute {
            dst: default_net(false),
            gw: Some(IpAddr::V4(GATEWAY_V4)),
            link_scope: false,
        });
    }
    if v6 {
        out.push(PodRoute {
            dst: default_net(true),
            gw: Some(IpAddr::V6(GATEWAY_V6)),
            link_scope: false,
        });
    }
    out
}

/// The gateway of a pod address's family.
pub fn gateway_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(GATEWAY_V4),
        IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
    }
}

/// `ip/32` or `ip/128`: how the pod holds its address and how the host
/// routes to it.
pub fn host_net(ip: IpAddr) -> IpNetwork {
    IpNetwork::from(ip)
}

// Evaluated at compile time: a /0 is valid for any address.
const DEFAULT_V4: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(n) => n,
    None => panic!("0.0.0.0/0"),
};
const DEFAULT_V6: Ipv6Network = match Ipv6Network::new_checked(Ipv6Addr::UNSPECIFIED, 0) {
    Some(n) => n,
    None => panic!("::/0"),
};

pub fn default_net(v6: bool) -> IpNetwork {
    if v6 {
        IpNetwork::V6(DEFAULT_V6)
    } else {
        IpNetwork::V4(DEFAULT_V4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_pods_get_the_link_route_first_then_both_defaults() {
        let r = pod_routes(true, true);
        let shown: Vec<String> = r
            .iter()
            .map(|r| format!("{} {:?} {}", r.dst, r.gw, r.link_scope))
            .collect();
        assert_eq!(
            shown,
            [
                "169.254.1.1/32 None true",
                "0.0.0.0/0 Some(169.254.1.1) false",
                "::/0 Some(fe80::1) false"
            ]
        );
    }

    #[test]
    fn single_stack_pods_get_only_their_family() {
        assert_eq!(pod_routes(false, true).len(), 1);
        assert_eq!(pod_routes(true, false).len(), 2);
    }

    #[test]
    fn host_nets_are_full_length() {
        assert_eq!(host_net("10.0.0.1".parse().unwrap()).prefix(), 32);
        assert_eq!(host_net(IpAddr::V6(GATEWAY_V6)).prefix(), 128);
    }
}
