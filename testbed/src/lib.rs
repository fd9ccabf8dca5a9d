//! # tiervec-testbed
//!
//! Demos and benchmarks of tiervec on the real dataset (`TIERVEC_DATA`, default
//! `../shared/data`): the dataset reader, snapshot building from it, the query trace of the
//! demo with its cached ground truth, the real processes the demo and benchmarks start, the
//! benchmarks with their JSON figures and `docs/benchmarks.md` sections, and SVG plots.

pub mod bench;
pub mod dataset;
pub mod demo;
pub mod deployment;
pub mod plot;
pub mod procs;
pub mod prom;
pub mod snapshots;
pub mod trace;
