//! The edge–cloud QUIC link over a real loopback socket: mutual TLS with the deployment's
//! certificates, the protocol handshake, queries answered from the cloud's collection, and
//! refusals — no client certificate, a certificate from another CA, a collection the edge may not
//! query, a bad query — each typed, none harming the connection or other edges.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tiervec_cloud::certs::CertDir;
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::hot::HotIds;
use tiervec_cloud::push::PushHub;
use tiervec_cloud::quic::{self, AccessList};
use tiervec_cloud::service::Service;
use tiervec_edge::link::{CloudLink, LinkConfig, LinkError};
use tiervec_shared::Metric;
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::protocol::frame::{ErrorCode, Query};
use tiervec_shared::protocol::session::QueryFailure;
use tiervec_test_support::vectors::vector;

const DIM: usize = 8;

fn link(
    addr: std::net::SocketAddr,
    certs: &CertDir,
    identity: Option<&CertDir>,
    edge: &str,
) -> LinkConfig {
    LinkConfig::new(
        addr,
        "localhost",
        certs.ca_cert(),
        identity.map(|c| (c.edge_cert(edge), c.edge_key(edge))),
        edge,
    )
}

fn hot() -> Arc<HotIds> {
    Arc::new(HotIds::new(Default::default()))
}

/// A push hub that never pushes (most tests here are about queries; `pushes_warm_a_cold_cache…` pushes).
fn quiet_hub(service: &Arc<Service>, hot: Arc<HotIds>) -> Arc<PushHub> {
    let never = tiervec_cloud::push::PushConfig {
        anchor_hot_count: 1e12,
        hot_id_count: 1e12,
        ..Default::default()
    };
    PushHub::start(never, service.clone(), hot)
}

fn cert_dir(path: &Path, deployment: &str) -> CertDir {
    let c = CertDir {
        dir: path.to_owned(),
        deployment: deployment.into(),
    };
    c.ensure_ca().unwrap();
    c.issue_server(&["localhost".into()]).unwrap();
    c.issue_edge("edge-1").unwrap();
    c.issue_edge("edge-2").unwrap();
    c
}

fn query(collection: &str, id: [u8; 16], v: Vec<f32>) -> Query {
    Query {
        query_id: 0,
        collection: collection.into(),
        collection_id: id,
        vector: v,
        k: 3,
        ef: 32,
        span_id: 0,
        shadow: false,
        with_payload: false,
    }
}

/// A cloud service in `dir` with collection `c` holding points `0..count`.
fn cloud_with_points(dir: &Path, count: u64) -> Arc<Service> {
    let config = CloudConfig {
        data_dir: dir.join("data"),
        ..CloudConfig::default()
    };
    let service = Arc::new(Service::open(config).unwrap());
    service
        .create_collection("c", DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
    service
        .upsert("c", (0..count).map(|i| (i, vector(i, DIM), None)).collect())
        .unwrap();
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_queries_and_refusals_over_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let foreign = cert_dir(&dir.path().join("foreign"), "theirs");
    let service = cloud_with_points(dir.path(), 200);
    let acl = AccessList(HashMap::from([
        ("edge-1".to_owned(), vec!["c".to_owned()]),
        ("edge-2".to_owned(), vec![]),
    ]));
    let endpoint = quic::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs,
        &tiervec_cloud::quic::QuicLimits::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let hot_ids = hot();
    tokio::spawn(quic::serve(
        endpoint,
        service.clone(),
        Arc::new(acl),
        quiet_hub(&service, hot_ids.clone()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));

    let edge1 = CloudLink::connect(&link(addr, &certs, Some(&certs), "edge-1"))
        .await
        .unwrap();
    assert_eq!(edge1.collections().len(), 1);
    let id = edge1.collections()[0].id;
    let answer = edge1
        .query(query("c", id, vector(42, DIM)), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answer.hits[0].id, 42);
    assert!(answer.hits[0].distance.abs() < 1e-5);
    // The ids answered feed the hotness tables; a shadow query's never do.
    let shadow = edge1
        .query(
            Query {
                shadow: true,
                ..query("c", id, vector(77, DIM))
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(shadow.hits[0].id, 77);
    wait_for(|| {
        hot_ids
            .top(id, Some("edge-1"), 10)
            .1
            .iter()
            .any(|e| e.id == 42)
    })
    .await;
    let (_, top) = hot_ids.top(id, None, 100);
    assert!(top.iter().any(|e| e.id == 42));
    assert!(
        !top.iter().any(|e| e.id == 77),
        "shadow query counted: {top:?}"
    );

    // Bad queries are refused one by one; the connection keeps serving.
    let refused = |r: Result<_, QueryFailure>| match r {
        Err(QueryFailure::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(
            edge1
                .query(query("c", id, vec![0.5; DIM + 1]), Duration::from_secs(5))
                .await
        ),
        ErrorCode::BadQuery
    );
    let mut nan = vector(1, DIM);
    nan[0] = f32::NAN;
    assert_eq!(
        refused(
            edge1
                .query(query("c", id, nan), Duration::from_secs(5))
                .await
        ),
        ErrorCode::BadQuery
    );
    assert_eq!(
        refused(
            edge1
                .query(query("c", [0; 16], vector(1, DIM)), Duration::from_secs(5))
                .await
        ),
        ErrorCode::UnknownCollection
    );
    assert_eq!(
        refused(
            edge1
                .query(query("other", id, vector(1, DIM)), Duration::from_secs(5))
                .await
        ),
        ErrorCode::NotAllowed
    );
    assert_eq!(
        edge1
            .query(query("c", id, vector(7, DIM)), Duration::from_secs(5))
            .await
            .unwrap()
            .hits[0]
            .id,
        7
    );

    // An edge the access list grants nothing sees no collection and is refused.
    let edge2 = CloudLink::connect(&link(addr, &certs, Some(&certs), "edge-2"))
        .await
        .unwrap();
    assert!(edge2.collections().is_empty());
    assert_eq!(
        refused(
            edge2
                .query(query("c", id, vector(1, DIM)), Duration::from_secs(5))
                .await
        ),
        ErrorCode::NotAllowed
    );

    // No client certificate, or one from another CA: refused at the handshake.
    for cfg in [
        link(addr, &certs, None, "edge-1"),
        link(addr, &certs, Some(&foreign), "edge-1"),
    ] {
        match CloudLink::connect(&cfg).await {
            Err(LinkError::Handshake(_)) => {}
            Err(e) => panic!("expected a handshake refusal, got {e}"),
            Ok(_) => panic!("an edge without a valid certificate was accepted"),
        }
    }
    // And nothing of that harmed the first edge.
    assert_eq!(
        edge1
            .query(query("c", id, vector(9, DIM)), Duration::from_secs(5))
            .await
            .unwrap()
            .hits[0]
            .id,
        9
    );
}

/// The edge's query path end to end: local when confident, the cloud otherwise, degraded (never
/// an error) while the cloud is gone, and back to the cloud once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_falls_back_degrades_and_reconnects() {
    let metrics = tiervec_cloud::server::prometheus();
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    use tiervec_edge::node::{EdgeNode, Source};
    use tiervec_edge::write_snapshot_atomic;
    use tiervec_shared::hnsw::HnswBuilder;
    use tiervec_shared::snapshot::{self, SnapshotBody, SnapshotSpec};

    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 300);
    let acl = Arc::new(AccessList(HashMap::from([(
        "edge-1".to_owned(),
        vec!["*".to_owned()],
    )])));
    let endpoint = quic::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs,
        &tiervec_cloud::quic::QuicLimits::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let hot_ids = hot();
    tokio::spawn(quic::serve(
        endpoint.clone(),
        service.clone(),
        acl.clone(),
        quiet_hub(&service, hot_ids.clone()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));

    // The edge caches the first 100 points.
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, HnswParams::default());
    for i in 0..100 {
        builder.insert(&vector(i, DIM)).unwrap();
    }
    let texts: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    let body = SnapshotBody::from_builder(
        &builder,
        "c",
        (0..100).collect(),
        // The LSN the cloud gave them: a cache claiming an older one would be invalidated.
        (0..100).map(|i| service.get("c", i).unwrap().lsn).collect(),
        Some(&texts),
    )
    .unwrap();
    let spec = SnapshotSpec {
        collection: tiervec_shared::CollectionId([0; 16]),
        dim: DIM as u32,
        metric: Metric::Cosine,
        params: HnswParams::default(),
    };
    let path = dir.path().join("edge.tvs");
    write_snapshot_atomic(&path, &snapshot::encode(&spec, &body).unwrap()).unwrap();
    let config = node_config(tiervec_shared::confidence::ConfidenceRule::kth(1e-4));
    let node = Arc::new(
        EdgeNode::start(
            Arc::new(
                EdgeCache::open(CacheConfig::beside(&path, 64 << 20))
                    .unwrap()
                    .0,
            ),
            config,
            Some(link(addr, &certs, Some(&certs), "edge-1")),
        )
        .unwrap(),
    );
    wait_for(|| node.connected()).await;

    let answer = node.search(&vector(5, DIM), 1, 32).await.unwrap();
    let (hits, source) = (answer.hits, answer.source);
    assert_eq!(
        (source, hits[0].id, hits[0].payload.as_deref()),
        (Source::Local, 5, Some("t5"))
    );
    let answer = node.search(&vector(250, DIM), 1, 32).await.unwrap();
    let (hits, source) = (answer.hits, answer.source);
    assert_eq!(
        (source, hits[0].id),
        (Source::Cloud, 250),
        "not cached: the cloud answers"
    );

    // The cloud goes away: answers keep coming, locally, marked degraded.
    endpoint.close(quinn::VarInt::from_u32(0), b"cloud stopped");
    endpoint.wait_idle().await;
    drop(endpoint);
    wait_for(|| !node.connected()).await;
    let answer = node.search(&vector(250, DIM), 1, 32).await.unwrap();
    let (hits, source) = (answer.hits, answer.source);
    assert_eq!(source, Source::Degraded);
    assert_ne!(hits[0].id, 250, "the best the cache has");

    // The cloud comes back on the same address: the edge reconnects by itself.
    // (The old socket is released once the stopped accept loop drops its endpoint.)
    let again = rebind(addr, &certs).await;
    tokio::spawn(quic::serve(
        again,
        service.clone(),
        acl,
        quiet_hub(&service, hot()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));
    wait_for(|| node.connected()).await;
    let answer = node.search(&vector(250, DIM), 1, 32).await.unwrap();
    let (hits, source) = (answer.hits, answer.source);
    assert_eq!((source, hits[0].id), (Source::Cloud, 250));

    // The applications' HTTP endpoint: the cloud's shapes plus `source` and `certified`.
    let state = tiervec_edge::http::EdgeState::new(node.clone(), 32, "c".into(), metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, tiervec_edge::http::router(state)).await });
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value, name: &'static str| {
        http.post(format!("http://{http_addr}/v1/collections/{name}/search"))
            .json(&body)
            .send()
    };
    let r: serde_json::Value = post(
        serde_json::json!({"vector": vector(3, DIM), "k": 1, "with_payload": true}),
        "c",
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (
            r["source"].as_str(),
            r["hits"][0]["id"].as_u64(),
            r["hits"][0]["payload"].as_str(),
            r["certified"].as_bool()
        ),
        (Some("local"), Some(3), Some("t3"), Some(false))
    );
    let r: serde_json::Value = post(serde_json::json!({"vector": vector(250, DIM), "k": 1}), "c")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["source"].as_str(), r["hits"][0]["id"].as_u64()),
        (Some("cloud"), Some(250))
    );
    let bad = post(serde_json::json!({"vector": [0.5, 0.5], "k": 1}), "c")
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    let missing = post(
        serde_json::json!({"vector": vector(1, DIM), "k": 1}),
        "other",
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);

    // The edge's metrics: answers by source, the fallback histogram, the link state, bytes.
    let metrics = http
        .get(format!("http://{http_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "tiervec_edge_queries_total{source=\"local\"}",
        "tiervec_edge_queries_total{source=\"cloud\"}",
        "tiervec_edge_queries_total{source=\"degraded\"}",
        "tiervec_edge_fallback_seconds_bucket",
        "tiervec_edge_link_up 1",
        "tiervec_edge_link_udp_bytes_total{direction=\"tx\"}",
        "tiervec_edge_link_connects_total{handshake=",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
}

/// A reconnecting edge resumes its TLS session and sends its Hello and first query as 0-RTT
/// data, answered in the first round trip; a restarted cloud has lost the ticket, rejects the
/// early data, and the flight is sent again after the full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnections_use_0rtt_and_survive_its_rejection() {
    let metrics = tiervec_cloud::server::prometheus();
    use tiervec_edge::link::{Connector, Handshake};

    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 100);
    let acl = Arc::new(AccessList(HashMap::from([(
        "edge-1".to_owned(),
        vec!["c".to_owned()],
    )])));
    let endpoint = quic::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs,
        &tiervec_cloud::quic::QuicLimits::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let hot_ids = hot();
    tokio::spawn(quic::serve(
        endpoint.clone(),
        service.clone(),
        acl.clone(),
        quiet_hub(&service, hot_ids.clone()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));

    let connector = Connector::new(link(addr, &certs, Some(&certs), "edge-1")).unwrap();
    let first = connector.connect(None).await.unwrap();
    assert_eq!(first.handshake, Handshake::Full, "no ticket yet");
    assert!(first.first_answer.is_none());
    let id = connector.known_collection("c").unwrap().id;
    drop(first);

    // Early queries are counted once their handshake is confirmed. Whether the cloud reads a
    // 0-RTT query before that happens is a matter of scheduling: the edge's Finished follows its
    // 0-RTT data by one loopback round trip, which a busy machine can outlast (about one run in
    // 150 read every query of three rounds after confirmation and counted it as `confirmed`).
    // So reconnect until an early query has been counted; every round is a 0-RTT start.
    let counted_early = || {
        metrics
            .render()
            .lines()
            .any(|l| l.starts_with("tiervec_quic_queries_total{") && l.contains("flight=\"early\""))
    };
    let mut round = 0u64;
    loop {
        let again = connector
            .connect(Some(query("c", id, vector(10 + round, DIM))))
            .await
            .unwrap();
        assert_eq!(again.handshake, Handshake::ZeroRtt, "round {round}");
        let answer = again.first_answer.unwrap().unwrap();
        assert_eq!(answer.hits[0].id, 10 + round);
        // The link goes on serving after its 0-RTT start.
        let later = again
            .link
            .query(query("c", id, vector(50, DIM)), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(later.hits[0].id, 50);
        round += 1;
        if round >= 3 && holds_within(counted_early, Duration::from_millis(200)).await {
            break;
        }
        assert!(
            round < 40,
            "no 0-RTT query was read before its handshake was confirmed in {round} rounds"
        );
    }
    let is_hot = |wanted: u64| {
        let (_, top) = hot_ids.top(id, Some("edge-1"), 100);
        top.iter().any(|e| e.id == wanted)
    };
    wait_for(|| (10..13).all(is_hot)).await;

    // An edge that asks once as 0-RTT data and leaves as soon as it has its answer is counted
    // all the same: its handshake completed before it left, even if the cloud only gets to
    // check after the connection has closed.
    assert!(!is_hot(60));
    let brief = connector
        .connect(Some(query("c", id, vector(60, DIM))))
        .await
        .unwrap();
    assert_eq!(brief.handshake, Handshake::ZeroRtt);
    assert_eq!(brief.first_answer.unwrap().unwrap().hits[0].id, 60);
    drop(brief.link);
    wait_for(|| is_hot(60)).await;

    // The cloud restarts: its session cache is gone, the early data is rejected, and the
    // flight is sent again once the full handshake is done.
    endpoint.close(quinn::VarInt::from_u32(0), b"restart");
    endpoint.wait_idle().await;
    drop(endpoint);
    let restarted = rebind(addr, &certs).await;
    tokio::spawn(quic::serve(
        restarted,
        service.clone(),
        acl,
        quiet_hub(&service, hot()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));
    let after = connector
        .connect(Some(query("c", id, vector(77, DIM))))
        .await
        .unwrap();
    assert_eq!(after.handshake, Handshake::ZeroRttRejected);
    assert_eq!(after.first_answer.unwrap().unwrap().hits[0].id, 77);
}

/// Raw bytes on a real socket: a frame above the size limit, a body that fails validation, an
/// unknown frame type, a Hello of an unsupported version. Each gets a typed error frame and is
/// counted by reason; the fatal ones close only their own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_refused_typed_and_counted() {
    let metrics = tiervec_cloud::server::prometheus();
    use tiervec_shared::protocol::frame::{
        DEFAULT_MAX_FRAME, Frame, FrameDecoder, Hello, PROTOCOL_VERSION,
    };

    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 50);
    let acl = Arc::new(AccessList(HashMap::from([(
        "edge-1".to_owned(),
        vec!["c".to_owned()],
    )])));
    let endpoint = quic::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs,
        &tiervec_cloud::quic::QuicLimits::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::serve(
        endpoint,
        service.clone(),
        acl,
        quiet_hub(&service, hot()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));
    let healthy = CloudLink::connect(&link(addr, &certs, Some(&certs), "edge-1"))
        .await
        .unwrap();
    let id = healthy.collections()[0].id;

    let cfg = link(addr, &certs, Some(&certs), "edge-1");
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(tiervec_edge::link::client_config(&cfg).unwrap());
    let raw_connection = || async {
        client
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("handshake")
    };
    let send_raw = |conn: quinn::Connection, bytes: Vec<u8>| async move {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let answer = recv.read_to_end(1 << 20).await.unwrap_or_default();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        decoder.push(&answer).unwrap();
        let mut frames = Vec::new();
        while let Some(f) = decoder.next_frame().unwrap() {
            frames.push(f);
        }
        frames
    };
    let hello = |version: u16| {
        let mut b = Vec::new();
        Frame::Hello(Hello {
            version,
            min_version: version,
            edge_name: "raw".into(),
            cache: None,
        })
        .encode(&mut b);
        b
    };
    let error_code = |frames: &[Frame]| -> ErrorCode {
        match frames.last() {
            Some(Frame::Error(e)) => ErrorCode::from_u16(e.code).unwrap(),
            other => panic!("expected an error frame, got {other:?}"),
        }
    };

    // Oversized: the prefix announces 64 MiB; refused before anything is buffered.
    let conn = raw_connection().await;
    let mut bytes = hello(PROTOCOL_VERSION);
    bytes.extend_from_slice(&(64u32 << 20).to_le_bytes());
    bytes.push(Frame::Query(query("c", id, vector(1, DIM))).frame_type());
    let frames = send_raw(conn.clone(), bytes).await;
    assert!(matches!(frames[0], Frame::HelloAck(_)));
    assert_eq!(error_code(&frames), ErrorCode::FrameTooLarge);
    conn.closed().await;

    // A query frame whose body is not a valid archive.
    let conn = raw_connection().await;
    let mut bytes = hello(PROTOCOL_VERSION);
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.push(Frame::Query(query("c", id, vector(1, DIM))).frame_type());
    bytes.extend_from_slice(&[0xA5; 16]);
    assert_eq!(
        error_code(&send_raw(conn.clone(), bytes).await),
        ErrorCode::Malformed
    );
    conn.closed().await;

    // An unknown frame type is skipped with an error; the connection lives on.
    let conn = raw_connection().await;
    let mut bytes = hello(PROTOCOL_VERSION);
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.push(250);
    assert_eq!(
        error_code(&send_raw(conn.clone(), bytes).await),
        ErrorCode::UnknownFrameType
    );
    let mut ask = Vec::new();
    Frame::Query(Query {
        query_id: 5,
        ..query("c", id, vector(3, DIM))
    })
    .encode(&mut ask);
    let frames = send_raw(conn.clone(), ask).await;
    assert!(
        matches!(&frames[..], [Frame::Answer(a)] if a.hits[0].id == 3),
        "{frames:?}"
    );

    // A Hello of a version this cloud does not speak.
    let conn = raw_connection().await;
    assert_eq!(
        error_code(&send_raw(conn.clone(), hello(PROTOCOL_VERSION + 7)).await),
        ErrorCode::VersionMismatch
    );
    conn.closed().await;

    let rendered = metrics.render();
    for reason in [
        "frame_too_large",
        "malformed",
        "unknown_frame_type",
        "version_mismatch",
    ] {
        assert!(
            rendered.contains(&format!(
                "tiervec_quic_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{rendered}"
        );
    }
    // None of it harmed the well-behaved edge.
    let answer = healthy
        .query(query("c", id, vector(8, DIM)), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answer.hits[0].id, 8);
}

/// An edge that withholds flow credit holds up its own stream's searches: the cloud writes
/// each answer as it is made and searches no further while the write waits, so a stream's
/// answers never pile up in the cloud's memory. Once the edge reads, every answer arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_edge_withholds_credit_stops_searching() {
    use tiervec_shared::protocol::frame::{
        DEFAULT_MAX_FRAME, Frame, FrameDecoder, Hello, PROTOCOL_VERSION,
    };

    let metrics = tiervec_cloud::server::prometheus();
    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 1);
    // A collection of its own: the searches counter is per collection and process-wide.
    let info = service
        .create_collection("credit", DIM, Metric::Cosine, HnswParams::default())
        .unwrap();
    service
        .upsert(
            "credit",
            (0..300).map(|i| (i, vector(i, DIM), None)).collect(),
        )
        .unwrap();
    let acl = Arc::new(AccessList(HashMap::from([(
        "edge-1".to_owned(),
        vec!["*".to_owned()],
    )])));
    let limits = tiervec_cloud::quic::QuicLimits::default();
    let endpoint = quic::bind("127.0.0.1:0".parse().unwrap(), &certs, &limits).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::serve(
        endpoint,
        service.clone(),
        acl,
        quiet_hub(&service, hot()),
        tiervec_cloud::ScanSlots::new(2),
        limits.clone(),
    ));

    // A raw edge whose streams grant the cloud 1 KiB of credit: less than one answer.
    let cfg = link(addr, &certs, Some(&certs), "edge-1");
    let mut client_config = tiervec_edge::link::client_config(&cfg).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(1024u32.into());
    client_config.transport_config(Arc::new(transport));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    let mut bytes = Vec::new();
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: PROTOCOL_VERSION,
        edge_name: "slow reader".into(),
        cache: None,
    })
    .encode(&mut bytes);
    let queries = limits.max_frames_per_stream - 1;
    for i in 0..queries as u64 {
        Frame::Query(Query {
            query_id: i + 1,
            k: 200,
            ef: 200,
            ..query("credit", info.id.0, vector(i, DIM))
        })
        .encode(&mut bytes);
    }
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();

    let searched = || {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with("tiervec_quic_searches_total{collection=\"credit\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        holds_within(|| searched() >= 1.0, Duration::from_secs(5)).await,
        "the cloud never searched"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        searched() <= 2.0,
        "{} of {queries} searches ran while the edge read nothing",
        searched()
    );

    let answer = recv
        .read_to_end(DEFAULT_MAX_FRAME)
        .await
        .expect("every answer once the edge reads");
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    decoder.push(&answer).unwrap();
    let mut answers = 0;
    while let Some(frame) = decoder.next_frame().unwrap() {
        match frame {
            Frame::HelloAck(_) => {}
            Frame::Answer(a) => {
                assert_eq!(a.hits.len(), 200);
                answers += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(answers, queries);
    assert_eq!(searched(), queries as f64);
}

/// An inventory larger than a frame (300k held vectors, ~7 MiB) crosses a real connection in
/// parts, one stream each, and the cloud adopts and logs it whole at the last part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_larger_than_a_frame_is_adopted_in_parts() {
    use tiervec_shared::protocol::frame::{
        DEFAULT_MAX_FRAME, Frame, FrameDecoder, Hello, InventoryPart, PROTOCOL_VERSION,
    };
    use tiervec_shared::push::{CacheAnnouncement, HeldVector, Inventory};

    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 10);
    let id = service.catalog().get("c").unwrap().info.id.0;
    let acl = Arc::new(AccessList(HashMap::from([(
        "edge-1".to_owned(),
        vec!["*".to_owned()],
    )])));
    let limits = tiervec_cloud::quic::QuicLimits::default();
    let endpoint = quic::bind("127.0.0.1:0".parse().unwrap(), &certs, &limits).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::serve(
        endpoint,
        service.clone(),
        acl,
        quiet_hub(&service, hot()),
        tiervec_cloud::ScanSlots::new(2),
        limits,
    ));
    let cfg = link(addr, &certs, Some(&certs), "edge-1");
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(tiervec_edge::link::client_config(&cfg).unwrap());
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    let exchange = |frame: Frame| {
        let conn = conn.clone();
        async move {
            let mut bytes = Vec::new();
            frame.encode(&mut bytes);
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            let answer = recv.read_to_end(1 << 20).await.unwrap();
            let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
            decoder.push(&answer).unwrap();
            let mut frames = Vec::new();
            while let Some(f) = decoder.next_frame().unwrap() {
                frames.push(f);
            }
            frames
        }
    };
    let hello = exchange(Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: PROTOCOL_VERSION,
        edge_name: "large cache".into(),
        cache: Some(CacheAnnouncement {
            collection: "c".into(),
            collection_id: id,
            version: 3,
            budget_bytes: 1 << 40,
            certify: false,
        }),
    }))
    .await;
    assert!(matches!(&hello[..], [Frame::HelloAck(_)]), "{hello:?}");

    let whole = Inventory {
        collection_id: id,
        version: 3,
        vectors: (0..300_000)
            .map(|id| HeldVector {
                id,
                lsn: 1,
                bytes: 64,
            })
            .collect(),
        anchors: vec![(5, vec![1, 2])],
    };
    let parts = whole.clone().split(DEFAULT_MAX_FRAME);
    assert_eq!(parts.len(), 2);
    let count = parts.len();
    for (i, inventory) in parts.into_iter().enumerate() {
        let last = i + 1 == count;
        let answer = exchange(Frame::InventoryPart(InventoryPart { last, inventory })).await;
        if last {
            assert_eq!(answer, vec![Frame::InventoryAck(3)]);
        } else {
            assert_eq!(answer, vec![], "nothing until the last part");
            assert!(service.catalog().edge_cache("edge-1", id).is_none());
        }
    }
    let logged = service.catalog().edge_cache("edge-1", id).unwrap();
    assert_eq!(logged.len(), 300_000);
    assert!(logged.holds_anchor(5));
}

/// Each of the QUIC endpoint's limits at its value and one past it, over real connections:
/// frames in a stream, concurrent streams in a connection, connections of one edge, and
/// connections in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_limits_hold_at_the_limit_and_one_past_it() {
    use tiervec_cloud::quic::QuicLimits;
    use tiervec_shared::protocol::frame::{
        DEFAULT_MAX_FRAME, Frame, FrameDecoder, Hello, PROTOCOL_VERSION,
    };

    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 20);
    let acl = Arc::new(AccessList(HashMap::from([
        ("edge-1".to_owned(), vec!["c".to_owned()]),
        ("edge-2".to_owned(), vec!["c".to_owned()]),
    ])));
    let start = |limits: QuicLimits| {
        let endpoint = quic::bind("127.0.0.1:0".parse().unwrap(), &certs, &limits).unwrap();
        let addr = endpoint.local_addr().unwrap();
        tokio::spawn(quic::serve(
            endpoint,
            service.clone(),
            acl.clone(),
            quiet_hub(&service, hot()),
            tiervec_cloud::ScanSlots::new(2),
            limits,
        ));
        addr
    };
    let per_connection = start(QuicLimits {
        max_connections_per_edge: 2,
        max_streams_per_connection: 4,
        max_frames_per_stream: 8,
        ..QuicLimits::default()
    });
    let in_all = start(QuicLimits {
        max_connections: 4,
        ..QuicLimits::default()
    });
    let clients: HashMap<&str, quinn::Endpoint> = ["edge-1", "edge-2"]
        .into_iter()
        .map(|edge| {
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let cfg = link(per_connection, &certs, Some(&certs), edge);
            client.set_default_client_config(tiervec_edge::link::client_config(&cfg).unwrap());
            (edge, client)
        })
        .collect();
    let connect = |edge: &str, addr| clients[edge].connect(addr, "localhost").unwrap();
    // A Hello (first on a connection) then `pings` Pings, in one stream; the frames answered.
    let exchange = |conn: quinn::Connection, hello: bool, pings: u64| async move {
        let mut bytes = Vec::new();
        if hello {
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: PROTOCOL_VERSION,
                edge_name: "raw".into(),
                cache: None,
            })
            .encode(&mut bytes);
        }
        for i in 0..pings {
            Frame::Ping(i).encode(&mut bytes);
        }
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let answer = recv.read_to_end(1 << 20).await.unwrap_or_default();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        decoder.push(&answer).unwrap();
        let mut frames = Vec::new();
        while let Some(f) = decoder.next_frame().unwrap() {
            frames.push(f);
        }
        frames
    };

    // Frames in a stream: 8 (a Hello and 7 Pings) answered; 9 close the connection, typed.
    let conn = connect("edge-1", per_connection).await.unwrap();
    let frames = exchange(conn.clone(), true, 7).await;
    assert_eq!(frames.len(), 8, "{frames:?}");
    assert!(matches!(frames.last(), Some(Frame::Pong(6))));
    let conn = connect("edge-1", per_connection).await.unwrap();
    let frames = exchange(conn.clone(), true, 8).await;
    match frames.last() {
        Some(Frame::Error(e)) => {
            assert_eq!(ErrorCode::from_u16(e.code), Some(ErrorCode::FrameTooLarge));
            assert!(e.message.contains("more than 8 frames"), "{}", e.message);
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    conn.closed().await;

    // Streams in a connection: 4 open at once; a fifth waits for one of them to end.
    let conn = connect("edge-1", per_connection).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0]).await.unwrap();
        open.push((send, recv));
    }
    let fifth = conn.open_bi();
    tokio::pin!(fifth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fifth)
            .await
            .is_err(),
        "a fifth concurrent stream opened"
    );
    let (mut send, mut recv) = open.pop().unwrap();
    send.finish().unwrap();
    let _ = recv.read_to_end(1 << 20).await;
    tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("the fifth stream opens once one ends")
        .unwrap();
    drop(open);
    conn.close(0u32.into(), b"done");

    // Connections of one edge: two held; a third closes the oldest, not the newest.
    let oldest = connect("edge-2", per_connection).await.unwrap();
    assert_eq!(exchange(oldest.clone(), true, 1).await.len(), 2);
    let second = connect("edge-2", per_connection).await.unwrap();
    assert_eq!(exchange(second.clone(), true, 1).await.len(), 2);
    let third = connect("edge-2", per_connection).await.unwrap();
    assert_eq!(exchange(third.clone(), true, 1).await.len(), 2);
    tokio::time::timeout(Duration::from_secs(5), oldest.closed())
        .await
        .expect("the oldest connection is closed");
    for conn in [&second, &third] {
        assert!(conn.close_reason().is_none());
        assert_eq!(exchange(conn.clone(), false, 1).await.len(), 1);
    }

    // Connections in all: four served; a fifth is refused at once.
    let mut held = Vec::new();
    for edge in ["edge-1", "edge-1", "edge-2", "edge-2"] {
        let conn = connect(edge, in_all).await.unwrap();
        assert_eq!(exchange(conn.clone(), true, 1).await.len(), 2);
        held.push(conn);
    }
    let refused = tokio::time::timeout(Duration::from_secs(5), connect("edge-1", in_all))
        .await
        .expect("refused at once, not left to time out");
    assert!(refused.is_err(), "a fifth connection was accepted");
    for conn in &held {
        assert_eq!(
            exchange(conn.clone(), false, 1).await.len(),
            1,
            "the four still served"
        );
    }
}

/// Binds a new cloud endpoint on the address a stopped one held (its socket is released once
/// the stopped accept loop drops it).
/// What the push tests share: a cloud with collection `c` holding points `0..400` in `dir`,
/// `edge-1` allowed everything, and edge-1's cache files and node configuration — ready to
/// serve and start, and to restart either side.
struct PushBed {
    dir: tempfile::TempDir,
    certs: CertDir,
    acl: Arc<AccessList>,
    push: tiervec_cloud::push::PushConfig,
    cache: tiervec_edge::cache::CacheConfig,
    node: tiervec_edge::node::NodeConfig,
}

impl PushBed {
    /// Pushes every 50 ms, an anchor hot at its first ask with its 10 nearest ids; the edge
    /// answers locally by `rule`, never compacts, asks no certificates and no shadow queries.
    fn new(rule: tiervec_shared::confidence::ConfidenceRule) -> (PushBed, Arc<Service>) {
        let dir = tempfile::tempdir().unwrap();
        let certs = cert_dir(&dir.path().join("certs"), "ours");
        let service = cloud_with_points(dir.path(), 400);
        let snapshot = dir.path().join("edge").join("cache.tvs");
        std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
        let bed = PushBed {
            certs,
            acl: Arc::new(AccessList(HashMap::from([(
                "edge-1".to_owned(),
                vec!["*".to_owned()],
            )]))),
            push: tiervec_cloud::push::PushConfig {
                period_ms: 50,
                anchor_members: 10,
                anchor_hot_count: 1.0,
                ..Default::default()
            },
            cache: tiervec_edge::cache::CacheConfig {
                compact_after: 1_000_000,
                ..tiervec_edge::cache::CacheConfig::beside(&snapshot, 1 << 20)
            },
            node: node_config(rule),
            dir,
        };
        (bed, service)
    }

    /// Serves `service` over QUIC on a fresh port, pushing with this bed's configuration.
    fn serve(&self, service: Arc<Service>) -> (quinn::Endpoint, std::net::SocketAddr) {
        let endpoint = quic::bind(
            "127.0.0.1:0".parse().unwrap(),
            &self.certs,
            &tiervec_cloud::quic::QuicLimits::default(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let hub = PushHub::start(self.push.clone(), service.clone(), hot());
        tokio::spawn(quic::serve(
            endpoint.clone(),
            service,
            self.acl.clone(),
            hub,
            tiervec_cloud::ScanSlots::new(2),
            tiervec_cloud::quic::QuicLimits::default(),
        ));
        (endpoint, addr)
    }

    /// Opens edge-1's cache and starts its node, linked to the cloud at `addr`.
    fn start(
        &self,
        addr: std::net::SocketAddr,
    ) -> (
        Arc<tiervec_edge::node::EdgeNode>,
        Arc<tiervec_edge::cache::EdgeCache>,
        tiervec_edge::cache::OpenReport,
    ) {
        let (cache, report) = tiervec_edge::cache::EdgeCache::open(self.cache.clone()).unwrap();
        let cache = Arc::new(cache);
        let node = tiervec_edge::node::EdgeNode::start(
            cache.clone(),
            self.node.clone(),
            Some(link(addr, &self.certs, Some(&self.certs), "edge-1")),
        )
        .unwrap();
        (Arc::new(node), cache, report)
    }
}

async fn rebind(addr: std::net::SocketAddr, certs: &CertDir) -> quinn::Endpoint {
    for _ in 0..200 {
        if let Ok(endpoint) = quic::bind(addr, certs, &tiervec_cloud::quic::QuicLimits::default()) {
            return endpoint;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    quic::bind(addr, certs, &tiervec_cloud::quic::QuicLimits::default()).unwrap()
}

/// Whether `ready` holds within `within` (polled every 10 ms).
async fn holds_within(mut ready: impl FnMut() -> bool, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if ready() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for(ready: impl FnMut() -> bool) {
    assert!(
        holds_within(ready, Duration::from_secs(5)).await,
        "condition not reached within 5 s"
    );
}

/// The whole push loop over a real socket: a cold edge falls back, the cloud pushes the
/// anchor and its neighbours (logged in its WAL first), the edge answers the same question
/// locally; a delete in the cloud is invalidated on the edge at once; the cache survives a
/// restart of the edge (delta log) and a compaction (new snapshot with the anchors), and a
/// restarted cloud still knows what the edge holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_warm_a_cold_cache_and_deletes_reach_it_at_once() {
    use tiervec_edge::node::Source;
    use tiervec_shared::confidence::ConfidenceRule;

    let (mut bed, service) = PushBed::new(ConfidenceRule {
        max_kth_distance: None,
        max_anchor_distance: Some(1e-3),
    });
    // Every local answer is also asked of the cloud: the live estimate of local recall.
    bed.node.shadow_every = 1;
    let (endpoint, addr) = bed.serve(service.clone());
    let start = |addr| {
        let (node, cache, _) = bed.start(addr);
        (node, cache)
    };
    let (node, cache) = start(addr);
    wait_for(|| node.connected()).await;
    assert_eq!(cache.usage().0, 0, "cold");

    // A cold cache: the cloud answers, then pushes the anchor and its answer.
    let q = vector(123, DIM);
    let first = node.search(&q, 5, 32).await.unwrap();
    assert_eq!(first.source, Source::Cloud);
    wait_for(|| cache.usage().1 >= 1).await;
    let (held, anchors, bytes) = cache.usage();
    assert!(
        held >= 10 && anchors == 1 && bytes <= 1 << 20,
        "{held} {anchors} {bytes}"
    );
    let again = node.search(&q, 5, 32).await.unwrap();
    assert_eq!(
        again.source,
        Source::Local,
        "the same question is now answered locally"
    );
    let ids =
        |hits: &[tiervec_shared::local::LocalHit]| hits.iter().map(|h| h.id).collect::<Vec<_>>();
    assert_eq!(ids(&again.hits), ids(&first.hits));
    wait_for(|| node.shadow_recall().is_some()).await;
    assert_eq!(
        node.shadow_recall(),
        Some(1.0),
        "the shadow query found the local answer complete"
    );
    let manifest = service
        .catalog()
        .edge_cache("edge-1", cache.collection_id())
        .expect("the cloud logged what it pushed");
    assert_eq!(manifest.version, cache.version());
    assert_eq!(manifest.len(), held);

    // A delete of a held vector reaches the cache at once.
    let victim = again.hits[0].id;
    let deleted = std::time::Instant::now();
    service.delete("c", vec![victim]).unwrap();
    wait_for(|| {
        cache
            .search(&q, 5, 32)
            .is_ok_and(|a| a.hits.iter().all(|h| h.id != victim))
    })
    .await;
    assert!(deleted.elapsed() < Duration::from_secs(1));
    let version = cache.version();

    // The edge restarts: its cache comes back from the delta log, and its version matches the
    // cloud's, so nothing is resent.
    drop(node);
    drop(cache);
    let (node, cache) = start(addr);
    assert_eq!(cache.version(), version);
    assert_eq!(cache.usage().0, held - 1);
    wait_for(|| node.connected()).await;
    let after = node.search(&q, 5, 32).await.unwrap();
    assert_eq!(after.source, Source::Local);
    assert!(after.hits.iter().all(|h| h.id != victim));

    // Compaction: a new snapshot holds everything (with the anchor), the log is emptied, and a
    // reopened cache is the same.
    let compacted = tokio::task::spawn_blocking({
        let cache = cache.clone();
        move || cache.compact()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(compacted, Some(version));
    assert_eq!(cache.overlay_len(), 0);
    let snap = cache.snapshot().expect("a snapshot now");
    assert_eq!(snap.view().manifest_version(), version);
    assert_eq!(snap.view().anchor_count(), 1);
    let local = node.search(&q, 5, 32).await.unwrap();
    assert_eq!(
        (local.source, ids(&local.hits)),
        (Source::Local, ids(&after.hits))
    );

    // The cloud restarts on the same data directory: it still knows what the edge holds.
    drop(node);
    endpoint.close(quinn::VarInt::from_u32(0), b"restart");
    drop(service);
    // The old service goes once its connections' tasks have seen the endpoint close.
    let mut reopened = None;
    for _ in 0..500 {
        match Service::open(CloudConfig {
            data_dir: bed.dir.path().join("data"),
            ..CloudConfig::default()
        }) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let service = Arc::new(reopened.expect("the old service let go of its data directory"));
    let known = service
        .catalog()
        .edge_cache("edge-1", cache.collection_id())
        .expect("manifest recovered from the WAL");
    assert_eq!(known.version, version);
    assert_eq!(known.held(victim), None);
    let (_endpoint, addr) = bed.serve(service.clone());
    drop(cache);
    let (node, _cache) = start(addr);
    wait_for(|| node.connected()).await;
    assert_eq!(node.search(&q, 5, 32).await.unwrap().source, Source::Local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certified_answers_are_exact_and_shrink_when_the_cloud_writes_inside_the_ball() {
    use tiervec_cloud::collection::SearchParams;
    use tiervec_edge::node::Source;
    use tiervec_shared::confidence::ConfidenceRule;

    // No confidence rule: only a certificate answers locally.
    let (mut bed, service) = PushBed::new(ConfidenceRule {
        max_kth_distance: None,
        max_anchor_distance: None,
    });
    bed.node.certify = true;
    let (_endpoint, addr) = bed.serve(service.clone());
    let start = || {
        let (node, cache, _) = bed.start(addr);
        (node, cache)
    };
    let (node, cache) = start();
    wait_for(|| node.connected()).await;
    let exact = |v: &[f32], k: usize| {
        let params = SearchParams {
            k,
            ef: 64,
            exact: true,
            max_distance: None,
        };
        let hits = service.search("c", v, &params).unwrap().hits;
        hits.iter().map(|h| h.id).collect::<Vec<_>>()
    };
    let ids =
        |hits: &[tiervec_shared::local::LocalHit]| hits.iter().map(|h| h.id).collect::<Vec<_>>();

    // The cloud answers, then pushes the anchor with its exact ball.
    let q = vector(123, DIM);
    assert_eq!(node.search(&q, 5, 32).await.unwrap().source, Source::Cloud);
    wait_for(|| cache.certified_anchors() == 1).await;
    let certified = node.search(&q, 5, 32).await.unwrap();
    assert!(
        certified.certified,
        "the anchor's own question is certified"
    );
    assert_eq!(certified.source, Source::Local);
    assert_eq!(ids(&certified.hits), exact(&q, 5));
    // A query a little off the anchor: certified only when provably exact.
    for i in 0..50 {
        let mut near = q.clone();
        near[i % DIM] += 0.002 * (i as f32 + 1.0);
        let answer = node.search(&near, 3, 32).await.unwrap();
        if answer.certified {
            assert_eq!(ids(&answer.hits), exact(&near, 3), "query {i}");
        }
    }

    // A new point right next to the anchor: the certificate shrinks at once and the edge stops
    // certifying an answer that lacks it.
    let mut intruder = q.clone();
    intruder[0] += 1e-3;
    let written = std::time::Instant::now();
    service.upsert("c", vec![(9_999, intruder, None)]).unwrap();
    wait_for(|| cache.search(&q, 5, 32).is_ok_and(|a| !a.certified)).await;
    assert!(written.elapsed() < Duration::from_secs(1));
    let after = node.search(&q, 5, 32).await.unwrap();
    assert_eq!(after.source, Source::Cloud);
    assert!(ids(&after.hits).contains(&9_999));

    // A restarted edge starts without certificates (none is read back from its delta log);
    // on the new connection the cloud certifies the held anchor anew, its being still hot and
    // its whole ball held (the intruder is gone again).
    service.delete("c", vec![9_999]).unwrap();
    drop(node);
    drop(cache);
    let reopened = tiervec_edge::cache::EdgeCache::open(bed.cache.clone())
        .unwrap()
        .0;
    assert_eq!(reopened.certified_anchors(), 0);
    assert!(reopened.usage().1 == 1, "the anchor itself is held");
    drop(reopened);
    let (node, cache) = start();
    wait_for(|| node.connected()).await;
    wait_for(|| cache.certified_anchors() == 1).await;
    let recertified = node.search(&q, 5, 32).await.unwrap();
    assert!(recertified.certified);
    assert_eq!(ids(&recertified.hits), exact(&q, 5));
}

/// An edge whose cache files were lost (here: its delta log corrupted, set aside at start-up)
/// comes back nearly empty; the cloud, which logged what the edge held, streams it a snapshot
/// of all of it over a real QUIC stream instead of refilling it anchor by anchor. The edge
/// answers from the cloud meanwhile, then locally again, and both sides agree on the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_lost_its_cache_is_restored_whole_by_a_streamed_snapshot() {
    use tiervec_cloud::push::RestorePolicy;
    use tiervec_edge::node::Source;
    use tiervec_shared::confidence::ConfidenceRule;

    let (mut bed, service) = PushBed::new(ConfidenceRule {
        max_kth_distance: None,
        max_anchor_distance: Some(1e-3),
    });
    // Every question its own anchor.
    bed.push.anchor_merge_distance = 0.0;
    bed.push.restore = RestorePolicy {
        min_vectors: 8,
        held_fraction_below: 0.5,
    };
    let (_endpoint, addr) = bed.serve(service.clone());
    let start = || bed.start(addr);
    let snapshot = bed.cache.snapshot.clone();
    let (node, cache, _) = start();
    wait_for(|| node.connected()).await;

    // Warm the cache with three questions, each pushed as an anchor and its answer.
    let questions: Vec<Vec<f32>> = [11, 222, 333].into_iter().map(|i| vector(i, DIM)).collect();
    let mut answers = Vec::new();
    for (n, q) in questions.iter().enumerate() {
        answers.push(node.search(q, 5, 32).await.unwrap());
        wait_for(|| cache.usage().1 > n).await;
    }
    let ids =
        |hits: &[tiervec_shared::local::LocalHit]| hits.iter().map(|h| h.id).collect::<Vec<_>>();
    for (q, first) in questions.iter().zip(&answers) {
        let local = node.search(q, 5, 32).await.unwrap();
        assert_eq!(
            (local.source, ids(&local.hits)),
            (Source::Local, ids(&first.hits))
        );
    }
    let (held, anchors, _) = cache.usage();
    assert!(
        held >= 20 && anchors == 3,
        "{held} vectors, {anchors} anchors"
    );

    // The edge goes down and its delta log is damaged: at start-up it is set aside, and the
    // cache opens empty.
    drop(node);
    drop(cache);
    let log = bed.cache.deltas.clone();
    let mut bytes = std::fs::read(&log).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    let (node, cache, report) = start();
    assert!(
        !report.set_aside.is_empty(),
        "the damaged log was set aside"
    );
    assert_eq!(cache.usage().0, 0);
    wait_for(|| node.connected()).await;

    // The cloud restores all of it in one streamed snapshot.
    wait_for(|| cache.usage().0 == held && cache.snapshot().is_some()).await;
    assert_eq!(cache.usage().1, anchors);
    let leftovers: Vec<_> = std::fs::read_dir(snapshot.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".incoming-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the streamed file was renamed into place"
    );
    wait_for(|| {
        service
            .catalog()
            .edge_cache("edge-1", cache.collection_id())
            .is_some_and(|m| m.version == cache.version())
    })
    .await;
    let logged = service
        .catalog()
        .edge_cache("edge-1", cache.collection_id())
        .expect("logged");
    assert_eq!(logged.len(), held);
    assert_eq!(
        cache.snapshot().unwrap().view().manifest_version(),
        cache.version()
    );
    for (q, first) in questions.iter().zip(&answers) {
        let local = node.search(q, 5, 32).await.unwrap();
        assert_eq!(
            (local.source, ids(&local.hits)),
            (Source::Local, ids(&first.hits))
        );
    }
}

/// An edge node of collection `c` answering locally under `rule`, with short timeouts for
/// loopback and no shadow queries.
fn node_config(rule: tiervec_shared::confidence::ConfidenceRule) -> tiervec_edge::node::NodeConfig {
    tiervec_edge::node::NodeConfig {
        collection: "c".into(),
        rule,
        lease: Duration::from_secs(30),
        deadline: Duration::from_millis(500),
        cloud_ef: 64,
        backoff: (Duration::from_millis(20), Duration::from_millis(200)),
        shadow_every: 0,
        target_recall: None,
        certify: false,
    }
}

/// Payloads over QUIC (protocol 6): an answer carries each hit's payload when asked and none
/// otherwise, and hits whose payloads do not fit in a frame are refused with `AnswerTooLarge`
/// (at the limit they fit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_payloads_when_asked_within_the_frame_limit() {
    use tiervec_shared::protocol::frame::DEFAULT_MAX_FRAME;
    let dir = tempfile::tempdir().unwrap();
    let certs = cert_dir(&dir.path().join("certs"), "ours");
    let service = cloud_with_points(dir.path(), 0);
    // Six points carry payloads of 1,000,000 bytes of JSON (four fit in a frame, five do
    // not) and one a small payload.
    let big = serde_json::to_string(&"x".repeat(1_000_000 - 2)).unwrap();
    service
        .upsert(
            "c",
            (100..106u64)
                .map(|i| (i, vector(1_000 + i, DIM), Some(big.clone())))
                .chain([(7, vector(7, DIM), Some(r#"{"text":"seven"}"#.to_owned()))])
                .collect(),
        )
        .unwrap();
    assert!(4 * big.len() < DEFAULT_MAX_FRAME && 5 * big.len() > DEFAULT_MAX_FRAME);
    let endpoint = quic::bind(
        "127.0.0.1:0".parse().unwrap(),
        &certs,
        &tiervec_cloud::quic::QuicLimits::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::serve(
        endpoint,
        service.clone(),
        Arc::new(AccessList(HashMap::from([(
            "edge-1".to_owned(),
            vec!["c".to_owned()],
        )]))),
        quiet_hub(&service, hot()),
        tiervec_cloud::ScanSlots::new(2),
        tiervec_cloud::quic::QuicLimits::default(),
    ));
    let edge = CloudLink::connect(&link(addr, &certs, Some(&certs), "edge-1"))
        .await
        .unwrap();
    let id = edge.collections()[0].id;
    let ask = |v: Vec<f32>, k: u32, with_payload: bool| Query {
        k,
        with_payload,
        ..query("c", id, v)
    };
    let answer = edge
        .query(ask(vector(7, DIM), 1, true), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answer.hits[0].id, 7);
    assert_eq!(
        answer.payloads,
        vec![Some(r#"{"text":"seven"}"#.to_owned())]
    );
    let answer = edge
        .query(ask(vector(7, DIM), 3, false), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.payloads.is_empty(), "none unless asked");
    let answer = edge
        .query(ask(vector(1_100, DIM), 4, true), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        answer.payloads.len(),
        4,
        "four hits fit, whichever they are"
    );
    assert_eq!(answer.payloads[0].as_deref(), Some(&big[..]));
    match edge
        .query(ask(vector(1_100, DIM), 7, true), Duration::from_secs(5))
        .await
    {
        Err(QueryFailure::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::AnswerTooLarge, "{message}")
        }
        other => panic!("six large payloads: {other:?}"),
    }
    let answer = edge
        .query(ask(vector(1_100, DIM), 7, false), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answer.hits.len(), 7, "the same hits without payloads");

    // Payloads just under the frame (4 × 1,048,000 bytes) pass the check made before they are
    // copied; with 1,024 hits the encoded answer is over it and is refused where it is encoded.
    service.delete("c", (100..106u64).collect()).unwrap();
    let just_under = serde_json::to_string(&"y".repeat(1_048_000 - 2)).unwrap();
    service
        .upsert(
            "c",
            (200..204u64)
                .map(|i| (i, vector(i, DIM), Some(just_under.clone())))
                .chain((1_000..2_100u64).map(|i| (i, vector(i, DIM), None)))
                .collect(),
        )
        .unwrap();
    assert!(4 * just_under.len() <= DEFAULT_MAX_FRAME);
    let every = Query {
        ef: 1_024,
        ..ask(vector(200, DIM), 1_024, true)
    };
    match edge.query(every, Duration::from_secs(10)).await {
        Err(QueryFailure::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::AnswerTooLarge, "{message}")
        }
        other => panic!("1,024 hits around four large payloads: {other:?}"),
    }
}
