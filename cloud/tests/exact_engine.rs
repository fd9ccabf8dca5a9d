//! Exact search through the engine choice: without a usable GPU (always the case without the
//! `gpu` feature) the CPU serves, says why, and answers exactly like `shared::exact`; with the
//! feature and a device, the device's answers are compared with the CPU's (those tests skip,
//! printing why, where no device is usable).

use std::sync::Arc;

use tiervec_cloud::collection::gpu::{EngineKind, ExactEngine, GpuConfig, GpuError};
use tiervec_cloud::collection::{Collection, CollectionInfo, Engine, SearchParams};
use tiervec_cloud::config::CloudConfig;
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::{CollectionId, Metric, exact};
use tiervec_test_support::vectors::family_vector;

/// `n` deterministic vectors of `dim` components in [-1, 1): the shared hash-seeded family
/// `seed`, doubled.
fn vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .flat_map(|i| family_vector(seed, i, dim))
        .map(|x| 2.0 * x)
        .collect()
}

fn collection(engine: Arc<ExactEngine>, dim: usize, metric: Metric) -> Collection {
    Collection::with_engine(
        CollectionInfo {
            name: "t".into(),
            id: CollectionId([7; 16]),
            dim,
            metric,
            params: HnswParams::default(),
        },
        engine,
    )
}

/// `n` vectors prepared for the collection's metric (the service prepares before applying).
fn prepared(c: &Collection, n: usize, seed: u64) -> Vec<f32> {
    let mut v = vectors(n, c.info.dim, seed);
    v.chunks_mut(c.info.dim)
        .for_each(|x| c.info.metric.prepare(x));
    v
}

/// Loads `n` points (ids 0..n) and returns their rows as the collection stores them.
fn load(c: &Collection, n: usize, seed: u64) -> Vec<f32> {
    let rows = prepared(c, n, seed);
    let ids: Vec<u64> = (0..n as u64).collect();
    c.apply_upsert(1, &ids, &rows, &vec![None; n]);
    rows
}

fn exact_params(k: usize) -> SearchParams {
    SearchParams {
        k,
        ef: 64,
        exact: true,
        max_distance: None,
    }
}

#[test]
fn gpu_fallback_without_device_serves_exact_search_on_cpu() {
    let engine = Arc::new(ExactEngine::cpu(&GpuConfig::default(), &GpuError::NoDriver));
    for metric in [Metric::Cosine, Metric::L2, Metric::Dot] {
        let c = collection(engine.clone(), 24, metric);
        let rows = load(&c, 3_000, 11);
        let status = c.exact_engine();
        assert_eq!(status.kind, EngineKind::Cpu);
        assert_eq!(
            status.to_string(),
            "cpu: no CUDA driver (libcuda.so not found)"
        );
        for q in vectors(5, 24, 99).chunks(24) {
            let (hits, _) = c.search(q, &exact_params(10)).unwrap();
            let mut prepared = q.to_vec();
            metric.prepare(&mut prepared);
            let want = exact::search(&rows, 24, metric, &prepared, 10);
            let got: Vec<(u64, f32)> = hits.iter().map(|h| (h.id, h.distance)).collect();
            let want: Vec<(u64, f32)> = want.iter().map(|n| (n.id as u64, n.distance)).collect();
            assert_eq!(got, want, "{metric}");
        }
    }
}

/// How many rows a search scans exactly, which decides whether it runs where it is asked or
/// on the blocking pool under a scan slot: every slot before the first graph generation (after
/// a restart) and when exact search is asked for, the unindexed tail otherwise; a scan over
/// tombstones answers live points only.
#[test]
fn a_search_says_how_many_rows_it_scans_and_scans_skip_tombstones() {
    let engine = Arc::new(ExactEngine::cpu(&GpuConfig::default(), &GpuError::NoDriver));
    let c = collection(engine, 16, Metric::L2);
    let rows = load(&c, 6_000, 3);
    assert_eq!(
        c.scanned_rows(false),
        6_000,
        "no graph yet: every search scans"
    );
    let evens: Vec<u64> = (0..6_000).step_by(2).collect();
    c.apply_delete(2, &evens);
    let q = &rows[10 * 16..11 * 16];
    let (hits, engine) = c.search(q, &exact_params(5)).unwrap();
    assert_eq!((hits.len(), engine), (5, Engine::Exact));
    assert!(hits.iter().all(|h| h.id % 2 == 1), "{hits:?}");
    let odd_rows: Vec<f32> = rows
        .chunks(16)
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .flat_map(|(_, r)| r.to_vec())
        .collect();
    let want: Vec<f32> = exact::search(&odd_rows, 16, Metric::L2, q, 5)
        .iter()
        .map(|n| n.distance)
        .collect();
    let got: Vec<f32> = hits.iter().map(|h| h.distance).collect();
    assert_eq!(got, want);

    while c.index_step(true) {}
    assert_eq!(c.scanned_rows(false), 0, "the graph covers every slot");
    assert_eq!(c.scanned_rows(true), 6_000, "exact search asked for");
    let more: Vec<u64> = (6_000..6_100).collect();
    c.apply_upsert(3, &more, &prepared(&c, 100, 4), &vec![None; 100]);
    assert_eq!(c.scanned_rows(false), 100, "the unindexed tail");
}

#[test]
fn gpu_fallback_batch_search_on_cpu_matches_single_searches_with_tombstones() {
    let engine = Arc::new(ExactEngine::cpu(&GpuConfig::default(), &GpuError::NotBuilt));
    let c = collection(engine, 16, Metric::L2);
    load(&c, 2_000, 5);
    c.apply_delete(2, &(0..2_000).step_by(3).collect::<Vec<u64>>());
    // Replacing a point tombstones its slot and appends a new one.
    c.apply_upsert(3, &[1], &[0.0; 16], &[None]);
    let queries = vectors(9, 16, 17);
    let batch = c.search_exact_batch(&queries, 20).unwrap();
    assert_eq!(batch.len(), 9);
    for (q, got) in queries.chunks(16).zip(&batch) {
        let (single, _) = c.search(q, &exact_params(20)).unwrap();
        assert_eq!(got, &single);
        assert!(
            got.iter().all(|h| h.id % 3 != 0),
            "deleted ids are never returned"
        );
    }
    assert!(
        c.search_exact_batch(&queries[..20], 5).is_err(),
        "ragged batch"
    );
}

#[test]
fn gpu_fallback_default_engine_says_which_engine_and_why() {
    let engine = Arc::new(ExactEngine::probe(&GpuConfig::default()));
    let status = engine.status();
    assert!(!status.reason.is_empty());
    if cfg!(not(feature = "gpu")) {
        assert_eq!(status.to_string(), "cpu: built without the gpu feature");
    }
    // Whatever the engine, exact answers are the CPU's (within the documented tolerance).
    let c = collection(engine.clone(), 32, Metric::Cosine);
    let rows = load(&c, 20_000, 3);
    let queries = vectors(4, 32, 8);
    let found = c.search_exact_batch(&queries, 10).unwrap();
    for (q, got) in queries.chunks(32).zip(&found) {
        let mut prepared = q.to_vec();
        Metric::Cosine.prepare(&mut prepared);
        let want = exact::search(&rows, 32, Metric::Cosine, &prepared, 10);
        for (g, w) in got.iter().zip(&want) {
            assert!((g.distance - w.distance).abs() <= 1e-4, "{g:?} vs {w:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_fallback_is_shown_in_the_description_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let config = CloudConfig {
        data_dir: dir.path().to_owned(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..CloudConfig::default()
    };
    let running = tiervec_cloud::server::spawn(config).await.unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..500 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(ready, "server never became ready");
    let created: serde_json::Value = http
        .post(format!("{base}/v1/collections"))
        .json(&serde_json::json!({"name": "g", "dim": 8, "metric": "cosine"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let engine = Arc::new(ExactEngine::probe(&GpuConfig::default()));
    let status = engine.status();
    let expected = match status.kind {
        EngineKind::Gpu => "gpu",
        EngineKind::Cpu => "cpu_simd",
    };
    assert_eq!(created["exact_engine"], expected, "{created}");
    assert_eq!(created["exact_engine_reason"], status.reason.as_str());
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("tiervec_exact_engine{{engine=\"{}\"", status.kind.name());
    assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
}

/// Device tests: compiled only with the feature, run only where a device is usable.
#[cfg(feature = "gpu")]
mod device {
    use super::*;
    use tiervec_cloud::collection::gpu::Precision;

    /// The engine for `config`, or `None` (with the reason printed) where no device is usable.
    fn device_engine(config: GpuConfig) -> Option<Arc<ExactEngine>> {
        let engine = ExactEngine::probe(&config);
        if engine.status().kind == EngineKind::Gpu {
            Some(Arc::new(engine))
        } else {
            eprintln!("skipped: no usable GPU ({})", engine.status());
            None
        }
    }

    /// Compares the device's batch answer with the CPU's exact top-k (ids where distances are
    /// not near-tied, distances within `tolerance`).
    fn compare(gpu: &Collection, cpu: &Collection, queries: &[f32], k: usize, tolerance: f32) {
        let got = gpu.search_exact_batch(queries, k).unwrap();
        let want = cpu.search_exact_batch(queries, k).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.len(), w.len());
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a.distance - b.distance).abs() <= tolerance,
                    "rank {i}: gpu {a:?} cpu {b:?}"
                );
                let tied = w
                    .iter()
                    .any(|o| o.id != b.id && (o.distance - b.distance).abs() <= 2.0 * tolerance);
                if !tied {
                    assert_eq!(a.id, b.id, "rank {i}");
                }
            }
        }
    }

    fn pair(config: GpuConfig, metric: Metric, n: usize) -> Option<(Collection, Collection)> {
        let engine = device_engine(GpuConfig {
            min_rows: 1,
            ..config
        })?;
        let cpu = Arc::new(ExactEngine::cpu(&GpuConfig::default(), &GpuError::Disabled));
        let g = collection(engine, 64, metric);
        let c = collection(cpu, 64, metric);
        load(&g, n, 21);
        load(&c, n, 21);
        Some((g, c))
    }

    #[test]
    fn gpu_device_matches_cpu_exact_for_every_metric_and_k() {
        for metric in [Metric::Cosine, Metric::L2, Metric::Dot] {
            let Some((g, c)) = pair(GpuConfig::default(), metric, 30_000) else {
                return;
            };
            assert_eq!(g.exact_engine().kind, EngineKind::Gpu);
            let queries = vectors(70, 64, 5);
            for k in [1, 10, 32, 33, 128] {
                compare(&g, &c, &queries, k, 1e-4 * (1.0 + 64.0));
            }
            // Above the device's k limit the CPU answers, exactly.
            compare(&g, &c, &queries[..64 * 3], 200, 0.0);
        }
    }

    #[test]
    fn gpu_device_follows_appends_deletes_and_compaction() {
        let Some((g, c)) = pair(GpuConfig::default(), Metric::Cosine, 20_000) else {
            return;
        };
        let queries = vectors(16, 64, 9);
        compare(&g, &c, &queries, 10, 1e-4);
        // Appends within capacity, then past it; deletes below and past the compaction fraction.
        for (lsn, (from, to)) in [(2, (20_000u64, 21_000u64)), (3, (21_000, 40_000))] {
            let n = (to - from) as usize;
            let ids: Vec<u64> = (from..to).collect();
            let raw = prepared(&g, n, lsn);
            g.apply_upsert(lsn, &ids, &raw, &vec![None; n]);
            c.apply_upsert(lsn, &ids, &raw, &vec![None; n]);
            compare(&g, &c, &queries, 10, 1e-4);
        }
        for (lsn, step) in [(4, 50u64), (5, 2)] {
            let ids: Vec<u64> = (0..40_000).step_by(step as usize).collect();
            g.apply_delete(lsn, &ids);
            c.apply_delete(lsn, &ids);
            compare(&g, &c, &queries, 10, 1e-4);
        }
    }

    #[test]
    fn gpu_device_streams_a_corpus_over_the_budget_and_runs_fp16() {
        // 8 MiB cannot hold 50,000 × 64 floats (12.8 MB): the rows are streamed in chunks.
        let budget = GpuConfig {
            memory_budget_bytes: Some(8 << 20),
            ..GpuConfig::default()
        };
        let Some((g, c)) = pair(budget, Metric::L2, 50_000) else {
            return;
        };
        compare(&g, &c, &vectors(100, 64, 4), 10, 1e-3);
        let half = GpuConfig {
            precision: Precision::F16,
            ..GpuConfig::default()
        };
        let Some((g, c)) = pair(half, Metric::Cosine, 50_000) else {
            return;
        };
        // FP16 rows: distances within 1e-2 for these inputs; ids compared where not near-tied.
        compare(&g, &c, &vectors(100, 64, 4), 10, 1e-2);
    }
}
