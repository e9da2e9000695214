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
//!   prefixes whose groups are written as peer identities (see `cidr`). An
//!   egress named port resolves on each destination pod: per identity for
//!   selectors and for a rule with no peers, per owning pod address (a host
//!   prefix) for ipBlocks; on an address no pod owns it matches nothing.
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
//! output really differs are reported ([`Changes::endpoints`]), to be
//! rewritten whole. [`Compiler::resync`] applies whole lists of objects as
//! one event (the initial sync, a re-list), reporting every endpoint it
//! touches. [`Compiler::recompute_all`] rebuilds everything from the objects,
//! as a check (tests, the conformance model, the bench).
//!
//! # Rooms
//!
//! One struct per file, each readable alone: `identities` (identities and
//! their numbers), `pods` (pods and the ipcache), `selectors` (the selector
//! cache), `repository` (the parsed policies and rule ids), `contributions`
//! (per local identity), `cidr` (CIDR groups), `txn` (what an event touched,
//! and the commit that turns it into [`Changes`]), [`mapstate`] (the map
//! entries of an [`EndpointPolicy`]), [`verdict`] (the lookup model);
//! `events` holds the inputs ([`Resync`], `upsert_*`, `delete_*`).
//! [`Compiler`] owns one of each and moves between them: a method that needs
//! two rooms lives on it or takes the rooms as parameters.
//!
//! # Use
//!
//! ```text
//! let mut c = Compiler::new(Locality::Node(node_name));
//! let changes = c.resync(Resync { namespaces: Some(&ns), pods: Some(&pods), policies: Some(&nps) });
//! // then, per watch event: c.upsert_pod(&pod), c.delete_policy(ns, name), ...
//! for pod in &changes.endpoints {
//!     write_whole(pod, c.endpoint_policy(pod)); // None: gone
//! }
//! for (ip, identity) in &changes.ipcache { /* Some: upsert, None: delete */ }
//! ```
//!
//! The lookup model ([`Compiler::verdict`], [`Compiler::would_allow`]) gives
//! the data path's verdict from these outputs alone.
pub mod audit;
mod cidr;
mod cnp;
mod cnps;
mod contributions;
mod events;
pub mod explain;
mod identities;
pub mod mapstate;
mod parse;
mod patch;
mod pods;
mod profiles;
mod repository;
mod selector;
mod selectors;
mod shares;
#[cfg(test)]
mod tests;
mod tiers;
mod txn;
pub mod verdict;

use std::{collections::BTreeMap, mem::take, net::IpAddr, sync::Arc};

pub use k8s_openapi;

use self::{
    cidr::CidrGroups,
    cnps::CnpStore,
    contributions::{PartRef, RuleKey, part_contribs},
    identities::{Identities, IdentityKey, NamedPorts},
    parse::Peer,
    pods::{PodState, Pods},
    repository::{PolicyId, Repository},
    selector::Selector,
    selectors::{SelId, SelectorCache},
    txn::{Touched, Txn},
};
pub use self::{
    cnps::{CnpRuleOrigin, NodeInfo},
    events::{Restored, Resync},
    mapstate::{
        CidrEntry, Compiled, EndpointPolicy, EntryCount, Fold, L4, PolicyError, Rule, Tier,
        TierRule, canonical, entry_count, fold, lookup, plen_bit, policy_keys, port_blocks,
        port_mask,
    },
    patch::Delta,
    pods::Locality,
    repository::RuleOrigin,
    selector::Labels,
    txn::{Changes, Diagnostic},
};
pub use crate::model::{Identity, Kind, ObjKey, ObjectRef};

/// The cluster as this node's agent sees it, and what it compiles to.
pub struct Compiler {
    locality: Locality,
    empty_labels: Arc<Labels>,
    namespaces: std::collections::HashMap<String, Arc<Labels>>,
    pods: Pods,
    identities: Identities,
    selectors: SelectorCache,
    repo: Repository,
    cnps: CnpStore,
    profiles: profiles::Profiles,
    groups: CidrGroups,
    txn: Txn,
    /// Loading: every touched identity is reported whole, no key tracking.
    quiet: bool,
    /// Reused buffer of `apply_part`.
    scratch: Vec<(RuleKey, u32)>,
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
    pub cluster_policies: usize,
    pub cidr_groups: usize,
    pub profiles: usize,
    pub peer_classes: usize,
}

impl Compiler {
    pub fn new(locality: Locality) -> Self {
        Self {
            locality,
            empty_labels: Arc::new(Labels::new()),
            namespaces: Default::default(),
            pods: Pods::default(),
            identities: Identities::new(),
            selectors: SelectorCache::default(),
            repo: Repository::new(),
            cnps: CnpStore::default(),
            profiles: profiles::Profiles::default(),
            groups: CidrGroups::new(),
            txn: Txn::default(),
            quiet: false,
            scratch: Vec::new(),
        }
    }

    // ----- queries -----

    /// The map contents of a local endpoint (shared by the endpoints of one
    /// identity).
    pub fn endpoint_policy(&self, pod: &ObjectRef) -> Option<Arc<EndpointPolicy>> {
        let p = self.pods.get(pod).filter(|p| p.local)?;
        Some(self.identities.local(p.identity)?.policy())
    }

    /// The shared entries of a ClusterNetworkPolicy profile (peers are
    /// classes), to be compiled with `PROFILE_KEY_FLAG | id` as endpoint.
    pub fn profile_policy(&self, id: u32) -> Option<Arc<EndpointPolicy>> {
        self.profiles.policy(id)
    }

    /// Every live profile id.
    pub fn profile_ids(&self) -> Vec<u32> {
        self.profiles.ids()
    }

    /// The peer class of an identity (`PEER_CLASSES`).
    pub fn peer_class(&self, identity: u32) -> Option<u32> {
        self.profiles.class_of(identity)
    }

    /// Every identity with a peer class.
    pub fn peer_classes(&self) -> BTreeMap<u32, u32> {
        self.profiles.classes()
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

    /// Changes whenever the NetworkPolicies or the local identities they
    /// select may have: when to fetch `isolators` again.
    pub fn np_generation(&self) -> u64 {
        self.repo.generation()
    }

    /// Each local endpoint that a NetworkPolicy isolates, with the policies
    /// that do, [ingress, egress] (sorted; pods of one identity share them).
    pub fn isolators(&self) -> Vec<(ObjectRef, Arc<[Vec<ObjectRef>; 2]>)> {
        let by_identity: rustc_hash::FxHashMap<u32, Arc<[Vec<ObjectRef>; 2]>> = self
            .repo
            .isolators()
            .into_iter()
            .map(|(l, lists)| (l, Arc::new(lists)))
            .collect();
        // From the local identities' pods, not a walk of every pod.
        by_identity
            .iter()
            .filter_map(|(l, lists)| Some((self.identities.get(*l)?, lists)))
            .flat_map(|(ident, lists)| {
                ident
                    .local_pods
                    .iter()
                    .map(move |obj| (obj.clone(), lists.clone()))
            })
            .collect()
    }

    /// Does the policy select a pod of this node?
    pub fn selects_local(&self, policy: &ObjectRef) -> bool {
        self.repo.selects_local(policy)
    }

    /// Is the pod one of this node's endpoints?
    pub fn is_local(&self, pod: &ObjectRef) -> bool {
        self.pods.get(pod).is_some_and(|p| p.local)
    }

    /// The identity of a pod, local or not.
    pub fn identity_of(&self, pod: &ObjectRef) -> Option<Identity> {
        self.pods.get(pod).map(|p| Identity(p.identity))
    }

    /// The addresses of a pod, as the compiler knows them.
    pub fn addresses_of(&self, pod: &ObjectRef) -> Option<&[IpAddr]> {
        self.pods.get(pod).map(|p| p.ips.as_slice())
    }

    /// Identity of a pod address (`None`: not a pod address).
    pub fn ip_identity(&self, ip: IpAddr) -> Option<Identity> {
        self.pods.owner(ip).map(|(_, p)| Identity(p.identity))
    }

    /// The whole ipcache.
    pub fn ipcache(&self) -> BTreeMap<IpAddr, Identity> {
        self.pods
            .addresses()
            .filter_map(|ip| self.ip_identity(ip).map(|id| (ip, id)))
            .collect()
    }

    /// The problems of the policies as they are now.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut out = self.repo.diagnostics();
        out.extend(self.cnp_diagnostics());
        out.sort_by(|a, b| (&a.object, &a.reason).cmp(&(&b.object, &b.reason)));
        out
    }

    pub fn rule_origin(&self, rule_id: u32) -> Option<RuleOrigin> {
        self.repo.rule_origin(rule_id)
    }

    /// Every NetworkPolicy rule id with where it comes from (named in
    /// forwarded flow events).
    pub fn np_rule_origins(&self) -> Vec<(u32, RuleOrigin)> {
        self.repo.rule_origins()
    }

    /// Changes whenever a NetworkPolicy rule id is given or forgotten.
    pub fn np_rule_generation(&self) -> (u32, usize) {
        self.repo.rule_generation()
    }

    /// Sizes, for logs and benches.
    pub fn stats(&self) -> Stats {
        Stats {
            pods: self.pods.len(),
            identities: self.identities.len(),
            local_identities: self.identities.local_count(),
            selectors: self.selectors.len(),
            policies: self.repo.len(),
            cluster_policies: self.cnps.len(),
            cidr_groups: self.groups.len(),
            profiles: self.profiles.len().0,
            peer_classes: self.profiles.len().1,
        }
    }

    // ----- pods and identities -----

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
                .get(old.identity)
                .is_some_and(|i| *i.key == key)
        {
            return;
        }
        self.owners_changed();
        let old_ips = self
            .pods
            .get(&obj)
            .map(|o| o.ips.clone())
            .unwrap_or_default();
        for &ip in old_ips.iter().chain(ips.iter()) {
            self.record_ip(ip);
        }
        let old = self.pods.remove(&obj);
        let id = self.acquire_identity(key, &ips);
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
        self.owners_changed();
        for &ip in &ips {
            self.record_ip(ip);
        }
        let Some(old) = self.pods.remove(obj) else {
            return;
        };
        if old.local {
            self.remove_local_pod(old.identity, obj);
            self.txn.replaced.insert(obj.clone());
        }
        self.release_identity(old.identity);
    }

    /// A pod appears, goes, or changes addresses or named ports: the CIDR
    /// parts that resolve a named port on the owner of an address may
    /// change. Coarse (every identity with such a rule); free without one.
    fn owners_changed(&mut self) {
        for l in self.repo.named_block_targets() {
            self.mark_cidr_dirty(l);
        }
    }

    fn record_ip(&mut self, ip: IpAddr) {
        if !self.txn.ips.contains_key(&ip) {
            let before = self.ip_identity(ip).map(|i| i.0);
            self.txn.ips.insert(ip, before);
        }
    }

    fn acquire_identity(&mut self, key: IdentityKey, ips: &[IpAddr]) -> u32 {
        let (id, hits) = self.identities.acquire(key, ips, &self.selectors);
        for s in hits {
            self.selectors.add_member(s, id);
            self.member_changed(s, id, 1);
        }
        id
    }

    fn release_identity(&mut self, id: u32) {
        let Some(was_in) = self.identities.release(id) else {
            return;
        };
        // Contributions go while the identity (its named ports) is known.
        for s in was_in {
            self.member_changed(s, id, -1);
            self.selectors.remove_member(s, id);
        }
        self.identities.remove(id);
    }

    fn add_local_pod(&mut self, id: u32, obj: &ObjectRef) {
        if !self.identities.add_local_pod(id, obj) {
            return;
        }
        if let Some(st) = self.identities.local(id) {
            self.txn.touched.insert(id, Touched::snapshot(st, true));
        }
        self.attach_matching_policies(id);
        self.attach_matching_cnps(id);
    }

    fn remove_local_pod(&mut self, id: u32, obj: &ObjectRef) {
        let Some(st) = self.identities.remove_local_pod(id, obj) else {
            return;
        };
        for &p in st.selected_by() {
            self.repo.set_target(p, id, false);
        }
        let cnps: Vec<_> = st.cnps().iter().copied().collect();
        self.detach_cnps(id, &cnps);
        for g in st.into_groups() {
            self.groups.release(g);
        }
        self.txn.touched.remove(&id);
    }

    /// Identity `x` joined (`sign` 1) or is leaving (-1) selector `s`:
    /// adjust the local identities whose policies use it.
    fn member_changed(&mut self, s: SelId, x: u32, sign: i32) {
        // A wide peer has thousands of users, most selecting no local
        // identity on a node: start from the side with fewer pairs, the
        // users of `s` or the policies selecting a local identity.
        let work: Vec<(PartRef, u32)> =
            if self.selectors.user_count(s) <= self.repo.targeted_count() {
                self.selectors
                    .users_iter(s)
                    .flat_map(|u| self.repo.targets_iter(u.0).map(move |l| (u, l)))
                    .collect()
            } else {
                self.repo.parts_using(s)
            };
        for (part, l) in work {
            self.apply_part(part, l, Some(x), sign);
        }
        self.cnp_selector_changed(s, x);
    }

    // ----- policies -----

    fn install_policy(&mut self, pid: PolicyId, pol: repository::PolicyState) {
        let ns = pol.object.namespace.clone();
        for (ri, r) in pol.rules.iter().enumerate() {
            for (pi, part) in r.parts.iter().enumerate() {
                if let Peer::Pods(s) = part.peer {
                    self.selectors.add_user(s, (pid, ri, pi));
                }
            }
        }
        let target = pol.target.clone();
        self.repo.insert(pid, pol);
        for l in self.identities.locals_in(&ns) {
            if self.target_matches(target.as_ref(), l) {
                self.attach_or_detach(pid, l, 1);
            }
        }
    }

    /// Detaches a policy from its targets and releases its selectors;
    /// returns its rule ids by (direction, position).
    fn uninstall_policy(&mut self, pid: PolicyId) -> BTreeMap<(u8, usize), u32> {
        for l in self.repo.targets(pid) {
            self.attach_or_detach(pid, l, -1);
        }
        let Some(pol) = self.repo.get_mut(pid) else {
            return BTreeMap::new();
        };
        let rules = take(&mut pol.rules);
        let mut ids = BTreeMap::new();
        for (ri, r) in rules.iter().enumerate() {
            ids.insert((r.dir, r.index), r.id);
            for (pi, part) in r.parts.iter().enumerate() {
                if let Peer::Pods(s) = part.peer {
                    self.selectors.remove_user(s, (pid, ri, pi));
                    self.selectors.release(s, &mut self.identities);
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
                .get(l)
                .is_some_and(|i| sel.matches(&i.key.labels)),
        }
    }

    fn attach_matching_policies(&mut self, l: u32) {
        let Some(ns) = self.identities.get(l).map(|i| i.key.namespace.clone()) else {
            return;
        };
        for pid in self.repo.in_namespace(&ns) {
            let target = self.repo.get(pid).map(|p| p.target.clone());
            if let Some(target) = target
                && self.target_matches(target.as_ref(), l)
            {
                self.attach_or_detach(pid, l, 1);
            }
        }
    }

    /// Policy `pid` starts (`sign` 1) or stops (-1) selecting local
    /// identity `l`.
    fn attach_or_detach(&mut self, pid: PolicyId, l: u32, sign: i32) {
        self.repo.set_target(pid, l, sign > 0);
        let Some(pol) = self.repo.get(pid) else {
            return;
        };
        let (ingress, egress) = (pol.ingress, pol.egress);
        let shape: Vec<usize> = pol.rules.iter().map(|r| r.parts.len()).collect();
        self.touch(l);
        if let Some(st) = self.identities.local_mut(l) {
            st.attach(pid, ingress, egress, sign);
        }
        for (ri, parts) in shape.into_iter().enumerate() {
            for pi in 0..parts {
                self.apply_part((pid, ri, pi), l, None, sign);
            }
        }
        self.mark_cidr_dirty(l);
    }

    /// Adds (`sign` 1) or removes (-1) what one rule part gives local
    /// identity `l`: for all its peers, or only for peer identity `only`.
    fn apply_part(&mut self, part: PartRef, l: u32, only: Option<u32>, sign: i32) {
        let mut contribs = take(&mut self.scratch);
        part_contribs(
            &self.repo,
            &self.identities,
            &self.selectors,
            part,
            l,
            only,
            &mut contribs,
        );
        if let Some(st) = self.identities.local_mut(l) {
            let quiet = self.quiet;
            let t = self
                .txn
                .touched
                .entry(l)
                .or_insert_with(|| Touched::snapshot(st, quiet));
            for &(key, rid) in &contribs {
                t.record(key, st.bump(key, rid, sign));
            }
        }
        contribs.clear();
        self.scratch = contribs;
    }
}
