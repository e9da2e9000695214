//! ClusterNetworkPolicies as the compiler holds them for now: stored,
//! validated, their problems reported like a NetworkPolicy's, and no effect
//! on any endpoint yet (the tiers come later).
use super::*;
use sluice_api::ClusterNetworkPolicy;

fn cnp(name: &str, cidr: &str) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "Admin",
            "priority": 10,
            "subject": {"namespaces": {}},
            "egress": [{"name": "deny-imds", "action": "Deny", "to": [{"networks": [cidr]}]}]
        }
    }))
    .unwrap()
}

fn key(name: &str) -> ObjKey {
    ObjKey::cluster_scoped(Kind::ClusterNetworkPolicy, name)
}

#[test]
fn a_valid_cluster_policy_is_stored_without_problems_or_endpoint_changes() {
    let mut c = Compiler::new(Locality::All);
    c.resync(Resync {
        namespaces: Some(&[namespace("x", &[])]),
        pods: Some(&[pod("x", "a", json!({}), "10.0.0.1")]),
        ..Resync::default()
    });
    let ch = c.upsert_cluster_policy(&cnp("block-metadata", "169.254.169.254/32"));
    assert!(ch.is_empty(), "{ch:?}");
    let (stored, problems) = c.cluster_policy("block-metadata").unwrap();
    assert_eq!(stored.spec.priority, 10);
    assert!(problems.is_empty());
    assert_eq!(c.stats().cluster_policies, 1);
    assert!(c.cluster_policy_selects_local("block-metadata"));
}

#[test]
fn an_invalid_cluster_policy_is_diagnosed_until_fixed_and_forgotten_when_deleted() {
    let mut c = Compiler::new(Locality::All);
    let ch = c.upsert_cluster_policy(&cnp("bad", "169.254.169.254"));
    assert_eq!(
        ch.diagnostics,
        [Diagnostic {
            object: key("bad"),
            reason: "spec.egress[0].to[0].networks[0]: invalid CIDR \"169.254.169.254\": no prefix length".into(),
        }]
    );
    assert_eq!(c.diagnostics(), ch.diagnostics);
    assert_eq!(c.cluster_policy("bad").unwrap().1.len(), 1);

    let ch = c.upsert_cluster_policy(&cnp("bad", "169.254.169.254/32"));
    assert!(ch.diagnostics.is_empty());
    assert!(c.diagnostics().is_empty());

    c.upsert_cluster_policy(&cnp("bad", "nonsense"));
    assert_eq!(c.diagnostics().len(), 1);
    c.delete_cluster_policy("bad");
    assert!(c.cluster_policy("bad").is_none());
    assert!(c.diagnostics().is_empty());
    assert_eq!(c.stats().cluster_policies, 0);
}

#[test]
fn a_cluster_policy_resync_drops_what_the_list_no_longer_has() {
    let mut c = Compiler::new(Locality::All);
    c.upsert_cluster_policy(&cnp("a", "10.0.0.0/8"));
    c.upsert_cluster_policy(&cnp("b", "10.0.0.0/8"));
    let ch = c.resync(Resync {
        cluster_policies: Some(&[cnp("b", "fd00::/8"), cnp("c", "bogus")]),
        ..Resync::default()
    });
    let names: Vec<&String> = c.cluster_policy_names().collect();
    assert_eq!(names, ["b", "c"]);
    assert_eq!(
        c.cluster_policy("b").unwrap().0.spec.egress[0].to[0]
            .networks
            .as_deref(),
        Some(&["fd00::/8".to_owned()][..])
    );
    assert_eq!(ch.diagnostics.len(), 1);
    assert_eq!(ch.diagnostics[0].object, key("c"));
    // A resync that leaves the kind out does not touch it.
    c.resync(Resync::default());
    assert_eq!(c.cluster_policy_names().count(), 2);
}
