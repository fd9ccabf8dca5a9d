//! What both demos set up the same way: the arguments, the traces with their exact ground
//! truth, and the edges' snapshots.

use std::path::{Path, PathBuf};

use tiervec_shared::hnsw::HnswParams;

use crate::dataset::Dataset;
use crate::measure::{K, OutputArgs};
use crate::snapshots;
use crate::trace::{self, Request, TraceSpec, Truth};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    #[command(flatten)]
    pub output: OutputArgs,
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
    /// The edges' deadline for the cloud (default 50 ms; 200 ms with `--cluster`, whose
    /// cloud answers go through the fan-out: p99 ~180 ms with ten processes on two cores).
    #[arg(long)]
    pub deadline_ms: Option<u64>,
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
    /// Run against a cloud of three nodes on a three-server NATS JetStream cluster, killing a
    /// node and a nats-server during the trace (`demo::cluster`; needs `nats-server`).
    #[arg(long)]
    pub cluster: bool,
    /// `--cluster`: requests between the cloud nodes over direct QUIC with mutual TLS
    /// (`cluster.peer_addr`, node certificates) rather than NATS request/reply.
    #[arg(long)]
    pub peer_quic: bool,
    /// `--cluster`: upserts a second by the steady writer.
    #[arg(long, default_value_t = 20.0)]
    pub write_rate: f64,
    /// Work directory (data, certificates, snapshots, logs, cached ground truth).
    #[arg(long, default_value = "target/tiervec-demo")]
    pub work_dir: PathBuf,
}

/// The reported and the calibration traces with their exact ground truth (cached in
/// `cache_dir`).
#[allow(clippy::type_complexity)]
pub(super) fn traces(
    args: &DemoArgs,
    ds: &Dataset,
    requests_per_edge: usize,
    cache_dir: &Path,
) -> anyhow::Result<(
    Vec<Vec<Request>>,
    Vec<Vec<Truth>>,
    Vec<Vec<Request>>,
    Vec<Vec<Truth>>,
)> {
    let spec = |trace_seed: u64| TraceSpec {
        edges: args.edges,
        requests_per_edge,
        zipf_exponent: args.zipf,
        repeat_fraction: args.repeat,
        noise_cosine: args.noise_cosine,
        deployment_seed: args.deployment_seed,
        trace_seed,
    };
    let shipped = |q: usize| {
        let (ids, distances) = ds.ground_truth(q, K);
        Truth { ids, distances }
    };
    let reported_spec = spec(args.seed);
    let reported = trace::generate(&reported_spec, &ds.queries)?;
    let reported_truth =
        trace::ground_truth(&reported_spec, &reported, &ds.base, &shipped, cache_dir)?;
    let calibration_spec = spec(args.calibration_seed);
    let calibration = trace::generate(&calibration_spec, &ds.queries)?;
    let calibration_truth = trace::ground_truth(
        &calibration_spec,
        &calibration,
        &ds.base,
        &shipped,
        cache_dir,
    )?;
    Ok((reported, reported_truth, calibration, calibration_truth))
}

/// Builds and writes each edge's snapshot (in parallel), for the cloud's collection identity
/// and with the cloud's LSNs.
pub(super) fn build_snapshots(
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

/// The rows of an edge's cache: the exact neighbours of its queries, most popular first.
pub(super) fn cache_rows(
    ds: &Dataset,
    order: &[usize],
    neighbours: usize,
    capacity: usize,
) -> Vec<usize> {
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
