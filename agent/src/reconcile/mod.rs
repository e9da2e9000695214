//! The reconciler: the one owner of the agent's state (the data path, the
//! endpoints, the cluster view) and of the order things are written in.
//!
//! - CNI requests (`server`) and watched changes (`run`) both come here;
//!   each runs as one blocking step under the state's lock, on the blocking
//!   pool, never on an async worker and never across an await. The one
//!   exception is an ADD's program attach, which waits in the kernel and
//!   runs after its step, without the lock (`add`).
//! - A batch of watched changes goes to `Cluster::apply`, whose answer (the
//!   endpoints and addresses that changed) is written through `Endpoints`
//!   and the data path's `Writer`; then Service addresses, then routes and
//!   uplinks (`network`).
//! - A periodic tick retries what failed (a route, an uplink attach, a
//!   programming pass) without waiting for the next watch event.
mod add;
pub mod network;
mod queue;
pub mod routes;
pub mod vxlan;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use sluice_proto::Attachment;
use sluice_proto::queue::DeleteQueue;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    cluster::{Change, Cluster, Notice},
    datapath::Datapath,
    endpoints::{EndpointError, Endpoints, PodsByIp, Result},
    metrics::{Capacities, EndpointStat, EndpointStats, Metrics, Ready},
    model::{EpId, ObjectRef},
    policy::Changes,
};

/// Everything the agent holds for this node. One lock guards it; code that
/// needs it takes `&mut State`.
pub struct State {
    pub dp: Datapath,
    pub endpoints: Endpoints,
    /// `None` in standalone mode (policy only through `SetPolicy`).
    pub cluster: Option<Cluster>,
    /// A programming pass failed: the next tick programs everything again.
    retry_all: bool,
}

impl State {
    pub fn new(dp: Datapath, endpoints: Endpoints, cluster: Option<Cluster>) -> Self {
        Self {
            dp,
            endpoints,
            cluster,
            retry_all: false,
        }
    }

    /// The cluster view forgets the addresses the CNI gave these removed
    /// endpoints' pods (unless a newer endpoint of the pod gave others).
    pub fn forget_cni_ips(&mut self, gone: &[crate::endpoints::Endpoint]) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        for ep in gone {
            if let Some(pod) = ep.pod() {
                cluster.forget_cni_ips(&pod, &ep.ips().collect::<Vec<_>>());
            }
        }
    }

    /// Marks the node's own addresses with `IDENTITY_HOST`, so traffic from
    /// the node (kubelet probes) is recognised as such.
    pub fn program_host_addresses(&mut self) -> Result<()> {
        let ips = crate::netdev::node_ips().map_err(EndpointError::HostAddresses)?;
        for ip in ips {
            let host = crate::model::Identity(sluice_common::IDENTITY_HOST);
            self.dp.writer.set_ipcache(ip, host, None)?;
            info!(%ip, "node address");
        }
        Ok(())
    }

    /// Writes ipcache changes and the policies of the changed endpoints.
    /// ClusterNetworkPolicy profiles first gain their new entries, then
    /// identities get their peer classes, then addresses their identities,
    /// then endpoints their policies (and profiles); what profiles lost is
    /// removed last, once nothing points at it.
    fn program(&mut self, changes: &Changes) -> Result<()> {
        if let Some(cluster) = self.cluster.as_ref() {
            for &id in &changes.profiles {
                let policy = cluster.profile_policy(id);
                self.endpoints
                    .write_profile(&mut self.dp, id, policy.as_deref())?;
            }
            for (&identity, &class) in &changes.classes {
                self.dp.writer.set_peer_class(identity, class)?;
            }
        }
        for (ip, identity) in &changes.ipcache {
            let local = self.endpoints.by_ip(*ip).map(|e| e.ep_id);
            match (identity, local) {
                (Some(identity), local) => self.dp.writer.set_ipcache(*ip, *identity, local)?,
                (None, None) => self.dp.writer.remove_ipcache(*ip)?,
                // A local endpoint keeps its entry until CNI DEL.
                (None, Some(_)) => {}
            }
        }
        let Some(cluster) = self.cluster.as_ref() else {
            return Ok(());
        };
        // Every change is written as a replacement: `set_policy` diffs the
        // new entries against what is in the maps, so only what differs is
        // written either way.
        for pod in &changes.endpoints {
            let Some(ep) = self.endpoints.by_pod(pod) else {
                continue; // not wired on this node (yet)
            };
            let attachment = ep.spec.attachment.clone();
            let Some(policy) = cluster.endpoint_policy(pod) else {
                continue; // the pod is gone from the API; CNI DEL will follow
            };
            if let Some(identity) = cluster.identity_of(pod) {
                self.endpoints
                    .set_identity(&mut self.dp, &attachment, identity)?;
            }
            match self
                .endpoints
                .set_policy(&mut self.dp, &attachment, &policy)
            {
                Ok(()) => {}
                Err(e @ EndpointError::Capacity { .. }) => {
                    warn!(%pod, error = %e, "endpoint over capacity: fails closed");
                }
                Err(e) => return Err(e),
            }
        }
        self.endpoints.prune_profiles(&mut self.dp)
    }

    /// Adds to `changes` every ClusterNetworkPolicy profile (live, or left
    /// in the maps) and makes PEER_CLASSES whole: a full pass.
    fn all_profiles(&mut self, changes: &mut Changes) -> Result<()> {
        let Some(cluster) = self.cluster.as_ref() else {
            return Ok(());
        };
        changes.profiles.extend(cluster.profile_ids());
        changes
            .profiles
            .extend(self.endpoints.programmed_profiles());
        self.dp
            .writer
            .replace_peer_classes(&cluster.peer_classes())?;
        Ok(())
    }

    /// Applies a batch of watched changes and programs their effect; the
    /// policy epoch is bumped (`Writer::bump_epoch`) before the versions
    /// are reported programmed, so "programmed" covers established flows.
    fn apply(&mut self, batch: Vec<Change>, metrics: &Metrics) -> Result<()> {
        let started = std::time::Instant::now();
        let Some(cluster) = self.cluster.as_mut() else {
            return Ok(());
        };
        let Some(mut programming) = cluster.apply(batch) else {
            return Ok(());
        };
        let compiled = started.elapsed();
        if programming.full {
            let local = self.endpoints.all().filter_map(|e| e.pod());
            programming.changes.endpoints.extend(local);
            self.all_profiles(&mut programming.changes)?;
        }
        self.program_and_services(&programming.changes)?;
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.programmed(programming.versions);
        }
        if programming.full {
            release_freed_memory();
        }
        // Only passes that programmed something are timed.
        metrics.observe_compile(compiled);
        metrics.observe_apply_to_programmed(started.elapsed());
        Ok(())
    }

    fn program_and_services(&mut self, changes: &Changes) -> Result<()> {
        let outcome = self.program(changes).and_then(|()| {
            let ips = self.cluster.as_ref().map(Cluster::service_ips);
            match ips {
                Some(ips) => Ok(self.dp.writer.set_services(&ips)?),
                None => Ok(()),
            }
        });
        // Even a failed pass bumps: what it wrote is in force.
        let bumped = self.dp.writer.bump_epoch();
        let outcome = outcome.and(bumped.map_err(EndpointError::from));
        self.retry_all |= outcome.is_err();
        outcome
    }

    /// After a failed pass: every address and every local endpoint again.
    fn retry(&mut self) -> Result<()> {
        if !self.retry_all {
            return Ok(());
        }
        let Some(cluster) = self.cluster.as_ref().filter(|c| c.is_synced()) else {
            return Ok(());
        };
        let mut changes = Changes::default();
        changes
            .ipcache
            .extend(cluster.ipcache().into_iter().map(|(ip, id)| (ip, Some(id))));
        changes
            .endpoints
            .extend(self.endpoints.all().filter_map(|e| e.pod()));
        self.all_profiles(&mut changes)?;
        self.retry_all = false;
        self.program_and_services(&changes)?;
        info!("programming retried and in force");
        Ok(())
    }
}

/// What the CNI socket and the watch loop share.
#[derive(Clone)]
pub struct Reconciler {
    state: Arc<Mutex<State>>,
    metrics: Metrics,
    pods_by_ip: watch::Receiver<PodsByIp>,
    /// ClusterNetworkPolicy rule names (cluster mode).
    rule_names: Option<watch::Receiver<Arc<crate::events::RuleNames>>>,
    isolators: Option<watch::Receiver<Arc<crate::events::Isolators>>>,
    /// The audit view (cluster mode), judged without the state's lock.
    audit: Option<Arc<crate::policy::audit::AuditView>>,
    /// The programs, attached to a new endpoint without the state's lock
    /// (`add`).
    programs: crate::datapath::Programs,
    /// The plugin's deletion queue, whose removals are finished here
    /// (`queue`).
    removals: queue::Removals,
}

impl Reconciler {
    pub fn new(state: State, metrics: Metrics, delete_queue: DeleteQueue) -> Self {
        let pods_by_ip = state.endpoints.pods_by_ip();
        let rule_names = state.cluster.as_ref().map(Cluster::rule_names);
        let isolators = state.cluster.as_ref().map(Cluster::isolators);
        let audit = state.cluster.as_ref().map(Cluster::audit_view);
        let programs = state.dp.programs.clone();
        Self {
            programs,
            rule_names,
            isolators,
            audit,
            state: Arc::new(Mutex::new(state)),
            metrics,
            pods_by_ip,
            removals: queue::Removals::new(delete_queue),
        }
    }

    /// Runs `f` on the state under its lock, on the blocking pool: map
    /// writes and netlink calls are syscalls, and the lock is never held
    /// on an async worker or across an await.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = state.lock().map_err(|_| {
                EndpointError::NotReady("agent state poisoned; restart the agent".into())
            })?;
            f(&mut st)
        })
        .await
        .map_err(|e| EndpointError::NotReady(format!("agent task failed: {e}")))?
    }

    pub async fn check_endpoint(&self, a: Attachment) -> Result<EpId> {
        self.with(move |st| st.endpoints.check(&st.dp, &a)).await
    }

    pub async fn gc(&self, valid: Vec<Attachment>) -> Result<usize> {
        self.with(move |st| {
            let gone = st.endpoints.gc(&mut st.dp, &valid)?;
            st.dp.writer.bump_epoch()?;
            st.forget_cni_ips(&gone);
            Ok(gone.len())
        })
        .await
    }

    pub async fn set_policy(&self, a: Attachment, policy: serde_json::Value) -> Result<()> {
        self.with(move |st| st.endpoints.set_policy_json(&mut st.dp, &a, policy))
            .await
    }

    /// Whether the cluster is synced, and `Kind/ns/name` -> resourceVersion
    /// in force.
    /// Whether the cluster is synced, and the resourceVersions programmed:
    /// of every object, or of the keys in `only`.
    pub async fn programmed(
        &self,
        only: Option<Vec<String>>,
    ) -> Result<(bool, std::collections::BTreeMap<String, String>)> {
        self.with(move |st| {
            Ok(st.cluster.as_ref().map_or_else(Default::default, |c| {
                let versions = match &only {
                    None => c.programmed_versions(),
                    Some(keys) => c.programmed_versions_of(keys),
                };
                (c.is_synced(), versions)
            }))
        })
        .await
    }

    /// Standalone or cluster mode, the Node served, and whether the
    /// cluster is synced.
    pub async fn info(&self) -> Result<(sluice_proto::AgentMode, Option<String>, bool)> {
        self.with(|st| {
            Ok(match st.cluster.as_ref() {
                None => (sluice_proto::AgentMode::Standalone, None, false),
                Some(c) => (
                    sluice_proto::AgentMode::Cluster,
                    Some(c.node_name().to_owned()),
                    c.is_synced() && c.programmed_any(),
                ),
            })
        })
        .await
    }

    pub async fn pod_cidrs(&self) -> Result<Vec<String>> {
        self.with(|st| {
            Ok(st
                .cluster
                .as_ref()
                .map(|c| c.pod_cidrs().to_vec())
                .unwrap_or_default())
        })
        .await
    }

    /// `sluice explain` from the compiler state in the maps: the
    /// explanations, or what is wrong with the question (`Err` inside).
    /// A standalone agent has no compiler.
    pub async fn explain(
        &self,
        from: String,
        to: String,
        flow: String,
    ) -> Result<std::result::Result<Vec<crate::policy::explain::Explanation>, String>> {
        self.with(move |st| {
            Ok(match st.cluster.as_ref() {
                Some(c) => c.explain(&from, &to, &flow),
                None => Err(
                    "a standalone agent compiles no policy: explain offline with \
                     `sluice explain -f DIR`"
                        .into(),
                ),
            })
        })
        .await
    }

    /// Where a `sluice assert` probe runs and what it connects to: the
    /// netns of `from` (a pod on this node) and the address `to` stands
    /// for (a pod's, a Service's ClusterIP, or an address as given), of
    /// the source's family when it has one. `Err` inside: the CNI code
    /// and why (3: the pod is not on this node).
    pub async fn probe_plan(
        &self,
        from: ObjectRef,
        to: String,
    ) -> Result<std::result::Result<(std::path::PathBuf, std::net::IpAddr), (u32, String)>> {
        use sluice_proto::code;
        self.with(move |st| {
            let Some(ep) = st.endpoints.by_pod(&from) else {
                return Ok(Err((
                    code::CONTAINER_UNKNOWN,
                    format!("pod {from} is not on this node"),
                )));
            };
            let v6 = ep.spec.ipv4.is_none() && ep.spec.ipv6.is_some();
            let netns = std::path::PathBuf::from(&ep.spec.netns);
            if let Ok(ip) = to.parse::<std::net::IpAddr>() {
                return Ok(Ok((netns, ip)));
            }
            let found = st
                .cluster
                .as_ref()
                .and_then(|c| c.target_addresses(&to))
                .and_then(|ips| crate::cluster::pick_address(&ips, v6));
            Ok(match found {
                Some(ip) => Ok((netns, ip)),
                None if st.cluster.is_none() => Err((
                    code::INVALID_CONFIG,
                    format!(
                        "a standalone agent knows no pods or Services: give {to} as an address"
                    ),
                )),
                None => Err((
                    code::INVALID_CONFIG,
                    format!("{to}: no such pod or Service with an address (or not an address)"),
                )),
            })
        })
        .await
    }

    /// `ns/name` of the pods in `namespace` carrying every label of
    /// `labels`, cluster-wide (none in standalone mode).
    pub async fn pods_matching(
        &self,
        namespace: String,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<String>> {
        self.with(move |st| {
            Ok(st
                .cluster
                .as_ref()
                .map(|c| c.pods_matching(&namespace, &labels))
                .unwrap_or_default())
        })
        .await
    }

    /// Every watched object as a `kind: List` (`None` standalone).
    pub async fn objects(&self) -> Result<Option<serde_json::Value>> {
        self.with(|st| Ok(st.cluster.as_ref().map(Cluster::objects_list)))
            .await
    }

    /// Whether the compiler knows `pod`, as the incarnation `uid` when the
    /// runtime named one (false in standalone mode).
    pub async fn knows_pod(&self, pod: ObjectRef, uid: Option<String>) -> Result<bool> {
        self.with(move |st| {
            Ok(st
                .cluster
                .as_ref()
                .is_some_and(|c| c.knows_pod(&pod, uid.as_deref())))
        })
        .await
    }

    /// Applies watched changes (a pod fetched ahead of its watch event
    /// among them) and programs their effect.
    pub async fn apply(&self, batch: Vec<Change>) -> Result<()> {
        let metrics = self.metrics.clone();
        self.with(move |st| st.apply(batch, &metrics)).await
    }

    /// The local pod with address `ip`, read without the state's lock.
    pub fn pod_of(&self, ip: std::net::IpAddr) -> Option<ObjectRef> {
        self.pods_by_ip.borrow().get(&ip).cloned()
    }

    /// The names of ClusterNetworkPolicy rule ids, read without the
    /// state's lock.
    pub fn rule_names(&self) -> Arc<crate::events::RuleNames> {
        self.rule_names
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default()
    }

    /// The NetworkPolicies isolating each local endpoint, read without the
    /// state's lock.
    pub fn isolators(&self) -> Arc<crate::events::Isolators> {
        self.isolators
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default()
    }

    /// The audit view of audit-mode policies (cluster mode).
    pub fn audit_view(&self) -> Option<Arc<crate::policy::audit::AuditView>> {
        self.audit.clone()
    }

    /// What metrics report of the endpoints. Locks the state: call it on a
    /// blocking thread (the metrics server does).
    pub fn endpoint_stats(&self) -> EndpointStats {
        let Ok(st) = self.state.lock() else {
            return EndpointStats::default();
        };
        let sizes = &st.dp.sizes;
        EndpointStats {
            rule_names: self.rule_names(),
            endpoints: st
                .endpoints
                .all()
                .map(|ep| EndpointStat {
                    ep_id: ep.ep_id,
                    namespace: ep.spec.pod_namespace.clone().unwrap_or_default(),
                    pod: ep.spec.pod_name.clone().unwrap_or_default(),
                    entries: st.endpoints.entries_of(ep.ep_id),
                })
                .collect(),
            capacity: Capacities {
                policy: sizes.policy,
                endpoints: sizes.endpoints,
            },
        }
    }

    /// Follows watched changes until the watch ends: applies each batch,
    /// posts the Warning Events it raised, then keeps routes and uplinks
    /// in line. Every `resync` it retries what failed.
    pub async fn run(
        self,
        mut changes: mpsc::Receiver<Change>,
        notices: mpsc::Sender<Notice>,
        resync: Duration,
        ready: Ready,
        tunnel: vxlan::TunnelConfig,
    ) -> anyhow::Result<()> {
        let mut net = network::Network::new(tunnel)?;
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                first = changes.recv() => {
                    let Some(first) = first else { return Ok(()) };
                    // Take whatever else is queued: one programming pass per batch.
                    let mut batch = vec![first];
                    while let Ok(more) = changes.try_recv() {
                        batch.push(more);
                    }
                    if let Err(e) = self.apply(batch).await {
                        error!(error = %e, "programming cluster changes failed; retried on the next tick");
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.with(State::retry).await {
                        error!(error = %e, "retrying programming failed");
                    }
                }
            }
            let queued = self
                .with(|st| {
                    Ok(st
                        .cluster
                        .as_mut()
                        .map(Cluster::take_notices)
                        .unwrap_or_default())
                })
                .await
                .unwrap_or_default();
            for notice in queued {
                if notices.try_send(notice).is_err() {
                    warn!("Event queue full: a Warning Event is dropped (the log has it)");
                }
            }
            let (synced, (peers, own)) = self
                .with(|st| {
                    let c = st.cluster.as_ref();
                    // Ready: every kind listed, programmed, nothing to retry.
                    let synced =
                        c.is_some_and(|c| c.is_synced() && c.programmed_any()) && !st.retry_all;
                    let peers = c
                        .map(|c| (c.peer_nodes(), c.own_internal_ips().to_vec()))
                        .unwrap_or_default();
                    Ok((synced, peers))
                })
                .await
                .unwrap_or_default();
            ready.set_synced(synced);
            net.sync(&peers, &own, &self).await;
        }
    }
}

/// After a full list: the listing's objects (whole k8s-openapi structs,
/// most of the agent's peak on a large cluster) are freed, but glibc keeps
/// freed small blocks in its arenas, so the process would hold its peak as
/// RSS for good. Returns them to the kernel (docs/performance.md, "bench
/// agent").
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
