//! The data path's verdict for a new flow, computed in user space from the
//! compiler's outputs only (the endpoint policies through
//! `EndpointPolicy::compile` and `mapstate::lookup`, and the ipcache), the way
//! the TC programs decide it. What the conformance model checks.
use std::net::IpAddr;

use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_TIERED, EP_INGRESS_TIERED, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_WORLD, PROFILE_KEY_FLAG, action, reason,
};

use super::{
    Compiler,
    mapstate::{CidrEntry, EndpointPolicy, Fold, fold},
};
use crate::model::ObjectRef;

/// Endpoint id used when compiling for the model; any value works, the
/// lookups use the same one.
const MODEL_EP: u32 = 1;

impl Compiler {
    /// Would a new flow from `src` to `dst` (protocol `proto`, destination
    /// port `port`) pass? It needs the egress of the source endpoint (when
    /// `src` is a local pod) and the ingress of the destination endpoint
    /// (when `dst` is a local pod).
    pub fn verdict(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        let side = |me: IpAddr, peer: IpAddr, dir: u8| match self.local_endpoint_at(me) {
            None => true,
            Some(pod) => self
                .decision(pod, dir, peer, proto, port)
                .is_some_and(Decision::allowed),
        };
        side(src, dst, DIR_EGRESS) && side(dst, src, DIR_INGRESS)
    }

    /// The decision of local endpoint `pod` in `dir` for a new flow with
    /// the peer at `peer`, with its profile's shared entries; `None`: not a
    /// local endpoint with a policy (the data path fails closed).
    pub fn decision(
        &self,
        pod: &ObjectRef,
        dir: u8,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<Decision> {
        let p = self.endpoint_policy(pod)?;
        let identity = self.peer_identity(peer);
        let profile = (p.profile != 0)
            .then(|| self.profile_policy(p.profile))
            .flatten();
        let shared = match (&profile, self.peer_class(identity)) {
            (Some(profile), Some(class)) => Some(Shared { profile, class }),
            _ => None,
        };
        Some(direction_verdict(
            &p, dir, identity, peer, proto, port, shared,
        ))
    }

    /// [`Self::decision`] of the local endpoint at address `me`; `None`:
    /// no local endpoint there.
    pub fn decision_at(
        &self,
        me: IpAddr,
        dir: u8,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<Decision> {
        let pod = self.local_endpoint_at(me)?;
        self.decision(pod, dir, peer, proto, port)
    }

    /// [`Self::verdict`] between two pods, on the first address of `from`
    /// and the address of `to` in the same family (false if they share no
    /// family).
    pub fn would_allow(&self, from: &ObjectRef, to: &ObjectRef, proto: u8, port: u16) -> bool {
        let (Some(src), Some(dsts)) = (self.addresses_of(from), self.addresses_of(to)) else {
            return false;
        };
        src.iter()
            .find_map(|s| {
                dsts.iter()
                    .find(|d| d.is_ipv4() == s.is_ipv4())
                    .map(|d| (*s, *d))
            })
            .is_some_and(|(s, d)| self.verdict(s, d, proto, port))
    }

    fn local_endpoint_at(&self, ip: IpAddr) -> Option<&ObjectRef> {
        self.pods
            .owner(ip)
            .and_then(|(owner, p)| p.local.then_some(owner))
    }

    /// The ipcache's answer: the pod's identity, else WORLD (the node's own
    /// addresses, HOST in the data path, are not pods and not modelled here).
    fn peer_identity(&self, ip: IpAddr) -> u32 {
        self.ip_identity(ip).map_or(IDENTITY_WORLD, |i| i.0)
    }
}

/// The verdict of one endpoint in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, by this rule id (0: no rule needed, or none to name).
    Allow(u32),
    /// Dropped for `reason` (`sluice_common::reason`), by `rule` (a
    /// ClusterNetworkPolicy rule id, or 0 for a NetworkPolicy default deny).
    Deny { reason: u8, rule: u32 },
}

impl Decision {
    pub fn allowed(self) -> bool {
        matches!(self, Self::Allow(_))
    }
}

/// One endpoint, one direction: [`direction_verdict`] allows (without
/// shared profile entries).
pub fn direction_allows(
    p: &EndpointPolicy,
    dir: u8,
    peer_identity: u32,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    direction_verdict(p, dir, peer_identity, peer, proto, port, None).allowed()
}

/// The shared entries of an endpoint's ClusterNetworkPolicy profile that a
/// flow visits: the profile's policy and the peer's class.
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    pub profile: &'a EndpointPolicy,
    pub class: u32,
}

/// One endpoint, one direction, as the data path decides it: the entries
/// of the peer's identity, of any peer and of the peer address's CIDR group
/// are folded (any NetworkPolicy allow, the lowest-rank Admin and Baseline
/// rule); then the Admin rule decides (Accept, Deny; Pass goes on), then
/// NetworkPolicy where the endpoint is isolated, then the Baseline rule,
/// else the flow is allowed. The node may always reach its pods.
pub fn direction_verdict(
    p: &EndpointPolicy,
    dir: u8,
    peer_identity: u32,
    peer: IpAddr,
    proto: u8,
    port: u16,
    shared: Option<Shared<'_>>,
) -> Decision {
    let isolated = if dir == DIR_INGRESS {
        p.ingress_isolated
    } else {
        p.egress_isolated
    };
    let tiered_bit = if dir == DIR_INGRESS {
        EP_INGRESS_TIERED
    } else {
        EP_EGRESS_TIERED
    };
    let tiered = p.tier_rules.iter().any(|t| t.dir == dir) || p.profile_tiered & tiered_bit != 0;
    if (!isolated && !tiered) || (dir == DIR_INGRESS && peer_identity == IDENTITY_HOST) {
        return Decision::Allow(0);
    }
    let Ok(c) = p.compile(MODEL_EP) else {
        return Decision::Deny {
            reason: reason::FAIL_CLOSED,
            rule: 0,
        };
    };
    let mut f = Fold::default();
    fold(&c, MODEL_EP, dir, peer_identity, proto, port, &mut f);
    fold(&c, MODEL_EP, dir, IDENTITY_ANY, proto, port, &mut f);
    if let Some(g) = lpm(&p.cidrs, dir, peer).filter(|&g| g != 0) {
        fold(&c, MODEL_EP, dir, g, proto, port, &mut f);
    }
    if let Some(s) = shared {
        let ep = PROFILE_KEY_FLAG | p.profile;
        let Ok(c) = s.profile.compile(ep) else {
            return Decision::Deny {
                reason: reason::FAIL_CLOSED,
                rule: 0,
            };
        };
        fold(&c, ep, dir, s.class, proto, port, &mut f);
    }
    decide(&f, isolated)
}

/// The tiers in order, from the folded hits.
pub fn decide(f: &Fold, isolated: bool) -> Decision {
    match f.admin {
        Some((_, action::ACCEPT, rule)) => return Decision::Allow(rule),
        Some((_, action::PASS, _)) => {}
        // Deny, or an action this agent does not know: fail closed.
        Some((_, _, rule)) => {
            return Decision::Deny {
                reason: reason::ADMIN_DENIED,
                rule,
            };
        }
        None => {}
    }
    if isolated {
        return match f.np_rule {
            Some(rule) => Decision::Allow(rule),
            None => Decision::Deny {
                reason: reason::POLICY_DENIED,
                rule: 0,
            },
        };
    }
    match f.baseline {
        Some((_, false, rule)) => Decision::Allow(rule),
        Some((_, true, rule)) => Decision::Deny {
            reason: reason::BASELINE_DENIED,
            rule,
        },
        None => Decision::Allow(0),
    }
}

/// The group of the longest prefix of `dir` that holds `addr`.
pub fn lpm(cidrs: &[CidrEntry], dir: u8, addr: IpAddr) -> Option<u32> {
    cidrs
        .iter()
        .filter(|c| c.dir == dir && c.net.contains(addr))
        .max_by_key(|c| c.net.prefix())
        .map(|c| c.group)
}
