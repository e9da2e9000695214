//! Node-local endpoints: the pod attachments of this node, what is
//! programmed for each, and the operations the CNI plugin asks for (add,
//! delete, check, gc, set a policy). Knows nothing of Kubernetes: the
//! caller decides an endpoint's identity and policy. Every operation takes
//! the data path it writes to as a parameter.
mod registry;

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use sluice_common::PROFILE_KEY_FLAG;
use sluice_proto::{Attachment, EndpointSpec, Response, code};
use tracing::{info, warn};

pub use self::registry::{Endpoint, Registry, RegistryError, pod_of};
use crate::{
    datapath::{Datapath, DatapathError},
    metrics::Metrics,
    model::{EpId, Identity, ObjectRef},
    netdev,
    policy::{Compiled, EndpointPolicy, PolicyError},
};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    #[error("listing the node's addresses")]
    HostAddresses(#[source] std::io::Error),
    #[error("unknown endpoint {0}/{1}")]
    UnknownEndpoint(String, String),
    #[error("invalid policy")]
    InvalidPolicy(#[source] PolicyError),
    #[error("policy is not JSON of the expected shape")]
    PolicyDecode(#[source] serde_json::Error),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("endpoint drifted: {0}")]
    Drift(String),
    #[error("endpoint {ep_id} needs {entries} entries, over its limit of {limit}: it fails closed")]
    Capacity {
        ep_id: EpId,
        entries: usize,
        limit: usize,
    },
}

impl EndpointError {
    /// The CNI error code the plugin should report.
    pub fn cni_code(&self) -> u32 {
        match self {
            Self::InvalidEndpoint(_) | Self::InvalidPolicy(_) | Self::PolicyDecode(_) => {
                code::INVALID_CONFIG
            }
            Self::UnknownEndpoint(..) => code::CONTAINER_UNKNOWN,
            Self::Drift(_) => code::ENDPOINT_DRIFT,
            Self::Capacity { .. } | Self::NotReady(_) => code::TRY_AGAIN_LATER,
            Self::Datapath(_) | Self::Registry(_) | Self::HostAddresses(_) => code::IO_FAILURE,
        }
    }

    pub fn to_response(&self) -> Response {
        let mut details = String::new();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            if !details.is_empty() {
                details.push_str(": ");
            }
            details.push_str(&e.to_string());
            src = e.source();
        }
        Response::error(self.cni_code(), self.to_string(), details)
    }
}

pub type Result<T, E = EndpointError> = std::result::Result<T, E>;

/// Identities of endpoints in standalone mode (no API server): one per
/// endpoint, in a range the compiler never hands out.
pub const STANDALONE_IDENTITY_BASE: u32 = 0x4000_0000;

/// Default per-endpoint share of the policy map.
pub const DEFAULT_MAX_ENTRIES_PER_ENDPOINT: usize = 65_536;

/// Address -> the local pod that has it, as drop events are enriched.
pub type PodsByIp = Arc<HashMap<IpAddr, ObjectRef>>;

/// One line per endpoint added or deleted, with the same fields both
/// times: the pod, the attachment (container id and the pod's interface
/// name), the host end of the veth and the addresses.
fn log_endpoint(ep: &Endpoint, what: &'static str) {
    let s = &ep.spec;
    info!(
        pod_namespace = %s.pod_namespace.as_deref().unwrap_or("-"),
        pod_name = %s.pod_name.as_deref().unwrap_or("-"),
        container_id = %s.attachment.container_id,
        pod_ifname = %s.attachment.ifname,
        host_ifname = %s.host_ifname,
        ipv4 = ?s.ipv4,
        ipv6 = ?s.ipv6,
        ep_id = %ep.ep_id,
        "{what}"
    );
}

/// The endpoints of this node.
pub struct Endpoints {
    registry: Registry,
    /// What is in the maps for each endpoint.
    programmed: HashMap<EpId, Compiled>,
    /// The policy an endpoint's `programmed` entries are the compile of,
    /// when they are (not after a takeover or failing closed): the next
    /// policy is patched from it (`EndpointPolicy::patch`).
    sources: HashMap<EpId, Arc<EndpointPolicy>>,
    /// Profiles written and not yet pruned, with their new entries.
    profiles_pending: HashMap<u32, Compiled>,
    /// Most policy + CIDR entries one endpoint may hold; past it the
    /// endpoint fails closed and the others are unaffected.
    max_entries: usize,
    metrics: Metrics,
    /// Published after every change, for readers outside the lock.
    pods_by_ip: tokio::sync::watch::Sender<PodsByIp>,
}

impl Endpoints {
    /// Takes over a node's endpoints: reads the registry and the programmed
    /// policy, re-attaches the current programs to every endpoint that
    /// still exists (atomically, through the pinned links) and forgets
    /// those whose interface is gone.
    pub fn start(
        dp: &mut Datapath,
        registry: Registry,
        max_entries: usize,
        metrics: Metrics,
    ) -> Result<Self> {
        let mut eps = Self {
            programmed: dp.writer.programmed_policy()?,
            sources: HashMap::new(),
            profiles_pending: HashMap::new(),
            registry,
            max_entries,
            metrics,
            pods_by_ip: tokio::sync::watch::Sender::new(PodsByIp::default()),
        };
        let all: Vec<Endpoint> = eps.registry.all().cloned().collect();
        for ep in all {
            let s = &ep.spec;
            if netdev::interface_is(&s.host_ifname, s.host_ifindex) {
                let ep = eps.tag_if_untagged(dp, ep)?;
                let s = &ep.spec;
                dp.writer.index_endpoint(&ep.record())?;
                let programmed = eps.programmed.get(&ep.ep_id).cloned().unwrap_or_default();
                dp.writer.refresh_masks(&ep.record(), &programmed)?;
                dp.programs.attach(&s.host_ifname)?;
                log_endpoint(&ep, "endpoint re-attached");
            } else {
                eps.forget(dp, &ep)?;
                log_endpoint(
                    &ep,
                    "interface gone while the agent was down; endpoint forgotten",
                );
            }
        }
        eps.publish();
        Ok(eps)
    }

    /// Gives an endpoint an older agent registered (without hairpin tags)
    /// its tag: in its record and in its ENDPOINTS flags, before the new
    /// programs are attached.
    fn tag_if_untagged(&mut self, dp: &mut Datapath, mut ep: Endpoint) -> Result<Endpoint> {
        if ep.hairpin_tag != 0 {
            return Ok(ep);
        }
        ep.hairpin_tag = self.registry.allocate_hairpin_tag();
        if ep.hairpin_tag == 0 {
            warn!(ep_id = %ep.ep_id, "no hairpin tag left for a re-attached endpoint");
            return Ok(ep);
        }
        self.registry.insert(ep.clone())?;
        dp.writer.set_hairpin_tag(&ep.record())?;
        Ok(ep)
    }

    /// Refuses a spec the data path cannot serve.
    pub fn validate(spec: &EndpointSpec) -> Result<()> {
        if spec.host_ifindex == 0 || spec.host_ifname.is_empty() || spec.host_ifname.len() > 15 {
            return Err(EndpointError::InvalidEndpoint(format!(
                "host interface {:?} index {}",
                spec.host_ifname, spec.host_ifindex
            )));
        }
        if spec.ipv4.is_none() && spec.ipv6.is_none() {
            return Err(EndpointError::InvalidEndpoint("no address".into()));
        }
        if !netdev::interface_is(&spec.host_ifname, spec.host_ifindex) {
            return Err(EndpointError::InvalidEndpoint(format!(
                "no interface {} with index {} in the agent's namespace",
                spec.host_ifname, spec.host_ifindex
            )));
        }
        Ok(())
    }

    /// An ADD retried with the same spec: the endpoint, whose programs the
    /// caller attaches again (what a failed attach left out), else `None`.
    pub fn retried(&self, spec: &EndpointSpec) -> Option<EpId> {
        match self.registry.get(&spec.attachment) {
            Some(old) if old.spec == *spec => Some(old.ep_id),
            _ => None,
        }
    }

    /// Registers and programs a new endpoint (replacing an attachment with
    /// another spec): its addresses and record in the maps. The caller
    /// attaches its programs, without the agent's lock (they wait in the
    /// kernel), and calls [`Self::rollback_added`] if that fails.
    /// `identity` `None` gives it a standalone identity of its own. On an
    /// error nothing of it is left.
    pub fn add(
        &mut self,
        dp: &mut Datapath,
        spec: EndpointSpec,
        identity: Option<Identity>,
    ) -> Result<Endpoint> {
        if let Some(old) = self.registry.get(&spec.attachment).cloned() {
            self.forget(dp, &old)?;
        }
        let ep_id = self.registry.allocate_ep_id()?;
        let hairpin_tag = self.registry.allocate_hairpin_tag();
        if hairpin_tag == 0 {
            warn!(%ep_id, limit = sluice_common::HAIRPIN_TAG_MAX,
                "no hairpin tag left: this endpoint reaching itself through a Service is not judged");
        }
        let ep = Endpoint {
            ep_id,
            identity: identity.unwrap_or(Identity(STANDALONE_IDENTITY_BASE + ep_id.0)),
            spec,
            hairpin_tag,
        };
        let programmed = self.programmed.entry(ep.ep_id).or_default().clone();
        let written = dp
            .writer
            .add_endpoint(&ep.record(), &programmed)
            .map_err(EndpointError::from)
            .and_then(|()| self.registry.insert(ep.clone()).map_err(Into::into));
        if let Err(e) = written {
            self.rollback(dp, &ep);
            return Err(e);
        }
        self.publish();
        log_endpoint(&ep, "endpoint added");
        Ok(ep)
    }

    /// Undoes a failed add: the plugin rolls its side back too.
    pub fn rollback(&mut self, dp: &mut Datapath, ep: &Endpoint) {
        if let Err(undo) = self.forget(dp, ep) {
            warn!(error = %undo, ep_id = %ep.ep_id, "rollback of a failed endpoint add");
        }
    }

    /// Undoes [`Self::add`] of endpoint `ep_id` when attaching its programs
    /// failed, unless the attachment has been replaced or deleted since.
    pub fn rollback_added(&mut self, dp: &mut Datapath, a: &Attachment, ep_id: EpId) {
        if let Some(ep) = self.registry.get(a).filter(|e| e.ep_id == ep_id).cloned() {
            self.rollback(dp, &ep);
        }
    }

    fn forget(&mut self, dp: &mut Datapath, ep: &Endpoint) -> Result<()> {
        dp.programs.detach(&ep.spec.host_ifname)?;
        self.sources.remove(&ep.ep_id);
        let old = self.programmed.remove(&ep.ep_id).unwrap_or_default();
        dp.writer.remove_endpoint(&ep.record(), &old)?;
        self.registry.remove(&ep.spec.attachment)?;
        self.publish();
        Ok(())
    }

    /// Forgets an endpoint; the one forgotten, if it was known. Unknown is
    /// fine: DEL is idempotent and may come twice.
    pub fn del(&mut self, dp: &mut Datapath, a: &Attachment) -> Result<Option<Endpoint>> {
        let Some(ep) = self.registry.get(a).cloned() else {
            return Ok(None);
        };
        self.forget(dp, &ep)?;
        log_endpoint(&ep, "endpoint deleted");
        Ok(Some(ep))
    }

    /// Whether the endpoint is registered, its interface there, its record
    /// in the maps and its programs attached.
    pub fn check(&self, dp: &Datapath, a: &Attachment) -> Result<EpId> {
        let ep = self.get(a)?;
        let s = &ep.spec;
        if !netdev::interface_is(&s.host_ifname, s.host_ifindex) {
            return Err(EndpointError::Drift(format!(
                "host interface {} is gone",
                s.host_ifname
            )));
        }
        if !dp.writer.has_endpoint(&ep.record()) {
            return Err(EndpointError::Drift(
                "endpoint missing from the ENDPOINTS map".into(),
            ));
        }
        if !dp.programs.is_attached(&s.host_ifname) {
            return Err(EndpointError::Drift("programs are not attached".into()));
        }
        Ok(ep.ep_id)
    }

    /// Forgets every endpoint not in `valid`; returns how many.
    pub fn gc(&mut self, dp: &mut Datapath, valid: &[Attachment]) -> Result<Vec<Endpoint>> {
        let stale: Vec<Endpoint> = self
            .registry
            .all()
            .filter(|e| !valid.contains(&e.spec.attachment))
            .cloned()
            .collect();
        for ep in &stale {
            self.forget(dp, ep)?;
        }
        Ok(stale)
    }

    fn get(&self, a: &Attachment) -> Result<&Endpoint> {
        self.registry
            .get(a)
            .ok_or_else(|| EndpointError::UnknownEndpoint(a.container_id.clone(), a.ifname.clone()))
    }

    /// Replaces the policy of an endpoint, never leaving it less enforced
    /// than the old or the new policy (`datapath::Writer::replace_policy`).
    /// Over its entry limit, or when the maps are full, it fails closed.
    pub fn set_policy(
        &mut self,
        dp: &mut Datapath,
        a: &Attachment,
        policy: &Arc<EndpointPolicy>,
    ) -> Result<()> {
        let ep = self.get(a)?.clone();
        if let Some(done) = self.try_patch(dp, &ep, policy) {
            return done;
        }
        let new = policy
            .compile(ep.ep_id.0)
            .map_err(EndpointError::InvalidPolicy)?;
        let entries = new.entries.len() + new.cidrs.len();
        let none = Compiled::default();
        // The programmed entries are read in place (an endpoint's can be
        // thousands); copied only to fail closed.
        let outcome = self.within_limit(ep.ep_id, entries).and_then(|()| {
            let old = self.programmed.get(&ep.ep_id).unwrap_or(&none);
            dp.writer
                .replace_policy(&ep.record(), old, &new)
                .map_err(EndpointError::from)
        });
        if let Err(e) = outcome {
            // Over the limit, or the map is full (or failing): the
            // endpoint drops everything until a later policy fits.
            let old = self.programmed.get(&ep.ep_id).cloned().unwrap_or_default();
            let attempted = match e {
                EndpointError::Capacity { .. } => &none,
                _ => &new,
            };
            self.fail_closed(dp, &ep, &old, attempted)?;
            return Err(e);
        }
        info!(container_id = %a.container_id, ep_id = %ep.ep_id, entries = new.entries.len(),
            cidrs = new.cidrs.len(), isolation = new.isolation, "policy programmed");
        self.programmed.insert(ep.ep_id, new);
        self.sources.insert(ep.ep_id, policy.clone());
        Ok(())
    }

    /// Replaces the endpoint's policy by patching what is programmed from
    /// the policy it was compiled from (`EndpointPolicy::patch`), with the
    /// same guarantees as a whole replacement. `None`: nothing done, no
    /// patch is possible (no such policy, or rules not sorted by peer).
    fn try_patch(
        &mut self,
        dp: &mut Datapath,
        ep: &Endpoint,
        policy: &Arc<EndpointPolicy>,
    ) -> Option<Result<()>> {
        let old = self.sources.get(&ep.ep_id)?.clone();
        let mut programmed = self.programmed.remove(&ep.ep_id)?;
        let before = Compiled {
            entries: Default::default(),
            cidrs: programmed.cidrs.clone(),
            ..programmed
        };
        let delta = match policy.patch(&old, ep.ep_id.0, &mut programmed) {
            Ok(Some(delta)) => delta,
            Ok(None) => {
                self.programmed.insert(ep.ep_id, programmed);
                return None;
            }
            Err(e) => {
                // Untouched, as a whole compile's error leaves it.
                self.programmed.insert(ep.ep_id, programmed);
                return Some(Err(EndpointError::InvalidPolicy(e)));
            }
        };
        let entries = programmed.entries.len() + programmed.cidrs.len();
        let outcome = self.within_limit(ep.ep_id, entries).and_then(|()| {
            dp.writer
                .apply_patch(&ep.record(), &before, &programmed, &delta)
                .map_err(EndpointError::from)
        });
        if let Err(e) = outcome {
            // What the maps may hold: the old entries (the patched ones
            // and those the patch removes) and the new ones; all go.
            let mut both = programmed;
            both.entries
                .extend(delta.removed.iter().map(|k| (*k, Default::default())));
            return Some(self.fail_closed(dp, ep, &before, &both).and(Err(e)));
        }
        info!(container_id = %ep.spec.attachment.container_id, ep_id = %ep.ep_id,
            entries = programmed.entries.len(), cidrs = programmed.cidrs.len(),
            isolation = programmed.isolation, written = delta.set.len(),
            removed = delta.removed.len(), "policy programmed (patched)");
        self.programmed.insert(ep.ep_id, programmed);
        self.sources.insert(ep.ep_id, policy.clone());
        Some(Ok(()))
    }

    /// An endpoint may hold `entries` (policy + CIDR) at most.
    fn within_limit(&self, ep_id: EpId, entries: usize) -> Result<()> {
        if entries > self.max_entries {
            return Err(EndpointError::Capacity {
                ep_id,
                entries,
                limit: self.max_entries,
            });
        }
        Ok(())
    }

    fn fail_closed(
        &mut self,
        dp: &mut Datapath,
        ep: &Endpoint,
        old: &Compiled,
        attempted: &Compiled,
    ) -> Result<()> {
        warn!(ep_id = %ep.ep_id, container_id = %ep.spec.attachment.container_id, "endpoint fails closed: its policy does not fit");
        self.metrics.endpoint_failed_closed();
        self.sources.remove(&ep.ep_id);
        // Recorded first: if failing closed fails too, the next
        // replacement still removes everything either may have left.
        let mut both = old.clone();
        both.entries
            .extend(attempted.entries.iter().map(|(k, v)| (*k, *v)));
        both.cidrs
            .extend(attempted.cidrs.iter().map(|(k, g)| (*k, *g)));
        if both.profile == 0 {
            both.profile = attempted.profile;
        }
        self.programmed.insert(ep.ep_id, both);
        let now = dp.writer.fail_closed(&ep.record(), old, attempted)?;
        self.programmed.insert(ep.ep_id, now);
        Ok(())
    }

    /// Writes what ClusterNetworkPolicy profile `id` gains (`policy`, its
    /// shared entries; `None`: the profile is gone). What it loses stays
    /// until [`Self::prune_profiles`], after the endpoints moved.
    pub fn write_profile(
        &mut self,
        dp: &mut Datapath,
        id: u32,
        policy: Option<&EndpointPolicy>,
    ) -> Result<()> {
        let key = EpId(PROFILE_KEY_FLAG | id);
        let new = match policy {
            Some(p) => p.compile(key.0).map_err(EndpointError::InvalidPolicy)?,
            None => Compiled::default(),
        };
        let old = self.programmed.get(&key).cloned().unwrap_or_default();
        let written = dp.writer.write_profile(id, &old, &new);
        // What is in the maps now, whatever the outcome: both.
        let mut both = old;
        both.entries
            .extend(new.entries.iter().map(|(k, v)| (*k, *v)));
        self.programmed.insert(key, both);
        self.profiles_pending.insert(id, new);
        written.map_err(Into::into)
    }

    /// Removes what the profiles written since the last call lost.
    pub fn prune_profiles(&mut self, dp: &mut Datapath) -> Result<()> {
        for (id, new) in std::mem::take(&mut self.profiles_pending) {
            let key = EpId(PROFILE_KEY_FLAG | id);
            let old = self.programmed.remove(&key).unwrap_or_default();
            if let Err(e) = dp.writer.prune_profile(id, &old, &new) {
                self.programmed.insert(key, old);
                return Err(e.into());
            }
            if !new.entries.is_empty() {
                self.programmed.insert(key, new);
            }
        }
        Ok(())
    }

    /// Profiles whose entries are in the maps (this agent's, or left by
    /// the agent before it).
    pub fn programmed_profiles(&self) -> Vec<u32> {
        self.programmed
            .keys()
            .filter(|k| k.0 & PROFILE_KEY_FLAG != 0)
            .map(|k| k.0 & !PROFILE_KEY_FLAG)
            .collect()
    }

    /// A policy as the socket's `SetPolicy` sends it (standalone mode).
    pub fn set_policy_json(
        &mut self,
        dp: &mut Datapath,
        a: &Attachment,
        policy: serde_json::Value,
    ) -> Result<()> {
        let p: EndpointPolicy =
            serde_json::from_value(policy).map_err(EndpointError::PolicyDecode)?;
        let outcome = self.set_policy(dp, a, &Arc::new(p));
        // Whatever was written (a failed replacement fails closed) reaches
        // established flows before SetPolicy answers.
        let bumped = dp.writer.bump_epoch();
        outcome?;
        Ok(bumped?)
    }

    /// Gives an endpoint a new identity, in the registry and the maps.
    pub fn set_identity(
        &mut self,
        dp: &mut Datapath,
        a: &Attachment,
        identity: Identity,
    ) -> Result<()> {
        let ep = self.get(a)?;
        if ep.identity == identity {
            return Ok(());
        }
        let mut updated = ep.clone();
        updated.identity = identity;
        self.registry.insert(updated.clone())?;
        dp.writer.set_identity(&updated.record())?;
        Ok(())
    }

    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        self.registry.all()
    }

    pub fn len(&self) -> usize {
        self.registry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn by_pod(&self, pod: &ObjectRef) -> Option<&Endpoint> {
        self.registry.by_pod(pod)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.registry.by_ip(ip)
    }

    /// Policy and CIDR entries programmed for an endpoint.
    pub fn entries_of(&self, ep_id: EpId) -> usize {
        self.programmed
            .get(&ep_id)
            .map_or(0, |c| c.entries.len() + c.cidrs.len())
    }

    /// Address -> pod of the local endpoints, kept current; read without
    /// the agent's lock (drop events are enriched with it).
    pub fn pods_by_ip(&self) -> tokio::sync::watch::Receiver<PodsByIp> {
        self.pods_by_ip.subscribe()
    }

    fn publish(&self) {
        let map: HashMap<IpAddr, ObjectRef> = self
            .registry
            .all()
            .filter_map(|e| Some((e.pod()?, e)))
            .flat_map(|(pod, e)| e.ips().map(move |ip| (ip, pod.clone())))
            .collect();
        self.pods_by_ip.send_replace(Arc::new(map));
    }
}
