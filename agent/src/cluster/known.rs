//! Every object the watches delivered, kept for re-list diffs, the audit
//! view, `explain`, `assert` and `lint --live`. Pods are most of a large
//! cluster (100,000 of 125,000 objects in `bench agent`) and are read back
//! rarely, so they are kept as their JSON (some hundreds of bytes) instead
//! of k8s-openapi structs (some kilobytes: every optional field of a
//! `PodSpec` and `Container` takes room even when absent), and decoded
//! when asked for. The other kinds are kept as they came.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::watch::Object;
use crate::model::{Kind, ObjKey};

enum Stored {
    /// A pod's JSON and its resourceVersion (read without decoding).
    Pod {
        json: Box<[u8]>,
        rv: String,
    },
    Other(Object),
}

#[derive(Default)]
pub(super) struct Known(BTreeMap<ObjKey, Stored>);

impl Known {
    pub fn insert(&mut self, o: Object) {
        let key = o.key();
        let stored = match o {
            Object::Pod(p) => match serde_json::to_vec(&p) {
                Ok(json) => Stored::Pod {
                    rv: o_rv(&p),
                    json: json.into_boxed_slice(),
                },
                // A Pod always serializes; were it not to, keep it whole.
                Err(_) => Stored::Other(Object::Pod(p)),
            },
            other => Stored::Other(other),
        };
        self.0.insert(key, stored);
    }

    pub fn remove(&mut self, key: &ObjKey) {
        self.0.remove(key);
    }

    /// Replaces every object of `kind` with `objects` (a re-list).
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<Object>) {
        self.0.retain(|k, _| k.kind != kind);
        for o in objects {
            self.insert(o);
        }
    }

    pub fn contains_key(&self, key: &ObjKey) -> bool {
        self.0.contains_key(key)
    }

    /// One object, decoded (a copy).
    pub fn get(&self, key: &ObjKey) -> Option<Object> {
        self.0.get(key).and_then(decode)
    }

    /// One object of a kind kept as it came (not a pod), by reference.
    pub fn get_other(&self, key: &ObjKey) -> Option<&Object> {
        match self.0.get(key)? {
            Stored::Other(o) => Some(o),
            Stored::Pod { .. } => None,
        }
    }

    /// Every object, decoded.
    pub fn values(&self) -> impl Iterator<Item = Object> + '_ {
        self.0.values().filter_map(decode)
    }

    /// Every object that is not a pod, by reference.
    pub fn others(&self) -> impl Iterator<Item = &Object> {
        self.0.values().filter_map(|s| match s {
            Stored::Other(o) => Some(o),
            Stored::Pod { .. } => None,
        })
    }

    /// Every pod, decoded.
    pub fn pods(&self) -> impl Iterator<Item = Pod> + '_ {
        self.0.values().filter_map(|s| match decode(s)? {
            Object::Pod(p) => Some(*p),
            _ => None,
        })
    }

    /// Every object's key and resourceVersion, without decoding.
    pub fn versions(&self) -> impl Iterator<Item = (ObjKey, String)> + '_ {
        self.0.iter().map(|(k, s)| {
            let rv = match s {
                Stored::Pod { rv, .. } => rv.clone(),
                Stored::Other(o) => o.resource_version(),
            };
            (k.clone(), rv)
        })
    }

    /// Every object's JSON as the API server serves it.
    pub fn json(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.0.values().filter_map(|s| match s {
            Stored::Pod { json, .. } => serde_json::from_slice(json).ok(),
            Stored::Other(o) => o.to_json().ok(),
        })
    }
}

fn o_rv(p: &Pod) -> String {
    p.metadata.resource_version.clone().unwrap_or_default()
}

fn decode(s: &Stored) -> Option<Object> {
    match s {
        Stored::Pod { json, .. } => serde_json::from_slice::<Pod>(json)
            .ok()
            .map(|p| Object::Pod(Box::new(p))),
        Stored::Other(o) => Some(o.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, rv: &str) -> Object {
        Object::Pod(Box::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "x", "name": name, "resourceVersion": rv,
                             "labels": {"app": name}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c",
                         "ports": [{"name": "http", "containerPort": 80}]}]},
                "status": {"podIP": "10.0.0.1"}
            }))
            .unwrap_or_default(),
        ))
    }

    #[test]
    fn pods_come_back_as_they_went_in_and_other_kinds_by_reference() {
        let mut k = Known::default();
        let a = pod("a", "7");
        k.insert(a.clone());
        k.insert(Object::Namespace(Box::default()));
        assert_eq!(
            k.get(&a.key()).and_then(|o| o.to_json().ok()),
            a.to_json().ok()
        );
        assert_eq!(k.pods().count(), 1);
        assert_eq!(k.others().count(), 1);
        assert!(k.get_other(&a.key()).is_none());
        let versions: Vec<_> = k.versions().collect();
        assert!(versions.contains(&(a.key(), "7".into())), "{versions:?}");
        k.replace_kind(Kind::Pod, vec![pod("b", "9")]);
        assert!(!k.contains_key(&a.key()));
        assert_eq!(k.values().count(), 2);
        assert_eq!(k.json().count(), 2);
    }
}
