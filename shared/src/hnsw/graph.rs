//! Graph storage: the trait the search runs over, and the flat per-layer layout of snapshots.

/// Adjacency as the search sees it. Node ids index the vector array; `layer` 0 holds every
/// node, and each higher layer a subset.
pub trait Graph {
    /// Out-neighbours of `node` on `layer` (empty when the node is not on that layer).
    fn neighbours(&self, node: u32, layer: usize) -> &[u32];
    /// Where the search starts, on the top layer; `None` for an empty graph.
    fn entry_point(&self) -> Option<u32>;
    /// Number of layers (the top layer is `layers() - 1`).
    fn layers(&self) -> usize;
    /// Starts loading `node`'s neighbour list on `layer`, which the search will read soon.
    #[inline]
    fn prefetch_neighbours(&self, node: u32, layer: usize) {
        let _ = (node, layer);
    }
}

/// One layer in compressed sparse row form: node `nodes[i]`'s neighbours are
/// `neighbours[offsets[i]..offsets[i + 1]]`. On layer 0 `nodes` is empty and `i` is the node id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatLayer {
    /// Sorted ids of the nodes on this layer; empty on layer 0, which holds every node.
    pub nodes: Vec<u32>,
    /// `nodes.len() + 1` (layer 0: node count + 1) ascending offsets into `neighbours`.
    pub offsets: Vec<u32>,
    /// All neighbour lists, one after another.
    pub neighbours: Vec<u32>,
}

/// A whole graph in the flat layout that snapshots archive: few large arrays instead of one
/// list per node, so validating an archived graph costs a handful of bounds checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatGraph {
    pub entry_point: Option<u32>,
    pub layers: Vec<FlatLayer>,
}

/// Finds `node`'s row on a layer in flat form; shared by [`FlatGraph`] and archived graphs.
#[inline]
pub(crate) fn flat_neighbours<'a>(
    nodes: &[u32],
    offsets: &[u32],
    neighbours: &'a [u32],
    node: u32,
    layer: usize,
) -> &'a [u32] {
    let row = if layer == 0 {
        node as usize
    } else {
        match nodes.binary_search(&node) {
            Ok(i) => i,
            Err(_) => return &[],
        }
    };
    match (offsets.get(row), offsets.get(row + 1)) {
        (Some(&start), Some(&end)) => neighbours.get(start as usize..end as usize).unwrap_or(&[]),
        _ => &[],
    }
}

impl Graph for FlatGraph {
    #[inline]
    fn neighbours(&self, node: u32, layer: usize) -> &[u32] {
        match self.layers.get(layer) {
            Some(l) => flat_neighbours(&l.nodes, &l.offsets, &l.neighbours, node, layer),
            None => &[],
        }
    }

    fn entry_point(&self) -> Option<u32> {
        self.entry_point
    }

    fn layers(&self) -> usize {
        self.layers.len()
    }
}

/// Degree statistics of one layer, for `inspect` and the benchmarks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerStats {
    pub nodes: usize,
    pub edges: usize,
    pub max_degree: usize,
    pub mean_degree: f64,
}

impl FlatLayer {
    /// Node count, edge count and degree figures of this layer.
    pub fn stats(&self) -> LayerStats {
        layer_stats(&self.offsets)
    }
}

/// Degree statistics from a layer's offsets array (works on archived layers too).
pub fn layer_stats(offsets: &[u32]) -> LayerStats {
    let nodes = offsets.len().saturating_sub(1);
    let max_degree = offsets
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]) as usize)
        .max()
        .unwrap_or(0);
    let edges = offsets.last().copied().unwrap_or(0) as usize;
    LayerStats {
        nodes,
        edges,
        max_degree,
        mean_degree: if nodes == 0 {
            0.0
        } else {
            edges as f64 / nodes as f64
        },
    }
}
