//! The agent's shared vocabulary: what every other module names things by.
//! Depends on nothing else in the agent. Strings like `Pod/ns/name` exist
//! only where a human or the proto reads them (`Display`).
use std::fmt;

use serde::{Deserialize, Serialize};

/// The kinds of object the agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Node,
    Service,
    /// policy.networking.k8s.io/v1alpha2, cluster-scoped.
    ClusterNetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::Node,
        Kind::Service,
        Kind::ClusterNetworkPolicy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy | Kind::Service)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Namespace and name of a namespaced object whose kind the context gives
/// (a pod, a policy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Any object the agent knows, by kind, namespace (empty for cluster-scoped
/// kinds) and name. Displays as `Kind/ns/name` or `Kind/name`, the form
/// `sluice wait` and the status answer use.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A cluster-scoped object (a Namespace, a Node).
    pub fn cluster_scoped(kind: Kind, name: impl Into<String>) -> Self {
        Self::new(kind, String::new(), name)
    }

    pub fn pod(r: &ObjectRef) -> Self {
        Self::new(Kind::Pod, r.namespace.clone(), r.name.clone())
    }

    /// Namespace and name, without the kind.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(self.namespace.clone(), self.name.clone())
    }

    /// The key `Display` writes (`Kind/ns/name`, or `Kind/name` for a
    /// cluster-scoped kind); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (kind, rest) = text.split_once('/')?;
        let kind = Kind::ALL.into_iter().find(|k| k.name() == kind)?;
        if kind.is_namespaced() {
            let (ns, name) = rest.split_once('/')?;
            (!ns.is_empty() && !name.is_empty() && !name.contains('/'))
                .then(|| Self::new(kind, ns, name))
        } else {
            (!rest.is_empty() && !rest.contains('/')).then(|| Self::cluster_scoped(kind, rest))
        }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A node-local endpoint's number: the key of its POLICY and CIDRS entries,
/// never reused on this node (the registry's counter survives restarts).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct EpId(pub u32);

impl fmt::Display for EpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A security identity: what the data path matches peers by
/// (`sluice_common::IDENTITY_*` and the compiler's numbers).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Identity(pub u32);

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_display_as_the_status_answer_names_them() {
        assert_eq!(
            ObjKey::new(Kind::NetworkPolicy, "x", "p").to_string(),
            "NetworkPolicy/x/p"
        );
        assert_eq!(
            ObjKey::cluster_scoped(Kind::Namespace, "x").to_string(),
            "Namespace/x"
        );
        assert_eq!(
            ObjKey::cluster_scoped(Kind::ClusterNetworkPolicy, "block-metadata").to_string(),
            "ClusterNetworkPolicy/block-metadata"
        );
        assert!(!Kind::ClusterNetworkPolicy.is_namespaced());
    }

    #[test]
    fn object_keys_parse_back_from_what_they_display() {
        for key in [
            ObjKey::new(Kind::NetworkPolicy, "x", "p"),
            ObjKey::new(Kind::Pod, "shop", "web-1"),
            ObjKey::cluster_scoped(Kind::Namespace, "x"),
            ObjKey::cluster_scoped(Kind::ClusterNetworkPolicy, "block-metadata"),
        ] {
            assert_eq!(ObjKey::parse(&key.to_string()), Some(key));
        }
        for bad in [
            "Pod/x",
            "Pod/x/",
            "Namespace/x/y",
            "Widget/x/y",
            "Pod",
            "",
            "Pod/x/y/z",
        ] {
            assert_eq!(ObjKey::parse(bad), None, "{bad}");
        }
    }
}
