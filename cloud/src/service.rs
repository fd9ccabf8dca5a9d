//! The cloud service: the catalog of collections, the write path through the WAL, recovery at
//! start, checkpoints, and the maintenance thread that indexes, rebuilds and checkpoints.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use thiserror::Error;
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::push::{Inventory, Manifest, ManifestStep};
use tiervec_shared::query::{QueryError, validate_vector};
use tiervec_shared::snapshot::MAX_DIM;
use tiervec_shared::{CollectionId, Metric};
use tracing::{info, warn};

use crate::checkpoint::{self, CheckpointBody, CheckpointError, CollectionImage, EdgeCacheImage};
use crate::collection::{Collection, CollectionInfo, Engine, Hit, Point, SearchParams};
use crate::config::CloudConfig;
use crate::entry::WalEntry;
use crate::wal::{self, FlushStats, RecoveryReport, Wal, WalError};

/// Errors of the service, classified for the API: user errors, missing things, and service
/// failures.
#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("collection `{0}` does not exist")]
    CollectionNotFound(String),
    #[error("collection `{0}` already exists")]
    CollectionExists(String),
    #[error("point {id} does not exist in collection `{collection}`")]
    PointNotFound { collection: String, id: u64 },
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("point {index} (id {id}): {source}")]
    BadPoint {
        index: usize,
        id: u64,
        #[source]
        source: QueryError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("data directory {path}: {what}")]
    DataDir { path: PathBuf, what: String },
}

/// Ids of a collection written (inserted, replaced or deleted) at `lsn`: the push subsystem
/// invalidates them in the edge caches that hold them, and shrinks the certificates whose
/// balls they enter, at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalidation {
    pub collection: [u8; 16],
    pub ids: Vec<u64>,
    pub lsn: u64,
}

/// All collections, by name, and what the cloud believes each edge's cache of each holds.
#[derive(Default)]
pub struct Catalog {
    by_name: RwLock<HashMap<String, Arc<Collection>>>,
    /// (edge, collection identity) → manifest: a superset of what the edge holds.
    edge_caches: RwLock<HashMap<(String, [u8; 16]), Manifest>>,
    invalidations: OnceLock<tokio::sync::mpsc::UnboundedSender<Invalidation>>,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<Arc<Collection>> {
        self.by_name.read().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Collection>> {
        let mut v: Vec<_> = self.by_name.read().values().cloned().collect();
        v.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        v
    }

    /// The manifest the cloud holds for `edge`'s cache of `collection`.
    pub fn edge_cache(&self, edge: &str, collection: [u8; 16]) -> Option<Manifest> {
        self.edge_caches
            .read()
            .get(&(edge.to_owned(), collection))
            .cloned()
    }

    /// The manifest versions the cloud holds for `edge`'s caches, by collection identity.
    pub fn cache_versions(&self, edge: &str) -> Vec<([u8; 16], u64)> {
        self.edge_caches
            .read()
            .iter()
            .filter(|((e, _), _)| e == edge)
            .map(|((_, c), m)| (*c, m.version))
            .collect()
    }

    /// Edges whose cache of `collection` holds any of `ids`, with those ids.
    pub fn holders(&self, collection: [u8; 16], ids: &[u64]) -> Vec<(String, Vec<u64>)> {
        self.edge_caches
            .read()
            .iter()
            .filter(|((_, c), _)| *c == collection)
            .filter_map(|((edge, _), m)| {
                let held: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| m.held(*id).is_some())
                    .collect();
                (!held.is_empty()).then(|| (edge.clone(), held))
            })
            .collect()
    }

    /// Tells the push subsystem about a durable write: every written id, since a new vector
    /// inside a certificate's ball shrinks it even though no edge holds that vector.
    fn invalidate(&self, collection: [u8; 16], ids: &[u64], lsn: u64) {
        if let Some(tx) = self.invalidations.get() {
            let _ = tx.send(Invalidation {
                collection,
                ids: ids.to_vec(),
                lsn,
            });
        }
    }

    /// The collection with this identity, if it exists.
    pub fn by_id(&self, id: [u8; 16]) -> Option<Arc<Collection>> {
        self.by_name
            .read()
            .values()
            .find(|c| c.info.id.0 == id)
            .cloned()
    }

    /// Applies one durable entry. Deterministic, so replay rebuilds exactly what was acknowledged.
    fn apply(&self, lsn: u64, entry: &WalEntry) {
        match entry {
            WalEntry::CreateCollection {
                name,
                id,
                dim,
                metric,
                m,
                ef_construction,
                seed,
            } => {
                let mut map = self.by_name.write();
                if map.contains_key(name) {
                    return;
                }
                let Some(metric) = Metric::from_code(*metric) else {
                    return;
                };
                map.insert(
                    name.clone(),
                    Arc::new(Collection::new(CollectionInfo {
                        name: name.clone(),
                        id: CollectionId(*id),
                        dim: *dim as usize,
                        metric,
                        params: HnswParams {
                            m: *m as usize,
                            ef_construction: *ef_construction as usize,
                            seed: *seed,
                        },
                    })),
                );
            }
            WalEntry::DropCollection { name, id } => {
                let mut map = self.by_name.write();
                if map.get(name).is_some_and(|c| c.info.id.0 == *id) {
                    map.remove(name);
                }
                self.edge_caches.write().retain(|(_, c), _| c != id);
            }
            WalEntry::Upsert {
                collection,
                ids,
                vectors,
                payloads,
            } => {
                if let Some(c) = self.by_id(*collection) {
                    // Logged entries were validated before they were written; a checksummed
                    // record that still disagrees is skipped loudly, never a panic on replay.
                    if vectors.len() != ids.len() * c.info.dim || payloads.len() != ids.len() {
                        tracing::error!(lsn, collection = %c.info.name, "upsert record with inconsistent lengths skipped");
                        return;
                    }
                    c.apply_upsert(lsn, ids, vectors, payloads);
                    self.invalidate(*collection, ids, lsn);
                }
            }
            WalEntry::Delete { collection, ids } => {
                if let Some(c) = self.by_id(*collection) {
                    c.apply_delete(lsn, ids);
                    self.invalidate(*collection, ids, lsn);
                }
            }
            WalEntry::EdgeStep {
                edge,
                collection,
                step,
            } => {
                if let Some(c) = self.by_id(*collection) {
                    self.edge_caches
                        .write()
                        .entry((edge.clone(), *collection))
                        .or_insert_with(|| Manifest::new(*collection, 0))
                        .apply_step(step, c.info.dim);
                }
            }
            WalEntry::EdgeReset {
                edge,
                collection,
                inventory,
            } => {
                if let Some(c) = self.by_id(*collection) {
                    self.edge_caches.write().insert(
                        (edge.clone(), *collection),
                        Manifest::from_inventory(inventory, c.info.dim),
                    );
                }
            }
        }
    }
}

/// How start-up went.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    pub checkpoint: Option<(PathBuf, u64)>,
    pub wal: RecoveryReport,
    pub seconds: f64,
}

/// The running cloud service.
pub struct Service {
    pub config: CloudConfig,
    catalog: Arc<Catalog>,
    wal: Arc<Wal<Catalog>>,
    start: StartReport,
    stop: Arc<AtomicBool>,
    maintenance: Option<JoinHandle<()>>,
    _lock: File,
}

/// Collection names: 1–64 of `[A-Za-z0-9_-]`, so they are safe in URLs and file names.
fn check_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!(
            "collection name `{name}` must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -"
        )))
    }
}

fn record_flush(stats: FlushStats) {
    metrics::histogram!("tiervec_wal_fsync_seconds").record(stats.fsync_seconds);
    metrics::counter!("tiervec_wal_records_total").increment(stats.records as u64);
    metrics::counter!("tiervec_wal_flushes_total").increment(1);
}

impl Service {
    /// Opens the data directory (exclusively), loads the newest checkpoint, replays the WAL
    /// after it, and starts the maintenance thread.
    pub fn open(config: CloudConfig) -> Result<Service, ServiceError> {
        // The exact-search engine is chosen (and a GPU probed) once per process, before any
        // collection is recovered, so every collection uses the configured one.
        crate::gpu::install(&config.gpu);
        let started = Instant::now();
        let dir = config.data_dir.clone();
        let data_err = |what: String| ServiceError::DataDir {
            path: dir.clone(),
            what,
        };
        fs::create_dir_all(&dir).map_err(|e| data_err(e.to_string()))?;
        let lock = File::create(dir.join("LOCK")).map_err(|e| data_err(e.to_string()))?;
        lock.try_lock().map_err(|_| {
            data_err("another tiervec-cloud process holds it (LOCK); one writer per WAL".into())
        })?;

        let catalog = Arc::new(Catalog::default());
        let mut start = StartReport::default();
        let mut after = 0;
        if let Some((path, body)) = checkpoint::load_latest(&dir)? {
            after = body.lsn;
            start.checkpoint = Some((path, body.lsn));
            let mut map = catalog.by_name.write();
            for image in body.collections {
                let Some(metric) = Metric::from_code(image.metric) else {
                    continue;
                };
                let c = Collection::new(CollectionInfo {
                    name: image.name.clone(),
                    id: CollectionId(image.id),
                    dim: image.dim as usize,
                    metric,
                    params: HnswParams {
                        m: image.m as usize,
                        ef_construction: image.ef_construction as usize,
                        seed: image.seed,
                    },
                });
                for (i, (&id, &lsn)) in image.ids.iter().zip(&image.lsns).enumerate() {
                    let dim = image.dim as usize;
                    c.apply_upsert(
                        lsn,
                        &[id],
                        &image.vectors[i * dim..(i + 1) * dim],
                        std::slice::from_ref(&image.payloads[i]),
                    );
                }
                map.insert(image.name, Arc::new(c));
            }
            drop(map);
            let dims: HashMap<[u8; 16], usize> = catalog
                .all()
                .iter()
                .map(|c| (c.info.id.0, c.info.dim))
                .collect();
            let mut caches = catalog.edge_caches.write();
            for image in body.edge_caches {
                if let Some(&dim) = dims.get(&image.manifest.collection_id) {
                    caches.insert(
                        (image.edge, image.manifest.collection_id),
                        Manifest::from_inventory(&image.manifest, dim),
                    );
                }
            }
        }
        let (report, last) = wal::recover(&dir, after, |lsn, entry| catalog.apply(lsn, &entry))?;
        if let Some((path, offset, why)) = &report.truncated {
            warn!(file = %path.display(), offset, why, "truncated a torn WAL tail");
        }
        start.wal = report;
        let wal = Arc::new(Wal::open(&dir, last + 1, |c: &Catalog, entries| {
            for (lsn, e) in entries {
                c.apply(*lsn, e);
            }
        })?);
        start.seconds = started.elapsed().as_secs_f64();
        metrics::gauge!("tiervec_recovery_seconds").set(start.seconds);
        metrics::gauge!("tiervec_recovery_wal_records_replayed")
            .set(start.wal.records_replayed as f64);
        info!(
            seconds = start.seconds,
            replayed = start.wal.records_replayed,
            collections = catalog.all().len(),
            "recovery done"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let maintenance = {
            let (catalog, wal, stop, config) =
                (catalog.clone(), wal.clone(), stop.clone(), config.clone());
            std::thread::Builder::new()
                .name("tiervec-maintenance".into())
                .spawn(move || maintain(&catalog, &wal, &stop, &config))
                .map_err(|e| data_err(format!("cannot start the maintenance thread: {e}")))?
        };
        Ok(Service {
            config,
            catalog,
            wal,
            start,
            stop,
            maintenance: Some(maintenance),
            _lock: lock,
        })
    }

    pub fn start_report(&self) -> &StartReport {
        &self.start
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn wal_bytes(&self) -> u64 {
        self.wal.bytes()
    }

    /// WAL flushes (write + fsync) since start; fewer than writes when writers shared them.
    pub fn wal_flushes(&self) -> u64 {
        self.wal.flushes()
    }

    /// Starts delivering [`Invalidation`]s (once; later calls get `None`). Writes replayed at
    /// start-up are not delivered: a connecting edge is reconciled against current LSNs.
    pub fn subscribe_invalidations(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<Invalidation>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.catalog.invalidations.set(tx).ok().map(|()| rx)
    }

    /// Logs (durably) that a delta with this step is about to be pushed to `edge`.
    pub fn commit_edge_step(
        &self,
        edge: &str,
        collection: [u8; 16],
        step: ManifestStep,
    ) -> Result<u64, ServiceError> {
        self.commit(WalEntry::EdgeStep {
            edge: edge.to_owned(),
            collection,
            step,
        })
    }

    /// Logs (durably) that `edge`'s cache holds exactly `inventory`.
    pub fn commit_edge_reset(&self, edge: &str, inventory: Inventory) -> Result<u64, ServiceError> {
        self.commit(WalEntry::EdgeReset {
            edge: edge.to_owned(),
            collection: inventory.collection_id,
            inventory,
        })
    }

    fn collection(&self, name: &str) -> Result<Arc<Collection>, ServiceError> {
        self.catalog
            .get(name)
            .ok_or_else(|| ServiceError::CollectionNotFound(name.to_owned()))
    }

    fn commit(&self, entry: WalEntry) -> Result<u64, ServiceError> {
        Ok(self.wal.commit(&self.catalog, entry, &record_flush)?)
    }

    /// Creates a collection with a fresh identity.
    pub fn create_collection(
        &self,
        name: &str,
        dim: usize,
        metric: Metric,
        params: HnswParams,
    ) -> Result<CollectionInfo, ServiceError> {
        check_name(name)?;
        if dim == 0 || dim > MAX_DIM as usize {
            return Err(ServiceError::Invalid(format!(
                "dim {dim} is outside 1..={MAX_DIM}"
            )));
        }
        if !(2..=256).contains(&params.m) || params.ef_construction == 0 {
            return Err(ServiceError::Invalid(
                "m must be in 2..=256 and ef_construction ≥ 1".into(),
            ));
        }
        if self.catalog.get(name).is_some() {
            return Err(ServiceError::CollectionExists(name.to_owned()));
        }
        let id = *uuid::Uuid::new_v4().as_bytes();
        self.commit(WalEntry::CreateCollection {
            name: name.to_owned(),
            id,
            dim: dim as u32,
            metric: metric.code(),
            m: params.m as u32,
            ef_construction: params.ef_construction as u32,
            seed: params.seed,
        })?;
        match self.catalog.get(name) {
            Some(c) if c.info.id.0 == id => Ok(c.info.clone()),
            _ => Err(ServiceError::CollectionExists(name.to_owned())),
        }
    }

    /// Drops a collection; acknowledged (returns the LSN) once durable.
    pub fn drop_collection(&self, name: &str) -> Result<u64, ServiceError> {
        let c = self.collection(name)?;
        self.commit(WalEntry::DropCollection {
            name: name.to_owned(),
            id: c.info.id.0,
        })
    }

    /// Inserts or replaces points; acknowledged (returns the LSN) once durable.
    pub fn upsert(
        &self,
        name: &str,
        points: Vec<(u64, Vec<f32>, Option<String>)>,
    ) -> Result<u64, ServiceError> {
        let c = self.collection(name)?;
        self.check_batch(points.len())?;
        let dim = c.info.dim;
        let mut ids = Vec::with_capacity(points.len());
        let mut vectors = Vec::with_capacity(points.len() * dim);
        let mut payloads = Vec::with_capacity(points.len());
        for (index, (id, mut vector, payload)) in points.into_iter().enumerate() {
            validate_vector(&vector, dim).map_err(|source| ServiceError::BadPoint {
                index,
                id,
                source,
            })?;
            c.info.metric.prepare(&mut vector);
            ids.push(id);
            vectors.extend_from_slice(&vector);
            payloads.push(payload);
        }
        self.commit(WalEntry::Upsert {
            collection: c.info.id.0,
            ids,
            vectors,
            payloads,
        })
    }

    /// Deletes points (absent ids are ignored); acknowledged once durable.
    pub fn delete(&self, name: &str, ids: Vec<u64>) -> Result<u64, ServiceError> {
        let c = self.collection(name)?;
        self.check_batch(ids.len())?;
        self.commit(WalEntry::Delete {
            collection: c.info.id.0,
            ids,
        })
    }

    fn check_batch(&self, n: usize) -> Result<(), ServiceError> {
        if n > self.config.max_batch {
            return Err(ServiceError::Invalid(format!(
                "{n} points in one request; the maximum is {}",
                self.config.max_batch
            )));
        }
        Ok(())
    }

    pub fn get(&self, name: &str, id: u64) -> Result<Point, ServiceError> {
        self.collection(name)?
            .get(id)
            .ok_or(ServiceError::PointNotFound {
                collection: name.to_owned(),
                id,
            })
    }

    pub fn search(
        &self,
        name: &str,
        query: &[f32],
        params: &SearchParams,
    ) -> Result<(Vec<Hit>, Engine), ServiceError> {
        Ok(self.collection(name)?.search(query, params)?)
    }

    /// Writes a checkpoint of every collection and drops the WAL segments it covers.
    pub fn checkpoint(&self) -> Result<(PathBuf, u64), ServiceError> {
        checkpoint_now(&self.catalog, &self.wal, &self.config)
    }

    /// Waits (up to `timeout`) until every collection's points are in a searchable graph
    /// generation; returns whether they are.
    pub fn wait_indexed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .catalog
                .all()
                .iter()
                .all(|c| c.generation_len() >= c.slots())
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.maintenance.take() {
            let _ = t.join();
        }
    }
}

fn checkpoint_now(
    catalog: &Catalog,
    wal: &Wal<Catalog>,
    config: &CloudConfig,
) -> Result<(PathBuf, u64), ServiceError> {
    let started = Instant::now();
    let ((collections, edge_caches), lsn) = wal.rotate(catalog, || {
        let edge_caches: Vec<EdgeCacheImage> = catalog
            .edge_caches
            .read()
            .iter()
            .map(|((edge, _), m)| EdgeCacheImage {
                edge: edge.clone(),
                manifest: m.inventory(),
            })
            .collect();
        let collections = catalog
            .all()
            .iter()
            .map(|c| {
                let (ids, lsns, vectors, payloads) = c.live_image();
                CollectionImage {
                    name: c.info.name.clone(),
                    id: c.info.id.0,
                    dim: c.info.dim as u32,
                    metric: c.info.metric.code(),
                    m: c.info.params.m as u32,
                    ef_construction: c.info.params.ef_construction as u32,
                    seed: c.info.params.seed,
                    ids,
                    lsns,
                    vectors,
                    payloads,
                }
            })
            .collect::<Vec<_>>();
        (collections, edge_caches)
    })?;
    let path = checkpoint::write(
        &config.data_dir,
        &CheckpointBody {
            lsn,
            collections,
            edge_caches,
        },
    )?;
    wal.remove_through(lsn)?;
    checkpoint::remove_before(&config.data_dir, lsn).map_err(|source| CheckpointError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    info!(lsn, seconds = started.elapsed().as_secs_f64(), path = %path.display(), "checkpoint written");
    Ok((path, lsn))
}

/// The maintenance loop: index new points, export generations, rebuild graphs heavy with
/// tombstones, checkpoint when the WAL grows past its budget, publish gauges.
fn maintain(catalog: &Catalog, wal: &Wal<Catalog>, stop: &AtomicBool, config: &CloudConfig) {
    while !stop.load(Ordering::Acquire) {
        let mut worked = false;
        for c in catalog.all() {
            if c.index_dead_fraction() > config.tombstone_rebuild_fraction {
                info!(collection = %c.info.name, dead = c.index_dead_fraction(), "rebuilding graph");
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.rebuild_index()))
                    .is_err()
                {
                    tracing::error!(collection = %c.info.name, "graph rebuild panicked");
                }
                worked = true;
            }
            // A panic inside hnsw_rs must not end maintenance for every collection: the
            // collection keeps being served (exactly, from its last generation) and it is logged.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.index_step(false) || c.index_step(true)
            }));
            match step {
                Ok(did) => worked |= did,
                Err(_) => {
                    metrics::counter!("tiervec_index_failures_total", "collection" => c.info.name.clone()).increment(1);
                    tracing::error!(collection = %c.info.name, "indexing panicked; searches fall back to the last generation and exact scans");
                }
            }
            metrics::gauge!("tiervec_collection_points", "collection" => c.info.name.clone())
                .set(c.len() as f64);
            metrics::gauge!("tiervec_index_generation_points", "collection" => c.info.name.clone())
                .set(c.generation_len() as f64);
        }
        let bytes = wal.bytes();
        metrics::gauge!("tiervec_wal_bytes").set(bytes as f64);
        if bytes > config.checkpoint_wal_bytes
            && let Err(e) = checkpoint_now(catalog, wal, config)
        {
            warn!(error = %e, "checkpoint failed");
        }
        if !worked {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
