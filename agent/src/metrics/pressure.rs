//! `sluice_map_pressure`: each map's entries over its capacity.
use super::{Counters, EndpointStats};

/// Each map's pressure: POLICY's entries are the agent's records (the sum
/// over endpoints), ENDPOINTS' its endpoints, the other maps' come from the
/// key walks; capacities are the kernel's when the maps could be read, the
/// sizes asked for at load otherwise.
pub(super) fn pressures(
    state: &EndpointStats,
    counters: Option<&Counters>,
) -> Vec<(&'static str, f64)> {
    use sluice_common::maps::{ENDPOINTS, POLICY};
    let cap = |name, asked| {
        counters
            .and_then(|c| c.fills.get(name))
            .map_or(asked, |f| f.capacity)
    };
    let total: usize = state.endpoints.iter().map(|ep| ep.entries).sum();
    let mut out = vec![
        (POLICY, ratio(total, cap(POLICY, state.capacity.policy))),
        (
            ENDPOINTS,
            ratio(
                state.endpoints.len(),
                cap(ENDPOINTS, state.capacity.endpoints),
            ),
        ),
    ];
    if let Some(c) = counters {
        out.extend(
            c.fills
                .iter()
                .filter(|(name, _)| ![POLICY, ENDPOINTS].contains(*name))
                .map(|(name, f)| (*name, ratio(f.entries, f.capacity))),
        );
    }
    out
}

fn ratio(used: usize, cap: u32) -> f64 {
    if cap == 0 {
        0.0
    } else {
        used as f64 / f64::from(cap)
    }
}
