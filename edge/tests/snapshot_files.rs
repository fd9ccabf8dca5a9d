//! Snapshot files on a real filesystem: atomic writes, memory-mapped opening, the search API's
//! typed errors, and one typed error per kind of corruption.

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use tiervec_edge::{EdgeError, EdgeIndex, write_snapshot_atomic};
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::query::{MAX_K, QueryError};
use tiervec_shared::snapshot::{self, Expected, SnapshotBody, SnapshotError, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric, exact};
use tiervec_test_support::vectors::family_vector;

const DIM: usize = 16;

fn spec(params: HnswParams) -> SnapshotSpec {
    SnapshotSpec {
        collection: CollectionId::from_u128(42),
        dim: DIM as u32,
        metric: Metric::Cosine,
        params,
    }
}

fn encode(n: usize, seed: u64, payloads: bool) -> Vec<u8> {
    let params = HnswParams::default();
    let mut b = HnswBuilder::new(DIM, Metric::Cosine, params);
    for i in 0..n {
        b.insert(&family_vector(seed, i as u64, DIM)).unwrap();
    }
    let texts: Vec<String> = (0..n).map(|i| format!("text of {i}")).collect();
    let body = SnapshotBody::from_builder(
        &b,
        "test",
        (0..n as u64).map(|i| i * 10).collect(),
        (0..n as u64).collect(),
        payloads.then_some(&texts[..]),
    )
    .unwrap();
    snapshot::encode(&spec(params), &body).unwrap().to_vec()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    write_snapshot_atomic(&path, bytes).unwrap();
    path
}

fn open_err(path: &Path) -> SnapshotError {
    match EdgeIndex::open(path) {
        Err(EdgeError::Snapshot { source, .. }) => source,
        Err(other) => panic!("expected a snapshot error, got {other}"),
        Ok(_) => panic!("{} opened although corrupt", path.display()),
    }
}

/// Writes bytes without the atomic writer (it refuses nothing, but the file would be read-only
/// and these tests overwrite files freely).
fn write_raw(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn atomic_write_leaves_one_read_only_file_and_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.tvs", &encode(50, 1, true));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a.tvs")]);
    assert!(std::fs::metadata(&path).unwrap().permissions().readonly());
    // Replacing it is a rename over the old file, even though that file is read-only.
    write(dir.path(), "a.tvs", &encode(60, 2, true));
    assert_eq!(EdgeIndex::open(&path).unwrap().len(), 60);
}

#[test]
fn a_reader_of_the_old_file_is_unaffected_by_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "s.tvs", &encode(50, 1, true));
    let old = EdgeIndex::open(&path).unwrap();
    let before = old
        .search(&family_vector(1, 7, DIM), 5, 32)
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect::<Vec<_>>();
    write(dir.path(), "s.tvs", &encode(80, 9, false));
    let after = old
        .search(&family_vector(1, 7, DIM), 5, 32)
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect::<Vec<_>>();
    assert_eq!(before, after);
    assert_eq!(EdgeIndex::open(&path).unwrap().len(), 80);
}

#[test]
fn search_returns_ids_distances_lsns_and_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "s.tvs", &encode(300, 3, true));
    for index in [
        EdgeIndex::open(&path).unwrap(),
        EdgeIndex::load(&path).unwrap(),
    ] {
        let hits = index.search(&family_vector(3, 42, DIM), 3, 64).unwrap();
        assert_eq!(hits.len(), 3);
        assert_eq!(hits[0].id, 420, "ids are the cloud ids, not node numbers");
        assert_eq!(hits[0].lsn, 42);
        assert_eq!(hits[0].payload.as_deref(), Some("text of 42"));
        assert!(hits[0].distance.abs() < 1e-5);
        assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
    }
}

#[test]
fn bad_requests_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let index = EdgeIndex::open(&write(dir.path(), "s.tvs", &encode(50, 1, false))).unwrap();
    let q = family_vector(1, 1, DIM);
    let query_err = |r: Result<Vec<tiervec_edge::Hit<'_>>, EdgeError>| match r {
        Err(EdgeError::Query(e)) => e,
        other => panic!("expected a query error, got {other:?}"),
    };
    assert_eq!(
        query_err(index.search(&q[..3], 5, 10)),
        QueryError::DimensionMismatch {
            expected: DIM,
            found: 3
        }
    );
    let mut nan = q.clone();
    nan[4] = f32::NAN;
    assert!(matches!(
        query_err(index.search(&nan, 5, 10)),
        QueryError::NonFinite { index: 4, .. }
    ));
    let mut inf = q.clone();
    inf[0] = f32::INFINITY;
    assert!(matches!(
        query_err(index.search(&inf, 5, 10)),
        QueryError::NonFinite { index: 0, .. }
    ));
    assert_eq!(query_err(index.search(&q, 0, 10)), QueryError::ZeroK);
    assert!(matches!(
        query_err(index.search(&q, MAX_K + 1, 10)),
        QueryError::KTooLarge { .. }
    ));
    assert!(matches!(
        query_err(index.search(&q, 5, usize::MAX)),
        QueryError::EfTooLarge { .. }
    ));
    // k above the number of vectors is fine: all of them come back.
    assert_eq!(index.search(&q, MAX_K, 10).unwrap().len(), 50);
}

#[test]
fn empty_snapshot_is_valid_and_answers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let index = EdgeIndex::open(&write(dir.path(), "e.tvs", &encode(0, 0, true))).unwrap();
    assert!(index.is_empty());
    assert!(
        index
            .search(&family_vector(0, 0, DIM), 10, 64)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn dimension_metric_and_collection_expectations_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "s.tvs", &encode(20, 1, false));
    let expected = Expected {
        dim: Some(384),
        ..Expected::default()
    };
    match EdgeIndex::open_expecting(&path, &expected) {
        Err(EdgeError::Snapshot {
            source:
                SnapshotError::DimensionMismatch {
                    expected: 384,
                    found: 16,
                },
            ..
        }) => {}
        other => panic!("expected a dimension mismatch, got {:?}", other.err()),
    }
    let right = Expected {
        dim: Some(16),
        metric: Some(Metric::Cosine),
        collection: Some(CollectionId::from_u128(42)),
    };
    assert!(EdgeIndex::open_expecting(&path, &right).is_ok());
}

#[test]
fn every_corruption_has_its_own_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = encode(200, 5, true);
    let len = good.len();

    // Truncation at several offsets: inside the magic, the header, and the body.
    for cut in [0, 5, 8, 11, 64, 127] {
        let err = open_err(&write_raw(dir.path(), "t.tvs", &good[..cut]));
        assert!(
            matches!(err, SnapshotError::TooShort { .. }),
            "cut at {cut}: {err}"
        );
    }
    for cut in [128, 129, 4096, len / 2, len - 1] {
        let err = open_err(&write_raw(dir.path(), "t.tvs", &good[..cut]));
        assert_eq!(
            err,
            SnapshotError::Truncated {
                expected: len as u64,
                actual: cut as u64
            },
            "cut at {cut}"
        );
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 16]);
    assert!(matches!(
        open_err(&write_raw(dir.path(), "t.tvs", &longer)),
        SnapshotError::TrailingBytes { .. }
    ));

    // Wrong magic, and a file that is not a snapshot at all.
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(
        open_err(&write_raw(dir.path(), "t.tvs", &magic)),
        SnapshotError::BadMagic { .. }
    ));
    assert!(matches!(
        open_err(&write_raw(
            dir.path(),
            "t.tvs",
            b"{\"not\": \"a snapshot\"}"
        )),
        SnapshotError::BadMagic { .. }
    ));

    // A newer (and an older) format version.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(snapshot::FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(
        open_err(&write_raw(dir.path(), "t.tvs", &newer)),
        SnapshotError::NewerVersion {
            found: snapshot::FORMAT_VERSION + 1,
            newest: snapshot::FORMAT_VERSION
        }
    );
    let mut older = good.clone();
    older[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        open_err(&write_raw(dir.path(), "t.tvs", &older)),
        SnapshotError::OlderVersion { .. }
    ));

    // Flipped bits in every header field, and at several places in the body.
    for at in [13, 16, 20, 21, 22, 30, 40, 50, 66, 75, 85, 100, 121] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        let err = open_err(&write_raw(dir.path(), "t.tvs", &flipped));
        assert!(
            matches!(err, SnapshotError::HeaderChecksum { .. }),
            "flip at {at}: {err}"
        );
    }
    for at in [128, 200, len / 3, len / 2, len - 8, len - 1] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x01;
        let err = open_err(&write_raw(dir.path(), "t.tvs", &flipped));
        assert!(
            matches!(err, SnapshotError::BodyChecksum { .. }),
            "flip at {at}: {err}"
        );
    }

    // A missing file is an IO error naming the path.
    match EdgeIndex::open(&dir.path().join("missing.tvs")) {
        Err(e @ EdgeError::Io { .. }) => assert!(e.to_string().contains("missing.tvs")),
        other => panic!("expected an IO error, got {:?}", other.err()),
    }
}

#[test]
fn inspect_reports_valid_and_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = encode(120, 4, true);
    let path = write(dir.path(), "s.tvs", &good);
    let out = Command::new(env!("CARGO_BIN_EXE_tiervec-edge"))
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "format version:  2",
        "vectors:         120",
        "dimension:       16",
        "layer 0: 120 nodes",
        "validates:       yes",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let mut bad = good;
    let n = bad.len();
    bad[n - 10] ^= 0xff;
    let path = write_raw(dir.path(), "bad.tvs", &bad);
    let out = Command::new(env!("CARGO_BIN_EXE_tiervec-edge"))
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("vectors:         120")
            && text.contains("validates:       no: snapshot body is corrupt"),
        "{text}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever goes in comes back out of the file, and graph search agrees with exact search
    /// on a stored vector's nearest neighbour (itself).
    #[test]
    fn snapshot_round_trips_through_a_file(
        rows in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, DIM), 0..60),
        payloads in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let params = HnswParams { seed, ..HnswParams::default() };
        let mut b = HnswBuilder::new(DIM, Metric::Cosine, params);
        for r in &rows {
            b.insert(r).unwrap();
        }
        let n = rows.len();
        let texts: Vec<String> = (0..n).map(|i| "ü".repeat(i % 4) + &i.to_string()).collect();
        let ids: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let lsns: Vec<u64> = (0..n as u64).map(|i| i + 100).collect();
        let body = SnapshotBody::from_builder(&b, "p", ids.clone(), lsns.clone(), payloads.then_some(&texts[..])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "p.tvs", &snapshot::encode(&spec(params), &body).unwrap());
        let index = EdgeIndex::open(&path).unwrap();
        let view = index.view();
        prop_assert_eq!(view.ids(), &ids[..]);
        prop_assert_eq!(view.vectors(), b.vectors());
        prop_assert_eq!(view.to_body().unwrap(), body);
        for i in 0..n as u32 {
            prop_assert_eq!(view.lsn(i), Some(lsns[i as usize]));
            let payload = view.payload(i);
            prop_assert_eq!(payload.as_deref(), payloads.then(|| texts[i as usize].as_str()));
            let q = view.vector(i).unwrap();
            // Skip zero rows: every row is then equally far from them.
            if q.iter().all(|&x| x == 0.0) {
                continue;
            }
            let truth = exact::search(view.vectors(), DIM, Metric::Cosine, q, 1)[0];
            let hits = index.search(q, 1, 64).unwrap();
            prop_assert!((hits[0].distance - truth.distance).abs() <= 1e-5);
        }
    }
}

/// The cache at start-up: a damaged snapshot or delta log is renamed aside (kept, never
/// deleted), reported, and the cache opens with what remains; deltas replay on top of a good
/// snapshot, and ones that do not follow it are dropped (the cloud resyncs them).
#[test]
fn a_damaged_cache_file_is_set_aside_and_the_rest_opens() {
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    use tiervec_shared::push::{Delta, PushedVector, Tombstone};

    let dir = tempfile::tempdir().unwrap();
    let snapshot = write(dir.path(), "cache.tvs", &encode(50, 1, true));
    let config = CacheConfig::beside(&snapshot, 1 << 20);
    let delta = |version: u64| Delta {
        collection_id: CollectionId::from_u128(42).0,
        dim: DIM as u32,
        metric: Metric::Cosine.code(),
        version,
        vectors: vec![PushedVector {
            id: 1_000 + version,
            lsn: 100 + version,
            vector: family_vector(9, 1_000 + version, DIM),
            payload: Some(format!("pushed {version}")),
        }],
        tombstones: vec![Tombstone { id: 0, lsn: 99 }],
        ..Delta::default()
    };
    {
        let (cache, report) = EdgeCache::open(config.clone()).unwrap();
        assert!(report.set_aside.is_empty());
        assert_eq!((cache.version(), cache.usage().0), (0, 50));
        for v in 1..=3 {
            cache.apply(&delta(v), 0).unwrap();
        }
        assert!(
            cache.apply(&delta(2), 0).unwrap().duplicate,
            "a replay is harmless"
        );
        assert_eq!((cache.version(), cache.usage().0), (3, 52));
    }
    // Reopened: the deltas replay over the snapshot.
    let (cache, _) = EdgeCache::open(config.clone()).unwrap();
    assert_eq!((cache.version(), cache.usage().0), (3, 52));
    let hits = cache
        .search(&family_vector(9, 1_003, DIM), 1, 32)
        .unwrap()
        .hits;
    assert_eq!(
        (hits[0].id, hits[0].payload.as_deref()),
        (1_003, Some("pushed 3"))
    );
    assert!(
        cache
            .search(&family_vector(1, 0, DIM), 5, 32)
            .unwrap()
            .hits
            .iter()
            .all(|h| h.id != 0),
        "the tombstoned snapshot vector stays hidden"
    );
    drop(cache);

    // A flipped byte in the middle of the delta log: set aside, the snapshot alone opens.
    let deltas = config.deltas.clone();
    let mut bytes = std::fs::read(&deltas).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&deltas, &bytes).unwrap();
    let (cache, report) = EdgeCache::open(config.clone()).unwrap();
    assert_eq!(report.set_aside.len(), 1, "{report:?}");
    assert!(
        report.set_aside[0]
            .0
            .to_string_lossy()
            .contains("cache.deltas.corrupt-")
    );
    assert!(report.set_aside[0].0.exists(), "kept for inspection");
    assert_eq!((cache.version(), cache.usage().0), (0, 50));
    drop(cache);

    // A truncated snapshot: set aside too; the cache opens empty and unbound.
    let snap_bytes = std::fs::read(&snapshot).unwrap();
    std::fs::remove_file(&snapshot).unwrap();
    write_raw(
        dir.path(),
        "cache.tvs",
        &snap_bytes[..snap_bytes.len() - 100],
    );
    let (cache, report) = EdgeCache::open(config.clone()).unwrap();
    assert_eq!(report.set_aside.len(), 1, "{report:?}");
    assert_eq!((cache.version(), cache.usage().0), (0, 0));
    assert_eq!(cache.collection_id(), [0; 16]);
    assert!(
        cache
            .search(&family_vector(1, 1, DIM), 3, 32)
            .unwrap()
            .hits
            .is_empty()
    );
    // A first delta binds it again.
    cache
        .apply(
            &Delta {
                version: 1,
                ..delta(1)
            },
            0,
        )
        .unwrap();
    assert_eq!(cache.collection_id(), CollectionId::from_u128(42).0);
}

/// Deltas that add no vector (tombstones) still lead to a compaction once enough of them
/// arrived, or once the log is large enough: the log and the deltas held in memory stay
/// bounded.
#[test]
fn deltas_without_vectors_still_lead_to_a_compaction() {
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    use tiervec_shared::push::{Delta, Tombstone};

    let dir = tempfile::tempdir().unwrap();
    let snapshot = write(dir.path(), "cache.tvs", &encode(50, 1, false));
    let tombstone = |version: u64| Delta {
        collection_id: CollectionId::from_u128(42).0,
        dim: DIM as u32,
        metric: Metric::Cosine.code(),
        version,
        // Snapshot ids are multiples of 10: delta v removes id 10·v.
        tombstones: vec![Tombstone {
            id: 10 * version,
            lsn: 100 + version,
        }],
        ..Delta::default()
    };
    for (by_count, config) in [
        (
            true,
            CacheConfig {
                compact_after_deltas: 3,
                ..CacheConfig::beside(&snapshot, 1 << 20)
            },
        ),
        (
            false,
            CacheConfig {
                compact_after_log_bytes: 1,
                ..CacheConfig::beside(&snapshot, 1 << 20)
            },
        ),
    ] {
        let (cache, _) = EdgeCache::open(config.clone()).unwrap();
        let base = cache.version();
        cache.apply(&tombstone(base + 1), 0).unwrap();
        if by_count {
            assert!(!cache.wants_compaction(), "one delta of three");
            cache.apply(&tombstone(base + 2), 0).unwrap();
            assert!(!cache.wants_compaction(), "two deltas of three");
            cache.apply(&tombstone(base + 3), 0).unwrap();
        }
        assert_eq!(cache.overlay_len(), 0, "no vector was added");
        assert!(cache.wants_compaction());
        let log_before = std::fs::metadata(&config.deltas).unwrap().len();
        let last = cache.version();
        assert_eq!(cache.compact().unwrap(), Some(last));
        if by_count {
            assert!(!cache.wants_compaction(), "the count starts again");
        }
        assert!(std::fs::metadata(&config.deltas).unwrap().len() < log_before);
        drop(cache);
        // Reopened from the new snapshot alone: the tombstoned ids stay gone.
        let (cache, report) = EdgeCache::open(config).unwrap();
        assert_eq!((report.replayed_deltas, cache.version()), (0, last));
        assert_eq!(cache.usage().0, 50 - last as usize);
        let hits = cache
            .search(&family_vector(1, 0, DIM), 50, 64)
            .unwrap()
            .hits;
        assert_eq!(hits.len(), 50 - last as usize);
        assert!(
            hits.iter().all(|h| h.id == 0 || h.id > 10 * last),
            "a tombstoned id came back"
        );
    }
}

/// `encode` with the manifest version set, as a streamed snapshot carries it.
fn encode_at(n: usize, version: u64) -> Vec<u8> {
    let params = HnswParams::default();
    let mut b = HnswBuilder::new(DIM, Metric::Cosine, params);
    for i in 0..n {
        b.insert(&family_vector(3, i as u64, DIM)).unwrap();
    }
    let mut body = SnapshotBody::from_builder(
        &b,
        "test",
        (0..n as u64).collect(),
        (1..=n as u64).collect(),
        None,
    )
    .unwrap();
    body.manifest_version = version;
    snapshot::encode(&spec(params), &body).unwrap().to_vec()
}

#[test]
fn a_streamed_snapshot_is_installed_only_when_whole_valid_and_newer() {
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    use tiervec_shared::protocol::frame::SnapshotBegin;

    let dir = tempfile::tempdir().unwrap();
    let (cache, _) =
        EdgeCache::open(CacheConfig::beside(&dir.path().join("cache.tvs"), 1 << 20)).unwrap();
    let collection_id = CollectionId::from_u128(42).0;
    let begin = |bytes: &[u8], version| SnapshotBegin {
        collection_id,
        version,
        len: bytes.len() as u64,
        checksum: xxhash_rust::xxh3::xxh3_64(bytes),
    };
    let incoming = cache.new_incoming_path().unwrap();

    // A corrupt file is refused and removed; the cache is unchanged.
    let mut corrupt = encode_at(50, 7);
    let at = corrupt.len() / 2;
    corrupt[at] ^= 0xff;
    std::fs::write(&incoming, &corrupt).unwrap();
    assert!(
        cache
            .install_snapshot(&incoming, &begin(&corrupt, 7))
            .is_err()
    );
    assert!(!incoming.exists());
    assert_eq!(cache.version(), 0);

    // A file whose own version differs from the announced one is refused.
    let good = encode_at(50, 7);
    std::fs::write(&incoming, &good).unwrap();
    let err = cache
        .install_snapshot(&incoming, &begin(&good, 8))
        .unwrap_err();
    assert!(err.to_string().contains("version"), "{err}");

    // A whole, valid, newer file replaces the cache, durable across a reopen.
    std::fs::write(&incoming, &good).unwrap();
    assert_eq!(
        cache.install_snapshot(&incoming, &begin(&good, 7)).unwrap(),
        7
    );
    assert_eq!((cache.version(), cache.usage().0), (7, 50));
    assert!(!incoming.exists());
    let hits = cache.search(&family_vector(3, 3, DIM), 1, 32).unwrap().hits;
    assert_eq!(hits[0].id, 3);
    drop(cache);
    // A transfer cut short by a crash leaves its file: removed at the next open.
    std::fs::write(&incoming, &good[..100]).unwrap();
    let (cache, report) =
        EdgeCache::open(CacheConfig::beside(&dir.path().join("cache.tvs"), 1 << 20)).unwrap();
    assert!(report.set_aside.is_empty());
    assert!(!incoming.exists());
    assert_eq!((cache.version(), cache.usage().0), (7, 50));

    // Not past the cache's version: refused.
    let older = encode_at(20, 7);
    std::fs::write(&incoming, &older).unwrap();
    let err = cache
        .install_snapshot(&incoming, &begin(&older, 7))
        .unwrap_err();
    assert!(err.to_string().contains("not past"), "{err}");
    assert_eq!(cache.usage().0, 50);
}
