//! The Kubernetes side: the watches (`watch`), the objects known, the
//! policy compiler fed with them, and what the cluster says beyond policy
//! (this node's pod CIDRs, other nodes' routes, Service addresses). Writes
//! nothing itself: `apply` says what to program, the reconciler programs
//! it and reports back with `programmed`.
//!
//! Nothing is to be programmed before Pods, Namespaces, NetworkPolicies,
//! Services and ClusterNetworkPolicies have all been listed once (a cluster
//! without the ClusterNetworkPolicy CRD lists none, see `watch`): a
//! half-synced view would mean wrong verdicts, so until then the pinned
//! state stays as it was.
mod assert;
mod audit;
mod diagnostics;
mod explain;
mod known;
mod resync;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use kube::ResourceExt as _;
use tracing::{debug, info, warn};

pub use self::{
    assert::pick_address,
    diagnostics::{Notice, start_notices},
    watch::{Change, Object},
};
use crate::{
    model::{Identity, Kind, ObjKey, ObjectRef},
    policy::{
        Changes, Compiler, EndpointPolicy, Locality, Restored,
        audit::{AuditView, Enforcement, enforcement},
    },
};

/// What the reconciler must program after a batch of changes.
#[derive(Debug, Default)]
pub struct Programming {
    pub changes: Changes,
    /// The first pass after the initial sync: every address and every
    /// local endpoint is to be written, not only what changed.
    pub full: bool,
    /// The objects (and their resourceVersions) whose effect this is;
    /// `None` for a deletion.
    pub versions: Vec<(ObjKey, Option<String>)>,
}

/// Another node: where its pods are and how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Peer {
    pod_cidrs: Vec<String>,
    internal_ips: Vec<IpAddr>,
}

/// Another node as routing sees it (`reconcile/network.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    pub pod_cidrs: Vec<IpNetwork>,
    pub internal_ips: Vec<IpAddr>,
}

/// The cluster as this node's agent knows it.
pub struct Cluster {
    compiler: Compiler,
    /// ClusterNetworkPolicy rule names for drop events and metrics,
    /// published when the compiler's policies change (`cnp_generation`).
    rule_names: tokio::sync::watch::Sender<std::sync::Arc<crate::events::RuleNames>>,
    rule_names_generation: (u64, (u32, usize)),
    /// The NetworkPolicies isolating each local endpoint, for default-deny
    /// drop events; published when they may have changed (`np_generation`,
    /// or endpoints rewritten).
    isolators: tokio::sync::watch::Sender<std::sync::Arc<crate::events::Isolators>>,
    isolators_generation: u64,
    node_name: String,
    synced: BTreeSet<Kind>,
    /// Every object seen, to find what a re-list no longer has.
    known: known::Known,
    /// Object -> resourceVersion whose effect is in the maps.
    programmed: BTreeMap<ObjKey, String>,
    /// This node's pod CIDRs (from its Node object).
    pod_cidrs: Vec<String>,
    /// This node's InternalIPs (from its Node object).
    own_ips: Vec<IpAddr>,
    peers: BTreeMap<String, Peer>,
    /// Addresses the CNI gave local pods, for pods whose status does not
    /// show them yet (kubelet reports them only after ADD returns).
    cni_ips: resync::CniIps,
    /// Service -> its ClusterIPs.
    services: BTreeMap<ObjKey, Vec<IpAddr>>,
    diagnostics: diagnostics::Diagnostics,
    /// The first full pass is in the maps.
    first_programmed: bool,
    /// A re-list since the last pass: `programmed` then forgets what
    /// `known` no longer has (a walk of every object, so only then).
    relisted: bool,
    /// Audit-mode policies compiled as if enforced, shared with the event
    /// loop (`policy::audit`); `compiler` never sees them.
    audit: std::sync::Arc<AuditView>,
}

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

fn node_pod_cidrs(n: &Node) -> Vec<String> {
    n.spec
        .as_ref()
        .and_then(|s| {
            s.pod_cidrs
                .clone()
                .or_else(|| s.pod_cidr.clone().map(|c| vec![c]))
        })
        .unwrap_or_default()
}

fn internal_ips(n: &Node) -> Vec<IpAddr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

impl Cluster {
    pub fn new(node_name: &str) -> Self {
        Self {
            compiler: Compiler::new(Locality::Node(node_name.to_owned())),
            rule_names: tokio::sync::watch::Sender::new(std::sync::Arc::default()),
            rule_names_generation: (0, (0, 0)),
            isolators: tokio::sync::watch::Sender::new(std::sync::Arc::default()),
            isolators_generation: 0,
            node_name: node_name.to_owned(),
            synced: BTreeSet::new(),
            known: known::Known::default(),
            programmed: BTreeMap::new(),
            pod_cidrs: Vec::new(),
            own_ips: Vec::new(),
            peers: BTreeMap::new(),
            cni_ips: resync::CniIps::new(node_name),
            services: BTreeMap::new(),
            diagnostics: diagnostics::Diagnostics::default(),
            first_programmed: false,
            audit: std::sync::Arc::default(),
            relisted: false,
        }
    }

    /// The audit view, for judging forwarded flows.
    pub fn audit_view(&self) -> std::sync::Arc<AuditView> {
        self.audit.clone()
    }

    /// The names of ClusterNetworkPolicy rule ids, kept current.
    pub fn rule_names(
        &self,
    ) -> tokio::sync::watch::Receiver<std::sync::Arc<crate::events::RuleNames>> {
        self.rule_names.subscribe()
    }

    fn publish_rule_names(&mut self) {
        let generation = (
            self.compiler.cnp_generation(),
            self.compiler.np_rule_generation(),
        );
        if generation == self.rule_names_generation {
            return;
        }
        self.rule_names_generation = generation;
        let names = crate::events::RuleNames::from_origins(self.compiler.cnp_rule_origins())
            .with_network_policies(self.compiler.np_rule_origins());
        self.rule_names.send_replace(std::sync::Arc::new(names));
    }

    /// The NetworkPolicies isolating each local endpoint, kept current.
    pub fn isolators(
        &self,
    ) -> tokio::sync::watch::Receiver<std::sync::Arc<crate::events::Isolators>> {
        self.isolators.subscribe()
    }

    /// Publishes the isolating policies again if a policy or what it
    /// selects changed, or some local endpoint (new, gone, relabelled) did.
    fn publish_isolators(&mut self, changes: &Changes) {
        let generation = self.compiler.np_generation();
        if generation == self.isolators_generation && changes.endpoints.is_empty() {
            return;
        }
        self.isolators_generation = generation;
        let isolators = crate::events::Isolators::new(self.compiler.isolators());
        self.isolators.send_replace(std::sync::Arc::new(isolators));
    }

    /// The Node this agent serves.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Pods, Namespaces, NetworkPolicies, Services and
    /// ClusterNetworkPolicies have each been listed.
    pub fn is_synced(&self) -> bool {
        self.unlisted().is_empty()
    }

    /// The kinds of [`Self::is_synced`] not listed yet.
    pub fn unlisted(&self) -> Vec<Kind> {
        [
            Kind::Pod,
            Kind::Namespace,
            Kind::NetworkPolicy,
            Kind::Service,
            Kind::ClusterNetworkPolicy,
        ]
        .into_iter()
        .filter(|k| !self.synced.contains(k))
        .collect()
    }

    /// Applies a batch of watched changes; once synced, returns what to
    /// program (the caller reports back with [`Cluster::programmed`]).
    pub fn apply(&mut self, batch: Vec<Change>) -> Option<Programming> {
        let was_synced = self.is_synced();
        let mut out = Changes::default();
        let mut versions = Vec::new();
        let mut policies_changed = false; // which policies audit, below
        for change in batch {
            if let Change::Deleted(o) = &change
                && self.is_older_incarnation(o)
            {
                debug!(object = %o.key(), uid = ?o.uid(), "deletion of an older incarnation; the newer one stays");
                continue;
            }
            match &change {
                Change::Applied(o) => versions.push((o.key(), Some(o.resource_version()))),
                Change::Deleted(o) => versions.push((o.key(), None)),
                Change::Resync(_, objs) => {
                    versions.extend(objs.iter().map(|o| (o.key(), Some(o.resource_version()))));
                    self.relisted = true;
                }
            }
            policies_changed |= match &change {
                Change::Applied(o) | Change::Deleted(o) => {
                    matches!(
                        o.key().kind,
                        Kind::NetworkPolicy | Kind::ClusterNetworkPolicy
                    )
                }
                Change::Resync(..) => true,
            };
            if was_synced {
                out.merge(self.apply_one(change));
            } else {
                self.hold(change);
            }
        }
        if !was_synced && self.is_synced() {
            out.merge(self.feed_all());
        }
        if policies_changed {
            self.keep_audit_view();
        }
        self.publish_rule_names();
        self.publish_isolators(&out);
        if !self.is_synced() {
            return None;
        }
        let full = !was_synced;
        let fed: Vec<ObjKey> = versions.iter().map(|(k, _)| k.clone()).collect();
        // The first pass weighs every problem stored so far, as every
        // endpoint is then programmed.
        self.note_diagnostics(&out, full, &fed);
        if full {
            info!(stats = ?self.compiler.stats(), "cluster listed; programming every endpoint");
            // Everything listed so far takes effect in this pass, including
            // kinds listed in earlier batches.
            versions = self.known.versions().map(|(k, rv)| (k, Some(rv))).collect();
            out.ipcache.extend(
                self.compiler
                    .ipcache()
                    .into_iter()
                    .map(|(ip, id)| (ip, Some(id))),
            );
            out.endpoints.extend(self.compiler.endpoints().cloned());
        }
        for d in &out.diagnostics {
            warn!(object = %d.object, reason = %d.reason, "policy input not usable as written: the rule concerned denies");
        }
        Some(Programming {
            changes: out,
            full,
            versions,
        })
    }

    /// Records that the effect of `versions` is in the maps.
    pub fn programmed(&mut self, versions: Vec<(ObjKey, Option<String>)>) {
        self.first_programmed = true;
        for (key, rv) in versions {
            match rv {
                Some(rv) => {
                    self.programmed.insert(key, rv);
                }
                None => {
                    self.programmed.remove(&key);
                }
            }
        }
        // Objects a re-list no longer has are gone from the maps too.
        if std::mem::take(&mut self.relisted) {
            let known = &self.known;
            self.programmed.retain(|key, _| known.contains_key(key));
        }
    }

    /// Whether a programming pass has been recorded since the first list.
    pub fn programmed_any(&self) -> bool {
        self.first_programmed
    }

    /// `Kind/ns/name` -> resourceVersion in force, for `sluice wait`.
    pub fn programmed_versions(&self) -> BTreeMap<String, String> {
        self.programmed
            .iter()
            .map(|(k, rv)| (k.to_string(), rv.clone()))
            .collect()
    }

    /// `programmed_versions` of these keys only (unknown ones left out).
    pub fn programmed_versions_of(&self, keys: &[String]) -> BTreeMap<String, String> {
        keys.iter()
            .filter_map(|k| {
                let rv = self.programmed.get(&ObjKey::parse(k)?)?;
                Some((k.clone(), rv.clone()))
            })
            .collect()
    }

    fn note_diagnostics(&mut self, out: &Changes, all: bool, fed: &[ObjKey]) {
        let known = &self.known;
        self.diagnostics.note(
            &self.compiler,
            &out.diagnostics,
            all || !out.endpoints.is_empty(),
            fed,
            |key| reference(known, key),
        );
    }

    /// Warning Events to post.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        self.diagnostics.take_notices()
    }

    /// Every object known, as a `kind: List` of their JSON (`sluice lint
    /// --live`); one that does not serialize is left out.
    pub fn objects_list(&self) -> serde_json::Value {
        let items: Vec<serde_json::Value> = self.known.json().collect();
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    /// Every ClusterIP of every Service known.
    pub fn service_ips(&self) -> BTreeSet<IpAddr> {
        self.services.values().flatten().copied().collect()
    }

    /// This node's pod CIDRs, from its Node object.
    pub fn pod_cidrs(&self) -> &[String] {
        &self.pod_cidrs
    }

    /// The other nodes: their pod CIDRs and InternalIPs.
    pub fn peer_nodes(&self) -> Vec<PeerNode> {
        self.peers
            .iter()
            .map(|(name, p)| PeerNode {
                name: name.clone(),
                pod_cidrs: p.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
                internal_ips: p.internal_ips.clone(),
            })
            .collect()
    }

    /// This node's InternalIPs.
    pub fn own_internal_ips(&self) -> &[IpAddr] {
        &self.own_ips
    }

    /// Every known pod address and its identity.
    pub fn ipcache(&self) -> BTreeMap<IpAddr, Identity> {
        self.compiler.ipcache()
    }

    pub fn identity_of(&self, pod: &ObjectRef) -> Option<Identity> {
        self.compiler.identity_of(pod)
    }

    /// The shared entries of a ClusterNetworkPolicy profile; `None`: gone.
    pub fn profile_policy(&self, id: u32) -> Option<std::sync::Arc<EndpointPolicy>> {
        self.compiler.profile_policy(id)
    }

    pub fn profile_ids(&self) -> Vec<u32> {
        self.compiler.profile_ids()
    }

    /// Identity -> peer class, every identity that has one.
    pub fn peer_classes(&self) -> BTreeMap<u32, u32> {
        self.compiler.peer_classes()
    }

    /// The policy of a local pod; `None` when the API no longer has it.
    pub fn endpoint_policy(&self, pod: &ObjectRef) -> Option<std::sync::Arc<EndpointPolicy>> {
        self.compiler.endpoint_policy(pod)
    }

    /// The numbers the data path holds from a previous run, taken back
    /// in the first programming pass (`Cluster::feed_all`).
    pub fn restore(&mut self, numbers: Restored) {
        info!(
            addresses = numbers.identities.len(),
            classes = numbers.classes.len(),
            profiles = numbers.profiles.len(),
            cidr_groups = numbers.cidr_groups.len(),
            "numbers restored from the maps"
        );
        self.compiler.restore(numbers);
    }

    /// Tells the compiler the addresses the CNI gave a local pod, so that
    /// its identity is in the ipcache before kubelet reports them. Returns
    /// what to program when synced.
    pub fn learn_cni_ips(&mut self, pod: &ObjectRef, ips: Vec<IpAddr>) -> Option<Changes> {
        self.cni_ips.learn(pod, ips);
        if !self.is_synced() {
            return None; // `feed_all` reads them
        }
        let o = self.known.get(&ObjKey::pod(pod))?;
        let out = self.apply_one(Change::Applied(o));
        self.publish_isolators(&out);
        Some(out)
    }

    /// Whether the compiler knows `pod` (an identity), and as the
    /// incarnation `uid` when one is given: an ADD for a pod re-created
    /// under its name, before the watch delivered it, must not take the
    /// old one's labels.
    pub fn knows_pod(&self, pod: &ObjectRef, uid: Option<&str>) -> bool {
        let same = || {
            let kept = self.known.uid(&ObjKey::pod(pod));
            uid.is_none_or(|u| kept.as_deref() == Some(u))
        };
        self.identity_of(pod).is_some() && same()
    }

    /// An endpoint of `pod` that the CNI gave `ips` is gone: a later pod of
    /// that name is not given them.
    pub fn forget_cni_ips(&mut self, pod: &ObjectRef, ips: &[IpAddr]) {
        self.cni_ips.forget(pod, ips);
    }

    /// Feeds one object's change to the compiler or the node/service view.
    fn feed(&mut self, o: &Object, deleted: bool) -> Changes {
        match (o, deleted) {
            (Object::Pod(p), false) => {
                let p = self.cni_ips.fill((**p).clone());
                self.compiler.upsert_pod(&p)
            }
            (Object::Pod(p), true) => self
                .compiler
                .delete_pod(&p.namespace().unwrap_or_default(), &p.name_any()),
            (Object::Namespace(n), false) => self.compiler.upsert_namespace(n),
            (Object::Namespace(n), true) => self.compiler.delete_namespace(&n.name_any()),
            (Object::NetworkPolicy(p), false) if is_audit(o) => self
                .compiler
                .delete_policy(&p.namespace().unwrap_or_default(), &p.name_any()),
            (Object::NetworkPolicy(p), false) => self.compiler.upsert_policy(p),
            (Object::NetworkPolicy(p), true) => self
                .compiler
                .delete_policy(&p.namespace().unwrap_or_default(), &p.name_any()),
            // The compiler resolves ClusterNetworkPolicy `nodes` peers.
            (Object::Node(n), false) => {
                self.node_seen(n);
                self.compiler.upsert_node(n)
            }
            (Object::Node(n), true) => {
                self.peers.remove(&n.name_any());
                self.compiler.delete_node(&n.name_any())
            }
            (Object::Service(svc), false) => {
                self.services.insert(o.key(), cluster_ips(svc));
                Changes::default()
            }
            (Object::Service(_), true) => {
                self.services.remove(&o.key());
                Changes::default()
            }
            (Object::ClusterNetworkPolicy(c), false) if is_audit(o) => {
                self.compiler.delete_cluster_policy(&c.name_any())
            }
            (Object::ClusterNetworkPolicy(c), false) => self.compiler.upsert_cluster_policy(c),
            (Object::ClusterNetworkPolicy(c), true) => {
                self.compiler.delete_cluster_policy(&c.name_any())
            }
        }
    }

    fn node_seen(&mut self, n: &Node) {
        let pod_cidrs = node_pod_cidrs(n);
        if n.name_any() == self.node_name {
            self.pod_cidrs = pod_cidrs;
            self.own_ips = internal_ips(n);
        } else {
            let peer = Peer {
                pod_cidrs,
                internal_ips: internal_ips(n),
            };
            self.peers.insert(n.name_any(), peer);
        }
    }

    /// A deletion of `o` while a different incarnation of its name (another
    /// UID) is kept: a pod that CNI ADD fetched, re-created under the same
    /// name, before the watch delivered the old one's deletion. The kept
    /// one is newer (a name has one object at a time, and the watch
    /// delivers in order), so the deletion is not for it.
    fn is_older_incarnation(&self, o: &Object) -> bool {
        let kept = self.known.uid(&o.key());
        matches!((kept, o.uid()), (Some(kept), Some(gone)) if kept != gone)
    }

    /// Before the first full list: a change is kept (and given to the
    /// audit view) but not compiled; `feed_all` compiles them together.
    fn hold(&mut self, change: Change) {
        match change {
            Change::Applied(o) => {
                self.feed_audit_view(&o, false);
                self.known.insert(o);
            }
            Change::Deleted(o) => {
                self.feed_audit_view(&o, true);
                self.known.remove(&o.key());
            }
            Change::Resync(kind, objects) => {
                self.resync_audit_view(kind, &objects);
                self.known.replace_kind(kind, objects);
                self.synced.insert(kind);
            }
        }
    }

    /// Applies one change; returns what to program.
    fn apply_one(&mut self, change: Change) -> Changes {
        match change {
            Change::Applied(o) => {
                let out = self.feed(&o, false);
                self.feed_audit_view(&o, false);
                self.known.insert(o);
                out
            }
            Change::Deleted(o) => {
                let out = self.feed(&o, true);
                self.feed_audit_view(&o, true);
                self.known.remove(&o.key());
                out
            }
            Change::Resync(kind, objects) => {
                let out = self.resync(kind, &objects);
                self.resync_audit_view(kind, &objects);
                self.known.replace_kind(kind, objects);
                self.synced.insert(kind);
                out
            }
        }
    }
}

/// Is this a policy in audit mode (`policy.sluice.dev/enforcement: audit`)?
pub fn is_audit(o: &Object) -> bool {
    let meta = match o {
        Object::NetworkPolicy(p) => &p.metadata,
        Object::ClusterNetworkPolicy(c) => &c.metadata,
        _ => return false,
    };
    enforcement(meta) == Enforcement::Audit
}

/// The reference of a known object, for an Event.
fn reference(known: &known::Known, key: &ObjKey) -> Option<ObjectReference> {
    let r = known.get(key)?.reference();
    (r.kind.as_deref() == Some(key.kind.name())).then_some(r)
}

#[cfg(test)]
mod tests;
