//! In-memory [`Store`] for allocator tests.
use std::collections::HashMap;
use std::net::IpAddr;

use sluice_proto::Attachment;

use super::{IpamError, Store};

#[derive(Debug, Default)]
pub struct MemStore {
    ips: HashMap<IpAddr, Attachment>,
    last: HashMap<usize, IpAddr>,
}

impl Store for MemStore {
    fn allocations(&self) -> Result<Vec<(IpAddr, Attachment)>, IpamError> {
        Ok(self.ips.iter().map(|(ip, a)| (*ip, a.clone())).collect())
    }

    fn reserve(&mut self, ip: IpAddr, owner: &Attachment) -> Result<bool, IpamError> {
        if self.ips.contains_key(&ip) {
            return Ok(false);
        }
        self.ips.insert(ip, owner.clone());
        Ok(true)
    }

    fn release(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        self.ips.remove(&ip);
        Ok(())
    }

    fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError> {
        Ok(self.last.get(&set).copied())
    }

    fn set_last_reserved(&mut self, set: usize, ip: IpAddr) -> Result<(), IpamError> {
        self.last.insert(set, ip);
        Ok(())
    }
}
