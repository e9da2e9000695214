//! Pods as the compiler knows them: their identity, their addresses, and
//! which are endpoints of this node; and the pod addresses (the ipcache),
//! where the last pod to claim an address wins.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Pod;

use super::{identities::NamedPorts, parse};
use crate::model::ObjectRef;

/// Which pods are endpoints of this node.
#[derive(Clone, Debug)]
pub enum Locality {
    /// Every pod (tests, the model).
    All,
    /// Pods whose `spec.nodeName` is this.
    Node(String),
    /// These pods.
    Pods(BTreeSet<ObjectRef>),
}

impl Locality {
    pub(super) fn is_local(&self, pod: &Pod, obj: &ObjectRef) -> bool {
        match self {
            Self::All => true,
            Self::Node(node) => pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| n == node),
            Self::Pods(set) => set.contains(obj),
        }
    }
}

pub(super) struct PodState {
    pub identity: u32,
    pub ips: Vec<IpAddr>,
    pub local: bool,
}

#[derive(Default)]
pub(super) struct Pods {
    pods: HashMap<ObjectRef, PodState>,
    /// Namespace -> the names of its pods.
    by_ns: HashMap<String, BTreeSet<String>>,
    /// Address -> the pods that claim it; the last one wins (an address can
    /// be reused by a new pod before the old one is gone).
    owners: HashMap<IpAddr, Vec<ObjectRef>>,
}

impl Pods {
    pub fn get(&self, pod: &ObjectRef) -> Option<&PodState> {
        self.pods.get(pod)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectRef, &PodState)> {
        self.pods.iter()
    }

    /// The pods of a namespace.
    pub fn in_namespace(&self, ns: &str) -> Vec<ObjectRef> {
        self.by_ns
            .get(ns)
            .map(|s| s.iter().map(|n| ObjectRef::new(ns, n.clone())).collect())
            .unwrap_or_default()
    }

    /// The pod an address belongs to now.
    pub fn owner(&self, ip: IpAddr) -> Option<(&ObjectRef, &PodState)> {
        let owner = self.owners.get(&ip)?.last()?;
        self.pods.get(owner).map(|p| (owner, p))
    }

    /// Every pod address.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.owners.keys().copied()
    }

    pub fn insert(&mut self, obj: ObjectRef, state: PodState) {
        for &ip in &state.ips {
            let owners = self.owners.entry(ip).or_default();
            owners.retain(|o| *o != obj);
            owners.push(obj.clone());
        }
        self.by_ns
            .entry(obj.namespace.clone())
            .or_default()
            .insert(obj.name.clone());
        self.pods.insert(obj, state);
    }

    pub fn remove(&mut self, obj: &ObjectRef) -> Option<PodState> {
        let old = self.pods.remove(obj)?;
        for &ip in &old.ips {
            if let Some(owners) = self.owners.get_mut(&ip) {
                owners.retain(|o| o != obj);
                if owners.is_empty() {
                    self.owners.remove(&ip);
                }
            }
        }
        if let Some(set) = self.by_ns.get_mut(&obj.namespace) {
            set.remove(&obj.name);
            if set.is_empty() {
                self.by_ns.remove(&obj.namespace);
            }
        }
        Some(old)
    }
}

pub(super) fn pod_ips(pod: &Pod) -> (Vec<IpAddr>, Vec<String>) {
    let mut ips = Vec::new();
    let mut problems = Vec::new();
    let status = pod.status.as_ref();
    let listed: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    for s in listed {
        match s.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => problems.push(format!("status.podIPs: {s:?} is not an address")),
        }
    }
    (ips, problems)
}

/// Named container ports, including those of sidecar init containers
/// (`restartPolicy: Always`), which serve like containers.
pub(super) fn named_ports(pod: &Pod) -> (NamedPorts, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return (out, problems);
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    for c in spec.containers.iter().chain(sidecars) {
        for p in c.ports.iter().flatten() {
            let Some(name) = &p.name else {
                continue;
            };
            let proto = match parse::parse_protocol(p.protocol.as_deref()) {
                Ok(proto) => proto,
                Err(e) => {
                    problems.push(format!("container {} port {name}: {e}", c.name));
                    continue;
                }
            };
            let Some(port) = u16::try_from(p.container_port).ok().filter(|&n| n != 0) else {
                problems.push(format!(
                    "container {} port {name}: {} out of range",
                    c.name, p.container_port
                ));
                continue;
            };
            out.push((name.clone(), proto, port));
        }
    }
    out.sort();
    out.dedup();
    (out, problems)
}
