//! # tiervec-testbed
//!
//! Demos and benchmarks of tiervec on the real dataset (`TIERVEC_DATA`, default
//! `../shared/data`). Layers, each using only those below it:
//! - `measure` (latencies, recall, machine, figures from Prometheus text, JSON and
//!   `docs/benchmarks.md` outputs), `plot` (SVG from plain series), `dataset` (the reader),
//!   `procs` (child processes and what they run), `relay` (a UDP relay injecting network
//!   faults) — the bottom, using no other module;
//! - `snapshots` (edge snapshots from the dataset), `trace` (the demo's request trace and its
//!   cached ground truth), `deployment` (a cloud and edges on loopback);
//! - `bench` (the benchmarks) and `demo` (the main job), which never use each other.

pub mod bench;
pub mod dataset;
pub mod demo;
pub mod deployment;
pub mod measure;
pub mod plot;
pub mod procs;
pub mod relay;
pub mod snapshots;
pub mod trace;
