//! Feeding the audit view (`policy::audit`): the same objects as the
//! enforced compiler, with audit-mode policies included as if enforced.
//! Built from the known objects when the first policy enters audit mode,
//! dropped when the last one leaves it; every change in between is fed to
//! both compilers in the same pass, so a policy switched from audit to
//! enforce is in the enforced compiler's output of the pass that sees the
//! switch (no window in which neither view judges it).
use std::collections::{BTreeSet, HashSet};

use k8s_openapi::api::{
    core::v1::{Namespace, Node},
    networking::v1::NetworkPolicy,
};
use kube::ResourceExt as _;
use sluice_api::ClusterNetworkPolicy;

use super::{
    Cluster, Object, is_audit,
    resync::{listed, resync_pods},
    watch::Kept,
};
use crate::{
    model::{Kind, ObjKey},
    policy::{Compiler, Locality, Resync},
};

impl Cluster {
    /// The audit-mode policies known: `NetworkPolicy/ns/name`,
    /// `ClusterNetworkPolicy/name`.
    fn audited(&self) -> BTreeSet<String> {
        self.known
            .others()
            .filter(|o| is_audit(o))
            .map(|o| match o {
                Object::NetworkPolicy(p) => format!(
                    "NetworkPolicy/{}/{}",
                    p.namespace().unwrap_or_default(),
                    p.name_any()
                ),
                other => format!("ClusterNetworkPolicy/{}", other.key().name),
            })
            .collect()
    }

    /// After a batch: builds the view when a policy is in audit mode and
    /// there is none, drops it when none is.
    pub(super) fn keep_audit_view(&mut self) {
        let audited = self.audited();
        if audited.is_empty() {
            if self.audit.active() {
                tracing::info!("no policy in audit mode: audit view dropped");
                self.audit.replace(None, audited);
            }
            return;
        }
        if self.audit.active() {
            self.audit.set_audited(audited);
            return;
        }
        tracing::info!(policies = ?audited, "policies in audit mode: audit view built");
        let view = self.build_audit_view();
        self.audit.replace(Some(view), audited);
    }

    fn build_audit_view(&self) -> Compiler {
        let mut c = Compiler::new(Locality::Node(self.node_name.clone()));
        let (mut namespaces, mut policies, mut cnps, mut nodes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for o in self.known.others() {
            match o {
                Object::Namespace(n) => namespaces.push((**n).clone()),
                Object::NetworkPolicy(p) => policies.push((**p).clone()),
                Object::ClusterNetworkPolicy(p) => cnps.push((**p).clone()),
                Object::Node(n) => nodes.push((**n).clone()),
                Object::Pod(_) | Object::Service(_) => {}
            }
        }
        // As one resync orders them: namespaces, pods (one at a time, as
        // kept), then what selects them.
        let _not_programmed = c.resync(Resync {
            namespaces: Some(&namespaces),
            ..Resync::default()
        });
        let keys: Vec<ObjKey> = self.known.pod_keys().collect();
        let listed: HashSet<(&str, &str)> = keys
            .iter()
            .map(|k| (k.namespace.as_str(), k.name.as_str()))
            .collect();
        let pods = self.known.pods().map(|p| self.cni_ips.fill(p));
        let _not_programmed = c.resync_pods(&listed, pods);
        let _not_programmed = c.resync(Resync {
            policies: Some(&policies),
            cluster_policies: Some(&cnps),
            nodes: Some(&nodes),
            ..Resync::default()
        });
        c
    }

    /// One watched change, fed to the view as it is (audit mode or not).
    pub(super) fn feed_audit_view(&mut self, o: &Object, deleted: bool) {
        if !self.audit.active() {
            return;
        }
        let pod = match o {
            Object::Pod(p) if !deleted => Some(self.cni_ips.fill((**p).clone())),
            _ => None,
        };
        let _not_programmed = self.audit.with_view(|v| match (o, deleted) {
            (Object::Pod(_), false) => pod.as_ref().map(|p| v.upsert_pod(p)),
            (Object::Pod(p), true) => {
                Some(v.delete_pod(&p.namespace().unwrap_or_default(), &p.name_any()))
            }
            (Object::Namespace(n), false) => Some(v.upsert_namespace(n)),
            (Object::Namespace(n), true) => Some(v.delete_namespace(&n.name_any())),
            (Object::NetworkPolicy(p), false) => Some(v.upsert_policy(p)),
            (Object::NetworkPolicy(p), true) => {
                Some(v.delete_policy(&p.namespace().unwrap_or_default(), &p.name_any()))
            }
            (Object::Node(n), false) => Some(v.upsert_node(n)),
            (Object::Node(n), true) => Some(v.delete_node(&n.name_any())),
            (Object::ClusterNetworkPolicy(c), false) => Some(v.upsert_cluster_policy(c)),
            (Object::ClusterNetworkPolicy(c), true) => Some(v.delete_cluster_policy(&c.name_any())),
            (Object::Service(_), _) => None,
        });
    }

    /// A (re)list of one kind, fed to the view unfiltered.
    pub(super) fn resync_audit_view(&mut self, kind: Kind, objects: &[Kept]) {
        if !self.audit.active() {
            return;
        }
        if kind == Kind::Pod {
            let cni_ips = &self.cni_ips;
            let _not_programmed = self.audit.with_view(|v| resync_pods(v, cni_ips, objects));
            return;
        }
        let namespaces: Vec<Namespace> = listed(objects, |o| match o {
            Object::Namespace(n) => Some((**n).clone()),
            _ => None,
        });
        let policies: Vec<NetworkPolicy> = listed(objects, |o| match o {
            Object::NetworkPolicy(p) => Some((**p).clone()),
            _ => None,
        });
        let cnps: Vec<ClusterNetworkPolicy> = listed(objects, |o| match o {
            Object::ClusterNetworkPolicy(c) => Some((**c).clone()),
            _ => None,
        });
        let nodes: Vec<Node> = listed(objects, |o| match o {
            Object::Node(n) => Some((**n).clone()),
            _ => None,
        });
        let r = match kind {
            Kind::Namespace => Resync {
                namespaces: Some(&namespaces),
                ..Resync::default()
            },
            Kind::NetworkPolicy => Resync {
                policies: Some(&policies),
                ..Resync::default()
            },
            Kind::ClusterNetworkPolicy => Resync {
                cluster_policies: Some(&cnps),
                ..Resync::default()
            },
            Kind::Node => Resync {
                nodes: Some(&nodes),
                ..Resync::default()
            },
            Kind::Pod | Kind::Service => return,
        };
        let _not_programmed = self.audit.with_view(|v| v.resync(r));
    }
}
