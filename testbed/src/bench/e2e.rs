//! `tiervec-testbed bench e2e`: the fallback path, end to end, on the 50,000-vector corpus.
//!
//! Real processes on loopback: `tiervec-cloud` (taskset core 1, one tokio worker) and two
//! `tiervec-edge` processes (core 0, one worker each) over the same 10,000-vector snapshot —
//! one that always asks the cloud (`max_distance` below any distance) and one that never does.
//! The load generator (core 0) is the application: one closed loop of HTTP requests. Rows, in
//! the same run:
//! - `quic_raw`: a raw quinn echo (a query-sized message on a new bidirectional stream, echoed
//!   by a server process on core 1 with the cloud's TLS configuration) — the transport alone;
//! - `cloud_link`: the edge's link from this process (QUIC, frames, the cloud's search);
//! - `cloud` / `local`: the latency at the application's HTTP call to the edge, per source.
//!
//! Then 0-RTT: the time from starting a connection to the first answer, for a full handshake
//! against a resumed one carrying the query as 0-RTT data, through a UDP relay in this process
//! that delays every datagram by half the emulated round trip.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tiervec_edge::link::{Connector, Handshake};
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::protocol::frame::{Frame, Query};
use tokio::net::UdpSocket;

use crate::dataset::Dataset;
use crate::deployment::{self, COLLECTION, EdgeSpec, hits_of};
use crate::measure::prom::Exposition;
use crate::measure::{K, Latencies, Machine, OutputArgs, recall_at_10, update_benchmarks_md};
use crate::procs::{self, Process};
use crate::snapshots;

#[derive(clap::Args, Debug, Clone)]
pub struct E2eArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Samples per row.
    #[arg(long, default_value_t = 10_000)]
    pub samples: usize,
    /// Reconnections measured per handshake kind.
    #[arg(long, default_value_t = 40)]
    pub reconnects: usize,
    /// Emulated round trip for the 0-RTT comparison.
    #[arg(long, default_value_t = 20)]
    pub rtt_ms: u64,
    /// The cloud's `ef` (its own recall@10 ≥ 0.99 at 96 on this corpus; see the demo).
    #[arg(long, default_value_t = 96)]
    pub cloud_ef: usize,
    #[arg(long, default_value = "target/tiervec-bench/e2e")]
    pub work_dir: PathBuf,
}

/// One row: a source at the application, or a layer below it.
#[derive(Debug, Clone, Serialize)]
pub struct E2eRow {
    pub source: &'static str,
    pub recall_at_10: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub qps: f64,
    pub threads: usize,
}

#[derive(Debug, Serialize)]
struct ZeroRtt {
    rtt_ms: u64,
    reconnects: usize,
    full_p50_ms: f64,
    full_p99_ms: f64,
    zero_rtt_p50_ms: f64,
    zero_rtt_p99_ms: f64,
    zero_rtt_accepted: usize,
}

/// Means from the fallback edge's own histograms over the `cloud` row: the whole query inside
/// the edge, and the wait for the cloud within it.
#[derive(Debug, Serialize)]
struct EdgeBreakdown {
    query_mean_us: Option<f64>,
    fallback_wait_mean_us: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    settings: serde_json::Value,
    rows: Vec<E2eRow>,
    zero_rtt_speedup: f64,
    zero_rtt: ZeroRtt,
    edge_breakdown: EdgeBreakdown,
    fallback_p50_target_met: bool,
    fallback_p99_target_met: bool,
}

/// Internal: the raw QUIC echo server of the `quic_raw` row, as its own process.
pub fn echo_server(certs_dir: &Path, addr_file: &Path) -> anyhow::Result<()> {
    let certs = tiervec_cloud::certs::CertDir {
        dir: certs_dir.to_owned(),
        deployment: String::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = tiervec_cloud::quic::bind(
            "127.0.0.1:0".parse()?,
            &certs,
            &tiervec_cloud::quic::QuicLimits::default(),
        )?;
        tiervec_shared::durable::write_atomic(
            addr_file,
            endpoint.local_addr()?.to_string().as_bytes(),
            false,
        )?;
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if let Ok(bytes) = recv.read_to_end(1 << 20).await {
                            let _ = send.write_all(&bytes).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
        anyhow::Ok(())
    })
}

fn row(source: &'static str, lat: &Latencies, recall: Option<f64>, seconds: f64) -> E2eRow {
    E2eRow {
        source,
        recall_at_10: recall,
        p50_us: lat.percentile_us(0.5),
        p99_us: lat.percentile_us(0.99),
        p999_us: lat.percentile_us(0.999),
        qps: lat.samples() as f64 / seconds,
        threads: 1,
    }
}

fn wire_query(ds: &Dataset, q: usize, collection_id: [u8; 16], ef: usize) -> Query {
    Query {
        query_id: 0,
        collection: COLLECTION.into(),
        collection_id,
        vector: ds.queries.row(q).to_vec(),
        k: K as u32,
        ef: ef as u32,
        span_id: 0,
        shadow: false,
        with_payload: false,
    }
}

/// A relay that forwards datagrams between its clients and `upstream`, each after `one_way`.
/// Each client gets its own upstream socket, so the cloud sees one address per client and
/// answers reach the client they belong to.
async fn delaying_relay(upstream: SocketAddr, one_way: Duration) -> anyhow::Result<SocketAddr> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    tokio::spawn(async move {
        let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, client)) = front.recv_from(&mut buf).await {
            let back = match clients.get(&client) {
                Some(back) => back.clone(),
                None => {
                    let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if back.connect(upstream).await.is_err() {
                        continue;
                    }
                    let back = Arc::new(back);
                    clients.insert(client, back.clone());
                    let (answers, front) = (back.clone(), front.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = answers.recv(&mut buf).await {
                            let (datagram, front) = (buf[..n].to_vec(), front.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(one_way).await;
                                let _ = front.send_to(&datagram, client).await;
                            });
                        }
                    });
                    back
                }
            };
            let datagram = buf[..n].to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(one_way).await;
                let _ = back.send(&datagram).await;
            });
        }
    });
    Ok(addr)
}

pub fn run(mut args: E2eArgs) -> anyhow::Result<()> {
    let docs = args.output.docs_dir()?.map(Path::to_owned);
    if args.output.quick {
        args.samples = args.samples.min(1_000);
        args.reconnects = args.reconnects.min(10);
    }
    procs::ensure_binaries()?;
    let pinning = procs::can_pin();
    let ds = Dataset::load_default()?;
    let texts = ds.base_texts()?;
    let dir = args.work_dir.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "bench e2e: cloud of {} vectors, edges of 10,000",
        ds.base.rows()
    );
    let edge_names = ["edge-fallback".to_owned(), "edge-local".to_owned()];
    let mut cloud = deployment::start_cloud(&dir, &ds, &edge_names)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::new();
    let collection_id = rt.block_on(cloud.collection_id(&http))?;
    // One snapshot file per edge: each keeps its own delta log and compacts in place.
    let rows: Vec<usize> = (0..10_000).collect();
    let lsns = rt.block_on(cloud.lsns(&http, rows.iter().map(|&r| r as u64)))?;
    let bytes = snapshots::build_rows(
        &ds.base,
        &rows,
        HnswParams::default(),
        Some(&texts),
        collection_id,
        |row| lsns[&(row as u64)],
    )?;
    let snapshots: Vec<std::path::PathBuf> = edge_names
        .iter()
        .map(|name| dir.join(format!("{name}.tvs")))
        .collect();
    for path in &snapshots {
        tiervec_edge::write_snapshot_atomic(path, &bytes)?;
    }
    rt.block_on(cloud.wait_indexed(&http))?;

    let cpus = pinning.then_some("0");
    let spec = |e: usize, max_distance| EdgeSpec {
        name: &edge_names[e],
        snapshot: &snapshots[e],
        confidence: tiervec_shared::confidence::ConfidenceRule::kth(max_distance),
        budget_bytes: 64 << 20,
        edge_ef: 64,
        cloud_ef: args.cloud_ef,
        deadline_ms: 50,
        cpus,
        // The rows measure the k-th-distance path; certified answers are the demo's.
        certify: false,
        wasm_guest: None,
        other_clouds: &[],
        model_dir: None,
    };
    let mut fallback = deployment::start_edge(&cloud, &spec(0, -1.0))?;
    let mut local = deployment::start_edge(&cloud, &spec(1, f32::MAX))?;
    let echo_addr_file = dir.join("echo.addr");
    let mut echo = Process::start(
        "quic-echo",
        &procs::this_exe()?,
        &[
            "quic-echo".into(),
            "--certs".into(),
            cloud.certs.dir.to_string_lossy().into_owned(),
            "--addr-file".into(),
            echo_addr_file.to_string_lossy().into_owned(),
        ],
        pinning.then_some("1"),
        &dir.join("echo.log"),
    )?;
    let echo_addr = procs::wait_addr_file(&echo_addr_file, &mut echo)?;
    if pinning {
        procs::pin(cloud.process.pid(), "1")?;
        procs::pin_self("0")?;
    }
    let report = rt.block_on(async {
        fallback.wait_linked(&http).await?;
        local.wait_linked(&http).await?;
        measure_all(
            &args,
            &ds,
            &cloud,
            &http,
            &fallback,
            &local.search_url(),
            echo_addr,
        )
        .await
    })?;
    for p in [
        &mut fallback.process,
        &mut local.process,
        &mut cloud.process,
        &mut echo,
    ] {
        p.check_alive()?;
    }
    print!("{}", table(&report));
    args.output.write_json(&report)?;
    let Some(docs) = docs else {
        return Ok(());
    };
    let quick = args.output.quick_flag();
    Ok(update_benchmarks_md(
        &docs.join("benchmarks.md"),
        "e2e",
        &format!(
            "## e2e\n\nCommand: `cargo run --release -p tiervec-testbed -- bench e2e{quick} --json target/bench-e2e.json`. \
             {}. Rows: `quic_raw` a raw quinn echo of a query-sized message (same TLS \
             configurations, server on core 1); `cloud_link` the edge's link from the bench \
             process (QUIC + frames + the cloud's search); `cloud_search` the cloud's own search \
             time inside that (`took_us`); `cloud` and `local` the latency at the application's \
             HTTP call to an edge that always / never falls back. Recall is against exact search \
             over all 50,000 vectors, so the `local` row (a cache of the first 10,000) is low by \
             construction.\n\n{}",
            report.settings["processes"].as_str().unwrap_or(""),
            table(&report)
        ),
    )?)
}

async fn measure_all(
    args: &E2eArgs,
    ds: &Dataset,
    cloud: &deployment::Cloud,
    http: &reqwest::Client,
    fallback: &deployment::Edge,
    local_url: &str,
    echo_addr: SocketAddr,
) -> anyhow::Result<Report> {
    let nq = ds.queries.rows();
    let samples = args.samples;
    let fallback_url = fallback.search_url();
    let mut rows = Vec::new();

    // quic_raw: the same TLS configurations as the link, a query-sized message echoed.
    {
        let cfg = cloud.link("edge-local");
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(tiervec_edge::link::client_config(&cfg)?);
        let conn = endpoint.connect(echo_addr, "localhost")?.await?;
        let mut message = Vec::new();
        Frame::Query(wire_query(ds, 0, [0; 16], args.cloud_ef)).encode(&mut message);
        let mut lat = Latencies::new();
        let t = Instant::now();
        for _ in 0..samples {
            let sent = Instant::now();
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&message).await?;
            send.finish()?;
            let echoed = recv.read_to_end(1 << 20).await?;
            lat.record(sent.elapsed());
            anyhow::ensure!(echoed.len() == message.len(), "echo lost bytes");
        }
        rows.push(row("quic_raw", &lat, None, t.elapsed().as_secs_f64()));
    }

    // cloud_link: the edge's link from this process, no HTTP.
    {
        let connector = Connector::new(cloud.link("edge-local"))?;
        let connected = connector.connect(None).await?;
        let id = connector
            .known_collection(COLLECTION)
            .context("the cloud does not offer the collection")?
            .id;
        let mut lat = Latencies::new();
        let mut searched = Latencies::new();
        let mut recall = 0.0;
        let t = Instant::now();
        for i in 0..samples {
            let q = i % nq;
            let sent = Instant::now();
            let answer = connected
                .link
                .query(wire_query(ds, q, id, args.cloud_ef), Duration::from_secs(5))
                .await
                .map_err(|e| anyhow::anyhow!("cloud query failed: {e:?}"))?;
            lat.record(sent.elapsed());
            searched.record(Duration::from_micros(u64::from(answer.took_us)));
            let found: Vec<(u64, f32)> = answer.hits.iter().map(|h| (h.id, h.distance)).collect();
            let (ids, d) = ds.ground_truth(q, K);
            recall += recall_at_10(&found, &ids, &d);
        }
        let seconds = t.elapsed().as_secs_f64();
        rows.push(row(
            "cloud_link",
            &lat,
            Some(recall / samples as f64),
            seconds,
        ));
        rows.push(row("cloud_search", &searched, None, seconds));
    }

    // cloud and local at the application's HTTP call.
    for (source, url) in [("cloud", fallback_url.as_str()), ("local", local_url)] {
        let mut lat = Latencies::new();
        let mut recall = 0.0;
        let t = Instant::now();
        for i in 0..samples {
            let q = i % nq;
            let body =
                serde_json::to_vec(&serde_json::json!({"vector": ds.queries.row(q), "k": 10}))?;
            let sent = Instant::now();
            let response = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            lat.record(sent.elapsed());
            let v: serde_json::Value = serde_json::from_slice(&response)?;
            anyhow::ensure!(
                v["source"] == source,
                "expected {source} answers from {url}, got {}",
                v["source"]
            );
            let (ids, d) = ds.ground_truth(q, K);
            recall += recall_at_10(&hits_of(&v)?, &ids, &d);
        }
        rows.push(row(
            source,
            &lat,
            Some(recall / samples as f64),
            t.elapsed().as_secs_f64(),
        ));
    }

    // Where the fallback's time goes inside the edge, from its own histograms (means).
    let metrics = Exposition::parse(&fallback.metrics(http).await?);
    let mean_us = |name: &str, labels: &[(&str, &str)]| Some(metrics.mean(name, labels)? * 1e6);
    let edge_breakdown = EdgeBreakdown {
        query_mean_us: mean_us("tiervec_edge_query_seconds", &[("source", "cloud")]),
        fallback_wait_mean_us: mean_us("tiervec_edge_fallback_seconds", &[]),
    };

    // 0-RTT against a full handshake, through the delaying relay.
    let relay = delaying_relay(cloud.quic_addr, Duration::from_millis(args.rtt_ms) / 2).await?;
    let mut cfg = cloud.link("edge-local");
    cfg.cloud_addr = relay;
    cfg.idle_timeout = Duration::from_secs(10);
    let warm = Connector::new(cfg.clone())?;
    let first = warm.connect(None).await?;
    let id = first.link.collection(COLLECTION).context("collection")?.id;
    tokio::time::sleep(Duration::from_millis(args.rtt_ms * 2)).await;
    drop(first);
    let mut full = Latencies::new();
    let mut early = Latencies::new();
    let mut accepted = 0;
    for round in 0..args.reconnects {
        let q = wire_query(ds, round % nq, id, args.cloud_ef);
        let fresh = Connector::new(cfg.clone())?;
        let t = Instant::now();
        let c = fresh.connect(Some(q.clone())).await?;
        c.first_answer
            .context("no first answer")?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        full.record(t.elapsed());
        anyhow::ensure!(c.handshake == Handshake::Full);
        drop(c.link);
        let t = Instant::now();
        let c = warm.connect(Some(q)).await?;
        c.first_answer
            .context("no first answer")?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        early.record(t.elapsed());
        accepted += usize::from(c.handshake == Handshake::ZeroRtt);
        // A link lives a while: long enough for the cloud's new session tickets to arrive.
        tokio::time::sleep(Duration::from_millis(args.rtt_ms * 2)).await;
    }
    let zero_rtt = ZeroRtt {
        rtt_ms: args.rtt_ms,
        reconnects: args.reconnects,
        full_p50_ms: full.percentile_us(0.5) / 1000.0,
        full_p99_ms: full.percentile_us(0.99) / 1000.0,
        zero_rtt_p50_ms: early.percentile_us(0.5) / 1000.0,
        zero_rtt_p99_ms: early.percentile_us(0.99) / 1000.0,
        zero_rtt_accepted: accepted,
    };
    let cloud_row = rows
        .iter()
        .find(|r| r.source == "cloud")
        .context("cloud row")?;
    Ok(Report {
        bench: "e2e",
        machine: Machine::detect(),
        settings: serde_json::json!({
            "samples": samples,
            "corpus": ds.base.rows(),
            "edge_snapshot_vectors": 10_000,
            "k": 10,
            "edge_ef": 64,
            "cloud_ef": args.cloud_ef,
            "rtt_ms": args.rtt_ms,
            "reconnects": args.reconnects,
            "processes": "cloud and echo server: taskset -c 1, 1 tokio worker each; edges: taskset -c 0, 1 tokio worker each; load generator: taskset -c 0, one closed loop",
        }),
        fallback_p50_target_met: cloud_row.p50_us <= 500.0,
        fallback_p99_target_met: cloud_row.p99_us <= 2_000.0,
        rows,
        zero_rtt_speedup: zero_rtt.full_p50_ms / zero_rtt.zero_rtt_p50_ms,
        zero_rtt,
        edge_breakdown,
    })
}

fn table(r: &Report) -> String {
    let mut md = String::from(
        "| row | recall@10 | p50 µs | p99 µs | p99.9 µs | QPS |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for row in &r.rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            row.source,
            row.recall_at_10.map_or("-".into(), |x| format!("{x:.4}")),
            row.p50_us,
            row.p99_us,
            row.p999_us,
            row.qps
        ));
    }
    let z = &r.zero_rtt;
    let us = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}"));
    md.push_str(&format!(
        "\nInside the fallback edge (means over the `cloud` row): the whole query {} µs, of \
         which waiting for the cloud {} µs.\n",
        us(r.edge_breakdown.query_mean_us),
        us(r.edge_breakdown.fallback_wait_mean_us)
    ));
    md.push_str(&format!(
        "\nFallback at the application (`cloud` row): p50 {} 0.5 ms, p99 {} 2 ms.\n\n\
         First answer after reconnecting, {} ms emulated round trip (UDP relay), {} reconnections \
         each: full handshake p50 {:.1} ms (p99 {:.1}), 0-RTT p50 {:.1} ms (p99 {:.1}; {} of {} \
         accepted as 0-RTT) — **{:.2}× faster**.\n",
        if r.fallback_p50_target_met {
            "≤"
        } else {
            "above"
        },
        if r.fallback_p99_target_met {
            "≤"
        } else {
            "above"
        },
        z.rtt_ms,
        z.reconnects,
        z.full_p50_ms,
        z.full_p99_ms,
        z.zero_rtt_p50_ms,
        z.zero_rtt_p99_ms,
        z.zero_rtt_accepted,
        z.reconnects,
        r.zero_rtt_speedup
    ));
    md
}
