//! Every object the watches delivered, kept for re-list diffs, the audit
//! view, `explain`, `assert` and `lint --live`. Pods are most of a large
//! cluster (100,000 of 125,000 objects in `bench agent`) and are read back
//! rarely, so they are kept as their JSON (some hundreds of bytes) instead
//! of k8s-openapi structs (some kilobytes: every optional field of a
//! `PodSpec` and `Container` takes room even when absent), and decoded
//! when asked for. The other kinds are kept as they came.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;

use super::watch::Object;
use crate::model::{Kind, ObjKey};

/// One object as kept: a pod as its JSON, any other kind as it came. The
/// watches list pods in this form too, so that a re-list of 100,000 pods
/// is never held decoded all at once (`Cluster::resync` decodes them one
/// at a time for the compiler).
#[derive(Clone, Debug)]
pub enum Kept {
    Pod {
        key: ObjKey,
        /// Its resourceVersion, read without decoding.
        rv: String,
        json: Box<[u8]>,
    },
    Other(Object),
}

impl From<Object> for Kept {
    fn from(o: Object) -> Self {
        match o {
            Object::Pod(p) => match serde_json::to_vec(&p) {
                Ok(json) => Kept::Pod {
                    key: ObjKey::new(Kind::Pod, p.namespace().unwrap_or_default(), p.name_any()),
                    rv: p.metadata.resource_version.clone().unwrap_or_default(),
                    json: json.into_boxed_slice(),
                },
                // A Pod always serializes; were it not to, keep it whole.
                Err(_) => Kept::Other(Object::Pod(p)),
            },
            other => Kept::Other(other),
        }
    }
}

impl Kept {
    pub fn key(&self) -> ObjKey {
        match self {
            Kept::Pod { key, .. } => key.clone(),
            Kept::Other(o) => o.key(),
        }
    }

    pub fn resource_version(&self) -> String {
        match self {
            Kept::Pod { rv, .. } => rv.clone(),
            Kept::Other(o) => o.resource_version(),
        }
    }

    /// Its UID; a pod's read from its JSON without decoding the rest.
    pub fn uid(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Meta {
            uid: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Head {
            metadata: Meta,
        }
        match self {
            Kept::Pod { json, .. } => serde_json::from_slice::<Head>(json).ok()?.metadata.uid,
            Kept::Other(o) => o.uid(),
        }
    }

    /// The object, decoded (a copy).
    pub fn decode(&self) -> Option<Object> {
        match self {
            Kept::Pod { .. } => self.pod().map(|p| Object::Pod(Box::new(p))),
            Kept::Other(o) => Some(o.clone()),
        }
    }

    /// A pod, decoded (a copy); `None` for other kinds.
    pub fn pod(&self) -> Option<Pod> {
        match self {
            Kept::Pod { json, .. } => serde_json::from_slice(json).ok(),
            Kept::Other(Object::Pod(p)) => Some((**p).clone()),
            Kept::Other(_) => None,
        }
    }

    /// An object of a kind kept as it came (not a pod), by reference.
    pub fn other(&self) -> Option<&Object> {
        match self {
            Kept::Other(o) if o.kind() != Kind::Pod => Some(o),
            _ => None,
        }
    }
}

#[derive(Default)]
pub(super) struct Known(BTreeMap<ObjKey, Kept>);

impl Known {
    pub fn insert(&mut self, o: impl Into<Kept>) {
        let kept = o.into();
        self.0.insert(kept.key(), kept);
    }

    pub fn remove(&mut self, key: &ObjKey) {
        self.0.remove(key);
    }

    /// Replaces every object of `kind` with `objects` (a re-list).
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<Kept>) {
        self.0.retain(|k, _| k.kind != kind);
        for o in objects {
            self.insert(o);
        }
    }

    /// The UID of the object kept under `key` (no copy of it).
    pub fn uid(&self, key: &ObjKey) -> Option<String> {
        self.0.get(key)?.uid()
    }

    pub fn contains_key(&self, key: &ObjKey) -> bool {
        self.0.contains_key(key)
    }

    /// One object, decoded (a copy).
    pub fn get(&self, key: &ObjKey) -> Option<Object> {
        self.0.get(key).and_then(Kept::decode)
    }

    /// One object of a kind kept as it came (not a pod), by reference.
    pub fn get_other(&self, key: &ObjKey) -> Option<&Object> {
        self.0.get(key)?.other()
    }

    /// Every object that is not a pod, by reference.
    pub fn others(&self) -> impl Iterator<Item = &Object> {
        // Kind by kind (the key's first part), not through the pods.
        Kind::ALL
            .into_iter()
            .filter(|&k| k != Kind::Pod)
            .flat_map(|kind| {
                self.0
                    .range(ObjKey::new(kind, "", "")..)
                    .take_while(move |(k, _)| k.kind == kind)
            })
            .filter_map(|(_, kept)| kept.other())
    }

    fn pod_entries(&self) -> impl Iterator<Item = (&ObjKey, &Kept)> {
        self.0
            .range(ObjKey::new(Kind::Pod, "", "")..)
            .take_while(|(k, _)| k.kind == Kind::Pod)
    }

    /// Every object of `kind`, as kept.
    pub fn of_kind(&self, kind: Kind) -> Vec<&Kept> {
        self.0
            .range(ObjKey::new(kind, "", "")..)
            .take_while(|(k, _)| k.kind == kind)
            .map(|(_, kept)| kept)
            .collect()
    }

    /// Every pod, decoded one at a time.
    pub fn pods(&self) -> impl Iterator<Item = Pod> + '_ {
        self.pod_entries().filter_map(|(_, kept)| kept.pod())
    }

    /// The pods of a namespace, decoded one at a time.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = Pod> + 'a {
        self.0
            .range(ObjKey::new(Kind::Pod, namespace, "")..)
            .take_while(move |(k, _)| k.kind == Kind::Pod && k.namespace == namespace)
            .filter_map(|(_, kept)| kept.pod())
    }

    /// Every pod's key.
    pub fn pod_keys(&self) -> impl Iterator<Item = ObjKey> + '_ {
        self.pod_entries().map(|(k, _)| k.clone())
    }

    /// Every object's key and resourceVersion, without decoding.
    pub fn versions(&self) -> impl Iterator<Item = (ObjKey, String)> + '_ {
        self.0.values().map(|k| (k.key(), k.resource_version()))
    }

    /// Every object's JSON as the API server serves it.
    pub fn json(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.0.values().filter_map(|k| match k {
            Kept::Pod { json, .. } => serde_json::from_slice(json).ok(),
            Kept::Other(o) => o.to_json().ok(),
        })
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
        let mut other_ns = pod("c", "4");
        if let Object::Pod(p) = &mut other_ns {
            p.metadata.namespace = Some("y".into());
        }
        k.insert(other_ns.clone());
        let names =
            |ns: &str| -> Vec<String> { k.pods_in(ns).filter_map(|p| p.metadata.name).collect() };
        assert_eq!(
            (names("x"), names("y")),
            (vec!["a".into()], vec!["c".into()])
        );
        assert_eq!(names("w"), Vec::<String>::new());
        assert_eq!(
            k.pod_keys().collect::<Vec<_>>(),
            vec![a.key(), other_ns.key()]
        );
        k.replace_kind(Kind::Pod, vec![pod("b", "9").into()]);
        assert!(!k.contains_key(&a.key()));
        assert_eq!(k.versions().count(), 2);
        assert_eq!(k.pod_keys().count(), 1);
        assert_eq!(k.json().count(), 2);
    }
}
