//! # tiervec-cloud
//!
//! The cloud tier: it will hold the whole corpus (collections with durable writes, an hnsw_rs
//! index, exact search on CPU and — behind the `gpu` feature — GPU), serve the HTTP/JSON
//! fallback API and the QUIC endpoint edges fall back to, and push hot vectors down to edges.
//!
//! Today it is a skeleton: the foundation issue only fixes its place in the workspace and its
//! dependency rule (it builds on `tiervec-shared`, never on `tiervec-edge`). The cloud issue
//! fills it in.
