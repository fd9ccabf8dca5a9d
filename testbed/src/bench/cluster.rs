//! `tiervec-testbed bench cluster`: one cloud on its embedded WAL against a cluster of three
//! cloud nodes on a three-server NATS JetStream cluster (`docs/cluster.md`), all real processes
//! on loopback, in the same run: bulk load, single-point writes one at a time and from 16
//! clients (local fsync against JetStream's R3 acknowledgement — a quorum holding the entry in
//! memory, not fsynced), searches over HTTP, and a new node's catch-up from the streams.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tiervec_cloud::certs::CertDir;
use tiervec_test_support::nats::NatsCluster;

use super::Row;
use super::cloud::{HttpTarget, http_row};
use crate::dataset::Dataset;
use crate::deployment::{self, COLLECTION};
use crate::measure::{K, Latencies, Machine, OutputArgs, exact_top_k, update_benchmarks_md};
use crate::procs::{self, Process};

#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Base vectors loaded (with their texts) before the measurements.
    #[arg(long, default_value_t = 20_000)]
    pub vectors: usize,
    /// Single-point writes per write row.
    #[arg(long, default_value_t = 2_000)]
    pub writes: usize,
    /// Search samples per search row.
    #[arg(long, default_value_t = 10_000)]
    pub samples: usize,
    /// Concurrent writers of the concurrent write rows.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Cloud nodes of the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Shards of the cluster's collection.
    #[arg(long, default_value_t = 3)]
    pub shards: u32,
    /// Cloud nodes holding each shard.
    #[arg(long, default_value_t = 2)]
    pub replication: usize,
    /// Requests between nodes over direct QUIC (`cluster.peer_addr`, node certificates)
    /// rather than NATS request/reply.
    #[arg(long)]
    pub peer_quic: bool,
    #[arg(long, default_value = "target/tiervec-bench/cluster")]
    pub work_dir: PathBuf,
}

/// How a cluster node is started: the NATS servers, the replication, and the certificates
/// directory when requests between nodes go over QUIC.
#[derive(Clone, Copy)]
struct NodeSpec<'a> {
    nats: &'a [String],
    replication: usize,
    peer_certs: Option<&'a Path>,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<Row>,
    cloud_nodes: usize,
    nats_servers: usize,
    single_load_vectors_per_second: f64,
    cluster_load_vectors_per_second: f64,
    /// The node the cluster's searches went to, and how many shards it holds.
    search_node: usize,
    search_node_shards: usize,
    search_p50_ratio_cluster_to_single: f64,
    search_p99_ratio_cluster_to_single: f64,
    write_p50_ratio_cluster_to_single: f64,
    catch_up_vectors: usize,
    catch_up_seconds: f64,
    catch_up_seconds_per_million_extrapolated: f64,
}

/// A cloud node (or the single cloud) as a child process, and its HTTP base URL.
struct Node {
    process: Process,
    base: String,
}

fn start_node(dir: &Path, name: &str, cluster: Option<NodeSpec>) -> anyhow::Result<Node> {
    std::fs::create_dir_all(dir)?;
    let addr_file = dir.join(format!("{name}.addr"));
    let _ = std::fs::remove_file(&addr_file);
    let data_dir = dir.join(format!("{name}-data"));
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--set".into(),
        format!("data_dir={:?}", data_dir.to_string_lossy()),
        "--set".into(),
        "http_addr=\"127.0.0.1:0\"".into(),
        "--addr-file".into(),
        addr_file.to_string_lossy().into_owned(),
    ];
    if let Some(NodeSpec {
        nats,
        replication,
        peer_certs,
    }) = cluster
    {
        let urls: Vec<String> = nats.iter().map(|u| format!("{u:?}")).collect();
        args.extend([
            "--set".into(),
            format!("cluster.nats=[{}]", urls.join(",")),
            "--set".into(),
            "cluster.prefix=\"BENCH\"".into(),
            "--set".into(),
            format!("cluster.node={name:?}"),
            "--set".into(),
            format!("cluster.replication={replication}"),
        ]);
        if let Some(certs) = peer_certs {
            args.extend([
                "--set".into(),
                "cluster.peer_addr=\"127.0.0.1:0\"".into(),
                "--set".into(),
                format!("cluster.peer_certs={:?}", certs.to_string_lossy()),
            ]);
        }
    }
    let mut process = Process::start(
        name,
        &procs::binary("tiervec-cloud")?,
        &args,
        None,
        &dir.join(format!("{name}.log")),
    )?;
    let addr = procs::wait_addr_file(&addr_file, &mut process)?;
    Ok(Node {
        process,
        base: format!("http://{addr}"),
    })
}

/// `writes` single-point upserts (ids past the loaded ones, vectors of the base) from
/// `clients` concurrent writers, spread over `nodes`.
async fn write_row(
    engine: &'static str,
    http: &reqwest::Client,
    nodes: &[Node],
    ds: &Dataset,
    first_id: usize,
    writes: usize,
    clients: usize,
) -> anyhow::Result<Row> {
    let bases: Arc<Vec<String>> = Arc::new(
        nodes
            .iter()
            .map(|n| format!("{}/v1/collections/{COLLECTION}/points", n.base))
            .collect(),
    );
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..writes)
            .map(|i| {
                let v = ds.base.row(i % ds.base.rows());
                serde_json::json!({"points": [{"id": first_id + i, "vector": v}]}).to_string()
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, bases, bodies, next) =
            (http.clone(), bases.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies.len() {
                    break;
                }
                let t = Instant::now();
                let r = http
                    .put(&bases[i % bases.len()])
                    .header("content-type", "application/json")
                    .body(bodies[i].clone())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "write {i}: {}", r.text().await?);
                lat.record(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Latencies::new();
    for t in tasks {
        lat.merge(&t.await??);
    }
    let row = Row {
        engine,
        ef: None,
        recall_at_10: 0.0,
        p50_us: lat.percentile_us(0.5),
        p99_us: lat.percentile_us(0.99),
        p999_us: lat.percentile_us(0.999),
        qps: lat.samples() as f64 / started.elapsed().as_secs_f64(),
        threads: clients,
    };
    eprintln!(
        "  {engine:<26} clients={clients:<3} p50={:>8.1}µs p99={:>8.1}µs qps={:>7.0}",
        row.p50_us, row.p99_us, row.qps
    );
    Ok(row)
}

/// A write acknowledged by the first node, then the time until the second answers a search
/// that names its LSN (`after_lsn`: it waits until it applied the write): how far behind the
/// acknowledging node another node sees a write.
async fn cross_node_row(
    http: &reqwest::Client,
    nodes: &[Node],
    ds: &Dataset,
    first_id: usize,
    writes: usize,
) -> anyhow::Result<Row> {
    anyhow::ensure!(nodes.len() >= 2, "the cross-node row needs two nodes");
    let (writer, reader) = (&nodes[0].base, &nodes[1].base);
    let mut lat = Latencies::new();
    let started = Instant::now();
    for i in 0..writes {
        let v = ds.base.row(i % ds.base.rows());
        let ack: serde_json::Value = http
            .put(format!("{writer}/v1/collections/{COLLECTION}/points"))
            .json(&serde_json::json!({"points": [{"id": first_id + i, "vector": v}]}))
            .send()
            .await?
            .json()
            .await?;
        let t = Instant::now();
        let r = http
            .post(format!("{reader}/v1/collections/{COLLECTION}/search"))
            .json(&serde_json::json!({"vector": v, "k": 1, "after_shards": ack["shards"]}))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "read at the other node: {}",
            r.text().await?
        );
        lat.record(t.elapsed());
    }
    let row = Row {
        engine: "cluster_visible_at_another_node",
        ef: None,
        recall_at_10: 0.0,
        p50_us: lat.percentile_us(0.5),
        p99_us: lat.percentile_us(0.99),
        p999_us: lat.percentile_us(0.999),
        qps: lat.samples() as f64 / started.elapsed().as_secs_f64(),
        threads: 1,
    };
    eprintln!(
        "  {:<26} p50={:>8.1}µs p99={:>8.1}µs (a search at node 1 naming the shard positions node 0 acknowledged)",
        row.engine, row.p50_us, row.p99_us
    );
    Ok(row)
}

pub fn run(mut args: ClusterArgs) -> anyhow::Result<()> {
    let docs = args.output.docs_dir()?.map(Path::to_owned);
    let quick = args.output.quick;
    if quick {
        args.vectors = args.vectors.min(2_000);
        args.writes = args.writes.min(300);
        args.samples = args.samples.min(1_000);
    }
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    let started = Instant::now();
    let ds = Dataset::load_default()?;
    let texts = ds.base_texts()?;
    let count = args.vectors.min(ds.base.rows());
    let dim = ds.base.dim;
    let nq = if quick { 1_000 } else { ds.queries.rows() };
    let queries: Vec<&[f32]> = (0..nq).map(|i| ds.queries.row(i)).collect();
    let truth: Vec<(Vec<u64>, Vec<f32>)> = if count == ds.base.rows() {
        (0..nq).map(|q| ds.ground_truth(q, K)).collect()
    } else {
        exact_top_k(&ds.base.data[..count * dim], dim, &queries)
    };
    let _ = std::fs::remove_dir_all(&args.work_dir);
    std::fs::create_dir_all(&args.work_dir)?;
    eprintln!(
        "bench cluster: {count} vectors × {dim}; one cloud (embedded WAL) against {} nodes on 3 nats-servers",
        args.nodes
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let ef = 64;
    let (clients, writes) = (args.clients, args.writes);

    // 1. The single cloud on its embedded WAL.
    let mut single = vec![start_node(&args.work_dir, "single", None)?];
    let (single_load, single_rows) = rt.block_on(async {
        procs::wait_http_ok(
            &http,
            &format!("{}/readyz", single[0].base),
            Duration::from_secs(60),
        )
        .await?;
        let bases = [single[0].base.clone()];
        let load = deployment::load_over_http(&http, &bases, &ds, &texts, count, 1).await?;
        let node = &mut single[0];
        deployment::wait_indexed(&http, &node.base, &mut node.process).await?;
        let target = HttpTarget {
            http: &http,
            base: &single[0].base,
            queries: &queries,
            truth: &truth,
        };
        let search = http_row("single_search", &target, args.samples, 1, ef).await?;
        let write = write_row("single_write_fsync", &http, &single, &ds, count, writes, 1).await?;
        let many = write_row(
            "single_write_fsync_c",
            &http,
            &single,
            &ds,
            count + writes,
            writes * 2,
            clients,
        )
        .await?;
        anyhow::Ok((load, vec![search, write, many]))
    })?;
    drop(single);

    // 2. The cluster: three nats-servers, `nodes` cloud nodes.
    let nats = NatsCluster::start(&args.work_dir.join("nats"), 3);
    let urls = nats.urls();
    let certs_dir = args.work_dir.join("certs");
    if args.peer_quic {
        let certs = CertDir {
            dir: certs_dir.clone(),
            deployment: "bench".into(),
        };
        certs.ensure_ca()?;
        for i in 0..args.nodes {
            certs.issue_node(&format!("node{i}"))?;
        }
    }
    let cluster = Some(NodeSpec {
        nats: &urls,
        replication: args.replication,
        peer_certs: args.peer_quic.then_some(certs_dir.as_path()),
    });
    let mut nodes = (0..args.nodes)
        .map(|i| start_node(&args.work_dir, &format!("node{i}"), cluster))
        .collect::<anyhow::Result<Vec<Node>>>()?;
    let (cluster_load, cluster_rows, search_node, search_node_shards) = rt.block_on(async {
        for n in &nodes {
            procs::wait_http_ok(
                &http,
                &format!("{}/readyz", n.base),
                Duration::from_secs(120),
            )
            .await?;
        }
        // Placement spreads over every node once each has heard the others (heartbeats).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
        let load =
            deployment::load_over_http(&http, &bases, &ds, &texts, count, args.shards).await?;
        for n in nodes.iter_mut() {
            deployment::wait_indexed(&http, &n.base, &mut n.process).await?;
        }
        // Searches go to the node holding the fewest shards, so they fan out (placement may
        // give one node every shard).
        let mut held = Vec::new();
        for n in &nodes {
            let d: serde_json::Value = http
                .get(format!("{}/v1/collections/{COLLECTION}", n.base))
                .send()
                .await?
                .json()
                .await?;
            held.push(d["shards_held"].as_array().map_or(0, Vec::len));
        }
        let asked = (0..nodes.len()).min_by_key(|&i| held[i]).unwrap_or(0);
        eprintln!(
            "  searches at node {asked}, which holds {} of {} shards",
            held[asked], args.shards
        );
        let target = HttpTarget {
            http: &http,
            base: &nodes[asked].base,
            queries: &queries,
            truth: &truth,
        };
        let search = http_row("cluster_search", &target, args.samples, 1, ef).await?;
        let write = write_row(
            "cluster_write_jetstream_r3",
            &http,
            &nodes,
            &ds,
            count,
            writes,
            1,
        )
        .await?;
        let many = write_row(
            "cluster_write_jetstream_r3_c",
            &http,
            &nodes,
            &ds,
            count + writes,
            writes * 2,
            clients,
        )
        .await?;
        let visible = cross_node_row(&http, &nodes, &ds, count + 3 * writes, writes).await?;
        anyhow::Ok((load, vec![search, write, many, visible], asked, held[asked]))
    })?;

    // 3. Node 0 returns from an empty data folder within the node timeout (its shards are
    //    still placed on it) and replays its shards' streams: the catalog and every write of
    //    those shards.
    drop(nodes.remove(0));
    let t = Instant::now();
    let returning = start_node(&args.work_dir, "node0", cluster)?;
    rt.block_on(procs::wait_http_ok(
        &http,
        &format!("{}/readyz", returning.base),
        Duration::from_secs(900),
    ))
    .context("the returning node never caught up")?;
    let catch_up_seconds = t.elapsed().as_secs_f64();
    let held: serde_json::Value = rt.block_on(async {
        http.get(format!("{}/v1/collections/{COLLECTION}", returning.base))
            .send()
            .await?
            .json()
            .await
    })?;
    let catch_up_vectors = held["points"].as_u64().unwrap_or(0) as usize;
    eprintln!(
        "  node 0 back from empty, holding {catch_up_vectors} points of its shards: {catch_up_seconds:.2} s"
    );
    drop(returning);
    drop(nodes);
    drop(nats);

    let mut rows = single_rows;
    rows.extend(cluster_rows);
    let row = |e: &str| rows.iter().find(|r| r.engine == e).expect("measured above");
    let report = Report {
        bench: "cluster",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "vectors": count, "dim": dim, "k": 10, "ef": ef, "writes": writes, "clients": clients,
            "quick": quick, "search_samples": args.samples, "queries": nq,
            "nats_server": "Debian nats-server 2.9.10, 3 servers, JetStream file storage, streams R3",
            "acknowledgement": "single: WAL fsync; cluster: JetStream R3 ack (a quorum holds it in memory, not fsynced) + the node's own apply",
            "placement": "every process on the same 2 cores, unpinned; searches at the node holding the fewest shards (search_node), writes round-robin over the nodes",
            "shards": args.shards, "replication": args.replication,
            "between_nodes": if args.peer_quic { "direct QUIC, mutual TLS" } else { "NATS request/reply" },
            "catch_up": "node 0 killed and restarted from an empty data folder within the node timeout; seconds until ready (its shards replayed)",
        }),
        cloud_nodes: args.nodes,
        nats_servers: 3,
        single_load_vectors_per_second: single_load,
        cluster_load_vectors_per_second: cluster_load,
        search_node,
        search_node_shards,
        search_p50_ratio_cluster_to_single: row("cluster_search").p50_us
            / row("single_search").p50_us,
        search_p99_ratio_cluster_to_single: row("cluster_search").p99_us
            / row("single_search").p99_us,
        write_p50_ratio_cluster_to_single: row("cluster_write_jetstream_r3").p50_us
            / row("single_write_fsync").p50_us,
        catch_up_vectors,
        catch_up_seconds,
        catch_up_seconds_per_million_extrapolated: catch_up_seconds * 1e6 / catch_up_vectors as f64,
        rows,
    };
    args.output.write_json(&report)?;
    if let Some(docs) = &docs {
        write_docs(docs, &args, &report)?;
    }
    eprintln!(
        "bench cluster done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn write_docs(docs: &Path, args: &ClusterArgs, r: &Report) -> anyhow::Result<()> {
    let mut md = String::new();
    md.push_str("## bench cluster — one cloud against a cluster on NATS JetStream\n\n");
    md.push_str(&format!(
        "Command: `cargo build --release --workspace && cargo run --release -p tiervec-testbed -- bench cluster{} --json target/bench-cluster.json`  \n\
         Machine: {} ({} cpus); Debian's nats-server 2.9.10. One `tiervec-cloud` on its embedded WAL, then \
         {} cloud nodes on three nats-servers (streams R3), every process on the same cores, in one run. \
         {} vectors loaded with their texts; searches (k = 10, ef = 64, one client) at the node holding the fewest shards; single-point writes \
         round-robin over the nodes, one client and {} clients. **Write acknowledgements differ**: the single \
         cloud fsyncs its WAL; a cluster write is acknowledged after JetStream's R3 acknowledgement (a quorum \
         holds it in memory and page cache, not fsynced: `docs/cluster.md`) and the node's own apply.\n\n",
        args.output.quick_flag(), r.machine.cpu_model, r.machine.cpus, r.cloud_nodes,
        r.settings["vectors"], args.clients
    ));
    md.push_str("| row | recall@10 | p50 µs | p99 µs | p99.9 µs | per second | clients |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for row in &r.rows {
        let recall = if row.engine.contains("search") {
            format!("{:.4}", row.recall_at_10)
        } else {
            "—".into()
        };
        md.push_str(&format!(
            "| `{}` | {recall} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            row.engine, row.p50_us, row.p99_us, row.p999_us, row.qps, row.threads
        ));
    }
    md.push_str(&format!(
        "\n- search p50 cluster ÷ single: {:.2}× (p99 {:.2}×): the collection has {} shards on {} of the nodes each; the searched node holds {} of them, \
         answers those itself and asks another node for the rest ({}), then merges\n\
         - single-point write p50 cluster ÷ single: {:.2}×\n\
         - `cluster_visible_at_another_node`: after node 0 acknowledged a write, a search at node 1 naming its shard positions \
         (answered once node 1 applied it): how far behind another node sees a write, search included\n\
         - bulk load (batches of 1,000 with texts): single {:.0} vectors/s, cluster {:.0} vectors/s\n\
         - node 0's catch-up from an empty data folder (killed, restarted within the node timeout, its shards replayed \
         until `/readyz`; it holds {} points afterwards): {:.2} s, i.e. about {:.0} s per million points of its shards — \
         **extrapolated** linearly from this run, not measured at a million\n",
        r.search_p50_ratio_cluster_to_single, r.search_p99_ratio_cluster_to_single, args.shards, args.replication,
        r.search_node_shards,
        if args.peer_quic { "direct QUIC, mutual TLS" } else { "NATS request/reply" },
        r.write_p50_ratio_cluster_to_single,
        r.single_load_vectors_per_second, r.cluster_load_vectors_per_second, r.catch_up_vectors, r.catch_up_seconds,
        r.catch_up_seconds_per_million_extrapolated
    ));
    Ok(update_benchmarks_md(
        &docs.join("benchmarks.md"),
        "cluster",
        &md,
    )?)
}
