//! Sysctls, written through /proc/sys. /proc/sys/net shows the namespace of
//! the thread that opens the file, i.e. the node namespace the runtime runs
//! the plugin in.
use std::fs;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
pub const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Writes `value` unless the file already holds it (saves a write, and a
/// read-only /proc/sys with the right value is fine).
pub fn ensure(path: &Path, value: &str) -> Result<()> {
    let err = |source| Error::Sysctl {
        path: PathBuf::from(path),
        source,
    };
    let cur = fs::read_to_string(path).map_err(err)?;
    if cur.trim() == value {
        return Ok(());
    }
    fs::write(path, value).map_err(err)
}

/// The host routes pods, so it must forward for each family it serves.
pub fn enable_forwarding(v4: bool, v6: bool) -> Result<()> {
    if v4 {
        ensure(Path::new(IPV4_FORWARD), "1")?;
    }
    if v6 {
        ensure(Path::new(IPV6_FORWARD), "1")?;
    }
    Ok(())
}
