//! The randomized check: many generated packets (all protocols, both
//! families and directions, options, extension headers, fragments, ICMP
//! errors, truncations, spoofing) against an isolated endpoint with a small
//! allowlist. The expected verdict of each packet comes from a model written
//! from the policy as ranges, CIDRs and identities (not as map keys), plus
//! the conntrack and fragment state the passed packets leave behind.
#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] fns (clippy.toml covers only those): a panic is the failure report"
)]
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_HAS_IPV4, EP_HAS_IPV6, EP_INGRESS_ISOLATED,
    EndpointInfo, IDENTITY_ANY, IDENTITY_CIDR_FLAG, IDENTITY_HOST, IDENTITY_WORLD, PolicyKey,
    ct_timeout, proto, reason,
};

use sluice_tests::rng::Rng;

use crate::{
    harness::{Datapath, LOOPBACK, TC_ACT_OK, TC_ACT_SHOT},
    packet::*,
};

const GROUP: u32 = IDENTITY_CIDR_FLAG | 9;

#[derive(Clone, Copy)]
enum Peer {
    Id(u32),
    Any,
    Group,
}

/// A rule as NetworkPolicy states it: a direction, a peer, a protocol (None:
/// any) and a port range.
struct Rule {
    dir: u8,
    peer: Peer,
    l4: Option<u8>,
    ports: (u16, u16),
}

fn rules() -> Vec<Rule> {
    vec![
        Rule {
            dir: DIR_INGRESS,
            peer: Peer::Id(300),
            l4: Some(proto::TCP),
            ports: (80, 80),
        },
        Rule {
            dir: DIR_INGRESS,
            peer: Peer::Any,
            l4: Some(proto::UDP),
            ports: (5000, 5007),
        },
        Rule {
            dir: DIR_INGRESS,
            peer: Peer::Group,
            l4: None,
            ports: (0, u16::MAX),
        },
        Rule {
            dir: DIR_EGRESS,
            peer: Peer::Id(301),
            l4: Some(proto::TCP),
            ports: (0, u16::MAX),
        },
        Rule {
            dir: DIR_EGRESS,
            peer: Peer::Any,
            l4: Some(proto::UDP),
            ports: (53, 53),
        },
        Rule {
            dir: DIR_EGRESS,
            peer: Peer::Id(300),
            l4: Some(proto::SCTP),
            ports: (9000, 9001),
        },
        Rule {
            dir: DIR_EGRESS,
            peer: Peer::Group,
            l4: Some(proto::TCP),
            ports: (443, 443),
        },
    ]
}

/// The same rules as map entries: (dir, identity, proto, port, plen).
const ENTRIES: &[(u8, u32, u8, u16, u8)] = &[
    (DIR_INGRESS, 300, proto::TCP, 80, 16),
    (DIR_INGRESS, IDENTITY_ANY, proto::UDP, 5000, 13),
    (DIR_INGRESS, GROUP, 0, 0, 0),
    (DIR_EGRESS, 301, proto::TCP, 0, 0),
    (DIR_EGRESS, IDENTITY_ANY, proto::UDP, 53, 16),
    (DIR_EGRESS, 300, proto::SCTP, 9000, 15),
    (DIR_EGRESS, GROUP, proto::TCP, 443, 16),
];

fn a(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// (prefix, length in the 16-byte form, identity)
fn ipcache() -> Vec<([u8; 16], u32, u32)> {
    [
        ("10.2.0.0", 120, 300),
        ("fd00:2::", 64, 300),
        ("10.4.0.0", 120, 301),
        ("fd00:4::", 64, 301),
        ("10.3.1.0", 120, 302),
        ("10.0.0.1", 128, IDENTITY_HOST),
        ("fd00::1", 128, IDENTITY_HOST),
    ]
    .into_iter()
    .map(|(p, l, id)| (mapped(a(p)), l, id))
    .collect()
}

/// (prefix, length, group), for both directions.
fn cidrs() -> Vec<([u8; 16], u32, u32)> {
    [
        ("10.3.0.0", 112, GROUP),
        ("10.3.5.0", 120, 0),
        ("fd00:3::", 48, GROUP),
        ("fd00:3:0:5::", 64, 0),
    ]
    .into_iter()
    .map(|(p, l, g)| (mapped(a(p)), l, g))
    .collect()
}

fn prefix_match(addr: &[u8; 16], prefix: &[u8; 16], len: u32) -> bool {
    let a = u128::from_be_bytes(*addr);
    let p = u128::from_be_bytes(*prefix);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    a & mask == p & mask
}

fn longest<'a>(
    table: &'a [([u8; 16], u32, u32)],
    addr: &[u8; 16],
) -> Option<&'a ([u8; 16], u32, u32)> {
    table
        .iter()
        .filter(|(p, l, _)| prefix_match(addr, p, *l))
        .max_by_key(|(_, l, _)| *l)
}

const POD4: &str = "10.1.0.5";
const POD6: &str = "fd00:1::5";

fn peers(v6: bool) -> Vec<IpAddr> {
    let v4 = [
        "10.2.0.1", "10.2.0.2", "10.3.1.1", "10.3.7.2", "10.3.5.1", "10.4.0.1", "10.4.0.2",
        "10.9.0.1", "10.9.0.2", "10.0.0.1",
    ];
    let v6s = [
        "fd00:2::1",
        "fd00:2::2",
        "fd00:3:0:1::1",
        "fd00:3:0:5::1",
        "fd00:4::1",
        "fd00:4::2",
        "fd00:9::1",
        "fd00::1",
    ];
    if v6 {
        v6s.iter().map(|s| a(s)).collect()
    } else {
        v4.iter().map(|s| a(s)).collect()
    }
}

const PORTS: &[u16] = &[
    53, 80, 443, 5000, 5003, 5007, 5008, 9000, 9001, 9002, 40000, 40001,
];

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct CtKey {
    lo: ([u8; 16], u16),
    hi: ([u8; 16], u16),
    l4: u8,
}

fn ct_key(s: [u8; 16], sp: u16, d: [u8; 16], dp: u16, l4: u8) -> (CtKey, bool) {
    let src_lo = (s, sp) <= (d, dp);
    let (lo, hi) = if src_lo {
        ((s, sp), (d, dp))
    } else {
        ((d, dp), (s, sp))
    };
    (CtKey { lo, hi, l4 }, src_lo)
}

struct CtEntry {
    orig_is_lo: bool,
    seen_reply: bool,
    fin_orig: bool,
    fin_reply: bool,
    rst: bool,
    refreshed: Instant,
}

impl CtEntry {
    fn lifetime(&self, l4: u8) -> u64 {
        match l4 {
            proto::TCP if self.rst || (self.fin_orig && self.fin_reply) => ct_timeout::TCP_CLOSING,
            proto::TCP if !self.seen_reply => ct_timeout::TCP_OPENING,
            proto::TCP => ct_timeout::TCP_ESTABLISHED,
            proto::UDP => ct_timeout::UDP,
            proto::ICMP | proto::ICMPV6 => ct_timeout::ICMP,
            _ => ct_timeout::OTHER,
        }
    }
    fn track(&mut self, from_orig: bool, tcp_flags: u8) {
        self.seen_reply |= !from_orig;
        self.rst |= tcp_flags & TCP_RST != 0;
        if tcp_flags & TCP_FIN != 0 {
            if from_orig {
                self.fin_orig = true;
            } else {
                self.fin_reply = true;
            }
        }
        self.refreshed = Instant::now();
    }
}

/// (source, source port, destination, destination port, protocol)
type Tuple = ([u8; 16], u16, [u8; 16], u16, u8);

/// What the generator knows about a packet, i.e. what the program should
/// find when it parses it.
#[derive(Clone, Debug)]
struct Info {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    l4: u8,
    /// Ports as the program keys them (echo id for ICMP echo, 0 for no
    /// ports); a later fragment's are unknown (0).
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    icmp_type: Option<u8>,
    frag: Frag3,
    malformed: bool,
    /// For an ICMP error: the quoted tuple when the program can parse it.
    icmp_error: Option<Option<Tuple>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Frag3 {
    None,
    First(u32),
    Later(u32),
}

enum Case {
    Arp,
    OtherL3,
    Ip(Info),
}

struct Model {
    ct: HashMap<CtKey, CtEntry>,
    frags: HashMap<([u8; 16], [u8; 16], u32, u8), bool>,
    rules: Vec<Rule>,
    ipcache: Vec<([u8; 16], u32, u32)>,
    cidrs: Vec<([u8; 16], u32, u32)>,
    pod4: [u8; 16],
    pod6: [u8; 16],
    /// Verdicts the model could not be sure of (an entry at the edge of its
    /// lifetime) and took from the program.
    ambiguous: u64,
}

/// The model's answer: pass, drop, or either (then the program's verdict is
/// taken and the model follows it).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    Pass,
    Drop(u8),
    Either,
}

impl Model {
    fn identity(&self, addr: &[u8; 16]) -> u32 {
        longest(&self.ipcache, addr).map_or(IDENTITY_WORLD, |e| e.2)
    }

    fn group(&self, addr: &[u8; 16]) -> u32 {
        longest(&self.cidrs, addr).map_or(0, |e| e.2)
    }

    fn policy_allows(&self, dir: u8, peer: &[u8; 16], l4: u8, port: u16) -> bool {
        let id = self.identity(peer);
        let group = self.group(peer);
        self.rules.iter().any(|r| {
            r.dir == dir
                && match r.peer {
                    Peer::Id(i) => i == id,
                    Peer::Any => true,
                    Peer::Group => group == GROUP,
                }
                && match r.l4 {
                    None => true,
                    Some(p) => p == l4 && (r.ports.0..=r.ports.1).contains(&port),
                }
        })
    }

    /// A live entry (None), a dead one, or one at the edge of its lifetime.
    fn ct_state(&self, key: &CtKey) -> Option<Result<(), ()>> {
        let e = self.ct.get(key)?;
        let age = e.refreshed.elapsed();
        let life = Duration::from_secs(e.lifetime(key.l4));
        if age + Duration::from_secs(1) < life {
            Some(Ok(()))
        } else if age > life + Duration::from_secs(1) {
            None
        } else {
            Some(Err(()))
        }
    }

    /// The expected verdict, before the program ran.
    fn expect(&self, dir: u8, case: &Case) -> Expect {
        let i = match case {
            Case::Arp => return Expect::Pass,
            // Both directions are isolated.
            Case::OtherL3 => return Expect::Drop(reason::UNSUPPORTED_L3),
            Case::Ip(i) => i,
        };
        if i.malformed {
            return Expect::Drop(reason::MALFORMED);
        }
        if i.v6
            && i.l4 == proto::ICMPV6
            && i.frag == Frag3::None
            && matches!(i.icmp_type, Some(130..=137 | 143))
        {
            return Expect::Pass;
        }
        let own = if i.v6 { self.pod6 } else { self.pod4 };
        if dir == DIR_EGRESS && i.src != own {
            return Expect::Drop(reason::SPOOFED_SOURCE);
        }
        if let Frag3::Later(id) = i.frag {
            return match self.frags.get(&(i.src, i.dst, id, i.l4)) {
                Some(true) => Expect::Pass,
                Some(false) => Expect::Drop(reason::POLICY_DENIED),
                None => Expect::Drop(reason::FRAGMENT_UNKNOWN),
            };
        }
        let mut port = i.dport;
        if let Some(inner) = i.icmp_error {
            if let Some((s, sp, d, dp, l4)) = inner
                && s == i.dst
            {
                match self.ct_state(&ct_key(s, sp, d, dp, l4).0) {
                    Some(Ok(())) => return Expect::Pass,
                    Some(Err(())) => return Expect::Either,
                    None => {}
                }
            }
            port = 0;
        }
        // A SYN without ACK opens a connection: judged by policy whatever
        // conntrack holds.
        if !opens(i) {
            match self.ct_state(&ct_key(i.src, i.sport, i.dst, i.dport, i.l4).0) {
                Some(Ok(())) => return Expect::Pass,
                Some(Err(())) => return Expect::Either,
                None => {}
            }
        }
        let peer = if dir == DIR_INGRESS { i.src } else { i.dst };
        if dir == DIR_INGRESS && self.identity(&peer) == IDENTITY_HOST {
            return Expect::Pass;
        }
        if i.l4 == proto::ICMP || i.l4 == proto::ICMPV6 {
            port = 0;
        }
        if self.policy_allows(dir, &peer, i.l4, port) {
            Expect::Pass
        } else {
            Expect::Drop(reason::POLICY_DENIED)
        }
    }

    /// The state a packet leaves behind, given the verdict it got.
    fn update(&mut self, dir: u8, case: &Case, passed: bool) {
        let Case::Ip(i) = case else { return };
        let own = if i.v6 { self.pod6 } else { self.pod4 };
        let nd = i.v6
            && i.l4 == proto::ICMPV6
            && i.frag == Frag3::None
            && matches!(i.icmp_type, Some(130..=137 | 143));
        if i.malformed || nd || (dir == DIR_EGRESS && i.src != own) {
            return;
        }
        if matches!(i.frag, Frag3::Later(_)) {
            return;
        }
        if let Frag3::First(id) = i.frag {
            self.frags.insert((i.src, i.dst, id, i.l4), passed);
        }
        // A pass through a related ICMP error leaves conntrack alone.
        if let Some(Some((s, sp, d, dp, l4))) = i.icmp_error {
            let k = ct_key(s, sp, d, dp, l4).0;
            if passed && s == i.dst && self.ct.contains_key(&k) {
                let live = self.ct_state(&k);
                if live.is_some() {
                    return;
                }
            }
        }
        let (key, src_lo) = ct_key(i.src, i.sport, i.dst, i.dport, i.l4);
        if !passed {
            // Whatever was there did not let it through: dead (a denied SYN
            // never looked).
            if !opens(i) {
                self.ct.remove(&key);
            }
            return;
        }
        match self.ct.get_mut(&key) {
            Some(e) if !opens(i) && self_live(e, key.l4) => {
                let from_orig = src_lo == e.orig_is_lo;
                e.track(from_orig, i.tcp_flags);
            }
            _ => {
                let mut e = CtEntry {
                    orig_is_lo: src_lo,
                    seen_reply: false,
                    fin_orig: false,
                    fin_reply: false,
                    rst: false,
                    refreshed: Instant::now(),
                };
                e.track(true, i.tcp_flags);
                self.ct.insert(key, e);
            }
        }
    }
}

/// A TCP SYN without ACK.
fn opens(i: &Info) -> bool {
    i.l4 == proto::TCP && i.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

fn self_live(e: &CtEntry, l4: u8) -> bool {
    e.refreshed.elapsed() < Duration::from_secs(e.lifetime(l4))
}

/// A flow seen before, to send more packets of (either way).
#[derive(Clone, Copy)]
struct Flow {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    kind: u8,
}

const K_TCP: u8 = 0;
const K_UDP: u8 = 1;
const K_SCTP: u8 = 2;
const K_ECHO: u8 = 3;
const K_ICMP_OTHER: u8 = 4;
const K_ICMP_ERROR: u8 = 5;
const K_ND: u8 = 6;
const K_GRE: u8 = 7;

struct Gen {
    rng: Rng,
    recent: Vec<Flow>,
    pod4: IpAddr,
    pod6: IpAddr,
}

impl Gen {
    fn flow(&mut self, v6: bool, dir: u8) -> Flow {
        // Half the time: a recent flow, the same way or the reply.
        if !self.recent.is_empty() && self.rng.chance(50) {
            let f = self.recent[self.rng.below_u64(self.recent.len() as u64) as usize];
            if f.src.is_ipv6() == v6 {
                let pod = if v6 { self.pod6 } else { self.pod4 };
                let outgoing = f.src == pod;
                let same_way = (dir == DIR_EGRESS) == outgoing;
                return if same_way {
                    f
                } else {
                    Flow {
                        src: f.dst,
                        sport: f.dport,
                        dst: f.src,
                        dport: f.sport,
                        kind: f.kind,
                    }
                };
            }
        }
        let pod = if v6 { self.pod6 } else { self.pod4 };
        let ps = peers(v6);
        let peer = self.rng.pick(&ps);
        let other = self.rng.pick(&ps);
        let (src, dst) = if dir == DIR_EGRESS {
            (if self.rng.chance(4) { other } else { pod }, peer)
        } else {
            (peer, if self.rng.chance(4) { other } else { pod })
        };
        let kind = self.rng.pick(&[
            K_TCP,
            K_TCP,
            K_TCP,
            K_TCP,
            K_UDP,
            K_UDP,
            K_UDP,
            K_SCTP,
            K_SCTP,
            K_ECHO,
            K_ECHO,
            K_ICMP_OTHER,
            K_ICMP_ERROR,
            K_ICMP_ERROR,
            K_ND,
            K_GRE,
        ]);
        let f = Flow {
            src,
            sport: self.rng.pick(PORTS),
            dst,
            dport: self.rng.pick(PORTS),
            kind,
        };
        if self.recent.len() < 64 {
            self.recent.push(f);
        } else {
            let i = self.rng.below_u64(64) as usize;
            self.recent[i] = f;
        }
        f
    }

    fn case(&mut self) -> (u8, Vec<u8>, Case) {
        let dir = if self.rng.chance(50) {
            DIR_EGRESS
        } else {
            DIR_INGRESS
        };
        let r = self.rng.below_u64(100);
        if r < 3 {
            return (dir, arp([10, 1, 0, 5], [10, 2, 0, 1]), Case::Arp);
        }
        if r < 6 {
            let et = self.rng.pick(&[0x88cc_u16, 0x8100, 0x9000, 0x8847]);
            let len = 14 + self.rng.below_u64(60) as usize;
            return (
                dir,
                eth(et, &vec![0x42; len - 14])[..len].to_vec(),
                Case::OtherL3,
            );
        }
        let v6 = self.rng.chance(50);
        let f = self.flow(v6, dir);
        let echo_ty = |req: bool| match (v6, req) {
            (false, true) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (true, false) => 129,
        };
        let mut sport = f.sport;
        let mut dport = f.dport;
        let mut tcp_flags = 0;
        let mut icmp_type = None;
        let mut icmp_error = None;
        let mut p = match f.kind {
            K_TCP => {
                tcp_flags = self.rng.pick(&[
                    TCP_SYN,
                    TCP_SYN | TCP_ACK,
                    TCP_ACK,
                    TCP_ACK,
                    TCP_FIN | TCP_ACK,
                    TCP_RST,
                ]);
                Packet::tcp(f.src, f.sport, f.dst, f.dport, tcp_flags)
            }
            K_UDP => Packet::udp(f.src, f.sport, f.dst, f.dport),
            K_SCTP => Packet::sctp(f.src, f.sport, f.dst, f.dport),
            K_ECHO => {
                let id = 1 + (f.sport % 3);
                let ty = echo_ty(self.rng.chance(50));
                icmp_type = Some(ty);
                (sport, dport) = (id, id);
                Packet::icmp(f.src, f.dst, ty, 0, id)
            }
            K_ICMP_OTHER => {
                // Timestamp request; an experimental ICMPv6 type.
                let ty = if v6 { 200 } else { 13 };
                icmp_type = Some(ty);
                (sport, dport) = (0, 0);
                Packet::icmp(f.src, f.dst, ty, 0, 5)
            }
            K_ICMP_ERROR => {
                let ty = if v6 {
                    self.rng.pick(&[1u8, 2, 3, 4])
                } else {
                    self.rng.pick(&[3u8, 11, 12])
                };
                icmp_type = Some(ty);
                (sport, dport) = (0, 0);
                // Quote a recent flow of this family, mostly one sent by the
                // receiver of the error.
                let q = self.flow(
                    v6,
                    if dir == DIR_EGRESS {
                        DIR_INGRESS
                    } else {
                        DIR_EGRESS
                    },
                );
                let (qs, qd) = if self.rng.chance(80) {
                    (f.dst, q.dst)
                } else {
                    (q.src, q.dst)
                };
                let quoted = if self.rng.chance(50) {
                    Packet::udp(qs, q.sport, qd, q.dport)
                } else {
                    Packet::tcp(qs, q.sport, qd, q.dport, TCP_ACK)
                };
                let err = Packet::icmp_error(f.src, f.dst, ty, 0, &quoted);
                icmp_error = Some(Some((
                    mapped(qs),
                    q.sport,
                    mapped(qd),
                    q.dport,
                    quoted.proto,
                )));
                err
            }
            K_ND if v6 => {
                let ty = self.rng.pick(&[130u8, 131, 133, 134, 135, 136, 137, 143]);
                icmp_type = Some(ty);
                (sport, dport) = (0, 0);
                Packet::icmp(f.src, f.dst, ty, 0, 0)
            }
            _ => {
                (sport, dport) = (0, 0);
                Packet::raw(f.src, f.dst, 47, vec![0; 4])
            }
        };
        let l4 = p.proto;
        // Variations.
        let mut bad = false;
        if !v6 && self.rng.chance(12) {
            p = p.with_v4_options(&vec![1; 4 * (1 + self.rng.below_u64(10) as usize)]);
        }
        if v6 && self.rng.chance(12) {
            let n = 1 + self.rng.below_u64(9) as usize;
            let chain: Vec<u8> = (0..n)
                .map(|_| self.rng.pick(&[EXT_HOP, EXT_ROUTING, EXT_DEST, EXT_AUTH]))
                .collect();
            p = p.with_ext(&chain);
        }
        let mut frag = Frag3::None;
        if self.rng.chance(8) {
            let id = 1 + self.rng.below_u64(4) as u32;
            if self.rng.chance(50) {
                p = p.with_frag(0, true, id);
                frag = Frag3::First(id);
            } else {
                let payload = vec![0xee; 8 + self.rng.below_u64(16) as usize];
                let mut later = Packet::raw(p.src, p.dst, l4, payload);
                later.v4_options = p.v4_options.clone();
                later.v6_ext = p.v6_ext.clone();
                p = later.with_frag(1 + self.rng.below_u64(100) as u16, self.rng.chance(50), id);
                frag = Frag3::Later(id);
                (sport, dport, tcp_flags, icmp_type, icmp_error) = (0, 0, 0, None, None);
            }
        }
        if !v6 && self.rng.chance(2) {
            p = p.with_ihl(self.rng.below_u64(5) as u8);
            bad = true;
        }
        if v6 && p.v6_ext.len() + usize::from(p.frag.is_some()) > 8 {
            bad = true;
        }
        let mut frame = p.frame();
        let hdr = 14 + p.ip_header_len();
        let l4_min = match (frag, l4) {
            (Frag3::Later(_), _) => 0,
            (_, proto::TCP) => 20,
            (_, proto::UDP) => 8,
            (_, proto::SCTP) => 12,
            (_, proto::ICMP | proto::ICMPV6) => 8,
            _ => 0,
        };
        if self.rng.chance(8) {
            // Not inside the fixed IP header: BPF_PROG_TEST_RUN refuses
            // such frames (EINVAL) before the program runs.
            let min = 14 + if v6 { 40 } else { 20 };
            let cut = min + self.rng.below_u64((frame.len() - min) as u64) as usize;
            frame.truncate(cut);
        }
        let malformed = bad || frame.len() < hdr + l4_min;
        // The quote of an ICMP error is parsed only if all of it is there.
        if let Some(Some(_)) = icmp_error {
            let quote_end = hdr + 8 + if v6 { 40 } else { 20 } + 8;
            if frame.len() < quote_end {
                icmp_error = Some(None);
            }
        }
        let info = Info {
            v6,
            src: mapped(p.src),
            dst: mapped(p.dst),
            l4,
            sport,
            dport,
            tcp_flags,
            icmp_type,
            frag,
            malformed,
            icmp_error,
        };
        (dir, frame, Case::Ip(info))
    }
}

/// Sets up the endpoint, ipcache, CIDRs and policy, then sends `count`
/// generated packets and compares each verdict with the model's.
pub fn run_random(dp: &mut Datapath, seed: u64, count: usize) {
    let pod4 = a(POD4);
    let pod6 = a(POD6);
    let mut ep = EndpointInfo {
        ep_id: LOOPBACK,
        flags: EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED | EP_HAS_IPV4 | EP_HAS_IPV6,
        identity: 1000,
        ipv4: match pod4 {
            IpAddr::V4(x) => x.octets(),
            IpAddr::V6(_) => unreachable!(),
        },
        ipv6: mapped(pod6),
        port_plens: [0, 0],
    };
    for &(dir, identity, l4, port, plen) in ENTRIES {
        dp.allow(
            PolicyKey {
                ep_id: LOOPBACK,
                identity,
                port,
                proto: l4,
                dir,
                plen,
                _pad: [0; 3],
            },
            1,
        );
        ep.port_plens[usize::from(dir)] |= sluice_common::plen_bits(identity, l4, plen);
    }
    dp.set_endpoint(&ep);
    for (p, l, id) in ipcache() {
        dp.set_ipcache(p, l, id);
    }
    for (p, l, g) in cidrs() {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            dp.set_cidr(LOOPBACK, dir, p, l, g);
        }
    }
    let mut model = Model {
        ct: HashMap::new(),
        frags: HashMap::new(),
        rules: rules(),
        ipcache: ipcache(),
        cidrs: cidrs(),
        pod4: mapped(pod4),
        pod6: mapped(pod6),
        ambiguous: 0,
    };
    let mut generator = Gen {
        rng: Rng::new(seed),
        recent: Vec::new(),
        pod4,
        pod6,
    };
    let mut passed = 0u64;
    let mut drops: HashMap<u8, u64> = HashMap::new();
    for n in 0..count {
        let (dir, frame, case) = generator.case();
        let expect = model.expect(dir, &case);
        let got = dp.run(dir, &frame);
        assert!(
            got == TC_ACT_OK || got == TC_ACT_SHOT,
            "packet {n}: verdict {got}"
        );
        let ok = got == TC_ACT_OK;
        match expect {
            Expect::Pass => assert!(
                ok,
                "packet {n} dropped, model passes it: {}",
                describe(dir, &case, &frame)
            ),
            Expect::Drop(why) => {
                assert!(
                    !ok,
                    "packet {n} passed, model drops it ({why}): {}",
                    describe(dir, &case, &frame)
                );
                *drops.entry(why).or_default() += 1;
            }
            Expect::Either => model.ambiguous += 1,
        }
        passed += u64::from(ok);
        model.update(dir, &case, ok);
    }
    // The drop counters agree with the model's reasons.
    for (why, n) in &drops {
        let counted =
            dp.drops(LOOPBACK, *why, DIR_INGRESS).0 + dp.drops(LOOPBACK, *why, DIR_EGRESS).0;
        assert_eq!(counted, *n, "drops for reason {why}");
    }
    eprintln!(
        "{count} packets: {passed} passed, drops by reason {drops:?}, {} ambiguous",
        model.ambiguous
    );
    // The mix exercised both outcomes and most reasons.
    assert!(passed > count as u64 / 20, "too few passes: {passed}");
    for why in [
        reason::POLICY_DENIED,
        reason::SPOOFED_SOURCE,
        reason::MALFORMED,
        reason::FRAGMENT_UNKNOWN,
        reason::UNSUPPORTED_L3,
    ] {
        assert!(
            drops.get(&why).copied().unwrap_or(0) > 0,
            "no drop for reason {why}"
        );
    }
}

fn describe(dir: u8, case: &Case, frame: &[u8]) -> String {
    let what = match case {
        Case::Arp => "arp".to_string(),
        Case::OtherL3 => "other ethertype".to_string(),
        Case::Ip(i) => format!("{i:?}"),
    };
    format!("dir {dir} {what} frame {} bytes {frame:02x?}", frame.len())
}
