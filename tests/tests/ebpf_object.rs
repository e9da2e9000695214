//! The two eBPF objects agent/build.rs embeds, parsed as aya parses them
//! (no kernel, no root): the production object carries exactly the
//! programs the agent attaches, the bench object adds the bench-only ones.
use std::collections::BTreeSet;

use sluice_agent::datapath::{EBPF_BENCH_OBJECT, EBPF_OBJECT};
use sluice_common::programs;

fn program_names(object: &[u8]) -> Result<BTreeSet<String>, aya_obj::ParseError> {
    Ok(aya_obj::Object::parse(object)?
        .programs
        .into_keys()
        .collect())
}

fn agents_programs() -> BTreeSet<String> {
    [
        programs::FROM_POD,
        programs::TO_POD,
        programs::TO_UPLINK,
        programs::TO_HOST,
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

#[test]
fn the_production_object_has_only_the_programs_the_agent_attaches() {
    assert_eq!(program_names(EBPF_OBJECT).unwrap(), agents_programs());
}

#[test]
fn the_bench_object_adds_noop_and_the_bench_programs_to_those() {
    let (bench, agents) = (program_names(EBPF_BENCH_OBJECT).unwrap(), agents_programs());
    let extra: BTreeSet<&str> = bench.difference(&agents).map(String::as_str).collect();
    assert!(bench.is_superset(&agents), "{bench:?}");
    assert_eq!(
        extra,
        BTreeSet::from([
            "bench_deny_identity",
            "bench_deny_judge",
            "bench_endpoint",
            "bench_host_noop",
            "bench_lookups",
            "bench_parse",
            "noop"
        ])
    );
}
