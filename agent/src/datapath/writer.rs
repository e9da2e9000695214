//! The one writer of the maps the agent programs: the ipcache, endpoint
//! records (ENDPOINTS and EP_BY_ID), per-endpoint policy (POLICY and
//! CIDRS) and Service addresses. Every ENDPOINTS flag is edited here.
//! Callers say what should be true; the order of writes that keeps the
//! data path correct at every instant is decided here. After a programming
//! pass, `bump_epoch` makes what it changed reach established flows.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use itertools::{EitherOrBoth, merge_join_by};
use sluice_common::{
    CidrValue, EP_EGRESS_ISOLATED, EP_EGRESS_TIERED, EP_FAIL_CLOSED, EP_HAIRPIN_TAG_MASK,
    EP_HAS_IPV4, EP_HAS_IPV6, EP_INGRESS_ISOLATED, EP_INGRESS_TIERED, EndpointInfo, IpcacheValue,
    POLICY_ADMIN, POLICY_BASELINE, PROFILE_KEY_FLAG, PolicyKey, PolicyValue, SERVICE_CLUSTER_IP,
    hairpin_tag_bits, maps as names,
};
use tracing::{debug, info};

use super::{
    Result,
    maps::{Maps, cidr_key, ignore_missing, ipcache_key, map_err, service_key, unmapped},
};
use crate::{
    model::{EpId, Identity},
    policy::{Compiled, Delta, plen_bit},
};

/// What the data path knows of a node-local endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    pub ep_id: EpId,
    pub identity: Identity,
    /// The host end of its veth: the key of its ENDPOINTS record.
    pub ifindex: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Its hairpin tag (0: none), written into its ENDPOINTS flags
    /// (`EP_HAIRPIN_TAG_MASK`) and never changed while it lives.
    pub hairpin_tag: u32,
}

impl EndpointRecord {
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + use<> {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

/// What a policy change does to flows established before it
/// (`--established`; docs/design.md, "Policy changes reach established
/// flows").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Established {
    /// Judged again on their next packet; dropped as `revoked` when the
    /// new policy denies them.
    #[default]
    Revalidate,
    /// Kept until they end, as netfilter's conntrack does: the epoch is
    /// never bumped.
    Keep,
}

/// Writes the maps; knows what it wrote to SERVICES, and whether anything
/// a verdict depends on changed since the last epoch bump.
pub struct Writer {
    maps: Maps,
    service_ips: BTreeSet<IpAddr>,
    established: Established,
    /// The ipcache, POLICY, CIDRS or an endpoint's flags were written in a
    /// way that may deny a flow allowed before.
    changed: bool,
}

impl Writer {
    pub(super) fn new(maps: Maps) -> Result<Self> {
        let service_ips = maps.service_ips()?;
        Ok(Self {
            maps,
            service_ips,
            established: Established::default(),
            changed: false,
        })
    }

    pub fn set_established(&mut self, established: Established) {
        self.established = established;
    }

    /// Ends a programming pass: if it changed anything a verdict depends
    /// on, bumps the policy epoch (`EPOCH`), so that every conntrack entry
    /// written before has its flow judged again on its next packet. Call it
    /// after the pass's last write and before reporting the pass
    /// programmed. With `Established::Keep`, never bumps.
    pub fn bump_epoch(&mut self) -> Result<()> {
        if !self.changed || self.established == Established::Keep {
            return Ok(());
        }
        let index = sluice_common::EPOCH_INDEX;
        let next = self.maps.epoch()?.wrapping_add(1);
        self.maps
            .epoch
            .set(index, &next, 0)
            .map_err(map_err(names::EPOCH))?;
        self.changed = false;
        debug!(epoch = next, "policy epoch bumped");
        Ok(())
    }

    /// Read access for metrics and checks.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Maps an address to an identity (and the local endpoint that has it,
    /// if any).
    pub fn set_ipcache(&mut self, ip: IpAddr, identity: Identity, ep: Option<EpId>) -> Result<()> {
        let v = IpcacheValue {
            identity: identity.0,
            ep_id: ep.map_or(0, |e| e.0),
        };
        self.changed = true;
        self.maps
            .ipcache
            .insert(&ipcache_key(ip.into()), &v, 0)
            .map_err(map_err(names::IPCACHE))
    }

    /// Forgets an address; already gone is fine.
    pub fn remove_ipcache(&mut self, ip: IpAddr) -> Result<()> {
        self.changed = true;
        ignore_missing(self.maps.ipcache.remove(&ipcache_key(ip.into())))
            .map_err(map_err(names::IPCACHE))
    }

    /// Writes a new endpoint: its addresses, EP_BY_ID, then ENDPOINTS with
    /// the isolation and masks of `policy` (what is already programmed for
    /// it, if anything). EP_BY_ID before ENDPOINTS: the endpoint can send
    /// nothing until its ENDPOINTS record exists, and its deferred flows
    /// need both.
    pub fn add_endpoint(&mut self, ep: &EndpointRecord, policy: &Compiled) -> Result<()> {
        for ip in ep.ips() {
            self.set_ipcache(ip, ep.identity, Some(ep.ep_id))?;
        }
        self.index_endpoint(ep)?;
        let info = EndpointInfo {
            ep_id: ep.ep_id.0,
            flags: policy.isolation
                | if ep.ipv4.is_some() { EP_HAS_IPV4 } else { 0 }
                | if ep.ipv6.is_some() { EP_HAS_IPV6 } else { 0 }
                | hairpin_tag_bits(ep.hairpin_tag),
            identity: ep.identity.0,
            ipv4: ep.ipv4.map(|a| a.octets()).unwrap_or_default(),
            ipv6: ep.ipv6.map(|a| a.octets()).unwrap_or_default(),
            port_plens: policy.port_plens,
        };
        self.maps
            .endpoints
            .insert(&ep.ifindex, &info, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    /// EP_BY_ID of an endpoint (an agent that predates that map may have
    /// pinned the others without it).
    pub fn index_endpoint(&mut self, ep: &EndpointRecord) -> Result<()> {
        self.maps
            .ep_by_id
            .insert(&ep.ep_id.0, &ep.ifindex, 0)
            .map_err(map_err(names::EP_BY_ID))
    }

    /// Whether ENDPOINTS holds this endpoint's record.
    pub fn has_endpoint(&self, ep: &EndpointRecord) -> bool {
        self.record(ep).is_some()
    }

    fn record(&self, ep: &EndpointRecord) -> Option<EndpointInfo> {
        self.maps
            .endpoints
            .get(&ep.ifindex, 0)
            .ok()
            .filter(|info| info.ep_id == ep.ep_id.0)
    }

    /// Removes everything of an endpoint: its record, EP_BY_ID, the
    /// addresses that still name it, and `policy` (what is programmed for
    /// it). Missing pieces are fine.
    pub fn remove_endpoint(&mut self, ep: &EndpointRecord, policy: &Compiled) -> Result<()> {
        if self.record(ep).is_some() {
            ignore_missing(self.maps.endpoints.remove(&ep.ifindex))
                .map_err(map_err(names::ENDPOINTS))?;
        }
        // Endpoint ids are never reused: this entry is only ever ep's.
        ignore_missing(self.maps.ep_by_id.remove(&ep.ep_id.0)).map_err(map_err(names::EP_BY_ID))?;
        for ip in ep.ips() {
            if self
                .maps
                .ipcache_get(ip)
                .is_some_and(|v| v.ep_id == ep.ep_id.0)
            {
                self.remove_ipcache(ip)?;
            }
        }
        self.remove_stale(ep.ep_id, policy, &Compiled::default())?;
        self.set_profile(ep.ep_id, policy.profile, 0)
    }

    /// Points an endpoint at its ClusterNetworkPolicy profile (0: none).
    /// The profile's entries are written before (`write_profile`).
    fn set_profile(&mut self, ep_id: EpId, old: u32, new: u32) -> Result<()> {
        if old == new {
            return Ok(());
        }
        self.changed = true;
        if new == 0 {
            ignore_missing(self.maps.tier_profiles.remove(&ep_id.0))
                .map_err(map_err(names::TIER_PROFILES))
        } else {
            self.maps
                .tier_profiles
                .insert(&ep_id.0, &new, 0)
                .map_err(map_err(names::TIER_PROFILES))
        }
    }

    /// Writes what a profile's entries gain (`new` against `old`, both
    /// compiled with `PROFILE_KEY_FLAG | id`): before the endpoints and
    /// classes that use them.
    pub fn write_profile(&mut self, id: u32, old: &Compiled, new: &Compiled) -> Result<()> {
        self.write_set(&Delta::between(old, new).set)?;
        self.write_cidrs(EpId(PROFILE_KEY_FLAG | id), old, new)
    }

    /// Removes what a profile's entries lost: after the endpoints moved.
    pub fn prune_profile(&mut self, id: u32, old: &Compiled, new: &Compiled) -> Result<()> {
        self.remove_keys(&Delta::between(old, new).removed)?;
        self.remove_stale_cidrs(EpId(PROFILE_KEY_FLAG | id), old, new)
    }

    /// The peer class of an identity (`None`: none).
    pub fn set_peer_class(&mut self, identity: u32, class: Option<u32>) -> Result<()> {
        self.changed = true;
        match class {
            Some(c) => self
                .maps
                .peer_classes
                .insert(&identity, &c, 0)
                .map_err(map_err(names::PEER_CLASSES)),
            None => ignore_missing(self.maps.peer_classes.remove(&identity))
                .map_err(map_err(names::PEER_CLASSES)),
        }
    }

    /// Makes PEER_CLASSES hold exactly `all` (a full pass, or an agent
    /// taking over another's maps).
    pub fn replace_peer_classes(&mut self, all: &BTreeMap<u32, u32>) -> Result<()> {
        let mut have = BTreeMap::new();
        for item in self.maps.peer_classes.iter() {
            let (k, v) = item.map_err(map_err(names::PEER_CLASSES))?;
            have.insert(k, v);
        }
        for (&i, &c) in all {
            if have.get(&i) != Some(&c) {
                self.set_peer_class(i, Some(c))?;
            }
        }
        for i in have.keys().filter(|i| !all.contains_key(i)) {
            self.set_peer_class(*i, None)?;
        }
        Ok(())
    }

    /// The hairpin tag bits of an endpoint's record (an endpoint an older
    /// agent wrote without them); the other flags stay.
    pub fn set_hairpin_tag(&mut self, ep: &EndpointRecord) -> Result<()> {
        let Some(mut info) = self.record(ep) else {
            return Ok(());
        };
        let flags = (info.flags & !EP_HAIRPIN_TAG_MASK) | hairpin_tag_bits(ep.hairpin_tag);
        if flags == info.flags {
            return Ok(());
        }
        info.flags = flags;
        self.maps
            .endpoints
            .insert(&ep.ifindex, &info, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    /// A new identity for an endpoint: its record and its addresses.
    pub fn set_identity(&mut self, ep: &EndpointRecord) -> Result<()> {
        if let Some(mut info) = self.record(ep) {
            info.identity = ep.identity.0;
            self.maps
                .endpoints
                .insert(&ep.ifindex, &info, 0)
                .map_err(map_err(names::ENDPOINTS))?;
        }
        for ip in ep.ips() {
            self.set_ipcache(ip, ep.identity, Some(ep.ep_id))?;
        }
        Ok(())
    }

    /// Replaces an endpoint's policy `old` with `new` so that the endpoint
    /// is never less enforced than either: new entries first, then its
    /// flags and prefix-length masks widened to cover both, then stale
    /// entries removed, then the masks narrowed to `new`. On an error (a
    /// full map) nothing of either policy is left and the endpoint fails
    /// closed; the error is returned.
    pub fn replace_policy(
        &mut self,
        ep: &EndpointRecord,
        old: &Compiled,
        new: &Compiled,
    ) -> Result<()> {
        let delta = Delta::between(old, new);
        if let Err(e) = self.apply_patch(ep, old, new, &delta) {
            self.fail_closed(ep, old, new)?;
            return Err(e);
        }
        Ok(())
    }

    /// Applies a patch (`EndpointPolicy::patch`) in the order of
    /// [`Self::replace_policy`]: the entries set, the CIDR entries gained,
    /// the profile, the flags with the masks widened to before and after,
    /// the entries removed, the CIDR entries lost, the final flags.
    /// `before`: what the endpoint had (its `entries` are not read),
    /// `after`: what it has now. On an error the caller fails it closed.
    pub fn apply_patch(
        &mut self,
        ep: &EndpointRecord,
        before: &Compiled,
        after: &Compiled,
        delta: &Delta,
    ) -> Result<()> {
        self.write_set(&delta.set)?;
        self.write_cidrs(ep.ep_id, before, after)?;
        self.set_profile(ep.ep_id, before.profile, after.profile)?;
        let widened = [
            before.port_plens[0] | after.port_plens[0],
            before.port_plens[1] | after.port_plens[1],
        ];
        self.write_flags(ep, after.isolation, widened, false)?;
        self.remove_keys(&delta.removed)?;
        self.remove_stale_cidrs(ep.ep_id, before, after)?;
        self.write_flags(ep, after.isolation, after.port_plens, false)
    }

    /// Sets EP_FAIL_CLOSED first, then removes every entry of `old` and
    /// `attempted`: the endpoint drops all IP traffic and nothing it had is
    /// left. Returns what is now programmed for it.
    pub fn fail_closed(
        &mut self,
        ep: &EndpointRecord,
        old: &Compiled,
        attempted: &Compiled,
    ) -> Result<Compiled> {
        let isolation = EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED;
        self.write_flags(ep, isolation, [0, 0], true)?;
        let mut both = old.clone();
        both.entries
            .extend(attempted.entries.iter().map(|(k, v)| (*k, *v)));
        both.cidrs
            .extend(attempted.cidrs.iter().map(|(k, v)| (*k, *v)));
        self.remove_stale(ep.ep_id, &both, &Compiled::default())?;
        self.set_profile(ep.ep_id, old.profile | attempted.profile, 0)?;
        Ok(Compiled {
            isolation,
            ..Compiled::default()
        })
    }

    /// The isolation, fail-closed bit and masks of an endpoint's record;
    /// the other flags stay.
    fn write_flags(
        &mut self,
        ep: &EndpointRecord,
        isolation: u32,
        plens: [u32; 2],
        fail_closed: bool,
    ) -> Result<()> {
        let mut info = self
            .maps
            .endpoints
            .get(&ep.ifindex, 0)
            .map_err(map_err(names::ENDPOINTS))?;
        let managed = EP_INGRESS_ISOLATED
            | EP_EGRESS_ISOLATED
            | EP_INGRESS_TIERED
            | EP_EGRESS_TIERED
            | EP_FAIL_CLOSED;
        let flags =
            (info.flags & !managed) | isolation | if fail_closed { EP_FAIL_CLOSED } else { 0 };
        // Isolation gained denies what it no longer admits.
        self.changed |= flags != info.flags;
        info.flags = flags;
        info.port_plens = plens;
        self.maps
            .endpoints
            .insert(&ep.ifindex, &info, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    /// Rewrites an endpoint's prefix-length masks from what its POLICY
    /// entries need (`programmed`, read back from the maps). An agent takes
    /// over records an older agent wrote, maybe without bits this data path
    /// reads (the peer-class bits): written before the new programs are
    /// attached, so they never skip a lookup an entry needs.
    pub fn refresh_masks(&mut self, ep: &EndpointRecord, programmed: &Compiled) -> Result<()> {
        let Some(mut info) = self.record(ep) else {
            return Ok(());
        };
        if info.port_plens == programmed.port_plens {
            return Ok(());
        }
        info.port_plens = programmed.port_plens;
        self.maps
            .endpoints
            .insert(&ep.ifindex, &info, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    /// Writes entries, each with whether its key was programmed before.
    fn write_set(&mut self, set: &[(PolicyKey, PolicyValue, bool)]) -> Result<()> {
        for (k, v, existed) in set {
            // A new NetworkPolicy key only admits more; a rewritten one
            // may not, nor may a ClusterNetworkPolicy key (an Admin or
            // Baseline Deny cuts established flows too).
            self.changed |= *existed || v.flags & (POLICY_ADMIN | POLICY_BASELINE) != 0;
            self.maps
                .policy
                .insert(k, v, 0)
                .map_err(map_err(names::POLICY))?;
        }
        Ok(())
    }

    /// Writes the CIDR entries `new` has and `old` has not, or with
    /// another group.
    fn write_cidrs(&mut self, ep_id: EpId, old: &Compiled, new: &Compiled) -> Result<()> {
        for e in merge_join_by(&old.cidrs, &new.cidrs, |a, b| a.0.cmp(b.0)) {
            let ((dir, net), group) = match e {
                EitherOrBoth::Right(n) => n,
                EitherOrBoth::Both((_, was), n) if was != n.1 => n,
                _ => continue,
            };
            // A new prefix may be an `except` hole.
            self.changed = true;
            let key = cidr_key(ep_id.0, *dir, *net);
            self.maps
                .cidrs
                .insert(&key, &CidrValue { group: *group }, 0)
                .map_err(map_err(names::CIDRS))?;
        }
        Ok(())
    }

    /// Removes what `old` has and `new` does not.
    fn remove_stale(&mut self, ep_id: EpId, old: &Compiled, new: &Compiled) -> Result<()> {
        let stale: Vec<PolicyKey> =
            merge_join_by(old.entries.keys(), new.entries.keys(), |a, b| a.cmp(b))
                .filter_map(EitherOrBoth::just_left)
                .copied()
                .collect();
        self.remove_keys(&stale)?;
        self.remove_stale_cidrs(ep_id, old, new)
    }

    fn remove_keys(&mut self, keys: &[PolicyKey]) -> Result<()> {
        self.changed |= !keys.is_empty();
        for k in keys {
            ignore_missing(self.maps.policy.remove(k)).map_err(map_err(names::POLICY))?;
        }
        Ok(())
    }

    /// Removes the CIDR entries `old` has and `new` has not.
    fn remove_stale_cidrs(&mut self, ep_id: EpId, old: &Compiled, new: &Compiled) -> Result<()> {
        for (dir, net) in merge_join_by(old.cidrs.keys(), new.cidrs.keys(), |a, b| a.cmp(b))
            .filter_map(EitherOrBoth::just_left)
        {
            self.changed = true;
            ignore_missing(self.maps.cidrs.remove(&cidr_key(ep_id.0, *dir, *net)))
                .map_err(map_err(names::CIDRS))?;
        }
        Ok(())
    }

    /// Makes SERVICES hold exactly `ips` (the cluster's ClusterIPs): new
    /// addresses are added before gone ones are removed. New flows of pods
    /// to these addresses have their egress judged after kube-proxy's DNAT
    /// (docs/design.md, "Services").
    pub fn set_services(&mut self, ips: &BTreeSet<IpAddr>) -> Result<()> {
        for ip in ips.difference(&self.service_ips) {
            self.maps
                .services
                .insert(&service_key(*ip), &SERVICE_CLUSTER_IP, 0)
                .map_err(map_err(names::SERVICES))?;
        }
        let gone: Vec<IpAddr> = self.service_ips.difference(ips).copied().collect();
        for ip in gone {
            ignore_missing(self.maps.services.remove(&service_key(ip)))
                .map_err(map_err(names::SERVICES))?;
        }
        if self.service_ips != *ips {
            info!(count = ips.len(), "service addresses programmed");
        }
        self.service_ips = ips.clone();
        Ok(())
    }

    /// The Service addresses programmed.
    pub fn service_ips(&self) -> &BTreeSet<IpAddr> {
        &self.service_ips
    }

    /// What POLICY, CIDRS and the ENDPOINTS flags hold, per endpoint: the
    /// programmed policy an agent finds when it starts.
    pub fn programmed_policy(&self) -> Result<HashMap<EpId, Compiled>> {
        let mut out: HashMap<EpId, Compiled> = HashMap::new();
        for item in self.maps.policy.iter() {
            let (k, v) = item.map_err(map_err(names::POLICY))?;
            let c = out.entry(EpId(k.ep_id)).or_default();
            c.port_plens[usize::from(k.dir) & 1] |= plen_bit(&k);
            c.entries.insert(k, v);
        }
        for item in self.maps.cidrs.iter() {
            let (k, v) = item.map_err(map_err(names::CIDRS))?;
            let data = k.data();
            let plen = k.prefix_len() - sluice_common::CIDR_KEY_FIXED_BITS;
            let net = unmapped(data.addr, plen);
            out.entry(EpId(data.ep_id))
                .or_default()
                .cidrs
                .insert((data.dir, net), v.group);
        }
        for item in self.maps.tier_profiles.iter() {
            let (ep_id, profile) = item.map_err(map_err(names::TIER_PROFILES))?;
            out.entry(EpId(ep_id)).or_default().profile = profile;
        }
        for item in self.maps.endpoints.iter() {
            let (_, info) = item.map_err(map_err(names::ENDPOINTS))?;
            let c = out.entry(EpId(info.ep_id)).or_default();
            c.isolation = info.flags
                & (EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED | EP_INGRESS_TIERED | EP_EGRESS_TIERED);
        }
        Ok(out)
    }
}
