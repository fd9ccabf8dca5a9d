//! Fault test: the cloud process is killed (`SIGKILL`) in the middle of a trace of application
//! queries against an edge, and later restarted. It proves that
//! - the edge keeps answering while the cloud is dead: every request of the trace gets an
//!   HTTP 200 with an answer (no error, no transport failure reaches the application), queries
//!   the cache cannot answer confidently come back `degraded` within about the deadline, and
//!   cached queries stay `local` and right throughout;
//! - when `tiervec-cloud serve` comes back on the same data directory, QUIC address and
//!   certificates (the collection recovered from its WAL), the edge reconnects by itself — the
//!   test does nothing to it — and uncached queries are answered by the cloud, with the right
//!   ids, again.
//!
//! The cloud is a real child process (`CARGO_BIN_EXE_tiervec-cloud`); the edge (`EdgeNode` and
//! its HTTP endpoint) runs in the test process; the application is a reqwest client in a closed
//! loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tiervec_cloud::certs::CertDir;
use tiervec_cloud::client::Client;
use tiervec_cloud::http::{CreateCollection, PointIn};
use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_edge::link::LinkConfig;
use tiervec_edge::node::{EdgeNode, NodeConfig};
use tiervec_edge::write_snapshot_atomic;
use tiervec_shared::Metric;
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::snapshot::{self, SnapshotBody, SnapshotSpec};
use tiervec_test_support::net::free_udp_addr;
use tiervec_test_support::process::ChildGuard;
use tiervec_test_support::vectors::vector;

const DIM: usize = 16;
/// Points in the cloud's collection: ids `0..POINTS`.
const POINTS: u64 = 400;
/// Points in the edge's snapshot: ids `0..CACHED`.
const CACHED: u64 = 100;
const DEADLINE: Duration = Duration::from_millis(200);
/// No answer of the edge may take longer than this (the deadline plus scheduling slack).
const MAX_LATENCY: Duration = Duration::from_millis(1200);
/// Cloud answers wanted before the kill and after the restart.
const CLOUD_ANSWERS: usize = 20;
/// Degraded answers wanted once the edge has seen its link die.
const DEGRADED_ANSWERS: usize = 10;

/// Pushing off: nothing becomes hot enough to push (the trace test is about faults).
const NO_PUSHES: &str = "push={anchor_hot_count=1e12, hot_id_count=1e12}";
/// Every fallback pushed at once, as its own anchor.
const EVERY_FALLBACK_PUSHED: &str =
    "push={anchor_hot_count=1.0, anchor_merge_distance=0.0, period_ms=20, min_gap_ms=1}";

/// Starts `tiervec-cloud serve` over `dir` (with `push`, a `--set` of the push knobs) and
/// returns once `/readyz` answers, with its base URL. The guard kills the cloud however the
/// test ends, so a failed assertion leaves no process behind.
async fn spawn_cloud(dir: &Path, quic: SocketAddr, push: &str) -> (ChildGuard, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("cloud.log"))
        .unwrap();
    let path = |p: PathBuf| format!("{:?}", p.to_str().unwrap());
    let cloud = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_tiervec-cloud"))
            .arg("serve")
            .args(["--set", &format!("data_dir={}", path(dir.join("data")))])
            .args(["--set", "http_addr=\"127.0.0.1:0\""])
            .args(["--set", &format!("quic_addr=\"{quic}\"")])
            .args(["--set", &format!("certs_dir={}", path(dir.join("certs")))])
            .args(["--set", r#"edges={"edge-1"=["*"]}"#])
            .args(["--set", push])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let base = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break format!("http://{a}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cloud did not start:\n{}",
            std::fs::read_to_string(dir.join("cloud.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let client = Client::new(&base, None);
    while !client.ready().await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cloud did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (cloud, base)
}

/// Waits until `done` holds, at most `limit`; returns how long it took.
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// What the application got for one request.
#[derive(Debug)]
enum Outcome {
    /// HTTP 200: the answer's `source` and its top hit.
    Answer { source: String, id: Option<u64> },
    /// Any other status: an error reached the application.
    Status(u16, String),
    /// No response, or an unreadable one.
    Transport(String),
}

#[derive(Debug)]
struct Record {
    /// The point whose vector was the query.
    asked: u64,
    sent_at: Instant,
    sent_phase: u8,
    answered_phase: u8,
    latency: Duration,
    outcome: Outcome,
}

impl Record {
    fn uncached(&self) -> bool {
        self.asked >= CACHED
    }

    fn source(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Answer { source, .. } => Some(source),
            _ => None,
        }
    }
}

type Log = Arc<Mutex<Vec<Record>>>;

/// The application: one request at a time, cached and uncached ids alternating, until `stop`.
/// Returns how many requests it sent.
async fn application(url: String, phase: Arc<AtomicU8>, stop: Arc<AtomicBool>, log: Log) -> usize {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut sent = 0;
    for i in 0u64.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let asked = if i % 2 == 0 {
            (i * 13) % CACHED
        } else {
            CACHED + (i * 7) % (POINTS - CACHED)
        };
        let sent_phase = phase.load(Ordering::SeqCst);
        let sent_at = Instant::now();
        sent += 1;
        let response = http
            .post(&url)
            .json(&json!({"vector": vector(asked, DIM), "k": 1}))
            .send()
            .await;
        let outcome = match response {
            Ok(r) if r.status() == reqwest::StatusCode::OK => match r.json::<Value>().await {
                Ok(v) => Outcome::Answer {
                    source: v["source"].as_str().unwrap_or("?").to_owned(),
                    id: v["hits"][0]["id"].as_u64(),
                },
                Err(e) => Outcome::Transport(e.to_string()),
            },
            Ok(r) => Outcome::Status(r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => Outcome::Transport(e.to_string()),
        };
        log.lock().unwrap().push(Record {
            asked,
            sent_at,
            sent_phase,
            answered_phase: phase.load(Ordering::SeqCst),
            latency: sent_at.elapsed(),
            outcome,
        });
    }
    sent
}

fn count(log: &Log, what: impl Fn(&Record) -> bool) -> usize {
    log.lock().unwrap().iter().filter(|r| what(r)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_cloud_mid_trace_degrades_the_edge_and_it_reconnects_by_itself() {
    let metrics = tiervec_cloud::server::prometheus();
    let dir = tempfile::tempdir().unwrap();
    let certs = CertDir {
        dir: dir.path().join("certs"),
        deployment: "edge-fault".into(),
    };
    certs.ensure_ca().unwrap();
    certs.issue_server(&["localhost".into()]).unwrap();
    certs.issue_edge("edge-1").unwrap();
    // A free UDP port for the cloud's QUIC endpoint, the same across the restart.
    let quic_addr = free_udp_addr();

    // The cloud, with the whole collection.
    let (cloud, base) = spawn_cloud(dir.path(), quic_addr, NO_PUSHES).await;
    let api = Client::new(&base, None);
    api.create_collection(&CreateCollection {
        name: "c".into(),
        dim: DIM,
        metric: Metric::Cosine,
        m: None,
        ef_construction: None,
        shards: None,
        model: None,
    })
    .await
    .unwrap();
    let loaded = api
        .upsert(
            "c",
            (0..POINTS)
                .map(|id| PointIn {
                    id,
                    vector: vector(id, DIM),
                    payload: None,
                })
                .collect(),
        )
        .await
        .unwrap();

    // The edge caches the first CACHED points.
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, HnswParams::default());
    for i in 0..CACHED {
        builder.insert(&vector(i, DIM)).unwrap();
    }
    let body = SnapshotBody::from_builder(
        &builder,
        "c",
        (0..CACHED).collect(),
        // The LSN the cloud gave them: a cache claiming an older one would be invalidated.
        vec![loaded.lsn; CACHED as usize],
        None,
    )
    .unwrap();
    let spec = SnapshotSpec {
        collection: tiervec_shared::CollectionId([0; 16]),
        dim: DIM as u32,
        metric: Metric::Cosine,
        params: HnswParams::default(),
    };
    let snapshot_path = dir.path().join("edge.tvs");
    write_snapshot_atomic(&snapshot_path, &snapshot::encode(&spec, &body).unwrap()).unwrap();
    let node = Arc::new(
        EdgeNode::start(
            Arc::new(
                EdgeCache::open(CacheConfig::beside(&snapshot_path, 64 << 20))
                    .unwrap()
                    .0,
            ),
            NodeConfig {
                collection: "c".into(),
                rule: tiervec_shared::confidence::ConfidenceRule::kth(1e-4),
                lease: Duration::from_secs(30),
                deadline: DEADLINE,
                cloud_ef: 64,
                backoff: (Duration::from_millis(50), Duration::from_millis(500)),
                shadow_every: 0,
                target_recall: None,
                certify: false,
            },
            Some(LinkConfig::new(
                quic_addr,
                "localhost",
                certs.ca_cert(),
                Some((certs.edge_cert("edge-1"), certs.edge_key("edge-1"))),
                "edge-1",
            )),
        )
        .unwrap(),
    );
    let state = tiervec_edge::http::EdgeState::new(node.clone(), 32, "c".into(), metrics.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, tiervec_edge::http::router(state)).await });
    wait_until("the edge connects", Duration::from_secs(30), || {
        node.connected()
    })
    .await;

    // Phase 1: the cloud is up. The application starts its trace.
    let phase = Arc::new(AtomicU8::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let app = tokio::spawn(application(
        format!("http://{edge_addr}/v1/collections/c/search"),
        phase.clone(),
        stop.clone(),
        log.clone(),
    ));
    wait_until(
        "cloud answers before the kill",
        Duration::from_secs(30),
        || count(&log, |r| r.uncached() && r.source() == Some("cloud")) >= CLOUD_ANSWERS,
    )
    .await;

    // What the edge asked the cloud for is tracked as hot, over the real socket: only ids the
    // cache lacks (the edge answers the others itself).
    let hot: Value = reqwest::get(format!("{base}/v1/collections/c/hot?edge=edge-1&n=50"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = hot["ids"].as_array().unwrap();
    assert!(!ids.is_empty(), "{hot}");
    assert!(
        ids.iter().all(|e| e["id"].as_u64().unwrap() >= CACHED),
        "cached ids counted as hot: {hot}"
    );
    // Each listed id was answered at least once; counts decay (half-life 10 min) by a hair.
    assert!(
        hot["total"].as_f64().unwrap() >= 0.99 * ids.len() as f64,
        "{hot}"
    );

    // Phase 2: SIGKILL, mid-trace. The edge notices (keep-alives go unanswered) and keeps
    // answering, degraded, while its reconnection attempts fail.
    phase.store(2, Ordering::SeqCst);
    let mut cloud = cloud;
    cloud.kill().unwrap();
    let killed = Instant::now();
    let link_lost = wait_until(
        "the edge sees its link die",
        Duration::from_secs(20),
        || !node.connected(),
    )
    .await;
    let lost_at = Instant::now();
    wait_until(
        "degraded answers with the link down",
        Duration::from_secs(20),
        || {
            count(&log, |r| {
                r.sent_at >= lost_at && r.uncached() && r.source() == Some("degraded")
            }) >= DEGRADED_ANSWERS
        },
    )
    .await;
    let dead_for = killed.elapsed();

    // Phase 3: the cloud comes back on the same data directory, address and certificates. The
    // test does nothing to the edge.
    phase.store(3, Ordering::SeqCst);
    let restarted = Instant::now();
    let (cloud, _base) = spawn_cloud(dir.path(), quic_addr, NO_PUSHES).await;
    let ready_after = restarted.elapsed();
    let first_cloud_answer = |r: &Record| r.sent_phase == 3 && r.source() == Some("cloud");
    wait_until(
        "a cloud answer after the restart",
        Duration::from_secs(30),
        || count(&log, first_cloud_answer) >= 1,
    )
    .await;
    let reconnected_after = restarted.elapsed();
    wait_until(
        "cloud answers after the restart",
        Duration::from_secs(30),
        || count(&log, first_cloud_answer) >= CLOUD_ANSWERS,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let sent = app.await.unwrap();
    drop(cloud);

    let log = std::mem::take(&mut *log.lock().unwrap());
    let summary = |p: u8, s: &str| {
        log.iter()
            .filter(|r| r.sent_phase == p && r.uncached() && r.source() == Some(s))
            .count()
    };
    eprintln!(
        "{sent} requests; uncached cloud/degraded per phase: up {}/{}, dead {}/{}, back {}/{}",
        summary(1, "cloud"),
        summary(1, "degraded"),
        summary(2, "cloud"),
        summary(2, "degraded"),
        summary(3, "cloud"),
        summary(3, "degraded"),
    );
    eprintln!(
        "link seen down {link_lost:?} after the kill; cloud dead for {dead_for:?}; \
         restarted cloud ready after {ready_after:?}; first cloud answer {reconnected_after:?} \
         after the restart; slowest answer {:?}",
        log.iter().map(|r| r.latency).max().unwrap_or_default()
    );
    for line in metrics.render().lines() {
        if line.starts_with("tiervec_edge_fallback_failures_total")
            || line.starts_with("tiervec_edge_link_connects_total")
        {
            eprintln!("  {line}");
        }
    }

    // Every request got an answer, and no error reached the application.
    assert_eq!(log.len(), sent, "a request went unanswered");
    let failures: Vec<String> = log
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Answer { .. } => None,
            Outcome::Status(code, body) => Some(format!("HTTP {code} for {}: {body}", r.asked)),
            Outcome::Transport(e) => Some(format!("no response for {}: {e}", r.asked)),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} requests failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    for r in &log {
        let Outcome::Answer { source, id } = &r.outcome else {
            unreachable!()
        };
        let id = id.unwrap_or_else(|| panic!("an answer without hits: {r:?}"));
        assert!(
            r.latency <= MAX_LATENCY,
            "the edge answered too slowly: {r:?}"
        );
        match source.as_str() {
            // The cache answers what it holds, whatever the cloud does.
            "local" => assert!(!r.uncached() && id == r.asked, "wrong local answer: {r:?}"),
            "cloud" => assert!(r.uncached() && id == r.asked, "wrong cloud answer: {r:?}"),
            // The best the cache has.
            "degraded" => assert!(r.uncached() && id < CACHED, "wrong degraded answer: {r:?}"),
            other => panic!("unknown source {other}: {r:?}"),
        }
        if !r.uncached() {
            assert_eq!(source, "local", "a cached query left the edge: {r:?}");
        }
        // With the cloud up and the link established, the cloud answers every uncached query.
        if r.uncached() && r.sent_phase == 1 && r.answered_phase == 1 {
            assert_eq!(source, "cloud", "the cloud was up: {r:?}");
        }
    }
    assert!(summary(2, "degraded") >= DEGRADED_ANSWERS);
    assert!(summary(3, "cloud") >= CLOUD_ANSWERS);
}

/// The cloud killed while it pushes into a cold edge cache: the edge keeps answering (what was
/// pushed, locally; the rest degraded), and after the cloud restarts on the same data
/// directory — its manifest of the cache recovered from the WAL — the link comes back and
/// pushes resume from the version the edge holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_survive_a_killed_cloud_and_resume_after_its_restart() {
    use tiervec_edge::node::Source;
    use tiervec_shared::confidence::ConfidenceRule;

    let dir = tempfile::tempdir().unwrap();
    let certs = CertDir {
        dir: dir.path().join("certs"),
        deployment: "push-fault".into(),
    };
    certs.ensure_ca().unwrap();
    certs.issue_server(&["localhost".into()]).unwrap();
    certs.issue_edge("edge-1").unwrap();
    let quic_addr = free_udp_addr();
    let (cloud, base) = spawn_cloud(dir.path(), quic_addr, EVERY_FALLBACK_PUSHED).await;
    let api = Client::new(&base, None);
    api.create_collection(&CreateCollection {
        name: "c".into(),
        dim: DIM,
        metric: Metric::Cosine,
        m: None,
        ef_construction: None,
        shards: None,
        model: None,
    })
    .await
    .unwrap();
    api.upsert(
        "c",
        (0..POINTS)
            .map(|id| PointIn {
                id,
                vector: vector(id, DIM),
                payload: None,
            })
            .collect(),
    )
    .await
    .unwrap();

    let snapshot = dir.path().join("edge").join("cache.tvs");
    std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
    let cache = Arc::new(
        EdgeCache::open(CacheConfig::beside(&snapshot, 1 << 20))
            .unwrap()
            .0,
    );
    let node = EdgeNode::start(
        cache.clone(),
        NodeConfig {
            collection: "c".into(),
            rule: ConfidenceRule {
                max_kth_distance: None,
                max_anchor_distance: Some(1e-4),
            },
            lease: Duration::from_secs(30),
            deadline: DEADLINE,
            cloud_ef: 64,
            backoff: (Duration::from_millis(50), Duration::from_millis(500)),
            shadow_every: 0,
            target_recall: None,
            certify: false,
        },
        Some(LinkConfig::new(
            quic_addr,
            "localhost",
            certs.ca_cert(),
            Some((certs.edge_cert("edge-1"), certs.edge_key("edge-1"))),
            "edge-1",
        )),
    )
    .unwrap();
    wait_until("link up", Duration::from_secs(10), || node.connected()).await;

    // A cold cache warmed by ten fallbacks.
    let asked = |i: u64| vector(POINTS + i, DIM);
    for i in 0..10 {
        assert_eq!(
            node.search(&asked(i), 5, 32).await.unwrap().source,
            Source::Cloud
        );
    }
    wait_until("ten anchors pushed", Duration::from_secs(10), || {
        cache.usage().1 >= 10
    })
    .await;
    let version = cache.version();
    let anchors = cache.usage().1;

    // The cloud dies: what was pushed is still answered locally, the rest degraded.
    drop(cloud);
    for i in 0..10 {
        assert_eq!(
            node.search(&asked(i), 5, 32).await.unwrap().source,
            Source::Local
        );
    }
    let mut degraded = 0;
    for i in 100..110 {
        let answer = node.search(&asked(i), 5, 32).await.unwrap();
        assert_ne!(answer.source, Source::Cloud, "the cloud is dead");
        degraded += usize::from(answer.source == Source::Degraded);
    }
    assert_eq!(degraded, 10);

    // Back on the same data directory: the edge reconnects by itself, and the next fallback is
    // pushed as the version after the one the edge holds (the cloud's manifest survived).
    let (_cloud, _base) = spawn_cloud(dir.path(), quic_addr, EVERY_FALLBACK_PUSHED).await;
    let restarted = Instant::now();
    while node.search(&asked(200), 5, 32).await.unwrap().source != Source::Cloud {
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "the edge never reached the restarted cloud"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (A query that degraded while the cloud was down may also reach it in the reconnection's
    // first flight, and be pushed too.)
    let pushed = Instant::now();
    while node.search(&asked(200), 5, 32).await.unwrap().source != Source::Local {
        assert!(
            pushed.elapsed() < Duration::from_secs(10),
            "the new anchor was not pushed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cache.usage().1 > anchors);
    assert!(cache.version() > version);
    for i in 0..10 {
        assert_eq!(
            node.search(&asked(i), 5, 32).await.unwrap().source,
            Source::Local
        );
    }
}
