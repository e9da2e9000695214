//! CIDRs as prefixes: containment of addresses and of other prefixes.
use std::net::IpAddr;

/// A prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    bits: u128,
    len: u8,
    v6: bool,
}

impl Cidr {
    /// As the API parses it (`sluice_api::parse_cidr`), host bits ignored.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (addr, len) = sluice_api::parse_cidr(s)?;
        let (bits, v6) = to_bits(addr);
        Ok(Self {
            bits: bits & mask(len, v6),
            len,
            v6,
        })
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let (bits, v6) = to_bits(ip);
        v6 == self.v6 && bits & mask(self.len, v6) == self.bits
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        other.v6 == self.v6
            && other.len >= self.len
            && other.bits & mask(self.len, self.v6) == self.bits
    }
}

/// The address as the low 32 bits (IPv4) or all 128 bits (IPv6).
fn to_bits(a: IpAddr) -> (u128, bool) {
    match a {
        IpAddr::V4(a) => (u128::from(u32::from(a)), false),
        IpAddr::V6(a) => (u128::from(a), true),
    }
}

fn mask(len: u8, v6: bool) -> u128 {
    let width: u32 = if v6 { 128 } else { 32 };
    let len = u32::from(len).min(width);
    if len == 0 {
        return 0;
    }
    let ones = if width == 128 {
        u128::MAX
    } else {
        u128::from(u32::MAX)
    };
    (ones >> (width - len)) << (width - len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_of_prefixes_and_addresses() {
        let c = |s| Cidr::parse(s).unwrap();
        assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
        assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/8").contains(&c("11.0.0.0/16")));
        assert!(c("0.0.0.0/0").contains(&c("1.2.3.4/32")));
        assert!(!c("0.0.0.0/0").contains(&c("::/0")));
        assert!(c("10.0.0.1/8").contains_ip("10.9.9.9".parse().unwrap()));
        assert!(c("fd00::/8").contains(&c("fd00:1::/32")));
        assert!(!c("fd00::/8").contains_ip("fe80::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0").is_err());
    }
}
