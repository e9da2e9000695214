//! Sluice's node agent. Dependencies run one way (docs/architecture.md):
//!
//! - `model`: the shared vocabulary (kinds, object keys, endpoint ids,
//!   identities);
//! - `policy`: the NetworkPolicy compiler, pure (no aya, tokio or client);
//! - `cluster`: the Kubernetes side (watches, known objects, Events), over
//!   `policy`;
//! - `datapath`: the only module that imports aya (load, maps, attach, the
//!   writer, drop events); `endpoints`: node-local endpoints over it;
//! - `reconcile`: owns the state and the order of writes, applies
//!   `cluster`'s changes through `endpoints` and `datapath`, plus routes and
//!   uplinks; `server` (the CNI socket) and `main` call it;
//! - `events` (drop records), `metrics`, `netdev` (the node's interfaces),
//!   `config` (the command line), `install` (the plugin and conflist on
//!   the node, and uninstall), `probe` (connections from inside a local
//!   pod's netns, for `sluice assert`).
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod endpoints;
pub mod events;
pub mod flows;
pub mod install;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod policy;
pub mod probe;
pub mod reconcile;
pub mod server;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf {0})")]
    NotBpffs(String),
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("no cgroup2 mount in /proc/self/mountinfo (pass --host-cgroup)")]
    NoCgroup2,
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts): the default cgroup of `to_host`.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::Io("reading /proc/self/mountinfo".into(), e))?;
    cgroup2_mount(&info).ok_or(Error::NoCgroup2)
}

/// The first cgroup2 mount point in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fstype = fs.split(' ').next()?;
        let point = mount.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified = "25 30 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      32 30 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n"),
            None
        );
    }
}
