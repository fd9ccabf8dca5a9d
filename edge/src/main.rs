//! `tiervec-edge`: the edge node's command line. Thin glue over the `tiervec_edge` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tiervec_edge::{EdgeIndex, SnapshotBytes};

#[derive(Parser)]
#[command(name = "tiervec-edge", version, about = "tiervec edge node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a snapshot's header, counts and graph statistics, and whether it validates.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
    },
    /// Serve applications over local HTTP, answering from the snapshot and falling back to the
    /// cloud over QUIC when not confident.
    Serve {
        /// TOML configuration (fields: `tiervec_edge::config::EdgeConfig`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Search a snapshot with a query vector given as comma-separated numbers.
    Query {
        /// The snapshot file.
        file: PathBuf,
        /// Query components, e.g. `0.1,0.2,...`.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        vector: Vec<f32>,
        #[arg(long, default_value_t = 10)]
        k: usize,
        #[arg(long, default_value_t = 64)]
        ef: usize,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Inspect { file } => {
            let bytes = SnapshotBytes::map(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            let (report, valid) = tiervec_edge::inspect::report(bytes);
            print!("{report}");
            Ok(if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Serve { config } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config: tiervec_edge::config::EdgeConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
            // One worker means one thread: the current-thread scheduler, so that a request, the
            // QUIC driver and the HTTP connection never wake each other across threads.
            let mut rt = match config.worker_threads {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            let rt = rt.enable_all().build()?;
            // Installed before the node starts, so that no early metric goes to the no-op recorder.
            let metrics = tiervec_edge::http::install_prometheus()?;
            rt.block_on(async move {
                let (cache, report) = tiervec_edge::cache::EdgeCache::open(config.cache())?;
                for (aside, why) in &report.set_aside {
                    tracing::error!(file = %aside.display(), why, "damaged cache file set aside; the cloud resyncs the cache");
                }
                let node = std::sync::Arc::new(tiervec_edge::node::EdgeNode::start(
                    std::sync::Arc::new(cache),
                    config.node(),
                    config.link(),
                )?);
                let state = tiervec_edge::http::EdgeState {
                    node,
                    default_ef: config.default_ef,
                    collection: config.collection.clone(),
                    metrics,
                };
                let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
                tracing::info!(addr = %listener.local_addr()?, "edge serving");
                // Small JSON answers must not wait on Nagle's algorithm.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, tiervec_edge::http::router(state)).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            file,
            vector,
            k,
            ef,
        } => {
            let index = EdgeIndex::open(&file)?;
            for hit in index.search(&vector, k, ef)? {
                println!(
                    "{}\t{:.6}\t{}",
                    hit.id,
                    hit.distance,
                    hit.payload.unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
