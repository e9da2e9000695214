//! The NetworkPolicy compiler: Namespaces, Pods and NetworkPolicies
//! (networking.k8s.io/v1) in, the per-endpoint map contents
//! ([`EndpointPolicy`]) and the ipcache (pod address -> identity) out. Pure:
//! no I/O, no async, no client; the caller feeds it watch events and writes
//! what changed.
//!
//! # Identities
//!
//! Pods with the same namespace, namespace labels, pod labels and named-port
//! table share one identity (from `IDENTITY_FIRST_USER`, kept while it has
//! pods, released after). Every selector is a function of those four, so
//! selectors are evaluated against identities, never pods, and an endpoint's
//! policy is a function of its identity: it is computed once per local
//! identity and shared by its endpoints. The named-port table is part of the
//! identity so that a named port resolves the same way for every pod of an
//! identity (on the selected pod for ingress, on each destination for
//! egress).
//!
//! # Per direction, per endpoint
//!
//! - No policy with that type selects the pod: not isolated, the data path
//!   lets everything through and no rules are written.
//! - Some do: isolated, and the allowlist is the union of their rules of that
//!   direction, zero rules included (deny all). Policy types default to
//!   Ingress, plus Egress when the policy has egress rules.
//! - A rule with no peers allows every peer (`IDENTITY_ANY`, which the data
//!   path also matches for addresses outside the cluster); pod and namespace
//!   selectors become one entry per selected identity; ipBlocks become CIDR
//!   prefixes whose groups are written as peer identities (see `cidr`).
//! - A rule with no ports is `L4::Any`, a port entry without a port is
//!   `L4::Proto`, a number or range is `L4::Ports`.
//!
//! Invalid input is reported in [`Changes::diagnostics`] and the rule
//! concerned is dropped, which denies what it would have allowed.
//!
//! # Incremental
//!
//! Each event updates the state and returns what changed. Per local identity
//! the compiler keeps a count of contributions per (direction, peer, L4,
//! rule): a new or removed identity is matched against the interned selectors
//! and adds or removes its contributions to the local identities whose
//! policies use those selectors; a policy change detaches the old version and
//! attaches the new one to the identities it selects. Only the endpoints whose
//! output really differs are reported, each with a [`PolicyDelta`] (shared
//! by the endpoints of an identity) or as a whole replacement.
//! [`Compiler::load`] applies a whole list of objects as one event (the
//! initial sync). [`Compiler::recompute_all`] rebuilds everything from the
//! objects as a fallback (and as a check in tests).
//!
//! # Use
//!
//! ```text
//! let mut c = Compiler::new(Locality::Node(node_name));
//! let changes = c.load(&namespaces, &pods, &policies);   // after the reflectors are synced
//! // then, per watch event: c.upsert_pod(&pod), c.delete_policy(ns, name), ...
//! for (pod, change) in &changes.endpoints {
//!     match change {
//!         EndpointChange::Replace => write_whole(pod, c.endpoint_policy(pod)), // None: gone
//!         EndpointChange::Update(delta) => apply(pod, delta),
//!     }
//! }
//! for (ip, identity) in &changes.ipcache { /* Some: upsert, None: delete */ }
//! ```
//!
//! The lookup model ([`Compiler::verdict`], [`Compiler::would_allow`]) gives
//! the data path's verdict from these outputs alone.
mod cidr;
mod model;
mod parse;
mod selector;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_map},
    fmt,
    mem::take,
    net::IpAddr,
    sync::{Arc, OnceLock},
};

pub use k8s_openapi;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
pub use selector::Labels;
use selector::{NsMatch, PeerSelector, Selector};
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_CIDR_FLAG, IDENTITY_FIRST_USER,
};

use self::parse::{Part, Peer, Ports, parse_policy};
use crate::policy::{CidrEntry, EndpointPolicy, L4, Rule, policy_keys};

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
}

/// Something in the input that could not be used as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub kind: Kind,
    /// For a Namespace, `namespace` is empty and `name` is its name.
    pub object: ObjectRef,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}: {}", self.kind, self.object, self.reason)
    }
}

/// What one event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Local endpoints whose [`EndpointPolicy`] changed, and how.
    pub endpoints: BTreeMap<ObjectRef, EndpointChange>,
    /// Pod addresses whose identity changed; `None`: no pod has it any more.
    pub ipcache: BTreeMap<IpAddr, Option<u32>>,
    /// Problems found in the objects of this event.
    pub diagnostics: Vec<Diagnostic>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.ipcache.is_empty() && self.diagnostics.is_empty()
    }

    /// Folds a later event's changes into these. Two updates of one
    /// endpoint become a replacement (deltas are not composed).
    pub fn merge(&mut self, later: Changes) {
        for (ep, change) in later.endpoints {
            match self.endpoints.get_mut(&ep) {
                Some(c) => *c = EndpointChange::Replace,
                None => {
                    self.endpoints.insert(ep, change);
                }
            }
        }
        self.ipcache.extend(later.ipcache);
        self.diagnostics.extend(later.diagnostics);
    }
}

/// How an endpoint's policy changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointChange {
    /// A new endpoint, a new identity, a (re)load, or a removed endpoint:
    /// write [`Compiler::endpoint_policy`] whole (`None`: the endpoint is
    /// gone).
    Replace,
    /// Same endpoint and identity: apply this to what was written before.
    /// Shared by the endpoints of one identity.
    Update(Arc<PolicyDelta>),
}

/// The difference between an endpoint's policy before and after an event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDelta {
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Rules that are new, or whose `rule_id` changed.
    pub upsert: Vec<Rule>,
    /// Rules that are gone, with the `rule_id` they had.
    pub remove: Vec<Rule>,
    /// CIDR prefixes that are new or whose group changed.
    pub upsert_cidrs: Vec<CidrEntry>,
    /// CIDR prefixes that are gone.
    pub remove_cidrs: Vec<CidrEntry>,
}

/// Which pods are endpoints of this node.
#[derive(Clone, Debug)]
pub enum Locality {
    /// Every pod (tests, the model).
    All,
    /// Pods whose `spec.nodeName` is this.
    Node(String),
    /// These pods.
    Pods(BTreeSet<ObjectRef>),
}

impl Locality {
    fn is_local(&self, pod: &Pod, obj: &ObjectRef) -> bool {
        match self {
            Self::All => true,
            Self::Node(node) => pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| n == node),
            Self::Pods(set) => set.contains(obj),
        }
    }
}

/// Where a `rule_id` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleOrigin {
    pub policy: ObjectRef,
    pub dir: u8,
    /// Position in `spec.ingress` or `spec.egress`.
    pub index: usize,
}

/// How many map entries an endpoint's policy takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCount {
    /// Policy map keys (a port range takes one key per aligned block).
    pub policy: usize,
    /// CIDR map prefixes.
    pub cidr: usize,
}

pub fn entry_count(p: &EndpointPolicy) -> EntryCount {
    let mut keys = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        // A rule that does not compile takes no entry (`compile` refuses it).
        for k in policy_keys(0, r.dir, r.identity, r.l4).unwrap_or_default() {
            keys.push((k.dir, k.identity, k.proto, k.port, k.plen));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    EntryCount {
        policy: keys.len(),
        cidr: p.cidrs.len(),
    }
}

/// FxHash (rustc's): fast for the integer and small-tuple keys of the maps
/// below, which the compiler allocates itself. Maps keyed by strings from
/// the API keep std's DoS-resistant hasher.
#[derive(Clone, Copy, Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// (name, protocol, port) of a pod's named container ports, sorted.
type NamedPorts = Vec<(String, u8, u16)>;
type SelId = u32;
type PolicyId = u32;
/// (direction, peer identity, L4): one policy map rule.
type RuleKey = (u8, u32, L4);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdentityKey {
    namespace: String,
    ns_labels: Arc<Labels>,
    labels: Labels,
    ports: NamedPorts,
}

struct Identity {
    key: Arc<IdentityKey>,
    /// Pods with this identity, local or not.
    pods: u32,
    /// Interned selectors that select it.
    in_selectors: Vec<SelId>,
    local_pods: BTreeSet<ObjectRef>,
    /// Present while the identity has local pods.
    local: Option<Box<LocalState>>,
}

/// The policy of a local identity, kept as contribution counts.
#[derive(Default)]
struct LocalState {
    selected_by: BTreeSet<PolicyId>,
    /// Number of selecting policies with type Ingress / Egress.
    ingress: u32,
    egress: u32,
    /// Rule key -> how many (part, member) pairs of each rule produce it.
    contrib: BTreeMap<RuleKey, Counts>,
    cidrs: Vec<CidrEntry>,
    cidr_rules: Vec<Rule>,
    /// CIDR groups this identity holds a reference on.
    groups: Vec<u32>,
    cached: OnceLock<Arc<EndpointPolicy>>,
}

/// Contribution counts of one rule key by rule id; most keys have one
/// contributing rule, kept inline.
#[derive(Clone, Debug)]
enum Counts {
    One {
        rule: u32,
        n: u32,
    },
    /// Sorted by rule id, every count > 0, at least two entries.
    Many(Vec<(u32, u32)>),
}

impl Counts {
    /// The rule id written for the key: the lowest contributing rule.
    fn rule_id(&self) -> u32 {
        match self {
            Self::One { rule, .. } => *rule,
            Self::Many(v) => v.first().map_or(0, |&(r, _)| r),
        }
    }

    fn add(&mut self, rid: u32) {
        match self {
            Self::One { rule, n } if *rule == rid => *n += 1,
            Self::One { rule, n } => {
                let mut v = vec![(*rule, *n), (rid, 1)];
                v.sort_unstable();
                *self = Self::Many(v);
            }
            Self::Many(v) => match v.binary_search_by_key(&rid, |&(r, _)| r) {
                Ok(i) => v[i].1 += 1,
                Err(i) => v.insert(i, (rid, 1)),
            },
        }
    }

    /// Removes one contribution of `rid`; true when none is left.
    fn remove(&mut self, rid: u32) -> bool {
        match self {
            Self::One { rule, n } => {
                debug_assert_eq!(*rule, rid, "removing a contribution that was never added");
                *n -= 1;
                *n == 0
            }
            Self::Many(v) => {
                if let Ok(i) = v.binary_search_by_key(&rid, |&(r, _)| r) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        v.remove(i);
                    }
                } else {
                    debug_assert!(false, "removing a contribution that was never added");
                }
                if let [(rule, n)] = v[..] {
                    *self = Self::One { rule, n };
                }
                false
            }
        }
    }
}

impl LocalState {
    /// The rule id written for a rule key, if any.
    fn value(&self, k: RuleKey) -> Option<u32> {
        self.contrib.get(&k).map(Counts::rule_id)
    }

    fn isolation(&self) -> (bool, bool) {
        (self.ingress > 0, self.egress > 0)
    }

    fn materialize(&self) -> EndpointPolicy {
        let mut rules: Vec<Rule> = Vec::with_capacity(self.contrib.len() + self.cidr_rules.len());
        for (&(dir, identity, l4), counts) in &self.contrib {
            rules.push(Rule {
                dir,
                identity,
                l4,
                rule_id: counts.rule_id(),
            });
        }
        rules.extend(self.cidr_rules.iter().cloned());
        rules.sort_by_key(|r| (r.dir, r.identity, r.l4));
        EndpointPolicy {
            ingress_isolated: self.ingress > 0,
            egress_isolated: self.egress > 0,
            rules,
            cidrs: self.cidrs.clone(),
        }
    }
}

struct PodState {
    identity: u32,
    ips: Vec<IpAddr>,
    local: bool,
}

struct SelectorEntry {
    sel: PeerSelector,
    /// Parts that reference it.
    refs: u32,
    members: BTreeSet<u32>,
    /// (policy, rule position, part position) using it.
    users: BTreeSet<(PolicyId, usize, usize)>,
}

struct RuleState {
    id: u32,
    dir: u8,
    index: usize,
    parts: Vec<Part<SelId>>,
}

struct PolicyState {
    object: ObjectRef,
    target: Option<Selector>,
    ingress: bool,
    egress: bool,
    rules: Vec<RuleState>,
    /// Local identities it selects.
    targets: BTreeSet<u32>,
    problems: Vec<String>,
}

/// Numbers from `first` up to `limit`, then reused; never two live at once.
struct Allocator {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
}

impl Allocator {
    fn new(first: u32, limit: u32) -> Self {
        Self {
            next: first,
            limit,
            free: BTreeSet::new(),
        }
    }

    /// Fresh numbers first, so that a released number is not handed out
    /// again while stale map entries may still name it.
    fn alloc(&mut self) -> u32 {
        if self.next < self.limit {
            self.next += 1;
            self.next - 1
        } else {
            #[expect(
                clippy::expect_used,
                reason = "2^31 live identities or groups cannot fit in memory first"
            )]
            self.free.pop_first().expect("identity space exhausted")
        }
    }

    fn release(&mut self, n: u32) {
        self.free.insert(n);
    }
}

/// What an event touched, to report only what really changed.
#[derive(Default)]
struct Txn {
    touched: IdMap<u32, Touched>,
    /// Address -> its identity before the event.
    ips: HashMap<IpAddr, Option<u32>>,
    /// Endpoints to be written whole (new, moved, gone).
    replaced: BTreeSet<ObjectRef>,
    diagnostics: Vec<Diagnostic>,
}

struct Touched {
    /// Became local in this event: reported whole, no need to track keys.
    fresh: bool,
    cidr_dirty: bool,
    /// Rule key -> its rule id before the event.
    keys: IdMap<RuleKey, Option<u32>>,
    isolation: (bool, bool),
}

impl Touched {
    fn snapshot(st: &LocalState, fresh: bool) -> Self {
        Self {
            fresh,
            cidr_dirty: false,
            keys: IdMap::default(),
            isolation: st.isolation(),
        }
    }
}

/// The cluster as this node's agent sees it, and what it compiles to.
pub struct Compiler {
    locality: Locality,
    empty_labels: Arc<Labels>,
    namespaces: HashMap<String, Arc<Labels>>,
    pods: HashMap<ObjectRef, PodState>,
    pods_by_ns: HashMap<String, BTreeSet<String>>,

    identities: IdMap<u32, Identity>,
    identity_by_key: HashMap<Arc<IdentityKey>, u32>,
    identities_by_ns: HashMap<String, BTreeSet<u32>>,
    local_by_ns: HashMap<String, BTreeSet<u32>>,
    identity_numbers: Allocator,

    selectors: IdMap<SelId, SelectorEntry>,
    selector_by_value: HashMap<PeerSelector, SelId>,
    /// Selectors without a namespace selector, by the namespace they cover.
    selectors_own: HashMap<String, BTreeSet<SelId>>,
    /// Selectors with a namespace selector, grouped by it, so that a new
    /// identity evaluates each distinct namespace selector once.
    selectors_by_ns_sel: HashMap<Selector, BTreeSet<SelId>>,
    next_selector: SelId,

    policies: IdMap<PolicyId, PolicyState>,
    policy_by_ref: HashMap<ObjectRef, PolicyId>,
    policies_by_ns: HashMap<String, BTreeSet<PolicyId>>,
    next_policy: PolicyId,
    rule_origins: IdMap<u32, (PolicyId, u8, usize)>,
    next_rule: u32,

    groups: HashMap<Vec<(u32, L4)>, (u32, u32)>,
    group_sets: IdMap<u32, Vec<(u32, L4)>>,
    group_numbers: Allocator,

    /// Address -> the pods that claim it; the last one wins (an address can
    /// be reused by a new pod before the old one is gone).
    ipcache: HashMap<IpAddr, Vec<ObjectRef>>,
    txn: Txn,
    /// Loading: every touched identity is reported whole, no key tracking.
    quiet: bool,
    /// Reused buffer of `apply_part`.
    scratch: Vec<(RuleKey, u32)>,
}

impl Compiler {
    pub fn new(locality: Locality) -> Self {
        Self {
            locality,
            empty_labels: Arc::new(Labels::new()),
            namespaces: Default::default(),
            pods: Default::default(),
            pods_by_ns: Default::default(),
            identities: Default::default(),
            identity_by_key: Default::default(),
            identities_by_ns: Default::default(),
            local_by_ns: Default::default(),
            identity_numbers: Allocator::new(IDENTITY_FIRST_USER, IDENTITY_CIDR_FLAG),
            selectors: Default::default(),
            selector_by_value: Default::default(),
            selectors_own: Default::default(),
            selectors_by_ns_sel: Default::default(),
            next_selector: 0,
            policies: Default::default(),
            policy_by_ref: Default::default(),
            policies_by_ns: Default::default(),
            next_policy: 0,
            rule_origins: Default::default(),
            next_rule: 1,
            groups: Default::default(),
            group_sets: Default::default(),
            group_numbers: Allocator::new(1, IDENTITY_CIDR_FLAG),
            ipcache: Default::default(),
            txn: Txn::default(),
            quiet: false,
            scratch: Vec::new(),
        }
    }

    /// Applies many objects as one event: the initial sync, or a resync
    /// (objects not listed are not deleted). Cheaper than one event per
    /// object; every endpoint it touches is reported as
    /// [`EndpointChange::Replace`].
    pub fn load(
        &mut self,
        namespaces: &[Namespace],
        pods: &[Pod],
        policies: &[NetworkPolicy],
    ) -> Changes {
        self.quiet = true;
        for ns in namespaces {
            self.namespace_event(ns);
        }
        // Pods before policies: identities then exist when selectors are
        // interned, and each policy adds its contributions in one pass.
        for pod in pods {
            self.pod_event(pod);
        }
        for np in policies {
            self.policy_event(np);
        }
        self.quiet = false;
        self.commit()
    }

    // ----- events -----

    pub fn upsert_namespace(&mut self, ns: &Namespace) -> Changes {
        self.namespace_event(ns);
        self.commit()
    }

    fn namespace_event(&mut self, ns: &Namespace) {
        let Some(name) = ns.metadata.name.clone() else {
            self.diagnose(Kind::Namespace, ObjectRef::new("", ""), "no metadata.name");
            return;
        };
        let labels = Arc::new(ns.metadata.labels.clone().unwrap_or_default());
        if self.namespaces.get(&name) != Some(&labels) {
            self.namespaces.insert(name.clone(), labels);
            self.refresh_namespace(&name);
        }
    }

    pub fn delete_namespace(&mut self, name: &str) -> Changes {
        if self.namespaces.remove(name).is_some() {
            self.refresh_namespace(name);
        }
        self.commit()
    }

    /// A new pod, or new labels, ports, addresses or phase of a known one.
    /// Finished pods (Succeeded, Failed) count as deleted, since their
    /// addresses may already belong to another pod; host-network pods are
    /// not endpoints and their addresses are the node's.
    pub fn upsert_pod(&mut self, pod: &Pod) -> Changes {
        self.pod_event(pod);
        self.commit()
    }

    fn pod_event(&mut self, pod: &Pod) {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            self.diagnose(
                Kind::Pod,
                ObjectRef::new("", ""),
                "no metadata.namespace or metadata.name",
            );
            return;
        };
        let obj = ObjectRef::new(ns.clone(), name.clone());
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if finished || host_network {
            self.remove_pod(&obj);
            return;
        }
        let (ips, mut problems) = pod_ips(pod);
        let (ports, port_problems) = named_ports(pod);
        problems.extend(port_problems);
        for p in problems {
            self.diagnose(Kind::Pod, obj.clone(), &p);
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let local = self.locality.is_local(pod, &obj);
        self.set_pod(obj, labels, ports, ips, local);
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Changes {
        self.remove_pod(&ObjectRef::new(namespace, name));
        self.commit()
    }

    pub fn upsert_policy(&mut self, np: &NetworkPolicy) -> Changes {
        self.policy_event(np);
        self.commit()
    }

    fn policy_event(&mut self, np: &NetworkPolicy) {
        let (Some(ns), Some(name)) = (&np.metadata.namespace, &np.metadata.name) else {
            self.diagnose(
                Kind::NetworkPolicy,
                ObjectRef::new("", ""),
                "no metadata.namespace or metadata.name",
            );
            return;
        };
        let obj = ObjectRef::new(ns.clone(), name.clone());
        let (parsed, problems) = parse_policy(np);
        for p in &problems {
            self.diagnose(Kind::NetworkPolicy, obj.clone(), p);
        }
        // Intern the new selectors before the old ones are released, so the
        // ones both versions use keep their members.
        let mut rules: Vec<RuleState> = parsed
            .rules
            .into_iter()
            .map(|r| RuleState {
                id: 0,
                dir: r.dir,
                index: r.index,
                parts: r
                    .parts
                    .into_iter()
                    .map(|p| Part {
                        peer: match p.peer {
                            Peer::Any => Peer::Any,
                            Peer::Pods(sel) => Peer::Pods(self.intern_selector(sel)),
                            Peer::Blocks(b) => Peer::Blocks(b),
                        },
                        ports: p.ports,
                    })
                    .collect(),
            })
            .collect();
        let (pid, mut old_ids) = match self.policy_by_ref.get(&obj) {
            Some(&pid) => (pid, self.uninstall_policy(pid)),
            None => {
                let pid = self.next_policy;
                self.next_policy += 1;
                (pid, BTreeMap::new())
            }
        };
        // Rule ids stay with (direction, position) across updates, so an
        // unchanged rule keeps its map values.
        for r in &mut rules {
            r.id = match old_ids.remove(&(r.dir, r.index)) {
                Some(id) => id,
                None => {
                    let id = self.next_rule;
                    self.next_rule += 1;
                    self.rule_origins.insert(id, (pid, r.dir, r.index));
                    id
                }
            };
        }
        for id in old_ids.into_values() {
            self.rule_origins.remove(&id);
        }
        self.install_policy(
            pid,
            PolicyState {
                object: obj,
                target: parsed.target,
                ingress: parsed.ingress,
                egress: parsed.egress,
                rules,
                targets: BTreeSet::new(),
                problems,
            },
        );
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Changes {
        let obj = ObjectRef::new(namespace, name);
        if let Some(pid) = self.policy_by_ref.remove(&obj) {
            for id in self.uninstall_policy(pid).into_values() {
                self.rule_origins.remove(&id);
            }
            self.policies.remove(&pid);
            if let Some(set) = self.policies_by_ns.get_mut(namespace) {
                set.remove(&pid);
                if set.is_empty() {
                    self.policies_by_ns.remove(namespace);
                }
            }
        }
        self.commit()
    }

    /// Recomputes every selector's members and every local identity's policy
    /// from the objects alone. A fallback; reports what differed.
    pub fn recompute_all(&mut self) -> Changes {
        let locals: Vec<u32> = self
            .identities
            .iter()
            .filter(|(_, i)| i.local.is_some())
            .map(|(&id, _)| id)
            .collect();
        for &l in &locals {
            self.touch(l);
            let Some(st) = self
                .identities
                .get_mut(&l)
                .and_then(|i| i.local.as_deref_mut())
            else {
                continue;
            };
            // Record what every rule key was, since the contributions are
            // cleared here without going through `bump`.
            if let Some(t) = self.txn.touched.get_mut(&l)
                && !t.fresh
            {
                for (&key, counts) in &st.contrib {
                    t.keys.entry(key).or_insert(Some(counts.rule_id()));
                }
            }
            {
                st.selected_by.clear();
                st.contrib.clear();
                st.ingress = 0;
                st.egress = 0;
            }
            self.mark_cidr_dirty(l);
        }
        for p in self.policies.values_mut() {
            p.targets.clear();
        }
        for ident in self.identities.values_mut() {
            ident.in_selectors.clear();
        }
        let mut sids: Vec<SelId> = self.selectors.keys().copied().collect();
        sids.sort_unstable();
        for s in sids {
            let members = self.evaluate_selector(s);
            for &x in &members {
                if let Some(i) = self.identities.get_mut(&x) {
                    i.in_selectors.push(s);
                }
            }
            if let Some(e) = self.selectors.get_mut(&s) {
                e.members = members;
            }
        }
        for &l in &locals {
            self.attach_matching_policies(l);
        }
        self.commit()
    }

    // ----- queries -----

    /// The map contents of a local endpoint (shared by the endpoints of one
    /// identity).
    pub fn endpoint_policy(&self, pod: &ObjectRef) -> Option<Arc<EndpointPolicy>> {
        let st = self.local_state_of(pod)?;
        Some(st.cached.get_or_init(|| Arc::new(st.materialize())).clone())
    }

    pub fn entry_count(&self, pod: &ObjectRef) -> Option<EntryCount> {
        self.endpoint_policy(pod).map(|p| entry_count(&p))
    }

    /// Local endpoints (pods of this node that are not finished).
    pub fn endpoints(&self) -> impl Iterator<Item = &ObjectRef> {
        self.pods
            .iter()
            .filter(|(_, p)| p.local)
            .map(|(obj, _)| obj)
    }

    /// Does the policy select a pod of this node?
    pub fn selects_local(&self, policy: &ObjectRef) -> bool {
        self.policy_by_ref
            .get(policy)
            .and_then(|pid| self.policies.get(pid))
            .is_some_and(|p| !p.targets.is_empty())
    }

    /// Is the pod one of this node's endpoints?
    pub fn is_local(&self, pod: &ObjectRef) -> bool {
        self.pods.get(pod).is_some_and(|p| p.local)
    }

    /// The identity of a pod, local or not.
    pub fn identity_of(&self, pod: &ObjectRef) -> Option<u32> {
        self.pods.get(pod).map(|p| p.identity)
    }

    /// The addresses of a pod, as the compiler knows them.
    pub fn addresses_of(&self, pod: &ObjectRef) -> Option<&[IpAddr]> {
        self.pods.get(pod).map(|p| p.ips.as_slice())
    }

    /// Identity of a pod address (`None`: not a pod address).
    pub fn ip_identity(&self, ip: IpAddr) -> Option<u32> {
        let owner = self.ipcache.get(&ip)?.last()?;
        self.pods.get(owner).map(|p| p.identity)
    }

    /// The whole ipcache.
    pub fn ipcache(&self) -> BTreeMap<IpAddr, u32> {
        self.ipcache
            .keys()
            .filter_map(|&ip| self.ip_identity(ip).map(|id| (ip, id)))
            .collect()
    }

    /// The problems of the policies as they are now.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut out: Vec<Diagnostic> = self
            .policies
            .values()
            .flat_map(|p| {
                p.problems.iter().map(|reason| Diagnostic {
                    kind: Kind::NetworkPolicy,
                    object: p.object.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.object, &a.reason).cmp(&(&b.object, &b.reason)));
        out
    }

    pub fn rule_origin(&self, rule_id: u32) -> Option<RuleOrigin> {
        let &(pid, dir, index) = self.rule_origins.get(&rule_id)?;
        Some(RuleOrigin {
            policy: self.policies.get(&pid)?.object.clone(),
            dir,
            index,
        })
    }

    /// Sizes, for logs and benches.
    pub fn stats(&self) -> Stats {
        Stats {
            pods: self.pods.len(),
            identities: self.identities.len(),
            local_identities: self
                .identities
                .values()
                .filter(|i| i.local.is_some())
                .count(),
            selectors: self.selectors.len(),
            policies: self.policies.len(),
            cidr_groups: self.groups.len(),
        }
    }

    // ----- pods and identities -----

    fn refresh_namespace(&mut self, ns: &str) {
        let names: Vec<String> = self
            .pods_by_ns
            .get(ns)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let obj = ObjectRef::new(ns, name);
            let Some(p) = self.pods.get(&obj) else {
                continue;
            };
            let Some(ident) = self.identities.get(&p.identity) else {
                continue;
            };
            let (labels, ports) = (ident.key.labels.clone(), ident.key.ports.clone());
            let (ips, local) = (p.ips.clone(), p.local);
            self.set_pod(obj, labels, ports, ips, local);
        }
    }

    fn set_pod(
        &mut self,
        obj: ObjectRef,
        labels: Labels,
        ports: NamedPorts,
        ips: Vec<IpAddr>,
        local: bool,
    ) {
        let key = IdentityKey {
            namespace: obj.namespace.clone(),
            ns_labels: self
                .namespaces
                .get(&obj.namespace)
                .cloned()
                .unwrap_or_else(|| self.empty_labels.clone()),
            labels,
            ports,
        };
        if let Some(old) = self.pods.get(&obj)
            && old.ips == ips
            && old.local == local
            && self
                .identities
                .get(&old.identity)
                .is_some_and(|i| *i.key == key)
        {
            return;
        }
        let old_ips = self
            .pods
            .get(&obj)
            .map(|o| o.ips.clone())
            .unwrap_or_default();
        for &ip in old_ips.iter().chain(ips.iter()) {
            self.record_ip(ip);
        }
        let old = self.pods.remove(&obj);
        let id = self.acquire_identity(key);
        if let Some(o) = &old {
            for &ip in &o.ips {
                self.drop_ip_owner(ip, &obj);
            }
        }
        for &ip in &ips {
            let owners = self.ipcache.entry(ip).or_default();
            owners.retain(|o| *o != obj);
            owners.push(obj.clone());
        }
        self.pods_by_ns
            .entry(obj.namespace.clone())
            .or_default()
            .insert(obj.name.clone());
        self.pods.insert(
            obj.clone(),
            PodState {
                identity: id,
                ips,
                local,
            },
        );
        let same_local = old
            .as_ref()
            .is_some_and(|o| o.local && local && o.identity == id);
        if local && !same_local {
            self.add_local_pod(id, &obj);
        }
        if let Some(o) = old {
            if o.local && !same_local {
                self.remove_local_pod(o.identity, &obj);
            }
            if (o.local || local) && !same_local {
                self.txn.replaced.insert(obj.clone());
            }
            self.release_identity(o.identity);
        } else if local {
            self.txn.replaced.insert(obj);
        }
    }

    fn remove_pod(&mut self, obj: &ObjectRef) {
        let ips = match self.pods.get(obj) {
            Some(p) => p.ips.clone(),
            None => return,
        };
        for &ip in &ips {
            self.record_ip(ip);
        }
        let Some(old) = self.pods.remove(obj) else {
            return;
        };
        for &ip in &old.ips {
            self.drop_ip_owner(ip, obj);
        }
        if let Some(set) = self.pods_by_ns.get_mut(&obj.namespace) {
            set.remove(&obj.name);
            if set.is_empty() {
                self.pods_by_ns.remove(&obj.namespace);
            }
        }
        if old.local {
            self.remove_local_pod(old.identity, obj);
            self.txn.replaced.insert(obj.clone());
        }
        self.release_identity(old.identity);
    }

    fn record_ip(&mut self, ip: IpAddr) {
        if !self.txn.ips.contains_key(&ip) {
            let before = self.ip_identity(ip);
            self.txn.ips.insert(ip, before);
        }
    }

    fn drop_ip_owner(&mut self, ip: IpAddr, obj: &ObjectRef) {
        if let Some(owners) = self.ipcache.get_mut(&ip) {
            owners.retain(|o| o != obj);
            if owners.is_empty() {
                self.ipcache.remove(&ip);
            }
        }
    }

    fn acquire_identity(&mut self, key: IdentityKey) -> u32 {
        if let Some(&id) = self.identity_by_key.get(&key)
            && let Some(i) = self.identities.get_mut(&id)
        {
            i.pods += 1;
            return id;
        }
        let id = self.identity_numbers.alloc();
        let key = Arc::new(key);
        let hits = self.selectors_matching(&key);
        self.identity_by_key.insert(key.clone(), id);
        self.identities_by_ns
            .entry(key.namespace.clone())
            .or_default()
            .insert(id);
        self.identities.insert(
            id,
            Identity {
                key,
                pods: 1,
                in_selectors: hits.clone(),
                local_pods: BTreeSet::new(),
                local: None,
            },
        );
        for s in hits {
            if let Some(e) = self.selectors.get_mut(&s) {
                e.members.insert(id);
            }
            self.member_changed(s, id, 1);
        }
        id
    }

    fn release_identity(&mut self, id: u32) {
        let Some(ident) = self.identities.get_mut(&id) else {
            return;
        };
        ident.pods -= 1;
        if ident.pods > 0 {
            return;
        }
        for s in take(&mut ident.in_selectors) {
            self.member_changed(s, id, -1);
            if let Some(e) = self.selectors.get_mut(&s) {
                e.members.remove(&id);
            }
        }
        if let Some(ident) = self.identities.remove(&id) {
            self.identity_by_key.remove(&ident.key);
            if let Some(set) = self.identities_by_ns.get_mut(&ident.key.namespace) {
                set.remove(&id);
                if set.is_empty() {
                    self.identities_by_ns.remove(&ident.key.namespace);
                }
            }
        }
        self.identity_numbers.release(id);
    }

    fn add_local_pod(&mut self, id: u32, obj: &ObjectRef) {
        let Some(ident) = self.identities.get_mut(&id) else {
            return;
        };
        ident.local_pods.insert(obj.clone());
        if ident.local.is_some() {
            return;
        }
        ident.local = Some(Box::default());
        let ns = ident.key.namespace.clone();
        self.local_by_ns.entry(ns).or_default().insert(id);
        if let Some(st) = ident.local.as_deref() {
            self.txn.touched.insert(id, Touched::snapshot(st, true));
        }
        self.attach_matching_policies(id);
    }

    fn remove_local_pod(&mut self, id: u32, obj: &ObjectRef) {
        let Some(ident) = self.identities.get_mut(&id) else {
            return;
        };
        ident.local_pods.remove(obj);
        if !ident.local_pods.is_empty() {
            return;
        }
        let Some(st) = ident.local.take() else {
            return;
        };
        let ns = ident.key.namespace.clone();
        for p in &st.selected_by {
            if let Some(pol) = self.policies.get_mut(p) {
                pol.targets.remove(&id);
            }
        }
        for g in st.groups {
            self.release_group(g);
        }
        if let Some(set) = self.local_by_ns.get_mut(&ns) {
            set.remove(&id);
            if set.is_empty() {
                self.local_by_ns.remove(&ns);
            }
        }
        self.txn.touched.remove(&id);
    }

    // ----- selectors -----

    fn selectors_matching(&self, key: &IdentityKey) -> Vec<SelId> {
        let mut hits = Vec::new();
        for &s in self.selectors_own.get(&key.namespace).into_iter().flatten() {
            if self
                .selectors
                .get(&s)
                .is_some_and(|e| e.sel.pod.matches(&key.labels))
            {
                hits.push(s);
            }
        }
        for (ns_sel, sids) in &self.selectors_by_ns_sel {
            if !ns_sel.matches(&key.ns_labels) {
                continue;
            }
            for &s in sids {
                if self
                    .selectors
                    .get(&s)
                    .is_some_and(|e| e.sel.pod.matches(&key.labels))
                {
                    hits.push(s);
                }
            }
        }
        hits.sort_unstable();
        hits
    }

    fn evaluate_selector(&self, s: SelId) -> BTreeSet<u32> {
        let Some(e) = self.selectors.get(&s) else {
            return BTreeSet::new();
        };
        let mut out = BTreeSet::new();
        let mut check = |ids: &BTreeSet<u32>| {
            // The identities of a namespace share its labels (one Arc),
            // except briefly while it is relabelled: cache by pointer.
            let mut last: Option<(*const Labels, bool)> = None;
            for &id in ids {
                let Some(i) = self.identities.get(&id) else {
                    continue;
                };
                let ns_ok = match &e.sel.ns {
                    NsMatch::Own(ns) => *ns == i.key.namespace,
                    NsMatch::Labels(sel) => {
                        let ptr = Arc::as_ptr(&i.key.ns_labels);
                        match last {
                            Some((p, ok)) if p == ptr => ok,
                            _ => {
                                let ok = sel.matches(&i.key.ns_labels);
                                last = Some((ptr, ok));
                                ok
                            }
                        }
                    }
                };
                if ns_ok && e.sel.pod.matches(&i.key.labels) {
                    out.insert(id);
                }
            }
        };
        match &e.sel.ns {
            NsMatch::Own(ns) => {
                if let Some(ids) = self.identities_by_ns.get(ns) {
                    check(ids);
                }
            }
            NsMatch::Labels(_) => {
                for ids in self.identities_by_ns.values() {
                    check(ids);
                }
            }
        }
        out
    }

    fn intern_selector(&mut self, sel: PeerSelector) -> SelId {
        if let Some(&s) = self.selector_by_value.get(&sel)
            && let Some(e) = self.selectors.get_mut(&s)
        {
            e.refs += 1;
            return s;
        }
        let s = self.next_selector;
        self.next_selector += 1;
        match &sel.ns {
            NsMatch::Own(ns) => self.selectors_own.entry(ns.clone()).or_default(),
            NsMatch::Labels(ns_sel) => self.selectors_by_ns_sel.entry(ns_sel.clone()).or_default(),
        }
        .insert(s);
        self.selector_by_value.insert(sel.clone(), s);
        self.selectors.insert(
            s,
            SelectorEntry {
                sel,
                refs: 1,
                members: BTreeSet::new(),
                users: BTreeSet::new(),
            },
        );
        let members = self.evaluate_selector(s);
        for &x in &members {
            if let Some(i) = self.identities.get_mut(&x) {
                i.in_selectors.push(s);
            }
        }
        if let Some(e) = self.selectors.get_mut(&s) {
            e.members = members;
        }
        s
    }

    fn release_selector(&mut self, s: SelId) {
        let Some(e) = self.selectors.get_mut(&s) else {
            return;
        };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let Some(e) = self.selectors.remove(&s) else {
            return;
        };
        for x in &e.members {
            if let Some(i) = self.identities.get_mut(x) {
                i.in_selectors.retain(|&t| t != s);
            }
        }
        self.selector_by_value.remove(&e.sel);
        match &e.sel.ns {
            NsMatch::Own(ns) => remove_from_index(&mut self.selectors_own, ns, s),
            NsMatch::Labels(sel) => remove_from_index(&mut self.selectors_by_ns_sel, sel, s),
        }
    }

    /// Identity `x` joined (`sign` 1) or is leaving (-1) selector `s`:
    /// adjust the local identities whose policies use it.
    fn member_changed(&mut self, s: SelId, x: u32, sign: i32) {
        let users: Vec<(PolicyId, usize, usize)> = match self.selectors.get(&s) {
            Some(e) => e.users.iter().copied().collect(),
            None => return,
        };
        for (p, ri, pi) in users {
            let targets: Vec<u32> = match self.policies.get(&p) {
                Some(pol) => pol.targets.iter().copied().collect(),
                None => continue,
            };
            for l in targets {
                self.apply_part(p, ri, pi, l, Some(x), sign);
            }
        }
    }

    // ----- policies -----

    fn install_policy(&mut self, pid: PolicyId, pol: PolicyState) {
        let ns = pol.object.namespace.clone();
        for (ri, r) in pol.rules.iter().enumerate() {
            for (pi, part) in r.parts.iter().enumerate() {
                if let Peer::Pods(s) = part.peer
                    && let Some(e) = self.selectors.get_mut(&s)
                {
                    e.users.insert((pid, ri, pi));
                }
            }
        }
        let target = pol.target.clone();
        self.policy_by_ref.insert(pol.object.clone(), pid);
        self.policies.insert(pid, pol);
        self.policies_by_ns
            .entry(ns.clone())
            .or_default()
            .insert(pid);
        let locals: Vec<u32> = self
            .local_by_ns
            .get(&ns)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for l in locals {
            if self.target_matches(target.as_ref(), l) {
                self.attach(pid, l);
            }
        }
    }

    /// Detaches a policy from its targets and releases its selectors;
    /// returns its rule ids by (direction, position).
    fn uninstall_policy(&mut self, pid: PolicyId) -> BTreeMap<(u8, usize), u32> {
        let targets: Vec<u32> = self
            .policies
            .get(&pid)
            .map(|p| p.targets.iter().copied().collect())
            .unwrap_or_default();
        for l in targets {
            self.detach(pid, l);
        }
        let Some(pol) = self.policies.get_mut(&pid) else {
            return BTreeMap::new();
        };
        let rules = take(&mut pol.rules);
        let mut ids = BTreeMap::new();
        for (ri, r) in rules.iter().enumerate() {
            ids.insert((r.dir, r.index), r.id);
            for (pi, part) in r.parts.iter().enumerate() {
                if let Peer::Pods(s) = part.peer {
                    if let Some(e) = self.selectors.get_mut(&s) {
                        e.users.remove(&(pid, ri, pi));
                    }
                    self.release_selector(s);
                }
            }
        }
        ids
    }

    fn target_matches(&self, target: Option<&Selector>, l: u32) -> bool {
        match target {
            // An invalid pod selector selects the whole namespace.
            None => true,
            Some(sel) => self
                .identities
                .get(&l)
                .is_some_and(|i| sel.matches(&i.key.labels)),
        }
    }

    fn attach_matching_policies(&mut self, l: u32) {
        let Some(ns) = self.identities.get(&l).map(|i| i.key.namespace.clone()) else {
            return;
        };
        let pids: Vec<PolicyId> = self
            .policies_by_ns
            .get(&ns)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for pid in pids {
            let target = self.policies.get(&pid).map(|p| p.target.clone());
            if let Some(target) = target
                && self.target_matches(target.as_ref(), l)
            {
                self.attach(pid, l);
            }
        }
    }

    fn attach(&mut self, pid: PolicyId, l: u32) {
        self.attach_or_detach(pid, l, 1);
    }

    fn detach(&mut self, pid: PolicyId, l: u32) {
        self.attach_or_detach(pid, l, -1);
    }

    fn attach_or_detach(&mut self, pid: PolicyId, l: u32, sign: i32) {
        let Some(pol) = self.policies.get_mut(&pid) else {
            return;
        };
        if sign > 0 {
            pol.targets.insert(l);
        } else {
            pol.targets.remove(&l);
        }
        let (ingress, egress) = (u32::from(pol.ingress), u32::from(pol.egress));
        let shape: Vec<usize> = pol.rules.iter().map(|r| r.parts.len()).collect();
        self.touch(l);
        if let Some(st) = self.local_mut(l) {
            if sign > 0 {
                st.selected_by.insert(pid);
                st.ingress += ingress;
                st.egress += egress;
            } else {
                st.selected_by.remove(&pid);
                st.ingress -= ingress;
                st.egress -= egress;
            }
        }
        for (ri, parts) in shape.into_iter().enumerate() {
            for pi in 0..parts {
                self.apply_part(pid, ri, pi, l, None, sign);
            }
        }
        self.mark_cidr_dirty(l);
    }

    /// Adds (`sign` 1) or removes (-1) what one rule part gives local
    /// identity `l`: for all its peers, or only for peer identity `only`.
    fn apply_part(
        &mut self,
        pid: PolicyId,
        ri: usize,
        pi: usize,
        l: u32,
        only: Option<u32>,
        sign: i32,
    ) {
        let mut contribs = take(&mut self.scratch);
        self.part_contribs(pid, ri, pi, l, only, &mut contribs);
        for &(key, rid) in &contribs {
            self.bump(l, key, rid, sign);
        }
        contribs.clear();
        self.scratch = contribs;
    }

    fn part_contribs(
        &self,
        pid: PolicyId,
        ri: usize,
        pi: usize,
        l: u32,
        only: Option<u32>,
        out: &mut Vec<(RuleKey, u32)>,
    ) {
        let Some(rule) = self.policies.get(&pid).and_then(|p| p.rules.get(ri)) else {
            return;
        };
        let Some(part) = rule.parts.get(pi) else {
            return;
        };
        let Some(own) = self.identities.get(&l) else {
            return;
        };
        let (dir, rid) = (rule.dir, rule.id);
        match &part.peer {
            Peer::Any => {
                for l4 in resolve(&part.ports, &own.key.ports) {
                    out.push(((dir, IDENTITY_ANY, l4), rid));
                }
            }
            Peer::Pods(s) => {
                // Ingress named ports resolve on the selected pod, egress
                // ones on each destination.
                let shared = (dir == DIR_INGRESS || part.ports.named.is_empty())
                    .then(|| resolve(&part.ports, &own.key.ports));
                let mut each = |x: u32| {
                    let l4s = match &shared {
                        Some(l4s) => l4s.clone(),
                        None => match self.identities.get(&x) {
                            Some(peer) => resolve(&part.ports, &peer.key.ports),
                            None => Vec::new(),
                        },
                    };
                    for l4 in l4s {
                        out.push(((dir, x, l4), rid));
                    }
                };
                match only {
                    Some(x) => each(x),
                    None => {
                        if let Some(e) = self.selectors.get(s) {
                            for &x in &e.members {
                                each(x);
                            }
                        }
                    }
                }
            }
            // CIDR entries are recomputed per identity at commit.
            Peer::Blocks(_) => {}
        }
    }

    fn local_mut(&mut self, l: u32) -> Option<&mut LocalState> {
        self.identities.get_mut(&l)?.local.as_deref_mut()
    }

    fn local_state_of(&self, pod: &ObjectRef) -> Option<&LocalState> {
        let p = self.pods.get(pod).filter(|p| p.local)?;
        self.identities.get(&p.identity)?.local.as_deref()
    }

    /// Starts tracking `l` in this event (before its first change).
    fn touch(&mut self, l: u32) {
        if self.txn.touched.contains_key(&l) {
            return;
        }
        if let Some(st) = self.identities.get(&l).and_then(|i| i.local.as_deref()) {
            self.txn
                .touched
                .insert(l, Touched::snapshot(st, self.quiet));
        }
    }

    fn mark_cidr_dirty(&mut self, l: u32) {
        self.touch(l);
        if let Some(t) = self.txn.touched.get_mut(&l) {
            t.cidr_dirty = true;
        }
    }

    fn bump(&mut self, l: u32, key: RuleKey, rid: u32, sign: i32) {
        let Some(st) = self
            .identities
            .get_mut(&l)
            .and_then(|i| i.local.as_deref_mut())
        else {
            return;
        };
        let quiet = self.quiet;
        let t = self
            .txn
            .touched
            .entry(l)
            .or_insert_with(|| Touched::snapshot(st, quiet));
        match st.contrib.entry(key) {
            btree_map::Entry::Vacant(v) => {
                if !t.fresh {
                    t.keys.entry(key).or_insert(None);
                }
                debug_assert!(sign > 0, "removing a contribution that was never added");
                if sign > 0 {
                    v.insert(Counts::One { rule: rid, n: 1 });
                }
            }
            btree_map::Entry::Occupied(mut o) => {
                if !t.fresh {
                    t.keys.entry(key).or_insert(Some(o.get().rule_id()));
                }
                if sign > 0 {
                    o.get_mut().add(rid);
                } else if o.get_mut().remove(rid) {
                    o.remove();
                }
            }
        }
    }

    // ----- CIDR groups -----

    /// Recomputes the CIDR part of `l`; returns what it had before, the
    /// groups it held still referenced (for the caller to release).
    fn recompute_cidrs(&mut self, l: u32) -> OldCidrs {
        let Some(ident) = self.identities.get(&l) else {
            return OldCidrs::default();
        };
        let Some(st) = ident.local.as_deref() else {
            return OldCidrs::default();
        };
        let mut grouped = Vec::new();
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let mut rbs = Vec::new();
            for pid in &st.selected_by {
                let Some(pol) = self.policies.get(pid) else {
                    continue;
                };
                for r in pol.rules.iter().filter(|r| r.dir == dir) {
                    for part in &r.parts {
                        if let Peer::Blocks(blocks) = &part.peer {
                            let l4s = if dir == DIR_INGRESS {
                                resolve(&part.ports, &ident.key.ports)
                            } else {
                                part.ports.fixed.clone()
                            };
                            rbs.push(cidr::RuleBlocks {
                                rule_id: r.id,
                                blocks,
                                l4s,
                            });
                        }
                    }
                }
            }
            grouped.push((dir, cidr::group_prefixes(&rbs)));
        }
        let mut cidrs = Vec::new();
        let mut rules = Vec::new();
        let mut held = Vec::new();
        for (dir, prefixes) in grouped {
            let mut done = BTreeSet::new();
            for (net, set) in prefixes {
                let group = if set.is_empty() {
                    0
                } else {
                    let g = self.intern_group(&set);
                    held.push(g);
                    if done.insert(g) {
                        let mut by_l4: BTreeMap<L4, u32> = BTreeMap::new();
                        for &(rid, l4) in &set {
                            by_l4.entry(l4).or_insert(rid);
                        }
                        rules.extend(by_l4.into_iter().map(|(l4, rule_id)| Rule {
                            dir,
                            identity: g,
                            l4,
                            rule_id,
                        }));
                    }
                    g
                };
                cidrs.push(CidrEntry { dir, net, group });
            }
        }
        rules.sort_by_key(|r| (r.dir, r.identity, r.l4));
        match self.local_mut(l) {
            Some(st) => OldCidrs {
                cidrs: std::mem::replace(&mut st.cidrs, cidrs),
                rules: std::mem::replace(&mut st.cidr_rules, rules),
                groups: std::mem::replace(&mut st.groups, held),
            },
            None => OldCidrs {
                groups: held,
                ..OldCidrs::default()
            },
        }
    }

    fn intern_group(&mut self, set: &[(u32, L4)]) -> u32 {
        if let Some((g, refs)) = self.groups.get_mut(set) {
            *refs += 1;
            return *g;
        }
        let g = IDENTITY_CIDR_FLAG | self.group_numbers.alloc();
        self.groups.insert(set.to_vec(), (g, 1));
        self.group_sets.insert(g, set.to_vec());
        g
    }

    fn release_group(&mut self, g: u32) {
        let Some(set) = self.group_sets.get(&g) else {
            return;
        };
        if let Some(entry) = self.groups.get_mut(set) {
            entry.1 -= 1;
            if entry.1 > 0 {
                return;
            }
            self.groups.remove(set);
        }
        self.group_sets.remove(&g);
        self.group_numbers.release(g & !IDENTITY_CIDR_FLAG);
    }

    // ----- events end here -----

    fn diagnose(&mut self, kind: Kind, object: ObjectRef, reason: &str) {
        self.txn.diagnostics.push(Diagnostic {
            kind,
            object,
            reason: reason.to_string(),
        });
    }

    fn commit(&mut self) -> Changes {
        // CIDR parts first: new groups are interned before old ones are
        // released, so a set that survives keeps its group id.
        let dirty: Vec<(u32, bool)> = self
            .txn
            .touched
            .iter()
            .filter(|(_, t)| t.cidr_dirty)
            .map(|(&l, t)| (l, t.fresh))
            .collect();
        let mut old_cidrs: IdMap<u32, OldCidrs> = IdMap::default();
        let mut old_groups = Vec::new();
        for (l, fresh) in dirty {
            let mut old = self.recompute_cidrs(l);
            old_groups.extend(take(&mut old.groups));
            if !fresh {
                old_cidrs.insert(l, old);
            }
        }
        for g in old_groups {
            self.release_group(g);
        }
        let txn = take(&mut self.txn);
        // Collected in a vector and sorted once: inserting thousands of
        // string keys one by one into the map costs more than the event.
        let mut endpoints: Vec<(ObjectRef, EndpointChange)> = txn
            .replaced
            .into_iter()
            .map(|ep| (ep, EndpointChange::Replace))
            .collect();
        for (l, t) in txn.touched {
            let Some(ident) = self.identities.get_mut(&l) else {
                continue;
            };
            let Some(st) = ident.local.as_deref_mut() else {
                continue;
            };
            let change = if t.fresh {
                EndpointChange::Replace
            } else {
                match delta(&t, st, old_cidrs.remove(&l)) {
                    Some(d) => EndpointChange::Update(Arc::new(d)),
                    None => continue,
                }
            };
            st.cached = OnceLock::new();
            endpoints.extend(
                ident
                    .local_pods
                    .iter()
                    .map(|ep| (ep.clone(), change.clone())),
            );
        }
        // A replacement wins over an update of the same endpoint.
        endpoints.sort_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| {
                let rank = |c: &EndpointChange| matches!(c, EndpointChange::Update(_));
                rank(&a.1).cmp(&rank(&b.1))
            })
        });
        endpoints.dedup_by(|later, first| later.0 == first.0);
        let ipcache = txn
            .ips
            .into_iter()
            .filter_map(|(ip, before)| {
                let now = self.ip_identity(ip);
                (now != before).then_some((ip, now))
            })
            .collect();
        Changes {
            endpoints: endpoints.into_iter().collect(),
            ipcache,
            diagnostics: txn.diagnostics,
        }
    }
}

/// What a local identity had in the CIDR map before a recompute.
#[derive(Default)]
struct OldCidrs {
    cidrs: Vec<CidrEntry>,
    rules: Vec<Rule>,
    groups: Vec<u32>,
}

/// What changed for a tracked identity, or `None` if nothing did.
fn delta(t: &Touched, st: &LocalState, old: Option<OldCidrs>) -> Option<PolicyDelta> {
    let (ingress_isolated, egress_isolated) = st.isolation();
    let mut d = PolicyDelta {
        ingress_isolated,
        egress_isolated,
        ..PolicyDelta::default()
    };
    for (&(dir, identity, l4), &before) in &t.keys {
        let now = st.value((dir, identity, l4));
        if now == before {
            continue;
        }
        let rule = |rule_id| Rule {
            dir,
            identity,
            l4,
            rule_id,
        };
        match (before, now) {
            (_, Some(rid)) => d.upsert.push(rule(rid)),
            (Some(rid), None) => d.remove.push(rule(rid)),
            (None, None) => {}
        }
    }
    if let Some(old) = old {
        let key = |r: &Rule| (r.dir, r.identity, r.l4);
        let new_rules: BTreeMap<RuleKey, &Rule> =
            st.cidr_rules.iter().map(|r| (key(r), r)).collect();
        let old_rules: BTreeMap<RuleKey, &Rule> = old.rules.iter().map(|r| (key(r), r)).collect();
        d.remove.extend(
            old.rules
                .iter()
                .filter(|r| !new_rules.contains_key(&key(r)))
                .cloned(),
        );
        d.upsert.extend(
            st.cidr_rules
                .iter()
                .filter(|r| old_rules.get(&key(r)) != Some(r))
                .cloned(),
        );
        let new_cidrs: BTreeMap<_, _> = st.cidrs.iter().map(|c| ((c.dir, c.net), c)).collect();
        let old_cidrs: BTreeMap<_, _> = old.cidrs.iter().map(|c| ((c.dir, c.net), c)).collect();
        d.remove_cidrs.extend(
            old.cidrs
                .iter()
                .filter(|c| !new_cidrs.contains_key(&(c.dir, c.net)))
                .cloned(),
        );
        d.upsert_cidrs.extend(
            st.cidrs
                .iter()
                .filter(|c| old_cidrs.get(&(c.dir, c.net)) != Some(c))
                .cloned(),
        );
    }
    let unchanged = t.isolation == (ingress_isolated, egress_isolated)
        && d.upsert.is_empty()
        && d.remove.is_empty()
        && d.upsert_cidrs.is_empty()
        && d.remove_cidrs.is_empty();
    if unchanged {
        return None;
    }
    let order = |r: &Rule| (r.dir, r.identity, r.l4);
    d.upsert.sort_by_key(order);
    d.remove.sort_by_key(order);
    d.upsert_cidrs.sort_by_key(|c| (c.dir, c.net));
    d.remove_cidrs.sort_by_key(|c| (c.dir, c.net));
    Some(d)
}

// The agent shares the compiler between tasks behind a lock.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<Compiler>();
};

/// Sizes of the compiler's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub pods: usize,
    pub identities: usize,
    pub local_identities: usize,
    pub selectors: usize,
    pub policies: usize,
    pub cidr_groups: usize,
}

fn remove_from_index<K: Eq + std::hash::Hash>(
    index: &mut HashMap<K, BTreeSet<SelId>>,
    key: &K,
    s: SelId,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(&s);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// The L4 matches of `ports` on a pod with these named ports: the fixed
/// ones, plus each named port that the pod has with that protocol (a name
/// that does not resolve gives nothing).
fn resolve(ports: &Ports, table: &NamedPorts) -> Vec<L4> {
    let mut out = ports.fixed.clone();
    for (name, proto) in &ports.named {
        for (n, p, port) in table {
            if n == name && p == proto {
                out.push(L4::Ports {
                    proto: *p,
                    first: *port,
                    last: *port,
                });
            }
        }
    }
    if !ports.named.is_empty() {
        out.sort();
        out.dedup();
    }
    out
}

fn pod_ips(pod: &Pod) -> (Vec<IpAddr>, Vec<String>) {
    let mut ips = Vec::new();
    let mut problems = Vec::new();
    let status = pod.status.as_ref();
    let listed: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    for s in listed {
        match s.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => problems.push(format!("status.podIPs: {s:?} is not an address")),
        }
    }
    (ips, problems)
}

/// Named container ports, including those of sidecar init containers
/// (`restartPolicy: Always`), which serve like containers.
fn named_ports(pod: &Pod) -> (NamedPorts, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return (out, problems);
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    for c in spec.containers.iter().chain(sidecars) {
        for p in c.ports.iter().flatten() {
            let Some(name) = &p.name else {
                continue;
            };
            let proto = match parse::parse_protocol(p.protocol.as_deref()) {
                Ok(proto) => proto,
                Err(e) => {
                    problems.push(format!("container {} port {name}: {e}", c.name));
                    continue;
                }
            };
            let Some(port) = u16::try_from(p.container_port).ok().filter(|&n| n != 0) else {
                problems.push(format!(
                    "container {} port {name}: {} out of range",
                    c.name, p.container_port
                ));
                continue;
            };
            out.push((name.clone(), proto, port));
        }
    }
    out.sort();
    out.dedup();
    (out, problems)
}
