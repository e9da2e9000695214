//! GC: release what belongs to attachments the runtime no longer knows.
//!
//! The runtime runs GC exclusively (no ADD or DEL in flight), so the stale
//! set computed under the IPAM lock stays valid after it is released.
use std::collections::BTreeSet;

use sluice_proto::{Attachment, Request};

use super::open_store;
use crate::agent::Agent;
use crate::config::NetConf;
use crate::ipam::Store;
use crate::netlink::{Netlink, link};
use crate::{Error, Result, ipam, names};

pub fn gc(conf: &NetConf) -> Result<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        // Without the list, "everything not valid" would be everything.
        Error::InvalidConfig("GC needs cni.dev/valid-attachments".into())
    })?;
    let stale = {
        let mut store = open_store(conf)?;
        super::queue::release_finished(conf, &mut store);
        ipam::stale(&store, valid)?
    };
    let owners: BTreeSet<(String, String)> = stale
        .iter()
        .map(|(_, a)| (a.container_id.clone(), a.ifname.clone()))
        .collect();

    // Keep going on errors (SPEC: remove as much as possible), report the
    // first.
    let mut first_err: Option<Error> = None;
    let node = Netlink::open()?;
    for (container_id, ifname) in &owners {
        let a = Attachment {
            container_id: container_id.clone(),
            ifname: ifname.clone(),
        };
        // Missing is fine: the namespace is usually long gone, veth with it.
        if let Err(e) = node.run(link::delete(node.handle(), &names::host_ifname(&a))) {
            first_err.get_or_insert(e);
        }
    }

    // As in DEL, addresses go back to the pool only once the agent has
    // forgotten the endpoints that used them.
    let agent = Agent::new(&conf.agent_socket, conf.agent_timeout);
    agent.expect_ok(&Request::Gc {
        valid: valid.clone(),
    })?;

    let mut store = open_store(conf)?;
    for (ip, owner) in &stale {
        if let Err(e) = store.release(*ip) {
            eprintln!("sluice: GC: releasing {ip} of {owner:?}: {e}");
            first_err.get_or_insert(e.into());
        }
    }
    first_err.map_or(Ok(()), Err)
}
