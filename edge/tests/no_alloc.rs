//! The query paths allocate nothing that grows with what they search once their buffers are
//! warm: counted by a global allocator that tallies this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_edge::searcher::LocalSearcher;
use tiervec_edge::{EdgeIndex, Searcher, write_snapshot_atomic};
use tiervec_shared::certificate::euclidean;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::push::{Delta, PushedAnchor, PushedVector, Tombstone, anchor_id};
use tiervec_shared::snapshot::{self, SnapshotBody, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};
use tiervec_test_support::vectors::vector;

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const DIM: usize = 32;

#[test]
fn warm_searches_allocate_nothing() {
    let params = HnswParams::default();
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, params);
    for i in 0..3_000 {
        builder.insert(&vector(i, DIM)).unwrap();
    }
    let texts: Vec<String> = (0..3_000).map(|i| format!("t{i}")).collect();
    let body = SnapshotBody::from_builder(
        &builder,
        "a",
        (0..3_000).collect(),
        vec![0; 3_000],
        Some(&texts),
    )
    .unwrap();
    let spec = SnapshotSpec {
        collection: CollectionId::from_u128(1),
        dim: DIM as u32,
        metric: Metric::Cosine,
        params,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tvs");
    write_snapshot_atomic(&path, &snapshot::encode(&spec, &body).unwrap()).unwrap();
    let index = EdgeIndex::open(&path).unwrap();

    let queries: Vec<Vec<f32>> = (0..200).map(|i| vector(i * 7 + 3_001, DIM)).collect();
    let mut searcher = Searcher::new();
    let mut hits = Vec::with_capacity(10);
    index
        .search_with(&mut searcher, &queries[0], 10, 128, &mut hits)
        .unwrap();

    let before = ALLOCATIONS.with(Cell::get);
    for q in &queries {
        index
            .search_with(&mut searcher, q, 10, 128, &mut hits)
            .unwrap();
        assert_eq!(hits.len(), 10);
    }
    let allocations = ALLOCATIONS.with(Cell::get) - before;
    assert_eq!(
        allocations, 0,
        "200 warm searches made {allocations} allocations"
    );
}

/// Allocations of each warm search through the served path (`LocalSearcher::local_answer` of
/// an [`EdgeCache`]) over a 3,000-vector snapshot with `overlay` pushed vectors (with payloads),
/// `hidden` snapshot ids tombstoned and `anchors` certified anchors (each query point in
/// `queries` that is also an anchor gets a certified answer).
fn served_allocations(overlay: usize, hidden: usize, anchors: usize) -> (Vec<usize>, usize) {
    const SNAPSHOT: usize = 3_000;
    const MEMBERS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.tvs");
    let spec = SnapshotSpec {
        collection: CollectionId::from_u128(7),
        dim: DIM as u32,
        metric: Metric::Cosine,
        params: HnswParams::default(),
    };
    let prepared = |i: usize| {
        let mut v = vector(i as u64, DIM);
        Metric::Cosine.prepare(&mut v);
        v
    };
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, spec.params);
    for i in 0..SNAPSHOT {
        builder.insert(&prepared(i)).unwrap();
    }
    let texts: Vec<String> = (0..SNAPSHOT)
        .map(|i| format!("snapshot text {i}"))
        .collect();
    let ids: Vec<u64> = (0..SNAPSHOT as u64).collect();
    let body =
        SnapshotBody::from_builder(&builder, "a", ids, vec![1; SNAPSHOT], Some(&texts)).unwrap();
    write_snapshot_atomic(&path, &snapshot::encode(&spec, &body).unwrap()).unwrap();
    let mut config = CacheConfig::beside(&path, u64::MAX);
    config.compact_after = usize::MAX;
    config.compact_after_deltas = usize::MAX;
    config.compact_after_log_bytes = u64::MAX;
    let (cache, _) = EdgeCache::open(config).unwrap();
    let connection = cache.begin_connection();

    // What the cache holds after the delta, by id: the certificates are exact over it.
    let mut held: Vec<(u64, Vec<f32>)> = (hidden..SNAPSHOT)
        .map(|i| (i as u64, prepared(i)))
        .collect();
    let pushed: Vec<PushedVector> = (0..overlay)
        .map(|i| {
            let id = (SNAPSHOT + i) as u64;
            PushedVector {
                id,
                lsn: 2,
                vector: prepared(SNAPSHOT + i),
                payload: Some(format!("pushed text {id}")),
            }
        })
        .collect();
    held.extend(pushed.iter().map(|p| (p.id, p.vector.clone())));
    let anchor_points: Vec<Vec<f32>> = (0..anchors).map(|a| prepared(50_000 + a)).collect();
    let pushed_anchors = anchor_points
        .iter()
        .map(|point| {
            let mut by_distance: Vec<(f32, u64)> = held
                .iter()
                .map(|(id, v)| (euclidean(point, v), *id))
                .collect();
            by_distance.sort_by(|a, b| a.0.total_cmp(&b.0));
            PushedAnchor {
                anchor_id: anchor_id(point),
                vector: point.clone(),
                members: by_distance[..MEMBERS].iter().map(|(_, id)| *id).collect(),
                radius: by_distance[MEMBERS].0,
                hot_at_unix_us: 0,
            }
        })
        .collect();
    let delta = Delta {
        collection_id: spec.collection.0,
        dim: DIM as u32,
        metric: Metric::Cosine.code(),
        version: 1,
        vectors: pushed,
        anchors: pushed_anchors,
        evict: Vec::new(),
        evict_anchors: Vec::new(),
        tombstones: (0..hidden as u64)
            .map(|id| Tombstone { id, lsn: 2 })
            .collect(),
        certificates: Vec::new(),
        sent_at_unix_us: 0,
    };
    cache.apply(&delta, connection).unwrap();
    assert_eq!(cache.overlay_len(), overlay);
    assert_eq!(cache.certified_anchors(), anchors);

    // Half the queries at anchor points (certified answers), half elsewhere.
    let queries: Vec<Vec<f32>> = (0..100)
        .map(|i| match i % 2 {
            0 => anchor_points[i % anchors].clone(),
            _ => vector(60_000 + i as u64, DIM),
        })
        .collect();
    let rule = ConfidenceRule::kth(0.5);
    let mut certified = 0;
    for q in &queries {
        let answer = cache.local_answer(q, K, 64, rule).unwrap().answer;
        assert_eq!(answer.hits.len(), K);
        assert!(answer.hits.iter().all(|h| h.payload.is_some()));
        certified += usize::from(answer.certified);
    }
    let allocations = queries
        .iter()
        .map(|q| {
            let before = ALLOCATIONS.with(Cell::get);
            let decision = cache.local_answer(q, K, 64, rule).unwrap();
            let after = ALLOCATIONS.with(Cell::get);
            drop(decision);
            after - before
        })
        .collect();
    (allocations, certified)
}

const K: usize = 10;

#[test]
fn served_searches_allocate_only_their_answer_whatever_the_cache_holds() {
    // The answer: its hit list, the distances the confidence rule reads, a payload per hit.
    let answer_allocations = 2 + K;
    let (small, small_certified) = served_allocations(100, 20, 70);
    let (large, large_certified) = served_allocations(2_000, 400, 700);
    for (name, allocations, certified) in [
        ("small", &small, small_certified),
        ("large", &large, large_certified),
    ] {
        eprintln!("CERTIFIED {name}: {certified}");
        assert!(
            certified >= 40,
            "{name}: only {certified} of 100 answers certified; the certified path is untested"
        );
        let most = allocations.iter().max().unwrap();
        assert!(
            *most <= answer_allocations,
            "{name} cache: a warm served search made {most} allocations \
             (at most {answer_allocations}: the answer); all: {allocations:?}"
        );
    }
}
