//! How much of the verifier's budget each production program takes: the
//! kernel's count of verified instructions (`verified_insns`), against the
//! 1M limit (docs/design.md, "The fold and the verifier"). Fails when a
//! program keeps less than 10% of the budget, so a change that brings one
//! near E2BIG is seen before it fails to load; prints every count.
use anyhow::{Context as _, Result, anyhow};
use aya::{
    EbpfLoader,
    programs::{CgroupSkb, SchedClassifier},
};
use sluice_common::{maps, programs};
use sluice_tests::Bpffs;

const LIMIT: u32 = 1_000_000;
const HEADROOM: u32 = LIMIT / 10;

#[test]
fn every_program_keeps_a_tenth_of_the_verifier_budget() -> Result<()> {
    let fs = Bpffs::new()?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&fs.dir)
        .map_max_entries(maps::POLICY, 1024)
        .map_max_entries(maps::CONNTRACK, 1024)
        .load(sluice_agent::datapath::EBPF_OBJECT)
        .context("loading the production object")?;
    let mut counts = Vec::new();
    for name in [programs::FROM_POD, programs::TO_POD, programs::TO_UPLINK] {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
        counts.push((name, p.info()?.verified_instruction_count()));
    }
    let p: &mut CgroupSkb = ebpf
        .program_mut(programs::TO_HOST)
        .ok_or_else(|| anyhow!("no program to_host"))?
        .try_into()?;
    p.load().context("loading to_host")?;
    counts.push((programs::TO_HOST, p.info()?.verified_instruction_count()));
    for (name, n) in &counts {
        println!("{name}: {n:?} verified instructions (limit {LIMIT})");
    }
    for (name, n) in counts {
        let n = n.ok_or_else(|| anyhow!("{name}: the kernel gives no verified_insns"))?;
        assert!(
            n <= LIMIT - HEADROOM,
            "{name}: {n} verified instructions, less than 10% of the 1M budget left"
        );
    }
    Ok(())
}
