//! Invariant checks over arbitrary inputs, for the fuzz targets of `cloud/fuzz` (cargo-fuzz, on
//! nightly) and for the property tests that drive the same models with random sequences. Each
//! check panics when an invariant breaks. `tests::corpora_replay` runs them over every input
//! the fuzzers kept (`cloud/fuzz/corpus/<target>/`) and every crash they found
//! (`cloud/fuzz/regressions/<target>/`), so CI checks them on stable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiervec_shared::Metric;
use tiervec_shared::push::{Delta, ManifestStep};
use tiervec_shared::snapshot::MAX_DIM;

use crate::collection::gpu::{ExactEngine, GpuConfig, GpuError};
use crate::collection::{Collection, SearchParams};
use crate::push::state::{COMMIT_RETRY, PushAction, PushState};
use crate::service::{Catalog, Invalidation};
use crate::storage::{Apply, Image, WalEntry};

/// An invariant check over one input; it panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name, as `cloud/fuzz/fuzz_targets/<name>.rs` calls them.
pub const TARGETS: [(&str, Check); 4] = [
    ("push_state", push_state),
    ("wal_entry", wal_entry),
    ("wal_replay", wal_replay),
    ("http_body", http_body),
];

/// The planning period and the gap between plans the model's [`PushState`] runs with (and the
/// push state's unit tests).
pub(crate) const PERIOD: Duration = Duration::from_millis(1_000);
pub(crate) const GAP: Duration = Duration::from_millis(100);

/// The write of id `id` at LSN `id`.
pub(crate) fn inv(id: u64) -> Invalidation {
    Invalidation {
        collection: [1; 16],
        ids: vec![id],
        lsn: id,
    }
}

/// An empty delta of `version` and its manifest step.
pub(crate) fn delta(version: u64) -> (Delta, ManifestStep) {
    (
        Delta {
            version,
            ..Delta::default()
        },
        ManifestStep {
            version,
            ..ManifestStep::default()
        },
    )
}

/// What the driver of a [`PushState`] does next: an event from outside, or the completion of
/// work an action gave it (ignored when it has no such work).
#[derive(Clone, Debug)]
pub enum PushOp {
    Invalidate,
    AnchorHot,
    Tick(u16),
    Resynced,
    FinishPlan(bool),
    FinishBuild(bool),
    FinishCommit,
    /// Logging the step failed, not durable (the log unavailable).
    FailCommit,
    Ack,
    StrayAck(u64),
}

/// Random [`PushOp`]s, for property tests.
#[cfg(test)]
pub fn push_op() -> impl proptest::strategy::Strategy<Value = PushOp> {
    use proptest::prelude::*;
    prop_oneof![
        Just(PushOp::Invalidate),
        Just(PushOp::AnchorHot),
        (0u16..2_000).prop_map(PushOp::Tick),
        Just(PushOp::Resynced),
        any::<bool>().prop_map(PushOp::FinishPlan),
        any::<bool>().prop_map(PushOp::FinishBuild),
        Just(PushOp::FinishCommit),
        Just(PushOp::FailCommit),
        Just(PushOp::Ack),
        (0u64..20).prop_map(PushOp::StrayAck),
    ]
}

/// [`PushOp`]s from bytes: one byte each, a tick's milliseconds from the byte after it.
fn push_ops(data: &[u8]) -> Vec<PushOp> {
    let mut ops = Vec::new();
    let mut bytes = data.iter().copied();
    while let Some(b) = bytes.next() {
        let high = b / 10;
        ops.push(match b % 10 {
            0 => PushOp::Invalidate,
            1 => PushOp::AnchorHot,
            2 => PushOp::Tick(u16::from(bytes.next().unwrap_or(0)) * 8),
            3 => PushOp::Resynced,
            4 => PushOp::FinishPlan(high & 1 == 1),
            5 => PushOp::FinishBuild(high & 1 == 1),
            6 => PushOp::FinishCommit,
            7 => PushOp::Ack,
            8 => PushOp::FailCommit,
            _ => PushOp::StrayAck(u64::from(high % 20)),
        });
    }
    ops
}

/// The cloud's per-cache push state machine driven by the events `data` spells (see
/// [`push_events`]).
pub fn push_state(data: &[u8]) {
    push_events(&push_ops(data));
}

/// A driver that carries out actions faithfully and checks each one against the state's
/// promises: one delivery at a time, every step logged before its delta is sent, versions
/// in order without gaps, one plan at a time, invalidations built in arrival order.
#[derive(Default)]
struct Driver {
    logged: u64,
    /// Version the running plan was made against, if one runs.
    plan_from: Option<u64>,
    building: bool,
    committing: Option<u64>,
    sending: Option<u64>,
    handed: u64,
    built: Vec<u64>,
    /// The writes of the batch being delivered (until its step is logged).
    batch: Vec<u64>,
    /// Writes of batches whose step the log did not take: what a reconcile finds outdated.
    lost: Vec<u64>,
}

impl Driver {
    fn delivering(&self) -> bool {
        self.building || self.committing.is_some() || self.sending.is_some()
    }

    /// Carries out `action`; a reconcile's findings are returned.
    fn take(&mut self, action: PushAction) -> Option<Vec<Invalidation>> {
        match action {
            PushAction::Reconcile => {
                return Some(self.lost.drain(..).map(inv).collect());
            }
            PushAction::BuildInvalidation(batch) => {
                assert!(!self.delivering(), "a build while delivering");
                assert!(!batch.revoke_certificates);
                self.batch = batch.invalidations.iter().map(|inv| inv.lsn).collect();
                self.built.extend(&self.batch);
                self.building = true;
            }
            PushAction::PlanNeeded => {
                assert!(self.plan_from.is_none(), "two plans at once");
                self.plan_from = Some(self.logged);
            }
            PushAction::CommitStep(step) => {
                assert!(!self.delivering(), "a step while delivering");
                assert_eq!(step.version, self.logged + 1, "steps in order, no gaps");
                self.committing = Some(step.version);
            }
            PushAction::Send(delta) => {
                assert_eq!(self.committing, None, "sent before its step was durable");
                assert_eq!(self.sending, None);
                assert_eq!(
                    delta.version, self.logged,
                    "only the step just logged is sent"
                );
                self.sending = Some(delta.version);
            }
        }
        None
    }

    fn drain(&mut self, s: &mut PushState) {
        while let Some(action) = s.poll() {
            if let Some(found) = self.take(action) {
                s.handle_reconciled(found);
            }
        }
    }
}

/// Drives a [`PushState`] through `ops` with a faithful [`Driver`] checking every action, then
/// finishes all outstanding work: every invalidation must have been delivered, in the order
/// it came, and no delivery may be left hanging.
pub fn push_events(ops: &[PushOp]) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = PushState::new(PERIOD, GAP, 0, t0);
    let mut d = Driver::default();
    for op in ops {
        match *op {
            PushOp::Invalidate => {
                d.handed += 1;
                s.handle_invalidation(inv(d.handed));
            }
            PushOp::AnchorHot => s.handle_anchor_hot(now),
            PushOp::Tick(ms) => {
                now += Duration::from_millis(u64::from(ms));
                s.handle_tick(now);
            }
            PushOp::Resynced => {
                // An inventory adopted between deliveries: the logged version stays.
                if !d.delivering() {
                    s.handle_resynced(d.logged);
                }
            }
            PushOp::FinishPlan(found) => {
                if let Some(from) = d.plan_from.take() {
                    s.handle_planned(found.then(|| delta(from + 1)), false);
                }
            }
            PushOp::FinishBuild(found) => {
                if d.building {
                    d.building = false;
                    if !found {
                        d.batch.clear();
                    }
                    s.handle_built(found.then(|| delta(d.logged + 1)));
                }
            }
            PushOp::FinishCommit => {
                if let Some(v) = d.committing.take() {
                    d.logged = v;
                    d.batch.clear();
                    s.handle_committed(v);
                }
            }
            PushOp::FailCommit => {
                if d.committing.take().is_some() {
                    // Not delivered after all: built again once a reconcile finds them.
                    let lost = std::mem::take(&mut d.batch);
                    d.built.truncate(d.built.len() - lost.len());
                    d.lost.extend(lost);
                    s.handle_commit_failed(now, d.logged);
                }
            }
            PushOp::Ack => {
                if let Some(v) = d.sending.take() {
                    s.handle_ack(v);
                }
            }
            PushOp::StrayAck(v) => {
                if d.sending != Some(v) {
                    s.handle_ack(v);
                }
            }
        }
        d.drain(&mut s);
    }
    // Past any pause after a failed step; then finishing all work delivers every invalidation,
    // in the order they came.
    s.handle_tick(now + COMMIT_RETRY);
    d.drain(&mut s);
    for _ in 0..4 * (d.handed + 4) {
        if let Some(from) = d.plan_from.take() {
            s.handle_planned(Some(delta(from + 1)), false);
        }
        if d.building {
            d.building = false;
            s.handle_built(Some(delta(d.logged + 1)));
        }
        if let Some(v) = d.committing.take() {
            d.logged = v;
            d.batch.clear();
            s.handle_committed(v);
        }
        if let Some(v) = d.sending.take() {
            s.handle_ack(v);
        }
        d.drain(&mut s);
    }
    assert_eq!(
        d.built,
        (1..=d.handed).collect::<Vec<_>>(),
        "invalidations lost or reordered"
    );
    assert!(!d.delivering(), "a delivery never finished");
}

/// A WAL record body as recovery reads it: refused, or decoded into an entry whose own
/// encoding decodes again to the same bytes (compared as bytes: a vector may hold a NaN) and
/// which splits over shards point by point.
pub fn wal_entry(data: &[u8]) {
    let Ok(entry) = WalEntry::decode(data) else {
        return;
    };
    let bytes = entry.encode();
    let again = WalEntry::decode(&bytes).expect("an entry's own encoding decodes");
    assert_eq!(again.encode(), bytes, "an entry's encoding is not stable");
    // Spread over shards, a consistent upsert keeps each point (id, vector bits, payload)
    // once, in its shard, in its order.
    if let WalEntry::Upsert {
        ids,
        vectors,
        payloads,
        ..
    } = &entry
        && !ids.is_empty()
        && vectors.len() % ids.len() == 0
        && payloads.len() == ids.len()
    {
        let dim = vectors.len() / ids.len();
        let point = |i: usize, ids: &[u64], vectors: &[f32], payloads: &[Option<String>]| {
            let bits: Vec<u32> = vectors[i * dim..(i + 1) * dim]
                .iter()
                .map(|f| f.to_bits())
                .collect();
            (ids[i], bits, payloads[i].clone())
        };
        for shards in [2, 3, crate::storage::MAX_SHARDS] {
            let mut wanted = vec![Vec::new(); shards as usize];
            for i in 0..ids.len() {
                wanted[crate::storage::shard_of(ids[i], shards) as usize]
                    .push(point(i, ids, vectors, payloads));
            }
            let mut got = vec![Vec::new(); shards as usize];
            for (shard, part) in crate::storage::placement::split_by_shard(entry.clone(), shards) {
                let WalEntry::Upsert {
                    ids,
                    vectors,
                    payloads,
                    ..
                } = &part
                else {
                    panic!("an upsert split into {part:?}");
                };
                assert!(got[shard as usize].is_empty(), "shard {shard} given twice");
                got[shard as usize] = (0..ids.len())
                    .map(|i| point(i, ids, vectors, payloads))
                    .collect();
            }
            assert_eq!(got, wanted, "a write split over {shards} shards");
        }
    }
}

/// The record bodies a [`wal_replay`] input spells: each a 2-byte little-endian length and
/// that many bytes (the last one cut short where the input ends).
pub fn replay_bodies(data: &[u8]) -> Vec<&[u8]> {
    let mut bodies = Vec::new();
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let len = (u16::from_le_bytes([*a, *b]) as usize).min(tail.len());
        bodies.push(&tail[..len]);
        rest = &tail[len..];
    }
    bodies
}

/// The input [`wal_replay`] reads as `entries`, in order.
pub fn replay_input(entries: &[WalEntry]) -> Vec<u8> {
    let mut data = Vec::new();
    for entry in entries {
        let body = entry.encode();
        let len = u16::try_from(body.len()).expect("a seed entry under 64 KiB");
        data.extend_from_slice(&len.to_le_bytes());
        data.extend_from_slice(&body);
    }
    data
}

/// What replay must leave of one collection: the entries that create it taken, its points
/// written by the newest entry that names them, deleted ones gone.
struct ReplayedCollection {
    id: [u8; 16],
    dim: usize,
    metric: Metric,
    /// id → (position, vector, payload).
    points: BTreeMap<u64, (u64, Vec<f32>, Option<String>)>,
}

/// The model of replay, by collection name: the rules an entry that recovery decodes is
/// taken by. A create is taken once per name, for a known metric, a dimension in
/// `1..=MAX_DIM` and an identity no other collection has (two collections sharing one would
/// make every write to it ambiguous); writes to an identity no collection has are no-ops, and
/// so is an upsert whose lengths disagree with its collection's dimension. Within one entry
/// the first value of an id is kept (what the service logs holds each id once).
fn model_replay(
    models: &mut BTreeMap<String, ReplayedCollection>,
    position: u64,
    entry: &WalEntry,
) {
    match entry {
        WalEntry::CreateCollection {
            name,
            id,
            dim,
            metric,
            ..
        } => {
            let taken = !models.contains_key(name)
                && (1..=MAX_DIM).contains(dim)
                && models.values().all(|c| c.id != *id);
            if let (true, Some(metric)) = (taken, Metric::from_code(*metric)) {
                let model = ReplayedCollection {
                    id: *id,
                    dim: *dim as usize,
                    metric,
                    points: BTreeMap::new(),
                };
                models.insert(name.clone(), model);
            }
        }
        WalEntry::DropCollection { name, id } => {
            if models.get(name).is_some_and(|c| c.id == *id) {
                models.remove(name);
            }
        }
        WalEntry::Upsert {
            collection,
            ids,
            vectors,
            payloads,
        } => {
            let Some(c) = models.values_mut().find(|c| c.id == *collection) else {
                return;
            };
            if vectors.len() != ids.len() * c.dim || payloads.len() != ids.len() {
                return;
            }
            for (i, &id) in ids.iter().enumerate() {
                let point = (
                    position,
                    vectors[i * c.dim..(i + 1) * c.dim].to_vec(),
                    payloads[i].clone(),
                );
                match c.points.entry(id) {
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if o.get().0 < position {
                            o.insert(point);
                        }
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(point);
                    }
                }
            }
        }
        WalEntry::Delete { collection, ids } => {
            if let Some(c) = models.values_mut().find(|c| c.id == *collection) {
                for id in ids {
                    c.points.remove(id);
                }
            }
        }
        // What the model compares is points; a collection's embedding model is not one.
        WalEntry::EdgeStep { .. } | WalEntry::EdgeReset { .. } | WalEntry::SetModel { .. } => {}
    }
}

/// A catalog image as bytes, collections by name and edge caches by (edge, collection): equal
/// bytes, equal state (vectors compared bit for bit, NaNs included).
fn image_bytes(image: Image) -> Vec<u8> {
    let mut collections = image.collections;
    collections.sort_by(|a, b| a.name.cmp(&b.name));
    let mut caches = image.edge_caches;
    caches.sort_by(|a, b| {
        (&a.edge, a.manifest.collection_id).cmp(&(&b.edge, b.manifest.collection_id))
    });
    let mut bytes = Vec::new();
    for c in &collections {
        bytes.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(c).expect("in memory"));
    }
    for c in &caches {
        bytes.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(c).expect("in memory"));
    }
    bytes
}

/// A catalog with the CPU's exact engine, as recovery builds one.
fn replay_catalog() -> Catalog {
    let engine = ExactEngine::cpu(&GpuConfig::default(), &GpuError::Disabled);
    Catalog::new(Arc::new(engine))
}

/// Arbitrary WAL record bodies (see [`replay_bodies`]) replayed as recovery replays them: each
/// body that decodes is applied to a catalog at the next position. Checks: the catalog holds
/// what the model says (collections with their identity, dimension and metric; each point's
/// vector bit for bit, payload and position; nothing deleted); applying every entry twice (a
/// redelivered record) leaves the same state; the state's image restores into a fresh catalog
/// that images the same; indexing what was written never panics and never stalls; searches,
/// exact and through the graph, give at most `k` distinct live points, nearest first, exact
/// ones `min(k, live)` and the same before and after the restore.
pub fn wal_replay(data: &[u8]) {
    let entries: Vec<WalEntry> = replay_bodies(data)
        .into_iter()
        .filter_map(|body| WalEntry::decode(body).ok())
        .collect();
    let once = replay_catalog();
    let twice = replay_catalog();
    let mut models = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let position = i as u64 + 1;
        once.apply(position, entry);
        twice.apply(position, entry);
        twice.apply(position, entry);
        model_replay(&mut models, position, entry);
    }

    let collections = once.all();
    assert_eq!(
        collections.len(),
        models.len(),
        "collections: {:?}",
        collections.iter().map(|c| &c.info.name).collect::<Vec<_>>()
    );
    for (name, model) in &models {
        let c = once
            .get(name)
            .unwrap_or_else(|| panic!("collection {name} missing"));
        assert_eq!(c.info.id.0, model.id, "{name}: identity");
        assert_eq!(c.info.dim, model.dim, "{name}: dimension");
        assert_eq!(c.info.metric, model.metric, "{name}: metric");
        assert_eq!(c.len(), model.points.len(), "{name}: live points");
        for (&id, (position, vector, payload)) in &model.points {
            let point = c
                .get(id)
                .unwrap_or_else(|| panic!("{name}: point {id} missing"));
            assert_eq!(point.lsn, *position, "{name}: position of {id}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&point.vector), bits(vector), "{name}: vector of {id}");
            assert_eq!(
                point.payload.as_deref(),
                payload.as_deref(),
                "{name}: payload of {id}"
            );
        }
    }
    let image = image_bytes(once.image());
    assert!(
        image == image_bytes(twice.image()),
        "a redelivered entry changed the state"
    );
    let restored = replay_catalog();
    restored.restore(once.image());
    assert!(
        image == image_bytes(restored.image()),
        "the image does not restore to itself"
    );

    for (name, model) in &models {
        let before = once.get(name).expect("checked above");
        let after = restored.get(name).expect("restored above");
        let query: Vec<f32> = model
            .points
            .values()
            .map(|(_, v, _)| v.clone())
            .find(|v| v.iter().all(|x| x.is_finite() && x.abs() < 1e6))
            .unwrap_or_else(|| vec![0.5; model.dim]);
        let exact = SearchParams {
            k: 10,
            ef: 0,
            exact: true,
            max_distance: None,
        };
        let found = |c: &Collection| {
            let (hits, _) = c.search(&query, &exact).expect("a valid exact search");
            hits.iter()
                .map(|h| (h.id, h.distance.to_bits()))
                .collect::<Vec<_>>()
        };
        let answer = found(&before);
        assert_eq!(
            answer.len(),
            model.points.len().min(10),
            "{name}: exact hits"
        );
        assert_eq!(
            answer,
            found(&after),
            "{name}: exact answers differ after the restore"
        );
        let mut rounds = 0;
        while before.index_step(true) {
            rounds += 1;
            assert!(rounds < 4, "{name}: indexing does not settle");
        }
        assert_eq!(
            before.indexed_points(),
            model.points.len(),
            "{name}: rows left unindexed"
        );
        for c in [&before, &after] {
            for k in [1, 10] {
                for exact in [false, true] {
                    let params = SearchParams {
                        k,
                        ef: 16,
                        exact,
                        max_distance: None,
                    };
                    let (hits, _) = c.search(&query, &params).expect("a valid search");
                    assert!(hits.len() <= k, "{name}: {} hits for k {k}", hits.len());
                    let ids: BTreeSet<u64> = hits.iter().map(|h| h.id).collect();
                    assert_eq!(ids.len(), hits.len(), "{name}: a point twice");
                    assert!(
                        ids.iter().all(|id| model.points.contains_key(id)),
                        "{name}: a hit that is not live"
                    );
                    assert!(
                        hits.windows(2)
                            .all(|w| w[0].distance.partial_cmp(&w[1].distance)
                                != Some(std::cmp::Ordering::Greater)),
                        "{name}: hits not nearest first"
                    );
                }
            }
        }
    }
}

/// The operations [`http_body`] sends, with their route in the API document.
const HTTP_OPERATIONS: [(&str, &str); 8] = [
    ("post", "/v1/collections"),
    ("put", "/v1/collections/{name}/points"),
    ("post", "/v1/collections/{name}/points/delete"),
    ("post", "/v1/collections/{name}/search"),
    ("post", "/v1/collections/{name}/search/batch"),
    ("get", "/v1/collections/{name}/points/{id}"),
    ("delete", "/v1/collections/{name}"),
    ("get", "/v1/collections/{name}/hot"),
];

/// Collection names a request's path may take: two that exist at the start of every input
/// (`c`, cosine, and `d`, dot, both 4-d with points 1..=3), one that never does, and one an
/// input may create.
const HTTP_NAMES: [&str; 4] = ["c", "d", "missing", "x-new"];

/// A cloud service and its HTTP router in this process, driven without sockets: the handlers,
/// extractors, middleware and limits of `tiervec-cloud serve`, over a data directory of its own.
struct HttpHarness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    /// The statuses the API document gives each of [`HTTP_OPERATIONS`].
    documented: Vec<Vec<u16>>,
    /// The newest acknowledged write's LSN: acknowledgements only go up.
    last_lsn: std::sync::atomic::AtomicU64,
    /// Whether a request changed the state since the last reset (most inputs are refused
    /// whole, and a reset costs a dozen requests).
    dirty: bool,
}

impl HttpHarness {
    fn start() -> HttpHarness {
        use std::sync::{Arc, OnceLock};
        // On Linux a tmpfs keeps the fsync of every acknowledged write cheap; the code path is
        // the same as on a disk.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        // Data directories of earlier runs whose process is gone are removed.
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("tiervec-fuzz-http-"));
            if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("tiervec-fuzz-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::CloudConfig {
            data_dir: dir,
            // Small enough that an input reaches them; the limits themselves are those of
            // `tiervec-cloud serve`.
            max_body_bytes: 1 << 20,
            max_batch: 64,
            ..crate::config::CloudConfig::default()
        };
        let keys = Arc::new(crate::transport::http::KeyTable::new(&[]).expect("no keys"));
        let cell = Arc::new(OnceLock::new());
        let state = crate::server::api_state(&config, keys, cell.clone(), Default::default());
        let service = crate::service::Service::open(config).expect("the service opens");
        let _ = cell.set(Arc::new(service));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut harness = HttpHarness {
            runtime,
            router: crate::transport::http::router(state),
            documented: Vec::new(),
            last_lsn: std::sync::atomic::AtomicU64::new(0),
            dirty: true,
        };
        let (status, body) = harness.call("GET", "/v1/openapi.json", Vec::new());
        assert_eq!(status, 200);
        let spec: serde_json::Value = serde_json::from_slice(&body).expect("the API document");
        harness.documented = HTTP_OPERATIONS
            .iter()
            .map(|(method, path)| {
                let responses = spec["paths"][path][method]["responses"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{method} {path} is documented"));
                responses
                    .keys()
                    .map(|code| code.parse().expect("numeric statuses"))
                    .collect()
            })
            .collect();
        harness
    }

    fn call(&self, method: &str, uri: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        use tower::ServiceExt;
        self.runtime.block_on(async {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .expect("a request");
            let response = match self.router.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("the body is read");
            (status, bytes.to_vec())
        })
    }

    /// A write answered 200: its acknowledgement parses and its LSN is newer than any before.
    fn acknowledged(&self, body: &[u8]) -> u64 {
        use crate::transport::http::WriteAck;
        let ack: WriteAck = serde_json::from_slice(body).expect("an acknowledgement");
        let before = self
            .last_lsn
            .fetch_max(ack.lsn, std::sync::atomic::Ordering::Relaxed);
        assert!(
            ack.lsn > before,
            "LSN {} acknowledged after {before}",
            ack.lsn
        );
        ack.lsn
    }

    /// Every input starts from the same two collections, so inputs replay alike and the
    /// service's memory stays bounded over a long run.
    fn reset(&mut self) {
        use crate::transport::http::CollectionList;
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let (status, body) = self.call("GET", "/v1/collections", Vec::new());
        assert_eq!(status, 200);
        let list: CollectionList = serde_json::from_slice(&body).expect("a collection list");
        for c in list.collections {
            let (status, _) =
                self.call("DELETE", &format!("/v1/collections/{}", c.name), Vec::new());
            assert_eq!(status, 200, "dropping {}", c.name);
        }
        for (name, metric) in [("c", "cosine"), ("d", "dot")] {
            let create = format!(r#"{{"name":"{name}","dim":4,"metric":"{metric}"}}"#);
            let (status, body) = self.call("POST", "/v1/collections", create.into_bytes());
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
            let points = r#"{"points":[{"id":1,"vector":[1,0,0,0],"payload":{"text":"one"}},
                {"id":2,"vector":[0,1,0,0]},{"id":3,"vector":[0.5,0.5,0.5,0.5],"payload":3}]}"#;
            let uri = format!("/v1/collections/{name}/points");
            let (status, body) = self.call("PUT", &uri, points.as_bytes().to_vec());
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            self.acknowledged(&body);
        }
    }

    /// The point `id` of `name` as `GET …/points/{id}` answers it.
    fn point(&self, name: &str, id: u64) -> Option<crate::transport::http::PointOut> {
        let (status, body) = self.call(
            "GET",
            &format!("/v1/collections/{name}/points/{id}"),
            Vec::new(),
        );
        match status {
            200 => Some(serde_json::from_slice(&body).expect("a point")),
            404 => None,
            other => panic!("GET point {id}: status {other}"),
        }
    }
}

/// Percent-encodes `bytes` for a URI, leaving `keep` as they are.
fn percent_encode(bytes: &[u8], keep: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Search hits as the API promises them: at most `k`, nearest first.
fn check_hits(hits: &[crate::transport::http::SearchHit], k: usize) {
    assert!(hits.len() <= k, "{} hits for k = {k}", hits.len());
    assert!(
        hits.windows(2).all(|w| w[0].distance <= w[1].distance),
        "hits out of order"
    );
}

/// Requests with arbitrary bodies, paths and query strings sent through the cloud's real HTTP
/// router to a real service (one per process, reset to the same two collections before each
/// input). `data` is a sequence of requests: an operation byte, a collection-name byte, a
/// little-endian `u16` length, then that many bytes of body (or of the point id, or of the
/// query string). Every answer is one the API document gives its operation, never a server
/// error; a refusal carries an error body; what is answered 200 parses as its schema says;
/// acknowledged writes are there to read (with their LSN, which only goes up) and acknowledged
/// deletions are gone; searches answer at most `k` hits, nearest first.
pub fn http_body(data: &[u8]) {
    use crate::transport::http::{
        BatchSearchRequest, BatchSearchResponse, CollectionDescription, DeletePoints, ErrorBody,
        HotResponse, SearchRequest, SearchResponse, UpsertPoints,
    };
    static HARNESS: std::sync::OnceLock<std::sync::Mutex<HttpHarness>> = std::sync::OnceLock::new();
    let mut harness = HARNESS
        .get_or_init(|| std::sync::Mutex::new(HttpHarness::start()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    harness.reset();
    let mut rest = data;
    while let [op, name, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (bytes, after) = tail.split_at(len);
        rest = after;
        let op = usize::from(*op) % HTTP_OPERATIONS.len();
        let name = HTTP_NAMES[usize::from(*name) % HTTP_NAMES.len()];
        let collection = format!("/v1/collections/{name}");
        let (method, uri, body) = match op {
            0 => ("POST", "/v1/collections".to_owned(), bytes.to_vec()),
            1 => ("PUT", format!("{collection}/points"), bytes.to_vec()),
            2 => (
                "POST",
                format!("{collection}/points/delete"),
                bytes.to_vec(),
            ),
            3 => ("POST", format!("{collection}/search"), bytes.to_vec()),
            4 => ("POST", format!("{collection}/search/batch"), bytes.to_vec()),
            5 => {
                let id = percent_encode(bytes, b"-._~");
                ("GET", format!("{collection}/points/{id}"), Vec::new())
            }
            6 => ("DELETE", collection.clone(), Vec::new()),
            _ => {
                let query = percent_encode(bytes, b"-._~=&");
                ("GET", format!("{collection}/hot?{query}"), Vec::new())
            }
        };
        let (status, answer) = harness.call(method, &uri, body);
        let what = format!("{method} {uri}");
        // A write that was not refused changed the state; refused requests change nothing.
        harness.dirty |= method != "GET" && status < 400;
        assert!(
            status < 500,
            "{what}: server error {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        assert!(
            harness.documented[op].contains(&status),
            "{what}: status {status} is not in the API document ({:?})",
            harness.documented[op]
        );
        if !(200..300).contains(&status) {
            let error: ErrorBody = serde_json::from_slice(&answer)
                .unwrap_or_else(|e| panic!("{what}: {status} without an error body: {e}"));
            assert!(
                !error.code.is_empty() && !error.message.is_empty(),
                "{what}: {error:?}"
            );
            continue;
        }
        match op {
            0 => {
                let created: CollectionDescription =
                    serde_json::from_slice(&answer).expect("a collection description");
                assert_eq!(created.points, 0);
            }
            1 => {
                let lsn = harness.acknowledged(&answer);
                let request: UpsertPoints =
                    serde_json::from_slice(bytes).expect("an acknowledged upsert parses as one");
                for point in &request.points {
                    let stored = harness.point(name, point.id).unwrap_or_else(|| {
                        panic!("{what}: acknowledged point {} is missing", point.id)
                    });
                    assert_eq!(stored.lsn, lsn, "{what}: point {}", point.id);
                }
                // The last value of each id is the one kept; its payload is stored as given.
                let mut last = std::collections::HashMap::new();
                for point in &request.points {
                    last.insert(point.id, point);
                }
                for (id, point) in last {
                    let stored = harness.point(name, id).expect("read above");
                    let value = |p: &Option<Box<serde_json::value::RawValue>>| {
                        p.as_ref().map(|raw| {
                            serde_json::from_str::<serde_json::Value>(raw.get()).expect("JSON")
                        })
                    };
                    assert_eq!(
                        value(&stored.payload),
                        value(&point.payload),
                        "{what}: payload of {id}"
                    );
                    if name == "d" {
                        assert_eq!(stored.vector, point.vector, "{what}: vector of {id}");
                    }
                }
            }
            2 => {
                harness.acknowledged(&answer);
                let request: DeletePoints =
                    serde_json::from_slice(bytes).expect("an acknowledged deletion parses as one");
                for &id in &request.ids {
                    assert!(
                        harness.point(name, id).is_none(),
                        "{what}: deleted point {id} is back"
                    );
                }
            }
            3 => {
                let request: SearchRequest =
                    serde_json::from_slice(bytes).expect("an answered search parses as one");
                let answer: SearchResponse =
                    serde_json::from_slice(&answer).expect("a search answer");
                check_hits(&answer.hits, request.k);
            }
            4 => {
                let request: BatchSearchRequest =
                    serde_json::from_slice(bytes).expect("an answered batch parses as one");
                let answer: BatchSearchResponse =
                    serde_json::from_slice(&answer).expect("a batch answer");
                assert_eq!(answer.results.len(), request.searches.len());
                for (search, result) in request.searches.iter().zip(&answer.results) {
                    check_hits(&result.hits, search.k);
                }
            }
            5 => {
                let _: crate::transport::http::PointOut =
                    serde_json::from_slice(&answer).expect("a point");
            }
            6 => assert!(
                harness.call("GET", &collection, Vec::new()).0 == 404,
                "{what}: still there"
            ),
            _ => {
                let _: HotResponse = serde_json::from_slice(&answer).expect("hot ids");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tiervec_shared::push::{HeldVector, Inventory, ManifestStep};

    use super::*;

    /// A log as the service writes it, with the entries a damaged or foreign log may hold
    /// besides: a second create of a name, creates of dimension 0 and beyond `MAX_DIM`, a
    /// create reusing another collection's identity, an upsert whose lengths disagree, writes
    /// to a dropped collection, an id twice in one upsert.
    fn replayed_history() -> Vec<WalEntry> {
        let create = |name: &str, id: u8, dim: u32, metric: Metric| WalEntry::CreateCollection {
            name: name.into(),
            id: [id; 16],
            dim,
            metric: metric.code(),
            m: 16,
            ef_construction: 64,
            seed: 7,
        };
        let upsert = |collection: u8, ids: &[u64], dim: usize| WalEntry::Upsert {
            collection: [collection; 16],
            ids: ids.to_vec(),
            vectors: ids
                .iter()
                .flat_map(|&id| (0..dim).map(move |j| ((id as f32) + j as f32).sin()))
                .collect(),
            payloads: ids
                .iter()
                .map(|id| Some(format!("{{\"text\":\"{id}\"}}")))
                .collect(),
        };
        vec![
            create("c", 1, 4, Metric::Cosine),
            create("d", 2, 4, Metric::Dot),
            create("c", 3, 8, Metric::L2),
            create("zero", 4, 0, Metric::L2),
            create("wide", 5, MAX_DIM + 1, Metric::L2),
            create("twin", 1, 4, Metric::L2),
            upsert(1, &[1, 2, 3, 4, 5], 4),
            upsert(2, &[1, 2, 2], 4),
            upsert(1, &[3], 3),
            WalEntry::Delete {
                collection: [1; 16],
                ids: vec![2, 99],
            },
            WalEntry::EdgeReset {
                edge: "e1".into(),
                collection: [1; 16],
                inventory: Inventory {
                    collection_id: [1; 16],
                    version: 3,
                    vectors: vec![HeldVector {
                        id: 1,
                        lsn: 7,
                        bytes: 16,
                    }],
                    anchors: vec![(1, vec![1, 3])],
                },
            },
            // A reset whose inventory names another collection than the record (found by
            // the fuzzer: it was kept, then lost at the next checkpoint's restore).
            WalEntry::EdgeReset {
                edge: "e2".into(),
                collection: [1; 16],
                inventory: Inventory {
                    collection_id: [9; 16],
                    version: 1,
                    vectors: vec![HeldVector {
                        id: 1,
                        lsn: 7,
                        bytes: 16,
                    }],
                    anchors: Vec::new(),
                },
            },
            WalEntry::EdgeStep {
                edge: "e1".into(),
                collection: [1; 16],
                step: ManifestStep {
                    version: 4,
                    added: vec![HeldVector {
                        id: 4,
                        lsn: 7,
                        bytes: 16,
                    }],
                    removed: vec![1],
                    ..ManifestStep::default()
                },
            },
            WalEntry::DropCollection {
                name: "d".into(),
                id: [2; 16],
            },
            upsert(2, &[9], 4),
            create("d", 6, 4, Metric::L2),
            upsert(6, &[9, 1], 4),
            upsert(1, &[1], 4),
        ]
    }

    /// Points deleted before the maintenance pass indexed them leave an empty graph; exporting
    /// it panicked inside hnsw_rs (no entry point) on every pass (found by `wal_replay`).
    #[test]
    fn points_deleted_before_indexing_leave_nothing_to_export() {
        let entries = [
            WalEntry::CreateCollection {
                name: "g".into(),
                id: [5; 16],
                dim: 2,
                metric: Metric::L2.code(),
                m: 8,
                ef_construction: 16,
                seed: 1,
            },
            WalEntry::Upsert {
                collection: [5; 16],
                ids: vec![1, 2],
                vectors: vec![0.5, 0.5, 0.25, 0.75],
                payloads: vec![None, None],
            },
            WalEntry::Delete {
                collection: [5; 16],
                ids: vec![1, 2],
            },
        ];
        wal_replay(&replay_input(&entries));
    }

    #[test]
    fn a_replayed_history_leaves_what_the_model_says() {
        wal_replay(&replay_input(&replayed_history()));
    }

    /// Every committed corpus input and every recorded crash, through its target's check.
    #[test]
    fn corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        tiervec_shared::fuzzing::replay_corpora(&root, &super::TARGETS);
    }
}
