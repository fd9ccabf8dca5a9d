//! # tiervec-edge
//!
//! The edge node's cache: a snapshot file (format in `tiervec_shared::snapshot`) memory-mapped,
//! validated once, and searched in place. This crate owns the IO around the pure core:
//!
//! * [`files`] — opening snapshots (memory map or anonymous copy) and writing them atomically
//!   (temp file, fsync, rename, fsync of the directory).
//! * [`index`] — [`EdgeIndex`]: request validation and k-NN search over an open snapshot, with
//!   a pool of reusable search buffers so the query path allocates nothing that grows with the
//!   number of vectors.
//! * [`inspect`] — the human-readable report behind `tiervec-edge inspect FILE`.
//! * [`link`] — the QUIC link to the cloud (mutual TLS), driving the sans-IO client session.
//! * [`node`] — the query path: local when confident, else the cloud within a deadline, else
//!   local marked degraded; the link reconnects with backoff.
//!
//! * [`http`] and [`config`] — the local HTTP endpoint and `tiervec-edge serve`'s configuration.
//!
//! Later issues add the overlay, the delta log and the WASM host here.

pub mod cache;
pub mod config;
pub mod deltas;
pub mod files;
pub mod http;
pub mod index;
pub mod inspect;
pub mod link;
pub mod node;
pub mod wasm_engine;
pub mod wasm_host;
pub mod wasm_prefetch;

pub use files::{SnapshotBytes, write_snapshot_atomic};
pub use index::{EdgeError, EdgeIndex, Hit, Searcher};
