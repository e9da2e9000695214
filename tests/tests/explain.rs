//! `sluice explain` agrees with the maps: on the random worlds of the
//! ClusterNetworkPolicy differential check (random Admin and Baseline
//! policies, NetworkPolicies, a Node, random changes one event at a time),
//! every explained verdict equals the compiler's data-path verdict from
//! the maps (`Compiler::verdict`). And `sluice explain --matrix -f` (the
//! binary: SLUICE_BIN_DIR, else target/debug) on the upstream cases'
//! objects meets their expected matrices. No kernel, no root.
use std::{collections::BTreeMap, net::IpAddr, path::Path, process::Command};

use anyhow::{Result, bail, ensure};
use sluice_agent::policy::{
    explain::{DecidedBy, render},
    k8s_openapi::api::core::v1::{PodIP, PodStatus},
};
use sluice_tests::{
    TempDir, bin_dir,
    cases::{self, Family, Matrix, Step},
    differential::cnp as d,
    oracle::Proto,
    rng::Rng,
};

const SEEDS: std::ops::Range<u64> = 1..21;
const ROUNDS: usize = 8;
const PER_ROUND: usize = 30;

fn number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

#[test]
fn every_explained_verdict_equals_the_maps_verdict_on_random_cluster_network_policies() -> Result<()>
{
    let (mut probes, mut allowed, mut by_cluster) = (0, 0, 0);
    for seed in SEEDS {
        let mut rng = Rng::seeded(seed);
        let mut serial = 0;
        let mut w = d::world_with_cnps(&mut rng, &mut serial);
        let mut c = d::CompiledWorld::new(&w);
        for round in 0..ROUNDS {
            if round > 0 {
                w = d::mutate_with_cnps(&mut rng, &w, &mut serial);
                c.set_world(&w);
            }
            for p in sluice_tests::differential::probes(&mut rng, &w, PER_ROUND) {
                let proto = number(p.proto);
                let maps = c.compiler.verdict(p.src, p.dst, proto, p.port);
                let e = c.compiler.explain_addrs(p.src, p.dst, proto, p.port);
                if e.allowed != maps || e.allowed_here != maps {
                    bail!(
                        "seed {seed} round {round}: the maps say {maps}, the explanation:\n{}",
                        render(&e)
                    );
                }
                probes += 1;
                allowed += usize::from(maps);
                by_cluster += [&e.egress, &e.ingress]
                    .into_iter()
                    .flatten()
                    .filter(|s| matches!(s.decided_by, DecidedBy::Cluster { .. }))
                    .count();
            }
        }
    }
    eprintln!("{probes} probes, {allowed} allowed, {by_cluster} sides decided by a cluster rule");
    assert!(probes >= 4000, "{probes}");
    assert!(
        allowed * 10 > probes && allowed * 10 < probes * 9,
        "{allowed} of {probes}"
    );
    assert!(by_cluster * 10 > probes, "{by_cluster} of {probes}");
    Ok(())
}

/// Serializes a case object as the YAML `kubectl get -o yaml` prints
/// (apiVersion and kind included).
fn yaml(o: &cases::Object) -> Result<String> {
    Ok(match o {
        cases::Object::Namespace(x) => serde_yaml_ng::to_string(x.as_ref())?,
        cases::Object::Pod(x) => serde_yaml_ng::to_string(x.as_ref())?,
        cases::Object::NetworkPolicy(x) => serde_yaml_ng::to_string(x.as_ref())?,
        cases::Object::ClusterNetworkPolicy(x) => {
            let mut v = serde_json::to_value(x.as_ref())?;
            v["apiVersion"] = "policy.networking.k8s.io/v1alpha2".into();
            v["kind"] = "ClusterNetworkPolicy".into();
            serde_yaml_ng::to_string(&v)?
        }
    })
}

/// `sluice explain --matrix -f` on the files of one moment of a case.
fn matrix_of(
    dir: &Path,
    objects: &BTreeMap<cases::ObjectKey, cases::Object>,
    flow: &str,
) -> Result<Matrix> {
    let docs: Vec<String> = objects.values().map(yaml).collect::<Result<_>>()?;
    std::fs::write(dir.join("objects.yaml"), docs.join("---\n"))?;
    let out = Command::new(bin_dir().join("sluice"))
        .args(["explain", "--matrix", "-f"])
        .arg(dir)
        .args(["--port", flow])
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    Matrix::parse(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn the_offline_matrix_meets_every_upstream_case_expectation() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance");
    let model = cases::parse_objects(&std::fs::read_to_string(root.join("model-default.yaml"))?)?;
    // The model's pods, with addresses (the files of a real cluster have them).
    let mut ips: BTreeMap<String, IpAddr> = BTreeMap::new();
    let mut start = BTreeMap::new();
    for mut o in model {
        if let cases::Object::Pod(p) = &mut o {
            let ip = IpAddr::from([10, 9, 0, u8::try_from(ips.len() + 1)?]);
            let name = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            );
            ips.insert(name, ip);
            p.status = Some(PodStatus {
                pod_ip: Some(ip.to_string()),
                pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
                ..PodStatus::default()
            });
        }
        start.insert(o.key(), o);
    }
    let tmp = TempDir::new("explain-matrix")?;
    let (mut checked, mut failures) = (0, Vec::new());
    for (path, case) in cases::load_dir(&root.join("upstream"))? {
        if case.model != cases::Model::Default || !case.family.families().contains(&Family::Ipv4) {
            continue;
        }
        let mut objects = start.clone();
        for (i, step) in case.steps.iter().enumerate() {
            match step {
                Step::Apply(text) => {
                    let text =
                        cases::substitute(text, Family::Ipv4, |pod, _| ips.get(pod).copied())?;
                    for mut o in cases::parse_objects(&text)? {
                        // A re-applied pod keeps its address.
                        let key = o.key();
                        if let (cases::Object::Pod(p), Some(cases::Object::Pod(old))) =
                            (&mut o, objects.get(&key))
                        {
                            p.status = old.status.clone();
                        }
                        objects.insert(o.key(), o);
                    }
                }
                Step::Delete(text) => {
                    for k in cases::parse_refs(text)? {
                        objects.remove(&k);
                    }
                }
                Step::Expect(e) if [80, 81].contains(&e.port) => {
                    let flow = format!("{}/{}", e.port, e.protocol.name());
                    let got = matrix_of(&tmp.0, &objects, &flow)?;
                    let got =
                        Matrix::from_fn(&e.matrix.pods, |f, t| got.get(f, t).unwrap_or(false));
                    if let Some(d) = cases::diff(&e.matrix, &got) {
                        failures.push(format!("{} step {i} {flow}:\n{d}", path.display()));
                    }
                    checked += 1;
                }
                _ => {}
            }
        }
    }
    eprintln!("{checked} expectations checked");
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 40, "{checked}");
    Ok(())
}
