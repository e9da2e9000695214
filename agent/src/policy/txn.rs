//! One event as a transaction: what it touched (local identities with the
//! rule keys they had before, addresses with the identity they had, endpoints
//! added, moved or gone), so that the commit reports only what really
//! changed ([`Changes`]).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
};

use rustc_hash::FxHashMap;

use super::contributions::{CidrPart, LocalState, RuleKey};
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
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.ipcache.is_empty() && self.diagnostics.is_empty()
    }

    /// Folds a later event's changes into these.
    pub fn merge(&mut self, later: Changes) {
        self.endpoints.extend(later.endpoints);
        self.ipcache.extend(later.ipcache);
        self.diagnostics.extend(later.diagnostics);
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
}

/// A local identity touched by the event.
pub(super) struct Touched {
    /// Became local in this event, or the event is a (re)load: reported
    /// without comparing, so no keys are tracked.
    pub fresh: bool,
    pub cidr_dirty: bool,
    /// Rule key -> its rule id before the event.
    keys: FxHashMap<RuleKey, Option<u32>>,
    isolation: (bool, bool),
}

impl Touched {
    pub fn snapshot(st: &LocalState, fresh: bool) -> Self {
        Self {
            fresh,
            cidr_dirty: false,
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
