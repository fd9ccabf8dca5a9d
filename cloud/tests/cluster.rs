//! The cloud as a cluster on NATS JetStream: real `nats-server` processes forming a JetStream
//! cluster and real `tiervec-cloud` processes on loopback, killed with SIGKILL mid-write.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tiervec_cloud::certs::CertDir;
use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_edge::link::LinkConfig;
use tiervec_edge::node::{EdgeNode, NodeConfig, Source};
use tiervec_test_support::nats::{NatsCluster, NatsTls};
use tiervec_test_support::net::free_udp_addr;
use tiervec_test_support::process::{ChildGuard, read_addr_file};
use tiervec_test_support::vectors::family_vector;

const DIM: usize = 8;

/// One cluster at a time: each test runs three nats-servers and up to three nodes, and ten of
/// them at once on a two-core machine starve heartbeats and server starts into timeouts that
/// test the machine, not the code. Run one after another they take about as long.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cloud node on the cluster's streams, its data in `dir`; its HTTP address.
fn spawn_node(dir: &Path, nats: &[String]) -> (ChildGuard, String) {
    spawn_node_with(dir, nats, &[])
}

/// The same with `extra` `--set` overrides.
fn spawn_node_with(dir: &Path, nats: &[String], extra: &[&str]) -> (ChildGuard, String) {
    let _ = std::fs::remove_file(dir.join("addr"));
    let guard = start_node(dir, nats, extra);
    let addr = read_addr_file(&dir.join("addr"), Duration::from_secs(60));
    (guard, addr)
}

/// Starts a cloud node with `extra` `--set` overrides, without waiting for it.
fn start_node(dir: &Path, nats: &[String], extra: &[&str]) -> ChildGuard {
    std::fs::create_dir_all(dir).unwrap();
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let urls: Vec<String> = nats.iter().map(|u| format!("{u:?}")).collect();
    let child = Command::new(env!("CARGO_BIN_EXE_tiervec-cloud"))
        .arg("serve")
        .args([
            "--set",
            &format!("data_dir={:?}", dir.join("data").to_str().unwrap()),
        ])
        .args(["--set", "http_addr=\"127.0.0.1:0\""])
        .args(["--set", &format!("cluster.nats=[{}]", urls.join(","))])
        .args(["--set", "cluster.prefix=\"T\""])
        .args([
            "--set",
            &format!(
                "cluster.node={:?}",
                dir.file_name().unwrap().to_str().unwrap()
            ),
        ])
        .args(extra.iter().flat_map(|o| ["--set", o]))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    ChildGuard::new(child)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn wait_ready(http: &reqwest::Client, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node {addr} never became ready");
}

/// The point `id` of collection `c` as node `addr` holds it: its vector, or `None` when it has
/// no such point.
async fn point(http: &reqwest::Client, addr: &str, id: u64) -> Option<Vec<f32>> {
    point_of(http, addr, "c", id).await
}

/// The same in `collection`.
async fn point_of(
    http: &reqwest::Client,
    addr: &str,
    collection: &str,
    id: u64,
) -> Option<Vec<f32>> {
    let r = http
        .get(format!(
            "http://{addr}/v1/collections/{collection}/points/{id}"
        ))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let body: Value = r.json().await.ok()?;
    serde_json::from_value(body["vector"].clone()).ok()
}

/// Waits (up to `within`) until node `addr` holds `id` as `want` (`None`: deleted).
async fn until_held(
    http: &reqwest::Client,
    addr: &str,
    id: u64,
    want: Option<&[f32]>,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if point(http, addr, id).await.as_deref() == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two cloud nodes on a three-server JetStream cluster: a write acknowledged by either is
/// visible at once on the node that acknowledged it and soon on the other; a second create of
/// the same name is refused; one node killed (SIGKILL) mid-write, then one nats-server, the
/// writes go on at the surviving node; the killed node, restarted with an empty data folder,
/// catches up from the streams; every acknowledged write and deletion is on both at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_every_acknowledged_write_across_kills() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(dir.path(), 3);
    let urls = nats.urls();
    let http = client();
    let (mut node_a, mut a) = spawn_node(&dir.path().join("a"), &urls);
    let (_node_b, b) = spawn_node(&dir.path().join("b"), &urls);
    wait_ready(&http, &a).await;
    wait_ready(&http, &b).await;

    let create = json!({"name": "c", "dim": DIM, "metric": "l2"});
    let r = http
        .post(format!("http://{a}/v1/collections"))
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = http
        .post(format!("http://{b}/v1/collections"))
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "a second create of `c` must be refused");
    // The refused create's stream (made before its publish) is gone again.
    let jsz: Value = http
        .get(format!(
            "http://127.0.0.1:{}/jsz?streams=true",
            nats.servers[1].monitor_port
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let streams: Vec<&str> = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .filter_map(|s| s["name"].as_str())
        .filter(|n| n.starts_with("T_SHARD_"))
        .collect();
    assert_eq!(streams.len(), 1, "{streams:?}");

    // A collection created at one node is written at the other at once: the other catches up
    // with the catalog rather than answer 404.
    for i in 0..10 {
        let name = format!("fresh{i}");
        let r = http
            .post(format!("http://{a}/v1/collections"))
            .json(&json!({"name": name, "dim": DIM, "metric": "l2"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = http
            .put(format!("http://{b}/v1/collections/{name}/points"))
            .json(&json!({"points": [{"id": 1, "vector": family_vector(0, 1, DIM)}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    // Read-your-writes at the other node on request: a search naming the write's LSN answers
    // only once that node has applied it; one naming an LSN never written is refused in time.
    for id in 1000..1020u64 {
        let v = family_vector(7, id, DIM);
        let ack: Value = http
            .put(format!("http://{a}/v1/collections/c/points"))
            .json(&json!({"points": [{"id": id, "vector": v}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let r: Value = http
            .post(format!("http://{b}/v1/collections/c/search"))
            .json(&json!({"vector": v, "k": 1, "exact": true, "after_lsn": ack["lsn"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["hits"][0]["id"], json!(id), "{r}");
    }
    let started = Instant::now();
    let r = http
        .post(format!("http://{b}/v1/collections/c/search"))
        .json(&json!({"vector": family_vector(7, 0, DIM), "k": 1, "after_lsn": 1_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "not_caught_up", "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));
    let r = http
        .post(format!("http://{b}/v1/collections/c/points/delete"))
        .json(&json!({"ids": (1000..1020).collect::<Vec<u64>>()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // id → vector of every acknowledged write (the last one of each id); ids deleted.
    let mut acked: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    let mut refused = 0;
    let writes = 300u64;
    for i in 0..writes {
        if i == 100 {
            node_a.kill().unwrap();
        }
        if i == 200 {
            nats.servers[0].kill();
        }
        let at = if i < 100 && i % 2 == 0 { &a } else { &b };
        let id = i % 250;
        let v = family_vector(i, id, DIM);
        let r = http
            .put(format!("http://{at}/v1/collections/c/points"))
            .json(&json!({"points": [{"id": id, "vector": v}]}))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => {
                // Visible at once where it was acknowledged.
                assert!(
                    until_held(&http, at, id, Some(&v), Duration::ZERO).await,
                    "write {i} acknowledged by {at} but not visible there"
                );
                acked.insert(id, v);
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap();
                assert!(status == 503, "write {i}: {status} {body}");
                refused += 1;
            }
            Err(_) => refused += 1,
        }
    }
    let deleted: Vec<u64> = (0..20).collect();
    let r = http
        .post(format!("http://{b}/v1/collections/c/points/delete"))
        .json(&json!({"ids": deleted}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for id in &deleted {
        acked.remove(id);
    }
    nats.servers[0].restart();

    // The killed node comes back with nothing of its own and replays the streams.
    let _ = std::fs::remove_dir_all(dir.path().join("a").join("data"));
    let (node_a_again, a_again) = spawn_node(&dir.path().join("a"), &urls);
    let _keep = node_a_again;
    a = a_again;
    wait_ready(&http, &a).await;
    // Placed on both nodes (two replicas, two nodes), the returning node takes its shard back.
    let back = Instant::now();
    loop {
        let d: Value = http
            .get(format!("http://{a}/v1/collections/c"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["shards_held"] == json!([0]) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "the returning node never took its shard back: {d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in [&a, &b] {
        for (id, v) in &acked {
            assert!(
                until_held(&http, node, *id, Some(v), Duration::from_secs(5)).await,
                "acknowledged write of {id} missing or stale on {node}"
            );
        }
        for id in &deleted {
            assert!(
                until_held(&http, node, *id, None, Duration::from_secs(5)).await,
                "deleted point {id} still on {node}"
            );
        }
    }
    let search = json!({"vector": family_vector(299, 299 % 250, DIM), "k": 5, "exact": true});
    let r: Value = http
        .post(format!("http://{a}/v1/collections/c/search"))
        .json(&search)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["hits"][0]["id"], json!(299 % 250), "{r}");
    eprintln!(
        "{} ids acknowledged, {refused} writes refused during the kills",
        acked.len() + deleted.len()
    );
    assert!(refused < 30, "{refused} writes refused");
}

/// NATS servers that require a user: a node with the wrong password stops at once, non-zero,
/// saying the servers refused its credentials (no waiting out the recovery timeout); a node
/// with the right one serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_nats_servers_refuse_stops_and_says_why() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start_with_user(dir.path(), 1, Some(("tiervec", "right")));
    let urls = nats.urls();
    let node_dir = dir.path().join("wrong");
    let mut node = start_node(
        &node_dir,
        &urls,
        &["cluster.user=\"tiervec\"", "cluster.password=\"wrong\""],
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node.child_mut().try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a refused node must stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(node_dir.join("server.log")).unwrap();
    assert!(
        log.contains("refused this node's credentials"),
        "the reason is not in the log: {log}"
    );

    let node_dir = dir.path().join("right");
    let _node = start_node(
        &node_dir,
        &urls,
        &["cluster.user=\"tiervec\"", "cluster.password=\"right\""],
    );
    let addr = read_addr_file(&node_dir.join("addr"), Duration::from_secs(60));
    wait_ready(&client(), &addr).await;
}

/// NATS servers on mutual TLS: a node with the CA and its client certificate serves and writes;
/// a node without a client certificate, or without the CA, stops at once, non-zero, saying
/// that TLS with the servers failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_nats_over_mutual_tls_and_one_without_a_certificate_stops() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = CertDir {
        dir: dir.path().join("certs"),
        deployment: "nats-tls".into(),
    };
    certs.ensure_ca().unwrap();
    certs
        .issue_server(&["127.0.0.1".into(), "localhost".into()])
        .unwrap();
    certs.issue_edge("node-a").unwrap();
    let tls = NatsTls {
        cert: certs.server_cert(),
        key: certs.server_key(),
        ca: certs.ca_cert(),
    };
    let nats = NatsCluster::start_with_tls(dir.path(), 1, &tls);
    let urls = nats.urls();
    let ca = format!("cluster.tls_ca={:?}", certs.ca_cert().to_str().unwrap());
    let cert = format!(
        "cluster.tls_cert={:?}",
        certs.edge_cert("node-a").to_str().unwrap()
    );
    let key = format!(
        "cluster.tls_key={:?}",
        certs.edge_key("node-a").to_str().unwrap()
    );

    for (name, extra) in [("no-cert", vec![ca.as_str()]), ("no-tls", vec![])] {
        let node_dir = dir.path().join(name);
        let mut node = start_node(&node_dir, &urls, &extra);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = node.child_mut().try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name}: a node the servers refuse must stop; its log: {}",
                std::fs::read_to_string(node_dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success());
        let log = std::fs::read_to_string(node_dir.join("server.log")).unwrap();
        assert!(
            log.contains("TLS with the NATS servers failed"),
            "{name}: the reason is not in the log: {log}"
        );
    }

    let node_dir = dir.path().join("node-a");
    let _node = start_node(&node_dir, &urls, &[&ca, &cert, &key]);
    let a = read_addr_file(&node_dir.join("addr"), Duration::from_secs(60));
    let http = client();
    wait_ready(&http, &a).await;
    let r = http
        .post(format!("http://{a}/v1/collections"))
        .json(&json!({"name": "c", "dim": DIM, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v = family_vector(1, 1, DIM);
    let r = http
        .put(format!("http://{a}/v1/collections/c/points"))
        .json(&json!({"points": [{"id": 1, "vector": v}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(until_held(&http, &a, 1, Some(&v), Duration::ZERO).await);
}

/// An edge given both nodes' QUIC addresses answers from the cloud through the first; when that
/// node is killed (SIGKILL) the edge answers degraded — never an error — until it has failed
/// over to the other node, and then from the cloud again. Failover is timed from the kill to
/// the first answer from the other node, with a 1 s idle timeout on the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_fails_over_to_another_node_when_its_node_is_killed() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let urls = nats.urls();
    let certs = edge_certs(dir.path(), "cluster-failover");
    let quic = [free_udp_addr(), free_udp_addr()];
    let mut nodes = Vec::new();
    for (i, q) in quic.iter().enumerate() {
        let quic_addr = format!("quic_addr=\"{q}\"");
        let certs_dir = format!("certs_dir={:?}", certs.dir.to_str().unwrap());
        let node_dir = dir.path().join(format!("node{i}"));
        let guard = start_node(
            &node_dir,
            &urls,
            &[
                &quic_addr,
                &certs_dir,
                r#"edges={"edge-1"=["*"]}"#,
                "push={anchor_hot_count=1e12, hot_id_count=1e12}",
            ],
        );
        let addr = read_addr_file(&node_dir.join("addr"), Duration::from_secs(60));
        nodes.push((guard, addr));
    }
    let http = client();
    for (_, addr) in &nodes {
        wait_ready(&http, addr).await;
    }
    let a = nodes[0].1.clone();
    let r = http
        .post(format!("http://{a}/v1/collections"))
        .json(&json!({"name": "c", "dim": DIM, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let points: Vec<Value> = (0..200u64)
        .map(|id| json!({"id": id, "vector": family_vector(0, id, DIM)}))
        .collect();
    let r = http
        .put(format!("http://{a}/v1/collections/c/points"))
        .json(&json!({ "points": points }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An edge with an empty cache: every answer it can get from the cloud comes from there.
    let link = LinkConfig {
        other_cloud_addrs: vec![quic[1]],
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_millis(300),
        ..LinkConfig::new(
            quic[0],
            "localhost",
            certs.ca_cert(),
            Some((certs.edge_cert("edge-1"), certs.edge_key("edge-1"))),
            "edge-1",
        )
    };
    let node = empty_edge(dir.path(), link, Duration::from_millis(200));
    let ask = |i: u64| {
        let q = family_vector(0, i % 200, DIM);
        let node = &node;
        async move {
            node.search(&q, 1, 32)
                .await
                .expect("an answer, never an error")
        }
    };
    let started = Instant::now();
    loop {
        let answer = ask(0).await;
        if answer.source == Source::Cloud {
            assert_eq!(answer.hits[0].id, 0);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the edge never reached the cloud"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    nodes[0].0.kill().unwrap();
    let killed = Instant::now();
    let mut degraded = 0;
    for i in 1u64.. {
        let answer = ask(i).await;
        match answer.source {
            Source::Cloud => {
                assert_eq!(answer.hits[0].id, i % 200, "the other node's answer");
                break;
            }
            _ => degraded += 1,
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the edge never failed over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failover = killed.elapsed();
    eprintln!(
        "failover: {failover:?} from the kill to an answer from the other node ({degraded} degraded answers meanwhile)"
    );
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
}

/// Certificates for a deployment on loopback: a CA, the nodes' (`localhost`) and `edge-1`'s.
fn edge_certs(dir: &Path, deployment: &str) -> CertDir {
    let certs = CertDir {
        dir: dir.join("certs"),
        deployment: deployment.into(),
    };
    certs.ensure_ca().unwrap();
    certs.issue_server(&["localhost".into()]).unwrap();
    certs.issue_edge("edge-1").unwrap();
    certs
}

/// An edge in this process with an empty cache of collection `c` (in `dir`) that trusts no
/// local answer, linked by `link`: what it can answer comes from the cloud.
fn empty_edge(dir: &Path, link: LinkConfig, deadline: Duration) -> EdgeNode {
    let cache = EdgeCache::open(CacheConfig::beside(&dir.join("edge.tvs"), 1 << 20))
        .unwrap()
        .0;
    EdgeNode::start(
        std::sync::Arc::new(cache),
        NodeConfig {
            collection: "c".into(),
            rule: tiervec_shared::confidence::ConfidenceRule::kth(1e-6),
            lease: Duration::from_secs(30),
            deadline,
            cloud_ef: 64,
            backoff: (Duration::from_millis(20), Duration::from_millis(200)),
            shadow_every: 0,
            target_recall: None,
            certify: false,
        },
        Some(link),
    )
    .unwrap()
}

/// Heartbeats every 200 ms, a node dead after 1 s: the sharded test's membership.
const QUICK_MEMBERSHIP: [&str; 3] = [
    "cluster.heartbeat_ms=200",
    "cluster.node_timeout_ms=1000",
    "cluster.shard_timeout_ms=1000",
];

/// A search at `addr` of collection `s`: its hit ids and the shards it says are missing.
async fn search_s(
    http: &reqwest::Client,
    addr: &str,
    q: &[f32],
    after: &Value,
) -> (Vec<u64>, Vec<u64>) {
    let r = http
        .post(format!("http://{addr}/v1/collections/s/search"))
        .json(&json!({"vector": q, "k": 10, "exact": true, "after_shards": after, "with_payload": true}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let hits = body["hits"].as_array().unwrap();
    // Every hit carries its payload, whichever node held it.
    for h in hits {
        assert_eq!(h["payload"]["n"], h["id"], "{h}");
    }
    let ids = hits.iter().map(|h| h["id"].as_u64().unwrap()).collect();
    let missing = serde_json::from_value(body["missing_shards"].clone()).unwrap();
    (ids, missing)
}

/// The exact top 10 of `points` for `q` (L2, ties by id), as the cloud ranks them.
fn truth(points: &BTreeMap<u64, Vec<f32>>, q: &[f32]) -> Vec<u64> {
    let mut scored: Vec<(f32, u64)> = points
        .iter()
        .map(|(id, v)| (v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(), *id))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.iter().take(10).map(|(_, id)| *id).collect()
}

/// Three nodes hold a collection of three shards, two replicas each (placed by the cluster,
/// not by the test). Writes through every node answer per-shard positions; a search at any
/// node, waiting for those positions, is the exact top 10 of everything written though no
/// node holds it all; a point is read at any node. One node killed (SIGKILL): every shard
/// still has a replica, answers stay complete. A second killed: the survivor answers at once
/// with the shards it holds and names the one it lacks (a partial answer, never a silently
/// short one), then — its dead peers' shards placed on it — catches up and answers whole
/// again. Both killed nodes restarted from empty folders: every node answers whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_answer_a_sharded_collection_whole_and_name_what_is_missing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let urls = nats.urls();
    let http = client();
    // Requests between the nodes go over QUIC (mutual TLS with node certificates).
    let certs = CertDir {
        dir: dir.path().join("certs"),
        deployment: "three".into(),
    };
    certs.ensure_ca().unwrap();
    let peer_certs = format!("cluster.peer_certs={:?}", certs.dir.to_str().unwrap());
    // A node dead after 4 s: the second kill comes while the first node's shards are still
    // placed on it (the checks between the kills take a few seconds on a loaded machine, the
    // first request to a killed node over QUIC waiting out `shard_timeout_ms`).
    let mut settings = vec![
        "cluster.heartbeat_ms=200",
        "cluster.node_timeout_ms=4000",
        "cluster.shard_timeout_ms=1000",
    ];
    settings.extend(["cluster.peer_addr=\"127.0.0.1:0\"", peer_certs.as_str()]);
    let mut nodes = Vec::new();
    for name in ["n0", "n1", "n2"] {
        certs.issue_node(name).unwrap();
        nodes.push(spawn_node_with(&dir.path().join(name), &urls, &settings));
    }
    for (_, addr) in &nodes {
        wait_ready(&http, addr).await;
    }
    // Every node hears every other before the create, so placement spreads over all three.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    let r = http
        .post(format!("http://{}/v1/collections", addrs[0]))
        .json(&json!({"name": "s", "dim": DIM, "metric": "l2", "shards": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // More than 64 shards, or several on one node alone, are refused.
    let r = http
        .post(format!("http://{}/v1/collections", addrs[1]))
        .json(&json!({"name": "t", "dim": DIM, "metric": "l2", "shards": 65}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let mut written: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    let mut after: BTreeMap<u64, u64> = BTreeMap::new();
    for batch in 0..10u64 {
        let points: Vec<Value> = (batch * 30..batch * 30 + 30)
            .map(|id| {
                let v = family_vector(id % 7, id, DIM);
                written.insert(id, v.clone());
                json!({"id": id, "vector": v, "payload": {"n": id}})
            })
            .collect();
        let r = http
            .put(format!(
                "http://{}/v1/collections/s/points",
                addrs[batch as usize % 3]
            ))
            .json(&json!({"points": points}))
            .send()
            .await
            .unwrap();
        let ack: Value = r.json().await.unwrap();
        let shards = ack["shards"].as_array().expect("per-shard positions");
        assert_eq!(shards.len(), 3, "30 ids touch every shard: {ack}");
        for p in shards {
            let (shard, lsn) = (p["shard"].as_u64().unwrap(), p["lsn"].as_u64().unwrap());
            let e = after.entry(shard).or_default();
            *e = (*e).max(lsn);
        }
    }
    let after_json: Value = after
        .iter()
        .map(|(s, l)| json!({"shard": s, "lsn": l}))
        .collect();
    let queries: Vec<Vec<f32>> = (0..12u64)
        .map(|i| family_vector(i % 7, 10_000 + i, DIM))
        .collect();
    for addr in &addrs {
        for q in &queries {
            let (ids, missing) = search_s(&http, addr, q, &after_json).await;
            assert!(missing.is_empty(), "{addr}: missing {missing:?}");
            assert_eq!(ids, truth(&written, q), "{addr}");
        }
        let r: Value = http
            .get(format!("http://{addr}/v1/collections/s"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["shards"], 3);
        for id in [0u64, 77, 299] {
            assert_eq!(
                point_of(&http, addr, "s", id).await.as_deref(),
                Some(&written[&id][..]),
                "{addr} id {id}"
            );
        }
    }
    // Each point on exactly two nodes (once every replica has applied everything).
    let settled = Instant::now() + Duration::from_secs(20);
    let held_by = loop {
        let mut held_by = Vec::new();
        for addr in &addrs {
            let r: Value = http
                .get(format!("http://{addr}/v1/collections/s"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            held_by.push(r["points"].as_u64().unwrap());
        }
        if held_by.iter().sum::<u64>() == 600 || Instant::now() > settled {
            break held_by;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        held_by.iter().sum::<u64>(),
        600,
        "two replicas of each point: {held_by:?}"
    );
    // The survivor-to-be lacks a shard (one holding fewer points than the average does).
    let survivor = (0..3).min_by_key(|&i| held_by[i]).unwrap();
    let (first, second) = match survivor {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };

    // One node gone: every shard keeps a replica.
    nodes[first].0.kill().unwrap();
    for addr in [&addrs[survivor], &addrs[second]] {
        for q in &queries {
            let (ids, missing) = search_s(&http, addr, q, &json!([])).await;
            assert!(
                missing.is_empty(),
                "{addr} after one kill: missing {missing:?}"
            );
            assert_eq!(ids, truth(&written, q));
        }
    }
    // Two gone: the survivor names what it lacks, then takes it over.
    nodes[second].0.kill().unwrap();
    let survivor = &addrs[survivor];
    let (_, missing) = search_s(&http, survivor, &queries[0], &json!([])).await;
    let whole_again = Instant::now() + Duration::from_secs(60);
    let mut saw_partial = !missing.is_empty();
    loop {
        let (ids, missing) = search_s(&http, survivor, &queries[0], &json!([])).await;
        if missing.is_empty() {
            assert_eq!(ids, truth(&written, &queries[0]));
            break;
        }
        saw_partial = true;
        assert!(
            missing.len() < 3,
            "the survivor holds shards of its own: {missing:?}"
        );
        assert!(
            Instant::now() < whole_again,
            "the survivor never took over shards {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_partial,
        "with two of three nodes gone at once, some shard had no live replica"
    );

    // Back from empty folders: every node answers whole.
    for i in [first, second] {
        let node_dir = dir.path().join(format!("n{i}"));
        let _ = std::fs::remove_dir_all(node_dir.join("data"));
        nodes[i] = spawn_node_with(&node_dir, &urls, &settings);
        wait_ready(&http, &nodes[i].1).await;
    }
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.clone()).collect();
    for addr in &addrs {
        for q in &queries {
            let (ids, missing) = search_s(&http, addr, q, &json!([])).await;
            assert!(
                missing.is_empty(),
                "{addr} after the restarts: missing {missing:?}"
            );
            assert_eq!(ids, truth(&written, q), "{addr} after the restarts");
        }
    }
    // The fan-out went over QUIC between the nodes, not NATS.
    let mut over_quic = 0.0;
    for addr in &addrs {
        over_quic += metric(
            &http,
            addr,
            "tiervec_cluster_peer_requests_total{path=\"quic\"}",
        )
        .await;
    }
    assert!(over_quic > 0.0, "no request between nodes went over QUIC");
}

/// An edge served by a node that holds only some shards (one replica per shard, three nodes)
/// still gets vectors of the others pushed — the node fetches them from their replicas — and
/// hears their deletes: a point of a shard its node does not hold, deleted at another node,
/// leaves the edge's cache within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_gets_and_loses_vectors_of_shards_its_node_does_not_hold() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let urls = nats.urls();
    let certs = edge_certs(dir.path(), "cluster-shards");
    let quic = free_udp_addr();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut settings: Vec<String> = QUICK_MEMBERSHIP.iter().map(|s| s.to_string()).collect();
        settings.push("cluster.replication=1".into());
        if i == 0 {
            // The edge's node: every answered id is hot at once.
            settings.extend([
                format!("quic_addr=\"{quic}\""),
                format!("certs_dir={:?}", certs.dir.to_str().unwrap()),
                r#"edges={"edge-1"=["*"]}"#.into(),
                "push={anchor_hot_count=1, hot_id_count=1}".into(),
            ]);
        }
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        nodes.push(spawn_node_with(
            &dir.path().join(format!("n{i}")),
            &urls,
            &settings,
        ));
    }
    let http = client();
    for (_, addr) in &nodes {
        wait_ready(&http, addr).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (a, other) = (nodes[0].1.clone(), nodes[1].1.clone());
    let r = http
        .post(format!("http://{a}/v1/collections"))
        .json(&json!({"name": "c", "dim": DIM, "metric": "l2", "shards": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let points: Vec<Value> = (0..300u64)
        .map(|id| json!({"id": id, "vector": family_vector(id % 5, id, DIM)}))
        .collect();
    let r = http
        .put(format!("http://{other}/v1/collections/c/points"))
        .json(&json!({ "points": points }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let description: Value = http
        .get(format!("http://{a}/v1/collections/c"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let held: Vec<u64> = serde_json::from_value(description["shards_held"].clone()).unwrap();
    assert!(
        held.len() < 3,
        "one replica per shard over three nodes: node 0 holds {held:?}"
    );
    // A point of a shard node 0 does not hold (the shard function is the cloud's).
    let foreign = (0..300u64)
        .find(|&id| !held.contains(&u64::from(tiervec_cloud::storage::shard_of(id, 3))))
        .unwrap();
    let q = family_vector(foreign % 5, foreign, DIM);

    let link = LinkConfig::new(
        quic,
        "localhost",
        certs.ca_cert(),
        Some((certs.edge_cert("edge-1"), certs.edge_key("edge-1"))),
        "edge-1",
    );
    let node = empty_edge(dir.path(), link, Duration::from_millis(500));
    let held_locally = |node: &EdgeNode| {
        node.search_local(&q, 1, 32)
            .unwrap()
            .hits
            .first()
            .is_some_and(|h| h.id == foreign)
    };
    // Asked through the cloud until the node pushed the foreign vector into the cache.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held_locally(&node) {
        let answer = node.search(&q, 1, 32).await.expect("an answer");
        if answer.source == Source::Cloud {
            assert_eq!(
                answer.hits[0].id, foreign,
                "the cloud's answer spans the shards"
            );
        }
        assert!(
            Instant::now() < deadline,
            "point {foreign} of another node's shard never pushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Deleted at another node: node 0 hears it and invalidates the edge's copy.
    let r = http
        .post(format!("http://{other}/v1/collections/c/points/delete"))
        .json(&json!({"ids": [foreign]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deleted = Instant::now();
    while held_locally(&node) {
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "the edge still answers deleted point {foreign} from its cache"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "a delete at another node left the edge's cache {:?} after its acknowledgement",
        deleted.elapsed()
    );
}

/// Writes at both nodes go on across each nats-server in turn killed (SIGKILL) and restarted:
/// a write is refused only while JetStream elects a stream's new leader, never because a node's
/// follower is still re-creating its consumer (the cluster demo found nodes answering 503
/// "durable but not yet applied" for many seconds after a restart); once the servers are back,
/// every write is acknowledged, and every acknowledged write is on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_at_every_node_go_on_across_nats_server_kills_and_restarts() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(dir.path(), 3);
    let urls = nats.urls();
    let http = client();
    let (_node_a, a) = spawn_node(&dir.path().join("a"), &urls);
    let (_node_b, b) = spawn_node(&dir.path().join("b"), &urls);
    wait_ready(&http, &a).await;
    wait_ready(&http, &b).await;
    let r = http
        .post(format!("http://{a}/v1/collections"))
        .json(&json!({"name": "c", "dim": DIM, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let started = Instant::now();
    // Each server in turn: killed for 5 s, then restarted; 3 s between.
    let chaos = std::thread::spawn(move || {
        for s in 0..3 {
            std::thread::sleep(Duration::from_secs(3));
            nats.servers[s].kill();
            std::thread::sleep(Duration::from_secs(5));
            nats.servers[s].restart();
        }
        (nats, started.elapsed())
    });
    let mut acked: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    // (sent at, acknowledged) per write.
    let mut outcomes: Vec<(Duration, bool)> = Vec::new();
    let mut refusals = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(40) {
        let t = started.elapsed();
        let at = if i.is_multiple_of(2) { &a } else { &b };
        let v = family_vector(i, i, DIM);
        let r = http
            .put(format!("http://{at}/v1/collections/c/points"))
            .json(&json!({"points": [{"id": i, "vector": v}]}))
            .send()
            .await;
        let ok = match r {
            Ok(r) if r.status() == 200 => {
                acked.insert(i, v);
                true
            }
            Ok(r) => {
                let (status, body) = (r.status(), r.text().await.unwrap());
                assert_eq!(status, 503, "write {i} at {at}: {body}");
                refusals.push(format!("{:.1} s at {at}: {body}", t.as_secs_f64()));
                false
            }
            Err(e) => panic!("write {i} at {at}: {e}"),
        };
        outcomes.push((t, ok));
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_nats, servers_back) = chaos.join().unwrap();
    for r in &refusals {
        eprintln!("refused {r}");
    }
    // The longest time between two acknowledgements: JetStream electing leaders.
    let acks: Vec<Duration> = outcomes.iter().filter(|o| o.1).map(|o| o.0).collect();
    let longest = acks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    eprintln!(
        "{} writes, {} acknowledged; longest without an acknowledgement {longest:?}",
        outcomes.len(),
        acks.len()
    );
    assert!(
        longest < Duration::from_secs(12),
        "no write acknowledged for {longest:?}: {refusals:?}"
    );
    let settled = servers_back + Duration::from_secs(3);
    let late: Vec<_> = outcomes.iter().filter(|o| o.0 > settled && !o.1).collect();
    assert!(
        late.is_empty(),
        "writes refused after the servers were back: {refusals:?}"
    );
    for node in [&a, &b] {
        for (id, v) in &acked {
            assert!(
                until_held(&http, node, *id, Some(v), Duration::from_secs(10)).await,
                "acknowledged write of {id} missing on {node}"
            );
        }
    }
}

/// A metric's value in node `addr`'s `/metrics` (`name` with its labels, if any); 0 when
/// absent (a counter never incremented).
async fn metric(http: &reqwest::Client, addr: &str, name: &str) -> f64 {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A node checkpoints locally as its streams grow (a cut: one position per stream) and,
/// killed with SIGKILL, comes back from its newest checkpoint replaying only the entries after
/// the cut — deletes and a replaced vector among them — with every acknowledged write as it
/// was. Started on NATS servers that do not hold the streams its checkpoint follows on from,
/// it stops, non-zero, saying so, rather than serve a state no stream holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_from_its_checkpoint_replaying_only_the_tail() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&dir.path().join("nats"), 3);
    let urls = nats.urls();
    let http = client();
    let node_dir = dir.path().join("a");
    let small_checkpoints = ["checkpoint_wal_bytes=4096"];
    let (mut node, a) = spawn_node_with(&node_dir, &urls, &small_checkpoints);
    wait_ready(&http, &a).await;
    create_c(&http, &a, 2).await;
    let mut acked: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    write_batches(&http, &a, 0..400, 10, 3, &mut acked).await;
    // The maintenance pass checkpoints once 4 KiB of entries are applied past the last cut.
    let data = node_dir.join("data");
    let checkpoints = || {
        std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while checkpoints() == 0 {
        assert!(Instant::now() < deadline, "no checkpoint written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The tail, small enough that no checkpoint covers it: a delete on both shards, a vector
    // replaced.
    let deleted: Vec<u64> = (0..20).collect();
    delete_c(&http, &a, &deleted, &mut acked).await;
    write_batches(&http, &a, 25..26, 1, 9, &mut acked).await;
    let written = 1 + 40 * 2 + 2 + 1;

    node.kill().unwrap();
    let (_node, a) = spawn_node_with(&node_dir, &urls, &small_checkpoints);
    wait_ready(&http, &a).await;
    let replayed = metric(&http, &a, "tiervec_recovery_wal_records_replayed").await;
    eprintln!("{replayed} of {written} entries replayed after the restart");
    assert!(
        (3.0..written as f64 / 2.0).contains(&replayed),
        "{replayed} entries replayed of {written} written: the tail (3 entries at least), not the whole"
    );
    let log = std::fs::read_to_string(node_dir.join("server.log")).unwrap();
    assert!(log.contains("checkpoint loaded"), "{log}");
    for id in 0..400u64 {
        assert_eq!(
            point(&http, &a, id).await.as_ref(),
            acked.get(&id),
            "point {id} after the restart"
        );
    }
    drop(_node);
    drop(nats);

    // Other NATS servers (a new cluster): the checkpoint follows on from streams they lack.
    let other = NatsCluster::start(&dir.path().join("other-nats"), 3);
    let mut stray = start_node(&node_dir, &other.urls(), &small_checkpoints);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = stray.child_mut().try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a node whose checkpoint no stream holds must stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(node_dir.join("server.log")).unwrap();
    assert!(
        log.contains("do not hold this cluster's streams"),
        "the reason is not in the log: {log}"
    );
}

/// The first and last positions of stream `name` as a nats-server's monitor reports them.
async fn stream_range(http: &reqwest::Client, monitor_port: u16, name: &str) -> Option<(u64, u64)> {
    let jsz: Value = http
        .get(format!("http://127.0.0.1:{monitor_port}/jsz?streams=true"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    jsz["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .find(|s| s["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .and_then(|s| {
            Some((
                s["state"]["first_seq"].as_u64()?,
                s["state"]["last_seq"].as_u64()?,
            ))
        })
}

/// Creates collection `c` (`DIM`, l2) of `shards` shards at node `addr`.
async fn create_c(http: &reqwest::Client, addr: &str, shards: u32) {
    let r = http
        .post(format!("http://{addr}/v1/collections"))
        .json(&json!({"name": "c", "dim": DIM, "metric": "l2", "shards": shards}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// Deletes points `ids` of collection `c` at node `addr`, forgetting them in `acked`.
async fn delete_c(
    http: &reqwest::Client,
    addr: &str,
    ids: &[u64],
    acked: &mut BTreeMap<u64, Vec<f32>>,
) {
    let r = http
        .post(format!("http://{addr}/v1/collections/c/points/delete"))
        .json(&json!({ "ids": ids }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for id in ids {
        acked.remove(id);
    }
}

/// Writes points `ids` of collection `c` at node `addr`, `batch` per request (one entry per
/// shard each), recording each acknowledged one.
async fn write_batches(
    http: &reqwest::Client,
    addr: &str,
    ids: std::ops::Range<u64>,
    batch: usize,
    family: u64,
    acked: &mut BTreeMap<u64, Vec<f32>>,
) {
    let ids: Vec<u64> = ids.collect();
    for chunk in ids.chunks(batch) {
        let points: Vec<(u64, Vec<f32>)> = chunk
            .iter()
            .map(|&id| (id, family_vector(family, id, DIM)))
            .collect();
        let body: Vec<Value> = points
            .iter()
            .map(|(id, v)| json!({"id": id, "vector": v}))
            .collect();
        let r = http
            .put(format!("http://{addr}/v1/collections/c/points"))
            .json(&json!({"points": body}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        acked.extend(points);
    }
}

/// Waits until node `addr` holds every point of `acked` as acknowledged and none of `gone`.
async fn until_all_held(
    http: &reqwest::Client,
    addr: &str,
    acked: &BTreeMap<u64, Vec<f32>>,
    gone: &[u64],
) {
    for (id, v) in acked {
        assert!(
            until_held(http, addr, *id, Some(v), Duration::from_secs(30)).await,
            "node {addr}: point {id} not as acknowledged"
        );
    }
    for id in gone {
        assert!(
            until_held(http, addr, *id, None, Duration::from_secs(30)).await,
            "node {addr}: deleted point {id} still there"
        );
    }
}

/// Shard snapshots in the object store let a stream be trimmed: with a snapshot every 20
/// entries, the shard's stream is purged below the previous snapshot's position while writes
/// go on. A node killed with its local checkpoint, back after the stream was trimmed past it,
/// catches up from the snapshot plus the tail — deletes and a replaced vector made while it
/// was away among them —, and so does a new node from an empty folder; each, left alone,
/// answers every acknowledged write as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_stream_is_caught_up_from_its_snapshot() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&dir.path().join("nats"), 3);
    let urls = nats.urls();
    let monitor = nats.servers[0].monitor_port;
    let http = client();
    let mut settings = QUICK_MEMBERSHIP.to_vec();
    settings.extend(["cluster.snapshot_entries=20", "checkpoint_wal_bytes=1024"]);
    let (node_a, a) = spawn_node_with(&dir.path().join("a"), &urls, &settings);
    let (mut node_b, b) = spawn_node_with(&dir.path().join("b"), &urls, &settings);
    wait_ready(&http, &a).await;
    wait_ready(&http, &b).await;
    create_c(&http, &a, 1).await;
    let mut acked: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    write_batches(&http, &a, 0..60, 1, 1, &mut acked).await;
    until_all_held(&http, &b, &acked, &[]).await;
    let data_b = dir.path().join("b").join("data");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(&data_b).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("checkpoint-")
    }) {
        assert!(Instant::now() < deadline, "node b wrote no checkpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node_b.kill().unwrap();
    // Node a alone: it becomes the shard's first placed node, and snapshots go on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write_batches(&http, &a, 60..130, 1, 1, &mut acked).await;
    let gone: Vec<u64> = (0..10).collect();
    delete_c(&http, &a, &gone, &mut acked).await;
    write_batches(&http, &a, 15..16, 1, 9, &mut acked).await;
    // Trimmed past where node b stopped (its 60 entries and the create are far behind).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (first, last) = loop {
        let range = stream_range(&http, monitor, "T_SHARD_").await;
        if let Some((first, last)) = range
            && first > 70
        {
            break (first, last);
        }
        assert!(
            Instant::now() < deadline,
            "the shard's stream was not trimmed: {range:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("the shard's stream holds positions {first}..={last}");

    // Node b back with its checkpoint, then alone.
    let (node_b, b) = spawn_node_with(&dir.path().join("b"), &urls, &settings);
    let b_log = dir.path().join("b").join("server.log");
    caught_up_from_a_snapshot(&http, &b, &b_log, node_a, &acked, &gone).await;
    let log = std::fs::read_to_string(&b_log).unwrap();
    assert!(log.contains("checkpoint loaded"), "{log}");

    // A new node from an empty folder, then alone.
    let (_node_c, c) = spawn_node_with(&dir.path().join("c"), &urls, &settings);
    let c_log = dir.path().join("c").join("server.log");
    caught_up_from_a_snapshot(&http, &c, &c_log, node_b, &acked, &gone).await;
}

/// Node `addr` (logging to `log`) says it caught up from a snapshot and holds every point of
/// `acked` as acknowledged and none of `gone`; once `other`, the only other node, is killed,
/// it alone answers them so.
async fn caught_up_from_a_snapshot(
    http: &reqwest::Client,
    addr: &str,
    log: &Path,
    mut other: ChildGuard,
    acked: &BTreeMap<u64, Vec<f32>>,
    gone: &[u64],
) {
    wait_ready(http, addr).await;
    until_all_held(http, addr, acked, gone).await;
    other.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in acked.keys().chain(gone) {
        assert_eq!(
            point(http, addr, *id).await.as_ref(),
            acked.get(id),
            "node {addr} alone, point {id}"
        );
    }
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("shard caught up from its snapshot"), "{log}");
}

/// The live points of collection `c` node `addr` holds itself, as its `/readyz` says.
async fn points_held(http: &reqwest::Client, addr: &str) -> u64 {
    let r: Value = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["collections"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "c")
        .and_then(|c| c["points"].as_u64())
        .unwrap_or(0)
}

/// One replica per shard: a node joining two takes its share of a 4-shard collection, and
/// the node whose shard moved frees its copy once the new one holds it caught up — the points
/// held over all nodes come back to the points written —, while every point stays readable
/// and every search whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_takes_its_share_and_the_other_frees_it() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&dir.path().join("nats"), 3);
    let urls = nats.urls();
    let http = client();
    let mut settings = QUICK_MEMBERSHIP.to_vec();
    settings.push("cluster.replication=1");
    let (_node_a, a) = spawn_node_with(&dir.path().join("a"), &urls, &settings);
    let (_node_b, b) = spawn_node_with(&dir.path().join("b"), &urls, &settings);
    wait_ready(&http, &a).await;
    wait_ready(&http, &b).await;
    create_c(&http, &a, 4).await;
    let mut acked: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    write_batches(&http, &a, 0..200, 20, 5, &mut acked).await;
    let total = acked.len() as u64;
    let held_over = |nodes: Vec<String>| {
        let http = http.clone();
        async move {
            let mut sum = 0;
            for n in &nodes {
                sum += points_held(&http, n).await;
            }
            sum
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while held_over(vec![a.clone(), b.clone()]).await != total {
        assert!(
            Instant::now() < deadline,
            "a and b do not hold one copy of each point"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (_node_c, c) = spawn_node_with(&dir.path().join("c"), &urls, &settings);
    wait_ready(&http, &c).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on_c = points_held(&http, &c).await;
        let all = held_over(vec![a.clone(), b.clone(), c.clone()]).await;
        if on_c > 0 && all == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c holds {on_c} points, all nodes {all} of {total}: no share taken, or not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released = ["a", "b"].iter().any(|n| {
        std::fs::read_to_string(dir.path().join(n).join("server.log"))
            .unwrap()
            .contains("released a shard")
    });
    assert!(released, "neither a nor b says it released a shard");
    for (id, v) in &acked {
        for node in [&a, &b, &c] {
            assert_eq!(
                point(&http, node, *id).await.as_ref(),
                Some(v),
                "point {id} at {node}"
            );
        }
    }
    for node in [&a, &b, &c] {
        let r: Value = http
            .post(format!("http://{node}/v1/collections/c/search"))
            .json(&json!({"vector": family_vector(5, 7, DIM), "k": 10, "exact": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["hits"][0]["id"], json!(7), "{r}");
        assert!(
            r["missing_shards"].as_array().is_none_or(|m| m.is_empty()),
            "{r}"
        );
    }
}
