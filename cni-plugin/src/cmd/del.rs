//! DEL: idempotent, and needs neither CNI_NETNS nor prevResult: the host
//! end's name comes from the attachment, the addresses from IPAM state.
//! A prevResult (containerd passes the cached ADD result) is parsed with
//! the configuration and otherwise not used.
//!
//! DEL does not wait for the veth's deletion: with TCX links on it, the
//! kernel waits an RCU grace period per hook under the RTNL lock, most of
//! DEL's time. It sets the host end down (the pod is disconnected at
//! once), queues the veth's deletion with the addresses held
//! (`super::queue`), and the agent forgets the endpoint, answers, and only
//! then deletes the veth and marks the removal done; a later run releases
//! the addresses. So no new pod gets an address while the old veth and its
//! routes still exist.
//!
//! DEL succeeds with the agent down, as kubelet needs it to (a failed DEL
//! leaves the sandbox SANDBOX_UNKNOWN in containerd until the agent is
//! back): the veth is deleted here and the endpoint's removal queued.
use sluice_proto::{Request, Response};

use super::phases::Phases;
use super::{open_store, queue};
use crate::agent::Agent;
use crate::config::NetConf;
use crate::env::AttachmentEnv;
use crate::netlink::{Netlink, link};
use crate::{Error, Result, ipam, names};

pub fn del(conf: &NetConf, env: &AttachmentEnv, phases: &mut Phases) -> Result<()> {
    let att = env.attachment();
    let host_name = names::host_ifname(&att);
    let agent = Agent::new(&conf.agent_socket, conf.agent_timeout);

    // 1. Disconnect the pod: its host end down. No veth is fine: a second
    //    DEL after the agent deleted it, or the runtime deleted the pod's
    //    namespace first (which destroys the veth pair with it).
    let node = Netlink::open()?;
    let h = node.handle();
    let host = node.run(link::get(h, &host_name))?.map(|l| l.index);
    if let Some(index) = host {
        node.run(link::set_down(h, index))?;
    }
    phases.lap("down");

    // 2. With a veth, queue its deletion before the agent hears of it: the
    //    agent finishes what the queue names, and the addresses stay held
    //    until it has. Removals finished since the last run free theirs.
    let queued = {
        let mut store = open_store(conf)?;
        queue::release_finished(conf, &mut store);
        match host {
            Some(index) => queue::enqueue(conf, &store, env, Some(index))?,
            None => None,
        }
    };
    phases.lap("queue");

    // 3. Forget the endpoint. Before the addresses go back to the pool, so
    //    that the agent never holds a stale endpoint for an address a new
    //    pod already has. Unknown endpoints are Ok.
    let forgotten = agent.call(&Request::DelEndpoint {
        attachment: att.clone(),
    });
    phases.lap("agent");
    match forgotten {
        // The agent deletes the veth after this answer, then marks the
        // removal done.
        Ok(Response::RemovalDeferred) if queued.is_some() => return Ok(()),
        Ok(Response::Error { code, msg, details }) => {
            return Err(Error::Agent { code, msg, details });
        }
        Ok(_) => {}
        // Unreachable (down, restarting, hung past the timeout): the veth
        // goes now, the removal waits in the queue with the addresses
        // held, and the agent finishes it when it is back.
        Err(why) => {
            if host.is_some() {
                node.run(link::delete(h, &host_name))?;
            }
            let store = open_store(conf)?;
            if let Some(entry) = queue::enqueue(conf, &store, env, None)? {
                eprintln!(
                    "sluice: DEL: agent unreachable ({why}); removal of {}/{} queued in {}, \
                     addresses {:?} held until the agent has forgotten it",
                    att.container_id,
                    att.ifname,
                    conf.delete_queue_dir.display(),
                    entry.ips,
                );
            }
            return Ok(());
        }
    }

    // 4. The agent forgot the endpoint and deferred nothing (no veth, or
    //    an agent that leaves the veth to us): delete it, release the
    //    addresses (none held, a second DEL, is fine) and forget what was
    //    queued for the attachment.
    if host.is_some() {
        node.run(link::delete(h, &host_name))?;
    }
    phases.lap("veth");
    ipam::release_owner(&mut open_store(conf)?, &att)?;
    queue::remove(conf, env)?;
    phases.lap("ipam");
    Ok(())
}
