//! The canonical accumulation order every vectorised kernel adds in (see the module above).

/// Number of partial sums in the canonical accumulation order.
pub const LANES: usize = 32;

/// Reduces 32 partial sums by the canonical tree: lanes `l`, `l+8`, `l+16`, `l+24` pairwise,
/// then 8 → 4 → 2 → 1 by halves. The AVX2 kernel performs exactly these additions in registers.
#[inline]
pub(crate) fn reduce32(acc: &[f32; LANES]) -> f32 {
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}
