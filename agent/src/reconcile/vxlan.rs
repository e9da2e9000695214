//! The VXLAN device towards nodes that are not on-link (docs/design.md,
//! "Nodes on different subnets: VXLAN"): created, kept and removed through
//! rtnetlink, with one FDB entry (peer MAC -> peer VTEP) and one permanent
//! neighbour entry per gateway (gateway -> peer MAC) per remote node.
//!
//! Addressing, so no node needs to publish anything beyond its InternalIP:
//! - every node's VXLAN MAC is derived from its VTEP address (`mac_of`);
//! - the IPv4 gateway towards a peer is the network address of its IPv4 pod
//!   CIDR (onlink), the IPv6 gateway the link-local address derived (EUI-64)
//!   from the peer's MAC.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
};
use rtnetlink::{Handle, LinkVxlan};
use sluice_common::netlink::errno;
use tracing::{info, warn};

/// The device's name. No dot (as flannel's `flannel.1` has): the uplink
/// hook's pin is named after the interface, and bpffs refuses dots.
pub const DEVICE: &str = "sluice-vxlan";
/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 7;
/// Default UDP port: the IANA VXLAN port (4789). flannel's 8472 (the old
/// Linux default) is avoided so both can run side by side during a move.
pub const DEFAULT_PORT: u16 = 4789;
/// Outer Ethernet + IPv4 + UDP + VXLAN headers.
pub const OVERHEAD_V4: u32 = 50;
/// Outer Ethernet + IPv6 + UDP + VXLAN headers.
pub const OVERHEAD_V6: u32 = 70;

/// `--tunnel`: how other nodes' pods are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TunnelMode {
    /// Direct routes to on-link nodes, VXLAN to the rest.
    #[default]
    Auto,
    /// Every other node through VXLAN.
    Vxlan,
    /// Direct routes only (every node on one L2 segment).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    pub mode: TunnelMode,
    pub vni: u32,
    pub port: u16,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            mode: TunnelMode::None,
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
        }
    }
}

/// The MAC of a node's VXLAN device, from its VTEP address: locally
/// administered unicast (0e), then 5c for IPv4 or 5d for IPv6, then the
/// address's last four bytes.
pub fn mac_of(vtep: IpAddr) -> [u8; 6] {
    let (kind, tail) = match vtep {
        IpAddr::V4(a) => (0x5c, a.octets()),
        IpAddr::V6(a) => {
            let o = a.octets();
            (0x5d, [o[12], o[13], o[14], o[15]])
        }
    };
    [0x0e, kind, tail[0], tail[1], tail[2], tail[3]]
}

/// The gateway through the device towards a peer's pod CIDR `net`.
pub fn gateway(net: &IpNetwork, peer_mac: [u8; 6]) -> IpAddr {
    match net {
        IpNetwork::V4(n) => IpAddr::V4(n.network()),
        IpNetwork::V6(_) => {
            let m = peer_mac;
            IpAddr::V6(Ipv6Addr::from([
                0xfe,
                0x80,
                0,
                0,
                0,
                0,
                0,
                0,
                m[0] ^ 0x02,
                m[1],
                m[2],
                0xff,
                0xfe,
                m[3],
                m[4],
                m[5],
            ]))
        }
    }
}

/// The device's MTU for an underlay interface of `mtu` and VTEP `local`.
pub fn device_mtu(underlay_mtu: u32, local: IpAddr) -> u32 {
    let overhead = if local.is_ipv4() {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    };
    underlay_mtu.saturating_sub(overhead)
}

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> VxlanError {
    let what = what.into();
    move |source| VxlanError::Netlink { what, source }
}

/// The device and what this agent put on it.
pub struct Vxlan {
    handle: Handle,
    cfg: TunnelConfig,
    /// (ifindex, local VTEP) of the device as configured.
    device: Option<(u32, IpAddr)>,
    /// Peer VTEP -> MAC, FDB entries installed.
    fdb: BTreeMap<IpAddr, [u8; 6]>,
    /// Gateway -> MAC, neighbour entries installed.
    neigh: BTreeMap<IpAddr, [u8; 6]>,
}

/// True when `l` is a VXLAN device with this VNI, port, local address and
/// MAC: what an earlier run of the agent made, kept as it is.
fn is_as_configured(l: &LinkMessage, cfg: &TunnelConfig, local: IpAddr) -> bool {
    let info: Vec<&InfoVxlan> = l
        .attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i),
            _ => None,
        })
        .flatten()
        .filter_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
            _ => None,
        })
        .flatten()
        .collect();
    let has = |want: InfoVxlan| info.iter().any(|i| **i == want);
    let local_ok = match local {
        IpAddr::V4(a) => has(InfoVxlan::Local(a)),
        IpAddr::V6(a) => has(InfoVxlan::Local6(a)),
    };
    let mac_ok = l
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Address(m) if m[..] == mac_of(local)[..]));
    local_ok && mac_ok && has(InfoVxlan::Id(cfg.vni)) && has(InfoVxlan::Port(cfg.port))
}

async fn link_get(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, VxlanError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<(u32, u32)>, VxlanError> {
    match link_get(handle, name).await {
        Ok(Some(l)) => {
            let mtu = l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
                .unwrap_or(0);
            Ok(Some((l.header.index, mtu)))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Vxlan {
    pub fn new(handle: Handle, cfg: TunnelConfig) -> Self {
        Self {
            handle,
            cfg,
            device: None,
            fdb: BTreeMap::new(),
            neigh: BTreeMap::new(),
        }
    }

    /// The device's index, if this agent has it in place.
    pub fn index(&self) -> Option<u32> {
        self.device.map(|(idx, _)| idx)
    }

    /// The device's index, creating it (or recreating it when its local
    /// VTEP changed) as needed, up, with an MTU that leaves room for the
    /// outer headers on the interface that holds `local`.
    pub async fn ensure(&mut self, local: IpAddr) -> Result<u32, VxlanError> {
        if let Some((idx, l)) = self.device
            && l == local
            && crate::netdev::interface_is(DEVICE, idx)
        {
            return Ok(idx);
        }
        self.fdb.clear();
        self.neigh.clear();
        if let Some(l) = link_get(&self.handle, DEVICE).await? {
            let idx = l.header.index;
            if is_as_configured(&l, &self.cfg, local) {
                // An earlier run's: kept, so a restart does not cut the
                // tunnel (its entries are written again, `replace`).
                info!(dev = DEVICE, ifindex = idx, %local, "VXLAN device kept");
                self.device = Some((idx, local));
                return Ok(idx);
            }
            // Another VNI, port or local address: start over.
            self.handle
                .link()
                .del(idx)
                .execute()
                .await
                .map_err(nl("removing the old VXLAN device"))?;
        }
        let underlay_mtu = match crate::netdev::interface_towards(local) {
            Some(ifname) => link_index(&self.handle, &ifname)
                .await?
                .map_or(1500, |(_, m)| m),
            None => 1500,
        };
        let mtu = device_mtu(underlay_mtu, local);
        let b = LinkVxlan::new(DEVICE, self.cfg.vni)
            .port(self.cfg.port)
            .learning(false);
        let b = match local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        let msg = b.mtu(mtu).address(mac_of(local).to_vec()).up().build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl("creating the VXLAN device"))?;
        let Some((idx, _)) = link_index(&self.handle, DEVICE).await? else {
            return Err(VxlanError::Netlink {
                what: "the VXLAN device vanished after creation".into(),
                source: rtnetlink::Error::RequestFailed,
            });
        };
        info!(dev = DEVICE, ifindex = idx, %local, vni = self.cfg.vni, port = self.cfg.port, mtu, "VXLAN device ready");
        self.device = Some((idx, local));
        Ok(idx)
    }

    /// FDB and neighbour entries as `peers` (VTEP -> the peer's pod CIDRs)
    /// say: what is missing added, what is no longer wanted removed.
    pub async fn sync(&mut self, idx: u32, peers: &BTreeMap<IpAddr, Vec<IpNetwork>>) {
        let fdb: BTreeMap<IpAddr, [u8; 6]> = peers.keys().map(|v| (*v, mac_of(*v))).collect();
        let neigh: BTreeMap<IpAddr, [u8; 6]> = peers
            .iter()
            .flat_map(|(v, nets)| {
                let mac = mac_of(*v);
                nets.iter().map(move |n| (gateway(n, mac), mac))
            })
            .collect();
        for (vtep, mac) in &fdb {
            if self.fdb.get(vtep) == Some(mac) {
                continue;
            }
            let mut req = self
                .handle
                .neighbours()
                .add_bridge(idx, mac)
                .flags(NeighbourFlags::Own)
                .replace();
            req.message_mut()
                .attributes
                .push(NeighbourAttribute::Destination(addr(*vtep)));
            match req.execute().await {
                Ok(()) => {
                    info!(%vtep, "VXLAN FDB entry");
                    self.fdb.insert(*vtep, *mac);
                }
                Err(e) => warn!(%vtep, error = %e, "adding a VXLAN FDB entry failed"),
            }
        }
        for (gw, mac) in &neigh {
            if self.neigh.get(gw) == Some(mac) {
                continue;
            }
            let req = self
                .handle
                .neighbours()
                .add(idx, *gw)
                .link_layer_address(mac)
                .replace();
            match req.execute().await {
                Ok(()) => {
                    self.neigh.insert(*gw, *mac);
                }
                Err(e) => warn!(%gw, error = %e, "adding a VXLAN neighbour failed"),
            }
        }
        for (gw, _) in self
            .neigh
            .clone()
            .iter()
            .filter(|(g, _)| !neigh.contains_key(g))
        {
            let mut m = NeighbourMessage::default();
            m.header.family = family(*gw);
            m.header.ifindex = idx;
            m.attributes
                .push(NeighbourAttribute::Destination(addr(*gw)));
            if self.delete(m, "neighbour").await {
                self.neigh.remove(gw);
            }
        }
        for (vtep, mac) in self
            .fdb
            .clone()
            .iter()
            .filter(|(v, _)| !fdb.contains_key(v))
        {
            let mut m = NeighbourMessage::default();
            m.header.family = netlink_packet_route::AddressFamily::Bridge;
            m.header.ifindex = idx;
            m.header.flags = NeighbourFlags::Own;
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            m.attributes
                .push(NeighbourAttribute::Destination(addr(*vtep)));
            if self.delete(m, "FDB entry").await {
                self.fdb.remove(vtep);
            }
        }
    }

    async fn delete(&self, m: NeighbourMessage, what: &str) -> bool {
        match self.handle.neighbours().del(m).execute().await {
            Ok(()) => true,
            Err(e) if errno(&e) == Some(libc::ENOENT) || errno(&e) == Some(libc::ENODEV) => true,
            Err(e) => {
                warn!(what, error = %e, "removing a VXLAN entry failed");
                false
            }
        }
    }

    /// Removes the device (and with it every entry on it), if it exists.
    pub async fn remove(&mut self) -> Result<(), VxlanError> {
        self.fdb.clear();
        self.neigh.clear();
        self.device = None;
        remove_device(&self.handle).await
    }
}

/// `uninstall`: removes `sluice-vxlan` from this network namespace, if
/// there (its FDB and neighbour entries and routes go with it).
pub async fn uninstall() -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let done = remove_device(&handle).await;
    task.abort();
    Ok(done?)
}

/// Removes `sluice-vxlan` if present.
pub async fn remove_device(handle: &Handle) -> Result<(), VxlanError> {
    if let Some((idx, _)) = link_index(handle, DEVICE).await? {
        handle
            .link()
            .del(idx)
            .execute()
            .await
            .map_err(nl("removing the VXLAN device"))?;
        info!(dev = DEVICE, "VXLAN device removed");
    }
    Ok(())
}

fn addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

fn family(ip: IpAddr) -> netlink_packet_route::AddressFamily {
    if ip.is_ipv4() {
        netlink_packet_route::AddressFamily::Inet
    } else {
        netlink_packet_route::AddressFamily::Inet6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_gateways_follow_the_documented_scheme() {
        let v = IpAddr::from([10, 77, 2, 2]);
        let mac = mac_of(v);
        assert_eq!(mac, [0x0e, 0x5c, 10, 77, 2, 2]);
        let n4: IpNetwork = "10.244.2.0/24".parse().unwrap();
        assert_eq!(gateway(&n4, mac), IpAddr::from([10, 244, 2, 0]));
        let n6: IpNetwork = "fd00:10:244:2::/64".parse().unwrap();
        assert_eq!(
            gateway(&n6, mac),
            "fe80::c5c:aff:fe4d:202".parse::<IpAddr>().unwrap()
        );
        let m6 = mac_of("fd00::1:2:3:4".parse().unwrap());
        assert_eq!(m6, [0x0e, 0x5d, 0, 3, 0, 4]);
    }

    #[test]
    fn mtu_leaves_room_for_the_outer_headers() {
        assert_eq!(device_mtu(1500, IpAddr::from([10, 0, 0, 1])), 1450);
        assert_eq!(device_mtu(1500, "fd00::1".parse().unwrap()), 1430);
        assert_eq!(device_mtu(9001, IpAddr::from([10, 0, 0, 1])), 8951);
    }
}
