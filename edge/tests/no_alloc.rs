//! The query path allocates nothing once its buffers are warm: counted by a global allocator
//! that tallies this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tiervec_edge::{EdgeIndex, Searcher, write_snapshot_atomic};
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::snapshot::{self, SnapshotBody, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};

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

fn vector(i: usize) -> Vec<f32> {
    (0..DIM)
        .map(|d| ((i * 13 + d * 7) as f32 * 0.11).cos())
        .collect()
}

#[test]
fn warm_searches_allocate_nothing() {
    let params = HnswParams::default();
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, params);
    for i in 0..3_000 {
        builder.insert(&vector(i)).unwrap();
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

    let queries: Vec<Vec<f32>> = (0..200).map(|i| vector(i * 7 + 3_001)).collect();
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
