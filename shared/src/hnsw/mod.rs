//! Hierarchical Navigable Small World graphs (Malkov & Yashunin, 2018).
//!
//! * [`HnswBuilder`] inserts vectors one at a time, single-threaded and deterministic for a
//!   given seed, so an edge node (and the WASM guest, which has no threads) can rebuild its own
//!   cache. Its output is a [`FlatGraph`]: per layer one flat neighbour array plus offsets.
//! * [`search`] is the query-time search (greedy descent through the upper layers, then a beam
//!   of width `ef` on layer 0). It runs over anything that implements [`Graph`] — the builder's
//!   own adjacency lists, a [`FlatGraph`], or the archived graph of a memory-mapped snapshot —
//!   without copying, allocating (beyond a reused [`SearchScratch`]) or calling the OS.

mod build;
mod graph;
mod search;

pub use build::HnswBuilder;
pub(crate) use graph::flat_neighbours;
pub use graph::{FlatGraph, FlatLayer, Graph};

/// Degree statistics of graph layers.
pub mod graph_stats {
    pub use super::graph::{LayerStats, layer_stats};
}
pub use search::{
    ExactSpace, Neighbour, QuantizedSpace, SearchScratch, Space, greedy, search, search_graph,
    search_layer, search_reranked,
};

use serde::{Deserialize, Serialize};

/// Build parameters of an HNSW graph. They are recorded in every snapshot's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HnswParams {
    /// Maximum out-degree on the upper layers; layer 0 allows `2 × m`.
    pub m: usize,
    /// Beam width while inserting; larger builds slower and finds better neighbours.
    pub ef_construction: usize,
    /// Seed of the level generator: the same seed and insertion order give the same graph.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 200,
            seed: 0x7469_6572_7665_6321,
        }
    }
}

impl HnswParams {
    /// Maximum out-degree on `layer`.
    pub const fn max_degree(&self, layer: usize) -> usize {
        if layer == 0 { 2 * self.m } else { self.m }
    }
}

/// The `m` a graph may be built with: below 2 a graph cannot branch; above 256 a node's
/// neighbour list outgrows what the snapshot's header records (`snapshot::MAX_M`).
pub const M_RANGE: std::ops::RangeInclusive<usize> = 2..=256;

/// The largest `ef_construction` a graph is built with. hnsw_rs sizes a heap by it on every
/// insert, and beyond a few hundred it buys no recall on any corpus tiervec serves.
pub const MAX_EF_CONSTRUCTION: usize = 4096;

/// Highest layer index a node can reach. With `m = 16`, reaching it by chance takes more than
/// 16^15 insertions; the bound keeps corrupt or hostile level data from sizing anything.
pub const MAX_LAYERS: usize = 16;
