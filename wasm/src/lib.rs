//! # tiervec-wasm
//!
//! The edge kernel as a `wasm32-wasip1` guest for CDN edge workers: snapshot validation, search,
//! overlay merge and confidence rules compiled from `tiervec-shared` (not copied), behind a small
//! documented guest ABI, hosted by wasmtime in `tiervec-edge`.
//!
//! Today it is a skeleton: the foundation issue only guarantees that everything it will need
//! from `tiervec-shared` — the kernels, the snapshot validator and the in-place HNSW search —
//! compiles for `wasm32-wasip1` (`.ci/run` builds it). The WASM issue fills it in.
