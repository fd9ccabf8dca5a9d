//! `tiervec-testbed bench cloud`: the cloud tier on all 50,000 base vectors — durable bulk load,
//! in-process search (tiervec's search over the hnsw_rs graph, hnsw_rs's own search over the
//! same graph, exact), recovery after a crash with a 10,000-record WAL tail, and the HTTP API
//! with one client and with 32, the server and the load generator pinned to different cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tiervec_cloud::collection::SearchParams;
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::service::Service;
use tiervec_shared::Metric;
use tiervec_shared::hnsw::HnswParams;

use super::{AtRecall, Row, best_at, best_rows_list, measure, recall_latency_series, rows_table};
use crate::dataset::Dataset;
use crate::deployment::{self, COLLECTION};
use crate::measure::{
    K, Latencies, Machine, OutputArgs, exact_top_k, recall_at_10, update_benchmarks_md,
};
use crate::plot;
use crate::procs::{self, Process};

#[derive(Debug, Clone, clap::Args)]
pub struct CloudArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// ef values to sweep in-process (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,32,48,64,96,128,192")]
    pub ef: Vec<usize>,
    /// ef for the HTTP rows.
    #[arg(long, default_value_t = 64)]
    pub http_ef: usize,
    /// Minimum latency samples per row.
    #[arg(long, default_value_t = 10_000)]
    pub samples: usize,
    /// WAL records written after the checkpoint, replayed by the recovery measurement.
    #[arg(long, default_value_t = 10_000)]
    pub wal_tail: usize,
    #[arg(long, default_value = "target/tiervec-bench/cloud")]
    pub work_dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<Row>,
    load_seconds: f64,
    index_seconds: f64,
    recovery_seconds: f64,
    recovery_in_process_seconds: f64,
    wal_records_replayed: u64,
    reindex_seconds: f64,
    at_recall_098: Vec<AtRecall>,
    p50_ratio_tiervec_to_hnsw_rs_at_098: Option<f64>,
    http_server_worker_threads: usize,
}

/// `tiervec-cloud serve` over `data_dir` as a child process on `cpu`, one worker thread.
fn spawn_server(data_dir: &Path, addr_file: &Path, cpu: usize) -> anyhow::Result<Process> {
    let _ = std::fs::remove_file(addr_file);
    let args = [
        "serve".to_owned(),
        "--set".into(),
        format!("data_dir={:?}", data_dir.to_string_lossy()),
        "--set".into(),
        "http_addr=\"127.0.0.1:0\"".into(),
        "--set".into(),
        "worker_threads=1".into(),
        "--addr-file".into(),
        addr_file.to_string_lossy().into_owned(),
    ];
    Process::start(
        "tiervec-cloud",
        &procs::binary("tiervec-cloud")?,
        &args,
        Some(&cpu.to_string()),
        &data_dir.with_file_name("server.log"),
    )
}

pub fn run(mut args: CloudArgs) -> anyhow::Result<()> {
    let docs = args.output.docs_dir()?.map(Path::to_owned);
    let quick = args.output.quick;
    let started = Instant::now();
    let ds = Dataset::load_default()?;
    let texts = ds.base_texts()?;
    let count = if quick { 10_000 } else { ds.base.rows() };
    let nq = if quick { 1_000 } else { ds.queries.rows() };
    if quick {
        args.samples = args.samples.min(1_000);
        args.wal_tail = args.wal_tail.min(1_000);
    }
    let dim = ds.base.dim;
    let queries: Vec<&[f32]> = (0..nq).map(|i| ds.queries.row(i)).collect();
    // The shipped ground truth is over all 50,000; the quick run computes its own over the slice.
    let truth: Vec<(Vec<u64>, Vec<f32>)> = if count == ds.base.rows() {
        (0..nq).map(|q| ds.ground_truth(q, K)).collect()
    } else {
        exact_top_k(&ds.base.data[..count * dim], dim, &queries)
    };

    let data_dir = args.work_dir.join("data");
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&args.work_dir)?;
    let config = CloudConfig {
        data_dir: data_dir.clone(),
        ..CloudConfig::default()
    };
    eprintln!("bench cloud: {count} vectors × {dim}, {nq} queries");

    // 1. Durable bulk load, then wait for the graph.
    let svc = Service::open(config.clone())?;
    svc.create_collection(COLLECTION, dim, Metric::Cosine, HnswParams::default())?;
    let t = Instant::now();
    for start in (0..count).step_by(1_000) {
        let end = (start + 1_000).min(count);
        let batch = (start..end)
            .map(|i| {
                (
                    i as u64,
                    ds.base.row(i).to_vec(),
                    Some(crate::snapshots::text_payload(&texts[i])),
                )
            })
            .collect();
        svc.upsert(COLLECTION, batch)?;
    }
    let load_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    anyhow::ensure!(
        svc.wait_indexed(Duration::from_secs(900)),
        "indexing did not finish"
    );
    let index_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "  load {load_seconds:.1} s (durable, batches of 1,000), graph ready {index_seconds:.1} s later"
    );

    // 2. In-process search, single thread.
    let collection = svc.catalog().get(COLLECTION).context("collection")?;
    let mut rows = Vec::new();
    for &ef in &args.ef {
        let params = SearchParams {
            k: 10,
            ef,
            exact: false,
            max_distance: None,
        };
        rows.push(measure(
            "tiervec",
            Some(ef),
            &queries,
            &truth,
            args.samples,
            |q, out| {
                let (hits, _) = collection.search(q, &params).expect("valid query");
                out.clear();
                out.extend(hits.iter().map(|h| (h.id, h.distance)));
            },
        ));
        rows.push(measure(
            "hnsw_rs",
            Some(ef),
            &queries,
            &truth,
            args.samples,
            |q, out| {
                out.clear();
                out.extend(collection.search_hnsw_rs(q, 10, ef));
            },
        ));
    }
    let exact_params = SearchParams {
        k: 10,
        ef: 10,
        exact: true,
        max_distance: None,
    };
    rows.push(measure(
        "exact",
        None,
        &queries,
        &truth,
        args.samples.min(2 * nq),
        |q, out| {
            let (hits, _) = collection.search(q, &exact_params).expect("valid query");
            out.clear();
            out.extend(hits.iter().map(|h| (h.id, h.distance)));
        },
    ));
    drop(collection);

    // 3. A checkpoint, then a WAL tail of single-point writes (8 writers, group-committed),
    //    then the process state is dropped without a shutdown step: what is on disk is exactly
    //    what a crash after the last fsync leaves.
    svc.checkpoint()?;
    let svc = Arc::new(svc);
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..8 {
            let svc = svc.clone();
            let ds = &ds;
            let tail = args.wal_tail;
            s.spawn(move || {
                for i in (w..tail).step_by(8) {
                    let id = (i % count) as u64;
                    svc.upsert(
                        COLLECTION,
                        vec![(id, ds.base.row(id as usize).to_vec(), None)],
                    )
                    .expect("tail write");
                }
            });
        }
    });
    eprintln!(
        "  wrote a {}-record WAL tail in {:.1} s",
        args.wal_tail,
        t.elapsed().as_secs_f64()
    );
    drop(Arc::into_inner(svc).context("service still shared")?);
    let t = Instant::now();
    let reopened = Service::open(config)?;
    let recovery_in_process_seconds = t.elapsed().as_secs_f64();
    let wal_records_replayed = reopened.start_report().wal.records_replayed;
    let t = Instant::now();
    anyhow::ensure!(
        reopened.wait_indexed(Duration::from_secs(900)),
        "re-indexing did not finish"
    );
    let reindex_seconds = t.elapsed().as_secs_f64();
    drop(reopened);
    eprintln!(
        "  recovery in process {recovery_in_process_seconds:.2} s ({wal_records_replayed} records replayed), graph rebuilt {reindex_seconds:.1} s later"
    );

    // 4. The server as its own process on core 0, the load generator on core 1.
    let addr_file = args.work_dir.join("addr");
    let t = Instant::now();
    let mut server = spawn_server(&data_dir, &addr_file, 0)?;
    procs::pin_self("1")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http_rows = rt.block_on(async {
        let base = format!("http://{}", procs::wait_addr_file(&addr_file, &mut server)?);
        let http = reqwest::Client::new();
        procs::wait_http_ok(&http, &format!("{base}/readyz"), Duration::from_secs(300)).await?;
        let recovery_seconds = t.elapsed().as_secs_f64();
        deployment::wait_indexed(&http, &base, &mut server).await?;
        let target = HttpTarget {
            http: &http,
            base: &base,
            queries: &queries,
            truth: &truth,
        };
        let one = http_row("http", &target, args.samples, 1, args.http_ef).await?;
        let many = http_row(
            "http_c32",
            &target,
            args.samples.max(20_000),
            32,
            args.http_ef,
        )
        .await?;
        anyhow::Ok((recovery_seconds, one, many))
    });
    server.kill();
    let (recovery_seconds, one, many) = http_rows?;
    eprintln!(
        "  server process ready (/readyz 200: recovered, log writable) {recovery_seconds:.2} s after start (checkpoint + {wal_records_replayed}-record tail)"
    );
    rows.push(one);
    rows.push(many);

    let at_recall_098: Vec<AtRecall> = ["tiervec", "hnsw_rs", "exact"]
        .iter()
        .filter_map(|e| best_at(&rows, e, 0.98))
        .collect();
    let p50_ratio = match (
        at_recall_098.iter().find(|r| r.engine == "tiervec"),
        at_recall_098.iter().find(|r| r.engine == "hnsw_rs"),
    ) {
        (Some(a), Some(b)) => Some(a.p50_us / b.p50_us),
        _ => None,
    };
    let report = Report {
        bench: "cloud",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "count": count, "dim": dim, "queries": nq, "k": 10, "m": 16, "ef_construction": 200,
            "samples_per_row": args.samples, "http_ef": args.http_ef, "wal_tail_records": args.wal_tail,
            "quick": quick, "ground_truth": if count == ds.base.rows() { "shipped groundtruth.ivecs" } else { "exact over the slice" },
            "server": "tiervec-cloud serve as a child process, taskset -c 0, 1 tokio worker thread",
            "load_generator": "this process, taskset -c 1, one tokio current-thread runtime (reqwest)",
        }),
        rows,
        load_seconds,
        index_seconds,
        recovery_seconds,
        recovery_in_process_seconds,
        wal_records_replayed,
        reindex_seconds,
        p50_ratio_tiervec_to_hnsw_rs_at_098: p50_ratio,
        at_recall_098,
        http_server_worker_threads: 1,
    };
    args.output.write_json(&report)?;
    if let Some(docs) = &docs {
        write_docs(docs, &args, &report)?;
    }
    eprintln!(
        "bench cloud done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The server under load and the queries with their ground truth.
pub(super) struct HttpTarget<'a> {
    pub(super) http: &'a reqwest::Client,
    pub(super) base: &'a str,
    pub(super) queries: &'a [&'a [f32]],
    pub(super) truth: &'a [(Vec<u64>, Vec<f32>)],
}

/// Searches over HTTP with `clients` concurrent clients until `samples` requests are answered.
pub(super) async fn http_row(
    engine: &'static str,
    target: &HttpTarget<'_>,
    samples: usize,
    clients: usize,
    ef: usize,
) -> anyhow::Result<Row> {
    let HttpTarget {
        http,
        base,
        queries,
        truth,
    } = *target;
    let url = format!("{base}/v1/collections/{COLLECTION}/search");
    let bodies: Arc<Vec<String>> = Arc::new(
        queries
            .iter()
            .map(|q| serde_json::json!({ "vector": q, "k": 10, "ef": ef }).to_string())
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, bodies, next) = (http.clone(), url.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::new();
            let mut found: Vec<(usize, Vec<(u64, f32)>)> = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= samples {
                    break;
                }
                let q = i % bodies.len();
                let t = Instant::now();
                let resp: serde_json::Value = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[q].clone())
                    .send()
                    .await?
                    .json()
                    .await?;
                lat.record(t.elapsed());
                if i < bodies.len() {
                    let hits = resp["hits"].as_array().cloned().unwrap_or_default();
                    found.push((
                        q,
                        hits.iter()
                            .map(|h| {
                                (
                                    h["id"].as_u64().unwrap_or(u64::MAX),
                                    h["distance"].as_f64().unwrap_or(9.0) as f32,
                                )
                            })
                            .collect(),
                    ));
                }
            }
            anyhow::Ok((lat, found))
        }));
    }
    let mut lat = Latencies::new();
    let mut recall = 0.0;
    let mut judged = 0usize;
    for t in tasks {
        let (l, found) = t.await??;
        lat.merge(&l);
        for (q, hits) in found {
            recall += recall_at_10(&hits, &truth[q].0, &truth[q].1);
            judged += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let row = Row {
        engine,
        ef: Some(ef),
        recall_at_10: recall / judged.max(1) as f64,
        p50_us: lat.percentile_us(0.5),
        p99_us: lat.percentile_us(0.99),
        p999_us: lat.percentile_us(0.999),
        qps: lat.samples() as f64 / elapsed,
        threads: clients,
    };
    eprintln!(
        "  {:<8} clients={clients:<3} recall@10={:.4} p50={:>8.1}µs p99={:>8.1}µs p99.9={:>8.1}µs qps={:>7.0}",
        engine, row.recall_at_10, row.p50_us, row.p99_us, row.p999_us, row.qps
    );
    Ok(row)
}

fn write_docs(docs: &Path, args: &CloudArgs, r: &Report) -> anyhow::Result<()> {
    let svg = docs.join("bench").join("cloud-recall-latency.svg");
    let in_process: Vec<Row> = r
        .rows
        .iter()
        .filter(|row| !row.engine.starts_with("http"))
        .cloned()
        .collect();
    plot::recall_latency(
        &svg,
        "bench cloud: recall@10 vs p50 latency (50,000 vectors, in-process, 1 thread)",
        &recall_latency_series(&in_process),
    )?;
    let mut md = String::new();
    md.push_str("## bench cloud — the cloud tier on 50,000 vectors\n\n");
    md.push_str(&format!(
        "Command: `cargo build --release -p tiervec-cloud && cargo run --release -p tiervec-testbed -- bench cloud{} --json target/bench-cloud.json`  \n\
         Machine: {} ({} cpus). Recall@10 against the shipped ground truth. In-process rows: one thread, the \
         collection's own search (`tiervec`: tiervec's quantised search over the graph hnsw_rs built, exported; \
         `hnsw_rs`: hnsw_rs's own search over the same graph, same ef; `exact`: SIMD brute force). HTTP rows: \
         `tiervec-cloud serve` as a separate process pinned to core 0 with 1 tokio worker thread, the load \
         generator pinned to core 1; latency is the client's, request to parsed response; `threads` is the \
         number of concurrent clients.\n\n",
        args.output.quick_flag(), r.machine.cpu_model, r.machine.cpus
    ));
    md.push_str(&rows_table(&r.rows, true));
    md.push_str("\nBest in-process row per engine at recall@10 ≥ 0.98:\n\n");
    md.push_str(&best_rows_list(&r.at_recall_098));
    if let Some(x) = r.p50_ratio_tiervec_to_hnsw_rs_at_098 {
        md.push_str(&format!(
            "- ratio tiervec / hnsw_rs p50 at recall ≥ 0.98: {x:.2}×\n"
        ));
    }
    md.push_str(&format!(
        "\nDurable bulk load of 50,000 vectors with payloads (batches of 1,000, each fsync'ed before its \
         acknowledgement): {:.1} s; graph searchable {:.1} s later (hnsw_rs parallel insert on 2 cores, then export).  \n\
         Recovery after a crash with a checkpoint and a {}-record WAL tail: server process ready \
         (`/readyz` 200: checkpoint loaded, tail replayed, log writable; the graph is a field of the answer, not a \
         condition) {:.2} s after start; in-process `Service::open` {:.2} s; graph rebuilt {:.1} s after that \
         (searches are exact meanwhile).\n\n![recall vs latency](bench/cloud-recall-latency.svg)\n",
        r.load_seconds, r.index_seconds, r.wal_records_replayed, r.recovery_seconds, r.recovery_in_process_seconds, r.reindex_seconds
    ));
    Ok(update_benchmarks_md(
        &docs.join("benchmarks.md"),
        "cloud",
        &md,
    )?)
}
