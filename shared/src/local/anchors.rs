//! The held anchors and the nearest-anchor scan: exact, prefiltered with `i8` codes under a
//! Cauchy–Schwarz error bound so that exact distances are computed only where the bound leaves
//! a chance (the same anchor and distance bits as a full scan; proptests below hold it to that).

use std::collections::HashMap;

use crate::kernels;
use crate::metric::Metric;
use crate::quant;

/// The held anchors (from the snapshot and from deltas), their points stored contiguously for
/// the nearest-anchor scan, with their certificate radii (0: none), and their `i8` codes for
/// that scan's prefilter ([`Anchors::nearest`]).
#[derive(Clone, Debug, Default)]
pub(super) struct Anchors {
    pub(super) ids: Vec<u64>,
    pub(super) vectors: Vec<f32>,
    pub(super) radii: Vec<f32>,
    pub(super) slot: HashMap<u64, usize>,
    codes: Vec<i8>,
    coded: Vec<Coded>,
}

/// A vector's `i8` codes under one scale ([`quant::encode_uniform`]) and what bounds the error
/// of an inner product taken on them: `‖x‖` and the residual `‖x − scale · codes‖`.
#[derive(Clone, Copy, Debug, Default)]
struct Coded {
    scale: f32,
    norm: f32,
    residual: f32,
}

impl Coded {
    /// Appends the codes of `vector` to `codes`. The norms are summed in `f64`, where the squares
    /// of `f32` values neither overflow nor underflow, and rounded up to `f32` (infinite if too
    /// large): upper bounds, as the error bound needs.
    fn encode(vector: &[f32], codes: &mut Vec<i8>) -> Coded {
        let start = codes.len();
        let scale = quant::encode_uniform(vector, codes);
        let norm = |terms: &mut dyn Iterator<Item = f64>| {
            let wide = terms.map(|t| t * t).sum::<f64>().sqrt();
            let narrow = wide as f32;
            if f64::from(narrow) < wide {
                narrow.next_up()
            } else {
                narrow
            }
        };
        Coded {
            scale,
            norm: norm(&mut vector.iter().map(|&x| f64::from(x))),
            residual: norm(
                &mut vector
                    .iter()
                    .zip(&codes[start..])
                    .map(|(&x, &c)| f64::from(x) - f64::from(scale) * f64::from(c)),
            ),
        }
    }
}

/// Reusable buffers of [`Anchors::nearest`]: the query's codes and each anchor's lower bound.
#[derive(Debug, Default)]
pub(super) struct NearestScratch {
    query_codes: Vec<i8>,
    lower: Vec<f32>,
}

/// Largest `‖q‖‖a‖` the prefilter bounds: beyond it the `f32` kernels may overflow, and such an
/// anchor is always kept for the exact pass.
const BOUNDED_PRODUCT: f32 = 1e30;

/// Fewer anchors than this are scanned exactly: below it the prefilter's pass costs more than
/// it saves.
const PREFILTER_FROM: usize = 64;

/// Relative margin on the prefilter's error bound, for the `f32` rounding of its own terms
/// (the norms are upper bounds already).
const BOUND_MARGIN: f32 = 1e-3;

impl Anchors {
    pub(super) fn upsert(&mut self, id: u64, vector: &[f32], radius: f32) {
        let dim = vector.len();
        match self.slot.get(&id) {
            Some(&slot) => {
                self.vectors[slot * dim..(slot + 1) * dim].copy_from_slice(vector);
                self.radii[slot] = radius;
                let mut codes = Vec::with_capacity(dim);
                self.coded[slot] = Coded::encode(vector, &mut codes);
                self.codes[slot * dim..(slot + 1) * dim].copy_from_slice(&codes);
            }
            None => {
                self.slot.insert(id, self.ids.len());
                self.ids.push(id);
                self.vectors.extend_from_slice(vector);
                self.radii.push(radius);
                self.coded.push(Coded::encode(vector, &mut self.codes));
            }
        }
    }

    pub(super) fn remove(&mut self, id: u64, dim: usize) {
        let Some(slot) = self.slot.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        self.ids.swap_remove(slot);
        self.radii.swap_remove(slot);
        self.coded.swap_remove(slot);
        if slot != last {
            self.vectors
                .copy_within(last * dim..(last + 1) * dim, slot * dim);
            self.codes
                .copy_within(last * dim..(last + 1) * dim, slot * dim);
            self.slot.insert(self.ids[slot], slot);
        }
        self.vectors.truncate(last * dim);
        self.codes.truncate(last * dim);
    }

    /// The nearest anchor to `query` (prepared for `metric`) and its distance: exactly what
    /// computing `metric.distance` to every anchor finds (the first of equals), with fewer
    /// exact distances.
    ///
    /// For cosine and dot, whose distances are `c − q·a`, a first pass bounds every anchor's
    /// inner product from `i8` codes: with `q̂`, `â` the quantised query and anchor,
    /// `q·a − q̂·â = (q − q̂)·a + q̂·(a − â)`, so by Cauchy–Schwarz it lies within
    /// `‖q − q̂‖‖a‖ + ‖q̂‖‖a − â‖`, widened for the rounding of the exact kernel (a sum of
    /// `n` products: at most `n · ε · ‖q‖‖a‖` off) and of the bound itself. Only anchors whose
    /// lower bound does not exceed the smallest upper bound can be nearest; the second pass
    /// computes their exact distances in slot order, as the full scan would.
    pub(super) fn nearest(
        &self,
        query: &[f32],
        metric: Metric,
        dim: usize,
        scratch: &mut NearestScratch,
    ) -> Option<(u64, f32)> {
        let exact = |slot: usize| {
            let distance = metric.distance(query, &self.vectors[slot * dim..(slot + 1) * dim]);
            (self.ids[slot], distance)
        };
        let first_nearest = |slots: &mut dyn Iterator<Item = usize>| {
            slots.map(exact).min_by(|a, b| a.1.total_cmp(&b.1))
        };
        let offset = match metric {
            Metric::Cosine => 1.0,
            Metric::Dot => 0.0,
            Metric::L2 => return first_nearest(&mut (0..self.ids.len())),
        };
        if self.ids.len() < PREFILTER_FROM {
            return first_nearest(&mut (0..self.ids.len()));
        }
        let NearestScratch { query_codes, lower } = scratch;
        query_codes.clear();
        lower.clear();
        let q = Coded::encode(query, query_codes);
        // ‖q̂‖ ≤ ‖q‖ + ‖q − q̂‖: no need to compute it.
        let quantised_norm = q.norm + q.residual;
        let rounding = 2.0 * (dim as f32 + 4.0) * f32::EPSILON;
        let mut least_upper = f32::INFINITY;
        for (slot, a) in self.coded.iter().enumerate() {
            let codes = &self.codes[slot * dim..(slot + 1) * dim];
            let approximate = q.scale * a.scale * kernels::dot_i8(query_codes, codes) as f32;
            let error = (q.residual * a.norm + quantised_norm * a.residual) * (1.0 + BOUND_MARGIN)
                + rounding * (1.0 + q.norm * a.norm);
            // Written so that a NaN (an infinite norm times a zero one) also lands here.
            let bounded = q.norm * a.norm <= BOUNDED_PRODUCT && approximate.is_finite();
            if bounded && error.is_finite() {
                lower.push(offset - (approximate + error));
                least_upper = least_upper.min(offset - (approximate - error));
            } else {
                lower.push(f32::NEG_INFINITY);
            }
        }
        first_nearest(
            &mut lower
                .iter()
                .enumerate()
                .filter(|(_, l)| **l <= least_upper)
                .map(|(slot, _)| slot),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic values in `-1..1` from `state`.
    fn noise(state: &mut u64) -> f32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    proptest! {
        /// The prefiltered scan finds exactly what the full scan finds — the same anchor (the
        /// first of equals) and the same distance bits — for anchors in tight clusters (near
        /// ties), exact duplicates under other ids (ties), after removals, for every metric.
        #[test]
        fn nearest_anchor_equals_the_full_scan(
            seed in 1u64..u64::MAX,
            n in PREFILTER_FROM..PREFILTER_FROM + 100,
            clusters in 1usize..4,
            spread in prop::sample::select(vec![1e-5f32, 1e-3, 3e-2, 0.5]),
            dim in prop::sample::select(vec![8usize, 48, 384]),
        ) {
            let mut state = seed;
            let centres: Vec<Vec<f32>> = (0..clusters)
                .map(|_| (0..dim).map(|_| noise(&mut state)).collect())
                .collect();
            let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(n);
            for i in 0..n {
                let v = if i % 7 == 6 {
                    vectors[i - 1].clone()
                } else {
                    centres[i % clusters].iter().map(|c| c + spread * noise(&mut state)).collect()
                };
                vectors.push(v);
            }
            let query: Vec<f32> =
                centres[0].iter().map(|c| c + spread * noise(&mut state)).collect();
            for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
                let mut query = query.clone();
                metric.prepare(&mut query);
                let mut anchors = Anchors::default();
                for (i, v) in vectors.iter().enumerate() {
                    let mut v = v.clone();
                    metric.prepare(&mut v);
                    anchors.upsert(1_000 + i as u64, &v, 0.0);
                }
                for removed in [1_003u64, 1_000 + n as u64 - 1] {
                    anchors.remove(removed, dim);
                }
                prop_assert_eq!(
                    bits(anchors.nearest(&query, metric, dim, &mut NearestScratch::default())),
                    bits(full_scan(&anchors, &query, metric, dim)),
                    "{:?}", metric
                );
            }
        }

        /// The same at magnitudes where the bound's own arithmetic overflows or underflows
        /// (zero vectors, components of 1e±20 against queries of 1e±20, dot products that
        /// overflow to infinity), and after ids are upserted again with new vectors.
        #[test]
        fn nearest_anchor_equals_the_full_scan_at_extreme_magnitudes(
            seed in 1u64..u64::MAX,
            n in PREFILTER_FROM..PREFILTER_FROM + 40,
            query_magnitude in prop::sample::select(vec![1e-20f32, 1.0, 1e20]),
        ) {
            const DIM: usize = 48;
            let magnitudes = [0.0f32, 1e-20, 1e-3, 1.0, 1e3, 1e20];
            let mut state = seed;
            let mut vector = |magnitude: f32| -> Vec<f32> {
                (0..DIM).map(|_| magnitude * noise(&mut state)).collect()
            };
            let query = vector(query_magnitude);
            for metric in [Metric::Cosine, Metric::Dot] {
                let mut query = query.clone();
                metric.prepare(&mut query);
                let mut anchors = Anchors::default();
                for i in 0..n {
                    let mut v = vector(magnitudes[i % magnitudes.len()]);
                    metric.prepare(&mut v);
                    anchors.upsert(i as u64, &v, 0.0);
                }
                for i in (0..n).step_by(5) {
                    let mut v = vector(magnitudes[(i + 3) % magnitudes.len()]);
                    metric.prepare(&mut v);
                    anchors.upsert(i as u64, &v, 0.0);
                }
                prop_assert_eq!(
                    bits(anchors.nearest(&query, metric, DIM, &mut NearestScratch::default())),
                    bits(full_scan(&anchors, &query, metric, DIM)),
                    "{:?}", metric
                );
            }
        }
    }

    #[test]
    fn nearest_anchor_survives_bound_terms_that_overflow() {
        const DIM: usize = 8;
        let ordinary = |i: usize| -> Vec<f32> {
            (0..DIM)
                .map(|d| ((i * 7 + d * 3) % 11) as f32 / 11.0 - 0.5)
                .collect()
        };
        let axis = |x: f32| -> Vec<f32> {
            let mut v = vec![0.0; DIM];
            v[0] = x;
            v
        };
        // An exactly coded query (no residual) against an anchor whose squared norm
        // overflows `f32`; and a query whose norm overflows against a zero anchor, the
        // nearest under `dot` when every other anchor points away.
        let cases = [
            (axis(127.0), axis(1e20), 1.0f32),
            (axis(-3e38), vec![0.0; DIM], 1.0),
        ];
        for (query, special, sign) in cases {
            let mut anchors = Anchors::default();
            for i in 0..PREFILTER_FROM + 10 {
                let v: Vec<f32> = ordinary(i).iter().map(|x| sign * x.abs()).collect();
                anchors.upsert(i as u64, &v, 0.0);
            }
            anchors.upsert(999, &special, 0.0);
            let full = full_scan(&anchors, &query, Metric::Dot, DIM);
            assert_eq!(
                full.map(|(id, _)| id),
                Some(999),
                "the case is set up wrong"
            );
            assert_eq!(
                bits(anchors.nearest(&query, Metric::Dot, DIM, &mut NearestScratch::default())),
                bits(full)
            );
        }
    }

    /// The nearest anchor as a scan of every anchor finds it: the first of equals.
    fn full_scan(
        anchors: &Anchors,
        query: &[f32],
        metric: Metric,
        dim: usize,
    ) -> Option<(u64, f32)> {
        anchors
            .ids
            .iter()
            .zip(anchors.vectors.chunks_exact(dim))
            .map(|(&id, v)| (id, metric.distance(query, v)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// A nearest anchor with its distance as bits, so equal means bit for bit.
    fn bits(found: Option<(u64, f32)>) -> Option<(u64, u32)> {
        found.map(|(id, d)| (id, d.to_bits()))
    }
}
