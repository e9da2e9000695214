//! The agent's state on one node: the data path, the endpoint registry and
//! the policy programmed for each endpoint, and the operations the CNI
//! plugin (and tests) ask for. Callers hold the lock and pass `&mut Node`.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::MapError;
use ipnetwork::IpNetwork;
use sluice_common::{EP_HAS_IPV4, EP_HAS_IPV6, EndpointInfo, IpcacheValue, PolicyKey};
use sluice_proto::{Attachment, EndpointSpec, Response, code};
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, DatapathError, cidr_key, ipcache_key, service_key},
    policy::{Compiled, EndpointPolicy, PolicyError},
    registry::{Endpoint, Registry, RegistryError},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("writing map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
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
        ep_id: u32,
        entries: usize,
        limit: usize,
    },
}

impl NodeError {
    /// The CNI error code the plugin should report.
    pub fn cni_code(&self) -> u32 {
        match self {
            Self::InvalidEndpoint(_) | Self::InvalidPolicy(_) | Self::PolicyDecode(_) => {
                code::INVALID_CONFIG
            }
            Self::UnknownEndpoint(..) => code::CONTAINER_UNKNOWN,
            Self::Drift(_) => code::ENDPOINT_DRIFT,
            Self::Capacity { .. } | Self::NotReady(_) => code::TRY_AGAIN_LATER,
            Self::Datapath(_) | Self::Registry(_) | Self::Map { .. } => code::IO_FAILURE,
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

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> NodeError {
    move |source| NodeError::Map { name, source }
}

/// Identities of endpoints in standalone mode (no API server): one per
/// endpoint, in a range the compiler never hands out.
pub const STANDALONE_IDENTITY_BASE: u32 = 0x4000_0000;

pub struct Node {
    pub dp: Datapath,
    pub registry: Registry,
    /// What is in the maps for each endpoint id.
    policies: HashMap<u32, Compiled>,
    /// Most policy + CIDR entries one endpoint may hold; past it the
    /// endpoint fails closed and the others are unaffected.
    pub max_entries_per_endpoint: usize,
    /// The cluster view when the agent watches an API server; `None` in
    /// standalone mode (policy only through `SetPolicy`).
    pub cluster: Option<crate::cluster::Cluster>,
    /// What the SERVICES map holds (read back from the pinned map at start).
    service_ips: BTreeSet<IpAddr>,
    /// Counts the times an endpoint was made to fail closed (main hands
    /// over the agent's handle).
    pub metrics: crate::metrics::Metrics,
}

/// Default per-endpoint share of the policy map.
pub const DEFAULT_MAX_ENTRIES_PER_ENDPOINT: usize = 65_536;

fn host_net(ip: IpAddr) -> IpNetwork {
    match ip {
        IpAddr::V4(a) => IpNetwork::V4(a.into()),
        IpAddr::V6(a) => IpNetwork::V6(a.into()),
    }
}

fn spec_ips(spec: &EndpointSpec) -> Vec<IpAddr> {
    spec.ipv4
        .map(IpAddr::V4)
        .into_iter()
        .chain(spec.ipv6.map(IpAddr::V6))
        .collect()
}

/// True when `name` exists in this network namespace with `ifindex`.
fn interface_is(name: &str, ifindex: u32) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok_and(|i| i == ifindex)
}

impl Node {
    /// Takes over a node: loads the data path (reusing pinned maps), reads
    /// the registry and the programmed policy, re-attaches the current
    /// programs to every endpoint that still exists (atomically, through
    /// the pinned links) and forgets those whose interface is gone.
    pub fn start(dp: Datapath, registry: Registry) -> Result<Self> {
        let mut node = Self {
            dp,
            registry,
            policies: HashMap::new(),
            max_entries_per_endpoint: DEFAULT_MAX_ENTRIES_PER_ENDPOINT,
            cluster: None,
            service_ips: BTreeSet::new(),
            metrics: crate::metrics::Metrics::default(),
        };
        node.policies = node.read_programmed_policy()?;
        node.service_ips = node.read_service_ips()?;
        node.program_host_addresses()?;
        let endpoints: Vec<Endpoint> = node.registry.all().cloned().collect();
        for ep in endpoints {
            let s = &ep.spec;
            if interface_is(&s.host_ifname, s.host_ifindex) {
                // EP_BY_ID may be new (pinned by an agent that predates it).
                node.dp
                    .maps
                    .ep_by_id
                    .insert(&ep.ep_id, &s.host_ifindex, 0)
                    .map_err(map_err("EP_BY_ID"))?;
                node.dp.attach(&s.host_ifname)?;
                info!(container_id = %s.attachment.container_id, ifname = %s.host_ifname, ep_id = ep.ep_id, "endpoint re-attached");
            } else {
                warn!(container_id = %s.attachment.container_id, ifname = %s.host_ifname, "interface gone while the agent was down; forgetting endpoint");
                node.forget(&ep)?;
            }
        }
        Ok(node)
    }

    /// Marks the node's own addresses with `IDENTITY_HOST`, so traffic from
    /// the node (kubelet probes) is recognised as such.
    pub fn program_host_addresses(&mut self) -> Result<()> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| {
            NodeError::InvalidEndpoint(format!("listing the node's addresses: {e}"))
        })?;
        for ifa in addrs {
            let Some(sa) = ifa.address else { continue };
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if ip.is_loopback() || matches!(ip, IpAddr::V6(a) if a.is_unicast_link_local()) {
                continue;
            }
            self.dp
                .maps
                .ipcache
                .insert(
                    &ipcache_key(host_net(ip)),
                    &IpcacheValue {
                        identity: sluice_common::IDENTITY_HOST,
                        ep_id: 0,
                    },
                    0,
                )
                .map_err(map_err("IPCACHE"))?;
            info!(%ip, "node address");
        }
        Ok(())
    }

    /// The Service addresses in the pinned SERVICES map.
    fn read_service_ips(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for item in self.dp.maps.services.keys() {
            let k = item.map_err(map_err("SERVICES"))?;
            out.insert(unmapped(k.addr, 128).ip());
        }
        Ok(out)
    }

    /// Makes SERVICES hold exactly `ips` (the cluster's ClusterIPs): new
    /// addresses are added before gone ones are removed. New flows of pods
    /// to these addresses have their egress judged after kube-proxy's DNAT
    /// (docs/design.md, "Services").
    pub fn set_service_ips(&mut self, ips: &BTreeSet<IpAddr>) -> Result<()> {
        for ip in ips.difference(&self.service_ips) {
            self.dp
                .maps
                .services
                .insert(&service_key(*ip), &sluice_common::SERVICE_CLUSTER_IP, 0)
                .map_err(map_err("SERVICES"))?;
        }
        let gone: Vec<IpAddr> = self.service_ips.difference(ips).copied().collect();
        for ip in gone {
            ignore_missing(self.dp.maps.services.remove(&service_key(ip)))
                .map_err(map_err("SERVICES"))?;
        }
        if self.service_ips != *ips {
            info!(count = ips.len(), "service addresses programmed");
        }
        self.service_ips = ips.clone();
        Ok(())
    }

    /// The Service addresses programmed.
    pub fn service_ips(&self) -> &BTreeSet<IpAddr> {
        &self.service_ips
    }

    /// Rebuilds `policies` from the pinned POLICY and CIDRS maps.
    fn read_programmed_policy(&self) -> Result<HashMap<u32, Compiled>> {
        let mut out: HashMap<u32, Compiled> = HashMap::new();
        for item in self.dp.maps.policy.iter() {
            let (k, v) = item.map_err(map_err("POLICY"))?;
            let c = out.entry(k.ep_id).or_default();
            c.port_plens[usize::from(k.dir) & 1] |= crate::policy::plen_bit(&k);
            c.entries.insert(k, v);
        }
        for item in self.dp.maps.cidrs.iter() {
            let (k, v) = item.map_err(map_err("CIDRS"))?;
            let data = k.data();
            let plen = k.prefix_len() - sluice_common::CIDR_KEY_FIXED_BITS;
            let net = unmapped(data.addr, plen);
            out.entry(data.ep_id)
                .or_default()
                .cidrs
                .insert((data.dir, net), v.group);
        }
        for item in self.dp.maps.endpoints.iter() {
            let (_, info) = item.map_err(map_err("ENDPOINTS"))?;
            let c = out.entry(info.ep_id).or_default();
            c.isolation = info.flags
                & (sluice_common::EP_INGRESS_ISOLATED | sluice_common::EP_EGRESS_ISOLATED);
        }
        Ok(out)
    }

    pub fn add_endpoint(&mut self, spec: EndpointSpec) -> Result<u32> {
        if spec.host_ifindex == 0 || spec.host_ifname.is_empty() || spec.host_ifname.len() > 15 {
            return Err(NodeError::InvalidEndpoint(format!(
                "host interface {:?} index {}",
                spec.host_ifname, spec.host_ifindex
            )));
        }
        if spec.ipv4.is_none() && spec.ipv6.is_none() {
            return Err(NodeError::InvalidEndpoint("no address".into()));
        }
        if !interface_is(&spec.host_ifname, spec.host_ifindex) {
            return Err(NodeError::InvalidEndpoint(format!(
                "no interface {} with index {} in the agent's namespace",
                spec.host_ifname, spec.host_ifindex
            )));
        }
        if let Some(old) = self.registry.get(&spec.attachment).cloned() {
            if old.spec == spec {
                // A retried ADD: make sure it is complete, then answer again.
                self.dp.attach(&spec.host_ifname)?;
                return Ok(old.ep_id);
            }
            self.forget(&old)?;
        }
        let pod = crate::cluster::pod_ref_of(&spec);
        let identity = match (&self.cluster, &pod) {
            (None, _) => None,
            (Some(c), _) if !c.is_synced() => {
                return Err(NodeError::NotReady(
                    "the cluster has not been listed yet".into(),
                ));
            }
            (Some(c), Some(pod)) => Some(c.compiler.identity_of(pod).ok_or_else(|| {
                NodeError::NotReady(format!("pod {pod} is not known to the agent yet"))
            })?),
            (Some(_), None) => {
                return Err(NodeError::InvalidEndpoint(
                    "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME".into(),
                ));
            }
        };
        let ep_id = self.registry.allocate_ep_id()?;
        let ep = Endpoint {
            ep_id,
            identity: identity.unwrap_or(STANDALONE_IDENTITY_BASE + ep_id),
            spec,
        };
        if let Err(e) = self
            .program_endpoint(&ep)
            .and_then(|()| self.program_cluster_policy(&ep))
        {
            // Leave nothing half-made: the CNI plugin rolls its side back too.
            if let Err(undo) = self.forget(&ep) {
                warn!(error = %undo, ep_id, "rollback of a failed endpoint add");
            }
            return Err(e);
        }
        // In cluster mode `program_cluster_policy` has written the record
        // already; writing the same file again would only cost time.
        if self.registry.get(&ep.spec.attachment) != Some(&ep) {
            self.registry.insert(ep.clone())?;
        }
        info!(container_id = %ep.spec.attachment.container_id, ifname = %ep.spec.host_ifname,
            ep_id, ipv4 = ?ep.spec.ipv4, ipv6 = ?ep.spec.ipv6, "endpoint added");
        Ok(ep_id)
    }

    /// In cluster mode: the new endpoint's policy from its labels, and its
    /// addresses into the compiler, before ADD returns.
    fn program_cluster_policy(&mut self, ep: &Endpoint) -> Result<()> {
        let Some(pod) = crate::cluster::pod_ref_of(&ep.spec) else {
            return Ok(());
        };
        if self.cluster.is_none() {
            return Ok(());
        }
        // The registry must know the endpoint for `program` to find it.
        self.registry.insert(ep.clone())?;
        let ips = spec_ips(&ep.spec);
        self.learn_cni_ips(&pod, ips)?;
        self.program_pods(&[pod])
    }

    /// Updates an endpoint's identity in the registry and the maps.
    pub fn set_identity(&mut self, ep: &Endpoint, identity: u32) -> Result<()> {
        if ep.identity == identity {
            return Ok(());
        }
        let mut updated = ep.clone();
        updated.identity = identity;
        self.registry.insert(updated)?;
        if let Ok(mut info) = self.dp.maps.endpoints.get(&ep.spec.host_ifindex, 0)
            && info.ep_id == ep.ep_id
        {
            info.identity = identity;
            self.dp
                .maps
                .endpoints
                .insert(&ep.spec.host_ifindex, &info, 0)
                .map_err(map_err("ENDPOINTS"))?;
        }
        for ip in spec_ips(&ep.spec) {
            let v = IpcacheValue {
                identity,
                ep_id: ep.ep_id,
            };
            self.dp
                .maps
                .ipcache
                .insert(&ipcache_key(host_net(ip)), &v, 0)
                .map_err(map_err("IPCACHE"))?;
        }
        Ok(())
    }

    fn program_endpoint(&mut self, ep: &Endpoint) -> Result<()> {
        let s = &ep.spec;
        let compiled = self.policies.entry(ep.ep_id).or_default().clone();
        let info = EndpointInfo {
            ep_id: ep.ep_id,
            flags: compiled.isolation
                | if s.ipv4.is_some() { EP_HAS_IPV4 } else { 0 }
                | if s.ipv6.is_some() { EP_HAS_IPV6 } else { 0 },
            identity: ep.identity,
            ipv4: s.ipv4.map(|a| a.octets()).unwrap_or_default(),
            ipv6: s.ipv6.map(|a| a.octets()).unwrap_or_default(),
            port_plens: compiled.port_plens,
        };
        for ip in spec_ips(s) {
            self.dp
                .maps
                .ipcache
                .insert(
                    &ipcache_key(host_net(ip)),
                    &IpcacheValue {
                        identity: ep.identity,
                        ep_id: ep.ep_id,
                    },
                    0,
                )
                .map_err(map_err("IPCACHE"))?;
        }
        // EP_BY_ID before ENDPOINTS: the endpoint can send nothing until
        // its ENDPOINTS entry exists, and its deferred flows need both.
        self.dp
            .maps
            .ep_by_id
            .insert(&ep.ep_id, &s.host_ifindex, 0)
            .map_err(map_err("EP_BY_ID"))?;
        self.dp
            .maps
            .endpoints
            .insert(&s.host_ifindex, &info, 0)
            .map_err(map_err("ENDPOINTS"))?;
        self.dp.attach(&s.host_ifname)?;
        Ok(())
    }

    /// Removes everything of `ep` from the kernel; missing pieces are fine.
    fn unprogram_endpoint(&mut self, ep: &Endpoint) -> Result<()> {
        let s = &ep.spec;
        self.dp.detach(&s.host_ifname)?;
        if let Ok(info) = self.dp.maps.endpoints.get(&s.host_ifindex, 0)
            && info.ep_id == ep.ep_id
        {
            ignore_missing(self.dp.maps.endpoints.remove(&s.host_ifindex))
                .map_err(map_err("ENDPOINTS"))?;
        }
        // Endpoint ids are never reused: this entry is only ever ep's.
        ignore_missing(self.dp.maps.ep_by_id.remove(&ep.ep_id)).map_err(map_err("EP_BY_ID"))?;
        for ip in spec_ips(s) {
            let key = ipcache_key(host_net(ip));
            if let Ok(v) = self.dp.maps.ipcache.get(&key, 0)
                && v.ep_id == ep.ep_id
            {
                ignore_missing(self.dp.maps.ipcache.remove(&key)).map_err(map_err("IPCACHE"))?;
            }
        }
        if let Some(old) = self.policies.remove(&ep.ep_id) {
            self.write_diff(ep.ep_id, &old, &Compiled::default())?;
        }
        Ok(())
    }

    fn forget(&mut self, ep: &Endpoint) -> Result<()> {
        self.unprogram_endpoint(ep)?;
        self.registry.remove(&ep.spec.attachment)?;
        Ok(())
    }

    pub fn del_endpoint(&mut self, a: &Attachment) -> Result<()> {
        // Unknown is fine: DEL is idempotent and may come twice.
        if let Some(ep) = self.registry.get(a).cloned() {
            self.forget(&ep)?;
            info!(container_id = %a.container_id, ifname = %a.ifname, ep_id = ep.ep_id, "endpoint deleted");
        }
        Ok(())
    }

    pub fn check_endpoint(&self, a: &Attachment) -> Result<u32> {
        let ep = self
            .registry
            .get(a)
            .ok_or_else(|| NodeError::UnknownEndpoint(a.container_id.clone(), a.ifname.clone()))?;
        let s = &ep.spec;
        if !interface_is(&s.host_ifname, s.host_ifindex) {
            return Err(NodeError::Drift(format!(
                "host interface {} is gone",
                s.host_ifname
            )));
        }
        match self.dp.maps.endpoints.get(&s.host_ifindex, 0) {
            Ok(info) if info.ep_id == ep.ep_id => {}
            _ => {
                return Err(NodeError::Drift(
                    "endpoint missing from the ENDPOINTS map".into(),
                ));
            }
        }
        if !self.dp.is_attached(&s.host_ifname) {
            return Err(NodeError::Drift("programs are not attached".into()));
        }
        Ok(ep.ep_id)
    }

    pub fn gc(&mut self, valid: &[Attachment]) -> Result<usize> {
        let stale: Vec<Endpoint> = self
            .registry
            .all()
            .filter(|e| !valid.contains(&e.spec.attachment))
            .cloned()
            .collect();
        for ep in &stale {
            self.forget(ep)?;
        }
        Ok(stale.len())
    }

    /// Replaces the policy of an endpoint. The diff is written so that the
    /// endpoint is never less enforced than the old or the new policy:
    /// new entries first, then the endpoint's flags and prefix-length mask
    /// widened to cover both, then stale entries removed, then the mask
    /// narrowed to the new policy.
    pub fn set_policy(&mut self, a: &Attachment, policy: &EndpointPolicy) -> Result<()> {
        let ep =
            self.registry.get(a).cloned().ok_or_else(|| {
                NodeError::UnknownEndpoint(a.container_id.clone(), a.ifname.clone())
            })?;
        let new = policy.compile(ep.ep_id).map_err(NodeError::InvalidPolicy)?;
        let old = self.policies.get(&ep.ep_id).cloned().unwrap_or_default();
        let entries = new.entries.len() + new.cidrs.len();
        if entries > self.max_entries_per_endpoint {
            self.fail_closed(&ep, &old, &Compiled::default())?;
            return Err(NodeError::Capacity {
                ep_id: ep.ep_id,
                entries,
                limit: self.max_entries_per_endpoint,
            });
        }
        if let Err(e) = self.write_additions(ep.ep_id, &old, &new) {
            // The map is full (or failing): what is in it now is neither
            // policy, so this endpoint drops everything until a later
            // policy fits.
            self.fail_closed(&ep, &old, &new)?;
            return Err(e);
        }
        let widened = [
            old.port_plens[0] | new.port_plens[0],
            old.port_plens[1] | new.port_plens[1],
        ];
        self.write_endpoint_info(&ep, new.isolation, widened, false)?;
        self.write_diff(ep.ep_id, &old, &new)?;
        self.write_endpoint_info(&ep, new.isolation, new.port_plens, false)?;
        info!(container_id = %a.container_id, ep_id = ep.ep_id, entries = new.entries.len(),
            cidrs = new.cidrs.len(), isolation = new.isolation, "policy programmed");
        self.policies.insert(ep.ep_id, new);
        Ok(())
    }

    /// Sets EP_FAIL_CLOSED first, then removes every entry of `old` and
    /// `attempted`: the endpoint drops all IP traffic, nothing it had is left.
    fn fail_closed(&mut self, ep: &Endpoint, old: &Compiled, attempted: &Compiled) -> Result<()> {
        warn!(ep_id = ep.ep_id, container_id = %ep.spec.attachment.container_id, "endpoint fails closed: its policy does not fit");
        self.metrics.endpoint_failed_closed();
        let isolation = sluice_common::EP_INGRESS_ISOLATED | sluice_common::EP_EGRESS_ISOLATED;
        self.write_endpoint_info(ep, isolation, [0, 0], true)?;
        let mut both = old.clone();
        both.entries
            .extend(attempted.entries.iter().map(|(k, v)| (*k, *v)));
        both.cidrs
            .extend(attempted.cidrs.iter().map(|(k, v)| (*k, *v)));
        self.write_diff(ep.ep_id, &both, &Compiled::default())?;
        self.policies.insert(
            ep.ep_id,
            Compiled {
                isolation,
                ..Compiled::default()
            },
        );
        Ok(())
    }

    fn write_endpoint_info(
        &mut self,
        ep: &Endpoint,
        isolation: u32,
        plens: [u32; 2],
        fail_closed: bool,
    ) -> Result<()> {
        let ifindex = ep.spec.host_ifindex;
        let mut info = self
            .dp
            .maps
            .endpoints
            .get(&ifindex, 0)
            .map_err(map_err("ENDPOINTS"))?;
        let managed = sluice_common::EP_INGRESS_ISOLATED
            | sluice_common::EP_EGRESS_ISOLATED
            | sluice_common::EP_FAIL_CLOSED;
        info.flags = (info.flags & !managed)
            | isolation
            | if fail_closed {
                sluice_common::EP_FAIL_CLOSED
            } else {
                0
            };
        info.port_plens = plens;
        self.dp
            .maps
            .endpoints
            .insert(&ifindex, &info, 0)
            .map_err(map_err("ENDPOINTS"))
    }

    fn write_additions(&mut self, ep_id: u32, old: &Compiled, new: &Compiled) -> Result<()> {
        for (k, v) in &new.entries {
            if old.entries.get(k) != Some(v) {
                self.dp
                    .maps
                    .policy
                    .insert(k, v, 0)
                    .map_err(map_err("POLICY"))?;
            }
        }
        for ((dir, net), group) in &new.cidrs {
            if old.cidrs.get(&(*dir, *net)) != Some(group) {
                let key = cidr_key(ep_id, *dir, *net);
                self.dp
                    .maps
                    .cidrs
                    .insert(&key, &sluice_common::CidrValue { group: *group }, 0)
                    .map_err(map_err("CIDRS"))?;
            }
        }
        Ok(())
    }

    /// Removes what `old` has and `new` does not.
    fn write_diff(&mut self, ep_id: u32, old: &Compiled, new: &Compiled) -> Result<()> {
        let stale: Vec<PolicyKey> = old
            .entries
            .keys()
            .filter(|k| !new.entries.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            ignore_missing(self.dp.maps.policy.remove(&k)).map_err(map_err("POLICY"))?;
        }
        for (dir, net) in old.cidrs.keys().filter(|k| !new.cidrs.contains_key(k)) {
            ignore_missing(self.dp.maps.cidrs.remove(&cidr_key(ep_id, *dir, *net)))
                .map_err(map_err("CIDRS"))?;
        }
        Ok(())
    }

    /// Namespace and name of the local pod with address `ip`, when known.
    pub fn pod_of(&self, ip: IpAddr) -> Option<(String, String)> {
        self.registry
            .all()
            .find(|e| spec_ips(&e.spec).contains(&ip))
            .and_then(|e| Some((e.spec.pod_namespace.clone()?, e.spec.pod_name.clone()?)))
    }

    /// Policy and CIDR entries programmed for an endpoint.
    pub fn entries_of(&self, ep_id: u32) -> usize {
        self.policies
            .get(&ep_id)
            .map_or(0, |c| c.entries.len() + c.cidrs.len())
    }

    pub fn set_policy_json(&mut self, a: &Attachment, policy: serde_json::Value) -> Result<()> {
        let p: EndpointPolicy = serde_json::from_value(policy).map_err(NodeError::PolicyDecode)?;
        self.set_policy(a, &p)
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The prefix a 16-byte (possibly IPv4-mapped) address and length stand for.
fn unmapped(addr: [u8; 16], plen: u32) -> IpNetwork {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if plen >= sluice_common::V4_MAPPED_PLEN_OFFSET => {
            let p = (plen - sluice_common::V4_MAPPED_PLEN_OFFSET) as u8;
            IpNetwork::new(IpAddr::V4(v4), p).unwrap_or(IpNetwork::V4(v4.into()))
        }
        _ => {
            IpNetwork::new(IpAddr::V6(v6), plen.min(128) as u8).unwrap_or(IpNetwork::V6(v6.into()))
        }
    }
}
