//! `tiervec-testbed demo`: the whole two-tier loop on the real dataset, as real processes on
//! loopback. A `tiervec-cloud` holding the 50,000 base vectors (HTTP API and QUIC endpoint with
//! mutual TLS, certificates made on the fly), three `tiervec-edge` processes each serving a
//! 10,000-vector snapshot cache over local HTTP, and a trace of application requests replayed
//! through the edges' HTTP endpoints (`crate::trace`). It reports where answers came from, the
//! end-to-end recall@10 against exact search over the whole corpus, the latency the application
//! saw per source, the trade-off curve of the confidence threshold, and what a cache keyed by a
//! hash of the query vector would have hit on the same trace.
//!
//! The threshold (`max_distance` on the 10th local distance) is calibrated on a trace with a
//! different seed than the reported one, over the same caches: the largest threshold whose
//! predicted recall reaches the target. The cloud's `ef` is the smallest of a ladder whose own
//! recall@10 reaches 0.99, so the end-to-end recall measures the tiers, not the cloud's
//! approximation.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tiervec_edge::EdgeIndex;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::hnsw::HnswParams;

use crate::bench::{Latencies, Machine, recall_at_10, update_benchmarks_md, write_json};
use crate::dataset::Dataset;
use crate::deployment::{self, Edge, EdgeSpec, hits_of};
use crate::procs;
use crate::trace::{self, Request, TraceSpec, Truth};
use crate::{plot, snapshots};

const K: usize = 10;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// 3,000 requests per edge instead of 20,000.
    #[arg(long)]
    pub quick: bool,
    /// Requests per edge (default 20,000; 3,000 with --quick).
    #[arg(long)]
    pub requests: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub edges: usize,
    /// Exponent of the Zipf law over each edge's query popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Fraction of requests repeating a query exactly.
    #[arg(long, default_value_t = 0.3)]
    pub repeat: f64,
    /// Cosine between a noisy request and its query.
    #[arg(long, default_value_t = 0.95)]
    pub noise_cosine: f64,
    /// Seed of the edges' popularity orders (what their caches hold).
    #[arg(long, default_value_t = 7)]
    pub deployment_seed: u64,
    /// Seed of the reported trace.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Seed of the calibration trace (must differ from --seed).
    #[arg(long, default_value_t = 4242)]
    pub calibration_seed: u64,
    /// Vectors per edge snapshot.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_vectors: usize,
    /// Exact neighbours of each popular query put into a cache.
    #[arg(long, default_value_t = 20)]
    pub neighbours: usize,
    /// End-to-end recall@10 the threshold is calibrated for.
    #[arg(long, default_value_t = 0.95)]
    pub target_recall: f64,
    /// Recall added to the target during calibration, against the calibration trace's luck.
    #[arg(long, default_value_t = 0.005)]
    pub calibration_margin: f64,
    /// `ef` of the edges' local search.
    #[arg(long, default_value_t = 64)]
    pub edge_ef: usize,
    /// The edges' deadline for the cloud.
    #[arg(long, default_value_t = 50)]
    pub deadline_ms: u64,
    /// Each edge cache's byte budget (MiB, in the shared byte model), what the cloud may push.
    #[arg(long, default_value_t = 24)]
    pub budget_mb: u64,
    /// Work directory (data, certificates, snapshots, logs, cached ground truth).
    #[arg(long, default_value = "target/tiervec-demo")]
    pub work_dir: PathBuf,
    /// Where benchmarks.md and the SVGs go.
    #[arg(long, default_value = "docs")]
    pub docs: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One source's share and latency at the application's HTTP call.
#[derive(Debug, Clone, Serialize)]
pub struct SourceRow {
    pub source: &'static str,
    pub requests: u64,
    pub fraction: f64,
    pub recall_at_10: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// One point of the threshold trade-off.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub rule: &'static str,
    pub threshold: f64,
    pub local_fraction: f64,
    pub recall_at_10: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<SourceRow>,
    requests: u64,
    errors: u64,
    local_fraction: f64,
    cloud_fraction: f64,
    degraded_fraction: f64,
    certified_fraction: f64,
    recall_at_10: f64,
    hash_cache_hit_fraction: f64,
    cloud_ef: usize,
    cloud_recall_at_10: f64,
    max_distance: f64,
    predicted_local_fraction: f64,
    predicted_recall_at_10: f64,
    per_edge: Vec<EdgeSummary>,
    sweep: Vec<SweepPoint>,
    calibration_sweep: Vec<SweepPoint>,
    seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
struct EdgeSummary {
    edge: usize,
    snapshot_vectors: usize,
    local_fraction: f64,
    recall_at_10: f64,
}

/// Everything known about one request after the replay.
struct Outcome {
    source: &'static str,
    latency: Duration,
    recall: f64,
}

pub fn run(mut args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seed != args.calibration_seed,
        "--seed and --calibration-seed must differ: the threshold is calibrated on another trace"
    );
    let requests_per_edge = args
        .requests
        .unwrap_or(if args.quick { 3_000 } else { 20_000 });
    args.requests = Some(requests_per_edge);
    let started = Instant::now();
    procs::ensure_binaries()?;
    let pinning = procs::can_pin();
    let ds = Dataset::load_default()?;
    let texts = ds.base_texts()?;
    let work = args.work_dir.clone();
    let run_dir = work.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let cache_dir = work.join("cache");
    eprintln!(
        "demo: {} base vectors, {} queries, {} edges × {requests_per_edge} requests",
        ds.base.rows(),
        ds.queries.rows(),
        args.edges
    );

    // 1. The cloud: certificates, bulk load, then `serve` with the QUIC endpoint. It builds its
    //    graph in the background while this process prepares the trace and the caches.
    let edge_names: Vec<String> = (0..args.edges).map(|e| format!("edge-{e}")).collect();
    let mut cloud = deployment::start_cloud(&run_dir, &ds, &edge_names)?;

    // 2. The traces (reported and calibration) and their exact ground truth (cached).
    let t = Instant::now();
    let spec = |trace_seed: u64| TraceSpec {
        edges: args.edges,
        requests_per_edge,
        zipf_exponent: args.zipf,
        repeat_fraction: args.repeat,
        noise_cosine: args.noise_cosine,
        deployment_seed: args.deployment_seed,
        trace_seed,
    };
    let shipped = |q: usize| Truth {
        ids: ds.groundtruth.row(q)[..K]
            .iter()
            .map(|&i| i as u64)
            .collect(),
        distances: ds.groundtruth_distances.row(q)[..K].to_vec(),
    };
    let reported_spec = spec(args.seed);
    let reported = trace::generate(&reported_spec, &ds.queries)?;
    let reported_truth =
        trace::ground_truth(&reported_spec, &reported, &ds.base, &shipped, &cache_dir)?;
    let calibration_spec = spec(args.calibration_seed);
    let calibration = trace::generate(&calibration_spec, &ds.queries)?;
    let calibration_truth = trace::ground_truth(
        &calibration_spec,
        &calibration,
        &ds.base,
        &shipped,
        &cache_dir,
    )?;
    eprintln!(
        "  traces and exact ground truth over the corpus: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 3. The edges' caches: the exact top-`neighbours` of each edge's most popular queries,
    //    most popular first, until the snapshot is full.
    let t = Instant::now();
    let orders = trace::popularity(args.edges, ds.queries.rows(), args.deployment_seed);
    let snapshot_rows: Vec<Vec<usize>> = orders
        .iter()
        .map(|order| cache_rows(&ds, order, args.neighbours, args.snapshot_vectors))
        .collect();
    let snapshot_paths: Vec<PathBuf> = (0..args.edges)
        .map(|e| run_dir.join(format!("edge-{e}.tvs")))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::new();
    let collection_id = rt.block_on(cloud.collection_id(&http))?;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let jobs: Vec<_> = snapshot_rows
            .iter()
            .zip(&snapshot_paths)
            .map(|(rows, path)| {
                let (base, texts) = (&ds.base, &texts);
                s.spawn(move || -> anyhow::Result<()> {
                    let bytes = snapshots::build_rows(
                        base,
                        rows,
                        HnswParams::default(),
                        Some(texts),
                        collection_id,
                    )?;
                    tiervec_edge::write_snapshot_atomic(path, &bytes)?;
                    Ok(())
                })
            })
            .collect();
        for job in jobs {
            job.join()
                .map_err(|_| anyhow::anyhow!("snapshot builder panicked"))??;
        }
        Ok(())
    })?;
    eprintln!(
        "  {} edge snapshots of {} vectors built in {:.1} s",
        args.edges,
        args.snapshot_vectors,
        t.elapsed().as_secs_f64()
    );

    // 4. Calibrate the threshold on the calibration trace, with the edges' own search code.
    let indexes: Vec<EdgeIndex> = snapshot_paths
        .iter()
        .map(|p| EdgeIndex::open(p))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    rt.block_on(cloud.wait_indexed(&http))?;
    eprintln!(
        "  cloud graph ready {:.1} s later",
        t.elapsed().as_secs_f64()
    );
    // The cloud's ef is chosen on what it will be asked: requests of the calibration trace.
    let sample: Vec<(&Request, &Truth)> = calibration
        .iter()
        .flatten()
        .zip(calibration_truth.iter().flatten())
        .step_by((args.edges * requests_per_edge / 1_000).max(1))
        .collect();
    let sample_vectors: Vec<&[f32]> = sample.iter().map(|(r, _)| r.vector.as_slice()).collect();
    let sample_truth: Vec<(&[u64], &[f32])> = sample
        .iter()
        .map(|(_, t)| (t.ids.as_slice(), t.distances.as_slice()))
        .collect();
    let (cloud_ef, cloud_recall) =
        rt.block_on(cloud.pick_ef(&http, &sample_vectors, &sample_truth))?;
    eprintln!(
        "  cloud ef={cloud_ef}: its own recall@10 {cloud_recall:.4} on {} calibration requests",
        sample.len()
    );
    let calibration_local =
        local_answers(&indexes, &calibration, &calibration_truth, args.edge_ef)?;
    let calibration_sweep = sweep(&calibration_local, cloud_recall);
    let goal = args.target_recall + args.calibration_margin;
    let chosen = calibration_sweep
        .iter()
        .filter(|p| p.recall_at_10 >= goal)
        .max_by(|a, b| a.threshold.total_cmp(&b.threshold))
        .context("no threshold reaches the target recall, even asking the cloud always")?
        .clone();
    eprintln!(
        "  calibrated on seed {}: max_distance {:.4} (predicted local {:.1} %, recall {:.4})",
        args.calibration_seed,
        chosen.threshold,
        chosen.local_fraction * 100.0,
        chosen.recall_at_10
    );

    // 5. The edges as processes, each with one worker thread; pinned: edges and this load
    //    generator on core 0, the cloud alone on core 1.
    let mut edges = Vec::new();
    for (e, name) in edge_names.iter().enumerate() {
        edges.push(deployment::start_edge(
            &cloud,
            &EdgeSpec {
                name,
                snapshot: &snapshot_paths[e],
                confidence: ConfidenceRule::kth(chosen.threshold as f32),
                budget_bytes: args.budget_mb << 20,
                edge_ef: args.edge_ef,
                cloud_ef,
                deadline_ms: args.deadline_ms,
                cpus: pinning.then_some("0"),
            },
        )?);
    }
    if pinning {
        procs::pin(cloud.process.pid(), "1")?;
        procs::pin_self("0")?;
    }
    rt.block_on(async {
        for edge in &mut edges {
            edge.wait_linked(&http).await?;
        }
        anyhow::Ok(())
    })?;
    let edge_urls: Vec<String> = edges.iter().map(Edge::search_url).collect();

    // 6. Replay: per edge a closed loop of HTTP requests, the edges concurrently.
    let total = (args.edges * requests_per_edge) as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "  replay {bar:40} {pos}/{len} requests  {per_sec}  eta {eta}",
        )
        .expect("a valid progress template"),
    );
    let t = Instant::now();
    let outcomes = rt.block_on(replay(&edge_urls, &reported, &reported_truth, &bar))?;
    bar.finish_and_clear();
    let replay_seconds = t.elapsed().as_secs_f64();
    eprintln!("  replayed {total} requests in {replay_seconds:.1} s");
    for edge in &mut edges {
        edge.process.check_alive()?;
    }
    cloud.process.check_alive()?;
    drop(edges);
    drop(cloud);

    // 7. The figures.
    let reported_local = local_answers(&indexes, &reported, &reported_truth, args.edge_ef)?;
    let reported_sweep = sweep(&reported_local, cloud_recall);
    let predicted = predict(&reported_local, chosen.threshold, cloud_recall);
    let report = Report {
        bench: "demo",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "edges": args.edges,
            "requests_per_edge": requests_per_edge,
            "zipf": args.zipf,
            "repeat_fraction": args.repeat,
            "noise_cosine": args.noise_cosine,
            "deployment_seed": args.deployment_seed,
            "seed": args.seed,
            "calibration_seed": args.calibration_seed,
            "snapshot_vectors": args.snapshot_vectors,
            "neighbours_per_query": args.neighbours,
            "k": K,
            "edge_ef": args.edge_ef,
            "cloud_ef": cloud_ef,
            "deadline_ms": args.deadline_ms,
            "target_recall": args.target_recall,
            "calibration_margin": args.calibration_margin,
            "m": HnswParams::default().m,
            "ef_construction": HnswParams::default().ef_construction,
            "processes": if pinning {
                "cloud: taskset -c 1, 1 tokio worker (+ blocking search threads); 3 edges: taskset -c 0, 1 tokio worker each; load generator: taskset -c 0, 1 thread, one closed loop per edge"
            } else {
                "unpinned (taskset unavailable)"
            },
        }),
        rows: source_rows(&outcomes),
        requests: outcomes.iter().map(|e| e.len() as u64).sum(),
        errors: 0,
        local_fraction: fraction(&outcomes, "local"),
        cloud_fraction: fraction(&outcomes, "cloud"),
        degraded_fraction: fraction(&outcomes, "degraded"),
        certified_fraction: 0.0,
        recall_at_10: mean(outcomes.iter().flatten().map(|o| o.recall)),
        hash_cache_hit_fraction: trace::hash_cache_hits(&reported),
        cloud_ef,
        cloud_recall_at_10: cloud_recall,
        max_distance: chosen.threshold,
        predicted_local_fraction: predicted.local_fraction,
        predicted_recall_at_10: predicted.recall_at_10,
        per_edge: outcomes
            .iter()
            .enumerate()
            .map(|(e, o)| EdgeSummary {
                edge: e,
                snapshot_vectors: snapshot_rows[e].len(),
                local_fraction: o.iter().filter(|x| x.source == "local").count() as f64
                    / o.len().max(1) as f64,
                recall_at_10: mean(o.iter().map(|x| x.recall)),
            })
            .collect(),
        sweep: thin(&reported_sweep, 60),
        calibration_sweep: thin(&calibration_sweep, 60),
        seconds: started.elapsed().as_secs_f64(),
    };
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    write_docs(&args, &report, &outcomes)?;
    Ok(())
}

/// The rows of an edge's cache: the exact neighbours of its queries, most popular first.
fn cache_rows(ds: &Dataset, order: &[usize], neighbours: usize, capacity: usize) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::with_capacity(capacity);
    for &q in order {
        for &id in ds.groundtruth.row(q).iter().take(neighbours) {
            if rows.len() == capacity {
                return rows;
            }
            if seen.insert(id) {
                rows.push(id as usize);
            }
        }
    }
    rows
}

/// What the edge would answer locally for each request: the 10th distance and the recall.
struct LocalAnswer {
    kth_distance: f32,
    recall: f64,
}

fn local_answers(
    indexes: &[EdgeIndex],
    requests: &[Vec<Request>],
    truth: &[Vec<Truth>],
    ef: usize,
) -> anyhow::Result<Vec<LocalAnswer>> {
    let mut out = Vec::new();
    for (edge, (reqs, truths)) in requests.iter().zip(truth).enumerate() {
        for (r, t) in reqs.iter().zip(truths) {
            let hits = indexes[edge].search(&r.vector, K, ef)?;
            let found: Vec<(u64, f32)> = hits.iter().map(|h| (h.id, h.distance)).collect();
            out.push(LocalAnswer {
                kth_distance: hits.get(K - 1).map_or(f32::INFINITY, |h| h.distance),
                recall: recall_at_10(&found, &t.ids, &t.distances),
            });
        }
    }
    Ok(out)
}

/// The rule's outcome at `threshold`: local when the 10th distance is at most the threshold
/// (with the local recall), else the cloud's (with its measured recall).
fn predict(local: &[LocalAnswer], threshold: f64, cloud_recall: f64) -> SweepPoint {
    let mut kept = 0usize;
    let mut recall = 0.0;
    for a in local {
        if f64::from(a.kth_distance) <= threshold {
            kept += 1;
            recall += a.recall;
        } else {
            recall += cloud_recall;
        }
    }
    let n = local.len().max(1) as f64;
    SweepPoint {
        rule: "kth_distance",
        threshold,
        local_fraction: kept as f64 / n,
        recall_at_10: recall / n,
    }
}

/// The trade-off at every distinct 10th distance (each is where the curve moves).
fn sweep(local: &[LocalAnswer], cloud_recall: f64) -> Vec<SweepPoint> {
    let mut order: Vec<&LocalAnswer> = local.iter().collect();
    order.sort_by(|a, b| a.kth_distance.total_cmp(&b.kth_distance));
    let n = local.len().max(1) as f64;
    let mut recall_sum: f64 = local.len() as f64 * cloud_recall;
    let mut points = vec![SweepPoint {
        rule: "kth_distance",
        threshold: 0.0,
        local_fraction: 0.0,
        recall_at_10: recall_sum / n,
    }];
    for (i, a) in order.iter().enumerate() {
        recall_sum += a.recall - cloud_recall;
        let last_of_its_value = order
            .get(i + 1)
            .is_none_or(|next| next.kth_distance > a.kth_distance);
        if last_of_its_value && a.kth_distance.is_finite() {
            points.push(SweepPoint {
                rule: "kth_distance",
                threshold: f64::from(a.kth_distance),
                local_fraction: (i + 1) as f64 / n,
                recall_at_10: recall_sum / n,
            });
        }
    }
    points
}

/// At most `max` points of a sweep, evenly spread over its local fraction.
fn thin(points: &[SweepPoint], max: usize) -> Vec<SweepPoint> {
    if points.len() <= max {
        return points.to_vec();
    }
    (0..max)
        .map(|i| points[i * (points.len() - 1) / (max - 1)].clone())
        .collect()
}

async fn replay(
    edge_urls: &[String],
    requests: &[Vec<Request>],
    truth: &[Vec<Truth>],
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Vec<Outcome>>> {
    let loops = edge_urls
        .iter()
        .zip(requests)
        .zip(truth)
        .map(|((url, reqs), truths)| {
            let http = reqwest::Client::new();
            let bar = bar.clone();
            async move {
                let mut outcomes = Vec::with_capacity(reqs.len());
                for (r, t) in reqs.iter().zip(truths) {
                    let body =
                        serde_json::to_vec(&serde_json::json!({"vector": r.vector, "k": K}))?;
                    let sent = Instant::now();
                    let response = http
                        .post(url.as_str())
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    let status = response.status();
                    let bytes = response.bytes().await?;
                    let latency = sent.elapsed();
                    anyhow::ensure!(
                        status.is_success(),
                        "{url} answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    );
                    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                    let source = match v["source"].as_str() {
                        Some("local") => "local",
                        Some("cloud") => "cloud",
                        Some("degraded") => "degraded",
                        other => anyhow::bail!("unknown source {other:?}"),
                    };
                    outcomes.push(Outcome {
                        source,
                        latency,
                        recall: recall_at_10(&hits_of(&v)?, &t.ids, &t.distances),
                    });
                    bar.inc(1);
                }
                anyhow::Ok(outcomes)
            }
        });
    futures::future::try_join_all(loops).await
}

fn fraction(outcomes: &[Vec<Outcome>], source: &str) -> f64 {
    let all: Vec<&Outcome> = outcomes.iter().flatten().collect();
    all.iter().filter(|o| o.source == source).count() as f64 / all.len().max(1) as f64
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

fn source_rows(outcomes: &[Vec<Outcome>]) -> Vec<SourceRow> {
    let all: Vec<&Outcome> = outcomes.iter().flatten().collect();
    ["all", "local", "cloud", "degraded"]
        .into_iter()
        .filter_map(|source| {
            let of: Vec<&&Outcome> = all
                .iter()
                .filter(|o| source == "all" || o.source == source)
                .collect();
            if of.is_empty() {
                return None;
            }
            let mut lat = Latencies::new();
            for o in &of {
                lat.record(o.latency);
            }
            Some(SourceRow {
                source,
                requests: of.len() as u64,
                fraction: of.len() as f64 / all.len().max(1) as f64,
                recall_at_10: mean(of.iter().map(|o| o.recall)),
                p50_us: lat.percentile_us(0.5),
                p99_us: lat.percentile_us(0.99),
                p999_us: lat.percentile_us(0.999),
            })
        })
        .collect()
}

fn table(r: &Report) -> String {
    let mut md = format!(
        "{} requests through {} edges, {} errors. recall@10 {:.4}; local {:.1} %, cloud {:.1} %, degraded {:.1} % \
         (max_distance {:.4} calibrated on another seed; predicted local {:.1} %, recall {:.4}). \
         Cloud ef={} (its own recall@10 {:.4}). A cache keyed by a hash of the query vector would \
         have answered {:.1} % of the same trace.\n\n",
        r.requests,
        r.per_edge.len(),
        r.errors,
        r.recall_at_10,
        r.local_fraction * 100.0,
        r.cloud_fraction * 100.0,
        r.degraded_fraction * 100.0,
        r.max_distance,
        r.predicted_local_fraction * 100.0,
        r.predicted_recall_at_10,
        r.cloud_ef,
        r.cloud_recall_at_10,
        r.hash_cache_hit_fraction * 100.0,
    );
    md.push_str(
        "| source | requests | share | recall@10 | p50 µs | p99 µs | p99.9 µs |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &r.rows {
        md.push_str(&format!(
            "| {} | {} | {:.1} % | {:.4} | {:.0} | {:.0} | {:.0} |\n",
            row.source,
            row.requests,
            row.fraction * 100.0,
            row.recall_at_10,
            row.p50_us,
            row.p99_us,
            row.p999_us
        ));
    }
    md
}

fn write_docs(args: &DemoArgs, r: &Report, outcomes: &[Vec<Outcome>]) -> anyhow::Result<()> {
    let bench_dir = args.docs.join("bench");
    let mut per_source: Vec<(&str, Latencies)> = Vec::new();
    for source in ["local", "cloud", "degraded"] {
        let mut lat = Latencies::new();
        for o in outcomes.iter().flatten().filter(|o| o.source == source) {
            lat.record(o.latency);
        }
        if lat.samples() > 0 {
            per_source.push((source, lat));
        }
    }
    plot::latency_cdf(
        &bench_dir.join("demo-latency.svg"),
        "demo: latency at the application's HTTP call, per source",
        &per_source,
    )?;
    plot::threshold_sweep(
        &bench_dir.join("demo-threshold.svg"),
        "demo: recall@10 and local fraction against max_distance",
        &r.sweep,
        &r.calibration_sweep,
        r.max_distance,
        (r.local_fraction, r.recall_at_10),
    )?;
    let quick = if args.quick { " --quick" } else { "" };
    let section = format!(
        "## demo\n\nCommand: `cargo run --release -p tiervec-testbed -- demo{quick} --json target/demo.json` \
         ({} s end to end on this machine, most of it the exact ground truth of both traces on a \
         first run; it is cached in `{}`). Cloud and 3 edges as real processes on loopback; {}. \
         Latencies here include queueing: the three edges and the three closed loops of the load \
         generator share core 0, so a request often waits for another edge's; `bench e2e` \
         measures one loop alone. Recall is against exact search over all 50,000 vectors; \
         a numpy model of this setup (exact local search, Zipf 1.0) reaches 58 % local at \
         recall 0.95 with the same rule.\n\n{}\n\
         ![latency per source](bench/demo-latency.svg)\n\n![threshold trade-off](bench/demo-threshold.svg)\n",
        r.seconds.round(),
        args.work_dir.join("cache").display(),
        r.settings["processes"].as_str().unwrap_or(""),
        table(r)
    );
    update_benchmarks_md(&args.docs.join("benchmarks.md"), "demo", &section)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Vec<LocalAnswer> {
        [(0.1, 1.0), (0.2, 0.9), (0.2, 0.8), (0.5, 0.3)]
            .into_iter()
            .map(|(d, r)| LocalAnswer {
                kth_distance: d,
                recall: r,
            })
            .collect()
    }

    #[test]
    fn the_sweep_matches_the_rule_at_every_threshold() {
        let local = answers();
        let points = sweep(&local, 0.99);
        assert_eq!(points.len(), 4, "0, and each distinct distance");
        for p in &points {
            let direct = predict(&local, p.threshold, 0.99);
            assert!((direct.recall_at_10 - p.recall_at_10).abs() < 1e-12);
            assert!((direct.local_fraction - p.local_fraction).abs() < 1e-12);
        }
        assert_eq!(points[2].local_fraction, 0.75, "ties move together");
    }

    #[test]
    fn thinning_keeps_both_ends() {
        let local: Vec<LocalAnswer> = (0..500)
            .map(|i| LocalAnswer {
                kth_distance: i as f32,
                recall: 1.0,
            })
            .collect();
        let points = sweep(&local, 1.0);
        let thin = thin(&points, 10);
        assert_eq!(thin.len(), 10);
        assert_eq!(thin[0].threshold, points[0].threshold);
        assert_eq!(thin[9].threshold, points.last().unwrap().threshold);
    }
}
