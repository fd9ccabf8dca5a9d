//! When is a local answer good enough? The rule the edge applies to every search, defined once
//! so the native edge and the WASM guest decide alike.
//!
//! Two signals, each with its own threshold (distances in the sense of [`crate::metric`]):
//! * the k-th local distance: weak — a query whose true neighbours are not cached still finds
//!   cached vectors at ordinary distances;
//! * the distance from the query to the nearest *anchor*: a past query whose answer the cloud
//!   supplied and whose neighbours it pushed. A query close to one asks (nearly) the same
//!   question, so its neighbours are cached.
//!
//! A local answer is confident when it has `k` hits and either signal is within its threshold
//! (a threshold left out never says yes; a NaN one neither).

use serde::{Deserialize, Serialize};

/// What to do with a local answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer from the cache.
    Local,
    /// Ask the cloud (and fall back to the local answer, marked degraded, if it cannot answer).
    AskCloud,
}

/// The thresholds of the confidence rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ConfidenceRule {
    /// Local when the k-th local distance is at most this.
    pub max_kth_distance: Option<f32>,
    /// Local when the nearest anchor is at most this far from the query.
    pub max_anchor_distance: Option<f32>,
}

impl ConfidenceRule {
    /// The k-th distance rule alone.
    pub const fn kth(max: f32) -> ConfidenceRule {
        ConfidenceRule {
            max_kth_distance: Some(max),
            max_anchor_distance: None,
        }
    }

    /// Decides over the local hits' distances (nearest first) and the distance to the nearest
    /// anchor, if the cache holds any.
    pub fn decide(
        &self,
        local_distances: &[f32],
        k: usize,
        nearest_anchor: Option<f32>,
    ) -> Decision {
        if k == 0 || local_distances.len() < k {
            return Decision::AskCloud;
        }
        let within = |value: Option<f32>, max: Option<f32>| match (value, max) {
            (Some(v), Some(m)) => v <= m,
            _ => false,
        };
        if within(local_distances.get(k - 1).copied(), self.max_kth_distance)
            || within(nearest_anchor, self.max_anchor_distance)
        {
            Decision::Local
        } else {
            Decision::AskCloud
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kth_distance_decides() {
        let rule = ConfidenceRule::kth(0.3);
        assert_eq!(rule.decide(&[0.1, 0.2, 0.3], 3, None), Decision::Local);
        assert_eq!(rule.decide(&[0.1, 0.2, 0.31], 3, None), Decision::AskCloud);
        assert_eq!(
            rule.decide(&[0.1, 0.2], 3, Some(0.0)),
            Decision::AskCloud,
            "too few local hits"
        );
        assert_eq!(rule.decide(&[], 1, None), Decision::AskCloud);
        assert_eq!(
            ConfidenceRule::kth(f32::NAN).decide(&[0.9], 1, None),
            Decision::AskCloud,
            "a NaN threshold never certifies"
        );
    }

    #[test]
    fn a_near_anchor_is_enough_and_either_signal_suffices() {
        let anchor = ConfidenceRule {
            max_kth_distance: None,
            max_anchor_distance: Some(0.1),
        };
        assert_eq!(anchor.decide(&[0.5, 0.6], 2, Some(0.05)), Decision::Local);
        assert_eq!(anchor.decide(&[0.5, 0.6], 2, Some(0.2)), Decision::AskCloud);
        assert_eq!(anchor.decide(&[0.1, 0.1], 2, None), Decision::AskCloud);
        let both = ConfidenceRule {
            max_kth_distance: Some(0.3),
            ..anchor
        };
        assert_eq!(both.decide(&[0.1, 0.2], 2, None), Decision::Local);
        assert_eq!(both.decide(&[0.5, 0.6], 2, Some(0.01)), Decision::Local);
        assert_eq!(both.decide(&[0.5, 0.6], 2, Some(0.5)), Decision::AskCloud);
        assert_eq!(
            ConfidenceRule::default().decide(&[0.0], 1, Some(0.0)),
            Decision::AskCloud
        );
    }
}
