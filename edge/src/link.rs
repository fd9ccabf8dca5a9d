//! The edge's QUIC link to the cloud (quinn + rustls with ring, TLS 1.3, ALPN `tiervec/1`,
//! mutual TLS with the edge's certificate). The protocol logic is the sans-IO
//! [`ClientSession`]; this module moves its frames over one bidirectional stream per exchange
//! and enforces deadlines.
//!
//! A [`Connector`] outlives connections: it keeps one endpoint and one rustls client
//! configuration, whose in-memory session store holds the tickets the cloud issued. A
//! reconnection that finds a ticket resumes the TLS session and sends its first flight — the
//! Hello, and a query waiting for the link pipelined behind it — as 0-RTT data, so the first
//! answer arrives one round trip after the first packet instead of three. Tickets are single
//! use (the cloud keeps them in a stateful cache and takes each out when it is used) and live
//! in memory only: a restart of the edge or of the cloud costs the next connection a full
//! handshake. When the cloud rejects the early data (it lost the ticket), quinn reports the
//! first flight's stream as rejected and the flight is sent again once the handshake is done.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tiervec_shared::protocol::frame::{
    ALPN, Answer, DEFAULT_MAX_FRAME, Frame, FrameDecoder, PREFIX_LEN, Query, SnapshotBegin,
    WireCollection,
};
use tiervec_shared::protocol::session::{ClientAction, ClientEvent, ClientSession, QueryFailure};
use tiervec_shared::protocol::transfer::SnapshotReceiver;
use tiervec_shared::push::CacheAnnouncement;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info_span, warn};

use crate::cache::EdgeCache;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot reach the cloud: {0}")]
    Connect(String),
    #[error("handshake with the cloud failed: {0}")]
    Handshake(String),
}

fn tls(e: impl std::fmt::Display) -> LinkError {
    LinkError::Tls(e.to_string())
}

/// Where the cloud is and which certificates the edge presents.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub cloud_addr: SocketAddr,
    /// Name the cloud's certificate must carry.
    pub server_name: String,
    pub ca_cert: PathBuf,
    /// The edge's client certificate and key; `None` connects without one (and is refused).
    pub identity: Option<(PathBuf, PathBuf)>,
    pub edge_name: String,
    /// A connection with no packet for this long is dead (also bounds a connection attempt).
    pub idle_timeout: Duration,
    /// Keep-alive interval, so that an idle but healthy link is not closed.
    pub keep_alive: Duration,
}

impl LinkConfig {
    /// A configuration with the default timers.
    pub fn new(
        cloud_addr: SocketAddr,
        server_name: &str,
        ca_cert: PathBuf,
        identity: Option<(PathBuf, PathBuf)>,
        edge_name: &str,
    ) -> LinkConfig {
        LinkConfig {
            cloud_addr,
            server_name: server_name.to_owned(),
            ca_cert,
            identity,
            edge_name: edge_name.to_owned(),
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_secs(1),
        }
    }
}

/// The QUIC client configuration: the deployment CA as the only root, the edge's certificate,
/// early data enabled, and the link's timers.
pub fn client_config(cfg: &LinkConfig) -> Result<quinn::ClientConfig, LinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&cfg.ca_cert).map_err(tls)? {
        roots.add(ca.map_err(tls)?).map_err(tls)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots);
    let mut crypto = match &cfg.identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(tls)?
                .collect::<Result<_, _>>()
                .map_err(tls)?;
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).map_err(tls)?)
                .map_err(tls)?
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.enable_early_data = true;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(cfg.idle_timeout.try_into().map_err(tls)?))
        .keep_alive_interval(Some(cfg.keep_alive));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// How a connection's handshake went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// No ticket: a full TLS handshake before the first flight.
    Full,
    /// Resumed, with the early data accepted: the first flight went as 0-RTT data unless the
    /// edge opened its stream only after the handshake had completed (a busy edge).
    ZeroRtt,
    /// Resumed, but the cloud refused the early data; the first flight was sent again (or,
    /// if the refusal came before it was sent, only then).
    ZeroRttRejected,
}

impl Handshake {
    pub const fn label(self) -> &'static str {
        match self {
            Handshake::Full => "full",
            Handshake::ZeroRtt => "0rtt",
            Handshake::ZeroRttRejected => "0rtt_rejected",
        }
    }
}

/// Why an exchange on a stream failed.
enum ExchangeError {
    /// The stream was sent as 0-RTT data and the cloud rejected it.
    EarlyDataRejected,
    Other(String),
}

impl From<quinn::WriteError> for ExchangeError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ZeroRttRejected => ExchangeError::EarlyDataRejected,
            other => ExchangeError::Other(other.to_string()),
        }
    }
}

impl From<quinn::ReadToEndError> for ExchangeError {
    fn from(e: quinn::ReadToEndError) -> Self {
        match e {
            quinn::ReadToEndError::Read(quinn::ReadError::ZeroRttRejected) => {
                ExchangeError::EarlyDataRejected
            }
            other => ExchangeError::Other(other.to_string()),
        }
    }
}

impl ExchangeError {
    fn message(self) -> String {
        match self {
            ExchangeError::EarlyDataRejected => "early data rejected".into(),
            ExchangeError::Other(m) => m,
        }
    }
}

/// Adds the connection's UDP traffic since the last call to the edge's byte counters.
fn account_wire_bytes(conn: &quinn::Connection, seen: &[AtomicU64; 2]) {
    let stats = conn.stats();
    for (direction, now, last) in [
        ("tx", stats.udp_tx.bytes, &seen[0]),
        ("rx", stats.udp_rx.bytes, &seen[1]),
    ] {
        let before = last.fetch_max(now, Ordering::Relaxed);
        metrics::counter!("tiervec_edge_link_udp_bytes_total", "direction" => direction)
            .increment(now.saturating_sub(before));
    }
}

/// Sends `flight` on a new stream and returns the frames of the answer.
async fn exchange(conn: &quinn::Connection, flight: &[Frame]) -> Result<Vec<Frame>, ExchangeError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| ExchangeError::Other(e.to_string()))?;
    let mut bytes = Vec::new();
    for frame in flight {
        frame.encode(&mut bytes);
    }
    send.write_all(&bytes).await?;
    if send.finish().is_err() {
        // Only a stream its connection has discarded cannot be finished: one sent as 0-RTT data
        // that the cloud rejected after it was written (the read reports the rejection, and the
        // flight is sent again), or one of a lost connection (the read reports the loss).
        return Err(match recv.read_to_end(0).await {
            Err(e) => e.into(),
            Ok(_) => ExchangeError::Other("the stream closed before it was finished".into()),
        });
    }
    let answer = recv.read_to_end(DEFAULT_MAX_FRAME + PREFIX_LEN).await?;
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let bad = |e: tiervec_shared::protocol::frame::FrameError| {
        metrics::counter!("tiervec_edge_link_refused_total", "reason" => e.code().label())
            .increment(1);
        ExchangeError::Other(e.to_string())
    };
    decoder.push(&answer).map_err(bad)?;
    let mut frames = Vec::new();
    while let Some(f) = decoder.next_frame().map_err(bad)? {
        frames.push(f);
    }
    Ok(frames)
}

/// The cache a connector lets the cloud push into.
#[derive(Clone)]
pub struct PushTarget {
    pub cache: Arc<EdgeCache>,
    /// The collection it caches, by the cloud's name.
    pub collection: String,
    /// Whether to ask the cloud for certificates with the anchors it pushes.
    pub certify: bool,
}

/// Makes connections to the cloud, keeping the TLS session tickets between them.
pub struct Connector {
    endpoint: quinn::Endpoint,
    config: LinkConfig,
    push: Option<PushTarget>,
    /// The collections of the last handshake: what a query pipelined behind the next Hello
    /// may name.
    known: Mutex<Vec<WireCollection>>,
}

/// A new connection, and the answer to the query its first flight carried.
pub struct Connected {
    pub link: CloudLink,
    pub first_answer: Option<Result<Answer, QueryFailure>>,
    pub handshake: Handshake,
}

impl Connector {
    /// Binds a client endpoint and loads the certificates.
    pub fn new(config: LinkConfig) -> Result<Connector, LinkError> {
        let bind: SocketAddr = if config.cloud_addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("valid wildcard address");
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| LinkError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(client_config(&config)?);
        Ok(Connector {
            endpoint,
            config,
            push: None,
            known: Mutex::new(Vec::new()),
        })
    }

    /// A connector whose connections let the cloud push into `target`.
    pub fn with_push(config: LinkConfig, target: PushTarget) -> Result<Connector, LinkError> {
        Ok(Connector {
            push: Some(target),
            ..Connector::new(config)?
        })
    }

    fn announcement(&self) -> Option<CacheAnnouncement> {
        self.push.as_ref().map(|t| CacheAnnouncement {
            collection: t.collection.clone(),
            collection_id: t.cache.collection_id(),
            version: t.cache.version(),
            budget_bytes: t.cache.config().budget_bytes,
            certify: t.certify,
        })
    }

    /// The collection `name` as the last handshake announced it, if any.
    pub fn known_collection(&self, name: &str) -> Option<WireCollection> {
        self.known.lock().iter().find(|c| c.name == name).cloned()
    }

    /// Connects (resuming with 0-RTT when a ticket is at hand), completes the protocol
    /// handshake, and asks `first` in the same flight.
    pub async fn connect(&self, first: Option<Query>) -> Result<Connected, LinkError> {
        let connecting = self
            .endpoint
            .connect(self.config.cloud_addr, &self.config.server_name)
            .map_err(|e| LinkError::Connect(e.to_string()))?;
        let (conn, early_data_accepted) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => (conn, Some(accepted)),
            Err(connecting) => (
                connecting
                    .await
                    .map_err(|e| LinkError::Handshake(e.to_string()))?,
                None,
            ),
        };
        let started = Instant::now();
        let now = || started.elapsed().as_micros() as u64;
        // Certificates are maintained per connection: the cache forgets them before this one
        // announces itself, and deltas of an older connection bring none.
        let connection = self.push.as_ref().map(|t| t.cache.begin_connection());
        let mut session = ClientSession::new(&self.config.edge_name, self.announcement());
        let mut flight = Vec::new();
        for action in session.handle(ClientEvent::Connected, now()) {
            if let ClientAction::Send(f) = action {
                flight.push(f);
            }
        }
        let first_id = first.as_ref().map(|_| 1);
        if let Some(mut query) = first {
            query.query_id = 1;
            let deadline_us = now() + self.config.idle_timeout.as_micros() as u64;
            for action in session.handle(ClientEvent::Ask { query, deadline_us }, now()) {
                if let ClientAction::Send(f) = action {
                    flight.push(f);
                }
            }
        }
        let wire = [AtomicU64::new(0), AtomicU64::new(0)];
        let (frames, handshake) = match exchange(&conn, &flight).await {
            // Whether the cloud accepted the early data, from quinn, not from having had a
            // ticket: a stream opened only after the cloud's reply arrived (a busy edge) is an
            // ordinary one, which succeeds even when the early data was refused. By now the
            // handshake is over (the answer came under its keys), so this resolves at once.
            Ok(frames) => match early_data_accepted {
                None => (frames, Handshake::Full),
                Some(accepted) => {
                    if accepted.await {
                        (frames, Handshake::ZeroRtt)
                    } else {
                        (frames, Handshake::ZeroRttRejected)
                    }
                }
            },
            Err(ExchangeError::EarlyDataRejected) => (
                exchange(&conn, &flight)
                    .await
                    .map_err(|e| LinkError::Handshake(e.message()))?,
                Handshake::ZeroRttRejected,
            ),
            Err(e) => return Err(LinkError::Handshake(e.message())),
        };
        account_wire_bytes(&conn, &wire);
        metrics::counter!("tiervec_edge_link_connects_total", "handshake" => handshake.label())
            .increment(1);
        let mut collections = None;
        let mut cache_version = None;
        let mut first_answer = None;
        for f in frames {
            for action in session.handle(ClientEvent::Received(f), now()) {
                match action {
                    ClientAction::Ready {
                        collections: c,
                        cache_version: v,
                        ..
                    } => {
                        collections = Some(c);
                        cache_version = v;
                    }
                    ClientAction::Answered(a) if Some(a.query_id) == first_id => {
                        first_answer = Some(Ok(a));
                    }
                    ClientAction::Failed { query_id, reason } if Some(query_id) == first_id => {
                        first_answer = Some(Err(reason));
                    }
                    ClientAction::Close { message, .. } => {
                        return Err(LinkError::Handshake(message));
                    }
                    _ => {}
                }
            }
        }
        let collections =
            collections.ok_or_else(|| LinkError::Handshake("no HelloAck from the cloud".into()))?;
        *self.known.lock() = collections.clone();
        if first_id.is_some() && first_answer.is_none() {
            first_answer = Some(Err(QueryFailure::Disconnected));
        }
        let session = Arc::new(Mutex::new(session));
        if let (Some(target), Some(connection)) = (&self.push, connection) {
            resync(
                &conn,
                &session,
                target,
                &collections,
                cache_version,
                started,
            )
            .await?;
            tokio::spawn(
                accept_pushes(
                    conn.clone(),
                    session.clone(),
                    target.clone(),
                    connection,
                    started,
                )
                .instrument(info_span!("edge_push")),
            );
        }
        Ok(Connected {
            link: CloudLink {
                conn,
                session,
                started,
                next_query: AtomicU64::new(2),
                collections,
                wire,
                missed: AtomicU64::new(0),
                last_answer_us: AtomicU64::new(0),
            },
            first_answer,
            handshake,
        })
    }
}

/// A connected, handshaken link.
pub struct CloudLink {
    conn: quinn::Connection,
    session: Arc<Mutex<ClientSession>>,
    started: Instant,
    next_query: AtomicU64,
    collections: Vec<WireCollection>,
    /// UDP bytes already counted (tx, rx).
    wire: [AtomicU64; 2],
    /// Deadlines missed since the last answer; see [`UNRESPONSIVE_AFTER`].
    missed: AtomicU64,
    /// When the last answer arrived (µs since `started`).
    last_answer_us: AtomicU64,
}

/// Deadlines missed since the last answer after which the link is closed and made again,
/// provided the cloud has also been silent for that many deadlines (so that a burst of
/// concurrent queries timing out in one short pause does not count three times). A cloud that
/// was killed and restarted leaves the old connection looking alive until the idle timeout;
/// closing it early lets the edge reach the new process at once instead of degrading for
/// seconds.
pub const UNRESPONSIVE_AFTER: u64 = 3;

impl CloudLink {
    /// Connects once, without keeping the session tickets (tests and tools).
    pub async fn connect(cfg: &LinkConfig) -> Result<CloudLink, LinkError> {
        Ok(Connector::new(cfg.clone())?.connect(None).await?.link)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// The collections this edge may query, as the cloud announced them.
    pub fn collections(&self) -> &[WireCollection] {
        &self.collections
    }

    /// The collection `name`, if this edge may query it.
    pub fn collection(&self, name: &str) -> Option<&WireCollection> {
        self.collections.iter().find(|c| c.name == name)
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Closes the connection (the node's keeper then reconnects).
    fn close(&self, reason: &[u8]) {
        self.conn.close(quinn::VarInt::from_u32(0), reason);
    }

    fn handle(&self, event: ClientEvent) -> Vec<ClientAction> {
        let now = self.now();
        self.session.lock().handle(event, now)
    }

    /// Asks the cloud; fails with `Timeout` when no answer arrives within `deadline`.
    pub async fn query(
        &self,
        mut query: Query,
        deadline: Duration,
    ) -> Result<Answer, QueryFailure> {
        query.query_id = self.next_query.fetch_add(1, Ordering::Relaxed);
        let id = query.query_id;
        let deadline_us = self.now() + deadline.as_micros() as u64;
        let mut frame = None;
        for a in self.handle(ClientEvent::Ask { query, deadline_us }) {
            match a {
                ClientAction::Send(f) => frame = Some(f),
                ClientAction::Failed { reason, .. } => return Err(reason),
                _ => {}
            }
        }
        let frame = frame.ok_or(QueryFailure::NotReady)?;
        let outcome = tokio::time::timeout(deadline, exchange(&self.conn, &[frame])).await;
        account_wire_bytes(&self.conn, &self.wire);
        let frames = match outcome {
            Ok(Ok(frames)) => frames,
            Ok(Err(_)) => {
                // The session is over; so is the connection, so that the edge reconnects.
                self.handle(ClientEvent::Disconnected);
                self.close(b"stream failed");
                return Err(QueryFailure::Disconnected);
            }
            Err(_) => {
                self.session.lock().handle_timeout(deadline_us);
                let missed = self.missed.fetch_add(1, Ordering::Relaxed) + 1;
                let silent_us = self
                    .now()
                    .saturating_sub(self.last_answer_us.load(Ordering::Relaxed));
                let patience_us = UNRESPONSIVE_AFTER * deadline.as_micros() as u64;
                if missed >= UNRESPONSIVE_AFTER && silent_us >= patience_us {
                    self.close(b"cloud unresponsive: deadlines missed in a row");
                }
                return Err(QueryFailure::Timeout);
            }
        };
        self.missed.store(0, Ordering::Relaxed);
        self.last_answer_us.store(self.now(), Ordering::Relaxed);
        for f in frames {
            for a in self.handle(ClientEvent::Received(f)) {
                match a {
                    ClientAction::Answered(answer) if answer.query_id == id => return Ok(answer),
                    ClientAction::Failed { query_id, reason } if query_id == id => {
                        return Err(reason);
                    }
                    ClientAction::Close { message, .. } => self.close(message.as_bytes()),
                    _ => {}
                }
            }
        }
        Err(QueryFailure::Disconnected)
    }
}

/// Brings the cloud's idea of the cache in line with the cache: a cache of an older
/// incarnation of the collection is emptied (files set aside), and when the cloud's manifest
/// version is not the cache's, the cache's inventory is sent and the cloud adopts it.
async fn resync(
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
    if cache_version == Some(version) && cache.collection_id() == collection.id {
        return Ok(());
    }
    let mut inventory = cache.inventory();
    inventory.collection_id = collection.id;
    let held = inventory.vectors.len();
    let frames = exchange(conn, &[Frame::Inventory(inventory)])
        .await
        .map_err(|e| LinkError::Handshake(format!("resync: {}", e.message())))?;
    let now = started.elapsed().as_micros() as u64;
    for f in frames {
        for action in session.lock().handle(ClientEvent::Received(f), now) {
            match action {
                ClientAction::InventoryAcked(v) if v == version => {
                    metrics::counter!("tiervec_edge_resyncs_total").increment(1);
                    debug!(version, held, "cloud adopted the cache's inventory");
                    return Ok(());
                }
                ClientAction::Close { message, .. } => {
                    return Err(LinkError::Handshake(format!("resync refused: {message}")));
                }
                _ => {}
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
async fn accept_pushes(
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
