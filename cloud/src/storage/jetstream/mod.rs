//! The replicated store: the logs of a cloud cluster kept as NATS JetStream streams (see
//! `docs/cluster.md`). A [`DurableLog`] whose append publishes to the entry's stream, whose
//! state follows the catalog stream and the streams of the shards placed on this node, and
//! which answers other nodes' requests for the shards it holds ([`Peers`]).
//!
//! Streams and subjects (`P` is [`ClusterConfig::prefix`]):
//! * `P_CATALOG`, subjects `P.catalog.>`: creates and drops on `P.catalog.name.<name>` (a
//!   create carries its shard count in the `Tiervec-Shards` header), the steps and resets of
//!   one edge's cache of one collection on `P.catalog.edge.<edge name in hex>.<identity in hex>`,
//!   the embedding model a collection records on `P.catalog.model.<identity in hex>`;
//! * `P_SHARD_<identity in hex>_<shard>`, subject `P.shard.<identity in hex>.<shard>`: the
//!   upserts and deletes of one shard of one collection (a point's shard is
//!   [`placement::shard_of`] its id), created (by whichever node logs the create) before the
//!   create is published.
//!
//! Membership and placement live in two KV buckets (`membership.rs`): `P_NODES`, a heartbeat
//! per node naming the shards it holds caught up, and `P_PLACEMENT`, the nodes that should
//! hold each shard, written with compare-and-set.
//!
//! An entry's position is its stream sequence. Writers on several nodes resolve as follows:
//! point writes are published unconditionally — JetStream orders them, every replica applies
//! them in that order, and the last write of an id wins everywhere; a create is published with
//! the sequence this node last applied on its name's subject as the expected last subject
//! sequence, so of two creates of one name on two nodes JetStream takes one and refuses the
//! other ([`ClusterError::Conflict`]). An edge-cache step is published the same way, expecting
//! the last step or reset of that cache this node applied: a node that has not applied a step
//! another node logged for the same cache (around an edge's failover) cannot log its own step
//! of the same version over it — the cloud's manifest of the cache would then miss what the
//! first step removed, and invalidations for it would never reach the edge. A reset (the edge's
//! own account of its cache) is published unconditionally. Every publish carries a fresh
//! `Nats-Msg-Id`, and one that timed out is retried with the same id, so JetStream keeps a
//! retried entry once.
//!
//! A node checkpoints locally ([`JetStreamLog::checkpoint`]): its collections and edge caches
//! as of a cut — one position per stream, taken with every stream's apply lock held — in the
//! same checkpoint file as the embedded store (`storage::checkpoint`, version 4). At start it
//! loads its newest checkpoint and follows each stream from the position after the cut's; a
//! stream that ends before that position, or starts after it, belongs to other NATS servers
//! or was purged, and the node refuses to start rather than serve a state no stream holds.
//!
//! An append returns after JetStream's acknowledgement for every shard it touched (the
//! stream's quorum holds the entry) *and* after this node applied it where this node holds the
//! shard, so a write is visible on the node that acknowledged it; other replicas apply it when
//! their followers reach it. A follower is a JetStream ordered consumer from the position
//! after the last one applied; it recreates itself after a gap or a lost server, so it applies
//! each entry once, in order.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context, stream};
use futures::StreamExt;
use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, warn};

use super::checkpoint::{
    self, CacheSequence, CheckpointBody, CheckpointError, ClusterCut, Layout, NameSequence,
    ShardPosition,
};
use super::contract::{
    Appended, Apply, Checkpointed, ClusterError, Cut, DurableLog, Image, PeerHandler, Peers,
    StorageError,
};
use super::embedded::StartReport;
use super::entry::{LogName, WalEntry};

mod config;
mod membership;
pub mod peer;
pub mod placement;
mod snapshot;

pub use config::ClusterConfig;
use membership::{HEADER_ROOM, Member, RETRY_FIRST, hex, hex_bytes};
use placement::{MAX_SHARDS, ShardKey};

/// The logs of a cloud cluster on NATS JetStream.
pub struct JetStreamLog {
    shared: Arc<Shared>,
    /// The NATS client's and the followers' runtime (one thread: they do little but wait).
    runtime: Option<tokio::runtime::Runtime>,
}

/// What the appending threads, the followers and the membership tasks share.
struct Shared {
    config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    state: Arc<dyn Apply>,
    /// The last position applied, per log.
    applied: Mutex<HashMap<LogName, u64>>,
    advanced: Condvar,
    /// Per log, held while an entry is applied: the follower and a direct pull
    /// ([`Shared::pull_through`]) may both offer the same position, which applies once.
    applying: Mutex<HashMap<LogName, Arc<Mutex<()>>>>,
    /// Per collection name, the catalog sequence of its last create or drop applied here.
    name_sequences: Mutex<HashMap<String, u64>>,
    /// Per (edge, collection identity), the catalog sequence of the last step or reset of
    /// that edge's cache applied here.
    cache_sequences: Mutex<HashMap<(String, [u8; 16]), u64>>,
    /// Shards per live collection, from the creates applied here.
    layouts: Mutex<HashMap<[u8; 16], u32>>,
    /// The shard followers started, with the position their stream had when they started,
    /// once they know it (a shard is caught up once applied through it).
    followers: Mutex<HashMap<ShardKey, Option<u64>>>,
    /// Per shard observed (every shard of every collection), the last position heard.
    observed: Mutex<HashMap<ShardKey, u64>>,
    /// Who is alive and where shards are placed, as the KV buckets say.
    membership: membership::View,
    /// What answers other nodes' requests.
    handler: std::sync::OnceLock<PeerHandler>,
    acknowledged: AtomicU64,
    replayed: AtomicU64,
    /// Held by the one caller catching up with the catalog (the others do not wait).
    catching_up: Mutex<()>,
    /// Direct QUIC to and from other nodes, when configured.
    peer: Option<peer::PeerEndpoint>,
    /// Where this node's checkpoints live, and the most bytes of points in one chunk.
    dir: PathBuf,
    checkpoint_chunk_bytes: usize,
    /// Bytes of entries applied since the last checkpoint's cut (what a restart replays).
    applied_bytes: AtomicU64,
    /// The number ordering the last checkpoint written or loaded; held while one is written.
    last_checkpoint: Mutex<u64>,
    /// Why this node's state no longer matches the streams (a stream behind or purged past
    /// the position this node applied): it stops taking part until restarted on a state the
    /// streams hold.
    diverged: Mutex<Option<String>>,
    /// The shard snapshots' buckets, once open.
    snapshots: std::sync::OnceLock<snapshot::Snapshots>,
    /// Per shard this node follows, the position of the snapshot in force as last seen.
    snapshot_at: Mutex<HashMap<ShardKey, u64>>,
    /// The shards whose snapshot this node is writing.
    snapshotting: Mutex<HashSet<ShardKey>>,
    /// The runtime the NATS client and the followers run on.
    handle: tokio::runtime::Handle,
    /// The follower task of each shard followed, to stop it when the shard is released.
    follower_tasks: Mutex<HashMap<ShardKey, tokio::task::AbortHandle>>,
    /// The shards released whose copy is not dropped yet.
    releasing: Mutex<HashSet<ShardKey>>,
}

/// How long a caller waiting on a position leaves it to the follower before also pulling the
/// entries itself ([`JetStreamLog::settle`]): above a loaded follower's usual lag.
const FOLLOWER_GRACE: Duration = Duration::from_millis(50);

/// The header of a create naming its shard count.
const SHARDS_HEADER: &str = "Tiervec-Shards";

impl Shared {
    fn catalog_stream(&self) -> String {
        format!("{}_CATALOG", self.config.prefix)
    }

    fn shard_stream(&self, (id, shard): ShardKey) -> String {
        format!("{}_SHARD_{}_{shard}", self.config.prefix, hex(&id))
    }

    fn shard_subject(&self, (id, shard): ShardKey) -> String {
        format!("{}.shard.{}.{shard}", self.config.prefix, hex(&id))
    }

    fn name_subject(&self, name: &str) -> String {
        format!("{}.catalog.name.{name}", self.config.prefix)
    }

    /// The subject of a catalog entry.
    fn catalog_subject(&self, entry: &WalEntry) -> String {
        let p = &self.config.prefix;
        match entry {
            WalEntry::EdgeStep {
                edge, collection, ..
            }
            | WalEntry::EdgeReset {
                edge, collection, ..
            } => format!(
                "{p}.catalog.edge.{}.{}",
                hex_bytes(edge.as_bytes()),
                hex(collection)
            ),
            WalEntry::CreateCollection { name, .. } | WalEntry::DropCollection { name, .. } => {
                self.name_subject(name)
            }
            WalEntry::SetModel { collection, .. } => {
                format!("{p}.catalog.model.{}", hex(collection))
            }
            WalEntry::Upsert { .. } | WalEntry::Delete { .. } => {
                unreachable!("point writes go to their shards' streams")
            }
        }
    }

    fn shards(&self, id: &[u8; 16]) -> u32 {
        self.layouts.lock().get(id).copied().unwrap_or(1)
    }

    fn stream_config(&self, name: String, subjects: Vec<String>) -> stream::Config {
        stream::Config {
            name,
            subjects,
            storage: stream::StorageType::File,
            num_replicas: self.config.stream_replicas(),
            // The default two minutes: a publish retried within it is kept once.
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    fn applied(&self, log: LogName) -> u64 {
        self.applied.lock().get(&log).copied().unwrap_or(0)
    }

    /// Records `log` applied through `position` and wakes those waiting on it.
    fn set_applied(&self, log: LogName, position: u64) {
        self.applied.lock().insert(log, position);
        self.advanced.notify_all();
    }

    /// Whether this node applies `log`: the catalog, and the shards it follows.
    fn holds(&self, log: LogName) -> bool {
        match log {
            LogName::Shard(id, s) => self.followers.lock().contains_key(&(id, s)),
            LogName::Catalog => true,
            LogName::Embedded => false,
        }
    }

    /// The shards this node holds a copy of: those it follows, and those its checkpoint
    /// brought that are not placed here any more.
    fn held(&self) -> Vec<ShardKey> {
        let mut keys: HashSet<ShardKey> = self.followers.lock().keys().copied().collect();
        keys.extend(self.applied.lock().keys().filter_map(|log| match *log {
            LogName::Shard(id, s) => Some((id, s)),
            LogName::Catalog | LogName::Embedded => None,
        }));
        keys.into_iter().collect()
    }

    /// Stops following shard `key`, which the nodes it is placed on hold caught up (its
    /// writes are heard by its observer from here on), and after `shard_timeout_ms` — the
    /// requests that found it held here have been answered — drops this node's copy of it,
    /// unless it was placed here again meanwhile.
    fn release(self: &Arc<Self>, key: ShardKey) {
        let log = LogName::Shard(key.0, key.1);
        if !self.releasing.lock().insert(key) {
            return;
        }
        self.followers.lock().remove(&key);
        if let Some(task) = self.follower_tasks.lock().remove(&key) {
            task.abort();
        }
        info!(collection = %hex(&key.0), shard = key.1, "released a shard the nodes it is placed on hold");
        let shared = self.clone();
        let grace = Duration::from_millis(self.config.shard_timeout_ms);
        self.handle.spawn(async move {
            tokio::time::sleep(grace).await;
            let lock = shared.log_lock(log);
            let _applying = lock.lock();
            if !shared.holds(log) {
                shared
                    .state
                    .forget_shard(key.0, shared.shards(&key.0), key.1);
                shared.applied.lock().remove(&log);
                shared.snapshot_at.lock().remove(&key);
            }
            shared.releasing.lock().remove(&key);
        });
    }

    /// The lock held while an entry of `log` is applied.
    fn log_lock(&self, log: LogName) -> Arc<Mutex<()>> {
        self.applying.lock().entry(log).or_default().clone()
    }

    /// Waits until `log` is applied through `position`; false at `deadline`.
    fn wait_applied(&self, log: LogName, position: u64, deadline: Instant) -> bool {
        let mut applied = self.applied.lock();
        loop {
            if applied.get(&log).copied().unwrap_or(0) >= position {
                return true;
            }
            if self.advanced.wait_until(&mut applied, deadline).timed_out() {
                return applied.get(&log).copied().unwrap_or(0) >= position;
            }
        }
    }

    /// The stream that carries `log`.
    fn stream_of(&self, log: LogName) -> String {
        match log {
            LogName::Shard(id, shard) => self.shard_stream((id, shard)),
            LogName::Catalog | LogName::Embedded => self.catalog_stream(),
        }
    }

    /// Applies `log` through `position` from entries read one by one from the stream's leader
    /// (no consumer): a write or a read waiting on a position goes on while the follower's
    /// consumer is still being re-created after a NATS server was lost, which takes JetStream
    /// seconds longer than electing the stream's new leader.
    async fn pull_through(self: &Arc<Self>, log: LogName, position: u64) -> Result<(), String> {
        let name = self.stream_of(log);
        let stream = stream_if_present(self, &name)
            .await?
            .ok_or_else(|| format!("stream {name} is gone"))?;
        while self.applied(log) < position {
            if !self.holds(log) {
                return Err(format!("{name} is no longer followed here"));
            }
            let next = self.applied(log) + 1;
            let message = stream
                .get_raw_message(next)
                .await
                .map_err(|e| format!("reading {name} at {next}: {e}"))?;
            self.apply(log, next, &message.payload, Some(&message.headers));
        }
        Ok(())
    }

    /// The shards this node follows and has applied through the position their stream had
    /// when following began.
    fn ready(&self) -> Vec<ShardKey> {
        let followers = self.followers.lock();
        let applied = self.applied.lock();
        followers
            .iter()
            .filter(|((id, s), start)| {
                start.is_some_and(|t| {
                    applied.get(&LogName::Shard(*id, *s)).copied().unwrap_or(0) >= t
                })
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// Applies the entry at `position` of `log` (once: a position at or below the last
    /// applied is skipped); a create's shard count comes from its header, and its shards are
    /// observed from then on.
    fn apply(
        self: &Arc<Self>,
        log: LogName,
        position: u64,
        body: &[u8],
        headers: Option<&async_nats::HeaderMap>,
    ) {
        let lock = self.log_lock(log);
        let _applying = lock.lock();
        if position <= self.applied(log) || !self.holds(log) {
            return;
        }
        match WalEntry::decode(body) {
            Ok(entry) => {
                self.state.apply(position, &entry);
                match &entry {
                    WalEntry::CreateCollection { name, id, .. } => {
                        let shards = headers
                            .and_then(|h| h.get(SHARDS_HEADER))
                            .and_then(|v| v.as_str().parse::<u32>().ok())
                            .filter(|s| (1..=MAX_SHARDS).contains(s))
                            .unwrap_or(1);
                        self.name_sequences.lock().insert(name.clone(), position);
                        self.layouts.lock().entry(*id).or_insert(shards);
                        for shard in 0..shards {
                            self.observe_shard((*id, shard));
                        }
                    }
                    WalEntry::DropCollection { name, id } => {
                        self.name_sequences.lock().insert(name.clone(), position);
                        self.layouts.lock().remove(id);
                    }
                    WalEntry::EdgeStep {
                        edge, collection, ..
                    }
                    | WalEntry::EdgeReset {
                        edge, collection, ..
                    } => {
                        let key = (edge.clone(), *collection);
                        self.cache_sequences.lock().insert(key, position);
                    }
                    WalEntry::Upsert { .. }
                    | WalEntry::Delete { .. }
                    | WalEntry::SetModel { .. } => {}
                }
            }
            // A body no tiervec wrote: skipped loudly, never a stop of the follower.
            Err(e) => {
                error!(?log, position, error = %e, "undecodable entry skipped")
            }
        }
        self.replayed.fetch_add(1, Ordering::Relaxed);
        self.applied_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.set_applied(log, position);
        if let LogName::Shard(id, shard) = log {
            self.snapshot_if_due((id, shard), position);
        }
    }

    /// Starts writing a snapshot of shard `key` (applied through `position`) when this node is
    /// its first placed node and `snapshot_entries` entries went by since the one in force.
    fn snapshot_if_due(self: &Arc<Self>, key: ShardKey, position: u64) {
        let every = self.config.snapshot_entries;
        let last = self.snapshot_at.lock().get(&key).copied();
        let due = every > 0 && last.is_some_and(|at| position >= at + every);
        if !due
            || !self.membership.first_placed(key, &self.config.node)
            || !self.snapshotting.lock().insert(key)
        {
            return;
        }
        let (shared, shards) = (self.clone(), self.shards(&key.0));
        self.handle.spawn(async move {
            if let Err(e) = write_snapshot(&shared, key, shards).await {
                warn!(collection = %hex(&key.0), shard = key.1, error = %e, "shard snapshot not written; tried again after another interval");
                let mut known = shared.snapshot_at.lock();
                let known = known.entry(key).or_default();
                *known = (*known).max(position);
            }
            shared.snapshotting.lock().remove(&key);
        });
    }

    /// Takes up from a checkpoint's cut: the positions applied, the sequences conditional
    /// publishes expect, the collections' layouts (whose shards are observed from here on).
    fn resume_from(self: &Arc<Self>, cut: &ClusterCut) {
        let mut applied = self.applied.lock();
        applied.insert(LogName::Catalog, cut.catalog);
        for s in &cut.shards {
            applied.insert(LogName::Shard(s.collection, s.shard), s.position);
        }
        drop(applied);
        self.name_sequences
            .lock()
            .extend(cut.names.iter().map(|n| (n.name.clone(), n.sequence)));
        self.cache_sequences.lock().extend(
            cut.caches
                .iter()
                .map(|c| ((c.edge.clone(), c.collection), c.sequence)),
        );
        self.layouts
            .lock()
            .extend(cut.layouts.iter().map(|l| (l.collection, l.shards)));
        for l in &cut.layouts {
            for shard in 0..l.shards {
                self.observe_shard((l.collection, shard));
            }
        }
    }

    /// The state and the positions it covers, taken together with every log's apply lock
    /// held (and the map of them, so no log starts applying meanwhile); with the bytes
    /// applied up to then.
    fn cut(&self) -> (Image, ClusterCut, u64) {
        let locks = self.applying.lock();
        let held: Vec<Arc<Mutex<()>>> = locks.values().cloned().collect();
        let _guards: Vec<_> = held.iter().map(|l| l.lock()).collect();
        let bytes = self.applied_bytes.load(Ordering::Relaxed);
        let image = self.state.image();
        let applied = self.applied.lock();
        let mut shards: Vec<ShardPosition> = applied
            .iter()
            .filter_map(|(log, &position)| match *log {
                LogName::Shard(collection, shard) => Some(ShardPosition {
                    collection,
                    shard,
                    position,
                }),
                LogName::Catalog | LogName::Embedded => None,
            })
            .collect();
        shards.sort_by_key(|s| (s.collection, s.shard));
        let cut = ClusterCut {
            catalog: applied.get(&LogName::Catalog).copied().unwrap_or(0),
            shards,
            names: self
                .name_sequences
                .lock()
                .iter()
                .map(|(name, &sequence)| NameSequence {
                    name: name.clone(),
                    sequence,
                })
                .collect(),
            caches: self
                .cache_sequences
                .lock()
                .iter()
                .map(|((edge, collection), &sequence)| CacheSequence {
                    edge: edge.clone(),
                    collection: *collection,
                    sequence,
                })
                .collect(),
            layouts: self
                .layouts
                .lock()
                .iter()
                .map(|(&collection, &shards)| Layout { collection, shards })
                .collect(),
        };
        (image, cut, bytes)
    }

    /// Starts following a shard placed on this node (once, until it is released).
    fn follow_shard(self: &Arc<Self>, key: ShardKey) {
        let mut followers = self.followers.lock();
        if followers.contains_key(&key) {
            return;
        }
        followers.insert(key, None);
        drop(followers);
        info!(collection = %hex(&key.0), shard = key.1, "following a shard placed on this node");
        let shared = self.clone();
        let task = tokio::spawn(async move {
            let stream = shared.shard_stream(key);
            follow(shared, LogName::Shard(key.0, key.1), stream).await
        });
        self.follower_tasks.lock().insert(key, task.abort_handle());
    }
}

impl Shared {
    /// Starts hearing the writes of a shard (once): the writes of shards this node does not
    /// hold still announce what they change, so the edge caches this node serves are
    /// invalidated whichever shard a write went to.
    fn observe_shard(self: &Arc<Self>, key: ShardKey) {
        if self.observed.lock().insert(key, 0).is_some() {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            let mut wait = RETRY_FIRST;
            loop {
                match observe_once(&shared, key).await {
                    Ok(()) => return,
                    Err(e) => {
                        debug!(collection = %hex(&key.0), shard = key.1, error = %e, "shard observer restarts");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                }
            }
        });
    }
}

/// The stream `name`, or `None` when it is gone (its collection was dropped).
async fn stream_if_present(shared: &Shared, name: &str) -> Result<Option<stream::Stream>, String> {
    match shared.js.get_stream(name).await {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(e.kind(), context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The messages of an ordered consumer of `stream` delivering from `deliver_policy`.
async fn ordered(
    stream: &stream::Stream,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<consumer::pull::Ordered, String> {
    stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Hears a shard's writes from the stream's end (or after the last one heard), handing those
/// of a shard this node does not follow to [`Apply::observe`]. Ends when the stream is gone.
async fn observe_once(shared: &Arc<Shared>, key: ShardKey) -> Result<(), String> {
    let name = shared.shard_stream(key);
    let Some(stream) = stream_if_present(shared, &name).await? else {
        return Ok(());
    };
    let heard = shared.observed.lock().get(&key).copied().unwrap_or(0);
    let deliver_policy = if heard == 0 {
        consumer::DeliverPolicy::New
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: heard + 1,
        }
    };
    let mut messages = ordered(&stream, deliver_policy).await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let position = message.info().map_err(|e| e.to_string())?.stream_sequence;
        shared.observed.lock().insert(key, position);
        if shared.followers.lock().contains_key(&key) {
            continue;
        }
        match WalEntry::decode(&message.payload) {
            Ok(entry) => shared.state.observe(position, &entry),
            Err(e) => debug!(stream = name, position, error = %e, "undecodable entry not observed"),
        }
    }
    Err("the observer's messages ended".into())
}

/// Follows one stream for good: applies its entries in order, and after an error starts again
/// after the last position applied (with a growing wait). Ends when the stream is gone (its
/// collection was dropped).
async fn follow(shared: Arc<Shared>, log: LogName, stream_name: String) {
    let mut wait = RETRY_FIRST;
    loop {
        match follow_once(&shared, log, &stream_name).await {
            Ok(()) => return,
            Err(e) => {
                warn!(stream = %stream_name, error = %e, "stream follower restarts");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn follow_once(shared: &Arc<Shared>, log: LogName, name: &str) -> Result<(), String> {
    let Some(mut stream) = stream_if_present(shared, name).await? else {
        debug!(stream = name, "stream gone: its collection was dropped");
        if let LogName::Shard(id, s) = log {
            shared.followers.lock().insert((id, s), Some(0));
        }
        return Ok(());
    };
    let state = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .clone();
    let applied = shared.applied(log);
    if let (LogName::Shard(id, s), Some(snapshots)) = (log, shared.snapshots.get()) {
        let at = snapshots.position((id, s)).await?;
        let mut known = shared.snapshot_at.lock();
        let known = known.entry((id, s)).or_default();
        *known = (*known).max(at);
    }
    if let LogName::Shard(id, s) = log
        && state.first_sequence > applied + 1
        && state.last_sequence >= applied
    {
        restore_snapshot(shared, (id, s), state.first_sequence - 1).await?;
    }
    // A stream behind what this node applied is not the stream it applied (other NATS
    // servers, or a stream deleted and made again); one starting past the next position with
    // no snapshot to take up from was purged: the entries in between are nowhere.
    let applied = shared.applied(log);
    if state.last_sequence < applied || state.first_sequence > applied + 1 {
        let why = format!(
            "stream {name} holds positions {}..={}, but this node applied it through {applied}: \
             these NATS servers do not hold the entries its checkpoint follows on from; \
             move the checkpoints out of the data directory to rebuild this node from the streams",
            state.first_sequence, state.last_sequence
        );
        error!(stream = name, "{why}");
        *shared.diverged.lock() = Some(why.clone());
        return Err(why);
    }
    if let LogName::Shard(id, s) = log {
        let last = state.last_sequence;
        let mut followers = shared.followers.lock();
        let start = followers.entry((id, s)).or_insert(None);
        if start.is_none() {
            *start = Some(last);
        }
    }
    let from = shared.applied(log) + 1;
    let deliver_policy = consumer::DeliverPolicy::ByStartSequence {
        start_sequence: from,
    };
    let mut messages = ordered(&stream, deliver_policy).await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let info = message.info().map_err(|e| e.to_string())?;
        let (position, pending) = (info.stream_sequence, info.pending);
        // Entries skipped: the stream was trimmed past this node meanwhile; starting again
        // catches up from the snapshot.
        if position > shared.applied(log) + 1 {
            return Err(format!(
                "{name} delivered {position} after {}: trimmed meanwhile",
                shared.applied(log)
            ));
        }
        // Entries of this stream not yet delivered here: how far this replica trails.
        metrics::gauge!("tiervec_cluster_replica_lag_entries", "stream" => name.to_owned())
            .set(pending as f64);
        shared.apply(log, position, &message.payload, message.headers.as_ref());
    }
    Err("the consumer's messages ended".into())
}

/// Writes a snapshot of shard `key` (of a collection of `shards`) as this node applied it,
/// makes it the one in force, and trims the stream below the position of the one it replaced
/// (see `snapshot.rs`). Does nothing when the snapshot in force is as new.
async fn write_snapshot(shared: &Arc<Shared>, key: ShardKey, shards: u32) -> Result<(), String> {
    let snapshots = shared.snapshots.get().ok_or("no snapshot buckets")?;
    let log = LogName::Shard(key.0, key.1);
    let written = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let folder = snapshot::scratch(&shared.dir, key)?;
            let (position, image) = {
                let lock = shared.log_lock(log);
                let _applying = lock.lock();
                let position = shared.applied(log);
                match shared.state.shard_image(key.0, shards, key.1) {
                    Some(image) => (position, image),
                    None => return Ok(None),
                }
            };
            let points = image.ids.len() as u64;
            let file = snapshot::write_file(
                &folder,
                key,
                shards,
                position,
                image,
                shared.checkpoint_chunk_bytes,
            )?;
            Ok::<_, String>(Some((file, position, points)))
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let Some((file, position, points)) = written else {
        return Ok(());
    };
    let published = snapshots.publish(key, &file, position, points).await;
    let _ = std::fs::remove_file(&file);
    let at = match published? {
        snapshot::Published::Stale(at) => at,
        snapshot::Published::InForce { trim_below } => {
            info!(collection = %hex(&key.0), shard = key.1, position, points, "shard snapshot written");
            if trim_below > 0 {
                trim(shared, key, trim_below).await?;
            }
            position
        }
    };
    let mut known = shared.snapshot_at.lock();
    let known = known.entry(key).or_default();
    *known = (*known).max(at);
    Ok(())
}

/// Purges the entries of shard `key`'s stream below position `below` (which is kept).
async fn trim(shared: &Shared, key: ShardKey, below: u64) -> Result<(), String> {
    let name = shared.shard_stream(key);
    let Some(stream) = stream_if_present(shared, &name).await? else {
        return Ok(());
    };
    let purged = stream
        .purge()
        .sequence(below)
        .await
        .map_err(|e| format!("trimming {name} below {below}: {e}"))?;
    info!(
        stream = name,
        below,
        entries = purged.purged,
        "stream trimmed below a snapshot's position"
    );
    metrics::counter!("tiervec_cluster_entries_trimmed_total").increment(purged.purged);
    Ok(())
}

/// Brings shard `key` up to the snapshot in force, which must hold every entry through
/// `needed` (the stream's first position, less one): its points replace this node's copy of
/// the shard. Err when no snapshot covers it, or when the collection is not known here yet
/// (the follower tries again).
async fn restore_snapshot(shared: &Arc<Shared>, key: ShardKey, needed: u64) -> Result<(), String> {
    let snapshots = shared.snapshots.get().ok_or("no snapshot buckets")?;
    let file = snapshot::scratch(&shared.dir, key)?.join("restore.tvck");
    let pointer = snapshots.fetch(key, needed, &file).await?;
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let read = snapshot::read_file(&file, key, pointer.position);
        let _ = std::fs::remove_file(&file);
        let (image, shards) = read?;
        let log = LogName::Shard(key.0, key.1);
        let lock = shared.log_lock(log);
        let _applying = lock.lock();
        let from = shared.applied(log);
        if !shared.holds(log) {
            return Err(format!(
                "shard {} is no longer followed here",
                pointer.object
            ));
        }
        if from < pointer.position {
            if !shared
                .state
                .replace_shard(&image, shards, key.1, from, pointer.position)
            {
                return Err(format!(
                    "the collection of snapshot {} is not known here yet",
                    pointer.object
                ));
            }
            shared.set_applied(log, pointer.position);
            info!(
                snapshot = pointer.object,
                from,
                position = pointer.position,
                points = pointer.points,
                "shard caught up from its snapshot"
            );
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Whether connecting failed on TLS itself (a certificate missing, unknown or refused on either
/// side), which waiting does not mend.
fn tls_refused(e: &async_nats::ConnectError) -> bool {
    if e.kind() == async_nats::ConnectErrorKind::Tls {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map_or(s, |i| i as &(dyn std::error::Error + 'static));
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

impl JetStreamLog {
    /// Loads this node's newest checkpoint from `dir` into `state` (a fresh node has none),
    /// connects to the cluster, creates the catalog stream if it does not exist, and applies
    /// every stream to `state` from the checkpoint's cut up to the position it has now, then
    /// keeps following them. Checkpoints are written in chunks of at most
    /// `checkpoint_chunk_bytes` of points.
    pub fn open(
        config: &ClusterConfig,
        dir: &Path,
        state: Arc<dyn Apply>,
        checkpoint_chunk_bytes: usize,
    ) -> Result<(JetStreamLog, StartReport), StorageError> {
        let started = Instant::now();
        config.check()?;
        let mut report = StartReport::default();
        let cut = match checkpoint::load_latest(dir)? {
            None => ClusterCut::default(),
            Some((path, body)) => {
                let Some(cut) = body.cluster else {
                    return Err(ClusterError::Config(format!(
                        "{} is a single-node checkpoint: a cluster node starts from an empty data directory or from its own checkpoints",
                        path.display()
                    ))
                    .into());
                };
                info!(path = %path.display(), catalog = cut.catalog, shards = cut.shards.len(), "checkpoint loaded");
                report.checkpoint = Some((path, body.lsn));
                state.restore(Image {
                    collections: body.collections,
                    edge_caches: body.edge_caches,
                    models: body.models,
                });
                cut
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tiervec-nats")
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Connect(format!("cannot start its runtime: {e}")))?;
        let recovery = Duration::from_secs(config.recovery_timeout_secs);
        let shared = runtime.block_on(async {
            let addrs = config
                .nats
                .iter()
                .map(|u| u.parse::<async_nats::ServerAddr>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClusterError::Config(format!("a NATS address: {e}")))?;
            let deadline = Instant::now() + recovery;
            // Servers still starting are waited for; refused credentials end the start at once.
            let client = loop {
                let mut options = async_nats::ConnectOptions::new()
                    .name("tiervec-cloud")
                    .connection_timeout(Duration::from_secs(2))
                    .event_callback(|event| async move { info!(%event, "NATS connection") });
                if let (Some(user), Some(password)) = (&config.user, &config.password) {
                    options = options.user_and_password(user.clone(), password.clone());
                }
                if let Some(ca) = &config.tls_ca {
                    options = options.require_tls(true).add_root_certificates(ca.clone());
                }
                if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
                    options = options.add_client_certificate(cert.clone(), key.clone());
                }
                match options.connect(addrs.clone()).await {
                    Ok(client) => break client,
                    Err(e) if matches!(
                        e.kind(),
                        async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::Authentication
                    ) =>
                    {
                        return Err(ClusterError::Connect(format!(
                            "the NATS servers refused this node's credentials (cluster.user, cluster.password): {e}"
                        )));
                    }
                    Err(e) if tls_refused(&e) => {
                        return Err(ClusterError::Connect(format!(
                            "TLS with the NATS servers failed (cluster.tls_ca, cluster.tls_cert, cluster.tls_key): {e}"
                        )));
                    }
                    Err(e) if Instant::now() < deadline => {
                        debug!(error = %e, "no NATS server answered yet");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        return Err(ClusterError::Connect(format!(
                            "no NATS server answered within {recovery:?}: {e}"
                        )));
                    }
                }
            };
            let js = jetstream::new(client.clone());
            let peer = match (config.peer_addr, &config.peer_certs) {
                (Some(addr), Some(certs)) => {
                    Some(peer::PeerEndpoint::bind(addr, certs, &config.node)?)
                }
                _ => None,
            };
            let shared = Arc::new(Shared {
                config: config.clone(),
                client,
                js,
                state,
                applied: Mutex::new(HashMap::new()),
                advanced: Condvar::new(),
                applying: Mutex::new(HashMap::new()),
                name_sequences: Mutex::new(HashMap::new()),
                cache_sequences: Mutex::new(HashMap::new()),
                layouts: Mutex::new(HashMap::new()),
                followers: Mutex::new(HashMap::new()),
                observed: Mutex::new(HashMap::new()),
                membership: membership::View::default(),
                handler: std::sync::OnceLock::new(),
                acknowledged: AtomicU64::new(0),
                replayed: AtomicU64::new(0),
                catching_up: Mutex::new(()),
                peer,
                dir: dir.to_owned(),
                checkpoint_chunk_bytes,
                applied_bytes: AtomicU64::new(0),
                last_checkpoint: Mutex::new(report.checkpoint.as_ref().map_or(0, |(_, l)| *l)),
                diverged: Mutex::new(None),
                snapshots: std::sync::OnceLock::new(),
                snapshot_at: Mutex::new(HashMap::new()),
                snapshotting: Mutex::new(HashSet::new()),
                handle: tokio::runtime::Handle::current(),
                follower_tasks: Mutex::new(HashMap::new()),
                releasing: Mutex::new(HashSet::new()),
            });
            shared.resume_from(&cut);
            if let Some(endpoint) = &shared.peer {
                let weak = Arc::downgrade(&shared);
                endpoint.serve(Arc::new(move |body: &[u8]| {
                    weak.upgrade().and_then(|shared| shared.handle(body))
                }));
                info!(addr = ?endpoint.local_addr(), "QUIC endpoint for other nodes (mutual TLS)");
            }
            let catalog = shared.catalog_stream();
            let subjects = vec![format!("{}.catalog.>", config.prefix)];
            let mut stream = loop {
                // Right after the cluster forms, JetStream may not have a meta leader yet.
                match shared
                    .js
                    .get_or_create_stream(shared.stream_config(catalog.clone(), subjects.clone()))
                    .await
                {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        debug!(error = %e, "catalog stream not ready");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        return Err(ClusterError::Connect(format!(
                            "catalog stream {catalog}: {e}"
                        )));
                    }
                }
            };
            let last = stream
                .info()
                .await
                .map_err(|e| ClusterError::Connect(e.to_string()))?
                .state
                .last_sequence;
            if last < cut.catalog {
                return Err(ClusterError::Config(format!(
                    "the catalog stream {catalog} ends at {last}, but this node's checkpoint covers it through {}: these NATS servers do not hold this cluster's streams (move the checkpoints out of {} to join them as a new node)",
                    cut.catalog,
                    dir.display()
                )));
            }
            tokio::spawn(follow(shared.clone(), LogName::Catalog, catalog));
            // Like the catalog stream: JetStream may be electing leaders (a server just back).
            loop {
                let opened = match membership::open_buckets(&*shared).await {
                    Ok(()) => snapshot::Snapshots::open(&shared.js, &shared.config).await,
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(snapshots) => {
                        let _ = shared.snapshots.set(snapshots);
                        break;
                    }
                    Err(e) if Instant::now() < deadline => {
                        debug!(error = %e, "membership buckets not ready");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            membership::start(&shared);
            Ok::<_, ClusterError>((shared, last))
        })?;
        let (shared, catalog_last) = shared;
        let deadline = started + recovery;
        let caught_up = |log, position| {
            if shared.wait_applied(log, position, deadline) {
                Ok(())
            } else {
                Err(ClusterError::Connect(format!(
                    "{log:?} not applied through {position} within {recovery:?}"
                )))
            }
        };
        caught_up(LogName::Catalog, catalog_last)?;
        // The placement watcher follows the shards placed here as it reads the bucket; each
        // follower records its stream's position when it starts (0 for a stream that is gone).
        // Start-up waits until the watcher has read the bucket once and the followers have
        // applied through those positions.
        loop {
            let read = shared.membership.placement_read();
            let pending = shared
                .followers
                .lock()
                .iter()
                .filter(|((id, s), target)| {
                    target.is_none_or(|t| shared.applied(LogName::Shard(*id, *s)) < t)
                })
                .count();
            if read && pending == 0 {
                break;
            }
            if let Some(why) = shared.diverged.lock().clone() {
                return Err(ClusterError::Config(why).into());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Connect(format!(
                    "{pending} shards not caught up within {recovery:?}"
                ))
                .into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let seconds = started.elapsed().as_secs_f64();
        report.seconds = seconds;
        report.wal.records_replayed = shared.replayed.load(Ordering::Relaxed);
        info!(
            seconds,
            entries = report.wal.records_replayed,
            replicas = config.stream_replicas(),
            "caught up with the cluster's streams"
        );
        Ok((
            JetStreamLog {
                shared,
                runtime: Some(runtime),
            },
            report,
        ))
    }

    /// The last subject sequence `entry`'s publish expects, for the entries that are
    /// conditional: the name's last create or drop, the cache's last step or reset, as this
    /// node applied them.
    fn expected_sequence(&self, entry: &WalEntry) -> Option<u64> {
        let shared = &self.shared;
        match entry {
            WalEntry::CreateCollection { name, .. } => {
                Some(shared.name_sequences.lock().get(name).copied().unwrap_or(0))
            }
            WalEntry::EdgeStep {
                edge, collection, ..
            } => Some(
                shared
                    .cache_sequences
                    .lock()
                    .get(&(edge.clone(), *collection))
                    .copied()
                    .unwrap_or(0),
            ),
            _ => None,
        }
    }

    /// Publishes `body` to `subject` (expecting the subject's last sequence when given, with
    /// `headers`), retrying with the same message id until `deadline`; its stream sequence.
    async fn publish(
        &self,
        subject: String,
        body: Vec<u8>,
        expected: Option<u64>,
        headers: &[(&'static str, String)],
        deadline: Instant,
    ) -> Result<u64, ClusterError> {
        let shared = &self.shared;
        let max = shared.client.server_info().max_payload;
        if body.len() + HEADER_ROOM > max {
            return Err(ClusterError::TooLarge {
                bytes: body.len(),
                max,
            });
        }
        let message_id = uuid::Uuid::new_v4().to_string();
        let body = bytes::Bytes::from(body);
        let mut wait = RETRY_FIRST;
        loop {
            let mut publish = context::Publish::build()
                .payload(body.clone())
                .message_id(&message_id);
            for (name, value) in headers {
                publish = publish.header(*name, value.as_str());
            }
            if let Some(sequence) = expected {
                publish = publish.expected_last_subject_sequence(sequence);
            }
            let attempt = async {
                let ack = shared.js.send_publish(subject.clone(), publish).await?;
                ack.await
            };
            let outcome = tokio::time::timeout_at(deadline.into(), attempt).await;
            let error = match outcome {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) if e.kind() == context::PublishErrorKind::WrongLastSequence => {
                    return Err(ClusterError::Conflict(format!(
                        "another node changed `{subject}` first; retry once this node has caught up"
                    )));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no acknowledgement in time".to_owned(),
            };
            if Instant::now() + wait >= deadline {
                return Err(ClusterError::Unavailable(format!(
                    "publishing to {subject}: {error}"
                )));
            }
            debug!(subject, error, "publish retried with the same message id");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    /// Publishes a catalog entry; for a create, first makes its shards' streams, and after it,
    /// places them. A refused create removes the streams made for it (one whose
    /// acknowledgement was only lost keeps them).
    async fn publish_catalog(
        &self,
        entry: &WalEntry,
        shards: u32,
        deadline: Instant,
    ) -> Result<u64, ClusterError> {
        let shared = &self.shared;
        let created = match entry {
            WalEntry::CreateCollection { id, .. } => Some(*id),
            _ => None,
        };
        if let Some(id) = created {
            for shard in 0..shards {
                let stream = shared.shard_stream((id, shard));
                let config =
                    shared.stream_config(stream.clone(), vec![shared.shard_subject((id, shard))]);
                tokio::time::timeout_at(deadline.into(), shared.js.get_or_create_stream(config))
                    .await
                    .map_err(|_| {
                        ClusterError::Unavailable(format!("creating stream {stream} timed out"))
                    })?
                    .map_err(|e| ClusterError::Unavailable(format!("stream {stream}: {e}")))?;
            }
        }
        let headers = match created {
            Some(_) => vec![(SHARDS_HEADER, shards.to_string())],
            None => Vec::new(),
        };
        let expected = self.expected_sequence(entry);
        let published = self
            .publish(
                shared.catalog_subject(entry),
                entry.encode(),
                expected,
                &headers,
                deadline,
            )
            .await;
        if let (Some(id), Err(ClusterError::Conflict(_))) = (created, &published) {
            for shard in 0..shards {
                if let Err(e) = shared
                    .js
                    .delete_stream(shared.shard_stream((id, shard)))
                    .await
                {
                    warn!(error = %e, "the stream of a refused create was not deleted");
                }
            }
        }
        let position = published?;
        if let Some(id) = created {
            let mut live = shared
                .membership
                .live(Duration::from_millis(shared.config.node_timeout_ms));
            if !live.contains(&shared.config.node) {
                live.push(shared.config.node.clone());
                live.sort();
            }
            membership::place_collection(shared, id, shards, &live).await;
        }
        Ok(position)
    }

    /// Publishes a point write to the streams of the shards it touches, all at once; where
    /// each became durable, or which did not.
    async fn publish_writes(
        &self,
        entry: WalEntry,
        deadline: Instant,
    ) -> Result<Vec<(u32, u64)>, ClusterError> {
        let shared = &self.shared;
        let id = match &entry {
            WalEntry::Upsert { collection, .. } | WalEntry::Delete { collection, .. } => {
                *collection
            }
            _ => unreachable!("only point writes go to shards"),
        };
        let parts = placement::split_by_shard(entry, shared.shards(&id));
        let sends = parts.iter().map(|(shard, part)| {
            self.publish(
                shared.shard_subject((id, *shard)),
                part.encode(),
                None,
                &[],
                deadline,
            )
        });
        let outcomes = futures::future::join_all(sends).await;
        let mut durable = Vec::new();
        let mut failed = Vec::new();
        let mut reason = None;
        for ((shard, _), outcome) in parts.iter().zip(outcomes) {
            match outcome {
                Ok(position) => durable.push((*shard, position)),
                Err(e) => {
                    failed.push(*shard);
                    reason.get_or_insert(e);
                }
            }
        }
        match reason {
            None => Ok(durable),
            Some(e) if durable.is_empty() => Err(e),
            Some(e) => Err(ClusterError::PartlyDurable {
                durable,
                failed,
                reason: e.to_string(),
            }),
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("present until dropped")
    }

    /// Waits until `log` is applied through `position`: for the follower alone during
    /// [`FOLLOWER_GRACE`], then also pulling the missing entries from the stream directly
    /// (only for a log this node follows); false at `deadline`. Callers may be async workers,
    /// so the pull runs on the NATS runtime and this thread only waits.
    fn settle(&self, log: LogName, position: u64, deadline: Instant) -> bool {
        let shared = &self.shared;
        let grace = (Instant::now() + FOLLOWER_GRACE).min(deadline);
        if shared.wait_applied(log, position, grace) {
            return true;
        }
        if shared.holds(log) {
            let puller = shared.clone();
            self.runtime().spawn(async move {
                let pulled = puller.pull_through(log, position);
                match tokio::time::timeout_at(deadline.into(), pulled).await {
                    Ok(Ok(())) => debug!(?log, position, "applied by a direct pull"),
                    Ok(Err(e)) => debug!(?log, position, error = %e, "direct pull failed"),
                    Err(_) => debug!(?log, position, "direct pull timed out"),
                }
            });
        }
        shared.wait_applied(log, position, deadline)
    }
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        // Dropping a runtime blocks on its tasks; the followers never end on their own.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl JetStreamLog {
    /// Appends a catalog entry or a point write; `shards` is a create's shard count.
    fn append_with(&self, entry: WalEntry, shards: u32) -> Result<Appended, StorageError> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.shared.config.append_timeout_ms);
        let writes = matches!(entry, WalEntry::Upsert { .. } | WalEntry::Delete { .. });
        let collection = match &entry {
            WalEntry::Upsert { collection, .. } | WalEntry::Delete { collection, .. } => {
                *collection
            }
            _ => [0; 16],
        };
        let dropped = match &entry {
            WalEntry::DropCollection { id, .. } => Some(*id),
            _ => None,
        };
        let published = if writes {
            self.runtime()
                .block_on(self.publish_writes(entry, deadline))
        } else {
            self.runtime()
                .block_on(self.publish_catalog(&entry, shards, deadline))
                .map(|p| vec![(0, p)])
        };
        let outcome = match &published {
            Ok(_) => "acknowledged",
            Err(ClusterError::Conflict(_)) => "conflict",
            Err(ClusterError::TooLarge { .. }) => "too_large",
            Err(ClusterError::PartlyDurable { .. }) => "partly_durable",
            Err(_) => "unavailable",
        };
        metrics::counter!("tiervec_cluster_appends_total", "outcome" => outcome).increment(1);
        let positions = published?;
        // Visible here before it is acknowledged, where this node holds what it wrote.
        for &(shard, position) in &positions {
            let log = if writes {
                if !self
                    .shared
                    .followers
                    .lock()
                    .contains_key(&(collection, shard))
                {
                    continue;
                }
                LogName::Shard(collection, shard)
            } else {
                LogName::Catalog
            };
            if !self.settle(log, position, deadline) {
                // Durable in the cluster, but this node has not applied it: the caller must
                // not answer as if it were visible here, and must not claim it failed either.
                return Err(ClusterError::Unavailable(format!(
                    "{log:?} position {position} is durable but not yet applied on this node"
                ))
                .into());
            }
        }
        self.shared.acknowledged.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("tiervec_cluster_append_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Some(id) = dropped {
            for shard in 0..self.shared.shards(&id).max(shards) {
                let stream = self.shared.shard_stream((id, shard));
                if let Err(e) = self
                    .runtime()
                    .block_on(self.shared.js.delete_stream(&stream))
                {
                    warn!(stream, error = %e, "the dropped collection's stream was not deleted");
                }
            }
        }
        Ok(Appended {
            position: positions.iter().map(|(_, p)| *p).max().unwrap_or(0),
            shards: if writes { positions } else { Vec::new() },
        })
    }
}

impl DurableLog for JetStreamLog {
    fn append(&self, entry: WalEntry) -> Result<Appended, StorageError> {
        self.append_with(entry, 1)
    }

    fn append_create(&self, entry: WalEntry, shards: u32) -> Result<Appended, StorageError> {
        if !(1..=MAX_SHARDS).contains(&shards) {
            return Err(ClusterError::Config(format!(
                "shards = {shards} is outside 1..={MAX_SHARDS}"
            ))
            .into());
        }
        self.append_with(entry, shards)
    }

    fn peers(&self) -> Option<&dyn Peers> {
        Some(self)
    }

    /// Writes this node's state as of a cut of its streams (see the module above) and removes
    /// its older checkpoints.
    fn checkpoint(&self) -> Result<Checkpointed, StorageError> {
        let started = Instant::now();
        let shared = &self.shared;
        let mut last = shared.last_checkpoint.lock();
        let (image, cut, bytes) = shared.cut();
        let covered = cut.catalog + cut.shards.iter().map(|s| s.position).sum::<u64>();
        let lsn = covered.max(*last + 1);
        let logs = std::iter::once((LogName::Catalog, cut.catalog))
            .chain(
                cut.shards
                    .iter()
                    .map(|s| (LogName::Shard(s.collection, s.shard), s.position)),
            )
            .collect();
        let path = checkpoint::write(
            &shared.dir,
            &CheckpointBody {
                lsn,
                collections: image.collections,
                edge_caches: image.edge_caches,
                models: image.models,
                cluster: Some(cut),
            },
            shared.checkpoint_chunk_bytes,
        )?;
        *last = lsn;
        shared.applied_bytes.fetch_sub(bytes, Ordering::Relaxed);
        checkpoint::remove_before(&shared.dir, lsn).map_err(|source| CheckpointError::Io {
            path: shared.dir.clone(),
            source,
        })?;
        info!(lsn, seconds = started.elapsed().as_secs_f64(), path = %path.display(), "checkpoint written");
        Ok(Checkpointed {
            path,
            cut: Cut(logs),
        })
    }

    /// Bytes of entries applied since the last checkpoint: what a restart would replay.
    fn bytes(&self) -> u64 {
        self.shared.applied_bytes.load(Ordering::Relaxed)
    }

    fn flushes(&self) -> u64 {
        self.shared.acknowledged.load(Ordering::Relaxed)
    }

    fn wait_applied(&self, log: LogName, position: u64, within: Duration) -> bool {
        self.settle(log, position, Instant::now() + within)
    }

    /// Asks JetStream for the catalog stream's last sequence and waits until it is applied.
    /// Callers may be async workers, so the request runs on the NATS runtime and this thread
    /// only waits on its answer (never `block_on` inside another runtime).
    fn catch_up_catalog(&self, within: Duration) -> bool {
        let Some(_one) = self.shared.catching_up.try_lock() else {
            return false;
        };
        let deadline = Instant::now() + within;
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        self.runtime().spawn(async move {
            let last = shared
                .js
                .get_stream(shared.catalog_stream())
                .await
                .map(|s| s.cached_info().state.last_sequence);
            let _ = tx.send(last);
        });
        match rx.recv_timeout(within) {
            Ok(Ok(last)) => self.settle(LogName::Catalog, last, deadline),
            _ => false,
        }
    }

    fn failure(&self) -> Option<String> {
        if let Some(why) = self.shared.diverged.lock().clone() {
            return Some(why);
        }
        match self.shared.client.connection_state() {
            async_nats::connection::State::Connected => None,
            state => Some(format!("NATS connection {state}")),
        }
    }
}

impl Member for Shared {
    fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn js(&self) -> &jetstream::Context {
        &self.js
    }

    fn view(&self) -> &membership::View {
        &self.membership
    }

    fn ready(&self) -> Vec<ShardKey> {
        Shared::ready(self)
    }

    fn layouts(&self) -> Vec<([u8; 16], u32)> {
        self.layouts.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn follow(self: Arc<Self>, key: ShardKey) {
        self.follow_shard(key);
    }

    fn held(&self) -> Vec<ShardKey> {
        Shared::held(self)
    }

    fn release(self: &Arc<Self>, key: ShardKey) {
        Shared::release(self, key);
    }

    fn handle(&self, body: &[u8]) -> Option<Vec<u8>> {
        self.handler.get().map(|handle| handle(body))
    }

    fn peer_endpoint(&self) -> Option<&peer::PeerEndpoint> {
        self.peer.as_ref()
    }
}

impl Peers for JetStreamLog {
    fn shards(&self, collection: [u8; 16]) -> u32 {
        self.shared.shards(&collection)
    }

    fn ready_here(&self, collection: [u8; 16]) -> Vec<u32> {
        let mut ready: Vec<u32> = self
            .shared
            .ready()
            .into_iter()
            .filter(|(id, _)| *id == collection)
            .map(|(_, s)| s)
            .collect();
        ready.sort_unstable();
        ready
    }

    fn candidates(&self, collection: [u8; 16]) -> Vec<(String, Vec<u32>)> {
        let timeout = Duration::from_millis(self.shared.config.node_timeout_ms);
        self.shared
            .membership
            .candidates(collection, &self.shared.config.node, timeout)
    }

    fn ask(
        &self,
        node: &str,
        body: Vec<u8>,
        deadline: Instant,
    ) -> std::sync::mpsc::Receiver<Result<Vec<u8>, ClusterError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (shared, node) = (self.shared.clone(), node.to_owned());
        self.runtime().spawn(async move {
            let _ = tx.send(membership::ask(&*shared, &node, body, deadline).await);
        });
        rx
    }

    fn answer_with(&self, handler: PeerHandler) {
        let _ = self.shared.handler.set(handler);
    }
}

#[cfg(test)]
mod tests {
    use tiervec_shared::push::{HeldVector, ManifestStep};
    use tiervec_test_support::nats::NatsCluster;

    use super::*;
    use crate::storage::Image;

    /// The entries a log applied, by log and position.
    #[derive(Default)]
    struct Applied(Mutex<Vec<(u64, WalEntry)>>);

    impl Apply for Applied {
        fn restore(&self, _: Image) {}
        fn apply(&self, position: u64, entry: &WalEntry) {
            self.0.lock().push((position, entry.clone()));
        }
        fn image(&self) -> Image {
            Image {
                collections: Vec::new(),
                edge_caches: Vec::new(),
                models: Vec::new(),
            }
        }
        fn observe(&self, _: u64, _: &WalEntry) {}
    }

    fn step(version: u64, id: u64) -> WalEntry {
        WalEntry::EdgeStep {
            edge: "edge 1".into(),
            collection: [7; 16],
            step: ManifestStep {
                version,
                added: vec![HeldVector {
                    id,
                    lsn: 1,
                    bytes: 8,
                }],
                ..ManifestStep::default()
            },
        }
    }

    /// Around an edge's failover two nodes may both plan "version v + 1" of its cache. A node
    /// that has not applied the step another node logged cannot log its own over it (the
    /// publish expects the cache's last step it applied, and JetStream refuses a stale
    /// expectation); once it has applied that step, its next one is taken.
    #[test]
    fn a_node_behind_on_a_cache_cannot_log_a_step_over_another_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsCluster::start(dir.path(), 3);
        let config = ClusterConfig {
            nats: nats.urls(),
            prefix: "STEPS".into(),
            node: "a".into(),
            ..ClusterConfig::default()
        };
        for node in ["a", "b"] {
            std::fs::create_dir(dir.path().join(node)).unwrap();
        }
        let (a, _) = JetStreamLog::open(
            &config,
            &dir.path().join("a"),
            Arc::new(Applied::default()),
            checkpoint::CHUNK_BYTES,
        )
        .unwrap();
        let config_b = ClusterConfig {
            node: "b".into(),
            ..config
        };
        let (b, _) = JetStreamLog::open(
            &config_b,
            &dir.path().join("b"),
            Arc::new(Applied::default()),
            checkpoint::CHUNK_BYTES,
        )
        .unwrap();
        let stale = b.expected_sequence(&step(1, 1));
        assert_eq!(stale, Some(0), "b has applied no step of this cache");
        let first = a.append(step(1, 1)).unwrap().position;
        let deadline = Instant::now() + Duration::from_secs(5);
        // b, as it was before it applied a's step: refused.
        let refused = b.runtime().block_on(b.publish(
            b.shared.catalog_subject(&step(1, 2)),
            step(1, 2).encode(),
            stale,
            &[],
            deadline,
        ));
        assert!(
            matches!(refused, Err(ClusterError::Conflict(_))),
            "{refused:?}"
        );
        // b, once it has applied a's step: taken.
        assert!(b.shared.wait_applied(LogName::Catalog, first, deadline));
        assert_eq!(b.expected_sequence(&step(2, 2)), Some(first));
        let second = b.append(step(2, 2)).unwrap().position;
        assert!(second > first);
        // A reset (the edge's own account) is never refused.
        let reset = WalEntry::EdgeReset {
            edge: "edge 1".into(),
            collection: [7; 16],
            inventory: tiervec_shared::push::Inventory {
                collection_id: [7; 16],
                version: 9,
                vectors: Vec::new(),
                anchors: Vec::new(),
            },
        };
        assert_eq!(a.expected_sequence(&reset), None);
        a.append(reset).unwrap();
    }
}
