//! `tiervec-cloud`: serve the cloud tier, bulk-load vectors, inspect the data directory.
//! Thin glue over the `tiervec_cloud` library.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::value::RawValue;
use tiervec_cloud::client::{Client, ClientError};
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::http::{CreateCollection, PointIn};
use tiervec_cloud::service::Service;
use tiervec_shared::Metric;
use tiervec_shared::hnsw::HnswParams;

#[derive(Parser)]
#[command(name = "tiervec-cloud", version, about = "tiervec cloud tier")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP/JSON API over the data directory.
    Serve {
        /// TOML configuration file (fields: see docs/cloud.md); env TIERVEC_CLOUD_<FIELD> and
        /// --set override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one field, e.g. `--set http_addr="127.0.0.1:0"` (TOML value syntax).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        /// Write the bound address here once listening (for scripts and tests).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Bulk-load an .fvecs file (and optional .jsonl texts as payloads) into a collection,
    /// through a running server's API, or directly into a stopped server's data directory.
    Load {
        #[arg(long)]
        collection: String,
        #[arg(long)]
        fvecs: PathBuf,
        /// JSON lines whose `text` becomes each point's payload `{"text": …}`.
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// Server URL (API mode).
        #[arg(long, default_value = "http://127.0.0.1:6380")]
        url: String,
        #[arg(long, env = "TIERVEC_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Write straight into this data directory instead (the server must be stopped; the
        /// directory lock refuses a second writer).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Create the collection (dimension from the file) if it does not exist.
        #[arg(long, default_value = "cosine")]
        metric: Metric,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Load only the first N vectors.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Make a deployment's certificates: a CA (kept if it exists), the server certificate, one
    /// client certificate per edge (the edge id is its Common Name), and one per cluster node
    /// for the QUIC between nodes, for mutual TLS.
    Certs {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Name of the deployment, part of the CA's subject.
        #[arg(long, default_value = "default")]
        deployment: String,
        /// DNS names or IP addresses of the cloud (repeat); none keeps the server certificate.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Cluster node names to issue certificates for, for the QUIC between nodes (repeat).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Edge ids to issue certificates for (repeat).
        #[arg(long = "edge")]
        edges: Vec<String>,
    },
    /// Print the checkpoints and WAL segments of a data directory (read-only).
    Inspect {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Rewrite the WAL segments a server refuses to start on (damaged before their last
    /// flush) with every record that reads back whole; the originals are set aside as
    /// `*.log.damaged`. The server must be stopped.
    Repair {
        #[arg(long)]
        data_dir: PathBuf,
        /// Only report what would be kept and lost.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            config,
            overrides,
            addr_file,
        } => {
            let config = CloudConfig::load(config.as_deref(), std::env::vars(), &overrides)?;
            init_logs(config.json_logs);
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.worker_threads {
                rt.worker_threads(n);
            }
            rt.enable_all()
                .build()?
                .block_on(tiervec_cloud::server::serve(
                    config,
                    move |addr| {
                        if let Some(path) = addr_file {
                            let _ = tiervec_shared::durable::write_atomic(
                                &path,
                                addr.to_string().as_bytes(),
                                false,
                            );
                        }
                    },
                    shutdown_signal(),
                ))?;
            Ok(())
        }
        Command::Load {
            collection,
            fvecs,
            jsonl,
            url,
            api_key,
            data_dir,
            metric,
            batch,
            limit,
        } => {
            init_logs(false);
            let bytes =
                std::fs::read(&fvecs).with_context(|| format!("reading {}", fvecs.display()))?;
            let m = tiervec_shared::vecs::parse_fvecs(&bytes)
                .with_context(|| format!("parsing {}", fvecs.display()))?;
            let n = limit.unwrap_or(usize::MAX).min(m.rows());
            let texts = match &jsonl {
                Some(p) => Some(read_texts(p)?),
                None => None,
            };
            let points: Vec<(u64, Vec<f32>, Option<String>)> = (0..n)
                .map(|i| {
                    let payload = texts
                        .as_ref()
                        .and_then(|t| t.get(i))
                        .map(|t| serde_json::json!({ "text": t }).to_string());
                    (i as u64, m.row(i).to_vec(), payload)
                })
                .collect();
            let bar = ProgressBar::new(n as u64).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} vectors {per_sec} eta {eta}")
                    .expect("valid template"),
            );
            let started = Instant::now();
            match data_dir {
                Some(dir) => {
                    let config = CloudConfig {
                        data_dir: dir,
                        ..CloudConfig::default()
                    };
                    let svc = Service::open(config)?;
                    if svc.catalog().get(&collection).is_none() {
                        svc.create_collection(&collection, m.dim, metric, HnswParams::default())?;
                    }
                    for chunk in points.chunks(batch.max(1)) {
                        svc.upsert(&collection, chunk.to_vec())?;
                        bar.inc(chunk.len() as u64);
                    }
                }
                None => {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(load_over_api(
                        &url,
                        api_key,
                        &collection,
                        m.dim,
                        metric,
                        &points,
                        batch,
                        &bar,
                    ))?;
                }
            }
            bar.finish();
            eprintln!(
                "loaded {n} vectors into `{collection}` in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Inspect { data_dir } => {
            tiervec_cloud::inspect::report(&data_dir, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Repair { data_dir, dry_run } => {
            let _lock = tiervec_cloud::service::lock_data_dir(&data_dir)?;
            let repaired = tiervec_cloud::storage::wal::repair(&data_dir, dry_run)?;
            if repaired.is_empty() {
                println!(
                    "every WAL segment in {} reads back; nothing to repair",
                    data_dir.display()
                );
            }
            for r in &repaired {
                let lost: u64 = r.lost.iter().map(|(a, b)| b - a).sum();
                println!(
                    "{}: {} {} records; {lost} damaged bytes in {} ranges {:?}; LSNs missing between kept records: {:?}{}",
                    r.path.display(),
                    if dry_run { "would keep" } else { "kept" },
                    r.kept,
                    r.lost.len(),
                    r.lost,
                    r.lsn_gaps,
                    r.set_aside
                        .as_ref()
                        .map(|p| format!("; original set aside as {}", p.display()))
                        .unwrap_or_default(),
                );
            }
            Ok(())
        }
        Command::Certs {
            dir,
            deployment,
            server_names,
            nodes,
            edges,
        } => {
            let certs = tiervec_cloud::certs::CertDir { dir, deployment };
            if certs.ensure_ca()? {
                eprintln!("created CA {}", certs.ca_cert().display());
            }
            if !server_names.is_empty() {
                certs.issue_server(&server_names)?;
                eprintln!(
                    "issued {} for {}",
                    certs.server_cert().display(),
                    server_names.join(", ")
                );
            }
            for node in &nodes {
                certs.issue_node(node)?;
                eprintln!("issued {} for node {node}", certs.node_cert(node).display());
            }
            for edge in &edges {
                certs.issue_edge(edge)?;
                eprintln!("issued {} for edge {edge}", certs.edge_cert(edge).display());
            }
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn load_over_api(
    url: &str,
    key: Option<String>,
    collection: &str,
    dim: usize,
    metric: Metric,
    points: &[(u64, Vec<f32>, Option<String>)],
    batch: usize,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let client = Client::new(url, key);
    match client.collection(collection).await {
        Ok(_) => {}
        Err(ClientError::Api { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {
            client
                .create_collection(&CreateCollection {
                    name: collection.to_owned(),
                    dim,
                    metric,
                    m: None,
                    ef_construction: None,
                    shards: None,
                    model: None,
                })
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    for chunk in points.chunks(batch.max(1)) {
        let body = chunk
            .iter()
            .map(|(id, v, p)| {
                Ok(PointIn {
                    id: *id,
                    vector: v.clone(),
                    payload: p.clone().map(RawValue::from_string).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()?;
        client.upsert(collection, body).await?;
        bar.inc(chunk.len() as u64);
    }
    Ok(())
}

fn read_texts(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Line {
        text: String,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<Line>(l)
                .map(|l| l.text)
                .with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
