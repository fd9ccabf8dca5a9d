//! When is a local answer good enough? The rule the edge applies to every search, defined once
//! so the native edge and the WASM guest decide alike.
//!
//! Version 1 is the threshold rule: a local answer is confident when it has `k` hits and its
//! k-th distance is at most the collection's `max_distance` (a distance in the sense of
//! [`crate::metric`]). Anchors and certificates (the push issue) refine it later.

/// What to do with a local answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer from the cache.
    Local,
    /// Ask the cloud (and fall back to the local answer, marked degraded, if it cannot answer).
    AskCloud,
}

/// The threshold rule over the local hits' distances, nearest first.
pub fn decide(local_distances: &[f32], k: usize, max_distance: f32) -> Decision {
    match local_distances.get(k.saturating_sub(1)) {
        Some(&kth) if local_distances.len() >= k && kth <= max_distance => Decision::Local,
        _ => Decision::AskCloud,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kth_distance_decides() {
        assert_eq!(decide(&[0.1, 0.2, 0.3], 3, 0.3), Decision::Local);
        assert_eq!(decide(&[0.1, 0.2, 0.31], 3, 0.3), Decision::AskCloud);
        assert_eq!(
            decide(&[0.1, 0.2], 3, 0.3),
            Decision::AskCloud,
            "too few local hits"
        );
        assert_eq!(decide(&[], 1, 2.0), Decision::AskCloud);
        assert_eq!(
            decide(&[0.9], 1, f32::NAN),
            Decision::AskCloud,
            "a NaN threshold never certifies"
        );
    }
}
