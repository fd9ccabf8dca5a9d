//! The knobs of pushing, with their defaults: an anchor is pushed when it is asked a second
//! time (one-off queries would churn the cache), counting paraphrases within
//! `anchor_merge_distance` (cosine 0.15) as the same ask.

use serde::{Deserialize, Serialize};

use tiervec_shared::protocol::frame::DEFAULT_MAX_FRAME;

use super::restore::RestorePolicy;

/// Most bytes (byte model) any delta adds, whatever `max_delta_bytes` says: half the edge's
/// frame limit, the rest left to the archive's framing of each vector, anchor and tombstone.
pub const MAX_DELTA_BYTES: u64 = (DEFAULT_MAX_FRAME / 2) as u64;

/// Knobs of pushing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Push to every connected cache this often.
    pub period_ms: u64,
    /// A newly hot anchor is pushed this soon after the previous push (batching).
    pub min_gap_ms: u64,
    /// Ids pushed around each anchor (its cloud answer at this k).
    pub anchor_members: usize,
    /// `ef` of the searches that find them.
    pub anchor_ef: usize,
    /// A fallback query this close to a tracked anchor counts toward it instead of starting
    /// a new one (so many paraphrases of one request make one hot anchor).
    pub anchor_merge_distance: f32,
    /// An anchor is hot once its decayed count (rounded to a whole ask) reaches this.
    pub anchor_hot_count: f64,
    /// Anchors tracked per (edge, collection).
    pub anchors_per_edge: usize,
    /// Most anchors in one delta (the rest go in the next).
    pub max_anchors_per_delta: usize,
    /// Most bytes (byte model) one delta adds, anchors and hot ids together: a delivery stays
    /// short, so an invalidation never waits long behind a push (hot ids left out go in the
    /// next delta, planned at once). Lowered to [`MAX_DELTA_BYTES`].
    pub max_delta_bytes: u64,
    /// A plain id (outside any anchor) is pushed once it was in this many answers (decayed).
    pub hot_id_count: f64,
    /// An unacknowledged delta after this long closes the connection (the edge resyncs).
    pub ack_timeout_ms: u64,
    /// When an edge that comes back holding much less than logged is restored whole.
    pub restore: RestorePolicy,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            period_ms: 1_000,
            min_gap_ms: 100,
            anchor_members: 20,
            anchor_ef: 128,
            anchor_merge_distance: 0.15,
            anchor_hot_count: 2.0,
            anchors_per_edge: 8_192,
            max_anchors_per_delta: 8,
            max_delta_bytes: 128 << 10,
            hot_id_count: 3.0,
            ack_timeout_ms: 5_000,
            restore: RestorePolicy::default(),
        }
    }
}

impl PushConfig {
    /// The bytes one delta may add: `max_delta_bytes`, at most [`MAX_DELTA_BYTES`].
    pub fn delta_limit(&self) -> u64 {
        self.max_delta_bytes.min(MAX_DELTA_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_limit_past_the_frame_is_lowered_to_half_of_it() {
        let config = |max_delta_bytes| PushConfig {
            max_delta_bytes,
            ..PushConfig::default()
        };
        assert_eq!(config(128 << 10).delta_limit(), 128 << 10);
        assert_eq!(config(u64::MAX).delta_limit(), MAX_DELTA_BYTES);
        assert_eq!(MAX_DELTA_BYTES * 2, DEFAULT_MAX_FRAME as u64);
    }
}
