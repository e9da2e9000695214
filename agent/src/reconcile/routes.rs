//! Routes to the other nodes' pod CIDRs, each via that node's InternalIP
//! or, through the VXLAN device, via the peer's gateway there (onlink;
//! `vxlan.rs`), kept in line with the Node objects (rtnetlink; never
//! `ip route`). Only routes this agent added are ever removed.
use std::{collections::BTreeSet, net::IpAddr};

use ipnetwork::IpNetwork;
use rtnetlink::{Handle, RouteMessageBuilder};
use sluice_common::netlink::errno;
use tracing::{info, warn};

/// (destination, gateway, the tunnel device's index when through it).
pub type Route = (IpNetwork, IpAddr, Option<u32>);

pub struct Routes {
    handle: Handle,
    installed: BTreeSet<Route>,
}

fn message(r: &Route) -> Result<netlink_packet_route::route::RouteMessage, String> {
    let (net, gw, tunnel) = r;
    let b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.network(), net.prefix())
        .and_then(|b| b.gateway(*gw))
        .map_err(|e| format!("route {net} via {gw}: {e}"))?;
    if let Some(idx) = tunnel {
        return Ok(b.output_interface(*idx).onlink().build());
    }
    let mut b = b;
    // Name the interface the gateway is on: the kernel refuses some IPv6
    // gateway routes without it (EINVAL), where `ip route` finds it itself.
    if let Some(oif) =
        crate::netdev::interface_towards(*gw).and_then(|n| crate::netdev::index_of(&n))
    {
        b = b.output_interface(oif);
    }
    Ok(b.build())
}

impl Routes {
    /// A netlink connection in the calling thread's network namespace.
    pub fn new() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            installed: BTreeSet::new(),
        })
    }

    /// The netlink handle, shared with the VXLAN device's requests.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Adds what is missing and removes what this agent added and is no
    /// longer wanted. Failures are logged and retried on the next sync.
    pub async fn sync(&mut self, desired: &BTreeSet<Route>) {
        for r in desired.difference(&self.installed.clone()) {
            let msg = match message(r) {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "bad route");
                    continue;
                }
            };
            match self.handle.route().add(msg).replace().execute().await {
                Ok(()) => {
                    info!(dst = %r.0, via = %r.1, tunnel = r.2.is_some(), "route to a node's pods");
                    self.installed.insert(*r);
                }
                Err(e) => warn!(dst = %r.0, via = %r.1, error = %e, "adding route failed"),
            }
        }
        for r in self.installed.clone().difference(desired) {
            let Ok(msg) = message(r) else { continue };
            match self.handle.route().del(msg).execute().await {
                Ok(()) => {
                    self.installed.remove(r);
                }
                // Already gone (e.g. its interface went away): fine.
                Err(e) if errno(&e) == Some(libc::ESRCH) || errno(&e) == Some(libc::ENOENT) => {
                    self.installed.remove(r);
                }
                Err(e) => warn!(dst = %r.0, error = %e, "removing route failed"),
            }
        }
    }
}
