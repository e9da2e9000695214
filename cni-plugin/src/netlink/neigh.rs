//! Neighbour (ARP/NDP) entries.
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::Handle;

use crate::{Error, Result};

/// Makes `ip` resolve to `mac` on link `index` forever (NUD_PERMANENT);
/// replaces whatever entry was there.
pub async fn set_permanent(h: &Handle, index: u32, ip: IpAddr, mac: &[u8; 6]) -> Result<()> {
    h.neighbours()
        .add(index, ip)
        .state(NeighbourState::Permanent)
        .link_layer_address(mac)
        .replace()
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("neighbour {ip} on link {index}"), e))
}

/// Permanent entries on link `index`.
pub async fn permanent(h: &Handle, index: u32) -> Result<Vec<(IpAddr, Vec<u8>)>> {
    let msgs: Vec<_> = h
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list neighbours", e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
        .filter_map(|m| {
            let mut ip = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4));
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6));
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => mac = Some(l.clone()),
                    _ => {}
                }
            }
            Some((ip?, mac?))
        })
        .collect())
}
