//! Label selectors as the API defines them (`matchLabels`, each `k: v` being
//! `k In (v)`, AND `matchExpressions`), in a normal form that can be hashed
//! and interned: the agent's compiler evaluates them against identities'
//! labels, `sluice lint` also asks whether one covers another. No
//! requirement selects everything.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

/// The AND of its requirements, sorted and deduplicated so that equal
/// selectors compare equal. No requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    pub fn everything() -> Self {
        Self(Vec::new())
    }

    /// `matchLabels` (each `k: v` is `k In (v)`) AND `matchExpressions`, as
    /// the API server validates them; the error says what is wrong.
    pub fn parse(s: &LabelSelector) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            check_key(k)?;
            check_value(v).map_err(|e| format!("matchLabels {k}: {e}"))?;
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::In(BTreeSet::from([v.clone()])),
            });
        }
        for e in s.match_expressions.iter().flatten() {
            check_key(&e.key)?;
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            for v in &values {
                check_value(v).map_err(|err| format!("matchExpressions {}: {err}", e.key))?;
            }
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {}: operator {} needs at least one value",
                        e.key, e.operator
                    ));
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {}: operator {} takes no values",
                        e.key, e.operator
                    ));
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(format!(
                        "matchExpressions {}: unknown operator {other:?}",
                        e.key
                    ));
                }
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

    /// Its requirements, sorted (`sluice explain` names the ones that fail).
    pub fn requirements(&self) -> &[Requirement] {
        &self.0
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| Self::requirement_holds(r, labels))
    }

    pub fn requirement_holds(r: &Requirement, labels: &Labels) -> bool {
        let v = labels.get(&r.key);
        match &r.op {
            Op::In(set) => v.is_some_and(|v| set.contains(v)),
            Op::NotIn(set) => v.is_none_or(|v| !set.contains(v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
        }
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

    /// True if every label set `other` matches is matched by `self` too,
    /// provably: each requirement of `self` follows from one requirement of
    /// `other`. May say false when it is true in a roundabout way (two
    /// requirements of `other` together implying one of `self`); never the
    /// reverse (`sluice lint`'s shadowing rules).
    pub fn covers(&self, other: &Selector) -> bool {
        self.0.iter().all(|a| {
            other
                .0
                .iter()
                .any(|b| a.key == b.key && implies(&b.op, &a.op))
        })
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!("label key {key:?}: bad prefix"));
        }
    }
    if name.is_empty() || !is_label_name(name) {
        return Err(format!("label key {key:?} is not a valid name"));
    }
    Ok(())
}

fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(format!("label value {v:?} is not valid"))
    }
}

/// At most 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
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
