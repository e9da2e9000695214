//! `sluice explain` agrees with the maps: on the random worlds of the
//! ClusterNetworkPolicy differential check (random Admin and Baseline
//! policies, NetworkPolicies, a Node, random changes one event at a time),
//! every explained verdict equals the compiler's data-path verdict from
//! the maps (`Compiler::verdict`). No kernel, no root.
use anyhow::{Result, bail};
use sluice_agent::policy::explain::{DecidedBy, render};
use sluice_tests::{differential::cnp as d, oracle::Proto, rng::Rng};

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
