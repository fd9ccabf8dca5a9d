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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Engine {
    Native,
    Wasm,
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
        /// TOML configuration (fields: `tiervec_edge::config::EdgeConfig`, docs/edge.md);
        /// environment variables `TIERVEC_EDGE_<FIELD>` and `--set` override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one field, e.g. `--set http_addr="127.0.0.1:0"` (TOML value syntax,
        /// `table.field` for a nested one).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        /// What answers local searches: this process (`native`) or WASM guests run by wasmtime
        /// (`wasm`), as a CDN edge worker would.
        #[arg(long, value_enum, default_value_t = Engine::Native)]
        engine: Engine,
        /// The guest module (`wasm`): by default `tiervec_wasm.wasm` of this build's target
        /// directory (`cargo build --profile guest --target wasm32-wasip1 -p tiervec-wasm`).
        #[arg(long)]
        guest: Option<PathBuf>,
        /// Where the compiled guest is cached (`wasm`; created with mode 0700): by default
        /// `wasm-module-cache` beside the snapshot.
        #[arg(long)]
        module_cache: Option<PathBuf>,
        /// Longest a guest may search before it is stopped and the cloud asked (`wasm`).
        #[arg(long, default_value_t = 50)]
        guest_deadline_ms: u64,
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

/// The guest this build's target directory holds: `target/release/tiervec-edge` →
/// `target/wasm32-wasip1/guest/tiervec_wasm.wasm` (the `guest` profile).
fn default_guest() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(|release| release.parent())
        .context("cannot locate the target directory from this executable")?;
    Ok(target
        .join("wasm32-wasip1")
        .join("guest")
        .join("tiervec_wasm.wasm"))
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        // Info by default: where the edge serves, the link going up and down, resyncs.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
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
        Command::Serve {
            config,
            overrides,
            engine,
            guest,
            module_cache,
            guest_deadline_ms,
        } => {
            let config = tiervec_edge::config::EdgeConfig::load(config.as_deref(), &overrides)?;
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
            let wasm = match engine {
                Engine::Native => None,
                Engine::Wasm => {
                    let module = match guest {
                        Some(path) => path,
                        None => default_guest()?,
                    };
                    let cache_dir = module_cache.unwrap_or_else(|| {
                        config
                            .snapshot
                            .parent()
                            .unwrap_or(std::path::Path::new("."))
                            .join("wasm-module-cache")
                    });
                    let mut wasm_config =
                        tiervec_edge::wasm_host::WasmConfig::new(module, cache_dir);
                    wasm_config.deadline = std::time::Duration::from_millis(guest_deadline_ms);
                    Some(
                        tiervec_edge::wasm_engine::WasmEngine::start(wasm_config)
                            .context("starting the wasm engine")?,
                    )
                }
            };
            rt.block_on(async move {
                let (cache, report) = tiervec_edge::cache::EdgeCache::open(config.cache())?;
                for (aside, why) in &report.set_aside {
                    tracing::error!(file = %aside.display(), why, "damaged cache file set aside; the cloud resyncs the cache");
                }
                let mut node = tiervec_edge::node::EdgeNode::start(
                    std::sync::Arc::new(cache),
                    config.node(),
                    config.link(),
                )?;
                if let Some(engine) = wasm {
                    node = node.with_wasm(engine);
                }
                let node = std::sync::Arc::new(node);
                let state = tiervec_edge::http::EdgeState::new(
                    node,
                    config.default_ef,
                    config.collection.clone(),
                    metrics,
                );
                #[cfg(feature = "embed")]
                let state = match config.model_dir.clone() {
                    Some(dir) => {
                        let embedder = tokio::task::spawn_blocking(move || {
                            tiervec_embed::Embedder::open(&dir)
                        })
                        .await??;
                        state.with_embedder(std::sync::Arc::new(embedder))
                    }
                    None => state,
                };
                #[cfg(not(feature = "embed"))]
                anyhow::ensure!(
                    config.model_dir.is_none(),
                    "`model_dir` is set, but this edge was built without the embedder (cargo feature `embed`)"
                );
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
                    hit.payload.as_deref().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
