//! Measurement, the bottom layer of the testbed: what a figure means, independent of what is
//! measured. Latency samples and their percentiles (hdrhistogram: every percentile the testbed
//! reports comes from here), recall@10 under the tie rule, the machine a run is on, figures
//! read from the Prometheus text the processes serve, and the run's outputs (JSON, its section
//! of `docs/benchmarks.md`, under one rule for every bench and the demo: [`OutputArgs`]).
//!
//! It uses no other module of the testbed; the benches, the demo, the deployment and the plots
//! build on it.

mod latency;
mod machine;
mod output;
pub mod prom;
mod recall;

pub use latency::Latencies;
pub use machine::Machine;
pub use output::{OutputArgs, update_benchmarks_md, write_json};
pub use recall::{K, exact_top_k, recall_at_10};
