//! The edge's cache: the memory-mapped snapshot, an in-memory overlay of what the cloud pushed
//! since it was written, and the delta log (`deltas`) that makes the overlay durable.
//!
//! * A search runs over the snapshot's graph (skipping ids the overlay hides: evicted,
//!   tombstoned, or replaced by a newer push) and exactly over the overlay's vectors, and
//!   merges one top-k. It also finds the nearest anchor, for the confidence rule.
//! * [`EdgeCache::apply`] checks a delta against the manifest, appends it to the log and
//!   fsyncs, and only then makes it visible; the caller acknowledges it after that.
//! * When the overlay holds [`CacheConfig::compact_after`] vectors, a background thread
//!   writes snapshot + overlay as a new snapshot (with the anchors and the manifest version),
//!   atomically, then swaps it in and rewrites the log with the deltas that arrived meanwhile.
//!   Readers hold the state they loaded (an `Arc`), so nothing pauses; the old mapping is
//!   released when its last reader finishes.
//! * At start-up a snapshot or log that fails validation is renamed aside (never deleted) and
//!   the cache starts from what is left; the link then resyncs it by inventory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use thiserror::Error;
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::push::{
    Applied, Delta, Inventory, Manifest, PushError, anchor_id, vector_bytes,
};
use tiervec_shared::query::{QueryError, validate_search};
use tiervec_shared::snapshot::{self, AnchorSection, SnapshotBody, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};
use tracing::{info, warn};

use crate::deltas::{DeltaLog, DeltaLogError};
use crate::files::write_snapshot_atomic;
use crate::index::{EdgeError, EdgeIndex};
use crate::node::NodeHit;

/// Where the cache lives and how big it may grow.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub snapshot: PathBuf,
    pub deltas: PathBuf,
    /// Bytes (in the shared byte model) the cloud may fill.
    pub budget_bytes: u64,
    /// Compact once the overlay holds this many vectors.
    pub compact_after: usize,
}

impl CacheConfig {
    /// The delta log beside a snapshot path: `cache.tvs` → `cache.deltas`.
    pub fn beside(snapshot: &Path, budget_bytes: u64) -> CacheConfig {
        CacheConfig {
            snapshot: snapshot.to_owned(),
            deltas: snapshot.with_extension("deltas"),
            budget_bytes,
            compact_after: 2_048,
        }
    }
}

#[derive(Debug, Error)]
pub enum CacheError {
    #[error(transparent)]
    Push(#[from] PushError),
    #[error(transparent)]
    Log(#[from] DeltaLogError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error("compaction failed: {0}")]
    Compaction(String),
}

/// The collection's shape, known from the snapshot or the first delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    dim: usize,
    metric: Metric,
}

/// A pushed anchor held in the overlay.
#[derive(Clone, Debug)]
struct OverlayAnchor {
    id: u64,
    vector: Vec<f32>,
    applied: Instant,
    /// Whether a local answer has used it yet (for the applied → first-use latency).
    used: Arc<AtomicBool>,
}

/// What arrived since the snapshot.
#[derive(Clone, Debug, Default)]
struct Overlay {
    ids: Vec<u64>,
    lsns: Vec<u64>,
    vectors: Vec<f32>,
    payloads: Vec<Option<String>>,
    slot: HashMap<u64, usize>,
    /// Snapshot ids not to return (evicted, tombstoned, or superseded by the overlay).
    hidden: HashSet<u64>,
    anchors: Vec<OverlayAnchor>,
    /// Snapshot anchors evicted.
    hidden_anchors: HashSet<u64>,
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

    fn follow(&mut self, delta: &Delta, applied: &Applied, dim: usize) {
        for &id in &applied.removed {
            self.remove(id, dim);
        }
        for &i in &applied.vectors {
            let v = &delta.vectors[i];
            self.hidden.insert(v.id);
            match self.slot.get(&v.id) {
                Some(&slot) => {
                    self.lsns[slot] = v.lsn;
                    self.payloads[slot] = v.payload.clone();
                    self.vectors[slot * dim..(slot + 1) * dim].copy_from_slice(&v.vector);
                }
                None => {
                    self.slot.insert(v.id, self.ids.len());
                    self.ids.push(v.id);
                    self.lsns.push(v.lsn);
                    self.payloads.push(v.payload.clone());
                    self.vectors.extend_from_slice(&v.vector);
                }
            }
        }
        for &a in &applied.anchors_removed {
            self.anchors.retain(|x| x.id != a);
            self.hidden_anchors.insert(a);
        }
        let now = Instant::now();
        for a in &delta.anchors {
            self.anchors.retain(|x| x.id != a.anchor_id);
            self.anchors.push(OverlayAnchor {
                id: a.anchor_id,
                vector: a.vector.clone(),
                applied: now,
                used: Arc::new(AtomicBool::new(false)),
            });
        }
    }
}

/// One consistent view of the cache; searches load it, writers replace it.
#[derive(Clone)]
struct CacheState {
    shape: Option<Shape>,
    snapshot: Option<Arc<EdgeIndex>>,
    /// Ids of the snapshot's anchors, by position.
    snapshot_anchor_ids: Vec<u64>,
    overlay: Overlay,
    manifest: Manifest,
}

/// The single writer's side: the log and the deltas since the snapshot.
struct Writer {
    log: DeltaLog,
    since_snapshot: Vec<Delta>,
}

/// A local answer: the merged top-k and the nearest anchor.
#[derive(Clone, Debug, Default)]
pub struct LocalAnswer {
    pub hits: Vec<NodeHit>,
    /// Distance to the nearest anchor, if any is held.
    pub nearest_anchor: Option<f32>,
    /// The nearest anchor, if it came from the overlay and no local answer has used it yet.
    pub anchor_first_use: Option<AnchorFirstUse>,
}

/// A pushed anchor that has not yet served a local answer.
#[derive(Clone, Debug)]
pub struct AnchorFirstUse {
    applied: Instant,
    used: Arc<AtomicBool>,
}

impl AnchorFirstUse {
    /// Records the time from the anchor's delta being applied to this, its first local answer
    /// (once per anchor, however many answers race here).
    pub fn record(&self) {
        if !self.used.swap(true, Ordering::Relaxed) {
            metrics::histogram!("tiervec_edge_anchor_first_use_seconds")
                .record(self.applied.elapsed().as_secs_f64());
        }
    }
}

/// What opening the cache found and did.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Files renamed aside, with why.
    pub set_aside: Vec<(PathBuf, String)>,
    pub snapshot_vectors: usize,
    pub replayed_deltas: usize,
    pub version: u64,
}

/// What applying a delta did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// The delta was already applied (a duplicate): nothing changed.
    pub duplicate: bool,
    /// Unix µs when each new anchor became hot in the cloud.
    pub anchors_hot_at: Vec<u64>,
    pub removed: usize,
}

/// The edge's cache.
pub struct EdgeCache {
    config: CacheConfig,
    state: ArcSwap<CacheState>,
    writer: Mutex<Writer>,
    compacting: Arc<AtomicBool>,
}

/// Renames `path` aside as `<name>.corrupt-<unix seconds>`; the file is kept for inspection.
fn set_aside(path: &Path, why: String, report: &mut OpenReport) {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{stamp}"));
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => {
            warn!(file = %path.display(), aside = %aside.display(), why, "cache file set aside")
        }
        Err(e) => warn!(file = %path.display(), error = %e, why, "cannot set the cache file aside"),
    }
    report.set_aside.push((aside, why));
}

fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The manifest a snapshot describes.
fn snapshot_manifest(index: &EdgeIndex) -> (Manifest, Vec<u64>) {
    let view = index.view();
    let dim = view.dim();
    let mut manifest = Manifest::new(view.header().spec.collection.0, view.manifest_version());
    for node in 0..view.len() as u32 {
        let payload = view.payload(node).map_or(0, str::len);
        manifest.insert(
            view.ids()[node as usize],
            view.lsn(node).unwrap_or(0),
            vector_bytes(dim, payload),
        );
    }
    let mut anchor_ids = Vec::with_capacity(view.anchor_count());
    for i in 0..view.anchor_count() {
        if let Some((vector, members)) = view.anchor(i) {
            let id = anchor_id(vector);
            manifest.insert_anchor(id, members.to_vec(), dim);
            anchor_ids.push(id);
        }
    }
    (manifest, anchor_ids)
}

impl CacheState {
    fn from_snapshot(snapshot: Option<Arc<EdgeIndex>>) -> CacheState {
        match snapshot {
            Some(index) => {
                let (manifest, snapshot_anchor_ids) = snapshot_manifest(&index);
                let h = index.header();
                CacheState {
                    shape: Some(Shape {
                        dim: h.spec.dim as usize,
                        metric: h.spec.metric,
                    }),
                    snapshot: Some(index),
                    snapshot_anchor_ids,
                    overlay: Overlay::default(),
                    manifest,
                }
            }
            None => CacheState {
                shape: None,
                snapshot: None,
                snapshot_anchor_ids: Vec::new(),
                overlay: Overlay::default(),
                manifest: Manifest::default(),
            },
        }
    }

    /// Applies a checked delta to a copy of this state.
    fn with(&self, delta: &Delta) -> Result<(CacheState, Applied), PushError> {
        let mut next = self.clone();
        let applied = next.apply(delta)?;
        Ok((next, applied))
    }

    /// Applies a delta in place (replays); on error nothing has changed.
    fn apply(&mut self, delta: &Delta) -> Result<Applied, PushError> {
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
        self.overlay.follow(delta, &applied, shape.dim);
        self.shape = Some(shape);
        Ok(applied)
    }
}

impl EdgeCache {
    /// Opens the cache: the snapshot if there is one, then the deltas after its version. A
    /// damaged file is set aside and the cache starts from what remains (possibly empty).
    pub fn open(config: CacheConfig) -> Result<(EdgeCache, OpenReport), CacheError> {
        let mut report = OpenReport::default();
        let snapshot = if config.snapshot.exists() {
            match EdgeIndex::open(&config.snapshot) {
                Ok(index) => Some(Arc::new(index)),
                Err(e) => {
                    set_aside(&config.snapshot, e.to_string(), &mut report);
                    None
                }
            }
        } else {
            None
        };
        let mut state = CacheState::from_snapshot(snapshot);
        report.snapshot_vectors = state.manifest.len();
        let (log, replayed) = match DeltaLog::open(&config.deltas) {
            Ok(opened) => opened,
            Err(e) => {
                set_aside(&config.deltas, e.to_string(), &mut report);
                DeltaLog::open(&config.deltas)?
            }
        };
        if let Some(why) = replayed.truncated {
            warn!(file = %config.deltas.display(), why, "cut a torn delta-log tail");
        }
        let mut since_snapshot = Vec::new();
        for delta in replayed.deltas {
            if delta.version <= state.manifest.version {
                continue;
            }
            match state.apply(&delta) {
                Ok(_) => since_snapshot.push(delta),
                Err(e) => {
                    warn!(version = delta.version, error = %e, "delta log does not follow the snapshot; the rest is dropped and the cloud resyncs");
                    break;
                }
            }
        }
        report.replayed_deltas = since_snapshot.len();
        report.version = state.manifest.version;
        // The log now holds exactly what was applied (nothing, if it was set aside).
        let log = if since_snapshot.is_empty() && log_is_empty(&config.deltas) {
            log
        } else {
            DeltaLog::rewrite(&config.deltas, &since_snapshot)?
        };
        info!(
            snapshot_vectors = report.snapshot_vectors,
            deltas = report.replayed_deltas,
            version = report.version,
            "cache opened"
        );
        Ok((
            EdgeCache {
                config,
                state: ArcSwap::from_pointee(state),
                writer: Mutex::new(Writer {
                    log,
                    since_snapshot,
                }),
                compacting: Arc::new(AtomicBool::new(false)),
            },
            report,
        ))
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The manifest version durable in this cache.
    pub fn version(&self) -> u64 {
        self.state.load().manifest.version
    }

    /// The collection identity the cache belongs to (all zero while it is empty and unbound).
    pub fn collection_id(&self) -> [u8; 16] {
        self.state.load().manifest.collection_id
    }

    /// Vectors and anchors held, and their bytes in the byte model.
    pub fn usage(&self) -> (usize, usize, u64) {
        let s = self.state.load();
        (
            s.manifest.len(),
            s.manifest.anchor_count(),
            s.manifest.bytes(),
        )
    }

    /// The overlay's vector count (compaction folds it into the snapshot).
    pub fn overlay_len(&self) -> usize {
        self.state.load().overlay.ids.len()
    }

    /// What the cache holds, for a resync.
    pub fn inventory(&self) -> Inventory {
        self.state.load().manifest.inventory()
    }

    /// The snapshot currently searched (for inspection and tests).
    pub fn snapshot(&self) -> Option<Arc<EdgeIndex>> {
        self.state.load().snapshot.clone()
    }

    /// Searches snapshot and overlay: one merged top-k, and the nearest anchor.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<LocalAnswer, EdgeError> {
        let state = self.state.load();
        let Some(shape) = state.shape else {
            // An empty cache that has not heard of its collection yet: nothing to check the
            // dimension against, nothing to answer with; the cloud validates.
            validate_search(query, query.len(), k, ef)?;
            return Ok(LocalAnswer::default());
        };
        validate_search(query, shape.dim, k, ef)?;
        let mut prepared = query.to_vec();
        shape.metric.prepare(&mut prepared);
        let overlay = &state.overlay;
        let mut hits: Vec<NodeHit> = Vec::with_capacity(2 * k);
        if let Some(index) = &state.snapshot {
            let wanted = k + overlay.hidden.len().min(ef);
            for h in index.search(query, wanted, ef.max(wanted))? {
                if !overlay.hidden.contains(&h.id) {
                    hits.push(NodeHit {
                        id: h.id,
                        distance: h.distance,
                        lsn: h.lsn,
                        payload: h.payload.map(str::to_owned),
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
            hits.push(NodeHit {
                id: overlay.ids[slot],
                distance,
                lsn: overlay.lsns[slot],
                payload: overlay.payloads[slot].clone(),
            });
        }
        hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
        hits.truncate(k);

        let mut nearest: Option<(f32, Option<&OverlayAnchor>)> = None;
        if let Some(index) = &state.snapshot {
            let view = index.view();
            for (i, id) in state.snapshot_anchor_ids.iter().enumerate() {
                if overlay.hidden_anchors.contains(id) {
                    continue;
                }
                if let Some((vector, _)) = view.anchor(i) {
                    let d = shape.metric.distance(&prepared, vector);
                    if nearest.is_none_or(|(best, _)| d < best) {
                        nearest = Some((d, None));
                    }
                }
            }
        }
        for a in &overlay.anchors {
            let d = shape.metric.distance(&prepared, &a.vector);
            if nearest.is_none_or(|(best, _)| d < best) {
                nearest = Some((d, Some(a)));
            }
        }
        let nearest_anchor = nearest.map(|(d, _)| d);
        // Recorded by the caller, once per anchor, if the answer is served locally.
        let anchor_first_use = nearest
            .and_then(|(_, a)| a)
            .filter(|a| !a.used.load(Ordering::Relaxed))
            .map(|a| AnchorFirstUse {
                applied: a.applied,
                used: a.used.clone(),
            });
        Ok(LocalAnswer {
            hits,
            nearest_anchor,
            anchor_first_use,
        })
    }

    /// Applies a delta: checked against the manifest, appended to the log and fsynced, then
    /// made visible. Blocking (file IO). A delta already applied is a harmless duplicate.
    pub fn apply(&self, delta: &Delta) -> Result<ApplyReport, CacheError> {
        let mut writer = self.writer.lock();
        let current = self.state.load_full();
        if delta.version <= current.manifest.version
            && delta.collection_id == current.manifest.collection_id
        {
            return Ok(ApplyReport {
                duplicate: true,
                ..ApplyReport::default()
            });
        }
        let (next, applied) = current.with(delta)?;
        writer.log.append(delta)?;
        writer.since_snapshot.push(delta.clone());
        self.state.store(Arc::new(next));
        metrics::counter!("tiervec_edge_push_deltas_total").increment(1);
        let report = ApplyReport {
            duplicate: false,
            anchors_hot_at: delta.anchors.iter().map(|a| a.hot_at_unix_us).collect(),
            removed: applied.removed.len(),
        };
        let applied_us = now_unix_us();
        if delta.is_invalidation() && delta.sent_at_unix_us > 0 {
            metrics::histogram!("tiervec_edge_invalidation_seconds")
                .record(applied_us.saturating_sub(delta.sent_at_unix_us) as f64 / 1e6);
        }
        for hot_at in &report.anchors_hot_at {
            metrics::histogram!("tiervec_edge_push_delay_seconds")
                .record(applied_us.saturating_sub(*hot_at) as f64 / 1e6);
        }
        Ok(report)
    }

    /// Binds a cache that belongs to no collection incarnation yet (empty, or a snapshot
    /// written without one) to `collection`; a bound cache keeps its identity.
    pub fn bind(&self, collection: [u8; 16]) {
        let _writer = self.writer.lock();
        let current = self.state.load_full();
        if current.manifest.collection_id != [0; 16] {
            return;
        }
        let mut manifest = current.manifest.clone();
        manifest.collection_id = collection;
        self.state.store(Arc::new(CacheState {
            shape: current.shape,
            snapshot: current.snapshot.clone(),
            snapshot_anchor_ids: current.snapshot_anchor_ids.clone(),
            overlay: current.overlay.clone(),
            manifest,
        }));
    }

    /// Empties the cache for a collection incarnation it does not belong to: both files are
    /// set aside, and the cache starts empty, bound to nothing until the next delta.
    pub fn reset(&self, why: &str) -> Result<OpenReport, CacheError> {
        let mut writer = self.writer.lock();
        let mut report = OpenReport::default();
        for path in [&self.config.snapshot, &self.config.deltas] {
            if path.exists() {
                set_aside(path, why.to_owned(), &mut report);
            }
        }
        writer.log = DeltaLog::rewrite(&self.config.deltas, &[])?;
        writer.since_snapshot.clear();
        self.state.store(Arc::new(CacheState::from_snapshot(None)));
        Ok(report)
    }

    /// Whether the overlay is big enough to compact.
    pub fn wants_compaction(&self) -> bool {
        self.overlay_len() >= self.config.compact_after && !self.compacting.load(Ordering::Acquire)
    }

    /// Folds the overlay into a new snapshot and swaps it in, on the calling thread (blocking).
    /// Returns the version compacted, or `None` if another compaction runs or there is nothing
    /// to fold.
    pub fn compact(&self) -> Result<Option<u64>, CacheError> {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        let result = self
            .build_snapshot()
            .and_then(|built| built.map(|b| self.install(b)).transpose());
        self.compacting.store(false, Ordering::Release);
        result
    }

    /// [`EdgeCache::compact`] in the background: the snapshot is built on a thread of its own
    /// at a lower CPU priority (seconds of graph building must not slow queries and deltas on
    /// the same cores), and swapped in on `runtime`'s blocking pool at normal priority (the
    /// swap holds the writer's lock, which a starved low-priority thread must never hold).
    pub fn compact_in_background(self: &Arc<Self>, runtime: tokio::runtime::Handle) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tiervec-compaction".into())
            .spawn(move || {
                lower_thread_priority();
                match cache.build_snapshot() {
                    Ok(Some(built)) => {
                        runtime.spawn_blocking(move || {
                            if let Err(e) = cache.install(built) {
                                warn!(error = %e, "cache compaction failed; the overlay keeps serving");
                            }
                            cache.compacting.store(false, Ordering::Release);
                        });
                    }
                    Ok(None) => cache.compacting.store(false, Ordering::Release),
                    Err(e) => {
                        warn!(error = %e, "cache compaction failed; the overlay keeps serving");
                        cache.compacting.store(false, Ordering::Release);
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a compaction thread; the overlay keeps serving");
            self.compacting.store(false, Ordering::Release);
        }
    }

    /// Writes snapshot + overlay as a new snapshot file and opens it (the slow part).
    fn build_snapshot(&self) -> Result<Option<Built>, CacheError> {
        let started = Instant::now();
        let state = self.state.load_full();
        let Some(shape) = state.shape else {
            return Ok(None);
        };
        let dim = shape.dim;
        let overlay = &state.overlay;
        let params = state
            .snapshot
            .as_ref()
            .map_or_else(HnswParams::default, |s| s.header().spec.params);
        let mut builder = HnswBuilder::new(dim, shape.metric, params);
        let (mut ids, mut lsns, mut payloads) = (Vec::new(), Vec::new(), Vec::new());
        let bad = |e: QueryError| CacheError::Compaction(e.to_string());
        if let Some(index) = &state.snapshot {
            let view = index.view();
            for node in 0..view.len() as u32 {
                let id = view.ids()[node as usize];
                if overlay.hidden.contains(&id) {
                    continue;
                }
                builder
                    .insert(view.vector(node).unwrap_or_default())
                    .map_err(bad)?;
                ids.push(id);
                lsns.push(view.lsn(node).unwrap_or(0));
                payloads.push(view.payload(node).unwrap_or_default().to_owned());
            }
        }
        for (slot, v) in overlay.vectors.chunks_exact(dim).enumerate() {
            builder.insert(v).map_err(bad)?;
            ids.push(overlay.ids[slot]);
            lsns.push(overlay.lsns[slot]);
            payloads.push(overlay.payloads[slot].clone().unwrap_or_default());
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let mut anchors = AnchorSection::default();
        let mut push_anchor = |vector: &[f32], members: &[u64]| {
            if anchors.answer_offsets.is_empty() {
                anchors.answer_offsets.push(0);
            }
            anchors.vectors.extend_from_slice(vector);
            anchors.radii.push(0.0);
            anchors.answer_ids.extend_from_slice(members);
            anchors.answer_offsets.push(anchors.answer_ids.len() as u32);
        };
        let members: HashMap<u64, &[u64]> = state.manifest.anchors().collect();
        if let Some(index) = &state.snapshot {
            let view = index.view();
            for (i, id) in state.snapshot_anchor_ids.iter().enumerate() {
                if let (Some((vector, m)), false) =
                    (view.anchor(i), overlay.hidden_anchors.contains(id))
                {
                    push_anchor(vector, m);
                }
            }
        }
        for a in &overlay.anchors {
            push_anchor(&a.vector, members.get(&a.id).copied().unwrap_or_default());
        }
        let collection_name = state
            .snapshot
            .as_ref()
            .map(|s| s.view().collection_name().to_owned())
            .unwrap_or_default();
        let mut body =
            SnapshotBody::from_builder(&builder, &collection_name, ids, lsns, Some(&payloads))
                .map_err(|e| CacheError::Compaction(e.to_string()))?;
        body.manifest_version = state.manifest.version;
        body.anchors = anchors;
        let spec = SnapshotSpec {
            collection: CollectionId(state.manifest.collection_id),
            dim: dim as u32,
            metric: shape.metric,
            params,
        };
        let bytes =
            snapshot::encode(&spec, &body).map_err(|e| CacheError::Compaction(e.to_string()))?;
        write_snapshot_atomic(&self.config.snapshot, &bytes).map_err(|e| {
            CacheError::Compaction(format!("{}: {e}", self.config.snapshot.display()))
        })?;
        let index = Arc::new(EdgeIndex::open(&self.config.snapshot)?);
        Ok(Some(Built {
            base: CacheState::from_snapshot(Some(index)),
            version: state.manifest.version,
            vectors: builder.len(),
            started,
        }))
    }

    /// Swaps a built snapshot in, with the deltas that arrived during the build on top, and
    /// rewrites the log to hold just those (brief: under the writer's lock).
    fn install(&self, built: Built) -> Result<u64, CacheError> {
        let Built {
            base,
            version,
            vectors,
            started,
        } = built;
        // The deltas that arrived during the build are replayed outside the lock (there may be
        // hundreds after a long build), until only the last few remain for the swap itself.
        let mut next = base;
        let mut replayed = version;
        let mut writer = loop {
            let pending: Vec<Delta> = {
                let writer = self.writer.lock();
                let pending: Vec<Delta> = writer
                    .since_snapshot
                    .iter()
                    .filter(|d| d.version > replayed)
                    .cloned()
                    .collect();
                if pending.len() <= 2 {
                    break writer;
                }
                pending
            };
            for d in &pending {
                next.apply(d)?;
                replayed = d.version;
            }
        };
        for d in writer
            .since_snapshot
            .iter()
            .filter(|d| d.version > replayed)
        {
            next.apply(d)?;
        }
        writer.since_snapshot.retain(|d| d.version > version);
        writer.log = DeltaLog::rewrite(&self.config.deltas, &writer.since_snapshot)?;
        self.state.store(Arc::new(next));
        drop(writer);
        metrics::counter!("tiervec_edge_compactions_total").increment(1);
        metrics::histogram!("tiervec_edge_compaction_seconds")
            .record(started.elapsed().as_secs_f64());
        info!(
            version,
            vectors,
            seconds = started.elapsed().as_secs_f64(),
            "cache compacted"
        );
        Ok(version)
    }
}

/// A compacted snapshot, opened, waiting to be swapped in.
struct Built {
    /// The cache state of the new snapshot alone (at `version`).
    base: CacheState,
    version: u64,
    vectors: usize,
    started: Instant,
}

/// Lowers the calling thread's CPU priority (nice 10), for good: call it only on a thread of
/// its own.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority with `who = 0` changes only the calling thread's nice value.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// Whether the log at `path` holds no record (just a header).
fn log_is_empty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() <= tiervec_shared::log::FILE_HEADER_LEN as u64)
}
