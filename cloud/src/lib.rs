//! # tiervec-cloud
//!
//! The cloud tier: it holds the whole corpus, answers what edges cannot, serves the HTTP/JSON
//! API, and pushes hot vectors and invalidations into edge caches. Layers, each using only the
//! ones below it:
//!
//! * [`storage`] — the durable log behind one trait ([`storage::DurableLog`]): log entries
//!   ([`storage::WalEntry`]), the WAL with group commit, checkpoints. [`storage::Embedded`]
//!   (one WAL per data directory) is the default.
//! * [`collection`] — a collection's points and tombstones, its graph index
//!   ([`collection::index`], hnsw_rs exported into tiervec's quantised generations) and its
//!   exact scans ([`collection::gpu`]: on a GPU with feature `gpu` when one is usable, the
//!   CPU's SIMD scan otherwise).
//! * [`fanout`] — queries of a collection whose shards are spread over cluster nodes: the
//!   requests between nodes, the exact merge, answers naming the shards no node answered.
//! * [`service`] — the [`service::Catalog`] of collections and edge-cache manifests, the write
//!   path (validate → log → apply → acknowledge), recovery, checkpoints, and the maintenance
//!   thread; configured by a plain [`service::ServiceConfig`] and given its exact engine.
//!   [`hot`] keeps the heavy-hitter tables of what edges ask for; [`text`] embeds texts in
//!   place of vectors (feature `embed`), only for collections that record the same model.
//! * [`push`] — what the cloud pushes into edge caches: anchor tables, planning within each
//!   cache's byte budget, certificates (exact balls), invalidations, whole-cache restores, and
//!   the per-cache push task.
//! * transport — [`quic`] (the edges' endpoint, mutual TLS from [`certs`]) and [`http`] (the
//!   axum API, OpenAPI at `/v1/openapi.json`, Prometheus `/metrics`, API keys).
//! * [`server`] — the composition root (`serve`, `spawn`, the metrics recorder), configured by
//!   [`config::CloudConfig`]; [`inspect`] reports a data directory; [`client`] is a small HTTP
//!   client of the API (bulk loads, tests, benchmarks); [`load`] reads a user's data for bulk
//!   loads (JSON lines, `.fvecs`, `.npy`) and keeps their progress. `main.rs` is glue.
//! * `fuzzing` (feature `fuzzing`, and in tests) — invariant checks the fuzz targets of
//!   `cloud/fuzz` and the property tests share: the push state machine under any sequence of
//!   events, WAL record bodies as recovery decodes them.

pub mod client;
pub mod collection;
pub mod config;
pub mod fanout;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hot;
pub mod inspect;
pub mod load;
pub mod push;
pub mod server;
pub mod service;
pub mod storage;
pub mod text;

mod transport;

pub use transport::{ScanSlots, certs, http, quic};
