//! The compiler's inputs: one watch event per call (`upsert_*`, `delete_*`),
//! or whole lists at once ([`Resync`]). Each call is one transaction and
//! returns its [`Changes`].
use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use std::sync::Arc;

use super::{
    Changes, Compiler,
    parse::{Part, Peer, parse_policy},
    pods::{named_ports, pod_ips},
    repository::{PolicyState, RuleState},
};
use crate::model::{Kind, ObjKey, ObjectRef};

/// The numbers the data path holds from a previous run: the identity of
/// each address (IPCACHE), the peer class of each identity
/// (PEER_CLASSES), the profile of each local identity (TIER_PROFILES
/// through its endpoints), the CIDR group of each of their prefixes.
#[derive(Debug, Default)]
pub struct Restored {
    pub identities: Vec<(IpAddr, u32)>,
    pub classes: Vec<(u32, u32)>,
    pub profiles: Vec<(u32, u32)>,
    /// (local identity, direction, prefix, CIDR group) (CIDRS through
    /// the endpoints).
    pub cidr_groups: Vec<(u32, u8, IpNetwork, u32)>,
}

/// Whole lists of objects, as a (re)list gives them. For each kind given,
/// objects not in its list are deleted and the listed ones upserted; a kind
/// left `None` is not touched.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resync<'a> {
    pub namespaces: Option<&'a [Namespace]>,
    pub pods: Option<&'a [Pod]>,
    pub policies: Option<&'a [NetworkPolicy]>,
    pub cluster_policies: Option<&'a [sluice_api::ClusterNetworkPolicy]>,
    pub nodes: Option<&'a [Node]>,
}

impl Compiler {
    /// Applies whole lists as one event: the initial sync (all three kinds
    /// given), or a re-list of some kinds. Cheaper than one event per
    /// object; every endpoint it touches is reported.
    pub fn resync(&mut self, r: Resync<'_>) -> Changes {
        self.quiet = true;
        if let Some(list) = r.namespaces {
            let listed: HashSet<&str> = list
                .iter()
                .filter_map(|n| n.metadata.name.as_deref())
                .collect();
            let gone: Vec<String> = self
                .namespaces
                .keys()
                .filter(|n| !listed.contains(n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                self.namespace_gone(&name);
            }
            for ns in list {
                self.namespace_event(ns);
            }
        }
        // Pods before policies: identities then exist when selectors are
        // interned, and each policy adds its contributions in one pass.
        if let Some(list) = r.pods {
            let listed = listed_refs(list.iter().map(|o| &o.metadata));
            self.pods_listed(&listed, list.iter());
        }
        if let Some(list) = r.policies {
            let listed = listed_refs(list.iter().map(|o| &o.metadata));
            let gone: Vec<ObjectRef> = self
                .repo
                .objects()
                .filter(|o| !listed.contains(&(o.namespace.as_str(), o.name.as_str())))
                .cloned()
                .collect();
            for obj in &gone {
                self.remove_policy(obj);
            }
            for np in list {
                self.policy_event(np);
            }
        }
        if let Some(list) = r.nodes {
            let listed: HashSet<&str> = list
                .iter()
                .filter_map(|n| n.metadata.name.as_deref())
                .collect();
            let gone: Vec<String> = self
                .cnps
                .nodes
                .keys()
                .filter(|n| !listed.contains(n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                self.cnps.nodes.remove(&name);
            }
            self.node_list_changed();
            for n in list {
                self.node_event(n);
            }
        }
        if let Some(list) = r.cluster_policies {
            let listed: HashSet<&str> = list
                .iter()
                .filter_map(|c| c.metadata.name.as_deref())
                .collect();
            for name in self.cnps.names() {
                if !listed.contains(name.as_str()) {
                    self.remove_cnp(&name);
                }
            }
            for c in list {
                self.cnp_event(c);
            }
        }
        self.quiet = false;
        self.commit()
    }

    /// A re-list of pods alone, `listed` naming every pod of the list
    /// (namespace, name) and `pods` giving them one at a time, so that a
    /// caller keeping them compact never holds the whole list decoded.
    pub fn resync_pods<P: Borrow<Pod>>(
        &mut self,
        listed: &HashSet<(&str, &str)>,
        pods: impl Iterator<Item = P>,
    ) -> Changes {
        self.quiet = true;
        self.pods_listed(listed, pods);
        self.quiet = false;
        self.commit()
    }

    /// The numbers a previous run wrote to the data path (the pinned maps),
    /// taken back by what they numbered until [`Self::forget_restored`], so
    /// that a restart changes no number the data path holds
    /// (docs/design.md, "Numbers survive a restart").
    pub fn restore(&mut self, numbers: Restored) {
        self.identities.restore(numbers.identities);
        self.profiles.restore(numbers.classes, numbers.profiles);
        self.groups.restore(numbers.cidr_groups);
    }

    /// Everything listed is in: numbers not taken back by now stay unused.
    pub fn forget_restored(&mut self) {
        self.identities.forget_restored();
        self.profiles.forget_restored();
        self.groups.forget_restored();
    }

    /// Pods not in `listed` are deleted, `pods` upserted.
    fn pods_listed<P: Borrow<Pod>>(
        &mut self,
        listed: &HashSet<(&str, &str)>,
        pods: impl Iterator<Item = P>,
    ) {
        let gone: Vec<ObjectRef> = self
            .pods
            .iter()
            .map(|(obj, _)| obj)
            .filter(|o| !listed.contains(&(o.namespace.as_str(), o.name.as_str())))
            .cloned()
            .collect();
        for obj in &gone {
            self.remove_pod(obj);
        }
        for pod in pods {
            self.pod_event(pod.borrow());
        }
    }

    pub fn upsert_namespace(&mut self, ns: &Namespace) -> Changes {
        self.namespace_event(ns);
        self.commit()
    }

    pub fn delete_namespace(&mut self, name: &str) -> Changes {
        self.namespace_gone(name);
        self.commit()
    }

    /// A new pod, or new labels, ports, addresses or phase of a known one.
    /// Finished pods (Succeeded, Failed) count as deleted, since their
    /// addresses may already belong to another pod; host-network pods are
    /// not endpoints and their addresses are the node's.
    pub fn upsert_pod(&mut self, pod: &Pod) -> Changes {
        self.pod_event(pod);
        self.commit()
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Changes {
        self.remove_pod(&ObjectRef::new(namespace, name));
        self.commit()
    }

    pub fn upsert_policy(&mut self, np: &NetworkPolicy) -> Changes {
        self.policy_event(np);
        self.commit()
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Changes {
        self.remove_policy(&ObjectRef::new(namespace, name));
        self.commit()
    }

    /// Recomputes every selector's members and every local identity's policy
    /// from the objects alone; reports what differed. A check of the
    /// incremental state (tests, the conformance model, the bench).
    pub fn recompute_all(&mut self) -> Changes {
        let locals = self.identities.locals();
        for &l in &locals {
            self.touch(l);
            let Some(st) = self.identities.local_mut(l) else {
                continue;
            };
            // Record what every rule key was, since the contributions are
            // cleared here without going through `bump`.
            if let Some(t) = self.txn.touched.get_mut(&l) {
                for (key, rid) in st.values() {
                    t.record(key, Some(rid));
                }
            }
            st.clear();
            self.mark_cidr_dirty(l);
        }
        self.repo.clear_targets();
        self.cnps.clear_targets();
        self.txn.settle = true;
        self.txn.classes_all = true;
        self.txn.changed_cnps.extend(self.cnps.ids());
        self.identities.clear_selectors();
        for s in self.selectors.ids() {
            let members = self.selectors.evaluate(s, &self.identities);
            for &x in &members {
                self.identities.add_selector(x, s);
            }
            self.selectors.set_members(s, members);
        }
        for &l in &locals {
            self.attach_matching_policies(l);
            self.attach_matching_cnps(l);
            self.mark_tiers_dirty(l, true);
        }
        self.commit()
    }

    fn namespace_event(&mut self, ns: &Namespace) {
        let Some(name) = ns.metadata.name.clone() else {
            self.diagnose(ObjKey::new(Kind::Namespace, "", ""), "no metadata.name");
            return;
        };
        let labels = Arc::new(ns.metadata.labels.clone().unwrap_or_default());
        if self.namespaces.get(&name) != Some(&labels) {
            self.namespaces.insert(name.clone(), labels);
            self.refresh_namespace(&name);
        }
    }

    fn namespace_gone(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.refresh_namespace(name);
        }
    }

    /// The namespace's labels changed: its pods move to new identities.
    fn refresh_namespace(&mut self, ns: &str) {
        for obj in self.pods.in_namespace(ns) {
            let Some(p) = self.pods.get(&obj) else {
                continue;
            };
            let Some(ident) = self.identities.get(p.identity) else {
                continue;
            };
            let (labels, ports) = (ident.key.labels.clone(), ident.key.ports.clone());
            let (ips, local) = (p.ips.clone(), p.local);
            self.set_pod(obj, labels, ports, ips, local);
        }
    }

    fn pod_event(&mut self, pod: &Pod) {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            self.diagnose(
                ObjKey::new(Kind::Pod, "", ""),
                "no metadata.namespace or metadata.name",
            );
            return;
        };
        let obj = ObjectRef::new(ns.clone(), name.clone());
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if finished || host_network {
            self.remove_pod(&obj);
            return;
        }
        let (ips, mut problems) = pod_ips(pod);
        let (ports, port_problems) = named_ports(pod);
        problems.extend(port_problems);
        for p in problems {
            self.diagnose(ObjKey::pod(&obj), &p);
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let local = self.locality.is_local(pod, &obj);
        self.set_pod(obj, labels, ports, ips, local);
    }

    fn policy_event(&mut self, np: &NetworkPolicy) {
        let (Some(ns), Some(name)) = (&np.metadata.namespace, &np.metadata.name) else {
            self.diagnose(
                ObjKey::new(Kind::NetworkPolicy, "", ""),
                "no metadata.namespace or metadata.name",
            );
            return;
        };
        let obj = ObjectRef::new(ns.clone(), name.clone());
        let (parsed, problems) = parse_policy(np);
        for p in &problems {
            self.diagnose(
                ObjKey::new(Kind::NetworkPolicy, ns.clone(), name.clone()),
                p,
            );
        }
        // Intern the new selectors before the old ones are released, so the
        // ones both versions use keep their members.
        let mut rules: Vec<RuleState> = parsed
            .rules
            .into_iter()
            .map(|r| RuleState {
                id: 0,
                dir: r.dir,
                index: r.index,
                parts: r
                    .parts
                    .into_iter()
                    .map(|p| Part {
                        peer: match p.peer {
                            Peer::Any => Peer::Any,
                            Peer::Pods(sel) => {
                                Peer::Pods(self.selectors.intern(sel, &mut self.identities))
                            }
                            Peer::Blocks(b) => Peer::Blocks(b),
                        },
                        ports: p.ports,
                    })
                    .collect(),
            })
            .collect();
        let (pid, old_ids) = match self.repo.id_of(&obj) {
            Some(pid) => (pid, self.uninstall_policy(pid)),
            None => (self.repo.new_id(), BTreeMap::new()),
        };
        // Rule ids stay with (direction, position) across updates, so an
        // unchanged rule keeps its map values.
        self.repo.assign_rule_ids(pid, &mut rules, old_ids);
        self.install_policy(
            pid,
            PolicyState::new(
                obj,
                parsed.target,
                (parsed.ingress, parsed.egress),
                rules,
                problems,
            ),
        );
    }

    fn remove_policy(&mut self, obj: &ObjectRef) {
        if let Some(pid) = self.repo.id_of(obj) {
            let ids = self.uninstall_policy(pid);
            self.repo.forget_rule_ids(ids.into_values());
            self.repo.remove(pid);
        }
    }
}

/// Namespace and name of each listed object (unnamed ones are skipped).
fn listed_refs<'a>(
    metas: impl Iterator<Item = &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> HashSet<(&'a str, &'a str)> {
    metas
        .filter_map(|m| Some((m.namespace.as_deref()?, m.name.as_deref()?)))
        .collect()
}
