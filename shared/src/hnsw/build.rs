//! Incremental, single-threaded, seeded HNSW construction.

use rand_pcg::Pcg64Mcg;
use rand_pcg::rand_core::RngCore;

use super::search::{ExactSpace, Neighbour, SearchScratch, Space, greedy, search_layer};
use super::{FlatGraph, FlatLayer, Graph, HnswParams, MAX_LAYERS};
use crate::metric::Metric;
use crate::query::{QueryError, validate_vector};

/// Adjacency lists while building: `nodes[id][layer]` are `id`'s out-neighbours on `layer`.
#[derive(Debug, Default)]
struct Links {
    nodes: Vec<Vec<Vec<u32>>>,
    entry: Option<u32>,
    top: usize,
}

impl Graph for Links {
    #[inline]
    fn neighbours(&self, node: u32, layer: usize) -> &[u32] {
        self.nodes
            .get(node as usize)
            .and_then(|layers| layers.get(layer))
            .map_or(&[], Vec::as_slice)
    }

    fn entry_point(&self) -> Option<u32> {
        self.entry
    }

    fn layers(&self) -> usize {
        if self.entry.is_some() {
            self.top + 1
        } else {
            0
        }
    }
}

/// Builds an HNSW graph one vector at a time. Deterministic: the same parameters, seed and
/// insertion order give the same graph on every platform (no threads, no clock, no hashing).
#[derive(Debug)]
pub struct HnswBuilder {
    dim: usize,
    metric: Metric,
    params: HnswParams,
    vectors: Vec<f32>,
    links: Links,
    rng: Pcg64Mcg,
    scratch: SearchScratch,
}

impl HnswBuilder {
    /// An empty graph over `dim`-dimensional vectors compared by `metric`.
    pub fn new(dim: usize, metric: Metric, params: HnswParams) -> Self {
        let params = HnswParams {
            m: params.m.clamp(2, 256),
            ef_construction: params.ef_construction.max(1),
            ..params
        };
        HnswBuilder {
            dim,
            metric,
            params,
            vectors: Vec::new(),
            links: Links::default(),
            rng: Pcg64Mcg::new(u128::from(params.seed) | 1),
            scratch: SearchScratch::new(),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// Number of vectors inserted so far.
    pub fn len(&self) -> usize {
        self.links.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.nodes.is_empty()
    }

    /// The stored vectors, row-major, as prepared for the metric (normalised for cosine).
    pub fn vectors(&self) -> &[f32] {
        &self.vectors
    }

    /// Draws a node's top layer: geometric with ratio `1/m`, as in the paper (`mL = 1/ln m`).
    fn draw_level(&mut self) -> usize {
        let unit = (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let level = -(1.0 - unit).ln() / (self.params.m as f64).ln();
        (level as usize).min(MAX_LAYERS - 1)
    }

    fn distance_between(&self, a: u32, b: u32) -> f32 {
        self.metric.distance(self.row(a), self.row(b))
    }

    fn row(&self, id: u32) -> &[f32] {
        let start = id as usize * self.dim;
        &self.vectors[start..start + self.dim]
    }

    /// Inserts a vector (prepared here for the metric) and returns its node id, which is its
    /// insertion index.
    pub fn insert(&mut self, vector: &[f32]) -> Result<u32, QueryError> {
        validate_vector(vector, self.dim)?;
        let id = u32::try_from(self.len())
            .ok()
            .filter(|&id| id < u32::MAX)
            .ok_or(QueryError::TooManyVectors {
                max: u32::MAX as usize - 1,
            })?;
        let start = self.vectors.len();
        self.vectors.extend_from_slice(vector);
        self.metric.prepare(&mut self.vectors[start..]);
        let level = self.draw_level();
        self.links.nodes.push(vec![Vec::new(); level + 1]);

        let Some(entry) = self.links.entry else {
            self.links.entry = Some(id);
            self.links.top = level;
            return Ok(id);
        };
        let query = self.row(id).to_vec();
        let space = ExactSpace {
            vectors: &self.vectors,
            dim: self.dim,
            metric: self.metric,
            query: &query,
        };
        let mut current = Neighbour {
            id: entry,
            distance: space.distance(entry),
        };
        for layer in (level + 1..=self.links.top).rev() {
            current = greedy(&self.links, &space, current, layer);
        }
        let mut entries = vec![current];
        for layer in (0..=level.min(self.links.top)).rev() {
            let space = ExactSpace {
                vectors: &self.vectors,
                dim: self.dim,
                metric: self.metric,
                query: &query,
            };
            search_layer(
                &self.links,
                &space,
                &entries,
                self.params.ef_construction,
                layer,
                &mut self.scratch,
            );
            entries.clear();
            entries.extend_from_slice(self.scratch.found());
            let chosen = self.select(&entries, self.params.m);
            for &n in &chosen {
                self.link(n, id, layer);
            }
            self.links.nodes[id as usize][layer] = chosen;
        }
        if level > self.links.top {
            self.links.top = level;
            self.links.entry = Some(id);
        }
        Ok(id)
    }

    /// The neighbour-selection heuristic (the paper's algorithm 4): walk the candidates nearest
    /// first and keep one only if it is nearer to the base than to every neighbour kept so far,
    /// so the edges spread out in different directions. `candidates` must be sorted nearest first.
    fn select(&self, candidates: &[Neighbour], limit: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(limit);
        for c in candidates {
            if kept.len() >= limit {
                break;
            }
            if kept
                .iter()
                .all(|&k| self.distance_between(c.id, k) > c.distance)
            {
                kept.push(c.id);
            }
        }
        kept
    }

    /// Adds the edge `from → to` on `layer`, re-selecting `from`'s neighbours when it overflows.
    fn link(&mut self, from: u32, to: u32, layer: usize) {
        let max = self.params.max_degree(layer);
        let list = &mut self.links.nodes[from as usize][layer];
        list.push(to);
        if list.len() <= max {
            return;
        }
        let mut candidates: Vec<Neighbour> = self.links.nodes[from as usize][layer]
            .iter()
            .map(|&n| Neighbour {
                id: n,
                distance: self.distance_between(from, n),
            })
            .collect();
        candidates.sort_unstable_by(Neighbour::cmp_nearest);
        let kept = self.select(&candidates, max);
        self.links.nodes[from as usize][layer] = kept;
    }

    /// The graph in the flat layout of snapshots.
    pub fn to_flat(&self) -> FlatGraph {
        let mut layers = Vec::with_capacity(self.links.layers());
        for layer in 0..self.links.layers() {
            let mut flat = FlatLayer::default();
            flat.offsets.push(0);
            for (id, node) in self.links.nodes.iter().enumerate() {
                if let Some(list) = node.get(layer) {
                    if layer > 0 {
                        flat.nodes.push(id as u32);
                    }
                    flat.neighbours.extend_from_slice(list);
                    flat.offsets.push(flat.neighbours.len() as u32);
                }
            }
            layers.push(flat);
        }
        FlatGraph {
            entry_point: self.links.entry,
            layers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hnsw::search;

    fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = Pcg64Mcg::new(seed as u128 | 1);
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) - 0.5)
            .collect();
        for row in v.chunks_mut(dim) {
            crate::metric::normalise(row);
        }
        v
    }

    fn exact_top(vectors: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<u32> {
        let mut all: Vec<Neighbour> = vectors
            .chunks(dim)
            .enumerate()
            .map(|(i, r)| Neighbour {
                id: i as u32,
                distance: Metric::Cosine.distance(q, r),
            })
            .collect();
        all.sort_by(Neighbour::cmp_nearest);
        all.iter().take(k).map(|n| n.id).collect()
    }

    #[test]
    fn same_seed_same_graph() {
        let data = random_unit_vectors(300, 16, 1);
        let build = || {
            let mut b = HnswBuilder::new(16, Metric::Cosine, HnswParams::default());
            for row in data.chunks(16) {
                b.insert(row).unwrap();
            }
            b.to_flat()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn degrees_stay_bounded_and_ids_in_range() {
        let data = random_unit_vectors(1000, 8, 2);
        let params = HnswParams {
            m: 4,
            ef_construction: 32,
            seed: 3,
        };
        let mut b = HnswBuilder::new(8, Metric::L2, params);
        for row in data.chunks(8) {
            b.insert(row).unwrap();
        }
        let g = b.to_flat();
        assert!(g.layers.len() >= 2, "1000 nodes with m=4 reach layer 1");
        for (l, layer) in g.layers.iter().enumerate() {
            assert!(layer.stats().max_degree <= params.max_degree(l));
            assert!(layer.neighbours.iter().all(|&n| n < 1000));
        }
    }

    #[test]
    fn finds_most_true_neighbours_on_random_data() {
        let dim = 24;
        let data = random_unit_vectors(2000, dim, 5);
        let queries = random_unit_vectors(50, dim, 6);
        let mut b = HnswBuilder::new(dim, Metric::Cosine, HnswParams::default());
        for row in data.chunks(dim) {
            b.insert(row).unwrap();
        }
        let g = b.to_flat();
        let mut scratch = SearchScratch::new();
        let mut hits = 0;
        for q in queries.chunks(dim) {
            let truth = exact_top(b.vectors(), dim, q, 10);
            let space = ExactSpace {
                vectors: b.vectors(),
                dim,
                metric: Metric::Cosine,
                query: q,
            };
            let got = search(&g, &space, 10, 64, &mut scratch);
            hits += got.iter().filter(|n| truth.contains(&n.id)).count();
        }
        let recall = hits as f64 / 500.0;
        assert!(recall >= 0.95, "recall {recall}");
    }

    #[test]
    fn rejects_bad_vectors_without_changing_the_graph() {
        let mut b = HnswBuilder::new(4, Metric::Cosine, HnswParams::default());
        assert!(b.insert(&[1.0, 0.0, 0.0]).is_err());
        assert!(b.insert(&[1.0, f32::NAN, 0.0, 0.0]).is_err());
        assert!(b.is_empty());
        assert_eq!(b.insert(&[1.0, 0.0, 0.0, 0.0]), Ok(0));
    }

    #[test]
    fn empty_graph_searches_to_nothing() {
        let b = HnswBuilder::new(4, Metric::Cosine, HnswParams::default());
        let g = b.to_flat();
        let mut scratch = SearchScratch::new();
        let space = ExactSpace {
            vectors: &[],
            dim: 4,
            metric: Metric::Cosine,
            query: &[1.0, 0.0, 0.0, 0.0],
        };
        assert!(search(&g, &space, 3, 10, &mut scratch).is_empty());
    }
}
