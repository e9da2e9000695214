//! What the data path counts, read from the maps a running agent pinned:
//! drop counters, the `STATS` per-CPU array, and the fills that only a key
//! walk tells. Opened from the pins on each read, so a scrape needs no lock
//! of the agent's and never waits for programming (nor programming for it).
use std::{collections::BTreeMap, path::Path};

use aya::maps::{IterableMap as _, MapData};

use sluice_common::{EP_FAIL_CLOSED, maps, stat};

use crate::datapath::{DatapathError, Maps};

/// Packets and bytes, summed over CPUs (and, in `Counters::drops`, over
/// endpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// One reading of the data path's counters (plain data, no map handles).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Drops by `(sluice_common::reason::*, sluice_common::DIR_*)`.
    pub drops: BTreeMap<(u8, u8), Count>,
    /// Each `sluice_common::stat` counter summed over CPUs, by index.
    pub stats: [u64; stat::COUNT as usize],
    /// Maps' fills: entries by a key walk (a syscall per entry) and the
    /// capacity the kernel has for the map (a pinned map reused across
    /// restarts keeps the size it was made with). POLICY has only its
    /// capacity here (its entries are the agent's records: a walk of up to
    /// a million keys per scrape would cost a second); CONNTRACK none (an
    /// LRU table is full by design).
    pub fills: BTreeMap<&'static str, Fill>,
    /// Endpoints whose ENDPOINTS flags hold `EP_FAIL_CLOSED`: read from the
    /// kernel, so right across agent restarts too.
    pub failed_closed: usize,
    /// Drops by ClusterNetworkPolicy rule id (RULE_DROPS), summed over CPUs.
    pub rule_drops: BTreeMap<u32, Count>,
}

/// One map's entries and capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub entries: usize,
    pub capacity: u32,
}

impl Counters {
    /// One `sluice_common::stat` counter (0 past the array).
    pub fn stat(&self, index: u32) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.stats.get(i))
            .copied()
            .unwrap_or(0)
    }
}

/// Counts the keys of a walk; the first error ends it.
fn walk<K>(
    name: &'static str,
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
) -> Result<usize, DatapathError> {
    let mut n = 0;
    for key in keys {
        key.map_err(walk_err(name))?;
        n += 1;
    }
    Ok(n)
}

fn walk_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Reads every counter from the maps pinned under `pin_dir`.
pub fn read(pin_dir: &Path) -> Result<Counters, DatapathError> {
    let maps = Maps::open_pinned(pin_dir)?;
    let mut out = Counters::default();
    for (k, v) in maps.drop_counters()? {
        let c = out.drops.entry((k.reason, k.dir)).or_default();
        c.packets += v.packets;
        c.bytes += v.bytes;
    }
    for (index, slot) in (0u32..).zip(out.stats.iter_mut()) {
        *slot = maps.stat(index)?;
    }
    let mut fill = |name: &'static str, map: &MapData, entries: usize| {
        let capacity = map.info().map_err(walk_err(name))?.max_entries();
        out.fills.insert(name, Fill { entries, capacity });
        Ok::<_, DatapathError>(())
    };
    fill(
        maps::IPCACHE,
        maps.ipcache.map(),
        walk(maps::IPCACHE, maps.ipcache.keys())?,
    )?;
    fill(
        maps::SERVICES,
        maps.services.map(),
        walk(maps::SERVICES, maps.services.keys())?,
    )?;
    fill(
        maps::CIDRS,
        maps.cidrs.map(),
        walk(maps::CIDRS, maps.cidrs.keys())?,
    )?;
    fill(
        maps::PEER_CLASSES,
        maps.peer_classes.map(),
        walk(maps::PEER_CLASSES, maps.peer_classes.keys())?,
    )?;
    fill(
        maps::TIER_PROFILES,
        maps.tier_profiles.map(),
        walk(maps::TIER_PROFILES, maps.tier_profiles.keys())?,
    )?;
    fill(maps::POLICY, maps.policy.map(), 0)?;
    let mut endpoints = 0;
    for item in maps.endpoints.iter() {
        let (_, info) = item.map_err(walk_err(maps::ENDPOINTS))?;
        endpoints += 1;
        if info.flags & EP_FAIL_CLOSED != 0 {
            out.failed_closed += 1;
        }
    }
    fill(maps::ENDPOINTS, maps.endpoints.map(), endpoints)?;
    out.rule_drops = rule_drops(pin_dir)?;
    Ok(out)
}

/// RULE_DROPS, opened from its pin (an agent from before ClusterNetworkPolicy
/// has none: no rule drops).
fn rule_drops(pin_dir: &Path) -> Result<BTreeMap<u32, Count>, DatapathError> {
    use aya::maps::{Map, MapData, PerCpuHashMap};
    use sluice_common::CounterValue;
    let name = maps::RULE_DROPS;
    let path = pin_dir.join("maps").join(name);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let data = MapData::from_pin(&path).map_err(walk_err(name))?;
    let map = Map::from_map_data(data).map_err(walk_err(name))?;
    let map: PerCpuHashMap<MapData, u32, CounterValue> =
        PerCpuHashMap::try_from(map).map_err(walk_err(name))?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (rule, per_cpu) = item.map_err(walk_err(name))?;
        let c: &mut Count = out.entry(rule).or_default();
        for v in per_cpu.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
    }
    Ok(out)
}
