//! `LocalCache::search` as the number of held anchors grows: every local answer looks for the
//! nearest anchor (the confidence rule's input), so its cost is paid per query.
//! `cargo bench -p tiervec-shared --bench local` (reads the dataset from `TIERVEC_DATA`, default
//! `../shared/data` beside the repository).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::metric::Metric;
use tiervec_shared::push::{Delta, PushedAnchor, PushedVector};
use tiervec_shared::vecs::{Matrix, parse_fvecs};

/// Overlay vectors of every cache measured (base vectors), searched exactly alongside.
const OVERLAY: usize = 200;
/// Query vectors used as anchors at most; the queries searched come after them.
const MAX_ANCHORS: usize = 3_000;
/// Queries cycled through.
const QUERIES: usize = 1_000;

fn fvecs(name: &str) -> Matrix<f32> {
    let dir = std::env::var_os("TIERVEC_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    let path = dir.join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_fvecs(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A cache of `OVERLAY` base vectors and `anchors` anchors (real queries: the points edges get
/// pushed as anchors are the fallback queries of their users).
fn cache(base: &Matrix<f32>, queries: &Matrix<f32>, anchors: usize) -> LocalCache {
    let delta = Delta {
        collection_id: [1; 16],
        dim: base.dim as u32,
        metric: Metric::Cosine.code(),
        version: 1,
        vectors: (0..OVERLAY)
            .map(|i| PushedVector {
                id: i as u64,
                lsn: 1,
                vector: base.row(i).to_vec(),
                payload: None,
            })
            .collect(),
        anchors: (0..anchors)
            .map(|i| PushedAnchor {
                anchor_id: 1_000_000 + i as u64,
                vector: queries.row(i).to_vec(),
                members: vec![0],
                radius: 0.0,
                hot_at_unix_us: 0,
            })
            .collect(),
        ..Delta::default()
    };
    let mut cache = LocalCache::empty();
    cache.apply(&delta, true).expect("a valid delta");
    cache
}

fn bench_anchors(c: &mut Criterion) {
    let base = fvecs("base.fvecs");
    let queries = fvecs("queries.fvecs");
    assert!(queries.rows() >= MAX_ANCHORS + QUERIES, "too few queries");
    let mut g = c.benchmark_group("local_search_with_anchors");
    g.sample_size(30);
    for anchors in [0, 300, 1_000, MAX_ANCHORS] {
        let cache = cache(&base, &queries, anchors);
        let mut scratch = LocalScratch::default();
        let mut next = 0;
        g.bench_with_input(BenchmarkId::from_parameter(anchors), &anchors, |x, _| {
            x.iter(|| {
                next = (next + 1) % QUERIES;
                let query = queries.row(MAX_ANCHORS + next);
                black_box(
                    cache
                        .search(None, query, 10, 64, &mut scratch)
                        .expect("answers"),
                );
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_anchors);
criterion_main!(benches);
