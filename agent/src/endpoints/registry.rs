//! The endpoint registry: which pod attachments this node has, persisted as
//! one JSON file per attachment so that a restarted agent knows them again,
//! and indexed by attachment, by pod and by address (an ipcache change, a
//! policy change or a drop event finds its endpoint without a scan).
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sluice_common::not_found_ok;
use sluice_proto::{Attachment, EndpointSpec};

use crate::{
    datapath::EndpointRecord,
    model::{EpId, Identity, ObjectRef},
};

/// A registered endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// Unique for the life of the node's state: never reused, so conntrack
    /// entries of a deleted endpoint cannot match a new one on the same
    /// ifindex.
    pub ep_id: EpId,
    pub identity: Identity,
    /// Its hairpin tag (`Registry::allocate_hairpin_tag`; 0: none, as for
    /// a record an agent without tags wrote).
    #[serde(default)]
    pub hairpin_tag: u32,
}

impl Endpoint {
    /// The pod it belongs to, when the runtime said (CNI_ARGS).
    pub fn pod(&self) -> Option<ObjectRef> {
        pod_of(&self.spec)
    }

    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + use<> {
        spec_ips(&self.spec)
    }

    /// What the data path is told about it.
    pub fn record(&self) -> EndpointRecord {
        EndpointRecord {
            ep_id: self.ep_id,
            identity: self.identity,
            ifindex: self.spec.host_ifindex,
            ipv4: self.spec.ipv4,
            ipv6: self.spec.ipv6,
            hairpin_tag: self.hairpin_tag,
        }
    }
}

/// The pod of an endpoint spec, when the runtime said (CNI_ARGS).
pub fn pod_of(s: &EndpointSpec) -> Option<ObjectRef> {
    Some(ObjectRef::new(
        s.pod_namespace.clone()?,
        s.pod_name.clone()?,
    ))
}

pub fn spec_ips(s: &EndpointSpec) -> impl Iterator<Item = IpAddr> + use<> {
    s.ipv4
        .map(IpAddr::V4)
        .into_iter()
        .chain(s.ipv6.map(IpAddr::V6))
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a registry record")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, RegistryError>;

pub struct Registry {
    dir: PathBuf,
    by_attachment: BTreeMap<Key, Endpoint>,
    by_pod: HashMap<ObjectRef, Key>,
    by_ip: HashMap<IpAddr, Key>,
    next_ep_id: u32,
    /// Where the search for a free hairpin tag starts.
    next_tag: u32,
}

/// Container id and interface name: what the runtime names an attachment by.
type Key = (String, String);

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    }
}

fn key(a: &Attachment) -> Key {
    (a.container_id.clone(), a.ifname.clone())
}

impl Registry {
    /// Opens (creating) the registry under `state_dir/endpoints`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("endpoints");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut registry = Self {
            dir: dir.clone(),
            by_attachment: BTreeMap::new(),
            by_pod: HashMap::new(),
            by_ip: HashMap::new(),
            next_ep_id: 1,
            next_tag: 1,
        };
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let ep: Endpoint =
                serde_json::from_str(&text).map_err(|source| RegistryError::Decode {
                    path: path.clone(),
                    source,
                })?;
            registry.index(ep);
        }
        let counter = state_dir.join("next-ep-id");
        let stored = not_found_ok(std::fs::read_to_string(&counter))
            .map_err(io_err(&counter))?
            .map_or(1, |s| s.trim().parse().unwrap_or(1));
        let seen = registry
            .by_attachment
            .values()
            .map(|e| e.ep_id.0 + 1)
            .max()
            .unwrap_or(1);
        registry.next_ep_id = stored.max(seen);
        Ok(registry)
    }

    fn index(&mut self, ep: Endpoint) {
        let k = key(&ep.spec.attachment);
        if let Some(pod) = ep.pod() {
            self.by_pod.insert(pod, k.clone());
        }
        for ip in ep.ips() {
            self.by_ip.insert(ip, k.clone());
        }
        self.by_attachment.insert(k, ep);
    }

    fn unindex(&mut self, k: &Key) -> Option<Endpoint> {
        let ep = self.by_attachment.remove(k)?;
        // Only entries that still point at this attachment: a newer
        // endpoint may have taken the pod or an address over.
        if let Some(pod) = ep.pod()
            && self.by_pod.get(&pod) == Some(k)
        {
            self.by_pod.remove(&pod);
        }
        for ip in ep.ips() {
            if self.by_ip.get(&ip) == Some(k) {
                self.by_ip.remove(&ip);
            }
        }
        Some(ep)
    }

    pub fn get(&self, a: &Attachment) -> Option<&Endpoint> {
        self.by_attachment.get(&key(a))
    }

    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        self.by_attachment.values()
    }

    pub fn by_pod(&self, pod: &ObjectRef) -> Option<&Endpoint> {
        self.by_attachment.get(self.by_pod.get(pod)?)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.by_attachment.get(self.by_ip.get(&ip)?)
    }

    pub fn len(&self) -> usize {
        self.by_attachment.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_attachment.is_empty()
    }

    /// Reserves a fresh endpoint id and persists the counter first, so a
    /// crash cannot hand the same id out twice.
    pub fn allocate_ep_id(&mut self) -> Result<EpId> {
        let id = self.next_ep_id;
        let path = self.dir.with_file_name("next-ep-id");
        write_atomic(&path, format!("{}\n", id + 1).as_bytes())?;
        self.next_ep_id = id + 1;
        Ok(EpId(id))
    }

    /// A hairpin tag that no registered endpoint has (docs/design.md,
    /// "Hairpin"), searched round-robin from after the last one given, so a
    /// tag just freed is the last to be given again; 0 when all
    /// `HAIRPIN_TAG_MAX` are taken (that endpoint's hairpins are then not
    /// judged). Unique per node: a `to_pod` finding its own tag on a
    /// masqueraded packet knows the sender is its own endpoint.
    pub fn allocate_hairpin_tag(&mut self) -> u32 {
        let used: std::collections::HashSet<u32> =
            self.by_attachment.values().map(|e| e.hairpin_tag).collect();
        let max = sluice_common::HAIRPIN_TAG_MAX;
        for i in 0..max {
            let tag = (self.next_tag.saturating_sub(1) + i) % max + 1;
            if !used.contains(&tag) {
                self.next_tag = tag % max + 1;
                return tag;
            }
        }
        0
    }

    pub fn insert(&mut self, ep: Endpoint) -> Result<()> {
        let path = self.record_path(&ep.spec.attachment);
        let text = serde_json::to_vec_pretty(&ep).map_err(|source| RegistryError::Decode {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &text)?;
        self.unindex(&key(&ep.spec.attachment));
        self.index(ep);
        Ok(())
    }

    pub fn remove(&mut self, a: &Attachment) -> Result<Option<Endpoint>> {
        let path = self.record_path(a);
        not_found_ok(std::fs::remove_file(&path)).map_err(io_err(&path))?;
        Ok(self.unindex(&key(a)))
    }

    fn record_path(&self, a: &Attachment) -> PathBuf {
        // Container ids and ifnames are [A-Za-z0-9_.-]; anything else is
        // replaced so a record can never leave the directory.
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        self.dir.join(format!(
            "{}--{}.json",
            clean(&a.container_id),
            clean(&a.ifname)
        ))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> EndpointSpec {
        EndpointSpec {
            attachment: Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            netns: "/run/netns/x".into(),
            host_ifname: "slabc".into(),
            host_ifindex: 7,
            ipv4: Some(std::net::Ipv4Addr::new(10, 0, 0, 2)),
            ipv6: None,
            pod_namespace: None,
            pod_name: None,
            pod_uid: None,
        }
    }

    #[test]
    fn records_and_the_id_counter_survive_a_reopen() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("sluice-reg-{}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&dir);
        {
            let mut r = Registry::open(&dir)?;
            let id = r.allocate_ep_id()?;
            r.insert(Endpoint {
                spec: spec("c1"),
                ep_id: id,
                identity: Identity(300),
                hairpin_tag: 0,
            })?;
            let id2 = r.allocate_ep_id()?;
            assert_ne!(id, id2);
            r.insert(Endpoint {
                spec: spec("c2"),
                ep_id: id2,
                identity: Identity(301),
                hairpin_tag: 0,
            })?;
            r.remove(&spec("c2").attachment)?;
        }
        let mut r = Registry::open(&dir)?;
        assert_eq!(r.all().count(), 1);
        assert!(r.get(&spec("c1").attachment).is_some());
        let id3 = r.allocate_ep_id()?;
        assert!(id3.0 > 2, "ids are never reused, got {id3}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn an_endpoint_is_found_by_pod_and_by_address_and_a_replacement_takes_both_over()
    -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("sluice-reg-idx-{}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&dir);
        let mut r = Registry::open(&dir)?;
        let with_pod = |id: &str, ip: [u8; 4]| {
            let mut s = spec(id);
            s.ipv4 = Some(ip.into());
            s.pod_namespace = Some("x".into());
            s.pod_name = Some("a".into());
            s
        };
        let pod = ObjectRef::new("x", "a");
        let old = Endpoint {
            spec: with_pod("c1", [10, 0, 0, 2]),
            ep_id: r.allocate_ep_id()?,
            identity: Identity(300),
            hairpin_tag: 0,
        };
        r.insert(old.clone())?;
        assert_eq!(r.by_pod(&pod), Some(&old));
        assert_eq!(r.by_ip([10, 0, 0, 2].into()), Some(&old));
        // The pod's sandbox is recreated before the old one is deleted: the
        // new attachment owns the pod; the old address stays the old one's.
        let new = Endpoint {
            spec: with_pod("c2", [10, 0, 0, 3]),
            ep_id: r.allocate_ep_id()?,
            identity: Identity(300),
            hairpin_tag: 0,
        };
        r.insert(new.clone())?;
        assert_eq!(r.by_pod(&pod), Some(&new));
        assert_eq!(r.by_ip([10, 0, 0, 2].into()), Some(&old));
        r.remove(&old.spec.attachment)?;
        assert_eq!(
            r.by_pod(&pod),
            Some(&new),
            "removing the old one keeps the new one's pod"
        );
        assert_eq!(r.by_ip([10, 0, 0, 2].into()), None);
        assert_eq!(r.by_ip([10, 0, 0, 3].into()), Some(&new));
        drop(r);
        let r = Registry::open(&dir)?;
        assert_eq!(
            r.by_ip([10, 0, 0, 3].into()).map(|e| e.ep_id),
            Some(new.ep_id)
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn hairpin_tags_are_unique_among_registered_endpoints_and_a_freed_one_comes_back_last()
    -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("sluice-reg-tag-{}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&dir);
        let mut r = Registry::open(&dir)?;
        let max = sluice_common::HAIRPIN_TAG_MAX;
        let mut tags = Vec::new();
        for i in 0..max {
            let tag = r.allocate_hairpin_tag();
            assert!((1..=max).contains(&tag), "{tag}");
            let ep_id = r.allocate_ep_id()?;
            r.insert(Endpoint {
                spec: spec(&format!("c{i}")),
                ep_id,
                identity: Identity(300),
                hairpin_tag: tag,
            })?;
            tags.push(tag);
        }
        let distinct: std::collections::HashSet<u32> = tags.iter().copied().collect();
        assert_eq!(distinct.len(), tags.len(), "no tag given twice");
        assert_eq!(r.allocate_hairpin_tag(), 0, "all taken: none");
        // Two freed: the one freed first is not the first one given back
        // unless it comes first after the last tag given.
        r.remove(&spec("c5").attachment)?;
        r.remove(&spec("c9").attachment)?;
        let again = r.allocate_hairpin_tag();
        assert!(again == tags[5] || again == tags[9], "{again}");
        // A reopened registry knows the tags of its records.
        drop(r);
        let mut r = Registry::open(&dir)?;
        let t = r.allocate_hairpin_tag();
        assert!(t == tags[5] || t == tags[9], "{t}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
