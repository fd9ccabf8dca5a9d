//! The WASM edge worker against the native edge, on a 2,000-vector slice of the real dataset:
//! the same answers (ids, distances within 1e-5), deltas reaching the guest, a corrupt
//! snapshot refused with its code, a guest past its deadline stopped and replaced, the memory
//! cap, the on-disk module cache (a second start deserialises; a tampered file is detected
//! and recompiled; an unsafe directory refused), and certificates following the native
//! cache into the guests (taken, dropped at a new connection, handed over at compaction).
//!
//! The guest is built by `tiervec_test_support::guest` (with its `test-exports` feature).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_edge::wasm_engine::WasmEngine;
use tiervec_edge::wasm_host::{ModuleSource, WasmConfig, WasmError, WasmHost};
use tiervec_shared::certificate::euclidean;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::guest_abi as wire;
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::push::{Certificate, Delta, PushedAnchor, PushedVector, Tombstone, anchor_id};
use tiervec_shared::snapshot::{self, Snapshot, SnapshotBody, SnapshotSpec};
use tiervec_shared::vecs::{Matrix, parse_fvecs};
use tiervec_shared::{CollectionId, Metric};
use tiervec_test_support::net::free_tcp_port;
use tiervec_test_support::paths::data_dir;
use tiervec_test_support::process::ChildGuard;

const SLICE: usize = 2_000;
const QUERIES: usize = 200;
const COLLECTION: CollectionId = CollectionId::from_u128(0x77);

/// The guest with its test exports.
fn guest() -> &'static Path {
    tiervec_test_support::guest::test_guest()
}

/// The first `rows` vectors of an `.fvecs` file (only those bytes are read).
fn fvecs_prefix(name: &str, rows: usize) -> Matrix<f32> {
    use std::io::Read;
    let path = data_dir().join(name);
    let mut file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set TIERVEC_DATA)", path.display()));
    let mut dim = [0u8; 4];
    file.read_exact(&mut dim).expect("dimension");
    let row_bytes = 4 + 4 * u32::from_le_bytes(dim) as usize;
    let mut bytes = dim.to_vec();
    bytes.resize(rows * row_bytes, 0);
    file.read_exact(&mut bytes[4..]).expect("rows");
    parse_fvecs(&bytes).expect("fvecs")
}

struct Data {
    snapshot: Vec<u8>,
    base: Matrix<f32>,
    queries: Matrix<f32>,
}

fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let base = fvecs_prefix("base.fvecs", SLICE + 10);
        let queries = fvecs_prefix("queries.fvecs", QUERIES);
        let params = HnswParams::default();
        let mut builder = HnswBuilder::new(base.dim, Metric::Cosine, params);
        for row in 0..SLICE {
            builder.insert(base.row(row)).expect("finite");
        }
        let texts: Vec<String> = (0..SLICE).map(|i| format!("row {i}")).collect();
        let body = SnapshotBody::from_builder(
            &builder,
            "wordnet",
            (0..SLICE as u64).collect(),
            (1..=SLICE as u64).collect(),
            Some(&texts),
        )
        .expect("parts");
        let spec = SnapshotSpec {
            collection: COLLECTION,
            dim: base.dim as u32,
            metric: Metric::Cosine,
            params,
        };
        let snapshot = snapshot::encode(&spec, &body).expect("encodes").to_vec();
        Data {
            snapshot,
            base,
            queries,
        }
    })
}

fn config(cache: &Path) -> WasmConfig {
    let mut config = WasmConfig::new(guest().to_owned(), cache.to_owned());
    config.max_instances = 2;
    config.deadline = Duration::from_secs(5);
    config
}

/// One module cache for the tests that are not about it (compiling once, not per test).
fn shared_cache() -> &'static Path {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

fn host() -> WasmHost {
    let host = WasmHost::start(config(shared_cache())).expect("host starts");
    host.load_snapshot(&data().snapshot)
        .expect("snapshot loads");
    host
}

/// A delta pushing base rows past the slice (ids `SLICE..`) and tombstoning ids 0..5.
fn delta() -> Delta {
    let base = &data().base;
    Delta {
        collection_id: COLLECTION.0,
        dim: base.dim as u32,
        metric: Metric::Cosine.code(),
        version: 1,
        vectors: (SLICE..SLICE + 10)
            .map(|row| {
                let mut v = base.row(row).to_vec();
                Metric::Cosine.prepare(&mut v);
                PushedVector {
                    id: row as u64,
                    lsn: 10_000 + row as u64,
                    vector: v,
                    payload: Some(format!("pushed {row}")),
                }
            })
            .collect(),
        tombstones: (0..5).map(|id| Tombstone { id, lsn: 20_000 }).collect(),
        ..Delta::default()
    }
}

/// Same ids in order except between near-ties (1e-5), same distances within 1e-5.
fn assert_same(native: &[(u64, f32)], guest: &[(u64, f32)], what: &str) {
    assert_eq!(native.len(), guest.len(), "{what}: lengths");
    for (i, (n, g)) in native.iter().zip(guest).enumerate() {
        assert!(
            (n.1 - g.1).abs() <= 1e-5,
            "{what}: distance {i}: native {n:?}, guest {g:?}"
        );
        if n.0 != g.0 {
            let tied = native
                .iter()
                .any(|m| m.0 == g.0 && (m.1 - g.1).abs() <= 1e-5)
                || (g.1 - native[native.len() - 1].1).abs() <= 1e-5;
            assert!(tied, "{what}: id {i}: native {n:?}, guest {g:?}");
        }
    }
}

#[test]
fn guest_answers_equal_native_search_on_real_data_before_and_after_a_delta() {
    let host = host();
    let d = data();
    let native = Snapshot::open(d.snapshot.clone()).expect("valid");
    let view = native.view();
    let mut cache = LocalCache::over_snapshot(&view);
    let mut scratch = LocalScratch::default();
    // On a CPU with AVX2 and FMA the native kernels fuse, and so does wasmtime's lowering of the
    // guest's `relaxed_madd`: the same arithmetic in the same order, so the same bits.
    let bit_for_bit = tiervec_shared::kernels::active() == "avx2+fma";
    let compare = |cache: &LocalCache, scratch: &mut LocalScratch, stage: &str| {
        for q in 0..QUERIES {
            let query = d.queries.row(q);
            let n = cache
                .search(Some(&view), query, 10, 64, scratch)
                .expect("native answers");
            let g = host.search(query, 10, 64).expect("guest answers");
            if bit_for_bit {
                let native: Vec<_> = n
                    .hits
                    .iter()
                    .map(|h| (h.id, h.distance.to_bits()))
                    .collect();
                let guest: Vec<_> = g
                    .hits
                    .iter()
                    .map(|h| (h.id, h.distance.to_bits()))
                    .collect();
                assert_eq!(native, guest, "{stage} query {q}: bit for bit");
            }
            let pairs = |h: &mut dyn Iterator<Item = (u64, f32)>| h.collect::<Vec<_>>();
            assert_same(
                &pairs(&mut n.hits.iter().map(|h| (h.id, h.distance))),
                &pairs(&mut g.hits.iter().map(|h| (h.id, h.distance))),
                &format!("{stage} query {q}"),
            );
            assert_eq!(n.certified, g.certified);
            for (nh, gh) in n.hits.iter().zip(&g.hits) {
                if nh.id == gh.id {
                    assert_eq!((nh.lsn, &nh.payload), (gh.lsn, &gh.payload));
                }
            }
        }
    };
    compare(&cache, &mut scratch, "snapshot");
    let delta = delta();
    cache.apply(&delta, true).expect("native applies");
    host.apply_delta(&delta, true).expect("guest applies");
    compare(&cache, &mut scratch, "after delta");
}

#[test]
fn a_delta_shows_up_in_every_instance_and_a_refused_one_changes_nothing() {
    let host = host();
    let d = data();
    let pushed = d.base.row(SLICE + 3);
    let before = host.search(pushed, 5, 64).expect("answers");
    assert!(before.hits.iter().all(|h| h.id != (SLICE + 3) as u64));
    let delta = delta();
    host.apply_delta(&delta, true).expect("applies");
    // Both instances, each on its own thread, see it.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..20 {
                    let answer = host.search(pushed, 5, 64).expect("answers");
                    assert_eq!(answer.hits[0].id, (SLICE + 3) as u64);
                    assert_eq!(
                        answer.hits[0].payload.as_deref(),
                        Some(format!("pushed {}", SLICE + 3).as_str())
                    );
                }
            });
        }
    });
    let tombstoned = host.search(d.base.row(2), 10, 64).expect("answers");
    assert!(
        tombstoned.hits.iter().all(|h| h.id >= 5),
        "tombstoned ids returned"
    );
    // The same version again: refused by the guest's manifest, with its code.
    let err = host.apply_delta(&delta, true).unwrap_err();
    assert_eq!(err.guest_code(), Some(wire::status::DELTA_REFUSED), "{err}");
    assert_eq!(
        host.search(pushed, 5, 64).unwrap().hits[0].id,
        (SLICE + 3) as u64
    );
}

#[test]
fn a_corrupt_snapshot_is_refused_with_its_code_and_the_old_one_kept() {
    let host = host();
    let mut corrupt = data().snapshot.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x40;
    let err = host.load_snapshot(&corrupt).unwrap_err();
    assert_eq!(
        err.guest_code(),
        Some(wire::status::SNAPSHOT_REFUSED),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"), "{err}");
    let err = host.load_snapshot(b"not a snapshot").unwrap_err();
    assert_eq!(
        err.guest_code(),
        Some(wire::status::SNAPSHOT_REFUSED),
        "{err}"
    );
    assert_eq!(
        host.search(data().queries.row(0), 10, 64)
            .unwrap()
            .hits
            .len(),
        10
    );
}

#[test]
fn invalid_queries_are_typed_refusals_not_traps() {
    let host = host();
    let query = data().queries.row(1);
    let err = host.search(&query[..10], 10, 64).unwrap_err();
    assert_eq!(err.guest_code(), Some(wire::status::INVALID_QUERY), "{err}");
    let err = host.search(query, 0, 64).unwrap_err();
    assert_eq!(err.guest_code(), Some(wire::status::INVALID_QUERY), "{err}");
    let mut nan = query.to_vec();
    nan[7] = f32::NAN;
    assert_eq!(
        host.search(&nan, 10, 64).unwrap_err().guest_code(),
        Some(wire::status::INVALID_QUERY)
    );
    assert_eq!(host.search(query, 10, 64).unwrap().hits.len(), 10);
}

#[test]
fn a_guest_past_its_deadline_is_stopped_and_replaced() {
    let host = host();
    let started = std::time::Instant::now();
    let err = host
        .spin_within(u64::MAX, Duration::from_millis(20))
        .unwrap_err();
    assert!(
        matches!(err, WasmError::DeadlineExceeded { deadline } if deadline == Duration::from_millis(20)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "stopped late");
    // A short spin finishes; the discarded instance was replaced, with the snapshot.
    host.spin_within(1_000, Duration::from_secs(1))
        .expect("short spin");
    assert_eq!(
        host.search(data().queries.row(2), 10, 64)
            .unwrap()
            .hits
            .len(),
        10
    );
    // A search given no time at all is stopped too, with the same typed error.
    let heavy = host.search_within(data().queries.row(2), 1_000, 4_000, Duration::ZERO);
    if let Err(e) = heavy {
        assert!(matches!(e, WasmError::DeadlineExceeded { .. }), "{e}");
    }
}

#[test]
fn the_memory_cap_refuses_a_snapshot_too_big_for_it() {
    let mut config = config(shared_cache());
    config.memory_limit = 3 << 20;
    let host = WasmHost::start(config).expect("starts: the empty guest fits");
    let err = host.load_snapshot(&data().snapshot).unwrap_err();
    assert!(
        matches!(err, WasmError::MemoryCap { limit, wanted } if limit == 3 << 20 && wanted > limit),
        "{err}"
    );
}

#[test]
fn the_module_cache_deserialises_on_the_second_start_and_recompiles_a_tampered_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("modules");
    let start = || WasmHost::start(config(&cache)).expect("starts");
    assert_eq!(start().module_source().0, ModuleSource::Compiled);
    assert_eq!(start().module_source().0, ModuleSource::Cached);
    let compiled: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(compiled.len(), 1);
    let mut bytes = std::fs::read(&compiled[0]).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 1;
    std::fs::remove_file(&compiled[0]).unwrap();
    std::fs::write(&compiled[0], &bytes).unwrap();
    let host = start();
    assert_eq!(
        host.module_source().0,
        ModuleSource::Compiled,
        "tamper missed"
    );
    host.load_snapshot(&data().snapshot)
        .expect("works after recompiling");
    assert_eq!(start().module_source().0, ModuleSource::Cached, "rewritten");
}

#[test]
fn a_module_cache_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("open");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    match WasmHost::start(config(&cache)) {
        Err(WasmError::CacheUnsafe { .. }) => {}
        Err(e) => panic!("expected CacheUnsafe, got {e}"),
        Ok(_) => panic!("a world-writable cache was trusted"),
    }
}

#[test]
fn the_confidence_rule_reaches_the_guest() {
    let host = host();
    let query = data().queries.row(3);
    assert!(
        !host.search(query, 10, 64).unwrap().local,
        "no rule, no local answer"
    );
    host.configure(ConfidenceRule::kth(2.0));
    assert!(host.search(query, 10, 64).unwrap().local);
    host.configure(ConfidenceRule::kth(0.0));
    assert!(!host.search(query, 10, 64).unwrap().local);
    let dir = tempfile::tempdir().unwrap();
    let missing = WasmHost::start(WasmConfig::new(
        dir.path().join("absent.wasm"),
        dir.path().join("c"),
    ));
    assert!(matches!(missing, Err(WasmError::ModuleMissing { .. })));
}

/// `tiervec-edge serve --engine wasm` and `--engine native`, real processes over the same
/// cache files: the same answers over HTTP (ids, near-ties aside; distances within 1e-5), and
/// the same typed refusal of a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_engine_wasm_answers_like_the_native_edge_over_http() {
    use tiervec_edge::config::EdgeConfig;

    let dir = tempfile::tempdir().expect("temp dir");
    let http = reqwest::Client::new();
    let mut urls = Vec::new();
    let mut served = Vec::new();
    for engine in ["native", "wasm"] {
        let home = dir.path().join(engine);
        std::fs::create_dir_all(&home).expect("edge dir");
        let snapshot = home.join("cache.tvs");
        std::fs::write(&snapshot, &data().snapshot).expect("snapshot written");
        let port = free_tcp_port();
        let config = EdgeConfig {
            name: format!("edge-{engine}"),
            snapshot,
            collection: "wordnet".into(),
            http_addr: format!("127.0.0.1:{port}").parse().expect("address"),
            worker_threads: Some(1),
            ..EdgeConfig::default()
        };
        let config_path = home.join("edge.toml");
        std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("config");
        let log = std::fs::File::create(home.join("edge.log")).expect("log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiervec-edge"));
        command
            .args(["serve", "--engine", engine, "--config"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        if engine == "wasm" {
            command.arg("--guest").arg(guest());
            command.arg("--module-cache").arg(home.join("modules"));
        }
        served.push(ChildGuard::new(
            command.spawn().expect("tiervec-edge starts"),
        ));
        urls.push(format!(
            "http://127.0.0.1:{port}/v1/collections/wordnet/search"
        ));
    }
    let ask = |url: String, body: serde_json::Value| {
        let http = http.clone();
        async move {
            for _ in 0..600 {
                if let Ok(response) = http.post(&url).json(&body).send().await {
                    let status = response.status();
                    let v: serde_json::Value = response.json().await.expect("JSON");
                    return (status, v);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{url} never answered");
        }
    };
    let hits = |v: &serde_json::Value| -> Vec<(u64, f32)> {
        v["hits"]
            .as_array()
            .expect("hits")
            .iter()
            .map(|h| {
                (
                    h["id"].as_u64().expect("id"),
                    h["distance"].as_f64().expect("distance") as f32,
                )
            })
            .collect()
    };
    let queries = &data().queries;
    for q in 0..50 {
        let body = serde_json::json!({"vector": queries.row(q), "k": 10, "local_only": true});
        let (native_status, native) = ask(urls[0].clone(), body.clone()).await;
        let (guest_status, guest) = ask(urls[1].clone(), body).await;
        assert!(native_status.is_success() && guest_status.is_success());
        assert_eq!(guest["source"], "local");
        assert_same(&hits(&native), &hits(&guest), &format!("query {q}"));
    }
    let bad = serde_json::json!({"vector": [0.5, 0.5], "k": 10});
    let (native_status, native) = ask(urls[0].clone(), bad.clone()).await;
    let (guest_status, guest) = ask(urls[1].clone(), bad).await;
    assert_eq!((native_status.as_u16(), guest_status.as_u16()), (400, 400));
    assert_eq!(native["code"], guest["code"]);
    drop(served);
}

/// Base rows `0..300` pushed into an empty cache with query 0 as an anchor certified by its
/// exact ball of 30 among them (the "corpus" this test's cloud would hold).
fn certified_delta() -> (Delta, Vec<f32>, Certificate) {
    let d = data();
    let mut anchor = d.queries.row(0).to_vec();
    Metric::Cosine.prepare(&mut anchor);
    let vectors: Vec<PushedVector> = (0..300)
        .map(|row| {
            let mut v = d.base.row(row).to_vec();
            Metric::Cosine.prepare(&mut v);
            PushedVector {
                id: row as u64,
                lsn: 1,
                vector: v,
                payload: None,
            }
        })
        .collect();
    let mut ball: Vec<(f32, u64)> = vectors
        .iter()
        .map(|v| (euclidean(&anchor, &v.vector), v.id))
        .collect();
    ball.sort_by(|a, b| a.0.total_cmp(&b.0));
    let certificate = Certificate {
        anchor_id: anchor_id(&anchor),
        radius: (ball[29].0 + ball[30].0) / 2.0,
        members: ball[..30].iter().map(|(_, id)| *id).collect(),
    };
    let delta = Delta {
        collection_id: COLLECTION.0,
        dim: d.base.dim as u32,
        metric: Metric::Cosine.code(),
        version: 1,
        vectors,
        anchors: vec![PushedAnchor {
            anchor_id: certificate.anchor_id,
            vector: anchor.clone(),
            members: certificate.members.clone(),
            radius: certificate.radius,
            hot_at_unix_us: 0,
        }],
        ..Delta::default()
    };
    (delta, anchor, certificate)
}

#[test]
fn certificates_follow_the_native_cache_into_the_guests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cache, _) = EdgeCache::open(CacheConfig::beside(&dir.path().join("cache.tvs"), 64 << 20))
        .expect("an empty cache opens");
    let engine = WasmEngine::start(config(shared_cache())).expect("engine starts");
    cache.follow(engine.follower());
    let rule = ConfidenceRule::default();
    let (delta, anchor, certificate) = certified_delta();
    // Both searches, and whether each certified; the answers must agree whenever both do.
    let certified = |stage: &str| {
        let native = cache.search(&anchor, 10, 64).expect("native answers");
        let guest = engine.search(&anchor, 10, 64, rule).expect("guest answers");
        assert_eq!(
            native.certified, guest.answer.certified,
            "{stage}: native and guest disagree on certification"
        );
        if native.certified {
            let ids = |hits: &[tiervec_shared::local::LocalHit]| {
                hits.iter().map(|h| h.id).collect::<Vec<_>>()
            };
            assert_eq!(ids(&native.hits), ids(&guest.answer.hits), "{stage}");
        }
        native.certified
    };

    let first = cache.begin_connection();
    cache.apply(&delta, first).expect("applies");
    assert!(certified("taken with a delta of the current connection"));

    let second = cache.begin_connection();
    assert!(!certified("a new connection drops them"));

    // A certificate update of the superseded connection is not taken, one of the current is.
    let update = |version| Delta {
        collection_id: COLLECTION.0,
        dim: delta.dim,
        metric: delta.metric,
        version,
        certificates: vec![certificate.clone()],
        ..Delta::default()
    };
    cache.apply(&update(2), first).expect("applies");
    assert!(!certified("an old connection's certificate"));
    cache.apply(&update(3), second).expect("applies");
    assert!(certified("the current connection's certificate"));

    cache.compact().expect("compacts");
    assert!(cache.snapshot().is_some(), "compaction wrote a snapshot");
    assert!(certified("handed over with the compacted cache"));
    cache.begin_connection();
    assert!(!certified("dropped after the compaction too"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_cannot_answer_never_becomes_a_local_answer_or_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = dir.path().join("cache.tvs");
    std::fs::write(&snapshot, &data().snapshot).expect("snapshot written");
    let (cache, _) = EdgeCache::open(CacheConfig::beside(&snapshot, 64 << 20)).expect("opens");
    let cache = std::sync::Arc::new(cache);
    // Room for the empty guest, not for the snapshot: the guests refuse the cache.
    let mut wasm = config(shared_cache());
    wasm.memory_limit = 3 << 20;
    let engine = WasmEngine::start(wasm).expect("engine starts");
    let mut node_config = tiervec_edge::config::EdgeConfig::default().node();
    // A rule that would serve every answer locally.
    node_config.rule = ConfidenceRule {
        max_kth_distance: Some(10.0),
        max_anchor_distance: None,
    };
    let node = tiervec_edge::node::EdgeNode::start(cache, node_config, None)
        .expect("starts without a link")
        .with_wasm(engine);
    for q in 0..5 {
        let answer = node
            .search(data().queries.row(q), 10, 64)
            .await
            .expect("answered, not an error");
        // No cloud to ask: the native fallback for an unconfident answer, degraded.
        assert_eq!(answer.source, tiervec_edge::node::Source::Degraded);
        assert!(!answer.certified);
    }
    // Bad input is still the caller's error, not a guest failure.
    let err = node.search(&[0.5; 3], 10, 64).await.unwrap_err();
    assert!(err.to_string().contains("dimension"), "{err}");
}

/// Every snapshot load keeps the pool within `max_instances`: a loaded snapshot's probe joins
/// the pool and the instances holding the old one leave it (each holds a 4 GiB reservation and
/// a snapshot copy; found by the `guest_abi` fuzz target, which ran out of address space).
#[test]
fn snapshot_loads_keep_the_pool_within_its_bound() {
    let host = host();
    let query = data().queries.row(0);
    for _ in 0..20 {
        host.load_snapshot(&data().snapshot).expect("loads");
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| host.search(query, 10, 64).expect("answers"));
            }
        });
    }
    for _ in 0..5 {
        host.load_snapshot(b"not a snapshot").unwrap_err();
    }
    assert!(
        host.idle_instances() <= 2,
        "{} idle instances for max_instances = 2",
        host.idle_instances()
    );
    assert_eq!(host.search(query, 10, 64).unwrap().hits.len(), 10);
}
