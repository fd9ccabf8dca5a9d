//! The two sides of a connection as sans-IO state machines: they take events (`handle`) and
//! the time (`now_us`, microseconds on any monotonic clock the driver chooses) and return
//! actions for the driver to perform. No sockets, no clock: tested deterministically.
//!
//! Version rule: the edge announces `[min_version, version]`; the cloud answers with
//! `min(version, its own)` if that is at least both minimums, and otherwise refuses with
//! `VersionMismatch` and closes. So an old edge talks to a newer cloud at the edge's version,
//! and a newer edge to an old cloud at the cloud's, as long as the ranges overlap.

use std::collections::BTreeMap;

use super::frame::{
    Answer, DEFAULT_MAX_FRAME, ErrorCode, ErrorFrame, Frame, FrameError, Hello, InventoryPart,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Query, SnapshotBegin, WireCollection,
};
use crate::Metric;
use crate::push::{CacheAnnouncement, Delta, Inventory, MAX_INVENTORY_ITEMS};
use crate::query::validate_search;

/// Why a query sent to the cloud got no answer.
#[derive(Clone, Debug, PartialEq)]
pub enum QueryFailure {
    /// The deadline passed first.
    Timeout,
    /// The session was not connected.
    NotReady,
    /// The connection went away with the query in flight.
    Disconnected,
    /// The cloud refused it.
    Refused { code: ErrorCode, message: String },
}

/// What the edge's driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientAction {
    Send(Frame),
    /// The handshake finished: the collections this edge may query, and the manifest version
    /// the cloud believes the edge's cache is at.
    Ready {
        version: u16,
        collections: Vec<WireCollection>,
        cache_version: Option<u64>,
    },
    Answered(Answer),
    /// Apply this delta to the cache, make it durable, then send `DeltaAck(version)`.
    ApplyDelta(Delta),
    /// A whole cache follows on this stream as a snapshot file: check it with a
    /// `transfer::SnapshotReceiver`, install it durably, then send `DeltaAck(version)`.
    SnapshotBegin(SnapshotBegin),
    /// The next bytes of the snapshot file this stream's `SnapshotBegin` announced.
    SnapshotChunk(Vec<u8>),
    /// The cloud adopted the inventory the edge sent.
    InventoryAcked(u64),
    Failed {
        query_id: u64,
        reason: QueryFailure,
    },
    /// Close the connection (and reconnect with backoff).
    Close {
        code: ErrorCode,
        message: String,
    },
}

/// What happens to the edge's session.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientEvent {
    Connected,
    Received(Frame),
    /// The driver could not decode a frame from the cloud.
    BadFrame(FrameError),
    /// The application wants this query answered by `deadline_us`.
    Ask {
        query: Query,
        deadline_us: u64,
    },
    Disconnected,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    Disconnected,
    Handshaking,
    Ready(u16),
}

/// The edge side of a connection.
#[derive(Debug)]
pub struct ClientSession {
    hello: Hello,
    state: ClientState,
    /// Queries in flight: id → deadline.
    in_flight: BTreeMap<u64, u64>,
}

impl ClientSession {
    pub fn new(edge_name: &str, cache: Option<CacheAnnouncement>) -> ClientSession {
        ClientSession {
            hello: Hello {
                version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                edge_name: edge_name.to_owned(),
                cache,
            },
            state: ClientState::Disconnected,
            in_flight: BTreeMap::new(),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, ClientState::Ready(_))
    }

    /// The frames that send `inventory`, each on its own stream, in order: one `Inventory`
    /// frame when it fits a frame, else `InventoryPart`s. Refused before anything is sent when
    /// the inventory lists more than [`MAX_INVENTORY_ITEMS`].
    pub fn inventory_flight(&self, inventory: Inventory) -> Result<Vec<Frame>, String> {
        let ClientState::Ready(_) = self.state else {
            return Err("no connection to send the inventory on".into());
        };
        if inventory.items() > MAX_INVENTORY_ITEMS {
            return Err(format!(
                "the inventory lists {} items, more than the protocol's {MAX_INVENTORY_ITEMS}",
                inventory.items()
            ));
        }
        if inventory.archived_bytes() <= DEFAULT_MAX_FRAME {
            return Ok(vec![Frame::Inventory(inventory)]);
        }
        let parts = inventory.split(DEFAULT_MAX_FRAME);
        let count = parts.len();
        Ok(parts
            .into_iter()
            .enumerate()
            .map(|(i, inventory)| {
                Frame::InventoryPart(InventoryPart {
                    last: i + 1 == count,
                    inventory,
                })
            })
            .collect())
    }

    /// The earliest deadline among queries in flight: when to call [`ClientSession::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<u64> {
        self.in_flight.values().min().copied()
    }

    /// Fails every query whose deadline is at or before `now_us`.
    pub fn handle_timeout(&mut self, now_us: u64) -> Vec<ClientAction> {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, d)| **d <= now_us)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .map(|query_id| {
                self.in_flight.remove(&query_id);
                ClientAction::Failed {
                    query_id,
                    reason: QueryFailure::Timeout,
                }
            })
            .collect()
    }

    fn fail_all(&mut self, reason: QueryFailure) -> Vec<ClientAction> {
        std::mem::take(&mut self.in_flight)
            .into_keys()
            .map(|query_id| ClientAction::Failed {
                query_id,
                reason: reason.clone(),
            })
            .collect()
    }

    pub fn handle(&mut self, event: ClientEvent, now_us: u64) -> Vec<ClientAction> {
        let mut actions = self.handle_timeout(now_us);
        match event {
            ClientEvent::Connected => {
                self.state = ClientState::Handshaking;
                actions.push(ClientAction::Send(Frame::Hello(self.hello.clone())));
            }
            ClientEvent::Disconnected => {
                self.state = ClientState::Disconnected;
                actions.extend(self.fail_all(QueryFailure::Disconnected));
            }
            // A query asked during the handshake is pipelined behind the Hello: the driver
            // sends both in one flight (0-RTT on a resumed connection), and the cloud, which
            // reads a stream's frames in order, answers the Hello before the query.
            ClientEvent::Ask { query, deadline_us } => {
                if self.state == ClientState::Disconnected {
                    actions.push(ClientAction::Failed {
                        query_id: query.query_id,
                        reason: QueryFailure::NotReady,
                    });
                } else {
                    self.in_flight.insert(query.query_id, deadline_us);
                    actions.push(ClientAction::Send(Frame::Query(query)));
                }
            }
            ClientEvent::BadFrame(e) => {
                actions.push(ClientAction::Close {
                    code: e.code(),
                    message: e.to_string(),
                });
                self.state = ClientState::Disconnected;
                actions.extend(self.fail_all(QueryFailure::Disconnected));
            }
            ClientEvent::Received(frame) => actions.extend(self.receive(frame)),
        }
        actions
    }

    fn receive(&mut self, frame: Frame) -> Vec<ClientAction> {
        match (self.state, frame) {
            (ClientState::Handshaking, Frame::HelloAck(ack)) => {
                if ack.version < self.hello.min_version || ack.version > self.hello.version {
                    self.state = ClientState::Disconnected;
                    let mut actions = vec![ClientAction::Close {
                        code: ErrorCode::VersionMismatch,
                        message: format!(
                            "cloud chose version {} outside {}..={}",
                            ack.version, self.hello.min_version, self.hello.version
                        ),
                    }];
                    // Queries pipelined behind the Hello die with the session.
                    actions.extend(self.fail_all(QueryFailure::Disconnected));
                    return actions;
                }
                self.state = ClientState::Ready(ack.version);
                vec![ClientAction::Ready {
                    version: ack.version,
                    collections: ack.collections,
                    cache_version: ack.cache_version,
                }]
            }
            (ClientState::Ready(_), Frame::Delta(delta)) => vec![ClientAction::ApplyDelta(delta)],
            (ClientState::Ready(_), Frame::SnapshotBegin(begin)) => {
                vec![ClientAction::SnapshotBegin(begin)]
            }
            (ClientState::Ready(_), Frame::SnapshotChunk(bytes)) => {
                vec![ClientAction::SnapshotChunk(bytes)]
            }
            (ClientState::Ready(_), Frame::InventoryAck(v)) => {
                vec![ClientAction::InventoryAcked(v)]
            }
            (ClientState::Ready(_), Frame::Answer(answer)) => {
                match self.in_flight.remove(&answer.query_id) {
                    Some(_) => vec![ClientAction::Answered(answer)],
                    // A late answer to a query that already timed out: nobody waits for it.
                    None => Vec::new(),
                }
            }
            (_, Frame::Error(e)) if e.query_id != 0 => match self.in_flight.remove(&e.query_id) {
                Some(_) => vec![ClientAction::Failed {
                    query_id: e.query_id,
                    reason: QueryFailure::Refused {
                        code: ErrorCode::from_u16(e.code).unwrap_or(ErrorCode::Internal),
                        message: e.message,
                    },
                }],
                None => Vec::new(),
            },
            (_, Frame::Error(e)) => {
                self.state = ClientState::Disconnected;
                let mut actions = vec![ClientAction::Close {
                    code: ErrorCode::from_u16(e.code).unwrap_or(ErrorCode::Internal),
                    message: e.message,
                }];
                actions.extend(self.fail_all(QueryFailure::Disconnected));
                actions
            }
            (_, Frame::Ping(n)) => vec![ClientAction::Send(Frame::Pong(n))],
            (_, Frame::Pong(_)) => Vec::new(),
            (_, other) => {
                self.state = ClientState::Disconnected;
                let mut actions = vec![ClientAction::Close {
                    code: ErrorCode::Unexpected,
                    message: format!(
                        "unexpected frame type {} from the cloud",
                        other.frame_type()
                    ),
                }];
                actions.extend(self.fail_all(QueryFailure::Disconnected));
                actions
            }
        }
    }
}

/// What the cloud's driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerAction {
    Send(Frame),
    /// Run this (validated) query and reply with a [`Frame::Answer`] (or an error frame).
    Search(Query),
    /// The edge keeps a cache of this (allowed) collection: push into it. `told` is the
    /// manifest version the `HelloAck` gave the edge: when it is not the cache's, the edge
    /// sends its inventory before anything can be pushed.
    CacheAnnounced {
        cache: CacheAnnouncement,
        told: Option<u64>,
    },
    /// The edge says its cache holds exactly this: adopt it (durably), reply `InventoryAck`.
    Resync(Inventory),
    /// Count a refused frame or query (metrics), by reason.
    Refused(ErrorCode),
    Close {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    AwaitingHello,
    Ready(u16),
    Closed,
}

/// The cloud side of one edge's connection. `collections` are those this edge may query;
/// `cache_versions` the manifest version the cloud holds for this edge's cache of each
/// (by collection identity).
#[derive(Debug)]
pub struct ServerSession {
    collections: Vec<WireCollection>,
    cache_versions: Vec<([u8; 16], u64)>,
    state: ServerState,
    /// The parts of an inventory received so far (its last part not yet).
    gathering: Option<Inventory>,
}

impl ServerSession {
    pub fn new(
        collections: Vec<WireCollection>,
        cache_versions: Vec<([u8; 16], u64)>,
    ) -> ServerSession {
        ServerSession {
            collections,
            cache_versions,
            state: ServerState::AwaitingHello,
            gathering: None,
        }
    }

    pub fn version(&self) -> Option<u16> {
        match self.state {
            ServerState::Ready(v) => Some(v),
            _ => None,
        }
    }

    fn refuse(query_id: u64, code: ErrorCode, message: String) -> Vec<ServerAction> {
        vec![
            ServerAction::Refused(code),
            ServerAction::Send(Frame::Error(ErrorFrame {
                query_id,
                code: code as u16,
                message,
            })),
        ]
    }

    fn close(&mut self, code: ErrorCode, message: String) -> Vec<ServerAction> {
        self.state = ServerState::Closed;
        let mut a = Self::refuse(0, code, message.clone());
        a.push(ServerAction::Close { code, message });
        a
    }

    /// A frame the driver could not decode: refused, counted, and the connection closed only
    /// when the stream can no longer be trusted (an oversized or unparseable frame).
    pub fn bad_frame(&mut self, e: &FrameError) -> Vec<ServerAction> {
        match e {
            FrameError::UnknownType(_) => Self::refuse(0, e.code(), e.to_string()),
            _ => self.close(e.code(), e.to_string()),
        }
    }

    /// A frame that arrived as 0-RTT data, before the handshake is confirmed. Anyone who
    /// recorded an edge's early flight can replay it, so only frames whose replay changes
    /// nothing durable are handled now (Hello, Query, Ping, Pong: a query that may be a replay
    /// is answered but not counted, see the driver); any other is handed back, for the driver
    /// to pass to [`ServerSession::handle`] once the handshake completes, or to drop if it
    /// never does.
    pub fn handle_early(&mut self, frame: Frame) -> Result<Vec<ServerAction>, Box<Frame>> {
        match frame {
            Frame::Hello(_) | Frame::Query(_) | Frame::Ping(_) | Frame::Pong(_) => {
                Ok(self.handle(frame))
            }
            other => Err(Box::new(other)),
        }
    }

    pub fn handle(&mut self, frame: Frame) -> Vec<ServerAction> {
        match (self.state, frame) {
            (ServerState::Closed, _) => Vec::new(),
            (ServerState::AwaitingHello, Frame::Hello(h)) => {
                let version = h.version.min(PROTOCOL_VERSION);
                if version < h.min_version.max(MIN_PROTOCOL_VERSION) {
                    return self.close(
                        ErrorCode::VersionMismatch,
                        format!(
                            "edge speaks versions {}..={}, this cloud {}..={}",
                            h.min_version, h.version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
                        ),
                    );
                }
                self.state = ServerState::Ready(version);
                // A cache of a collection this edge may not query is not pushed into.
                let cache = h
                    .cache
                    .filter(|c| self.collections.iter().any(|w| w.name == c.collection));
                let cache_version = cache.as_ref().and_then(|c| {
                    self.cache_versions
                        .iter()
                        .find(|(id, _)| *id == c.collection_id)
                        .map(|(_, v)| *v)
                });
                let mut actions = vec![ServerAction::Send(Frame::HelloAck(
                    super::frame::HelloAck {
                        version,
                        collections: self.collections.clone(),
                        cache_version,
                    },
                ))];
                actions.extend(cache.map(|cache| ServerAction::CacheAnnounced {
                    cache,
                    told: cache_version,
                }));
                actions
            }
            (ServerState::Ready(_), Frame::Query(q)) => self.check_query(q),
            (ServerState::Ready(_), Frame::Inventory(inv)) => {
                self.gathering = None;
                self.adopt(inv)
            }
            (ServerState::Ready(_), Frame::InventoryPart(part)) => self.gather(part),
            (_, Frame::Ping(n)) => vec![ServerAction::Send(Frame::Pong(n))],
            (_, Frame::Pong(_)) => Vec::new(),
            (_, other) => self.close(
                ErrorCode::Unexpected,
                format!("frame type {} is not expected now", other.frame_type()),
            ),
        }
    }

    /// Adds a part to the inventory being gathered; a part of another collection or version
    /// than the parts before it starts a new one (the edge began its resync again).
    fn gather(&mut self, part: InventoryPart) -> Vec<ServerAction> {
        let InventoryPart { last, inventory } = part;
        let gathered = match self.gathering.take() {
            Some(mut so_far)
                if (so_far.collection_id, so_far.version)
                    == (inventory.collection_id, inventory.version) =>
            {
                if so_far.items() + inventory.items() > MAX_INVENTORY_ITEMS {
                    return self.close(
                        ErrorCode::FrameTooLarge,
                        format!("an inventory may list at most {MAX_INVENTORY_ITEMS} items"),
                    );
                }
                so_far.extend(inventory);
                so_far
            }
            _ => inventory,
        };
        if last {
            self.adopt(gathered)
        } else {
            self.gathering = Some(gathered);
            Vec::new()
        }
    }

    /// A whole inventory: adopted if it fits the limit and names a collection the edge may cache.
    fn adopt(&mut self, inventory: Inventory) -> Vec<ServerAction> {
        if inventory.items() > MAX_INVENTORY_ITEMS {
            return self.close(
                ErrorCode::FrameTooLarge,
                format!("an inventory may list at most {MAX_INVENTORY_ITEMS} items"),
            );
        }
        if self
            .collections
            .iter()
            .any(|c| c.id == inventory.collection_id)
        {
            vec![ServerAction::Resync(inventory)]
        } else {
            Self::refuse(
                0,
                ErrorCode::NotAllowed,
                "inventory of a collection this edge may not cache".into(),
            )
        }
    }

    fn check_query(&mut self, q: Query) -> Vec<ServerAction> {
        let Some(c) = self.collections.iter().find(|c| c.name == q.collection) else {
            return Self::refuse(
                q.query_id,
                ErrorCode::NotAllowed,
                format!(
                    "collection `{}` does not exist or this edge may not query it",
                    q.collection
                ),
            );
        };
        if c.id != q.collection_id {
            return Self::refuse(
                q.query_id,
                ErrorCode::UnknownCollection,
                format!(
                    "collection `{}` was recreated; the edge's cache belongs to an older incarnation",
                    q.collection
                ),
            );
        }
        if let Err(e) = validate_search(&q.vector, c.dim as usize, q.k as usize, q.ef as usize) {
            return Self::refuse(q.query_id, ErrorCode::BadQuery, e.to_string());
        }
        if Metric::from_code(c.metric).is_none() {
            return Self::refuse(
                q.query_id,
                ErrorCode::Internal,
                "collection has an unknown metric".into(),
            );
        }
        vec![ServerAction::Search(q)]
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{FrameDecoder, WireHit};
    use super::*;

    fn collections() -> Vec<WireCollection> {
        vec![WireCollection {
            name: "c".into(),
            id: [1; 16],
            dim: 3,
            metric: Metric::Cosine.code(),
            model_checksum: None,
        }]
    }

    fn query(id: u64) -> Query {
        Query {
            query_id: id,
            collection: "c".into(),
            collection_id: [1; 16],
            vector: vec![1.0, 0.0, 0.0],
            k: 2,
            ef: 16,
            span_id: 5,
            shadow: false,
            with_payload: false,
        }
    }

    /// Carries frames between the two sessions through the real encoder and decoder.
    fn wire(frame: &Frame) -> Frame {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(&bytes).unwrap();
        d.next_frame().unwrap().unwrap()
    }

    fn sent(actions: &[ClientAction]) -> Vec<Frame> {
        actions
            .iter()
            .filter_map(|a| {
                if let ClientAction::Send(f) = a {
                    Some(wire(f))
                } else {
                    None
                }
            })
            .collect()
    }

    fn handshake() -> (ClientSession, ServerSession) {
        let mut edge = ClientSession::new("e", None);
        let mut cloud = ServerSession::new(collections(), Vec::new());
        let hello = sent(&edge.handle(ClientEvent::Connected, 0));
        let replies = cloud.handle(hello[0].clone());
        let ServerAction::Send(ack) = &replies[0] else {
            panic!("{replies:?}")
        };
        let ready = edge.handle(ClientEvent::Received(wire(ack)), 1);
        assert!(
            matches!(&ready[0], ClientAction::Ready { version: PROTOCOL_VERSION, collections, .. } if collections.len() == 1)
        );
        (edge, cloud)
    }

    #[test]
    fn query_round_trip_through_both_sessions() {
        let (mut edge, mut cloud) = handshake();
        let out = sent(&edge.handle(
            ClientEvent::Ask {
                query: query(9),
                deadline_us: 50_000,
            },
            10,
        ));
        let actions = cloud.handle(out[0].clone());
        let ServerAction::Search(q) = &actions[0] else {
            panic!("{actions:?}")
        };
        let answer = Answer {
            query_id: q.query_id,
            collection_id: q.collection_id,
            hits: vec![WireHit {
                id: 4,
                distance: 0.0,
                lsn: 2,
            }],
            took_us: 80,
            payloads: vec![],
        };
        let got = edge.handle(
            ClientEvent::Received(wire(&Frame::Answer(answer.clone()))),
            200,
        );
        assert_eq!(got, vec![ClientAction::Answered(answer)]);
        assert_eq!(edge.poll_timeout(), None);
    }

    #[test]
    fn deadlines_expire_and_late_answers_are_dropped() {
        let (mut edge, _) = handshake();
        edge.handle(
            ClientEvent::Ask {
                query: query(1),
                deadline_us: 100,
            },
            10,
        );
        edge.handle(
            ClientEvent::Ask {
                query: query(2),
                deadline_us: 300,
            },
            20,
        );
        assert_eq!(edge.poll_timeout(), Some(100));
        assert_eq!(
            edge.handle_timeout(150),
            vec![ClientAction::Failed {
                query_id: 1,
                reason: QueryFailure::Timeout
            }]
        );
        let late = Answer {
            query_id: 1,
            collection_id: [1; 16],
            hits: vec![],
            took_us: 1,
            payloads: vec![],
        };
        assert!(
            edge.handle(ClientEvent::Received(Frame::Answer(late)), 160)
                .is_empty()
        );
        let gone = edge.handle(ClientEvent::Disconnected, 170);
        assert_eq!(
            gone,
            vec![ClientAction::Failed {
                query_id: 2,
                reason: QueryFailure::Disconnected
            }]
        );
        let early = edge.handle(
            ClientEvent::Ask {
                query: query(3),
                deadline_us: 500,
            },
            180,
        );
        assert_eq!(
            early,
            vec![ClientAction::Failed {
                query_id: 3,
                reason: QueryFailure::NotReady
            }]
        );
    }

    #[test]
    fn bad_queries_are_refused_per_query_and_the_session_lives_on() {
        let (mut edge, mut cloud) = handshake();
        let cases = [
            (
                Query {
                    vector: vec![1.0, 0.0],
                    ..query(1)
                },
                ErrorCode::BadQuery,
            ),
            (
                Query {
                    vector: vec![f32::NAN, 0.0, 0.0],
                    ..query(2)
                },
                ErrorCode::BadQuery,
            ),
            (Query { k: 0, ..query(3) }, ErrorCode::BadQuery),
            (
                Query {
                    collection: "secret".into(),
                    ..query(4)
                },
                ErrorCode::NotAllowed,
            ),
            (
                Query {
                    collection_id: [2; 16],
                    ..query(5)
                },
                ErrorCode::UnknownCollection,
            ),
        ];
        for (q, code) in cases {
            let id = q.query_id;
            edge.handle(
                ClientEvent::Ask {
                    query: q.clone(),
                    deadline_us: 1_000_000,
                },
                10,
            );
            let actions = cloud.handle(Frame::Query(q));
            assert_eq!(actions[0], ServerAction::Refused(code));
            let ServerAction::Send(err) = &actions[1] else {
                panic!()
            };
            let failed = edge.handle(ClientEvent::Received(wire(err)), 20);
            assert!(
                matches!(&failed[0], ClientAction::Failed { query_id, reason: QueryFailure::Refused { code: c, .. } } if *query_id == id && *c == code)
            );
        }
        assert!(matches!(
            cloud.handle(Frame::Query(query(6)))[0],
            ServerAction::Search(_)
        ));
    }

    #[test]
    fn version_ranges_must_overlap() {
        let mut cloud = ServerSession::new(collections(), Vec::new());
        let newer = Hello {
            version: PROTOCOL_VERSION + 3,
            min_version: PROTOCOL_VERSION + 1,
            edge_name: "future".into(),
            cache: None,
        };
        let a = cloud.handle(Frame::Hello(newer));
        assert!(matches!(
            a.last(),
            Some(ServerAction::Close {
                code: ErrorCode::VersionMismatch,
                ..
            })
        ));
        assert!(
            cloud.handle(Frame::Query(query(1))).is_empty(),
            "a closed session ignores the rest"
        );

        let mut cloud = ServerSession::new(collections(), Vec::new());
        let wide = Hello {
            version: 9,
            min_version: 1,
            edge_name: "newer edge".into(),
            cache: None,
        };
        let a = cloud.handle(Frame::Hello(wide));
        assert!(
            matches!(&a[0], ServerAction::Send(Frame::HelloAck(ack)) if ack.version == PROTOCOL_VERSION)
        );

        let mut edge = ClientSession::new("e", None);
        edge.handle(ClientEvent::Connected, 0);
        let bad_ack = super::super::frame::HelloAck {
            version: 9,
            collections: vec![],
            cache_version: None,
        };
        let a = edge.handle(ClientEvent::Received(Frame::HelloAck(bad_ack)), 1);
        assert!(matches!(
            &a[0],
            ClientAction::Close {
                code: ErrorCode::VersionMismatch,
                ..
            }
        ));
    }

    #[test]
    fn frames_out_of_order_close_the_session() {
        let mut cloud = ServerSession::new(collections(), Vec::new());
        let a = cloud.handle(Frame::Query(query(1)));
        assert_eq!(a[0], ServerAction::Refused(ErrorCode::Unexpected));
        assert!(matches!(
            a.last(),
            Some(ServerAction::Close {
                code: ErrorCode::Unexpected,
                ..
            })
        ));

        let mut cloud = ServerSession::new(collections(), Vec::new());
        let a = cloud.bad_frame(&FrameError::UnknownType(99));
        assert_eq!(a[0], ServerAction::Refused(ErrorCode::UnknownFrameType));
        assert!(
            !a.iter().any(|x| matches!(x, ServerAction::Close { .. })),
            "an unknown type is skipped, not fatal"
        );
        let a = cloud.bad_frame(&FrameError::TooLarge { len: 10, max: 5 });
        assert!(matches!(
            a.last(),
            Some(ServerAction::Close {
                code: ErrorCode::FrameTooLarge,
                ..
            })
        ));
        assert_eq!(cloud.handle(Frame::Ping(3)), Vec::new(), "closed");

        // A push is acknowledged on the stream the cloud opened for it
        // (`cache::check_push_ack`); an acknowledgement on a stream the edge opened is a
        // protocol error, not something to ignore.
        let (_, mut cloud) = handshake();
        assert!(matches!(
            cloud.handle(Frame::DeltaAck(5)).last(),
            Some(ServerAction::Close {
                code: ErrorCode::Unexpected,
                ..
            })
        ));
    }

    #[test]
    fn only_replay_safe_frames_are_handled_as_early_data() {
        // Early (0-RTT) data: an inventory would be logged before the handshake proves the
        // flight is not a replay, so it waits; queries and pings are answered at once.
        let (_, mut cloud) = handshake();
        let inventory = Frame::Inventory(Inventory {
            collection_id: [1; 16],
            ..Inventory::default()
        });
        assert_eq!(
            cloud.handle_early(inventory.clone()),
            Err(Box::new(inventory))
        );
        assert_eq!(
            cloud.handle_early(Frame::Ping(4)),
            Ok(vec![ServerAction::Send(Frame::Pong(4))])
        );
        assert!(matches!(
            cloud.handle_early(Frame::Query(query(1))).as_deref(),
            Ok([ServerAction::Search(_)])
        ));
    }

    #[test]
    fn a_query_asked_during_the_handshake_rides_behind_the_hello() {
        let mut edge = ClientSession::new("e", None);
        let mut cloud = ServerSession::new(collections(), Vec::new());
        let mut flight = sent(&edge.handle(ClientEvent::Connected, 0));
        flight.extend(sent(&edge.handle(
            ClientEvent::Ask {
                query: query(7),
                deadline_us: 1_000,
            },
            1,
        )));
        assert!(matches!(
            flight.as_slice(),
            [Frame::Hello(_), Frame::Query(_)]
        ));
        let mut replies = Vec::new();
        for frame in flight {
            for action in cloud.handle(frame) {
                match action {
                    ServerAction::Send(f) => replies.push(f),
                    ServerAction::Search(q) => replies.push(Frame::Answer(Answer {
                        query_id: q.query_id,
                        collection_id: q.collection_id,
                        hits: vec![],
                        took_us: 1,
                        payloads: vec![],
                    })),
                    other => panic!("{other:?}"),
                }
            }
        }
        let actions: Vec<ClientAction> = replies
            .iter()
            .flat_map(|f| edge.handle(ClientEvent::Received(wire(f)), 2))
            .collect();
        assert!(matches!(actions[0], ClientAction::Ready { .. }));
        assert!(matches!(&actions[1], ClientAction::Answered(a) if a.query_id == 7));
        assert_eq!(edge.poll_timeout(), None);
    }

    fn held(count: u64) -> Inventory {
        Inventory {
            collection_id: [1; 16],
            version: 4,
            vectors: (0..count)
                .map(|id| crate::push::HeldVector {
                    id,
                    lsn: id,
                    bytes: 24,
                })
                .collect(),
            anchors: vec![(7, vec![1, 2, 3])],
        }
    }

    /// An inventory larger than a frame goes in parts, each through the real encoder within
    /// the frame limit; the cloud adopts it whole at the last part and not before.
    #[test]
    fn an_inventory_larger_than_a_frame_is_sent_in_parts_and_adopted_whole() {
        let (edge, mut cloud) = handshake();
        let whole = held(400_000);
        let flight = edge.inventory_flight(whole.clone()).unwrap();
        assert_eq!(flight.len(), 3);
        let count = flight.len();
        for (i, frame) in flight.iter().enumerate() {
            let mut bytes = Vec::new();
            frame.encode(&mut bytes);
            assert!(bytes.len() <= DEFAULT_MAX_FRAME + super::super::frame::PREFIX_LEN);
            let actions = cloud.handle(wire(frame));
            if i + 1 < count {
                assert_eq!(actions, vec![], "part {i}");
            } else {
                assert_eq!(actions, vec![ServerAction::Resync(whole.clone())]);
            }
        }
        // A small one still goes as one frame.
        assert!(matches!(
            &edge.inventory_flight(held(10)).unwrap()[..],
            [Frame::Inventory(_)]
        ));
        // A resync begun again (another version) drops the parts gathered before it.
        let mut later = held(400_000);
        later.version = 5;
        let first = edge.inventory_flight(whole).unwrap().remove(0);
        assert_eq!(cloud.handle(first), vec![]);
        let mut actions = Vec::new();
        for frame in edge.inventory_flight(later.clone()).unwrap() {
            actions = cloud.handle(frame);
        }
        assert_eq!(actions, vec![ServerAction::Resync(later)]);
    }

    /// Past the item limit: the edge does not send it, and a cloud sent one closes the
    /// connection.
    #[test]
    fn inventories_past_the_limit_are_refused() {
        let (edge, mut cloud) = handshake();
        let over = held(MAX_INVENTORY_ITEMS as u64 - 3);
        assert_eq!(over.items(), MAX_INVENTORY_ITEMS + 1);
        assert!(edge.inventory_flight(over.clone()).is_err());
        let at = held(MAX_INVENTORY_ITEMS as u64 - 4);
        let frames = edge.inventory_flight(at.clone()).unwrap();
        let mut last = Vec::new();
        for frame in frames {
            last = cloud.handle(frame);
        }
        assert_eq!(last, vec![ServerAction::Resync(at)]);
        let mut parts = over.split(DEFAULT_MAX_FRAME);
        let final_part = parts.pop().unwrap();
        for part in parts {
            assert_eq!(
                cloud.handle(Frame::InventoryPart(InventoryPart {
                    last: false,
                    inventory: part
                })),
                vec![]
            );
        }
        let closed = cloud.handle(Frame::InventoryPart(InventoryPart {
            last: true,
            inventory: final_part,
        }));
        assert!(
            closed.iter().any(|a| matches!(
                a,
                ServerAction::Close {
                    code: ErrorCode::FrameTooLarge,
                    ..
                }
            )),
            "{closed:?}"
        );
    }

    #[test]
    fn a_cache_is_announced_resynced_and_pushed_into() {
        let announced = CacheAnnouncement {
            collection: "c".into(),
            collection_id: [1; 16],
            version: 4,
            budget_bytes: 1 << 20,
            certify: false,
        };
        let mut edge = ClientSession::new("e", Some(announced.clone()));
        let mut cloud = ServerSession::new(collections(), vec![([1; 16], 6)]);
        let hello = sent(&edge.handle(ClientEvent::Connected, 0));
        let replies = cloud.handle(hello[0].clone());
        assert_eq!(
            replies[1],
            ServerAction::CacheAnnounced {
                cache: announced.clone(),
                told: Some(6)
            },
            "the driver learns the budget"
        );
        let ServerAction::Send(ack) = &replies[0] else {
            panic!("{replies:?}")
        };
        let ready = edge.handle(ClientEvent::Received(wire(ack)), 1);
        assert!(
            matches!(
                &ready[0],
                ClientAction::Ready {
                    cache_version: Some(6),
                    ..
                }
            ),
            "the cloud's idea (6) differs from the edge's (4): the edge sends an inventory"
        );
        let inventory = Inventory {
            collection_id: [1; 16],
            version: 4,
            ..Inventory::default()
        };
        assert_eq!(
            cloud.handle(wire(&Frame::Inventory(inventory.clone()))),
            vec![ServerAction::Resync(inventory)]
        );
        let foreign = Inventory {
            collection_id: [9; 16],
            ..Inventory::default()
        };
        assert_eq!(
            cloud.handle(Frame::Inventory(foreign))[0],
            ServerAction::Refused(ErrorCode::NotAllowed)
        );
        assert_eq!(
            edge.handle(ClientEvent::Received(wire(&Frame::InventoryAck(4))), 2),
            vec![ClientAction::InventoryAcked(4)]
        );
        let delta = Delta {
            collection_id: [1; 16],
            version: 5,
            ..Delta::default()
        };
        assert_eq!(
            edge.handle(ClientEvent::Received(wire(&Frame::Delta(delta.clone()))), 3),
            vec![ClientAction::ApplyDelta(delta)]
        );
        let begin = SnapshotBegin {
            collection_id: [1; 16],
            version: 6,
            len: 2,
            checksum: 0,
        };
        assert_eq!(
            edge.handle(ClientEvent::Received(wire(&Frame::SnapshotBegin(begin))), 4),
            vec![ClientAction::SnapshotBegin(begin)]
        );
        assert_eq!(
            edge.handle(
                ClientEvent::Received(wire(&Frame::SnapshotChunk(vec![1, 2]))),
                4
            ),
            vec![ClientAction::SnapshotChunk(vec![1, 2])]
        );

        let mut cloud = ServerSession::new(collections(), Vec::new());
        let foreign_cache = Hello {
            cache: Some(CacheAnnouncement {
                collection: "secret".into(),
                ..announced
            }),
            ..match &hello[0] {
                Frame::Hello(h) => h.clone(),
                other => panic!("{other:?}"),
            }
        };
        let replies = cloud.handle(Frame::Hello(foreign_cache));
        assert_eq!(
            replies.len(),
            1,
            "no push into a collection the edge may not query"
        );
    }
}
