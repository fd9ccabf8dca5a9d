//! What the cloud pushes into the cache: the streams it opens (a delta, or a whole cache as a
//! streamed snapshot), each applied durably before its acknowledgement; and the resync that
//! brings the cloud's idea of the cache in line with it when a connection starts.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tiervec_shared::protocol::cache::needs_resync;
use tiervec_shared::protocol::frame::{
    DEFAULT_MAX_FRAME, Frame, FrameDecoder, PREFIX_LEN, SnapshotBegin, WireCollection,
};
use tiervec_shared::protocol::session::{ClientAction, ClientEvent, ClientSession};
use tiervec_shared::protocol::transfer::SnapshotReceiver;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::stream::exchange;
use super::tls::LinkError;
use crate::cache::EdgeCache;

/// The cache a connector lets the cloud push into.
#[derive(Clone)]
pub struct PushTarget {
    pub cache: Arc<EdgeCache>,
    /// The collection it caches, by the cloud's name.
    pub collection: String,
    /// Whether to ask the cloud for certificates with the anchors it pushes.
    pub certify: bool,
}

/// Brings the cloud's idea of the cache in line with the cache: a cache of an older
/// incarnation of the collection is emptied (files set aside), and when the cloud's manifest
/// version is not the cache's, the cache's inventory is sent and the cloud adopts it.
pub(super) async fn resync(
    conn: &quinn::Connection,
    session: &Mutex<ClientSession>,
    target: &PushTarget,
    collections: &[WireCollection],
    cache_version: Option<u64>,
    started: Instant,
) -> Result<(), LinkError> {
    let Some(collection) = collections.iter().find(|c| c.name == target.collection) else {
        return Ok(());
    };
    let cache = &target.cache;
    let bound = cache.collection_id();
    if bound != [0; 16] && bound != collection.id {
        warn!(
            collection = %target.collection,
            "the cache belongs to an older incarnation of the collection; emptying it"
        );
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || {
            cache.reset("the collection was recreated in the cloud")
        })
        .await
        .map_err(|e| LinkError::Handshake(e.to_string()))?
        .map_err(|e| LinkError::Handshake(e.to_string()))?;
    }
    cache.bind(collection.id);
    let version = cache.version();
    if !needs_resync(cache.collection_id(), version, collection.id, cache_version) {
        return Ok(());
    }
    let mut inventory = cache.inventory();
    inventory.collection_id = collection.id;
    let held = inventory.vectors.len();
    let flight = session
        .lock()
        .inventory_flight(inventory)
        .map_err(|e| LinkError::Handshake(format!("resync: {e}")))?;
    // Parts go one stream each, in order: the cloud answers only the last.
    let parts = flight.len();
    for frame in flight {
        let frames = exchange(conn, &[frame])
            .await
            .map_err(|e| LinkError::Handshake(format!("resync: {}", e.message())))?;
        let now = started.elapsed().as_micros() as u64;
        for f in frames {
            for action in session.lock().handle(ClientEvent::Received(f), now) {
                match action {
                    ClientAction::InventoryAcked(v) if v == version => {
                        metrics::counter!("tiervec_edge_resyncs_total").increment(1);
                        info!(
                            version,
                            held, parts, "resynced: the cloud adopted the cache's inventory"
                        );
                        return Ok(());
                    }
                    ClientAction::Close { message, .. } => {
                        return Err(LinkError::Handshake(format!("resync refused: {message}")));
                    }
                    _ => {}
                }
            }
        }
    }
    Err(LinkError::Handshake(
        "the cloud did not acknowledge the cache inventory".into(),
    ))
}

/// Serves the streams the cloud opens: each carries one delta, or a whole cache as a
/// snapshot file, applied (durably) before its acknowledgement is written back. Streams are
/// read as they arrive: a snapshot goes to a file chunk by chunk, checked by a
/// `SnapshotReceiver`, never held whole in memory. A delta or snapshot that cannot be applied
/// closes the connection; the next one resyncs by inventory.
pub(super) async fn accept_pushes(
    conn: quinn::Connection,
    session: Arc<Mutex<ClientSession>>,
    target: PushTarget,
    connection: u64,
    started: Instant,
) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let received = match receive_push(&mut recv, &session, &target, started).await {
            Ok(received) => received,
            Err(PushRefusal::Stream(e)) => {
                debug!(error = %e, "push stream failed");
                continue;
            }
            Err(PushRefusal::Frame(e)) => {
                metrics::counter!("tiervec_edge_link_refused_total", "reason" => e.code().label())
                    .increment(1);
                warn!(error = %e, "refusing what the cloud pushed; closing the link");
                conn.close(
                    quinn::VarInt::from_u32(e.code() as u32),
                    e.to_string().as_bytes(),
                );
                return;
            }
            Err(PushRefusal::Snapshot(e)) => {
                warn!(error = %e, "cannot take the snapshot the cloud streamed; resyncing");
                conn.close(quinn::VarInt::from_u32(0), b"snapshot refused; resync");
                return;
            }
        };
        let mut acks = Vec::new();
        for push in received {
            let cache = target.cache.clone();
            let applied = tokio::task::spawn_blocking(move || match push {
                Received::Delta(delta) => cache.apply(&delta, connection).map(|_| delta.version),
                Received::Snapshot(begin, path) => cache.install_snapshot(&path, &begin),
            })
            .await;
            match applied {
                Ok(Ok(version)) => Frame::DeltaAck(version).encode(&mut acks),
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot apply a push; resyncing");
                    conn.close(quinn::VarInt::from_u32(0), b"push not applicable; resync");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "applying a push panicked");
                    conn.close(quinn::VarInt::from_u32(0), b"push application failed");
                    return;
                }
            }
        }
        let _ = send.write_all(&acks).await;
        let _ = send.finish();
        if target.cache.wants_compaction() {
            target
                .cache
                .compact_in_background(tokio::runtime::Handle::current());
        }
    }
}

/// What one push stream carried, ready to apply.
enum Received {
    Delta(tiervec_shared::push::Delta),
    /// A snapshot file, complete and checksummed at this path (beside the cache's snapshot).
    Snapshot(SnapshotBegin, std::path::PathBuf),
}

/// Why a push stream was not taken.
enum PushRefusal {
    /// The stream broke (the cloud gave up on it); the connection may go on.
    Stream(String),
    /// Bytes that are not frames: the connection is closed with the code.
    Frame(tiervec_shared::protocol::frame::FrameError),
    /// A snapshot stream that is too large, inconsistent, or could not be written.
    Snapshot(String),
}

/// A snapshot being received: its checks and the file it goes to.
struct Incoming {
    receiver: SnapshotReceiver,
    file: tokio::fs::File,
    path: std::path::PathBuf,
}

/// Reads one push stream to its end, frame by frame; the file of a snapshot it refuses is
/// removed.
async fn receive_push(
    recv: &mut quinn::RecvStream,
    session: &Mutex<ClientSession>,
    target: &PushTarget,
    started: Instant,
) -> Result<Vec<Received>, PushRefusal> {
    let mut incoming: Option<Incoming> = None;
    let outcome = read_push(recv, session, target, started, &mut incoming).await;
    if outcome.is_err()
        && let Some(Incoming { file, path, .. }) = incoming
    {
        drop(file);
        let _ = tokio::fs::remove_file(&path).await;
    }
    outcome
}

async fn read_push(
    recv: &mut quinn::RecvStream,
    session: &Mutex<ClientSession>,
    target: &PushTarget,
    started: Instant,
    incoming: &mut Option<Incoming>,
) -> Result<Vec<Received>, PushRefusal> {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut received = Vec::new();
    let snapshot_err = |e: std::io::Error| PushRefusal::Snapshot(e.to_string());
    while let Some(chunk) = recv
        .read_chunk(DEFAULT_MAX_FRAME + PREFIX_LEN, true)
        .await
        .map_err(|e| PushRefusal::Stream(e.to_string()))?
    {
        metrics::counter!("tiervec_edge_push_bytes_total").increment(chunk.bytes.len() as u64);
        decoder.push(&chunk.bytes).map_err(PushRefusal::Frame)?;
        while let Some(frame) = decoder.next_frame().map_err(PushRefusal::Frame)? {
            let now = started.elapsed().as_micros() as u64;
            let actions = session.lock().handle(ClientEvent::Received(frame), now);
            for action in actions {
                match action {
                    ClientAction::ApplyDelta(d) => received.push(Received::Delta(d)),
                    ClientAction::SnapshotBegin(begin) => {
                        if incoming.is_some() {
                            return Err(PushRefusal::Snapshot(
                                "a second snapshot on one stream".into(),
                            ));
                        }
                        // The file holds vectors, graph and quantised codes of at most the
                        // budget's worth of vectors: a generous multiple of it, never more.
                        let max = target.cache.config().budget_bytes.saturating_mul(4) + (16 << 20);
                        let receiver = SnapshotReceiver::new(begin, max)
                            .map_err(|e| PushRefusal::Snapshot(e.to_string()))?;
                        let path = target.cache.new_incoming_path().map_err(snapshot_err)?;
                        let file = tokio::fs::File::create(&path).await.map_err(snapshot_err)?;
                        *incoming = Some(Incoming {
                            receiver,
                            file,
                            path,
                        });
                    }
                    ClientAction::SnapshotChunk(bytes) => {
                        let Some(Incoming { receiver, file, .. }) = incoming.as_mut() else {
                            return Err(PushRefusal::Snapshot(
                                "snapshot bytes without a snapshot head".into(),
                            ));
                        };
                        receiver
                            .chunk(&bytes)
                            .map_err(|e| PushRefusal::Snapshot(e.to_string()))?;
                        file.write_all(&bytes).await.map_err(snapshot_err)?;
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(Incoming { receiver, file, .. }) = incoming.as_mut() {
        file.flush().await.map_err(snapshot_err)?;
        let begin = *receiver.begin();
        receiver
            .check_complete()
            .map_err(|e| PushRefusal::Snapshot(e.to_string()))?;
        if let Some(Incoming { path, .. }) = incoming.take() {
            received.push(Received::Snapshot(begin, path));
        }
    }
    Ok(received)
}
