//! Label selectors as the API defines them: `matchLabels` (each `k: v` is
//! `k In (v)`) AND `matchExpressions`; no requirement selects everything.
//!
//! The agent's compiler has its own (`agent/src/policy/selector.rs`), but it
//! lives in the agent crate, whose build script compiles the eBPF programs:
//! depending on it would put a BPF toolchain under a pure lint. This one
//! also answers a question the compiler never asks: does one selector match
//! everything another matches ([`Selector::covers`]).
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

/// The AND of its requirements, sorted and deduplicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// Selects everything (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// The selector, or what makes it invalid (an unknown operator, `In`
    /// without values, `Exists` with values).
    pub fn parse(s: &LabelSelector) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::In(BTreeSet::from([v.clone()])),
            });
        }
        for e in s.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match (e.operator.as_str(), values.is_empty()) {
                ("In", false) => Op::In(values),
                ("NotIn", false) => Op::NotIn(values),
                ("Exists", true) => Op::Exists,
                ("DoesNotExist", true) => Op::DoesNotExist,
                ("In" | "NotIn", true) => {
                    return Err(format!("{}: {} needs values", e.key, e.operator));
                }
                ("Exists" | "DoesNotExist", false) => {
                    return Err(format!("{}: {} takes no values", e.key, e.operator));
                }
                (other, _) => return Err(format!("{}: unknown operator {other:?}", e.key)),
            };
            reqs.push(Requirement {
                key: e.key.clone(),
                op,
            });
        }
        reqs.sort();
        reqs.dedup();
        Ok(Self(reqs))
    }

    pub fn is_everything(&self) -> bool {
        self.0.is_empty()
    }

    /// Only `In` and `Exists` requirements: once it matches a label set,
    /// it matches every superset.
    pub fn is_monotone(&self) -> bool {
        self.0
            .iter()
            .all(|r| matches!(r.op, Op::In(_) | Op::Exists))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::In(set) => v.is_some_and(|v| set.contains(v)),
                Op::NotIn(set) => v.is_none_or(|v| !set.contains(v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }

    /// True if every label set `other` matches is matched by `self` too,
    /// provably: each requirement of `self` follows from one requirement of
    /// `other`. May say false when it is true in a roundabout way (two
    /// requirements of `other` together implying one of `self`); never the
    /// reverse.
    pub fn covers(&self, other: &Selector) -> bool {
        self.0.iter().all(|a| {
            other
                .0
                .iter()
                .any(|b| a.key == b.key && implies(&b.op, &a.op))
        })
    }
}

/// Whether a label satisfying `b` always satisfies `a` (same key).
fn implies(b: &Op, a: &Op) -> bool {
    match (b, a) {
        (Op::In(sb), Op::In(sa)) => sb.is_subset(sa),
        (Op::In(_) | Op::Exists, Op::Exists) => true,
        (Op::In(sb), Op::NotIn(sa)) => sb.is_disjoint(sa),
        (Op::NotIn(sb), Op::NotIn(sa)) => sa.is_subset(sb),
        (Op::DoesNotExist, Op::NotIn(_) | Op::DoesNotExist) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn sel(labels: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> Selector {
        let s = LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            match_expressions: Some(
                exprs
                    .iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: (*k).to_owned(),
                        operator: (*op).to_owned(),
                        values: Some(vs.iter().map(|v| (*v).to_owned()).collect()),
                    })
                    .collect(),
            ),
        };
        Selector::parse(&s).unwrap()
    }

    fn labels(l: &[(&str, &str)]) -> Labels {
        l.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions_are_anded_as_the_api_says() {
        let s = sel(&[("app", "web")], &[("tier", "NotIn", &["db"])]);
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "fe")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[("app", "api")])));
        assert!(sel(&[], &[("x", "DoesNotExist", &[])]).matches(&labels(&[])));
        assert!(!sel(&[], &[("x", "Exists", &[])]).matches(&labels(&[])));
    }

    #[test]
    fn invalid_operators_and_values_are_refused() {
        let bad = |op: &str, vs: &[&str]| {
            let s = LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "k".into(),
                    operator: op.into(),
                    values: Some(vs.iter().map(|v| (*v).to_owned()).collect()),
                }]),
                ..Default::default()
            };
            Selector::parse(&s).is_err()
        };
        assert!(bad("In", &[]));
        assert!(bad("Exists", &["a"]));
        assert!(bad("Equals", &["a"]));
        assert!(!bad("NotIn", &["a"]));
    }

    #[test]
    fn covers_is_provable_inclusion() {
        let all = Selector::everything();
        let web = sel(&[("app", "web")], &[]);
        let web_or_api = sel(&[], &[("app", "In", &["web", "api"])]);
        assert!(all.covers(&web));
        assert!(!web.covers(&all));
        assert!(web_or_api.covers(&web));
        assert!(!web.covers(&web_or_api));
        assert!(sel(&[], &[("app", "Exists", &[])]).covers(&web));
        assert!(sel(&[], &[("app", "NotIn", &["db"])]).covers(&web));
        assert!(!sel(&[], &[("app", "NotIn", &["web"])]).covers(&web));
        assert!(web.covers(&sel(&[("app", "web"), ("x", "y")], &[])));
        assert!(
            sel(&[], &[("a", "NotIn", &["1"])]).covers(&sel(&[], &[("a", "DoesNotExist", &[])]))
        );
    }
}
