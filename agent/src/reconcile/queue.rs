//! The agent's side of the deletion queue (`sluice_proto::queue`): it
//! finishes the removals the plugin's DEL queued. A removal is finished by
//! forgetting the endpoint (maps, links, registry; idempotent), deleting
//! the host veth it names (DEL set it down; deleting a device with TCX
//! links waits an RCU grace period per hook under the RTNL lock, which is
//! why DEL leaves it here), and only then marking the entry done. The
//! plugin releases the addresses of done entries on its next run, so an
//! address goes back to the pool only after its endpoint is gone here and
//! its veth and host routes are gone from the kernel.
//!
//! Removals are finished right after a DEL that queued one is answered,
//! before the socket serves at start-up (those queued while the agent was
//! down or whose finishing a stop cut short), and on every tick (those
//! queued while the agent was hung). One at a time: the kernel serialises
//! the deletions on RTNL anyway, and two finishing the same entry would
//! only repeat idempotent steps.
use std::{sync::Arc, time::Duration};

use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;
use sluice_common::netlink::errno;
use sluice_proto::{
    Attachment,
    queue::{DeleteQueue, QueuedDelete},
};
use tokio::sync::{Mutex, OnceCell};
use tracing::{info, warn};

use super::Reconciler;
use crate::endpoints::{EndpointError, Result};

/// The queue, the lock that finishes one removal at a time, and a netlink
/// connection (opened on first use, inside the runtime).
#[derive(Clone)]
pub struct Removals {
    queue: DeleteQueue,
    one_at_a_time: Arc<Mutex<()>>,
    netlink: Arc<OnceCell<Handle>>,
}

impl Removals {
    pub fn new(queue: DeleteQueue) -> Self {
        Self {
            queue,
            one_at_a_time: Arc::new(Mutex::new(())),
            netlink: Arc::new(OnceCell::new()),
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> EndpointError + '_ {
        |e| {
            EndpointError::NotReady(format!(
                "deletion queue {}: {e}",
                self.queue.dir().display()
            ))
        }
    }

    async fn handle(&self) -> Result<&Handle> {
        self.netlink
            .get_or_try_init(|| async {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| EndpointError::NotReady(format!("netlink socket: {e}")))?;
                tokio::spawn(conn);
                Ok(handle)
            })
            .await
    }
}

/// Deletes link `index` if it is still called `name` (an index is reused
/// only after the counter wraps, a name at once: by a new ADD of the same
/// attachment); whether it did. Gone is fine.
async fn delete_veth(h: &Handle, index: u32, name: &str) -> Result<bool> {
    let nl = |what: &str, e: rtnetlink::Error| {
        EndpointError::NotReady(format!("{what} link {name} ({index}): {e}"))
    };
    let found: Option<LinkMessage> =
        match h.link().get().match_index(index).execute().try_next().await {
            Ok(m) => m,
            Err(e) if errno(&e) == Some(libc::ENODEV) => None,
            Err(e) => return Err(nl("get", e)),
        };
    let named = found.is_some_and(|m| {
        m.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
    });
    if !named {
        return Ok(false);
    }
    match h.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl("delete", e)),
    }
}

impl Reconciler {
    /// DelEndpoint: forgets the endpoint; when the queue holds a pending
    /// removal of `a` that names a veth, finishes it after the answer (in
    /// a task of its own) and says so (`true`). A queue that cannot be
    /// read defers nothing: the plugin then deletes the veth itself.
    pub async fn del_endpoint(&self, a: Attachment) -> Result<bool> {
        let forget = a.clone();
        self.with(move |st| {
            let gone = st.endpoints.del(&mut st.dp, &forget)?;
            st.forget_cni_ips(gone.as_slice());
            Ok(st.dp.writer.bump_epoch()?)
        })
        .await?;
        let entry = match self.removals.queue.pending_of(&a) {
            Ok(Some(e)) if e.host_ifindex.is_some() => e,
            Ok(_) => return Ok(false),
            Err(e) => {
                warn!(error = %e, container_id = %a.container_id, "reading the deletion queue; the plugin deletes the veth");
                return Ok(false);
            }
        };
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.finish_removal(entry).await {
                warn!(error = %e, container_id = %a.container_id, pod_ifname = %a.ifname,
                    "finishing a removal failed; retried on the next tick");
            }
        });
        Ok(true)
    }

    /// Finishes one queued removal, unless it is no longer pending as
    /// read (finished meanwhile, or an ADD finished it and a DEL queued
    /// the attachment anew).
    async fn finish_removal(&self, entry: QueuedDelete) -> Result<()> {
        let r = &self.removals;
        let _one = r.one_at_a_time.lock().await;
        if r.queue
            .pending_of(&entry.attachment)
            .map_err(r.io())?
            .as_ref()
            != Some(&entry)
        {
            return Ok(());
        }
        // The endpoint of that veth only: an ADD of the same attachment
        // that finished this removal itself may have registered a new one
        // on a new veth since the check above.
        let (a, index) = (entry.attachment.clone(), entry.host_ifindex);
        self.with(move |st| {
            let ours = st
                .endpoints
                .all()
                .find(|e| e.spec.attachment == a)
                .is_some_and(|e| index.is_none_or(|i| i == e.spec.host_ifindex));
            if ours && let Some(gone) = st.endpoints.del(&mut st.dp, &a)? {
                st.dp.writer.bump_epoch()?;
                st.forget_cni_ips(&[gone]);
            }
            Ok(())
        })
        .await?;
        let deleted = match entry.host_ifindex {
            Some(index) => delete_veth(r.handle().await?, index, &entry.host_ifname).await?,
            None => false,
        };
        if r.queue.mark_done_if(&entry).map_err(r.io())? {
            info!(
                pod_namespace = %entry.pod_namespace.as_deref().unwrap_or("-"),
                pod_name = %entry.pod_name.as_deref().unwrap_or("-"),
                container_id = %entry.attachment.container_id,
                pod_ifname = %entry.attachment.ifname,
                host_ifname = %entry.host_ifname,
                veth_deleted = deleted,
                ips = ?entry.ips,
                "queued endpoint removal finished; the plugin releases its addresses"
            );
        }
        Ok(())
    }

    /// Finishes every pending removal; returns how many there were.
    pub async fn drain_delete_queue(&self) -> Result<usize> {
        let r = &self.removals;
        let pending = r.queue.pending().map_err(r.io())?;
        for entry in &pending {
            self.finish_removal(entry.clone()).await?;
        }
        Ok(pending.len())
    }

    /// At start-up, before the socket serves: removals queued while the
    /// agent was down, or whose finishing a stop cut short. A failure is
    /// retried by the tick; the entries' addresses stay held meanwhile.
    pub async fn drain_delete_queue_at_start(&self) {
        let dir = self.removals.queue.dir().display().to_string();
        match self.drain_delete_queue().await {
            Ok(0) => {}
            Ok(drained) => info!(drained, %dir, "deletion queue drained"),
            Err(e) => warn!(error = %e, %dir, "draining the deletion queue"),
        }
    }

    /// Drains the queue every `period`, for removals queued while the agent
    /// was running but unreachable (a DEL that timed out, or one that came
    /// between start-up and the socket), and finishings that failed. Never
    /// returns.
    pub async fn drain_delete_queue_every(&self, period: Duration) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.drain_delete_queue().await {
                warn!(error = %e, dir = %self.removals.queue.dir().display(), "draining the deletion queue failed; retried on the next tick");
            }
        }
    }
}
