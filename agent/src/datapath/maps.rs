//! Typed handles on every map of the data path, and the encoding of their
//! keys (private: callers name addresses, prefixes and endpoints, never key
//! structs). Opened from a fresh load or from the pins of a running agent.
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key,
};
use ipnetwork::IpNetwork;
pub(super) use sluice_common::addr::{mapped, unmapped};
use sluice_common::{
    CidrKey, CidrValue, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, IpcacheKey,
    IpcacheValue, PolicyKey, PolicyValue, ServiceKey, maps,
};

use super::{DatapathError, Result};

/// Map sizes chosen at load time. An existing pinned map keeps its size.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub conntrack: u32,
    pub policy: u32,
    pub endpoints: u32,
    pub ipcache: u32,
    pub cidrs: u32,
    pub peer_classes: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        use sluice_common::sizes;
        Self {
            conntrack: sizes::CONNTRACK,
            policy: sizes::POLICY,
            endpoints: sizes::ENDPOINTS,
            ipcache: sizes::IPCACHE,
            cidrs: sizes::CIDRS,
            peer_classes: sizes::PEER_CLASSES,
        }
    }
}

/// Addresses of nodes (and their tunnel endpoints) an IPCACHE sized for a
/// cluster also holds: two per node for 4,096 nodes.
const NODE_ADDRESSES: u32 = 8_192;

impl Sizes {
    /// The maps whose fill follows the cluster, not the node, sized for a
    /// cluster of up to `pods` pods with a quarter of headroom (pods come
    /// and go; an address can be held by a leaving and an arriving pod for
    /// a moment): IPCACHE two addresses per pod (dual stack) and the
    /// nodes', PEER_CLASSES one class per identity (at most one per pod).
    /// Never below the defaults.
    pub fn for_cluster(pods: u32) -> Self {
        let headroom = |n: u32| n.saturating_add(n / 4);
        let d = Self::default();
        Self {
            ipcache: headroom(pods.saturating_mul(2).saturating_add(NODE_ADDRESSES)).max(d.ipcache),
            peer_classes: headroom(pods).max(d.peer_classes),
            ..d
        }
    }
}

/// Typed handles on every map of the data path.
pub struct Maps {
    pub(super) endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// Endpoint id -> host ifindex (its ENDPOINTS key), kept in step with
    /// ENDPOINTS.
    pub(super) ep_by_id: HashMap<MapData, u32, u32>,
    /// Service addresses (ClusterIPs) -> `SERVICE_*` flags.
    pub(super) services: HashMap<MapData, ServiceKey, u32>,
    pub(super) ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    pub(super) policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub(super) cidrs: LpmTrie<MapData, CidrKey, CidrValue>,
    #[expect(dead_code, reason = "kept typed so a wrong pinned map fails at open")]
    conntrack: HashMap<MapData, CtKey, CtValue>,
    drop_counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    stats: PerCpuArray<MapData, u64>,
    /// The policy epoch (one entry): conntrack entries of another epoch
    /// have their flow judged again.
    pub(super) epoch: Array<MapData, u32>,
    /// Endpoint id -> its ClusterNetworkPolicy profile.
    pub(super) tier_profiles: HashMap<MapData, u32, u32>,
    /// Identity -> its peer class in the profiles' entries.
    pub(super) peer_classes: HashMap<MapData, u32, u32>,
}

pub(super) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

pub(super) fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T> {
    T::try_from(map).map_err(map_err(name))
}

impl Maps {
    pub(super) fn from_source(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            endpoints: typed(maps::ENDPOINTS, get(maps::ENDPOINTS)?)?,
            ep_by_id: typed(maps::EP_BY_ID, get(maps::EP_BY_ID)?)?,
            services: typed(maps::SERVICES, get(maps::SERVICES)?)?,
            ipcache: typed(maps::IPCACHE, get(maps::IPCACHE)?)?,
            policy: typed(maps::POLICY, get(maps::POLICY)?)?,
            cidrs: typed(maps::CIDRS, get(maps::CIDRS)?)?,
            conntrack: typed(maps::CONNTRACK, get(maps::CONNTRACK)?)?,
            drop_counters: typed(maps::DROP_COUNTERS, get(maps::DROP_COUNTERS)?)?,
            stats: typed(maps::STATS, get(maps::STATS)?)?,
            epoch: typed(maps::EPOCH, get(maps::EPOCH)?)?,
            tier_profiles: typed(maps::TIER_PROFILES, get(maps::TIER_PROFILES)?)?,
            peer_classes: typed(maps::PEER_CLASSES, get(maps::PEER_CLASSES)?)?,
        })
    }

    /// Opens the maps a running (or stopped) agent pinned under `pin_dir`:
    /// for metrics, tests and benches, which read without the agent's state.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let dir = pin_dir.join("maps");
        Self::from_source(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// Sum of the per-CPU drop counters, by key.
    pub fn drop_counters(&self) -> Result<Vec<(CounterKey, CounterValue)>> {
        let mut out = Vec::new();
        for item in self.drop_counters.iter() {
            let (k, per_cpu) = item.map_err(map_err(maps::DROP_COUNTERS))?;
            let mut sum = CounterValue::default();
            for v in per_cpu.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.push((k, sum));
        }
        out.sort_by_key(|(k, _)| (k.ep_id, k.dir, k.reason));
        Ok(out)
    }

    /// Sum over CPUs of one `sluice_common::stat` counter.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let v = self.stats.get(&index, 0).map_err(map_err(maps::STATS))?;
        Ok(v.iter().sum())
    }

    /// The policy epoch in force.
    pub fn epoch(&self) -> Result<u32> {
        self.epoch
            .get(&sluice_common::EPOCH_INDEX, 0)
            .map_err(map_err(maps::EPOCH))
    }

    /// The ipcache entry of exactly this address (a /32 or /128).
    pub fn ipcache_get(&self, ip: IpAddr) -> Option<IpcacheValue> {
        self.ipcache.get(&ipcache_key(ip.into()), 0).ok()
    }

    /// The identity each single address holds in the ipcache (pods and
    /// nodes; prefixes are skipped). A restarted agent reads it to keep the
    /// numbers it handed out before (docs/design.md, "Numbers survive a
    /// restart").
    pub fn ipcache_identities(&self) -> Vec<(IpAddr, u32)> {
        self.ipcache
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.prefix_len() == 128)
            .map(|(k, v)| {
                (
                    sluice_common::addr::unmapped_addr(k.data().addr),
                    v.identity,
                )
            })
            .collect()
    }

    /// Every CIDRS entry: (endpoint id, direction, prefix, CIDR group).
    pub fn cidr_groups(&self) -> Vec<(u32, u8, ipnetwork::IpNetwork, u32)> {
        self.cidrs
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| {
                let plen = k
                    .prefix_len()
                    .saturating_sub(sluice_common::CIDR_KEY_FIXED_BITS);
                let d = k.data();
                (d.ep_id, d.dir, unmapped(d.addr, plen), v.group)
            })
            .collect()
    }

    /// Every PEER_CLASSES entry (identity, class).
    pub fn peer_classes(&self) -> Vec<(u32, u32)> {
        self.peer_classes.iter().filter_map(|r| r.ok()).collect()
    }

    /// Every TIER_PROFILES entry (endpoint id, profile).
    pub fn tier_profiles(&self) -> Vec<(u32, u32)> {
        self.tier_profiles.iter().filter_map(|r| r.ok()).collect()
    }

    /// Entries in the ipcache (a key walk: a syscall per entry).
    pub fn ipcache_len(&self) -> usize {
        self.ipcache.keys().count()
    }

    /// The Service addresses in SERVICES.
    pub fn service_ips(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for item in self.services.keys() {
            let k = item.map_err(map_err(maps::SERVICES))?;
            out.insert(sluice_common::addr::unmapped_addr(k.addr));
        }
        Ok(out)
    }

    /// Entries in POLICY.
    pub fn policy_len(&self) -> usize {
        self.policy.keys().count()
    }

    /// Every ENDPOINTS record (ifindex, record).
    pub fn endpoint_records(&self) -> Vec<(u32, EndpointInfo)> {
        self.endpoints.iter().filter_map(|r| r.ok()).collect()
    }
}

/// Key of a Service address in SERVICES.
pub(super) fn service_key(ip: IpAddr) -> ServiceKey {
    let (addr, _) = mapped(ip.into());
    ServiceKey { addr }
}

/// LPM key of a prefix in the ipcache.
pub(super) fn ipcache_key(net: IpNetwork) -> Key<IpcacheKey> {
    let (addr, plen) = mapped(net);
    Key::new(plen, IpcacheKey { addr })
}

/// LPM key of a prefix in an endpoint's CIDR map.
pub(super) fn cidr_key(ep_id: u32, dir: u8, net: IpNetwork) -> Key<CidrKey> {
    let (addr, plen) = mapped(net);
    Key::new(
        sluice_common::CIDR_KEY_FIXED_BITS + plen,
        CidrKey {
            ep_id,
            dir,
            _pad: [0; 3],
            addr,
        },
    )
}

/// `Ok` for a key that was already gone: removals are idempotent.
pub(super) fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::Sizes;

    #[test]
    fn cluster_sized_maps_hold_every_pod_address_with_a_quarter_to_spare() {
        let s = Sizes::for_cluster(150_000);
        // 300,000 pod addresses and 8,192 node addresses, plus a quarter.
        assert_eq!(s.ipcache, 385_240);
        assert_eq!(s.peer_classes, 187_500);
        // 100,000 pods fit the default IPCACHE (260,240 of 262,144).
        assert_eq!(Sizes::for_cluster(100_000).ipcache, 262_144);
        assert_eq!(Sizes::for_cluster(100_000).peer_classes, 125_000);
        let big = Sizes::for_cluster(1_000_000);
        assert_eq!(big.ipcache, 2_510_240);
        // Small clusters keep the defaults; node-sized maps never move.
        let small = Sizes::for_cluster(1_000);
        let d = Sizes::default();
        assert_eq!(
            (small.ipcache, small.peer_classes),
            (d.ipcache, d.peer_classes)
        );
        assert_eq!(
            (big.policy, big.endpoints, big.conntrack),
            (d.policy, d.endpoints, d.conntrack)
        );
    }
}
