//! The graph index of a collection: hnsw_rs holds and grows the graph; tiervec searches
//! immutable *generations* exported from it.
//!
//! hnsw_rs inserts concurrently and in parallel, which suits bulk loads, but its own search
//! allocates and locks per visited node (≈ 8× slower than tiervec's search over the very same
//! graph in `bench local`). So the indexer periodically exports the graph
//! (`get_point_indexation()`) into tiervec's flat layout with `i8` codes — a [`Generation`] —
//! and searches run tiervec's quantised beam search over it, re-ranked with exact distances.
//! Points written after the last export are searched exactly until the next one.

use hnsw_rs::prelude::{Distance, Hnsw};
use tiervec_shared::Metric;
use tiervec_shared::hnsw::{FlatGraph, FlatLayer, HnswParams};
use tiervec_shared::snapshot::QuantSection;

/// tiervec's distance for hnsw_rs (anndists' `DistDot` asserts `dot ≤ 1` and panics on
/// normalised f32 vectors whose self-dot rounds above 1).
///
/// hnsw_rs asserts that distances are non-negative, which tiervec's are not quite: a cosine
/// distance between (near-)identical unit vectors can round to −1e-7, and `dot` distances are
/// negative by definition. hnsw_rs only *compares* distances, so it is given a monotone,
/// non-negative image of them: cosine clamped at 0, `dot` mapped through `1 + d / (1 + |d|)`
/// into (0, 2). Graph structure is unchanged; tiervec's search computes true distances.
///
/// Writes bound components (`query::MAX_COMPONENT`) so that no distance overflows, but the
/// assertion aborts a whole maintenance pass, so a non-finite distance is still mapped to a
/// finite one: the farthest possible, or for `dot`'s −∞ the nearest.
pub struct MetricDistance(pub Metric);

impl Distance<f32> for MetricDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        let d = self.0.distance(a, b);
        match self.0 {
            _ if d.is_nan() => f32::MAX,
            Metric::Cosine | Metric::L2 => d.clamp(0.0, f32::MAX),
            Metric::Dot if d == f32::NEG_INFINITY => 0.0,
            Metric::Dot if d == f32::INFINITY => 2.0,
            Metric::Dot => 1.0 + d / (1.0 + d.abs()),
        }
    }
}

/// hnsw_rs's own layer limit.
const MAX_LAYER: usize = 16;

/// An hnsw_rs graph whose data ids are collection slots.
pub struct GraphIndex {
    hnsw: Hnsw<'static, f32, MetricDistance>,
}

/// Batches at least this large are inserted with hnsw_rs's parallel insert.
const PARALLEL_INSERT_MIN: usize = 64;

impl GraphIndex {
    pub fn new(metric: Metric, params: HnswParams, capacity: usize) -> GraphIndex {
        GraphIndex {
            hnsw: Hnsw::new(
                params.m,
                capacity.max(1024),
                MAX_LAYER,
                params.ef_construction,
                MetricDistance(metric),
            ),
        }
    }

    /// Inserts `(row, slot)` pairs (in parallel for large batches).
    /// Whether no point was ever inserted (hnsw_rs's point iterator, which [`export`] walks,
    /// panics on a graph without an entry point).
    ///
    /// [`export`]: GraphIndex::export
    pub fn is_empty(&self) -> bool {
        self.hnsw.get_nb_point() == 0
    }

    pub fn insert(&self, rows: &[(&[f32], usize)]) {
        if rows.len() >= PARALLEL_INSERT_MIN {
            self.hnsw.parallel_insert_slice(&rows.to_vec());
        } else {
            for &(row, slot) in rows {
                self.hnsw.insert_slice((row, slot));
            }
        }
    }

    /// hnsw_rs's own k-NN search: `(slot, distance)` nearest first (distances as given to
    /// hnsw_rs; see [`MetricDistance`]).
    pub fn search_own(&self, query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        self.hnsw
            .search(query, k, ef)
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    /// The graph restricted to slots below `len`, in tiervec's flat layout. Edges to slots at or
    /// above `len` (inserted concurrently) are dropped; slots hnsw_rs does not hold (deleted
    /// before indexing) get no edges.
    pub fn export(&self, len: usize) -> FlatGraph {
        let index = self.hnsw.get_point_indexation();
        let mut lists: Vec<Vec<Vec<u32>>> = vec![Vec::new(); len];
        let mut top = 0usize;
        for point in index {
            let slot = point.get_origin_id();
            if slot >= len {
                continue;
            }
            let level = point.get_point_id().0 as usize;
            top = top.max(level);
            let mut per_layer = point.get_neighborhood_id();
            per_layer.truncate(level + 1);
            lists[slot] = per_layer
                .into_iter()
                .map(|layer| {
                    layer
                        .iter()
                        .filter(|n| n.d_id < len)
                        .map(|n| n.d_id as u32)
                        .collect()
                })
                .collect();
        }
        flatten(&lists, top)
    }
}

/// Builds the flat layout from per-node, per-layer lists.
pub fn flatten(lists: &[Vec<Vec<u32>>], top: usize) -> FlatGraph {
    let mut layers = Vec::with_capacity(top + 1);
    for l in 0..=top {
        let mut flat = FlatLayer::default();
        flat.offsets.push(0);
        for (node, per_layer) in lists.iter().enumerate() {
            match per_layer.get(l) {
                Some(list) => {
                    if l > 0 {
                        flat.nodes.push(node as u32);
                    }
                    flat.neighbours.extend_from_slice(list);
                    flat.offsets.push(flat.neighbours.len() as u32);
                }
                None if l == 0 => flat.offsets.push(flat.neighbours.len() as u32),
                None => {}
            }
        }
        layers.push(flat);
    }
    // hnsw_rs's entry point is a node on its highest layer; any such node serves.
    let entry_point = layers
        .iter()
        .rev()
        .find_map(|l| l.nodes.first().copied())
        .or_else(|| lists.iter().position(|p| !p.is_empty()).map(|n| n as u32));
    if entry_point.is_none() {
        return FlatGraph::default();
    }
    // Drop empty upper layers (nodes above deleted entries), keeping the entry on the top one.
    while layers.len() > 1 && layers.last().is_some_and(|l| l.nodes.is_empty()) {
        layers.pop();
    }
    FlatGraph {
        entry_point: layers
            .last()
            .and_then(|l| l.nodes.first().copied())
            .or(entry_point),
        layers,
    }
}

/// An immutable, searchable export of the graph over slots `0..len`.
pub struct Generation {
    pub len: usize,
    pub graph: FlatGraph,
    pub codes: QuantSection,
}

impl Generation {
    pub fn empty() -> Generation {
        Generation {
            len: 0,
            graph: FlatGraph::default(),
            codes: QuantSection::default(),
        }
    }

    /// Exports `index` over slots `0..len` with `i8` codes of `vectors` (row-major, `dim`).
    pub fn export(index: &GraphIndex, vectors: &[f32], dim: usize, len: usize) -> Generation {
        let graph = index.export(len);
        Generation {
            len,
            graph,
            codes: QuantSection::build(&vectors[..len * dim], dim),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hnsw_rs asserts `distance >= 0` and a failed assertion stops indexing for good, so no
    /// pair of vectors, however extreme, may give it a negative or NaN distance.
    #[test]
    fn distances_given_to_hnsw_rs_are_finite_and_non_negative_for_any_vectors() {
        let extremes = [
            0.0,
            1.0,
            -1.0,
            1e20,
            -1e20,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NAN,
        ];
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            let distance = MetricDistance(metric);
            for &x in &extremes {
                for &y in &extremes {
                    let d = distance.eval(&[x, 1.0, x], &[y, y, -1.0]);
                    assert!(d.is_finite() && d >= 0.0, "{metric:?} ({x}, {y}) → {d}");
                }
            }
        }
    }
}
