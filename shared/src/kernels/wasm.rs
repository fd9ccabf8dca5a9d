//! wasm32 `simd128` kernels, in the canonical accumulation order: eight 4-lane accumulators
//! (element `i` into lane `i mod 32`), then [`reduce32`]. simd128 has no fused multiply-add,
//! so these return exactly the bits of the portable kernels; what they add is the
//! vectorisation LLVM's cost model declines for the `i8` product (widening multiplies) and does
//! not always find for the `f32` lanes.

use core::arch::wasm32::{
    f32x4_add, f32x4_mul, f32x4_splat, f32x4_sub, i16x8_extmul_high_i8x16, i16x8_extmul_low_i8x16,
    i32x4_add, i32x4_extadd_pairwise_i16x8, i32x4_extract_lane, i32x4_splat, v128, v128_load,
};

use super::{LANES, reduce32};

#[inline(always)]
fn canonical_sum(
    a: &[f32],
    b: &[f32],
    term: impl Fn(v128, v128) -> v128,
    scalar: impl Fn(f32, f32) -> f32,
) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [f32x4_splat(0.0); LANES / 4];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for (g, group) in acc.iter_mut().enumerate() {
            // SAFETY: `x` and `y` hold LANES elements, so lanes 4g..4g+4 are in bounds; v128
            // loads have no alignment requirement.
            let (xs, ys) = unsafe {
                (
                    v128_load(x.as_ptr().add(4 * g).cast()),
                    v128_load(y.as_ptr().add(4 * g).cast()),
                )
            };
            *group = f32x4_add(*group, term(xs, ys));
        }
    }
    let mut lanes = [0.0f32; LANES];
    for (g, group) in acc.iter().enumerate() {
        // SAFETY: a v128 is 16 bytes, the size of four f32 lanes.
        let four: [f32; 4] = unsafe { core::mem::transmute::<v128, [f32; 4]>(*group) };
        lanes[4 * g..4 * g + 4].copy_from_slice(&four);
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        lanes[l] += scalar(*x, *y);
    }
    reduce32(&lanes)
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    canonical_sum(a, b, |x, y| f32x4_mul(x, y), |x, y| x * y)
}

#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    canonical_sum(
        a,
        b,
        |x, y| {
            let d = f32x4_sub(x, y);
            f32x4_mul(d, d)
        },
        |x, y| (x - y) * (x - y),
    )
}

/// Exact: products of codes in `-127..=127` fit an `i16`, pairs of them an `i32`.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = i32x4_splat(0);
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        // SAFETY: both chunks hold 16 bytes; v128 loads have no alignment requirement.
        let (xs, ys) = unsafe { (v128_load(x.as_ptr().cast()), v128_load(y.as_ptr().cast())) };
        acc = i32x4_add(
            acc,
            i32x4_extadd_pairwise_i16x8(i16x8_extmul_low_i8x16(xs, ys)),
        );
        acc = i32x4_add(
            acc,
            i32x4_extadd_pairwise_i16x8(i16x8_extmul_high_i8x16(xs, ys)),
        );
    }
    let mut sum = i32x4_extract_lane::<0>(acc)
        + i32x4_extract_lane::<1>(acc)
        + i32x4_extract_lane::<2>(acc)
        + i32x4_extract_lane::<3>(acc);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        sum += i32::from(*x) * i32::from(*y);
    }
    sum
}
