//! From watched objects to the maps: feeds `k8s::Change`s to the compiler
//! and writes what it reports as changed (ipcache entries, endpoint
//! policies, identities), and keeps the Service addresses (SERVICES).
//! Nothing is written before Pods, Namespaces, NetworkPolicies and Services
//! have all been listed once: a half-synced view would mean wrong verdicts,
//! so until then the pinned state stays as it was.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, PodIP, PodStatus, Service};
use kube::{Resource as _, ResourceExt as _};
use sluice_common::IpcacheValue;
use tracing::{info, warn};

use crate::{
    compiler::{self, Changes, Compiler, Diagnostic, EndpointChange, Locality, ObjectRef},
    datapath::ipcache_key,
    k8s::{Change, Kind, Object, object_ref},
    metrics,
    node::{Node, NodeError, Result},
};

/// The cluster as this node's agent knows it.
pub struct Cluster {
    pub compiler: Compiler,
    synced: BTreeSet<Kind>,
    /// Keys (`Kind/ns/name`) of the objects seen, per kind, to find what a
    /// re-list no longer has.
    known: BTreeMap<Kind, BTreeMap<String, Object>>,
    /// Object key -> resourceVersion whose effect is in the maps.
    pub programmed: BTreeMap<String, String>,
    /// This node's pod CIDRs (from its Node object).
    pub pod_cidrs: Vec<String>,
    node_name: String,
    /// Other nodes: name -> (pod CIDRs, InternalIP addresses).
    pub peers: BTreeMap<String, (Vec<String>, Vec<IpAddr>)>,
    /// Addresses the CNI gave local pods, for pods whose status does not
    /// show them yet (kubelet reports them only after ADD returns).
    cni_ips: BTreeMap<ObjectRef, Vec<IpAddr>>,
    /// Service key (`Service/ns/name`) -> its ClusterIPs.
    services: BTreeMap<String, Vec<IpAddr>>,
    pub metrics: metrics::Metrics,
    /// Object key -> the problems last reported for it as an Event.
    reported: BTreeMap<String, BTreeSet<String>>,
    /// Events to post (taken by the caller, which owns the API client).
    pub notices: Vec<Notice>,
}

/// A Warning Event about an object the compiler could not use as written
/// (the rule concerned denies).
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub regarding: ObjectReference,
    pub note: String,
}

/// The most an Event's note may hold (the API allows 1 kB).
const NOTE_MAX: usize = 1000;

/// The ClusterIPs of a Service: `spec.clusterIPs` (else `spec.clusterIP`),
/// without "None" (headless) and anything that is not an address.
pub fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let listed = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    let mut out: Vec<IpAddr> = listed
        .iter()
        .filter_map(|ip| ip.trim().parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Cluster {
    pub fn new(node_name: &str, metrics: metrics::Metrics) -> Self {
        Self {
            compiler: Compiler::new(Locality::Node(node_name.to_owned())),
            synced: BTreeSet::new(),
            known: BTreeMap::new(),
            programmed: BTreeMap::new(),
            pod_cidrs: Vec::new(),
            node_name: node_name.to_owned(),
            peers: BTreeMap::new(),
            cni_ips: BTreeMap::new(),
            services: BTreeMap::new(),
            metrics,
            reported: BTreeMap::new(),
            notices: Vec::new(),
        }
    }

    /// Queues a Notice for each object of this node's concern (below) whose
    /// problems differ from those last reported; objects in `fed` (applied
    /// or deleted in this batch) without problems now are forgotten, so a
    /// problem that comes back is reported again.
    fn note_diagnostics(&mut self, out: &Changes, fed: &[((String, String), bool)]) {
        let mut now: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        // Every node sees every object: each reports only what concerns its
        // own pods, so a bad policy makes one Event per node it affects, not
        // one per node of the cluster.
        let concerns_this_node = |d: &&Diagnostic| match d.kind {
            compiler::Kind::NetworkPolicy => self.compiler.selects_local(&d.object),
            compiler::Kind::Pod => self.compiler.is_local(&d.object),
            compiler::Kind::Namespace => true,
        };
        // When local endpoints changed, a policy compiled earlier (and then
        // of no concern here) may now select one of them: its stored
        // problems count too, unless already reported.
        let earlier = if out.endpoints.is_empty() {
            Vec::new()
        } else {
            self.compiler.diagnostics()
        };
        let unreported = |d: &&Diagnostic| !self.reported.contains_key(&diagnostic_key(d));
        let earlier = earlier.iter().filter(unreported);
        for d in out
            .diagnostics
            .iter()
            .chain(earlier)
            .filter(concerns_this_node)
        {
            now.entry(diagnostic_key(d))
                .or_default()
                .insert(d.reason.clone());
        }
        for ((key, _rv), _deleted) in fed {
            if !now.contains_key(key) {
                self.reported.remove(key);
            }
        }
        for (key, reasons) in now {
            if self.reported.get(&key) == Some(&reasons) {
                continue;
            }
            let Some(regarding) = self.reference(&key) else {
                continue;
            };
            let mut note = reasons.iter().cloned().collect::<Vec<_>>().join("; ");
            if note.len() > NOTE_MAX {
                let mut end = NOTE_MAX;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            self.notices.push(Notice { regarding, note });
            self.reported.insert(key, reasons);
        }
    }

    /// The reference of a known object, by key (`Kind/ns/name`).
    fn reference(&self, key: &str) -> Option<ObjectReference> {
        let kind = key.split('/').next()?;
        let o = self.known.values().find_map(|m| m.get(key))?;
        let r = match o {
            Object::Pod(p) => p.object_ref(&()),
            Object::Namespace(n) => n.object_ref(&()),
            Object::NetworkPolicy(p) => p.object_ref(&()),
            Object::Node(n) => n.object_ref(&()),
            Object::Service(s) => s.object_ref(&()),
        };
        (r.kind.as_deref() == Some(kind)).then_some(r)
    }

    /// Pods, Namespaces, NetworkPolicies and Services have each been listed.
    pub fn is_synced(&self) -> bool {
        [
            Kind::Pod,
            Kind::Namespace,
            Kind::NetworkPolicy,
            Kind::Service,
        ]
        .iter()
        .all(|k| self.synced.contains(k))
    }

    /// Every ClusterIP of every Service known.
    pub fn service_ips(&self) -> BTreeSet<IpAddr> {
        self.services.values().flatten().copied().collect()
    }

    /// Routes to other nodes' pod CIDRs: (CIDR, gateway) where the gateway is
    /// that node's InternalIP of the same family.
    pub fn peer_routes(&self) -> BTreeSet<(ipnetwork::IpNetwork, IpAddr)> {
        let mut out = BTreeSet::new();
        for (cidrs, ips) in self.peers.values() {
            for c in cidrs {
                let Ok(net) = c.parse::<ipnetwork::IpNetwork>() else {
                    continue;
                };
                if let Some(gw) = ips.iter().find(|ip| ip.is_ipv4() == net.is_ipv4()) {
                    out.insert((net, *gw));
                }
            }
        }
        out
    }

    pub fn knows_pod(&self, pod: &ObjectRef) -> bool {
        self.compiler.identity_of(pod).is_some()
    }

    /// A pod with the addresses the CNI gave it filled in when its status
    /// has none yet.
    fn with_cni_ips(&self, pod: &Pod) -> Pod {
        let obj = ObjectRef::new(pod.namespace().unwrap_or_default(), pod.name_any());
        let has_ips = pod.status.as_ref().is_some_and(|s| {
            s.pod_ips.as_ref().is_some_and(|v| !v.is_empty()) || s.pod_ip.is_some()
        });
        match self.cni_ips.get(&obj) {
            Some(ips) if !has_ips => {
                let mut p = pod.clone();
                let status = p.status.get_or_insert_with(PodStatus::default);
                status.pod_ip = ips.first().map(ToString::to_string);
                status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
                p
            }
            _ => pod.clone(),
        }
    }

    fn feed(&mut self, o: &Object, deleted: bool) -> Changes {
        match (o, deleted) {
            (Object::Pod(p), false) => {
                let p = self.with_cni_ips(p);
                self.compiler.upsert_pod(&p)
            }
            (Object::Pod(p), true) => self
                .compiler
                .delete_pod(&p.namespace().unwrap_or_default(), &p.name_any()),
            (Object::Namespace(n), false) => self.compiler.upsert_namespace(n),
            (Object::Namespace(n), true) => self.compiler.delete_namespace(&n.name_any()),
            (Object::NetworkPolicy(p), false) => self.compiler.upsert_policy(p),
            (Object::NetworkPolicy(p), true) => self
                .compiler
                .delete_policy(&p.namespace().unwrap_or_default(), &p.name_any()),
            (Object::Node(n), false) => {
                let cidrs = n
                    .spec
                    .as_ref()
                    .and_then(|s| {
                        s.pod_cidrs
                            .clone()
                            .or_else(|| s.pod_cidr.clone().map(|c| vec![c]))
                    })
                    .unwrap_or_default();
                if n.name_any() == self.node_name {
                    self.pod_cidrs = cidrs;
                } else {
                    let ips = n
                        .status
                        .as_ref()
                        .and_then(|s| s.addresses.as_ref())
                        .into_iter()
                        .flatten()
                        .filter(|a| a.type_ == "InternalIP")
                        .filter_map(|a| a.address.parse().ok())
                        .collect();
                    self.peers.insert(n.name_any(), (cidrs, ips));
                }
                Changes::default()
            }
            (Object::Node(n), true) => {
                self.peers.remove(&n.name_any());
                Changes::default()
            }
            (Object::Service(svc), false) => {
                self.services.insert(object_ref(o).0, cluster_ips(svc));
                Changes::default()
            }
            (Object::Service(_), true) => {
                self.services.remove(&object_ref(o).0);
                Changes::default()
            }
        }
    }

    /// Applies one change to the compiler; returns what to program.
    fn apply(&mut self, change: Change) -> Changes {
        let mut out = Changes::default();
        match change {
            Change::Applied(o) => {
                let (key, _) = object_ref(&o);
                out.merge(self.feed(&o, false));
                self.known.entry(o.kind()).or_default().insert(key, o);
            }
            Change::Deleted(o) => {
                let (key, _) = object_ref(&o);
                out.merge(self.feed(&o, true));
                self.known.entry(o.kind()).or_default().remove(&key);
            }
            Change::Resync(kind, objects) => {
                let listed: BTreeMap<String, Object> =
                    objects.into_iter().map(|o| (object_ref(&o).0, o)).collect();
                let gone: Vec<Object> = self
                    .known
                    .get(&kind)
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| !listed.contains_key(*k))
                            .map(|(_, o)| o.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for o in &gone {
                    out.merge(self.feed(o, true));
                }
                for o in listed.values() {
                    out.merge(self.feed(o, false));
                }
                self.known.insert(kind, listed);
                self.synced.insert(kind);
            }
        }
        out
    }
}

impl Node {
    /// Applies watched changes and, once synced, programs their effect.
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> Result<()> {
        let started = Instant::now();
        let Some(cluster) = self.cluster.as_mut() else {
            return Ok(());
        };
        let was_synced = cluster.is_synced();
        let mut out = Changes::default();
        let mut versions = Vec::new();
        for c in changes {
            match &c {
                Change::Applied(o) => versions.push((object_ref(o), false)),
                Change::Deleted(o) => versions.push((object_ref(o), true)),
                Change::Resync(_, objs) => {
                    versions.extend(objs.iter().map(|o| (object_ref(o), false)));
                }
            }
            out.merge(cluster.apply(c));
        }
        let compile = started.elapsed();
        if !cluster.is_synced() {
            return Ok(());
        }
        if !was_synced {
            info!(stats = ?cluster.compiler.stats(), "cluster listed; programming every endpoint");
            // Everything listed so far takes effect in this pass, including
            // kinds listed in earlier batches.
            versions = cluster
                .known
                .values()
                .flat_map(|m| m.values().map(|o| (object_ref(o), false)))
                .collect();
            out.merge(cluster.compiler.recompute_all());
            out.ipcache.extend(
                cluster
                    .compiler
                    .ipcache()
                    .into_iter()
                    .map(|(ip, id)| (ip, Some(id))),
            );
            let mut all: BTreeSet<ObjectRef> = cluster.compiler.endpoints().cloned().collect();
            all.extend(self.registry.all().filter_map(pod_ref));
            out.endpoints
                .extend(all.into_iter().map(|o| (o, EndpointChange::Replace)));
        }
        for d in &out.diagnostics {
            warn!(object = %d.object, kind = ?d.kind, reason = %d.reason, "policy input not usable as written: the rule concerned denies");
        }
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.note_diagnostics(&out, &versions);
        }
        self.program(&out)?;
        if let Some(ips) = self.cluster.as_ref().map(Cluster::service_ips) {
            self.set_service_ips(&ips)?;
        }
        if let Some(cluster) = self.cluster.as_mut() {
            for ((key, rv), deleted) in versions {
                if deleted {
                    cluster.programmed.remove(&key);
                } else {
                    cluster.programmed.insert(key, rv);
                }
            }
            // Objects a re-list no longer has are gone from the maps too.
            let known = &cluster.known;
            cluster
                .programmed
                .retain(|key, _| known.values().any(|m| m.contains_key(key)));
            cluster.metrics.observe_compile(compile);
            cluster
                .metrics
                .observe_apply_to_programmed(started.elapsed());
        }
        Ok(())
    }

    /// Programs the current policy of these pods' endpoints.
    pub fn program_pods(&mut self, pods: &[ObjectRef]) -> Result<()> {
        let out = Changes {
            endpoints: pods
                .iter()
                .map(|p| (p.clone(), EndpointChange::Replace))
                .collect(),
            ..Changes::default()
        };
        self.program(&out)
    }

    /// Writes ipcache changes and the policies of the changed endpoints.
    fn program(&mut self, out: &Changes) -> Result<()> {
        for (ip, id) in &out.ipcache {
            let local_ep = self.registry.all().find(|e| {
                e.spec.ipv4.map(IpAddr::V4) == Some(*ip) || e.spec.ipv6.map(IpAddr::V6) == Some(*ip)
            });
            let key = ipcache_key((*ip).into());
            match id {
                Some(identity) => {
                    let v = IpcacheValue {
                        identity: *identity,
                        ep_id: local_ep.map_or(0, |e| e.ep_id),
                    };
                    self.dp
                        .maps
                        .ipcache
                        .insert(&key, &v, 0)
                        .map_err(|source| NodeError::Map {
                            name: "IPCACHE",
                            source,
                        })?;
                }
                None if local_ep.is_none() => {
                    if let Err(e) = self.dp.maps.ipcache.remove(&key) {
                        tracing::debug!(%ip, error = %e, "ipcache entry already gone");
                    }
                }
                // A local endpoint keeps its entry until CNI DEL.
                None => {}
            }
        }
        // Every change is written as a replacement: `set_policy` diffs the
        // new entries against what is in the maps, so only what differs is
        // written either way.
        for obj in out.endpoints.keys() {
            let Some(ep) = self
                .registry
                .all()
                .find(|e| pod_ref(e).as_ref() == Some(obj))
                .cloned()
            else {
                continue; // not wired on this node (yet)
            };
            let Some(cluster) = self.cluster.as_ref() else {
                return Ok(());
            };
            let Some(policy) = cluster.compiler.endpoint_policy(obj) else {
                continue; // the pod is gone from the API; CNI DEL will follow
            };
            let identity = cluster.compiler.identity_of(obj);
            if let Some(id) = identity {
                self.set_identity(&ep, id)?;
            }
            match self.set_policy(&ep.spec.attachment, &policy) {
                Ok(()) => {}
                Err(e @ NodeError::Capacity { .. }) => {
                    warn!(pod = %obj, error = %e, "endpoint over capacity: fails closed");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Tells the compiler the addresses the CNI gave a local pod, so that
    /// its identity is in the ipcache before kubelet reports them.
    pub fn learn_cni_ips(&mut self, pod: &ObjectRef, ips: Vec<IpAddr>) -> Result<()> {
        let Some(cluster) = self.cluster.as_mut() else {
            return Ok(());
        };
        cluster.cni_ips.insert(pod.clone(), ips);
        let key = format!("Pod/{}/{}", pod.namespace, pod.name);
        let Some(o) = cluster
            .known
            .get(&Kind::Pod)
            .and_then(|m| m.get(&key))
            .cloned()
        else {
            return Ok(());
        };
        let out = cluster.apply(Change::Applied(o));
        if cluster.is_synced() {
            self.program(&out)?;
        }
        Ok(())
    }

    /// A pod fetched from the API because the watch has not delivered it yet.
    pub fn learn_pod(&mut self, pod: Pod) -> Result<()> {
        self.apply_changes(vec![Change::Applied(Object::Pod(Box::new(pod)))])
    }
}

/// The pod an endpoint belongs to, when the runtime said (CNI_ARGS).
/// The key (`Kind/ns/name`, as `k8s::object_ref`) of a diagnostic's object.
fn diagnostic_key(d: &Diagnostic) -> String {
    let kind = match d.kind {
        compiler::Kind::Namespace => Kind::Namespace,
        compiler::Kind::Pod => Kind::Pod,
        compiler::Kind::NetworkPolicy => Kind::NetworkPolicy,
    };
    if d.object.namespace.is_empty() {
        format!("{}/{}", kind.name(), d.object.name)
    } else {
        format!("{}/{}/{}", kind.name(), d.object.namespace, d.object.name)
    }
}

pub fn pod_ref(e: &crate::registry::Endpoint) -> Option<ObjectRef> {
    pod_ref_of(&e.spec)
}

pub fn pod_ref_of(s: &sluice_proto::EndpointSpec) -> Option<ObjectRef> {
    Some(ObjectRef::new(
        s.pod_namespace.clone()?,
        s.pod_name.clone()?,
    ))
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    use super::*;

    fn pod(ns: &str, node: &str) -> Object {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("a-{node}"), "namespace": ns, "labels": {"pod": "a"}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"podIPs": [{"ip": if node == "n1" { "10.0.0.1" } else { "10.0.0.2" }}]}
        }))
        .unwrap();
        Object::Pod(Box::new(pod))
    }

    fn policy(operator: &str) -> Object {
        policy_in("x", operator)
    }

    fn policy_in(ns: &str, operator: &str) -> Object {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": ns, "uid": "u-1", "resourceVersion": "7"},
            "spec": {"podSelector": {},
                     "ingress": [{"from": [{"podSelector": {"matchExpressions":
                         [{"key": "pod", "operator": operator, "values": ["a"]}]}}]}]}
        }))
        .unwrap();
        Object::NetworkPolicy(Box::new(np))
    }

    /// Applies `o` and notes its diagnostics as the reconciler does.
    fn feed(c: &mut Cluster, o: Object) -> usize {
        let fed = [(object_ref(&o), false)];
        let out = c.apply(Change::Applied(o));
        c.note_diagnostics(&out, &fed);
        out.diagnostics.len()
    }

    #[test]
    fn an_invalid_policy_is_noticed_once_until_it_is_fixed_and_broken_again() {
        let mut c = Cluster::new("n1", metrics::Metrics::new());
        feed(&mut c, pod("x", "n1"));
        feed(&mut c, pod("y", "n2"));
        // Selecting no pod of this node: another node's concern.
        assert!(feed(&mut c, policy_in("y", "Bogus")) > 0);
        assert!(c.notices.is_empty());
        assert!(feed(&mut c, policy("Bogus")) > 0);
        let n = std::mem::take(&mut c.notices);
        assert_eq!(n.len(), 1);
        let r = &n[0].regarding;
        assert_eq!(r.kind.as_deref(), Some("NetworkPolicy"));
        assert_eq!(r.api_version.as_deref(), Some("networking.k8s.io/v1"));
        assert_eq!(r.namespace.as_deref(), Some("x"));
        assert_eq!(r.name.as_deref(), Some("p"));
        assert_eq!(r.uid.as_deref(), Some("u-1"));
        assert!(n[0].note.contains("Bogus"), "{}", n[0].note);
        // The same problem again (a re-list, an unrelated update): no repeat.
        feed(&mut c, policy("Bogus"));
        assert!(c.notices.is_empty());
        // Fixed, then broken again: noticed again.
        assert_eq!(feed(&mut c, policy("In")), 0);
        assert!(c.notices.is_empty());
        feed(&mut c, policy("Bogus"));
        assert_eq!(c.notices.len(), 1);
    }

    #[test]
    fn an_invalid_policy_is_noticed_when_a_pod_it_selects_arrives_on_this_node() {
        let mut c = Cluster::new("n1", metrics::Metrics::new());
        // No pod of this node in x yet: not this node's concern.
        assert!(feed(&mut c, policy("Bogus")) > 0);
        assert!(c.notices.is_empty());
        // A pod of another node: still not.
        feed(&mut c, pod("x", "n2"));
        assert!(c.notices.is_empty());
        // A local pod the policy selects: the policy's problem is reported
        // now, without the policy changing.
        feed(&mut c, pod("x", "n1"));
        let n = std::mem::take(&mut c.notices);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].regarding.name.as_deref(), Some("p"));
        assert!(n[0].note.contains("Bogus"), "{}", n[0].note);
        // Once only.
        feed(&mut c, pod("x", "n1"));
        assert!(c.notices.is_empty());
    }
}
