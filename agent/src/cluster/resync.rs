//! A (re)list of one kind, fed to the compiler: one load path, whatever
//! the kind. Objects the list no longer has are gone. Pods come compact
//! (`Kept`) and are decoded one at a time on the way in, so a list of
//! 100,000 pods never exists as k8s-openapi structs all at once (some
//! kilobytes each, most of the agent's peak memory when it did).
use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, PodIP, PodStatus},
    networking::v1::NetworkPolicy,
};
use kube::ResourceExt as _;
use sluice_api::ClusterNetworkPolicy;

use super::{Cluster, Object, is_audit, watch::Kept};
use crate::{
    model::{Kind, ObjKey, ObjectRef},
    policy::{Changes, Compiler, Resync},
};

/// The addresses the CNI gave this node's pods, by pod, for pods whose
/// status does not show them yet (kubelet reports them only after ADD
/// returns). Kept by name, as the plugin names the pod: so only a pod of
/// this node is given them (a pod of the same name elsewhere, re-created
/// there, has other addresses), and a pod's are forgotten with the
/// endpoint that got them.
#[derive(Debug)]
pub(super) struct CniIps {
    node: String,
    by_pod: BTreeMap<ObjectRef, Vec<IpAddr>>,
}

impl CniIps {
    pub(super) fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            by_pod: BTreeMap::new(),
        }
    }

    pub(super) fn learn(&mut self, pod: &ObjectRef, ips: Vec<IpAddr>) {
        self.by_pod.insert(pod.clone(), ips);
    }

    /// Forgets `pod`'s addresses if they are `ips` (a newer endpoint of the
    /// pod, whose ADD came before the old one's DEL, keeps its own).
    pub(super) fn forget(&mut self, pod: &ObjectRef, ips: &[IpAddr]) {
        if self
            .by_pod
            .get(pod)
            .is_some_and(|kept| kept.as_slice() == ips)
        {
            self.by_pod.remove(pod);
        }
    }

    /// `pod` with the addresses the CNI gave it filled in when it runs on
    /// this node and its status has none yet.
    pub(super) fn fill(&self, mut pod: Pod) -> Pod {
        let here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node);
        let has_ips = pod.status.as_ref().is_some_and(|s| {
            s.pod_ips.as_ref().is_some_and(|v| !v.is_empty()) || s.pod_ip.is_some()
        });
        if !here || has_ips {
            return pod;
        }
        let obj = ObjectRef::new(pod.namespace().unwrap_or_default(), pod.name_any());
        if let Some(ips) = self.by_pod.get(&obj) {
            let status = pod.status.get_or_insert_with(PodStatus::default);
            status.pod_ip = ips.first().map(ToString::to_string);
            status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
        }
        pod
    }
}

/// Feeds a list of pods to `compiler`, decoding one pod at a time.
pub(super) fn resync_pods<K: Borrow<Kept>>(
    compiler: &mut Compiler,
    cni_ips: &CniIps,
    objects: &[K],
) -> Changes {
    let keys: Vec<ObjKey> = objects.iter().map(|k| k.borrow().key()).collect();
    let listed: HashSet<(&str, &str)> = keys
        .iter()
        .map(|k| (k.namespace.as_str(), k.name.as_str()))
        .collect();
    let pods = objects
        .iter()
        .filter_map(|k| k.borrow().pod())
        .map(|p| cni_ips.fill(p));
    compiler.resync_pods(&listed, pods)
}

/// The objects of a list (not pods) that `pick` takes.
pub(super) fn listed<K: Borrow<Kept>, T>(
    objects: &[K],
    pick: impl Fn(&Object) -> Option<T>,
) -> Vec<T> {
    objects
        .iter()
        .filter_map(|k| k.borrow().other())
        .filter_map(pick)
        .collect()
}

impl Cluster {
    /// The first time every kind is listed: everything known goes to the
    /// compiler at once, in an order where each object finds what it
    /// depends on already in (a pod its namespace's labels, a
    /// ClusterNetworkPolicy every pod), so that each identity, class and
    /// profile is made once, with its final key, and takes back the
    /// number it had before a restart (`Compiler::restore`).
    pub(super) fn feed_all(&mut self) -> Changes {
        let known = std::mem::take(&mut self.known);
        let mut out = Changes::default();
        for kind in [
            Kind::Namespace,
            Kind::Node,
            Kind::Service,
            Kind::Pod,
            Kind::NetworkPolicy,
            Kind::ClusterNetworkPolicy,
        ] {
            out.merge(self.resync(kind, &known.of_kind(kind)));
        }
        self.known = known;
        self.compiler.forget_restored();
        out
    }

    /// A (re)list of one kind.
    pub(super) fn resync<K: Borrow<Kept>>(&mut self, kind: Kind, objects: &[K]) -> Changes {
        match kind {
            Kind::Namespace => {
                let list: Vec<Namespace> = listed(objects, |o| match o {
                    Object::Namespace(n) => Some((**n).clone()),
                    _ => None,
                });
                self.compiler.resync(Resync {
                    namespaces: Some(&list),
                    ..Resync::default()
                })
            }
            Kind::Pod => resync_pods(&mut self.compiler, &self.cni_ips, objects),
            Kind::NetworkPolicy => {
                let list: Vec<NetworkPolicy> = listed(objects, |o| match o {
                    Object::NetworkPolicy(p) if !is_audit(o) => Some((**p).clone()),
                    _ => None,
                });
                self.compiler.resync(Resync {
                    policies: Some(&list),
                    ..Resync::default()
                })
            }
            Kind::ClusterNetworkPolicy => {
                let list: Vec<ClusterNetworkPolicy> = listed(objects, |o| match o {
                    Object::ClusterNetworkPolicy(c) if !is_audit(o) => Some((**c).clone()),
                    _ => None,
                });
                self.compiler.resync(Resync {
                    cluster_policies: Some(&list),
                    ..Resync::default()
                })
            }
            Kind::Node => {
                self.peers.clear();
                let mut list = Vec::new();
                for o in objects.iter().filter_map(|k| k.borrow().other()) {
                    if let Object::Node(n) = o {
                        self.node_seen(n);
                        list.push((**n).clone());
                    }
                }
                self.compiler.resync(Resync {
                    nodes: Some(&list),
                    ..Resync::default()
                })
            }
            Kind::Service => {
                self.services = objects
                    .iter()
                    .filter_map(|k| k.borrow().other())
                    .filter_map(|o| match o {
                        Object::Service(s) => Some((o.key(), super::cluster_ips(s))),
                        _ => None,
                    })
                    .collect();
                Changes::default()
            }
        }
    }
}
