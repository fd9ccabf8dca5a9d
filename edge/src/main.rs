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
