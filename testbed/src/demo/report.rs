//! The demo's figures: the report (JSON and markdown) built from the replay's outcomes, and
//! the docs section with its plots.

use std::path::Path;

use serde::Serialize;

use super::calibration::{Rule, SweepPoint};
use super::questions::Asked;
use super::replay::Outcome;
use super::windows::RestoreFigures;
use crate::measure::{Latencies, Machine, update_benchmarks_md};
use crate::plot::{self, Series, SweepLines};

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

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub machine: Machine,
    pub settings: serde_json::Value,
    pub rows: Vec<SourceRow>,
    pub requests: u64,
    pub errors: u64,
    pub local_fraction: f64,
    pub cloud_fraction: f64,
    pub degraded_fraction: f64,
    /// Of the local answers, the share certified as the exact top-k.
    pub certified_fraction: f64,
    pub certified_answers: usize,
    /// Certified answers that were not the exact top-10 against the ground truth (must be 0).
    pub certified_not_exact: usize,
    pub warm_certified_fraction: f64,
    pub recall_at_10: f64,
    pub hash_cache_hit_fraction: f64,
    pub cloud_ef: usize,
    pub cloud_recall_at_10: f64,
    /// The k-th distance threshold (calibrated; none when cold).
    pub max_distance: Option<f64>,
    pub anchor_distance: f64,
    pub predicted_local_fraction: Option<f64>,
    pub predicted_recall_at_10: Option<f64>,
    /// Local fraction and recall over the second half of the trace.
    pub warm_local_fraction: f64,
    pub warm_recall_at_10: f64,
    pub hot_to_applied_p50_ms: Option<f64>,
    pub hot_to_applied_p99_ms: Option<f64>,
    pub applied_to_local_p50_ms: Option<f64>,
    pub applied_to_local_p99_ms: Option<f64>,
    pub pushed_bytes_per_edge: f64,
    /// The edges' own estimate of local recall from shadow queries (the share of the cloud's
    /// top-10 their local answers had), averaged over edges.
    pub shadow_recall_estimate: Option<f64>,
    pub pushed_deltas: f64,
    pub compactions: f64,
    pub deletes: usize,
    pub staleness_p50_ms: Option<f64>,
    pub staleness_p99_ms: Option<f64>,
    pub staleness_max_ms: Option<f64>,
    /// At the cloud: an invalidation sent → its acknowledgement (bucket-interpolated).
    pub invalidation_ack_p50_ms: Option<f64>,
    pub invalidation_ack_p99_ms: Option<f64>,
    /// Edge 0 restored whole after losing its cache files.
    pub restore: RestoreFigures,
    /// Local fraction and recall per window of requests (per edge).
    pub timeline: Vec<TimelinePoint>,
    pub per_edge: Vec<EdgeSummary>,
    pub sweep: Vec<SweepPoint>,
    /// The same over the second half of the trace (warm caches).
    pub warm_sweep: Vec<SweepPoint>,
    pub calibration_sweep: Vec<SweepPoint>,
    /// Three questions asked of edge 0 as text after the trace, with what it answered.
    pub questions: Vec<Asked>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub requests_per_edge: usize,
    pub local_fraction: f64,
    pub recall_at_10: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgeSummary {
    pub edge: usize,
    pub snapshot_vectors: usize,
    pub local_fraction: f64,
    pub recall_at_10: f64,
}

/// Local fraction and recall per window of `window` requests of each edge, over all edges.
pub fn timeline(outcomes: &[Vec<Outcome>], window: usize) -> Vec<TimelinePoint> {
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

/// The share of all requests answered by `source`.
pub fn fraction(outcomes: &[Vec<Outcome>], source: &str) -> f64 {
    let all: Vec<&Outcome> = outcomes.iter().flatten().collect();
    all.iter().filter(|o| o.source == source).count() as f64 / all.len().max(1) as f64
}

/// The mean of `values`, 0 when there are none.
pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// Share, recall and latency percentiles per source, and over all requests (`all`).
pub fn source_rows(outcomes: &[Vec<Outcome>]) -> Vec<SourceRow> {
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

/// The one line the demo's output opens with.
pub fn headline(r: &Report) -> String {
    let p50 = |source: &str| {
        r.rows
            .iter()
            .find(|row| row.source == source)
            .map_or("–".to_owned(), |row| format!("{:.0} µs", row.p50_us))
    };
    format!(
        "tiervec demo: {} questions through {} edges — {:.1} % answered on the edge (p50 {}), \
         {:.1} % by the cloud (p50 {}), {:.1} % degraded; recall@10 {:.3}; {} errors",
        r.requests,
        r.per_edge.len(),
        r.local_fraction * 100.0,
        p50("local"),
        r.cloud_fraction * 100.0,
        p50("cloud"),
        r.degraded_fraction * 100.0,
        r.recall_at_10,
        r.errors,
    )
}

/// The markdown of the run: its figures in prose, the per-source table, each rule's best point.
pub fn table(r: &Report) -> String {
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

/// How a run is named in docs: the section and file-name `stem`, the `flags` of its command
/// line, and where its ground truth is cached.
pub struct Recorded<'a> {
    pub stem: &'a str,
    pub flags: &'a str,
    pub cache_dir: &'a Path,
}

/// Writes the run's plots under `docs/bench` and its section of `docs/benchmarks.md`.
pub fn write_docs(
    docs: &Path,
    run: &Recorded<'_>,
    r: &Report,
    outcomes: &[Vec<Outcome>],
) -> anyhow::Result<()> {
    let bench_dir = docs.join("bench");
    let stem = run.stem;
    let mut per_source: Vec<Series<'_>> = Vec::new();
    for source in ["local", "cloud", "degraded"] {
        let lat: Latencies = outcomes
            .iter()
            .flatten()
            .filter(|o| o.source == source)
            .map(|o| o.latency)
            .collect();
        if lat.samples() > 0 {
            per_source.push((source, lat.cdf_points()));
        }
    }
    plot::latency_cdf(
        &bench_dir.join(format!("{stem}-latency.svg")),
        &format!("{stem}: latency at the application's HTTP call, per source"),
        &per_source,
    )?;
    // The rule the edges ran — the nearest anchor's distance, warm or cold — with the point
    // measured under it; the 10th-distance rule calibrated on the snapshots is reported in the
    // text, not drawn against points it did not produce.
    let (rule, chosen, x_desc) = (
        Rule::Anchor,
        r.anchor_distance,
        "threshold on the cosine distance to the nearest anchor",
    );
    let lines = |points: &mut dyn Iterator<Item = &SweepPoint>| {
        let mut lines = SweepLines::default();
        for p in points {
            lines.recall_at_10.push((p.threshold, p.recall_at_10));
            lines.local_fraction.push((p.threshold, p.local_fraction));
        }
        lines
    };
    plot::threshold_sweep(
        &bench_dir.join(format!("{stem}-threshold.svg")),
        &format!("{stem}: recall@10 and local fraction against the threshold"),
        x_desc,
        &lines(&mut r.sweep.iter().filter(|p| p.rule == rule.name())),
        &lines(&mut r.warm_sweep.iter().filter(|p| p.rule == rule.name())),
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
    let flags = run.flags;
    let section = format!(
        "## {stem}\n\n**{}**\n\nCommand: `cargo run --release -p tiervec-testbed -- demo{flags} --json target/{stem}.json` \
         ({} s end to end on this machine; the exact ground truth of both traces is cached in `{}`). \
         Cloud and 3 edges as real processes on loopback; {}. \
         Latencies here include queueing: the three edges and the three closed loops of the load \
         generator share core 0, so a request often waits for another edge's; `bench e2e` \
         measures one loop alone. Recall is against exact search over all 50,000 vectors.\n\n\
         ```text\n{}```\n\n{}\n\
         ![local fraction over the trace](bench/{stem}-warmup.svg)\n\n\
         ![latency per source](bench/{stem}-latency.svg)\n\n![threshold trade-off](bench/{stem}-threshold.svg)\n",
        headline(r),
        r.seconds.round(),
        run.cache_dir.display(),
        r.settings["processes"].as_str().unwrap_or(""),
        super::questions::render("edge-0", &r.questions),
        table(r)
    );
    Ok(update_benchmarks_md(
        &docs.join("benchmarks.md"),
        stem,
        &section,
    )?)
}
