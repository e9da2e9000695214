//! Diagnostics as Events, through `Cluster::apply` as the reconciler calls it.
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};

use super::*;

fn pod(ns: &str, node: &str) -> Object {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("a-{node}"), "namespace": ns, "labels": {"pod": "a"}},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {"podIPs": [{"ip": if node == "n1" { "10.0.0.1" } else { "10.0.0.2" }}]}
    }))
    .unwrap();
    Object::Pod(Box::new(pod))
}

fn policy(operator: &str) -> Object {
    policy_in("x", operator)
}

fn policy_in(ns: &str, operator: &str) -> Object {
    let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": ns, "uid": "u-1", "resourceVersion": "7"},
        "spec": {"podSelector": {},
                 "ingress": [{"from": [{"podSelector": {"matchExpressions":
                     [{"key": "pod", "operator": operator, "values": ["a"]}]}}]}]}
    }))
    .unwrap();
    Object::NetworkPolicy(Box::new(np))
}

/// Applies `o` as a watch event; returns the problems the compiler has
/// with it.
/// A cluster whose kinds have each been listed (empty), as the watches do
/// first.
fn synced() -> Cluster {
    let mut c = Cluster::new("n1");
    let lists = [
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::ClusterNetworkPolicy,
    ]
    .map(|k| Change::resync(k, Vec::new()));
    assert!(c.apply(lists.into()).is_some_and(|p| p.full));
    c
}

fn feed(c: &mut Cluster, o: Object) -> usize {
    let key = o.key();
    c.apply(vec![Change::Applied(o)]);
    c.compiler
        .diagnostics()
        .iter()
        .filter(|d| d.object == key)
        .count()
}

#[test]
fn an_invalid_policy_is_noticed_once_until_it_is_fixed_and_broken_again() {
    let mut c = synced();
    feed(&mut c, pod("x", "n1"));
    feed(&mut c, pod("y", "n2"));
    // Selecting no pod of this node: another node's concern.
    assert!(feed(&mut c, policy_in("y", "Bogus")) > 0);
    assert!(c.take_notices().is_empty());
    assert!(feed(&mut c, policy("Bogus")) > 0);
    let n = c.take_notices();
    assert_eq!(n.len(), 1);
    let r = &n[0].regarding;
    assert_eq!(r.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(r.api_version.as_deref(), Some("networking.k8s.io/v1"));
    assert_eq!(r.namespace.as_deref(), Some("x"));
    assert_eq!(r.name.as_deref(), Some("p"));
    assert_eq!(r.uid.as_deref(), Some("u-1"));
    assert!(n[0].note.contains("Bogus"), "{}", n[0].note);
    // The same problem again (a re-list, an unrelated update): no repeat.
    feed(&mut c, policy("Bogus"));
    assert!(c.take_notices().is_empty());
    // Fixed, then broken again: noticed again.
    assert_eq!(feed(&mut c, policy("In")), 0);
    assert!(c.take_notices().is_empty());
    feed(&mut c, policy("Bogus"));
    assert_eq!(c.take_notices().len(), 1);
}

#[test]
fn an_invalid_policy_is_noticed_when_a_pod_it_selects_arrives_on_this_node() {
    let mut c = synced();
    // No pod of this node in x yet: not this node's concern.
    assert!(feed(&mut c, policy("Bogus")) > 0);
    assert!(c.take_notices().is_empty());
    // A pod of another node: still not.
    feed(&mut c, pod("x", "n2"));
    assert!(c.take_notices().is_empty());
    // A local pod the policy selects: the policy's problem is reported
    // now, without the policy changing.
    feed(&mut c, pod("x", "n1"));
    let n = c.take_notices();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].regarding.name.as_deref(), Some("p"));
    assert!(n[0].note.contains("Bogus"), "{}", n[0].note);
    // Once only.
    feed(&mut c, pod("x", "n1"));
    assert!(c.take_notices().is_empty());
}

#[test]
fn nothing_is_to_be_programmed_before_every_kind_is_listed_then_everything_is() {
    let mut c = Cluster::new("n1");
    assert!(c.apply(vec![Change::Applied(pod("x", "n1"))]).is_none());
    // Nor is anything explained from the empty compiler.
    let early = c.explain("x/a-n1", "x/a-n1", "80/TCP").unwrap_err();
    assert!(early.contains("not listed the cluster yet"), "{early}");
    for kind in [
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::ClusterNetworkPolicy,
    ] {
        assert!(c.apply(vec![Change::resync(kind, Vec::new())]).is_none());
    }
    // The pod list comes; Services are still missing.
    assert!(
        c.apply(vec![Change::resync(Kind::Pod, vec![pod("x", "n1")])])
            .is_none()
    );
    let waiting = c.explain("x/a-n1", "x/a-n1", "80/TCP").unwrap_err();
    assert!(waiting.contains("waiting for: Service)"), "{waiting}");
    let first = c
        .apply(vec![Change::resync(Kind::Service, Vec::new())])
        .unwrap();
    assert!(first.full);
    assert!(c.explain("x/a-n1", "x/a-n1", "80/TCP").is_ok());
    let local = ObjectRef::new("x", "a-n1");
    assert!(first.changes.endpoints.contains(&local));
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    assert!(first.changes.ipcache.contains_key(&ip));
    // Afterwards only what changes.
    let next = c.apply(vec![Change::Applied(pod("y", "n2"))]).unwrap();
    assert!(!next.full);
    assert!(!next.changes.endpoints.contains(&local));
}

#[test]
fn a_relist_forgets_what_it_no_longer_has_and_what_was_programmed_for_it() {
    let mut c = synced();
    let p = c.apply(vec![Change::Applied(pod("x", "n1"))]).unwrap();
    c.programmed(p.versions);
    assert!(c.programmed_versions().contains_key("Pod/x/a-n1"));
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    assert!(c.ipcache().contains_key(&ip));
    let p = c
        .apply(vec![Change::resync(Kind::Pod, Vec::new())])
        .unwrap();
    assert_eq!(
        p.changes.ipcache.get(&ip),
        Some(&None),
        "the address is gone"
    );
    c.programmed(p.versions);
    assert!(c.programmed_versions().is_empty());
    assert!(c.identity_of(&ObjectRef::new("x", "a-n1")).is_none());
}

fn cluster_policy(cidr: &str) -> Object {
    let cnp: sluice_api::ClusterNetworkPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "block-metadata", "uid": "u-2", "resourceVersion": "9"},
        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                 "egress": [{"action": "Deny", "to": [{"networks": [cidr]}]}]}
    }))
    .unwrap();
    Object::ClusterNetworkPolicy(Box::new(cnp))
}

#[test]
fn an_invalid_cluster_policy_is_noticed_on_the_cluster_scoped_object() {
    let mut c = synced();
    // No local endpoint: of no concern to this node yet.
    // The schema problem, and what the rule becomes (a deny at its place).
    assert_eq!(feed(&mut c, cluster_policy("169.254.169.254/33")), 2);
    assert!(c.take_notices().is_empty());
    feed(&mut c, pod("x", "n1"));
    let n = c.take_notices();
    assert_eq!(n.len(), 1, "{n:?}");
    let r = &n[0].regarding;
    assert_eq!(r.kind.as_deref(), Some("ClusterNetworkPolicy"));
    assert_eq!(
        r.api_version.as_deref(),
        Some("policy.networking.k8s.io/v1alpha2")
    );
    // Cluster-scoped: the Event goes to `default` (kube's Recorder).
    assert_eq!(r.namespace, None);
    assert_eq!(r.name.as_deref(), Some("block-metadata"));
    assert_eq!(r.uid.as_deref(), Some("u-2"));
    assert!(
        n[0].note.contains("spec.egress[0].to[0].networks[0]")
            && n[0].note.contains("prefix length too long"),
        "{}",
        n[0].note
    );
    // Fixed: no notice, and programmed like any object, for `sluice wait`.
    assert_eq!(feed(&mut c, cluster_policy("169.254.169.254/32")), 0);
    assert!(c.take_notices().is_empty());
    let p = c
        .apply(vec![Change::Applied(cluster_policy("169.254.169.254/32"))])
        .unwrap();
    c.programmed(p.versions);
    assert_eq!(
        c.programmed_versions()
            .get("ClusterNetworkPolicy/block-metadata")
            .map(String::as_str),
        Some("9")
    );
    let p = c
        .apply(vec![Change::Deleted(cluster_policy("169.254.169.254/32"))])
        .unwrap();
    c.programmed(p.versions);
    assert!(
        !c.programmed_versions()
            .contains_key("ClusterNetworkPolicy/block-metadata")
    );
}

fn deny_all(mode: Option<&str>) -> Object {
    let annotations = mode.map(|m| serde_json::json!({ crate::policy::audit::ENFORCEMENT: m }));
    let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "deny", "namespace": "x", "annotations": annotations},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
    }))
    .unwrap();
    Object::NetworkPolicy(Box::new(np))
}

#[test]
fn an_audit_policy_is_judged_by_the_audit_view_only_until_it_is_enforced_in_one_pass() {
    use sluice_common::{DIR_INGRESS, proto, reason};
    let (me, peer): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    let mut c = synced();
    c.apply(vec![
        Change::Applied(pod("x", "n1")),
        Change::Applied(pod("x", "n2")),
    ]);
    let enforced = |c: &Cluster| {
        c.compiler
            .decision_at(me, DIR_INGRESS, peer, proto::TCP, 80)
            .unwrap()
            .allowed()
    };
    assert!(enforced(&c));
    assert!(!c.audit.active(), "no audit policy: no view");

    c.apply(vec![Change::Applied(deny_all(Some("audit")))]);
    assert!(enforced(&c), "audit mode drops nothing");
    assert!(c.audit.active());
    let w = c
        .audit
        .judge(me, DIR_INGRESS, peer, proto::TCP, 80)
        .expect("would drop");
    assert_eq!(
        (w.reason, w.kind, w.policies.clone()),
        (
            reason::POLICY_DENIED,
            "NetworkPolicy",
            vec!["x/deny".to_string()]
        )
    );
    // The other direction is not isolated: nothing to report.
    assert_eq!(
        c.audit
            .judge(me, sluice_common::DIR_EGRESS, peer, proto::TCP, 80),
        None
    );

    // One watch event: enforced in the same pass (the pod's policy is in
    // what to program), and the view goes with the last audit policy.
    let p = c
        .apply(vec![Change::Applied(deny_all(Some("enforce")))])
        .expect("synced");
    assert!(!enforced(&c), "enforced now");
    assert!(!p.changes.endpoints.is_empty(), "programmed in this pass");
    assert!(!c.audit.active());

    // And back: unenforced in one pass, judged by a fresh view.
    c.apply(vec![Change::Applied(deny_all(Some("audit")))]);
    assert!(enforced(&c));
    assert!(
        c.audit
            .judge(me, DIR_INGRESS, peer, proto::TCP, 80)
            .is_some()
    );
    // No annotation: enforced.
    c.apply(vec![Change::Applied(deny_all(None))]);
    assert!(!enforced(&c));
    assert!(!c.audit.active());
}

/// A restarted agent's lists arrive in any order (here pods before their
/// namespace, whose labels change every pod's identity key): the pods
/// still get the numbers the data path holds.
#[test]
fn restored_numbers_are_taken_back_whatever_order_the_kinds_are_listed_in() {
    let mut c = Cluster::new("n1");
    let (local, remote): (IpAddr, IpAddr) =
        ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    c.restore(Restored {
        identities: vec![(local, 300), (remote, 290)],
        ..Restored::default()
    });
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "x", "labels": {"team": "a"}}}),
    )
    .unwrap();
    let pods = vec![pod("x", "n1").into(), pod("y", "n2").into()];
    for change in [
        Change::Resync(Kind::Pod, pods),
        Change::resync(Kind::Namespace, vec![Object::Namespace(Box::new(ns))]),
        Change::resync(Kind::NetworkPolicy, Vec::new()),
        Change::resync(Kind::Service, Vec::new()),
        Change::resync(Kind::ClusterNetworkPolicy, Vec::new()),
    ] {
        c.apply(vec![change]);
    }
    let ipcache = c.ipcache();
    assert_eq!(ipcache.get(&local), Some(&Identity(300)), "{ipcache:?}");
    assert_eq!(ipcache.get(&remote), Some(&Identity(290)), "{ipcache:?}");
}

/// Pod x/web-0 as incarnation `uid` on `node`, in `phase`, with the
/// addresses its status reports (none: kubelet has not reported them).
fn web0(node: &str, uid: &str, phase: &str, ips: &[&str]) -> Object {
    let ips: Vec<_> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-0", "namespace": "x", "uid": uid, "labels": {"pod": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {"phase": phase, "podIPs": ips}
    }))
    .unwrap();
    Object::Pod(Box::new(pod))
}

fn pod_incarnation(uid: &str, ip: &str, phase: &str) -> Object {
    web0("n1", uid, phase, &[ip])
}

/// A pod re-created under its name (a StatefulSet's evicted pod): CNI ADD
/// fetched the new one before the watch delivered the old one's deletion.
/// That deletion must not take the new pod's identity away; the new one's
/// own deletion still does.
#[test]
fn a_late_deletion_of_an_older_incarnation_leaves_the_newer_pod() {
    let mut c = synced();
    let web = ObjectRef::new("x", "web-0");
    let old = pod_incarnation("u-old", "10.0.0.7", "Failed");
    c.apply(vec![Change::Applied(old.clone())]);
    assert!(c.identity_of(&web).is_none(), "a failed pod is no endpoint");
    let new = pod_incarnation("u-new", "10.0.0.8", "Running");
    c.apply(vec![Change::Applied(new.clone())]);
    let id = c.identity_of(&web);
    assert!(id.is_some());

    c.apply(vec![Change::Deleted(old)]);
    assert_eq!(c.identity_of(&web), id, "the old pod's deletion");
    assert!(c.known.get(&new.key()).is_some());

    c.apply(vec![Change::Deleted(new)]);
    assert!(c.identity_of(&web).is_none(), "the new pod's own deletion");
}

fn web0_on(node: &str, uid: &str) -> Object {
    web0(node, uid, "Pending", &[])
}

/// The addresses the CNI gave a pod here fill its status until kubelet
/// reports them, for that pod only: a pod of the same name on another
/// node is not given them, nor a later one once the endpoint is gone;
/// a newer endpoint's addresses survive the older one's removal.
#[test]
fn the_cni_addresses_of_a_pod_are_for_the_pod_here_and_go_with_its_endpoint() {
    let mut c = synced();
    let web = ObjectRef::new("x", "web-0");
    let (old, new): (IpAddr, IpAddr) = ("10.0.0.9".parse().unwrap(), "10.0.0.10".parse().unwrap());
    c.learn_cni_ips(&web, vec![old]);
    c.apply(vec![Change::Applied(web0_on("n1", "u-1"))]);
    assert_eq!(c.compiler.addresses_of(&web), Some(&[old][..]));

    // Re-created on another node, no addresses reported yet.
    c.apply(vec![Change::Deleted(web0_on("n1", "u-1"))]);
    c.apply(vec![Change::Applied(web0_on("n2", "u-2"))]);
    assert_eq!(
        c.compiler.ip_identity(old),
        None,
        "not another node's pod's"
    );
    c.apply(vec![Change::Deleted(web0_on("n2", "u-2"))]);

    // Back here: a new sandbox's ADD came before the old one's DEL.
    c.learn_cni_ips(&web, vec![new]);
    c.forget_cni_ips(&web, &[old]);
    c.apply(vec![Change::Applied(web0_on("n1", "u-3"))]);
    assert_eq!(c.compiler.addresses_of(&web), Some(&[new][..]));

    // Its endpoint gone, a later pod of the name gets nothing from it.
    c.apply(vec![Change::Deleted(web0_on("n1", "u-3"))]);
    c.forget_cni_ips(&web, &[new]);
    c.apply(vec![Change::Applied(web0_on("n1", "u-4"))]);
    assert_eq!(c.compiler.ip_identity(new), None);
}

/// An ADD that names the pod's UID finds the pod known only as that
/// incarnation, so that one re-created under its name is fetched rather
/// than given the old one's labels.
#[test]
fn a_pod_is_known_as_the_incarnation_the_runtime_names() {
    let mut c = synced();
    let web = ObjectRef::new("x", "web-0");
    assert!(!c.knows_pod(&web, None));
    c.apply(vec![Change::Applied(pod_incarnation(
        "u-1", "10.0.0.7", "Running",
    ))]);
    assert!(c.knows_pod(&web, None), "no UID named: by name");
    assert!(c.knows_pod(&web, Some("u-1")));
    assert!(!c.knows_pod(&web, Some("u-2")), "another incarnation");
}
