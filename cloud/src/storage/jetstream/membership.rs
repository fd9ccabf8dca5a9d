//! Who is alive, where shards live, and requests between nodes, on NATS.
//!
//! * `P_NODES` (KV bucket, values expire after `node_timeout_ms`): each node puts its
//!   [`Heartbeat`] every `heartbeat_ms` under its name in hex. A node is alive while its last
//!   heartbeat arrived here less than `node_timeout_ms` ago.
//! * `P_PLACEMENT` (KV bucket): under `<identity in hex>.<shard>` the nodes that should hold
//!   the shard ([`Placed`]), written with compare-and-set from [`placement::place`] over the
//!   live nodes by the live node of lowest name (and by the node that logs a create, for the
//!   new collection's shards): every node computes the same placement from the same live set,
//!   and compare-and-set keeps two writers with different views from losing each other's
//!   updates. A node follows the shards placed on it as soon as it sees the placement.
//! * `P.node.<name in hex>.rpc`: each node answers the requests other nodes send it (the
//!   service's fan-out) with the handler the service set.
//!
//! Both buckets are followed with KV watchers into a [`View`], so reading membership or
//! placement costs no request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use async_nats::jetstream;

use super::config::ClusterConfig;
use super::peer::PeerEndpoint;
use super::placement::{self, MAX_SHARDS, ShardKey};
use crate::storage::contract::ClusterError;

/// Bytes of a message besides its body (headers), kept free under the servers' `max_payload`.
pub(super) const HEADER_ROOM: usize = 512;

/// The first wait before a failed publish or follower is retried; it doubles up to a second.
pub(super) const RETRY_FIRST: Duration = Duration::from_millis(20);

/// What membership needs of the node it runs for (the replicated store's shared state).
pub(super) trait Member: Send + Sync + 'static {
    fn config(&self) -> &ClusterConfig;
    fn client(&self) -> &async_nats::Client;
    fn js(&self) -> &jetstream::Context;
    fn view(&self) -> &View;
    /// The shards this node holds caught up.
    fn ready(&self) -> Vec<ShardKey>;
    /// Every live collection's identity and shard count.
    fn layouts(&self) -> Vec<([u8; 16], u32)>;
    /// Starts following a shard placed on this node (once).
    fn follow(self: Arc<Self>, key: ShardKey);
    /// The shards this node holds a copy of.
    fn held(&self) -> Vec<ShardKey>;
    /// Stops following a shard and drops this node's copy of it.
    fn release(self: &Arc<Self>, key: ShardKey);
    /// Answers another node's request; `None` while the service has not set its handler.
    fn handle(&self, body: &[u8]) -> Option<Vec<u8>>;
    /// This node's QUIC endpoint for other nodes, when `cluster.peer_addr` is set.
    fn peer_endpoint(&self) -> Option<&PeerEndpoint>;
}

pub(super) fn hex(id: &[u8; 16]) -> String {
    hex_bytes(id)
}

/// Lower-case hex: any bytes as one subject token (edge names may hold `.` or spaces).
pub(super) fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a node announces: its name and the shards it holds caught up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Heartbeat {
    pub node: String,
    /// (collection identity in hex, shard).
    pub ready: Vec<(String, u32)>,
    /// Where the node takes requests over QUIC (absent: over NATS only).
    #[serde(default)]
    pub peer: Option<SocketAddr>,
}

/// The nodes that should hold one shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Placed {
    nodes: Vec<String>,
}

/// The header of a reply that is an error rather than an answer.
const ERROR_HEADER: &str = "Tiervec-Error";

/// Membership and placement as the watchers last saw them.
#[derive(Default)]
pub(super) struct View {
    /// Node → its last heartbeat and when it arrived here.
    nodes: Mutex<HashMap<String, (Heartbeat, Instant)>>,
    /// Shard → its placed nodes and the KV revision of that placement.
    placement: Mutex<HashMap<ShardKey, (Vec<String>, u64)>>,
    buckets: std::sync::OnceLock<(kv::Store, kv::Store)>,
    /// Whether the placement watcher has read every placement the bucket held when it began.
    placement_read: std::sync::atomic::AtomicBool,
    /// Nodes whose QUIC request failed, and when: asked over NATS until a heartbeat of theirs
    /// arrives later (NATS answers at once for a node that is gone, where QUIC waits).
    suspects: Mutex<HashMap<String, Instant>>,
}

impl View {
    /// Where `node` takes requests over QUIC, as its last heartbeat said; none while the node
    /// is suspected (see [`View::suspect`]).
    pub fn peer_addr(&self, node: &str) -> Option<SocketAddr> {
        let suspected = self.suspects.lock().get(node).copied();
        self.nodes
            .lock()
            .get(node)
            .filter(|(_, heard)| suspected.is_none_or(|at| *heard > at))
            .and_then(|(beat, _)| beat.peer)
    }

    /// Marks `node` suspected: its QUIC request failed.
    pub fn suspect(&self, node: &str) {
        self.suspects.lock().insert(node.to_owned(), Instant::now());
    }

    /// The nodes heard from within `timeout`, by name.
    pub fn live(&self, timeout: Duration) -> Vec<String> {
        let mut live: Vec<String> = self
            .nodes
            .lock()
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < timeout)
            .map(|(n, _)| n.clone())
            .collect();
        live.sort();
        live
    }

    /// Other live nodes that may answer shards of `collection`: those they announce caught
    /// up, then those placed on them (a newly placed replica may have caught up since its
    /// last heartbeat; it says which it holds when it answers).
    pub fn candidates(
        &self,
        collection: [u8; 16],
        me: &str,
        timeout: Duration,
    ) -> Vec<(String, Vec<u32>)> {
        let id = hex(&collection);
        let live = self.live(timeout);
        let placement = self.placement.lock();
        let nodes = self.nodes.lock();
        live.into_iter()
            .filter(|n| n != me)
            .filter_map(|n| {
                let mut shards: Vec<u32> = nodes
                    .get(&n)
                    .map(|(h, _)| {
                        h.ready
                            .iter()
                            .filter(|(c, _)| *c == id)
                            .map(|(_, s)| *s)
                            .collect()
                    })
                    .unwrap_or_default();
                for ((c, s), (placed, _)) in placement.iter() {
                    if *c == collection && placed.contains(&n) && !shards.contains(s) {
                        shards.push(*s);
                    }
                }
                (!shards.is_empty()).then_some((n, shards))
            })
            .collect()
    }

    /// Whether `node` was heard from within `timeout` announcing shard `key` caught up.
    pub fn ready_on(&self, node: &str, (id, shard): ShardKey, timeout: Duration) -> bool {
        let id = hex(&id);
        self.nodes.lock().get(node).is_some_and(|(beat, at)| {
            at.elapsed() < timeout && beat.ready.iter().any(|(c, s)| *c == id && *s == shard)
        })
    }

    /// Whether some live node has a shard placed on it that it does not announce caught up yet
    /// (it is replaying that shard's stream).
    pub fn catching_up(&self, timeout: Duration) -> bool {
        let live = self.live(timeout);
        let placement = self.placement.lock();
        placement.iter().any(|(key, (placed, _))| {
            placed
                .iter()
                .any(|node| live.contains(node) && !self.ready_on(node, *key, timeout))
        })
    }

    /// Whether `node` is the first of those shard `key` is placed on.
    pub fn first_placed(&self, key: ShardKey, node: &str) -> bool {
        self.placement
            .lock()
            .get(&key)
            .and_then(|(nodes, _)| nodes.first())
            .is_some_and(|first| first == node)
    }

    /// The nodes shard `key` is placed on, first first.
    pub fn placed(&self, key: ShardKey) -> Vec<String> {
        self.placement
            .lock()
            .get(&key)
            .map(|(nodes, _)| nodes.clone())
            .unwrap_or_default()
    }

    /// Whether the placements the bucket held at start are known here.
    pub fn placement_read(&self) -> bool {
        self.placement_read
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn buckets(&self) -> Option<&(kv::Store, kv::Store)> {
        self.buckets.get()
    }
}

pub(super) fn placement_key((id, shard): ShardKey) -> String {
    format!("{}.{shard}", hex(&id))
}

fn parse_placement_key(key: &str) -> Option<ShardKey> {
    let (id, shard) = key.split_once('.')?;
    let bytes: Vec<u8> = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(id.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    Some((bytes.try_into().ok()?, shard.parse().ok()?))
}

/// Creates (or opens) the two buckets.
pub(super) async fn open_buckets(shared: &impl Member) -> Result<(), ClusterError> {
    let p = &shared.config().prefix;
    let replicas = shared.config().stream_replicas();
    let nodes = shared
        .js()
        .create_key_value(kv::Config {
            bucket: format!("{p}_NODES"),
            history: 1,
            max_age: Duration::from_millis(shared.config().node_timeout_ms),
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| ClusterError::Connect(format!("bucket {p}_NODES: {e}")))?;
    let placement = shared
        .js()
        .create_key_value(kv::Config {
            bucket: format!("{p}_PLACEMENT"),
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| ClusterError::Connect(format!("bucket {p}_PLACEMENT: {e}")))?;
    let _ = shared.view().buckets.set((nodes, placement));
    Ok(())
}

/// Starts the watchers, the heartbeat and the request responder.
pub(super) fn start<S: Member>(shared: &Arc<S>) {
    tokio::spawn(keep(shared.clone(), "node watcher", watch_nodes));
    tokio::spawn(keep(shared.clone(), "placement watcher", watch_placement));
    tokio::spawn(keep(shared.clone(), "heartbeat", heartbeat));
    tokio::spawn(keep(shared.clone(), "request responder", respond));
}

/// Runs `task` for good, starting it again (after a growing wait) whenever it fails.
async fn keep<S: Member, F, Fut>(shared: Arc<S>, what: &'static str, task: F)
where
    F: Fn(Arc<S>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut wait = RETRY_FIRST;
    loop {
        if let Err(e) = task(shared.clone()).await {
            warn!(what, error = %e, "cluster task restarts");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

async fn watch_nodes<S: Member>(shared: Arc<S>) -> Result<(), String> {
    let (nodes, _) = shared.view().buckets().ok_or("no buckets")?;
    let mut watch = nodes
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.operation != kv::Operation::Put {
            continue;
        }
        match serde_json::from_slice::<Heartbeat>(&entry.value) {
            Ok(beat) => {
                let mut map = shared.view().nodes.lock();
                if !map.contains_key(&beat.node) {
                    info!(node = %beat.node, "cloud node joined");
                }
                map.insert(beat.node.clone(), (beat, Instant::now()));
            }
            Err(e) => debug!(key = entry.key, error = %e, "not a heartbeat"),
        }
    }
    Err("the node watcher ended".into())
}

async fn watch_placement<S: Member>(shared: Arc<S>) -> Result<(), String> {
    let (_, placement) = shared.view().buckets().ok_or("no buckets")?;
    let mut watch = placement
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    // An empty bucket delivers nothing: it is read as soon as it is known to be empty.
    let held = placement
        .status()
        .await
        .map_err(|e| e.to_string())?
        .values();
    if held == 0 {
        shared
            .view()
            .placement_read
            .store(true, std::sync::atomic::Ordering::Release);
    }
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.delta == 0 {
            shared
                .view()
                .placement_read
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let Some(key) = parse_placement_key(&entry.key) else {
            continue;
        };
        if entry.operation != kv::Operation::Put {
            shared.view().placement.lock().remove(&key);
            continue;
        }
        let Ok(placed) = serde_json::from_slice::<Placed>(&entry.value) else {
            continue;
        };
        if placed.nodes.contains(&shared.config().node) {
            shared.clone().follow(key);
        }
        shared
            .view()
            .placement
            .lock()
            .insert(key, (placed.nodes, entry.revision));
    }
    Err("the placement watcher ended".into())
}

/// Announces this node, then (on the live node of lowest name) places every shard.
async fn heartbeat<S: Member>(shared: Arc<S>) -> Result<(), String> {
    let (nodes, _) = shared.view().buckets().ok_or("no buckets")?;
    let key = hex_bytes(shared.config().node.as_bytes());
    let mut ticks = tokio::time::interval(Duration::from_millis(shared.config().heartbeat_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_millis(shared.config().node_timeout_ms);
    // A failed put ends this task (it restarts): while the bucket could not be written, no
    // node's heartbeat arrived, so who looks dead is only known again once heartbeats have
    // flowed for a node timeout. Until then nothing is placed or released — a NATS server
    // restarting would otherwise make every node place every shard on itself alone.
    let beating_since = Instant::now();
    loop {
        ticks.tick().await;
        nodes
            .put(&key, announce(&*shared).into())
            .await
            .map_err(|e| e.to_string())?;
        if beating_since.elapsed() < timeout {
            continue;
        }
        release_moved(&shared, timeout);
        let live = shared.view().live(timeout);
        if live.first() == Some(&shared.config().node) {
            for (id, shards) in shared.layouts() {
                place_collection(&shared, id, shards, &live).await;
            }
            forget_dropped(&*shared).await;
        }
    }
}

/// Releases the shards this node holds that are placed elsewhere now, once every node they
/// are placed on announces them caught up: a joining node takes its share, and the node it
/// took it from frees the memory (before that, both answer for it); a node back with a
/// checkpoint frees the shards placed elsewhere while it was away. Nothing is released while
/// any node still catches up a shard: dropping a copy tombstones its points, and the graph
/// rebuild that follows would take the cores that node replays on.
fn release_moved<S: Member>(shared: &Arc<S>, timeout: Duration) {
    if shared.view().catching_up(timeout) {
        return;
    }
    let me = &shared.config().node;
    for key in shared.held() {
        let placed = shared.view().placed(key);
        if placed.is_empty() || placed.contains(me) {
            continue;
        }
        if placed
            .iter()
            .all(|node| shared.view().ready_on(node, key, timeout))
        {
            shared.release(key);
        }
    }
}

/// This node's heartbeat, as JSON.
pub(super) fn announce(shared: &impl Member) -> Vec<u8> {
    let beat = Heartbeat {
        node: shared.config().node.clone(),
        ready: shared
            .ready()
            .into_iter()
            .map(|(id, s)| (hex(&id), s))
            .collect(),
        peer: shared.peer_endpoint().and_then(PeerEndpoint::local_addr),
    };
    serde_json::to_vec(&beat).expect("a heartbeat serialises")
}

/// Writes the placement of each shard of a collection where it differs from what
/// [`placement::place`] gives over `live` (compare-and-set; a lost race is settled at the
/// next heartbeat).
pub(super) async fn place_collection<S: Member>(
    shared: &Arc<S>,
    id: [u8; 16],
    shards: u32,
    live: &[String],
) {
    let Some((_, bucket)) = shared.view().buckets() else {
        return;
    };
    let placed = placement::place(
        &id,
        shards.min(MAX_SHARDS),
        live,
        shared.config().replication,
    );
    for (shard, wanted) in (0..).zip(placed) {
        let key = (id, shard);
        let current = shared.view().placement.lock().get(&key).cloned();
        if wanted.is_empty() || current.as_ref().is_some_and(|(nodes, _)| *nodes == wanted) {
            continue;
        }
        let value = serde_json::to_vec(&Placed {
            nodes: wanted.clone(),
        })
        .expect("a placement serialises");
        let written = match &current {
            Some((_, revision)) => bucket
                .update(placement_key(key), value.into(), *revision)
                .await
                .map_err(|e| e.to_string()),
            None => bucket
                .create(placement_key(key), value.into())
                .await
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(revision) => {
                info!(collection = %hex(&id), shard, nodes = ?wanted, "shard placed");
                // Seen at once here; the watcher brings the same value.
                shared
                    .view()
                    .placement
                    .lock()
                    .insert(key, (wanted.clone(), revision));
                if wanted.contains(&shared.config().node) {
                    shared.clone().follow(key);
                }
            }
            Err(e) => {
                debug!(collection = %hex(&id), shard, error = e, "placement changed meanwhile")
            }
        }
    }
}

/// Removes the placements of collections dropped since.
async fn forget_dropped(shared: &impl Member) {
    let Some((_, bucket)) = shared.view().buckets() else {
        return;
    };
    let gone: Vec<ShardKey> = {
        let layouts: HashMap<[u8; 16], u32> = shared.layouts().into_iter().collect();
        shared
            .view()
            .placement
            .lock()
            .keys()
            .filter(|(id, _)| !layouts.contains_key(id))
            .copied()
            .collect()
    };
    for key in gone {
        if bucket.purge(placement_key(key)).await.is_ok() {
            shared.view().placement.lock().remove(&key);
        }
    }
}

fn rpc_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.node.{}.rpc", hex_bytes(node.as_bytes()))
}

/// Answers other nodes' requests with the service's handler, each on a blocking thread.
async fn respond<S: Member>(shared: Arc<S>) -> Result<(), String> {
    let subject = rpc_subject(&shared.config().prefix, &shared.config().node);
    let mut requests = shared
        .client()
        .subscribe(subject)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(request) = requests.next().await {
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let handling = shared.clone();
            let answer =
                tokio::task::spawn_blocking(move || handling.handle(&request.payload)).await;
            let max = shared.client().server_info().max_payload;
            let mut headers = async_nats::HeaderMap::new();
            let body = match answer {
                Ok(Some(body)) if body.len() + HEADER_ROOM <= max => body,
                Ok(Some(body)) => {
                    headers.insert(
                        ERROR_HEADER,
                        format!(
                            "an answer of {} bytes is over the servers' max_payload of {max}",
                            body.len()
                        )
                        .as_str(),
                    );
                    Vec::new()
                }
                Ok(None) => {
                    headers.insert(ERROR_HEADER, "the node is still starting");
                    Vec::new()
                }
                Err(e) => {
                    headers.insert(ERROR_HEADER, format!("the handler failed: {e}").as_str());
                    Vec::new()
                }
            };
            if let Err(e) = shared
                .client()
                .publish_with_headers(reply, headers, body.into())
                .await
            {
                debug!(error = %e, "a reply was not sent");
            }
        });
    }
    Err("the request subscription ended".into())
}

/// Sends one request to `node`; its answer or why there is none.
pub(super) async fn ask(
    shared: &impl Member,
    node: &str,
    body: Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, ClusterError> {
    if let (Some(endpoint), Some(addr)) = (shared.peer_endpoint(), shared.view().peer_addr(node)) {
        match endpoint.ask(addr, &body, deadline).await {
            Ok(answer) => {
                metrics::counter!("tiervec_cluster_peer_requests_total", "path" => "quic")
                    .increment(1);
                return Ok(answer);
            }
            // The link failed, or the node refused: NATS while time is left, and for the
            // node's next requests until it is heard from again.
            Err(e) if Instant::now() < deadline => {
                shared.view().suspect(node);
                debug!(node, error = %e, "QUIC to the node failed; asking over NATS");
            }
            Err(e) => {
                shared.view().suspect(node);
                return Err(e);
            }
        }
    }
    metrics::counter!("tiervec_cluster_peer_requests_total", "path" => "nats").increment(1);
    let subject = rpc_subject(&shared.config().prefix, node);
    let asked = shared.client().request(subject, body.into());
    match tokio::time::timeout_at(deadline.into(), asked).await {
        Err(_) => Err(ClusterError::Unavailable(format!(
            "node `{node}` did not answer in time"
        ))),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(
            ClusterError::Unavailable(format!("node `{node}` is not connected")),
        ),
        Ok(Err(e)) => Err(ClusterError::Unavailable(format!(
            "asking node `{node}`: {e}"
        ))),
        Ok(Ok(answer)) => match answer.headers.as_ref().and_then(|h| h.get(ERROR_HEADER)) {
            Some(why) => Err(ClusterError::Unavailable(format!(
                "node `{node}`: {}",
                why.as_str()
            ))),
            None => Ok(answer.payload.to_vec()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_keys_round_trip() {
        let key = ([0xab; 16], 17);
        assert_eq!(parse_placement_key(&placement_key(key)), Some(key));
        assert_eq!(parse_placement_key("zz.1"), None);
        assert_eq!(parse_placement_key("abab.1"), None);
    }

    fn beat(view: &View, node: &str, ready: &[ShardKey]) {
        let beat = Heartbeat {
            node: node.to_owned(),
            ready: ready.iter().map(|(c, s)| (hex(c), *s)).collect(),
            peer: None,
        };
        view.nodes
            .lock()
            .insert(node.to_owned(), (beat, Instant::now()));
    }

    #[test]
    fn a_live_node_without_a_placed_shard_ready_is_catching_up() {
        let view = View::default();
        let (a, b) = (([1; 16], 0), ([1; 16], 1));
        view.placement
            .lock()
            .insert(a, (vec!["n0".into(), "n1".into()], 1));
        view.placement
            .lock()
            .insert(b, (vec!["n1".into(), "n2".into()], 1));
        let timeout = Duration::from_secs(5);
        beat(&view, "n0", &[a]);
        beat(&view, "n1", &[a, b]);
        // n2 is not heard from: a dead node's placement is not a catch-up.
        assert!(!view.catching_up(timeout));
        beat(&view, "n2", &[]);
        assert!(view.catching_up(timeout));
        beat(&view, "n2", &[b]);
        assert!(!view.catching_up(timeout));
    }
}
