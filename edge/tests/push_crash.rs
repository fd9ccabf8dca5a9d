//! `kill -9` of a real `tiervec-edge serve` process while the cloud pushes into its cache and
//! while it compacts, 24 rounds. After every kill the cache files are opened as the restarted
//! edge would open them: nothing is set aside, the manifest is consistent with what a search
//! returns, and every version the edge acknowledged to the cloud is there. Then the edge is
//! started again, resyncs with the cloud and goes on. The cloud runs in this process (real QUIC
//! over loopback, mutual TLS), with a small cache budget (evictions) and a small compaction
//! threshold (a compaction every few deltas).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiervec_cloud::certs::CertDir;
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::hot::HotIds;
use tiervec_cloud::push::{PushConfig, PushHub};
use tiervec_cloud::quic::{self, AccessList};
use tiervec_cloud::service::Service;
use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_edge::config::{CloudLinkConfig, EdgeConfig};
use tiervec_shared::Metric;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::hnsw::HnswParams;
use tiervec_test_support::net::free_tcp_port;
use tiervec_test_support::process::ChildGuard;
use tiervec_test_support::vectors::vector;

const DIM: usize = 16;
const POINTS: u64 = 3_000;
const ROUNDS: u64 = 24;

fn cache_config(snapshot: &Path) -> CacheConfig {
    CacheConfig {
        compact_after: 60,
        ..CacheConfig::beside(snapshot, 96 << 10)
    }
}

/// Starts `tiervec-edge serve`, killed (SIGKILL) when the guard drops.
fn start_edge(config: &Path, log: &Path) -> ChildGuard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_tiervec-edge"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_during_pushes_and_compactions_restarts_consistent_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let certs = CertDir {
        dir: dir.path().join("certs"),
        deployment: "crash".into(),
    };
    certs.ensure_ca().unwrap();
    certs.issue_server(&["localhost".into()]).unwrap();
    certs.issue_edge("edge-1").unwrap();
    let service = Arc::new(
        Service::open(CloudConfig {
            data_dir: dir.path().join("cloud"),
            ..CloudConfig::default()
        })
        .unwrap(),
    );
    service
        .create_collection("c", DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
    service
        .upsert(
            "c",
            (0..POINTS).map(|i| (i, vector(i, DIM), None)).collect(),
        )
        .unwrap();
    let collection = service.catalog().get("c").unwrap().info.id.0;
    let endpoint = quic::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs,
        &tiervec_cloud::quic::QuicLimits::default(),
    )
    .unwrap();
    let quic_addr = endpoint.local_addr().unwrap();
    let hub = PushHub::start(
        PushConfig {
            period_ms: 10,
            min_gap_ms: 1,
            anchor_members: 10,
            anchor_hot_count: 1.0,
            // Every query its own anchor (these synthetic vectors crowd together).
            anchor_merge_distance: 0.0,
            max_anchors_per_delta: 2,
            ..PushConfig::default()
        },
        service.clone(),
        Arc::new(HotIds::new(Default::default())),
    );
    let acl = AccessList(HashMap::from([("edge-1".to_owned(), vec!["*".to_owned()])]));
    tokio::spawn(quic::serve(
        endpoint,
        service.clone(),
        Arc::new(acl),
        hub.clone(),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));

    let snapshot: PathBuf = dir.path().join("edge").join("cache.tvs");
    std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
    let http_port = free_tcp_port();
    let config = EdgeConfig {
        name: "edge-1".into(),
        snapshot: snapshot.clone(),
        budget_bytes: cache_config(&snapshot).budget_bytes,
        compact_after: cache_config(&snapshot).compact_after,
        collection: "c".into(),
        http_addr: format!("127.0.0.1:{http_port}").parse().unwrap(),
        confidence: ConfidenceRule {
            max_kth_distance: None,
            max_anchor_distance: Some(1e-4),
        },
        deadline_ms: 500,
        default_ef: 32,
        cloud_ef: 64,
        worker_threads: Some(1),
        cloud: Some(CloudLinkConfig {
            addr: quic_addr,
            other_addrs: Vec::new(),
            idle_timeout_ms: 3_000,
            server_name: "localhost".into(),
            ca_cert: certs.ca_cert(),
            cert: certs.edge_cert("edge-1"),
            key: certs.edge_key("edge-1"),
        }),
        ..EdgeConfig::default()
    };
    let config_path = dir.path().join("edge.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let log = dir.path().join("edge.log");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http_port}/v1/collections/c/search");

    let mut next_query = 0u64;
    let mut compactions_seen = 0;
    for round in 0..ROUNDS {
        let edge = start_edge(&config_path, &log);
        // Drive fallbacks (each a new anchor, pushed with its neighbours) until the cloud has
        // had a few acknowledgements this round, then kill at a varying moment.
        let acked_before = hub.acked_version("edge-1", collection).unwrap_or(0);
        let started = Instant::now();
        let mut answered = 0;
        while hub.acked_version("edge-1", collection).unwrap_or(0) < acked_before + 3 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: no pushes acknowledged:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            next_query += 1;
            let body = serde_json::json!({"vector": vector(POINTS + next_query, DIM), "k": 5});
            if let Ok(r) = http.post(&url).json(&body).send().await {
                assert!(r.status().is_success(), "round {round}: {}", r.status());
                answered += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(answered > 0);
        tokio::time::sleep(Duration::from_millis(round % 4 * 7)).await;
        let acked = hub.acked_version("edge-1", collection).unwrap_or(0);
        drop(edge); // SIGKILL, mid-push or mid-compaction

        // What the restarted edge will find.
        let (cache, report) = EdgeCache::open(cache_config(&snapshot)).unwrap();
        assert!(
            report.set_aside.is_empty(),
            "round {round}: a crash must never corrupt the cache: {:?}",
            report.set_aside
        );
        assert!(
            cache.version() >= acked,
            "round {round}: acknowledged version {acked} lost (cache at {})",
            cache.version()
        );
        let (held, anchors, bytes) = cache.usage();
        assert!(held > 0 && anchors > 0, "round {round}: cache empty");
        assert!(bytes <= cache.config().budget_bytes);
        // Every held vector is searchable, and nothing else is returned.
        let inventory = cache.inventory();
        for v in inventory.vectors.iter().take(40) {
            let hits = cache.search(&vector(v.id, DIM), 1, 64).unwrap().hits;
            assert_eq!(
                hits[0].id, v.id,
                "round {round}: held vector {} not found",
                v.id
            );
        }
        if cache.snapshot().is_some() {
            compactions_seen += 1;
        }
    }
    assert!(
        compactions_seen >= ROUNDS / 2,
        "compactions happened in only {compactions_seen} rounds"
    );

    // Back up for good: it resyncs (versions agree) and answers an anchor locally.
    let _edge = start_edge(&config_path, &log);
    let started = Instant::now();
    let probe = vector(POINTS + next_query, DIM);
    let mut last = serde_json::Value::Null;
    loop {
        let body = serde_json::json!({"vector": probe, "k": 5});
        if let Ok(r) = http.post(&url).json(&body).send().await {
            last = r.json().await.unwrap();
            if last["source"] == "local" {
                break;
            }
        }
        let mut prepared = probe.clone();
        tiervec_shared::metric::normalise(&mut prepared);
        let held = service.catalog().edge_cache("edge-1", collection).map(|m| {
            (
                m.version,
                m.holds_anchor(tiervec_shared::push::anchor_id(&prepared)),
            )
        });
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the restarted edge never answered its pushed anchor locally: {last}; cloud manifest (version, holds the anchor) {held:?}, acked {:?}",
            hub.acked_version("edge-1", collection)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The cloud logs a step before sending it: a delta in flight shows as logged but not yet
    // acknowledged. Once the edge has acknowledged it, both agree.
    let agreed = Instant::now();
    loop {
        let logged = service
            .catalog()
            .edge_cache("edge-1", collection)
            .map(|m| m.version);
        let acked = hub.acked_version("edge-1", collection);
        if acked.is_some() && acked == logged {
            break;
        }
        assert!(
            agreed.elapsed() < Duration::from_secs(5),
            "acknowledged {acked:?} never caught up with logged {logged:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
