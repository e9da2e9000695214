//! The drop-event ring buffer, followed without blocking a thread.
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::events::{DropRecord, decode};

/// The ring buffer of drop events; one reader follows it.
pub struct DropEvents(RingBuf<MapData>);

impl DropEvents {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self(ring)
    }

    /// Follows the ring buffer forever, handing each drop to `sink`.
    pub async fn follow(self, mut sink: impl FnMut(DropRecord)) -> std::io::Result<()> {
        // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
        // owns the ring buffer, and as_raw_fd always returns that fd.
        let mut fd = unsafe { AsyncFd::register(self.0) }.map_err(std::io::Error::from)?;
        loop {
            let mut guard = fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match decode(&item) {
                    Some(ev) => sink(DropRecord::from(&ev)),
                    None => {
                        tracing::warn!(len = item.len(), "short record in the drop ring buffer");
                    }
                }
            }
            guard.clear_ready();
        }
    }
}

/// The flow-event switch (`FLOW_EVENTS`, one entry): non-zero while the
/// data path reports every allowed new flow. Opened from its pin, so the
/// agent flips it without the state's lock.
pub struct FlowEventsMap(aya::maps::Array<MapData, u32>);

impl FlowEventsMap {
    pub fn open(pin_dir: &std::path::Path) -> super::Result<Self> {
        use super::maps::{map_err, typed};
        let name = sluice_common::maps::FLOW_EVENTS;
        let data = MapData::from_pin(pin_dir.join("maps").join(name)).map_err(map_err(name))?;
        let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
        Ok(Self(typed(name, map)?))
    }

    pub fn set(&mut self, on: bool) -> super::Result<()> {
        let name = sluice_common::maps::FLOW_EVENTS;
        self.0
            .set(sluice_common::FLOW_EVENTS_INDEX, &u32::from(on), 0)
            .map_err(super::maps::map_err(name))
    }

    pub fn get(&self) -> super::Result<bool> {
        let name = sluice_common::maps::FLOW_EVENTS;
        self.0
            .get(&sluice_common::FLOW_EVENTS_INDEX, 0)
            .map(|v| v != 0)
            .map_err(super::maps::map_err(name))
    }
}
