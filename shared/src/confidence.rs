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

use std::collections::VecDeque;

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

/// Learns the thresholds from shadow queries: a small fraction of local answers is also asked of
/// the cloud in the background, and the overlap of the two top-k is a sample of local recall.
/// Over a window of samples, a mean below `target` tightens every threshold of the rule by
/// `step` (fewer, surer local answers), a mean above `target + margin` loosens them by half a
/// step (more local answers); thresholds stay within `[min, max]`. Deterministic: the caller
/// passes each sample in.
#[derive(Clone, Debug)]
pub struct ThresholdTuner {
    pub target: f64,
    pub margin: f64,
    pub window: usize,
    pub step: f32,
    pub min: f32,
    pub max: f32,
    samples: VecDeque<f64>,
}

impl ThresholdTuner {
    pub fn new(target: f64) -> ThresholdTuner {
        ThresholdTuner {
            target,
            margin: 0.01,
            window: 50,
            step: 0.05,
            min: 0.0,
            max: 2.0,
            samples: VecDeque::new(),
        }
    }

    /// The mean of the current window, if it is full.
    pub fn estimate(&self) -> Option<f64> {
        (self.samples.len() >= self.window)
            .then(|| self.samples.iter().sum::<f64>() / self.samples.len() as f64)
    }

    /// Adds one sample (local top-k ∩ cloud top-k, over k); when the window is full, adjusts
    /// `rule` and starts a new window. Returns whether `rule` changed.
    pub fn record(&mut self, recall: f64, rule: &mut ConfidenceRule) -> bool {
        self.samples.push_back(recall.clamp(0.0, 1.0));
        let Some(mean) = self.estimate() else {
            return false;
        };
        self.samples.clear();
        let factor = if mean < self.target {
            1.0 - self.step
        } else if mean > self.target + self.margin {
            1.0 + self.step / 2.0
        } else {
            return false;
        };
        let (min, max) = (self.min, self.max);
        let scale = |t: &mut Option<f32>| {
            if let Some(v) = t {
                *v = (*v * factor).clamp(min, max);
            }
        };
        scale(&mut rule.max_kth_distance);
        scale(&mut rule.max_anchor_distance);
        true
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

    #[test]
    fn the_tuner_tightens_below_the_target_and_loosens_above_it() {
        let mut rule = ConfidenceRule {
            max_kth_distance: Some(0.4),
            max_anchor_distance: Some(0.2),
        };
        let mut tuner = ThresholdTuner {
            window: 4,
            ..ThresholdTuner::new(0.95)
        };
        for _ in 0..3 {
            assert!(!tuner.record(0.5, &mut rule), "window not full");
        }
        assert!(tuner.record(0.5, &mut rule));
        assert!((rule.max_anchor_distance.unwrap() - 0.19).abs() < 1e-6);
        assert!((rule.max_kth_distance.unwrap() - 0.38).abs() < 1e-6);
        for _ in 0..4 {
            tuner.record(1.0, &mut rule);
        }
        assert!((rule.max_anchor_distance.unwrap() - 0.19 * 1.025).abs() < 1e-6);
        let before = rule;
        for _ in 0..4 {
            tuner.record(0.955, &mut rule);
        }
        assert_eq!(rule, before, "inside the margin: no change");
        let mut kth_only = ConfidenceRule::kth(0.3);
        let mut tuner = ThresholdTuner {
            window: 1,
            min: 0.29,
            ..ThresholdTuner::new(0.95)
        };
        tuner.record(0.0, &mut kth_only);
        assert_eq!(
            kth_only,
            ConfidenceRule::kth(0.29),
            "clamped; an absent threshold stays absent"
        );
    }
}
