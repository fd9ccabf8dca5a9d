//! `bench faults`: the edge–cloud link under network faults, between real processes. A
//! `tiervec-cloud serve` over the first 5,000 base vectors, a `tiervec-edge serve` that reaches
//! it through a UDP relay in this process ([`crate::relay`]), and an application asking the edge
//! in a closed loop, through phases: a clean link; delay with jitter (reordering) and 2 % loss;
//! 30 % loss; a partition; the link healed; the cloud killed and restarted behind a delayed
//! link. Every answer must be an answer (from the cache, the cloud or degraded) — never an
//! error; after the partition heals and after the restart the edge must reconnect by itself
//! and its cloud answers resume; its resident memory must stay bounded while the application
//! keeps asking into a partition.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tiervec_shared::confidence::ConfidenceRule;

use crate::dataset::Dataset;
use crate::deployment::{CloudSpec, EdgeSpec, start_cloud_with, start_edge_via};
use crate::measure::prom::Exposition;
use crate::measure::{Latencies, Machine, OutputArgs};
use crate::procs;
use crate::relay::{Faults, Relay};

#[derive(clap::Args, Debug, Clone)]
pub struct FaultsArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Seconds of each phase (--quick: 4).
    #[arg(long, default_value_t = 15)]
    pub phase_seconds: u64,
    /// Concurrent application requests to the edge.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    #[arg(long, default_value = "target/tiervec-bench/faults")]
    pub work_dir: PathBuf,
}

const EDGE: &str = "edge-faults";
const POINTS: usize = 5_000;
const DEADLINE_MS: u64 = 200;

#[derive(Debug, Serialize)]
struct PhaseRow {
    phase: &'static str,
    delay_ms: u64,
    jitter_ms: u64,
    loss: f64,
    partitioned: bool,
    answers: u64,
    errors: u64,
    local: u64,
    cloud: u64,
    degraded: u64,
    p50_us: f64,
    p99_us: f64,
    /// From the phase's start (in the restart phase, the cloud's restart) to the first cloud
    /// answer to a question asked after it (`None`: none came).
    first_cloud_answer_ms: Option<f64>,
    edge_rss_max_bytes: u64,
    datagrams_dropped: u64,
    link_connects: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<PhaseRow>,
    errors: u64,
    edge_rss_start_bytes: u64,
    edge_rss_max_bytes: u64,
}

/// What the application saw in one phase.
#[derive(Default)]
struct Seen {
    answers: u64,
    errors: u64,
    by_source: [u64; 3],
    latency: Latencies,
    first_cloud: Option<Duration>,
}

pub fn run(mut args: FaultsArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.output.quick {
        args.phase_seconds = args.phase_seconds.min(4);
    }
    // Refused before any work: a --quick run into the recorded docs.
    args.output.docs_dir()?;
    procs::ensure_binaries()?;
    let ds = Arc::new(Dataset::load_default()?);
    let dir = args.work_dir.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "bench faults: phases of {} s, {} clients",
        args.phase_seconds, args.clients
    );
    let mut cloud = start_cloud_with(
        &dir,
        &ds,
        &[EDGE.to_owned()],
        &CloudSpec {
            rows: Some(POINTS),
            settings: vec![],
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        cloud.wait_indexed(&http).await?;
        let relay = Relay::start(cloud.quic_addr).await?;
        let snapshot = dir.join("edge").join("cache.tvs");
        std::fs::create_dir_all(snapshot.parent().context("a folder")?)?;
        let mut edge = start_edge_via(
            &cloud,
            &EdgeSpec {
                name: EDGE,
                snapshot: &snapshot,
                // Nothing is confident: every question goes to the cloud while it is reachable.
                confidence: ConfidenceRule {
                    max_kth_distance: None,
                    max_anchor_distance: None,
                },
                budget_bytes: 1 << 20,
                edge_ef: 64,
                cloud_ef: 64,
                deadline_ms: DEADLINE_MS,
                cpus: None,
                certify: false,
                wasm_guest: None,
                other_clouds: &[],
                model_dir: None,
            },
            relay.addr(),
        )?;
        edge.wait_linked(&http).await?;
        let edge_pid = edge.process.pid();
        let rss_start = procs::memory_field(Some(edge_pid), "VmRSS");
        let ms = Duration::from_millis;
        let phases: [(&str, Faults); 8] = [
            ("clean", Faults::default()),
            (
                "delay 20 ms",
                Faults {
                    delay: ms(20),
                    ..Faults::default()
                },
            ),
            (
                "delay 20 ms + jitter 20 ms (reordering)",
                Faults {
                    delay: ms(20),
                    jitter: ms(20),
                    ..Faults::default()
                },
            ),
            (
                "delay 20 ms, 2 % loss",
                Faults {
                    delay: ms(20),
                    loss: 0.02,
                    ..Faults::default()
                },
            ),
            (
                "30 % loss",
                Faults {
                    loss: 0.3,
                    ..Faults::default()
                },
            ),
            (
                "partition",
                Faults {
                    partitioned: true,
                    ..Faults::default()
                },
            ),
            ("healed", Faults::default()),
            (
                "cloud killed and restarted, delay 10 ms",
                Faults {
                    delay: ms(10),
                    ..Faults::default()
                },
            ),
        ];
        let mut rows = Vec::new();
        let mut query_offset = 0;
        for (phase, faults) in phases {
            relay.set(faults);
            let (_, dropped_before) = relay.counts();
            let connects_before = Exposition::parse(&edge.metrics(&http).await?)
                .counter("tiervec_edge_link_connects_total");
            let phase_started = Instant::now();
            // First cloud answers count from here: the phase's start, or the cloud's restart.
            let since = Arc::new(Mutex::new(phase_started));
            let stop = Arc::new(AtomicBool::new(false));
            let askers: Vec<_> = (0..args.clients)
                .map(|c| {
                    tokio::spawn(ask(
                        http.clone(),
                        edge.search_url(),
                        ds.clone(),
                        query_offset + c * 100_000,
                        args.clients,
                        since.clone(),
                        stop.clone(),
                    ))
                })
                .collect();
            query_offset += 1_000;
            let mut rss_max = 0;
            let phase_length = Duration::from_secs(args.phase_seconds);
            if phase.starts_with("cloud killed") {
                tokio::time::sleep(phase_length / 4).await;
                cloud.process.kill();
                tokio::time::sleep(phase_length / 4).await;
                *since.lock().expect("never held across a panic") = Instant::now();
                cloud.restart()?;
            }
            while phase_started.elapsed() < phase_length {
                rss_max = rss_max.max(procs::memory_field(Some(edge_pid), "VmRSS"));
                edge.process.check_alive()?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.store(true, Ordering::Relaxed);
            let mut seen = Seen::default();
            for a in askers {
                let s = a.await?;
                seen.answers += s.answers;
                seen.errors += s.errors;
                for (t, x) in seen.by_source.iter_mut().zip(s.by_source) {
                    *t += x;
                }
                seen.latency.merge(&s.latency);
                seen.first_cloud = match (seen.first_cloud, s.first_cloud) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let connects = Exposition::parse(&edge.metrics(&http).await?)
                .counter("tiervec_edge_link_connects_total");
            let row = PhaseRow {
                phase,
                delay_ms: faults.delay.as_millis() as u64,
                jitter_ms: faults.jitter.as_millis() as u64,
                loss: faults.loss,
                partitioned: faults.partitioned,
                answers: seen.answers,
                errors: seen.errors,
                local: seen.by_source[0],
                cloud: seen.by_source[1],
                degraded: seen.by_source[2],
                p50_us: seen.latency.percentile_us(0.50),
                p99_us: seen.latency.percentile_us(0.99),
                first_cloud_answer_ms: seen.first_cloud.map(|d| d.as_secs_f64() * 1e3),
                edge_rss_max_bytes: rss_max,
                datagrams_dropped: relay.counts().1 - dropped_before,
                link_connects: connects - connects_before,
            };
            eprintln!(
                "  {phase}: {} answers ({} local, {} cloud, {} degraded), {} errors, p50 {:.0} µs, p99 {:.0} µs, first cloud answer {}, {} reconnections, edge RSS max {:.1} MiB",
                row.answers,
                row.local,
                row.cloud,
                row.degraded,
                row.errors,
                row.p50_us,
                row.p99_us,
                row.first_cloud_answer_ms
                    .map_or("none".into(), |ms| format!("after {ms:.0} ms")),
                row.link_connects,
                rss_max as f64 / f64::from(1 << 20)
            );
            rows.push(row);
        }
        let errors = rows.iter().map(|r| r.errors).sum();
        let edge_rss_max_bytes = rows.iter().map(|r| r.edge_rss_max_bytes).max().unwrap_or(0);
        anyhow::Ok(Report {
            bench: "faults",
            machine: Machine::detect(),
            settings: json!({
                "phase_seconds": args.phase_seconds,
                "clients": args.clients,
                "points": POINTS,
                "edge_deadline_ms": DEADLINE_MS,
                "quick": args.output.quick,
            }),
            rows,
            errors,
            edge_rss_start_bytes: rss_start,
            edge_rss_max_bytes,
        })
    })?;
    args.output.publish(&report, "faults", section)?;
    let phase = |name: &str| {
        report
            .rows
            .iter()
            .find(|r| r.phase.starts_with(name))
            .expect("every phase has a row")
    };
    let (healed, restarted) = (phase("healed"), phase("cloud killed"));
    anyhow::ensure!(
        report.errors == 0,
        "the edge answered {} requests with an error",
        report.errors
    );
    anyhow::ensure!(
        healed.cloud > 0 && restarted.cloud > 0,
        "the edge did not get back to the cloud (cloud answers after the partition: {}, after the restart: {})",
        healed.cloud,
        restarted.cloud
    );
    eprintln!(
        "bench faults done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One application client: asks the edge in a closed loop until `stop`.
async fn ask(
    http: reqwest::Client,
    url: String,
    ds: Arc<Dataset>,
    first: usize,
    stride: usize,
    since: Arc<Mutex<Instant>>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        let q = ds.queries.row(i % ds.queries.rows());
        i += stride;
        let t = Instant::now();
        let answer = http
            .post(&url)
            .json(&json!({ "vector": q, "k": 10 }))
            .send()
            .await;
        let body = match answer {
            Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
            _ => None,
        };
        let Some(body) = body else {
            seen.errors += 1;
            continue;
        };
        seen.latency.record(t.elapsed());
        seen.answers += 1;
        let source = match body["source"].as_str() {
            Some("local") => 0,
            Some("cloud") => 1,
            _ => 2,
        };
        seen.by_source[source] += 1;
        let since = *since.lock().expect("never held across a panic");
        if source == 1 && seen.first_cloud.is_none() && t >= since {
            seen.first_cloud = Some(since.elapsed());
        }
    }
    seen
}

fn section(r: &Report, quick: &str) -> String {
    let rows: String = r
        .rows
        .iter()
        .map(|x| {
            format!(
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {:.1} |\n",
                x.phase,
                x.answers,
                x.errors,
                x.cloud,
                x.degraded,
                x.local,
                x.p50_us,
                x.p99_us,
                x.first_cloud_answer_ms
                    .map_or("none".into(), |ms| format!("{ms:.0}")),
                x.link_connects,
                x.edge_rss_max_bytes as f64 / f64::from(1 << 20),
            )
        })
        .collect();
    format!(
        "## bench faults\n\n`cargo run --release -p tiervec-testbed -- bench faults{quick} --json target/bench-faults.json` \
         on {} ({} cores): a `tiervec-cloud serve` over the first {} base vectors, a `tiervec-edge serve` reaching it \
         through a UDP relay that delays (with jitter, a draw per datagram, so they reorder), drops or partitions, and {} \
         application clients asking the edge in a closed loop ({} ms fallback deadline; nothing is confident \
         locally, so every answer is the cloud's or degraded), {} s per phase. Latency at the application's HTTP \
         call; the first cloud answer is counted from the phase's start (in the last phase, from the cloud's \
         restart, a quarter of the phase after its kill); reconnections are the edge's \
         `tiervec_edge_link_connects_total` during the phase; the edge's \
         resident memory was {:.1} MiB before the first phase.\n\n\
         | phase | answers | errors | cloud | degraded | local | p50 µs | p99 µs | first cloud answer ms | reconnections | edge RSS max MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}",
        r.machine.cpu_model,
        r.machine.cpus,
        r.settings["points"],
        r.settings["clients"],
        r.settings["edge_deadline_ms"],
        r.settings["phase_seconds"],
        r.edge_rss_start_bytes as f64 / f64::from(1 << 20),
    )
}
