//! Bounded-memory, decaying heavy-hitter estimates: which ids are asked for most, lately.
//!
//! **Space-Saving** (Metwally, Agrawal, El Abbadi 2005) over **forward-decayed** weights
//! (Cormode, Shkapenyuk, Srivastava, Xu 2009). An event at time `t` weighs
//! `2^((t − landmark) / half_life)`, so every count decays by half per half-life relative to
//! newer events, and comparing two counts needs no per-item clock. The table keeps at most
//! `capacity` ids; an id that is not tracked replaces the one with the smallest count and
//! inherits that count as its error.
//!
//! Guarantees, with `W` the total decayed weight recorded so far (all at the same time scale):
//! - for every tracked id, `count − error ≤ true decayed count ≤ count`;
//! - an untracked id's true decayed count is at most the smallest tracked count, which is at
//!   most `W / capacity`;
//! - so every id whose decayed share of the traffic exceeds `1 / capacity` is tracked.
//!
//! Memory is `O(capacity)` whatever the corpus size. Time comes in as an argument (microseconds
//! on any monotonic clock), as everywhere in `shared`.

use std::collections::{BTreeSet, HashMap};

/// Renormalise once the landmark weight passes `2^RESCALE_EXPONENT`, long before `f64` runs out.
const RESCALE_EXPONENT: f64 = 256.0;

#[derive(Clone, Copy, Debug)]
struct Entry {
    count: f64,
    error: f64,
}

/// One tracked id's estimate, in events as if all had happened at the time of the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub id: u64,
    /// Upper bound of the decayed count.
    pub count: f64,
    /// How much of `count` may come from ids evicted before this one was tracked.
    pub error: f64,
}

/// The heavy-hitter table.
#[derive(Clone, Debug)]
pub struct HotTracker {
    capacity: usize,
    half_life_us: f64,
    landmark_us: u64,
    entries: HashMap<u64, Entry>,
    /// `(count bits, id)`: positive finite `f64`s order like their bit patterns.
    by_count: BTreeSet<(u64, u64)>,
    total: f64,
}

impl HotTracker {
    /// A table of at most `capacity` ids whose counts halve every `half_life_us`.
    pub fn new(capacity: usize, half_life_us: u64, now_us: u64) -> HotTracker {
        HotTracker {
            capacity: capacity.max(1),
            half_life_us: half_life_us.max(1) as f64,
            landmark_us: now_us,
            entries: HashMap::with_capacity(capacity.max(1)),
            by_count: BTreeSet::new(),
            total: 0.0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn exponent(&self, now_us: u64) -> f64 {
        now_us.saturating_sub(self.landmark_us) as f64 / self.half_life_us
    }

    /// Moves the landmark to `now_us`, dividing every count by the weight that time had.
    fn rescale(&mut self, now_us: u64) {
        let factor = (-self.exponent(now_us)).exp2();
        self.landmark_us = now_us;
        self.total *= factor;
        self.by_count.clear();
        for (id, e) in &mut self.entries {
            e.count *= factor;
            e.error *= factor;
            self.by_count.insert((e.count.to_bits(), *id));
        }
    }

    /// Records `weight` events of `id` at `now_us` (times must not go backwards by more than
    /// rounding; an earlier time simply weighs less).
    pub fn record(&mut self, id: u64, weight: f64, now_us: u64) {
        if !(weight.is_finite() && weight > 0.0) {
            return;
        }
        if self.exponent(now_us) > RESCALE_EXPONENT {
            self.rescale(now_us);
        }
        let w = weight * self.exponent(now_us).exp2();
        self.total += w;
        if let Some(e) = self.entries.get_mut(&id) {
            self.by_count.remove(&(e.count.to_bits(), id));
            e.count += w;
            self.by_count.insert((e.count.to_bits(), id));
            return;
        }
        let entry = if self.entries.len() < self.capacity {
            Entry {
                count: w,
                error: 0.0,
            }
        } else {
            let (bits, evicted) = self
                .by_count
                .pop_first()
                .expect("a full table has a smallest entry");
            self.entries.remove(&evicted);
            let floor = f64::from_bits(bits);
            Entry {
                count: floor + w,
                error: floor,
            }
        };
        self.by_count.insert((entry.count.to_bits(), id));
        self.entries.insert(id, entry);
    }

    fn scale_to(&self, now_us: u64) -> f64 {
        (-self.exponent(now_us)).exp2()
    }

    /// The estimate of `id` as of `now_us`, if tracked.
    pub fn estimate(&self, id: u64, now_us: u64) -> Option<Estimate> {
        let s = self.scale_to(now_us);
        self.entries.get(&id).map(|e| Estimate {
            id,
            count: e.count * s,
            error: e.error * s,
        })
    }

    /// The total decayed weight recorded, as of `now_us`.
    pub fn total(&self, now_us: u64) -> f64 {
        self.total * self.scale_to(now_us)
    }

    /// The `n` ids with the largest counts, largest first (ties by id).
    pub fn top(&self, n: usize, now_us: u64) -> Vec<Estimate> {
        let s = self.scale_to(now_us);
        self.by_count
            .iter()
            .rev()
            .take(n)
            .map(|&(bits, id)| {
                let e = self.entries[&id];
                Estimate {
                    id,
                    count: f64::from_bits(bits) * s,
                    error: e.error * s,
                }
            })
            .collect()
    }

    /// The ids whose guaranteed count (`count − error`) is at least `threshold`, as of `now_us`.
    pub fn above(&self, threshold: f64, now_us: u64) -> Vec<Estimate> {
        let s = self.scale_to(now_us);
        let mut out: Vec<Estimate> = self
            .entries
            .iter()
            .filter(|(_, e)| (e.count - e.error) * s >= threshold)
            .map(|(&id, e)| Estimate {
                id,
                count: e.count * s,
                error: e.error * s,
            })
            .collect();
        out.sort_by(|a, b| b.count.total_cmp(&a.count).then(a.id.cmp(&b.id)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR_US: u64 = 3_600_000_000;

    #[test]
    fn counts_halve_every_half_life() {
        let mut t = HotTracker::new(4, 1_000, 0);
        t.record(7, 8.0, 0);
        assert!((t.estimate(7, 1_000).unwrap().count - 4.0).abs() < 1e-9);
        assert!((t.estimate(7, 3_000).unwrap().count - 1.0).abs() < 1e-9);
        t.record(7, 1.0, 3_000);
        assert!((t.estimate(7, 3_000).unwrap().count - 2.0).abs() < 1e-9);
        assert!((t.total(3_000) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn recent_ids_overtake_old_ones_and_ties_are_ordered() {
        let mut t = HotTracker::new(8, 1_000, 0);
        for _ in 0..10 {
            t.record(1, 1.0, 0);
        }
        for _ in 0..3 {
            t.record(2, 1.0, 5_000);
        }
        let top = t.top(2, 5_000);
        assert_eq!(top[0].id, 2, "{top:?}");
        assert_eq!(top[1].id, 1);
    }

    #[test]
    fn rescaling_keeps_estimates_over_long_runs() {
        let mut t = HotTracker::new(4, 1_000_000, 0);
        let mut now = 0;
        for step in 0..2_000u64 {
            now = step * HOUR_US / 10;
            t.record(step % 3, 1.0, now);
        }
        let e = t.estimate(0, now).unwrap();
        assert!(
            e.count.is_finite() && e.count > 0.0 && e.count < 10.0,
            "{e:?}"
        );
    }

    #[test]
    fn bad_weights_are_ignored() {
        let mut t = HotTracker::new(2, 10, 0);
        for w in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            t.record(1, w, 0);
        }
        assert!(t.is_empty());
    }

    proptest! {
        /// Space-Saving's bounds hold under decay: every tracked id's interval contains its
        /// true decayed count, untracked ids are below the floor, and every id above
        /// `W / capacity` is tracked.
        #[test]
        fn bounds_hold(
            events in proptest::collection::vec((0u64..40, 0u64..50), 1..600),
            capacity in 1usize..12,
        ) {
            let half_life = 20u64;
            let mut t = HotTracker::new(capacity, half_life, 0);
            let mut truth: HashMap<u64, f64> = HashMap::new();
            let mut now = 0u64;
            for (id, dt) in &events {
                now += dt;
                t.record(*id, 1.0, now);
                *truth.entry(*id).or_default() += (now as f64 / half_life as f64).exp2();
            }
            let scale = (-(now as f64) / half_life as f64).exp2();
            let total: f64 = truth.values().sum::<f64>() * scale;
            let floor = t.top(usize::MAX, now).last().map_or(0.0, |e| e.count);
            prop_assert!(t.len() <= capacity);
            let slack = 1e-9 * total.max(1.0);
            for (id, raw) in &truth {
                let true_count = raw * scale;
                match t.estimate(*id, now) {
                    Some(e) => {
                        prop_assert!(e.count + slack >= true_count, "{e:?} < {true_count}");
                        prop_assert!(e.count - e.error <= true_count + slack, "{e:?} vs {true_count}");
                    }
                    None => {
                        prop_assert!(true_count <= floor + slack, "{id}: {true_count} > floor {floor}");
                        prop_assert!(true_count <= total / capacity as f64 + slack);
                    }
                }
            }
        }
    }
}
