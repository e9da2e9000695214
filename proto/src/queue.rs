//! The deletion queue: endpoint removals whose end DEL does not wait for,
//! with their addresses held until they are finished: the deletion of a
//! pod's host veth, which the agent does after DEL has answered, and
//! removals that DEL could not hand to the agent because it was
//! unreachable (as Cilium's plugin queues them).
//!
//! ```text
//! <dir>/<containerID>@<ifname>.json   pending: written by the plugin's DEL
//! <dir>/<containerID>@<ifname>.done   the agent has finished the removal
//! <dir>/.<name>.tmp                   being written (ignored by readers)
//! <dir>/.<name>.bad                   did not parse; set aside, ignored
//! ```
//!
//! One small file per attachment, each written to a temporary file and
//! renamed into place, so a reader never sees half an entry.
//!
//! 1. DEL sets the pod's host end down (the pod's traffic stops) and
//!    writes a pending entry naming that veth (`host_ifindex`) before it
//!    asks the agent to forget the endpoint; the addresses stay held.
//!    - The agent answers `RemovalDeferred`: it has forgotten the endpoint
//!      and deletes the veth after answering. DEL returns 0.
//!    - The agent answers `Ok` (an agent that defers nothing, or whose
//!      queue is elsewhere): DEL deletes the veth, releases the addresses
//!      and removes the entry itself.
//!    - The agent is unreachable: DEL deletes the veth, rewrites the entry
//!      without `host_ifindex` and returns 0.
//! 2. The agent, after a `RemovalDeferred` answer, at start-up and on
//!    every tick: forgets each pending endpoint (idempotent), deletes its
//!    veth (if it is still the one with that index and name), then renames
//!    `.json` to `.done`, only if the entry is still the one it read.
//! 3. The plugin, on its next ADD, DEL or GC of the same network, under its
//!    IPAM lock: releases the addresses of each `.done` entry, then removes
//!    the file. A DEL that finds no veth and reaches the agent removes both
//!    files itself; an ADD of the same attachment finishes a pending
//!    removal itself first (`cni-plugin/src/cmd/queue.rs`).
//!
//! Each step is idempotent and the rename is the commit point, so a crash
//! anywhere repeats a step and never releases an address that the agent
//! may still use or that a veth and its host routes still carry. The
//! agent's check that the entry is still the one it read and its rename
//! to `.done` happen under an `flock` of the directory, which the plugin's
//! writes and removals of pending entries take too: otherwise an ADD that
//! finished the removal and a DEL that queued the attachment anew could
//! both land in between, and the new removal (its veth not yet deleted)
//! would be marked done.
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Attachment;

/// Where the plugin queues and the agent drains by default: inside the
/// agent's state directory (`--state-dir` /var/lib/sluice), which survives
/// reboots, as the IPAM state does.
pub const DEFAULT_DIR: &str = "/var/lib/sluice/delete-queue";

const PENDING: &str = "json";
const DONE: &str = "done";

/// One queued endpoint removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedDelete {
    pub attachment: Attachment,
    /// The CNI network name and the plugin's dataDir: whose IPAM holds
    /// `ips`.
    pub network: String,
    pub data_dir: String,
    /// Held until the removal is finished.
    pub ips: Vec<IpAddr>,
    pub host_ifname: String,
    /// The index of the host veth still to delete (set down by DEL), or
    /// `None` when DEL deleted it (or found none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ifindex: Option<u32>,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
}

/// The queue directory.
#[derive(Clone, Debug)]
pub struct DeleteQueue {
    dir: PathBuf,
}

/// `<containerID>@<ifname>`: a container id has no '@' (CNI allows
/// alphanumerics, '_', '.', '-'), so the name is unambiguous.
fn key(a: &Attachment) -> io::Result<String> {
    let ok = !a.container_id.is_empty()
        && !a.ifname.is_empty()
        && !a.container_id.starts_with('.')
        && !a.container_id.contains(['@', '/', '\0'])
        && !a.ifname.contains(['/', '\0']);
    if ok {
        Ok(format!("{}@{}", a.container_id, a.ifname))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{a:?} cannot name a queue entry"),
        ))
    }
}

fn not_found_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl DeleteQueue {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, a: &Attachment, ext: &str) -> io::Result<PathBuf> {
        Ok(self.dir.join(format!("{}.{ext}", key(a)?)))
    }

    /// The queue's lock, an `flock` of its directory held until the file
    /// is dropped: around each check and change of a pending entry.
    /// `None` when there is no directory (nothing was ever queued).
    fn lock(&self) -> io::Result<Option<fs::File>> {
        match fs::File::open(&self.dir) {
            Ok(dir) => {
                dir.lock()?;
                Ok(Some(dir))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes (or rewrites) the pending entry of `e.attachment`: temporary
    /// file, fsync, rename, fsync of the directory.
    pub fn enqueue(&self, e: &QueuedDelete) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let name = key(&e.attachment)?;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let body = serde_json::to_vec(e).map_err(io::Error::other)?;
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        let dir = self
            .lock()?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        fs::rename(&tmp, self.path(&e.attachment, PENDING)?)?;
        dir.sync_all()
    }

    fn list(&self, ext: &str) -> io::Result<Vec<QueuedDelete>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let visible = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'));
            if !visible || path.extension().and_then(|x| x.to_str()) != Some(ext) {
                continue;
            }
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                // Drained or released between read_dir and read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match serde_json::from_slice(&bytes) {
                Ok(parsed) => out.push(parsed),
                // Not written by `enqueue` (which renames whole files into
                // place): set aside, hidden, for a human to look at, so
                // that it blocks nothing.
                Err(_) => {
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
                    fs::rename(&path, self.dir.join(format!(".{name}.bad")))?;
                }
            }
        }
        out.sort_by(|a: &QueuedDelete, b| {
            a.attachment.container_id.cmp(&b.attachment.container_id)
        });
        Ok(out)
    }

    /// Entries the agent has yet to finish.
    pub fn pending(&self) -> io::Result<Vec<QueuedDelete>> {
        self.list(PENDING)
    }

    /// Entries whose endpoint the agent has forgotten and that are not
    /// pending again (a later DEL queued the same attachment anew): their
    /// addresses may go back to the pool.
    pub fn done(&self) -> io::Result<Vec<QueuedDelete>> {
        let mut out = self.list(DONE)?;
        out.retain(|e| self.path(&e.attachment, PENDING).is_ok_and(|p| !p.exists()));
        Ok(out)
    }

    /// The pending entry of `a`, if any.
    pub fn pending_of(&self, a: &Attachment) -> io::Result<Option<QueuedDelete>> {
        match fs::read(self.path(a, PENDING)?) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The agent has finished the removal of `a`. Nothing pending is
    /// fine (a DEL that reached the agent removed the entry meanwhile).
    pub fn mark_done(&self, a: &Attachment) -> io::Result<()> {
        not_found_ok(fs::rename(self.path(a, PENDING)?, self.path(a, DONE)?))
    }

    /// [`Self::mark_done`], only while the pending entry is still `e`:
    /// one that an ADD finished and a later DEL queued anew names another
    /// veth, whose removal is not finished. Whether it was marked.
    pub fn mark_done_if(&self, e: &QueuedDelete) -> io::Result<bool> {
        let _lock = self.lock()?;
        if self.pending_of(&e.attachment)?.as_ref() != Some(e) {
            return Ok(false);
        }
        self.mark_done(&e.attachment)?;
        Ok(true)
    }

    /// Forgets `a`'s finished entry (its addresses are released).
    pub fn remove_done(&self, a: &Attachment) -> io::Result<()> {
        not_found_ok(fs::remove_file(self.path(a, DONE)?))
    }

    /// Forgets everything queued for `a` (a DEL reached the agent).
    pub fn remove(&self, a: &Attachment) -> io::Result<()> {
        let _lock = self.lock()?;
        not_found_ok(fs::remove_file(self.path(a, PENDING)?))?;
        self.remove_done(a)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            Self(std::env::temp_dir().join(format!(
                "sluice-queue-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _gone = fs::remove_dir_all(&self.0);
        }
    }

    fn entry(id: &str) -> QueuedDelete {
        QueuedDelete {
            attachment: Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            network: "net".into(),
            data_dir: "/d".into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            host_ifname: "sl0".into(),
            host_ifindex: Some(7),
            pod_namespace: Some("ns".into()),
            pod_name: None,
        }
    }

    #[test]
    fn an_entry_goes_from_pending_to_done_to_removed() {
        let d = Dir::new();
        let q = DeleteQueue::new(d.0.join("q"));
        assert!(q.pending().unwrap().is_empty(), "a missing dir is empty");
        let e = entry("c1");
        q.enqueue(&e).unwrap();
        q.enqueue(&e).unwrap(); // a second DEL rewrites it
        assert_eq!(q.pending().unwrap(), std::slice::from_ref(&e));
        assert!(q.done().unwrap().is_empty());
        assert!(d.0.join("q/c1@eth0.json").exists());

        q.mark_done(&e.attachment).unwrap();
        q.mark_done(&e.attachment).unwrap(); // drained twice
        assert!(q.pending().unwrap().is_empty());
        assert_eq!(q.done().unwrap(), std::slice::from_ref(&e));

        q.remove_done(&e.attachment).unwrap();
        q.remove_done(&e.attachment).unwrap();
        assert!(q.done().unwrap().is_empty());
        assert_eq!(fs::read_dir(d.0.join("q")).unwrap().count(), 0);
    }

    #[test]
    fn a_done_entry_queued_again_is_not_done() {
        let d = Dir::new();
        let q = DeleteQueue::new(&d.0);
        let e = entry("c2");
        q.enqueue(&e).unwrap();
        q.mark_done(&e.attachment).unwrap();
        q.enqueue(&e).unwrap();
        assert!(q.done().unwrap().is_empty());
        assert_eq!(q.pending().unwrap().len(), 1);
        q.remove(&e.attachment).unwrap();
        assert!(q.pending().unwrap().is_empty() && q.done().unwrap().is_empty());
    }

    #[test]
    fn only_the_entry_read_is_marked_done() {
        let d = Dir::new();
        let q = DeleteQueue::new(&d.0);
        let e = entry("c5");
        assert!(q.pending_of(&e.attachment).unwrap().is_none());
        q.enqueue(&e).unwrap();
        assert_eq!(q.pending_of(&e.attachment).unwrap().as_ref(), Some(&e));
        let newer = QueuedDelete {
            host_ifindex: Some(8),
            ..e.clone()
        };
        q.enqueue(&newer).unwrap();
        assert!(!q.mark_done_if(&e).unwrap(), "another veth's removal");
        assert!(q.done().unwrap().is_empty());
        assert!(q.mark_done_if(&newer).unwrap());
        assert_eq!(q.done().unwrap(), vec![newer.clone()]);
        assert!(!q.mark_done_if(&newer).unwrap(), "nothing pending");
    }

    /// The agent marks removals done while the plugin finishes the same
    /// attachment's removal and queues it anew, over and over: a marked
    /// `.done` entry is always the one the agent read (without the lock,
    /// a newer pending entry lands between the check and the rename; this
    /// caught that in 3 of 5 runs).
    #[test]
    fn marking_done_never_marks_an_entry_queued_after_the_check() {
        let d = Dir::new();
        let q = DeleteQueue::new(&d.0);
        let first = entry("c7");
        q.enqueue(&first).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..1000 {
                    let e = QueuedDelete {
                        host_ifindex: Some(100 + i),
                        ..first.clone()
                    };
                    q.remove(&e.attachment).unwrap();
                    q.enqueue(&e).unwrap();
                }
                stop.store(true, Ordering::Relaxed);
            });
            while !stop.load(Ordering::Relaxed) {
                let Some(read) = q.pending_of(&first.attachment).unwrap() else {
                    continue;
                };
                if q.mark_done_if(&read).unwrap() {
                    let done = fs::read(q.path(&first.attachment, DONE).unwrap());
                    // Gone is fine: the plugin removed it since.
                    if let Ok(bytes) = done {
                        let marked: QueuedDelete = serde_json::from_slice(&bytes).unwrap();
                        assert_eq!(marked, read, "a newer removal was marked done");
                    }
                }
            }
        });
    }

    #[test]
    fn an_entry_without_an_index_reads_as_before() {
        let old = r#"{"attachment":{"container_id":"c6","ifname":"eth0"},"network":"n","data_dir":"/d","ips":[],"host_ifname":"sl0"}"#;
        let e: QueuedDelete = serde_json::from_str(old).unwrap();
        assert_eq!(e.host_ifindex, None);
        assert!(!serde_json::to_string(&e).unwrap().contains("host_ifindex"));
    }

    #[test]
    fn temporary_files_are_not_entries_and_bad_names_are_refused() {
        let d = Dir::new();
        let q = DeleteQueue::new(&d.0);
        fs::create_dir_all(&d.0).unwrap();
        fs::write(d.0.join(".c3@eth0.tmp"), "{").unwrap();
        fs::write(d.0.join("c4@eth0.json"), "{").unwrap();
        assert!(q.pending().unwrap().is_empty());
        assert!(d.0.join(".c4@eth0.json.bad").exists());
        for bad in ["", "a/b", "a@b", ".x"] {
            assert!(q.enqueue(&entry(bad)).is_err(), "{bad:?}");
        }
    }
}
