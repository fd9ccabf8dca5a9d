//! The cloud tier on a real slice of the dataset, over a real loopback socket: 5,000 base
//! vectors with their texts loaded through the HTTP API, 300 real queries searched over HTTP,
//! recall@10 checked against exact ground truth computed for that slice.

use std::time::Duration;

use serde_json::value::RawValue;
use tiervec_cloud::client::Client;
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::http::{CreateCollection, PointIn, SearchRequest};
use tiervec_shared::{Metric, exact};
use tiervec_testbed::dataset::Dataset;
use tiervec_testbed::measure::recall_at_10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_slice_over_http_has_high_recall() {
    let ds = Dataset::load_default().expect("dataset");
    let texts = ds.base_texts().unwrap();
    let count = 5_000;
    let dim = ds.base.dim;
    let dir = tempfile::tempdir().unwrap();
    let config = CloudConfig {
        data_dir: dir.path().to_owned(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..CloudConfig::default()
    };
    let running = tiervec_cloud::server::spawn(config).await.unwrap();
    let client = Client::new(&format!("http://{}", running.addr), None);
    while !client.ready().await {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .create_collection(&CreateCollection {
            name: "wordnet".into(),
            dim,
            metric: Metric::Cosine,
            m: None,
            ef_construction: None,
            shards: None,
            model: None,
        })
        .await
        .unwrap();
    for start in (0..count).step_by(500) {
        let points = (start..start + 500)
            .map(|i| PointIn {
                id: i as u64,
                vector: ds.base.row(i).to_vec(),
                payload: Some(
                    RawValue::from_string(serde_json::json!({ "text": texts[i] }).to_string())
                        .unwrap(),
                ),
            })
            .collect();
        client.upsert("wordnet", points).await.unwrap();
    }
    // Wait for the graph so the graph path (not the exact fallback) is what is measured.
    loop {
        let d = client.collection("wordnet").await.unwrap();
        if d.indexed_points == count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut recall = 0.0;
    for q in 0..300 {
        let query = ds.queries.row(q);
        let truth = exact::search(&ds.base.data[..count * dim], dim, Metric::Cosine, query, 10);
        let ids: Vec<u64> = truth.iter().map(|n| n.id as u64).collect();
        let dists: Vec<f32> = truth.iter().map(|n| n.distance).collect();
        let answer = client
            .search(
                "wordnet",
                &SearchRequest {
                    vector: Some(query.to_vec()),
                    text: None,
                    k: 10,
                    ef: Some(64),
                    exact: false,
                    max_distance: None,
                    with_payload: true,
                    after_lsn: None,
                    after_shards: Vec::new(),
                },
            )
            .await
            .unwrap();
        assert_eq!(answer.engine, "graph");
        let first = &answer.hits[0];
        let text: serde_json::Value =
            serde_json::from_str(first.payload.as_ref().unwrap().get()).unwrap();
        assert_eq!(text["text"], texts[first.id as usize]);
        let found: Vec<(u64, f32)> = answer.hits.iter().map(|h| (h.id, h.distance)).collect();
        recall += recall_at_10(&found, &ids, &dists);
    }
    let recall = recall / 300.0;
    assert!(recall >= 0.95, "recall@10 over HTTP = {recall}");
}
