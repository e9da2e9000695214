//! Range sets: the subnets one address per attachment is taken from.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::{Error, Result};

/// Subnets of one address family. The network address (and in IPv4 the
/// broadcast address) of each subnet is never handed out; no gateway is
/// reserved since pods route through the link-local 169.254.1.1 / fe80::1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet {
    subnets: Vec<IpNetwork>,
}

impl RangeSet {
    /// `"ranges": [["10.244.1.0/24", "10.244.2.0/24"], ["fd00::/64"]]`: one
    /// or two range sets, each of one family, at most one per family.
    pub fn parse_all(raw: &[Vec<String>]) -> Result<Vec<RangeSet>> {
        if raw.is_empty() {
            return Err(Error::InvalidConfig("ranges is empty".into()));
        }
        let sets = raw
            .iter()
            .map(|set| Self::parse(set))
            .collect::<Result<Vec<_>>>()?;
        if sets.iter().filter(|s| s.is_v6()).count() > 1
            || sets.iter().filter(|s| !s.is_v6()).count() > 1
        {
            return Err(Error::InvalidConfig(
                "ranges: at most one range set per address family".into(),
            ));
        }
        Ok(sets)
    }

    fn parse(raw: &[String]) -> Result<Self> {
        if raw.is_empty() {
            return Err(Error::InvalidConfig("ranges: empty range set".into()));
        }
        let mut subnets: Vec<IpNetwork> = Vec::new();
        for s in raw {
            let net: IpNetwork = s
                .parse()
                .map_err(|e| Error::InvalidConfig(format!("ranges: {s:?} is not a CIDR: {e}")))?;
            if net.ip() != net.network() {
                return Err(Error::InvalidConfig(format!(
                    "ranges: {s} has host bits set (did you mean {}/{}?)",
                    net.network(),
                    net.prefix()
                )));
            }
            let max = if net.is_ipv4() { 30 } else { 127 };
            if net.prefix() > max {
                return Err(Error::InvalidConfig(format!(
                    "ranges: {s} is too small to allocate from"
                )));
            }
            if let Some(first) = subnets.first()
                && first.is_ipv4() != net.is_ipv4()
            {
                return Err(Error::InvalidConfig(format!(
                    "ranges: {s} mixes address families in one range set"
                )));
            }
            if let Some(o) = subnets.iter().find(|o| overlaps(o, &net)) {
                return Err(Error::InvalidConfig(format!("ranges: {s} overlaps {o}")));
            }
            subnets.push(net);
        }
        Ok(Self { subnets })
    }

    pub fn is_v6(&self) -> bool {
        self.subnets.first().is_some_and(IpNetwork::is_ipv6)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let n = to_u128(ip);
        ip.is_ipv6() == self.is_v6() && self.usable().iter().any(|&(a, b)| a <= n && n <= b)
    }

    /// Inclusive [first, last] usable addresses of each subnet.
    fn usable(&self) -> Vec<(u128, u128)> {
        self.subnets
            .iter()
            .map(|n| {
                let net = to_u128(n.network());
                let last = to_u128(n.broadcast());
                // IPv6 has no broadcast: its last address is usable.
                (net + 1, if n.is_ipv4() { last - 1 } else { last })
            })
            .collect()
    }

    /// Every usable address once, starting after `last` (or at the start
    /// when `last` is not in the set) and wrapping around.
    pub fn candidates_after(&self, last: Option<IpAddr>) -> Candidates {
        let spans = self.usable();
        let total = spans
            .iter()
            .fold(0u128, |acc, (a, b)| acc.saturating_add(b - a + 1));
        let (span, next) = last
            .filter(|ip| self.contains(*ip))
            .and_then(|ip| {
                let n = to_u128(ip);
                let i = spans.iter().position(|&(a, b)| a <= n && n <= b)?;
                Some(if n < spans[i].1 {
                    (i, n + 1)
                } else {
                    let j = (i + 1) % spans.len();
                    (j, spans[j].0)
                })
            })
            .unwrap_or((0, spans.first().map_or(0, |s| s.0)));
        Candidates {
            v6: self.is_v6(),
            spans,
            span,
            next,
            left: total,
        }
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.subnets.iter().map(ToString::to_string).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

pub struct Candidates {
    v6: bool,
    spans: Vec<(u128, u128)>,
    span: usize,
    next: u128,
    left: u128,
}

impl Iterator for Candidates {
    type Item = IpAddr;

    fn next(&mut self) -> Option<IpAddr> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let cur = self.next;
        let end = self.spans.get(self.span).map_or(0, |s| s.1);
        if cur < end {
            self.next = cur + 1;
        } else {
            self.span = (self.span + 1) % self.spans.len().max(1);
            self.next = self.spans.get(self.span).map_or(0, |s| s.0);
        }
        Some(from_u128(cur, self.v6))
    }
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(n: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        // Only built from IPv4 subnets, so `n` fits.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> RangeSet {
        let raw: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        RangeSet::parse(&raw).expect("literal ranges")
    }

    fn ips(it: impl Iterator<Item = IpAddr>) -> Vec<String> {
        it.map(|ip| ip.to_string()).collect()
    }

    #[test]
    fn ipv4_skips_network_and_broadcast() {
        let s = set(&["10.0.0.0/29"]);
        assert_eq!(
            ips(s.candidates_after(None)),
            [
                "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"
            ]
        );
    }

    #[test]
    fn ipv6_skips_only_the_subnet_router_anycast_address() {
        let s = set(&["fd00::/126"]);
        assert_eq!(
            ips(s.candidates_after(None)),
            ["fd00::1", "fd00::2", "fd00::3"]
        );
    }

    #[test]
    fn candidates_rotate_after_the_last_one_and_span_subnets() {
        let s = set(&["10.0.0.0/30", "10.0.1.0/30"]);
        let last = "10.0.0.2".parse().ok();
        assert_eq!(
            ips(s.candidates_after(last)),
            ["10.0.1.1", "10.0.1.2", "10.0.0.1", "10.0.0.2"]
        );
        let last = "10.0.1.1".parse().ok();
        assert_eq!(
            ips(s.candidates_after(last).take(2)),
            ["10.0.1.2", "10.0.0.1"]
        );
    }

    #[test]
    fn a_last_address_outside_the_set_starts_from_the_beginning() {
        let s = set(&["10.0.0.0/30"]);
        assert_eq!(
            ips(s.candidates_after("192.0.2.1".parse().ok())),
            ["10.0.0.1", "10.0.0.2"]
        );
        assert_eq!(
            ips(s.candidates_after("fd00::1".parse().ok())),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn huge_ipv6_sets_are_lazy() {
        let s = set(&["fd00::/64"]);
        assert_eq!(ips(s.candidates_after(None).take(1)), ["fd00::1"]);
    }

    #[test]
    fn bad_range_sets_are_error_7() {
        let cases: [&[&str]; 6] = [
            &[],
            &["10.0.0.0/31"],
            &["10.0.0.1/24"],
            &["10.0.0.0/24", "fd00::/64"],
            &["10.0.0.0/16", "10.0.1.0/24"],
            &["nonsense"],
        ];
        for c in cases {
            let raw: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                RangeSet::parse(&raw).err().map(|e| e.code()),
                Some(7),
                "{c:?}"
            );
        }
        let two_v4 = vec![
            vec!["10.0.0.0/24".to_string()],
            vec!["10.1.0.0/24".to_string()],
        ];
        assert!(RangeSet::parse_all(&two_v4).is_err());
        assert!(RangeSet::parse_all(&[]).is_err());
    }

    #[test]
    fn contains_only_usable_addresses_of_the_family() {
        let s = set(&["10.0.0.0/30"]);
        assert!(s.contains("10.0.0.1".parse().unwrap()));
        for no in ["10.0.0.0", "10.0.0.3", "10.0.1.1", "::a00:1"] {
            assert!(!s.contains(no.parse().unwrap()), "{no}");
        }
    }
}
