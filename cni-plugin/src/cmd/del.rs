//! DEL: idempotent, and needs neither CNI_NETNS nor prevResult: the host
//! end's name comes from the attachment, the addresses from IPAM state.
use sluice_proto::Request;

use super::open_store;
use crate::agent::Agent;
use crate::config::NetConf;
use crate::env::AttachmentEnv;
use crate::netlink::{Netlink, link};
use crate::{Result, ipam, names};

pub fn del(conf: &NetConf, env: &AttachmentEnv) -> Result<()> {
    let att = env.attachment();
    let agent = Agent::new(&conf.agent_socket, conf.agent_timeout);

    // 1. Disconnect the pod. Deleting the host end deletes the pod end and
    //    every route through either. Already gone is fine: a second DEL,
    //    or the runtime deleted the pod's namespace first (which destroys
    //    the veth pair with it).
    let node = Netlink::open()?;
    node.run(link::delete(node.handle(), &names::host_ifname(&att)))?;

    // 2. Forget the endpoint. Before the addresses go back to the pool, so
    //    that the agent never holds a stale endpoint for an address a new
    //    pod already has. An unreachable agent fails DEL with 11 and keeps
    //    the addresses; the runtime retries DEL, and this one then finds
    //    the veth gone and carries on. Unknown endpoints are Ok.
    agent.expect_ok(&Request::DelEndpoint {
        attachment: att.clone(),
    })?;

    // 3. Release the addresses; none held (second DEL) is fine.
    ipam::release_owner(&mut open_store(conf)?, &att)?;
    Ok(())
}
