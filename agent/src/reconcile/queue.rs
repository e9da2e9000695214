//! The agent's side of the deletion queue (`sluice_proto::queue`): removals
//! the plugin's DEL queued while the agent was unreachable are finished
//! here, at start-up and then periodically: the endpoint is forgotten
//! (maps, links, registry; idempotent), then the entry is marked done. The
//! plugin releases the addresses of done entries on its next run, so an
//! address goes back to the pool only after its endpoint is gone here.
use std::time::Duration;

use sluice_proto::queue::DeleteQueue;
use tracing::{info, warn};

use super::{Reconciler, State};
use crate::endpoints::{EndpointError, Result};

impl State {
    /// Finishes every pending removal in `queue`; returns how many.
    pub fn drain_delete_queue(&mut self, queue: &DeleteQueue) -> Result<usize> {
        let io = |e: std::io::Error| {
            EndpointError::NotReady(format!("deletion queue {}: {e}", queue.dir().display()))
        };
        let pending = queue.pending().map_err(io)?;
        for entry in &pending {
            self.endpoints.del(&mut self.dp, &entry.attachment)?;
            queue.mark_done(&entry.attachment).map_err(io)?;
            info!(
                pod_namespace = %entry.pod_namespace.as_deref().unwrap_or("-"),
                pod_name = %entry.pod_name.as_deref().unwrap_or("-"),
                container_id = %entry.attachment.container_id,
                pod_ifname = %entry.attachment.ifname,
                host_ifname = %entry.host_ifname,
                ips = ?entry.ips,
                "queued endpoint removal finished; the plugin releases its addresses"
            );
        }
        if !pending.is_empty() {
            self.dp.writer.bump_epoch()?;
        }
        Ok(pending.len())
    }
}

impl Reconciler {
    pub async fn drain_delete_queue(&self, queue: DeleteQueue) -> Result<usize> {
        self.with(move |st| st.drain_delete_queue(&queue)).await
    }

    /// Drains `queue` every `period`, for removals queued while the agent
    /// was running but unreachable (a DEL that timed out, or one that came
    /// between start-up and the socket). Never returns.
    pub async fn drain_delete_queue_every(
        &self,
        queue: DeleteQueue,
        period: Duration,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.drain_delete_queue(queue.clone()).await {
                warn!(error = %e, dir = %queue.dir().display(), "draining the deletion queue failed; retried on the next tick");
            }
        }
    }
}
