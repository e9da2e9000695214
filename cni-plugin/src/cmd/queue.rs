//! The plugin's side of the deletion queue (`sluice_proto::queue`): DEL
//! queues the deletion of a pod's veth for the agent to finish after DEL
//! has answered, and an endpoint's removal when the agent is unreachable;
//! every ADD, DEL and GC releases the addresses of removals the agent has
//! finished since, and an ADD of an attachment whose removal is pending
//! finishes it first.
use sluice_proto::Request;
use sluice_proto::queue::{DeleteQueue, QueuedDelete};

use crate::agent::Agent;
use crate::config::NetConf;
use crate::env::AttachmentEnv;
use crate::ipam::{self, Store};
use crate::netlink::{Netlink, link};
use crate::{Error, Result, names};

pub fn queue_of(conf: &NetConf) -> DeleteQueue {
    DeleteQueue::new(&conf.delete_queue_dir)
}

fn queue_err(conf: &NetConf, e: std::io::Error) -> Error {
    Error::Queue {
        path: conf.delete_queue_dir.clone(),
        source: e,
    }
}

/// Queues the removal of `env`'s endpoint for the agent, keeping the
/// addresses it holds in `store`: with `host_ifindex`, the host veth of
/// that index is still to delete. Nothing to delete and nothing held
/// means nothing for the agent to finish (`Ok(None)`): ADD registers an
/// endpoint only after allocating, and addresses are released only once
/// the agent forgot it.
pub fn enqueue(
    conf: &NetConf,
    store: &dyn Store,
    env: &AttachmentEnv,
    host_ifindex: Option<u32>,
) -> Result<Option<QueuedDelete>> {
    let att = env.attachment();
    let ips = ipam::owned_by(store, &att)?;
    if ips.is_empty() && host_ifindex.is_none() {
        return Ok(None);
    }
    let entry = QueuedDelete {
        host_ifname: names::host_ifname(&att),
        host_ifindex,
        attachment: att,
        network: conf.name.clone(),
        data_dir: conf.data_dir.display().to_string(),
        ips,
        pod_namespace: env.args.pod_namespace.clone(),
        pod_name: env.args.pod_name.clone(),
    };
    queue_of(conf)
        .enqueue(&entry)
        .map_err(|e| queue_err(conf, e))?;
    Ok(Some(entry))
}

/// Forgets everything queued for `env`'s attachment.
pub fn remove(conf: &NetConf, env: &AttachmentEnv) -> Result<()> {
    queue_of(conf)
        .remove(&env.attachment())
        .map_err(|e| queue_err(conf, e))
}

/// ADD of an attachment whose removal is still pending (ADD right after
/// DEL, before the agent deleted the old veth): finishes it here, so that
/// the new veth can take the name and the attachment its addresses.
/// Deletes the old veth (the one the entry names; the runtime runs no two
/// operations on one attachment at once, so nothing else took its name),
/// makes the agent forget the endpoint (the agent's own finishing then
/// finds the veth gone and the entry removed), releases the addresses and
/// removes the entry. With the agent unreachable the entry stays, and ADD
/// fails as it would have anyway.
pub fn finish_pending(
    conf: &NetConf,
    env: &AttachmentEnv,
    node: &Netlink,
    agent: &Agent,
) -> Result<()> {
    let att = env.attachment();
    let queue = queue_of(conf);
    let Some(entry) = queue.pending_of(&att).map_err(|e| queue_err(conf, e))? else {
        return Ok(());
    };
    if let Some(index) = entry.host_ifindex {
        node.run(link::delete_exact(node.handle(), index, &entry.host_ifname))?;
    }
    agent.expect_ok(&Request::DelEndpoint {
        attachment: att.clone(),
    })?;
    let mut store = super::open_store(conf)?;
    ipam::release_owner(&mut store, &att)?;
    remove(conf, env)
}

/// Releases the addresses of every removal of this network the agent has
/// finished, then forgets the entry (in that order: a crash in between
/// releases nothing twice that matters, the release is idempotent).
/// Failures are reported on stderr and left for the next run: they must
/// not fail the verb that happens to run.
pub fn release_finished(conf: &NetConf, store: &mut dyn Store) {
    let queue = queue_of(conf);
    let done = match queue.done() {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "sluice: reading the deletion queue {}: {e}",
                conf.delete_queue_dir.display()
            );
            return;
        }
    };
    let data_dir = conf.data_dir.display().to_string();
    for entry in done
        .iter()
        .filter(|e| e.network == conf.name && e.data_dir == data_dir)
    {
        let released = ipam::release_owner(store, &entry.attachment)
            .map_err(Error::from)
            .and_then(|_| {
                queue
                    .remove_done(&entry.attachment)
                    .map_err(|e| queue_err(conf, e))
            });
        if let Err(e) = released {
            eprintln!(
                "sluice: releasing the addresses of queued removal {}/{}: {e}",
                entry.attachment.container_id, entry.attachment.ifname
            );
        }
    }
}
