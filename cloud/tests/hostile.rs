//! Hostile input against the service over a real data directory: each test is the regression
//! test of one finding of docs/reliability.md, at the limit and at limit + 1, and for a bad value
//! that reached the log before the limit existed, a recovery that survives it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiervec_cloud::collection::SearchParams;
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::service::{Service, ServiceError};
use tiervec_cloud::storage::{Apply, DurableLog, Embedded, Image, WalEntry, WalError};
use tiervec_shared::Metric;
use tiervec_shared::hnsw::{HnswParams, MAX_EF_CONSTRUCTION};
use tiervec_shared::log::MAX_RECORD;
use tiervec_shared::push::{HeldVector, Inventory, MAX_PAYLOAD_BYTES, vector_bytes};
use tiervec_shared::query::{MAX_COMPONENT, QueryError};

const DIM: usize = 16;

fn vector(i: u64) -> Vec<f32> {
    tiervec_test_support::vectors::vector(i, DIM)
}

fn open(dir: &Path) -> Service {
    Service::open(CloudConfig {
        data_dir: dir.to_owned(),
        ..CloudConfig::default()
    })
    .unwrap()
}

/// Applies nothing: the tests below write log entries the service's own checks would refuse,
/// as a log written before those checks existed may hold them.
struct Discard;

impl Apply for Discard {
    fn restore(&self, _: Image) {}
    fn apply(&self, _: u64, _: &WalEntry) {}
    fn image(&self) -> Image {
        Image {
            collections: Vec::new(),
            edge_caches: Vec::new(),
            models: Vec::new(),
        }
    }
    fn observe(&self, _: u64, _: &WalEntry) {}
}

/// Appends `entries` to the log of `dir` directly, past the service's validation.
fn log_raw(dir: &Path, entries: Vec<WalEntry>) {
    let (log, _) = Embedded::open(dir, Arc::new(Discard), 1 << 20).unwrap();
    for e in entries {
        log.append(e).unwrap();
    }
}

fn create_entry(metric: Metric, ef_construction: u32) -> WalEntry {
    WalEntry::CreateCollection {
        name: "c".into(),
        id: [7; 16],
        dim: DIM as u32,
        metric: metric.code(),
        m: 16,
        ef_construction,
        seed: 1,
    }
}

/// Upserts `n` ordinary points from id `first` and waits until the graph holds `expected`.
fn fill_and_wait_for_the_graph(svc: &Service, first: u64, n: u64, expected: usize) {
    for chunk in (first..first + n).collect::<Vec<_>>().chunks(1_000) {
        svc.upsert("c", chunk.iter().map(|&i| (i, vector(i), None)).collect())
            .unwrap();
    }
    let c = svc.catalog().get("c").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.indexed_points() < expected {
        assert!(
            Instant::now() < deadline,
            "indexing stalled at {} of {expected} points",
            c.indexed_points()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The id a graph search (not an exact scan) finds nearest to `query`.
fn graph_top1(svc: &Service, query: &[f32]) -> u64 {
    let params = SearchParams {
        k: 1,
        ef: 64,
        exact: false,
        max_distance: None,
    };
    svc.search("c", query, &params).unwrap().hits[0].id
}

#[test]
fn ef_construction_is_bounded_and_a_logged_absurd_one_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let with = |ef_construction| HnswParams {
        ef_construction,
        ..HnswParams::default()
    };
    for absurd in [MAX_EF_CONSTRUCTION + 1, 4_000_000_000, 0] {
        match svc.create_collection("c", DIM, Metric::Cosine, with(absurd)) {
            Err(ServiceError::Invalid(why)) => assert!(why.contains("ef_construction"), "{why}"),
            other => panic!("ef_construction {absurd} accepted: {other:?}"),
        }
    }
    svc.create_collection("c", DIM, Metric::Cosine, with(MAX_EF_CONSTRUCTION))
        .expect("the limit itself is accepted");
    drop(svc);

    // Logged before the bound existed: recovery builds the graph with the bound instead of
    // aborting the process on a 4-billion-entry heap, on this start and the next.
    let dir = tempfile::tempdir().unwrap();
    log_raw(
        dir.path(),
        vec![create_entry(Metric::Cosine, 4_000_000_000)],
    );
    let svc = open(dir.path());
    let c = svc.catalog().get("c").unwrap();
    assert_eq!(c.info.params.ef_construction, MAX_EF_CONSTRUCTION);
    fill_and_wait_for_the_graph(&svc, 0, 3_000, 3_000);
    assert_eq!(graph_top1(&svc, &vector(5)), 5);
    drop(svc);
    let svc = open(dir.path());
    fill_and_wait_for_the_graph(&svc, 3_000, 100, 3_100);
    assert_eq!(graph_top1(&svc, &vector(3_005)), 3_005);
}

#[test]
fn huge_components_are_refused_and_logged_ones_do_not_stop_indexing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    svc.create_collection("c", DIM, Metric::Dot, HnswParams::default())
        .unwrap();
    let mut at_limit = vector(1);
    at_limit[3] = -MAX_COMPONENT;
    svc.upsert("c", vec![(1, at_limit.clone(), None)])
        .expect("the limit itself is accepted");
    let mut above = vector(2);
    above[3] = 1e20;
    match svc.upsert("c", vec![(2, above.clone(), None)]) {
        Err(ServiceError::BadPoint {
            source: QueryError::TooLarge { index: 3, .. },
            ..
        }) => {}
        other => panic!("a 1e20 component accepted: {other:?}"),
    }
    let params = SearchParams {
        k: 1,
        ef: 64,
        exact: true,
        max_distance: None,
    };
    assert!(matches!(
        svc.search("c", &above, &params),
        Err(ServiceError::Query(QueryError::TooLarge { index: 3, .. }))
    ));
    assert_eq!(svc.search("c", &at_limit, &params).unwrap().hits[0].id, 1);
    drop(svc);

    // Logged before the bound existed: their dot products overflow to infinity, and indexing
    // goes on for every other row.
    let dir = tempfile::tempdir().unwrap();
    let huge = |i: u64| {
        vec![1e20; DIM]
            .into_iter()
            .map(|x| x * (i as f32))
            .collect::<Vec<f32>>()
    };
    log_raw(
        dir.path(),
        vec![
            create_entry(Metric::Dot, 200),
            WalEntry::Upsert {
                collection: [7; 16],
                ids: vec![1_000_001, 1_000_002],
                vectors: [huge(1), huge(2)].concat(),
                payloads: vec![None, None],
            },
        ],
    );
    let svc = open(dir.path());
    fill_and_wait_for_the_graph(&svc, 0, 3_000, 3_002);
    // Any vector with a positive component sum is nearest to the largest huge one by `dot`.
    assert_eq!(graph_top1(&svc, &[1.0; DIM]), 1_000_002);
}

#[test]
fn payloads_and_log_entries_over_their_limits_are_refused_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    svc.create_collection("c", DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
    let json_of_len = |len: usize| format!("\"{}\"", "x".repeat(len - 2));
    match svc.upsert(
        "c",
        vec![(1, vector(1), Some(json_of_len(MAX_PAYLOAD_BYTES + 1)))],
    ) {
        Err(ServiceError::PayloadTooLarge {
            index: 0,
            id: 1,
            len,
        }) => {
            assert_eq!(len, MAX_PAYLOAD_BYTES + 1)
        }
        other => panic!("an oversized payload accepted: {other:?}"),
    }
    let at_limit = json_of_len(MAX_PAYLOAD_BYTES);
    svc.upsert("c", vec![(1, vector(1), Some(at_limit.clone()))])
        .expect("the limit itself is accepted");

    // Every payload within its limit, but together over one log record's: refused as too
    // large (413 over HTTP), not as a storage failure, and the log takes the next write.
    let n = (MAX_RECORD / MAX_PAYLOAD_BYTES + 1) as u64;
    let batch = (10..10 + n)
        .map(|i| (i, vector(i), Some(at_limit.clone())))
        .collect();
    assert!(matches!(
        svc.upsert("c", batch),
        Err(ServiceError::Wal(WalError::TooLarge(_)))
    ));
    svc.upsert("c", vec![(2, vector(2), None)]).unwrap();
    drop(svc);
    let svc = open(dir.path());
    assert_eq!(
        svc.get("c", 1).unwrap().payload.as_deref(),
        Some(&*at_limit)
    );
    assert!(svc.get("c", 2).is_ok());
    assert!(
        svc.get("c", 10).is_err(),
        "nothing of the refused batch was kept"
    );
}

#[test]
fn an_inventory_claiming_absurd_sizes_is_recosted_by_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let info = svc
        .create_collection("c", DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
    svc.upsert("c", vec![(1, vector(1), Some("\"abc\"".into()))])
        .unwrap();
    let held = |id, bytes| HeldVector { id, lsn: 2, bytes };
    let inventory = Inventory {
        collection_id: info.id.0,
        version: 3,
        // Id 1 the cloud holds; id 2 it does not. Summed, the claims wrap a u64.
        vectors: vec![held(1, u64::MAX - 1), held(2, u64::MAX - 1)],
        anchors: Vec::new(),
    };
    svc.commit_edge_reset("edge-1", inventory).unwrap();
    let expected = vector_bytes(DIM, 5) + vector_bytes(DIM, MAX_PAYLOAD_BYTES);
    let manifest = svc.catalog().edge_cache("edge-1", info.id.0).unwrap();
    assert_eq!(manifest.bytes(), expected);
    // The log goes on taking writes, and recovery rebuilds the same manifest.
    svc.upsert("c", vec![(2, vector(2), None)]).unwrap();
    drop(svc);
    let svc = open(dir.path());
    assert_eq!(
        svc.catalog()
            .edge_cache("edge-1", info.id.0)
            .unwrap()
            .bytes(),
        expected
    );
}

#[test]
fn deleting_ids_cannot_grow_memory_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let info = svc
        .create_collection("c", DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
    let c = svc.catalog().get("c").unwrap();
    // Ids that never existed leave nothing behind.
    for chunk in (1_000_000..1_050_000u64).collect::<Vec<_>>().chunks(10_000) {
        svc.delete("c", chunk.to_vec()).unwrap();
    }
    assert_eq!(c.remembered_deletions(), 0);

    // Deletions of real points are remembered while an edge may hold them, then forgotten.
    let n = 6_000u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        svc.upsert("c", chunk.iter().map(|&i| (i, vector(i), None)).collect())
            .unwrap();
    }
    let held = (0..10)
        .map(|id| HeldVector {
            id,
            lsn: 2,
            bytes: 1,
        })
        .collect();
    svc.commit_edge_reset(
        "edge-1",
        Inventory {
            collection_id: info.id.0,
            version: 1,
            vectors: held,
            anchors: Vec::new(),
        },
    )
    .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        svc.delete("c", chunk.to_vec()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.remembered_deletions() > 10 {
        assert!(
            Instant::now() < deadline,
            "{} deletions still remembered",
            c.remembered_deletions()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.remembered_deletions(),
        10,
        "the ids an edge holds are kept"
    );
    assert!(c.deleted_at(3).is_some());
}
