//! What pushing reads of a collection — points by id, graph and exact nearest neighbours — as a
//! small trait, so planning, certifying and restoring run over anything that answers it.

use crate::collection::{Collection, CollectionInfo, Point, SearchParams};

/// What planning (and certifying, and restoring) reads of a collection.
pub trait Corpus {
    fn info(&self) -> &CollectionInfo;
    /// The live point `id`.
    fn get(&self, id: u64) -> Option<Point>;
    /// The ids of the `k` points the graph search finds nearest `query` (prepared) with beam
    /// `ef`; `None` if the search fails.
    fn search(&self, query: &[f32], k: usize, ef: usize) -> Option<Vec<u64>>;
    /// The ids of the exactly nearest `k` points to `query` (prepared), nearest first; `None`
    /// if the search fails.
    fn exact(&self, query: &[f32], k: usize) -> Option<Vec<u64>>;
}

impl Corpus for Collection {
    fn info(&self) -> &CollectionInfo {
        &self.info
    }

    fn get(&self, id: u64) -> Option<Point> {
        Collection::get(self, id)
    }

    fn search(&self, query: &[f32], k: usize, ef: usize) -> Option<Vec<u64>> {
        nearest_ids(self, query, k, ef, false)
    }

    fn exact(&self, query: &[f32], k: usize) -> Option<Vec<u64>> {
        nearest_ids(self, query, k, k, true)
    }
}

fn nearest_ids(
    collection: &Collection,
    query: &[f32],
    k: usize,
    ef: usize,
    exact: bool,
) -> Option<Vec<u64>> {
    let params = SearchParams {
        k,
        ef,
        exact,
        max_distance: None,
    };
    let (hits, _) = collection.search(query, &params).ok()?;
    Some(hits.iter().map(|h| h.id).collect())
}
