//! ADD: veth pair, agent registration, then the pod's addresses, links up
//! and routes.
//!
//! Order matters twice:
//! - The agent registers the endpoint (and attaches its programs to the
//!   host end) before any link is up, so the pod never sends a packet that
//!   policy has not seen. The pod's side is configured in one visit to its
//!   namespace after that (one thread and netlink socket fewer than
//!   addresses first, links later).
//! - IPv4 routes need their device up (the kernel answers ENETDOWN
//!   otherwise), so routes come after the links are up, which is after the
//!   agent answered.
use std::cell::Cell;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use sluice_proto::{EndpointSpec, Request};

use super::phases::Phases;
use super::{families, open_store, queue, split};
use crate::agent::Agent;
use crate::config::{self, NetConf};
use crate::env::AttachmentEnv;
use crate::error::code;
use crate::netlink::{Netlink, addr, link, neigh, route};

/// How long ADD waits for the pod end to run (see its use).
const LINK_READY_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);
use crate::result::{self, Attached, CniResult, LinkInfo};
use crate::topology::{self, GATEWAY_V4, GATEWAY_V6, GATEWAY_V6_PREFIX};
use crate::undo::Undo;
use crate::{Error, Result, ipam, names, netns, sysctl};

pub fn add(conf: &NetConf, env: &AttachmentEnv, phases: &mut Phases) -> Result<CniResult> {
    let att = env.attachment();
    let netns_path = env.netns()?;
    netns::validate(netns_path)?;
    let host_name = names::host_ifname(&att);
    let agent = Agent::new(&conf.agent_socket, conf.agent_timeout);
    // Configured, or the Node's podCIDRs (before anything is built, so a
    // failure here leaves nothing to roll back).
    let node_ranges;
    let ranges = match &conf.ranges {
        Some(r) => r.as_slice(),
        None => {
            node_ranges = config::node_ranges(agent.call(&Request::PodCidrs))?;
            config::validate_mtu(conf.mtu, &node_ranges)?;
            node_ranges.as_slice()
        }
    };
    let (v4, v6) = families(ranges);
    sysctl::enable_forwarding(v4, v6)?;
    let node = Netlink::open()?;
    let h = node.handle();
    let registered = Cell::new(false);
    let mut undo = Undo::new();

    // ADD right after DEL of the same attachment: the old veth's deletion
    // may still be pending; it is finished first.
    queue::finish_pending(conf, env, &node, &agent)?;

    // IPAM.
    let ips = {
        let mut store = open_store(conf)?;
        // Removals the agent finished while it was away free their
        // addresses first; those it has not finished stay taken.
        queue::release_finished(conf, &mut store);
        ipam::allocate(&mut store, ranges, &att)?
    };
    phases.lap("ipam");
    undo.push("release addresses", || {
        ipam::release_owner(&mut open_store(conf)?, &att)?;
        Ok(())
    });
    let (ipv4, ipv6) = split(&ips);
    // Pushed before the veth step: rollback runs newest first, so the veth is
    // deleted before the endpoint is forgotten, and a pod never stays
    // connected without its programs.
    undo.push("forget the endpoint", || {
        if !registered.get() {
            return Ok(());
        }
        agent.expect_ok(&Request::DelEndpoint {
            attachment: att.clone(),
        })
    });

    // The veth pair, both ends down, the pod end created straight in the
    // pod's namespace under its final name.
    let ns_file = netns::open(netns_path)?;
    let created = node.run(link::create_veth(
        h,
        &host_name,
        &env.ifname,
        ns_file.as_raw_fd(),
        conf.mtu,
    ))?;
    if !created {
        // A name is taken. A leftover host end (an ADD without DEL) stays
        // for the DEL the runtime owes us; the pod's own interface stays too.
        return Err(if node.run(link::get(h, &host_name))?.is_some() {
            Error::Internal(format!(
                "interface {host_name} already exists in the node namespace \
                 (left over from an ADD without DEL?)"
            ))
        } else {
            Error::Internal(format!(
                "interface {} already exists in {}",
                env.ifname,
                netns_path.display()
            ))
        });
    }
    undo.push("delete the host veth", || {
        node.run(link::delete(h, &host_name)).map(drop)
    });
    let host = node
        .run(link::get(h, &host_name))?
        .ok_or_else(|| Error::Internal(format!("{host_name} vanished after creation")))?;
    if v6 {
        node.run(addr::add(
            h,
            host.index,
            IpAddr::V6(GATEWAY_V6),
            GATEWAY_V6_PREFIX,
        ))?;
    }
    phases.lap("veth");

    // The agent attaches its programs to the host end before anything is up.
    registered.set(true);
    phases.agent = agent
        .add_endpoint(&Request::AddEndpoint {
            endpoint: EndpointSpec {
                attachment: att.clone(),
                netns: netns_path.display().to_string(),
                host_ifname: host_name.clone(),
                host_ifindex: host.index,
                ipv4,
                ipv6,
                pod_namespace: env.args.pod_namespace.clone(),
                pod_name: env.args.pod_name.clone(),
                pod_uid: env.args.pod_uid.clone(),
            },
        })
        .map_err(not_ready_is_try_again)?;
    phases.lap("agent");

    node.run(link::set_up(h, host.index))?;
    // One visit to the pod's namespace (a thread, a netlink socket):
    // addresses, link up, gateway entries, routes.
    let pod = netns::with_netns(netns_path, || {
        let nl = Netlink::open()?;
        let h = nl.handle();
        nl.run(async {
            let pod = link::get(h, &env.ifname).await?.ok_or_else(|| {
                Error::Internal(format!(
                    "{} did not appear in {}",
                    env.ifname,
                    netns_path.display()
                ))
            })?;
            for ip in &ips {
                let net = topology::host_net(*ip);
                addr::add(h, pod.index, net.ip(), net.prefix()).await?;
            }
            link::set_up(h, pod.index).await?;
            // Permanent entries: the gateway resolves without ARP/NDP, and
            // 169.254.1.1 is owned by nobody.
            if ipv4.is_some() {
                neigh::set_permanent(h, pod.index, IpAddr::V4(GATEWAY_V4), &host.mac).await?;
            }
            if ipv6.is_some() {
                neigh::set_permanent(h, pod.index, IpAddr::V6(GATEWAY_V6), &host.mac).await?;
            }
            // Both ends with the same ifindex (each namespace numbers its
            // own): the kernel then treats the pod end's carrier-on as a
            // non-urgent link event and may delay it by up to a second, and
            // until then the pod end is not running and IPv6 is not ready on
            // it. Creating the pod end in its namespace (no move) makes this
            // happen whenever the host end gets the pod end's number (2, in
            // a fresh pod namespace). ADD returns once the pod can talk.
            if pod.index == host.index
                && !link::wait_running(h, &env.ifname, LINK_READY_LIMIT).await?
            {
                return Err(Error::Internal(format!(
                    "{} in {} not running after {LINK_READY_LIMIT:?}",
                    env.ifname,
                    netns_path.display()
                )));
            }
            for r in topology::pod_routes(ipv4.is_some(), ipv6.is_some()) {
                let r = route::Route {
                    dst: r.dst,
                    gw: r.gw,
                    oif: Some(pod.index),
                    link_scope: r.link_scope,
                };
                route::add(h, &r).await?;
            }
            Ok(pod)
        })
    })?;
    phases.lap("pod_side");
    for ip in &ips {
        let r = route::Route {
            dst: topology::host_net(*ip),
            gw: None,
            oif: Some(host.index),
            link_scope: ip.is_ipv4(),
        };
        node.run(route::add(h, &r))?;
    }
    phases.lap("host_routes");

    undo.commit();
    let attached = Attached {
        host: LinkInfo {
            name: host.name.clone(),
            mac: host.mac,
            mtu: host.mtu,
        },
        pod: LinkInfo {
            name: pod.name.clone(),
            mac: pod.mac,
            mtu: pod.mtu,
        },
        netns: netns_path.display().to_string(),
        ipv4,
        ipv6,
    };
    Ok(result::build(
        conf.version,
        conf.prev_result.clone(),
        &attached,
    ))
}

/// 50/51 are STATUS codes; for ADD an agent that is not available yet
/// means "try again later".
fn not_ready_is_try_again(e: Error) -> Error {
    match e {
        Error::Agent {
            code: c,
            msg,
            details,
        } if c == code::NOT_AVAILABLE || c == code::LIMITED_CONNECTIVITY => Error::Agent {
            code: code::TRY_AGAIN_LATER,
            msg,
            details,
        },
        other => other,
    }
}
