//! Machine figures the kernel benchmarks are judged against.

use std::time::Instant;

use tiervec_shared::kernels;

/// Sustained read bandwidth in GB/s: the best of `passes` dot products over two halves of a
/// buffer of `bytes` bytes, which must be far larger than the last-level cache.
pub fn read_bandwidth_gbps(bytes: usize, passes: usize) -> f64 {
    let floats = bytes / 4;
    let buf: Vec<f32> = (0..floats).map(|i| (i % 7) as f32 * 0.25).collect();
    let (a, b) = buf.split_at(floats / 2);
    let mut best = f64::INFINITY;
    let mut sink = 0.0f32;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        sink += kernels::dot(a, &b[..a.len()]);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (2 * a.len() * 4) as f64 / best / 1e9
}
