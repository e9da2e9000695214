//! The ClusterNetworkPolicy examples in deploy/examples/cluster/ read with
//! our types, validate, and say what their comments say.
#![expect(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
use std::path::Path;

use serde::Deserialize as _;
use sluice_api::{
    Action, ClusterNetworkPolicy, EgressPeerKind, IngressPeerKind, PortKind, ProtocolKind,
    SubjectKind, Tier, validate,
};

fn read(file: &str) -> Vec<ClusterNetworkPolicy> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/cluster")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let cnp = ClusterNetworkPolicy::deserialize(doc).unwrap();
            validate(&cnp.spec).unwrap_or_else(|e| panic!("{file}: {e:?}"));
            cnp
        })
        .collect()
}

#[test]
fn every_example_file_is_read_and_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/cluster");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "baseline-default-deny.yaml",
            "block-cloud-metadata.yaml",
            "tenant-isolation.yaml"
        ]
    );
    for f in &files {
        assert!(!read(f).is_empty(), "{f}");
    }
}

#[test]
fn metadata_is_denied_for_every_pod_in_the_admin_tier() {
    let [cnp] = &read("block-cloud-metadata.yaml")[..] else {
        panic!()
    };
    assert_eq!(cnp.spec.tier, Tier::Admin);
    let Some(SubjectKind::Namespaces(all)) = cnp.spec.subject.kind() else {
        panic!()
    };
    assert_eq!(all, &Default::default(), "every namespace");
    let [rule] = &cnp.spec.egress[..] else {
        panic!()
    };
    assert_eq!(rule.action, Action::Deny);
    assert_eq!(rule.protocols, None, "every protocol and port");
    let Some(EgressPeerKind::Networks(n)) = rule.to[0].kind() else {
        panic!()
    };
    assert_eq!(n, ["169.254.169.254/32", "fd00:ec2::254/128"]);
}

#[test]
fn the_baseline_default_deny_keeps_dns_to_kube_system() {
    let [cnp] = &read("baseline-default-deny.yaml")[..] else {
        panic!()
    };
    assert_eq!(cnp.spec.tier, Tier::Baseline);
    let [deny_in] = &cnp.spec.ingress[..] else {
        panic!()
    };
    assert_eq!(deny_in.action, Action::Deny);
    assert!(
        matches!(deny_in.from[0].kind(), Some(IngressPeerKind::Namespaces(s)) if *s == Default::default())
    );
    let [dns, deny_out] = &cnp.spec.egress[..] else {
        panic!()
    };
    assert_eq!(dns.action, Action::Accept);
    let Some(EgressPeerKind::Namespaces(ns)) = dns.to[0].kind() else {
        panic!()
    };
    assert_eq!(
        ns.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
        "kube-system"
    );
    let protocols: Vec<_> = dns
        .protocols
        .iter()
        .flatten()
        .map(|p| p.kind().unwrap())
        .collect();
    assert_eq!(
        protocols,
        [
            ProtocolKind::Udp(Some(PortKind::Number(53))),
            ProtocolKind::Tcp(Some(PortKind::Number(53)))
        ]
    );
    assert_eq!(deny_out.action, Action::Deny);
    assert!(
        matches!(deny_out.to[0].kind(), Some(EgressPeerKind::Networks(n)) if n == ["0.0.0.0/0", "::/0"])
    );
}

#[test]
fn each_tenant_is_denied_to_and_from_the_others_in_the_admin_tier() {
    let cnps = read("tenant-isolation.yaml");
    assert_eq!(cnps.len(), 2);
    for (cnp, tenant) in cnps.iter().zip(["blue", "green"]) {
        assert_eq!(cnp.spec.tier, Tier::Admin);
        let Some(SubjectKind::Namespaces(s)) = cnp.spec.subject.kind() else {
            panic!()
        };
        assert_eq!(s.match_labels.as_ref().unwrap()["tenant"], tenant);
        let others = |sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector| {
            let e = sel.match_expressions.as_ref().unwrap();
            e.iter().any(|r| {
                r.key == "tenant"
                    && r.operator == "NotIn"
                    && r.values.as_deref() == Some(&[tenant.to_owned()][..])
            })
        };
        let Some(IngressPeerKind::Namespaces(from)) = cnp.spec.ingress[0].from[0].kind() else {
            panic!()
        };
        let Some(EgressPeerKind::Namespaces(to)) = cnp.spec.egress[0].to[0].kind() else {
            panic!()
        };
        assert!(others(from) && others(to));
        assert_eq!(cnp.spec.ingress[0].action, Action::Deny);
        assert_eq!(cnp.spec.egress[0].action, Action::Deny);
    }
}
