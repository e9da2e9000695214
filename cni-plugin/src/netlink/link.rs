//! Links: veth creation, lookup, up, delete.
use std::os::fd::RawFd;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth};

use super::{EEXIST, ENODEV, errno, tolerate};
use crate::{Error, Result};

/// What we need to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
    /// IFF_RUNNING: its operational state is up (set by the kernel's
    /// linkwatch once the carrier is seen, not at once).
    pub running: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            running: m.header.flags.contains(LinkFlags::Running),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name.clone_from(n),
                LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
                LinkAttribute::Address(mac) if mac.len() == 6 => l.mac.copy_from_slice(mac),
                _ => {}
            }
        }
        l
    }
}

/// The link called `name`, or `None` when there is none.
pub async fn get(h: &Handle, name: &str) -> Result<Option<Link>> {
    let mut s = h.link().get().match_name(name).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(Error::netlink(format!("get link {name}"), e)),
    }
}

/// Creates the veth pair `host` <-> `peer`, both down, `host` in the
/// caller's namespace and `peer` straight in the namespace open at
/// `peer_netns`, under its final name (names are per namespace, so a pod's
/// `eth0` does not clash with the node's). Creating it there costs no more
/// than creating it here, while moving a link between namespaces waits for
/// an RCU grace period under the RTNL lock.
///
/// `Ok(false)` when a name is taken (EEXIST): `host` in this namespace or
/// `peer` in the other; the caller tells which.
pub async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    peer_netns: RawFd,
    mtu: Option<u32>,
) -> Result<bool> {
    let mut peer_msg = LinkUnspec::new_with_name(peer).setns_by_fd(peer_netns);
    let mut msg = LinkVeth::new(host, peer);
    if let Some(mtu) = mtu {
        peer_msg = peer_msg.mtu(mtu);
        msg = msg.mtu(mtu);
    }
    let msg = msg
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
        .build();
    tolerate(h.link().add(msg).execute().await, &[EEXIST], || {
        format!("create veth {host}/{peer}")
    })
}

/// Deletes the link with index `index` if it is still called `name` (an
/// index is reused only after the counter wraps, a name at once);
/// `Ok(false)` when there is no such link.
pub async fn delete_exact(h: &Handle, index: u32, name: &str) -> Result<bool> {
    let mut s = h.link().get().match_index(index).execute();
    let link = match s.try_next().await {
        Ok(m) => m.as_ref().map(Link::from_message),
        Err(e) if errno(&e) == Some(ENODEV) => None,
        Err(e) => return Err(Error::netlink(format!("get link {index}"), e)),
    };
    if link.is_none_or(|l| l.name != name) {
        return Ok(false);
    }
    tolerate(h.link().del(index).execute().await, &[ENODEV], || {
        format!("delete link {name}")
    })
}

/// Deletes the link called `name`; `Ok(false)` when it does not exist.
/// Deleting one end of a veth deletes the other, wherever it lives.
pub async fn delete(h: &Handle, name: &str) -> Result<bool> {
    let Some(link) = get(h, name).await? else {
        return Ok(false);
    };
    // Gone between get and del (a concurrent DEL): still gone, still fine.
    tolerate(h.link().del(link.index).execute().await, &[ENODEV], || {
        format!("delete link {name}")
    })
}

/// Waits (polling) until link `name` is running, at most `limit`; whether
/// it is.
pub async fn wait_running(h: &Handle, name: &str, limit: std::time::Duration) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if get(h, name).await?.is_some_and(|l| l.running) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Sets link `index` down; gone already is `Ok(false)`. A veth whose
/// end is down carries nothing either way (`veth_xmit` drops what its
/// peer would not take), and IPv4 routes through it go at once.
pub async fn set_down(h: &Handle, index: u32) -> Result<bool> {
    let msg = LinkUnspec::new_with_index(index).down().build();
    tolerate(h.link().set(msg).execute().await, &[ENODEV], || {
        format!("set link {index} down")
    })
}

pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    let msg = LinkUnspec::new_with_index(index).up().build();
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("set link {index} up"), e))
}
