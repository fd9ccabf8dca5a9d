//! Query-time search over any [`Graph`]: greedy descent, then a beam search on layer 0.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Graph;
use crate::kernels::prefetch;
use crate::metric::Metric;

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

/// Max-heap entry: the farthest result on top.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Farthest(Neighbour);
impl Eq for Farthest {}
impl PartialOrd for Farthest {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Farthest {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp_nearest(&other.0)
    }
}

/// Min-heap entry: the nearest candidate on top.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Nearest(Neighbour);
impl Eq for Nearest {}
impl PartialOrd for Nearest {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Nearest {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.cmp_nearest(&self.0)
    }
}

/// Memory one search needs, reused across searches so the query path allocates nothing once it
/// is warm: the visited marks are epoch numbers, so starting a search is O(1), not O(n).
#[derive(Debug, Default)]
pub struct SearchScratch {
    visited: Vec<u32>,
    epoch: u32,
    candidates: BinaryHeap<Nearest>,
    results: BinaryHeap<Farthest>,
    found: Vec<Neighbour>,
}

impl SearchScratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Prepares for a search over `nodes` nodes: grows the marks only the first time.
    fn begin(&mut self, nodes: usize) {
        if self.visited.len() < nodes {
            self.visited.resize(nodes, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.fill(0);
            self.epoch = 1;
        }
    }

    /// Marks `node` visited; returns whether it was new.
    #[inline]
    fn visit(&mut self, node: u32) -> bool {
        match self.visited.get_mut(node as usize) {
            Some(mark) if *mark != self.epoch => {
                *mark = self.epoch;
                true
            }
            _ => false,
        }
    }

    /// The results of the last [`search_layer`], nearest first.
    pub fn found(&self) -> &[Neighbour] {
        &self.found
    }
}

/// Vectors of a graph's nodes, row-major, and how to compare a query with them.
#[derive(Clone, Copy)]
struct Space<'a> {
    vectors: &'a [f32],
    dim: usize,
    metric: Metric,
}

impl Space<'_> {
    #[inline]
    fn row(&self, id: u32) -> &[f32] {
        let start = id as usize * self.dim;
        self.vectors.get(start..start + self.dim).unwrap_or(&[])
    }

    #[inline]
    fn distance(&self, query: &[f32], id: u32) -> f32 {
        self.metric.distance(query, self.row(id))
    }
}

/// Beam search of width `ef` on one layer from `entries`; the `ef` nearest nodes found are left
/// in `scratch.found()`, nearest first. Callers guarantee that every node id in the graph is
/// below `vectors.len() / dim` (snapshots check this when they are opened).
#[allow(clippy::too_many_arguments)]
pub fn search_layer<G: Graph + ?Sized>(
    graph: &G,
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    query: &[f32],
    entries: &[Neighbour],
    ef: usize,
    layer: usize,
    scratch: &mut SearchScratch,
) {
    let space = Space {
        vectors,
        dim,
        metric,
    };
    let nodes = vectors.len().checked_div(dim).unwrap_or(0);
    beam(graph, space, query, entries, ef.max(1), layer, nodes, scratch);
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn beam<G: Graph + ?Sized>(
    graph: &G,
    space: Space<'_>,
    query: &[f32],
    entries: &[Neighbour],
    ef: usize,
    layer: usize,
    nodes: usize,
    scratch: &mut SearchScratch,
) {
    scratch.begin(nodes);
    scratch.candidates.clear();
    scratch.results.clear();
    for &e in entries {
        if scratch.visit(e.id) {
            scratch.candidates.push(Nearest(e));
            scratch.results.push(Farthest(e));
        }
    }
    while scratch.results.len() > ef {
        scratch.results.pop();
    }
    // Unvisited neighbours of the node being expanded, fetched before their distances are
    // computed so the loads of later rows overlap with the arithmetic on earlier ones.
    let mut fresh = [0u32; 64];
    while let Some(Nearest(current)) = scratch.candidates.pop() {
        let bound = scratch.results.peek().map_or(f32::INFINITY, |f| f.0.distance);
        if current.distance > bound && scratch.results.len() >= ef {
            break;
        }
        for chunk in graph.neighbours(current.id, layer).chunks(fresh.len()) {
            let mut count = 0;
            for &n in chunk {
                if scratch.visit(n) {
                    prefetch(space.row(n));
                    fresh[count] = n;
                    count += 1;
                }
            }
            for &n in &fresh[..count] {
                let distance = space.distance(query, n);
                let worst = scratch.results.peek().map_or(f32::INFINITY, |f| f.0.distance);
                if scratch.results.len() < ef || distance < worst {
                    let found = Neighbour { id: n, distance };
                    scratch.candidates.push(Nearest(found));
                    scratch.results.push(Farthest(found));
                    if scratch.results.len() > ef {
                        scratch.results.pop();
                    }
                }
            }
        }
    }
    scratch.found.clear();
    scratch
        .found
        .extend(scratch.results.drain().map(|Farthest(n)| n));
    scratch.found.sort_unstable_by(Neighbour::cmp_nearest);
}

/// Greedy walk on one upper layer: move to the nearest neighbour until none is nearer.
fn greedy<G: Graph + ?Sized>(
    graph: &G,
    space: Space<'_>,
    query: &[f32],
    mut current: Neighbour,
    layer: usize,
) -> Neighbour {
    loop {
        let mut moved = false;
        for &n in graph.neighbours(current.id, layer) {
            let distance = space.distance(query, n);
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

/// k-nearest-neighbour search: greedy descent from the entry point through the upper layers,
/// then a beam of width `max(ef, k)` on layer 0. The query must already be prepared for the
/// metric (normalised for cosine) and validated. Returns at most `k` neighbours, nearest first,
/// borrowed from `scratch`.
#[allow(clippy::too_many_arguments)]
pub fn search<'s, G: Graph + ?Sized>(
    graph: &G,
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    query: &[f32],
    k: usize,
    ef: usize,
    scratch: &'s mut SearchScratch,
) -> &'s [Neighbour] {
    let space = Space {
        vectors,
        dim,
        metric,
    };
    let nodes = vectors.len().checked_div(dim).unwrap_or(0);
    scratch.found.clear();
    let Some(entry) = graph.entry_point() else {
        return &scratch.found;
    };
    let mut current = Neighbour {
        id: entry,
        distance: space.distance(query, entry),
    };
    for layer in (1..graph.layers()).rev() {
        current = greedy(graph, space, query, current, layer);
    }
    beam(graph, space, query, &[current], ef.max(k), 0, nodes, scratch);
    scratch.found.truncate(k);
    &scratch.found
}
