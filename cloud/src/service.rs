//! The cloud service: the catalog of collections, the write path through the durable log
//! ([`crate::storage`]), recovery at start, checkpoints, and the maintenance thread that
//! indexes, rebuilds and checkpoints. It is configured by a plain [`ServiceConfig`] and given
//! the exact-search engine its collections use: it installs nothing process-wide.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use thiserror::Error;
use tiervec_shared::backoff::Backoff;
use tiervec_shared::hnsw::{HnswParams, M_RANGE, MAX_EF_CONSTRUCTION};
use tiervec_shared::push::{Inventory, MAX_PAYLOAD_BYTES, Manifest, ManifestStep, vector_bytes};
use tiervec_shared::query::{QueryError, validate_vector};
use tiervec_shared::snapshot::MAX_DIM;
use tiervec_shared::{CollectionId, Metric, ModelIdentity};
use tracing::{debug, info, warn};

use crate::collection::gpu::ExactEngine;
use crate::collection::{Collection, CollectionInfo, Point, SearchParams};
use crate::fanout::{self, Answer, FanOutError};
use crate::storage::{
    Appended, Apply, CheckpointError, Checkpointed, ClusterConfig, ClusterError, CollectionImage,
    DurableLog, EdgeCacheImage, Embedded, Image, JetStreamLog, MAX_SHARDS, ModelImage, StartReport,
    StorageError, WalEntry, WalError, shard_of,
};

/// What the service needs to know: where its data lives and its limits (the `tiervec-cloud
/// serve` configuration's fields of the same names).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    /// Where the WAL and checkpoints live (one server per directory, enforced by a lock).
    pub data_dir: PathBuf,
    /// Most points in one upsert or delete request.
    pub max_batch: usize,
    /// Beam width when a search request names none.
    pub default_ef: usize,
    /// Rebuild a collection's graph in the background once this fraction of its slots are
    /// tombstones (deleted or replaced points).
    pub tombstone_rebuild_fraction: f64,
    /// Take a checkpoint (and drop covered WAL segments) once the log exceeds this many bytes.
    pub checkpoint_wal_bytes: u64,
    /// Most bytes of points in one checkpoint chunk (`storage::checkpoint::CHUNK_BYTES`).
    pub checkpoint_chunk_bytes: usize,
    /// The cluster's NATS JetStream logs to run on; none runs on the embedded WAL.
    pub cluster: Option<ClusterConfig>,
    /// Most collections the cloud holds at once.
    pub max_collections: usize,
}

/// Errors of the service, classified for the API: user errors, missing things, and service
/// failures.
#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("collection `{0}` does not exist")]
    CollectionNotFound(String),
    #[error("collection `{0}` already exists")]
    CollectionExists(String),
    #[error("this cloud holds its most collections ({max}, `max_collections`); drop one first")]
    TooManyCollections { max: usize },
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
    #[error(
        "point {index} (id {id}): its payload is {len} bytes; the most a point may carry is {MAX_PAYLOAD_BYTES}"
    )]
    PayloadTooLarge { index: usize, id: u64, len: usize },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("data directory {path}: {what}")]
    DataDir { path: PathBuf, what: String },
    #[error(transparent)]
    FanOut(FanOutError),
    #[error(
        "a collection of {shards} shards needs a cluster (`[cluster]` in the configuration); this cloud runs on one node"
    )]
    ShardsNeedCluster { shards: u32 },
}

impl From<FanOutError> for ServiceError {
    fn from(e: FanOutError) -> ServiceError {
        match e {
            // The same refusal a search on one node gives.
            FanOutError::Query(q) => ServiceError::Query(q),
            other => ServiceError::FanOut(other),
        }
    }
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> ServiceError {
        match e {
            StorageError::Wal(e) => ServiceError::Wal(e),
            StorageError::Checkpoint(e) => ServiceError::Checkpoint(e),
            StorageError::Cluster(e) => ServiceError::Cluster(e),
        }
    }
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
pub struct Catalog {
    by_name: RwLock<HashMap<String, Arc<Collection>>>,
    /// (edge, collection identity) → manifest: a superset of what the edge holds.
    edge_caches: RwLock<HashMap<(String, [u8; 16]), Manifest>>,
    invalidations: OnceLock<tokio::sync::mpsc::UnboundedSender<Invalidation>>,
    /// The engine of every collection's exact scans.
    engine: Arc<ExactEngine>,
    /// Collection identity → the embedding model its vectors were made with.
    models: RwLock<HashMap<[u8; 16], ModelIdentity>>,
}

impl Catalog {
    pub(crate) fn new(engine: Arc<ExactEngine>) -> Catalog {
        Catalog {
            by_name: RwLock::default(),
            edge_caches: RwLock::default(),
            invalidations: OnceLock::new(),
            engine,
            models: RwLock::default(),
        }
    }

    /// The embedding model collection `id` records, if it was made for texts.
    pub fn model(&self, id: [u8; 16]) -> Option<ModelIdentity> {
        self.models.read().get(&id).cloned()
    }

    /// The engine of every collection's exact scans.
    pub fn exact_engine(&self) -> &Arc<ExactEngine> {
        &self.engine
    }

    pub fn get(&self, name: &str) -> Option<Arc<Collection>> {
        self.by_name.read().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Collection>> {
        let mut v: Vec<_> = self.by_name.read().values().cloned().collect();
        v.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        v
    }

    /// The ids any edge's cache of `collection` holds, as the cloud's manifests say.
    pub fn ids_held_by_edges(&self, collection: [u8; 16]) -> HashSet<u64> {
        self.edge_caches
            .read()
            .iter()
            .filter(|((_, c), _)| *c == collection)
            .flat_map(|(_, m)| m.ids().map(|(id, _)| id))
            .collect()
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
}

impl Apply for Catalog {
    fn restore(&self, image: Image) {
        let mut map = self.by_name.write();
        for image in image.collections {
            let Some(metric) = Metric::from_code(image.metric) else {
                continue;
            };
            let c = Collection::with_engine(
                CollectionInfo {
                    name: image.name.clone(),
                    id: CollectionId(image.id),
                    dim: image.dim as usize,
                    metric,
                    params: logged_params(&image.name, image.m, image.ef_construction, image.seed),
                },
                self.engine.clone(),
            );
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
        self.models
            .write()
            .extend(image.models.into_iter().map(|m| {
                (
                    m.collection,
                    ModelIdentity {
                        name: m.name,
                        dim: m.dim,
                        checksum: m.checksum,
                    },
                )
            }));
        let dims: HashMap<[u8; 16], usize> = self
            .all()
            .iter()
            .map(|c| (c.info.id.0, c.info.dim))
            .collect();
        let mut caches = self.edge_caches.write();
        for image in image.edge_caches {
            if let Some(&dim) = dims.get(&image.manifest.collection_id) {
                caches.insert(
                    (image.edge, image.manifest.collection_id),
                    Manifest::from_inventory(&image.manifest, dim),
                );
            }
        }
    }

    /// Deterministic, so replay rebuilds exactly what was acknowledged.
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
                // The service logs only creates it validated; one that still breaks its rules
                // (a damaged or foreign log) is skipped loudly: a dimension it refuses, or an
                // identity in use, which would make every write to that identity ambiguous.
                let metric = Metric::from_code(*metric);
                let id_in_use = map.values().any(|c| c.info.id.0 == *id);
                let (Some(metric), false, true) = (metric, id_in_use, (1..=MAX_DIM).contains(dim))
                else {
                    tracing::error!(lsn, collection = %name, dim, id_in_use, "collection create record that breaks the create rules skipped");
                    return;
                };
                map.insert(
                    name.clone(),
                    Arc::new(Collection::with_engine(
                        CollectionInfo {
                            name: name.clone(),
                            id: CollectionId(*id),
                            dim: *dim as usize,
                            metric,
                            params: logged_params(name, *m, *ef_construction, *seed),
                        },
                        self.engine.clone(),
                    )),
                );
            }
            WalEntry::DropCollection { name, id } => {
                let mut map = self.by_name.write();
                if map.get(name).is_some_and(|c| c.info.id.0 == *id) {
                    map.remove(name);
                }
                self.edge_caches.write().retain(|(_, c), _| c != id);
                self.models.write().remove(id);
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
                // The service logs a reset under its inventory's collection; one that names
                // another would be kept under one key and checkpointed under the other, so a
                // restart would lose it: skipped loudly, like an upsert whose lengths disagree.
                if inventory.collection_id != *collection {
                    tracing::error!(lsn, edge = %edge, "edge reset record naming two collections skipped");
                    return;
                }
                if let Some(c) = self.by_id(*collection) {
                    self.edge_caches.write().insert(
                        (edge.clone(), *collection),
                        Manifest::from_inventory(inventory, c.info.dim),
                    );
                }
            }
            WalEntry::SetModel {
                collection,
                name,
                dim,
                checksum,
            } => {
                // The service logs a model of the collection's dimension only.
                if self
                    .by_id(*collection)
                    .is_some_and(|c| c.info.dim == *dim as usize)
                {
                    self.models.write().insert(
                        *collection,
                        ModelIdentity {
                            name: name.clone(),
                            dim: *dim,
                            checksum: *checksum,
                        },
                    );
                }
            }
        }
    }

    /// Only invalidations: the points themselves live on the nodes holding the shard.
    fn observe(&self, lsn: u64, entry: &WalEntry) {
        match entry {
            WalEntry::Upsert {
                collection, ids, ..
            }
            | WalEntry::Delete { collection, ids } => self.invalidate(*collection, ids, lsn),
            _ => {}
        }
    }

    fn shard_image(
        &self,
        collection: [u8; 16],
        shards: u32,
        shard: u32,
    ) -> Option<CollectionImage> {
        let c = self.by_id(collection)?;
        let points = c.live_image_where(|id| shard_of(id, shards) == shard);
        Some(collection_image(&c, points))
    }

    fn forget_shard(&self, collection: [u8; 16], shards: u32, shard: u32) {
        if let Some(c) = self.by_id(collection) {
            let forgotten = c.forget_where(|id| shard_of(id, shards) == shard);
            info!(collection = %c.info.name, shard, points = forgotten, "shard copy dropped: other nodes hold it");
        }
    }

    fn replace_shard(
        &self,
        image: &CollectionImage,
        shards: u32,
        shard: u32,
        from: u64,
        position: u64,
    ) -> bool {
        let Some(c) = self.by_id(image.id) else {
            return false;
        };
        let dim = c.info.dim;
        if image.dim as usize != dim
            || image.vectors.len() != image.ids.len() * dim
            || image.lsns.len() != image.ids.len()
            || image.payloads.len() != image.ids.len()
        {
            // A snapshot that disagrees with its collection is never applied half.
            tracing::error!(collection = %c.info.name, shard, "shard snapshot inconsistent with its collection refused");
            return false;
        }
        let kept: HashSet<u64> = image.ids.iter().copied().collect();
        let (gone, ..) =
            c.live_image_where(|id| shard_of(id, shards) == shard && !kept.contains(&id));
        c.apply_delete(position, &gone);
        self.invalidate(image.id, &gone, position);
        let mut changed = Vec::new();
        for (i, (&id, &lsn)) in image.ids.iter().zip(&image.lsns).enumerate() {
            c.apply_upsert(
                lsn,
                &[id],
                &image.vectors[i * dim..(i + 1) * dim],
                std::slice::from_ref(&image.payloads[i]),
            );
            if lsn > from {
                changed.push(id);
            }
        }
        self.invalidate(image.id, &changed, position);
        true
    }

    fn image(&self) -> Image {
        let edge_caches: Vec<EdgeCacheImage> = self
            .edge_caches
            .read()
            .iter()
            .map(|((edge, _), m)| EdgeCacheImage {
                edge: edge.clone(),
                manifest: m.inventory(),
            })
            .collect();
        let collections = self
            .all()
            .iter()
            .map(|c| collection_image(c, c.live_image()))
            .collect();
        let models = self
            .models
            .read()
            .iter()
            .map(|(collection, m)| ModelImage {
                collection: *collection,
                name: m.name.clone(),
                dim: m.dim,
                checksum: m.checksum,
            })
            .collect();
        Image {
            collections,
            edge_caches,
            models,
        }
    }
}

/// `c` as a checkpoint holds it, with `points` (ids, LSNs, vectors, payloads).
fn collection_image(
    c: &Collection,
    (ids, lsns, vectors, payloads): (Vec<u64>, Vec<u64>, Vec<f32>, Vec<Option<String>>),
) -> CollectionImage {
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
}

/// How long a request naming a collection this node does not know waits for the catalog to
/// catch up (on a cluster; at most one request at a time waits).
const CATALOG_CATCH_UP: Duration = Duration::from_millis(500);

/// The running cloud service.
pub struct Service {
    pub config: ServiceConfig,
    catalog: Arc<Catalog>,
    log: Arc<dyn DurableLog>,
    start: StartReport,
    stop: Arc<AtomicBool>,
    maintenance: Option<JoinHandle<()>>,
    health: Arc<MaintenanceHealth>,
    _lock: File,
}

/// What the maintenance thread last reported. `/readyz` is not ready while its last pass
/// panicked (no indexing, no checkpoints: the WAL would grow without bound), and says why
/// checkpoints are failing while they are.
#[derive(Debug, Default)]
pub struct MaintenanceHealth {
    failure: parking_lot::Mutex<Option<String>>,
    checkpoint_failure: parking_lot::Mutex<Option<String>>,
}

impl MaintenanceHealth {
    /// Why the last maintenance pass failed, if it did and none has completed since.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// Why the last checkpoint failed, if none has succeeded since.
    pub fn checkpoint_failure(&self) -> Option<String> {
        self.checkpoint_failure.lock().clone()
    }
}

/// Collection names: 1–64 of `[A-Za-z0-9_-]`, so they are safe in URLs and file names.
/// The graph parameters a logged collection is built with. Creation refuses values outside
/// the bounds, but a log written before the bounds existed may hold any: such a value is
/// clamped, with a warning, so that recovery never aborts on it (hnsw_rs sizes a heap by
/// `ef_construction` on every insert).
fn logged_params(name: &str, m: u32, ef_construction: u32, seed: u64) -> HnswParams {
    let params = HnswParams {
        m: (m as usize).clamp(*M_RANGE.start(), *M_RANGE.end()),
        ef_construction: (ef_construction as usize).clamp(1, MAX_EF_CONSTRUCTION),
        seed,
    };
    if params.m != m as usize || params.ef_construction != ef_construction as usize {
        warn!(
            collection = name,
            m,
            ef_construction,
            built_with_m = params.m,
            built_with_ef_construction = params.ef_construction,
            "logged graph parameters are out of bounds; the graph is built with the nearest allowed ones"
        );
    }
    params
}

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

impl Service {
    /// Opens the data directory (exclusively), loads the newest checkpoint, replays the WAL
    /// after it, and starts the maintenance thread. Every collection's exact scans use `engine`
    /// (chosen before recovery, so recovered collections use it too).
    pub fn start(config: ServiceConfig, engine: Arc<ExactEngine>) -> Result<Service, ServiceError> {
        let dir = config.data_dir.clone();
        let data_err = |what: String| ServiceError::DataDir {
            path: dir.clone(),
            what,
        };
        let lock = lock_data_dir(&dir)?;

        let catalog = Arc::new(Catalog::new(engine));
        let (log, start): (Arc<dyn DurableLog>, StartReport) = match &config.cluster {
            Some(cluster) => {
                let (log, start) = JetStreamLog::open(
                    cluster,
                    &dir,
                    catalog.clone(),
                    config.checkpoint_chunk_bytes,
                )?;
                (Arc::new(log), start)
            }
            None => {
                let (log, start) =
                    Embedded::open(&dir, catalog.clone(), config.checkpoint_chunk_bytes)?;
                (Arc::new(log), start)
            }
        };
        metrics::gauge!("tiervec_recovery_seconds").set(start.seconds);
        metrics::gauge!("tiervec_recovery_wal_records_replayed")
            .set(start.wal.records_replayed as f64);
        info!(
            seconds = start.seconds,
            replayed = start.wal.records_replayed,
            collections = catalog.all().len(),
            "recovery done"
        );
        if let Some(peers) = log.peers() {
            let (catalog, weak) = (catalog.clone(), Arc::downgrade(&log));
            peers.answer_with(Box::new(move |body| {
                // The log holds this handler: it keeps only a weak reference back.
                let Some(log) = weak.upgrade() else {
                    return Vec::new();
                };
                let peers = log.peers().expect("a log with peers");
                fanout::answer(body, &*log, peers, |id| catalog.by_id(id))
            }));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(MaintenanceHealth::default());
        let maintenance = {
            let (catalog, log, stop, config, health) = (
                catalog.clone(),
                log.clone(),
                stop.clone(),
                config.clone(),
                health.clone(),
            );
            std::thread::Builder::new()
                .name("tiervec-maintenance".into())
                .spawn(move || {
                    let mut checkpoints = CheckpointSchedule::default();
                    supervise(&stop, &health, MAINTENANCE_RETRY, || {
                        maintenance_pass(&catalog, &*log, &config, &mut checkpoints, &health)
                    })
                })
                .map_err(|e| data_err(format!("cannot start the maintenance thread: {e}")))?
        };
        Ok(Service {
            config,
            catalog,
            log,
            start,
            stop,
            maintenance: Some(maintenance),
            health,
            _lock: lock,
        })
    }

    pub fn start_report(&self) -> &StartReport {
        &self.start
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Why the log no longer takes writes, if it does not; `/readyz` reports it.
    pub fn log_failure(&self) -> Option<String> {
        self.log.failure()
    }

    /// The maintenance thread's state; `/readyz` reports it.
    pub fn maintenance(&self) -> &MaintenanceHealth {
        &self.health
    }

    /// WAL flushes (write + fsync) since start; fewer than writes when writers shared them.
    /// The durability tests read it to show group commit; the metrics count the same flushes.
    pub fn wal_flushes(&self) -> u64 {
        self.log.flushes()
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

    /// Logs (durably) that `edge`'s cache holds exactly `inventory`. The edge's byte costs are
    /// not trusted: each is recomputed from the point the cloud holds, or, for a point the
    /// cloud no longer holds, capped at the most any point can cost.
    pub fn commit_edge_reset(
        &self,
        edge: &str,
        mut inventory: Inventory,
    ) -> Result<u64, ServiceError> {
        if let Some(c) = self.catalog.by_id(inventory.collection_id) {
            let dim = c.info.dim;
            for v in &mut inventory.vectors {
                v.bytes = match c.payload_len(v.id) {
                    Some(len) => vector_bytes(dim, len),
                    None => v.bytes.min(vector_bytes(dim, MAX_PAYLOAD_BYTES)),
                };
            }
        }
        self.commit(WalEntry::EdgeReset {
            edge: edge.to_owned(),
            collection: inventory.collection_id,
            inventory,
        })
    }

    /// The collection `name`; on a cluster, after catching up with the catalog when this node
    /// does not know it yet.
    pub fn collection(&self, name: &str) -> Result<Arc<Collection>, ServiceError> {
        if let Some(c) = self.catalog.get(name) {
            return Ok(c);
        }
        // On a cluster, a create another node acknowledged may not have reached this node yet.
        if self.log.catch_up_catalog(CATALOG_CATCH_UP)
            && let Some(c) = self.catalog.get(name)
        {
            return Ok(c);
        }
        Err(ServiceError::CollectionNotFound(name.to_owned()))
    }

    fn commit(&self, entry: WalEntry) -> Result<u64, ServiceError> {
        Ok(self.log.append(entry)?.position)
    }

    /// Whether this node holds every shard of the collection caught up (always, off a
    /// cluster): what an answer that must cover the whole collection (a certificate) needs.
    pub fn holds_whole(&self, collection: [u8; 16]) -> bool {
        self.log
            .peers()
            .is_none_or(|p| p.ready_here(collection).len() == p.shards(collection) as usize)
    }

    /// The shards of a collection this node holds caught up (all of them off a cluster).
    pub fn shards_held(&self, collection: [u8; 16]) -> Vec<u32> {
        self.log
            .peers()
            .map_or_else(|| vec![0], |p| p.ready_here(collection))
    }

    /// The shards of a collection (1 off a cluster).
    pub fn shards(&self, collection: [u8; 16]) -> u32 {
        self.log.peers().map_or(1, |p| p.shards(collection))
    }

    /// Whether a search of `name` asks other nodes (so a caller runs it off async workers).
    pub fn fans_out(&self, name: &str) -> bool {
        self.catalog
            .get(name)
            .is_some_and(|c| !self.holds_whole(c.info.id.0))
    }

    fn shard_timeout(&self) -> Duration {
        Duration::from_millis(
            self.config
                .cluster
                .as_ref()
                .map_or(1_000, |c| c.shard_timeout_ms),
        )
    }

    /// Creates a collection with a fresh identity.
    pub fn create_collection(
        &self,
        name: &str,
        dim: usize,
        metric: Metric,
        params: HnswParams,
    ) -> Result<CollectionInfo, ServiceError> {
        self.create_sharded_collection(name, dim, metric, params, 1)
    }

    /// Creates a collection whose points are spread over `shards` shards (more than one only
    /// on a cluster).
    pub fn create_sharded_collection(
        &self,
        name: &str,
        dim: usize,
        metric: Metric,
        params: HnswParams,
        shards: u32,
    ) -> Result<CollectionInfo, ServiceError> {
        check_name(name)?;
        if !(1..=MAX_SHARDS).contains(&shards) {
            return Err(ServiceError::Invalid(format!(
                "shards = {shards} is outside 1..={MAX_SHARDS}"
            )));
        }
        if shards > 1 && self.log.peers().is_none() {
            return Err(ServiceError::ShardsNeedCluster { shards });
        }
        if dim == 0 || dim > MAX_DIM as usize {
            return Err(ServiceError::Invalid(format!(
                "dim {dim} is outside 1..={MAX_DIM}"
            )));
        }
        if !M_RANGE.contains(&params.m) {
            return Err(ServiceError::Invalid(format!(
                "m = {} is outside {}..={}",
                params.m,
                M_RANGE.start(),
                M_RANGE.end()
            )));
        }
        if !(1..=MAX_EF_CONSTRUCTION).contains(&params.ef_construction) {
            return Err(ServiceError::Invalid(format!(
                "ef_construction = {} is outside 1..={MAX_EF_CONSTRUCTION}",
                params.ef_construction
            )));
        }
        if self.catalog.get(name).is_some() {
            return Err(ServiceError::CollectionExists(name.to_owned()));
        }
        // Each collection costs memory (and, on a cluster, a JetStream stream and a consumer
        // per node): a client may not create them without bound.
        let max = self.config.max_collections;
        if self.catalog.all().len() >= max {
            return Err(ServiceError::TooManyCollections { max });
        }
        let id = *uuid::Uuid::new_v4().as_bytes();
        let create = WalEntry::CreateCollection {
            name: name.to_owned(),
            id,
            dim: dim as u32,
            metric: metric.code(),
            m: params.m as u32,
            ef_construction: params.ef_construction as u32,
            seed: params.seed,
        };
        self.log.append_create(create, shards)?;
        match self.catalog.get(name) {
            Some(c) if c.info.id.0 == id => Ok(c.info.clone()),
            _ => Err(ServiceError::CollectionExists(name.to_owned())),
        }
    }

    /// Drops a collection; acknowledged (returns the LSN) once durable.
    /// Records that collection `name` holds embeddings of texts by `model` (of its dimension):
    /// text queries of it are then embedded by that model only.
    pub fn set_model(&self, name: &str, model: &ModelIdentity) -> Result<u64, ServiceError> {
        let c = self.collection(name)?;
        if c.info.dim != model.dim as usize {
            return Err(ServiceError::Invalid(format!(
                "model {model} makes {}-d vectors; collection `{name}` holds {}-d ones",
                model.dim, c.info.dim
            )));
        }
        self.commit(WalEntry::SetModel {
            collection: c.info.id.0,
            name: model.name.clone(),
            dim: model.dim,
            checksum: model.checksum,
        })
    }

    pub fn drop_collection(&self, name: &str) -> Result<u64, ServiceError> {
        let c = self.collection(name)?;
        self.commit(WalEntry::DropCollection {
            name: name.to_owned(),
            id: c.info.id.0,
        })
    }

    /// Inserts or replaces points; acknowledged (returns where) once durable.
    pub fn upsert(
        &self,
        name: &str,
        points: Vec<(u64, Vec<f32>, Option<String>)>,
    ) -> Result<Appended, ServiceError> {
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
            if let Some(len) = payload.as_ref().map(String::len)
                && len > MAX_PAYLOAD_BYTES
            {
                return Err(ServiceError::PayloadTooLarge { index, id, len });
            }
            c.info.metric.prepare(&mut vector);
            ids.push(id);
            vectors.extend_from_slice(&vector);
            payloads.push(payload);
        }
        // An id given twice in one request keeps its last value, as if the points were written
        // in order (the log holds each id once: replay keeps the first of equal LSNs).
        let last: HashMap<u64, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        if last.len() < ids.len() {
            let kept: Vec<usize> = (0..ids.len()).filter(|&i| last[&ids[i]] == i).collect();
            vectors = kept
                .iter()
                .flat_map(|&i| vectors[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            payloads = kept.iter().map(|&i| payloads[i].take()).collect();
            ids = kept.iter().map(|&i| ids[i]).collect();
        }
        Ok(self.log.append(WalEntry::Upsert {
            collection: c.info.id.0,
            ids,
            vectors,
            payloads,
        })?)
    }

    /// Deletes points (absent ids are ignored); acknowledged once durable.
    pub fn delete(&self, name: &str, ids: Vec<u64>) -> Result<Appended, ServiceError> {
        let c = self.collection(name)?;
        self.check_batch(ids.len())?;
        Ok(self.log.append(WalEntry::Delete {
            collection: c.info.id.0,
            ids,
        })?)
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
        let c = self.collection(name)?;
        self.get_from(&c, id)?.ok_or(ServiceError::PointNotFound {
            collection: name.to_owned(),
            id,
        })
    }

    /// Point `id` of `c`, from this node or (on a cluster) a node holding its shard.
    pub fn get_from(&self, c: &Collection, id: u64) -> Result<Option<Point>, ServiceError> {
        Ok(match self.log.peers() {
            Some(peers) => fanout::get(peers, c, id, self.shard_timeout())?,
            None => c.get(id),
        })
    }

    /// Points `ids` of `c`, in order, each from this node or a node holding its shard, in
    /// one batch per node (vectors left empty unless `vectors`).
    pub fn get_many_from(
        &self,
        c: &Collection,
        ids: &[u64],
        vectors: bool,
    ) -> Result<Vec<Option<Point>>, ServiceError> {
        Ok(match self.log.peers() {
            Some(peers) => fanout::get_many(peers, c, ids, vectors, self.shard_timeout())?,
            None => ids.iter().map(|&id| c.get(id)).collect(),
        })
    }

    /// How many rows a search of `name` scans exactly ([`Collection::scanned_rows`]).
    pub fn scanned_rows(&self, name: &str, exact: bool) -> Result<usize, ServiceError> {
        Ok(self.collection(name)?.scanned_rows(exact))
    }

    pub fn search(
        &self,
        name: &str,
        query: &[f32],
        params: &SearchParams,
    ) -> Result<Answer, ServiceError> {
        self.search_after(name, query, params, &[], Duration::ZERO, false)
    }

    /// Searches once the writes named in `after` ((shard, position) pairs a write answered;
    /// shard 0 off a cluster) are applied where they are searched, waiting up to `catch_up`.
    /// On a cluster, shards this node does not hold are asked of nodes that do (their hits
    /// carry payloads only `with_payload`), and an answer without some shards names them.
    pub fn search_after(
        &self,
        name: &str,
        query: &[f32],
        params: &SearchParams,
        after: &[(u32, u64)],
        catch_up: Duration,
        with_payload: bool,
    ) -> Result<Answer, ServiceError> {
        let c = self.collection(name)?;
        self.search_in(&c, query, params, after, catch_up, with_payload)
    }

    /// [`Service::search_after`] of a collection in hand.
    pub fn search_in(
        &self,
        c: &Collection,
        query: &[f32],
        params: &SearchParams,
        after: &[(u32, u64)],
        catch_up: Duration,
        with_payload: bool,
    ) -> Result<Answer, ServiceError> {
        let Some(peers) = self.log.peers() else {
            // Off a cluster every acknowledged write is applied.
            let (hits, engine) = c.search(query, params)?;
            return Ok(Answer {
                hits,
                engine,
                missing_shards: Vec::new(),
            });
        };
        let shards = peers.shards(c.info.id.0);
        if let Some((shard, _)) = after.iter().find(|(s, _)| *s >= shards) {
            return Err(ServiceError::Invalid(format!(
                "shard {shard} named in `after_shards`: the collection has {shards}"
            )));
        }
        Ok(fanout::search(
            &*self.log,
            peers,
            c,
            query,
            params,
            after,
            catch_up,
            self.shard_timeout(),
            with_payload,
        )?)
    }

    /// Writes a checkpoint of every collection and drops the WAL segments it covers.
    pub fn checkpoint(&self) -> Result<Checkpointed, ServiceError> {
        Ok(self.log.checkpoint()?)
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

/// Deletions remembered per collection before the maintenance loop forgets those no edge holds
/// (or as many as the collection has live points, if more).
const FORGET_DELETIONS_ABOVE: usize = 4_096;

/// The first wait before retrying a failed checkpoint, and the longest.
const CHECKPOINT_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// The first wait before another maintenance pass after one panicked, and the longest.
const MAINTENANCE_RETRY: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(30));
/// The pause after a pass that found nothing to do.
const IDLE_PASS: Duration = Duration::from_millis(20);

/// When the next checkpoint may be tried: a checkpoint copies every vector under the log's
/// lock, so a failing one (a full disk) is retried after a backoff, not on every pass.
struct CheckpointSchedule {
    backoff: Backoff,
    not_before: Option<Instant>,
}

impl Default for CheckpointSchedule {
    fn default() -> Self {
        CheckpointSchedule {
            backoff: Backoff::new(CHECKPOINT_RETRY.0, CHECKPOINT_RETRY.1),
            not_before: None,
        }
    }
}

/// Runs `pass` until `stop` is set, pausing after a pass that did nothing. A pass that panics
/// is logged, counted (`tiervec_maintenance_failures_total`) and recorded in `health` (so
/// `/readyz` turns not ready), and the next pass follows after a growing wait; the first pass
/// that completes clears it.
fn supervise(
    stop: &AtomicBool,
    health: &MaintenanceHealth,
    retry: (Duration, Duration),
    mut pass: impl FnMut() -> bool,
) {
    let mut backoff = Backoff::new(retry.0, retry.1);
    while !stop.load(Ordering::Acquire) {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut pass)) {
            Ok(worked) => {
                if health.failure.lock().take().is_some() {
                    info!("maintenance pass completed again; ready");
                    backoff.reset();
                }
                if !worked {
                    std::thread::sleep(IDLE_PASS);
                }
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                let wait = backoff.next_wait(1.0);
                metrics::counter!("tiervec_maintenance_failures_total").increment(1);
                tracing::error!(error = %why, retry_in_s = wait.as_secs_f64(), "maintenance pass panicked: no indexing or checkpoints until one completes; /readyz is not ready");
                *health.failure.lock() = Some(format!("maintenance pass panicked: {why}"));
                let until = Instant::now() + wait;
                while !stop.load(Ordering::Acquire) && Instant::now() < until {
                    std::thread::sleep(IDLE_PASS);
                }
            }
        }
    }
}

/// One maintenance pass: index new points, export generations, rebuild graphs heavy with
/// tombstones, checkpoint when the WAL grows past its budget, publish gauges. Returns whether
/// it did any work.
fn maintenance_pass(
    catalog: &Catalog,
    log: &dyn DurableLog,
    config: &ServiceConfig,
    checkpoints: &mut CheckpointSchedule,
    health: &MaintenanceHealth,
) -> bool {
    let mut worked = false;
    for c in catalog.all() {
        if c.index_dead_fraction() > config.tombstone_rebuild_fraction {
            info!(collection = %c.info.name, dead = c.index_dead_fraction(), "rebuilding graph");
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.rebuild_index())).is_err()
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
        if c.remembered_deletions() > FORGET_DELETIONS_ABOVE.max(c.len()) {
            let held = catalog.ids_held_by_edges(c.info.id.0);
            let forgotten = c.forget_deletions(|id| held.contains(&id));
            debug!(collection = %c.info.name, forgotten, "forgot deletions no edge needs");
        }
        metrics::gauge!("tiervec_collection_points", "collection" => c.info.name.clone())
            .set(c.len() as f64);
        metrics::gauge!("tiervec_index_generation_points", "collection" => c.info.name.clone())
            .set(c.generation_len() as f64);
    }
    let bytes = log.bytes();
    metrics::gauge!("tiervec_wal_bytes").set(bytes as f64);
    if bytes > config.checkpoint_wal_bytes
        && checkpoints.not_before.is_none_or(|t| Instant::now() >= t)
    {
        match log.checkpoint() {
            Ok(_) => {
                checkpoints.backoff.reset();
                checkpoints.not_before = None;
                *health.checkpoint_failure.lock() = None;
            }
            Err(e) => {
                let wait = checkpoints.backoff.next_wait(1.0);
                checkpoints.not_before = Some(Instant::now() + wait);
                metrics::counter!("tiervec_checkpoint_failures_total").increment(1);
                tracing::error!(error = %e, retry_in_s = wait.as_secs_f64(), wal_bytes = bytes, "checkpoint failed");
                *health.checkpoint_failure.lock() = Some(e.to_string());
            }
        }
    }
    worked
}

/// Creates `dir` if needed and takes its lock, held while the returned file is open: one
/// process (a server, or an offline repair) writes a data directory at a time.
pub fn lock_data_dir(dir: &Path) -> Result<File, ServiceError> {
    let data_err = |what: String| ServiceError::DataDir {
        path: dir.to_owned(),
        what,
    };
    fs::create_dir_all(dir).map_err(|e| data_err(e.to_string()))?;
    let lock = File::create(dir.join("LOCK")).map_err(|e| data_err(e.to_string()))?;
    lock.try_lock().map_err(|_| {
        data_err("another tiervec-cloud process holds it (LOCK); one writer per WAL".into())
    })?;
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass that panics turns the node not ready and is retried after a wait; the first pass
    /// that completes clears it; `stop` ends the loop even during a wait.
    #[test]
    fn a_panicking_maintenance_pass_is_retried_and_reported_until_one_completes() {
        let stop = AtomicBool::new(false);
        let health = MaintenanceHealth::default();
        let mut seen = Vec::new();
        let mut calls = 0;
        supervise(
            &stop,
            &health,
            (Duration::from_millis(1), Duration::from_millis(2)),
            || {
                calls += 1;
                seen.push(health.failure());
                match calls {
                    1 | 2 => panic!("checkpoint chunk {calls} overflowed"),
                    3 => true,
                    _ => {
                        stop.store(true, Ordering::Release);
                        false
                    }
                }
            },
        );
        assert_eq!(calls, 4);
        assert_eq!(seen[0], None);
        assert_eq!(
            seen[2].as_deref(),
            Some("maintenance pass panicked: checkpoint chunk 2 overflowed")
        );
        assert_eq!(seen[3], None, "a completed pass clears the failure");
        assert_eq!(health.failure(), None);
    }
}
