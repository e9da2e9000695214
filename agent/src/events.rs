//! Drop events: read from the ring buffer, printed as one JSON object per
//! line. The data path already rate-limits them per flow.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use sluice_common::{DIR_EGRESS, DropEvent, reason};
use tokio::io::unix::AsyncFd;

/// A drop as users read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropRecord {
    /// Monotonic kernel time (bpf_ktime_get_ns) of the drop.
    pub ktime_ns: u64,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub direction: &'static str,
    pub ep_id: u32,
    pub peer_identity: u32,
    pub protocol: String,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub length: u32,
}

fn addr(family: u8, raw: [u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            raw[12], raw[13], raw[14], raw[15],
        ))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(raw))),
        _ => None,
    }
}

pub fn protocol_name(p: u8) -> String {
    use sluice_common::proto;
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

impl From<&DropEvent> for DropRecord {
    fn from(e: &DropEvent) -> Self {
        Self {
            ktime_ns: e.ts_ns,
            verdict: "DROPPED",
            reason: reason::name(e.reason),
            direction: if e.dir == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            },
            ep_id: e.ep_id,
            peer_identity: e.peer_identity,
            protocol: protocol_name(e.proto),
            src: addr(e.family, e.saddr),
            dst: addr(e.family, e.daddr),
            src_port: e.sport,
            dst_port: e.dport,
            length: e.pkt_len,
        }
    }
}

/// Decodes one ring-buffer record; `None` when it is not a `DropEvent`.
pub fn decode(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: DropEvent is repr(C) plain data valid for any bit pattern and
    // the slice is at least as long; read_unaligned copes with alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// Follows the ring buffer forever, handing each drop to `sink`.
pub async fn follow(
    ring: RingBuf<MapData>,
    mut sink: impl FnMut(DropRecord),
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
    // owns the ring buffer, and as_raw_fd always returns that fd.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(ev) => sink(DropRecord::from(&ev)),
                None => tracing::warn!(len = item.len(), "short record in the drop ring buffer"),
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_event_reads_as_a_record_with_its_five_tuple() {
        let mut e = DropEvent {
            ep_id: 9,
            family: 4,
            proto: 6,
            dir: DIR_EGRESS,
            reason: reason::POLICY_DENIED,
            sport: 40000,
            dport: 80,
            ..Default::default()
        };
        e.saddr = sluice_common::v4_mapped([10, 0, 0, 2]);
        e.daddr = sluice_common::v4_mapped([10, 0, 0, 3]);
        // SAFETY: viewing a repr(C) value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const DropEvent).cast::<u8>(),
                std::mem::size_of::<DropEvent>(),
            )
        };
        let r = DropRecord::from(&decode(bytes).unwrap_or_default());
        assert_eq!(
            r.src,
            Some(
                "10.0.0.2"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            )
        );
        assert_eq!(r.dst_port, 80);
        assert_eq!(r.reason, "policy-denied");
        assert_eq!(r.direction, "egress");
        assert_eq!(r.protocol, "TCP");
        assert!(decode(&bytes[..10]).is_none());
    }
}
