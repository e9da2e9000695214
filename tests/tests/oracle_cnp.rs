//! ClusterNetworkPolicy in the differential check: random Admin and
//! Baseline policies mixed with random NetworkPolicies, random changes one
//! event at a time, and the oracle (written from the API text,
//! `tests/src/oracle/cnp.rs`) against the compiler's data-path verdict from
//! the maps (`tests/src/differential/cnp.rs`). No kernel, no root: the
//! kernel does not fold tiers yet, so the whole pipeline is not the judge
//! here (`cargo test -p sluice-tests --test differential` stays the
//! NetworkPolicy-only check against it).
use anyhow::{Result, bail};
use sluice_tests::{differential as diff, differential::cnp as d, rng::Rng};

const SEEDS: std::ops::Range<u64> = 1..41;
const ROUNDS: usize = 10;
const PER_ROUND: usize = 40;

#[test]
fn the_compiler_gives_the_oracles_verdict_on_random_cluster_network_policies() -> Result<()> {
    let (mut probes, mut allowed) = (0, 0);
    for seed in SEEDS {
        let r = d::run_seed_compiler(seed, ROUNDS, PER_ROUND)?;
        probes += r.probes;
        allowed += r.allowed;
        if let Some(case) = r.divergence {
            let case = d::shrink_in_compiler(case);
            bail!(
                "seed {seed} diverges (oracle says {}):\n{}",
                if case.expected { "allowed" } else { "denied" },
                serde_json::to_string_pretty(&case)?
            );
        }
    }
    eprintln!("{probes} probes, {allowed} allowed");
    // Both verdicts must be common, or the comparison says little.
    assert!(probes >= 15_000, "{probes}");
    assert!(
        allowed * 10 > probes && allowed * 10 < probes * 9,
        "{allowed} of {probes}"
    );
    Ok(())
}

#[test]
fn generated_cluster_network_policies_are_valid_and_use_every_kind_of_rule() -> Result<()> {
    // The oracle assumes valid input; the generator must make only that,
    // and cover tiers, actions, peers and protocols.
    let mut rng = Rng::seeded(7);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..500 {
        let cnp = d::cluster_policy(&mut rng, &format!("c{i}"));
        if let Err(e) = sluice_api::validate(&cnp.spec) {
            bail!("{e:?}\n{}", serde_json::to_string_pretty(&cnp)?);
        }
        seen.insert(format!("{:?}", cnp.spec.tier));
        for r in &cnp.spec.ingress {
            seen.insert(format!("in {:?}", r.action));
        }
        for r in &cnp.spec.egress {
            seen.insert(format!("out {:?}", r.action));
            for p in &r.to {
                for (k, on) in [
                    ("networks", p.networks.is_some()),
                    ("nodes", p.nodes.is_some()),
                    ("pods", p.pods.is_some()),
                    ("namespaces", p.namespaces.is_some()),
                ] {
                    if on {
                        seen.insert(k.to_string());
                    }
                }
            }
            for p in r.protocols.iter().flatten() {
                if p.destination_named_port.is_some() {
                    seen.insert("named".into());
                }
                if p.tcp
                    .as_ref()
                    .and_then(|m| m.destination_port.as_ref())
                    .and_then(|d| d.range.as_ref())
                    .is_some()
                {
                    seen.insert("range".into());
                }
            }
        }
    }
    for want in [
        "Admin",
        "Baseline",
        "in Accept",
        "in Deny",
        "in Pass",
        "out Accept",
        "out Deny",
        "out Pass",
        "networks",
        "nodes",
        "pods",
        "namespaces",
        "named",
        "range",
    ] {
        assert!(seen.contains(want), "never generated: {want}; saw {seen:?}");
    }
    Ok(())
}

#[test]
fn cluster_network_policies_decide_a_good_share_of_the_random_probes() -> Result<()> {
    // A comparison where the tiers rarely matter would say little: the
    // oracle's verdicts with and without the ClusterNetworkPolicies must
    // differ often, both ways.
    let (mut total, mut opened, mut closed) = (0, 0, 0);
    for seed in 1..21 {
        let mut rng = Rng::seeded(seed);
        let mut serial = 0;
        let w = d::world_with_cnps(&mut rng, &mut serial);
        let without = sluice_tests::oracle::World {
            cluster_policies: Vec::new(),
            ..w.clone()
        };
        let (with_o, without_o) = (
            sluice_tests::oracle::Oracle::new(&w),
            sluice_tests::oracle::Oracle::new(&without),
        );
        for p in sluice_tests::differential::probes(&mut rng, &w, 100) {
            let a = with_o.allowed(p.src, p.dst, p.proto, p.port);
            let b = without_o.allowed(p.src, p.dst, p.proto, p.port);
            total += 1;
            opened += usize::from(a && !b);
            closed += usize::from(!a && b);
        }
    }
    eprintln!("{total} probes: {opened} opened by a tier, {closed} closed by one");
    assert!(
        opened * 1000 > total && closed * 20 > total,
        "{opened} {closed} of {total}"
    );
    Ok(())
}

/// The shrunk cases `cargo xtask fuzz-policy --cnp` saved: each still
/// gets the verdict the oracle recorded for it, from the oracle and from
/// the compiler.
#[test]
fn saved_cluster_policy_regressions_still_agree() -> Result<()> {
    for (path, case) in diff::regressions(&diff::cnp_regressions_dir())? {
        if d::diverges_in_compiler(&case) || d::compiler_verdict(&case) != case.expected {
            bail!(
                "{}: the compiler says {}, the case recorded {}",
                path.display(),
                d::compiler_verdict(&case),
                case.expected
            );
        }
    }
    Ok(())
}
