//! Network namespaces. All work inside another namespace goes through
//! [`with_netns`]: a dedicated OS thread joins the namespace and dies with
//! it, so no thread (and certainly no tokio worker) ever runs in the wrong
//! namespace afterwards (containernetworking/plugins pkg/ns README explains
//! why switching a shared thread is unsafe).
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

use crate::{Error, Result};

fn ns_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Netns {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens a namespace path. A missing path is error 3 (container unknown).
pub fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(ns_err(path))
}

/// Checks that CNI_NETNS names a network namespace other than the one the
/// plugin runs in: moving the pod end "into" our own namespace would hand
/// the node's namespace to the pod.
pub fn validate(path: &Path) -> Result<()> {
    let file = open(path)?;
    let bad = |reason: String| Error::InvalidEnv {
        name: "CNI_NETNS",
        reason,
    };
    let fs = fstatfs(&file).map_err(|e| ns_err(path)(e.into()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(bad(format!("{} is not a namespace", path.display())));
    }
    let theirs = file.metadata().map_err(ns_err(path))?;
    let own_path = PathBuf::from("/proc/thread-self/ns/net");
    let ours = std::fs::metadata(&own_path).map_err(ns_err(&own_path))?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(bad(format!(
            "{} is the plugin's own network namespace",
            path.display()
        )));
    }
    Ok(())
}

/// Runs `f` on a fresh OS thread that has joined the network namespace at
/// `path`. The thread exits when `f` returns, taking the namespace switch
/// with it.
pub fn with_netns<T, F>(path: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let file = open(path)?;
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| ns_err(path)(e.into()))?;
            f()
        });
        worker.join().unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "thread in {} panicked",
                path.display()
            )))
        })
    })
}
