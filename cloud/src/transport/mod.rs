//! How edges and applications reach the cloud: the QUIC endpoint for edges ([`quic`], mutual
//! TLS with the deployment's certificates, [`certs`]) and the HTTP/JSON API ([`http`], served by
//! [`listener`]'s accept loop, which caps connections and times out idle ones). Both
//! only move bytes and call the layers below: the service, the collections and the push hub.

pub mod certs;
pub mod http;
pub mod listener;
pub mod quic;
pub mod spec;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A search that scans at most this many rows exactly (a small collection, or the points
/// written since the graph was exported) takes tens of microseconds; a larger scan holds a core
/// for milliseconds.
pub const INLINE_SCAN_ROWS: usize = 2_048;

/// Large exact scans running at once, over HTTP and QUIC together (`max_concurrent_scans`,
/// default one per core): more at once would only queue inside the blocking pool while holding
/// its threads. Each runs on the blocking pool holding a slot.
#[derive(Clone)]
pub struct ScanSlots(Arc<Semaphore>);

impl ScanSlots {
    pub fn new(slots: usize) -> ScanSlots {
        ScanSlots(Arc::new(Semaphore::new(
            slots.clamp(1, Semaphore::MAX_PERMITS),
        )))
    }

    /// A slot for a search that scans `rows` rows exactly, waited for; none is needed (None)
    /// at or below [`INLINE_SCAN_ROWS`].
    pub async fn slot_for(&self, rows: usize) -> Option<OwnedSemaphorePermit> {
        if rows <= INLINE_SCAN_ROWS {
            return None;
        }
        Some(
            self.0
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed"),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn small_scans_need_no_slot_and_large_ones_wait_for_one() {
        let slots = ScanSlots::new(1);
        assert!(slots.slot_for(INLINE_SCAN_ROWS).await.is_none());
        let held = slots.slot_for(INLINE_SCAN_ROWS + 1).await;
        assert!(held.is_some());
        let waiting = tokio::time::timeout(Duration::from_millis(50), slots.slot_for(1 << 20));
        assert!(waiting.await.is_err(), "a second large scan waits");
        assert!(slots.slot_for(10).await.is_none(), "small ones do not");
        drop(held);
        assert!(slots.slot_for(1 << 20).await.is_some());
    }
}
