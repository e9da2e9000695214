//! On-disk [`Store`], laid out like host-local's:
//!
//! ```text
//! <dataDir>/<network>/lock                flock'ed for the life of a DiskStore
//! <dataDir>/<network>/10.244.1.7          "<containerID>\n<ifname>\n", O_EXCL
//! <dataDir>/<network>/fd00::7
//! <dataDir>/<network>/last_reserved_ip.0  last address handed out, range set 0
//! ```
//!
//! State is plain files so it survives plugin and node-agent restarts, and
//! O_EXCL keeps one address from ever having two owners even if the lock were
//! bypassed.
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sluice_common::not_found_ok;
use sluice_proto::Attachment;

use super::{IpamError, Store};

pub struct DiskStore {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl DiskStore {
    /// Opens (creating) `<data_dir>/<network>` and takes its lock, blocking
    /// until concurrent ADD/DEL/GC invocations release it.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self, IpamError> {
        let dir = data_dir.join(network);
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err(&lock_path)(io::Error::from(errno)))?;
        Ok(Self { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn last_path(&self, set: usize) -> PathBuf {
        self.dir.join(format!("last_reserved_ip.{set}"))
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Owner file contents. A file left empty by a crash between create and
/// write reads as an owner no runtime knows, so the address stays taken
/// until GC releases it.
fn parse_owner(s: &str) -> Attachment {
    let mut lines = s.lines();
    Attachment {
        container_id: lines.next().unwrap_or_default().trim().to_string(),
        ifname: lines.next().unwrap_or_default().trim().to_string(),
    }
}

impl Store for DiskStore {
    fn allocations(&self) -> Result<Vec<(IpAddr, Attachment)>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue; // lock, last_reserved_ip.*, anything else
            };
            let path = entry.path();
            // None: released between read_dir and read, only possible
            // without the lock, harmless either way.
            if let Some(s) = not_found_ok(fs::read_to_string(&path)).map_err(io_err(&path))? {
                out.push((ip, parse_owner(&s)));
            }
        }
        Ok(out)
    }

    fn reserve(&mut self, ip: IpAddr, owner: &Attachment) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let body = format!("{}\n{}\n", owner.container_id, owner.ifname);
        if let Err(e) = f.write_all(body.as_bytes()) {
            drop(f);
            // Do not leave an ownerless file behind for this address.
            let _unused = fs::remove_file(&path);
            return Err(io_err(&path)(e));
        }
        Ok(true)
    }

    fn release(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        // Already free is fine: DEL twice, or GC after DEL.
        not_found_ok(fs::remove_file(&path)).map_err(io_err(&path))?;
        Ok(())
    }

    fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError> {
        let path = self.last_path(set);
        let text = not_found_ok(fs::read_to_string(&path)).map_err(io_err(&path))?;
        // A garbled file only costs rotation, not correctness.
        Ok(text.and_then(|s| s.trim().parse().ok()))
    }

    fn set_last_reserved(&mut self, set: usize, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.last_path(set);
        fs::write(&path, ip.to_string()).map_err(io_err(&path))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::{RangeSet, allocate, release_owner};
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "sluice-ipam-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _unused = fs::remove_dir_all(&self.0);
        }
    }

    fn att(c: &str) -> Attachment {
        Attachment {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn ranges() -> Vec<RangeSet> {
        RangeSet::parse_all(&[vec!["10.1.0.0/29".into()], vec!["fd00::/120".into()]])
            .expect("literal ranges")
    }

    #[test]
    fn state_survives_reopening_and_rotation_continues() {
        let tmp = TempDir::new();
        let first =
            DiskStore::open(&tmp.0, "net").and_then(|mut s| allocate(&mut s, &ranges(), &att("a")));
        assert_eq!(first.as_ref().map(Vec::len).ok(), Some(2));
        let body = fs::read_to_string(tmp.0.join("net/10.1.0.1")).unwrap();
        assert_eq!(body, "a\neth0\n");

        let second =
            DiskStore::open(&tmp.0, "net").and_then(|mut s| allocate(&mut s, &ranges(), &att("b")));
        let got: Vec<String> = second.unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.1.0.2", "fd00::2"]);

        let released =
            DiskStore::open(&tmp.0, "net").and_then(|mut s| release_owner(&mut s, &att("a")));
        assert_eq!(released.map(|v| v.len()).ok(), Some(2));
        assert!(!tmp.0.join("net/10.1.0.1").exists());
        assert!(!tmp.0.join("net/fd00::1").exists());
    }

    #[test]
    fn reserve_is_exclusive_and_release_of_a_free_address_is_ok() {
        let tmp = TempDir::new();
        let mut s = DiskStore::open(&tmp.0, "net").unwrap();
        let ip: IpAddr = "10.1.0.3".parse().unwrap();
        assert_eq!(s.reserve(ip, &att("a")).ok(), Some(true));
        assert_eq!(s.reserve(ip, &att("b")).ok(), Some(false));
        assert!(s.release(ip).is_ok());
        assert!(s.release(ip).is_ok());
    }

    #[test]
    fn an_empty_owner_file_keeps_its_address_taken() {
        let tmp = TempDir::new();
        let s = DiskStore::open(&tmp.0, "net").unwrap();
        fs::write(s.dir().join("10.1.0.1"), "").unwrap();
        let all = s.allocations().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.container_id, "");
    }
}
