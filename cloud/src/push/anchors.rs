//! The anchor table of one (edge, collection): past fallback queries, merged when they are
//! paraphrases of one another, counted by a decaying Space-Saving table. An anchor that becomes
//! hot is pushed with the vectors around it.

use std::collections::HashMap;

use tiervec_shared::Metric;
use tiervec_shared::hot::HotTracker;
use tiervec_shared::push::anchor_id;

use super::config::PushConfig;

/// A tracked anchor.
pub(super) struct AnchorEntry {
    pub(super) vector: Vec<f32>,
    /// Whether it has become hot.
    hot: bool,
    /// When it was last asked (Unix µs): the push delay is measured from the ask that made
    /// it hot, or — for one that waited for room — from its latest ask.
    pub(super) asked_unix_us: u64,
}

/// One (edge, collection)'s anchors: a decaying Space-Saving table over anchor ids (memory
/// bounded by its capacity, whatever the corpus), and the points of the tracked ones.
pub(super) struct AnchorTable {
    tracker: HotTracker,
    pub(super) entries: HashMap<u64, AnchorEntry>,
}

impl AnchorTable {
    /// An empty table tracking up to `capacity` anchors whose counts halve every
    /// `half_life_us`.
    pub(super) fn new(capacity: usize, half_life_us: u64, now_us: u64) -> AnchorTable {
        AnchorTable {
            tracker: HotTracker::new(capacity, half_life_us, now_us),
            entries: HashMap::new(),
        }
    }

    /// Counts a fallback query (prepared for the metric) asked at `now_us` (the table's clock)
    /// and `asked_unix_us` (wall clock, for push delays) toward its anchor; returns whether
    /// that anchor just became hot.
    pub(super) fn record(
        &mut self,
        query: &[f32],
        metric: Metric,
        config: &PushConfig,
        now_us: u64,
        asked_unix_us: u64,
    ) -> bool {
        let nearest = self
            .entries
            .iter()
            .map(|(id, e)| (*id, metric.distance(query, &e.vector)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, d)| *d <= config.anchor_merge_distance);
        let id = match nearest {
            Some((id, _)) => id,
            None => {
                let id = anchor_id(query);
                self.entries.insert(
                    id,
                    AnchorEntry {
                        vector: query.to_vec(),
                        hot: false,
                        asked_unix_us: 0,
                    },
                );
                id
            }
        };
        self.tracker.record(id, 1.0, now_us);
        // Entries follow the table: ids it evicted are forgotten (in batches, not per record).
        if self.entries.len() > 2 * self.tracker.capacity() {
            let tracker = &self.tracker;
            self.entries
                .retain(|id, _| tracker.estimate(*id, now_us).is_some());
        }
        let hot = self
            .tracker
            .estimate(id, now_us)
            // Decay makes two asks a second apart count 1.998: a count is compared rounded
            // to the nearest whole ask.
            .is_some_and(|e| e.count + 0.5 >= config.anchor_hot_count);
        match self.entries.get_mut(&id) {
            Some(e) => {
                e.asked_unix_us = asked_unix_us;
                let became_hot = hot && !e.hot;
                e.hot |= hot;
                became_hot
            }
            None => false,
        }
    }

    /// Hot anchors, hottest first, with their counts. An anchor becomes hot when its count
    /// reaches `anchor_hot_count` and stays hot until it decays below half of that
    /// (hysteresis: a count sitting at the threshold neither flaps nor decays out of it in
    /// the moment after it was reached).
    pub(super) fn hot(&self, config: &PushConfig, now_us: u64) -> Vec<(u64, f64)> {
        let mut hot: Vec<(u64, f64)> = self
            .tracker
            .above(config.anchor_hot_count / 2.0, now_us)
            .into_iter()
            .filter(|e| self.entries.get(&e.id).is_some_and(|a| a.hot))
            .map(|e| (e.id, e.count))
            .collect();
        hot.sort_by(|a, b| b.1.total_cmp(&a.1));
        hot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paraphrases_merge_into_one_anchor_and_cross_the_threshold_once() {
        let config = PushConfig {
            anchor_merge_distance: 0.05,
            anchor_hot_count: 2.0,
            ..PushConfig::default()
        };
        let mut t = AnchorTable::new(16, 1_000_000_000, 0);
        let a = [1.0, 0.0];
        let near = {
            let mut v = [0.999, 0.04];
            tiervec_shared::metric::normalise(&mut v);
            v
        };
        assert!(!t.record(&a, Metric::Cosine, &config, 1, 0));
        assert!(
            t.record(&near, Metric::Cosine, &config, 2, 0),
            "second ask: hot"
        );
        assert!(!t.record(&a, Metric::Cosine, &config, 3, 0), "hot once");
        assert_eq!(t.entries.len(), 1);
        assert!(!t.record(&[0.0, 1.0], Metric::Cosine, &config, 4, 0));
        assert_eq!(t.entries.len(), 2, "a far query starts its own anchor");
        assert_eq!(t.hot(&config, 5).len(), 1);
    }
}
