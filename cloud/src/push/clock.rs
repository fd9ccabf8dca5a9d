//! The one wall-clock reading of pushing.

use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock in µs since the Unix epoch: when an anchor was asked and a delta sent, which
/// the edge compares with its own clock to measure push delays.
pub(super) fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
