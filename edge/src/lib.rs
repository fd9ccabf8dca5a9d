//! # tiervec-edge
//!
//! The edge node: a cache of the cloud's vectors in a snapshot file (format in
//! `tiervec_shared::snapshot`), memory-mapped, validated once and searched in place, with what
//! the cloud pushed since on top; applications ask it over local HTTP, and it answers locally
//! when confident, else asks the cloud over QUIC. This crate owns the IO around the pure core
//! of `tiervec-shared`. How the parts connect, from the bottom up:
//!
//! * `files` — snapshot bytes (memory map or anonymous copy) and atomic replacement
//!   ([`SnapshotBytes`], [`write_snapshot_atomic`]); `index` — [`EdgeIndex`], one open
//!   snapshot and its search with reusable buffers; `deltas` — the delta log that makes pushes
//!   durable. [`inspect`] — the report behind `tiervec-edge inspect FILE`.
//! * [`searcher`] — the [`searcher::LocalSearcher`] trait the node searches through, and the
//!   local answer it gives.
//! * [`cache`] — [`cache::EdgeCache`]: snapshot + overlay of pushed vectors + anchors and
//!   certificates, searched as one; applies deltas (logged, then visible), compacts in the
//!   background, installs snapshots the cloud streams. The native [`searcher::LocalSearcher`].
//! * [`wasm_prefetch`] — the prefetch imports guests call; [`wasm_host`] — wasmtime running
//!   the edge kernel as a WASM guest (module cache, limits and epochs, instance pool and
//!   journal, raw ABI calls). [`wasm_engine`] — guests kept in step with the cache, the other
//!   [`searcher::LocalSearcher`] (`serve --engine wasm`).
//! * [`link`] — the QUIC link to the cloud (mutual TLS, 0-RTT reconnection), driving the
//!   sans-IO client session; receives the cloud's pushes into the cache and resyncs it.
//! * [`node`] — [`node::EdgeNode`], the query path: local when confident or certified, else
//!   the cloud within a deadline, else local marked degraded; keeps the link with backoff;
//!   shadow queries tune the confidence thresholds.
//! * [`http`] and [`config`] — the local HTTP endpoint and `tiervec-edge serve`'s
//!   configuration.
//!
//! * `fuzzing` (feature `fuzzing`, and in tests) — the guest ABI's host side checked against the
//!   native kernel under arbitrary calls, for the fuzz target of `edge/fuzz`.
//!
//! A module uses only modules listed before it (and `tiervec-shared`), never one after it.

pub mod cache;
pub mod config;
mod deltas;
mod files;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod http;
mod index;
pub mod inspect;
pub mod link;
pub mod node;
pub mod searcher;
pub mod wasm_engine;
pub mod wasm_host;
pub mod wasm_prefetch;

pub use files::{SnapshotBytes, write_snapshot_atomic};
pub use index::{EdgeError, EdgeIndex, Hit, Searcher};
