//! An edge's cache as pure data, searched the same way by the native edge and the WASM guest:
//! a snapshot (borrowed, searched in place) plus an overlay of what pushed deltas added, hid and
//! anchored, searched as one merged top-k, with the nearest anchor and — where a certificate
//! allows — a *certified* answer (see `docs/protocol.md`, "Certified answers").
//!
//! [`LocalCache`] holds no snapshot: the caller passes the [`SnapshotView`] it was built over
//! (the native edge owns a memory map, the guest a buffer in its linear memory), so the same
//! value works over both and compaction can build one over a new snapshot.
//!
//! Certification. An anchor `a` with radius ρ lists as members exactly the corpus ids whose
//! Euclidean distance to `a` is below ρ (the cloud computes them exactly). For a query `q` at
//! Euclidean distance δ from `a`, every non-member `x` has `|x − q| ≥ |x − a| − δ ≥ ρ − δ`
//! (triangle inequality). So if the `k` nearest members — all held, distances computed exactly
//! here — are all within `ρ − δ − slack`, no vector outside the cache can beat them: they are
//! the corpus's global top-k. The slack covers f32 rounding of the three distances (see
//! [`certificate_slack`]). Cosine and L2 only: for cosine the Euclidean distance is taken on
//! the normalised (prepared) vectors, ranking like the cosine distance; a dot-product "distance"
//! obeys no triangle inequality.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::hnsw::{Neighbour, SearchScratch};
use crate::kernels;
use crate::metric::Metric;
use crate::push::{Applied, Delta, Manifest, PushError, anchor_id, vector_bytes};
use crate::quant;
use crate::query::{QueryError, validate_search};
use crate::snapshot::SnapshotView;

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

/// The rounding allowance of a certificate check, in Euclidean distance units: each of the
/// three distances compared (ρ, δ and the k-th member's) is a square root of a sum of `dim`
/// non-negative f32 terms, whose relative error is below `(dim/2 + 2)·ε`; twice that, over
/// their sum, bounds the error of `kth ≤ ρ − δ`.
pub fn certificate_slack(dim: usize, radius: f32, delta: f32, kth: f32) -> f32 {
    (dim as f32 + 4.0) * f32::EPSILON * (radius + delta + kth)
}

/// Euclidean distance between two prepared vectors (certificates are Euclidean).
pub fn euclidean(a: &[f32], b: &[f32]) -> f32 {
    kernels::l2_squared(a, b).sqrt()
}

/// Whether certificates can be issued and checked for a metric.
pub const fn certifiable(metric: Metric) -> bool {
    matches!(metric, Metric::Cosine | Metric::L2)
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

/// The held anchors (from the snapshot and from deltas), their points stored contiguously for
/// the nearest-anchor scan, with their certificate radii (0: none), and their `i8` codes for
/// that scan's prefilter ([`Anchors::nearest`]).
#[derive(Clone, Debug, Default)]
struct Anchors {
    ids: Vec<u64>,
    vectors: Vec<f32>,
    radii: Vec<f32>,
    slot: HashMap<u64, usize>,
    codes: Vec<i8>,
    coded: Vec<Coded>,
}

/// A vector's `i8` codes under one scale ([`quant::encode_uniform`]) and what bounds the error
/// of an inner product taken on them: `‖x‖` and the residual `‖x − scale · codes‖`.
#[derive(Clone, Copy, Debug, Default)]
struct Coded {
    scale: f32,
    norm: f32,
    residual: f32,
}

impl Coded {
    /// Appends the codes of `vector` to `codes`. The norms are summed in `f64`, where the squares
    /// of `f32` values neither overflow nor underflow, and rounded up to `f32` (infinite if too
    /// large): upper bounds, as the error bound needs.
    fn encode(vector: &[f32], codes: &mut Vec<i8>) -> Coded {
        let start = codes.len();
        let scale = quant::encode_uniform(vector, codes);
        let norm = |terms: &mut dyn Iterator<Item = f64>| {
            let wide = terms.map(|t| t * t).sum::<f64>().sqrt();
            let narrow = wide as f32;
            if f64::from(narrow) < wide {
                narrow.next_up()
            } else {
                narrow
            }
        };
        Coded {
            scale,
            norm: norm(&mut vector.iter().map(|&x| f64::from(x))),
            residual: norm(
                &mut vector
                    .iter()
                    .zip(&codes[start..])
                    .map(|(&x, &c)| f64::from(x) - f64::from(scale) * f64::from(c)),
            ),
        }
    }
}

/// Largest `‖q‖‖a‖` the prefilter bounds: beyond it the `f32` kernels may overflow, and such an
/// anchor is always kept for the exact pass.
const BOUNDED_PRODUCT: f32 = 1e30;

/// Fewer anchors than this are scanned exactly: below it the prefilter's pass costs more than
/// it saves.
const PREFILTER_FROM: usize = 64;

/// Relative margin on the prefilter's error bound, for the `f32` rounding of its own terms
/// (the norms are upper bounds already).
const BOUND_MARGIN: f32 = 1e-3;

impl Anchors {
    fn upsert(&mut self, id: u64, vector: &[f32], radius: f32) {
        let dim = vector.len();
        match self.slot.get(&id) {
            Some(&slot) => {
                self.vectors[slot * dim..(slot + 1) * dim].copy_from_slice(vector);
                self.radii[slot] = radius;
                let mut codes = Vec::with_capacity(dim);
                self.coded[slot] = Coded::encode(vector, &mut codes);
                self.codes[slot * dim..(slot + 1) * dim].copy_from_slice(&codes);
            }
            None => {
                self.slot.insert(id, self.ids.len());
                self.ids.push(id);
                self.vectors.extend_from_slice(vector);
                self.radii.push(radius);
                self.coded.push(Coded::encode(vector, &mut self.codes));
            }
        }
    }

    fn remove(&mut self, id: u64, dim: usize) {
        let Some(slot) = self.slot.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        self.ids.swap_remove(slot);
        self.radii.swap_remove(slot);
        self.coded.swap_remove(slot);
        if slot != last {
            self.vectors
                .copy_within(last * dim..(last + 1) * dim, slot * dim);
            self.codes
                .copy_within(last * dim..(last + 1) * dim, slot * dim);
            self.slot.insert(self.ids[slot], slot);
        }
        self.vectors.truncate(last * dim);
        self.codes.truncate(last * dim);
    }

    /// The nearest anchor to `query` (prepared for `metric`) and its distance: exactly what
    /// computing `metric.distance` to every anchor finds (the first of equals), with fewer
    /// exact distances.
    ///
    /// For cosine and dot, whose distances are `c − q·a`, a first pass bounds every anchor's
    /// inner product from `i8` codes: with `q̂`, `â` the quantised query and anchor,
    /// `q·a − q̂·â = (q − q̂)·a + q̂·(a − â)`, so by Cauchy–Schwarz it lies within
    /// `‖q − q̂‖‖a‖ + ‖q̂‖‖a − â‖`, widened for the rounding of the exact kernel (a sum of
    /// `n` products: at most `n · ε · ‖q‖‖a‖` off) and of the bound itself. Only anchors whose
    /// lower bound does not exceed the smallest upper bound can be nearest; the second pass
    /// computes their exact distances in slot order, as the full scan would.
    fn nearest(&self, query: &[f32], metric: Metric, dim: usize) -> Option<(u64, f32)> {
        let exact = |slot: usize| {
            let distance = metric.distance(query, &self.vectors[slot * dim..(slot + 1) * dim]);
            (self.ids[slot], distance)
        };
        let first_nearest = |slots: &mut dyn Iterator<Item = usize>| {
            slots.map(exact).min_by(|a, b| a.1.total_cmp(&b.1))
        };
        let offset = match metric {
            Metric::Cosine => 1.0,
            Metric::Dot => 0.0,
            Metric::L2 => return first_nearest(&mut (0..self.ids.len())),
        };
        if self.ids.len() < PREFILTER_FROM {
            return first_nearest(&mut (0..self.ids.len()));
        }
        let mut query_codes = Vec::with_capacity(dim);
        let q = Coded::encode(query, &mut query_codes);
        // ‖q̂‖ ≤ ‖q‖ + ‖q − q̂‖: no need to compute it.
        let quantised_norm = q.norm + q.residual;
        let rounding = 2.0 * (dim as f32 + 4.0) * f32::EPSILON;
        let mut lower = Vec::with_capacity(self.ids.len());
        let mut least_upper = f32::INFINITY;
        for (slot, a) in self.coded.iter().enumerate() {
            let codes = &self.codes[slot * dim..(slot + 1) * dim];
            let approximate = q.scale * a.scale * kernels::dot_i8(&query_codes, codes) as f32;
            let error = (q.residual * a.norm + quantised_norm * a.residual) * (1.0 + BOUND_MARGIN)
                + rounding * (1.0 + q.norm * a.norm);
            // Written so that a NaN (an infinite norm times a zero one) also lands here.
            let bounded = q.norm * a.norm <= BOUNDED_PRODUCT && approximate.is_finite();
            if bounded && error.is_finite() {
                lower.push(offset - (approximate + error));
                least_upper = least_upper.min(offset - (approximate - error));
            } else {
                lower.push(f32::NEG_INFINITY);
            }
        }
        first_nearest(
            &mut lower
                .iter()
                .enumerate()
                .filter(|(_, l)| **l <= least_upper)
                .map(|(slot, _)| slot),
        )
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
            let payload = view.payload(node).map_or(0, str::len);
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
                payload: self.overlay.payloads[slot].as_deref(),
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
            payload: view.payload(node),
        })
    }

    /// The `k` nearest held vectors to `query` (snapshot through its graph with beam `ef`,
    /// overlay exactly), the nearest anchor, and a certified exact answer where a certificate
    /// proves one. `snapshot` must be the one this cache was built over.
    pub fn search(
        &self,
        snapshot: Option<&SnapshotView<'_>>,
        query: &[f32],
        k: usize,
        ef: usize,
        scratch: &mut SearchScratch,
    ) -> Result<LocalSearch, QueryError> {
        let Some(shape) = self.shape else {
            // An empty cache that has not heard of its collection: nothing to check the
            // dimension against, nothing to answer with.
            validate_search(query, query.len(), k, ef)?;
            return Ok(LocalSearch::default());
        };
        validate_search(query, shape.dim, k, ef)?;
        let mut prepared = query.to_vec();
        shape.metric.prepare(&mut prepared);
        let overlay = &self.overlay;
        let mut hits: Vec<LocalHit> = Vec::with_capacity(2 * k);
        if let Some(view) = snapshot {
            let wanted = k + overlay.hidden.len().min(ef);
            for &Neighbour { id: node, distance } in
                view.search(&prepared, wanted, ef.max(wanted), scratch)
            {
                let id = view.ids()[node as usize];
                if !overlay.hidden.contains(&id) {
                    hits.push(LocalHit {
                        id,
                        distance,
                        lsn: view.lsn(node).unwrap_or(0),
                        payload: view.payload(node).map(str::to_owned),
                    });
                }
            }
        }
        let dim = shape.dim;
        let mut scored: Vec<(f32, usize)> = overlay
            .vectors
            .chunks_exact(dim)
            .enumerate()
            .map(|(slot, v)| (shape.metric.distance(&prepared, v), slot))
            .collect();
        let take = k.min(scored.len());
        if take > 0 {
            scored.select_nth_unstable_by(take - 1, |a, b| a.0.total_cmp(&b.0));
        }
        for &(distance, slot) in &scored[..take] {
            hits.push(LocalHit {
                id: overlay.ids[slot],
                distance,
                lsn: overlay.lsns[slot],
                payload: overlay.payloads[slot].clone(),
            });
        }
        sort_hits(&mut hits);
        hits.truncate(k);

        let nearest_anchor = self.anchors.nearest(&prepared, shape.metric, dim);
        match self.certify(snapshot, shape, &prepared, k) {
            Some(certified) => Ok(LocalSearch {
                hits: certified,
                nearest_anchor,
                certified: true,
            }),
            None => Ok(LocalSearch {
                hits,
                nearest_anchor,
                certified: false,
            }),
        }
    }

    /// The exact top-k among the members of a certified anchor whose certificate covers the
    /// query (the one with the widest margin `ρ − δ` first), if any does.
    fn certify(
        &self,
        snapshot: Option<&SnapshotView<'_>>,
        shape: Shape,
        query: &[f32],
        k: usize,
    ) -> Option<Vec<LocalHit>> {
        if !certifiable(shape.metric) {
            return None;
        }
        let dim = shape.dim;
        let mut covering: Vec<(f32, f32, u64)> = self
            .anchors
            .ids
            .iter()
            .zip(self.anchors.vectors.chunks_exact(dim))
            .zip(&self.anchors.radii)
            .filter(|(_, radius)| **radius > 0.0)
            .filter_map(|((&id, v), &radius)| {
                let delta = euclidean(query, v);
                (delta < radius).then_some((radius, delta, id))
            })
            .collect();
        covering.sort_by(|a, b| (b.0 - b.1).total_cmp(&(a.0 - a.1)));
        'anchors: for (radius, delta, anchor) in covering {
            let Some(members) = self.manifest.anchor_members(anchor) else {
                continue;
            };
            if members.len() < k {
                continue;
            }
            let mut scored = Vec::with_capacity(members.len());
            for &id in members {
                let Some(held) = self.held_vector(snapshot, id) else {
                    // A member evicted or invalidated: this certificate proves nothing until
                    // the cloud sends a new one.
                    continue 'anchors;
                };
                let hit = LocalHit {
                    id,
                    distance: shape.metric.distance(query, held.vector),
                    lsn: held.lsn,
                    payload: held.payload.map(str::to_owned),
                };
                scored.push((hit, euclidean(query, held.vector)));
            }
            scored.sort_by(|a, b| {
                a.0.distance
                    .total_cmp(&b.0.distance)
                    .then(a.0.id.cmp(&b.0.id))
            });
            scored.truncate(k);
            let kth = scored.iter().map(|(_, e)| *e).fold(0.0, f32::max);
            if kth + delta + certificate_slack(dim, radius, delta, kth) <= radius {
                return Some(scored.into_iter().map(|(h, _)| h).collect());
            }
        }
        None
    }
}

/// A held vector, borrowed from the overlay or the snapshot.
struct HeldRef<'v> {
    vector: &'v [f32],
    lsn: u64,
    payload: Option<&'v str>,
}

/// Nearest first; equal distances by id, so that merged answers are deterministic.
fn sort_hits(hits: &mut [LocalHit]) {
    hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
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
            .search(None, query, k, 16, &mut SearchScratch::default())
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

    /// Deterministic values in `-1..1` from `state`.
    fn noise(state: &mut u64) -> f32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    proptest! {
        /// The prefiltered scan finds exactly what the full scan finds — the same anchor (the
        /// first of equals) and the same distance bits — for anchors in tight clusters (near
        /// ties), exact duplicates under other ids (ties), after removals, for every metric.
        #[test]
        fn nearest_anchor_equals_the_full_scan(
            seed in 1u64..u64::MAX,
            n in PREFILTER_FROM..PREFILTER_FROM + 100,
            clusters in 1usize..4,
            spread in prop::sample::select(vec![1e-5f32, 1e-3, 3e-2, 0.5]),
            dim in prop::sample::select(vec![8usize, 48, 384]),
        ) {
            let mut state = seed;
            let centres: Vec<Vec<f32>> = (0..clusters)
                .map(|_| (0..dim).map(|_| noise(&mut state)).collect())
                .collect();
            let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(n);
            for i in 0..n {
                let v = if i % 7 == 6 {
                    vectors[i - 1].clone()
                } else {
                    centres[i % clusters].iter().map(|c| c + spread * noise(&mut state)).collect()
                };
                vectors.push(v);
            }
            let query: Vec<f32> =
                centres[0].iter().map(|c| c + spread * noise(&mut state)).collect();
            for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
                let mut query = query.clone();
                metric.prepare(&mut query);
                let mut anchors = Anchors::default();
                for (i, v) in vectors.iter().enumerate() {
                    let mut v = v.clone();
                    metric.prepare(&mut v);
                    anchors.upsert(1_000 + i as u64, &v, 0.0);
                }
                for removed in [1_003u64, 1_000 + n as u64 - 1] {
                    anchors.remove(removed, dim);
                }
                prop_assert_eq!(
                    bits(anchors.nearest(&query, metric, dim)),
                    bits(full_scan(&anchors, &query, metric, dim)),
                    "{:?}", metric
                );
            }
        }

        /// The same at magnitudes where the bound's own arithmetic overflows or underflows
        /// (zero vectors, components of 1e±20 against queries of 1e±20, dot products that
        /// overflow to infinity), and after ids are upserted again with new vectors.
        #[test]
        fn nearest_anchor_equals_the_full_scan_at_extreme_magnitudes(
            seed in 1u64..u64::MAX,
            n in PREFILTER_FROM..PREFILTER_FROM + 40,
            query_magnitude in prop::sample::select(vec![1e-20f32, 1.0, 1e20]),
        ) {
            const DIM: usize = 48;
            let magnitudes = [0.0f32, 1e-20, 1e-3, 1.0, 1e3, 1e20];
            let mut state = seed;
            let mut vector = |magnitude: f32| -> Vec<f32> {
                (0..DIM).map(|_| magnitude * noise(&mut state)).collect()
            };
            let query = vector(query_magnitude);
            for metric in [Metric::Cosine, Metric::Dot] {
                let mut query = query.clone();
                metric.prepare(&mut query);
                let mut anchors = Anchors::default();
                for i in 0..n {
                    let mut v = vector(magnitudes[i % magnitudes.len()]);
                    metric.prepare(&mut v);
                    anchors.upsert(i as u64, &v, 0.0);
                }
                for i in (0..n).step_by(5) {
                    let mut v = vector(magnitudes[(i + 3) % magnitudes.len()]);
                    metric.prepare(&mut v);
                    anchors.upsert(i as u64, &v, 0.0);
                }
                prop_assert_eq!(
                    bits(anchors.nearest(&query, metric, DIM)),
                    bits(full_scan(&anchors, &query, metric, DIM)),
                    "{:?}", metric
                );
            }
        }
    }

    #[test]
    fn nearest_anchor_survives_bound_terms_that_overflow() {
        const DIM: usize = 8;
        let ordinary = |i: usize| -> Vec<f32> {
            (0..DIM)
                .map(|d| ((i * 7 + d * 3) % 11) as f32 / 11.0 - 0.5)
                .collect()
        };
        let axis = |x: f32| -> Vec<f32> {
            let mut v = vec![0.0; DIM];
            v[0] = x;
            v
        };
        // An exactly coded query (no residual) against an anchor whose squared norm
        // overflows `f32`; and a query whose norm overflows against a zero anchor, the
        // nearest under `dot` when every other anchor points away.
        let cases = [
            (axis(127.0), axis(1e20), 1.0f32),
            (axis(-3e38), vec![0.0; DIM], 1.0),
        ];
        for (query, special, sign) in cases {
            let mut anchors = Anchors::default();
            for i in 0..PREFILTER_FROM + 10 {
                let v: Vec<f32> = ordinary(i).iter().map(|x| sign * x.abs()).collect();
                anchors.upsert(i as u64, &v, 0.0);
            }
            anchors.upsert(999, &special, 0.0);
            let full = full_scan(&anchors, &query, Metric::Dot, DIM);
            assert_eq!(
                full.map(|(id, _)| id),
                Some(999),
                "the case is set up wrong"
            );
            assert_eq!(bits(anchors.nearest(&query, Metric::Dot, DIM)), bits(full));
        }
    }

    /// The nearest anchor as a scan of every anchor finds it: the first of equals.
    fn full_scan(
        anchors: &Anchors,
        query: &[f32],
        metric: Metric,
        dim: usize,
    ) -> Option<(u64, f32)> {
        anchors
            .ids
            .iter()
            .zip(anchors.vectors.chunks_exact(dim))
            .map(|(&id, v)| (id, metric.distance(query, v)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// A nearest anchor with its distance as bits, so equal means bit for bit.
    fn bits(found: Option<(u64, f32)>) -> Option<(u64, u32)> {
        found.map(|(id, d)| (id, d.to_bits()))
    }
}
