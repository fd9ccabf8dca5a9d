//! The push hub: what every connected cache's push task shares — the anchor tables, the route
//! to each task (invalidations are routed there as writes become durable), the turn that
//! serialises one cache's deliveries across connections, and the versions acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tiervec_shared::push::Manifest;
use tokio::sync::{Notify, mpsc};

use super::anchors::AnchorTable;
use super::clock::now_unix_us;
use super::config::PushConfig;
use super::plan::Demand;
use super::restore::RestorePolicy;
use crate::collection::Collection;
use crate::hot::HotIds;
use crate::service::{Invalidation, Service};

/// A job for an edge cache's push task.
pub(super) enum Job {
    Invalidate(Invalidation),
}

/// Jobs queued for one cache's push task (each a write). When full, the writes that do not fit
/// are dropped and the task reconciles the cache instead (`state.rs`, `MAX_QUEUED_IDS`).
pub(super) const JOB_QUEUE: usize = 1_024;

/// An edge cache: (edge id, collection identity).
pub(super) type CacheKey = (String, [u8; 16]);

/// How to reach a connected cache's push task.
pub(super) struct Route {
    /// The connection the task pushes over.
    pub(super) conn: quinn::Connection,
    pub(super) jobs: mpsc::Sender<Job>,
    /// Set when a job did not fit in `jobs`.
    pub(super) overflowed: Arc<AtomicBool>,
    /// Signalled when one of the cache's anchors becomes hot.
    pub(super) anchor_hot: Arc<Notify>,
    /// The cache keeps certificates: every write concerns it.
    pub(super) certify: bool,
}

/// What the push tasks share: the anchor tables, and a route to each connected cache's task.
pub struct PushHub {
    pub(super) config: PushConfig,
    pub(super) service: Arc<Service>,
    hot: Arc<HotIds>,
    started: Instant,
    anchors: Mutex<HashMap<CacheKey, AnchorTable>>,
    pub(super) routes: Mutex<HashMap<CacheKey, Route>>,
    /// One delivery at a time per cache, across connections: versions never interleave.
    pub(super) delivering: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    /// The last version each cache acknowledged (durable there).
    pub(super) acked: Mutex<HashMap<CacheKey, u64>>,
}

impl PushHub {
    /// When an edge far behind its logged manifest is restored whole.
    pub fn restore_policy(&self) -> RestorePolicy {
        self.config.restore
    }

    /// The hub, and the task routing invalidations to the push tasks (spawned here).
    pub fn start(config: PushConfig, service: Arc<Service>, hot: Arc<HotIds>) -> Arc<PushHub> {
        let hub = Arc::new(PushHub {
            config,
            service: service.clone(),
            hot,
            started: Instant::now(),
            anchors: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            delivering: Mutex::new(HashMap::new()),
            acked: Mutex::new(HashMap::new()),
        });
        if let Some(mut invalidations) = service.subscribe_invalidations() {
            // Weak: the channel's sender lives in the service the hub holds, so a strong
            // reference here would keep both alive forever.
            let hub = Arc::downgrade(&hub);
            tokio::spawn(async move {
                while let Some(inv) = invalidations.recv().await {
                    match hub.upgrade() {
                        Some(hub) => hub.route(inv),
                        None => return,
                    }
                }
            });
        }
        hub
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// The last manifest version `edge` acknowledged for its cache of `collection` since this
    /// process started (what it holds durably, at least). It exists for other crates' tests
    /// (the edge's crash test waits on it); nothing in the cloud reads it.
    pub fn acked_version(&self, edge: &str, collection: [u8; 16]) -> Option<u64> {
        self.acked
            .lock()
            .get(&(edge.to_owned(), collection))
            .copied()
    }

    /// Sends a write to every connected cache of its collection that holds one of its ids
    /// (those ids), or that keeps certificates (all of them: a new vector may enter a ball).
    fn route(&self, inv: Invalidation) {
        let holders: HashMap<String, Vec<u64>> = self
            .service
            .catalog()
            .holders(inv.collection, &inv.ids)
            .into_iter()
            .collect();
        let routes = self.routes.lock();
        for ((edge, collection), route) in routes.iter() {
            if *collection != inv.collection {
                continue;
            }
            let ids = match (route.certify, holders.get(edge)) {
                (true, _) => inv.ids.clone(),
                (false, Some(held)) => held.clone(),
                (false, None) => continue,
            };
            let job = Job::Invalidate(Invalidation {
                collection: inv.collection,
                ids,
                lsn: inv.lsn,
            });
            if let Err(mpsc::error::TrySendError::Full(_)) = route.jobs.try_send(job) {
                route.overflowed.store(true, Ordering::Release);
            }
        }
    }

    /// Counts a confirmed, non-shadow fallback query of `edge`: the ids of its answer (hot
    /// ids) and its vector as asked (toward its anchor).
    pub fn record_answer(&self, edge: &str, collection: [u8; 16], ids: &[u64], query: &[f32]) {
        self.hot.record(edge, collection, ids);
        if let Some(c) = self.service.catalog().by_id(collection) {
            self.record_query(edge, &c, query);
        }
    }

    fn record_query(&self, edge: &str, collection: &Collection, query: &[f32]) {
        let mut prepared = query.to_vec();
        collection.info.metric.prepare(&mut prepared);
        let key = (edge.to_owned(), collection.info.id.0);
        let now = self.now_us();
        let became_hot = self
            .anchors
            .lock()
            .entry(key.clone())
            .or_insert_with(|| {
                AnchorTable::new(self.config.anchors_per_edge, self.hot.half_life_us(), now)
            })
            .record(
                &prepared,
                collection.info.metric,
                &self.config,
                now,
                now_unix_us(),
            );
        if became_hot && let Some(route) = self.routes.lock().get(&key) {
            route.anchor_hot.notify_one();
        }
    }

    /// What `edge` asks of its cache of `collection` (at `manifest`), read from its anchor
    /// table and the hot ids; `None` before it asked anything. `balls` (a certifying cache):
    /// the anchors certified on this connection.
    pub(super) fn demand(
        &self,
        edge: &str,
        collection: [u8; 16],
        manifest: &Manifest,
        balls: Option<&HashSet<u64>>,
    ) -> Option<Demand> {
        let now = self.now_us();
        let max = self.config.max_anchors_per_delta;
        let (candidates, scores, uncertified) = {
            let anchors = self.anchors.lock();
            let table = anchors.get(&(edge.to_owned(), collection))?;
            let hot = table.hot(&self.config, now);
            let scores: HashMap<u64, f64> = hot.iter().copied().collect();
            let uncertified: Vec<(u64, Vec<f32>)> = match balls {
                Some(balls) => hot
                    .iter()
                    .filter(|(id, _)| manifest.holds_anchor(*id) && !balls.contains(id))
                    .take(max)
                    .filter_map(|(id, _)| Some((*id, table.entries.get(id)?.vector.clone())))
                    .collect(),
                None => Vec::new(),
            };
            let candidates: Vec<(u64, Vec<f32>, u64, f64)> = hot
                .iter()
                .filter(|(id, _)| !manifest.holds_anchor(*id))
                .take(max)
                .filter_map(|(id, count)| {
                    let e = table.entries.get(id)?;
                    Some((*id, e.vector.clone(), e.asked_unix_us, *count))
                })
                .collect();
            (candidates, scores, uncertified)
        };
        let (_, mut hot_ids) = self
            .hot
            .top(collection, Some(edge), self.config.anchors_per_edge);
        // Ids hot on their own: pushed outside anchors, and kept when their anchor goes.
        hot_ids.retain(|e| e.count >= self.config.hot_id_count);
        Some(Demand {
            candidates,
            scores,
            uncertified,
            hot_ids,
        })
    }

    /// The point of a tracked anchor of `edge`'s cache of `collection`.
    pub(super) fn anchor_vector(
        &self,
        edge: &str,
        collection: [u8; 16],
        anchor: u64,
    ) -> Option<Vec<f32>> {
        let anchors = self.anchors.lock();
        let table = anchors.get(&(edge.to_owned(), collection))?;
        Some(table.entries.get(&anchor)?.vector.clone())
    }
}
