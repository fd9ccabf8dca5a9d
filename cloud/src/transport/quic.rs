//! The cloud's QUIC endpoint (quinn + rustls with ring, TLS 1.3 only, ALPN `tiervec/1`) with
//! mutual TLS: an edge must present a client certificate signed by the deployment's CA (see
//! [`super::certs`]); its edge id is the certificate's Common Name, and the access list says
//! which collections it may query. One bidirectional stream per exchange: the edge writes one
//! or more frames and finishes; the cloud answers on the same stream. The protocol logic is the
//! sans-IO [`ServerSession`]; this module only moves bytes.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tiervec_shared::protocol::cache::needs_resync;
use tiervec_shared::protocol::frame::{
    ALPN, Answer, DEFAULT_MAX_FRAME, ErrorCode, Frame, FrameDecoder, FrameError, PREFIX_LEN, Query,
    WireCollection, WireHit,
};
use tiervec_shared::protocol::session::{ServerAction, ServerSession};
use tracing::{Instrument, info_span, warn};

use super::certs::CertDir;
use crate::collection::SearchParams;
use crate::push::{PushHub, PushSession, push_loop};
use crate::service::Service;
use crate::transport::ScanSlots;

#[derive(Debug, Error)]
pub enum QuicError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn tls(e: impl std::fmt::Display) -> QuicError {
    QuicError::Tls(e.to_string())
}

/// Resumable sessions the cloud remembers (each edge holds a couple of tickets); the oldest
/// are forgotten first, which costs their edges a full handshake.
pub const SESSION_CACHE_ENTRIES: usize = 8192;

/// What edges may make the QUIC endpoint spend (`[quic]` in the configuration). Memory per
/// connection is bounded by its streams × the stream window, and what is queued for sending by
/// the connection window; both directions' flow control is QUIC's own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicLimits {
    /// Most open connections, all edges together; one more is refused at its first packet.
    pub max_connections: usize,
    /// Most open connections of one edge identity (an edge needs one; a reconnecting edge may
    /// briefly hold two): one more closes the edge's oldest connection.
    pub max_connections_per_edge: usize,
    /// Most concurrent streams an edge may open on a connection; more wait for stream credit.
    pub max_streams_per_connection: u32,
    /// Most frames in one stream; one more closes the connection with `FrameTooLarge`.
    pub max_frames_per_stream: usize,
    /// Bytes in flight in each direction of a connection, all streams together (its receive
    /// window, and the most data the cloud queues for sending while the edge withholds credit).
    pub connection_window_bytes: u32,
    /// A connection with no packet from the edge for this long is closed (edges keep theirs
    /// alive every second).
    pub idle_timeout_ms: u64,
}

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_connections: 4_096,
            max_connections_per_edge: 4,
            max_streams_per_connection: 32,
            max_frames_per_stream: 64,
            connection_window_bytes: 16 << 20,
            idle_timeout_ms: 30_000,
        }
    }
}

impl QuicLimits {
    /// The transport parameters these limits set. A stream's window holds one frame of the
    /// largest size, which is also the most a stream's read takes.
    fn transport(&self) -> Result<quinn::TransportConfig, QuicError> {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(self.max_streams_per_connection.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(quinn::VarInt::from_u32(
                (DEFAULT_MAX_FRAME + PREFIX_LEN) as u32,
            ))
            .receive_window(self.connection_window_bytes.into())
            .send_window(self.connection_window_bytes.into())
            .max_idle_timeout(Some(
                Duration::from_millis(self.idle_timeout_ms)
                    .try_into()
                    .map_err(tls)?,
            ));
        Ok(t)
    }
}

/// Which collections each edge may query; `*` grants all.
#[derive(Clone, Debug, Default)]
pub struct AccessList(pub HashMap<String, Vec<String>>);

impl AccessList {
    pub fn allows(&self, edge: &str, collection: &str) -> bool {
        self.0
            .get(edge)
            .is_some_and(|c| c.iter().any(|n| n == "*" || n == collection))
    }
}

/// The rustls provider: ring only, everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server crypto (the server certificate, and client certificates required and verified
/// against the deployment CA) and the transport's limits.
pub fn server_config(
    certs: &CertDir,
    limits: &QuicLimits,
) -> Result<quinn::ServerConfig, QuicError> {
    let at = |path: std::path::PathBuf| {
        move |e: rustls::pki_types::pem::Error| QuicError::Tls(format!("{}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(certs.ca_cert()).map_err(at(certs.ca_cert()))? {
        roots.add(ca.map_err(tls)?).map_err(tls)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(tls)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs.server_cert())
        .map_err(at(certs.server_cert()))?
        .collect::<Result<_, _>>()
        .map_err(tls)?;
    let key = PrivateKeyDer::from_pem_file(certs.server_key()).map_err(at(certs.server_key()))?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT for resuming edges: QUIC's sentinel for "early data accepted". Resumption is
    // stateful (no ticketer): each ticket is an entry of this in-memory cache, taken out when
    // used — single use — and gone when the process restarts.
    crypto.max_early_data_size = u32::MAX;
    crypto.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(limits.transport()?));
    Ok(config)
}

/// The edge id: the Common Name of the verified client certificate.
fn edge_id(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    // A resumed session carries the certificate verified when its ticket was issued; tickets
    // are renewed on every resumption, so check the validity period again each time.
    if !cert.validity().is_valid() {
        return None;
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_owned())
}

/// A key derived from the server's private key for `purpose`.
fn derived_key(certs: &CertDir, purpose: &[u8]) -> Result<ring::hmac::Tag, QuicError> {
    let server_key = std::fs::read(certs.server_key())
        .map_err(|e| QuicError::Tls(format!("{}: {e}", certs.server_key().display())))?;
    Ok(ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &server_key),
        purpose,
    ))
}

/// The endpoint's keys, derived from the server's private key so that they are the same after
/// a restart: the connection-id generator's (a restarted cloud recognises the ids the process
/// before it issued, instead of dropping their packets as garbage) and the stateless-reset key
/// (it answers them with a reset the edge accepts, so the edge reconnects at once instead of
/// waiting out its idle timeout). Both are as secret as the server key: a reset token forged
/// without it would let anyone on the path close an edge's connection.
fn endpoint_config(certs: &CertDir) -> Result<quinn::EndpointConfig, QuicError> {
    let reset = derived_key(certs, b"tiervec: QUIC stateless reset key")?;
    let cid = derived_key(certs, b"tiervec: QUIC connection id key")?;
    let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("8 of 32 bytes"));
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    // Every edge of a fleet learns of a restart at once, not one per 20 ms (quinn's default):
    // edges that lost the cloud together send their probes in the same few milliseconds. Only
    // a packet bearing an id this deployment issued (keyed, 40-bit check) is answered, and a
    // reset is always smaller than the packet that asked for it.
    config.min_reset_interval(Duration::ZERO);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// Binds the QUIC endpoint.
pub fn bind(
    addr: SocketAddr,
    certs: &CertDir,
    limits: &QuicLimits,
) -> Result<quinn::Endpoint, QuicError> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("the QUIC endpoint needs a tokio runtime"))?;
    Ok(quinn::Endpoint::new(
        endpoint_config(certs)?,
        Some(server_config(certs, limits)?),
        std::net::UdpSocket::bind(addr)?,
        runtime,
    )?)
}

/// Each edge's open connections, oldest first, so that one identity cannot hold more than its
/// share.
#[derive(Default)]
struct EdgeConnections(Mutex<HashMap<String, VecDeque<quinn::Connection>>>);

impl EdgeConnections {
    /// Counts `conn` as `edge`'s newest; returns the oldest it displaces past `max`.
    fn admit(&self, edge: &str, conn: &quinn::Connection, max: usize) -> Vec<quinn::Connection> {
        let mut all = self.0.lock();
        let held = all.entry(edge.to_owned()).or_default();
        held.push_back(conn.clone());
        let excess = held.len().saturating_sub(max.max(1));
        held.drain(..excess).collect()
    }

    fn remove(&self, edge: &str, conn: &quinn::Connection) {
        let mut all = self.0.lock();
        if let Some(held) = all.get_mut(edge) {
            held.retain(|c| c.stable_id() != conn.stable_id());
            if held.is_empty() {
                all.remove(edge);
            }
        }
    }
}

/// Accepts edges until the endpoint closes.
pub async fn serve(
    endpoint: quinn::Endpoint,
    service: Arc<Service>,
    acl: Arc<AccessList>,
    push: Arc<PushHub>,
    scans: ScanSlots,
    limits: QuicLimits,
) {
    let limits = Arc::new(limits);
    let edges = Arc::new(EdgeConnections::default());
    while let Some(incoming) = endpoint.accept().await {
        if endpoint.open_connections() >= limits.max_connections {
            metrics::counter!("tiervec_quic_refused_connections_total").increment(1);
            warn!(
                max = limits.max_connections,
                remote = %incoming.remote_address(),
                "QUIC connection refused: at the connection limit"
            );
            incoming.refuse();
            continue;
        }
        let (service, acl, push, scans, limits, edges) = (
            service.clone(),
            acl.clone(),
            push.clone(),
            scans.clone(),
            limits.clone(),
            edges.clone(),
        );
        tokio::spawn(async move {
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting,
                Err(e) => return handshake_failed(&e),
            };
            // Accept 0-RTT data from edges that resume a session, and answer it at once
            // (0.5-RTT). A resumed session carries the client certificate verified when its
            // ticket was issued, so the edge id is known before the handshake completes.
            let (conn, handshake_done) = match connecting.into_0rtt() {
                Ok((conn, done)) => (conn, Some(done)),
                Err(connecting) => match connecting.await {
                    Ok(conn) => (conn, None),
                    Err(e) => return handshake_failed(&e),
                },
            };
            let (confirmed_tx, confirmed) = tokio::sync::watch::channel(handshake_done.is_none());
            if let Some(done) = handshake_done {
                let conn = conn.clone();
                tokio::spawn(async move {
                    // On a server this resolves when the handshake completes or the connection
                    // is lost first, and its value says nothing more (quinn sets it only on
                    // clients). The edge may have closed the connection since: that does not
                    // undo a completed handshake (a resumed edge that asks once and leaves is
                    // counted like any other).
                    done.await;
                    if handshake_completed(&conn) {
                        let _ = confirmed_tx.send(true);
                    } else {
                        match conn.close_reason() {
                            Some(reason) => handshake_failed(&reason),
                            None => handshake_failed(&"handshake incomplete"),
                        }
                    }
                });
            }
            let resources = Resources {
                service,
                acl,
                push,
                scans,
                limits,
                edges,
            };
            connection(conn, confirmed, resources).await;
        });
    }
}

/// Whether the TLS handshake of `conn` has completed, open or closed as the connection may be
/// now: the edge's `Finished` arrived and was verified, which takes the session's keys, so a
/// replayed 0-RTT flight never gets that far. rustls exports keying material only from then on
/// (before, it answers `HandshakeNotComplete`), and on a server quinn offers no other way to
/// ask.
fn handshake_completed(conn: &quinn::Connection) -> bool {
    conn.export_keying_material(&mut [0u8; 1], b"tiervec handshake completed", b"")
        .is_ok()
}

fn handshake_failed(e: &dyn std::fmt::Display) {
    metrics::counter!("tiervec_quic_handshake_failures_total").increment(1);
    warn!(error = %e, "QUIC handshake refused");
}

/// Per connection: the edge, its session, whether its handshake is confirmed, the UDP bytes
/// already counted, and the signal that its cache was resynced.
struct Peer {
    edge: String,
    push: Arc<PushHub>,
    /// Large exact scans at once, shared with the HTTP API.
    scans: ScanSlots,
    session: Mutex<ServerSession>,
    confirmed: tokio::sync::watch::Receiver<bool>,
    wire: [AtomicU64; 2],
    max_frames_per_stream: usize,
    resynced: Arc<tokio::sync::Notify>,
    /// Set when the adopted inventory was far behind the logged manifest: that manifest.
    restore: Arc<Mutex<Option<tiervec_shared::push::Manifest>>>,
}

/// What every connection shares.
struct Resources {
    service: Arc<Service>,
    acl: Arc<AccessList>,
    push: Arc<PushHub>,
    scans: ScanSlots,
    limits: Arc<QuicLimits>,
    edges: Arc<EdgeConnections>,
}

async fn connection(
    conn: quinn::Connection,
    mut confirmed: tokio::sync::watch::Receiver<bool>,
    resources: Resources,
) {
    let Resources {
        service,
        acl,
        push,
        scans,
        limits,
        edges,
    } = resources;
    // A full handshake proves the certificate only when it completes.
    let edge = match edge_id(&conn) {
        Some(edge) => Some(edge),
        None => match confirmed.wait_for(|c| *c).await {
            Ok(_) => edge_id(&conn),
            Err(_) => return,
        },
    };
    let Some(edge) = edge else {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::NotAllowed as u32),
            b"no edge id in the client certificate",
        );
        return;
    };
    let collections: Vec<WireCollection> = service
        .catalog()
        .all()
        .iter()
        .filter(|c| acl.allows(&edge, &c.info.name))
        .map(|c| WireCollection {
            name: c.info.name.clone(),
            id: c.info.id.0,
            dim: c.info.dim as u32,
            metric: c.info.metric.code(),
            model_checksum: service.catalog().model(c.info.id.0).map(|m| m.checksum),
        })
        .collect();
    for oldest in edges.admit(&edge, &conn, limits.max_connections_per_edge) {
        warn!(edge = %edge, max = limits.max_connections_per_edge, "closing the edge's oldest connection: at its connection limit");
        oldest.close(
            quinn::VarInt::from_u32(0),
            b"superseded: the edge opened more connections than its limit",
        );
    }
    metrics::gauge!("tiervec_quic_connections").increment(1.0);
    let cache_versions = service.catalog().cache_versions(&edge);
    let peer = Arc::new(Peer {
        edge,
        push,
        scans,
        session: Mutex::new(ServerSession::new(collections, cache_versions)),
        confirmed,
        wire: [AtomicU64::new(0), AtomicU64::new(0)],
        max_frames_per_stream: limits.max_frames_per_stream,
        resynced: Arc::new(tokio::sync::Notify::new()),
        restore: Arc::default(),
    });
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (peer, service, conn2) = (peer.clone(), service.clone(), conn.clone());
        let span = info_span!("quic_stream", edge = %peer.edge);
        tokio::spawn(exchange(send, recv, peer, service, conn2).instrument(span));
    }
    account_wire_bytes(&conn, &peer.wire);
    edges.remove(&peer.edge, &conn);
    metrics::gauge!("tiervec_quic_connections").decrement(1.0);
}

/// Adds the connection's UDP traffic since the last call to the cloud's byte counters.
fn account_wire_bytes(conn: &quinn::Connection, seen: &[AtomicU64; 2]) {
    let stats = conn.stats();
    for (direction, now, last) in [
        ("tx", stats.udp_tx.bytes, &seen[0]),
        ("rx", stats.udp_rx.bytes, &seen[1]),
    ] {
        // Stream tasks race here: only an increase counts, once.
        let before = last.fetch_max(now, Ordering::Relaxed);
        metrics::counter!("tiervec_quic_udp_bytes_total", "direction" => direction)
            .increment(now.saturating_sub(before));
    }
}

/// Reads one stream's frames; a read error is the driver's to report.
async fn read_frames(recv: &mut quinn::RecvStream, peer: &Peer) -> Option<Vec<ServerAction>> {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut actions = Vec::new();
    match recv.read_to_end(DEFAULT_MAX_FRAME + PREFIX_LEN).await {
        Ok(bytes) => match decoder.push(&bytes) {
            Ok(()) => {
                for taken in 0.. {
                    let next = match decoder.next_frame() {
                        Ok(Some(_)) if taken == peer.max_frames_per_stream => {
                            Err(FrameError::TooManyFrames {
                                max: peer.max_frames_per_stream,
                            })
                        }
                        next => next,
                    };
                    match next {
                        Ok(Some(frame)) if *peer.confirmed.borrow() => {
                            actions.extend(peer.session.lock().handle(frame))
                        }
                        Ok(Some(frame)) => {
                            let early = peer.session.lock().handle_early(frame);
                            match early {
                                Ok(done) => actions.extend(done),
                                Err(deferred) => {
                                    // Not replay-safe: handled once the handshake completes,
                                    // dropped with the stream if it fails.
                                    peer.confirmed.clone().wait_for(|c| *c).await.ok()?;
                                    actions.extend(peer.session.lock().handle(*deferred));
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            actions.extend(peer.session.lock().bad_frame(&e));
                            break;
                        }
                    }
                }
            }
            Err(e) => actions.extend(peer.session.lock().bad_frame(&e)),
        },
        Err(quinn::ReadToEndError::TooLong) => {
            actions.extend(peer.session.lock().bad_frame(&FrameError::TooLarge {
                len: DEFAULT_MAX_FRAME + PREFIX_LEN + 1,
                max: DEFAULT_MAX_FRAME,
            }))
        }
        Err(_) => return None,
    }
    Some(actions)
}

/// One stream: read the edge's frames, answer each through the session. Each answer is
/// written as soon as it is made, so what a stream holds in memory is one answer, and an edge
/// that withholds flow credit stops its own stream's searches (the write waits) rather than
/// letting answers pile up; a stream the edge reset gets no more searches.
async fn exchange(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Arc<Peer>,
    service: Arc<Service>,
    conn: quinn::Connection,
) {
    let Some(actions) = read_frames(&mut recv, &peer).await else {
        return;
    };
    let early = !*peer.confirmed.borrow();
    let mut out = Vec::new();
    let mut writable = true;
    let mut close = None;
    let mut answered = Vec::new();
    for action in actions {
        if !out.is_empty() && writable {
            writable = send.write_all(&out).await.is_ok();
            out.clear();
        }
        match action {
            ServerAction::Send(frame) => frame.encode(&mut out),
            ServerAction::Search(_) if !writable => {}
            ServerAction::Search(q) => {
                let span = info_span!(
                    "cloud_query",
                    query_id = q.query_id,
                    collection = %q.collection,
                    edge_span_id = q.span_id,
                    early,
                );
                let svc = service.clone();
                let (collection, collection_id, shadow, vector) = (
                    q.collection.clone(),
                    q.collection_id,
                    q.shadow,
                    q.vector.clone(),
                );
                let rows = service.scanned_rows(&q.collection, false).unwrap_or(0);
                let slot = peer.scans.slot_for(rows).await;
                let frame = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    span.in_scope(|| search(&svc, q))
                })
                .await;
                if let Ok(frame) = frame {
                    let start = out.len();
                    frame.encode(&mut out);
                    if let Frame::Answer(a) = &frame {
                        if out.len() - start - PREFIX_LEN > DEFAULT_MAX_FRAME {
                            out.truncate(start);
                            let payload_bytes = a.payloads.iter().flatten().map(String::len).sum();
                            answer_too_large(a.query_id, a.hits.len(), payload_bytes)
                                .encode(&mut out);
                        } else {
                            answered.push(Answered {
                                collection,
                                collection_id,
                                ids: a.hits.iter().map(|h| h.id).collect(),
                                shadow,
                                vector,
                            });
                        }
                    }
                }
            }
            ServerAction::Refused(code) => {
                metrics::counter!("tiervec_quic_refused_total", "reason" => code.label())
                    .increment(1);
            }
            ServerAction::Close { code, message } => close = Some((code, message)),
            ServerAction::CacheAnnounced { cache, told } => {
                match service.catalog().get(&cache.collection) {
                    Some(collection) => {
                        // The edge decides with the same function: it sends its inventory
                        // exactly when this holds.
                        let resync_first = needs_resync(
                            cache.collection_id,
                            cache.version,
                            collection.info.id.0,
                            told,
                        );
                        tokio::spawn(push_loop(
                            peer.push.clone(),
                            PushSession {
                                conn: conn.clone(),
                                edge: peer.edge.clone(),
                                collection,
                                budget: cache.budget_bytes,
                                confirmed: peer.confirmed.clone(),
                                resynced: peer.resynced.clone(),
                                resync_first,
                                version: cache.version,
                                certify: cache.certify,
                                restore: peer.restore.clone(),
                            },
                        ));
                    }
                    None => {
                        warn!(collection = %cache.collection, "edge announced a cache of an unknown collection")
                    }
                }
            }
            ServerAction::Resync(inventory) => {
                let (svc, edge, version) = (service.clone(), peer.edge.clone(), inventory.version);
                let policy = peer.push.restore_policy();
                let committed = match tokio::task::spawn_blocking(move || {
                    // What the cloud logged before adopting: restored whole if the edge lost
                    // most of it.
                    let lost = svc
                        .catalog()
                        .edge_cache(&edge, inventory.collection_id)
                        .filter(|logged| policy.wants_restore(logged, &inventory));
                    svc.commit_edge_reset(&edge, inventory).map(|_| lost)
                })
                .await
                {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match committed {
                    Ok(lost) => {
                        *peer.restore.lock() = lost;
                        Frame::InventoryAck(version).encode(&mut out);
                        peer.resynced.notify_one();
                    }
                    Err(message) => {
                        Frame::Error(tiervec_shared::protocol::frame::ErrorFrame {
                            query_id: 0,
                            code: ErrorCode::Internal as u16,
                            message,
                        })
                        .encode(&mut out);
                    }
                }
            }
        }
    }
    if writable {
        let _ = send.write_all(&out).await;
    }
    let _ = send.finish();
    account_wire_bytes(&conn, &peer.wire);
    if let Some((code, message)) = close {
        let _ = send.stopped().await;
        conn.close(quinn::VarInt::from_u32(code as u32), message.as_bytes());
    }
    count_answered(&peer, answered, early).await;
}

/// A query the cloud answered, for the statistics.
struct Answered {
    collection: String,
    collection_id: [u8; 16],
    ids: Vec<u64>,
    shadow: bool,
    vector: Vec<f32>,
}

/// Counts answered queries per collection, and feeds the ids of their answers to the hotness
/// tables (shadow queries excepted). A query that arrived as 0-RTT data could be a replay, so
/// it is counted only once the handshake is confirmed (the edge proved it holds the session
/// keys); if it never is, it is not counted.
async fn count_answered(peer: &Peer, answered: Vec<Answered>, early: bool) {
    if answered.is_empty() {
        return;
    }
    let mut confirmed = peer.confirmed.clone();
    if confirmed.wait_for(|c| *c).await.is_err() {
        return;
    }
    let flight = if early { "early" } else { "confirmed" };
    for a in answered {
        if !a.shadow {
            peer.push
                .record_answer(&peer.edge, a.collection_id, &a.ids, &a.vector);
        }
        metrics::counter!("tiervec_quic_queries_total", "collection" => a.collection, "flight" => flight)
            .increment(1);
    }
}

/// The refusal of an answer whose hits and payloads do not fit in a frame: the edge's decoder
/// would refuse it, so it is refused here, named.
fn answer_too_large(query_id: u64, hits: usize, payload_bytes: usize) -> Frame {
    Frame::Error(tiervec_shared::protocol::frame::ErrorFrame {
        query_id,
        code: ErrorCode::AnswerTooLarge as u16,
        message: format!(
            "{hits} hits with {payload_bytes} bytes of payloads exceed the {DEFAULT_MAX_FRAME}-byte \
             frame an answer must fit in"
        ),
    })
}

/// Runs one edge query. `tiervec_quic_searches_total` counts the searches run (0-RTT data the
/// handshake later refused included), as `tiervec_quic_queries_total` counts answers.
fn search(service: &Service, q: Query) -> Frame {
    metrics::counter!("tiervec_quic_searches_total", "collection" => q.collection.clone())
        .increment(1);
    let started = Instant::now();
    let params = SearchParams {
        k: q.k as usize,
        ef: q.ef as usize,
        exact: false,
        max_distance: None,
    };
    let answer = service.search_after(
        &q.collection,
        &q.vector,
        &params,
        &[],
        Duration::ZERO,
        q.with_payload,
    );
    match answer {
        // An edge takes an answer as the whole collection's: a short one is refused instead.
        Ok(answer) if !answer.missing_shards.is_empty() => {
            Frame::Error(tiervec_shared::protocol::frame::ErrorFrame {
                query_id: q.query_id,
                code: ErrorCode::PartialAnswer as u16,
                message: format!(
                    "no live replica of shards {:?} of `{}`",
                    answer.missing_shards, q.collection
                ),
            })
        }
        Ok(answer) => {
            let payload_bytes: usize = answer
                .hits
                .iter()
                .filter_map(|h| h.payload.as_ref().map(|p| p.len()))
                .sum();
            // Payloads alone over a frame are refused before they are copied (up to k × 1 MiB);
            // the encoded answer is held to the limit exactly where it is encoded.
            if q.with_payload && payload_bytes > DEFAULT_MAX_FRAME {
                return answer_too_large(q.query_id, answer.hits.len(), payload_bytes);
            }
            let payloads: Vec<Option<String>> = if q.with_payload {
                answer
                    .hits
                    .iter()
                    .map(|h| h.payload.as_deref().map(str::to_owned))
                    .collect()
            } else {
                Vec::new()
            };
            Frame::Answer(Answer {
                query_id: q.query_id,
                collection_id: q.collection_id,
                hits: answer
                    .hits
                    .iter()
                    .map(|h| WireHit {
                        id: h.id,
                        distance: h.distance,
                        lsn: h.lsn,
                    })
                    .collect(),
                took_us: started.elapsed().as_micros() as u32,
                payloads,
            })
        }
        Err(e) => Frame::Error(tiervec_shared::protocol::frame::ErrorFrame {
            query_id: q.query_id,
            code: ErrorCode::Internal as u16,
            message: e.to_string(),
        }),
    }
}
