//! # tiervec-cloud
//!
//! The cloud tier: it holds the whole corpus, answers what edges cannot, and serves the
//! HTTP/JSON fallback API. How the parts connect:
//!
//! * [`service::Service`] owns the [`service::Catalog`] of [`collection::Collection`]s. Every
//!   write is validated, appended to the write-ahead log ([`wal`], record format
//!   `tiervec_shared::log` with [`entry::WalEntry`] bodies) and fsync'ed — concurrent writers
//!   share fsyncs (group commit) — then applied, then acknowledged.
//! * On start the service loads the newest [`checkpoint`] and replays the WAL after it; a torn
//!   tail is truncated, earlier corruption is an error naming file and offset.
//! * Each collection's graph lives in hnsw_rs ([`index::GraphIndex`], parallel inserts); a
//!   maintenance thread exports it into immutable generations that tiervec's quantised search
//!   runs over ([`index::Generation`]), rebuilds it when tombstones pass a fraction, and takes
//!   checkpoints.
//! * [`api`] is the axum HTTP/JSON API (`/v1`, OpenAPI at `/v1/openapi.json`, Prometheus
//!   `/metrics`), with API keys ([`config::ApiKey`]).
//! * [`client`] is a small HTTP client of that API (bulk loads, tests, benchmarks).
//! * [`gpu`] serves exact scans on a GPU (feature `gpu`, cudarc) when one is usable, and says
//!   why not otherwise; the CPU's SIMD scan is always there.

pub mod api;
pub mod certs;
pub mod checkpoint;
pub mod client;
pub mod collection;
pub mod config;
pub mod entry;
pub mod gpu;
pub mod hot;
pub mod index;
pub mod push;
pub mod quic;
pub mod restore;
pub mod service;
pub mod wal;
