//! Label selectors in a normal form that can be hashed and interned, and the
//! peer selector of a NetworkPolicy (namespace part AND pod part), evaluated
//! against an identity's labels rather than against pods.
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
}

/// Which namespaces a peer selector covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NsMatch {
    /// No `namespaceSelector`: the policy's own namespace.
    Own(String),
    /// A `namespaceSelector` (`{}` = every namespace).
    Labels(Selector),
}

/// One `podSelector`/`namespaceSelector` peer: both parts must match.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSelector {
    pub ns: NsMatch,
    pub pod: Selector,
}

impl PeerSelector {
    /// Every pod of the cluster (`namespaceSelector: {}`).
    pub fn all_pods() -> Self {
        Self {
            ns: NsMatch::Labels(Selector::everything()),
            pod: Selector::everything(),
        }
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
