//! wasm32 `simd128` kernels, in the canonical accumulation order: eight 4-lane accumulators
//! (element `i` into lane `i mod 32`), then [`reduce32`]. simd128 has no fused multiply-add;
//! with relaxed-simd the `f32` kernels use `f32x4.relaxed_madd`, which the host fuses where it
//! can, so they return the AVX2 kernels' bits on an FMA host and the portable kernels' bits
//! elsewhere (without relaxed-simd, always the portable ones). What these add over the
//! portable code is the vectorisation LLVM's cost model declines for the `i8` product
//! (widening multiplies) and does not always find for the `f32` lanes.

#[cfg(not(target_feature = "relaxed-simd"))]
use core::arch::wasm32::{
    f32x4_add, f32x4_mul, i16x8_extend_high_i8x16, i16x8_extend_low_i8x16, i32x4_dot_i16x8,
};
#[cfg(target_feature = "relaxed-simd")]
use core::arch::wasm32::{
    f32x4_relaxed_madd, i8x16_max, i8x16_splat, i8x16_sub, i16x8_relaxed_dot_i8x16_i7x16,
    i16x8_sub, i32x4_extadd_pairwise_i16x8,
};
use core::arch::wasm32::{
    f32x4_splat, f32x4_sub, i32x4_add, i32x4_extract_lane, i32x4_splat, v128, v128_load,
};

use super::order::{LANES, reduce32};

/// Chunks of [`LANES`] elements per iteration of the main loop. Wasmtime checks its epoch (the
/// guest's deadline) at every loop header, and the check's slow path is a call that clobbers
/// every vector register, so Cranelift keeps loop-carried vectors (the eight accumulators) on
/// the stack across it: a longer body pays that store and reload once per four chunks
/// (384 dimensions: three iterations, not twelve).
const F32_BLOCK: usize = 4;

/// Stores `value` where nothing reads it. Cranelift places a pure instruction (an add, a
/// multiply) just before its first side-effecting use; the accumulators' only other use is the
/// loop's back edge, so without this every load of an iteration would come first and every
/// product last, more live vectors than x86 has registers, all spilled. A store per result
/// keeps each product next to its loads.
#[inline(always)]
fn pin(sink: &mut v128, value: v128) {
    // SAFETY: `sink` is a live local.
    unsafe { core::ptr::write_volatile(sink, value) };
}

/// Adds one chunk of [`LANES`] terms into the eight accumulators, in lane order.
#[inline(always)]
fn add_chunk(
    acc: &mut [v128; LANES / 4],
    sink: &mut v128,
    x: &[f32],
    y: &[f32],
    step: &impl Fn(v128, v128, v128) -> v128,
) {
    debug_assert!(x.len() >= LANES && y.len() >= LANES);
    for (g, group) in acc.iter_mut().enumerate() {
        // SAFETY: both slices hold at least LANES elements, so lanes 4g..4g+4 are in bounds;
        // v128 loads have no alignment requirement.
        let (xs, ys) = unsafe {
            (
                v128_load(x.as_ptr().add(4 * g).cast()),
                v128_load(y.as_ptr().add(4 * g).cast()),
            )
        };
        *group = step(*group, xs, ys);
        pin(sink, *group);
    }
}

#[inline(always)]
fn canonical_sum(
    a: &[f32],
    b: &[f32],
    step: impl Fn(v128, v128, v128) -> v128,
    scalar: impl Fn(f32, f32) -> f32,
) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [f32x4_splat(0.0); LANES / 4];
    let mut sink = f32x4_splat(0.0);
    let mut blocks_a = a.chunks_exact(LANES * F32_BLOCK);
    let mut blocks_b = b.chunks_exact(LANES * F32_BLOCK);
    for (x, y) in (&mut blocks_a).zip(&mut blocks_b) {
        for c in 0..F32_BLOCK {
            add_chunk(&mut acc, &mut sink, &x[c * LANES..], &y[c * LANES..], &step);
        }
    }
    let mut ca = blocks_a.remainder().chunks_exact(LANES);
    let mut cb = blocks_b.remainder().chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        add_chunk(&mut acc, &mut sink, x, y, &step);
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

#[inline(never)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    canonical_sum(a, b, |acc, x, y| madd(x, y, acc), |x, y| x * y)
}

#[inline(never)]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    canonical_sum(
        a,
        b,
        |acc, x, y| {
            let d = f32x4_sub(x, y);
            madd(d, d, acc)
        },
        |x, y| (x - y) * (x - y),
    )
}

/// `x · y + acc`. With relaxed-simd, `f32x4.relaxed_madd`: wasmtime lowers it to one FMA on a
/// host that has one (the guest then returns the AVX2 kernel's bits, and its re-rank costs half
/// the arithmetic: `bench wasm`, guest p50 about 2 % lower) and to a multiply and an add
/// elsewhere (the portable kernel's bits).
#[cfg(target_feature = "relaxed-simd")]
#[inline(always)]
fn madd(x: v128, y: v128, acc: v128) -> v128 {
    f32x4_relaxed_madd(x, y, acc)
}

#[cfg(not(target_feature = "relaxed-simd"))]
#[inline(always)]
fn madd(x: v128, y: v128, acc: v128) -> v128 {
    f32x4_add(acc, f32x4_mul(x, y))
}

/// Sums 64 products of `x[..64]` and `y[..64]` into `acc`'s four lanes.
#[inline(always)]
fn add64(acc: v128, sink: &mut v128, x: &[i8], y: &[i8]) -> v128 {
    debug_assert!(x.len() >= 64 && y.len() >= 64);
    // SAFETY: both slices hold at least 64 bytes; v128 loads have no alignment requirement.
    let [x0, x1, x2, x3, y0, y1, y2, y3] = unsafe {
        let (px, py) = (x.as_ptr(), y.as_ptr());
        [
            v128_load(px.cast()),
            v128_load(px.add(16).cast()),
            v128_load(px.add(32).cast()),
            v128_load(px.add(48).cast()),
            v128_load(py.cast()),
            v128_load(py.add(16).cast()),
            v128_load(py.add(32).cast()),
            v128_load(py.add(48).cast()),
        ]
    };
    let acc = dot16_add(
        x3,
        y3,
        dot16_add(x2, y2, dot16_add(x1, y1, dot16_add(x0, y0, acc))),
    );
    pin(sink, acc);
    acc
}

/// Exact: products of codes in `-127..=127` fit an `i16`, pairs of them an `i32`. 128 bytes
/// per iteration of the main loop, for the reason [`F32_BLOCK`] gives (384 dimensions: three
/// epoch checks, not six).
#[inline(never)]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = i32x4_splat(0);
    let mut sink = acc;
    let mut blocks_a = a.chunks_exact(128);
    let mut blocks_b = b.chunks_exact(128);
    for (x, y) in (&mut blocks_a).zip(&mut blocks_b) {
        acc = add64(add64(acc, &mut sink, x, y), &mut sink, &x[64..], &y[64..]);
    }
    let mut ca = blocks_a.remainder().chunks_exact(64);
    let mut cb = blocks_b.remainder().chunks_exact(64);
    for (x, y) in (&mut ca).zip(&mut cb) {
        acc = add64(acc, &mut sink, x, y);
    }
    let mut ra = ca.remainder().chunks_exact(16);
    let mut rb = cb.remainder().chunks_exact(16);
    for (x, y) in (&mut ra).zip(&mut rb) {
        // SAFETY: both chunks hold 16 bytes.
        let (xs, ys) = unsafe { (v128_load(x.as_ptr().cast()), v128_load(y.as_ptr().cast())) };
        acc = dot16_add(xs, ys, acc);
    }
    let mut sum = i32x4_extract_lane::<0>(acc)
        + i32x4_extract_lane::<1>(acc)
        + i32x4_extract_lane::<2>(acc)
        + i32x4_extract_lane::<3>(acc);
    for (x, y) in ra.remainder().iter().zip(rb.remainder()) {
        sum += i32::from(*x) * i32::from(*y);
    }
    sum
}

/// Sums of four adjacent products of 16 `i8` pairs, exactly.
///
/// With relaxed-simd: `x = x⁺ − x⁻` with `x⁺ = max(x, 0)` and `x⁻ = x⁺ − x`, both in
/// `0..=127` (7-bit operands), so `i16x8.relaxed_dot_i8x16_i7x16` of `y` against each is one
/// `pmaddubsw` on x86 (the AVX2 kernel's arithmetic). Each pair sum and their difference lie
/// within ±2 · 127 · 127 = ±32,258, so nothing saturates or wraps, and every lowering the
/// proposal allows gives the exact sum for operands in these ranges: the result equals the
/// portable kernel's on any host. (A sign mask `x < 0` instead would be turned by LLVM into an
/// `i8x16.shr_s`, which x86 has no instruction for.)
#[cfg(target_feature = "relaxed-simd")]
#[inline(always)]
fn dot16_add(x: v128, y: v128, acc: v128) -> v128 {
    let positive = i8x16_max(x, i8x16_splat(0));
    let negative = i8x16_sub(positive, x);
    let pairs = i16x8_sub(
        i16x8_relaxed_dot_i8x16_i7x16(y, positive),
        i16x8_relaxed_dot_i8x16_i7x16(y, negative),
    );
    i32x4_add(acc, i32x4_extadd_pairwise_i16x8(pairs))
}

/// Sums of four adjacent products of 16 `i8` pairs: sign-extend to `i16` and multiply-add
/// pairs (`pmaddwd` on x86).
#[cfg(not(target_feature = "relaxed-simd"))]
#[inline(always)]
fn dot16_add(x: v128, y: v128, acc: v128) -> v128 {
    let lo = i32x4_dot_i16x8(i16x8_extend_low_i8x16(x), i16x8_extend_low_i8x16(y));
    let hi = i32x4_dot_i16x8(i16x8_extend_high_i8x16(x), i16x8_extend_high_i8x16(y));
    i32x4_add(acc, i32x4_add(lo, hi))
}
