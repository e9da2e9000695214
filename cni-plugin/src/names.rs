//! Interface names derived from the attachment, so DEL and GC find the host
//! end without any saved state (the second DEL of containerd comes without
//! netns and prevResult).
use sluice_proto::Attachment;

/// Prefix of host-side veth ends: `sl` + 12 hex = 14 bytes (limit 15).
pub const HOST_PREFIX: &str = "sl";

/// Host end, e.g. `sl3f9a0c21be47`. Stable across plugin versions: FNV-1a
/// (64 bit) is fixed by its definition, unlike std's `DefaultHasher`.
pub fn host_ifname(a: &Attachment) -> String {
    format!("{HOST_PREFIX}{}", hash12(a))
}

fn hash12(a: &Attachment) -> String {
    let mut h = fnv1a64(0xcbf2_9ce4_8422_2325, a.container_id.as_bytes());
    // A separator that neither part can contain keeps ("ab","c") and
    // ("a","bc") apart.
    h = fnv1a64(h, b"\0");
    h = fnv1a64(h, a.ifname.as_bytes());
    format!("{h:016x}")[..12].to_string()
}

fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn att(c: &str, i: &str) -> Attachment {
        Attachment {
            container_id: c.into(),
            ifname: i.into(),
        }
    }

    #[test]
    fn names_are_stable_short_and_hex() {
        let a = att(
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "eth0",
        );
        let h = host_ifname(&a);
        assert_eq!(h, host_ifname(&a));
        assert_eq!(h.len(), 14);
        assert!(h[2..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn fnv_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(0xcbf2_9ce4_8422_2325, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(0xcbf2_9ce4_8422_2325, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn ifname_and_container_id_both_matter() {
        assert_ne!(host_ifname(&att("ab", "c")), host_ifname(&att("a", "bc")));
        assert_ne!(
            host_ifname(&att("c", "eth0")),
            host_ifname(&att("c", "eth1"))
        );
        let names: HashSet<String> = (0..10_000)
            .map(|i| host_ifname(&att(&format!("container-{i}"), "eth0")))
            .collect();
        assert_eq!(names.len(), 10_000);
    }
}
