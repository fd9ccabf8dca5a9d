//! Pushing into edge caches: anchors (past fallback queries, tracked per edge by a decaying
//! heavy-hitter table), the vectors around them, hot ids, evictions to keep each cache within
//! its byte budget, and invalidations of written ids, sent at once.
//!
//! One push task per connected edge cache ([`push_loop`]) sends every delta of that cache, one
//! at a time, each on a stream the cloud opens, and waits for its acknowledgement before the
//! next: so deltas arrive in version order. Before a delta is sent, its [`ManifestStep`] is
//! committed to the WAL, so the cloud's manifest of the cache is always a superset of what the
//! edge holds, across cloud restarts. Nothing is pushed before the connection's handshake is
//! confirmed (never as 0.5-RTT data).
//!
//! When a push happens: every `period_ms`, and within `min_gap_ms` of an anchor becoming hot
//! (its decayed count reaching `anchor_hot_count`). An invalidation goes out as soon as the
//! write that caused it is durable; deltas are kept small (`max_anchors_per_delta`) so that one
//! never waits long behind a push.
//!
//! Certificates (edges that announce `certify`, cosine and L2 collections): a pushed anchor's
//! members are then its exact `anchor_members` nearest points and its radius the Euclidean
//! distance of the next one, so the members are exactly the corpus inside the ball. The push
//! task keeps each certificate it sent on this connection ([`Ball`]); every write of the
//! collection reaches it, and a point written inside a ball shrinks it (a deleted or moved
//! member leaves it) in a delta sent at once, like an invalidation. A new connection starts
//! with none: the edge forgets its certificates when it connects.
//!
//! Defaults: an anchor is pushed when it is asked a second time (one-off queries would churn
//! the cache), counting paraphrases within `anchor_merge_distance` (cosine 0.15) as the same
//! ask.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tiervec_shared::Metric;
use tiervec_shared::certificate::{certifiable, euclidean};
use tiervec_shared::hot::HotTracker;
use tiervec_shared::protocol::frame::{DEFAULT_MAX_FRAME, Frame, FrameDecoder, PREFIX_LEN};
use tiervec_shared::protocol::transfer::snapshot_frames;
use tiervec_shared::push::{
    Certificate, Delta, HeldVector, Manifest, ManifestStep, PushedAnchor, PushedVector, Tombstone,
    anchor_bytes, anchor_id, vector_bytes,
};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::collection::{Collection, SearchParams};
use crate::hot::HotIds;
use crate::restore::{self, RestorePolicy};
use crate::service::{Invalidation, Service};

/// Knobs of pushing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Push to every connected cache this often.
    pub period_ms: u64,
    /// A newly hot anchor is pushed this soon after the previous push (batching).
    pub min_gap_ms: u64,
    /// Ids pushed around each anchor (its cloud answer at this k).
    pub anchor_members: usize,
    /// `ef` of the searches that find them.
    pub anchor_ef: usize,
    /// A fallback query this close to a tracked anchor counts toward it instead of starting
    /// a new one (so many paraphrases of one request make one hot anchor).
    pub anchor_merge_distance: f32,
    /// An anchor is hot once its decayed count (rounded to a whole ask) reaches this.
    pub anchor_hot_count: f64,
    /// Anchors tracked per (edge, collection).
    pub anchors_per_edge: usize,
    /// Most anchors in one delta (the rest go in the next).
    pub max_anchors_per_delta: usize,
    /// Most bytes (byte model) one delta adds: a delivery stays short, so an invalidation
    /// never waits long behind a push.
    pub max_delta_bytes: u64,
    /// A plain id (outside any anchor) is pushed once it was in this many answers (decayed).
    pub hot_id_count: f64,
    /// An unacknowledged delta after this long closes the connection (the edge resyncs).
    pub ack_timeout_ms: u64,
    /// When an edge that comes back holding much less than logged is restored whole.
    pub restore: RestorePolicy,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            period_ms: 1_000,
            min_gap_ms: 100,
            anchor_members: 20,
            anchor_ef: 128,
            anchor_merge_distance: 0.15,
            anchor_hot_count: 2.0,
            anchors_per_edge: 8_192,
            max_anchors_per_delta: 8,
            max_delta_bytes: 128 << 10,
            hot_id_count: 3.0,
            ack_timeout_ms: 5_000,
            restore: RestorePolicy::default(),
        }
    }
}

fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A tracked anchor.
struct AnchorEntry {
    vector: Vec<f32>,
    /// Whether it has become hot.
    hot: bool,
    /// When it was last asked (Unix µs): the push delay is measured from the ask that made
    /// it hot, or — for one that waited for room — from its latest ask.
    asked_unix_us: u64,
}

/// One (edge, collection)'s anchors: a decaying Space-Saving table over anchor ids (memory
/// bounded by its capacity, whatever the corpus), and the points of the tracked ones.
struct AnchorTable {
    tracker: HotTracker,
    entries: HashMap<u64, AnchorEntry>,
}

impl AnchorTable {
    /// Counts a fallback query (prepared for the metric) toward its anchor; returns whether
    /// that anchor just became hot.
    fn record(&mut self, query: &[f32], metric: Metric, config: &PushConfig, now_us: u64) -> bool {
        let nearest = self
            .entries
            .iter()
            .map(|(id, e)| (*id, metric.distance(query, &e.vector)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, d)| *d <= config.anchor_merge_distance);
        let id = match nearest {
            Some((id, _)) => id,
            None => {
                let id = anchor_id(query);
                self.entries.insert(
                    id,
                    AnchorEntry {
                        vector: query.to_vec(),
                        hot: false,
                        asked_unix_us: 0,
                    },
                );
                id
            }
        };
        self.tracker.record(id, 1.0, now_us);
        // Entries follow the table: ids it evicted are forgotten (in batches, not per record).
        if self.entries.len() > 2 * self.tracker.capacity() {
            let tracker = &self.tracker;
            self.entries
                .retain(|id, _| tracker.estimate(*id, now_us).is_some());
        }
        let hot = self
            .tracker
            .estimate(id, now_us)
            // Decay makes two asks a second apart count 1.998: a count is compared rounded
            // to the nearest whole ask.
            .is_some_and(|e| e.count + 0.5 >= config.anchor_hot_count);
        match self.entries.get_mut(&id) {
            Some(e) => {
                e.asked_unix_us = now_unix_us();
                let became_hot = hot && !e.hot;
                e.hot |= hot;
                became_hot
            }
            None => false,
        }
    }

    /// Hot anchors, hottest first, with their counts. An anchor becomes hot when its count
    /// reaches `anchor_hot_count` and stays hot until it decays below half of that
    /// (hysteresis: a count sitting at the threshold neither flaps nor decays out of it in
    /// the moment after it was reached).
    fn hot(&self, config: &PushConfig, now_us: u64) -> Vec<(u64, f64)> {
        let mut hot: Vec<(u64, f64)> = self
            .tracker
            .above(config.anchor_hot_count / 2.0, now_us)
            .into_iter()
            .filter(|e| self.entries.get(&e.id).is_some_and(|a| a.hot))
            .map(|e| (e.id, e.count))
            .collect();
        hot.sort_by(|a, b| b.1.total_cmp(&a.1));
        hot
    }
}

/// A job for an edge cache's push task.
enum Job {
    Invalidate(Invalidation),
}

/// An edge cache: (edge id, collection identity).
type CacheKey = (String, [u8; 16]);

/// How to reach a connected cache's push task.
struct Route {
    /// The connection the task pushes over.
    conn: quinn::Connection,
    jobs: mpsc::UnboundedSender<Job>,
    /// Signalled when one of the cache's anchors becomes hot.
    anchor_hot: Arc<Notify>,
    /// The cache keeps certificates: every write concerns it.
    certify: bool,
}

/// A connected edge cache, as its push task sees it.
pub struct PushSession {
    pub conn: quinn::Connection,
    pub edge: String,
    pub collection: Arc<Collection>,
    pub budget: u64,
    /// Whether the connection's handshake is confirmed (nothing is pushed before).
    pub confirmed: tokio::sync::watch::Receiver<bool>,
    /// Signalled when the edge's inventory was adopted.
    pub resynced: Arc<Notify>,
    /// The cloud does not know this cache: wait for its inventory before pushing.
    pub resync_first: bool,
    /// The manifest version the edge announced (and, after a resync, the cloud adopted).
    pub version: u64,
    /// The edge asked for certificates (honoured for cosine and L2 collections).
    pub certify: bool,
    /// What the cloud had logged for the cache before adopting an inventory far behind it
    /// (`RestorePolicy`): restored whole before anything else is pushed.
    pub restore: Arc<Mutex<Option<Manifest>>>,
}

/// What the push tasks share: the anchor tables, and a route to each connected cache's task.
pub struct PushHub {
    config: PushConfig,
    service: Arc<Service>,
    hot: Arc<HotIds>,
    started: Instant,
    anchors: Mutex<HashMap<CacheKey, AnchorTable>>,
    routes: Mutex<HashMap<CacheKey, Route>>,
    /// One delivery at a time per cache, across connections: versions never interleave.
    delivering: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    /// The last version each cache acknowledged (durable there).
    acked: Mutex<HashMap<CacheKey, u64>>,
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
    /// process started (what it holds durably, at least).
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
            let _ = route.jobs.send(Job::Invalidate(Invalidation {
                collection: inv.collection,
                ids,
                lsn: inv.lsn,
            }));
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
            .or_insert_with(|| AnchorTable {
                tracker: HotTracker::new(
                    self.config.anchors_per_edge,
                    self.hot.half_life_us(),
                    now,
                ),
                entries: HashMap::new(),
            })
            .record(&prepared, collection.info.metric, &self.config, now);
        if became_hot && let Some(route) = self.routes.lock().get(&key) {
            route.anchor_hot.notify_one();
        }
    }

    /// The delta that brings the cache closer to what its edge asks for, within the budget,
    /// with its manifest step; `None` when there is nothing to push. Admission: a hot anchor
    /// enters a full cache only by evicting anchors colder than itself, so that an evicted
    /// anchor (still hot, but less) is not pushed straight back — no churn.
    ///
    /// `balls` (a certifying cache: the anchors certified on this connection): pushed anchors come
    /// with their exact balls, and hot anchors the cache holds without a certificate on this
    /// connection (held across a reconnection) are certified again, within the same
    /// `max_anchors_per_delta` exact searches.
    fn plan(
        &self,
        edge: &str,
        collection: &Collection,
        manifest: &Manifest,
        budget: u64,
        balls: Option<&HashSet<u64>>,
    ) -> Option<(Delta, ManifestStep)> {
        let certify = balls.is_some();
        let dim = collection.info.dim;
        let now = self.now_us();
        let key = (edge.to_owned(), collection.info.id.0);
        let (candidates, scores, uncertified) = {
            let anchors = self.anchors.lock();
            let table = anchors.get(&key)?;
            let hot = table.hot(&self.config, now);
            let scores: HashMap<u64, f64> = hot.iter().copied().collect();
            let uncertified: Vec<(u64, Vec<f32>)> = match balls {
                Some(balls) => hot
                    .iter()
                    .filter(|(id, _)| manifest.holds_anchor(*id) && !balls.contains(id))
                    .take(self.config.max_anchors_per_delta)
                    .filter_map(|(id, _)| Some((*id, table.entries.get(id)?.vector.clone())))
                    .collect(),
                None => Vec::new(),
            };
            let candidates: Vec<(u64, Vec<f32>, u64, f64)> = hot
                .iter()
                .filter(|(id, _)| !manifest.holds_anchor(*id))
                .take(self.config.max_anchors_per_delta)
                .filter_map(|(id, count)| {
                    let e = table.entries.get(id)?;
                    Some((*id, e.vector.clone(), e.asked_unix_us, *count))
                })
                .collect();
            (candidates, scores, uncertified)
        };
        // Each candidate with its members (and, certified, its exact ball), hottest first.
        let mut anchors: Vec<(PushedAnchor, f64)> = candidates
            .into_iter()
            .filter_map(|(anchor, vector, hot_at, count)| {
                let (members, radius) = if certify {
                    let ball = Ball::exact(collection, &vector, self.config.anchor_members)?;
                    (ball.member_ids(), ball.radius)
                } else {
                    let params = SearchParams {
                        k: self.config.anchor_members,
                        ef: self.config.anchor_ef.max(self.config.anchor_members),
                        exact: false,
                        max_distance: None,
                    };
                    let (hits, _) = collection.search(&vector, &params).ok()?;
                    (hits.iter().map(|h| h.id).collect(), 0.0)
                };
                Some((
                    PushedAnchor {
                        anchor_id: anchor,
                        members,
                        radius,
                        vector,
                        hot_at_unix_us: hot_at,
                    },
                    count,
                ))
            })
            .collect();
        let (_, mut hot_ids) = self.hot.top(
            collection.info.id.0,
            Some(edge),
            self.config.anchors_per_edge,
        );
        // Ids hot on their own: pushed outside anchors, and kept when their anchor goes.
        hot_ids.retain(|e| e.count >= self.config.hot_id_count);
        // Drop the coldest candidates until the rest fit by evicting only colder entries.
        let (anchors, vectors, evict, evict_anchors) = loop {
            let mut vectors = Vec::new();
            let mut seen: HashSet<u64> = HashSet::new();
            for (a, _) in &anchors {
                for &id in &a.members {
                    if manifest.held(id).is_none() && seen.insert(id) {
                        vectors.extend(self.pushed(collection, id));
                    }
                }
            }
            let needed: u64 = vectors.iter().map(|v| push_cost(v, dim)).sum::<u64>()
                + anchors
                    .iter()
                    .map(|(a, _)| anchor_bytes(dim, a.members.len()))
                    .sum::<u64>();
            let coldest = anchors.last().map_or(f64::INFINITY, |(_, c)| *c);
            let keep: HashSet<u64> = anchors
                .iter()
                .flat_map(|(a, _)| a.members.iter().copied())
                .collect();
            let ranked = Scores {
                anchors: &scores,
                ids: &hot_ids,
            };
            let evicted = evictions(manifest, &ranked, &keep, needed, budget, dim, coldest);
            match evicted {
                Some((evict, evict_anchors)) if needed <= self.config.max_delta_bytes => {
                    break (anchors, vectors, evict, evict_anchors);
                }
                _ if anchors.len() > 1 => {
                    anchors.pop();
                }
                _ => break (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            }
        };
        let mut anchors: Vec<PushedAnchor> = anchors.into_iter().map(|(a, _)| a).collect();
        let mut vectors = vectors;
        // Plain hot ids outside anchors, only into room left (they evict nothing).
        let after: u64 = manifest.bytes()
            + vectors.iter().map(|v| push_cost(v, dim)).sum::<u64>()
            + anchors
                .iter()
                .map(|a| anchor_bytes(dim, a.members.len()))
                .sum::<u64>()
            - evict
                .iter()
                .filter_map(|id| manifest.held(*id))
                .map(|h| h.bytes)
                .sum::<u64>();
        let mut room = budget.saturating_sub(after);
        let pushed: HashSet<u64> = vectors.iter().map(|v| v.id).collect();
        for e in &hot_ids {
            if manifest.held(e.id).is_none() && !pushed.contains(&e.id) {
                match self.pushed(collection, e.id) {
                    Some(v) if push_cost(&v, dim) <= room => {
                        room -= push_cost(&v, dim);
                        vectors.push(v);
                    }
                    _ => {}
                }
            }
        }
        let evicted: HashSet<u64> = evict.iter().copied().collect();
        let pushed: HashSet<u64> = vectors.iter().map(|v| v.id).collect();
        // An anchor is pushed only if all its members are held afterwards.
        anchors.retain(|a| {
            a.members.iter().all(|m| {
                pushed.contains(m) || (manifest.held(*m).is_some() && !evicted.contains(m))
            })
        });
        // Certify again, with what exact searches this delta has left, hot anchors held without
        // a certificate on this connection whose whole ball is still held.
        let certificates: Vec<Certificate> = uncertified
            .into_iter()
            .filter(|(id, _)| !evict_anchors.contains(id))
            .take(
                self.config
                    .max_anchors_per_delta
                    .saturating_sub(anchors.len()),
            )
            .filter_map(|(id, vector)| {
                let ball = Ball::exact(collection, &vector, self.config.anchor_members)?;
                ball.members
                    .iter()
                    .all(|(m, _)| {
                        pushed.contains(m) || (manifest.held(*m).is_some() && !evicted.contains(m))
                    })
                    .then(|| Certificate {
                        anchor_id: id,
                        radius: ball.radius,
                        members: ball.member_ids(),
                    })
            })
            .collect();
        if vectors.is_empty() && anchors.is_empty() && evict.is_empty() && certificates.is_empty() {
            return None;
        }
        let version = manifest.version + 1;
        let step = ManifestStep {
            version,
            added: vectors
                .iter()
                .map(|v| HeldVector {
                    id: v.id,
                    lsn: v.lsn,
                    bytes: push_cost(v, dim),
                })
                .collect(),
            removed: evict.clone(),
            anchors_added: anchors
                .iter()
                .map(|a| (a.anchor_id, a.members.clone()))
                .chain(
                    certificates
                        .iter()
                        .map(|c| (c.anchor_id, c.members.clone())),
                )
                .collect(),
            anchors_removed: evict_anchors.clone(),
        };
        let delta = Delta {
            collection_id: collection.info.id.0,
            dim: dim as u32,
            metric: collection.info.metric.code(),
            version,
            vectors,
            anchors,
            evict,
            evict_anchors,
            tombstones: Vec::new(),
            certificates,
            sent_at_unix_us: 0,
        };
        Some((delta, step))
    }

    /// The point of a tracked anchor of `edge`'s cache of `collection`.
    fn anchor_vector(&self, edge: &str, collection: [u8; 16], anchor: u64) -> Option<Vec<f32>> {
        let anchors = self.anchors.lock();
        let table = anchors.get(&(edge.to_owned(), collection))?;
        Some(table.entries.get(&anchor)?.vector.clone())
    }

    /// Point `id` as pushed, if it exists.
    fn pushed(&self, collection: &Collection, id: u64) -> Option<PushedVector> {
        let p = collection.get(id)?;
        Some(PushedVector {
            id,
            lsn: p.lsn,
            vector: p.vector,
            payload: p.payload.map(|t| t.to_string()),
        })
    }
}

/// A pushed vector's cost in the byte model.
fn push_cost(v: &PushedVector, dim: usize) -> u64 {
    vector_bytes(dim, v.payload.as_ref().map_or(0, String::len))
}

/// The decayed counts eviction orders by: hot anchors, and ids hot on their own.
struct Scores<'a> {
    anchors: &'a HashMap<u64, f64>,
    ids: &'a [tiervec_shared::hot::Estimate],
}

/// What to evict so that `needed` more bytes fit in `budget`: anchors colder than `below`,
/// coldest first (with their members no kept anchor needs), then plain ids outside anchors,
/// coldest first by their own count (they only ever filled spare room, so any anchor
/// outranks them); never an id in `keep` (the members of what is being pushed). `None` when
/// that cannot free enough.
fn evictions(
    manifest: &Manifest,
    scores: &Scores,
    keep: &HashSet<u64>,
    needed: u64,
    budget: u64,
    dim: usize,
    below: f64,
) -> Option<(Vec<u64>, Vec<u64>)> {
    let mut over = (manifest.bytes() + needed).saturating_sub(budget);
    if over == 0 {
        return Some((Vec::new(), Vec::new()));
    }
    let id_score: HashMap<u64, f64> = scores.ids.iter().map(|e| (e.id, e.count)).collect();
    let mut refs: HashMap<u64, usize> = HashMap::new();
    for (_, members) in manifest.anchors() {
        for m in members {
            *refs.entry(*m).or_default() += 1;
        }
    }
    let mut anchors: Vec<(u64, &[u64], f64)> = manifest
        .anchors()
        .map(|(a, m)| (a, m, scores.anchors.get(&a).copied().unwrap_or(0.0)))
        .filter(|(_, _, score)| *score < below)
        .collect();
    anchors.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
    let (mut evict, mut evict_anchors) = (Vec::new(), Vec::new());
    let mut gone: HashSet<u64> = HashSet::new();
    for (anchor, members, _) in anchors {
        if over == 0 {
            break;
        }
        evict_anchors.push(anchor);
        over = over.saturating_sub(anchor_bytes(dim, members.len()));
        for m in members {
            let unreferenced = refs.get_mut(m).is_some_and(|r| {
                *r = r.saturating_sub(1);
                *r == 0
            });
            if unreferenced
                && !keep.contains(m)
                && gone.insert(*m)
                && let Some(h) = manifest.held(*m)
            {
                evict.push(*m);
                over = over.saturating_sub(h.bytes);
            }
        }
    }
    if over > 0 {
        let mut plain: Vec<(u64, u64, f64)> = manifest
            .ids()
            .filter(|(id, _)| {
                !gone.contains(id) && !keep.contains(id) && refs.get(id).is_none_or(|r| *r == 0)
            })
            .map(|(id, h)| (id, h.bytes, id_score.get(&id).copied().unwrap_or(0.0)))
            .collect();
        plain.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
        for (id, bytes, _) in plain {
            if over == 0 {
                break;
            }
            evict.push(id);
            over = over.saturating_sub(bytes);
        }
    }
    (over == 0).then_some((evict, evict_anchors))
}

/// A certificate as the cloud keeps it on one connection: the anchor's point, the radius, and
/// each member's Euclidean distance to the point.
#[derive(Clone, Debug, PartialEq)]
struct Ball {
    vector: Vec<f32>,
    radius: f32,
    members: Vec<(u64, f32)>,
}

impl Ball {
    /// The exact ball around `vector` (prepared) holding its `m` nearest points: found by the
    /// collection's exact search, which ranks by the metric; a few more are fetched and
    /// re-ranked by Euclidean distance so that rounding between the two orders cannot put a
    /// closer point outside. `None` if the search fails.
    fn exact(collection: &Collection, vector: &[f32], m: usize) -> Option<Ball> {
        let params = SearchParams {
            k: m + BALL_MARGIN,
            ef: m + BALL_MARGIN,
            exact: true,
            max_distance: None,
        };
        let (hits, _) = collection.search(vector, &params).ok()?;
        let mut by_distance: Vec<(u64, f32)> = hits
            .iter()
            .filter_map(|h| Some((h.id, euclidean(vector, &collection.get(h.id)?.vector))))
            .collect();
        by_distance.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let radius = by_distance.get(m).map_or(f32::INFINITY, |(_, d)| *d);
        by_distance.truncate(m);
        Some(Ball {
            vector: vector.to_vec(),
            radius,
            members: by_distance,
        })
    }

    fn member_ids(&self) -> Vec<u64> {
        self.members.iter().map(|(id, _)| *id).collect()
    }

    /// The ball after writes of `written` (current points; `None` for a deleted id): a point
    /// now inside shrinks the radius to its distance (it and everything beyond leave); a
    /// member deleted, or moved out, leaves. `None` if nothing changed.
    fn after(&self, written: &[(u64, Option<Vec<f32>>)]) -> Option<Ball> {
        let mut next = self.clone();
        for (id, point) in written {
            let distance = point.as_ref().map(|v| euclidean(&self.vector, v));
            match distance {
                Some(d) if d < next.radius => {
                    next.radius = d;
                    next.members.retain(|(m, md)| m != id && *md < d);
                }
                _ => next.members.retain(|(m, _)| m != id),
            }
        }
        (next != *self).then_some(next)
    }
}

/// Points fetched beyond a ball's members when it is computed.
const BALL_MARGIN: usize = 4;

/// Most (written point, ball) distance checks one write may cost a certifying cache's push
/// task (a few milliseconds at 384 dimensions); above, its certificates are dropped instead.
const MAX_BALL_CHECKS: usize = 1 << 20;

/// The delta for a write of `ids` at `lsn` in a cache: tombstones for the ids it holds, and
/// the certificates the write changes (computed from `balls`, the connection's certificates).
fn invalidation(
    manifest: &Manifest,
    collection: &Collection,
    inv: &Invalidation,
    balls: &HashMap<u64, Ball>,
) -> Option<(Delta, ManifestStep)> {
    let tombstones: Vec<Tombstone> = inv
        .ids
        .iter()
        .filter(|id| manifest.held(**id).is_some())
        .map(|&id| Tombstone { id, lsn: inv.lsn })
        .collect();
    let mut certificates = Vec::new();
    if inv.ids.len().saturating_mul(balls.len()) > MAX_BALL_CHECKS {
        // A bulk write: checking every point against every ball would stall this cache's
        // deliveries; dropping the certificates is always correct, and hot anchors are
        // certified again by the next pushes.
        certificates.extend(balls.keys().filter(|a| manifest.holds_anchor(**a)).map(
            |&anchor_id| {
                Certificate {
                    anchor_id,
                    radius: 0.0,
                    members: manifest
                        .anchor_members(anchor_id)
                        .unwrap_or_default()
                        .to_vec(),
                }
            },
        ));
    } else if !balls.is_empty() {
        let written: Vec<(u64, Option<Vec<f32>>)> = inv
            .ids
            .iter()
            .map(|&id| (id, collection.get(id).map(|p| p.vector)))
            .collect();
        for (&anchor, ball) in balls {
            if manifest.holds_anchor(anchor)
                && let Some(next) = ball.after(&written)
            {
                certificates.push(Certificate {
                    anchor_id: anchor,
                    radius: next.radius,
                    members: next.member_ids(),
                });
            }
        }
    }
    if tombstones.is_empty() && certificates.is_empty() {
        return None;
    }
    let version = manifest.version + 1;
    let step = ManifestStep {
        version,
        removed: tombstones.iter().map(|t| t.id).collect(),
        anchors_added: certificates
            .iter()
            .map(|c| (c.anchor_id, c.members.clone()))
            .collect(),
        ..ManifestStep::default()
    };
    Some((
        Delta {
            collection_id: collection.info.id.0,
            dim: collection.info.dim as u32,
            metric: collection.info.metric.code(),
            version,
            tombstones,
            certificates,
            ..Delta::default()
        },
        step,
    ))
}

/// Brings the connection's certificates in line with a delivered delta: new certified
/// anchors, certificate updates (of a known ball, or a held anchor certified again, whose point
/// `anchor_vector` gives), evicted anchors.
fn follow_certificates(
    balls: &mut HashMap<u64, Ball>,
    delta: &Delta,
    collection: &Collection,
    anchor_vector: impl Fn(u64) -> Option<Vec<f32>>,
) {
    for anchor in &delta.evict_anchors {
        balls.remove(anchor);
    }
    for a in delta.anchors.iter().filter(|a| a.radius > 0.0) {
        let members = a
            .members
            .iter()
            .filter_map(|&id| Some((id, euclidean(&a.vector, &collection.get(id)?.vector))))
            .collect();
        balls.insert(
            a.anchor_id,
            Ball {
                vector: a.vector.clone(),
                radius: a.radius,
                members,
            },
        );
    }
    for c in &delta.certificates {
        if c.radius == 0.0 {
            // Dropped: the anchor may be certified again.
            balls.remove(&c.anchor_id);
        } else if let Some(ball) = balls.get_mut(&c.anchor_id) {
            ball.radius = c.radius;
            ball.members.retain(|(id, _)| c.members.contains(id));
        } else if let Some(vector) = anchor_vector(c.anchor_id) {
            let members = c
                .members
                .iter()
                .filter_map(|&id| Some((id, euclidean(&vector, &collection.get(id)?.vector))))
                .collect();
            balls.insert(
                c.anchor_id,
                Ball {
                    vector,
                    radius: c.radius,
                    members,
                },
            );
        }
    }
}

/// Ids a cache holds at an older LSN than the collection's, or that no longer exist: found
/// when an edge connects, for writes whose invalidation never reached it.
fn outdated(manifest: &Manifest, collection: &Collection) -> Vec<(u64, u64)> {
    manifest
        .ids()
        .filter_map(|(id, held)| match collection.get(id) {
            Some(p) if p.lsn <= held.lsn => None,
            Some(p) => Some((id, p.lsn)),
            None => Some((id, collection.deleted_at(id).unwrap_or(u64::MAX))),
        })
        .collect()
}

/// Sends `frames` (a delta, or a snapshot's head and chunks) on a new stream and waits for the
/// acknowledgement of `version`.
async fn send_frames(
    conn: &quinn::Connection,
    frames: &[Frame],
    version: u64,
    timeout: Duration,
) -> Result<(), String> {
    let mut sent = 0u64;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.clear();
            frame.encode(&mut bytes);
            send.write_all(&bytes).await.map_err(|e| e.to_string())?;
            sent += bytes.len() as u64;
        }
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(PREFIX_LEN + 64)
            .await
            .map_err(|e| e.to_string())
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| "no acknowledgement in time".to_owned())??;
    metrics::counter!("tiervec_push_bytes_total").increment(sent);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    decoder.push(&reply).map_err(|e| e.to_string())?;
    match decoder.next_frame().map_err(|e| e.to_string())? {
        Some(Frame::DeltaAck(v)) if v == version => Ok(()),
        other => Err(format!("expected DeltaAck({version}), got {other:?}")),
    }
}

/// Restores an edge's cache whole (see [`crate::restore`]): the snapshot of what `logged`
/// held, at the version after the one the cloud adopted from the edge's inventory, streamed,
/// and its inventory logged once the edge acknowledged it.
async fn restore_cache(
    hub: &Arc<PushHub>,
    conn: &quinn::Connection,
    edge: &str,
    collection: &Arc<Collection>,
    logged: Manifest,
    budget: u64,
    ack_timeout: Duration,
) -> Result<(u64, usize), String> {
    let collection_id = collection.info.id.0;
    let version = hub
        .service
        .catalog()
        .edge_cache(edge, collection_id)
        .map_or(0, |m| m.version)
        + 1;
    let (builder, edge_name, built_collection) = (hub.clone(), edge.to_owned(), collection.clone());
    let (bytes, inventory) = tokio::task::spawn_blocking(move || {
        restore::build(
            &built_collection,
            &logged,
            |anchor| builder.anchor_vector(&edge_name, collection_id, anchor),
            version,
            budget,
        )
    })
    .await
    .map_err(|e| e.to_string())??;
    // The edge writes, syncs and validates the whole file before it acknowledges.
    let timeout = ack_timeout * (1 + (bytes.len() >> 22) as u32);
    send_frames(
        conn,
        &snapshot_frames(collection_id, version, &bytes),
        version,
        timeout,
    )
    .await?;
    let held = inventory.vectors.len();
    let (svc, edge_name) = (hub.service.clone(), edge.to_owned());
    tokio::task::spawn_blocking(move || svc.commit_edge_reset(&edge_name, inventory))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    hub.acked
        .lock()
        .insert((edge.to_owned(), collection_id), version);
    metrics::counter!("tiervec_push_restores_total").increment(1);
    metrics::counter!("tiervec_push_restore_bytes_total").increment(bytes.len() as u64);
    Ok((version, held))
}

/// One connected edge cache's push task: ends when the connection does.
pub async fn push_loop(hub: Arc<PushHub>, session: PushSession) {
    let PushSession {
        conn,
        edge,
        collection,
        budget,
        mut confirmed,
        resynced,
        resync_first,
        version,
        certify,
        restore,
    } = session;
    let certify = certify && certifiable(collection.info.metric);
    // The certificates sent on this connection, kept exact as the corpus changes; the edge
    // forgot every other one when it connected.
    let balls: Arc<Mutex<HashMap<u64, Ball>>> = Arc::default();
    let follow = |delta: &Delta| {
        let collection_id = collection.info.id.0;
        follow_certificates(&mut balls.lock(), delta, &collection, |anchor| {
            hub.anchor_vector(&edge, collection_id, anchor)
        });
    };
    if confirmed.wait_for(|c| *c).await.is_err() {
        return;
    }
    let ack_timeout = Duration::from_millis(hub.config.ack_timeout_ms);
    // An edge whose cache the cloud does not know sends its inventory first; pushing before
    // it is adopted would build on the wrong version.
    if resync_first
        && tokio::time::timeout(ack_timeout, resynced.notified())
            .await
            .is_err()
    {
        // A connection without a push task would miss invalidations: make the edge start over.
        warn!(edge = %edge, "no cache inventory from the edge; reconnecting");
        conn.close(quinn::VarInt::from_u32(0), b"no inventory");
        return;
    }
    let key = (edge.clone(), collection.info.id.0);
    let (jobs_tx, mut jobs) = mpsc::unbounded_channel();
    let notify = Arc::new(Notify::new());
    let turn = hub
        .delivering
        .lock()
        .entry(key.clone())
        .or_default()
        .clone();
    // The edge's previous connection is superseded: close it, so that a delivery waiting on it
    // fails now rather than at its timeout, and its task gives way.
    if let Some(old) = hub.routes.lock().get(&key)
        && old.conn.stable_id() != conn.stable_id()
    {
        old.conn.close(
            quinn::VarInt::from_u32(0),
            b"superseded by a new connection",
        );
    }
    {
        // A push task of the edge's previous connection may have logged a step after this
        // connection's handshake read the version: then the edge lacks it, and only a fresh
        // handshake (which resyncs) can tell.
        let _turn = turn.lock().await;
        hub.routes.lock().insert(
            key.clone(),
            Route {
                conn: conn.clone(),
                jobs: jobs_tx.clone(),
                anchor_hot: notify.clone(),
                certify,
            },
        );
        let logged = hub
            .service
            .catalog()
            .edge_cache(&edge, collection.info.id.0)
            .map(|m| m.version);
        if logged != Some(version) {
            warn!(edge = %edge, ?logged, version, "cache version moved during the handshake; reconnecting to resync");
            conn.close(quinn::VarInt::from_u32(0), b"resync");
        }
    }
    info!(edge = %edge, collection = %collection.info.name, budget, "pushing into the edge's cache");
    let lost = restore.lock().take();
    if let Some(logged) = lost {
        let _turn = turn.lock().await;
        let started = Instant::now();
        match restore_cache(&hub, &conn, &edge, &collection, logged, budget, ack_timeout).await {
            Ok((version, held)) => info!(
                edge = %edge,
                version,
                held,
                seconds = started.elapsed().as_secs_f64(),
                "restored the edge's cache whole from a streamed snapshot"
            ),
            Err(e) => {
                // The edge may have installed the file without the cloud logging it (a late
                // acknowledgement): only a fresh handshake, which resyncs, tells them apart.
                warn!(edge = %edge, error = %e, "restoring the edge's cache failed; reconnecting to resync");
                // The loop below sees the connection closed and removes the route.
                conn.close(quinn::VarInt::from_u32(0), b"restore failed; resync");
            }
        }
    }
    let period = Duration::from_millis(hub.config.period_ms.max(1));
    let gap = Duration::from_millis(hub.config.min_gap_ms);
    let mut tick = tokio::time::interval(period);
    let mut reconcile = true;
    // When a push is due after an anchor became hot (batched over `min_gap_ms`); waiting for
    // it never holds up an invalidation.
    let mut push_due: Option<tokio::time::Instant> = None;
    loop {
        let mut invalidations = Vec::new();
        let mut push_now = false;
        let due = push_due;
        tokio::select! {
            _ = tick.tick() => push_now = true,
            () = notify.notified() => {
                push_due.get_or_insert_with(|| tokio::time::Instant::now() + gap);
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                push_due = None;
                push_now = true;
            }
            () = resynced.notified() => reconcile = true,
            job = jobs.recv() => match job {
                Some(Job::Invalidate(inv)) => invalidations.push(inv),
                None => break,
            },
            _ = conn.closed() => break,
        }
        while let Ok(Job::Invalidate(inv)) = jobs.try_recv() {
            invalidations.push(inv);
        }
        if reconcile {
            reconcile = false;
            if let Some(m) = hub
                .service
                .catalog()
                .edge_cache(&edge, collection.info.id.0)
            {
                for (id, lsn) in outdated(&m, &collection) {
                    invalidations.push(Invalidation {
                        collection: collection.info.id.0,
                        ids: vec![id],
                        lsn,
                    });
                }
            }
        }
        let _turn = turn.lock().await;
        // A newer connection of the same edge took over: this task is done.
        let current = hub
            .routes
            .lock()
            .get(&key)
            .is_some_and(|route| route.jobs.same_channel(&jobs_tx));
        if !current || conn.close_reason().is_some() {
            break;
        }
        let mut failed = None;
        // Invalidations first: they must not wait behind a push.
        for inv in invalidations {
            let (collection, balls) = (collection.clone(), balls.clone());
            match deliver(
                &hub,
                &conn,
                &edge,
                &collection.clone(),
                ack_timeout,
                move |m| invalidation(m, &collection, &inv, &balls.lock()),
            )
            .await
            {
                Ok(delivered) => delivered.iter().for_each(follow),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() && push_now {
            // Planning (exact searches for certificates) runs on the blocking pool while this
            // task keeps delivering invalidations: one never waits for a plan. A plan overtaken
            // by an invalidation's step is dropped and made again at once.
            let manifest = hub
                .service
                .catalog()
                .edge_cache(&edge, collection.info.id.0)
                .unwrap_or_else(|| Manifest::new(collection.info.id.0, 0));
            let (planner, edge_name, planned_collection) =
                (hub.clone(), edge.clone(), collection.clone());
            let certified: Option<HashSet<u64>> =
                certify.then(|| balls.lock().keys().copied().collect());
            let planned_at = Instant::now();
            let mut planning = tokio::task::spawn_blocking(move || {
                planner
                    .plan(
                        &edge_name,
                        &planned_collection,
                        &manifest,
                        budget,
                        certified.as_ref(),
                    )
                    .filter(|(delta, _)| delta.version == manifest.version + 1)
            });
            let planned = loop {
                tokio::select! {
                    planned = &mut planning => break planned.ok().flatten(),
                    job = jobs.recv() => match job {
                        Some(Job::Invalidate(inv)) => {
                            let (collection, balls) = (collection.clone(), balls.clone());
                            match deliver(&hub, &conn, &edge, &collection.clone(), ack_timeout, move |m| {
                                invalidation(m, &collection, &inv, &balls.lock())
                            })
                            .await
                            {
                                Ok(delivered) => delivered.iter().for_each(follow),
                                Err(e) => {
                                    failed = Some(e);
                                    break None;
                                }
                            }
                        }
                        None => break None,
                    },
                }
            };
            metrics::histogram!("tiervec_push_plan_seconds")
                .record(planned_at.elapsed().as_secs_f64());
            if let (None, Some((delta, step))) = (&failed, planned) {
                let logged = hub
                    .service
                    .catalog()
                    .edge_cache(&edge, collection.info.id.0)
                    .map_or(0, |m| m.version);
                if delta.version == logged + 1 {
                    match deliver(&hub, &conn, &edge, &collection, ack_timeout, move |_| {
                        Some((delta, step))
                    })
                    .await
                    {
                        Ok(delivered) => delivered.iter().for_each(follow),
                        Err(e) => failed = Some(e),
                    }
                } else {
                    push_due = Some(tokio::time::Instant::now());
                }
            }
        }
        if let Some(e) = failed {
            warn!(edge = %edge, error = %e, "push failed; closing the connection (the edge resyncs)");
            conn.close(quinn::VarInt::from_u32(0), b"push failed");
            break;
        }
    }
    let mut routes = hub.routes.lock();
    if routes
        .get(&key)
        .is_some_and(|route| route.jobs.same_channel(&jobs_tx))
    {
        routes.remove(&key);
    }
}

/// Plans a delta against the cloud's manifest of the cache (on the blocking pool: planning
/// searches, exactly for certificates, and must not hold up the connections' tasks), logs its
/// step, sends it and waits for the acknowledgement; returns the delta delivered, if any.
async fn deliver(
    hub: &Arc<PushHub>,
    conn: &quinn::Connection,
    edge: &str,
    collection: &Arc<Collection>,
    ack_timeout: Duration,
    plan: impl FnOnce(&Manifest) -> Option<(Delta, ManifestStep)> + Send + 'static,
) -> Result<Option<Delta>, String> {
    let id = collection.info.id.0;
    let manifest = hub
        .service
        .catalog()
        .edge_cache(edge, id)
        .unwrap_or_else(|| Manifest::new(id, 0));
    let planned = tokio::task::spawn_blocking(move || plan(&manifest))
        .await
        .map_err(|e| e.to_string())?;
    let Some((mut delta, step)) = planned else {
        return Ok(None);
    };
    let service = hub.service.clone();
    let edge_owned = edge.to_owned();
    tokio::task::spawn_blocking(move || service.commit_edge_step(&edge_owned, id, step))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    delta.sent_at_unix_us = now_unix_us();
    let kind = if delta.is_invalidation() {
        "invalidation"
    } else {
        "push"
    };
    let started = Instant::now();
    send_frames(
        conn,
        &[Frame::Delta(delta.clone())],
        delta.version,
        ack_timeout,
    )
    .await?;
    hub.acked
        .lock()
        .insert((edge.to_owned(), id), delta.version);
    metrics::counter!("tiervec_push_deltas_total", "kind" => kind).increment(1);
    metrics::histogram!("tiervec_push_ack_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    debug!(
        edge,
        version = delta.version,
        kind,
        vectors = delta.vectors.len(),
        anchors = delta.anchors.len(),
        tombstones = delta.tombstones.len(),
        evicted = delta.evict.len(),
        certificates = delta.certificates.len(),
        "delta acknowledged"
    );
    Ok(Some(delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ball() -> Ball {
        Ball {
            vector: vec![0.0, 0.0],
            radius: 1.0,
            members: vec![(1, 0.2), (2, 0.5), (3, 0.9)],
        }
    }

    #[test]
    fn a_point_written_inside_a_ball_shrinks_it_and_members_beyond_leave() {
        let next = ball().after(&[(9, Some(vec![0.6, 0.0]))]).unwrap();
        assert_eq!(next.radius, 0.6);
        assert_eq!(next.member_ids(), vec![1, 2], "0.9 is now outside");
        assert_eq!(
            ball().after(&[(9, Some(vec![2.0, 0.0]))]),
            None,
            "outside: unchanged"
        );
    }

    #[test]
    fn a_deleted_or_moved_member_leaves_the_ball() {
        let deleted = ball().after(&[(2, None)]).unwrap();
        assert_eq!((deleted.radius, deleted.member_ids()), (1.0, vec![1, 3]));
        let moved_out = ball().after(&[(1, Some(vec![0.0, 3.0]))]).unwrap();
        assert_eq!(
            (moved_out.radius, moved_out.member_ids()),
            (1.0, vec![2, 3])
        );
        // A member moved closer: the ball shrinks to it and it leaves (the edge's copy is
        // tombstoned by the same delta).
        let moved_in = ball().after(&[(3, Some(vec![0.3, 0.0]))]).unwrap();
        assert_eq!((moved_in.radius, moved_in.member_ids()), (0.3, vec![1]));
    }

    #[test]
    fn paraphrases_merge_into_one_anchor_and_cross_the_threshold_once() {
        let config = PushConfig {
            anchor_merge_distance: 0.05,
            anchor_hot_count: 2.0,
            ..PushConfig::default()
        };
        let mut t = AnchorTable {
            tracker: HotTracker::new(16, 1_000_000_000, 0),
            entries: HashMap::new(),
        };
        let a = [1.0, 0.0];
        let near = {
            let mut v = [0.999, 0.04];
            tiervec_shared::metric::normalise(&mut v);
            v
        };
        assert!(!t.record(&a, Metric::Cosine, &config, 1));
        assert!(
            t.record(&near, Metric::Cosine, &config, 2),
            "second ask: hot"
        );
        assert!(!t.record(&a, Metric::Cosine, &config, 3), "hot once");
        assert_eq!(t.entries.len(), 1);
        assert!(!t.record(&[0.0, 1.0], Metric::Cosine, &config, 4));
        assert_eq!(t.entries.len(), 2, "a far query starts its own anchor");
        assert_eq!(t.hot(&config, 5).len(), 1);
    }

    #[test]
    fn evictions_take_the_coldest_anchor_first_and_keep_shared_members() {
        let dim = 2;
        let mut m = Manifest::new([1; 16], 3);
        for id in 1..=4 {
            m.insert(id, 1, 100);
        }
        m.insert_anchor(10, vec![1, 2], dim);
        m.insert_anchor(11, vec![2, 3], dim);
        let scores = HashMap::from([(10, 1.0), (11, 5.0)]);
        // Over by a little: the colder anchor goes, with member 1 (member 2 is shared).
        let budget = m.bytes() + 50;
        let (evict, anchors) = evictions(
            &m,
            &Scores {
                anchors: &scores,
                ids: &[],
            },
            &HashSet::new(),
            100,
            budget,
            dim,
            3.0,
        )
        .unwrap();
        assert_eq!(anchors, vec![10]);
        assert_eq!(evict, vec![1]);
        // Within budget: nothing.
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[],
                },
                &HashSet::new(),
                10,
                m.bytes() + 10,
                dim,
                3.0
            ),
            Some((vec![], vec![]))
        );
        // Admission: a candidate no hotter than the resident anchors evicts none of them;
        // plain ids (4) give way to any anchor, but here they are not enough.
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[]
                },
                &HashSet::new(),
                200,
                budget,
                dim,
                1.0
            ),
            None
        );
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[]
                },
                &HashSet::new(),
                100,
                budget,
                dim,
                1.0
            ),
            Some((vec![4], vec![]))
        );
        // Needing more than the colder entries hold: refused too.
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[]
                },
                &HashSet::new(),
                10_000,
                budget,
                dim,
                3.0
            ),
            None
        );
    }
}
