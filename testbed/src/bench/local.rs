//! `tiervec-testbed bench local`: the edge's in-place snapshot search against hnsw_rs and exact
//! brute force, on a 10,000-vector slice of the dataset, over an `ef` sweep.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tiervec_edge::{EdgeIndex, Hit, Searcher, write_snapshot_atomic};
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::{Metric, exact};

use tiervec_cloud::collection::index::GraphIndex;

use super::{
    AtRecall, Row, best_at, best_rows_list, measure, memory, recall_latency_series, rows_table,
};
use crate::dataset::Dataset;
use crate::measure::{Latencies, Machine, OutputArgs, exact_top_k, update_benchmarks_md};
use crate::{plot, snapshots};

/// Knobs of the local bench.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Base vectors in the snapshot (the first N rows of base.fvecs).
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    #[arg(long, default_value_t = 16)]
    pub m: usize,
    #[arg(long, default_value_t = 200)]
    pub ef_construction: usize,
    /// ef values to sweep (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,16,24,32,40,48,56,64,96,128,192,256"
    )]
    pub ef: Vec<usize>,
    /// Minimum latency samples per row (queries are repeated to reach it).
    #[arg(long, default_value_t = 10_000)]
    pub samples: usize,
    /// Where the snapshot file is written.
    #[arg(long, default_value = "target/tiervec-bench")]
    pub work_dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<Row>,
    snapshot_bytes: u64,
    open_ms: f64,
    rss_file_bytes: u64,
    rss_anon_bytes: u64,
    rss_file_delta_bytes: u64,
    rss_anon_delta_bytes: u64,
    kernel_gbps: f64,
    memory_gbps: f64,
    build_seconds_tiervec: f64,
    build_seconds_hnsw_rs: f64,
    hnsw_rs_build_threads: usize,
    at_recall_098: Vec<AtRecall>,
    p50_ratio_tiervec_to_hnsw_rs_at_098: Option<f64>,
    p99_ratio_tiervec_to_hnsw_rs_at_098: Option<f64>,
}

/// Resident memory of a child process that only opens the snapshot and searches it.
#[derive(Debug, Default, serde::Deserialize, Serialize)]
pub struct RssProbe {
    pub rss_file_bytes: u64,
    pub rss_anon_bytes: u64,
    pub rss_file_before_open_bytes: u64,
    pub rss_anon_before_open_bytes: u64,
}

/// Reads `RssFile` and `RssAnon` of this process from `/proc/self/status`, in bytes.
pub fn rss_now() -> (u64, u64) {
    (
        crate::procs::memory_field(None, "RssFile"),
        crate::procs::memory_field(None, "RssAnon"),
    )
}

/// The child side of the RSS measurement: open `snapshot`, search with each stored vector as
/// a query (so no query set is loaded), and report resident memory.
pub fn rss_probe(snapshot: &Path, queries: usize, ef: usize) -> anyhow::Result<RssProbe> {
    let (file0, anon0) = rss_now();
    let index = EdgeIndex::open(snapshot)?;
    let mut searcher = Searcher::new();
    let mut hits: Vec<Hit<'_>> = Vec::with_capacity(10);
    let mut query = vec![0.0f32; index.header().spec.dim as usize];
    for i in 0..queries.min(index.len()) {
        query.copy_from_slice(index.view().vector(i as u32).context("vector")?);
        index.search_with(&mut searcher, &query, 10, ef, &mut hits)?;
    }
    let (file, anon) = rss_now();
    Ok(RssProbe {
        rss_file_bytes: file,
        rss_anon_bytes: anon,
        rss_file_before_open_bytes: file0,
        rss_anon_before_open_bytes: anon0,
    })
}

pub fn run(mut args: LocalArgs) -> anyhow::Result<()> {
    let docs = args.output.docs_dir()?.map(Path::to_owned);
    let quick = args.output.quick;
    if quick {
        args.samples = args.samples.min(1_000);
    }
    let started = Instant::now();
    let ds = Dataset::load_default()?;
    let texts = ds.base_texts()?;
    let dim = ds.base.dim;
    let count = args.count.min(ds.base.rows());
    let vectors = &ds.base.data[..count * dim];
    let nq = if quick { 1_000 } else { ds.queries.rows() };
    let queries: Vec<&[f32]> = (0..nq).map(|i| ds.queries.row(i)).collect();
    let params = HnswParams {
        m: args.m,
        ef_construction: args.ef_construction,
        ..HnswParams::default()
    };
    eprintln!(
        "bench local: {count} vectors × {dim}, {nq} queries, M={}, ef_construction={}",
        args.m, args.ef_construction
    );

    let truth = exact_top_k(vectors, dim, &queries);

    let t = Instant::now();
    let bytes = snapshots::build(&ds.base, count, params, Some(&texts))?;
    let build_seconds_tiervec = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.work_dir)?;
    let path = args.work_dir.join(format!("local-{count}.tvs"));
    write_snapshot_atomic(&path, &bytes)?;
    let snapshot_bytes = bytes.len() as u64;
    drop(bytes);
    eprintln!("  tiervec build {build_seconds_tiervec:.1}s, snapshot {snapshot_bytes} bytes");

    let opens: Latencies = (0..7)
        .map(|_| {
            let t = Instant::now();
            EdgeIndex::open(&path).map(|_| t.elapsed())
        })
        .collect::<Result<_, _>>()?;
    let open_ms = opens.percentile_ms(0.5).unwrap_or_default();
    let index = EdgeIndex::open(&path)?;

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    // hnsw_rs as the cloud tier holds it: tiervec's distance, parallel insert on all cores.
    let peer = GraphIndex::new(Metric::Cosine, params, count);
    let rows: Vec<(&[f32], usize)> = (0..count).map(|i| (ds.base.row(i), i)).collect();
    peer.insert(&rows);
    let build_seconds_hnsw_rs = t.elapsed().as_secs_f64();
    eprintln!("  hnsw_rs build {build_seconds_hnsw_rs:.1}s on {threads} threads");
    // The same search over hnsw_rs's graph separates graph quality from search speed.
    let peer_graph = peer.export(count);
    let peer_params = HnswParams {
        m: peer_graph
            .layers
            .iter()
            .skip(1)
            .map(|l| l.stats().max_degree)
            .max()
            .unwrap_or(args.m)
            .max(args.m),
        ..params
    };
    let peer_path = args
        .work_dir
        .join(format!("local-{count}-hnsw_rs-graph.tvs"));
    let peer_bytes = snapshots::encode_with_graph(&ds.base, peer_graph, peer_params)?;
    write_snapshot_atomic(&peer_path, &peer_bytes)?;
    let on_peer_graph = EdgeIndex::open(&peer_path)?;

    let mut rows = Vec::new();
    let mut searcher = Searcher::new();
    let mut hits = Vec::with_capacity(16);
    for &ef in &args.ef {
        rows.push(measure(
            "tiervec",
            Some(ef),
            &queries,
            &truth,
            args.samples,
            |q, out| {
                index
                    .search_with(&mut searcher, q, 10, ef, &mut hits)
                    .expect("valid query");
                out.clear();
                out.extend(hits.iter().map(|h| (h.id, h.distance)));
            },
        ));
        rows.push(measure(
            "tiervec_on_hnsw_rs_graph",
            Some(ef),
            &queries,
            &truth,
            args.samples,
            |q, out| {
                on_peer_graph
                    .search_with(&mut searcher, q, 10, ef, &mut hits)
                    .expect("valid query");
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
                out.extend(
                    peer.search_own(q, 10, ef)
                        .into_iter()
                        .map(|(slot, d)| (slot as u64, d)),
                );
            },
        ));
    }
    rows.push(measure(
        "exact",
        None,
        &queries,
        &truth,
        args.samples,
        |q, out| {
            let found = exact::search(vectors, dim, Metric::Cosine, q, 10);
            out.clear();
            out.extend(found.iter().map(|n| (n.id as u64, n.distance)));
        },
    ));

    // Kernel scan throughput: exact search over every base vector, single thread.
    let scan_queries = if quick { 20 } else { 200 };
    let t = Instant::now();
    for q in queries.iter().take(scan_queries) {
        std::hint::black_box(exact::search(&ds.base.data, dim, Metric::Cosine, q, 10));
    }
    let per_scan = t.elapsed().as_secs_f64() / scan_queries as f64;
    let kernel_gbps = (ds.base.data.len() * 4) as f64 / per_scan / 1e9;
    let memory_gbps = memory::read_bandwidth_gbps(1 << 30, 5);
    eprintln!(
        "  kernel scan {kernel_gbps:.1} GB/s over {} vectors; memory read {memory_gbps:.1} GB/s (1 GiB buffer)",
        ds.base.rows()
    );

    let probe = spawn_rss_probe(&path)?;

    let at_recall_098: Vec<AtRecall> = ["tiervec", "tiervec_on_hnsw_rs_graph", "hnsw_rs", "exact"]
        .iter()
        .filter_map(|e| best_at(&rows, e, 0.98))
        .collect();
    let ratio = |f: fn(&AtRecall) -> f64| {
        let ours = at_recall_098.iter().find(|r| r.engine == "tiervec")?;
        let peer = at_recall_098.iter().find(|r| r.engine == "hnsw_rs")?;
        Some(f(ours) / f(peer))
    };
    let report = Report {
        bench: "local",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "count": count, "dim": dim, "queries": nq, "k": 10, "m": args.m,
            "ef_construction": args.ef_construction, "seed": params.seed,
            "samples_per_row": args.samples, "quick": quick,
            "ground_truth": "exact cosine top-10 over the same vectors (tiervec exact search)",
            "hnsw_rs_distance": "tiervec cosine kernel",
        }),
        p50_ratio_tiervec_to_hnsw_rs_at_098: ratio(|r| r.p50_us),
        p99_ratio_tiervec_to_hnsw_rs_at_098: ratio(|r| r.p99_us),
        rows,
        snapshot_bytes,
        open_ms,
        rss_file_bytes: probe.rss_file_bytes,
        rss_anon_bytes: probe.rss_anon_bytes,
        rss_file_delta_bytes: probe
            .rss_file_bytes
            .saturating_sub(probe.rss_file_before_open_bytes),
        rss_anon_delta_bytes: probe
            .rss_anon_bytes
            .saturating_sub(probe.rss_anon_before_open_bytes),
        kernel_gbps,
        memory_gbps,
        build_seconds_tiervec,
        build_seconds_hnsw_rs,
        hnsw_rs_build_threads: threads,
        at_recall_098,
    };
    args.output.write_json(&report)?;
    if let Some(docs) = &docs {
        write_docs(docs, &args, &report)?;
    }
    eprintln!(
        "bench local done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn spawn_rss_probe(path: &Path) -> anyhow::Result<RssProbe> {
    let out = std::process::Command::new(crate::procs::this_exe()?)
        .arg("rss-probe")
        .arg(path)
        .output()
        .context("starting the RSS probe process")?;
    anyhow::ensure!(
        out.status.success(),
        "RSS probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn write_docs(docs: &Path, args: &LocalArgs, r: &Report) -> anyhow::Result<()> {
    let svg = docs.join("bench").join("local-recall-latency.svg");
    plot::recall_latency(
        &svg,
        "bench local: recall@10 vs p50 latency (10,000 vectors, 1 thread)",
        &recall_latency_series(&r.rows),
    )?;
    let mut md = String::new();
    md.push_str("## bench local — edge snapshot search\n\n");
    md.push_str(&format!(
        "Command: `cargo run --release -p tiervec-testbed -- bench local{} --json target/bench-local.json`  \n\
         Machine: {} ({} cpus, kernel {}), {} vectors × 384, {} queries, M={}, ef_construction={}, \
         ≥{} samples per row, single thread.\n\n",
        args.output.quick_flag(), r.machine.cpu_model, r.machine.cpus, r.machine.kernel, args.count, r.settings["queries"], args.m,
        args.ef_construction, args.samples
    ));
    md.push_str(&rows_table(&r.rows, false));
    md.push_str("\nBest row per engine at recall@10 ≥ 0.98:\n\n");
    md.push_str(&best_rows_list(&r.at_recall_098));
    if let (Some(p50), Some(p99)) = (
        r.p50_ratio_tiervec_to_hnsw_rs_at_098,
        r.p99_ratio_tiervec_to_hnsw_rs_at_098,
    ) {
        md.push_str(&format!(
            "- ratio tiervec / hnsw_rs at recall ≥ 0.98: p50 {p50:.2}×, p99 {p99:.2}×\n"
        ));
    }
    md.push_str(&format!(
        "\nSnapshot {} bytes; open (mmap + full validation) {:.2} ms median of 7; \
         builds: tiervec {:.1} s (1 thread), hnsw_rs {:.1} s ({} threads).  \n\
         Resident memory of a process that only opens and searches: file-backed {} KiB \
         (+{} KiB on open), anonymous {} KiB (+{} KiB on open).  \n\
         Kernel scan over 50,000 × 384 f32: {:.1} GB/s; memory read bandwidth (1 GiB buffer): {:.1} GB/s.\n\n\
         ![recall vs latency](bench/local-recall-latency.svg)\n",
        r.snapshot_bytes,
        r.open_ms,
        r.build_seconds_tiervec,
        r.build_seconds_hnsw_rs,
        r.hnsw_rs_build_threads,
        r.rss_file_bytes / 1024,
        r.rss_file_delta_bytes / 1024,
        r.rss_anon_bytes / 1024,
        r.rss_anon_delta_bytes / 1024,
        r.kernel_gbps,
        r.memory_gbps
    ));
    Ok(update_benchmarks_md(
        &docs.join("benchmarks.md"),
        "local",
        &md,
    )?)
}
