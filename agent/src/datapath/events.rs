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
