//! `tiervec-testbed`: runs the benchmarks and tools of the testbed library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tiervec_shared::hnsw::HnswParams;
use tiervec_testbed::bench::cloud::CloudArgs;
use tiervec_testbed::bench::local::{self, LocalArgs};
use tiervec_testbed::dataset::Dataset;
use tiervec_testbed::snapshots;

#[derive(Parser)]
#[command(
    name = "tiervec-testbed",
    version,
    about = "tiervec demos and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: a cloud and three edges as real processes on loopback, a Zipf trace of
    /// application requests replayed through the edges, sources, recall and latency reported
    /// (--quick: 3,000 requests per edge instead of 20,000).
    Demo(tiervec_testbed::demo::DemoArgs),
    /// Benchmarks; each writes JSON (--json) and, on a full run, updates docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
    /// Build an edge snapshot from the first N base vectors of the dataset, with their texts.
    BuildSnapshot {
        /// Output file (written atomically).
        out: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        m: usize,
        #[arg(long, default_value_t = 200)]
        ef_construction: usize,
    },
    /// Internal: the raw QUIC echo server of `bench e2e`.
    #[command(hide = true)]
    QuicEcho {
        #[arg(long)]
        certs: PathBuf,
        #[arg(long)]
        addr_file: PathBuf,
    },
    /// Internal: the child process of `bench local` that measures resident memory.
    #[command(hide = true)]
    RssProbe {
        snapshot: PathBuf,
        #[arg(long, default_value_t = 5_000)]
        queries: usize,
        #[arg(long, default_value_t = 64)]
        ef: usize,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Edge snapshot search vs hnsw_rs vs exact on 10,000 vectors (ef sweep; --quick: 1,000
    /// queries, 1,000 samples per row).
    Local(LocalArgs),
    /// The cloud tier on 50,000 vectors: load, search, recovery, HTTP (--quick: 10,000
    /// vectors, 1,000 queries and samples, a 1,000-record WAL tail).
    Cloud(CloudArgs),
    /// One cloud on its embedded WAL against three cloud nodes on a three-server NATS
    /// JetStream cluster (nats-server from Debian): load, writes, searches, a new node's
    /// catch-up (--quick: 2,000 vectors, 300 writes, 1,000 searches).
    Cluster(tiervec_testbed::bench::cluster::ClusterArgs),
    /// The fallback path end to end over QUIC, with a raw quinn echo, and 0-RTT against a
    /// full handshake under an emulated round trip (--quick: 1,000 samples per row, 10
    /// reconnections).
    E2e(tiervec_testbed::bench::e2e::E2eArgs),
    /// The edge kernel as a WASM guest under wasmtime against the native edge (simd128 and
    /// scalar guests), with host overhead, cold start and memory per instance (--quick: 1,000
    /// queries and samples per row).
    Wasm(tiervec_testbed::bench::wasm::WasmArgs),
    /// Exact search on the GPU (build with `--features gpu`) against the CPU's exact scan:
    /// QPS at batch 1, 64 and 1,024 over the 50,000 vectors and a 1,000,000-vector synthetic
    /// corpus, fraction of the device's limits, speed-up; CPU rows only without a device
    /// (--quick: a 100,000-vector synthetic corpus, 256 real queries).
    Gpu(tiervec_testbed::bench::gpu::GpuArgs),
    /// 1,000 edges (each its own certificate, QUIC connection and cache) on one cloud process:
    /// latency per source, the cloud's memory and connections, fairness, pushes (--quick: 100
    /// edges, 15 s).
    Load(tiervec_testbed::bench::load::LoadArgs),
    /// Crash soak: 100 rounds of `kill -9` of the cloud or the edge at random moments under a
    /// steady writer on 5,000 vectors; no acknowledged write lost, no phantom, no duplicate, the
    /// edge consistent with the cloud after each resync (--quick: 5 rounds).
    Soak(tiervec_testbed::bench::soak::SoakArgs),
    /// The edge–cloud link through a relay injecting delay, reordering, loss, a partition and a
    /// cloud restart: answers per source, errors (none allowed), reconnections, the edge's
    /// memory (--quick: 4 s phases).
    Faults(tiervec_testbed::bench::faults::FaultsArgs),
    /// Text embedding (all-MiniLM-L6-v2 on candle) against ONNX Runtime with the int8 export
    /// of the same model, same texts and threads, with the edge's search beside it (--quick:
    /// 500 texts).
    Embed(tiervec_testbed::bench::embed::EmbedArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(args) => tiervec_testbed::demo::run(args),
        Command::Bench {
            bench: Bench::Local(args),
        } => local::run(args),
        Command::Bench {
            bench: Bench::Cloud(args),
        } => tiervec_testbed::bench::cloud::run(args),
        Command::Bench {
            bench: Bench::Cluster(args),
        } => tiervec_testbed::bench::cluster::run(args),
        Command::Bench {
            bench: Bench::E2e(args),
        } => tiervec_testbed::bench::e2e::run(args),
        Command::Bench {
            bench: Bench::Wasm(args),
        } => tiervec_testbed::bench::wasm::run(args),
        Command::Bench {
            bench: Bench::Gpu(args),
        } => tiervec_testbed::bench::gpu::run(args),
        Command::Bench {
            bench: Bench::Load(args),
        } => tiervec_testbed::bench::load::run(args),
        Command::Bench {
            bench: Bench::Soak(args),
        } => tiervec_testbed::bench::soak::run(args),
        Command::Bench {
            bench: Bench::Faults(args),
        } => tiervec_testbed::bench::faults::run(args),
        Command::Bench {
            bench: Bench::Embed(args),
        } => tiervec_testbed::bench::embed::run(args),
        Command::QuicEcho { certs, addr_file } => {
            tiervec_testbed::bench::e2e::echo_server(&certs, &addr_file)
        }
        Command::BuildSnapshot {
            out,
            count,
            m,
            ef_construction,
        } => {
            let ds = Dataset::load_default()?;
            let texts = ds.base_texts()?;
            let params = HnswParams {
                m,
                ef_construction,
                ..HnswParams::default()
            };
            let bytes = snapshots::build(&ds.base, count, params, Some(&texts))?;
            tiervec_edge::write_snapshot_atomic(&out, &bytes)?;
            eprintln!("wrote {} ({} bytes)", out.display(), bytes.len());
            Ok(())
        }
        Command::RssProbe {
            snapshot,
            queries,
            ef,
        } => {
            let probe = local::rss_probe(&snapshot, queries, ef)?;
            println!("{}", serde_json::to_string(&probe)?);
            Ok(())
        }
    }
}
