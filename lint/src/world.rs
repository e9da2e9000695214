//! What the files say about the cluster: namespaces with their labels, pods
//! with labels, addresses and named ports. A namespace that an object uses
//! but no Namespace object defines exists with only the label the API server
//! sets on every namespace (`kubernetes.io/metadata.name`).
use std::{collections::BTreeMap, net::IpAddr};

use sluice_api::files::{DEFAULT_NAMESPACE, Objects};

use crate::selector::{Labels, Selector};

/// The label the API server puts on every namespace.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A container port that has a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub number: i32,
    /// `TCP` (the default), `UDP` or `SCTP`.
    pub protocol: String,
}

#[derive(Clone, Debug)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
}

#[derive(Debug, Default)]
pub struct World {
    /// Namespace name to labels.
    pub namespaces: BTreeMap<String, Labels>,
    /// The namespaces a Namespace object in the files defines (the others'
    /// labels beyond the name label are unknown).
    pub defined: std::collections::BTreeSet<String>,
    pub pods: Vec<PodInfo>,
}

impl World {
    pub fn new(o: &Objects) -> Self {
        let mut w = World::default();
        for ns in &o.namespaces {
            let Some(name) = ns.metadata.name.clone() else {
                continue;
            };
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels.insert(NAME_LABEL.to_owned(), name.clone());
            w.defined.insert(name.clone());
            w.namespaces.insert(name, labels);
        }
        let used = o
            .pods
            .iter()
            .map(|p| &p.metadata)
            .chain(o.network_policies.iter().map(|p| &p.metadata))
            .chain(o.services.iter().map(|s| &s.metadata))
            .filter_map(|m| m.namespace.clone());
        for ns in used {
            w.namespaces
                .entry(ns.clone())
                .or_insert_with(|| Labels::from([(NAME_LABEL.to_owned(), ns)]));
        }
        for p in &o.pods {
            let ips = p
                .status
                .iter()
                .flat_map(|s| {
                    s.pod_ips
                        .iter()
                        .flatten()
                        .map(|i| i.ip.clone())
                        .chain(s.pod_ip.clone())
                })
                .filter_map(|s| s.parse().ok());
            let mut ips: Vec<IpAddr> = ips.collect();
            ips.sort();
            ips.dedup();
            let ports = p
                .spec
                .iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|cp| {
                    Some(NamedPort {
                        name: cp.name.clone()?,
                        number: cp.container_port,
                        protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                    })
                })
                .collect();
            w.pods.push(PodInfo {
                namespace: p
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                name: p.metadata.name.clone().unwrap_or_default(),
                labels: p.metadata.labels.clone().unwrap_or_default(),
                ips,
                ports,
            });
        }
        w
    }

    /// Whether the files hold any pod: the rules that ask "does this select
    /// anything" only speak when they do.
    pub fn has_pods(&self) -> bool {
        !self.pods.is_empty()
    }

    /// Whether the files hold a pod of namespace `ns`.
    pub fn has_pods_in(&self, ns: &str) -> bool {
        self.pods.iter().any(|p| p.namespace == ns)
    }

    /// Whether a namespace `s` matches has a pod in the files.
    pub fn namespaces_with_pods(&self, s: &Selector) -> bool {
        self.pods
            .iter()
            .any(|p| s.matches(&self.ns_labels(&p.namespace)))
    }

    /// The labels of namespace `ns` (the name label alone if unknown).
    pub fn ns_labels(&self, ns: &str) -> Labels {
        self.namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| Labels::from([(NAME_LABEL.to_owned(), ns.to_owned())]))
    }

    /// The pods in a namespace the namespace selector matches (`None`: the
    /// namespace `own`) that the pod selector matches.
    pub fn pods<'a>(
        &'a self,
        ns: NsScope<'a>,
        pod: &'a Selector,
    ) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.pods.iter().filter(move |p| {
            let ns_ok = match ns {
                NsScope::Own(own) => p.namespace == own,
                NsScope::Selected(s) => s.matches(&self.ns_labels(&p.namespace)),
            };
            ns_ok && pod.matches(&p.labels)
        })
    }

    /// Whether `s` matches namespace `ns` whatever labels the files do not
    /// show: for a namespace no Namespace object defines, only a selector
    /// of `In`/`Exists` requirements met by its name label counts (a
    /// `NotIn` or `DoesNotExist` could fail on a label the files omit).
    pub fn ns_surely_matches(&self, s: &Selector, ns: &str) -> bool {
        s.matches(&self.ns_labels(ns)) && (self.defined.contains(ns) || s.is_monotone())
    }

    /// Whether any namespace in the files matches `s`.
    pub fn any_namespace(&self, s: &Selector) -> bool {
        self.namespaces.values().any(|l| s.matches(l))
    }
}

/// Which namespaces a peer or subject means.
#[derive(Clone, Copy, Debug)]
pub enum NsScope<'a> {
    Own(&'a str),
    Selected(&'a Selector),
}
