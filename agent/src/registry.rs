//! The endpoint registry: which pod attachments this node has, persisted as
//! one JSON file per attachment so that a restarted agent knows them again.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sluice_proto::{Attachment, EndpointSpec};

/// A registered endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// Unique for the life of the node's state: never reused, so conntrack
    /// entries of a deleted endpoint cannot match a new one on the same
    /// ifindex.
    pub ep_id: u32,
    pub identity: u32,
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
    by_attachment: BTreeMap<(String, String), Endpoint>,
    next_ep_id: u32,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    }
}

fn key(a: &Attachment) -> (String, String) {
    (a.container_id.clone(), a.ifname.clone())
}

impl Registry {
    /// Opens (creating) the registry under `state_dir/endpoints`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("endpoints");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut by_attachment = BTreeMap::new();
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
            by_attachment.insert(key(&ep.spec.attachment), ep);
        }
        let counter = state_dir.join("next-ep-id");
        let stored = match std::fs::read_to_string(&counter) {
            Ok(s) => s.trim().parse().unwrap_or(1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(e) => return Err(io_err(&counter)(e)),
        };
        let seen = by_attachment
            .values()
            .map(|e| e.ep_id + 1)
            .max()
            .unwrap_or(1);
        Ok(Self {
            dir,
            by_attachment,
            next_ep_id: stored.max(seen),
        })
    }

    pub fn get(&self, a: &Attachment) -> Option<&Endpoint> {
        self.by_attachment.get(&key(a))
    }

    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        self.by_attachment.values()
    }

    pub fn by_ep_id(&self, ep_id: u32) -> Option<&Endpoint> {
        self.by_attachment.values().find(|e| e.ep_id == ep_id)
    }

    /// Reserves a fresh endpoint id and persists the counter first, so a
    /// crash cannot hand the same id out twice.
    pub fn allocate_ep_id(&mut self) -> Result<u32> {
        let id = self.next_ep_id;
        let path = self.dir.with_file_name("next-ep-id");
        write_atomic(&path, format!("{}\n", id + 1).as_bytes())?;
        self.next_ep_id = id + 1;
        Ok(id)
    }

    pub fn insert(&mut self, ep: Endpoint) -> Result<()> {
        let path = self.record_path(&ep.spec.attachment);
        let text = serde_json::to_vec_pretty(&ep).map_err(|source| RegistryError::Decode {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &text)?;
        self.by_attachment.insert(key(&ep.spec.attachment), ep);
        Ok(())
    }

    pub fn remove(&mut self, a: &Attachment) -> Result<Option<Endpoint>> {
        let path = self.record_path(a);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(self.by_attachment.remove(&key(a)))
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
            ipv4: Some("10.0.0.2".parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST)),
            ipv6: None,
            pod_namespace: None,
            pod_name: None,
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
                identity: 300,
            })?;
            let id2 = r.allocate_ep_id()?;
            assert_ne!(id, id2);
            r.insert(Endpoint {
                spec: spec("c2"),
                ep_id: id2,
                identity: 301,
            })?;
            r.remove(&spec("c2").attachment)?;
        }
        let mut r = Registry::open(&dir)?;
        assert_eq!(r.all().count(), 1);
        assert!(r.get(&spec("c1").attachment).is_some());
        let id3 = r.allocate_ep_id()?;
        assert!(id3 > 2, "ids are never reused, got {id3}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
