//! `tiervec-testbed bench gpu`: exact search on the GPU against the CPU's exact scan on the same
//! machine — QPS at batch sizes 1, 64 and 1,024 over the 50,000 real vectors and over a
//! 1,000,000-vector synthetic corpus (seeded random unit vectors), the precision, the fraction of
//! the relevant limit (memory bandwidth at batch 1, GEMM throughput at larger batches, from the
//! device's attributes), and the speed-up. Without a usable device it says so and still
//! measures the CPU rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rand_pcg::Pcg64;
use serde::Serialize;
use tiervec_cloud::collection::gpu::{EngineKind, ExactEngine, GpuConfig, GpuError, Precision};
use tiervec_cloud::collection::{Collection, CollectionInfo, Hit};
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::{CollectionId, Metric};

use crate::dataset::Dataset;
use crate::measure::{K, Machine, OutputArgs, recall_at_10, update_benchmarks_md};

#[derive(Debug, Clone, clap::Args)]
pub struct GpuArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Element type of the device copy.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
    /// Rows of the synthetic corpus.
    #[arg(long, default_value_t = 1_000_000)]
    pub synthetic_rows: usize,
    /// Top-k of every query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Each row runs batches until this many seconds passed (at least one batch).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Seed of the synthetic corpus and its queries.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PrecisionArg {
    F32,
    F16,
}

/// Batch sizes measured.
const BATCHES: [usize; 3] = [1, 64, 1_024];

#[derive(Debug, Serialize)]
struct GpuRow {
    engine: String,
    corpus: &'static str,
    rows: usize,
    batch: usize,
    qps: f64,
    /// Mean wall time of one batch.
    batch_ms: f64,
    /// recall@10 against the corpus's ground truth (the dataset's, or the CPU's exact answers
    /// for the synthetic corpus).
    recall_at_10: f64,
    threads: usize,
    precision: &'static str,
    /// Achieved fraction of the limit named by `roofline_limit` (GPU rows with known peaks).
    roofline_fraction: Option<f64>,
    roofline_limit: Option<&'static str>,
    speedup_over_cpu: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    /// The engine in effect: `gpu: <device…>` or `cpu: <why no GPU>`.
    device: String,
    device_present: bool,
    precision: &'static str,
    rows: Vec<GpuRow>,
    /// The 1,024-batch row over the synthetic corpus (the GEMM-bound case), when measured.
    roofline_fraction: Option<f64>,
    peak_memory_gbps: Option<f64>,
    peak_fp32_tflops: Option<f64>,
    peak_fp16_tflops: Option<f64>,
}

/// A corpus: prepared rows, queries, and the ground truth of the first queries.
struct Corpus {
    name: &'static str,
    dim: usize,
    rows: Vec<f32>,
    queries: Vec<f32>,
    truth: Option<Vec<(Vec<u64>, Vec<f32>)>>,
}

fn collection(engine: Arc<ExactEngine>, corpus: &Corpus) -> Collection {
    let c = Collection::with_engine(
        CollectionInfo {
            name: corpus.name.into(),
            id: CollectionId([1; 16]),
            dim: corpus.dim,
            metric: Metric::Cosine,
            params: HnswParams::default(),
        },
        engine,
    );
    let n = corpus.rows.len() / corpus.dim;
    let ids: Vec<u64> = (0..n as u64).collect();
    c.apply_upsert(1, &ids, &corpus.rows, &vec![None; n]);
    c
}

/// Seeded random unit vectors (normal components, normalised).
fn unit_vectors(n: usize, dim: usize, rng: &mut Pcg64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * dim).map(|_| StandardNormal.sample(rng)).collect();
    v.chunks_mut(dim)
        .for_each(tiervec_shared::metric::normalise);
    v
}

/// Runs batches of `batch` queries (cycling through `queries`) for `seconds` (at least one
/// batch, after one unmeasured warm-up batch that also builds a device copy); returns (QPS,
/// mean batch ms, the first answers).
fn measure_batches(
    c: &Collection,
    queries: &[f32],
    dim: usize,
    batch: usize,
    k: usize,
    seconds: f64,
) -> anyhow::Result<(f64, f64, Vec<Vec<Hit>>)> {
    let available = queries.len() / dim;
    let take = |i: usize| -> Vec<f32> {
        (0..batch)
            .flat_map(|j| {
                let q = (i * batch + j) % available;
                queries[q * dim..(q + 1) * dim].iter().copied()
            })
            .collect()
    };
    let first = c.search_exact_batch(&take(0), k)?;
    let mut batches = 0usize;
    let start = Instant::now();
    while batches == 0 || start.elapsed() < Duration::from_secs_f64(seconds) {
        let b = take(batches + 1);
        std::hint::black_box(c.search_exact_batch(&b, k)?);
        batches += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((
        (batches * batch) as f64 / elapsed,
        elapsed * 1e3 / batches as f64,
        first,
    ))
}

fn recall(found: &[Vec<Hit>], truth: &[(Vec<u64>, Vec<f32>)]) -> f64 {
    let n = found.len().min(truth.len());
    let sum: f64 = found
        .iter()
        .zip(truth)
        .map(|(f, (ids, d))| {
            let f: Vec<(u64, f32)> = f.iter().map(|h| (h.id, h.distance)).collect();
            recall_at_10(&f, ids, d)
        })
        .sum();
    sum / n.max(1) as f64
}

pub fn run(args: GpuArgs) -> anyhow::Result<()> {
    let docs = args.output.docs_dir()?;
    let quick = args.output.quick;
    let precision = match args.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::F16 => Precision::F16,
    };
    let config = GpuConfig {
        precision,
        min_rows: 1,
        ..GpuConfig::default()
    };
    let gpu = Arc::new(ExactEngine::probe(&config));
    let device_present = gpu.status().kind == EngineKind::Gpu;
    if device_present {
        eprintln!("GPU: {}", gpu.status());
    } else {
        eprintln!(
            "no GPU device usable here ({}): only the CPU rows are measured",
            gpu.status()
        );
    }
    let cpu = Arc::new(ExactEngine::cpu(&config, &GpuError::Disabled));
    let (peak_gbps, peak_fp32, peak_fp16) = gpu.device_peaks().unwrap_or((None, None, None));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let data = Dataset::load_default()?;
    let dim = data.base.dim;
    let mut real_rows = data.base.data.clone();
    real_rows
        .chunks_mut(dim)
        .for_each(tiervec_shared::metric::normalise);
    let real_queries = if quick {
        data.queries.data[..256 * dim].to_vec()
    } else {
        data.queries.data.clone()
    };
    let real_truth = (0..real_queries.len() / dim)
        .map(|q| data.ground_truth(q, K))
        .collect();
    let synthetic_rows = if quick {
        args.synthetic_rows.min(100_000)
    } else {
        args.synthetic_rows
    };
    let mut rng = Pcg64::seed_from_u64(args.seed);
    eprintln!("generating {synthetic_rows} random unit vectors of {dim} dimensions");
    let corpora = [
        Corpus {
            name: "real_50k",
            dim,
            rows: real_rows,
            queries: real_queries,
            truth: Some(real_truth),
        },
        Corpus {
            name: "synthetic_1m",
            dim,
            rows: unit_vectors(synthetic_rows, dim, &mut rng),
            queries: unit_vectors(1_024, dim, &mut rng),
            truth: None,
        },
    ];

    let mut rows = Vec::new();
    for corpus in &corpora {
        let n = corpus.rows.len() / dim;
        eprintln!("{} ({n} rows):", corpus.name);
        let on_cpu = collection(cpu.clone(), corpus);
        let on_gpu = device_present.then(|| collection(gpu.clone(), corpus));
        for batch in BATCHES {
            // The CPU pays a full scan per query: on the large corpus a short budget still
            // gives at least one batch, which at batch 1,024 is the whole measurement.
            let (cpu_qps, cpu_ms, cpu_first) =
                measure_batches(&on_cpu, &corpus.queries, dim, batch, args.k, args.seconds)?;
            let truth: Vec<(Vec<u64>, Vec<f32>)> = match &corpus.truth {
                Some(t) => t.clone(),
                None => cpu_first
                    .iter()
                    .map(|hits| {
                        (
                            hits.iter().map(|h| h.id).collect(),
                            hits.iter().map(|h| h.distance).collect(),
                        )
                    })
                    .collect(),
            };
            let cpu_row = GpuRow {
                engine: format!("cpu_exact_b{batch}"),
                corpus: corpus.name,
                rows: n,
                batch,
                qps: cpu_qps,
                batch_ms: cpu_ms,
                recall_at_10: recall(&cpu_first, &truth),
                threads,
                precision: "FP32",
                roofline_fraction: None,
                roofline_limit: None,
                speedup_over_cpu: None,
            };
            eprintln!(
                "  {:<16} qps={:>10.1} batch={:>9.2} ms recall@10={:.4}",
                cpu_row.engine, cpu_row.qps, cpu_row.batch_ms, cpu_row.recall_at_10
            );
            rows.push(cpu_row);
            let Some(on_gpu) = &on_gpu else {
                continue;
            };
            let (qps, ms, first) =
                measure_batches(on_gpu, &corpus.queries, dim, batch, args.k, args.seconds)?;
            let (fraction, limit) = if batch == 1 {
                let gbps = qps * (n * dim * precision.bytes()) as f64 / 1e9;
                (peak_gbps.map(|p| gbps / p), "memory_bandwidth")
            } else {
                let tflops = qps * 2.0 * (n * dim) as f64 / 1e12;
                let peak = match precision {
                    Precision::F32 => peak_fp32,
                    Precision::F16 => peak_fp16,
                };
                (peak.map(|p| tflops / p), "gemm_throughput")
            };
            let row = GpuRow {
                engine: format!("gpu_b{batch}"),
                corpus: corpus.name,
                rows: n,
                batch,
                qps,
                batch_ms: ms,
                recall_at_10: recall(&first, &truth),
                threads: 1,
                precision: precision.name(),
                roofline_fraction: fraction,
                roofline_limit: Some(limit),
                speedup_over_cpu: Some(qps / cpu_qps),
            };
            eprintln!(
                "  {:<16} qps={:>10.1} batch={:>9.2} ms recall@10={:.4} ×{:.1} over cpu, {} of {limit}",
                row.engine,
                row.qps,
                row.batch_ms,
                row.recall_at_10,
                qps / cpu_qps,
                fraction.map_or("?".into(), |f| format!("{:.1} %", f * 100.0)),
            );
            rows.push(row);
        }
    }
    let roofline_fraction = rows
        .iter()
        .find(|r| r.engine == "gpu_b1024" && r.corpus == "synthetic_1m")
        .and_then(|r| r.roofline_fraction);
    let report = Report {
        bench: "gpu",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "k": args.k,
            "batches": BATCHES,
            "synthetic_rows": synthetic_rows,
            "seed": args.seed,
            "seconds_per_row": args.seconds,
            "metric": "cosine",
            "quick": quick,
        }),
        device: gpu.status().to_string(),
        device_present,
        precision: precision.name(),
        rows,
        roofline_fraction,
        peak_memory_gbps: peak_gbps,
        peak_fp32_tflops: peak_fp32,
        peak_fp16_tflops: peak_fp16,
    };
    args.output.write_json(&report)?;
    if let Some(docs) = docs {
        update_benchmarks_md(
            &docs.join("benchmarks.md"),
            "gpu",
            &markdown(&report, args.output.quick_flag()),
        )?;
    }
    Ok(())
}

fn markdown(r: &Report, quick: &str) -> String {
    let mut md = String::from("## bench gpu\n\n");
    md.push_str(&format!(
        "`cargo run --release -p tiervec-testbed [--features gpu] -- bench gpu{quick}`: exact top-{} \
         (cosine) on {} ({} cores, {}); engine: `{}`.\n\n",
        r.settings["k"], r.machine.cpu_model, r.machine.cpus, r.machine.kernel, r.device
    ));
    if !r.device_present {
        md.push_str(
            "**The GPU path is unmeasured: no device was lent to the session that ran this.** It \
             is built and reviewed (`cloud/src/collection/gpu/`, checked with `--features gpu`), and its \
             tests skip without a device; only the CPU exact path's figures below were measured.\n\n",
        );
    }
    md.push_str("| corpus | rows | engine | batch | QPS | ms / batch | recall@10 | precision | fraction of limit | speed-up |\n|---|---:|---|---:|---:|---:|---:|---|---:|---:|\n");
    for row in &r.rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.4} | {} | {} | {} |\n",
            row.corpus,
            row.rows,
            row.engine,
            row.batch,
            row.qps,
            row.batch_ms,
            row.recall_at_10,
            row.precision,
            match (row.roofline_fraction, row.roofline_limit) {
                (Some(f), Some(l)) => format!("{:.1} % of {l}", f * 100.0),
                _ => "–".into(),
            },
            row.speedup_over_cpu
                .map_or("–".into(), |s| format!("×{s:.1}")),
        ));
    }
    md.push_str(
        "\nCPU rows: `Collection::search_exact_batch` on the CPU engine (the SIMD scan, queries \
         spread over all cores). recall@10 of the real corpus is against the dataset's ground \
         truth; of the synthetic corpus, against the CPU's exact answers. Limits: batch 1 against \
         the peak memory bandwidth (the corpus read once per query), larger batches against the \
         peak FP32 (or FP16 tensor) throughput, both from the device's attributes (`docs/gpu.md`).\n",
    );
    md
}
