//! Every map of the data path. The statics are named exactly as
//! `sluice_common::maps` says (the `#[map]` macro exports the static's name),
//! and all are pinned by name so that user space finds them in bpffs and a
//! restarted agent reuses them.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use sluice_common::{
    CidrKey, CidrValue, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, FragKey, FragValue,
    IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, sizes, stat,
};

/// ifindex of the host end of a pod veth -> endpoint.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(sizes::ENDPOINTS, 0);

/// Endpoint id -> ifindex of its host veth (its key in ENDPOINTS): how
/// `to_pod` finds the sender of a packet whose egress was deferred.
#[map]
pub static EP_BY_ID: HashMap<u32, u32> = HashMap::pinned(sizes::EP_BY_ID, 0);

/// Service addresses (ClusterIPs) -> `SERVICE_*` flags: new flows to them
/// have their egress judged after kube-proxy's DNAT.
#[map]
pub static SERVICES: HashMap<ServiceKey, u32> = HashMap::pinned(sizes::SERVICES, 0);

/// Address (v4-mapped or v6) -> identity, longest prefix.
#[map]
pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> = LpmTrie::pinned(sizes::IPCACHE, 0);

#[map]
pub static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(sizes::POLICY, 0);

/// Per endpoint and direction: address -> CIDR group (ipBlock).
#[map]
pub static CIDRS: LpmTrie<CidrKey, CidrValue> = LpmTrie::pinned(sizes::CIDRS, 0);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(sizes::CONNTRACK, 0);

#[map]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(sizes::FRAGS, 0);

#[map]
pub static DROP_COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::pinned(sizes::DROP_COUNTERS, 0);

#[map]
pub static DROP_EVENTS: RingBuf = RingBuf::pinned(sizes::DROP_EVENTS_BYTES, 0);

/// Flow (a conntrack key whose `_pad[0]` holds the direction) -> time of the
/// last drop event sent for it.
#[map]
pub static EVENT_RATE: LruHashMap<CtKey, u64> = LruHashMap::pinned(sizes::EVENT_RATE, 0);

/// The policy epoch, one entry (`EPOCH_INDEX`): the agent bumps it after
/// each programming pass that changed anything; a conntrack entry of
/// another epoch has its flow judged again. An array, so the verifier
/// inlines the lookup into a bounds check and a load.
#[map]
pub static EPOCH: Array<u32> = Array::pinned(1, 0);

/// The flow-event switch, one entry (`FLOW_EVENTS_INDEX`): non-zero while
/// the agent wants an event for every allowed new flow. An array: an
/// unobserved node pays one inlined lookup per new flow.
#[map]
pub static FLOW_EVENTS: Array<u32> = Array::pinned(1, 0);

/// Drops per ClusterNetworkPolicy rule id (`RULE_CNP_FLAG` set): the
/// Prometheus counters per tier and rule.
#[map]
pub static RULE_DROPS: PerCpuHashMap<u32, CounterValue> =
    PerCpuHashMap::pinned(sizes::RULE_DROPS, 0);

/// One slot per CPU: the rule of the last deny judged on this CPU, read by
/// the drop that follows it in the same program run (a `Result` cannot
/// carry it: see `Reason` in main.rs).
#[map]
pub static DENY_RULE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// One slot per CPU: the accumulator of a tiered lookup
/// (`policy::sluice_tiered`). In a map value, not on the stack: the
/// verifier does not track what is stored in map values, so every state of
/// the fold looks the same to it and prunes (on the stack, the found flags
/// and refined ranks made the states of 17 x 3 lookups differ: E2BIG).
#[map]
pub static TIER_SCRATCH: PerCpuArray<crate::policy::Tiers> = PerCpuArray::with_max_entries(1, 0);

/// Endpoint id -> its ClusterNetworkPolicy profile: the `PolicyKey::ep_id`
/// (with `PROFILE_KEY_FLAG`) of the tier entries it shares with every
/// endpoint selected by the same ClusterNetworkPolicies.
#[map]
pub static TIER_PROFILES: HashMap<u32, u32> = HashMap::pinned(sizes::TIER_PROFILES, 0);

/// Identity -> its peer class: the `PolicyKey::identity` of the profile
/// entries that match it (identities in the same ClusterNetworkPolicy peer
/// selectors share a class).
#[map]
pub static PEER_CLASSES: HashMap<u32, u32> = HashMap::pinned(sizes::PEER_CLASSES, 0);

/// Indexed by `sluice_common::stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

/// Adds one to a global statistic.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot of this CPU; programs do not nest on
        // one CPU for the same hook, and a lost increment would only skew a
        // statistic.
        unsafe { *p += 1 };
    }
}
