//! `bench load`: many edges on one cloud. A real `tiervec-cloud serve` process with the 50,000
//! base vectors, and N edges (default 1,000) inside this process, each an `EdgeNode` with its
//! own certificate, its own QUIC endpoint and connection, and its own cache files, asking its
//! own few questions in a closed loop with think time, so the cloud answers them, learns what
//! each edge asks and pushes into every cache. Measured: the answers' latency per source, the
//! cloud's resident memory (sampled every second; its peak), the QUIC connections it holds
//! against its limits, how evenly the edges were served (fewest answers ÷ median), and how many
//! edges received a push.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_edge::node::{EdgeNode, NodeConfig, Source};
use tiervec_shared::confidence::ConfidenceRule;

use crate::dataset::Dataset;
use crate::deployment::{COLLECTION, Cloud, start_cloud};
use crate::measure::{Latencies, Machine, OutputArgs};
use crate::procs;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Edges connected at once (--quick: 100).
    #[arg(long, default_value_t = 1_000)]
    pub edges: usize,
    /// Seconds of load once every edge is connected (--quick: 15).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Each edge's pause between its questions, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub think_ms: u64,
    /// Distinct questions each edge asks (its share of the query set, repeated).
    #[arg(long, default_value_t = 4)]
    pub questions: usize,
    /// Each edge's cache budget in KiB.
    #[arg(long, default_value_t = 256)]
    pub budget_kib: u64,
    #[arg(long, default_value = "target/tiervec-bench/load")]
    pub work_dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct SourceRow {
    engine: &'static str,
    source: &'static str,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    qps: f64,
    answers: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<SourceRow>,
    edges: usize,
    connect_seconds: f64,
    answers: u64,
    errors: u64,
    answers_min_per_edge: u64,
    answers_median_per_edge: u64,
    min_over_median: f64,
    edges_with_push: usize,
    cloud_rss_peak_bytes: u64,
    cloud_rss_end_bytes: u64,
    cloud_quic_connections: f64,
    cloud_quic_connection_limit: usize,
    restart: Restart,
}

/// The fleet after a kill -9 and restart of the cloud: when each edge was connected again.
#[derive(Debug, Serialize)]
struct Restart {
    /// From the kill to the restarted cloud's `/readyz` 200 (recovered, log writable).
    ready_seconds: f64,
    /// Edges connected again within the bench's 60 s wait.
    reconnected: usize,
    /// Reconnection times, from the restarted cloud's readiness.
    p50_ms: f64,
    p99_ms: f64,
    last_ms: f64,
    /// The most edges that reconnected within any 100 ms (all of them at once would be a fleet
    /// in lockstep).
    busiest_100ms: usize,
}

/// What one edge saw.
#[derive(Default)]
struct EdgeStats {
    answers: u64,
    errors: u64,
    by_source: [Latencies; 3],
}

fn source_index(s: Source) -> usize {
    match s {
        Source::Local => 0,
        Source::Cloud => 1,
        Source::Degraded => 2,
    }
}

/// `VmRSS` of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    procs::memory_field(Some(pid), "VmRSS")
}

pub fn run(mut args: LoadArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.output.quick {
        args.edges = args.edges.min(100);
        args.seconds = args.seconds.min(15);
    }
    // Refused before any work: a --quick run into the recorded docs.
    args.output.docs_dir()?;
    procs::ensure_binaries()?;
    let ds = Dataset::load_default()?;
    let dir = args.work_dir.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let names: Vec<String> = (0..args.edges).map(|i| format!("edge-{i:04}")).collect();
    eprintln!("bench load: {} edges, {} s", args.edges, args.seconds);
    let mut cloud = start_cloud(&dir, &ds, &names)?;
    let cloud_pid = cloud.process.pid();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let http = reqwest::Client::new();
        cloud.wait_indexed(&http).await?;
        let node_config = NodeConfig {
            collection: COLLECTION.into(),
            // Local once a pushed anchor lies this close (the demo's order of magnitude).
            rule: ConfidenceRule {
                max_kth_distance: None,
                max_anchor_distance: Some(0.05),
            },
            lease: Duration::from_secs(30),
            deadline: Duration::from_millis(500),
            cloud_ef: 64,
            backoff: (Duration::from_millis(100), Duration::from_secs(2)),
            shadow_every: 0,
            target_recall: None,
            certify: false,
        };
        let t = Instant::now();
        let mut nodes = Vec::with_capacity(names.len());
        for name in &names {
            let snapshot = dir.join("edges").join(name).join("cache.tvs");
            std::fs::create_dir_all(snapshot.parent().expect("a folder"))?;
            let (cache, _) = EdgeCache::open(CacheConfig::beside(&snapshot, args.budget_kib << 10))
                .with_context(|| format!("opening {name}'s cache"))?;
            let node =
                EdgeNode::start(Arc::new(cache), node_config.clone(), Some(cloud.link(name)))?;
            nodes.push(Arc::new(node));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while nodes.iter().any(|n| !n.connected()) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} of {} edges not connected after 120 s",
                nodes.iter().filter(|n| !n.connected()).count(),
                nodes.len()
            );
            cloud.process.check_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let connect_seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "  {} edges connected in {connect_seconds:.1} s",
            nodes.len()
        );

        let stop = Arc::new(AtomicBool::new(false));
        let stats: Vec<Arc<Mutex<EdgeStats>>> = nodes.iter().map(|_| Arc::default()).collect();
        let mut tasks = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let (node, stats, stop) = (node.clone(), stats[i].clone(), stop.clone());
            let questions: Vec<Vec<f32>> = (0..args.questions)
                .map(|j| {
                    ds.queries
                        .row((i * args.questions + j) % ds.queries.rows())
                        .to_vec()
                })
                .collect();
            let think = Duration::from_millis(args.think_ms);
            tasks.push(tokio::spawn(async move {
                // Edges start spread over one think time, not in lockstep.
                tokio::time::sleep(think.mul_f64(i as f64 / 1_000.0 % 1.0)).await;
                let mut turn = 0;
                while !stop.load(Ordering::Relaxed) {
                    let q = &questions[turn % questions.len()];
                    turn += 1;
                    let asked = Instant::now();
                    let answer = node.search(q, 10, 64).await;
                    let took = asked.elapsed();
                    {
                        let mut s = stats.lock().expect("never held across a panic");
                        match answer {
                            Ok(a) => {
                                s.answers += 1;
                                s.by_source[source_index(a.source)].record(took);
                            }
                            Err(_) => s.errors += 1,
                        }
                    }
                    tokio::time::sleep(think).await;
                }
            }));
        }
        let load_started = Instant::now();
        let mut rss_peak = 0;
        while load_started.elapsed() < Duration::from_secs(args.seconds) {
            rss_peak = rss_peak.max(rss_bytes(cloud_pid));
            cloud.process.check_alive()?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await?;
        }
        let elapsed = load_started.elapsed().as_secs_f64();
        let rss_end = rss_bytes(cloud_pid);
        rss_peak = rss_peak.max(rss_end);
        let metrics = http
            .get(format!("{}/metrics", cloud.http_base))
            .send()
            .await?
            .text()
            .await?;
        let quic_connections = metrics
            .lines()
            .find(|l| l.starts_with("tiervec_quic_connections "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN);
        let edges_with_push = nodes.iter().filter(|n| n.cache().version() > 0).count();
        let restart = restart_and_reconnect(&mut cloud, &http, &nodes).await?;

        let mut merged: [Latencies; 3] = Default::default();
        let mut answers: Vec<u64> = Vec::new();
        let mut errors = 0;
        for s in &stats {
            let s = s.lock().expect("never held across a panic");
            answers.push(s.answers);
            errors += s.errors;
            for (m, l) in merged.iter_mut().zip(&s.by_source) {
                m.merge(l);
            }
        }
        answers.sort_unstable();
        let median = answers[answers.len() / 2];
        let rows = [Source::Local, Source::Cloud, Source::Degraded]
            .into_iter()
            .zip(&merged)
            .filter(|(_, l)| l.samples() > 0)
            .map(|(source, l)| SourceRow {
                engine: "tiervec",
                source: source.name(),
                p50_us: l.percentile_us(0.50),
                p99_us: l.percentile_us(0.99),
                p999_us: l.percentile_us(0.999),
                qps: l.samples() as f64 / elapsed,
                answers: l.samples(),
            })
            .collect();
        anyhow::Ok(Report {
            bench: "load",
            machine: Machine::detect(),
            settings: serde_json::json!({
                "edges": args.edges,
                "seconds": args.seconds,
                "think_ms": args.think_ms,
                "questions_per_edge": args.questions,
                "budget_kib": args.budget_kib,
                "k": 10,
                "ef": 64,
                "cloud_worker_threads": 1,
                "bench_worker_threads": 2,
                "quick": args.output.quick,
            }),
            rows,
            edges: args.edges,
            connect_seconds,
            answers: answers.iter().sum(),
            errors,
            answers_min_per_edge: answers[0],
            answers_median_per_edge: median,
            min_over_median: answers[0] as f64 / median.max(1) as f64,
            edges_with_push,
            cloud_rss_peak_bytes: rss_peak,
            cloud_rss_end_bytes: rss_end,
            cloud_quic_connections: quic_connections,
            cloud_quic_connection_limit: tiervec_cloud::quic::QuicLimits::default().max_connections,
            restart,
        })
    })?;
    eprintln!(
        "  {} answers ({} errors); per edge min {} / median {} ({:.2}); {} of {} edges pushed into; cloud RSS peak {:.0} MiB, {} QUIC connections",
        report.answers,
        report.errors,
        report.answers_min_per_edge,
        report.answers_median_per_edge,
        report.min_over_median,
        report.edges_with_push,
        report.edges,
        report.cloud_rss_peak_bytes as f64 / (1 << 20) as f64,
        report.cloud_quic_connections
    );
    for r in &report.rows {
        eprintln!(
            "  {:>8}: {} answers, p50 {:.0} µs, p99 {:.0} µs, {:.0} /s",
            r.source, r.answers, r.p50_us, r.p99_us, r.qps
        );
    }
    let r = &report.restart;
    eprintln!(
        "  cloud killed and restarted: ready after {:.1} s; {} of {} edges reconnected, after readiness p50 {:.0} ms, p99 {:.0} ms, last {:.0} ms; busiest 100 ms: {} reconnections",
        r.ready_seconds,
        r.reconnected,
        report.edges,
        r.p50_ms,
        r.p99_ms,
        r.last_ms,
        r.busiest_100ms
    );
    args.output.publish(&report, "load", section)?;
    eprintln!(
        "bench load done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut failures = Vec::new();
    if report.errors > 0 {
        failures.push(format!("{} searches failed", report.errors));
    }
    if report.min_over_median < 0.5 {
        failures.push(format!(
            "an edge was starved: fewest answers ÷ median {:.2} < 0.5",
            report.min_over_median
        ));
    }
    if report.edges_with_push < report.edges {
        failures.push(format!(
            "{} edges received no push",
            report.edges - report.edges_with_push
        ));
    }
    if report.restart.reconnected < report.edges {
        failures.push(format!(
            "{} edges did not reconnect after the cloud's restart",
            report.edges - report.restart.reconnected
        ));
    }
    anyhow::ensure!(failures.is_empty(), "bench load: {}", failures.join("; "));
    Ok(())
}

/// Kills the cloud (SIGKILL), restarts it on the same data and address, and records when each
/// edge is connected again; edges reconnect on their own, with jittered backoff.
async fn restart_and_reconnect(
    cloud: &mut Cloud,
    http: &reqwest::Client,
    nodes: &[Arc<EdgeNode>],
) -> anyhow::Result<Restart> {
    let killed = Instant::now();
    cloud.restart()?;
    let mut seen_down = vec![false; nodes.len()];
    let mut back: Vec<Option<Instant>> = vec![None; nodes.len()];
    let ready_url = format!("{}/readyz", cloud.http_base);
    let mut ready: Option<Instant> = None;
    let limit = Instant::now() + Duration::from_secs(60);
    while back.iter().any(Option::is_none) && Instant::now() < limit {
        let now = Instant::now();
        for (i, node) in nodes.iter().enumerate() {
            let up = node.connected();
            seen_down[i] |= !up;
            if up && seen_down[i] && back[i].is_none() {
                back[i] = Some(now);
            }
        }
        if ready.is_none()
            && http
                .get(&ready_url)
                .timeout(Duration::from_millis(200))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        {
            ready = Some(Instant::now());
        }
        cloud.process.check_alive()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = ready.context("the restarted cloud was not ready within 60 s")?;
    let mut after: Vec<f64> = back
        .iter()
        .flatten()
        .map(|t| t.saturating_duration_since(ready).as_secs_f64() * 1e3)
        .collect();
    after.sort_by(f64::total_cmp);
    let at = |q: f64| {
        after
            .get(((after.len() as f64 * q) as usize).min(after.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let busiest_100ms = after
        .iter()
        .enumerate()
        .map(|(i, t)| after[i..].partition_point(|u| *u < t + 100.0))
        .max()
        .unwrap_or(0);
    Ok(Restart {
        ready_seconds: ready.duration_since(killed).as_secs_f64(),
        reconnected: after.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        last_ms: after.last().copied().unwrap_or(f64::NAN),
        busiest_100ms,
    })
}

fn section(r: &Report, quick: &str) -> String {
    let rows: String = r
        .rows
        .iter()
        .map(|x| {
            format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                x.source, x.answers, x.p50_us, x.p99_us, x.p999_us, x.qps
            )
        })
        .collect();
    format!(
        "## bench load\n\n`cargo run --release -p tiervec-testbed -- bench load{quick} --json target/bench-load.json` \
         on {} ({} cores): one `tiervec-cloud serve` process (one tokio worker) with the 50,000 base vectors, and \
         {} edges in the bench's process (two tokio workers), each with its own certificate, QUIC endpoint, \
         connection and cache ({} KiB), asking its own {} questions in a loop with {} ms between them, for {} s \
         once all were connected ({:.1} s to connect them all). Latency at the edge's `search` (local answers, \
         cloud fallbacks, degraded answers past the 500 ms deadline):\n\n\
         | source | answers | p50 µs | p99 µs | p99.9 µs | per s |\n|---|---:|---:|---:|---:|---:|\n{rows}\n\
         Errors: {}. Answers per edge: fewest {}, median {} (fewest ÷ median {:.2}). Edges that received at least \
         one push: {} of {}. The cloud's resident memory: peak {:.0} MiB, at the end {:.0} MiB; QUIC connections \
         it held at the end: {} (limit {}).\n\n\
         Then the cloud was killed (SIGKILL) and restarted on the same data and address: ready after {:.1} s, \
         {} of {} edges connected again on their own (jittered exponential backoff, 100 ms to 2 s), after \
         readiness p50 {:.0} ms, p99 {:.0} ms, the last {:.0} ms; the most that reconnected within any 100 ms \
         was {}.\n",
        r.machine.cpu_model,
        r.machine.cpus,
        r.edges,
        r.settings["budget_kib"],
        r.settings["questions_per_edge"],
        r.settings["think_ms"],
        r.settings["seconds"],
        r.connect_seconds,
        r.errors,
        r.answers_min_per_edge,
        r.answers_median_per_edge,
        r.min_over_median,
        r.edges_with_push,
        r.edges,
        r.cloud_rss_peak_bytes as f64 / (1 << 20) as f64,
        r.cloud_rss_end_bytes as f64 / (1 << 20) as f64,
        r.cloud_quic_connections,
        r.cloud_quic_connection_limit,
        r.restart.ready_seconds,
        r.restart.reconnected,
        r.edges,
        r.restart.p50_ms,
        r.restart.p99_ms,
        r.restart.last_ms,
        r.restart.busiest_100ms,
    )
}
