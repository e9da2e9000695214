//! The data path's verdict for a new flow, computed in user space from the
//! compiler's outputs only (the endpoint policies through
//! `EndpointPolicy::compile` and `mapstate::lookup`, and the ipcache), the way
//! the TC programs decide it. What the conformance model checks.
use std::net::IpAddr;

use sluice_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD};

use super::{
    Compiler,
    mapstate::{CidrEntry, EndpointPolicy, lookup},
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
            Some(pod) => match self.endpoint_policy(pod) {
                Some(p) => direction_allows(&p, dir, self.peer_identity(peer), peer, proto, port),
                // A local endpoint without a policy cannot be programmed:
                // the data path fails closed.
                None => false,
            },
        };
        side(src, dst, DIR_EGRESS) && side(dst, src, DIR_INGRESS)
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

/// One endpoint, one direction: not isolated, or the peer's identity, any
/// peer, or the peer address's CIDR group is allowed.
pub fn direction_allows(
    p: &EndpointPolicy,
    dir: u8,
    peer_identity: u32,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let isolated = if dir == DIR_INGRESS {
        p.ingress_isolated
    } else {
        p.egress_isolated
    };
    if !isolated || (dir == DIR_INGRESS && peer_identity == IDENTITY_HOST) {
        return true;
    }
    let Ok(c) = p.compile(MODEL_EP) else {
        return false;
    };
    let allows = |identity| lookup(&c, MODEL_EP, dir, identity, proto, port);
    allows(peer_identity)
        || allows(IDENTITY_ANY)
        || lpm(&p.cidrs, dir, peer).is_some_and(|g| g != 0 && allows(g))
}

/// The group of the longest prefix of `dir` that holds `addr`.
pub fn lpm(cidrs: &[CidrEntry], dir: u8, addr: IpAddr) -> Option<u32> {
    cidrs
        .iter()
        .filter(|c| c.dir == dir && c.net.contains(addr))
        .max_by_key(|c| c.net.prefix())
        .map(|c| c.group)
}
