#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]
//! Each NetworkPolicy rule on a small cluster, judged through the lookup
//! model (`would_allow`, `verdict`) (`rules`), ipBlocks and invalid input
//! (`blocks`), identities, the ipcache and change reporting (`changes`), and
//! incremental == recompute == fresh build on random event sequences
//! (`random`). This file holds the fixtures they share.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_CIDR_FLAG, IDENTITY_FIRST_USER, IDENTITY_HOST,
    IDENTITY_WORLD, proto,
};

use super::{verdict::direction_allows, *};

const TCP: u8 = proto::TCP;
const UDP: u8 = proto::UDP;
const SCTP: u8 = proto::SCTP;
const ICMP: u8 = proto::ICMP;

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut l: BTreeMap<&str, &str> = labels.iter().copied().collect();
    l.insert("kubernetes.io/metadata.name", name);
    serde_json::from_value(json!({"metadata": {"name": name, "labels": l}})).unwrap()
}

/// Every pod serves `http` (TCP 80) and `dns` (UDP 53) unless told
/// otherwise.
fn pod_with(ns: &str, name: &str, labels: Value, ip: &str, ports: &[(&str, &str, u16)]) -> Pod {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, port)| json!({"name": n, "protocol": p, "containerPort": port}))
        .collect();
    let mut v = json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    });
    v["metadata"]["labels"] = labels;
    serde_json::from_value(v).unwrap()
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str) -> Pod {
    pod_with(
        ns,
        name,
        labels,
        ip,
        &[("http", "TCP", 80), ("dns", "UDP", 53)],
    )
}

fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    let mut v = json!({"metadata": {"namespace": ns, "name": name}});
    v["spec"] = spec;
    serde_json::from_value(v).unwrap()
}

fn obj(s: &str) -> ObjectRef {
    let (ns, name) = s.split_once('/').unwrap();
    ObjectRef::new(ns, name)
}

/// Namespaces `x` (team a) and `y` (team b); pods x/a, x/b, y/a, y/b labelled
/// `app: <name>`, addresses 10.0.<ns>.<n>.
struct World {
    c: Compiler,
}

impl World {
    fn new() -> Self {
        let mut c = Compiler::new(Locality::All);
        c.upsert_namespace(&namespace("x", &[("team", "a")]));
        c.upsert_namespace(&namespace("y", &[("team", "b")]));
        for (ns, n, ip) in [
            ("x", "a", "10.0.1.1"),
            ("x", "b", "10.0.1.2"),
            ("y", "a", "10.0.2.1"),
            ("y", "b", "10.0.2.2"),
        ] {
            c.upsert_pod(&pod(ns, n, json!({"app": n}), ip));
        }
        Self { c }
    }

    fn apply(&mut self, ns: &str, name: &str, spec: Value) -> Changes {
        self.c.upsert_policy(&policy(ns, name, spec))
    }

    fn allows(&self, from: &str, to: &str, proto: u8, port: u16) -> bool {
        self.c.would_allow(&obj(from), &obj(to), proto, port)
    }

    fn ep(&self, pod: &str) -> Arc<EndpointPolicy> {
        self.c.endpoint_policy(&obj(pod)).unwrap()
    }

    fn ip(&self, pod: &str) -> IpAddr {
        self.c.addresses_of(&obj(pod)).unwrap()[0]
    }

    /// Every ordered pair of pods allowed on (proto, port), as "from>to".
    fn allowed(&self, proto: u8, port: u16) -> BTreeSet<String> {
        let pods = ["x/a", "x/b", "y/a", "y/b"];
        let mut out = BTreeSet::new();
        for f in pods {
            for t in pods {
                if f != t && self.allows(f, t, proto, port) {
                    out.insert(format!("{f}>{t}"));
                }
            }
        }
        out
    }
}

fn pairs(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn all_pairs() -> BTreeSet<String> {
    let pods = ["x/a", "x/b", "y/a", "y/b"];
    pods.iter()
        .flat_map(|f| {
            pods.iter()
                .filter(move |t| *t != f)
                .map(move |t| format!("{f}>{t}"))
        })
        .collect()
}

/// Pairs that end at `to`, from everyone else.
fn into(to: &str) -> BTreeSet<String> {
    all_pairs()
        .into_iter()
        .filter(|p| p.ends_with(&format!(">{to}")))
        .collect()
}

fn minus(a: &BTreeSet<String>, b: &BTreeSet<String>) -> BTreeSet<String> {
    a.difference(b).cloned().collect()
}

mod blocks;
mod changes;
mod cnp_random;
mod explain;
pub(super) mod random;
mod rules;
mod tiers;
