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
//!
//! The cloud pushes into the caches while the trace runs (anchors and their neighbours, hot
//! ids, evictions within the byte budget). With `--cold` the edges start with empty caches and
//! the anchor rule alone (`--anchor-distance`): the demo then reports how the trace warms them
//! (local fraction over time, its second half, push delays read from the edges' histograms,
//! bytes pushed). Before every `--probe-every`-th request the load generator also asks the edge
//! for its local answer alone (`local_only`, no side effect on the cloud), so the sweep of every
//! rule (`kth_distance`, `anchor_distance`, `combined`) is measured on the caches as they were.
//! After the trace, `--deletes` vectors the edges hold are deleted in the cloud one at a time,
//! and each edge is polled until it stops returning its deleted vector: the staleness window.

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
use crate::prom::{self, Histogram};
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
    /// Start the edges with empty caches, filled only by the cloud's pushes.
    #[arg(long)]
    pub cold: bool,
    /// Threshold on the distance to the nearest anchor, the rule the edges answer by. The
    /// default is the largest whose predicted recall@10 reached 0.955 on the cold calibration
    /// trace's second half (`demo --cold --seed 4242 --calibration-seed 42`, Zipf 1.0: 0.538),
    /// rounded down.
    #[arg(long, default_value_t = 0.53)]
    pub anchor_distance: f32,
    /// Edges do not ask for certificates (no certified answers).
    #[arg(long)]
    pub no_certify: bool,
    /// Edges answer local searches in WASM guests (`tiervec-edge serve --engine wasm`; they
    /// follow no certificates, so this implies `--no-certify`).
    #[arg(long)]
    pub wasm: bool,
    /// Vectors held by edges deleted in the cloud after the trace, for the staleness window.
    #[arg(long, default_value_t = 100)]
    pub deletes: usize,
    /// Probe the cache alone (`local_only`) before every this many-th request (the sweep's
    /// sample; each probe is one more search on the edge's core).
    #[arg(long, default_value_t = 4)]
    pub probe_every: usize,
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
    /// Of the local answers, the share certified as the exact top-k.
    certified_fraction: f64,
    certified_answers: usize,
    /// Certified answers that were not the exact top-10 against the ground truth (must be 0).
    certified_not_exact: usize,
    warm_certified_fraction: f64,
    recall_at_10: f64,
    hash_cache_hit_fraction: f64,
    cloud_ef: usize,
    cloud_recall_at_10: f64,
    /// The k-th distance threshold (calibrated; none when cold).
    max_distance: Option<f64>,
    anchor_distance: f64,
    predicted_local_fraction: Option<f64>,
    predicted_recall_at_10: Option<f64>,
    /// Local fraction and recall over the second half of the trace.
    warm_local_fraction: f64,
    warm_recall_at_10: f64,
    hot_to_applied_p50_ms: Option<f64>,
    hot_to_applied_p99_ms: Option<f64>,
    applied_to_local_p50_ms: Option<f64>,
    applied_to_local_p99_ms: Option<f64>,
    pushed_bytes_per_edge: f64,
    /// The edges' own estimate of local recall from shadow queries (the share of the cloud's
    /// top-10 their local answers had), averaged over edges.
    shadow_recall_estimate: Option<f64>,
    pushed_deltas: f64,
    compactions: f64,
    deletes: usize,
    staleness_p50_ms: Option<f64>,
    staleness_p99_ms: Option<f64>,
    staleness_max_ms: Option<f64>,
    /// At the cloud: an invalidation sent → its acknowledgement (bucket-interpolated).
    invalidation_ack_p50_ms: Option<f64>,
    invalidation_ack_p99_ms: Option<f64>,
    /// Edge 0 restored whole after losing its cache files.
    restore: RestoreFigures,
    /// Local fraction and recall per window of requests (per edge).
    timeline: Vec<TimelinePoint>,
    per_edge: Vec<EdgeSummary>,
    sweep: Vec<SweepPoint>,
    /// The same over the second half of the trace (warm caches).
    warm_sweep: Vec<SweepPoint>,
    calibration_sweep: Vec<SweepPoint>,
    seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
struct TimelinePoint {
    requests_per_edge: usize,
    local_fraction: f64,
    recall_at_10: f64,
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
    /// The edge's local answer alone, asked just before (the sweep's input), on sampled
    /// requests.
    probe: Option<LocalAnswer>,
    /// The nearest hit of a local answer (a vector the edge held).
    held: Option<u64>,
    /// The edge certified the answer as the exact top-k.
    certified: bool,
    /// The answer equals the exact top-10 (ids, ties by distance aside; distances within 1e-5).
    exact: bool,
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
        "demo{}: {} base vectors, {} queries, {} edges × {requests_per_edge} requests",
        if args.cold { " --cold" } else { "" },
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

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::new();
    let snapshot_paths: Vec<PathBuf> = (0..args.edges)
        .map(|e| run_dir.join(format!("edge-{e}.tvs")))
        .collect();
    // 3. The edges' caches (unless cold): the exact top-`neighbours` of each edge's most
    //    popular queries, most popular first, until the snapshot is full.
    let snapshot_rows: Vec<Vec<usize>> = if args.cold {
        vec![Vec::new(); args.edges]
    } else {
        let t = Instant::now();
        let orders = trace::popularity(args.edges, ds.queries.rows(), args.deployment_seed);
        let rows: Vec<Vec<usize>> = orders
            .iter()
            .map(|order| cache_rows(&ds, order, args.neighbours, args.snapshot_vectors))
            .collect();
        let collection_id = rt.block_on(cloud.collection_id(&http))?;
        let lsns = rt.block_on(
            cloud.lsns(
                &http,
                rows.iter()
                    .flatten()
                    .map(|&r| r as u64)
                    .collect::<std::collections::HashSet<u64>>(),
            ),
        )?;
        build_snapshots(&ds, &texts, &rows, &snapshot_paths, collection_id, &lsns)?;
        eprintln!(
            "  {} edge snapshots of {} vectors built in {:.1} s",
            args.edges,
            args.snapshot_vectors,
            t.elapsed().as_secs_f64()
        );
        rows
    };

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

    // 4. Calibrate the k-th distance threshold (warm caches only) on the calibration trace,
    //    with the edges' own search code over the snapshots.
    let mut calibration_sweep = Vec::new();
    let mut chosen = None;
    if !args.cold {
        let indexes: Vec<EdgeIndex> = snapshot_paths
            .iter()
            .map(|p| EdgeIndex::open(p))
            .collect::<Result<_, _>>()?;
        let calibration_local =
            local_answers(&indexes, &calibration, &calibration_truth, args.edge_ef)?;
        calibration_sweep = sweep(&calibration_local, cloud_recall, Rule::Kth);
        let goal = args.target_recall + args.calibration_margin;
        let point = calibration_sweep
            .iter()
            .filter(|p| p.recall_at_10 >= goal)
            .max_by(|a, b| a.threshold.total_cmp(&b.threshold))
            .context("no threshold reaches the target recall, even asking the cloud always")?
            .clone();
        eprintln!(
            "  calibrated on seed {}: max_distance {:.4} (predicted local {:.1} %, recall {:.4})",
            args.calibration_seed,
            point.threshold,
            point.local_fraction * 100.0,
            point.recall_at_10
        );
        chosen = Some(point);
    }
    // The anchor rule answers, warm or cold: once the cloud pushes (and evicts) the k-th
    // threshold calibrated on the snapshots as built no longer holds — with it, warm caches
    // fell to recall@10 0.89 (local answers 0.81) — and OR-ing the two spends both margins.
    // The k-th calibration is still reported, as the rule the snapshots alone would support.
    let rule = ConfidenceRule {
        max_kth_distance: None,
        max_anchor_distance: Some(args.anchor_distance),
    };

    // 5. The edges as processes, each with one worker thread; pinned: edges and this load
    //    generator on core 0, the cloud alone on core 1.
    let guest = if args.wasm {
        Some(crate::bench::wasm::guest(true)?)
    } else {
        None
    };
    let spec = |e: usize| EdgeSpec {
        name: &edge_names[e],
        snapshot: &snapshot_paths[e],
        confidence: rule,
        budget_bytes: args.budget_mb << 20,
        edge_ef: args.edge_ef,
        cloud_ef,
        deadline_ms: args.deadline_ms,
        cpus: pinning.then_some("0"),
        certify: !args.no_certify,
        wasm_guest: guest.as_deref(),
    };
    let mut edges = Vec::new();
    for e in 0..edge_names.len() {
        edges.push(deployment::start_edge(&cloud, &spec(e))?);
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
    let outcomes = rt.block_on(replay(
        &edge_urls,
        &reported,
        &reported_truth,
        args.probe_every.max(1),
        &bar,
    ))?;
    bar.finish_and_clear();
    let replay_seconds = t.elapsed().as_secs_f64();
    eprintln!("  replayed {total} requests in {replay_seconds:.1} s");

    // 7. What the pushes did, from the edges' and the cloud's own metrics; then the staleness
    //    window (and the cloud's view of it: invalidation sent → acknowledged).
    let metrics: Vec<String> = rt.block_on(async {
        let mut texts = Vec::new();
        for edge in &edges {
            texts.push(edge.metrics(&http).await?);
        }
        anyhow::Ok(texts)
    })?;
    let merged = |name: &str| {
        let mut h = Histogram::default();
        for text in &metrics {
            h.merge(&Histogram::parse(text, name));
        }
        h
    };
    let to_ms = |v: Option<f64>| v.map(|s| s * 1e3);
    let push_delay = merged("tiervec_edge_push_delay_seconds");
    let first_use = merged("tiervec_edge_anchor_first_use_seconds");
    // (`+ 0.0`: an empty f64 sum is −0.0.)
    let per_edge_counter = |name: &str| {
        metrics.iter().map(|t| prom::counter(t, name)).sum::<f64>() / metrics.len().max(1) as f64
            + 0.0
    };
    let staleness = rt.block_on(staleness_window(
        &http,
        &cloud.http_base,
        &edges,
        &ds,
        &outcomes,
        args.deletes,
    ))?;
    let cloud_metrics = rt.block_on(async {
        http.get(format!("{}/metrics", cloud.http_base))
            .send()
            .await?
            .text()
            .await
    })?;
    let invalidation_ack = Histogram::parse(
        &cloud_metrics
            .lines()
            .filter(|l| l.contains("kind=\"invalidation\""))
            .collect::<Vec<_>>()
            .join("\n"),
        "tiervec_push_ack_seconds",
    );
    for edge in &mut edges {
        edge.process.check_alive()?;
    }
    cloud.process.check_alive()?;
    // 8. Edge 0 loses its cache files and is restored whole by a streamed snapshot.
    let restore = rt.block_on(restore_window(&http, &cloud, &mut edges[0], &spec(0)))?;
    eprintln!(
        "  restore: edge-0 held {} vectors; after losing its files and a restart, {} came back in one streamed snapshot of {:.1} MB, {:.2} s after the restart",
        restore.held_before,
        restore.restored_vectors,
        restore.snapshot_bytes as f64 / 1e6,
        restore.seconds
    );
    drop(edges);
    drop(cloud);

    // 8. The figures.
    let probes: Vec<LocalAnswer> = outcomes.iter().flatten().filter_map(|o| o.probe).collect();
    let warm_probes: Vec<LocalAnswer> = outcomes
        .iter()
        .flat_map(|o| &o[o.len() / 2..])
        .filter_map(|o| o.probe)
        .collect();
    let (mut reported_sweep, mut warm_sweep) = (Vec::new(), Vec::new());
    for r in [Rule::Kth, Rule::Anchor, Rule::Combined] {
        reported_sweep.extend(thin(&sweep(&probes, cloud_recall, r), 60));
        warm_sweep.extend(thin(&sweep(&warm_probes, cloud_recall, r), 60));
    }
    let predicted = chosen
        .as_ref()
        .map(|c| predict(&probes, c.threshold, cloud_recall, Rule::Kth));
    let second_half: Vec<&Outcome> = outcomes.iter().flat_map(|o| &o[o.len() / 2..]).collect();
    let certified: Vec<&Outcome> = outcomes.iter().flatten().filter(|o| o.certified).collect();
    let mut stale_ms: Vec<f64> = staleness.clone();
    stale_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        (!stale_ms.is_empty()).then(|| stale_ms[((stale_ms.len() - 1) as f64 * q).round() as usize])
    };
    let report = Report {
        bench: "demo",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "cold": args.cold,
            "engine": if args.wasm { "wasm" } else { "native" },
            "certify": !args.no_certify,
            "edges": args.edges,
            "requests_per_edge": requests_per_edge,
            "zipf": args.zipf,
            "repeat_fraction": args.repeat,
            "noise_cosine": args.noise_cosine,
            "deployment_seed": args.deployment_seed,
            "seed": args.seed,
            "calibration_seed": args.calibration_seed,
            "snapshot_vectors": if args.cold { 0 } else { args.snapshot_vectors },
            "neighbours_per_query": args.neighbours,
            "budget_bytes": args.budget_mb << 20,
            "k": K,
            "edge_ef": args.edge_ef,
            "cloud_ef": cloud_ef,
            "deadline_ms": args.deadline_ms,
            "target_recall": args.target_recall,
            "calibration_margin": args.calibration_margin,
            "anchor_distance": args.anchor_distance,
            "push": "cloud defaults (tiervec_cloud::push::PushConfig): every anchor pushed when first asked, with its 20 nearest ids",
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
        certified_fraction: certified.len() as f64
            / outcomes
                .iter()
                .flatten()
                .filter(|o| o.source == "local")
                .count()
                .max(1) as f64,
        certified_answers: certified.len(),
        certified_not_exact: certified.iter().filter(|o| !o.exact).count(),
        warm_certified_fraction: second_half.iter().filter(|o| o.certified).count() as f64
            / second_half
                .iter()
                .filter(|o| o.source == "local")
                .count()
                .max(1) as f64,
        recall_at_10: mean(outcomes.iter().flatten().map(|o| o.recall)),
        hash_cache_hit_fraction: trace::hash_cache_hits(&reported),
        cloud_ef,
        cloud_recall_at_10: cloud_recall,
        max_distance: chosen.as_ref().map(|c| c.threshold),
        anchor_distance: f64::from(args.anchor_distance),
        predicted_local_fraction: predicted.as_ref().map(|p| p.local_fraction),
        predicted_recall_at_10: predicted.as_ref().map(|p| p.recall_at_10),
        warm_local_fraction: second_half.iter().filter(|o| o.source == "local").count() as f64
            / second_half.len().max(1) as f64,
        warm_recall_at_10: mean(second_half.iter().map(|o| o.recall)),
        hot_to_applied_p50_ms: to_ms(push_delay.quantile(0.5)),
        hot_to_applied_p99_ms: to_ms(push_delay.quantile(0.99)),
        applied_to_local_p50_ms: to_ms(first_use.quantile(0.5)),
        applied_to_local_p99_ms: to_ms(first_use.quantile(0.99)),
        pushed_bytes_per_edge: per_edge_counter("tiervec_edge_push_bytes_total"),
        shadow_recall_estimate: {
            let estimates: Vec<f64> = metrics
                .iter()
                .filter(|t| t.contains("tiervec_edge_shadow_recall "))
                .map(|t| prom::counter(t, "tiervec_edge_shadow_recall"))
                .collect();
            (!estimates.is_empty()).then(|| mean(estimates.into_iter()))
        },
        pushed_deltas: per_edge_counter("tiervec_edge_push_deltas_total"),
        compactions: per_edge_counter("tiervec_edge_compactions_total"),
        deletes: staleness.len(),
        staleness_p50_ms: pick(0.5),
        staleness_p99_ms: pick(0.99),
        staleness_max_ms: stale_ms.last().copied(),
        invalidation_ack_p50_ms: to_ms(invalidation_ack.quantile(0.5)),
        invalidation_ack_p99_ms: to_ms(invalidation_ack.quantile(0.99)),
        restore,
        timeline: timeline(&outcomes, (requests_per_edge / 20).max(1)),
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
        sweep: reported_sweep,
        warm_sweep,
        calibration_sweep: thin(&calibration_sweep, 60),
        seconds: started.elapsed().as_secs_f64(),
    };
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    write_docs(&args, &report, &outcomes)?;
    anyhow::ensure!(
        report.certified_not_exact == 0,
        "{} of {} certified answers were not the exact top-10 of the ground truth",
        report.certified_not_exact,
        report.certified_answers
    );
    Ok(())
}

/// Builds and writes each edge's snapshot (in parallel), for the cloud's collection identity
/// and with the cloud's LSNs.
fn build_snapshots(
    ds: &Dataset,
    texts: &[String],
    rows: &[Vec<usize>],
    paths: &[PathBuf],
    collection_id: tiervec_shared::CollectionId,
    lsns: &std::collections::HashMap<u64, u64>,
) -> anyhow::Result<()> {
    std::thread::scope(|s| -> anyhow::Result<()> {
        let jobs: Vec<_> = rows
            .iter()
            .zip(paths)
            .map(|(rows, path)| {
                let base = &ds.base;
                s.spawn(move || -> anyhow::Result<()> {
                    let bytes = snapshots::build_rows(
                        base,
                        rows,
                        HnswParams::default(),
                        Some(texts),
                        collection_id,
                        |row| lsns[&(row as u64)],
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
    })
}

/// Local fraction and recall per window of `window` requests of each edge, over all edges.
fn timeline(outcomes: &[Vec<Outcome>], window: usize) -> Vec<TimelinePoint> {
    let longest = outcomes.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest.div_ceil(window))
        .map(|w| {
            let range = w * window..((w + 1) * window).min(longest);
            let in_window: Vec<&Outcome> = outcomes
                .iter()
                .flat_map(|o| o.get(range.clone()).unwrap_or_default())
                .collect();
            TimelinePoint {
                requests_per_edge: range.end,
                local_fraction: in_window.iter().filter(|o| o.source == "local").count() as f64
                    / in_window.len().max(1) as f64,
                recall_at_10: mean(in_window.iter().map(|o| o.recall)),
            }
        })
        .collect()
}

/// What restoring a lost cache took (`restore_window`).
#[derive(Debug, Clone, Serialize)]
struct RestoreFigures {
    /// Vectors the edge held when it was killed.
    held_before: usize,
    /// Vectors in the snapshot the cloud streamed (the held ones the cloud had not deleted
    /// since, within the budget).
    restored_vectors: usize,
    snapshot_bytes: u64,
    /// From the restart of the edge process to the snapshot installed.
    seconds: f64,
}

/// Kills `edge` (SIGKILL), notes what its cache held, removes its snapshot and delta log as if
/// the disk had been lost, and starts it again: the cloud, which logged what the edge held,
/// restores the cache whole by a streamed snapshot. Waits (≤ 120 s) for the edge to report the
/// install, then reads the file.
async fn restore_window(
    http: &reqwest::Client,
    cloud: &deployment::Cloud,
    edge: &mut Edge,
    spec: &EdgeSpec<'_>,
) -> anyhow::Result<RestoreFigures> {
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    edge.process.kill();
    let files = CacheConfig::beside(spec.snapshot, spec.budget_bytes);
    let held_before = EdgeCache::open(files.clone())?.0.usage().0;
    for path in [&files.snapshot, &files.deltas] {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
    }
    let restarted = Instant::now();
    *edge = deployment::start_edge(cloud, spec)?;
    edge.wait_linked(http).await?;
    loop {
        edge.process.check_alive()?;
        let text = edge.metrics(http).await?;
        if prom::counter(&text, "tiervec_edge_snapshots_installed_total") >= 1.0 {
            break;
        }
        anyhow::ensure!(
            restarted.elapsed() < Duration::from_secs(120),
            "edge-0 was not restored within 120 s of its restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = restarted.elapsed().as_secs_f64();
    let index = tiervec_edge::EdgeIndex::open(spec.snapshot)?;
    Ok(RestoreFigures {
        held_before,
        restored_vectors: index.view().len(),
        snapshot_bytes: std::fs::metadata(spec.snapshot)?.len(),
        seconds,
    })
}

/// Deletes, one at a time, vectors the edges answered with locally, and polls each edge's
/// local answer (`local_only`) with the deleted vector itself until it is gone: the time from
/// the cloud acknowledging the delete to the edge no longer returning it, in ms.
async fn staleness_window(
    http: &reqwest::Client,
    cloud_base: &str,
    edges: &[Edge],
    ds: &Dataset,
    outcomes: &[Vec<Outcome>],
    deletes: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut victims: Vec<(usize, u64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Round-robin over the edges, most recent local answers first.
    let mut cursors: Vec<_> = outcomes.iter().map(|o| o.iter().rev()).collect();
    while victims.len() < deletes {
        let mut progressed = false;
        for (e, cursor) in cursors.iter_mut().enumerate() {
            if let Some(id) = cursor
                .by_ref()
                .find_map(|o| o.held.filter(|id| seen.insert(*id)))
            {
                victims.push((e, id));
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    victims.truncate(deletes);
    let local_ids = |v: serde_json::Value| -> anyhow::Result<Vec<u64>> {
        Ok(hits_of(&v)?.into_iter().map(|(id, _)| id).collect())
    };
    let mut windows = Vec::new();
    for (e, id) in victims {
        let url = edges[e].search_url();
        let mut vector = ds.base.row(id as usize).to_vec();
        tiervec_shared::metric::normalise(&mut vector);
        let probe = serde_json::json!({"vector": vector, "k": K, "local_only": true});
        let ask = || async {
            let v: serde_json::Value = http.post(&url).json(&probe).send().await?.json().await?;
            local_ids(v)
        };
        if !ask().await?.contains(&id) {
            continue; // evicted since: nothing to invalidate
        }
        http.post(format!(
            "{cloud_base}/v1/collections/{}/points/delete",
            deployment::COLLECTION
        ))
        .json(&serde_json::json!({"ids": [id]}))
        .send()
        .await?
        .error_for_status()?;
        let acknowledged = Instant::now();
        loop {
            if !ask().await?.contains(&id) {
                windows.push(acknowledged.elapsed().as_secs_f64() * 1e3);
                break;
            }
            anyhow::ensure!(
                acknowledged.elapsed() < Duration::from_secs(10),
                "edge-{e} still returns deleted vector {id} 10 s after the delete"
            );
        }
    }
    Ok(windows)
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

/// What the edge would answer locally for a request: its confidence signals (infinite when
/// absent) and the local answer's recall.
#[derive(Clone, Copy, Debug)]
struct LocalAnswer {
    kth_distance: f32,
    anchor_distance: f32,
    recall: f64,
}

/// A confidence rule swept over its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// The 10th local distance.
    Kth,
    /// The distance to the nearest anchor.
    Anchor,
    /// Either, at the same threshold.
    Combined,
}

impl Rule {
    const fn name(self) -> &'static str {
        match self {
            Rule::Kth => "kth_distance",
            Rule::Anchor => "anchor_distance",
            Rule::Combined => "combined",
        }
    }

    /// The signal the threshold applies to.
    fn signal(self, a: &LocalAnswer) -> f32 {
        match self {
            Rule::Kth => a.kth_distance,
            Rule::Anchor => a.anchor_distance,
            Rule::Combined => a.kth_distance.min(a.anchor_distance),
        }
    }
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
                anchor_distance: f32::INFINITY,
                recall: recall_at_10(&found, &t.ids, &t.distances),
            });
        }
    }
    Ok(out)
}

/// The rule's outcome at `threshold`: local when its signal is at most the threshold (with the
/// local recall), else the cloud's (with its measured recall).
fn predict(local: &[LocalAnswer], threshold: f64, cloud_recall: f64, rule: Rule) -> SweepPoint {
    let mut kept = 0usize;
    let mut recall = 0.0;
    for a in local {
        if f64::from(rule.signal(a)) <= threshold {
            kept += 1;
            recall += a.recall;
        } else {
            recall += cloud_recall;
        }
    }
    let n = local.len().max(1) as f64;
    SweepPoint {
        rule: rule.name(),
        threshold,
        local_fraction: kept as f64 / n,
        recall_at_10: recall / n,
    }
}

/// The trade-off at every distinct signal value (each is where the curve moves).
fn sweep(local: &[LocalAnswer], cloud_recall: f64, rule: Rule) -> Vec<SweepPoint> {
    let mut order: Vec<&LocalAnswer> = local.iter().collect();
    order.sort_by(|a, b| rule.signal(a).total_cmp(&rule.signal(b)));
    let n = local.len().max(1) as f64;
    let mut recall_sum: f64 = local.len() as f64 * cloud_recall;
    let mut points = vec![SweepPoint {
        rule: rule.name(),
        threshold: 0.0,
        local_fraction: 0.0,
        recall_at_10: recall_sum / n,
    }];
    for (i, a) in order.iter().enumerate() {
        recall_sum += a.recall - cloud_recall;
        let value = rule.signal(a);
        let last_of_its_value = order
            .get(i + 1)
            .is_none_or(|next| rule.signal(next) > value);
        if last_of_its_value && value.is_finite() {
            points.push(SweepPoint {
                rule: rule.name(),
                threshold: f64::from(value),
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
    probe_every: usize,
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
                let post = |body: serde_json::Value| {
                    let http = http.clone();
                    async move {
                        let sent = Instant::now();
                        let response = http
                            .post(url.as_str())
                            .header("content-type", "application/json")
                            .body(serde_json::to_vec(&body)?)
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
                        anyhow::Ok((v, latency))
                    }
                };
                let mut outcomes = Vec::with_capacity(reqs.len());
                for (i, (r, t)) in reqs.iter().zip(truths).enumerate() {
                    // What the cache alone would answer, just before (no side effect).
                    let probe = if i % probe_every == 0 {
                        let (p, _) = post(
                            serde_json::json!({"vector": r.vector, "k": K, "local_only": true}),
                        )
                        .await?;
                        let signal =
                            |name: &str| p[name].as_f64().map_or(f32::INFINITY, |d| d as f32);
                        Some(LocalAnswer {
                            kth_distance: signal("kth_distance"),
                            anchor_distance: signal("anchor_distance"),
                            recall: recall_at_10(&hits_of(&p)?, &t.ids, &t.distances),
                        })
                    } else {
                        None
                    };
                    let (v, latency) =
                        post(serde_json::json!({"vector": r.vector, "k": K})).await?;
                    let source = match v["source"].as_str() {
                        Some("local") => "local",
                        Some("cloud") => "cloud",
                        Some("degraded") => "degraded",
                        other => anyhow::bail!("unknown source {other:?}"),
                    };
                    let hits = hits_of(&v)?;
                    let recall = recall_at_10(&hits, &t.ids, &t.distances);
                    outcomes.push(Outcome {
                        source,
                        latency,
                        recall,
                        certified: v["certified"].as_bool() == Some(true),
                        exact: recall >= 1.0
                            && hits.len() == t.distances.len()
                            && hits
                                .iter()
                                .zip(&t.distances)
                                .all(|(h, d)| (h.1 - d).abs() <= 1e-5),
                        probe,
                        held: (source == "local")
                            .then(|| hits.first().map(|h| h.0))
                            .flatten(),
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
    let ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1}"));
    let rule = match r.max_distance {
        Some(max) => format!(
            "nearest anchor ≤ {:.3} over the snapshots and what is pushed on top (the 10th-distance rule calibrated on the snapshots as built, ≤ {max:.4}, is not used: this run's probes predict local {:.1} %, recall {:.4} for it)",
            r.anchor_distance,
            r.predicted_local_fraction.unwrap_or(0.0) * 100.0,
            r.predicted_recall_at_10.unwrap_or(0.0),
        ),
        None => format!(
            "nearest anchor ≤ {:.3}, caches empty at the start",
            r.anchor_distance
        ),
    };
    let mut md = format!(
        "{} requests through {} edges, {} errors. recall@10 {:.4}; local {:.1} %, cloud {:.1} %, degraded {:.1} %; \
         second half of the trace: local {:.1} % at recall@10 {:.4}. Rule: {rule}. \
         Cloud ef={} (its own recall@10 {:.4}). A cache keyed by a hash of the query vector would \
         have answered {:.1} % of the same trace.\n\n\
         Pushes (from the edges' histograms, bucket-interpolated): hot → applied p50 {} ms, p99 {} ms; \
         applied → first local answer p50 {} ms, p99 {} ms; {:.0} deltas and {:.1} MB pushed per edge, \
         {:.1} compactions per edge. Staleness after {} deletes of vectors the edges held: \
         p50 {} ms, p99 {} ms, max {} ms from the cloud's acknowledgement to the edge no longer returning it \
         (at the cloud, invalidation sent → acknowledged: p50 {} ms, p99 {} ms). \
         The edges' own estimate of local recall from shadow queries (2 % of local answers): {} \
         (against the cloud's answer; measured against exact ground truth above). \
         Certified answers: {} ({:.1} % of local answers; second half {:.1} %), of which {} \
         were not the exact top-10 of the ground truth. Restore: edge-0, killed with {} vectors \
         held and its cache files removed, got {} back in one streamed snapshot ({:.1} MB) \
         {:.2} s after its restart.\n\n",
        r.requests,
        r.per_edge.len(),
        r.errors,
        r.recall_at_10,
        r.local_fraction * 100.0,
        r.cloud_fraction * 100.0,
        r.degraded_fraction * 100.0,
        r.warm_local_fraction * 100.0,
        r.warm_recall_at_10,
        r.cloud_ef,
        r.cloud_recall_at_10,
        r.hash_cache_hit_fraction * 100.0,
        ms(r.hot_to_applied_p50_ms),
        ms(r.hot_to_applied_p99_ms),
        ms(r.applied_to_local_p50_ms),
        ms(r.applied_to_local_p99_ms),
        r.pushed_deltas,
        r.pushed_bytes_per_edge / 1e6,
        r.compactions,
        r.deletes,
        ms(r.staleness_p50_ms),
        ms(r.staleness_p99_ms),
        ms(r.staleness_max_ms),
        ms(r.invalidation_ack_p50_ms),
        ms(r.invalidation_ack_p99_ms),
        r.shadow_recall_estimate
            .map_or("–".to_owned(), |e| format!("{e:.4}")),
        r.certified_answers,
        r.certified_fraction * 100.0,
        r.warm_certified_fraction * 100.0,
        r.certified_not_exact,
        r.restore.held_before,
        r.restore.restored_vectors,
        r.restore.snapshot_bytes as f64 / 1e6,
        r.restore.seconds,
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
    md.push_str("\nEach rule's best local fraction at end-to-end recall@10 ≥ 0.95, measured on the caches as they evolved in this run (whole trace; second half):\n\n| rule | threshold | local | recall@10 |\n|---|---:|---:|---:|\n");
    for (rule, sweep) in [Rule::Kth, Rule::Anchor, Rule::Combined]
        .into_iter()
        .flat_map(|rule| [(rule, &r.sweep), (rule, &r.warm_sweep)])
    {
        if let Some(p) = sweep
            .iter()
            .filter(|p| p.rule == rule.name() && p.recall_at_10 >= 0.95)
            .max_by(|a, b| a.local_fraction.total_cmp(&b.local_fraction))
        {
            let part = if std::ptr::eq(sweep, &r.sweep) {
                ""
            } else {
                " (second half)"
            };
            md.push_str(&format!(
                "| {}{part} | {:.4} | {:.1} % | {:.4} |\n",
                p.rule,
                p.threshold,
                p.local_fraction * 100.0,
                p.recall_at_10
            ));
        }
    }
    md
}

/// The benchmarks.md section and file-name stem of a run: `demo`, `demo-cold`, with the Zipf
/// exponent when it is not 1.
fn stem(args: &DemoArgs) -> String {
    let mut stem = String::from("demo");
    if args.cold {
        stem.push_str("-cold");
    }
    if (args.zipf - 1.0).abs() > 1e-9 {
        stem.push_str(&format!("-zipf{}", args.zipf));
    }
    stem
}

fn write_docs(args: &DemoArgs, r: &Report, outcomes: &[Vec<Outcome>]) -> anyhow::Result<()> {
    let bench_dir = args.docs.join("bench");
    let stem = stem(args);
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
        &bench_dir.join(format!("{stem}-latency.svg")),
        &format!("{stem}: latency at the application's HTTP call, per source"),
        &per_source,
    )?;
    let (rule, chosen, x_desc) = match r.max_distance {
        Some(max) => (
            Rule::Kth,
            max,
            "threshold on the 10th local cosine distance",
        ),
        None => (
            Rule::Anchor,
            r.anchor_distance,
            "threshold on the cosine distance to the nearest anchor",
        ),
    };
    let reported: Vec<SweepPoint> = r
        .sweep
        .iter()
        .filter(|p| p.rule == rule.name())
        .cloned()
        .collect();
    plot::threshold_sweep(
        &bench_dir.join(format!("{stem}-threshold.svg")),
        &format!("{stem}: recall@10 and local fraction against the threshold"),
        x_desc,
        &reported,
        &r.calibration_sweep,
        chosen,
        (r.local_fraction, r.recall_at_10),
    )?;
    let line = |get: fn(&TimelinePoint) -> f64| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .map(|p| (p.requests_per_edge as f64, get(p)))
            .collect()
    };
    plot::over_trace(
        &bench_dir.join(format!("{stem}-warmup.svg")),
        &format!("{stem}: local fraction and recall@10 over the trace"),
        &[
            ("local fraction", line(|p| p.local_fraction)),
            ("recall@10", line(|p| p.recall_at_10)),
        ],
        Some(("recall target 0.95", 0.95)),
    )?;
    let mut flags = String::new();
    if args.quick {
        flags.push_str(" --quick");
    }
    if args.cold {
        flags.push_str(" --cold");
    }
    if (args.zipf - 1.0).abs() > 1e-9 {
        flags.push_str(&format!(" --zipf {}", args.zipf));
    }
    let section = format!(
        "## {stem}\n\nCommand: `cargo run --release -p tiervec-testbed -- demo{flags} --json target/{stem}.json` \
         ({} s end to end on this machine; the exact ground truth of both traces is cached in `{}`). \
         Cloud and 3 edges as real processes on loopback; {}. \
         Latencies here include queueing: the three edges and the three closed loops of the load \
         generator share core 0, so a request often waits for another edge's; `bench e2e` \
         measures one loop alone. Recall is against exact search over all 50,000 vectors.\n\n{}\n\
         ![local fraction over the trace](bench/{stem}-warmup.svg)\n\n\
         ![latency per source](bench/{stem}-latency.svg)\n\n![threshold trade-off](bench/{stem}-threshold.svg)\n",
        r.seconds.round(),
        args.work_dir.join("cache").display(),
        r.settings["processes"].as_str().unwrap_or(""),
        table(r)
    );
    update_benchmarks_md(&args.docs.join("benchmarks.md"), &stem, &section)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Vec<LocalAnswer> {
        [(0.1, 1.0), (0.2, 0.9), (0.2, 0.8), (0.5, 0.3)]
            .into_iter()
            .map(|(d, r)| LocalAnswer {
                kth_distance: d,
                anchor_distance: 1.0 - d,
                recall: r,
            })
            .collect()
    }

    #[test]
    fn the_sweep_matches_the_rule_at_every_threshold() {
        let local = answers();
        let points = sweep(&local, 0.99, Rule::Kth);
        assert_eq!(points.len(), 4, "0, and each distinct distance");
        assert_eq!(points[2].local_fraction, 0.75, "ties move together");
        for rule in [Rule::Kth, Rule::Anchor, Rule::Combined] {
            for p in sweep(&local, 0.99, rule) {
                let direct = predict(&local, p.threshold, 0.99, rule);
                assert!((direct.recall_at_10 - p.recall_at_10).abs() < 1e-12);
                assert!((direct.local_fraction - p.local_fraction).abs() < 1e-12);
                assert_eq!(p.rule, rule.name());
            }
        }
    }

    #[test]
    fn thinning_keeps_both_ends() {
        let local: Vec<LocalAnswer> = (0..500)
            .map(|i| LocalAnswer {
                kth_distance: i as f32,
                anchor_distance: f32::INFINITY,
                recall: 1.0,
            })
            .collect();
        let points = sweep(&local, 1.0, Rule::Kth);
        let thin = thin(&points, 10);
        assert_eq!(thin.len(), 10);
        assert_eq!(thin[0].threshold, points[0].threshold);
        assert_eq!(thin[9].threshold, points.last().unwrap().threshold);
    }
}
