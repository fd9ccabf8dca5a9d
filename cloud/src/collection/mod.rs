//! A collection: its points (append-only slots with tombstones), its graph index and the
//! generations searched, and the search itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use tiervec_shared::hnsw::{
    ExactSpace, HnswParams, Neighbour, QuantizedSpace, SearchScratch, search_reranked,
};
use tiervec_shared::query::{MAX_EF, QueryError, validate_search};
use tiervec_shared::{CollectionId, Metric, exact, kernels};

pub mod gpu;
pub mod index;

use gpu::{EngineStatus, ExactEngine, ExactScan, HostRows};
use index::{Generation, GraphIndex};

/// What a collection is: fixed at creation.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectionInfo {
    pub name: String,
    pub id: CollectionId,
    pub dim: usize,
    pub metric: Metric,
    pub params: HnswParams,
}

/// Search knobs of one request.
#[derive(Clone, Copy, Debug)]
pub struct SearchParams {
    pub k: usize,
    pub ef: usize,
    pub exact: bool,
    pub max_distance: Option<f32>,
}

/// Which engine answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Graph,
    Exact,
}

/// One result.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
    pub payload: Option<Arc<str>>,
}

/// A stored point, as returned by get-by-id.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub id: u64,
    pub vector: Vec<f32>,
    pub lsn: u64,
    pub payload: Option<Arc<str>>,
}

/// The points of a collection. Slots are append-only: replacing a point tombstones its old
/// slot and appends a new one, so slots below an exported generation never change.
#[derive(Default)]
pub struct Points {
    slot_of: HashMap<u64, u32>,
    ids: Vec<u64>,
    lsns: Vec<u64>,
    vectors: Vec<f32>,
    payloads: Vec<Option<Arc<str>>>,
    live: Vec<bool>,
    live_count: usize,
    /// The LSN at which each deleted id was last deleted: what an edge still holding the id is
    /// told (`push::certify::outdated`), and a guard against an older upsert resurrecting it.
    /// Only ids that existed are remembered, and the service forgets those no edge holds
    /// ([`Collection::forget_deletions`]), so deleting ids cannot grow memory without bound.
    deleted_at: HashMap<u64, u64>,
    /// Tombstones made so far: a device copy whose live mask was built at another count
    /// rebuilds the mask.
    tombstones: u64,
}

impl Points {
    fn slots(&self) -> usize {
        self.ids.len()
    }

    /// The hit a search found at slot `n.id`.
    fn hit(&self, n: &Neighbour) -> Hit {
        let slot = n.id as usize;
        Hit {
            id: self.ids[slot],
            distance: n.distance,
            lsn: self.lsns[slot],
            payload: self.payloads[slot].clone(),
        }
    }

    /// Marks `slot` dead.
    fn tombstone(&mut self, slot: u32) {
        self.live[slot as usize] = false;
        self.live_count -= 1;
        self.tombstones += 1;
    }

    /// The rows as the exact scan (CPU or device) sees them.
    fn host_rows(&self, dim: usize, metric: Metric) -> HostRows<'_> {
        HostRows {
            vectors: &self.vectors,
            live: &self.live,
            live_count: self.live_count,
            tombstone_epoch: self.tombstones,
            dim,
            metric,
        }
    }
}

/// Collections below this many live points are always searched exactly: a scan of 2,048 rows
/// of 384 floats takes about as long as a graph search and is exact.
pub const EXACT_BELOW: usize = 2_048;

/// Export a new generation once this many slots are indexed but not yet exported.
const EXPORT_EVERY: usize = 1_024;
/// Fewest quantised candidates of a graph search re-ranked with exact distances (at least
/// `4k`, doubled with `ef` when tombstones leave too few): the cloud's rows do not fit in
/// cache, and each re-ranked row is a cold read.
const RERANK_FLOOR: usize = 40;

pub struct Collection {
    pub info: CollectionInfo,
    points: RwLock<Points>,
    index: RwLock<Arc<GraphIndex>>,
    generation: ArcSwap<Generation>,
    /// Slots inserted into the current index.
    indexed: AtomicUsize,
    /// Points in the current index, and how many of them are tombstones by now: the graph is
    /// rebuilt when the second passes a fraction of the first.
    index_points: AtomicUsize,
    index_dead: AtomicUsize,
    /// Set while a background rebuild replaces the index.
    rebuilding: AtomicBool,
    scratches: Mutex<Vec<SearchScratch>>,
    /// Where exact scans from slot 0 run: the GPU when the process has a usable one.
    exact: ExactScan,
}

impl Collection {
    /// A collection whose exact scans use `engine`.
    pub fn with_engine(info: CollectionInfo, engine: Arc<ExactEngine>) -> Collection {
        let index = GraphIndex::new(info.metric, info.params, 1024);
        Collection {
            info,
            points: RwLock::new(Points::default()),
            index: RwLock::new(Arc::new(index)),
            generation: ArcSwap::from_pointee(Generation::empty()),
            indexed: AtomicUsize::new(0),
            index_points: AtomicUsize::new(0),
            index_dead: AtomicUsize::new(0),
            rebuilding: AtomicBool::new(false),
            scratches: Mutex::new(Vec::new()),
            exact: ExactScan::new(engine),
        }
    }

    /// The engine serving this collection's exact scans, and why.
    pub fn exact_engine(&self) -> EngineStatus {
        self.exact.status()
    }

    /// Applies an upsert logged at `lsn`. Vectors are prepared for the metric. Idempotent: a
    /// point whose stored LSN is not older is left alone, so replays and duplicates are harmless.
    pub fn apply_upsert(
        &self,
        lsn: u64,
        ids: &[u64],
        vectors: &[f32],
        payloads: &[Option<String>],
    ) {
        let dim = self.info.dim;
        let mut p = self.points.write();
        for (i, &id) in ids.iter().enumerate() {
            if p.deleted_at.get(&id).is_some_and(|&d| d >= lsn) {
                continue;
            }
            if let Some(&slot) = p.slot_of.get(&id) {
                if p.lsns[slot as usize] >= lsn {
                    continue;
                }
                p.tombstone(slot);
                self.note_tombstone(slot);
            }
            let slot = p.ids.len() as u32;
            p.slot_of.insert(id, slot);
            p.deleted_at.remove(&id);
            p.ids.push(id);
            p.lsns.push(lsn);
            p.vectors
                .extend_from_slice(&vectors[i * dim..(i + 1) * dim]);
            p.payloads
                .push(payloads.get(i).cloned().flatten().map(Arc::from));
            p.live.push(true);
            p.live_count += 1;
        }
    }

    /// Applies a delete logged at `lsn`: search stops returning the points at once.
    pub fn apply_delete(&self, lsn: u64, ids: &[u64]) {
        let mut p = self.points.write();
        for &id in ids {
            match p.slot_of.get(&id) {
                Some(&slot) => {
                    if p.lsns[slot as usize] >= lsn {
                        continue;
                    }
                    p.tombstone(slot);
                    p.slot_of.remove(&id);
                    self.note_tombstone(slot);
                }
                // An id that never existed (or is already forgotten) leaves nothing behind.
                None if !p.deleted_at.contains_key(&id) => continue,
                None => {}
            }
            let at = p.deleted_at.entry(id).or_insert(lsn);
            *at = (*at).max(lsn);
        }
    }

    /// Drops the live points whose id `gone` takes from this copy without remembering a
    /// deletion (the points live on elsewhere: a shard placed on other nodes); returns how many.
    pub fn forget_where(&self, gone: impl Fn(u64) -> bool) -> usize {
        let mut p = self.points.write();
        let slots: Vec<(u64, u32)> = p
            .slot_of
            .iter()
            .filter(|(id, _)| gone(**id))
            .map(|(&id, &slot)| (id, slot))
            .collect();
        for &(id, slot) in &slots {
            p.tombstone(slot);
            p.slot_of.remove(&id);
            self.note_tombstone(slot);
        }
        slots.len()
    }

    /// Deleted ids remembered with their deletion LSN.
    pub fn remembered_deletions(&self) -> usize {
        self.points.read().deleted_at.len()
    }

    /// Forgets the deletions of ids `still_held` says no edge holds; returns how many.
    pub fn forget_deletions(&self, still_held: impl Fn(u64) -> bool) -> usize {
        let mut p = self.points.write();
        let before = p.deleted_at.len();
        p.deleted_at.retain(|&id, _| still_held(id));
        before - p.deleted_at.len()
    }

    /// Counts a tombstone against the graph if the slot is in it.
    fn note_tombstone(&self, slot: u32) {
        if (slot as usize) < self.indexed.load(Ordering::Acquire) {
            self.index_dead.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Fraction of the graph's points that are tombstones (what triggers a rebuild).
    pub fn index_dead_fraction(&self) -> f64 {
        let points = self.index_points.load(Ordering::Acquire);
        if points == 0 {
            0.0
        } else {
            self.index_dead.load(Ordering::Acquire) as f64 / points as f64
        }
    }

    /// Number of live points.
    pub fn len(&self) -> usize {
        self.points.read().live_count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots ever used (live and dead).
    pub fn slots(&self) -> usize {
        self.points.read().slots()
    }

    /// Live points inside the searchable graph generation (the rest are scanned exactly).
    pub fn indexed_points(&self) -> usize {
        let p = self.points.read();
        let from = self.generation.load().len.min(p.slots());
        p.live_count - p.live[from..].iter().filter(|&&l| l).count()
    }

    /// Slots in the searchable graph generation.
    pub fn generation_len(&self) -> usize {
        self.generation.load().len
    }

    /// The length of point `id`'s payload text (0 without one), if the point exists.
    pub fn payload_len(&self, id: u64) -> Option<usize> {
        let p = self.points.read();
        let slot = *p.slot_of.get(&id)? as usize;
        Some(p.payloads[slot].as_ref().map_or(0, |t| t.len()))
    }

    pub fn get(&self, id: u64) -> Option<Point> {
        let p = self.points.read();
        let slot = *p.slot_of.get(&id)? as usize;
        let dim = self.info.dim;
        Some(Point {
            id,
            vector: p.vectors[slot * dim..(slot + 1) * dim].to_vec(),
            lsn: p.lsns[slot],
            payload: p.payloads[slot].clone(),
        })
    }

    /// The LSN at which `id` was last deleted, if it was (and not written since).
    pub fn deleted_at(&self, id: u64) -> Option<u64> {
        let p = self.points.read();
        if p.slot_of.contains_key(&id) {
            return None;
        }
        p.deleted_at.get(&id).copied()
    }

    /// The ids of the first `limit` live points in slot order (the order they were first
    /// written), for a new edge's first snapshot.
    pub fn live_ids(&self, limit: usize) -> Vec<u64> {
        let p = self.points.read();
        (0..p.slots())
            .filter(|&s| p.live[s])
            .map(|s| p.ids[s])
            .take(limit)
            .collect()
    }

    /// The live points (ids, LSNs, vectors, payloads) in slot order, for checkpoints.
    pub fn live_image(&self) -> (Vec<u64>, Vec<u64>, Vec<f32>, Vec<Option<String>>) {
        self.live_image_where(|_| true)
    }

    /// The live points whose id `keep` takes, in slot order (a shard's, for its snapshot).
    pub fn live_image_where(
        &self,
        keep: impl Fn(u64) -> bool,
    ) -> (Vec<u64>, Vec<u64>, Vec<f32>, Vec<Option<String>>) {
        let p = self.points.read();
        let dim = self.info.dim;
        let slots: Vec<usize> = (0..p.slots())
            .filter(|&s| p.live[s] && keep(p.ids[s]))
            .collect();
        let n = slots.len();
        let mut out = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n * dim),
            Vec::with_capacity(n),
        );
        for slot in slots {
            out.0.push(p.ids[slot]);
            out.1.push(p.lsns[slot]);
            out.2
                .extend_from_slice(&p.vectors[slot * dim..(slot + 1) * dim]);
            out.3.push(p.payloads[slot].as_deref().map(str::to_owned));
        }
        out
    }

    /// One step of background indexing: inserts slots not yet in the graph and, when enough
    /// accumulated (or `flush`), exports a new generation. Returns whether work was done.
    pub fn index_step(&self, flush: bool) -> bool {
        let index = self.index.read().clone();
        let (start, end, rows) = {
            let p = self.points.read();
            let start = self.indexed.load(Ordering::Acquire);
            let end = p.slots();
            let dim = self.info.dim;
            let rows: Vec<(Vec<f32>, usize)> = (start..end)
                .filter(|&s| p.live[s])
                .map(|s| (p.vectors[s * dim..(s + 1) * dim].to_vec(), s))
                .collect();
            (start, end, rows)
        };
        let mut worked = false;
        if end > start {
            let refs: Vec<(&[f32], usize)> = rows.iter().map(|(v, s)| (v.as_slice(), *s)).collect();
            index.insert(&refs);
            self.index_points.fetch_add(refs.len(), Ordering::AcqRel);
            self.indexed.store(end, Ordering::Release);
            worked = true;
        }
        let indexed = self.indexed.load(Ordering::Acquire);
        let exported = self.generation.load().len;
        // Slots that were all deleted before they were indexed leave the graph empty: there is
        // nothing to export, and searches keep scanning exactly.
        if indexed > exported && (flush || indexed - exported >= EXPORT_EVERY) && !index.is_empty()
        {
            let p = self.points.read();
            let generation = Generation::export(&index, &p.vectors, self.info.dim, indexed);
            drop(p);
            self.generation.store(Arc::new(generation));
            worked = true;
        }
        worked
    }

    /// Rebuilds the graph over live slots only (when tombstones pass the configured fraction).
    pub fn rebuild_index(&self) {
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Clears the flag however the rebuild ends (a panic in hnsw_rs included).
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.rebuilding);
        let (rows, end) = {
            let p = self.points.read();
            let dim = self.info.dim;
            let rows: Vec<(Vec<f32>, usize)> = (0..p.slots())
                .filter(|&s| p.live[s])
                .map(|s| (p.vectors[s * dim..(s + 1) * dim].to_vec(), s))
                .collect();
            (rows, p.slots())
        };
        let fresh = GraphIndex::new(self.info.metric, self.info.params, rows.len());
        let refs: Vec<(&[f32], usize)> = rows.iter().map(|(v, s)| (v.as_slice(), *s)).collect();
        fresh.insert(&refs);
        let fresh = Arc::new(fresh);
        {
            // Slots appended meanwhile are indexed by the next `index_step`.
            let mut index = self.index.write();
            *index = fresh.clone();
            self.index_points.store(refs.len(), Ordering::Release);
            self.index_dead.store(0, Ordering::Release);
            self.indexed.store(end, Ordering::Release);
        }
        let generation = if fresh.is_empty() {
            // Every point is deleted: no graph to search, exact scans of nothing live.
            Generation::empty()
        } else {
            let p = self.points.read();
            Generation::export(&fresh, &p.vectors, self.info.dim, end)
        };
        self.generation.store(Arc::new(generation));
    }

    /// hnsw_rs's own search over the current graph (for the benchmark's peer row).
    pub fn search_hnsw_rs(&self, query: &[f32], k: usize, ef: usize) -> Vec<(u64, f32)> {
        let mut q = query.to_vec();
        self.info.metric.prepare(&mut q);
        let index = self.index.read().clone();
        let p = self.points.read();
        index
            .search_own(&q, k, ef)
            .into_iter()
            .filter(|&(slot, _)| p.live.get(slot) == Some(&true))
            .map(|(slot, d)| (p.ids[slot], d))
            .collect()
    }

    /// Whether a search scans every live point: asked to, the collection is small, or no graph
    /// generation exists yet (after a restart, before the first export).
    fn answers_exactly(p: &Points, generation: &Generation, asked: bool) -> bool {
        asked || p.live_count < EXACT_BELOW || generation.len == 0
    }

    /// How many rows a search with `exact` scans exactly: every slot when it answers exactly,
    /// else the slots written since the graph generation was exported. Callers run searches
    /// that scan many off the async workers.
    pub fn scanned_rows(&self, exact: bool) -> usize {
        let p = self.points.read();
        let generation = self.generation.load();
        if Self::answers_exactly(&p, &generation, exact) {
            p.slots()
        } else {
            p.slots().saturating_sub(generation.len)
        }
    }

    /// k-nearest-neighbour search. Exact when asked or when the collection is small; otherwise
    /// the graph generation (quantised traversal, exact re-rank) plus an exact scan of points
    /// written since it was exported. Tombstoned points are never returned.
    pub fn search(
        &self,
        query: &[f32],
        params: &SearchParams,
    ) -> Result<(Vec<Hit>, Engine), QueryError> {
        validate_search(query, self.info.dim, params.k, params.ef)?;
        let mut q = query.to_vec();
        self.info.metric.prepare(&mut q);
        let p = self.points.read();
        let generation = self.generation.load();
        let use_exact = Self::answers_exactly(&p, &generation, params.exact);
        let mut found: Vec<Neighbour> = if use_exact {
            self.exact_top(&p, &q, params.k).pop().unwrap_or_default()
        } else {
            let mut ef = params.ef.max(params.k);
            let mut rerank = (4 * params.k).max(RERANK_FLOOR);
            loop {
                let mut found = self.graph_search(&p, &generation, &q, ef, rerank.min(ef));
                let mut tail = self.scan(&p, &q, generation.len, params.k);
                found.append(&mut tail);
                found.sort_unstable_by(Neighbour::cmp_nearest);
                // Tombstones can crowd the beam and the re-ranked window: widen both rather
                // than answer short.
                let widest = ef >= MAX_EF && rerank >= ef;
                if found.len() >= params.k || widest || p.live_count <= found.len() {
                    break found;
                }
                ef = (ef * 2).min(MAX_EF);
                rerank = (rerank * 2).min(MAX_EF);
            }
        };
        found.truncate(params.k);
        if let Some(max) = params.max_distance {
            found.retain(|n| n.distance <= max);
        }
        let hits = found.iter().map(|n| p.hit(n)).collect();
        Ok((
            hits,
            if use_exact {
                Engine::Exact
            } else {
                Engine::Graph
            },
        ))
    }

    /// Exact top-`k` of several queries at once (`queries`: rows of `dim`, raw; prepared here):
    /// one GEMM on the GPU when the engine takes the batch, else the CPU's scan on every core.
    pub fn search_exact_batch(
        &self,
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>, QueryError> {
        let dim = self.info.dim;
        let mut prepared = queries.to_vec();
        for q in prepared.chunks_mut(dim) {
            validate_search(q, dim, k, 0)?;
            self.info.metric.prepare(q);
        }
        let p = self.points.read();
        let found = self.exact_top(&p, &prepared, k);
        Ok(found
            .iter()
            .map(|top| top.iter().map(|n| p.hit(n)).collect())
            .collect())
    }

    /// Exact top-`k` of each prepared query over all live slots: on the device when the engine
    /// takes it, else on the CPU (queries spread over the cores when there are several).
    fn exact_top(&self, p: &Points, queries: &[f32], k: usize) -> Vec<Vec<Neighbour>> {
        let dim = self.info.dim;
        let _span = tracing::debug_span!("exact_scan", queries = queries.len() / dim, k).entered();
        if let Some(found) = self
            .exact
            .search(&p.host_rows(dim, self.info.metric), queries, k)
        {
            return found;
        }
        metrics::counter!("tiervec_exact_queries_total", "engine" => "cpu")
            .increment((queries.len() / dim) as u64);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(queries.len() / dim);
        if threads <= 1 {
            return queries
                .chunks_exact(dim)
                .map(|q| self.scan(p, q, 0, k))
                .collect();
        }
        let per_thread = (queries.len() / dim).div_ceil(threads) * dim;
        std::thread::scope(|s| {
            let parts: Vec<_> = queries
                .chunks(per_thread)
                .map(|part| {
                    s.spawn(move || {
                        part.chunks_exact(dim)
                            .map(|q| self.scan(p, q, 0, k))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|h| h.join().expect("an exact scan thread panicked"))
                .collect()
        })
    }

    /// Live slots at or above `from`, scanned exactly: the `k` nearest (memory for `k`, however
    /// many slots are tombstones).
    fn scan(&self, p: &Points, q: &[f32], from: usize, k: usize) -> Vec<Neighbour> {
        let dim = self.info.dim;
        let rows = &p.vectors[from * dim..];
        let all_live = p.live_count == p.slots();
        let mut top = exact::search_where(rows, dim, self.info.metric, q, k, |i| {
            all_live || p.live[from + i]
        });
        top.iter_mut().for_each(|n| n.id += from as u32);
        top
    }

    /// Beam search of width `ef` over the generation; returns live slots, nearest first.
    fn graph_search(
        &self,
        p: &Points,
        generation: &Generation,
        q: &[f32],
        ef: usize,
        rerank: usize,
    ) -> Vec<Neighbour> {
        let dim = self.info.dim;
        let mut scratch = self.scratches.lock().pop().unwrap_or_default();
        let exact = ExactSpace {
            vectors: &p.vectors[..generation.len * dim],
            dim,
            metric: self.info.metric,
            query: q,
        };
        let mut codes = std::mem::take(scratch.query_codes());
        codes.prepare(q, &generation.codes.scales);
        let quantized = QuantizedSpace {
            codes: &generation.codes.codes,
            norms: &generation.codes.norms,
            dim,
            metric: self.info.metric,
            query: &codes,
            query_norm: kernels::dot(q, q),
        };
        let found: Vec<Neighbour> = search_reranked(
            &generation.graph,
            &quantized,
            &exact,
            rerank,
            ef,
            rerank,
            &mut scratch,
        )
        .iter()
        .filter(|n| p.live[n.id as usize])
        .copied()
        .collect();
        *scratch.query_codes() = codes;
        self.scratches.lock().push(scratch);
        found
    }
}
