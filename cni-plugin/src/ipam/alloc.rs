//! The allocator: pure logic over a [`Store`].
use std::collections::HashSet;
use std::net::IpAddr;

use sluice_proto::Attachment;

use super::{IpamError, RangeSet, Store};

/// One address from each range set for `owner`, all or nothing.
pub fn allocate(
    store: &mut dyn Store,
    sets: &[RangeSet],
    owner: &Attachment,
) -> Result<Vec<IpAddr>, IpamError> {
    let existing = store.allocations()?;
    if let Some((ip, _)) = existing.iter().find(|(_, o)| o == owner) {
        return Err(IpamError::Duplicate {
            ip: *ip,
            owner: owner.clone(),
        });
    }
    let taken: HashSet<IpAddr> = existing.into_iter().map(|(ip, _)| ip).collect();
    let mut got = Vec::with_capacity(sets.len());
    for (i, set) in sets.iter().enumerate() {
        match allocate_in(store, i, set, &taken, owner) {
            Ok(ip) => got.push(ip),
            Err(e) => {
                for ip in got {
                    // Best effort: the first error is the one worth reporting.
                    if let Err(undo) = store.release(ip) {
                        eprintln!("sluice: releasing {ip} after a failed allocation: {undo}");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(got)
}

fn allocate_in(
    store: &mut dyn Store,
    index: usize,
    set: &RangeSet,
    taken: &HashSet<IpAddr>,
    owner: &Attachment,
) -> Result<IpAddr, IpamError> {
    let last = store.last_reserved(index)?;
    // Terminates early: among taken.len() + 1 candidates one is free.
    for ip in set.candidates_after(last) {
        if taken.contains(&ip) {
            continue;
        }
        if store.reserve(ip, owner)? {
            store.set_last_reserved(index, ip)?;
            return Ok(ip);
        }
    }
    Err(IpamError::Exhausted(set.to_string()))
}

/// Addresses held by `owner`.
pub fn owned_by(store: &dyn Store, owner: &Attachment) -> Result<Vec<IpAddr>, IpamError> {
    Ok(store
        .allocations()?
        .into_iter()
        .filter(|(_, o)| o == owner)
        .map(|(ip, _)| ip)
        .collect())
}

/// Releases everything `owner` holds; nothing held is `Ok` (DEL twice).
pub fn release_owner(store: &mut dyn Store, owner: &Attachment) -> Result<Vec<IpAddr>, IpamError> {
    let ips = owned_by(store, owner)?;
    for ip in &ips {
        store.release(*ip)?;
    }
    Ok(ips)
}

/// Allocations whose owner is not among `valid` (for GC).
pub fn stale(
    store: &dyn Store,
    valid: &[Attachment],
) -> Result<Vec<(IpAddr, Attachment)>, IpamError> {
    let valid: HashSet<&Attachment> = valid.iter().collect();
    Ok(store
        .allocations()?
        .into_iter()
        .filter(|(_, o)| !valid.contains(o))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::memory::MemStore;
    use super::*;

    fn att(c: &str) -> Attachment {
        Attachment {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn sets(raw: &[&[&str]]) -> Vec<RangeSet> {
        let raw: Vec<Vec<String>> = raw
            .iter()
            .map(|s| s.iter().map(|x| x.to_string()).collect())
            .collect();
        RangeSet::parse_all(&raw).expect("literal ranges")
    }

    fn strs(ips: &[IpAddr]) -> Vec<String> {
        ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn dual_stack_gets_one_address_per_family() {
        let mut s = MemStore::default();
        let got = allocate(
            &mut s,
            &sets(&[&["10.0.0.0/24"], &["fd00::/64"]]),
            &att("a"),
        );
        assert_eq!(
            got.ok().map(|g| strs(&g)),
            Some(vec!["10.0.0.1".into(), "fd00::1".into()])
        );
    }

    #[test]
    fn never_hands_out_an_address_twice_until_exhausted() {
        let mut s = MemStore::default();
        let r = sets(&[&["10.0.0.0/29"]]);
        let mut seen = HashSet::new();
        for i in 0..6 {
            let got = allocate(&mut s, &r, &att(&format!("c{i}"))).unwrap();
            assert_eq!(got.len(), 1);
            assert!(seen.insert(got[0]), "{} handed out twice", got[0]);
        }
        let e = allocate(&mut s, &r, &att("c6")).err();
        assert!(matches!(e, Some(IpamError::Exhausted(_))));
    }

    #[test]
    fn allocation_rotates_instead_of_reusing_a_just_released_address() {
        let mut s = MemStore::default();
        let r = sets(&[&["10.0.0.0/29"]]);
        let a = allocate(&mut s, &r, &att("a")).unwrap();
        assert_eq!(release_owner(&mut s, &att("a")).unwrap(), a);
        let b = allocate(&mut s, &r, &att("b")).unwrap();
        assert_eq!(strs(&b), ["10.0.0.2"]);
    }

    #[test]
    fn the_same_attachment_cannot_allocate_twice() {
        let mut s = MemStore::default();
        let r = sets(&[&["10.0.0.0/29"]]);
        assert!(allocate(&mut s, &r, &att("a")).is_ok());
        assert!(matches!(
            allocate(&mut s, &r, &att("a")),
            Err(IpamError::Duplicate { .. })
        ));
        let other_if = Attachment {
            container_id: "a".into(),
            ifname: "net1".into(),
        };
        assert!(allocate(&mut s, &r, &other_if).is_ok());
    }

    #[test]
    fn a_failure_in_the_second_family_releases_the_first() {
        let mut s = MemStore::default();
        let r = sets(&[&["10.0.0.0/24"], &["fd00::/127"]]);
        assert!(allocate(&mut s, &r, &att("a")).is_ok());
        assert!(matches!(
            allocate(&mut s, &r, &att("b")),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(s.allocations().map(|v| v.len()).ok(), Some(2));
    }

    #[test]
    fn release_is_by_attachment_and_idempotent() {
        let mut s = MemStore::default();
        let r = sets(&[&["10.0.0.0/24"], &["fd00::/64"]]);
        assert!(allocate(&mut s, &r, &att("a")).is_ok());
        assert!(allocate(&mut s, &r, &att("b")).is_ok());
        assert_eq!(
            release_owner(&mut s, &att("a")).map(|v| v.len()).ok(),
            Some(2)
        );
        assert_eq!(
            release_owner(&mut s, &att("a")).map(|v| v.len()).ok(),
            Some(0)
        );
        assert_eq!(owned_by(&s, &att("b")).map(|v| v.len()).ok(), Some(2));
    }

    #[test]
    fn stale_lists_allocations_of_attachments_not_valid() {
        let mut s = MemStore::default();
        let r = sets(&[&["10.0.0.0/24"]]);
        for c in ["a", "b", "c"] {
            assert!(allocate(&mut s, &r, &att(c)).is_ok());
        }
        let st = stale(&s, &[att("b")]).unwrap();
        let mut owners: Vec<String> = st.into_iter().map(|(_, o)| o.container_id).collect();
        owners.sort();
        assert_eq!(owners, ["a", "c"]);
    }
}
