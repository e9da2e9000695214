//! Sluice's node agent: loads and pins the TC programs, keeps the endpoint
//! registry, serves the CNI socket and reports drops.
//!
//! Pure logic lives in `policy` (what the maps hold for an endpoint) and
//! `events` (decoding drops); `datapath` is the thin edge over aya, `node`
//! the operations, `server` the socket.
pub mod cluster;
pub mod compiler;
pub mod datapath;
pub mod events;
pub mod k8s;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod registry;
pub mod routes;
pub mod server;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf {0})")]
    NotBpffs(String),
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that `dir` (or its nearest existing ancestor) is on a bpffs.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let st = nix::sys::statfs::statfs(probe)
        .map_err(|e| Error::Io(format!("statfs {}", probe.display()), e.into()))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs(dir.display().to_string()));
    }
    Ok(())
}
