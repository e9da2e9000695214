//! IP address management, host-local in spirit: configured ranges, one
//! address per range set and attachment, state behind a small [`Store`]
//! (one file per address on disk, or in memory for tests).
//!
//! The allocator rotates: it starts after the last address it handed out in
//! a range set, so a just-released address is not reused at once (a late
//! packet for the old pod should not reach the new one).
mod alloc;
pub mod disk;
pub mod memory;
mod range;

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

pub use alloc::{allocate, owned_by, release_owner, stale};
pub use range::RangeSet;
use sluice_proto::Attachment;

use crate::error::code;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in range set {0}")]
    Exhausted(String),

    #[error("{owner:?} already holds {ip}; ADD twice without DEL")]
    Duplicate { ip: IpAddr, owner: Attachment },

    #[error("IPAM state {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl IpamError {
    pub fn code(&self) -> u32 {
        match self {
            Self::Io { .. } => code::IO_FAILURE,
            Self::Exhausted(_) | Self::Duplicate { .. } => code::INTERNAL,
        }
    }
}

/// Where allocations live. Callers hold whatever lock the store needs for
/// the whole allocate/release (the disk store locks on open).
pub trait Store {
    /// Every reserved address and its owner.
    fn allocations(&self) -> Result<Vec<(IpAddr, Attachment)>, IpamError>;
    /// Reserves `ip` for `owner`; `Ok(false)` when it is already taken.
    fn reserve(&mut self, ip: IpAddr, owner: &Attachment) -> Result<bool, IpamError>;
    /// Releases `ip`; releasing a free address is `Ok`.
    fn release(&mut self, ip: IpAddr) -> Result<(), IpamError>;
    /// The last address handed out from range set `set`, if remembered.
    fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError>;
    fn set_last_reserved(&mut self, set: usize, ip: IpAddr) -> Result<(), IpamError>;
}
