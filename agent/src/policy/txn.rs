//! One event as a transaction: what it touched (local identities with the
//! rule keys they had before, addresses with the identity they had, endpoints
//! added, moved or gone), so that the commit reports only what really
//! changed ([`Changes`]).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    mem::take,
    net::IpAddr,
};

use rustc_hash::FxHashMap;

use super::{
    Compiler, cidr,
    contributions::{CidrPart, LocalState, RuleKey},
};
use crate::model::{Identity, ObjKey, ObjectRef};

/// Something in the input that could not be used as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The object (a Namespace's key has an empty namespace).
    pub object: ObjKey,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// What one event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Local endpoints whose [`super::EndpointPolicy`] must be rewritten
    /// (from [`super::Compiler::endpoint_policy`]; `None` there: the
    /// endpoint is gone).
    pub endpoints: BTreeSet<ObjectRef>,
    /// Pod addresses whose identity changed; `None`: no pod has it any more.
    pub ipcache: BTreeMap<IpAddr, Option<Identity>>,
    /// Problems found in the objects of this event.
    pub diagnostics: Vec<Diagnostic>,
    /// ClusterNetworkPolicy profiles whose entries changed (from
    /// [`super::Compiler::profile_policy`]; `None` there: gone).
    pub profiles: BTreeSet<u32>,
    /// Identities whose peer class changed; `None`: no class any more.
    pub classes: BTreeMap<u32, Option<u32>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.diagnostics.is_empty()
            && self.profiles.is_empty()
            && self.classes.is_empty()
    }

    /// Folds a later event's changes into these.
    pub fn merge(&mut self, later: Changes) {
        self.endpoints.extend(later.endpoints);
        self.ipcache.extend(later.ipcache);
        self.diagnostics.extend(later.diagnostics);
        self.profiles.extend(later.profiles);
        self.classes.extend(later.classes);
    }
}

/// What an event touched.
#[derive(Default)]
pub(super) struct Txn {
    pub touched: FxHashMap<u32, Touched>,
    /// Address -> its identity before the event.
    pub ips: HashMap<IpAddr, Option<u32>>,
    /// Endpoints to be rewritten whatever their identity's policy (new,
    /// moved, gone).
    pub replaced: BTreeSet<ObjectRef>,
    pub diagnostics: Vec<Diagnostic>,
    /// Profiles and classes must be settled at commit.
    pub settle: bool,
    /// ClusterNetworkPolicies whose rules or ranks changed.
    pub changed_cnps: BTreeSet<super::cnps::CnpId>,
    /// Identities whose peer class may have changed (`profiles`).
    pub class_dirty: rustc_hash::FxHashSet<u32>,
    /// Every identity's peer class is recomputed.
    pub classes_all: bool,
}

/// A local identity touched by the event.
pub(super) struct Touched {
    /// Became local in this event, or the event is a (re)load: reported
    /// without comparing, so no keys are tracked.
    pub fresh: bool,
    pub cidr_dirty: bool,
    /// The tier part (ClusterNetworkPolicy) must be recomputed.
    pub tiers_dirty: bool,
    /// Rule key -> its rule id before the event.
    keys: FxHashMap<RuleKey, Option<u32>>,
    isolation: (bool, bool),
}

impl Touched {
    pub fn snapshot(st: &LocalState, fresh: bool) -> Self {
        Self {
            fresh,
            cidr_dirty: false,
            tiers_dirty: false,
            keys: FxHashMap::default(),
            isolation: st.isolation(),
        }
    }

    /// Notes the value a key had before its first change in this event.
    pub fn record(&mut self, key: RuleKey, before: Option<u32>) {
        if !self.fresh {
            self.keys.entry(key).or_insert(before);
        }
    }

    /// Does the identity's output differ from before the event? `old_cidrs`:
    /// the CIDR part it had, when that was recomputed.
    pub fn changed(&self, st: &LocalState, old_cidrs: Option<&CidrPart>) -> bool {
        self.fresh
            || self.isolation != st.isolation()
            || self.keys.iter().any(|(&k, &before)| st.value(k) != before)
            || old_cidrs.is_some_and(|old| !st.cidrs_equal(old))
    }
}

impl Compiler {
    /// Starts tracking `l` in this event (before its first change).
    pub(super) fn touch(&mut self, l: u32) {
        if self.txn.touched.contains_key(&l) {
            return;
        }
        if let Some(st) = self.identities.local(l) {
            self.txn
                .touched
                .insert(l, Touched::snapshot(st, self.quiet));
        }
    }

    pub(super) fn mark_cidr_dirty(&mut self, l: u32) {
        self.touch(l);
        if let Some(t) = self.txn.touched.get_mut(&l) {
            t.cidr_dirty = true;
        }
    }

    pub(super) fn diagnose(&mut self, object: ObjKey, reason: &str) {
        self.txn.diagnostics.push(Diagnostic {
            object,
            reason: reason.to_string(),
        });
    }

    /// Recomputes the CIDR part of `l`; returns the part it replaces, whose
    /// groups are still referenced (for the caller to release).
    fn recompute_cidrs(&mut self, l: u32) -> CidrPart {
        let Some(ident) = self.identities.get(l) else {
            return CidrPart::default();
        };
        let Some(st) = ident.local.as_deref() else {
            return CidrPart::default();
        };
        let new = cidr::compute(
            (l, st),
            &ident.key.ports,
            (&self.repo, &self.cnps),
            (&self.pods, &self.identities),
            &mut self.groups,
        );
        match self.identities.local_mut(l) {
            Some(st) => st.replace_cidrs(new),
            None => CidrPart {
                groups: new.groups,
                ..CidrPart::default()
            },
        }
    }

    /// Ends the event: settles the CIDR parts and reports what changed.
    pub(super) fn commit(&mut self) -> Changes {
        // CIDR parts first: new groups are interned before old ones are
        // released, so a set that survives keeps its group id.
        let dirty: Vec<(u32, bool)> = self
            .txn
            .touched
            .iter()
            .filter(|(_, t)| t.cidr_dirty)
            .map(|(&l, t)| (l, t.fresh))
            .collect();
        let mut old_cidrs: FxHashMap<u32, CidrPart> = FxHashMap::default();
        let mut old_groups = Vec::new();
        for (l, fresh) in dirty {
            let mut old = self.recompute_cidrs(l);
            old_groups.extend(take(&mut old.groups));
            if !fresh {
                old_cidrs.insert(l, old);
            }
        }
        for g in old_groups {
            self.groups.release(g);
        }
        let tiers_dirty: Vec<u32> = self
            .txn
            .touched
            .iter()
            .filter(|(_, t)| t.tiers_dirty)
            .map(|(&l, _)| l)
            .collect();
        let mut tiers_changed = rustc_hash::FxHashSet::default();
        for l in tiers_dirty {
            if self.recompute_tiers(l) {
                tiers_changed.insert(l);
            }
        }
        let (profiles, classes) = if self.txn.settle {
            let changed_cnps = take(&mut self.txn.changed_cnps);
            let settled = self.settle_profiles(&changed_cnps);
            for &l in &settled.identities {
                let policy = self
                    .profiles
                    .profile_of(l)
                    .and_then(|p| Some((p, self.profiles.shape_of(p)?)));
                self.touch(l);
                if let Some(st) = self.identities.local_mut(l) {
                    st.set_profile(policy);
                    tiers_changed.insert(l);
                }
            }
            (settled.profiles, settled.classes)
        } else {
            Default::default()
        };
        let txn = take(&mut self.txn);
        // Collected in a vector and sorted once: inserting thousands of
        // string keys one by one into the set costs more than the event.
        let mut endpoints: Vec<ObjectRef> = txn.replaced.into_iter().collect();
        for (l, t) in txn.touched {
            let Some(ident) = self.identities.get_mut(l) else {
                continue;
            };
            let Some(st) = ident.local.as_deref_mut() else {
                continue;
            };
            if !tiers_changed.contains(&l) && !t.changed(st, old_cidrs.get(&l)) {
                continue;
            }
            st.invalidate();
            endpoints.extend(ident.local_pods.iter().cloned());
        }
        endpoints.sort_unstable();
        endpoints.dedup();
        let ipcache = txn
            .ips
            .into_iter()
            .filter_map(|(ip, before)| {
                let now = self.ip_identity(ip);
                (now.map(|i| i.0) != before).then_some((ip, now))
            })
            .collect();
        Changes {
            endpoints: endpoints.into_iter().collect(),
            ipcache,
            diagnostics: txn.diagnostics,
            profiles,
            classes,
        }
    }
}
