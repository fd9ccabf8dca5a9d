//! Query-time search over any [`Graph`]: greedy descent, then a beam search on layer 0.

use std::cmp::Ordering;

use super::Graph;
use crate::kernels::{
    PREFETCH_IS_A_CALL, prefetch, prefetch_all, prefetch_ptr, prefetch_rows, row_of,
};
use crate::metric::Metric;
use crate::quant::QueryCodes;

/// A node and its distance to the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbour {
    pub id: u32,
    pub distance: f32,
}

impl Neighbour {
    /// Total order: nearer first, then lower id, so equal distances sort deterministically.
    #[inline]
    pub fn cmp_nearest(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.id.cmp(&other.id))
    }
}

/// Memory one search needs, reused across searches so the query path allocates nothing once it
/// is warm. The visited marks are a bitset: clearing it costs a store per 64 nodes at the start
/// of a search (157 for a 10,000-node cache), and at 1.25 KB it stays in L1 while rows stream
/// through, where a mark per node (20 KB of generation stamps, cleared for free) was evicted by
/// them and each check of a neighbour missed.
#[derive(Debug, Default)]
pub struct SearchScratch {
    visited: Vec<u64>,
    /// The beam: nearest first, at most `ef` long.
    pool: Vec<Neighbour>,
    /// Whether `pool[i]` has been expanded.
    expanded: Vec<bool>,
    found: Vec<Neighbour>,
    query_codes: QueryCodes,
}

impl SearchScratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Prepares for a search over `nodes` nodes: no node visited.
    fn begin(&mut self, nodes: usize) {
        let words = nodes.div_ceil(64);
        self.visited.clear();
        self.visited.resize(words, 0);
    }

    /// Starts loading `node`'s visited mark.
    #[inline]
    fn prefetch_mark(&self, node: u32) {
        if let Some(word) = self.visited.get(node as usize / 64) {
            prefetch_ptr(word);
        }
    }

    /// Marks `node` visited; returns whether it was new (a node outside the bitset never is).
    #[inline]
    fn visit(&mut self, node: u32) -> bool {
        let bit = 1u64 << (node % 64);
        match self.visited.get_mut(node as usize / 64) {
            Some(word) if *word & bit == 0 => {
                *word |= bit;
                true
            }
            _ => false,
        }
    }

    /// The results of the last [`search_layer`], nearest first.
    pub fn found(&self) -> &[Neighbour] {
        &self.found
    }

    /// Room for the quantised form of a query, reused across searches.
    pub fn query_codes(&mut self) -> &mut QueryCodes {
        &mut self.query_codes
    }
}

/// How the search measures the distance from its query to a node.
pub trait Space {
    /// Distance from the query to node `id` (an id below the node count).
    fn distance(&self, id: u32) -> f32;
    /// Starts loading the rows of nodes `ids`; called before [`Space::distance`] on them.
    fn prefetch(&self, _ids: &[u32]) {}
    /// Number of nodes that have rows.
    fn nodes(&self) -> usize;
}

/// Exact distances over `f32` rows.
#[derive(Clone, Copy)]
pub struct ExactSpace<'a> {
    pub vectors: &'a [f32],
    pub dim: usize,
    pub metric: Metric,
    pub query: &'a [f32],
}

impl ExactSpace<'_> {
    #[inline]
    fn row(&self, id: u32) -> &[f32] {
        row_of(self.vectors, self.dim, id)
    }

    /// Starts loading all of node `id`'s row (not only its first lines).
    #[inline]
    fn prefetch_row(&self, id: u32) {
        prefetch_all(self.row(id));
    }
}

impl Space for ExactSpace<'_> {
    #[inline]
    fn distance(&self, id: u32) -> f32 {
        self.metric.distance(self.query, self.row(id))
    }

    #[inline]
    fn prefetch(&self, ids: &[u32]) {
        for &id in ids {
            prefetch(self.row(id));
        }
    }

    fn nodes(&self) -> usize {
        self.vectors.len().checked_div(self.dim).unwrap_or(0)
    }
}

/// Approximate distances over `i8` codes (see [`crate::quant`]).
#[derive(Clone, Copy)]
pub struct QuantizedSpace<'a> {
    pub codes: &'a [i8],
    /// Squared norms of the original rows (used by `l2`).
    pub norms: &'a [f32],
    pub dim: usize,
    pub metric: Metric,
    pub query: &'a QueryCodes,
    /// Squared norm of the query (used by `l2`).
    pub query_norm: f32,
}

impl QuantizedSpace<'_> {
    #[inline]
    fn row(&self, id: u32) -> &[i8] {
        row_of(self.codes, self.dim, id)
    }
}

impl Space for QuantizedSpace<'_> {
    #[inline]
    fn distance(&self, id: u32) -> f32 {
        let dot = self.query.dot(self.row(id));
        match self.metric {
            Metric::Cosine => 1.0 - dot,
            Metric::Dot => -dot,
            Metric::L2 => {
                let norm = self.norms.get(id as usize).copied().unwrap_or(0.0);
                self.query_norm + norm - 2.0 * dot
            }
        }
    }

    #[inline]
    fn prefetch(&self, ids: &[u32]) {
        prefetch_rows(self.codes, self.dim, ids);
    }

    fn nodes(&self) -> usize {
        self.codes.len().checked_div(self.dim).unwrap_or(0)
    }
}

/// Beam search of width `ef` on one layer from `entries`; the `ef` nearest nodes found are left
/// in `scratch.found()`, nearest first. Every node id in the graph must have a row in `space`
/// (snapshots check this when they are opened).
///
/// The beam is one sorted array of at most `ef` entries, each marked once expanded, with a
/// cursor on the nearest unexpanded one — the same search as the paper's pair of heaps (it stops
/// when every one of the `ef` nearest found has been expanded), with less bookkeeping: an
/// insertion is a binary search and a short move, and the result needs no final sort.
pub fn search_layer<G: Graph + ?Sized, S: Space>(
    graph: &G,
    space: &S,
    entries: &[Neighbour],
    ef: usize,
    layer: usize,
    scratch: &mut SearchScratch,
) {
    scratch.begin(space.nodes());
    let ef = ef.max(1);
    scratch.pool.clear();
    scratch.expanded.clear();
    for &e in entries {
        if scratch.visit(e.id) {
            let at = scratch.pool.partition_point(|p| p.cmp_nearest(&e).is_lt());
            scratch.pool.insert(at, e);
            scratch.expanded.insert(at, false);
        }
    }
    scratch.pool.truncate(ef);
    scratch.expanded.truncate(ef);
    // Unvisited neighbours of the node being expanded, fetched before their distances are
    // computed so the loads of later rows overlap with the arithmetic on earlier ones.
    let mut fresh = [0u32; 64];
    let mut cursor = 0;
    while cursor < scratch.pool.len() {
        let current = scratch.pool[cursor];
        scratch.expanded[cursor] = true;
        let mut next = cursor + 1;
        // The next node to expand is probably the next in the pool: start loading its list.
        if let Some(n) = scratch.pool.get(next) {
            graph.prefetch_neighbours(n.id, layer);
        }
        for chunk in graph.neighbours(current.id, layer).chunks(fresh.len()) {
            for &n in chunk {
                scratch.prefetch_mark(n);
            }
            let mut count = 0;
            let mut keep_fresh = |n: u32| {
                if scratch.visit(n) {
                    if !PREFETCH_IS_A_CALL {
                        space.prefetch(core::slice::from_ref(&n));
                    }
                    fresh[count] = n;
                    count += 1;
                }
            };
            // Four neighbours per iteration: in the wasm guest every loop iteration checks the
            // deadline, and this loop runs for every neighbour of every expanded node.
            let mut quads = chunk.chunks_exact(4);
            for quad in &mut quads {
                quad.iter().for_each(|&n| keep_fresh(n));
            }
            quads.remainder().iter().for_each(|&n| keep_fresh(n));
            if PREFETCH_IS_A_CALL {
                space.prefetch(&fresh[..count]);
            }
            for &n in &fresh[..count] {
                let found = Neighbour {
                    id: n,
                    distance: space.distance(n),
                };
                let full = scratch.pool.len() >= ef;
                if full
                    && scratch
                        .pool
                        .last()
                        .is_some_and(|w| found.cmp_nearest(w).is_ge())
                {
                    continue;
                }
                let at = scratch
                    .pool
                    .partition_point(|p| p.cmp_nearest(&found).is_lt());
                if full {
                    scratch.pool.pop();
                    scratch.expanded.pop();
                }
                scratch.pool.insert(at, found);
                scratch.expanded.insert(at, false);
                next = next.min(at);
            }
        }
        // Everything before `next` that is still unexpanded was inserted there just now, and
        // `next` is at most the first such slot; skip forward over expanded entries.
        cursor = next;
        while cursor < scratch.pool.len() && scratch.expanded[cursor] {
            cursor += 1;
        }
    }
    scratch.found.clear();
    scratch.found.extend_from_slice(&scratch.pool);
}

/// Greedy walk on one upper layer: move to the nearest neighbour until none is nearer.
pub fn greedy<G: Graph + ?Sized, S: Space>(
    graph: &G,
    space: &S,
    mut current: Neighbour,
    layer: usize,
) -> Neighbour {
    loop {
        let mut moved = false;
        for &n in graph.neighbours(current.id, layer) {
            let distance = space.distance(n);
            if distance < current.distance {
                current = Neighbour { id: n, distance };
                moved = true;
            }
        }
        if !moved {
            return current;
        }
    }
}

/// Beam search from the entry point: greedy descent through the upper layers, then a beam of
/// width `ef` on layer 0. Leaves up to `ef` nodes in `scratch.found()`, nearest first (by the
/// distances of `space`).
pub fn search_graph<G: Graph + ?Sized, S: Space>(
    graph: &G,
    space: &S,
    ef: usize,
    scratch: &mut SearchScratch,
) {
    scratch.found.clear();
    let Some(entry) = graph.entry_point() else {
        return;
    };
    let mut current = Neighbour {
        id: entry,
        distance: space.distance(entry),
    };
    for layer in (1..graph.layers()).rev() {
        current = greedy(graph, space, current, layer);
    }
    search_layer(graph, space, &[current], ef, 0, scratch);
}

/// k-nearest-neighbour search with exact distances: [`search_graph`] with a beam of
/// `max(ef, k)`, cut to `k`. The query must be prepared for the metric and validated.
/// Returns at most `k` neighbours, nearest first, borrowed from `scratch`.
pub fn search<'s, G: Graph + ?Sized>(
    graph: &G,
    space: &ExactSpace<'_>,
    k: usize,
    ef: usize,
    scratch: &'s mut SearchScratch,
) -> &'s [Neighbour] {
    search_graph(graph, space, ef.max(k), scratch);
    scratch.found.truncate(k);
    &scratch.found
}

/// k-nearest-neighbour search that traverses with quantised distances and re-ranks the best
/// `rerank` (at least `k`) of the nodes it found with exact ones, so the answer's distances and
/// order are exact. Re-ranking fewer than `ef` saves exact rows, which are cold in memory once a
/// corpus outgrows the cache; the quantised order is close enough that the true top-`k` sit
/// near its front.
pub fn search_reranked<'s, G: Graph + ?Sized>(
    graph: &G,
    quantized: &QuantizedSpace<'_>,
    exact: &ExactSpace<'_>,
    k: usize,
    ef: usize,
    rerank: usize,
    scratch: &'s mut SearchScratch,
) -> &'s [Neighbour] {
    search_graph(graph, quantized, ef.max(k), scratch);
    scratch.found.truncate(rerank.max(k));
    // Exact rows are four times longer than codes and mostly cold: fetch the next one whole
    // while this one is compared.
    for i in 0..scratch.found.len() {
        if let Some(next) = scratch.found.get(i + 1) {
            exact.prefetch_row(next.id);
        }
        let n = &mut scratch.found[i];
        n.distance = exact.distance(n.id);
    }
    scratch.found.sort_unstable_by(Neighbour::cmp_nearest);
    scratch.found.truncate(k);
    &scratch.found
}
