//! ClusterNetworkPolicies (policy.networking.k8s.io/v1alpha2, issue 12) as
//! the compiler holds them: each object as received, with what
//! `sluice_api::validate` found wrong with it.
//!
//! For now this only stores and validates: no tier is compiled into
//! endpoint policies yet, so these objects change no verdict. The tier
//! semantics (Admin before NetworkPolicy, Baseline after, priorities, Pass)
//! extend [`Compiler::cluster_policy_event`] and
//! [`Compiler::remove_cluster_policy`]; an invalid policy (non-empty
//! `problems`) must fail closed there: its rules never open traffic.
use std::collections::BTreeMap;

use sluice_api::{ClusterNetworkPolicy, validate};

use super::{Compiler, txn::Diagnostic};
use crate::model::{Kind, ObjKey};

/// One ClusterNetworkPolicy as received.
pub(super) struct ClusterPolicyState {
    pub policy: ClusterNetworkPolicy,
    /// `validate()`'s errors, each `field.path: reason`; not empty: invalid.
    pub problems: Vec<String>,
}

/// Every ClusterNetworkPolicy, by name (they are cluster-scoped).
#[derive(Default)]
pub(super) struct ClusterPolicies {
    by_name: BTreeMap<String, ClusterPolicyState>,
}

impl ClusterPolicies {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn get(&self, name: &str) -> Option<&ClusterPolicyState> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// Stores `state` as `name`; returns what it replaces.
    pub fn insert(
        &mut self,
        name: String,
        state: ClusterPolicyState,
    ) -> Option<ClusterPolicyState> {
        self.by_name.insert(name, state)
    }

    pub fn remove(&mut self, name: &str) -> Option<ClusterPolicyState> {
        self.by_name.remove(name)
    }

    /// The problems of the policies as they are now, by name.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        self.by_name
            .iter()
            .flat_map(|(name, st)| {
                st.problems.iter().map(move |reason| Diagnostic {
                    object: key(name),
                    reason: reason.clone(),
                })
            })
            .collect()
    }
}

fn key(name: &str) -> ObjKey {
    ObjKey::cluster_scoped(Kind::ClusterNetworkPolicy, name)
}

impl Compiler {
    /// A new or changed ClusterNetworkPolicy: validated and stored; each
    /// problem becomes a diagnostic (a Warning Event on the object).
    pub(super) fn cluster_policy_event(&mut self, cnp: &ClusterNetworkPolicy) {
        let Some(name) = cnp.metadata.name.clone() else {
            self.diagnose(key(""), "no metadata.name");
            return;
        };
        let problems: Vec<String> = match validate(&cnp.spec) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        };
        for p in &problems {
            self.diagnose(key(&name), p);
        }
        let state = ClusterPolicyState {
            policy: cnp.clone(),
            problems,
        };
        // Tiers: compile `state` here (and detach what `_replaced` had).
        let _replaced = self.cluster.insert(name, state);
    }

    /// A ClusterNetworkPolicy is gone.
    pub(super) fn remove_cluster_policy(&mut self, name: &str) {
        // Tiers: detach what it had compiled to here.
        let _removed = self.cluster.remove(name);
    }

    /// A ClusterNetworkPolicy as stored, and its validation problems (not
    /// empty: invalid, its rules must never open traffic).
    pub fn cluster_policy(&self, name: &str) -> Option<(&ClusterNetworkPolicy, &[String])> {
        self.cluster
            .get(name)
            .map(|st| (&st.policy, st.problems.as_slice()))
    }

    /// Names of the ClusterNetworkPolicies stored.
    pub fn cluster_policy_names(&self) -> impl Iterator<Item = &String> {
        self.cluster.names()
    }

    /// Does the ClusterNetworkPolicy concern a pod of this node (so that this
    /// node reports its problems)? Its subject is not evaluated yet: every
    /// node with local endpoints answers yes.
    pub fn cluster_policy_selects_local(&self, _name: &str) -> bool {
        self.endpoints().next().is_some()
    }
}
