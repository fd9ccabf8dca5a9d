//! # tiervec-testbed
//!
//! Demos and benchmarks of tiervec on the real dataset (`TIERVEC_DATA`, default
//! `../shared/data`): the dataset reader, snapshot building from it, the benchmarks with their
//! JSON figures and `docs/benchmarks.md` sections, and SVG plots.

pub mod bench;
pub mod dataset;
pub mod plot;
pub mod snapshots;
