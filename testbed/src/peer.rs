//! hnsw_rs, the peer the edge search is measured against: built over the same vectors with the
//! same `M` and `ef_construction`, with tiervec's cosine distance, and its graph exportable into
//! tiervec's flat layout so both searches can also be compared over one graph.

use hnsw_rs::prelude::{Distance, Hnsw};
use tiervec_shared::Metric;
use tiervec_shared::hnsw::{FlatGraph, FlatLayer};

/// tiervec's cosine distance, handed to hnsw_rs. (anndists' `DistDot` asserts `dot ≤ 1` and
/// panics on normalised vectors whose f32 self-dot rounds above 1: 20,053 of the base vectors.)
pub struct TiervecCosine;

impl Distance<f32> for TiervecCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        Metric::Cosine.distance(a, b)
    }
}

/// Layers hnsw_rs may use (its own maximum).
const HNSW_RS_MAX_LAYER: usize = 16;

/// Builds hnsw_rs over `rows` (data id = position), inserting in parallel on all cores.
pub fn build(
    rows: &[&[f32]],
    m: usize,
    ef_construction: usize,
) -> Hnsw<'static, f32, TiervecCosine> {
    let hnsw = Hnsw::new(
        m,
        rows.len(),
        HNSW_RS_MAX_LAYER,
        ef_construction,
        TiervecCosine,
    );
    let with_ids: Vec<(&[f32], usize)> = rows.iter().enumerate().map(|(i, r)| (*r, i)).collect();
    hnsw.parallel_insert_slice(&with_ids);
    hnsw
}

/// hnsw_rs's graph in tiervec's flat layout (through `get_point_indexation()`), node `i` being
/// data id `i`. The entry point is the first node on the highest layer, as in hnsw_rs.
pub fn export_graph(hnsw: &Hnsw<'_, f32, TiervecCosine>) -> FlatGraph {
    let index = hnsw.get_point_indexation();
    let top = index.get_max_level_observed() as usize;
    let count = index.get_nb_point();
    // neighbours[node][layer]
    let mut lists: Vec<Vec<Vec<u32>>> = vec![Vec::new(); count];
    for point in index {
        let node = point.get_origin_id();
        let level = point.get_point_id().0 as usize;
        let mut per_layer = point.get_neighborhood_id();
        per_layer.truncate(level + 1);
        lists[node] = per_layer
            .into_iter()
            .map(|layer| layer.iter().map(|n| n.d_id as u32).collect())
            .collect();
    }
    let mut layers = Vec::with_capacity(top + 1);
    for l in 0..=top {
        let mut flat = FlatLayer::default();
        flat.offsets.push(0);
        for (node, per_layer) in lists.iter().enumerate() {
            if let Some(list) = per_layer.get(l) {
                if l > 0 {
                    flat.nodes.push(node as u32);
                }
                flat.neighbours.extend_from_slice(list);
                flat.offsets.push(flat.neighbours.len() as u32);
            } else if l == 0 {
                flat.offsets.push(flat.neighbours.len() as u32);
            }
        }
        layers.push(flat);
    }
    let entry_point = layers[top]
        .nodes
        .first()
        .copied()
        .or_else(|| (count > 0).then_some(0));
    FlatGraph {
        entry_point,
        layers,
    }
}
