//! The service over a real data directory: acknowledged writes survive restarts, concurrent
//! writers share fsyncs, a torn WAL tail is truncated, earlier corruption is refused with the
//! file and offset, checkpoints bound replay, deletes and replacements are honoured at once.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tiervec_cloud::collection::SearchParams;
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::service::{Service, ServiceError};
use tiervec_cloud::storage::LogName;
use tiervec_cloud::storage::wal::{self, WalError};
use tiervec_shared::Metric;
use tiervec_shared::hnsw::HnswParams;
use tiervec_test_support::vectors::family_vector;

const DIM: usize = 8;

fn config(dir: &Path) -> CloudConfig {
    CloudConfig {
        data_dir: dir.to_owned(),
        ..CloudConfig::default()
    }
}

fn points(ids: std::ops::Range<u64>, version: u64) -> Vec<(u64, Vec<f32>, Option<String>)> {
    ids.map(|id| {
        (
            id,
            family_vector(version, id, DIM),
            Some(format!("{{\"v\":{version}}}")),
        )
    })
    .collect()
}

fn open_with(dir: &Path) -> Service {
    Service::open(config(dir)).unwrap()
}

fn create(svc: &Service, name: &str) {
    svc.create_collection(name, DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
}

fn top1(svc: &Service, name: &str, q: &[f32]) -> u64 {
    let params = SearchParams {
        k: 1,
        ef: 32,
        exact: true,
        max_distance: None,
    };
    svc.search(name, q, &params).unwrap().hits[0].id
}

#[test]
fn acknowledged_writes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let svc = open_with(dir.path());
        create(&svc, "c");
        svc.upsert("c", points(0..100, 0)).unwrap();
        svc.upsert("c", points(50..60, 1)).unwrap();
        svc.delete("c", vec![7, 8, 1000]).unwrap();
    }
    let svc = open_with(dir.path());
    assert_eq!(svc.start_report().wal.records_replayed, 4);
    let c = svc.catalog().get("c").unwrap();
    assert_eq!(c.len(), 98);
    assert!(svc.get("c", 7).is_err());
    let p = svc.get("c", 55).unwrap();
    assert_eq!(p.payload.as_deref(), Some("{\"v\":1}"));
    let mut want = family_vector(1, 55, DIM);
    Metric::Cosine.prepare(&mut want);
    assert_eq!(p.vector, want);
    assert_eq!(top1(&svc, "c", &family_vector(0, 3, DIM)), 3);
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open_with(dir.path());
    match Service::open(config(dir.path())) {
        Err(ServiceError::DataDir { what, .. }) => assert!(what.contains("LOCK")),
        other => panic!("second open must be refused, got {:?}", other.err()),
    }
}

#[test]
fn concurrent_writers_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(open_with(dir.path()));
    create(&svc, "c");
    let before = svc.wal_flushes();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let svc = svc.clone();
            std::thread::spawn(move || {
                for b in 0..25u64 {
                    let base = (t * 25 + b) * 4;
                    svc.upsert("c", points(base..base + 4, 0)).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let flushes = svc.wal_flushes() - before;
    assert_eq!(svc.catalog().get("c").unwrap().len(), 800);
    assert!(
        flushes < 200,
        "200 writes took {flushes} fsyncs: no group commit happened"
    );
    drop(svc);
    assert_eq!(open_with(dir.path()).catalog().get("c").unwrap().len(), 800);
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    wal::segments(dir).unwrap().pop().unwrap().1
}

#[test]
fn a_torn_tail_is_truncated_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let svc = open_with(dir.path());
        create(&svc, "c");
        svc.upsert("c", points(0..10, 0)).unwrap();
    }
    let seg = last_segment(dir.path());
    let good_len = std::fs::metadata(&seg).unwrap().len();
    // A record header promising more than was written, as a crash mid-write leaves it.
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[200, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3])
        .unwrap();
    drop(f);
    let svc = open_with(dir.path());
    let (path, offset, _) = svc
        .start_report()
        .wal
        .truncated
        .clone()
        .expect("torn tail reported");
    assert_eq!((path, offset), (seg.clone(), good_len));
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
    assert_eq!(svc.catalog().get("c").unwrap().len(), 10);
    // The log keeps working after the truncation.
    svc.upsert("c", points(10..12, 0)).unwrap();
    drop(svc);
    assert_eq!(open_with(dir.path()).catalog().get("c").unwrap().len(), 12);
}

#[test]
fn corruption_before_valid_records_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let svc = open_with(dir.path());
        create(&svc, "c");
        svc.upsert("c", points(0..10, 0)).unwrap();
        svc.upsert("c", points(10..20, 0)).unwrap();
    }
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the second record (the first upsert's body): the third record still follows.
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    match Service::open(config(dir.path())) {
        Err(ServiceError::Wal(WalError::BadEntry { path, offset, what })) => {
            assert_eq!(path, seg);
            assert!(offset < at as u64);
            let msg = ServiceError::Wal(WalError::BadEntry { path, offset, what }).to_string();
            assert!(
                msg.contains("wal-") && msg.contains(&format!("byte {offset}")),
                "{msg}"
            );
        }
        other => panic!("corruption must be refused, got {:?}", other.err()),
    }
    // Refused again on the next start: never a silent skip, and the file is left as it was.
    assert!(Service::open(config(dir.path())).is_err());
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

/// A data directory written by the release whose log was format version 1 (frozen in
/// `tests/fixtures/wal-v1/` from that release's `tiervec-cloud serve`: collection `v1`, dim 4,
/// l2, points 1..=5 with payloads, point 2 deleted, point 3 replaced) opens with every write,
/// takes new writes in a version-2 segment beside the old one, and reopens with both.
#[test]
fn a_version_1_wal_is_read_and_continued_in_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wal-v1");
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let check = |svc: &Service, extra: usize| {
        let c = svc.catalog().get("v1").unwrap();
        assert_eq!(c.len(), 4 + extra);
        assert!(c.get(2).is_none(), "the delete is replayed");
        let p = c.get(3).unwrap();
        assert_eq!(p.vector, vec![30.0, 3.0, 3.0, 3.0], "the replacement wins");
        assert_eq!(p.payload.as_deref(), Some(r#"{"text":"three again"}"#));
    };
    {
        let svc = open_with(dir.path());
        check(&svc, 0);
        svc.upsert("v1", vec![(6, vec![6.0; 4], None)]).unwrap();
        check(&svc, 1);
    }
    let segments = wal::segments(dir.path()).unwrap();
    assert_eq!(segments.len(), 2, "{segments:?}");
    let newest = std::fs::read(&segments[1].1).unwrap();
    assert_eq!(
        &newest[8..12],
        &2u32.to_le_bytes(),
        "new records go to a version-2 segment"
    );
    check(&open_with(dir.path()), 1);
}

#[test]
fn checkpoints_bound_replay_and_drop_covered_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let svc = open_with(dir.path());
        create(&svc, "c");
        svc.upsert("c", points(0..300, 0)).unwrap();
        svc.delete("c", vec![0, 1, 2]).unwrap();
        let lsn = svc.checkpoint().unwrap().cut.of(LogName::Embedded);
        assert_eq!(lsn, Some(3));
        svc.upsert("c", points(300..310, 0)).unwrap();
        assert_eq!(
            wal::segments(dir.path()).unwrap().len(),
            1,
            "covered segments are deleted"
        );
    }
    let svc = open_with(dir.path());
    let report = svc.start_report();
    assert_eq!(report.checkpoint.as_ref().map(|c| c.1), Some(3));
    assert_eq!(report.wal.records_replayed, 1);
    let c = svc.catalog().get("c").unwrap();
    assert_eq!(c.len(), 307);
    assert!(svc.get("c", 1).is_err());
    assert_eq!(svc.get("c", 305).unwrap().lsn, 4);
}

#[test]
fn deletes_and_replacements_are_seen_by_the_next_search() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path());
    create(&svc, "c");
    svc.upsert("c", points(0..3000, 0)).unwrap();
    assert!(svc.wait_indexed(Duration::from_secs(60)));
    let graph = SearchParams {
        k: 5,
        ef: 64,
        exact: false,
        max_distance: None,
    };
    let q = family_vector(0, 1234, DIM);
    let answer = svc.search("c", &q, &graph).unwrap();
    let (hits, engine) = (answer.hits, answer.engine);
    assert_eq!(engine, tiervec_cloud::collection::Engine::Graph);
    assert_eq!(hits[0].id, 1234);
    svc.delete("c", vec![1234]).unwrap();
    let hits = svc.search("c", &q, &graph).unwrap().hits;
    assert!(hits.iter().all(|h| h.id != 1234), "deleted point returned");
    // Replacing a point moves it: the old vector no longer finds it.
    svc.upsert("c", vec![(42, family_vector(5, 9999, DIM), None)])
        .unwrap();
    let hits = svc
        .search("c", &family_vector(0, 42, DIM), &graph)
        .unwrap()
        .hits;
    assert!(hits.first().is_none_or(|h| h.id != 42 || h.distance > 1e-4));
    assert_eq!(
        svc.search("c", &family_vector(5, 9999, DIM), &graph)
            .unwrap()
            .hits[0]
            .id,
        42
    );
}

/// Deleting every near neighbour of a query leaves tombstones in front of the graph search's
/// re-ranked window; the search widens until it has `k` live answers, and they are the live
/// exact top-`k`.
#[test]
fn a_query_whose_neighbours_were_all_deleted_still_gets_k_answers() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path());
    create(&svc, "c");
    svc.upsert("c", points(0..3000, 0)).unwrap();
    assert!(svc.wait_indexed(Duration::from_secs(60)));
    let q = family_vector(0, 77, DIM);
    let exact = |k| SearchParams {
        k,
        ef: 64,
        exact: true,
        max_distance: None,
    };
    let nearest: Vec<u64> = svc
        .search("c", &q, &exact(100))
        .unwrap()
        .hits
        .iter()
        .map(|h| h.id)
        .collect();
    svc.delete("c", nearest).unwrap();
    let graph = SearchParams {
        k: 10,
        ef: 64,
        exact: false,
        max_distance: None,
    };
    let answer = svc.search("c", &q, &graph).unwrap();
    let (hits, engine) = (answer.hits, answer.engine);
    assert_eq!(engine, tiervec_cloud::collection::Engine::Graph);
    assert_eq!(hits.len(), 10, "answered short: {hits:?}");
    let live_truth: Vec<u64> = svc
        .search("c", &q, &exact(10))
        .unwrap()
        .hits
        .iter()
        .map(|h| h.id)
        .collect();
    let found = hits.iter().filter(|h| live_truth.contains(&h.id)).count();
    assert!(found >= 8, "recall {found}/10 among live points");
}

#[test]
fn a_recreated_collection_is_a_new_identity() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path());
    create(&svc, "c");
    let first = svc.catalog().get("c").unwrap().info.id;
    svc.upsert("c", points(0..5, 0)).unwrap();
    svc.drop_collection("c").unwrap();
    assert!(matches!(
        svc.upsert("c", points(0..1, 0)),
        Err(ServiceError::CollectionNotFound(_))
    ));
    create(&svc, "c");
    let second = svc.catalog().get("c").unwrap();
    assert_ne!(second.info.id, first);
    assert!(second.is_empty());
    assert!(matches!(
        svc.create_collection("c", DIM, Metric::Cosine, HnswParams::default()),
        Err(ServiceError::CollectionExists(_))
    ));
    drop((second, svc));
    let svc = open_with(dir.path());
    let c = svc.catalog().get("c").unwrap();
    assert_ne!(c.info.id, first);
    assert!(c.is_empty());
}

#[test]
fn heavy_tombstones_trigger_a_graph_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path());
    create(&svc, "c");
    svc.upsert("c", points(0..4000, 0)).unwrap();
    assert!(svc.wait_indexed(Duration::from_secs(60)));
    svc.delete("c", (0..1500).collect()).unwrap();
    let c = svc.catalog().get("c").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    assert!(
        c.index_dead_fraction() > 0.3,
        "1,500 of 4,000 indexed points deleted"
    );
    while (c.index_dead_fraction() > 0.0 || c.generation_len() < c.slots())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.index_dead_fraction(),
        0.0,
        "the graph was rebuilt without the tombstones"
    );
    let graph = SearchParams {
        k: 10,
        ef: 64,
        exact: false,
        max_distance: None,
    };
    for id in [1500u64, 2000, 3999] {
        let hits = svc
            .search("c", &family_vector(0, id, DIM), &graph)
            .unwrap()
            .hits;
        assert_eq!(hits.len(), 10);
        assert_eq!(hits[0].id, id);
        assert!(hits.iter().all(|h| h.id >= 1500));
    }
}

#[test]
fn bad_writes_are_refused_before_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path());
    create(&svc, "c");
    let lsn_before = svc.upsert("c", points(0..1, 0)).unwrap().position;
    let mut nan = family_vector(0, 1, DIM);
    nan[3] = f32::NAN;
    assert!(matches!(
        svc.upsert("c", vec![(1, nan, None)]),
        Err(ServiceError::BadPoint {
            index: 0,
            id: 1,
            ..
        })
    ));
    assert!(matches!(
        svc.upsert("c", vec![(1, vec![0.5; DIM + 1], None)]),
        Err(ServiceError::BadPoint { .. })
    ));
    assert!(matches!(
        svc.create_collection("bad name!", 4, Metric::L2, HnswParams::default()),
        Err(ServiceError::Invalid(_))
    ));
    assert!(matches!(
        svc.create_collection("z", 0, Metric::L2, HnswParams::default()),
        Err(ServiceError::Invalid(_))
    ));
    assert_eq!(
        svc.upsert("c", points(5..6, 0)).unwrap().position,
        lsn_before + 1,
        "refused writes took no LSN"
    );
}

#[test]
fn load_into_a_stopped_servers_directory_and_inspect_it() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<f32> = (0..40).flat_map(|i| family_vector(0, i, DIM)).collect();
    let fvecs = dir.path().join("v.fvecs");
    std::fs::write(&fvecs, tiervec_shared::vecs::encode_fvecs(DIM, &data)).unwrap();
    let jsonl = dir.path().join("t.jsonl");
    std::fs::write(
        &jsonl,
        (0..40)
            .map(|i| format!("{{\"id\":{i},\"text\":\"t{i}\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_tiervec-cloud");
    let out = std::process::Command::new(bin)
        .current_dir(dir.path())
        .args(["load", "--collection", "c", "--batch", "16", "--data-dir"])
        .arg(&data_dir)
        .arg("--fvecs")
        .arg(&fvecs)
        .arg("--jsonl")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = std::process::Command::new(bin)
        .arg("inspect")
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("4 records (LSN 1..=4)"), "{text}");
    // While a server holds the directory, a direct load is refused.
    let svc = open_with(&data_dir);
    assert_eq!(svc.catalog().get("c").unwrap().len(), 40);
    assert_eq!(
        svc.get("c", 7).unwrap().payload.as_deref(),
        Some("{\"id\":7,\"text\":\"t7\"}"),
        "the payload is the line's whole object"
    );
    let refused = std::process::Command::new(bin)
        .current_dir(dir.path())
        .args(["load", "--collection", "c", "--data-dir"])
        .arg(&data_dir)
        .arg("--fvecs")
        .arg(&fvecs)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("LOCK"));
}

/// rkyv's 2 GiB archive limit, injected small: with 1 KiB chunks a checkpoint of 2,000 points
/// is hundreds of chunks, and a restart from it recovers every point, payload and LSN.
#[test]
fn a_checkpoint_in_many_chunks_recovers_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let config = CloudConfig {
        checkpoint_chunk_bytes: 1 << 10,
        ..config(dir.path())
    };
    let before: Vec<_> = {
        let svc = Service::open(config.clone()).unwrap();
        create(&svc, "c");
        for batch in 0..4 {
            svc.upsert("c", points(batch * 500..(batch + 1) * 500, batch))
                .unwrap();
        }
        svc.delete("c", vec![7, 8]).unwrap();
        svc.checkpoint().unwrap();
        (0..2_000).map(|id| svc.get("c", id).ok()).collect()
    };
    let (_, file) = tiervec_cloud::storage::checkpoint::list(dir.path())
        .unwrap()
        .pop()
        .unwrap();
    let chunks = u64::from_le_bytes(std::fs::read(&file).unwrap()[32..40].try_into().unwrap());
    assert!(chunks > 100, "{chunks} chunks");
    let svc = Service::open(config).unwrap();
    assert_eq!(svc.start_report().wal.records_replayed, 0);
    let after: Vec<_> = (0..2_000).map(|id| svc.get("c", id).ok()).collect();
    assert_eq!(after, before);
    assert_eq!(after.iter().flatten().count(), 1_998);
}
