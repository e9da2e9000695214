//! Reaching the other nodes: routes to their pod CIDRs, direct or through
//! the VXLAN device as `--tunnel` and the peer's address say, and
//! `to_uplink` on the interfaces those routes leave by (deferred Service
//! egress to pods on other nodes is judged there). Only what this agent
//! added is removed.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnetwork::IpNetwork;
use tracing::{error, info, warn};

use super::{
    Reconciler,
    routes::{Route, Routes},
    vxlan::{self, TunnelConfig, TunnelMode, Vxlan},
};
use crate::{cluster::PeerNode, netdev};

pub struct Network {
    routes: Routes,
    mode: TunnelMode,
    vxlan: Vxlan,
    /// Interfaces with `to_uplink` attached.
    uplinks: BTreeSet<String>,
}

/// How one pod CIDR of a peer is reached.
#[derive(Debug, PartialEq, Eq)]
pub enum Path {
    Direct(IpAddr),
    /// Through VXLAN to this VTEP.
    Tunnel(IpAddr),
    Unreachable,
}

/// The choice per peer (docs/design.md, "Nodes on different subnets"):
/// `none` routes via the peer's InternalIP of the CIDR's family; `vxlan`
/// encapsulates to the peer's InternalIP of the local VTEP's family; `auto`
/// routes directly when that same-family address is within a connected
/// subnet of one of this node's interfaces (`on_link`) and encapsulates
/// otherwise.
pub fn choose(
    mode: TunnelMode,
    net: &IpNetwork,
    peer_ips: &[IpAddr],
    local_vtep: Option<IpAddr>,
    on_link: impl Fn(IpAddr) -> bool,
) -> Path {
    let direct = peer_ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == net.is_ipv4());
    let vtep = local_vtep.and_then(|l| {
        peer_ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == l.is_ipv4())
    });
    let tunnel = vtep.map_or(Path::Unreachable, Path::Tunnel);
    match (mode, direct) {
        (TunnelMode::None, Some(gw)) => Path::Direct(gw),
        (TunnelMode::None, None) => Path::Unreachable,
        (TunnelMode::Vxlan, _) => tunnel,
        (TunnelMode::Auto, Some(gw)) if on_link(gw) => Path::Direct(gw),
        (TunnelMode::Auto, _) => tunnel,
    }
}

/// This node's VTEP: its first IPv4 InternalIP, else its first IPv6 one.
pub fn local_vtep(own: &[IpAddr]) -> Option<IpAddr> {
    own.iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .or_else(|| own.first().copied())
}

impl Network {
    pub fn new(tunnel: TunnelConfig) -> std::io::Result<Self> {
        let routes = Routes::new()?;
        let vxlan = Vxlan::new(routes.handle(), tunnel);
        Ok(Self {
            routes,
            mode: tunnel.mode,
            vxlan,
            uplinks: BTreeSet::new(),
        })
    }

    /// The routes to `peers`' pod CIDRs (the VXLAN device and its entries
    /// first, when some go through it).
    async fn desired(&mut self, peers: &[PeerNode], own: &[IpAddr]) -> BTreeSet<Route> {
        let local = local_vtep(own);
        let mut desired = BTreeSet::new();
        let mut tunnelled: BTreeMap<IpAddr, Vec<IpNetwork>> = BTreeMap::new();
        for p in peers {
            for net in &p.pod_cidrs {
                let on_link =
                    |ip| netdev::interface_towards(ip).is_some_and(|i| i != vxlan::DEVICE);
                match choose(self.mode, net, &p.internal_ips, local, on_link) {
                    Path::Direct(gw) => {
                        desired.insert((*net, gw, None));
                    }
                    Path::Tunnel(vtep) => tunnelled.entry(vtep).or_default().push(*net),
                    Path::Unreachable => {
                        warn!(node = %p.name, cidr = %net, "no InternalIP to reach this pod CIDR by");
                    }
                }
            }
        }
        if tunnelled.is_empty() {
            // No peer through the tunnel (any more): its entries go; the
            // device stays, idle, for the next one.
            if let Some(idx) = self.vxlan.index() {
                self.vxlan.sync(idx, &tunnelled).await;
            }
            return desired;
        }
        let Some(local) = local else {
            warn!("this node has no InternalIP: no VXLAN tunnel");
            return desired;
        };
        match self.vxlan.ensure(local).await {
            Ok(idx) => {
                self.vxlan.sync(idx, &tunnelled).await;
                for (vtep, nets) in &tunnelled {
                    let mac = vxlan::mac_of(*vtep);
                    for net in nets {
                        desired.insert((*net, vxlan::gateway(net, mac), Some(idx)));
                    }
                }
            }
            Err(e) => error!(error = %e, "the VXLAN device is not ready; retried on the next sync"),
        }
        desired
    }

    /// Routes for `peers`, then uplinks attached where they leave and
    /// detached where none leaves any more. Failures are logged and retried
    /// on the next call.
    pub async fn sync(&mut self, peers: &[PeerNode], own: &[IpAddr], reconciler: &Reconciler) {
        let desired = self.desired(peers, own).await;
        self.routes.sync(&desired).await;
        let wanted: BTreeSet<String> = desired
            .iter()
            .filter_map(|(_, gw, tunnel)| match tunnel {
                Some(_) => Some(vxlan::DEVICE.to_owned()),
                None => netdev::interface_towards(*gw),
            })
            .collect();
        for ifname in wanted.difference(&self.uplinks.clone()) {
            let name = ifname.clone();
            match reconciler
                .with(move |st| Ok(st.dp.programs.attach_uplink(&name)?))
                .await
            {
                Ok(()) => {
                    info!(%ifname, "uplink attached");
                    self.uplinks.insert(ifname.clone());
                }
                Err(e) => error!(%ifname, error = %e, "attaching the uplink program failed"),
            }
        }
        for ifname in self.uplinks.clone().difference(&wanted) {
            let name = ifname.clone();
            match reconciler
                .with(move |st| Ok(st.dp.programs.detach_uplink(&name)?))
                .await
            {
                Ok(()) => {
                    info!(%ifname, "uplink detached");
                    self.uplinks.remove(ifname);
                }
                Err(e) => error!(%ifname, error = %e, "detaching the uplink program failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_choice_per_peer() {
        let v4: IpNetwork = "10.244.2.0/24".parse().unwrap();
        let v6: IpNetwork = "fd00:244:2::/64".parse().unwrap();
        let peer = [ip("10.77.2.2")];
        let local = Some(ip("10.77.1.2"));
        let on = |_| true;
        let off = |_| false;
        use TunnelMode::*;
        assert_eq!(
            choose(None, &v4, &peer, local, off),
            Path::Direct(ip("10.77.2.2"))
        );
        assert_eq!(choose(None, &v6, &peer, local, on), Path::Unreachable);
        assert_eq!(
            choose(Auto, &v4, &peer, local, on),
            Path::Direct(ip("10.77.2.2"))
        );
        assert_eq!(
            choose(Auto, &v4, &peer, local, off),
            Path::Tunnel(ip("10.77.2.2"))
        );
        // IPv6 pods over an IPv4-only underlay: tunnelled, even when on-link.
        assert_eq!(
            choose(Auto, &v6, &peer, local, on),
            Path::Tunnel(ip("10.77.2.2"))
        );
        assert_eq!(
            choose(Vxlan, &v4, &peer, local, on),
            Path::Tunnel(ip("10.77.2.2"))
        );
        assert_eq!(
            choose(Vxlan, &v4, &peer, Option::None, on),
            Path::Unreachable
        );
        assert_eq!(
            local_vtep(&[ip("fd00::1"), ip("10.0.0.1")]),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(local_vtep(&[ip("fd00::1")]), Some(ip("fd00::1")));
    }
}
