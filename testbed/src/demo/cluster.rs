//! `tiervec-testbed demo --cluster`: the demo's trace against a cloud of three nodes on a
//! three-server NATS JetStream cluster (`docs/cluster.md`), all real processes on loopback —
//! the collection in three shards, two replicas each — while a steady writer writes through
//! every node and the cluster loses a node and a NATS server:
//!
//! 1. three `nats-server`s, three `tiervec-cloud` nodes; the dataset loaded over HTTP;
//! 2. the edges' snapshots (unless `--cold`), three edges whose cloud is node 0 with nodes 1
//!    and 2 to fail over to;
//! 3. the trace replayed through the edges while a writer upserts `--write-rate` points a
//!    second (far from every query, so the ground truth holds) round-robin over the nodes,
//!    recording each acknowledged write; at a third of the trace node 0 is killed (SIGKILL)
//!    and each edge is probed until it answers from another node (failover, timed from the
//!    kill); at half, one nats-server is killed; at two thirds both come back, node 0 from an
//!    empty data folder (catch-up, timed until `/readyz`);
//! 4. deletes of vectors the edges hold, issued at node 2 (which holds no edge's session),
//!    until each edge stops returning them (staleness);
//! 5. every acknowledged write checked on every node holding its shard.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde::Serialize;
use tiervec_cloud::certs::CertDir;
use tiervec_cloud::storage::shard_of;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_test_support::nats::NatsCluster;

use super::replay::{self, Outcome};
use super::report::{SourceRow, fraction, mean, source_rows};
use super::setup::{DemoArgs, build_snapshots, cache_rows, traces};
use crate::dataset::Dataset;
use crate::deployment::{self, COLLECTION, Cloud, ClusterSpec, Edge, EdgeSpec};
use crate::measure::prom::Exposition;
use crate::measure::{K, Latencies, Machine, update_benchmarks_md};
use crate::{procs, trace};

const NODES: usize = 3;
const SHARDS: u32 = 3;
const REPLICATION: usize = 2;

/// What `demo --cluster` reports (`--json`).
#[derive(Debug, Serialize)]
pub struct ClusterReport {
    pub bench: &'static str,
    pub machine: Machine,
    pub settings: serde_json::Value,
    pub rows: Vec<SourceRow>,
    pub cloud_nodes: usize,
    pub nats_servers: usize,
    pub requests: u64,
    /// Requests the edges answered with an error (the application got no answer).
    pub errors: u64,
    /// Answers a cloud node gave without some shard (its `tiervec_cluster_partial_answers_total`,
    /// summed over the nodes at the end; a killed node's count is lost with it).
    pub partial_answers: f64,
    pub write_rate: f64,
    pub acked_writes: usize,
    /// Acknowledged writes missing (or different) on a node holding their shard at the end.
    pub acked_writes_lost: usize,
    /// Write attempts a node refused or did not answer (retried at the next node).
    pub writes_refused: usize,
    pub failover_samples: usize,
    pub failover_p50_ms: Option<f64>,
    pub failover_p99_ms: Option<f64>,
    pub catch_up_seconds: f64,
    /// Points node 0 holds after its catch-up.
    pub catch_up_points: u64,
    pub deletes: u64,
    pub staleness_p50_ms: Option<f64>,
    pub staleness_p99_ms: Option<f64>,
    pub recall_at_10: f64,
    pub local_fraction: f64,
    pub cloud_fraction: f64,
    /// Degraded answers outside the kill windows (each kill until every edge answers from a
    /// live node again, and 10 s after the nats-server kill).
    pub degraded_fraction: f64,
    pub degraded_fraction_in_kill_windows: f64,
    /// The trace in ten equal spans of time: what each span's answers were.
    pub timeline: Vec<Span>,
    pub seconds: f64,
}

/// One tenth of the trace's time.
#[derive(Debug, Serialize)]
pub struct Span {
    pub from_s: f64,
    pub requests: usize,
    pub local_fraction: f64,
    pub degraded_fraction: f64,
    /// Recall@10 of the local answers in this span.
    pub local_recall_at_10: f64,
    /// Local answers certified exact, and of those the ones that were not the exact top-10.
    pub certified: usize,
    pub certified_not_exact: usize,
}

/// The outcomes in ten equal spans of the trace's time.
fn timeline(outcomes: &[Vec<Outcome>]) -> Vec<Span> {
    let all: Vec<&Outcome> = outcomes.iter().flatten().collect();
    let (Some(first), Some(last)) = (
        all.iter().map(|o| o.at).min(),
        all.iter().map(|o| o.at).max(),
    ) else {
        return Vec::new();
    };
    let width = (last - first).as_secs_f64() / 10.0;
    (0..10)
        .map(|i| {
            let span: Vec<&&Outcome> = all
                .iter()
                .filter(|o| {
                    let t = (o.at - first).as_secs_f64();
                    (t / width.max(1e-9)).floor().min(9.0) as usize == i
                })
                .collect();
            let local: Vec<f64> = span
                .iter()
                .filter(|o| o.source == "local")
                .map(|o| o.recall)
                .collect();
            let share = |source: &str| {
                span.iter().filter(|o| o.source == source).count() as f64 / span.len().max(1) as f64
            };
            Span {
                from_s: i as f64 * width,
                requests: span.len(),
                local_fraction: share("local"),
                degraded_fraction: share("degraded"),
                local_recall_at_10: mean(local.into_iter()),
                certified: span.iter().filter(|o| o.certified).count(),
                certified_not_exact: span.iter().filter(|o| o.certified && !o.exact).count(),
            }
        })
        .collect()
}

/// Runs the cluster demo (see the module's documentation).
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let docs = args.output.docs_dir()?.map(Path::to_owned);
    let requests_per_edge = args.requests.expect("set by the caller");
    let started = Instant::now();
    procs::ensure_binaries()?;
    let ds = Dataset::load_default()?;
    let texts = ds.base_texts()?;
    let run_dir = args.work_dir.join("cluster-run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    eprintln!(
        "demo --cluster: {} base vectors; {NODES} cloud nodes on 3 nats-servers, {SHARDS} shards × {REPLICATION} replicas; {} edges × {requests_per_edge} requests",
        ds.base.rows(),
        args.edges
    );

    // 1. NATS, certificates, the nodes, the corpus.
    let nats = NatsCluster::start(&run_dir.join("nats"), 3);
    let urls = nats.urls();
    let edge_names: Vec<String> = (0..args.edges).map(|e| format!("edge-{e}")).collect();
    let certs = CertDir {
        dir: run_dir.join("certs"),
        deployment: "tiervec-demo-cluster".into(),
    };
    certs.ensure_ca()?;
    certs.issue_server(&["localhost".into()])?;
    for name in &edge_names {
        certs.issue_edge(name)?;
    }
    let mut settings = vec![
        format!("cluster.replication={REPLICATION}"),
        "cluster.heartbeat_ms=500".into(),
        "cluster.node_timeout_ms=2000".into(),
    ];
    if args.peer_quic {
        for i in 0..NODES {
            certs.issue_node(&format!("node{i}"))?;
        }
        settings.extend([
            "cluster.peer_addr=\"127.0.0.1:0\"".into(),
            format!("cluster.peer_certs={:?}", certs.dir.to_string_lossy()),
        ]);
    }
    let quic: Vec<SocketAddr> = (0..NODES)
        .map(|_| Ok(format!("127.0.0.1:{}", procs::free_udp_port()?).parse()?))
        .collect::<anyhow::Result<_>>()?;
    let mut nodes: Vec<Cloud> = (0..NODES)
        .map(|i| {
            deployment::start_cluster_node(
                &run_dir.join(format!("node{i}")),
                &certs,
                &edge_names,
                &ClusterSpec {
                    nats: &urls,
                    node: &format!("node{i}"),
                    quic_addr: quic[i],
                    settings: settings.clone(),
                },
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let bases: Vec<String> = nodes.iter().map(|n| n.http_base.clone()).collect();
    let (load_rate, collection_id) = rt.block_on(async {
        for base in &bases {
            procs::wait_http_ok(&http, &format!("{base}/readyz"), Duration::from_secs(120)).await?;
        }
        // Placement spreads over every node once each has heard the others.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rate =
            deployment::load_over_http(&http, &bases, &ds, &texts, ds.base.rows(), SHARDS).await?;
        let id = nodes[0].collection_id(&http).await?;
        anyhow::Ok((rate, id))
    })?;
    eprintln!(
        "  loaded {} vectors over HTTP at {load_rate:.0} a second",
        ds.base.rows()
    );

    // 2. Traces and ground truth, snapshots, the cloud's ef.
    let (reported, reported_truth, calibration, calibration_truth) =
        traces(&args, &ds, requests_per_edge, &args.work_dir.join("cache"))?;
    let snapshot_paths: Vec<std::path::PathBuf> = (0..args.edges)
        .map(|e| run_dir.join(format!("edge-{e}.tvs")))
        .collect();
    if !args.cold {
        let orders = trace::popularity(args.edges, ds.queries.rows(), args.deployment_seed);
        let rows: Vec<Vec<usize>> = orders
            .iter()
            .map(|order| cache_rows(&ds, order, args.neighbours, args.snapshot_vectors))
            .collect();
        let ids: std::collections::HashSet<u64> =
            rows.iter().flatten().map(|&r| r as u64).collect();
        let lsns = rt.block_on(nodes[0].lsns(&http, ids))?;
        build_snapshots(&ds, &texts, &rows, &snapshot_paths, collection_id, &lsns)?;
    }
    rt.block_on(async {
        for node in &mut nodes {
            deployment::wait_indexed(&http, &node.http_base, &mut node.process).await?;
        }
        anyhow::Ok(())
    })?;
    let sample: Vec<(&trace::Request, &trace::Truth)> = calibration
        .iter()
        .flatten()
        .zip(calibration_truth.iter().flatten())
        .step_by((args.edges * requests_per_edge / 500).max(1))
        .collect();
    let vectors: Vec<&[f32]> = sample.iter().map(|(r, _)| r.vector.as_slice()).collect();
    let truths: Vec<(&[u64], &[f32])> = sample
        .iter()
        .map(|(_, t)| (t.ids.as_slice(), t.distances.as_slice()))
        .collect();
    let (cloud_ef, cloud_recall) = rt.block_on(nodes[0].pick_ef(&http, &vectors, &truths))?;
    eprintln!("  cloud ef={cloud_ef}: recall@10 {cloud_recall:.4} through node 0's fan-out");

    // 3. The edges: node 0 first, then 1 and 2.
    let rule = ConfidenceRule {
        max_kth_distance: None,
        max_anchor_distance: Some(args.anchor_distance),
    };
    let others = [quic[1], quic[2]];
    let spec = |e: usize| EdgeSpec {
        name: &edge_names[e],
        snapshot: &snapshot_paths[e],
        confidence: rule,
        budget_bytes: args.budget_mb << 20,
        edge_ef: args.edge_ef,
        cloud_ef,
        deadline_ms: args.deadline_ms.expect("set by the caller"),
        cpus: None,
        certify: !args.no_certify,
        wasm_guest: None,
        other_clouds: &others,
        model_dir: None,
    };
    let mut edges = Vec::new();
    for e in 0..args.edges {
        edges.push(deployment::start_edge(&nodes[0], &spec(e))?);
    }
    rt.block_on(async {
        for edge in &mut edges {
            edge.wait_linked(&http).await?;
        }
        anyhow::Ok(())
    })?;
    let edge_urls: Vec<String> = edges.iter().map(Edge::search_url).collect();

    // 4. The trace, the writer and the kills, together.
    let total = (args.edges * requests_per_edge) as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "  replay {bar:40} {pos}/{len} requests  {per_sec}  eta {eta}",
        )
        .expect("a valid progress template"),
    );
    let done = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Writes::default()));
    let bases = Arc::new(Mutex::new(bases));
    let nodes = Arc::new(Mutex::new(nodes));
    let nats = Arc::new(Mutex::new(nats));
    let (outcomes, chaos) = rt.block_on(async {
        let writer = tokio::spawn(write_steadily(
            http.clone(),
            bases.clone(),
            Arc::new(ds.base.clone()),
            args.write_rate,
            writes.clone(),
            done.clone(),
        ));
        let chaos = tokio::spawn(chaos(
            done.clone(),
            http.clone(),
            nodes.clone(),
            nats.clone(),
            bases.clone(),
            edge_urls.clone(),
            ds.base.dim,
            bar.clone(),
            total,
        ));
        let outcomes = replay::replay(
            &edge_urls,
            &reported,
            &reported_truth,
            args.probe_every.max(1),
            &bar,
        )
        .await;
        done.store(true, Ordering::Release);
        writer.await??;
        let chaos = chaos.await??;
        anyhow::Ok((outcomes?, chaos))
    })?;
    bar.finish_and_clear();

    // 5. Staleness: deletes at node 2, which holds no edge's session (they failed over to 1).
    let node2 = bases.lock()[2].clone();
    let staleness = rt.block_on(super::windows::staleness_window(
        &http,
        &node2,
        &edges,
        &ds,
        &outcomes,
        args.deletes,
    ))?;

    // 6. Every acknowledged write on every node holding its shard.
    let acked = std::mem::take(&mut writes.lock().acked);
    let refused = writes.lock().refused;
    let bases_now = bases.lock().clone();
    let (lost, partial_answers) = rt.block_on(async {
        let mut lost = 0;
        let mut partial = 0.0;
        for base in &bases_now {
            let d: serde_json::Value = http
                .get(format!("{base}/v1/collections/{COLLECTION}"))
                .send()
                .await?
                .json()
                .await?;
            let held: Vec<u32> = serde_json::from_value(d["shards_held"].clone())?;
            for (id, vector) in &acked {
                if !held.contains(&shard_of(*id, SHARDS)) {
                    continue;
                }
                // A node holding the shard reads its own copy.
                let r = http
                    .get(format!("{base}/v1/collections/{COLLECTION}/points/{id}"))
                    .send()
                    .await?;
                let same = if r.status().is_success() {
                    let p: serde_json::Value = r.json().await?;
                    let stored: Vec<f32> = serde_json::from_value(p["vector"].clone())?;
                    stored.len() == vector.len()
                        && stored
                            .iter()
                            .zip(vector)
                            .all(|(a, b)| (a - b).abs() <= 1e-6)
                } else {
                    false
                };
                if !same {
                    lost += 1;
                }
            }
            let metrics = http
                .get(format!("{base}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            partial += Exposition::parse(&metrics).counter("tiervec_cluster_partial_answers_total");
        }
        anyhow::Ok((lost, partial))
    })?;
    for edge in &mut edges {
        edge.process.check_alive()?;
    }
    drop(edges);
    drop(nodes);
    drop(nats);

    // 7. The figures.
    let in_window = |o: &Outcome| {
        chaos
            .windows
            .iter()
            .any(|(from, to)| o.at >= *from && o.at <= *to)
    };
    let outside: Vec<&Outcome> = outcomes
        .iter()
        .flatten()
        .filter(|o| !in_window(o))
        .collect();
    let inside: Vec<&Outcome> = outcomes.iter().flatten().filter(|o| in_window(o)).collect();
    let share = |set: &[&Outcome], source: &str| {
        set.iter().filter(|o| o.source == source).count() as f64 / set.len().max(1) as f64
    };
    let report = ClusterReport {
        bench: "demo_cluster",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "cold": args.cold,
            "edges": args.edges,
            "requests_per_edge": requests_per_edge,
            "seed": args.seed,
            "deployment_seed": args.deployment_seed,
            "snapshot_vectors": if args.cold { 0 } else { args.snapshot_vectors },
            "k": K, "edge_ef": args.edge_ef, "cloud_ef": cloud_ef, "deadline_ms": args.deadline_ms.expect("set by the caller"),
            "anchor_distance": args.anchor_distance,
            "shards": SHARDS, "replication": REPLICATION,
            "nats_server": "Debian nats-server 2.9.10, 3 servers, JetStream file storage, streams R3",
            "membership": "heartbeat 500 ms, node timeout 2 s, edge idle timeout 3 s",
            "between_nodes": if args.peer_quic { "direct QUIC, mutual TLS" } else { "NATS request/reply" },
            "edges_connect_to": "node 0, failing over to nodes 1 then 2",
            "kills": "node 0 SIGKILL at 1/3 of the trace, nats-server 0 SIGKILL at 1/2, both restarted at 2/3 (node 0 from an empty data folder)",
            "writer": "upserts of new ids (negated base vectors, far from every query) round-robin over the nodes, the next node on a refusal",
            "processes": "unpinned: every process on the same cores",
        }),
        rows: source_rows(&outcomes),
        cloud_nodes: NODES,
        nats_servers: 3,
        requests: outcomes.iter().map(|e| e.len() as u64).sum(),
        errors: outcomes
            .iter()
            .flatten()
            .filter(|o| o.source == "error")
            .count() as u64,
        partial_answers,
        write_rate: args.write_rate,
        acked_writes: acked.len(),
        acked_writes_lost: lost,
        writes_refused: refused,
        failover_samples: chaos.failover.samples() as usize,
        failover_p50_ms: chaos.failover.percentile_ms(0.5),
        failover_p99_ms: chaos.failover.percentile_ms(0.99),
        catch_up_seconds: chaos.catch_up_seconds,
        catch_up_points: chaos.catch_up_points,
        deletes: staleness.samples(),
        staleness_p50_ms: staleness.percentile_ms(0.5),
        staleness_p99_ms: staleness.percentile_ms(0.99),
        recall_at_10: mean(outcomes.iter().flatten().map(|o| o.recall)),
        local_fraction: fraction(&outcomes, "local"),
        cloud_fraction: fraction(&outcomes, "cloud"),
        degraded_fraction: share(&outside, "degraded"),
        degraded_fraction_in_kill_windows: share(&inside, "degraded"),
        timeline: timeline(&outcomes),
        seconds: started.elapsed().as_secs_f64(),
    };
    for span in &report.timeline {
        eprintln!(
            "  from {:>5.1} s: {} requests, local {:.3} at recall@10 {:.3}, degraded {:.3}, certified {} ({} not exact)",
            span.from_s,
            span.requests,
            span.local_fraction,
            span.local_recall_at_10,
            span.degraded_fraction,
            span.certified,
            span.certified_not_exact
        );
    }
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&report_summary(&report))?
    );
    args.output.write_json(&report)?;
    if let Some(docs) = &docs {
        write_docs(docs, &args, &report)?;
    }
    Ok(())
}

/// The report's headline figures (what the terminal shows).
fn report_summary(r: &ClusterReport) -> serde_json::Value {
    serde_json::json!({
        "requests": r.requests, "errors": r.errors, "partial_answers": r.partial_answers,
        "acked_writes": r.acked_writes, "acked_writes_lost": r.acked_writes_lost,
        "writes_refused": r.writes_refused,
        "failover_p50_ms": r.failover_p50_ms, "failover_p99_ms": r.failover_p99_ms,
        "catch_up_seconds": r.catch_up_seconds, "staleness_p99_ms": r.staleness_p99_ms,
        "recall_at_10": r.recall_at_10, "local_fraction": r.local_fraction,
        "degraded_fraction": r.degraded_fraction,
        "degraded_fraction_in_kill_windows": r.degraded_fraction_in_kill_windows,
    })
}

/// The acknowledged writes (id → vector) and the refused attempts.
#[derive(Default)]
struct Writes {
    acked: Vec<(u64, Vec<f32>)>,
    refused: usize,
}

/// Upserts `rate` new points a second, round-robin over the nodes (the next one after a
/// refusal), until `done`. The vectors are negated base vectors: far from every query (the
/// queries are close to the base), so the ground truth holds.
async fn write_steadily(
    http: reqwest::Client,
    bases: Arc<Mutex<Vec<String>>>,
    base: Arc<tiervec_shared::vecs::Matrix<f32>>,
    rate: f64,
    writes: Arc<Mutex<Writes>>,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    let mut n: u64 = 0;
    while !done.load(Ordering::Acquire) {
        ticks.tick().await;
        let id = 1_000_000 + n;
        let vector: Vec<f32> = base
            .row(n as usize % base.rows())
            .iter()
            .map(|x| -x)
            .collect();
        for attempt in 0..NODES as u64 {
            let target = bases.lock()[((n + attempt) % NODES as u64) as usize].clone();
            let sent = http
                .put(format!("{target}/v1/collections/{COLLECTION}/points"))
                .timeout(Duration::from_secs(10))
                .json(&serde_json::json!({"points": [{"id": id, "vector": vector}]}))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    writes.lock().acked.push((id, vector.clone()));
                    break;
                }
                _ => writes.lock().refused += 1,
            }
        }
        n += 1;
    }
    Ok(())
}

/// What the kills measured.
struct Chaos {
    failover: Latencies,
    catch_up_seconds: f64,
    catch_up_points: u64,
    /// The kill windows: (from, to).
    windows: Vec<(Instant, Instant)>,
}

/// Kills node 0 at a third of the trace and times each edge's failover, kills nats-server 0
/// at half, and restarts both at two thirds (node 0 from an empty data folder).
#[allow(clippy::too_many_arguments)]
async fn chaos(
    done: Arc<AtomicBool>,
    http: reqwest::Client,
    nodes: Arc<Mutex<Vec<Cloud>>>,
    nats: Arc<Mutex<NatsCluster>>,
    bases: Arc<Mutex<Vec<String>>>,
    edge_urls: Vec<String>,
    dim: usize,
    bar: ProgressBar,
    total: u64,
) -> anyhow::Result<Chaos> {
    // The trace reaching `fraction` (or ending first: the kills still happen, after it).
    let reach = |fraction: f64| {
        let (bar, done) = (bar.clone(), done.clone());
        async move {
            while (bar.position() as f64) < fraction * total as f64 && !done.load(Ordering::Acquire)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("  {} of {total} requests answered", bar.position());
        }
    };
    reach(1.0 / 3.0).await;
    nodes.lock()[0].process.kill();
    let killed = Instant::now();
    eprintln!("  node 0 killed (SIGKILL)");
    // Each edge asked something its cache cannot answer until the answer comes from a node.
    let far: Vec<f32> = (0..dim).map(|i| if i == 0 { -1.0 } else { 0.0 }).collect();
    let probes = edge_urls.iter().map(|url| {
        let (http, far) = (http.clone(), far.clone());
        async move {
            loop {
                let v: serde_json::Value = http
                    .post(url)
                    .json(&serde_json::json!({"vector": far, "k": K}))
                    .send()
                    .await?
                    .json()
                    .await?;
                if v["source"] == "cloud" {
                    return anyhow::Ok(killed.elapsed());
                }
                anyhow::ensure!(
                    killed.elapsed() < Duration::from_secs(60),
                    "{url} never failed over"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let mut failover = Latencies::new();
    let times = futures::future::try_join_all(probes).await?;
    for t in &times {
        failover.record(*t);
    }
    let mut windows = vec![(
        killed,
        killed + times.iter().max().copied().unwrap_or_default(),
    )];
    eprintln!(
        "  every edge answered from another node within {:?}",
        times.iter().max()
    );

    reach(0.5).await;
    nats.lock().servers[0].kill();
    let nats_killed = Instant::now();
    windows.push((nats_killed, nats_killed + Duration::from_secs(10)));
    eprintln!("  nats-server 0 killed (SIGKILL)");

    reach(2.0 / 3.0).await;
    nats.lock().servers[0].restart();
    let t = Instant::now();
    let base = tokio::task::spawn_blocking({
        let nodes = nodes.clone();
        move || {
            let mut nodes = nodes.lock();
            nodes[0].restart_empty()?;
            anyhow::Ok(nodes[0].http_base.clone())
        }
    })
    .await??;
    procs::wait_http_ok(&http, &format!("{base}/readyz"), Duration::from_secs(600))
        .await
        .context("node 0 never caught up")?;
    bases.lock()[0] = base.clone();
    // Its shards were placed elsewhere while it was gone: caught up once placement has given
    // it shards back and it announces them caught up, the set unchanged for a second (the
    // time of its last change is reported). How many it gets back is placement's choice, and
    // the points it holds change with the writer's writes, so neither can say when it is done.
    let mut last: Vec<u64> = Vec::new();
    let mut points = 0;
    let mut changed_at = Instant::now();
    let (catch_up_seconds, catch_up_points) = loop {
        let d: serde_json::Value = http
            .get(format!("{base}/v1/collections/{COLLECTION}"))
            .send()
            .await?
            .json()
            .await?;
        let held: Vec<u64> = serde_json::from_value(d["shards_held"].clone()).unwrap_or_default();
        if held != last {
            last = held;
            points = d["points"].as_u64().unwrap_or(0);
            changed_at = Instant::now();
        } else if !last.is_empty() && changed_at.elapsed() > Duration::from_secs(1) {
            break (changed_at.duration_since(t).as_secs_f64(), points);
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "node 0 never took its shards back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "  node 0 back from an empty folder, caught up with {catch_up_points} points in {catch_up_seconds:.1} s"
    );
    Ok(Chaos {
        failover,
        catch_up_seconds,
        catch_up_points,
        windows,
    })
}

fn write_docs(docs: &Path, args: &DemoArgs, r: &ClusterReport) -> anyhow::Result<()> {
    let md = format!(
        "## demo --cluster — the trace against three cloud nodes while one node and one nats-server die\n\n\
         Command: `cargo run --release -p tiervec-testbed -- demo --cluster{}{} --json target/demo-cluster.json`  \n\
         Machine: {} ({} cpus), every process unpinned on the same cores. {} cloud nodes on three \
         nats-servers (Debian 2.9.10, streams R3), the collection in {SHARDS} shards × {REPLICATION} replicas; \
         {} edges whose cloud is node 0, failing over to nodes 1 and 2; {} requests; a writer at {:.0} writes/s. \
         Node 0 killed (SIGKILL) at a third of the trace, nats-server 0 at half, both restarted at two \
         thirds (node 0 from an empty data folder).\n\n\
         | figure | value |\n|---|---:|\n\
         | requests / errors | {} / {} |\n\
         | partial answers (summed over the nodes' counters) | {} |\n\
         | acknowledged writes / lost / refused attempts | {} / {} / {} |\n\
         | failover p50 / p99 (kill → answer from another node; {} edges) | {} / {} ms |\n\
         | node 0 catch-up from empty ({} points) | {:.1} s |\n\
         | staleness p50 / p99 (deletes at node 2, {} samples) | {} / {} ms |\n\
         | recall@10 | {:.4} |\n\
         | local / cloud fraction | {:.3} / {:.3} |\n\
         | degraded fraction outside / inside the kill windows | {:.4} / {:.4} |\n",
        args.output.quick_flag(),
        if args.peer_quic { " --peer-quic" } else { "" },
        r.machine.cpu_model,
        r.machine.cpus,
        r.cloud_nodes,
        args.edges,
        r.requests,
        r.write_rate,
        r.requests,
        r.errors,
        r.partial_answers,
        r.acked_writes,
        r.acked_writes_lost,
        r.writes_refused,
        r.failover_samples,
        ms(r.failover_p50_ms),
        ms(r.failover_p99_ms),
        r.catch_up_points,
        r.catch_up_seconds,
        r.deletes,
        ms(r.staleness_p50_ms),
        ms(r.staleness_p99_ms),
        r.recall_at_10,
        r.local_fraction,
        r.cloud_fraction,
        r.degraded_fraction,
        r.degraded_fraction_in_kill_windows,
    );
    let section = if args.output.quick {
        "demo-cluster-quick"
    } else {
        "demo-cluster"
    };
    Ok(update_benchmarks_md(
        &docs.join("benchmarks.md"),
        section,
        &md,
    )?)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.0}"))
}
