//! An edge's cache as pure data, searched the same way by the native edge and the WASM guest:
//! a snapshot (borrowed, searched in place) plus an overlay of what pushed deltas added, hid and
//! anchored, searched as one merged top-k, with the nearest anchor and — where a certificate
//! allows — a *certified* answer (see `docs/protocol.md`, "Certified answers").
//!
//! [`LocalCache`] holds no snapshot: the caller passes the [`SnapshotView`] it was built over
//! (the native edge owns a memory map, the guest a buffer in its linear memory), so the same
//! value works over both and compaction can build one over a new snapshot.
//!
//! Certification: see [`crate::certificate`].

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::certificate::{certifiable, certificate_slack, euclidean};
use crate::hnsw::{Neighbour, SearchScratch};
use crate::metric::Metric;
use crate::push::{Applied, Delta, Manifest, PushError, anchor_id, vector_bytes};
use crate::query::{QueryError, validate_search};
use crate::snapshot::SnapshotView;

mod anchors;
use anchors::Anchors;

/// A collection's shape: known from the snapshot, or from the first delta of an empty cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub dim: usize,
    pub metric: Metric,
}

/// One hit of a local search.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalHit {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
    /// The vector's payload as a JSON text.
    pub payload: Option<String>,
}

/// A local search's answer: the merged top-k, the nearest anchor, and whether a certificate
/// proves the hits are the corpus's exact top-k.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalSearch {
    pub hits: Vec<LocalHit>,
    /// The nearest held anchor and its distance (in the metric), if any anchor is held.
    pub nearest_anchor: Option<(u64, f32)>,
    pub certified: bool,
}

/// What deltas added since the snapshot.
#[derive(Clone, Debug, Default)]
struct Overlay {
    ids: Vec<u64>,
    lsns: Vec<u64>,
    vectors: Vec<f32>,
    payloads: Vec<Option<String>>,
    slot: HashMap<u64, usize>,
    /// Snapshot ids not to return (evicted, tombstoned, or superseded by the overlay).
    hidden: HashSet<u64>,
}

impl Overlay {
    fn remove(&mut self, id: u64, dim: usize) {
        self.hidden.insert(id);
        let Some(slot) = self.slot.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        self.ids.swap_remove(slot);
        self.lsns.swap_remove(slot);
        self.payloads.swap_remove(slot);
        if slot != last {
            let (head, tail) = self.vectors.split_at_mut(last * dim);
            head[slot * dim..(slot + 1) * dim].copy_from_slice(&tail[..dim]);
            self.slot.insert(self.ids[slot], slot);
        }
        self.vectors.truncate(last * dim);
    }

    fn upsert(&mut self, id: u64, lsn: u64, vector: &[f32], payload: Option<String>, dim: usize) {
        self.hidden.insert(id);
        match self.slot.get(&id) {
            Some(&slot) => {
                self.lsns[slot] = lsn;
                self.payloads[slot] = payload;
                self.vectors[slot * dim..(slot + 1) * dim].copy_from_slice(vector);
            }
            None => {
                self.slot.insert(id, self.ids.len());
                self.ids.push(id);
                self.lsns.push(lsn);
                self.payloads.push(payload);
                self.vectors.extend_from_slice(vector);
            }
        }
    }
}

/// A cache: what a snapshot holds (by reference) plus what deltas changed, and the
/// [`Manifest`] both describe. Cheap enough to clone per delta for copy-on-write readers.
#[derive(Clone, Debug, Default)]
pub struct LocalCache {
    shape: Option<Shape>,
    manifest: Manifest,
    overlay: Overlay,
    anchors: Anchors,
    /// Node of each snapshot id (certificate members are looked up by id); shared between
    /// clones, it changes only with the snapshot.
    snapshot_nodes: Arc<HashMap<u64, u32>>,
}

impl LocalCache {
    /// A cache with no snapshot, bound to no collection until its first delta.
    pub fn empty() -> LocalCache {
        LocalCache::default()
    }

    /// The cache a snapshot describes, with no overlay. Anchors come without certificates:
    /// those live for one connection and are never read back from a file.
    pub fn over_snapshot(view: &SnapshotView<'_>) -> LocalCache {
        let dim = view.dim();
        let mut manifest = Manifest::new(view.header().spec.collection.0, view.manifest_version());
        let mut nodes = HashMap::with_capacity(view.len());
        for node in 0..view.len() as u32 {
            let id = view.ids()[node as usize];
            let payload = view.stored_payload(node).map_or(0, str::len);
            manifest.insert(id, view.lsn(node).unwrap_or(0), vector_bytes(dim, payload));
            nodes.insert(id, node);
        }
        let mut anchors = Anchors::default();
        for i in 0..view.anchor_count() {
            if let Some((vector, members)) = view.anchor(i) {
                let id = anchor_id(vector);
                manifest.insert_anchor(id, members.to_vec(), dim);
                anchors.upsert(id, vector, 0.0);
            }
        }
        LocalCache {
            shape: Some(Shape {
                dim,
                metric: view.metric(),
            }),
            manifest,
            overlay: Overlay::default(),
            anchors,
            snapshot_nodes: Arc::new(nodes),
        }
    }

    pub fn shape(&self) -> Option<Shape> {
        self.shape
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    /// Vectors held in the overlay (not yet compacted into a snapshot).
    pub fn overlay_len(&self) -> usize {
        self.overlay.ids.len()
    }

    /// Whether a snapshot id is hidden by the overlay (evicted, tombstoned or superseded).
    pub fn hides(&self, id: u64) -> bool {
        self.overlay.hidden.contains(&id)
    }

    /// The overlay's vectors: id, LSN, prepared components and payload.
    pub fn overlay_rows(&self) -> impl Iterator<Item = (u64, u64, &[f32], Option<&str>)> {
        let dim = self.shape.map_or(1, |s| s.dim.max(1));
        self.overlay
            .vectors
            .chunks_exact(dim)
            .enumerate()
            .map(|(slot, v)| {
                (
                    self.overlay.ids[slot],
                    self.overlay.lsns[slot],
                    v,
                    self.overlay.payloads[slot].as_deref(),
                )
            })
    }

    /// Every held anchor: id, point and member ids.
    pub fn anchors(&self) -> impl Iterator<Item = (u64, &[f32], &[u64])> {
        let dim = self.shape.map_or(1, |s| s.dim.max(1));
        self.anchors
            .ids
            .iter()
            .zip(self.anchors.vectors.chunks_exact(dim))
            .map(|(&id, v)| (id, v, self.manifest.anchor_members(id).unwrap_or_default()))
    }

    /// Binds a cache that belongs to no collection incarnation yet to `collection`.
    pub fn bind(&mut self, collection: [u8; 16]) {
        if self.manifest.collection_id == [0; 16] {
            self.manifest.collection_id = collection;
        }
    }

    /// Held anchors with a certificate.
    pub fn certified_anchors(&self) -> usize {
        self.anchors.radii.iter().filter(|r| **r > 0.0).count()
    }

    /// Forgets every certificate (a new connection, or a restart: the cloud maintains only
    /// those it sent on the current connection).
    pub fn drop_certificates(&mut self) {
        self.set_certificates(&[]);
    }

    /// The certificates in force: each certified anchor and its radius.
    pub fn certificates(&self) -> Vec<(u64, f32)> {
        self.anchors
            .ids
            .iter()
            .zip(&self.anchors.radii)
            .filter(|(_, r)| **r > 0.0)
            .map(|(&id, &r)| (id, r))
            .collect()
    }

    /// Makes `certificates` the ones in force: the listed anchors this cache holds get their
    /// radius, every other anchor none. A compacted cache takes the live one's this way (the
    /// live cache knows which certificates are current), and so does a WASM guest following
    /// the native cache.
    pub fn set_certificates(&mut self, certificates: &[(u64, f32)]) {
        self.anchors.radii.iter_mut().for_each(|r| *r = 0.0);
        for &(id, radius) in certificates {
            if let Some(&slot) = self.anchors.slot.get(&id) {
                self.anchors.radii[slot] = radius;
            }
        }
    }

    /// Applies a delta (checked against the manifest first); on error nothing changes. With
    /// `accept_certificates` false, the delta's radii are taken as 0 (a delta of a connection
    /// that is no longer current).
    pub fn apply(
        &mut self,
        delta: &Delta,
        accept_certificates: bool,
    ) -> Result<Applied, PushError> {
        let shape = match self.shape {
            Some(s) => s,
            None => Shape {
                dim: delta.dim as usize,
                metric: Metric::from_code(delta.metric).ok_or(PushError::WrongCollection)?,
            },
        };
        let unbound = self.manifest.version == 0
            && self.manifest.is_empty()
            && self.manifest.anchor_count() == 0;
        if unbound {
            self.manifest.collection_id = delta.collection_id;
        }
        let applied = match self.manifest.apply(delta, shape.dim) {
            Ok(applied) => applied,
            Err(e) => {
                if unbound {
                    self.manifest.collection_id = [0; 16];
                }
                return Err(e);
            }
        };
        let dim = shape.dim;
        for &id in &applied.removed {
            self.overlay.remove(id, dim);
        }
        for &i in &applied.vectors {
            let v = &delta.vectors[i];
            self.overlay
                .upsert(v.id, v.lsn, &v.vector, v.payload.clone(), dim);
        }
        for &a in &applied.anchors_removed {
            self.anchors.remove(a, dim);
        }
        let radius = |r: f32| if accept_certificates { r } else { 0.0 };
        for a in &delta.anchors {
            self.anchors
                .upsert(a.anchor_id, &a.vector, radius(a.radius));
        }
        for &i in &applied.certificates {
            let c = &delta.certificates[i];
            if let Some(&slot) = self.anchors.slot.get(&c.anchor_id) {
                self.anchors.radii[slot] = radius(c.radius);
            }
        }
        self.shape = Some(shape);
        Ok(applied)
    }

    /// The prepared vector of a held id, from the overlay or the snapshot.
    fn held_vector<'v>(
        &'v self,
        snapshot: Option<&SnapshotView<'v>>,
        id: u64,
    ) -> Option<HeldRef<'v>> {
        let dim = self.shape?.dim;
        if let Some(&slot) = self.overlay.slot.get(&id) {
            return Some(HeldRef {
                vector: &self.overlay.vectors[slot * dim..(slot + 1) * dim],
                lsn: self.overlay.lsns[slot],
                at: Held::Overlay(slot),
            });
        }
        if self.overlay.hidden.contains(&id) {
            return None;
        }
        let view = snapshot?;
        let node = *self.snapshot_nodes.get(&id)?;
        Some(HeldRef {
            vector: view.vector(node)?,
            lsn: view.lsn(node).unwrap_or(0),
            at: Held::Snapshot(node),
        })
    }

    /// The payload of a held vector, a JSON text.
    fn payload<'v>(
        &'v self,
        snapshot: Option<&SnapshotView<'v>>,
        at: Held,
    ) -> Option<Cow<'v, str>> {
        match at {
            Held::Overlay(slot) => self.overlay.payloads[slot].as_deref().map(Cow::Borrowed),
            Held::Snapshot(node) => snapshot?.payload(node),
        }
    }

    /// The `k` nearest held vectors to `query` (snapshot through its graph with beam `ef`,
    /// overlay exactly), the nearest anchor, and a certified exact answer where a certificate
    /// proves one. `snapshot` must be the one this cache was built over.
    ///
    /// With a warm `scratch`, what a search allocates is its answer (the hits and their
    /// payloads), never anything that grows with the cache: candidates carry where their
    /// vector is held, and payloads are copied for the `k` hits returned only.
    pub fn search(
        &self,
        snapshot: Option<&SnapshotView<'_>>,
        query: &[f32],
        k: usize,
        ef: usize,
        scratch: &mut LocalScratch,
    ) -> Result<LocalSearch, QueryError> {
        let Some(shape) = self.shape else {
            // An empty cache that has not heard of its collection: nothing to check the
            // dimension against, nothing to answer with.
            validate_search(query, query.len(), k, ef)?;
            return Ok(LocalSearch::default());
        };
        validate_search(query, shape.dim, k, ef)?;
        let LocalScratch {
            graph,
            query: prepared,
            candidates,
            overlay_scores,
            anchors,
            covering,
            members,
        } = scratch;
        prepared.clear();
        prepared.extend_from_slice(query);
        shape.metric.prepare(prepared);
        let overlay = &self.overlay;
        candidates.clear();
        if let Some(view) = snapshot {
            let wanted = k + overlay.hidden.len().min(ef);
            for &Neighbour { id: node, distance } in
                view.search(prepared, wanted, ef.max(wanted), graph)
            {
                let id = view.ids()[node as usize];
                if !overlay.hidden.contains(&id) {
                    candidates.push(Candidate {
                        id,
                        distance,
                        lsn: view.lsn(node).unwrap_or(0),
                        at: Held::Snapshot(node),
                    });
                }
            }
        }
        let dim = shape.dim;
        overlay_scores.clear();
        overlay_scores.extend(
            overlay
                .vectors
                .chunks_exact(dim)
                .enumerate()
                .map(|(slot, v)| (shape.metric.distance(prepared, v), slot)),
        );
        let take = k.min(overlay_scores.len());
        if take > 0 {
            overlay_scores.select_nth_unstable_by(take - 1, |a, b| a.0.total_cmp(&b.0));
        }
        candidates.extend(
            overlay_scores[..take]
                .iter()
                .map(|&(distance, slot)| Candidate {
                    id: overlay.ids[slot],
                    distance,
                    lsn: overlay.lsns[slot],
                    at: Held::Overlay(slot),
                }),
        );
        candidates.sort_unstable_by(nearest_first);
        candidates.truncate(k);

        let nearest_anchor = self.anchors.nearest(prepared, shape.metric, dim, anchors);
        let certified = self.certify(snapshot, shape, prepared, k, covering, members);
        let hit = |c: &Candidate| LocalHit {
            id: c.id,
            distance: c.distance,
            lsn: c.lsn,
            payload: self.payload(snapshot, c.at).map(Cow::into_owned),
        };
        Ok(LocalSearch {
            hits: if certified {
                members.iter().map(|(c, _)| hit(c)).collect()
            } else {
                candidates.iter().map(hit).collect()
            },
            nearest_anchor,
            certified,
        })
    }

    /// Whether a certified anchor's certificate covers the query (the one with the widest
    /// margin `ρ − δ` tried first) and proves its members' top-k exact; if so, `members` holds
    /// that top-k.
    fn certify(
        &self,
        snapshot: Option<&SnapshotView<'_>>,
        shape: Shape,
        query: &[f32],
        k: usize,
        covering: &mut Vec<(f32, f32, usize)>,
        members: &mut Vec<(Candidate, f32)>,
    ) -> bool {
        if !certifiable(shape.metric) {
            return false;
        }
        let dim = shape.dim;
        covering.clear();
        covering.extend(
            self.anchors
                .ids
                .iter()
                .zip(self.anchors.vectors.chunks_exact(dim))
                .zip(&self.anchors.radii)
                .enumerate()
                .filter(|(_, (_, radius))| **radius > 0.0)
                .filter_map(|(slot, ((_, v), &radius))| {
                    let delta = euclidean(query, v);
                    (delta < radius).then_some((radius, delta, slot))
                }),
        );
        // Ties in slot order; an unstable sort, because a stable one allocates.
        covering.sort_unstable_by(|a, b| (b.0 - b.1).total_cmp(&(a.0 - a.1)).then(a.2.cmp(&b.2)));
        'anchors: for &(radius, delta, slot) in covering.iter() {
            let Some(ids) = self.manifest.anchor_members(self.anchors.ids[slot]) else {
                continue;
            };
            if ids.len() < k {
                continue;
            }
            members.clear();
            for &id in ids {
                let Some(held) = self.held_vector(snapshot, id) else {
                    // A member evicted or invalidated: this certificate proves nothing until
                    // the cloud sends a new one.
                    continue 'anchors;
                };
                let candidate = Candidate {
                    id,
                    distance: shape.metric.distance(query, held.vector),
                    lsn: held.lsn,
                    at: held.at,
                };
                members.push((candidate, euclidean(query, held.vector)));
            }
            members.sort_unstable_by(|a, b| nearest_first(&a.0, &b.0));
            members.truncate(k);
            let kth = members.iter().map(|(_, e)| *e).fold(0.0, f32::max);
            if kth + delta + certificate_slack(dim, radius, delta, kth) <= radius {
                return true;
            }
        }
        false
    }
}

/// Reusable buffers of [`LocalCache::search`], one per concurrent search: sized by the first
/// searches, then reused, so that a warm search allocates nothing that grows with the cache.
#[derive(Debug, Default)]
pub struct LocalScratch {
    graph: SearchScratch,
    query: Vec<f32>,
    candidates: Vec<Candidate>,
    overlay_scores: Vec<(f32, usize)>,
    anchors: anchors::NearestScratch,
    covering: Vec<(f32, f32, usize)>,
    members: Vec<(Candidate, f32)>,
}

impl LocalScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Where a held vector lives.
#[derive(Clone, Copy, Debug)]
enum Held {
    Snapshot(u32),
    Overlay(usize),
}

/// A candidate hit: its payload is looked up only if it is returned.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u64,
    distance: f32,
    lsn: u64,
    at: Held,
}

/// A held vector, borrowed from the overlay or the snapshot.
struct HeldRef<'v> {
    vector: &'v [f32],
    lsn: u64,
    at: Held,
}

/// Nearest first; equal distances by id, so that merged answers are deterministic (ids are
/// unique among candidates: the overlay hides the snapshot ids it holds).
fn nearest_first(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::{Certificate, PushedAnchor, PushedVector, Tombstone};
    use proptest::prelude::*;

    const DIM: usize = 8;

    fn unit(seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..DIM)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Metric::Cosine.prepare(&mut v);
        v
    }

    /// The exact certificate of `anchor` over `corpus` with `m` members, as the cloud makes it.
    fn certificate(corpus: &[(u64, Vec<f32>)], anchor: &[f32], m: usize) -> (Vec<u64>, f32) {
        let mut by_distance: Vec<(f32, u64)> = corpus
            .iter()
            .map(|(id, v)| (euclidean(anchor, v), *id))
            .collect();
        by_distance.sort_by(|a, b| a.0.total_cmp(&b.0));
        let radius = by_distance.get(m).map_or(f32::INFINITY, |(d, _)| *d);
        (by_distance[..m].iter().map(|(_, id)| *id).collect(), radius)
    }

    fn exact_top(corpus: &[(u64, Vec<f32>)], query: &[f32], k: usize) -> Vec<u64> {
        let mut d: Vec<(f32, u64)> = corpus
            .iter()
            .map(|(id, v)| (Metric::Cosine.distance(query, v), *id))
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        d.into_iter().take(k).map(|(_, id)| id).collect()
    }

    /// A cache holding `anchor` and exactly its members, from a corpus of `n` vectors.
    fn cached(corpus: &[(u64, Vec<f32>)], anchor: &[f32], m: usize) -> LocalCache {
        let (members, radius) = certificate(corpus, anchor, m);
        let delta = Delta {
            collection_id: [1; 16],
            dim: DIM as u32,
            metric: Metric::Cosine.code(),
            version: 1,
            vectors: corpus
                .iter()
                .filter(|(id, _)| members.contains(id))
                .map(|(id, v)| PushedVector {
                    id: *id,
                    lsn: 1,
                    vector: v.clone(),
                    payload: None,
                })
                .collect(),
            anchors: vec![PushedAnchor {
                anchor_id: anchor_id(anchor),
                vector: anchor.to_vec(),
                members,
                radius,
                hot_at_unix_us: 0,
            }],
            ..Delta::default()
        };
        let mut cache = LocalCache::empty();
        cache.apply(&delta, true).unwrap();
        cache
    }

    fn search(cache: &LocalCache, query: &[f32], k: usize) -> LocalSearch {
        cache
            .search(None, query, k, 16, &mut LocalScratch::default())
            .unwrap()
    }

    fn corpus(n: u64) -> Vec<(u64, Vec<f32>)> {
        (0..n).map(|id| (id, unit(id + 1))).collect()
    }

    #[test]
    fn the_anchor_itself_is_answered_certified_and_exact() {
        let corpus = corpus(400);
        let anchor = unit(9_999);
        let cache = cached(&corpus, &anchor, 20);
        let answer = search(&cache, &anchor, 5);
        assert!(answer.certified);
        let ids: Vec<u64> = answer.hits.iter().map(|h| h.id).collect();
        assert_eq!(ids, exact_top(&corpus, &anchor, 5));
        assert_eq!(
            answer.nearest_anchor.map(|(id, _)| id),
            Some(anchor_id(&anchor))
        );
    }

    #[test]
    fn a_far_query_or_too_large_k_is_not_certified() {
        let corpus = corpus(400);
        let anchor = unit(9_999);
        let cache = cached(&corpus, &anchor, 20);
        let far: Vec<f32> = anchor.iter().map(|x| -x).collect();
        assert!(!search(&cache, &far, 5).certified);
        assert!(
            !search(&cache, &anchor, 21).certified,
            "fewer members than k"
        );
    }

    #[test]
    fn a_missing_member_or_a_dropped_certificate_stops_certification() {
        let corpus = corpus(400);
        let anchor = unit(9_999);
        let cache = cached(&corpus, &anchor, 20);
        let member = cache.manifest().anchor_members(anchor_id(&anchor)).unwrap()[19];

        let mut evicted = cache.clone();
        let mut d = Delta {
            collection_id: [1; 16],
            dim: DIM as u32,
            metric: Metric::Cosine.code(),
            version: 2,
            tombstones: vec![Tombstone { id: member, lsn: 2 }],
            ..Delta::default()
        };
        evicted.apply(&d, true).unwrap();
        assert!(!search(&evicted, &anchor, 5).certified, "a member is gone");
        // The cloud's answer to that delete: the same ball without the deleted member.
        let members: Vec<u64> =
            cache.manifest().anchor_members(anchor_id(&anchor)).unwrap()[..19].to_vec();
        d.version = 3;
        d.tombstones.clear();
        d.certificates = vec![Certificate {
            anchor_id: anchor_id(&anchor),
            radius: certificate(&corpus, &anchor, 20).1,
            members,
        }];
        evicted.apply(&d, true).unwrap();
        assert!(search(&evicted, &anchor, 5).certified);

        let mut dropped = cache.clone();
        dropped.drop_certificates();
        assert_eq!(dropped.certified_anchors(), 0);
        assert!(!search(&dropped, &anchor, 5).certified);

        let mut stale = LocalCache::empty();
        let mut fresh = cache.clone();
        fresh.drop_certificates();
        stale.set_certificates(&fresh.certificates());
        assert_eq!(stale.certified_anchors(), 0);

        let mut restored = dropped.clone();
        restored.set_certificates(&cache.certificates());
        assert_eq!(restored.certificates(), cache.certificates());
        assert!(search(&restored, &anchor, 5).certified);
    }

    #[test]
    fn certificates_of_a_connection_no_longer_current_are_not_taken() {
        let corpus = corpus(100);
        let anchor = unit(7);
        let (members, radius) = certificate(&corpus, &anchor, 10);
        let mut cache = cached(&corpus, &anchor, 10);
        let d = Delta {
            collection_id: [1; 16],
            dim: DIM as u32,
            metric: Metric::Cosine.code(),
            version: 2,
            certificates: vec![Certificate {
                anchor_id: anchor_id(&anchor),
                radius,
                members,
            }],
            ..Delta::default()
        };
        cache.drop_certificates();
        cache.apply(&d, false).unwrap();
        assert_eq!(cache.certified_anchors(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whenever an answer is certified it is the corpus's exact top-k, whatever the query.
        #[test]
        fn certified_answers_are_the_exact_global_top_k(
            seed in 0u64..1_000_000,
            queries in proptest::collection::vec((0u64..1_000_000, 0.0f32..0.6), 1..20),
            k in 1usize..8,
        ) {
            let corpus: Vec<(u64, Vec<f32>)> =
                (0..300).map(|id| (id, unit(seed * 1000 + id))).collect();
            let anchor = unit(seed ^ 0xABCD);
            let cache = cached(&corpus, &anchor, 16);
            prop_assert!(search(&cache, &anchor, k).certified, "the anchor itself certifies");
            for (q, mix) in queries {
                // Queries between the anchor and a random point: near ones certify.
                let noise = unit(q);
                let mut query: Vec<f32> =
                    anchor.iter().zip(&noise).map(|(a, n)| a + mix * n).collect();
                Metric::Cosine.prepare(&mut query);
                let answer = search(&cache, &query, k);
                if answer.certified {
                    let ids: Vec<u64> = answer.hits.iter().map(|h| h.id).collect();
                    prop_assert_eq!(ids, exact_top(&corpus, &query, k));
                }
            }
        }
    }
}
