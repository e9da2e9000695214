//! Addresses.
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::Handle;

use super::{EEXIST, tolerate};
use crate::{Error, Result};

/// Adds `ip/prefix` to link `index`; already present is fine. IPv6
/// addresses skip DAD (IFA_F_NODAD): they are unique by construction (IPAM,
/// or a link-local gateway alone on its link), and a tentative address
/// would not be usable for the first second of the pod's life.
pub async fn add(h: &Handle, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
    let mut req = h.address().add(index, ip, prefix);
    if ip.is_ipv6() {
        let m = req.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    tolerate(req.execute().await, &[EEXIST], || {
        format!("add address {ip}/{prefix} to link {index}")
    })?;
    Ok(())
}

/// Addresses (with prefix length) on link `index`.
pub async fn list(h: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink(format!("list addresses of link {index}"), e))?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            // IFA_LOCAL is the interface's own address on point-to-point
            // links; IFA_ADDRESS otherwise. Either names it here.
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                    Some((*ip, m.header.prefix_len))
                }
                _ => None,
            })
        })
        .collect())
}
