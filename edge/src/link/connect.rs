//! Connections: the [`Connector`], which outlives them (one endpoint, one rustls
//! configuration, so session tickets survive and a reconnection sends its first flight as
//! 0-RTT data), and the [`CloudLink`] it makes, which asks the cloud queries within deadlines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tiervec_shared::protocol::frame::{Answer, Query, WireCollection};
use tiervec_shared::protocol::session::{ClientAction, ClientEvent, ClientSession, QueryFailure};
use tiervec_shared::push::CacheAnnouncement;
use tracing::{Instrument, info_span, warn};

use super::push::{PushTarget, accept_pushes, resync};
use super::stream::{ExchangeError, account_wire_bytes, exchange};
use super::tls::{LinkConfig, LinkError, client_config};

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

/// Makes connections to the cloud, keeping the TLS session tickets between them.
pub struct Connector {
    endpoint: quinn::Endpoint,
    config: LinkConfig,
    push: Option<PushTarget>,
    /// The collections of the last handshake: what a query pipelined behind the next Hello
    /// may name.
    known: Mutex<Vec<WireCollection>>,
    /// Which cloud address the next connection goes to (an index into `cloud_addr` followed
    /// by `other_cloud_addrs`).
    target: AtomicUsize,
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
            target: AtomicUsize::new(0),
        })
    }

    /// The cloud address the next connection goes to.
    pub fn target(&self) -> SocketAddr {
        let i = self.target.load(Ordering::Relaxed) % (1 + self.config.other_cloud_addrs.len());
        match i {
            0 => self.config.cloud_addr,
            i => self.config.other_cloud_addrs[i - 1],
        }
    }

    /// Moves on to the next cloud address (after a lost link or a failed attempt: every node
    /// of a cluster answers alike, and the one just lost is likely down). Session tickets are
    /// per node, so the first connection to another node is a full handshake.
    pub fn fail_over(&self) {
        if !self.config.other_cloud_addrs.is_empty() {
            self.target.fetch_add(1, Ordering::Relaxed);
        }
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
            .connect(self.target(), &self.config.server_name)
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
/// is alive but not answering (or a path that stopped carrying answers) keeps the connection
/// looking alive until the idle timeout; closing it early lets the edge try a new connection
/// instead of degrading for seconds. (A cloud restarted after a crash resets the connection
/// itself: see the cloud's `quic::endpoint_config`.)
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

    /// Resolves when the connection ends, with why it ended.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
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
        if self.conn.close_reason().is_none() {
            let path = self.conn.stats().path;
            warn!(
                reason = %String::from_utf8_lossy(reason),
                rtt_ms = path.rtt.as_secs_f64() * 1e3,
                cwnd = path.cwnd,
                lost_packets = path.lost_packets,
                congestion_events = path.congestion_events,
                "closing the link to the cloud"
            );
        }
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
