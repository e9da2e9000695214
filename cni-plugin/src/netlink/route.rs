//! Routes in the main table.
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::{EEXIST, tolerate};
use crate::{Error, Result};

/// A unicast route of the main table, as far as we care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    pub link_scope: bool,
}

/// Adds `r`; an identical route already there is fine.
pub async fn add(h: &Handle, r: &Route) -> Result<()> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.ip(), r.dst.prefix())
        .map_err(|e| Error::Internal(format!("route to {}: {e}", r.dst)))?;
    if let Some(gw) = r.gw {
        b = b
            .gateway(gw)
            .map_err(|e| Error::Internal(format!("route via {gw}: {e}")))?;
    }
    if let Some(oif) = r.oif {
        b = b.output_interface(oif);
    }
    if r.link_scope {
        b = b.scope(RouteScope::Link);
    }
    tolerate(h.route().add(b.build()).execute().await, &[EEXIST], || {
        format!("add route {} via {:?} dev {:?}", r.dst, r.gw, r.oif)
    })?;
    Ok(())
}

/// Unicast routes of the main table for one family.
pub async fn list(h: &Handle, v6: bool) -> Result<Vec<Route>> {
    let family = if v6 { IpVersion::V6 } else { IpVersion::V4 };
    let msg = match family {
        IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    };
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list routes", e))?;
    Ok(msgs
        .iter()
        .filter(|m| {
            m.header.table == RouteHeader::RT_TABLE_MAIN && m.header.kind == RouteType::Unicast
        })
        .filter_map(from_message)
        .collect())
}

fn from_message(m: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Gateway(g) => gw = ip_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    // A route without RTA_DST is the default route of its family.
    let dst_ip = dst.unwrap_or(
        if m.header.address_family == netlink_packet_route::AddressFamily::Inet6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        },
    );
    Some(Route {
        dst: IpNetwork::new(dst_ip, m.header.destination_prefix_length).ok()?,
        gw,
        oif,
        link_scope: m.header.scope == RouteScope::Link,
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
