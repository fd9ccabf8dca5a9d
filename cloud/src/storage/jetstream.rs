//! The replicated store: the logs of a cloud cluster kept as NATS JetStream streams (see
//! `docs/cluster.md`). A [`DurableLog`] whose append publishes to the entry's stream and whose
//! state follows every stream, so each node holds every collection and answers on its own.
//!
//! Streams and subjects (`P` is [`ClusterConfig::prefix`]):
//! * `P_CATALOG`, subjects `P.catalog.>`: creates and drops on `P.catalog.name.<name>`, the
//!   steps and resets of one edge's cache of one collection on
//!   `P.catalog.edge.<edge name in hex>.<identity in hex>`;
//! * `P_SHARD_<identity in hex>`, subject `P.shard.<identity in hex>`: one collection's upserts
//!   and deletes, created (by whichever node logs the create) before the create is published.
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
//! own account of its cache) is published unconditionally. Every publish carries a fresh `Nats-Msg-Id`, and one
//! that timed out is retried with the same id, so JetStream keeps a retried entry once.
//!
//! An append returns after JetStream's acknowledgement (the stream's quorum holds the entry)
//! *and* after this node's follower applied it, so a write is visible on the node that
//! acknowledged it; other nodes apply it when their followers reach it. A follower is a
//! JetStream ordered consumer from the position after the last one applied; it recreates
//! itself after a gap or a lost server, so it applies each entry once, in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context, stream};
use futures::StreamExt;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use super::contract::{Apply, Checkpointed, ClusterError, DurableLog, StorageError};
use super::embedded::StartReport;
use super::entry::{LogName, WalEntry};

/// Where the cluster's NATS servers are and how this cloud uses them (`[cluster]` in
/// `tiervec-cloud serve`'s configuration; without it the cloud runs on its embedded WAL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`) of the JetStream cluster; the client fails over
    /// between them.
    pub nats: Vec<String>,
    /// Prefix of every stream and subject of this cloud (1–32 of `[A-Za-z0-9_-]`), so that
    /// several clouds may share one NATS cluster.
    pub prefix: String,
    /// Replicas of each stream (JetStream's R, 1–5); 0 chooses three when at least three
    /// servers are listed, else one.
    pub replicas: usize,
    /// How long an append waits for JetStream's acknowledgement and the local apply, retries
    /// included, before it answers "unavailable".
    pub append_timeout_ms: u64,
    /// How long start-up waits to apply every stream up to the position it had at start.
    pub recovery_timeout_secs: u64,
    /// NATS user and password, when the servers require them.
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            prefix: "TIERVEC".into(),
            replicas: 0,
            append_timeout_ms: 5_000,
            recovery_timeout_secs: 600,
            user: None,
            password: None,
        }
    }
}

impl ClusterConfig {
    /// The replicas each stream gets.
    pub fn stream_replicas(&self) -> usize {
        match self.replicas {
            0 if self.nats.len() >= 3 => 3,
            0 => 1,
            r => r,
        }
    }
}

/// Bytes of a published message besides its body (headers: the message id, the expected
/// sequence), kept free under the servers' `max_payload`.
const HEADER_ROOM: usize = 512;

/// The first wait before a failed publish or follower is retried; it doubles up to a second.
const RETRY_FIRST: Duration = Duration::from_millis(20);

/// The logs of a cloud cluster on NATS JetStream.
pub struct JetStreamLog {
    shared: Arc<Shared>,
    /// The NATS client's and the followers' runtime (one thread: they do little but wait).
    runtime: Option<tokio::runtime::Runtime>,
}

/// What the appending threads and the followers share.
struct Shared {
    config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    state: Arc<dyn Apply>,
    /// The last position applied, per log.
    applied: Mutex<HashMap<LogName, u64>>,
    advanced: Condvar,
    /// Per collection name, the catalog sequence of its last create or drop applied here.
    name_sequences: Mutex<HashMap<String, u64>>,
    /// Per (edge, collection identity), the catalog sequence of the last step or reset of
    /// that edge's cache applied here.
    cache_sequences: Mutex<HashMap<(String, [u8; 16]), u64>>,
    /// The shard followers started, by collection identity, with the position their stream
    /// had when they started, once they know it (what start-up waits for).
    followers: Mutex<HashMap<[u8; 16], Option<u64>>>,
    acknowledged: AtomicU64,
    replayed: AtomicU64,
    /// Held by the one caller catching up with the catalog (the others do not wait).
    catching_up: Mutex<()>,
}

fn hex(id: &[u8; 16]) -> String {
    hex_bytes(id)
}

/// Lower-case hex: any bytes as one subject token (edge names may hold `.` or spaces).
fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Shared {
    fn catalog_stream(&self) -> String {
        format!("{}_CATALOG", self.config.prefix)
    }

    fn shard_stream(&self, id: &[u8; 16]) -> String {
        format!("{}_SHARD_{}", self.config.prefix, hex(id))
    }

    fn name_subject(&self, name: &str) -> String {
        format!("{}.catalog.name.{name}", self.config.prefix)
    }

    fn subject(&self, entry: &WalEntry) -> String {
        let p = &self.config.prefix;
        match entry {
            WalEntry::CreateCollection { name, .. } | WalEntry::DropCollection { name, .. } => {
                self.name_subject(name)
            }
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
            WalEntry::Upsert { collection, .. } | WalEntry::Delete { collection, .. } => {
                format!("{p}.shard.{}", hex(collection))
            }
        }
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

    /// Applies the entry at `position` of `log` (once: a position at or below the last
    /// applied is skipped) and starts following the shard of a collection it creates.
    fn apply(self: &Arc<Self>, log: LogName, position: u64, subject: &str, body: &[u8]) {
        if position <= self.applied(log) {
            return;
        }
        match WalEntry::decode(body) {
            Ok(entry) => {
                self.state.apply(position, &entry);
                match &entry {
                    WalEntry::CreateCollection { name, id, .. } => {
                        self.name_sequences.lock().insert(name.clone(), position);
                        self.follow_shard(*id);
                    }
                    WalEntry::DropCollection { name, .. } => {
                        self.name_sequences.lock().insert(name.clone(), position);
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
                    WalEntry::Upsert { .. } | WalEntry::Delete { .. } => {}
                }
            }
            // A body no tiervec wrote: skipped loudly, never a stop of the follower.
            Err(e) => error!(?log, position, subject, error = %e, "undecodable entry skipped"),
        }
        self.replayed.fetch_add(1, Ordering::Relaxed);
        self.applied.lock().insert(log, position);
        self.advanced.notify_all();
    }

    fn follow_shard(self: &Arc<Self>, id: [u8; 16]) {
        let mut followers = self.followers.lock();
        if followers.contains_key(&id) {
            return;
        }
        followers.insert(id, None);
        drop(followers);
        let shared = self.clone();
        tokio::spawn(async move {
            let stream = shared.shard_stream(&id);
            follow(shared, LogName::Shard(id), stream).await
        });
    }
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
    let mut stream = match shared.js.get_stream(name).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            debug!(stream = name, error = %e, "stream gone: its collection was dropped");
            if let LogName::Shard(id) = log {
                shared.followers.lock().insert(id, Some(0));
            }
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    };
    if let LogName::Shard(id) = log {
        let last = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        shared.followers.lock().insert(id, Some(last));
    }
    let from = shared.applied(log) + 1;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let info = message.info().map_err(|e| e.to_string())?;
        let (position, pending) = (info.stream_sequence, info.pending);
        // Entries of this stream not yet delivered here: how far this replica trails.
        metrics::gauge!("tiervec_cluster_replica_lag_entries", "stream" => name.to_owned())
            .set(pending as f64);
        shared.apply(log, position, message.subject.as_str(), &message.payload);
    }
    Err("the consumer's messages ended".into())
}

fn check_prefix(prefix: &str) -> Result<(), ClusterError> {
    let ok = (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Config(format!(
            "prefix `{prefix}` must be 1 to 32 characters of A-Z, a-z, 0-9, _ and -"
        )))
    }
}

impl JetStreamLog {
    /// Connects to the cluster, creates the catalog stream if it does not exist, and applies
    /// every stream to `state` up to the position it has now (a fresh node replays all; there
    /// are no local checkpoints yet), then keeps following them.
    pub fn open(
        config: &ClusterConfig,
        state: Arc<dyn Apply>,
    ) -> Result<(JetStreamLog, StartReport), StorageError> {
        let started = Instant::now();
        check_prefix(&config.prefix)?;
        if config.nats.is_empty() {
            return Err(
                ClusterError::Config("no NATS server listed (`cluster.nats`)".into()).into(),
            );
        }
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
            let shared = Arc::new(Shared {
                config: config.clone(),
                client,
                js,
                state,
                applied: Mutex::new(HashMap::new()),
                advanced: Condvar::new(),
                name_sequences: Mutex::new(HashMap::new()),
                cache_sequences: Mutex::new(HashMap::new()),
                followers: Mutex::new(HashMap::new()),
                acknowledged: AtomicU64::new(0),
                replayed: AtomicU64::new(0),
                catching_up: Mutex::new(()),
            });
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
            tokio::spawn(follow(shared.clone(), LogName::Catalog, catalog));
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
        // Each shard follower records its stream's position when it starts (0 for a stream
        // that is gone).
        loop {
            let pending = shared
                .followers
                .lock()
                .iter()
                .filter(|(id, target)| {
                    target.is_none_or(|t| shared.applied(LogName::Shard(**id)) < t)
                })
                .count();
            if pending == 0 {
                break;
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
        let mut report = StartReport {
            seconds,
            ..StartReport::default()
        };
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

    async fn publish(
        &self,
        entry: &WalEntry,
        expected: Option<u64>,
        deadline: Instant,
    ) -> Result<u64, ClusterError> {
        let shared = &self.shared;
        let body = entry.encode();
        let max = shared.client.server_info().max_payload;
        if body.len() + HEADER_ROOM > max {
            return Err(ClusterError::TooLarge {
                bytes: body.len(),
                max,
            });
        }
        if let WalEntry::CreateCollection { id, .. } = entry {
            let stream = shared.shard_stream(id);
            let subject = format!("{}.shard.{}", shared.config.prefix, hex(id));
            let config = shared.stream_config(stream.clone(), vec![subject]);
            tokio::time::timeout_at(deadline.into(), shared.js.get_or_create_stream(config))
                .await
                .map_err(|_| {
                    ClusterError::Unavailable(format!("creating stream {stream} timed out"))
                })?
                .map_err(|e| ClusterError::Unavailable(format!("stream {stream}: {e}")))?;
        }
        let subject = shared.subject(entry);
        let message_id = uuid::Uuid::new_v4().to_string();
        let body = bytes::Bytes::from(body);
        let mut wait = RETRY_FIRST;
        loop {
            let mut publish = context::Publish::build()
                .payload(body.clone())
                .message_id(&message_id);
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
                    // A refused create never became durable: its stream, made just before, goes.
                    // (A create whose acknowledgement was only lost keeps it.)
                    if let WalEntry::CreateCollection { id, .. } = entry
                        && let Err(e) = shared.js.delete_stream(shared.shard_stream(id)).await
                    {
                        warn!(error = %e, "the stream of a refused create was not deleted");
                    }
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

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("present until dropped")
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

impl DurableLog for JetStreamLog {
    fn append(&self, entry: WalEntry) -> Result<u64, StorageError> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.shared.config.append_timeout_ms);
        let log = entry.log();
        let expected = self.expected_sequence(&entry);
        let published = self
            .runtime()
            .block_on(self.publish(&entry, expected, deadline));
        let outcome = match &published {
            Ok(_) => "acknowledged",
            Err(ClusterError::Conflict(_)) => "conflict",
            Err(ClusterError::TooLarge { .. }) => "too_large",
            Err(_) => "unavailable",
        };
        metrics::counter!("tiervec_cluster_appends_total", "outcome" => outcome).increment(1);
        let position = published?;
        if !self.shared.wait_applied(log, position, deadline) {
            // Durable in the cluster, but this node has not applied it: the caller must not
            // answer as if it were visible here, and must not claim it failed either.
            return Err(ClusterError::Unavailable(format!(
                "{log:?} position {position} is durable but not yet applied on this node"
            ))
            .into());
        }
        self.shared.acknowledged.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("tiervec_cluster_append_seconds")
            .record(started.elapsed().as_secs_f64());
        if let WalEntry::DropCollection { id, .. } = &entry {
            let stream = self.shared.shard_stream(id);
            if let Err(e) = self
                .runtime()
                .block_on(self.shared.js.delete_stream(&stream))
            {
                warn!(stream, error = %e, "the dropped collection's stream was not deleted");
            }
        }
        Ok(position)
    }

    fn checkpoint(&self) -> Result<Checkpointed, StorageError> {
        Err(ClusterError::Unsupported(
            "a cluster node writes no checkpoints yet: it recovers by replaying the cluster's streams",
        )
        .into())
    }

    /// No local log grows, so no checkpoint is ever due.
    fn bytes(&self) -> u64 {
        0
    }

    fn flushes(&self) -> u64 {
        self.shared.acknowledged.load(Ordering::Relaxed)
    }

    fn wait_applied(&self, log: LogName, position: u64, within: Duration) -> bool {
        self.shared
            .wait_applied(log, position, Instant::now() + within)
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
            Ok(Ok(last)) => self.shared.wait_applied(LogName::Catalog, last, deadline),
            _ => false,
        }
    }

    fn failure(&self) -> Option<String> {
        match self.shared.client.connection_state() {
            async_nats::connection::State::Connected => None,
            state => Some(format!("NATS connection {state}")),
        }
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
            }
        }
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
            ..ClusterConfig::default()
        };
        let (a, _) = JetStreamLog::open(&config, Arc::new(Applied::default())).unwrap();
        let (b, _) = JetStreamLog::open(&config, Arc::new(Applied::default())).unwrap();
        let stale = b.expected_sequence(&step(1, 1));
        assert_eq!(stale, Some(0), "b has applied no step of this cache");
        let first = a.append(step(1, 1)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        // b, as it was before it applied a's step: refused.
        let refused = b
            .runtime()
            .block_on(b.publish(&step(1, 2), stale, deadline));
        assert!(
            matches!(refused, Err(ClusterError::Conflict(_))),
            "{refused:?}"
        );
        // b, once it has applied a's step: taken.
        assert!(b.shared.wait_applied(LogName::Catalog, first, deadline));
        assert_eq!(b.expected_sequence(&step(2, 2)), Some(first));
        let second = b.append(step(2, 2)).unwrap();
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
