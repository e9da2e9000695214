//! The verbs, and the table that picks one. Each verb reads top to bottom:
//! parse, IPAM, namespace work, agent, result.
mod add;
mod check;
mod del;
mod gc;
mod phases;
mod queue;
mod status;

use std::net::IpAddr;

pub use add::add;
pub use check::check;
pub use del::del;
pub use gc::gc;
pub use status::status;

use crate::config::{self, NetConf};
use crate::env::{self, Command};
use crate::ipam::{self, disk::DiskStore};
use crate::version::{self, Version};
use crate::{Error, Result};

/// What one invocation prints on success (nothing for DEL, CHECK, STATUS,
/// GC).
pub type Output = Option<String>;

/// Runs the plugin for `command` with `stdin` and the environment behind
/// `lookup`. `served` is updated with the negotiated version as soon as it
/// is known, so that errors are reported in it.
pub fn run(
    command: Command,
    stdin: &[u8],
    lookup: &dyn Fn(&str) -> Option<String>,
    served: &mut Version,
) -> Result<Output> {
    if command == Command::Version {
        return version_verb(stdin);
    }
    let value = config::parse_json(stdin)?;
    let version = config::negotiate(&value)?;
    *served = version;
    let conf = config::from_value(value, version)?;
    if !conf.ignored.is_empty() {
        eprintln!(
            "sluice: ignoring {} (this plugin declares no capabilities)",
            conf.ignored.join(", ")
        );
    }
    match command {
        Command::Add => {
            let env = env::attachment(lookup, true)?;
            let mut phases = phases::Phases::start();
            let result = add(&conf, &env, &mut phases)?;
            if lookup(phases::ENV).as_deref() == Some("1") {
                eprintln!("sluice phases {}", phases.to_json());
            }
            Ok(Some(to_json(&result)?))
        }
        Command::Del => {
            let mut phases = phases::Phases::start();
            del(&conf, &env::attachment(lookup, false)?, &mut phases)?;
            if lookup(phases::ENV).as_deref() == Some("1") {
                eprintln!("sluice phases {}", phases.to_json());
            }
            Ok(None)
        }
        Command::Check => check(&conf, &env::attachment(lookup, true)?).map(|()| None),
        Command::Status => {
            require(version, Version::V1_1_0, "STATUS")?;
            status(&conf).map(|()| None)
        }
        Command::Gc => {
            require(version, Version::V1_1_0, "GC")?;
            gc(&conf).map(|()| None)
        }
        Command::Version => version_verb(stdin),
    }
}

fn version_verb(stdin: &[u8]) -> Result<Output> {
    let given = if stdin.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v = config::parse_json(stdin)?;
        v.get("cniVersion")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    to_json(&version::version_info(given.as_deref())).map(Some)
}

/// STATUS and GC exist from 1.1.0 on (libcni's skel refuses them below).
fn require(have: Version, need: Version, verb: &str) -> Result<()> {
    if have < need {
        return Err(Error::IncompatibleVersion(format!(
            "{verb} needs cniVersion {need} or later, the configuration has {have}"
        )));
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("encoding the result: {e}")))
}

/// Whether the ranges serve IPv4 and IPv6.
fn families(ranges: &[ipam::RangeSet]) -> (bool, bool) {
    let v6 = ranges.iter().any(ipam::RangeSet::is_v6);
    let v4 = ranges.iter().any(|r| !r.is_v6());
    (v4, v6)
}

fn open_store(conf: &NetConf) -> Result<DiskStore> {
    Ok(DiskStore::open(&conf.data_dir, &conf.name)?)
}

fn split(ips: &[IpAddr]) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let v4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let v6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    (v4, v6)
}
