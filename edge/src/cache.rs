//! The edge's cache: the memory-mapped snapshot, an in-memory overlay of what the cloud pushed
//! since it was written, and the delta log (`deltas`) that makes the overlay durable.
//!
//! * A search is `tiervec_shared::local::LocalCache::search` (the WASM guest runs the same):
//!   the snapshot's graph (skipping ids the overlay hides: evicted, tombstoned, or replaced by
//!   a newer push) and the overlay's vectors exactly, merged into one top-k, with the nearest
//!   anchor for the confidence rule and a certified exact answer where a certificate covers
//!   the query. Certificates are taken only from deltas of the current connection
//!   ([`EdgeCache::begin_connection`]) and are never read back from the log or a snapshot.
//! * [`EdgeCache::apply`] checks a delta against the manifest, appends it to the log and
//!   fsyncs, and only then makes it visible; the caller acknowledges it after that.
//! * When the overlay holds [`CacheConfig::compact_after`] vectors, a background thread
//!   writes snapshot + overlay as a new snapshot (with the anchors and the manifest version),
//!   atomically, then swaps it in and rewrites the log with the deltas that arrived meanwhile.
//!   Readers hold the state they loaded (an `Arc`), so nothing pauses; the old mapping is
//!   released when its last reader finishes.
//! * At start-up a snapshot or log that fails validation is renamed aside (never deleted) and
//!   the cache starts from what is left; the link then resyncs it by inventory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use thiserror::Error;
use tiervec_shared::CollectionId;
use tiervec_shared::confidence::{ConfidenceRule, Decision};
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::protocol::frame::SnapshotBegin;
use tiervec_shared::push::{Applied, Delta, Inventory, PushError};
use tiervec_shared::query::validate_search;
use tiervec_shared::snapshot::{Payloads, SnapshotError, SnapshotSpec, SnapshotWriter};
use tracing::{info, warn};

use crate::deltas::{DeltaLog, DeltaLogError};
use crate::files::write_snapshot_atomic;
use crate::index::{EdgeError, EdgeIndex};
use crate::searcher::{AnchorFirstUse, LocalAnswer, LocalDecision, LocalSearcher};

/// Where the cache lives and how big it may grow.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub snapshot: PathBuf,
    pub deltas: PathBuf,
    /// Bytes (in the shared byte model) the cloud may fill.
    pub budget_bytes: u64,
    /// Compact once the overlay holds this many vectors,
    pub compact_after: usize,
    /// or once this many deltas arrived since the snapshot (invalidations and certificates add
    /// no vectors, yet each one stays in the log and in memory until a compaction),
    pub compact_after_deltas: usize,
    /// or once the delta log holds this many bytes.
    pub compact_after_log_bytes: u64,
}

impl CacheConfig {
    /// The delta log beside a snapshot path: `cache.tvs` → `cache.deltas`.
    pub fn beside(snapshot: &Path, budget_bytes: u64) -> CacheConfig {
        CacheConfig {
            snapshot: snapshot.to_owned(),
            deltas: snapshot.with_extension("deltas"),
            budget_bytes,
            compact_after: 2_048,
            compact_after_deltas: 4_096,
            compact_after_log_bytes: 16 << 20,
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
    #[error("streamed snapshot refused: {0}")]
    StreamedSnapshot(String),
}

/// One consistent view of the cache; searches load it, writers replace it.
#[derive(Clone)]
struct CacheState {
    snapshot: Option<Arc<EdgeIndex>>,
    local: LocalCache,
    /// Anchors pushed since the snapshot that no local answer has used yet.
    first_use: HashMap<u64, AnchorFirstUse>,
}

/// The single writer's side: the log and the deltas since the snapshot.
struct Writer {
    log: DeltaLog,
    since_snapshot: Vec<Delta>,
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

/// Another searcher kept in step with the cache (the WASM engine's guests): told the whole
/// cache when it starts following and after every compaction or reset, then each change as
/// it happens — under the cache's writer lock, so in order. Certificates follow too: taken
/// with a delta of the current connection, dropped when a connection starts, handed over
/// whole with the cache.
pub trait CacheFollower: Send + Sync {
    /// The cache is now `snapshot` (file bytes; `None`: no snapshot) with `deltas` on top
    /// and `certificates` (anchor id, radius) in force.
    fn replaced(&self, snapshot: Option<&[u8]>, deltas: &[Delta], certificates: &[(u64, f32)]);
    /// `delta` was applied (durably) to the cache, its certificates taken if
    /// `accept_certificates`.
    fn applied(&self, delta: &Delta, accept_certificates: bool);
    /// A connection started: every certificate was dropped.
    fn certificates_dropped(&self);
}

/// The edge's cache.
pub struct EdgeCache {
    config: CacheConfig,
    state: ArcSwap<CacheState>,
    writer: Mutex<Writer>,
    compacting: Arc<AtomicBool>,
    /// The current connection's number; deltas of an older one bring no certificates.
    connection: AtomicU64,
    follower: arc_swap::ArcSwapOption<Box<dyn CacheFollower>>,
    /// Search buffers, one per concurrent search, reused across searches (and across
    /// snapshots: they size themselves to each search).
    scratch: Mutex<Vec<LocalScratch>>,
}

/// The label of streamed snapshots' temp files (`durable::temp_beside`).
const INCOMING: &str = "incoming";

/// Removes the temp files of streamed snapshots that were never installed (a crash cut the
/// transfer or the install short); the cloud restores again if the cache is still behind.
fn remove_unfinished_transfers(snapshot: &Path) {
    let (Some(dir), Some(name)) = (snapshot.parent(), snapshot.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.{INCOMING}-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            info!(file = %entry.path().display(), "removed an unfinished streamed snapshot");
        }
    }
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

impl CacheState {
    fn from_snapshot(snapshot: Option<Arc<EdgeIndex>>) -> CacheState {
        let local = snapshot.as_ref().map_or_else(LocalCache::empty, |index| {
            LocalCache::over_snapshot(&index.view())
        });
        CacheState {
            snapshot,
            local,
            first_use: HashMap::new(),
        }
    }

    /// Applies a checked delta to a copy of this state.
    fn with(
        &self,
        delta: &Delta,
        accept_certificates: bool,
    ) -> Result<(CacheState, Applied), PushError> {
        let mut next = self.clone();
        let applied = next.apply(delta, accept_certificates)?;
        Ok((next, applied))
    }

    /// Applies a delta in place (replays); on error nothing has changed.
    fn apply(&mut self, delta: &Delta, accept_certificates: bool) -> Result<Applied, PushError> {
        let applied = self.local.apply(delta, accept_certificates)?;
        for a in &applied.anchors_removed {
            self.first_use.remove(a);
        }
        let now = Instant::now();
        for a in &delta.anchors {
            self.first_use.insert(a.anchor_id, AnchorFirstUse::new(now));
        }
        Ok(applied)
    }
}

impl EdgeCache {
    /// Opens the cache: the snapshot if there is one, then the deltas after its version. A
    /// damaged file is set aside and the cache starts from what remains (possibly empty).
    pub fn open(config: CacheConfig) -> Result<(EdgeCache, OpenReport), CacheError> {
        let mut report = OpenReport::default();
        remove_unfinished_transfers(&config.snapshot);
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
        report.snapshot_vectors = state.local.manifest().len();
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
            if delta.version <= state.local.version() {
                continue;
            }
            // Certificates live for one connection: none survives a restart.
            match state.apply(&delta, false) {
                Ok(_) => since_snapshot.push(delta),
                Err(e) => {
                    warn!(version = delta.version, error = %e, "delta log does not follow the snapshot; the rest is dropped and the cloud resyncs");
                    break;
                }
            }
        }
        report.replayed_deltas = since_snapshot.len();
        report.version = state.local.version();
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
                connection: AtomicU64::new(0),
                follower: arc_swap::ArcSwapOption::empty(),
                scratch: Mutex::new(Vec::new()),
            },
            report,
        ))
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The manifest version durable in this cache.
    pub fn version(&self) -> u64 {
        self.state.load().local.version()
    }

    /// The collection identity the cache belongs to (all zero while it is empty and unbound).
    pub fn collection_id(&self) -> [u8; 16] {
        self.state.load().local.manifest().collection_id
    }

    /// Vectors and anchors held, and their bytes in the byte model.
    pub fn usage(&self) -> (usize, usize, u64) {
        let s = self.state.load();
        let m = s.local.manifest();
        (m.len(), m.anchor_count(), m.bytes())
    }

    /// The overlay's vector count (compaction folds it into the snapshot).
    pub fn overlay_len(&self) -> usize {
        self.state.load().local.overlay_len()
    }

    /// What the cache holds, for a resync.
    pub fn inventory(&self) -> Inventory {
        self.state.load().local.manifest().inventory()
    }

    /// The snapshot currently searched (for inspection and tests).
    pub fn snapshot(&self) -> Option<Arc<EdgeIndex>> {
        self.state.load().snapshot.clone()
    }

    /// Checks a search request against the cache's dimension (what [`EdgeCache::search`]
    /// checks first) without searching: the WASM engine's guests check it themselves, but
    /// when no guest can answer the caller still gets its error.
    pub fn validate(&self, query: &[f32], k: usize, ef: usize) -> Result<(), EdgeError> {
        let dim = self
            .state
            .load()
            .local
            .shape()
            .map_or(query.len(), |s| s.dim);
        Ok(validate_search(query, dim, k, ef)?)
    }

    /// Searches snapshot and overlay: one merged top-k (or a certified exact one), and the
    /// nearest anchor.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<LocalAnswer, EdgeError> {
        let state = self.state.load();
        let mut scratch = self.scratch.lock().pop().unwrap_or_default();
        let view = state.snapshot.as_ref().map(|index| index.view());
        let found = state
            .local
            .search(view.as_ref(), query, k, ef, &mut scratch);
        self.scratch.lock().push(scratch);
        let found = found?;
        let (nearest_anchor, anchor_first_use) = match found.nearest_anchor {
            Some((anchor, distance)) => (
                Some(distance),
                // Recorded by the caller, once per anchor, if the answer is served locally.
                state
                    .first_use
                    .get(&anchor)
                    .filter(|a| !a.is_used())
                    .cloned(),
            ),
            None => (None, None),
        };
        Ok(LocalAnswer {
            hits: found.hits,
            nearest_anchor,
            certified: found.certified,
            anchor_first_use,
        })
    }

    /// Keeps `follower` in step with this cache from now on, starting with the whole of it.
    pub fn follow(&self, follower: Box<dyn CacheFollower>) {
        let writer = self.writer.lock();
        let state = self.state.load();
        follower.replaced(
            state.snapshot.as_ref().map(|s| s.bytes()),
            &writer.since_snapshot,
            &state.local.certificates(),
        );
        self.follower.store(Some(Arc::new(follower)));
    }

    /// Tells the follower the whole cache again (after a compaction or a reset).
    fn replaced(&self, writer: &Writer) {
        if let Some(follower) = self.follower.load().as_ref() {
            let state = self.state.load();
            follower.replaced(
                state.snapshot.as_ref().map(|s| s.bytes()),
                &writer.since_snapshot,
                &state.local.certificates(),
            );
        }
    }

    /// Starts a connection to the cloud: forgets every certificate (the cloud maintains only
    /// those it sends on the new connection) and returns the connection's number, which its
    /// deltas are applied with.
    pub fn begin_connection(&self) -> u64 {
        let _writer = self.writer.lock();
        let number = self.connection.fetch_add(1, Ordering::AcqRel) + 1;
        let mut next = CacheState::clone(&self.state.load());
        next.local.drop_certificates();
        self.state.store(Arc::new(next));
        if let Some(follower) = self.follower.load().as_ref() {
            follower.certificates_dropped();
        }
        number
    }

    /// Anchors that carry a certificate now. For tests (`testbed/tests/quic_loopback.rs`);
    /// nothing in the edge asks.
    pub fn certified_anchors(&self) -> usize {
        self.state.load().local.certified_anchors()
    }

    /// Applies a delta received on connection `connection` (see
    /// [`EdgeCache::begin_connection`]): checked against the manifest, appended to the log and
    /// fsynced, then made visible. Its certificates are taken only if that connection is still
    /// the current one. Blocking (file IO). A delta already applied is a harmless duplicate.
    pub fn apply(&self, delta: &Delta, connection: u64) -> Result<ApplyReport, CacheError> {
        let mut writer = self.writer.lock();
        let current = self.state.load_full();
        let held = current.local.manifest();
        if delta.version <= held.version && delta.collection_id == held.collection_id {
            return Ok(ApplyReport {
                duplicate: true,
                ..ApplyReport::default()
            });
        }
        let current_connection = connection == self.connection.load(Ordering::Acquire);
        let (next, applied) = current.with(delta, current_connection)?;
        writer.log.append(delta)?;
        writer.since_snapshot.push(delta.clone());
        self.state.store(Arc::new(next));
        if let Some(follower) = self.follower.load().as_ref() {
            follower.applied(delta, current_connection);
        }
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

    /// A new path for a snapshot the cloud streams, written there while it arrives: beside
    /// the snapshot, so that installing it is one rename, and unique per transfer, so that an
    /// install still running for a superseded connection never takes another's file.
    pub fn new_incoming_path(&self) -> std::io::Result<PathBuf> {
        tiervec_shared::durable::temp_beside(&self.config.snapshot, INCOMING)
    }

    /// Replaces the whole cache with a snapshot file the cloud streamed, complete and
    /// checksummed at `incoming` (from [`EdgeCache::new_incoming_path`]): made durable,
    /// validated like any snapshot, of this cache's collection (an unbound cache takes it), at
    /// `begin`'s manifest version, which must be past the cache's; then renamed over the
    /// snapshot, swapped in without pausing readers, and the delta log emptied (every delta in
    /// it is older; left as it is, they would be skipped at the next open). No certificate
    /// survives (the cloud sends new ones). Refused while a compaction is running (it would
    /// write the snapshot too; the next connection resyncs). The file is removed if refused.
    /// Blocking (file IO).
    pub fn install_snapshot(
        &self,
        incoming: &Path,
        begin: &SnapshotBegin,
    ) -> Result<u64, CacheError> {
        let outcome = if self.compacting.swap(true, Ordering::AcqRel) {
            Err(CacheError::StreamedSnapshot(
                "a compaction is writing the snapshot".into(),
            ))
        } else {
            let outcome = self.install_incoming(incoming, begin);
            self.compacting.store(false, Ordering::Release);
            outcome
        };
        if outcome.is_err() {
            let _ = std::fs::remove_file(incoming);
        }
        outcome
    }

    fn install_incoming(&self, incoming: &Path, begin: &SnapshotBegin) -> Result<u64, CacheError> {
        let refused = |why: String| CacheError::StreamedSnapshot(why);
        let io = |e: std::io::Error| refused(format!("{}: {e}", incoming.display()));
        tiervec_shared::durable::seal(incoming, true).map_err(io)?;
        // Memory-mapped: still valid after the rename below.
        let index = EdgeIndex::open(incoming)?;
        let file_version = index.view().manifest_version();
        if file_version != begin.version {
            return Err(refused(format!(
                "the file is at version {file_version}, not the announced {}",
                begin.version
            )));
        }
        if index.header().spec.collection.0 != begin.collection_id {
            return Err(refused(
                "the file belongs to another collection than announced".into(),
            ));
        }
        let mut writer = self.writer.lock();
        let (held_collection, held_version) = {
            let state = self.state.load();
            let manifest = state.local.manifest();
            (manifest.collection_id, manifest.version)
        };
        if held_collection != [0; 16] && held_collection != begin.collection_id {
            return Err(refused(
                "the file belongs to another collection incarnation than the cache".into(),
            ));
        }
        if begin.version <= held_version {
            return Err(refused(format!(
                "version {} is not past the cache's {held_version}",
                begin.version
            )));
        }
        tiervec_shared::durable::replace(incoming, &self.config.snapshot).map_err(io)?;
        self.state
            .store(Arc::new(CacheState::from_snapshot(Some(Arc::new(index)))));
        writer.since_snapshot.clear();
        self.replaced(&writer);
        writer.log = DeltaLog::rewrite(&self.config.deltas, &[])?;
        drop(writer);
        metrics::counter!("tiervec_edge_snapshots_installed_total").increment(1);
        info!(
            version = begin.version,
            bytes = begin.len,
            "cache replaced by a snapshot the cloud streamed"
        );
        Ok(begin.version)
    }

    /// Binds a cache that belongs to no collection incarnation yet (empty, or a snapshot
    /// written without one) to `collection`; a bound cache keeps its identity.
    pub fn bind(&self, collection: [u8; 16]) {
        let _writer = self.writer.lock();
        let current = self.state.load_full();
        if current.local.manifest().collection_id != [0; 16] {
            return;
        }
        let mut next = CacheState::clone(&current);
        next.local.bind(collection);
        self.state.store(Arc::new(next));
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
        self.replaced(&writer);
        Ok(report)
    }

    /// Whether what arrived since the snapshot is worth folding into a new one: vectors in the
    /// overlay, deltas in memory, or bytes in the log, each past its threshold.
    pub fn wants_compaction(&self) -> bool {
        if self.compacting.load(Ordering::Acquire) {
            return false;
        }
        if self.overlay_len() >= self.config.compact_after {
            return true;
        }
        let writer = self.writer.lock();
        writer.since_snapshot.len() >= self.config.compact_after_deltas
            || writer.log.bytes() >= self.config.compact_after_log_bytes
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
        let local = &state.local;
        let Some(shape) = local.shape() else {
            return Ok(None);
        };
        let dim = shape.dim;
        let params = state
            .snapshot
            .as_ref()
            .map_or_else(HnswParams::default, |s| s.header().spec.params);
        let collection_name = state
            .snapshot
            .as_ref()
            .map(|s| s.view().collection_name().to_owned())
            .unwrap_or_default();
        let spec = SnapshotSpec {
            collection: CollectionId(local.manifest().collection_id),
            dim: dim as u32,
            metric: shape.metric,
            params,
        };
        let mut writer = SnapshotWriter::new(spec, &collection_name, Payloads::Json);
        let bad = |e: SnapshotError| CacheError::Compaction(e.to_string());
        if let Some(index) = &state.snapshot {
            let view = index.view();
            for node in 0..view.len() as u32 {
                let id = view.ids()[node as usize];
                if local.hides(id) {
                    continue;
                }
                writer
                    .push(
                        id,
                        view.lsn(node).unwrap_or(0),
                        view.vector(node).unwrap_or_default(),
                        view.payload(node).as_deref(),
                    )
                    .map_err(bad)?;
            }
        }
        for (id, lsn, v, payload) in local.overlay_rows() {
            writer.push(id, lsn, v, payload).map_err(bad)?;
        }
        if writer.is_empty() {
            return Ok(None);
        }
        for (_, vector, members) in local.anchors() {
            writer.push_anchor(vector, members);
        }
        writer.set_manifest_version(local.version());
        let vectors = writer.len();
        let bytes = writer.finish().map_err(bad)?;
        write_snapshot_atomic(&self.config.snapshot, &bytes).map_err(|e| {
            CacheError::Compaction(format!("{}: {e}", self.config.snapshot.display()))
        })?;
        let index = Arc::new(EdgeIndex::open(&self.config.snapshot)?);
        Ok(Some(Built {
            base: CacheState::from_snapshot(Some(index)),
            version: local.version(),
            vectors,
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
                next.apply(d, false)?;
                replayed = d.version;
            }
        };
        for d in writer
            .since_snapshot
            .iter()
            .filter(|d| d.version > replayed)
        {
            next.apply(d, false)?;
        }
        // The live state knows which certificates are current (dropped on reconnection).
        let live = self.state.load_full();
        next.local.set_certificates(&live.local.certificates());
        next.first_use = live.first_use.clone();
        writer.since_snapshot.retain(|d| d.version > version);
        writer.log = DeltaLog::rewrite(&self.config.deltas, &writer.since_snapshot)?;
        self.state.store(Arc::new(next));
        self.replaced(&writer);
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

impl LocalSearcher for EdgeCache {
    fn local_answer(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        rule: ConfidenceRule,
    ) -> Result<LocalDecision, EdgeError> {
        let answer = self.search(query, k, ef)?;
        let distances: Vec<f32> = answer.hits.iter().map(|h| h.distance).collect();
        let confident = rule.decide(&distances, k, answer.nearest_anchor) == Decision::Local;
        Ok(LocalDecision { answer, confident })
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
