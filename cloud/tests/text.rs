//! Texts in place of vectors over the HTTP API of a real cloud on loopback, with the shipped
//! embedding model (`../shared/models/all-MiniLM-L6-v2`, `TIERVEC_MODEL`) and the dataset's
//! texts and vectors (`TIERVEC_DATA`): a collection made for the model answers each base text
//! with the point of that text; the model it records survives a restart (WAL replay) and a
//! checkpoint; every refusal is typed and creates nothing.

#![cfg(feature = "embed")]

use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tiervec_cloud::config::CloudConfig;
use tiervec_shared::query::MAX_TEXT_CHARS;
use tiervec_test_support::paths::{data_dir, model_dir};

const POINTS: usize = 300;
const MODEL: &str = "all-MiniLM-L6-v2";

struct Server {
    addr: SocketAddr,
    _running: tiervec_cloud::server::Running,
}

async fn start(dir: &Path, checkpoint_wal_bytes: u64) -> Server {
    let config = CloudConfig {
        data_dir: dir.to_owned(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        model_dir: Some(model_dir()),
        checkpoint_wal_bytes,
        ..CloudConfig::default()
    };
    let running = tiervec_cloud::server::spawn(config).await.unwrap();
    let addr = running.addr;
    for _ in 0..1_000 {
        if let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await
            && r.status() == StatusCode::OK
        {
            return Server {
                addr,
                _running: running,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server never became ready");
}

async fn call(
    addr: SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (StatusCode, Value) {
    call(addr, reqwest::Method::POST, path, body).await
}

/// The first `n` base texts and vectors of the dataset.
fn base(n: usize) -> (Vec<String>, Vec<Vec<f32>>) {
    let texts = std::io::BufReader::new(
        std::fs::File::open(data_dir().join("base.jsonl")).expect("base.jsonl (set TIERVEC_DATA)"),
    )
    .lines()
    .take(n)
    .map(|l| {
        serde_json::from_str::<Value>(&l.unwrap()).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_owned()
    })
    .collect();
    let mut file = std::fs::File::open(data_dir().join("base.fvecs")).unwrap();
    let vectors = (0..n)
        .map(|_| {
            let mut row = vec![0u8; 4 + 4 * 384];
            file.read_exact(&mut row).unwrap();
            row[4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    (texts, vectors)
}

/// The nearest point's id for `text`, and the embedding time reported.
async fn nearest(addr: SocketAddr, collection: &str, text: &str) -> (u64, u64) {
    let (status, body) = post(
        addr,
        &format!("/v1/collections/{collection}/search"),
        json!({"text": text, "k": 1, "with_payload": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (
        body["hits"][0]["id"].as_u64().unwrap(),
        body["embed_us"]
            .as_u64()
            .expect("embed_us on a text search"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_are_searched_with_the_model_their_collection_records() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 256 << 20).await;
    let addr = server.addr;

    // Refusals that create nothing: a model this cloud does not run, a dimension not the
    // model's.
    let (status, body) = post(
        addr,
        "/v1/collections",
        json!({"name": "glosses", "dim": 384, "metric": "cosine", "model": "another-model"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_model")),
        "{body}"
    );
    let (status, body) = post(
        addr,
        "/v1/collections",
        json!({"name": "glosses", "dim": 128, "metric": "cosine", "model": MODEL}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{body}"
    );
    let (status, _) = call(
        addr,
        reqwest::Method::GET,
        "/v1/collections/glosses",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = post(
        addr,
        "/v1/collections",
        json!({"name": "glosses", "dim": 384, "metric": "cosine", "model": MODEL}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["model"]["name"], MODEL);
    assert_eq!(body["model"]["dim"], 384);
    let checksum = body["model"]["checksum"].as_str().unwrap().to_owned();
    assert_eq!(checksum.len(), 16);

    let (texts, vectors) = base(POINTS);
    let points: Vec<Value> = (0..POINTS)
        .map(|i| json!({"id": i, "vector": vectors[i], "payload": {"text": texts[i]}}))
        .collect();
    let (status, body) = call(
        addr,
        reqwest::Method::PUT,
        "/v1/collections/glosses/points",
        json!({ "points": points }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Each base text finds its own point: the embedding of a text is (to cosine ≥ 0.999) the
    // vector the dataset holds for it.
    let asked = [0usize, 17, 123, 200, 299];
    for &i in &asked {
        let (id, embed_us) = nearest(addr, "glosses", &texts[i]).await;
        assert_eq!(id, i as u64, "base text {i}");
        assert!(embed_us > 0);
    }
    // A batch mixing texts and a vector.
    let (status, body) = post(
        addr,
        "/v1/collections/glosses/search/batch",
        json!({"searches": [
            {"text": texts[5], "k": 1},
            {"vector": vectors[6], "k": 1},
            {"text": texts[7], "k": 1},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hits"][0]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![5, 6, 7]);

    // Refusals of a search: both or neither of vector and text, an empty text, a text one
    // byte over the limit (the limit itself is embedded), a text for a collection of vectors.
    let search = |body: Value| post(addr, "/v1/collections/glosses/search", body);
    for (body, code) in [
        (
            json!({"text": texts[0], "vector": vectors[0], "k": 1}),
            "invalid_request",
        ),
        (json!({"k": 1}), "invalid_request"),
        (json!({"text": "  ", "k": 1}), "invalid_text"),
        (
            json!({"text": "x".repeat(MAX_TEXT_CHARS + 1), "k": 1}),
            "invalid_text",
        ),
    ] {
        let (status, answer) = search(body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{answer}"
        );
    }
    let (status, answer) = search(json!({"text": "é".repeat(MAX_TEXT_CHARS), "k": 1})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, body) = post(
        addr,
        "/v1/collections",
        json!({"name": "vectors-only", "dim": 384, "metric": "cosine"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body.get("model").is_none(), "{body}");
    let (status, answer) = post(
        addr,
        "/v1/collections/vectors-only/search",
        json!({"text": texts[0], "k": 1}),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("no_model")),
        "{answer}"
    );

    // The model survives a restart that replays the WAL, then one from a checkpoint (a tiny
    // checkpoint threshold makes the restarted server take one).
    drop(server);
    let server = start(dir.path(), 1).await;
    let (status, body) = call(
        server.addr,
        reqwest::Method::GET,
        "/v1/collections/glosses",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["model"]["checksum"], checksum.as_str());
    assert_eq!(nearest(server.addr, "glosses", &texts[123]).await.0, 123);
    // One more write makes the WAL pass the threshold; wait for the checkpoint to cover it.
    let (status, _) = call(
        server.addr,
        reqwest::Method::PUT,
        "/v1/collections/glosses/points",
        json!({"points": [{"id": 9_999, "vector": vectors[1]}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let checkpoints = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tvck")
            })
            .count()
    };
    for _ in 0..500 {
        if checkpoints() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checkpoints() > 0, "no checkpoint was taken");
    drop(server);
    let server = start(dir.path(), 256 << 20).await;
    let (_, body) = call(
        server.addr,
        reqwest::Method::GET,
        "/v1/collections/glosses",
        json!({}),
    )
    .await;
    assert_eq!(body["model"]["checksum"], checksum.as_str());
    assert_eq!(nearest(server.addr, "glosses", &texts[200]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_without_a_model_refuses_texts_and_models() {
    let dir = tempfile::tempdir().unwrap();
    let config = CloudConfig {
        data_dir: dir.path().to_owned(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..CloudConfig::default()
    };
    let running = tiervec_cloud::server::spawn(config).await.unwrap();
    let addr = running.addr;
    for _ in 0..500 {
        if reqwest::get(format!("http://{addr}/readyz"))
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = post(
        addr,
        "/v1/collections",
        json!({"name": "t", "dim": 384, "metric": "cosine", "model": MODEL}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("no_model")),
        "{body}"
    );
    let (status, _) = post(
        addr,
        "/v1/collections",
        json!({"name": "t", "dim": 384, "metric": "cosine"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = post(
        addr,
        "/v1/collections/t/search",
        json!({"text": "a dog", "k": 1}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("no_model")),
        "{body}"
    );

    // A model folder that is not one stops the server at start, naming it.
    let bad = tempfile::tempdir().unwrap();
    let err = tiervec_cloud::server::spawn(CloudConfig {
        data_dir: tempfile::tempdir().unwrap().path().to_owned(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        model_dir: Some(bad.path().to_owned()),
        ..CloudConfig::default()
    })
    .await
    .err()
    .expect("a model folder without a model is refused");
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// An edge started with the model takes texts: it embeds them, answers those its cache holds
/// (the first half of the points) locally, and sends the vector of the others to the cloud
/// over QUIC; every answer is the point of the text asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_answers_texts_from_its_cache_and_through_the_cloud() {
    use std::sync::Arc;
    use tiervec_cloud::certs::CertDir;
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    use tiervec_edge::link::LinkConfig;
    use tiervec_edge::node::{EdgeNode, NodeConfig};
    use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
    use tiervec_shared::snapshot::{self, SnapshotBody, SnapshotSpec};
    use tiervec_shared::{CollectionId, Metric};

    const CACHED: usize = POINTS / 2;
    let dir = tempfile::tempdir().unwrap();
    let certs = CertDir {
        dir: dir.path().join("certs"),
        deployment: "text".into(),
    };
    certs.ensure_ca().unwrap();
    certs.issue_server(&["localhost".into()]).unwrap();
    certs.issue_edge("edge-1").unwrap();
    let quic_addr = tiervec_test_support::net::free_udp_addr();
    let mut config = CloudConfig {
        data_dir: dir.path().join("data"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        model_dir: Some(model_dir()),
        quic_addr: Some(quic_addr),
        certs_dir: certs.dir.clone(),
        edges: [("edge-1".to_owned(), vec!["*".to_owned()])].into(),
        ..CloudConfig::default()
    };
    // Nothing is pushed: the cache stays what the snapshot holds.
    config.push.anchor_hot_count = 1e12;
    config.push.hot_id_count = 1e12;
    let running = tiervec_cloud::server::spawn(config).await.unwrap();
    let addr = running.addr;
    for _ in 0..1_000 {
        if reqwest::get(format!("http://{addr}/readyz"))
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, created) = post(
        addr,
        "/v1/collections",
        json!({"name": "glosses", "dim": 384, "metric": "cosine", "model": MODEL}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let identity = CollectionId(
        *uuid::Uuid::parse_str(created["id"].as_str().unwrap())
            .unwrap()
            .as_bytes(),
    );
    let (texts, vectors) = base(POINTS);
    let points: Vec<Value> = (0..POINTS)
        .map(|i| json!({"id": i, "vector": vectors[i], "payload": {"text": texts[i]}}))
        .collect();
    let (status, written) = call(
        addr,
        reqwest::Method::PUT,
        "/v1/collections/glosses/points",
        json!({ "points": points }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{written}");
    let lsn = written["lsn"].as_u64().unwrap();

    // The edge's snapshot: the first CACHED points, under the cloud's identity and LSN.
    let mut builder = HnswBuilder::new(384, Metric::Cosine, HnswParams::default());
    for v in &vectors[..CACHED] {
        builder.insert(v).unwrap();
    }
    let body = SnapshotBody::from_builder(
        &builder,
        "glosses",
        (0..CACHED as u64).collect(),
        vec![lsn; CACHED],
        None,
    )
    .unwrap();
    let spec = SnapshotSpec {
        collection: identity,
        dim: 384,
        metric: Metric::Cosine,
        params: HnswParams::default(),
    };
    let snapshot_path = dir.path().join("edge.tvs");
    tiervec_edge::write_snapshot_atomic(&snapshot_path, &snapshot::encode(&spec, &body).unwrap())
        .unwrap();
    let node = Arc::new(
        EdgeNode::start(
            Arc::new(
                EdgeCache::open(CacheConfig::beside(&snapshot_path, 64 << 20))
                    .unwrap()
                    .0,
            ),
            NodeConfig {
                collection: "glosses".into(),
                // A text's own point lies within 0.002 of its embedding; any other gloss is
                // far farther.
                rule: tiervec_shared::confidence::ConfidenceRule::kth(0.01),
                lease: Duration::from_secs(30),
                deadline: Duration::from_secs(2),
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
    let embedder = Arc::new(tiervec_embed::Embedder::open(&model_dir()).unwrap());
    let state = tiervec_edge::http::EdgeState::new(
        node.clone(),
        64,
        "glosses".into(),
        tiervec_cloud::server::prometheus(),
    )
    .with_embedder(embedder);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, tiervec_edge::http::router(state)).await });
    for _ in 0..3_000 {
        if node.connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(node.connected(), "the edge never connected");

    let readiness: Value = reqwest::get(format!("http://{edge}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readiness["ready"], true, "{readiness}");
    assert_eq!(readiness["link_up"], true, "{readiness}");
    assert_eq!(readiness["takes_text"], true, "{readiness}");
    assert_eq!(
        readiness["cached_vectors"].as_u64(),
        Some(CACHED as u64),
        "{readiness}"
    );

    let (mut local, mut cloud) = (0, 0);
    for i in (0..POINTS).step_by(3) {
        let (status, answer) = post(
            edge,
            "/v1/collections/glosses/search",
            json!({"text": texts[i], "k": 1}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(
            answer["hits"][0]["id"].as_u64(),
            Some(i as u64),
            "text {i}: {answer}"
        );
        assert!(
            answer["embed_us"].as_u64().is_some_and(|us| us > 0),
            "{answer}"
        );
        match (answer["source"].as_str().unwrap(), i < CACHED) {
            ("local", true) => local += 1,
            ("cloud", false) => cloud += 1,
            (source, cached) => panic!("text {i} (cached: {cached}) answered from {source}"),
        }
    }
    assert_eq!((local, cloud), (CACHED.div_ceil(3), (POINTS - CACHED) / 3));
    // An edge without the model refuses texts, and both or neither of vector and text.
    let (status, answer) = post(edge, "/v1/collections/glosses/search", json!({"k": 1})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{answer}"
    );
    drop(running);
}
