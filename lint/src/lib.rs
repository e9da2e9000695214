//! `sluice lint`: findings on NetworkPolicies and ClusterNetworkPolicies
//! read from files (see [`sluice_api::files`]), each with a rule id, a
//! severity, the object, a message and a one-line fix.
//!
//! Pure: [`lint`] takes the objects and returns the findings; reading files
//! and printing are the caller's. "Within the files" is the world: a
//! selector matches what the files' Namespaces and Pods say, and the rules
//! that ask whether a selector matches anything (or which pods a named port
//! or an ipBlock meets) say nothing when the files hold no Pod at all, since
//! a policy directory alone says nothing about the pods.
//!
//! The rules that reason about one rule hiding another
//! ([`RULES`] `cnp-rule-shadowed`, `np-denied-by-admin`) report only what
//! they can prove: a wider or equal selector, identical or wider peers and
//! ports. A finding is then certain; silence is not a proof of absence.
mod cidr;
mod cnp;
mod netpol;
pub mod selector;
pub mod world;

use std::fmt;

use serde::Serialize;
use sluice_api::files::{ObjectRef, Objects, Origin};

pub use world::World;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule: its id, its usual severity and what it looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub id: &'static str,
    pub severity: Severity,
    pub summary: &'static str,
}

/// Every rule, in the order of docs/lint.md.
pub const RULES: &[Rule] = &[
    rule(
        "two-item-peer",
        Severity::Warning,
        "a namespaceSelector item and a podSelector item side by side in from/to: two peers (OR), usually meant as one (AND)",
    ),
    rule(
        "policy-selects-nothing",
        Severity::Warning,
        "the policy's podSelector (or ClusterNetworkPolicy subject) matches no pod in the files",
    ),
    rule(
        "peer-selects-nothing",
        Severity::Warning,
        "a peer's selectors match no pod in the files",
    ),
    rule(
        "named-port-unexposed",
        Severity::Warning,
        "a named port that no pod it applies to declares with that protocol",
    ),
    rule(
        "egress-without-dns",
        Severity::Warning,
        "egress is isolated and nothing allows DNS (UDP or TCP 53)",
    ),
    rule(
        "allow-all-rule",
        Severity::Warning,
        "a rule with no peers and no ports (`ingress: [{}]`) allows everything in its direction",
    ),
    rule(
        "policy-types-surprise",
        Severity::Warning,
        "policyTypes, written or inferred, disagree with the rules present",
    ),
    rule(
        "ipblock-covers-pods",
        Severity::Warning,
        "an ipBlock contains pod addresses from the files; pod traffic is matched by selectors",
    ),
    rule(
        "except-outside-cidr",
        Severity::Error,
        "an ipBlock `except` entry that is not inside its `cidr` (or a CIDR that does not parse)",
    ),
    rule(
        "invalid-object",
        Severity::Error,
        "a selector or ClusterNetworkPolicy field the API server or Sluice rejects",
    ),
    rule(
        "cnp-rule-shadowed",
        Severity::Warning,
        "a ClusterNetworkPolicy rule that an earlier rule always decides first (info when both have the same action)",
    ),
    rule(
        "np-denied-by-admin",
        Severity::Warning,
        "every rule of a NetworkPolicy allows only traffic an Admin-tier Deny drops first",
    ),
];

const fn rule(id: &'static str, severity: Severity, summary: &'static str) -> Rule {
    Rule {
        id,
        severity,
        summary,
    }
}

/// The rule with id `id`.
pub fn rule_by_id(id: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.id == id)
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub severity: Severity,
    /// The object, as `Kind/namespace/name` (or `Kind/name`).
    #[serde(serialize_with = "display")]
    pub object: ObjectRef,
    /// Where in the object, as a field path (`spec.ingress[0].from[1]`).
    pub path: String,
    pub message: String,
    /// One line: what to change.
    pub fix: String,
    /// Where the object was read, if known.
    #[serde(skip)]
    pub origin: Option<Origin>,
}

fn display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Collects findings; rules call [`Sink::push`].
pub(crate) struct Sink<'a> {
    objects: &'a Objects,
    pub(crate) out: Vec<Finding>,
}

impl Sink<'_> {
    pub(crate) fn push(
        &mut self,
        rule: &'static str,
        object: ObjectRef,
        path: String,
        message: String,
        fix: String,
    ) {
        let severity = rule_by_id(rule).map_or(Severity::Warning, |r| r.severity);
        self.push_at(rule, severity, object, path, message, fix);
    }

    pub(crate) fn push_at(
        &mut self,
        rule: &'static str,
        severity: Severity,
        object: ObjectRef,
        path: String,
        message: String,
        fix: String,
    ) {
        let origin = self.objects.origins.get(&object).cloned();
        self.out.push(Finding {
            rule,
            severity,
            object,
            path,
            message,
            fix,
            origin,
        });
    }
}

/// All findings on `objects`, sorted by object, then path, then rule.
pub fn lint(objects: &Objects) -> Vec<Finding> {
    let world = World::new(objects);
    let mut sink = Sink {
        objects,
        out: Vec::new(),
    };
    netpol::check(&mut sink, &world, objects);
    cnp::check(&mut sink, &world, objects);
    let mut out = sink.out;
    out.sort_by(|a, b| {
        (&a.object, &a.path, a.rule, &a.message).cmp(&(&b.object, &b.path, b.rule, &b.message))
    });
    out.dedup();
    out
}

/// The worst severity among `findings`.
pub fn worst(findings: &[Finding]) -> Option<Severity> {
    findings.iter().map(|f| f.severity).max()
}
