//! Every ClusterNetworkPolicy of the upstream conformance suite (v0.2.0,
//! api/testdata/conformance/) reads with our types, validates, and survives
//! a round trip through JSON unchanged.
#![expect(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use sluice_api::{
    Action, ClusterNetworkPolicy, EgressPeerKind, IngressPeerKind, PortKind, Protocol,
    ProtocolKind, SubjectKind, Tier, validate,
};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}

/// The upstream suite fills `{{ index .HostNetworkPorts N }}` from its
/// configuration; any ports do here.
fn fill_templates(text: &str) -> String {
    let mut s = text.to_owned();
    for n in 0..8 {
        s = s.replace(
            &format!("{{{{ index .HostNetworkPorts {n} }}}}"),
            &(34345 + n).to_string(),
        );
    }
    assert!(!s.contains("{{"), "unfilled template left");
    s
}

/// (file, document as JSON) for every ClusterNetworkPolicy document.
fn conformance_documents() -> Vec<(PathBuf, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/conformance");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = fill_templates(&std::fs::read_to_string(&f).unwrap());
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            if v["kind"] == "ClusterNetworkPolicy" {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

#[test]
fn every_conformance_policy_deserializes_validates_and_round_trips() {
    let docs = conformance_documents();
    // 19 files; standard-priority-field.yaml holds 3, standard-anp-np-banp.yaml 2
    // (and a NetworkPolicy).
    assert_eq!(docs.len(), 23);
    for (file, json) in docs {
        let cnp: ClusterNetworkPolicy = serde_json::from_value(json.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        validate(&cnp.spec).unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        // Nothing lands in the catch-all: every field has a typed home.
        let back = serde_json::to_value(&cnp).unwrap();
        assert_eq!(back, json, "{}: serialized form differs", file.display());
        let again: ClusterNetworkPolicy = serde_json::from_value(back).unwrap();
        assert_eq!(again, cnp, "{}", file.display());
    }
}

#[test]
fn the_experimental_node_policy_reads_field_by_field() {
    let docs = conformance_documents();
    let (_, json) = docs
        .iter()
        .find(|(f, _)| f.ends_with("baseline_tier/experimental-egress-selector-rules.yaml"))
        .unwrap();
    let cnp: ClusterNetworkPolicy = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(cnp.metadata.name.as_deref(), Some("default"));
    assert_eq!(cnp.spec.tier, Tier::Baseline);
    assert_eq!(cnp.spec.priority, 10);
    let Some(SubjectKind::Namespaces(ns)) = cnp.spec.subject.kind() else {
        panic!("subject: {:?}", cnp.spec.subject)
    };
    assert_eq!(
        ns.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
        "network-policy-conformance-gryffindor"
    );
    let first = &cnp.spec.egress[0];
    assert_eq!(first.action, Action::Accept);
    let Some(EgressPeerKind::Nodes(nodes)) = first.to[0].kind() else {
        panic!("{:?}", first.to[0])
    };
    assert_eq!(
        nodes.match_labels.as_ref().unwrap()["kubernetes.io/os"],
        "linux"
    );
    let protocols = first.protocols.as_ref().unwrap();
    assert_eq!(
        protocols[0].kind(),
        Some(ProtocolKind::Tcp(Some(PortKind::Range {
            start: 34345,
            end: 34346
        })))
    );
    let last = &cnp.spec.egress[1];
    assert_eq!(last.action, Action::Deny);
    assert!(
        matches!(last.to[1].kind(), Some(EgressPeerKind::Networks(n)) if n == ["0.0.0.0/0", "::/0"])
    );
}

#[test]
fn the_pass_policy_reads_pods_and_namespaces_peers() {
    let docs = conformance_documents();
    let all: Vec<ClusterNetworkPolicy> = docs
        .iter()
        .map(|(_, j)| serde_json::from_value(j.clone()).unwrap())
        .collect();
    let pass = all
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("pass-example"))
        .unwrap();
    assert!(matches!(
        pass.spec.ingress[0].from[0].kind(),
        Some(IngressPeerKind::Namespaces(_))
    ));
    // Some conformance policy uses each action, each tier and a pods peer.
    let actions: Vec<&Action> = all
        .iter()
        .flat_map(|c| c.spec.egress.iter().map(|r| &r.action))
        .collect();
    for a in [Action::Accept, Action::Deny, Action::Pass] {
        assert!(actions.contains(&&a), "{a:?}");
    }
    assert!(all.iter().any(|c| c.spec.tier == Tier::Admin));
    assert!(all.iter().any(|c| c.spec.tier == Tier::Baseline));
    assert!(
        all.iter()
            .any(|c| c.spec.ingress.iter().flat_map(|r| &r.from).any(
                |p| matches!(p.kind(), Some(IngressPeerKind::Pods(np)) if np.pod_selector.is_some())
            ))
    );
}

/// The experimental ingress and egress tests patch a rule's protocols to a
/// named port (`DestinationNamedPort: "web"` in Go); the same change here.
#[test]
fn a_conformance_rule_patched_to_a_named_port_validates_and_round_trips() {
    let docs = conformance_documents();
    let (_, json) = docs
        .iter()
        .find(|(f, _)| f.ends_with("admin_tier/standard-gress-rules-combined.yaml"))
        .unwrap();
    let mut cnp: ClusterNetworkPolicy = serde_json::from_value(json.clone()).unwrap();
    cnp.spec.egress[5].protocols = Some(vec![Protocol {
        destination_named_port: Some("web".into()),
        ..Protocol::default()
    }]);
    cnp.spec.ingress[5].protocols = Some(vec![Protocol {
        destination_named_port: Some("dns".into()),
        ..Protocol::default()
    }]);
    validate(&cnp.spec).unwrap();
    let json = serde_json::to_value(&cnp).unwrap();
    assert_eq!(
        json["spec"]["egress"][5]["protocols"],
        serde_json::json!([{"destinationNamedPort": "web"}])
    );
    let back: ClusterNetworkPolicy = serde_json::from_value(json).unwrap();
    assert_eq!(back, cnp);
    assert_eq!(
        back.spec.egress[5].protocols.as_ref().unwrap()[0].kind(),
        Some(ProtocolKind::NamedPort("web"))
    );
}
