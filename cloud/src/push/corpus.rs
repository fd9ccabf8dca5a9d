//! What pushing reads of a collection — points by id, graph and exact nearest neighbours — as a
//! small trait, so planning, certifying and restoring run over anything that answers it: a
//! collection in hand, or [`ServiceCorpus`], the collection as the whole cluster holds it.

use std::sync::Arc;
use std::time::Duration;

use crate::collection::{Collection, CollectionInfo, Point, SearchParams};
use crate::service::Service;

/// What planning (and certifying, and restoring) reads of a collection.
pub trait Corpus {
    fn info(&self) -> &CollectionInfo;
    /// The live point `id`.
    fn get(&self, id: u64) -> Option<Point>;
    /// The live points `ids`, in order (vectors may be left empty unless `vectors`); `None`
    /// when some could not be read (a shard without a live replica). One batch, so that a
    /// cluster asks each node once rather than once per id.
    fn get_many(&self, ids: &[u64], vectors: bool) -> Option<Vec<Option<Point>>> {
        let _ = vectors;
        Some(ids.iter().map(|&id| self.get(id)).collect())
    }
    /// The ids of the `k` points the graph search finds nearest `query` (prepared) with beam
    /// `ef`; `None` if the search fails.
    fn search(&self, query: &[f32], k: usize, ef: usize) -> Option<Vec<u64>>;
    /// The ids of the exactly nearest `k` points to `query` (prepared), nearest first; `None`
    /// if the search fails.
    fn exact(&self, query: &[f32], k: usize) -> Option<Vec<u64>>;
    /// When point `id` was deleted, if this corpus knows (`None`: it exists, or nothing is
    /// known of it here).
    fn deleted_at(&self, id: u64) -> Option<u64>;
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

    fn deleted_at(&self, id: u64) -> Option<u64> {
        Collection::deleted_at(self, id)
    }
}

/// A collection as the whole cloud holds it: reads go through the service, which asks the
/// nodes holding the shards this node does not (off a cluster, or holding every shard, the
/// collection itself answers). Reads may wait on other nodes: call it off async workers.
pub struct ServiceCorpus {
    pub service: Arc<Service>,
    pub collection: Arc<Collection>,
}

impl ServiceCorpus {
    fn nearest(&self, query: &[f32], k: usize, ef: usize, exact: bool) -> Option<Vec<u64>> {
        let params = SearchParams {
            k,
            ef,
            exact,
            max_distance: None,
        };
        let answer = self
            .service
            .search_in(&self.collection, query, &params, &[], Duration::ZERO, false)
            .ok()?;
        // Neighbours missing a shard would make an anchor claim what it cannot: none.
        answer
            .missing_shards
            .is_empty()
            .then(|| answer.hits.iter().map(|h| h.id).collect())
    }
}

impl Corpus for ServiceCorpus {
    fn info(&self) -> &CollectionInfo {
        &self.collection.info
    }

    fn get(&self, id: u64) -> Option<Point> {
        self.service.get_from(&self.collection, id).ok().flatten()
    }

    fn get_many(&self, ids: &[u64], vectors: bool) -> Option<Vec<Option<Point>>> {
        self.service
            .get_many_from(&self.collection, ids, vectors)
            .ok()
    }

    fn search(&self, query: &[f32], k: usize, ef: usize) -> Option<Vec<u64>> {
        self.nearest(query, k, ef, false)
    }

    fn exact(&self, query: &[f32], k: usize) -> Option<Vec<u64>> {
        self.nearest(query, k, k, true)
    }

    fn deleted_at(&self, id: u64) -> Option<u64> {
        self.collection.deleted_at(id)
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
