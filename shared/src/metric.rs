//! Distance semantics, defined once for the whole system.
//!
//! Every threshold, certificate radius, ground-truth file and search result in tiervec is a
//! *distance* in the sense of this module: smaller is nearer, and the value for a metric is
//!
//! | metric   | stored vectors            | distance(q, x)          | range for unit vectors |
//! |----------|---------------------------|-------------------------|------------------------|
//! | `cosine` | normalised to unit length | `1 − dot(q̂, x̂)`         | `[0, 2]`               |
//! | `l2`     | as given                  | `‖q − x‖²` (**squared**) | `[0, 4]`               |
//! | `dot`    | as given                  | `−dot(q, x)`            | `[−1, 1]`              |
//!
//! For `cosine` both the stored vectors (on write) and the query (on search) are normalised, so
//! the distance is a plain dot product at query time. The shipped dataset's ground truth is in
//! cosine distance, and for unit vectors `l2 = 2 × cosine`, so rankings agree across metrics.

use serde::{Deserialize, Serialize};

use crate::kernels;

/// The distance function of a collection or snapshot. See the module docs for the exact formulas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// `1 − dot` over unit vectors; vectors are normalised on write and queries on search.
    Cosine,
    /// Squared Euclidean distance (no square root: monotone, and cheaper).
    L2,
    /// Negated inner product, for vectors whose norm carries meaning.
    Dot,
}

impl Metric {
    /// The byte that encodes this metric in on-disk headers and frames.
    pub const fn code(self) -> u8 {
        match self {
            Metric::Cosine => 1,
            Metric::L2 => 2,
            Metric::Dot => 3,
        }
    }

    /// Inverse of [`Metric::code`]; `None` for an unknown byte.
    pub const fn from_code(code: u8) -> Option<Metric> {
        match code {
            1 => Some(Metric::Cosine),
            2 => Some(Metric::L2),
            3 => Some(Metric::Dot),
            _ => None,
        }
    }

    /// The metric's lower-case name, as used in configuration and the HTTP API.
    pub const fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
            Metric::Dot => "dot",
        }
    }

    /// Whether vectors are normalised to unit length before they are stored or searched.
    pub const fn normalises(self) -> bool {
        matches!(self, Metric::Cosine)
    }

    /// The distance between `a` and `b`, both already prepared with [`Metric::prepare`].
    #[inline]
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine => 1.0 - kernels::dot(a, b),
            Metric::L2 => kernels::l2_squared(a, b),
            Metric::Dot => -kernels::dot(a, b),
        }
    }

    /// Turns a raw vector into the form this metric stores and searches (normalised for
    /// cosine, unchanged otherwise). A zero vector under cosine stays zero: its distance to
    /// everything is then 1, which is the honest answer for "no direction".
    pub fn prepare(self, vector: &mut [f32]) {
        if self.normalises() {
            normalise(vector);
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cosine" => Ok(Metric::Cosine),
            "l2" => Ok(Metric::L2),
            "dot" => Ok(Metric::Dot),
            other => Err(format!(
                "unknown metric `{other}`: expected one of cosine, l2, dot"
            )),
        }
    }
}

/// Scales `vector` to unit Euclidean length in place; a zero vector is left as it is.
pub fn normalise(vector: &mut [f32]) {
    let norm = kernels::dot(vector, vector).sqrt();
    if norm > 0.0 {
        let inv = 1.0 / norm;
        vector.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_rejected() {
        for m in [Metric::Cosine, Metric::L2, Metric::Dot] {
            assert_eq!(Metric::from_code(m.code()), Some(m));
            assert_eq!(m.name().parse::<Metric>(), Ok(m));
        }
        assert_eq!(Metric::from_code(0), None);
        assert!("euclid".parse::<Metric>().is_err());
    }

    #[test]
    fn distances_follow_the_documented_formulas() {
        let mut a = vec![3.0, 4.0];
        let mut b = vec![4.0, 3.0];
        assert_eq!(Metric::L2.distance(&a, &b), 2.0);
        assert_eq!(Metric::Dot.distance(&a, &b), -24.0);
        Metric::Cosine.prepare(&mut a);
        Metric::Cosine.prepare(&mut b);
        assert!((Metric::Cosine.distance(&a, &b) - (1.0 - 24.0 / 25.0)).abs() < 1e-6);
        assert!(Metric::Cosine.distance(&a, &a).abs() < 1e-6);
    }

    #[test]
    fn zero_vector_stays_zero_under_cosine() {
        let mut z = vec![0.0; 4];
        Metric::Cosine.prepare(&mut z);
        assert_eq!(z, vec![0.0; 4]);
    }
}
