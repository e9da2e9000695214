//! The plugin's side of the deletion queue (`sluice_proto::queue`): DEL
//! queues an endpoint's removal when the agent is unreachable, and every
//! ADD, DEL and GC releases the addresses of removals the agent has
//! finished since.
use sluice_proto::queue::{DeleteQueue, QueuedDelete};

use crate::agent::AgentError;
use crate::config::NetConf;
use crate::env::AttachmentEnv;
use crate::ipam::{self, Store};
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
/// addresses it holds in `store`. Nothing held means nothing for the agent
/// to finish: ADD registers an endpoint only after allocating, and
/// addresses are released only once the agent forgot it.
pub fn enqueue(
    conf: &NetConf,
    store: &dyn Store,
    env: &AttachmentEnv,
    why: &AgentError,
) -> Result<()> {
    let att = env.attachment();
    let ips = ipam::owned_by(store, &att)?;
    if ips.is_empty() {
        return Ok(());
    }
    let entry = QueuedDelete {
        host_ifname: names::host_ifname(&att),
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
    eprintln!(
        "sluice: DEL: agent unreachable ({why}); removal of {}/{} queued in {}, \
         addresses {:?} held until the agent has forgotten it",
        entry.attachment.container_id,
        entry.attachment.ifname,
        conf.delete_queue_dir.display(),
        entry.ips,
    );
    Ok(())
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
