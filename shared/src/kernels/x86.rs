//! AVX2 + FMA kernels for x86_64, in the canonical accumulation order of the parent module.

use std::arch::x86_64::*;

use super::order::{LANES, reduce32};

/// Whether this CPU runs the kernels below (std caches the CPUID answer).
#[inline]
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Sums four 8-lane accumulators by the canonical tree of [`reduce32`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce(a0: __m256, a1: __m256, a2: __m256, a3: __m256) -> f32 {
    let s8 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1)
}

/// Spills the accumulators, adds the tail in canonical lanes and reduces like the portable code.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn finish_with_tail(acc: [__m256; 4], tail: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0.0f32; LANES];
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: `lanes` has room for 4 × 8 floats; unaligned stores are allowed.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * i), *v) };
    }
    for (l, t) in tail.enumerate() {
        lanes[l] += t;
    }
    reduce32(&lanes)
}

/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < full {
        for (j, slot) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= full <= n, within both slices.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                )
            };
            *slot = _mm256_fmadd_ps(x, y, *slot);
        }
        i += LANES;
    }
    if full == n {
        reduce(acc[0], acc[1], acc[2], acc[3])
    } else {
        finish_with_tail(acc, a[full..n].iter().zip(&b[full..n]).map(|(x, y)| x * y))
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < full {
        for (j, slot) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= full <= n, within both slices.
            let d = unsafe {
                _mm256_sub_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                )
            };
            *slot = _mm256_fmadd_ps(d, d, *slot);
        }
        i += LANES;
    }
    if full == n {
        reduce(acc[0], acc[1], acc[2], acc[3])
    } else {
        finish_with_tail(
            acc,
            a[full..n]
                .iter()
                .zip(&b[full..n])
                .map(|(x, y)| (x - y) * (x - y)),
        )
    }
}

/// # Safety
/// The CPU must support AVX2 ([`available`]). Codes must lie in `-127..=127`: the kernel
/// multiplies `|a|` (as unsigned) by `b · sign(a)`, and pairs of such products fit in `i16`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let full = n / 32 * 32;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    let mut i = 0;
    while i < full {
        // SAFETY: i + 32 <= full <= n, within both slices.
        let (x, y) = unsafe {
            (
                _mm256_loadu_si256(pa.add(i).cast()),
                _mm256_loadu_si256(pb.add(i).cast()),
            )
        };
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        i += 32;
    }
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256(acc, 1),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
    let tail: i32 = a[full..n]
        .iter()
        .zip(&b[full..n])
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum();
    _mm_cvtsi128_si32(s1) + tail
}
