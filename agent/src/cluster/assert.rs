//! What `sluice assert` asks of the cluster view: the pods a selector
//! names (cluster-wide) and the address a probe's target stands for.
use std::{collections::BTreeMap, net::IpAddr};

use kube::ResourceExt as _;

use super::Cluster;
use crate::model::{Kind, ObjKey, ObjectRef};

impl Cluster {
    /// `ns/name` of the pods in `namespace` whose labels include all of
    /// `labels`, sorted; only pods the compiler has (a finished or
    /// host-network pod is no pod for policy, nor a probe's source).
    pub fn pods_matching(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let mut out: Vec<String> = self
            .known
            .pods()
            .filter(|p| p.namespace().as_deref() == Some(namespace))
            .filter(|p| {
                let have = p.labels();
                labels.iter().all(|(k, v)| have.get(k) == Some(v))
            })
            .map(|p| ObjectRef::new(namespace, p.name_any()))
            .filter(|o| self.compiler.identity_of(o).is_some())
            .map(|o| o.to_string())
            .collect();
        out.sort();
        out
    }

    /// The addresses `to` stands for: a pod's (`ns/name`), a Service's
    /// ClusterIPs (`svc/ns/name`). `None`: not known.
    pub fn target_addresses(&self, to: &str) -> Option<Vec<IpAddr>> {
        match to.strip_prefix("svc/") {
            Some(rest) => {
                let (ns, name) = rest.split_once('/')?;
                self.services
                    .get(&ObjKey::new(Kind::Service, ns.to_owned(), name.to_owned()))
                    .cloned()
            }
            None => {
                let (ns, name) = to.split_once('/')?;
                self.compiler
                    .addresses_of(&ObjectRef::new(ns, name))
                    .map(<[IpAddr]>::to_vec)
            }
        }
    }
}

/// Of `candidates`, the address of the family `v6` says, else any.
pub fn pick_address(candidates: &[IpAddr], v6: bool) -> Option<IpAddr> {
    candidates
        .iter()
        .find(|ip| ip.is_ipv6() == v6)
        .or_else(|| candidates.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_asked_for_is_picked_first() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(pick_address(&[v6, v4], false), Some(v4));
        assert_eq!(pick_address(&[v4, v6], true), Some(v6));
        assert_eq!(pick_address(&[v6], false), Some(v6));
        assert_eq!(pick_address(&[], false), None);
    }
}
