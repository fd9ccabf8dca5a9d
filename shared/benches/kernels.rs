//! Micro-benchmarks of the distance kernels at the dataset's dimension (384).
//! `cargo bench -p tiervec-shared --bench kernels`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tiervec_shared::{kernels, quant};

const DIM: usize = 384;

fn rows(n: usize) -> Vec<f32> {
    (0..n * DIM)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench_kernels(c: &mut Criterion) {
    let data = rows(2);
    let (a, b) = data.split_at(DIM);
    let mut g = c.benchmark_group("kernel_384");
    g.throughput(Throughput::Bytes((2 * DIM * 4) as u64));
    g.bench_function(format!("dot/{}", kernels::active()), |x| {
        x.iter(|| kernels::dot(black_box(a), black_box(b)))
    });
    g.bench_function("dot/portable", |x| {
        x.iter(|| kernels::dot_portable(black_box(a), black_box(b)))
    });
    g.bench_function(format!("l2/{}", kernels::active()), |x| {
        x.iter(|| kernels::l2_squared(black_box(a), black_box(b)))
    });
    g.bench_function("l2/portable", |x| {
        x.iter(|| kernels::l2_squared_portable(black_box(a), black_box(b)))
    });
    let scales = quant::train(&data, DIM);
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    quant::encode(a, &scales, &mut ca);
    quant::encode(b, &scales, &mut cb);
    g.bench_function(format!("dot_i8/{}", kernels::active()), |x| {
        x.iter(|| kernels::dot_i8(black_box(&ca), black_box(&cb)))
    });
    g.bench_function("dot_i8/portable", |x| {
        x.iter(|| kernels::dot_i8_portable(black_box(&ca), black_box(&cb)))
    });
    g.finish();

    let corpus = rows(10_000);
    let mut g = c.benchmark_group("scan_10000x384");
    g.throughput(Throughput::Bytes((corpus.len() * 4) as u64));
    g.sample_size(20);
    g.bench_function("dot", |x| {
        x.iter(|| {
            corpus
                .chunks_exact(DIM)
                .map(|r| kernels::dot(black_box(a), r))
                .fold(f32::MIN, f32::max)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
