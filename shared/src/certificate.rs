//! Certificate geometry, shared by the cloud (which issues certificates) and the edge (which
//! checks them).
//!
//! An anchor `a` with radius ρ lists as members exactly the corpus ids whose
//! Euclidean distance to `a` is below ρ (the cloud computes them exactly). For a query `q` at
//! Euclidean distance δ from `a`, every non-member `x` has `|x − q| ≥ |x − a| − δ ≥ ρ − δ`
//! (triangle inequality). So if the `k` nearest members — all held, distances computed exactly
//! here — are all within `ρ − δ − slack`, no vector outside the cache can beat them: they are
//! the corpus's global top-k. The slack covers f32 rounding of the three distances (see
//! [`certificate_slack`]). Cosine and L2 only: for cosine the Euclidean distance is taken on
//! the normalised (prepared) vectors, ranking like the cosine distance; a dot-product "distance"
//! obeys no triangle inequality.

use crate::kernels;
use crate::metric::Metric;

/// The rounding allowance of a certificate check, in Euclidean distance units: each of the
/// three distances compared (ρ, δ and the k-th member's) is a square root of a sum of `dim`
/// non-negative f32 terms, whose relative error is below `(dim/2 + 2)·ε`; twice that, over
/// their sum, bounds the error of `kth ≤ ρ − δ`.
pub fn certificate_slack(dim: usize, radius: f32, delta: f32, kth: f32) -> f32 {
    (dim as f32 + 4.0) * f32::EPSILON * (radius + delta + kth)
}

/// Euclidean distance between two prepared vectors (certificates are Euclidean).
pub fn euclidean(a: &[f32], b: &[f32]) -> f32 {
    kernels::l2_squared(a, b).sqrt()
}

/// Whether certificates can be issued and checked for a metric.
pub const fn certifiable(metric: Metric) -> bool {
    matches!(metric, Metric::Cosine | Metric::L2)
}
