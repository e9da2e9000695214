//! The node's own interfaces and addresses (getifaddrs), in one place:
//! endpoints check their host veth, the node's addresses get the host
//! identity, routes find the interface towards a gateway.
use std::net::IpAddr;

/// One address of an interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddr {
    pub ifname: String,
    pub ip: IpAddr,
    /// Prefix length of its subnet.
    pub prefix: u8,
}

/// Every IPv4 and IPv6 address of this network namespace's interfaces.
pub fn host_addresses() -> std::io::Result<Vec<HostAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    let mut out = Vec::new();
    for ifa in addrs {
        let (Some(addr), mask) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let (ip, prefix) = if let Some(v4) = addr.as_sockaddr_in() {
            let bits = mask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| u32::from(m.ip()).count_ones());
            (IpAddr::V4(v4.ip()), bits)
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let bits = mask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in6())
                .map_or(128, |m| u128::from(m.ip()).count_ones());
            (IpAddr::V6(v6.ip()), bits)
        } else {
            continue;
        };
        out.push(HostAddr {
            ifname: ifa.interface_name,
            ip,
            prefix: u8::try_from(prefix).unwrap_or(128),
        });
    }
    Ok(out)
}

/// The node's addresses that identify it to its pods (kubelet probes):
/// everything but loopback and IPv6 link-local.
pub fn node_ips() -> std::io::Result<Vec<IpAddr>> {
    Ok(host_addresses()?
        .into_iter()
        .map(|a| a.ip)
        .filter(|ip| !ip.is_loopback() && !matches!(ip, IpAddr::V6(a) if a.is_unicast_link_local()))
        .collect())
}

/// The interface with an address whose subnet holds `gw`.
pub fn interface_towards(gw: IpAddr) -> Option<String> {
    host_addresses().ok()?.into_iter().find_map(|a| {
        let net = ipnetwork::IpNetwork::new(a.ip, a.prefix).ok()?;
        net.contains(gw).then_some(a.ifname)
    })
}

/// True when `name` exists in this network namespace with `ifindex`.
pub fn interface_is(name: &str, ifindex: u32) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok_and(|i| i == ifindex)
}

/// The index of interface `name`.
pub fn index_of(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}
