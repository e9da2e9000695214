//! CNI ADD on the agent's side, in two steps:
//!
//! 1. under the state lock: the endpoint registered, its record and
//!    addresses in the maps and, in cluster mode, its policy computed and
//!    written (about 2 ms);
//! 2. without it: the two program hooks attached to the host end of the
//!    veth. With TCX each attach waits for an RCU grace period while the
//!    kernel holds the RTNL lock (`tcx_link_attach()`), 10-20 ms a hook on
//!    the bench machine; holding the agent's lock through that made every
//!    other request (other ADDs' map work, DELs, the watch loop) wait too.
//!
//! The agent answers only after both, so "no packet before policy" holds
//! as before: the plugin keeps the pod's links down until the answer, the
//! hooks and the policy are both in place when it comes, and writing the
//! policy before attaching the hooks (the order is reversed from before)
//! judges nothing meanwhile, since nothing flows. The CNI spec forbids a
//! runtime to run two operations on one container at once, so no DEL of
//! this attachment runs between the steps; a failed attach undoes step 1
//! unless the attachment changed meanwhile.
use std::time::{Duration, Instant};

use sluice_proto::{AddPhases, Attachment, EndpointSpec};

use super::{Reconciler, State};
use crate::{
    endpoints::{EndpointError, Endpoints, Result, pod_of},
    model::EpId,
};

/// What step 1 leaves to step 2.
struct Registered {
    ep_id: EpId,
    attachment: Attachment,
    host_ifname: String,
    /// Added by this request (else a retried ADD of a registered one,
    /// which a failed attach leaves registered).
    fresh: bool,
    maps: Duration,
    policy: Duration,
}

impl State {
    /// Step 1: registers a pod's endpoint and, in cluster mode, programs
    /// its policy.
    fn register_endpoint(&mut self, spec: EndpointSpec) -> Result<Registered> {
        Endpoints::validate(&spec)?;
        let attachment = spec.attachment.clone();
        let host_ifname = spec.host_ifname.clone();
        if let Some(ep_id) = self.endpoints.retried(&spec) {
            return Ok(Registered {
                ep_id,
                attachment,
                host_ifname,
                fresh: false,
                maps: Duration::ZERO,
                policy: Duration::ZERO,
            });
        }
        let pod = pod_of(&spec);
        let identity = match (&self.cluster, &pod) {
            (None, _) => None,
            (Some(c), _) if !c.is_synced() => {
                return Err(EndpointError::NotReady(
                    "the cluster has not been listed yet".into(),
                ));
            }
            (Some(c), Some(pod)) => Some(c.identity_of(pod).ok_or_else(|| {
                EndpointError::NotReady(format!("pod {pod} is not known to the agent yet"))
            })?),
            (Some(_), None) => {
                return Err(EndpointError::InvalidEndpoint(
                    "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME".into(),
                ));
            }
        };
        // The record starts unisolated; its policy follows at once and the
        // hooks after that, all before ADD returns (the pod's links are
        // down until then).
        let started = Instant::now();
        let ep = self.endpoints.add(&mut self.dp, spec, identity)?;
        let maps = started.elapsed();
        if let (Some(pod), Some(cluster)) = (pod, self.cluster.as_mut()) {
            let ips = ep.ips().collect();
            let learned = cluster.learn_cni_ips(&pod, ips);
            let mut changes = learned.unwrap_or_default();
            changes.endpoints.insert(pod);
            if let Err(e) = self.program(&changes) {
                self.endpoints.rollback(&mut self.dp, &ep);
                self.dp.writer.bump_epoch()?;
                return Err(e);
            }
        }
        // A new address (perhaps a deleted pod's) reaches established flows.
        self.dp.writer.bump_epoch()?;
        Ok(Registered {
            ep_id: ep.ep_id,
            attachment,
            host_ifname,
            fresh: true,
            maps,
            policy: started.elapsed().saturating_sub(maps),
        })
    }
}

impl Reconciler {
    /// Registers the endpoint and programs its policy under the state's
    /// lock, then attaches its hooks without it; answers once all is in
    /// place, with where the time went.
    pub async fn add_endpoint(&self, spec: EndpointSpec) -> Result<(EpId, AddPhases)> {
        let asked = Instant::now();
        let (reg, queued) = self
            .with(move |st| {
                let queued = asked.elapsed();
                Ok((st.register_endpoint(spec)?, queued))
            })
            .await?;
        let programs = self.programs.clone();
        let ifname = reg.host_ifname.clone();
        let (attach_wait, attach, attached) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (waited, attached) = programs.attach_timed(&ifname);
            (waited, started.elapsed().saturating_sub(waited), attached)
        })
        .await
        .map_err(|e| EndpointError::NotReady(format!("agent task failed: {e}")))?;
        if let Err(e) = attached {
            if reg.fresh {
                let (a, ep_id) = (reg.attachment, reg.ep_id);
                self.with(move |st| {
                    st.endpoints.rollback_added(&mut st.dp, &a, ep_id);
                    Ok(st.dp.writer.bump_epoch()?)
                })
                .await?;
            }
            return Err(e.into());
        }
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let phases = AddPhases {
            queued_us: us(queued),
            maps_us: us(reg.maps),
            policy_us: us(reg.policy),
            attach_wait_us: us(attach_wait),
            attach_us: us(attach),
        };
        tracing::debug!(ep_id = %reg.ep_id, ?phases, "endpoint ready");
        Ok((reg.ep_id, phases))
    }
}
