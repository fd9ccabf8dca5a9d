//! `bench soak`: a crash soak. A real `tiervec-cloud serve` over the first 5,000 base vectors
//! and a real `tiervec-edge serve` linked to it over QUIC, a steady writer (upserts and deletes
//! of dataset vectors, one batch at a time) on the cloud's HTTP API and an application asking
//! the edge; each round `kill -9`s the cloud or the edge at a random moment, restarts it on the
//! same files and checks, with the writer stopped:
//! - the cloud: every acknowledged write there at its LSN with its vector and payload, every
//!   acknowledged delete absent, the one batch in flight at the kill applied whole or not at all,
//!   no phantom (a point no acknowledged or in-flight write made) and no duplicate (the live
//!   count equals the points found);
//! - the edge, once resynced and quiet: killed once more and its cache opened from its files,
//!   every vector it holds is live in the cloud at the same LSN (no tombstoned id, no stale
//!   version) — what it can answer locally is what the cloud holds.
//!
//! The edge must answer the application throughout (degraded while the cloud is down, never an
//! error). Figures: rounds, kills of each, writes acknowledged, recovery times, answers by
//! source, and every violation counted (the bench fails if one is not zero).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tiervec_cloud::client::{Client, ClientError};
use tiervec_cloud::http::PointIn;
use tiervec_edge::cache::{CacheConfig, EdgeCache};
use tiervec_shared::confidence::ConfidenceRule;

use crate::dataset::Dataset;
use crate::deployment::{COLLECTION, CloudSpec, Edge, EdgeSpec, start_cloud_with, start_edge};
use crate::measure::prom::Exposition;
use crate::measure::{Latencies, Machine, OutputArgs};
use crate::procs;

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Kill rounds (--quick: 5).
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// Points in the collection: the first this many base vectors (at most 5,000, so that each
    /// id has ten dataset vectors to be rewritten with).
    #[arg(long, default_value_t = 5_000)]
    pub points: usize,
    /// The writer's pause between batches, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub write_pause_ms: u64,
    /// Seed of the kill moments, victims and writes (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value = "target/tiervec-bench/soak")]
    pub work_dir: PathBuf,
}

const EDGE: &str = "edge-soak";
/// The edge's cache budget: a few hundred of the pushed vectors.
const EDGE_BUDGET_BYTES: u64 = 1 << 20;
/// Every fallback pushed to the edge as its own anchor at once, so it holds many points that
/// the writer then rewrites and deletes.
const PUSH_EVERYTHING: &str =
    "push={anchor_hot_count=1.0, anchor_merge_distance=0.0, period_ms=20, min_gap_ms=1}";

/// What the cloud must hold for an id, as far as acknowledgements say.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Live, written at `lsn` with payload version `version` (0: as loaded).
    Live { lsn: u64, version: u64 },
    /// Deleted; `at` is when the delete was acknowledged.
    Deleted { at: Instant },
}

#[derive(Debug, Clone)]
enum Op {
    Upsert { ids: Vec<u64>, version: u64 },
    Delete { ids: Vec<u64> },
}

#[derive(Default)]
struct Ledger {
    want: HashMap<u64, Want>,
    /// The batch sent whose answer never came (the writer sends one at a time).
    in_flight: Option<Op>,
    /// The payload version of the last upsert sent (0: the loaded points).
    last_version: u64,
    acked_writes: u64,
    refused_writes: u64,
}

#[derive(Debug, Default, Serialize)]
struct Violations {
    /// Acknowledged writes missing or older than acknowledged.
    lost: u64,
    /// Points present that no acknowledged or in-flight write made, or present after an
    /// acknowledged delete.
    phantoms: u64,
    /// Live count above the points found.
    duplicates: u64,
    /// In-flight batches found partly applied.
    half_applied: u64,
    /// Vectors the edge held after resync that the cloud has deleted.
    edge_tombstoned: u64,
    /// Vectors the edge held after resync at another LSN than the cloud's.
    edge_stale: u64,
    /// Edge answers that were HTTP errors (not degraded answers) while the edge ran.
    edge_errors: u64,
    /// Writes the cloud refused (not a dropped connection).
    writes_refused: u64,
}

impl Violations {
    fn total(&self) -> u64 {
        self.lost
            + self.phantoms
            + self.duplicates
            + self.half_applied
            + self.edge_tombstoned
            + self.edge_stale
            + self.edge_errors
            + self.writes_refused
    }
}

#[derive(Debug, Serialize)]
struct SourceRow {
    engine: &'static str,
    source: String,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    answers: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<SourceRow>,
    rounds: usize,
    cloud_kills: usize,
    edge_kills: usize,
    writes_acknowledged: u64,
    in_flight_at_kill: u64,
    in_flight_applied: u64,
    ids_checked_per_round: usize,
    edge_vectors_checked: u64,
    cloud_recovery_p50_ms: f64,
    cloud_recovery_max_ms: f64,
    edge_relink_p50_ms: f64,
    edge_relink_max_ms: f64,
    /// Local answers naming an id deleted over a second before the question (within that
    /// second an invalidation may still be on its way, and an edge restarted while deletes
    /// happened answers from its files until its resync).
    late_deleted_hits: u64,
    violations: Violations,
    seconds: f64,
}

/// The dataset row written for `id` at `version`: one of ten real texts' vectors, so that a
/// rewrite moves the point.
fn row_of(id: u64, version: u64, points: usize) -> usize {
    id as usize + points * (version % 10) as usize
}

pub fn run(mut args: SoakArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.output.quick {
        args.rounds = args.rounds.min(5);
    }
    anyhow::ensure!(
        (1..=5_000).contains(&args.points),
        "--points must be 1..=5000"
    );
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "bench soak: {} rounds over {} points, seed {seed}",
        args.rounds, args.points
    );
    // Refused before any work: a --quick run into the recorded docs.
    args.output.docs_dir()?;
    procs::ensure_binaries()?;
    let ds = Arc::new(Dataset::load_default()?);
    let dir = args.work_dir.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut cloud = start_cloud_with(
        &dir,
        &ds,
        &[EDGE.to_owned()],
        &CloudSpec {
            rows: Some(args.points),
            settings: vec![PUSH_EVERYTHING.into()],
        },
    )?;
    let snapshot = dir.join("edge").join("cache.tvs");
    std::fs::create_dir_all(snapshot.parent().context("a folder")?)?;
    let mut edge = start_edge(
        &cloud,
        &EdgeSpec {
            name: EDGE,
            snapshot: &snapshot,
            confidence: ConfidenceRule {
                max_kth_distance: None,
                max_anchor_distance: Some(0.05),
            },
            budget_bytes: EDGE_BUDGET_BYTES,
            edge_ef: 64,
            cloud_ef: 64,
            deadline_ms: 300,
            cpus: None,
            certify: false,
            wasm_guest: None,
            other_clouds: &[],
            model_dir: None,
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()?;
        cloud.wait_indexed(&http).await?;
        edge.wait_linked(&http).await?;
        let mut loaded = Ledger::default();
        let client = Client::new(&cloud.http_base, None);
        for id in 0..args.points as u64 {
            let p = client
                .point(COLLECTION, id)
                .await?
                .with_context(|| format!("loaded point {id} missing"))?;
            loaded.want.insert(id, Want::Live { lsn: p.lsn, version: 0 });
        }
        let ledger = Arc::new(Mutex::new(loaded));
        let mut violations = Violations::default();
        let mut by_source: HashMap<String, Latencies> = HashMap::new();
        let (mut cloud_kills, mut edge_kills) = (0, 0);
        let (mut in_flight_at_kill, mut in_flight_applied) = (0, 0);
        let mut edge_vectors_checked = 0;
        let mut late_deleted_hits = 0;
        let mut cloud_recovery = Latencies::default();
        let mut edge_relink = Latencies::default();
        for round in 0..args.rounds {
            let stop = Arc::new(AtomicBool::new(false));
            let writer = tokio::spawn(write_steadily(
                Client::new(&cloud.http_base, None),
                ledger.clone(),
                stop.clone(),
                args.points,
                ds.clone(),
                Duration::from_millis(args.write_pause_ms),
                rng.random(),
            ));
            let edge_killed = Arc::new(AtomicBool::new(false));
            let asker = tokio::spawn(ask_steadily(
                http.clone(),
                edge.search_url(),
                ds.clone(),
                ledger.clone(),
                stop.clone(),
                edge_killed.clone(),
                round,
            ));
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_500))).await;
            let kill_cloud = rng.random_bool(0.5);
            if kill_cloud {
                cloud.process.kill();
                cloud_kills += 1;
            } else {
                edge_killed.store(true, Ordering::Relaxed);
                edge.process.kill();
                edge_kills += 1;
            }
            // The edge keeps answering with its cloud dead; the writer keeps writing with the
            // edge dead.
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.store(true, Ordering::Relaxed);
            writer.await?;
            let asked = asker.await?;
            violations.edge_errors += asked.errors;
            late_deleted_hits += asked.late_deleted_hits;
            for (source, l) in asked.by_source {
                by_source.entry(source).or_default().merge(&l);
            }
            let connects = Exposition::parse(&edge.metrics(&http).await.unwrap_or_default())
                .counter("tiervec_edge_link_connects_total");
            let t = Instant::now();
            if kill_cloud {
                cloud.restart()?;
                procs::wait_http_ok(
                    &http,
                    &format!("{}/readyz", cloud.http_base),
                    Duration::from_secs(60),
                )
                .await?;
                cloud_recovery.record(t.elapsed());
            } else {
                edge.restart()?;
            }
            let t = Instant::now();
            edge.wait_linked(&http).await?;
            if kill_cloud {
                wait_reconnected(&http, &edge, connects).await?;
            }
            edge_relink.record(t.elapsed());

            let client = Client::new(&cloud.http_base, None);
            let mut l = std::mem::take(&mut *ledger.lock().expect("not poisoned"));
            if l.in_flight.is_some() {
                in_flight_at_kill += 1;
            }
            let found = read_all(&client, args.points).await?;
            in_flight_applied +=
                u64::from(judge(&mut l, &found, &ds, args.points, &mut violations)?);
            violations.writes_refused += std::mem::take(&mut l.refused_writes);
            let live_count = client.collection(COLLECTION).await?.points as u64;
            let present = found.values().filter(|p| p.is_some()).count() as u64;
            violations.duplicates += live_count.saturating_sub(present);
            violations.phantoms += present.saturating_sub(live_count);

            // The edge: once its link is up and no delta has come for a second, it holds what
            // its resync and the pushes since left; kill it then and read its files.
            wait_quiet(&http, &edge).await?;
            edge.process.kill();
            let (cache, _) = EdgeCache::open(CacheConfig::beside(&snapshot, EDGE_BUDGET_BYTES))
                .context("opening the edge's cache from its files")?;
            for held in cache.inventory().vectors {
                edge_vectors_checked += 1;
                match l.want.get(&held.id) {
                    Some(Want::Live { lsn, .. }) if *lsn == held.lsn => {}
                    Some(Want::Live { lsn, .. }) => {
                        violations.edge_stale += 1;
                        eprintln!(
                            "  round {round}: the edge holds {} at LSN {}, the cloud at {lsn}",
                            held.id, held.lsn
                        );
                    }
                    _ => {
                        violations.edge_tombstoned += 1;
                        eprintln!(
                            "  round {round}: the edge holds {} (LSN {}), deleted in the cloud",
                            held.id, held.lsn
                        );
                    }
                }
            }
            drop(cache);
            edge.restart()?;
            edge.wait_linked(&http).await?;
            *ledger.lock().expect("not poisoned") = l;
            if violations.total() > 0 || (round + 1) % 10 == 0 || round + 1 == args.rounds {
                eprintln!(
                    "  round {}/{}: {} writes acknowledged, {} cloud and {} edge kills, violations {}",
                    round + 1,
                    args.rounds,
                    ledger.lock().expect("not poisoned").acked_writes,
                    cloud_kills,
                    edge_kills,
                    violations.total()
                );
            }
        }
        let writes_acknowledged = ledger.lock().expect("not poisoned").acked_writes;
        let mut rows: Vec<SourceRow> = by_source
            .into_iter()
            .map(|(source, l)| SourceRow {
                engine: "tiervec",
                p50_us: l.percentile_us(0.50),
                p99_us: l.percentile_us(0.99),
                p999_us: l.percentile_us(0.999),
                answers: l.samples(),
                source,
            })
            .collect();
        rows.sort_by(|a, b| a.source.cmp(&b.source));
        anyhow::Ok(Report {
            bench: "soak",
            machine: Machine::detect(),
            settings: json!({
                "rounds": args.rounds,
                "points": args.points,
                "write_pause_ms": args.write_pause_ms,
                "seed": seed,
                "edge_budget_bytes": EDGE_BUDGET_BYTES,
                "edge_deadline_ms": 300,
                "quick": args.output.quick,
            }),
            rows,
            rounds: args.rounds,
            cloud_kills,
            edge_kills,
            writes_acknowledged,
            in_flight_at_kill,
            in_flight_applied,
            ids_checked_per_round: args.points,
            edge_vectors_checked,
            cloud_recovery_p50_ms: cloud_recovery.percentile_ms(0.5).unwrap_or(f64::NAN),
            cloud_recovery_max_ms: cloud_recovery.max_ms().unwrap_or(f64::NAN),
            edge_relink_p50_ms: edge_relink.percentile_ms(0.5).unwrap_or(f64::NAN),
            edge_relink_max_ms: edge_relink.max_ms().unwrap_or(f64::NAN),
            late_deleted_hits,
            violations,
            seconds: started.elapsed().as_secs_f64(),
        })
    })?;
    eprintln!(
        "  {} rounds ({} cloud kills, {} edge kills): {} writes acknowledged, {} batches in flight at a kill ({} applied), {} edge vectors checked; violations {:?}",
        report.rounds,
        report.cloud_kills,
        report.edge_kills,
        report.writes_acknowledged,
        report.in_flight_at_kill,
        report.in_flight_applied,
        report.edge_vectors_checked,
        report.violations
    );
    args.output.publish(&report, "soak", section)?;
    anyhow::ensure!(
        report.violations.total() == 0,
        "the soak found violations: {:?} (seed {seed}; files in {})",
        report.violations,
        dir.display()
    );
    eprintln!("bench soak done in {:.0} s", report.seconds);
    Ok(())
}

/// Writes one batch at a time until `stop` or until the cloud stops answering (killed): 60 %
/// upserts of 1–8 ids to a new version, 40 % deletes of 1–4 ids.
async fn write_steadily(
    client: Client,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    points: usize,
    ds: Arc<Dataset>,
    pause: Duration,
    seed: u64,
) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let op = {
            let mut l = ledger.lock().expect("not poisoned");
            let upsert = rng.random_bool(0.6);
            let mut ids: Vec<u64> = (0..rng.random_range(1..=if upsert { 8 } else { 4 }))
                .map(|_| rng.random_range(0..points as u64))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let op = if upsert {
                l.last_version += 1;
                Op::Upsert {
                    ids,
                    version: l.last_version,
                }
            } else {
                Op::Delete { ids }
            };
            l.in_flight = Some(op.clone());
            op
        };
        let sent = match &op {
            Op::Upsert { ids, version } => {
                let batch = ids
                    .iter()
                    .map(|&id| PointIn {
                        id,
                        vector: ds.base.row(row_of(id, *version, points)).to_vec(),
                        payload: serde_json::value::to_raw_value(&json!({ "v": version })).ok(),
                    })
                    .collect();
                client.upsert(COLLECTION, batch).await
            }
            Op::Delete { ids } => client.delete(COLLECTION, ids.clone()).await,
        };
        let cloud_gone = {
            let mut l = ledger.lock().expect("not poisoned");
            match sent {
                Ok(ack) => {
                    l.in_flight = None;
                    l.acked_writes += 1;
                    let now = Instant::now();
                    match op {
                        Op::Upsert { ids, version } => {
                            for id in ids {
                                l.want.insert(
                                    id,
                                    Want::Live {
                                        lsn: ack.lsn,
                                        version,
                                    },
                                );
                            }
                        }
                        Op::Delete { ids } => {
                            for id in ids {
                                l.want.insert(id, Want::Deleted { at: now });
                            }
                        }
                    }
                    false
                }
                Err(ClientError::Api {
                    status,
                    code,
                    message,
                }) => {
                    l.in_flight = None;
                    l.refused_writes += 1;
                    eprintln!("  write refused: {status} {code}: {message}");
                    false
                }
                // The cloud is gone: the batch stays in flight, judged after the restart.
                Err(ClientError::Transport(_)) => true,
            }
        };
        if cloud_gone {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}

#[derive(Default)]
struct Asked {
    errors: u64,
    late_deleted_hits: u64,
    by_source: HashMap<String, Latencies>,
}

/// Asks the edge the dataset's queries (a window of 200 that moves each round, so some repeat
/// and get pushed) until `stop`; once `edge_killed`, a failed request is the kill, not an error.
async fn ask_steadily(
    http: reqwest::Client,
    url: String,
    ds: Arc<Dataset>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    edge_killed: Arc<AtomicBool>,
    round: usize,
) -> Asked {
    let mut asked = Asked::default();
    let mut turn = 0;
    while !stop.load(Ordering::Relaxed) {
        let q = ds
            .queries
            .row((round * 20 + turn % 200) % ds.queries.rows());
        turn += 1;
        let t = Instant::now();
        let answer = http
            .post(&url)
            .json(&json!({ "vector": q, "k": 10 }))
            .send()
            .await;
        let response = match answer {
            Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
            Ok(r) => {
                asked.errors += 1;
                eprintln!("  edge answered {}", r.status());
                None
            }
            Err(_) if edge_killed.load(Ordering::Relaxed) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                asked.errors += 1;
                eprintln!("  edge request failed: {e}");
                None
            }
        };
        let took = t.elapsed();
        let Some(response) = response else { continue };
        let source = response["source"].as_str().unwrap_or("unknown").to_owned();
        asked
            .by_source
            .entry(source.clone())
            .or_default()
            .record(took);
        if source == "local" {
            let l = ledger.lock().expect("not poisoned");
            for hit in response["hits"].as_array().into_iter().flatten() {
                let id = hit["id"].as_u64().unwrap_or(u64::MAX);
                if let Some(Want::Deleted { at }) = l.want.get(&id)
                    && *at + Duration::from_secs(1) < t
                {
                    asked.late_deleted_hits += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    asked
}

/// Every id's stored point (`None`: absent), 32 requests at a time.
async fn read_all(
    client: &Client,
    points: usize,
) -> anyhow::Result<HashMap<u64, Option<tiervec_cloud::http::PointOut>>> {
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(0..points as u64)
        .map(|id| async move { anyhow::Ok((id, client.point(COLLECTION, id).await?)) })
        .buffer_unordered(32)
        .try_collect()
        .await
}

/// Settles the in-flight batch (applied whole, or not at all) into the ledger, then checks
/// every id against it. Returns whether the in-flight batch was applied.
fn judge(
    l: &mut Ledger,
    found: &HashMap<u64, Option<tiervec_cloud::http::PointOut>>,
    ds: &Dataset,
    points: usize,
    v: &mut Violations,
) -> anyhow::Result<bool> {
    let version_of = |p: &tiervec_cloud::http::PointOut| -> Option<u64> {
        let payload: serde_json::Value = serde_json::from_str(p.payload.as_ref()?.get()).ok()?;
        Some(payload["v"].as_u64().unwrap_or(0))
    };
    let mut applied = false;
    match l.in_flight.take() {
        Some(Op::Upsert { ids, version }) => {
            let showing: Vec<u64> = ids
                .iter()
                .filter_map(|id| {
                    found[id]
                        .as_ref()
                        .filter(|p| version_of(p) == Some(version))
                        .map(|p| p.lsn)
                })
                .collect();
            if !showing.is_empty() {
                applied = true;
                if showing.len() != ids.len() || showing.iter().any(|&x| x != showing[0]) {
                    v.half_applied += 1;
                    eprintln!("  upsert {ids:?} v{version} half applied: {showing:?}");
                }
                for id in ids {
                    l.want.insert(
                        id,
                        Want::Live {
                            lsn: showing[0],
                            version,
                        },
                    );
                }
            }
        }
        Some(Op::Delete { ids }) => {
            // Only ids live before the delete say whether it was applied.
            let live_before: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| matches!(l.want.get(id), Some(Want::Live { .. })))
                .collect();
            let gone = live_before.iter().filter(|id| found[id].is_none()).count();
            if gone > 0 {
                applied = true;
                if gone != live_before.len() {
                    v.half_applied += 1;
                    eprintln!("  delete {ids:?} half applied: {gone} of {live_before:?} gone");
                }
                let now = Instant::now();
                for id in ids {
                    l.want.insert(id, Want::Deleted { at: now });
                }
            }
        }
        None => {}
    }
    for id in 0..points as u64 {
        let want = l.want.get(&id).copied();
        match (want, &found[&id]) {
            (Some(Want::Live { lsn, version }), Some(p)) => {
                if p.lsn != lsn || version_of(p).is_some_and(|got| got != version) {
                    if p.lsn < lsn {
                        v.lost += 1;
                    } else {
                        v.phantoms += 1;
                    }
                    eprintln!(
                        "  id {id}: want LSN {lsn} v{version}, found LSN {} {:?}",
                        p.lsn,
                        p.payload.as_ref().map(|r| r.get())
                    );
                } else if version > 0 && p.vector != prepared(ds, row_of(id, version, points)) {
                    v.phantoms += 1;
                    eprintln!("  id {id}: LSN {lsn} holds another vector than v{version}'s");
                }
            }
            (Some(Want::Live { lsn, version }), None) => {
                v.lost += 1;
                eprintln!("  id {id}: acknowledged at LSN {lsn} (v{version}), missing");
            }
            (Some(Want::Deleted { .. }) | None, Some(p)) => {
                v.phantoms += 1;
                eprintln!("  id {id}: deleted, found at LSN {}", p.lsn);
            }
            (Some(Want::Deleted { .. }) | None, None) => {}
        }
    }
    Ok(applied)
}

/// A dataset row as the cosine collection stores it (normalised).
fn prepared(ds: &Dataset, row: usize) -> Vec<f32> {
    let mut v = ds.base.row(row).to_vec();
    tiervec_shared::Metric::Cosine.prepare(&mut v);
    v
}

/// Waits until the edge has connected more often than `connects` times (to the restarted
/// cloud, having noticed the old connection die).
async fn wait_reconnected(
    http: &reqwest::Client,
    edge: &Edge,
    connects: f64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = Exposition::parse(&edge.metrics(http).await?);
        if m.counter("tiervec_edge_link_connects_total") > connects
            && m.value("tiervec_edge_link_up", &[]) == Some(1.0)
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the edge did not reconnect to the restarted cloud within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the edge's link is up and no delta has arrived for a second.
async fn wait_quiet(http: &reqwest::Client, edge: &Edge) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (f64::NAN, Instant::now());
    loop {
        let m = Exposition::parse(&edge.metrics(http).await?);
        let deltas = m.counter("tiervec_edge_push_deltas_total");
        let up = m.value("tiervec_edge_link_up", &[]) == Some(1.0);
        if deltas != last.0 || !up {
            last = (deltas, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the edge did not settle within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn section(r: &Report, quick: &str) -> String {
    let rows: String = r
        .rows
        .iter()
        .map(|x| {
            format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} |\n",
                x.source, x.answers, x.p50_us, x.p99_us, x.p999_us
            )
        })
        .collect();
    let v = &r.violations;
    format!(
        "## bench soak\n\n`cargo run --release -p tiervec-testbed -- bench soak{quick} --json target/bench-soak.json` \
         on {} ({} cores), seed {}: a `tiervec-cloud serve` over the first {} base vectors and a `tiervec-edge serve` \
         linked to it, a steady writer (one batch at a time: upserts of 1–8 ids to another dataset vector, deletes \
         of 1–4) and an application asking the edge; {} rounds, each a `kill -9` at a random moment ({} of the \
         cloud, {} of the edge), a restart on the same files, and then the checks with the writer stopped. \
         {} writes acknowledged; {} batches were in flight at a kill, {} of them found applied (whole). Every round \
         reads all {} ids back; after each, the edge, once resynced and quiet, is killed again and its cache opened \
         from its files: {} held vectors checked against the cloud over the run.\n\n\
         | violation | count |\n|---|---:|\n\
         | acknowledged write lost | {} |\n| phantom | {} |\n| duplicate | {} |\n| batch half applied | {} |\n\
         | edge holds a deleted id after resync | {} |\n| edge holds a stale version after resync | {} |\n\
         | edge answered an error | {} |\n| write refused | {} |\n\n\
         Cloud restart to `/readyz`: p50 {:.0} ms, max {:.0} ms; edge restart (or cloud restart) to the link up: \
         p50 {:.0} ms, max {:.0} ms. Local answers naming an id deleted over a second earlier (an edge restarted \
         while deletes happened answers from its files until its resync): {}. The edge's answers over the run \
         (HTTP, at the application):\n\n\
         | source | answers | p50 µs | p99 µs | p99.9 µs |\n|---|---:|---:|---:|---:|\n{rows}",
        r.machine.cpu_model,
        r.machine.cpus,
        r.settings["seed"],
        r.settings["points"],
        r.rounds,
        r.cloud_kills,
        r.edge_kills,
        r.writes_acknowledged,
        r.in_flight_at_kill,
        r.in_flight_applied,
        r.ids_checked_per_round,
        r.edge_vectors_checked,
        v.lost,
        v.phantoms,
        v.duplicates,
        v.half_applied,
        v.edge_tombstoned,
        v.edge_stale,
        v.edge_errors,
        v.writes_refused,
        r.cloud_recovery_p50_ms,
        r.cloud_recovery_max_ms,
        r.edge_relink_p50_ms,
        r.edge_relink_max_ms,
        r.late_deleted_hits,
    )
}
