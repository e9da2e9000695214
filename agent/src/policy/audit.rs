//! Audit mode (docs/design.md, "Audit mode"): a NetworkPolicy or
//! ClusterNetworkPolicy annotated `policy.sluice.dev/enforcement: audit` is
//! left out of the compiler whose output is programmed (the enforced view)
//! and compiled, as if enforced, into a second compiler (the audit view)
//! fed the same objects. Each allowed new flow the data path reports is
//! judged by the audit view with the same lookup model as the maps
//! (`Compiler::decision`); where it denies, the flow is one that the audit
//! policies would drop. The view exists only while some policy is in
//! audit mode.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Mutex, MutexGuard},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sluice_common::DIR_INGRESS;

use super::{
    Compiler,
    explain::{DecidedBy, Side},
    verdict::Decision,
};

/// The annotation that selects the mode.
pub const ENFORCEMENT: &str = "policy.sluice.dev/enforcement";

/// How a policy takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Programmed: the data path drops what it denies. No annotation,
    /// `enforce`, or any value that is not `audit` (failing safe: a typo
    /// enforces rather than silently not enforcing).
    Enforce,
    /// Compiled and judged on forwarded flows, never programmed.
    Audit,
}

/// The mode an object's annotations ask for.
pub fn enforcement(meta: &ObjectMeta) -> Enforcement {
    let audit = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENFORCEMENT))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("audit"));
    if audit {
        Enforcement::Audit
    } else {
        Enforcement::Enforce
    }
}

/// What an audit-mode policy would do to a flow the data path allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WouldDrop {
    /// `sluice_common::reason`: policy-denied, admin-denied,
    /// baseline-denied.
    pub reason: u8,
    /// The ClusterNetworkPolicy rule id in the audit view (0: a
    /// NetworkPolicy isolation).
    pub rule: u32,
    /// `ClusterNetworkPolicy` or `NetworkPolicy`.
    pub kind: &'static str,
    /// The policies that would drop it: the ClusterNetworkPolicy (its
    /// name), or the audit-mode NetworkPolicies isolating the endpoint
    /// (`ns/name`).
    pub policies: Vec<String>,
    /// The rule's name (ClusterNetworkPolicy), else empty.
    pub rule_name: String,
    /// `Admin` or `Baseline` for a ClusterNetworkPolicy rule.
    pub tier: Option<&'static str>,
}

struct Inner {
    view: Option<Compiler>,
    /// Audit-mode policies: `NetworkPolicy/ns/name`,
    /// `ClusterNetworkPolicy/name`.
    audited: BTreeSet<String>,
    listener: Option<Box<dyn Fn(bool) + Send>>,
}

/// The audit view, shared by the cluster (which feeds it) and the event
/// loop (which judges flows with it). A std mutex: judging is short, and
/// feeding happens on the blocking pool.
pub struct AuditView(Mutex<Inner>);

impl Default for AuditView {
    fn default() -> Self {
        Self(Mutex::new(Inner {
            view: None,
            audited: BTreeSet::new(),
            listener: None,
        }))
    }
}

impl AuditView {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Is some policy in audit mode (so forwarded flows must be reported)?
    pub fn active(&self) -> bool {
        self.inner().view.is_some()
    }

    /// Called with `active()` now and whenever it changes.
    pub fn set_listener(&self, f: impl Fn(bool) + Send + 'static) {
        let mut g = self.inner();
        f(g.view.is_some());
        g.listener = Some(Box::new(f));
    }

    /// The view to feed (None: no policy in audit mode).
    pub fn with_view<R>(&self, f: impl FnOnce(&mut Compiler) -> R) -> Option<R> {
        self.inner().view.as_mut().map(f)
    }

    /// Installs a freshly built view (`Some`) or drops it (`None`), with the
    /// audit-mode policies it holds.
    pub fn replace(&self, view: Option<Compiler>, audited: BTreeSet<String>) {
        let mut g = self.inner();
        let was = g.view.is_some();
        g.view = view;
        g.audited = audited;
        let now = g.view.is_some();
        if let Some(l) = g.listener.as_ref().filter(|_| was != now) {
            l(now);
        }
    }

    /// Notes the audit-mode policies (the view being kept).
    pub fn set_audited(&self, audited: BTreeSet<String>) {
        self.inner().audited = audited;
    }

    /// Judges an allowed new flow in the audit view: the local endpoint
    /// at `me` in `dir` with the peer at `peer`, protocol and server port.
    /// `None`: no audit view, not a local endpoint there, or allowed.
    pub fn judge(
        &self,
        me: IpAddr,
        dir: u8,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<WouldDrop> {
        let g = self.inner();
        let view = g.view.as_ref()?;
        let Decision::Deny { reason, rule } = view.decision_at(me, dir, peer, proto, port)? else {
            return None;
        };
        let (src, dst) = if dir == DIR_INGRESS {
            (peer, me)
        } else {
            (me, peer)
        };
        let e = view.explain_addrs(src, dst, proto, port);
        let side: Option<&Side> = if dir == DIR_INGRESS {
            e.ingress.as_ref()
        } else {
            e.egress.as_ref()
        };
        let mut out = WouldDrop {
            reason,
            rule,
            kind: "NetworkPolicy",
            policies: Vec::new(),
            rule_name: String::new(),
            tier: None,
        };
        match side.map(|s| &s.decided_by) {
            Some(DecidedBy::Cluster {
                tier, policy, rule, ..
            }) => {
                out.kind = "ClusterNetworkPolicy";
                out.policies = vec![policy.clone()];
                out.rule_name = rule.clone();
                out.tier = Some(tier.name());
            }
            Some(DecidedBy::Isolation { policies }) => {
                let audited: Vec<String> = policies
                    .iter()
                    .filter(|p| g.audited.contains(&format!("NetworkPolicy/{p}")))
                    .cloned()
                    .collect();
                out.policies = if audited.is_empty() {
                    policies.clone()
                } else {
                    audited
                };
            }
            _ => {}
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(v: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            annotations: v.map(|v| BTreeMap::from([(ENFORCEMENT.to_string(), v.to_string())])),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn only_audit_audits_and_anything_else_enforces() {
        assert_eq!(enforcement(&meta(Some("audit"))), Enforcement::Audit);
        assert_eq!(enforcement(&meta(Some(" Audit "))), Enforcement::Audit);
        for v in [
            None,
            Some("enforce"),
            Some(""),
            Some("audits"),
            Some("dry-run"),
        ] {
            assert_eq!(enforcement(&meta(v)), Enforcement::Enforce, "{v:?}");
        }
        let other = ObjectMeta {
            annotations: Some(BTreeMap::from([("x".to_string(), "audit".to_string())])),
            ..ObjectMeta::default()
        };
        assert_eq!(enforcement(&other), Enforcement::Enforce);
    }
}
