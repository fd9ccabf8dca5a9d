//! Scalar quantisation to `i8` for graph traversal (search re-ranks with exact `f32`).
//!
//! Each dimension `i` has a scale `s_i = max |x_i| / 127` over the quantised vectors, and a
//! vector is stored as codes `c_i = round(x_i / s_i)` in `-127..=127`. A query `q` is folded
//! with the scales, `q'_i = q_i · s_i`, and quantised with one scale `t = max |q'_i| / 127` to
//! codes `d_i`, so `dot(q, x) ≈ t · Σ d_i c_i`: an exact integer dot product of two `i8` rows.
//! Integer sums do not depend on accumulation order, so native and WASM traversals agree bit
//! for bit; the row shrinks four-fold, which is what makes traversal fast once the vectors no
//! longer fit in L2.

use crate::kernels;

/// Largest code magnitude. `-128` is never produced: the AVX2 kernel takes absolute values.
pub const CODE_MAX: f32 = 127.0;

/// Per-dimension scales that make every component of `vectors` fit in `-127..=127`.
pub fn train(vectors: &[f32], dim: usize) -> Vec<f32> {
    let mut max = vec![0.0f32; dim];
    for row in vectors.chunks_exact(dim) {
        for (m, x) in max.iter_mut().zip(row) {
            *m = m.max(x.abs());
        }
    }
    max.iter()
        .map(|&m| if m > 0.0 { m / CODE_MAX } else { 1.0 })
        .collect()
}

/// Appends the codes of `vector` under `scales` to `out` (values outside the trained range clamp).
pub fn encode(vector: &[f32], scales: &[f32], out: &mut Vec<i8>) {
    out.extend(
        vector
            .iter()
            .zip(scales)
            .map(|(x, s)| (x / s).round().clamp(-CODE_MAX, CODE_MAX) as i8),
    );
}

/// Appends the codes of `vector` under one scale, `max |x| / 127`, to `out` and returns the
/// scale: for rows without trained per-dimension scales (the edge's anchors, and a query
/// compared with them).
pub fn encode_uniform(vector: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = vector.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / CODE_MAX } else { 1.0 };
    let inv = 1.0 / scale;
    out.extend(vector.iter().map(|x| round_code(x * inv)));
    scale
}

/// `x` rounded to the nearest integer, ties to even, and clamped to the code range. Adding
/// and subtracting 1.5 · 2²³ rounds in the FPU's default mode (exact for |x| ≤ 2²², and a
/// query's scaled components are at most [`CODE_MAX`] by construction): two additions, the same
/// in every build, where `f32::round` is a libm call natively and, 384 times per query, a
/// measurable share of the wasm guest's search.
#[inline]
fn round_code(x: f32) -> i8 {
    const SHIFT: f32 = 12_582_912.0;
    ((x + SHIFT) - SHIFT).clamp(-CODE_MAX, CODE_MAX) as i8
}

/// A query folded with the scales and quantised: `dot(q, x) ≈ scale · dot_i8(codes, x_codes)`.
#[derive(Clone, Debug, Default)]
pub struct QueryCodes {
    pub codes: Vec<i8>,
    pub scale: f32,
}

impl QueryCodes {
    /// Quantises `query` for rows encoded under `scales`, reusing this buffer.
    pub fn prepare(&mut self, query: &[f32], scales: &[f32]) {
        let max = query
            .iter()
            .zip(scales)
            .map(|(q, s)| (q * s).abs())
            .fold(0.0f32, f32::max);
        self.scale = if max > 0.0 { max / CODE_MAX } else { 1.0 };
        let inv = 1.0 / self.scale;
        self.codes.clear();
        self.codes.extend(
            query
                .iter()
                .zip(scales)
                .map(|(q, s)| round_code(q * s * inv)),
        );
    }

    /// Approximate `dot(query, x)` for the row with codes `row`.
    #[inline]
    pub fn dot(&self, row: &[i8]) -> f32 {
        self.scale * kernels::dot_i8(&self.codes, row) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn approximate_dot_is_close(rows in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 48), 1..20),
                                    q in proptest::collection::vec(-1.0f32..1.0, 48)) {
            let flat: Vec<f32> = rows.concat();
            let scales = train(&flat, 48);
            let mut qc = QueryCodes::default();
            qc.prepare(&q, &scales);
            for row in &rows {
                let mut codes = Vec::new();
                encode(row, &scales, &mut codes);
                prop_assert!(codes.iter().all(|&c| c != i8::MIN));
                let exact = kernels::reference::dot(&q, row);
                // Each of the 48 terms is off by at most half a step of either code.
                let bound = 48.0 * (0.5 / 127.0) * 2.0 + 1e-3;
                prop_assert!((qc.dot(&codes) as f64 - exact).abs() <= bound);
            }
        }
    }

    #[test]
    fn codes_round_half_to_even_and_clamp() {
        for x in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, 0.49999997, 126.5, 127.49, 200.0, -1e30, 1e30,
        ] {
            assert_eq!(
                round_code(x),
                x.round_ties_even().clamp(-CODE_MAX, CODE_MAX) as i8,
                "{x}"
            );
        }
        let mut x = -130.0f32;
        while x <= 130.0 {
            assert_eq!(
                round_code(x),
                x.round_ties_even().clamp(-CODE_MAX, CODE_MAX) as i8,
                "{x}"
            );
            x += 0.001953125;
        }
    }

    #[test]
    fn zero_query_and_zero_dimension_are_harmless() {
        let scales = train(&[0.0, 1.0, 0.0, -2.0], 2);
        assert_eq!(scales[0], 1.0);
        let mut qc = QueryCodes::default();
        qc.prepare(&[0.0, 0.0], &scales);
        assert_eq!(qc.dot(&[5, 5]), 0.0);
    }
}
