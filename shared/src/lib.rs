//! # tiervec-shared
//!
//! The pure core of tiervec, used by the edge, the cloud and the WASM guest alike. It performs
//! no IO, reads no clock and starts no threads: time, randomness (as seeds) and bytes come in as
//! arguments, so everything here compiles to `wasm32-wasip1` and is tested deterministically.
//!
//! How the parts connect:
//! * [`metric`] defines what a distance *is* (once, for thresholds, certificates and ground
//!   truth); [`kernels`] computes it fast, in one canonical accumulation order.
//! * [`query`] validates every search request (dimension, NaN/inf, `k`, `ef`).
//! * [`hnsw`] builds graphs ([`hnsw::HnswBuilder`]) and searches any [`hnsw::Graph`].
//! * [`snapshot`] is the edge cache file format: [`snapshot::SnapshotWriter`] writes it,
//!   [`snapshot::Snapshot::open`] validates it once and then searches the archived bytes in
//!   place through [`snapshot::SnapshotView`].
//! * [`vecs`] parses the `.fvecs`/`.ivecs` dataset layout from bytes.
//! * [`exact`] is brute-force search, the yardstick for recall.
//! * [`hot`] estimates which ids are asked for most lately (decaying Space-Saving), for the
//!   cloud's choice of what to push to edges.
//! * [`push`] is what the cloud pushes into edge caches (deltas, inventories) and the
//!   manifest both sides keep of a cache, with the one byte model of its budget.
//! * [`local`] is an edge's cache (snapshot + overlay + anchors) searched as one, with
//!   certified answers: the same code in the native edge and the WASM guest.
//! * [`certificate`] is the geometry of certified answers (the triangle-inequality test and
//!   its rounding slack), shared by the cloud that issues certificates and the edges.
//! * [`log`] is the record format of every append-only log (cloud WAL, edge delta log).
//! * [`protocol`] is the edge–cloud protocol, sans IO: frames, the client and server session
//!   state machines, streamed snapshots, and what both ends decide alike about a cache
//!   (`protocol::cache`: whether to resync, whether a push was acknowledged).
//! * [`guest_abi`] is the byte layout of the WASM guest's calls (requests, responses,
//!   certificates, status codes), shared by the guest (`tiervec-wasm`) and its host in the edge.
//! * [`backoff`] is retry timing (exponential, with jitter the caller draws): the edge's
//!   reconnections and the cloud's checkpoint retries.
//! * `durable` (feature `fs`, off in the WASM guest) does IO: atomic file replacement and
//!   directory syncs for the edge and the cloud.
//! * `layered` (feature `config`, off in the WASM guest) reads the edge's and the cloud's
//!   configuration in layers (defaults, TOML file, environment, flags) with figment; it reads
//!   a file and the environment, the only other IO here.
//! * `fuzzing` (feature `fuzzing`, and in tests) holds the invariant checks the fuzz targets
//!   of `shared/fuzz` run, so that stable tests replay their corpora.

pub mod backoff;
pub mod certificate;
pub mod confidence;
#[cfg(feature = "fs")]
pub mod durable;
pub mod exact;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod guest_abi;
pub mod hnsw;
pub mod hot;
pub mod identity;
pub mod kernels;
#[cfg(feature = "config")]
pub mod layered;
pub mod local;
pub mod log;
pub mod metric;
pub mod protocol;
pub mod push;
pub mod quant;
pub mod query;
pub mod snapshot;
pub mod vecs;

pub use identity::{CollectionId, ModelIdentity};
pub use metric::Metric;
pub use query::QueryError;
