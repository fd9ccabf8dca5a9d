//! Tests on the real dataset (`TIERVEC_DATA`, default `../shared/data`), on slices small enough
//! for CI: the dataset reader, exact search against the shipped ground truth, and snapshot
//! search recall.

use tiervec_edge::{EdgeIndex, Searcher, write_snapshot_atomic};
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::{Metric, exact};
use tiervec_testbed::dataset::Dataset;
use tiervec_testbed::snapshots;

fn dataset() -> Dataset {
    Dataset::load_default().expect("the dataset under TIERVEC_DATA (default ../shared/data)")
}

#[test]
fn dataset_has_the_documented_shape() {
    let ds = dataset();
    assert_eq!((ds.base.rows(), ds.base.dim), (50_000, 384));
    assert_eq!((ds.queries.rows(), ds.queries.dim), (5_000, 384));
    assert_eq!((ds.groundtruth.rows(), ds.groundtruth.dim), (5_000, 100));
    assert_eq!(ds.groundtruth_distances.rows(), 5_000);
    assert_eq!(ds.base_texts().unwrap().len(), 50_000);
}

/// Exact SIMD brute force over all 50,000 base vectors reproduces the shipped float64 ground
/// truth for every query: each of the top 10 has the true id, or (near-ties at a position, and
/// the two duplicate base rows) the true distance within 1e-5. Distances agree within 1e-5.
#[test]
fn exact_search_agrees_with_the_shipped_ground_truth() {
    let ds = dataset();
    let dim = ds.base.dim;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queries: Vec<usize> = (0..ds.queries.rows()).collect();
    let mismatched_ids: usize = std::thread::scope(|s| {
        queries
            .chunks(queries.len().div_ceil(threads))
            .map(|chunk| {
                let ds = &ds;
                s.spawn(move || {
                    let mut swapped = 0;
                    for &q in chunk {
                        let top = exact::search(
                            &ds.base.data,
                            dim,
                            Metric::Cosine,
                            ds.queries.row(q),
                            10,
                        );
                        let ids = &ds.groundtruth.row(q)[..10];
                        let dists = &ds.groundtruth_distances.row(q)[..10];
                        for (i, hit) in top.iter().enumerate() {
                            assert!(
                                (hit.distance - dists[i]).abs() <= 1e-5,
                                "query {q} rank {i}: distance {} vs ground truth {}",
                                hit.distance,
                                dists[i]
                            );
                            if hit.id as i32 != ids[i] {
                                swapped += 1;
                            }
                        }
                    }
                    swapped
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum()
    });
    // Only near-ties may swap places (distances equal within 1e-5, checked above).
    assert!(
        mismatched_ids < 200,
        "{mismatched_ids} id swaps among 50,000 ranks"
    );
}

/// A snapshot of 5,000 base vectors, opened from a real file, answers 500 real queries with
/// recall@10 ≥ 0.95 against exact search over the same vectors.
#[test]
fn snapshot_search_recall_on_real_queries() {
    let ds = dataset();
    let texts = ds.base_texts().unwrap();
    let count = 5_000;
    let dim = ds.base.dim;
    let bytes = snapshots::build(&ds.base, count, HnswParams::default(), Some(&texts)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("real.tvs");
    write_snapshot_atomic(&path, &bytes).unwrap();
    let index = EdgeIndex::open(&path).unwrap();
    let mut searcher = Searcher::new();
    let mut hits = Vec::new();
    let mut found = 0usize;
    for q in 0..500 {
        let query = ds.queries.row(q);
        let truth = exact::search(&ds.base.data[..count * dim], dim, Metric::Cosine, query, 10);
        index
            .search_with(&mut searcher, query, 10, 64, &mut hits)
            .unwrap();
        let tenth = truth[9].distance;
        found += hits
            .iter()
            .filter(|h| {
                truth.iter().any(|t| t.id as u64 == h.id) || (h.distance - tenth).abs() <= 1e-5
            })
            .count();
        assert_eq!(
            hits[0].payload.as_deref(),
            Some(snapshots::text_payload(&texts[hits[0].id as usize]).as_str())
        );
    }
    let recall = found as f64 / 5_000.0;
    assert!(recall >= 0.95, "recall@10 = {recall}");
}
