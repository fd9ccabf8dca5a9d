//! Distance kernels on `f32`: a portable implementation, an x86_64 AVX2+FMA one chosen at run
//! time, and a plain scalar reference that tests compare both against.
//!
//! # One canonical accumulation order
//! Floating-point addition is not associative, so two kernels that add the same products in a
//! different order can return different bits, and a top-k near a tie can then differ between
//! the native edge and the WASM guest. Every vectorised kernel here therefore adds in the same
//! order: element `i` goes into partial sum `i mod 32` (four 8-lane accumulators), and the 32
//! partial sums are reduced by the fixed tree in [`order::reduce32`]. The portable code is written in
//! that shape so the compiler vectorises it (SSE2 here, `simd128` on wasm32) without reordering.
//! The one remaining difference is whether multiply and add are fused (FMA, one rounding
//! instead of two): the AVX2 path always fuses, the wasm guest fuses where its host has FMA
//! (`f32x4.relaxed_madd`), the portable code never does. Fused and unfused results agree to a
//! few ulps rather than bit for bit — "agree except on near-ties", which the ground-truth
//! comparison tolerates at 1e-5 — and [`reference::dot_fused`] pins the fused bits down.

mod order;
mod portable;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use portable::{
    dot as dot_portable, dot_i8 as dot_i8_portable, l2_squared as l2_squared_portable,
};

pub use order::LANES;

/// Which implementation [`dot`] and [`l2_squared`] use on this machine.
pub fn active() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        return "avx2+fma";
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return "simd128";
    #[allow(unreachable_code)]
    "portable"
}

/// Inner product of two equally long vectors (extra elements of the longer one are ignored).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: `available()` checked that this CPU supports AVX2 and FMA.
        return unsafe { x86::dot(a, b) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return wasm::dot(a, b);
    #[allow(unreachable_code)]
    portable::dot(a, b)
}

/// Squared Euclidean distance of two equally long vectors.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: `available()` checked that this CPU supports AVX2 and FMA.
        return unsafe { x86::l2_squared(a, b) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return wasm::l2_squared(a, b);
    #[allow(unreachable_code)]
    portable::l2_squared(a, b)
}

/// Exact integer inner product of two `i8` rows whose codes lie in `-127..=127`.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: `available()` checked that this CPU supports AVX2 and FMA.
        return unsafe { x86::dot_i8(a, b) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return wasm::dot_i8(a, b);
    #[allow(unreachable_code)]
    portable::dot_i8(a, b)
}

/// Whether a prefetch hint costs a call (wasm: into the host) rather than an instruction:
/// callers then gather the rows they will read and hint them in one batch, where natively a
/// hint per row, as soon as the row is known, starts each load earliest.
pub const PREFETCH_IS_A_CALL: bool = cfg!(target_arch = "wasm32");

/// Most cache lines one prefetch hint asks for: a 384-d `f32` row is 24 lines.
pub const MAX_PREFETCH_LINES: usize = 32;

/// Hints the CPU to start loading the first cache lines of `row` (a vector about to be
/// compared); the hardware prefetcher follows the rest of the row.
#[inline(always)]
pub fn prefetch(row: &[f32]) {
    prefetch_lines(row, 4);
}

/// [`prefetch`] for a row of `i8` codes (a 384-d row is six lines: all of them).
#[inline(always)]
pub fn prefetch_bytes(row: &[i8]) {
    prefetch_lines(row, 8);
}

/// Hints the CPU to load every cache line of `region` (at most [`MAX_PREFETCH_LINES`]).
#[inline(always)]
pub fn prefetch_all<T>(region: &[T]) {
    prefetch_lines(region, MAX_PREFETCH_LINES);
}

/// Hints the CPU to load the codes of rows `ids` of `codes` (rows of `dim` codes): one hint for
/// a batch, which matters in wasm, where each hint is a call into the host.
#[inline]
pub fn prefetch_rows(codes: &[i8], dim: usize, ids: &[u32]) {
    #[cfg(target_arch = "wasm32")]
    {
        let bytes = codes.len();
        // SAFETY: the host only reads `ids` and issues prefetch hints, which never fault, for
        // addresses it clamps to this instance's linear memory.
        unsafe { host::prefetch_rows(codes.as_ptr().cast(), bytes, dim, ids.as_ptr(), ids.len()) };
    }
    #[cfg(not(target_arch = "wasm32"))]
    for &id in ids {
        prefetch_bytes(row_of(codes, dim, id));
    }
}

/// Row `id` of `rows` (rows of `dim` elements), empty when there is none.
#[inline(always)]
pub(crate) fn row_of<T>(rows: &[T], dim: usize, id: u32) -> &[T] {
    let start = id as usize * dim;
    rows.get(start..start + dim).unwrap_or(&[])
}

/// Hints the CPU to load the cache line holding `value`: a hint cheap enough to give for every
/// neighbour of a node (the visited marks). On wasm, where a hint costs a call into the host,
/// it does nothing: the marks of a cache's nodes fit in the L1/L2 caches anyway.
#[inline(always)]
pub fn prefetch_ptr<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    x86_prefetch((value as *const T).cast());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[inline(always)]
fn prefetch_lines<T>(region: &[T], lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = core::mem::size_of_val(region);
        let base = region.as_ptr().cast::<u8>();
        for line in 0..bytes.div_ceil(64).min(lines) {
            // SAFETY: `line * 64 < bytes`, an address inside `region`.
            x86_prefetch(unsafe { base.add(line * 64) });
        }
    }
    #[cfg(target_arch = "wasm32")]
    {
        let bytes = core::mem::size_of_val(region).min(lines * 64);
        // SAFETY: the host only issues prefetch hints, which never fault, for addresses it
        // clamps to this instance's linear memory.
        unsafe { host::prefetch(region.as_ptr().cast(), bytes) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "wasm32")))]
    let _ = (region, lines);
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn x86_prefetch(address: *const u8) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: prefetching is a hint that never faults, and SSE is baseline on x86_64.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast()) };
}

/// wasm has no prefetch instruction, and a load standing in for one blocks the guest until the
/// line arrives (it was the guest's largest single stall). The tiervec host provides
/// prefetch as an import instead (`tiervec.prefetch`, `tiervec.prefetch_rows`; guest ABI v3,
/// docs/wasm.md): hints only, addresses clamped to the guest's own memory, so a guest can
/// neither fault nor reach outside its sandbox through them.
#[cfg(target_arch = "wasm32")]
mod host {
    #[link(wasm_import_module = "tiervec")]
    unsafe extern "C" {
        /// Prefetch the lines of `bytes` bytes from `start`.
        pub fn prefetch(start: *const u8, bytes: usize);
        /// Prefetch rows `ids[..count]`, each `stride` bytes long, of the `len` bytes at `base`.
        pub fn prefetch_rows(
            base: *const u8,
            len: usize,
            stride: usize,
            ids: *const u32,
            count: usize,
        );
    }
}

/// The obvious sequential loops in `f64`: slow, order-independent enough to be the yardstick;
/// and the canonical order with fused products, the bits the FMA kernels must return.
pub mod reference {
    use super::order::{LANES, reduce32};

    /// Inner product in the canonical order, each product of a whole [`LANES`]-element chunk
    /// fused into its lane (`mul_add`, one rounding) and the tail's products rounded before
    /// they are added: bit for bit what the AVX2 kernel returns, and the wasm kernel on a host
    /// with FMA.
    pub fn dot_fused(a: &[f32], b: &[f32]) -> f32 {
        fused_sum(a, b, |x, y| (x, y))
    }

    /// Squared Euclidean distance in the order of [`dot_fused`].
    pub fn l2_squared_fused(a: &[f32], b: &[f32]) -> f32 {
        fused_sum(a, b, |x, y| (x - y, x - y))
    }

    fn fused_sum(a: &[f32], b: &[f32], factors: impl Fn(f32, f32) -> (f32, f32)) -> f32 {
        let n = a.len().min(b.len());
        let full = n / LANES * LANES;
        let mut lanes = [0.0f32; LANES];
        for (i, (x, y)) in a[..n].iter().zip(&b[..n]).enumerate() {
            let (p, q) = factors(*x, *y);
            let lane = &mut lanes[i % LANES];
            *lane = if i < full {
                p.mul_add(q, *lane)
            } else {
                *lane + p * q
            };
        }
        reduce32(&lanes)
    }

    /// Inner product accumulated in `f64`.
    pub fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Squared Euclidean distance accumulated in `f64`.
    pub fn l2_squared(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let d = *x as f64 - *y as f64;
                d * d
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vectors() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (0usize..300).prop_flat_map(|n| {
            (
                proptest::collection::vec(-4.0f32..4.0, n),
                proptest::collection::vec(-4.0f32..4.0, n),
            )
        })
    }

    /// Bound on the rounding error of an n-term f32 sum of products with magnitude sum `mag`.
    fn tolerance(n: usize, mag: f64) -> f64 {
        (n as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-6
    }

    proptest! {
        #[test]
        fn dispatched_dot_matches_reference((a, b) in vectors()) {
            let mag: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            let want = reference::dot(&a, &b);
            prop_assert!((dot(&a, &b) as f64 - want).abs() <= tolerance(a.len(), mag));
            prop_assert!((dot_portable(&a, &b) as f64 - want).abs() <= tolerance(a.len(), mag));
        }

        #[test]
        fn dispatched_l2_matches_reference((a, b) in vectors()) {
            let want = reference::l2_squared(&a, &b);
            prop_assert!((l2_squared(&a, &b) as f64 - want).abs() <= tolerance(a.len(), want));
            prop_assert!((l2_squared_portable(&a, &b) as f64 - want).abs() <= tolerance(a.len(), want));
        }

        #[test]
        fn dispatched_kernels_return_the_portable_or_the_fused_bits((a, b) in vectors()) {
            let bits = |dot: f32, l2: f32| (dot.to_bits(), l2.to_bits());
            let got = bits(dot(&a, &b), l2_squared(&a, &b));
            let fused = bits(reference::dot_fused(&a, &b), reference::l2_squared_fused(&a, &b));
            let portable = bits(dot_portable(&a, &b), l2_squared_portable(&a, &b));
            match active() {
                "avx2+fma" => prop_assert_eq!(got, fused),
                "portable" => prop_assert_eq!(got, portable),
                // simd128 with relaxed_madd: the wasm host fuses or not (wasm/src/tests.rs
                // checks it does one or the other consistently).
                _ => prop_assert!(got == fused || got == portable),
            }
        }

        #[test]
        fn simd_and_portable_agree_to_a_few_ulps((a, b) in vectors()) {
            // Same accumulation order: only FMA's single rounding separates them.
            let mag: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            let diff = (dot(&a, &b) - dot_portable(&a, &b)).abs() as f64;
            prop_assert!(diff <= 4.0 * f32::EPSILON as f64 * mag + 1e-7);
        }
    }

    proptest! {
        #[test]
        fn integer_dot_is_exact(pair in (0usize..200).prop_flat_map(|n| (
            proptest::collection::vec(-127i8..=127, n),
            proptest::collection::vec(-127i8..=127, n),
        ))) {
            let (a, b) = pair;
            let want: i32 = a.iter().zip(&b).map(|(x, y)| *x as i32 * *y as i32).sum();
            prop_assert_eq!(dot_i8(&a, &b), want);
            prop_assert_eq!(dot_i8_portable(&a, &b), want);
        }
    }

    #[test]
    fn empty_and_tail_only_vectors() {
        assert_eq!(dot(&[], &[]), 0.0);
        assert_eq!(l2_squared(&[1.0], &[3.0]), 4.0);
        let a: Vec<f32> = (0..33).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..33).map(|i| (i * i) as f32).sum::<f32>());
    }
}
