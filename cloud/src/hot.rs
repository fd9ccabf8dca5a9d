//! What edges keep asking the cloud for: heavy-hitter tables (`tiervec_shared::hot`) over the
//! point ids in the cloud's QUIC answers, one per (edge, collection) and one per collection
//! across edges. Tables are keyed by the collection's identity, not its name, so a collection
//! dropped and created again under the same name starts cold. Only queries whose handshake is confirmed feed them (a replayed 0-RTT query
//! never does) and shadow queries never do; memory is bounded by the table capacity times the
//! number of (edge, collection) pairs the access list allows, whatever the corpus size.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tiervec_shared::hot::{Estimate, HotTracker};

/// Sizing of the tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotConfig {
    /// Ids tracked per (edge, collection); an id with more than `1 / capacity` of that edge's
    /// decayed traffic is always tracked.
    pub per_edge_capacity: usize,
    /// Ids tracked per collection across all edges.
    pub global_capacity: usize,
    /// Counts halve every this many seconds.
    pub half_life_secs: u64,
}

impl Default for HotConfig {
    fn default() -> Self {
        HotConfig {
            per_edge_capacity: 4_096,
            global_capacity: 16_384,
            half_life_secs: 600,
        }
    }
}

/// The cloud's hotness tables.
pub struct HotIds {
    config: HotConfig,
    started: Instant,
    per_edge: Mutex<HashMap<(String, [u8; 16]), HotTracker>>,
    global: Mutex<HashMap<[u8; 16], HotTracker>>,
}

impl HotIds {
    pub fn new(config: HotConfig) -> HotIds {
        HotIds {
            config,
            started: Instant::now(),
            per_edge: Mutex::new(HashMap::new()),
            global: Mutex::new(HashMap::new()),
        }
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// The configured half-life, in µs (anchor tables decay alike).
    pub fn half_life_us(&self) -> u64 {
        self.config.half_life_secs.saturating_mul(1_000_000)
    }

    /// Counts one answer: each of its ids once, for `edge` and for the collection.
    pub fn record(&self, edge: &str, collection: [u8; 16], ids: &[u64]) {
        let now = self.now_us();
        let half_life = self.half_life_us();
        {
            let mut per_edge = self.per_edge.lock();
            let table = per_edge
                .entry((edge.to_owned(), collection))
                .or_insert_with(|| HotTracker::new(self.config.per_edge_capacity, half_life, now));
            for &id in ids {
                table.record(id, 1.0, now);
            }
        }
        let mut global = self.global.lock();
        let table = global
            .entry(collection)
            .or_insert_with(|| HotTracker::new(self.config.global_capacity, half_life, now));
        for &id in ids {
            table.record(id, 1.0, now);
        }
    }

    /// The `n` hottest ids of `collection`, for `edge` or across edges, with the total decayed
    /// weight of that table.
    pub fn top(&self, collection: [u8; 16], edge: Option<&str>, n: usize) -> (f64, Vec<Estimate>) {
        let now = self.now_us();
        let read = |t: &HotTracker| (t.total(now), t.top(n, now));
        match edge {
            Some(edge) => self
                .per_edge
                .lock()
                .get(&(edge.to_owned(), collection))
                .map_or((0.0, Vec::new()), read),
            None => self
                .global
                .lock()
                .get(&collection)
                .map_or((0.0, Vec::new()), read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_per_edge_and_per_collection_identity() {
        let hot = HotIds::new(HotConfig::default());
        let (old, new) = ([1; 16], [2; 16]);
        hot.record("edge-1", old, &[5, 6]);
        hot.record("edge-2", old, &[6]);
        let ids = |(_, top): (f64, Vec<Estimate>)| top.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(hot.top(old, Some("edge-1"), 10)).len(), 2);
        assert_eq!(ids(hot.top(old, Some("edge-2"), 10)), vec![6]);
        assert_eq!(
            ids(hot.top(old, None, 1)),
            vec![6],
            "6 was asked by both edges"
        );
        assert!(
            ids(hot.top(new, None, 10)).is_empty(),
            "a recreated collection starts cold"
        );
    }
}
