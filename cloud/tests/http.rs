//! The HTTP/JSON API over a real loopback socket: every route, every documented error status,
//! API keys, body limits, OpenAPI and metrics.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::http::{ApiKey, Role};
use tiervec_test_support::vectors::vector;

const RW: &str = "rw-key-0123456789";
const RO: &str = "ro-key-0123456789";

struct Server {
    addr: SocketAddr,
    _running: tiervec_cloud::server::Running,
    _dir: tempfile::TempDir,
}

async fn start(max_body_bytes: usize) -> Server {
    start_with(|c| c.max_body_bytes = max_body_bytes).await
}

/// A server whose configuration `edit` changed.
async fn start_with(edit: impl FnOnce(&mut CloudConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CloudConfig {
        data_dir: dir.path().to_owned(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        api_keys: vec![
            ApiKey {
                key: RW.into(),
                role: Role::ReadWrite,
            },
            ApiKey {
                key: RO.into(),
                role: Role::ReadOnly,
            },
        ],
        ..CloudConfig::default()
    };
    edit(&mut config);
    let running = tiervec_cloud::server::spawn(config).await.unwrap();
    let addr = running.addr;
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status() == StatusCode::OK
        {
            return Server {
                addr,
                _running: running,
                _dir: dir,
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
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().request(method, format!("http://{addr}{path}"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_statuses_and_errors() {
    use reqwest::Method as M;
    let s = start(1 << 20).await;
    let a = s.addr;

    let (st, body) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "docs", "dim": 8, "metric": "cosine"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["dim"], 8);
    // `gpu` where a device serves exact search (`--features gpu` on a GPU machine).
    assert!(
        ["cpu_simd", "gpu"].contains(&body["exact_engine"].as_str().unwrap_or_default()),
        "{body}"
    );
    let (st, body) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "docs", "dim": 8, "metric": "cosine"})),
    )
    .await;
    assert_eq!(
        (st, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("collection_exists"))
    );

    let points: Vec<Value> = (0..50)
        .map(|i| json!({"id": i, "vector": vector(i, 8), "payload": {"n": i}}))
        .collect();
    let (st, body) = call(
        a,
        M::PUT,
        "/v1/collections/docs/points",
        Some(RW),
        Some(json!({"points": points})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body["lsn"].as_u64().unwrap() >= 2);

    let (st, body) = call(
        a,
        M::POST,
        "/v1/collections/docs/search",
        Some(RO),
        Some(json!({"vector": vector(7, 8), "k": 3, "with_payload": true})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["hits"][0]["id"], 7);
    assert_eq!(body["hits"][0]["payload"], json!({"n": 7}));
    assert_eq!(body["engine"], "exact");
    assert!(body["took_us"].is_u64());
    let (_, body) = call(
        a,
        M::POST,
        "/v1/collections/docs/search",
        Some(RO),
        Some(json!({"vector": vector(7, 8), "k": 3, "max_distance": 0.0001})),
    )
    .await;
    assert_eq!(body["hits"].as_array().unwrap().len(), 1);
    assert!(body["hits"][0].get("payload").is_none());

    let (st, body) = call(
        a,
        M::POST,
        "/v1/collections/docs/search/batch",
        Some(RO),
        Some(json!({"searches": [
        {"vector": vector(1, 8), "k": 1}, {"vector": vector(2, 8), "k": 2, "exact": true}]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["results"][1]["hits"][0]["id"], 2);

    let (st, body) = call(a, M::GET, "/v1/collections/docs/points/9", Some(RO), None).await;
    assert_eq!(
        (st, body["payload"].clone()),
        (StatusCode::OK, json!({"n": 9}))
    );
    let (st, body) = call(
        a,
        M::POST,
        "/v1/collections/docs/points/delete",
        Some(RW),
        Some(json!({"ids": [9]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = call(a, M::GET, "/v1/collections/docs/points/9", Some(RO), None).await;
    assert_eq!(
        (st, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("point_not_found"))
    );
    let (_, body) = call(a, M::GET, "/v1/collections", Some(RO), None).await;
    assert_eq!(body["collections"][0]["points"], 49);

    // Every bad input has its status and a message.
    let bad: Vec<(M, &str, Value, StatusCode, &str)> = vec![
        (
            M::POST,
            "/v1/collections/nope/search",
            json!({"vector": vector(1, 8), "k": 1}),
            StatusCode::NOT_FOUND,
            "collection_not_found",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": vector(1, 7), "k": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "dimension_mismatch",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": vector(1, 8), "k": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": vector(1, 8), "k": 5000}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": [1e39, 0, 0, 0, 0, 0, 0, 0], "k": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": ["NaN", 0, 0, 0, 0, 0, 0, 0], "k": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": vector(1, 8)}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            M::PUT,
            "/v1/collections/docs/points",
            json!({"points": [{"id": 1, "vector": vector(1, 3)}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "dimension_mismatch",
        ),
        (
            M::POST,
            "/v1/collections",
            json!({"name": "x y", "dim": 8, "metric": "cosine"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            M::POST,
            "/v1/collections",
            json!({"name": "x", "dim": 8, "metric": "manhattan"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            M::DELETE,
            "/v1/collections/nope",
            Value::Null,
            StatusCode::NOT_FOUND,
            "collection_not_found",
        ),
        // A component just past the stated bound is refused, not rounded onto it as f32.
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": [-999_999_986_991_105.0, 0, 0, 0, 0, 0, 0, 0], "k": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            M::POST,
            "/v1/collections/docs/search",
            json!({"vector": vector(1, 8), "k": 1.5}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            M::GET,
            "/v1/collections/docs/hot?n=10001",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            M::GET,
            "/v1/collections/docs/hot?n=-1",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            M::GET,
            "/v1/collections/docs/points/-1",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            M::POST,
            "/v1/collections/nope/search/batch",
            json!({"searches": []}),
            StatusCode::NOT_FOUND,
            "collection_not_found",
        ),
    ];
    for (method, path, body, status, code) in bad {
        let body = (!body.is_null()).then_some(body);
        let (st, got) = call(a, method.clone(), path, Some(RW), body).await;
        assert_eq!(st, status, "{method} {path}: {got}");
        assert_eq!(got["code"], code, "{method} {path}: {got}");
        assert!(!got["message"].as_str().unwrap().is_empty());
    }

    // Whole numbers written as floats are the integers JSON Schema says they are; the bound
    // components sit on is accepted.
    let (st, got) = call(
        a,
        M::POST,
        "/v1/collections/docs/search",
        Some(RO),
        Some(
            json!({"vector": [-999_999_986_991_104.0, 0, 0, 0, 0, 0, 0, 0], "k": 2.0, "ef": 64.0}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert_eq!(got["hits"].as_array().unwrap().len(), 2);
    let (st, got) = call(
        a,
        M::GET,
        "/v1/collections/docs/hot?n=10000",
        Some(RO),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{got}");

    // The document states the bounds the API enforces.
    let (_, spec) = call(a, M::GET, "/v1/openapi.json", None, None).await;
    let search = &spec["components"]["schemas"]["SearchRequest"]["properties"];
    assert_eq!(search["k"]["maximum"], 1_024);
    assert_eq!(search["ef"]["maximum"], 4_096);
    assert_eq!(search["vector"]["items"]["maximum"], 999_999_986_991_104.0);
    assert_eq!(
        spec["components"]["schemas"]["UpsertPoints"]["properties"]["points"]["maxItems"],
        10_000
    );
    assert_eq!(
        spec["components"]["schemas"]["PointIn"]["properties"]["id"]["maximum"],
        u64::MAX
    );
    assert!(spec["paths"]["/v1/collections/{name}/search"]["post"]["responses"]["422"].is_object());

    // Bodies over the limit get 413 as JSON.
    let big: Vec<Value> = (0..20_000)
        .map(|i| json!({"id": i, "vector": vector(i, 8)}))
        .collect();
    let (st, got) = call(
        a,
        M::PUT,
        "/v1/collections/docs/points",
        Some(RW),
        Some(json!({"points": big})),
    )
    .await;
    assert_eq!(
        (st, got["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")),
        "{got}"
    );

    // Keys: missing 401, unknown 403, read-only key writing 403; open routes need none.
    let q = json!({"vector": vector(1, 8), "k": 1});
    let (st, got) = call(
        a,
        M::POST,
        "/v1/collections/docs/search",
        None,
        Some(q.clone()),
    )
    .await;
    assert_eq!(
        (st, got["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_api_key"))
    );
    let (st, got) = call(
        a,
        M::POST,
        "/v1/collections/docs/search",
        Some("rw-key-0123456780"),
        Some(q.clone()),
    )
    .await;
    assert_eq!(
        (st, got["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("invalid_api_key"))
    );
    let (st, got) = call(
        a,
        M::POST,
        "/v1/collections/docs/points/delete",
        Some(RO),
        Some(json!({"ids": [1]})),
    )
    .await;
    assert_eq!(
        (st, got["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let resp = reqwest::Client::new()
        .post(format!("http://{a}/v1/collections/docs/search"))
        .header("api-key", RO)
        .json(&q)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for open in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        let (st, _) = call(a, M::GET, open, None, None).await;
        assert_eq!(st, StatusCode::OK, "{open}");
    }

    let (_, spec) = call(a, M::GET, "/v1/openapi.json", None, None).await;
    for path in [
        "/v1/collections",
        "/v1/collections/{name}/search",
        "/v1/collections/{name}/points",
        "/v1/collections/{name}/search/batch",
    ] {
        assert!(spec["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }
    assert!(spec["components"]["schemas"].get("SearchRequest").is_some());

    let (_, metrics) = call(a, M::GET, "/metrics", None, None).await;
    let text = metrics.as_str().unwrap();
    for needle in [
        "tiervec_http_requests_total",
        "tiervec_http_request_duration_seconds",
        "tiervec_wal_fsync_seconds",
        "route=\"/v1/collections/{name}/search\"",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }

    let (st, _) = call(a, M::DELETE, "/v1/collections/docs", Some(RW), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = call(a, M::GET, "/v1/collections/docs", Some(RO), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// `/readyz` (docs/cloud.md, "Readiness"): recovered, the log writable and maintenance running
/// make it 200; its body says so field by field and, per collection, how many points the graph
/// does not cover yet, down to none once the maintenance loop has indexed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_what_the_node_can_serve() {
    use reqwest::Method as M;
    let s = start(1 << 20).await;
    let a = s.addr;
    let (st, body) = call(a, M::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"ready": true, "recovered": true, "log_writable": true, "log_error": null,
               "maintenance_error": null, "checkpoint_error": null, "collections": []})
    );

    let (st, _) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "docs", "dim": 8, "metric": "l2"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let points: Vec<Value> = (0..300)
        .map(|i| json!({"id": i, "vector": vector(i, 8)}))
        .collect();
    let (st, _) = call(
        a,
        M::PUT,
        "/v1/collections/docs/points",
        Some(RW),
        Some(json!({ "points": points })),
    )
    .await;
    assert_eq!(st, StatusCode::OK);

    let mut last = Value::Null;
    for _ in 0..1_000 {
        let (st, body) = call(a, M::GET, "/readyz", None, None).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        let docs = &body["collections"][0];
        assert_eq!(
            (docs["name"].as_str(), docs["points"].as_u64()),
            (Some("docs"), Some(300))
        );
        let unindexed = docs["unindexed"].as_u64().unwrap();
        assert_eq!(
            docs["graph_complete"].as_bool(),
            Some(unindexed == 0),
            "{body}"
        );
        if unindexed == 0 {
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the graph never covered every point: {last}");
}

/// An answer carries at most 16 MiB (`MAX_ANSWER_BYTES`): hits whose payloads would pass it
/// are refused with a 422 that says what to ask for instead, at the limit they are served, and
/// a batch asking for more hits than fit is refused before any search runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_past_the_size_limit_are_refused() {
    use reqwest::Method as M;
    use tiervec_cloud::http::{HIT_JSON_BYTES, MAX_ANSWER_BYTES};
    let s = start(64 << 20).await;
    let a = s.addr;
    let (st, _) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "big", "dim": 8, "metric": "l2"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    // 20 points with payloads of 900,000 bytes of JSON text each.
    let text = "x".repeat(900_000 - 2);
    for i in 0..20u64 {
        let (st, body) = call(
            a,
            M::PUT,
            "/v1/collections/big/points",
            Some(RW),
            Some(json!({"points": [{"id": i, "vector": vector(i, 8), "payload": text}]})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    let per_hit = 900_000 + HIT_JSON_BYTES;
    let fits = MAX_ANSWER_BYTES / per_hit;
    assert!(fits < 20);
    let search = |k: usize, with_payload: bool| json!({"vector": vector(0, 8), "k": k, "with_payload": with_payload});
    let path = "/v1/collections/big/search";
    let (st, body) = call(a, M::POST, path, Some(RO), Some(search(fits, true))).await;
    assert_eq!(st, StatusCode::OK, "at the limit");
    assert_eq!(body["hits"].as_array().unwrap().len(), fits);
    let (st, body) = call(a, M::POST, path, Some(RO), Some(search(fits + 1, true))).await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "one hit past the limit"
    );
    assert_eq!(body["code"], "answer_too_large");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("without payloads"),
        "{body}"
    );
    let (st, _) = call(a, M::POST, path, Some(RO), Some(search(20, false))).await;
    assert_eq!(st, StatusCode::OK, "without payloads the hits fit");

    let batch = |searches: usize| json!({"searches": vec![json!({"vector": vector(1, 8), "k": 1_024}); searches]});
    let batch_path = "/v1/collections/big/search/batch";
    let most = MAX_ANSWER_BYTES / HIT_JSON_BYTES / 1_024;
    let (st, body) = call(a, M::POST, batch_path, Some(RO), Some(batch(most))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = call(a, M::POST, batch_path, Some(RO), Some(batch(most + 1))).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("split the batch"),
        "{body}"
    );
}

/// A path no route takes and a method a route does not take answer the API's error body like
/// every other refusal (the `http_body` fuzz target found the bare 404 of `GET
/// …/points/` with no id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_an_error_body() {
    use reqwest::Method as M;
    let s = start(1 << 20).await;
    let a = s.addr;
    let (st, _) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "docs", "dim": 8, "metric": "l2"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    for (method, path, status, code) in [
        (
            M::GET,
            "/v1/collections/docs/points/",
            404,
            "route_not_found",
        ),
        (M::GET, "/v1/nothing-here", 404, "route_not_found"),
        (M::PATCH, "/v1/collections/docs", 405, "method_not_allowed"),
        (
            M::GET,
            "/v1/collections/docs/search",
            405,
            "method_not_allowed",
        ),
    ] {
        let (st, body) = call(a, method.clone(), path, Some(RW), None).await;
        assert_eq!(st.as_u16(), status, "{method} {path}: {body}");
        assert_eq!(body["code"], code, "{method} {path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(path)),
            "{body}"
        );
    }
}

/// An id given twice in one upsert keeps its last vector and payload, as if written in order
/// (the `http_body` fuzz target found the first one kept); the log holds it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_given_twice_in_one_upsert_keeps_its_last_value() {
    use reqwest::Method as M;
    let s = start(1 << 20).await;
    let a = s.addr;
    let (st, _) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "docs", "dim": 4, "metric": "l2"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let points = json!({"points": [
        {"id": 1, "vector": [1.0, 0.0, 0.0, 0.0], "payload": {"text": "first"}},
        {"id": 2, "vector": [0.0, 1.0, 0.0, 0.0]},
        {"id": 1, "vector": [0.0, 0.0, 1.0, 0.0], "payload": {"text": "last"}},
    ]});
    let (st, _) = call(
        a,
        M::PUT,
        "/v1/collections/docs/points",
        Some(RW),
        Some(points),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, point) = call(a, M::GET, "/v1/collections/docs/points/1", Some(RW), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(point["payload"], json!({"text": "last"}), "{point}");
    assert_eq!(point["vector"], json!([0.0, 0.0, 1.0, 0.0]), "{point}");
    let (_, description) = call(a, M::GET, "/v1/collections/docs", Some(RW), None).await;
    assert_eq!(description["points"], 2, "{description}");
}

/// `max_collections` at its limit and one past it: the third create of three is taken, the
/// fourth refused (409 `too_many_collections`), and a drop makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_past_max_collections_are_refused() {
    use reqwest::Method as M;
    let s = start_with(|c| c.max_collections = 3).await;
    let create = |name: &str| json!({"name": name, "dim": 4, "metric": "l2"});
    for name in ["a", "b", "c"] {
        let (st, body) = call(
            s.addr,
            M::POST,
            "/v1/collections",
            Some(RW),
            Some(create(name)),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let (st, body) = call(
        s.addr,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(create("d")),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "too_many_collections", "{body}");
    let (st, _) = call(s.addr, M::DELETE, "/v1/collections/a", Some(RW), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = call(
        s.addr,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(create("d")),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

/// Off a cluster a collection has one shard: more is refused with a reason, and a collection's
/// description says how many it has.
#[tokio::test]
async fn several_shards_need_a_cluster() {
    use reqwest::Method as M;
    let s = start_with(|_| {}).await;
    let (st, body) = call(
        s.addr,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "a", "dim": 4, "metric": "l2", "shards": 2})),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "shards_need_a_cluster", "{body}");
    let (st, body) = call(
        s.addr,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "a", "dim": 4, "metric": "l2", "shards": 1})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["shards"], 1);
    let (st, body) = call(
        s.addr,
        M::PUT,
        "/v1/collections/a/points",
        Some(RW),
        Some(json!({"points": [{"id": 1, "vector": [1, 0, 0, 0]}]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(
        body["shards"],
        json!([]),
        "one log orders everything: {body}"
    );
    let (st, body) = call(
        s.addr,
        M::POST,
        "/v1/collections/a/search",
        Some(RO),
        Some(json!({"vector": [1, 0, 0, 0], "k": 1, "after_shards": [{"shard": 0, "lsn": 1}]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["missing_shards"], json!([]));
    assert_eq!(body["hits"][0]["id"], 1);
    // A shard past the most a collection may have is refused, also where it is ignored.
    let (st, body) = call(
        s.addr,
        M::POST,
        "/v1/collections/a/search",
        Some(RO),
        Some(json!({"vector": [1, 0, 0, 0], "k": 1, "after_shards": [{"shard": 64, "lsn": 1}]})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
}

/// `GET …/snapshot`: a snapshot file an edge opens, of the collection's identity, with the
/// points as written and their payloads as JSON; `max_vectors` bounded at
/// `MAX_SNAPSHOT_VECTORS` (one more is refused) and at least 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_snapshot_carries_the_collection_its_points_and_payloads() {
    use reqwest::Method as M;
    use tiervec_cloud::http::MAX_SNAPSHOT_VECTORS;
    use tiervec_shared::snapshot::{AlignedBytes, Snapshot};
    let s = start(1 << 20).await;
    let a = s.addr;
    let (st, created) = call(
        a,
        M::POST,
        "/v1/collections",
        Some(RW),
        Some(json!({"name": "notes", "dim": 8, "metric": "cosine"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let points: Vec<Value> = (0..40u64)
        .map(|i| json!({"id": 1000 + i, "vector": vector(i, 8), "payload": {"text": format!("note {i}"), "n": i}}))
        .collect();
    let (st, body) = call(
        a,
        M::PUT,
        "/v1/collections/notes/points",
        Some(RW),
        Some(json!({ "points": points })),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");

    let get = |query: String| {
        let url = format!("http://{a}/v1/collections/notes/snapshot{query}");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(RO)
                .send()
                .await
                .unwrap()
        }
    };
    let resp = get("?max_vectors=25".into()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let raw = resp.bytes().await.unwrap();
    let mut bytes = AlignedBytes::with_capacity(raw.len());
    bytes.extend_from_slice(&raw);
    let snapshot = Snapshot::open(bytes).expect("a valid snapshot");
    let header = snapshot.header();
    assert_eq!(header.count, 25, "the first 25 points written");
    assert_eq!(header.spec.dim, 8);
    assert_eq!(
        header.spec.collection.to_string(),
        created["id"].as_str().unwrap(),
        "the collection's identity"
    );
    let view = snapshot.view();
    for node in 0..25u32 {
        let id = view.ids()[node as usize];
        assert!((1000..1025).contains(&id), "{id}");
        let payload: Value = serde_json::from_str(&view.payload(node).unwrap()).unwrap();
        assert_eq!(
            payload,
            json!({"text": format!("note {}", id - 1000), "n": id - 1000})
        );
    }
    assert_eq!(
        get(String::new()).await.status(),
        StatusCode::OK,
        "the default"
    );
    for bad in [0, MAX_SNAPSHOT_VECTORS + 1] {
        let resp = get(format!("?max_vectors={bad}")).await;
        assert_eq!(
            resp.status(),
            StatusCode::BAD_REQUEST,
            "max_vectors = {bad}"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "invalid_request", "{body}");
    }
    assert_eq!(
        get(format!("?max_vectors={MAX_SNAPSHOT_VECTORS}"))
            .await
            .status(),
        StatusCode::OK,
        "at the limit"
    );
    let missing = reqwest::Client::new()
        .get(format!("http://{a}/v1/collections/nope/snapshot"))
        .bearer_auth(RO)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
