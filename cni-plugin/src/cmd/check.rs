//! CHECK: the kernel, IPAM and the agent still match the prevResult of ADD.
//!
//! A missing namespace or pod interface is error 3 (the container is gone);
//! anything else that differs is `ENDPOINT_DRIFT`; an agent complaint keeps
//! the agent's code.
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use sluice_proto::Request;

use super::open_store;
use crate::agent::Agent;
use crate::config::NetConf;
use crate::env::AttachmentEnv;
use crate::netlink::{Netlink, addr, link, neigh, route};
use crate::result::{CniResult, format_mac};
use crate::topology::{self, GATEWAY_V4, GATEWAY_V6};
use crate::{Error, Result, ipam, names, netns};

/// What the pod namespace looks like.
#[derive(Debug)]
pub struct PodFacts {
    pub link: link::Link,
    pub addrs: Vec<(IpAddr, u8)>,
    pub routes: Vec<route::Route>,
    pub neighbours: Vec<(IpAddr, Vec<u8>)>,
}

pub fn check(conf: &NetConf, env: &AttachmentEnv) -> Result<()> {
    let att = env.attachment();
    let netns_path = env.netns()?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| Error::InvalidConfig("CHECK needs prevResult".into()))?;
    let (pod_index, _) = prev.pod_interface(&env.ifname).ok_or_else(|| {
        Error::Drift(format!(
            "prevResult has no sandbox interface {}",
            env.ifname
        ))
    })?;
    let want: Vec<IpNetwork> = prev.ips_of(pod_index).map(|i| i.address).collect();

    let pod = netns::with_netns(netns_path, || {
        let nl = Netlink::open()?;
        let h = nl.handle();
        nl.run(async {
            let Some(l) = link::get(h, &env.ifname).await? else {
                return Ok(None);
            };
            let mut routes = route::list(h, false).await?;
            routes.extend(route::list(h, true).await?);
            Ok(Some(PodFacts {
                addrs: addr::list(h, l.index).await?,
                neighbours: neigh::permanent(h, l.index).await?,
                routes,
                link: l,
            }))
        })
    })?
    .ok_or_else(|| {
        Error::ContainerUnknown(format!("no {} in {}", env.ifname, netns_path.display()))
    })?;

    let host_name = names::host_ifname(&att);
    let node = Netlink::open()?;
    let h = node.handle();
    let host = node
        .run(link::get(h, &host_name))?
        .ok_or_else(|| Error::Drift(format!("host interface {host_name} is missing")))?;
    let mut host_routes = node.run(route::list(h, false))?;
    host_routes.extend(node.run(route::list(h, true))?);

    verify_pod(prev, &want, &pod, &host.mac).map_err(Error::Drift)?;
    verify_host(prev, &want, &host, &host_routes).map_err(Error::Drift)?;

    let held: BTreeSet<IpAddr> = ipam::owned_by(&open_store(conf)?, &att)?
        .into_iter()
        .collect();
    let wanted: BTreeSet<IpAddr> = want.iter().map(IpNetwork::ip).collect();
    if held != wanted {
        return Err(Error::Drift(format!(
            "IPAM holds {held:?} for this attachment, prevResult has {wanted:?}"
        )));
    }

    Agent::new(&conf.agent_socket, conf.agent_timeout)
        .expect_ok(&Request::CheckEndpoint { attachment: att })
}

/// The pod end is up, has its addresses, the gateway neighbours point at
/// the host end, and the routes through the gateways are there.
pub fn verify_pod(
    prev: &CniResult,
    want: &[IpNetwork],
    pod: &PodFacts,
    host_mac: &[u8; 6],
) -> Result<(), String> {
    let name = &pod.link.name;
    if !pod.link.up {
        return Err(format!("{name} is down"));
    }
    for w in want {
        if !pod.addrs.contains(&(w.ip(), w.prefix())) {
            return Err(format!("{name} lacks address {w}"));
        }
    }
    let v4 = want.iter().any(IpNetwork::is_ipv4);
    let v6 = want.iter().any(IpNetwork::is_ipv6);
    let gateways = [(v4, IpAddr::V4(GATEWAY_V4)), (v6, IpAddr::V6(GATEWAY_V6))];
    for (_, gw) in gateways.iter().filter(|(on, _)| *on) {
        if !pod
            .neighbours
            .iter()
            .any(|(ip, mac)| ip == gw && mac.as_slice() == host_mac)
        {
            return Err(format!(
                "{name} lacks the permanent neighbour {gw} -> {}",
                format_mac(host_mac)
            ));
        }
    }
    // Ours by construction, plus whatever prevResult routes through our
    // gateways; routes of other plugins in the chain are theirs to check.
    let mut expected: Vec<(IpNetwork, Option<IpAddr>)> = topology::pod_routes(v4, v6)
        .into_iter()
        .map(|r| (r.dst, r.gw))
        .collect();
    for r in &prev.routes {
        let ours =
            r.gw.is_some_and(|g| gateways.iter().any(|(_, gw)| *gw == g));
        if ours && !expected.contains(&(r.dst, r.gw)) {
            expected.push((r.dst, r.gw));
        }
    }
    for (dst, gw) in expected {
        let found = pod
            .routes
            .iter()
            .any(|r| r.dst == dst && r.gw == gw && r.oif == Some(pod.link.index));
        if !found {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(format!("route {dst}{via} dev {name} is missing"));
        }
    }
    Ok(())
}

/// The host end is the one ADD reported and routes to every pod address.
pub fn verify_host(
    prev: &CniResult,
    want: &[IpNetwork],
    host: &link::Link,
    routes: &[route::Route],
) -> Result<(), String> {
    let reported = prev
        .interfaces
        .iter()
        .find(|i| i.name == host.name && i.sandbox.as_deref().unwrap_or("").is_empty());
    if let Some(mac) = reported.and_then(|i| i.mac.as_deref())
        && !mac.eq_ignore_ascii_case(&format_mac(&host.mac))
    {
        return Err(format!(
            "{} has MAC {}, ADD reported {mac} (recreated?)",
            host.name,
            format_mac(&host.mac)
        ));
    }
    for w in want {
        let dst = topology::host_net(w.ip());
        if !routes
            .iter()
            .any(|r| r.dst == dst && r.oif == Some(host.index))
        {
            return Err(format!("host route {dst} dev {} is missing", host.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const HOST_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 1];

    fn prev() -> CniResult {
        serde_json::from_value(json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "slabc", "mac": "ee:00:00:00:00:01"},
                {"name": "eth0", "sandbox": "/run/netns/p"}
            ],
            "ips": [{"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
            "routes": [
                {"dst": "169.254.1.1/32", "scope": 253},
                {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                {"dst": "192.0.2.0/24", "gw": "10.9.9.9"}
            ]
        }))
        .unwrap()
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().expect(s)
    }

    fn rt(dst: &str, gw: Option<&str>, oif: u32) -> route::Route {
        route::Route {
            dst: net(dst),
            gw: gw.map(|g| g.parse().expect(g)),
            oif: Some(oif),
            link_scope: gw.is_none(),
        }
    }

    fn healthy_pod() -> PodFacts {
        PodFacts {
            link: link::Link {
                index: 2,
                name: "eth0".into(),
                mac: [2; 6],
                mtu: 1500,
                up: true,
                running: true,
            },
            addrs: vec![(net("10.0.0.5/32").ip(), 32)],
            routes: vec![
                rt("169.254.1.1/32", None, 2),
                rt("0.0.0.0/0", Some("169.254.1.1"), 2),
            ],
            neighbours: vec![(IpAddr::V4(GATEWAY_V4), HOST_MAC.to_vec())],
        }
    }

    fn host() -> link::Link {
        link::Link {
            index: 7,
            name: "slabc".into(),
            mac: HOST_MAC,
            mtu: 1500,
            up: true,
            running: true,
        }
    }

    #[test]
    fn a_healthy_pod_passes_and_foreign_routes_are_not_ours_to_check() {
        let want = [net("10.0.0.5/32")];
        assert_eq!(
            verify_pod(&prev(), &want, &healthy_pod(), &HOST_MAC),
            Ok(())
        );
        let routes = [rt("10.0.0.5/32", None, 7)];
        assert_eq!(verify_host(&prev(), &want, &host(), &routes), Ok(()));
    }

    #[test]
    fn each_kind_of_pod_drift_is_reported() {
        let want = [net("10.0.0.5/32")];
        let mut p = healthy_pod();
        p.routes.retain(|r| r.gw.is_none());
        let e = verify_pod(&prev(), &want, &p, &HOST_MAC);
        assert!(e.is_err_and(|e| e.contains("0.0.0.0/0")));

        let mut p = healthy_pod();
        p.addrs.clear();
        assert!(verify_pod(&prev(), &want, &p, &HOST_MAC).is_err());

        let mut p = healthy_pod();
        p.neighbours[0].1 = vec![1; 6];
        assert!(verify_pod(&prev(), &want, &p, &HOST_MAC).is_err());

        let mut p = healthy_pod();
        p.link.up = false;
        assert!(verify_pod(&prev(), &want, &p, &HOST_MAC).is_err());
    }

    #[test]
    fn a_missing_host_route_or_a_recreated_host_end_is_drift() {
        let want = [net("10.0.0.5/32")];
        assert!(verify_host(&prev(), &want, &host(), &[]).is_err());
        let mut h = host();
        h.mac = [0xee, 0, 0, 0, 0, 2];
        let routes = [rt("10.0.0.5/32", None, 7)];
        assert!(verify_host(&prev(), &want, &h, &routes).is_err());
    }
}
