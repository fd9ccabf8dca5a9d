//! The push task of one connected edge cache: a thin tokio driver of [`PushState`]. It carries
//! out the state's actions — plans on the blocking pool, steps logged through the service,
//! deltas sent on streams the cloud opens (each waits for its `DeltaAck`) — and feeds back what
//! happened, the time, and the writes routed to it. Nothing is pushed before the connection's
//! handshake is confirmed (never as 0.5-RTT data), and an edge that came back far behind its
//! logged manifest is restored whole first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use thiserror::Error;
use tiervec_shared::certificate::certifiable;
use tiervec_shared::protocol::cache::{PUSH_ACK_MAX_LEN, PushAckError, check_push_ack};
use tiervec_shared::protocol::frame::Frame;
use tiervec_shared::protocol::transfer::snapshot_frames;
use tiervec_shared::push::{Delta, Manifest};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use super::certify::{Ball, follow_certificates, invalidation, outdated};
use super::clock::now_unix_us;
use super::corpus::ServiceCorpus;
use super::hub::{CacheKey, JOB_QUEUE, Job, PushHub, Route};
use super::plan;
use super::restore::{self, RestoreError};
use super::state::{PushAction, PushState};
use crate::collection::Collection;
use crate::service::{Invalidation, ServiceError};
use crate::storage::ClusterError;

/// Why a push failed; the connection is then closed, and the edge resyncs when it reconnects.
#[derive(Debug, Error)]
pub enum PushError {
    #[error("logging the cache's step: {0}")]
    Log(#[from] ServiceError),
    #[error("building the cache's snapshot: {0}")]
    Restore(#[from] RestoreError),
    #[error("a blocking task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("opening the push stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("writing the push: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("finishing the push stream: {0}")]
    Finish(#[from] quinn::ClosedStream),
    #[error("reading the acknowledgement: {0}")]
    Read(#[from] quinn::ReadToEndError),
    #[error("no acknowledgement in time")]
    Timeout,
    #[error(transparent)]
    Ack(#[from] PushAckError),
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

/// The send priority of push streams, below the answers' (0, quinn's default).
const PUSH_STREAM_PRIORITY: i32 = -1;

/// Sends `frames` (a delta, or a snapshot's head and chunks) on a new stream and waits for the
/// acknowledgement of `version`.
async fn send_frames(
    conn: &quinn::Connection,
    frames: &[Frame],
    version: u64,
    timeout: Duration,
) -> Result<(), PushError> {
    let mut sent = 0u64;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        // Answers go first: a push is background work, and on a link whose congestion window
        // has shrunk (loss, reordering) a delta's bytes queued ahead of answers would make the
        // edge's queries miss their deadlines. (A stream already closed fails at its first
        // write, below.)
        let _ = send.set_priority(PUSH_STREAM_PRIORITY);
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.clear();
            frame.encode(&mut bytes);
            send.write_all(&bytes).await?;
            sent += bytes.len() as u64;
        }
        send.finish()?;
        Ok::<_, PushError>(recv.read_to_end(PUSH_ACK_MAX_LEN).await?)
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PushError::Timeout)??;
    metrics::counter!("tiervec_push_bytes_total").increment(sent);
    Ok(check_push_ack(&reply, version)?)
}

/// Sends a delta whose step is logged and waits for its acknowledgement; returns it as sent.
async fn send_delta(
    hub: &PushHub,
    conn: &quinn::Connection,
    key: &CacheKey,
    mut delta: Delta,
    ack_timeout: Duration,
) -> Result<Delta, PushError> {
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
    hub.acked.lock().insert(key.clone(), delta.version);
    metrics::counter!("tiervec_push_deltas_total", "kind" => kind).increment(1);
    metrics::histogram!("tiervec_push_ack_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    debug!(
        edge = key.0,
        version = delta.version,
        kind,
        vectors = delta.vectors.len(),
        anchors = delta.anchors.len(),
        tombstones = delta.tombstones.len(),
        evicted = delta.evict.len(),
        certificates = delta.certificates.len(),
        "delta acknowledged"
    );
    Ok(delta)
}

/// Restores an edge's cache whole (see [`restore`]): the snapshot of what `logged` held, at
/// the version after the one the cloud adopted from the edge's inventory, streamed, and its
/// inventory logged once the edge acknowledged it.
async fn restore_cache(
    hub: &Arc<PushHub>,
    conn: &quinn::Connection,
    edge: &str,
    collection: &Arc<Collection>,
    logged: Manifest,
    budget: u64,
    ack_timeout: Duration,
) -> Result<(u64, usize), PushError> {
    let collection_id = collection.info.id.0;
    let version = hub
        .service
        .catalog()
        .edge_cache(edge, collection_id)
        .map_or(0, |m| m.version)
        + 1;
    let corpus = ServiceCorpus {
        service: hub.service.clone(),
        collection: collection.clone(),
    };
    let (builder, edge_name) = (hub.clone(), edge.to_owned());
    let (bytes, inventory) = tokio::task::spawn_blocking(move || {
        restore::build(
            &corpus,
            &logged,
            |anchor| builder.anchor_vector(&edge_name, collection_id, anchor),
            version,
            budget,
        )
    })
    .await??;
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
    tokio::task::spawn_blocking(move || svc.commit_edge_reset(&edge_name, inventory)).await??;
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
    // A certificate claims an exact ball over the whole collection: only a node holding all
    // of its shards can give one.
    let certify = certify
        && certifiable(collection.info.metric)
        && hub.service.holds_whole(collection.info.id.0);
    let collection_id = collection.info.id.0;
    // What planning reads: the collection as the whole cloud holds it (other nodes' shards
    // included, on a cluster).
    let corpus = Arc::new(ServiceCorpus {
        service: hub.service.clone(),
        collection: collection.clone(),
    });
    // The certificates sent on this connection, kept exact as the corpus changes; the edge
    // forgot every other one when it connected.
    let balls: Arc<Mutex<HashMap<u64, Ball>>> = Arc::default();
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
    let key: CacheKey = (edge.clone(), collection_id);
    let (jobs_tx, mut jobs) = mpsc::channel(JOB_QUEUE);
    let overflowed = Arc::new(AtomicBool::new(false));
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
    let logged_version = || {
        hub.service
            .catalog()
            .edge_cache(&edge, collection_id)
            .map(|m| m.version)
    };
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
                overflowed: overflowed.clone(),
                anchor_hot: notify.clone(),
                certify,
            },
        );
        let logged = logged_version();
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
    let mut state = PushState::new(
        Duration::from_millis(hub.config.period_ms.max(1)),
        Duration::from_millis(hub.config.min_gap_ms),
        logged_version().unwrap_or(0),
        Instant::now(),
    );
    let mut planning: Option<tokio::task::JoinHandle<Option<plan::Plan>>> = None;
    let mut planned_at = Instant::now();
    let outcome: Result<(), PushError> = 'run: loop {
        if overflowed.swap(false, Ordering::Acquire) {
            state.handle_backlog_overflow();
            backlog_overflowed(&edge);
        }
        // A delivery holds the cache's turn, so versions never interleave across connections.
        let mut turn_held = None;
        while let Some(action) = state.poll() {
            if action.delivers() && turn_held.is_none() {
                let guard = turn.clone().lock_owned().await;
                // A newer connection of the same edge took over: this task is done.
                let current = hub
                    .routes
                    .lock()
                    .get(&key)
                    .is_some_and(|route| route.jobs.same_channel(&jobs_tx));
                if !current || conn.close_reason().is_some() {
                    break 'run Ok(());
                }
                turn_held = Some(guard);
            }
            let manifest = || {
                hub.service
                    .catalog()
                    .edge_cache(&edge, collection_id)
                    .unwrap_or_else(|| Manifest::new(collection_id, 0))
            };
            match action {
                PushAction::Reconcile => {
                    // Reads may ask other nodes: off this task's worker.
                    let (corpus, manifest) = (corpus.clone(), manifest());
                    let found =
                        match tokio::task::spawn_blocking(move || outdated(&manifest, &*corpus))
                            .await
                        {
                            Ok(found) => found,
                            Err(e) => break 'run Err(e.into()),
                        };
                    state.handle_reconciled(
                        found
                            .into_iter()
                            .map(|(id, lsn)| Invalidation {
                                collection: collection_id,
                                ids: vec![id],
                                lsn,
                            })
                            .collect(),
                    );
                }
                PushAction::PlanNeeded => {
                    // Planning (exact searches for certificates) runs on the blocking pool
                    // while this task keeps delivering invalidations.
                    let (planner, edge, corpus, manifest) =
                        (hub.clone(), edge.clone(), corpus.clone(), manifest());
                    let certified: Option<HashSet<u64>> =
                        certify.then(|| balls.lock().keys().copied().collect());
                    planned_at = Instant::now();
                    planning = Some(tokio::task::spawn_blocking(move || {
                        let demand =
                            planner.demand(&edge, collection_id, &manifest, certified.as_ref())?;
                        plan::plan(
                            &*corpus,
                            &planner.config,
                            &manifest,
                            budget,
                            certified.is_some(),
                            demand,
                        )
                    }));
                }
                PushAction::BuildInvalidation(batch) => {
                    let (corpus, balls, manifest) = (corpus.clone(), balls.clone(), manifest());
                    let built = tokio::task::spawn_blocking(move || {
                        invalidation(&manifest, &*corpus, &batch, &balls.lock())
                    })
                    .await;
                    match built {
                        Ok(built) => state.handle_built(built),
                        Err(e) => break 'run Err(e.into()),
                    }
                }
                PushAction::CommitStep(step) => {
                    let (service, edge_name, version) =
                        (hub.service.clone(), edge.clone(), step.version);
                    let committed = tokio::task::spawn_blocking(move || {
                        service.commit_edge_step(&edge_name, collection_id, step)
                    })
                    .await;
                    match committed {
                        Ok(Ok(_)) => state.handle_committed(version),
                        // The log is out for a while (JetStream electing leaders): the link
                        // stays up and the cache keeps answering; deliveries resume after a
                        // pause, from a reconcile.
                        Ok(Err(ServiceError::Cluster(ClusterError::Unavailable(why)))) => {
                            warn!(edge = %edge, version, error = %why, "the cluster log did not take the cache's step; pushing again shortly");
                            state.handle_commit_failed(
                                Instant::now(),
                                logged_version().unwrap_or(0),
                            );
                        }
                        Ok(Err(e)) => break 'run Err(e.into()),
                        Err(e) => break 'run Err(e.into()),
                    }
                }
                PushAction::Send(delta) => {
                    match send_delta(&hub, &conn, &key, delta, ack_timeout).await {
                        Ok(delta) => {
                            follow_certificates(&mut balls.lock(), &delta, &*collection, |a| {
                                hub.anchor_vector(&edge, collection_id, a)
                            });
                            state.handle_ack(delta.version);
                        }
                        Err(e) => break 'run Err(e),
                    }
                }
            }
        }
        drop(turn_held);
        let due = tokio::time::Instant::from_std(state.poll_timeout());
        tokio::select! {
            () = tokio::time::sleep_until(due) => state.handle_tick(Instant::now()),
            () = notify.notified() => state.handle_anchor_hot(Instant::now()),
            () = resynced.notified() => state.handle_resynced(logged_version().unwrap_or(0)),
            job = jobs.recv() => match job {
                Some(Job::Invalidate(inv)) => {
                    if state.handle_invalidation(inv) {
                        backlog_overflowed(&edge);
                    }
                }
                None => break Ok(()),
            },
            planned = async { planning.as_mut().expect("guarded").await }, if planning.is_some() => {
                planning = None;
                metrics::histogram!("tiervec_push_plan_seconds")
                    .record(planned_at.elapsed().as_secs_f64());
                let planned = planned.ok().flatten();
                let more = planned.as_ref().is_some_and(|p| p.more);
                state.handle_planned(planned.map(|p| (p.delta, p.step)), more);
            }
            _ = conn.closed() => break Ok(()),
        }
    };
    if let Err(e) = outcome {
        warn!(edge = %edge, error = %e, "push failed; closing the connection (the edge resyncs)");
        conn.close(quinn::VarInt::from_u32(0), b"push failed");
    }
    let mut routes = hub.routes.lock();
    if routes
        .get(&key)
        .is_some_and(|route| route.jobs.same_channel(&jobs_tx))
    {
        routes.remove(&key);
    }
}

/// Writes for a cache were dropped from a full queue: it is reconciled instead.
fn backlog_overflowed(edge: &str) {
    metrics::counter!("tiervec_push_backlog_overflows_total").increment(1);
    warn!(edge = %edge, "the edge's invalidation queue is full; reconciling its cache and revoking its certificates instead");
}
