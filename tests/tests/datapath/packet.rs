//! A small builder of the frames the tests feed to the programs. Checksums
//! stay zero: the data path never looks at them.
#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] fns (clippy.toml covers only those): a panic is the failure report"
)]
use std::net::IpAddr;

use sluice_common::proto;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension header numbers.
pub const EXT_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_DEST: u8 = 60;
pub const EXT_AUTH: u8 = 51;

/// The 16-byte form the data path keys on.
pub use sluice_common::addr::mapped_addr as mapped;

#[derive(Clone, Debug)]
pub struct Frag {
    /// In 8-byte units.
    pub offset: u16,
    pub more: bool,
    pub id: u32,
}

/// An IP packet: addresses, protocol, the L4 bytes, and the optional parts
/// (IPv4 options, IPv6 extension headers, fragmentation).
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub l4: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub v4_options: Vec<u8>,
    /// IPv6 extension header types, in order, before any fragment header.
    pub v6_ext: Vec<u8>,
    pub frag: Option<Frag>,
    /// Overrides the IPv4 IHL field (to build bad headers).
    pub ihl: Option<u8>,
    /// Length field of hop-by-hop, routing and destination options headers
    /// (size (n + 1) * 8 bytes).
    pub ext_units: u8,
}

fn be(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

impl Packet {
    pub fn raw(src: IpAddr, dst: IpAddr, l4_proto: u8, l4: Vec<u8>) -> Self {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "mixed families");
        Self {
            src,
            dst,
            proto: l4_proto,
            l4,
            v4_options: Vec::new(),
            v6_ext: Vec::new(),
            frag: None,
            ihl: None,
            ext_units: 0,
        }
    }

    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&be(sport));
        h[2..4].copy_from_slice(&be(dport));
        h[12] = 5 << 4;
        h[13] = flags;
        h[14..16].copy_from_slice(&be(65535));
        Self::raw(src, dst, proto::TCP, h)
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&be(sport));
        h[2..4].copy_from_slice(&be(dport));
        h[4..6].copy_from_slice(&be(8 + 4));
        h.extend_from_slice(b"data");
        Self::raw(src, dst, proto::UDP, h)
    }

    pub fn sctp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        let mut h = vec![0u8; 12];
        h[0..2].copy_from_slice(&be(sport));
        h[2..4].copy_from_slice(&be(dport));
        // An INIT chunk header, for looks.
        h.extend_from_slice(&[1, 0, 0, 4]);
        Self::raw(src, dst, proto::SCTP, h)
    }

    /// ICMP (v4 addresses) or ICMPv6 (v6 addresses) with the given type;
    /// `id` fills the echo identifier field.
    pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, id: u16) -> Self {
        let mut h = vec![ty, code, 0, 0];
        h.extend_from_slice(&be(id));
        h.extend_from_slice(&be(1));
        h.extend_from_slice(b"ping");
        let p = if src.is_ipv4() {
            proto::ICMP
        } else {
            proto::ICMPV6
        };
        Self::raw(src, dst, p, h)
    }

    /// An ICMP error (`ty`) quoting the IP header and first 8 bytes of L4 of
    /// `quoted`.
    pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, quoted: &Packet) -> Self {
        let mut h = vec![ty, code, 0, 0, 0, 0, 0, 0];
        let q = quoted.ip_bytes();
        let keep = quoted.ip_header_len() + 8;
        h.extend_from_slice(&q[..keep.min(q.len())]);
        let p = if src.is_ipv4() {
            proto::ICMP
        } else {
            proto::ICMPV6
        };
        Self::raw(src, dst, p, h)
    }

    pub fn with_v4_options(mut self, options: &[u8]) -> Self {
        assert_eq!(options.len() % 4, 0);
        self.v4_options = options.to_vec();
        self
    }

    pub fn with_ext(mut self, ext: &[u8]) -> Self {
        self.v6_ext = ext.to_vec();
        self
    }

    pub fn with_frag(mut self, offset: u16, more: bool, id: u32) -> Self {
        self.frag = Some(Frag { offset, more, id });
        self
    }

    /// Makes every hop-by-hop, routing and destination options header
    /// `(units + 1) * 8` bytes long.
    pub fn with_ext_units(mut self, units: u8) -> Self {
        self.ext_units = units;
        self
    }

    pub fn with_ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    /// Length of the IP header(s) before L4.
    pub fn ip_header_len(&self) -> usize {
        match self.src {
            IpAddr::V4(_) => 20 + self.v4_options.len(),
            IpAddr::V6(_) => {
                40 + self
                    .v6_ext
                    .iter()
                    .map(|&t| ext_len(t, self.ext_units))
                    .sum::<usize>()
                    + if self.frag.is_some() { 8 } else { 0 }
            }
        }
    }

    pub fn ip_bytes(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hl = 20 + self.v4_options.len();
                let mut h = vec![0u8; 20];
                let ihl = self.ihl.unwrap_or((hl / 4) as u8);
                h[0] = 0x40 | (ihl & 0x0f);
                h[2..4].copy_from_slice(&be((hl + self.l4.len()) as u16));
                if let Some(f) = &self.frag {
                    h[4..6].copy_from_slice(&be(f.id as u16));
                    let fo = f.offset | if f.more { 0x2000 } else { 0 };
                    h[6..8].copy_from_slice(&be(fo));
                }
                h[8] = 64;
                h[9] = self.proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h.extend_from_slice(&self.v4_options);
                h.extend_from_slice(&self.l4);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // The chain: ext headers, then the fragment header, then L4.
                let mut types: Vec<u8> = self.v6_ext.clone();
                if self.frag.is_some() {
                    types.push(44);
                }
                let mut body = Vec::new();
                for (i, &t) in types.iter().enumerate() {
                    let next = types.get(i + 1).copied().unwrap_or(self.proto);
                    body.extend_from_slice(&self.ext_header(t, next));
                }
                body.extend_from_slice(&self.l4);
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&be(body.len() as u16));
                h[6] = types.first().copied().unwrap_or(self.proto);
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&body);
                h
            }
            _ => unreachable!("mixed families"),
        }
    }

    fn ext_header(&self, t: u8, next: u8) -> Vec<u8> {
        match t {
            44 => {
                let f = self.frag.as_ref().expect("fragment header without frag");
                let mut h = vec![next, 0];
                h.extend_from_slice(&be((f.offset << 3) | u16::from(f.more)));
                h.extend_from_slice(&f.id.to_be_bytes());
                h
            }
            // AH: length in 4-byte units minus 2; 24 bytes here.
            EXT_AUTH => {
                let mut h = vec![next, 4];
                h.resize(24, 0);
                h
            }
            // Hop-by-hop, routing, destination options: PadN.
            _ => {
                let len = ext_len(t, self.ext_units);
                let mut h = vec![next, self.ext_units, 1, (len - 4) as u8];
                h.resize(len, 0);
                h
            }
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let ethertype = if self.src.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        eth(ethertype, &self.ip_bytes())
    }
}

fn ext_len(t: u8, units: u8) -> usize {
    if t == EXT_AUTH {
        24
    } else {
        (usize::from(units) + 1) * 8
    }
}

/// An Ethernet frame around `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&be(ethertype));
    f.extend_from_slice(payload);
    f
}

/// An ARP request (who has `target`, tell `sender`).
pub fn arp(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p.extend_from_slice(&sender);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    eth(ETH_P_ARP, &p)
}
