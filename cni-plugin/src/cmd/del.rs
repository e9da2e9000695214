//! DEL: idempotent, and needs neither CNI_NETNS nor prevResult: the host
//! end's name comes from the attachment, the addresses from IPAM state.
//! A prevResult (containerd passes the cached ADD result) is parsed with
//! the configuration and otherwise not used.
//!
//! DEL succeeds with the agent down, as kubelet needs it to (a failed DEL
//! leaves the sandbox SANDBOX_UNKNOWN in containerd until the agent is
//! back): the pod is disconnected at once and the rest is queued
//! (`super::queue`).
use sluice_proto::Request;

use super::phases::Phases;
use super::{open_store, queue};
use crate::agent::Agent;
use crate::config::NetConf;
use crate::env::AttachmentEnv;
use crate::netlink::{Netlink, link};
use crate::{Error, Result, ipam, names};

pub fn del(conf: &NetConf, env: &AttachmentEnv, phases: &mut Phases) -> Result<()> {
    let att = env.attachment();
    let agent = Agent::new(&conf.agent_socket, conf.agent_timeout);

    // 1. Disconnect the pod. Deleting the host end deletes the pod end and
    //    every route through either. Already gone is fine: a second DEL,
    //    or the runtime deleted the pod's namespace first (which destroys
    //    the veth pair with it).
    let node = Netlink::open()?;
    node.run(link::delete(node.handle(), &names::host_ifname(&att)))?;
    phases.lap("veth");

    // 2. Forget the endpoint. Before the addresses go back to the pool, so
    //    that the agent never holds a stale endpoint for an address a new
    //    pod already has. Unknown endpoints are Ok. An unreachable agent
    //    (down, restarting, hung past the timeout) gets the removal queued
    //    on disk, and the addresses stay held until it has finished it.
    let forgotten = agent.expect_ok(&Request::DelEndpoint {
        attachment: att.clone(),
    });
    phases.lap("agent");
    let mut store = open_store(conf)?;
    queue::release_finished(conf, &mut store);
    match forgotten {
        Ok(()) => {}
        Err(Error::AgentUnavailable(why)) => return queue::enqueue(conf, &store, env, &why),
        Err(e) => return Err(e),
    }

    // 3. Release the addresses; none held (second DEL) is fine. A removal
    //    queued by an earlier DEL is finished now.
    ipam::release_owner(&mut store, &att)?;
    queue::queue_of(conf)
        .remove(&att)
        .map_err(|source| Error::Queue {
            path: conf.delete_queue_dir.clone(),
            source,
        })?;
    phases.lap("ipam");
    Ok(())
}
