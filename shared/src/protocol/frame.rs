//! Frames of the edge–cloud protocol, version 6: a 5-byte prefix (body length `u32` LE, frame
//! type `u8`) and an rkyv body, validated with bytecheck before use. The length is checked
//! against the configured maximum before anything is buffered or allocated.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

use crate::push::{CacheAnnouncement, Delta, Inventory};

/// The protocol version this build speaks, and the oldest it still accepts.
/// Version 2 added the push frames and the cache announcement; version 3 certificates (anchor
/// radii, certificate updates, the announcement's `certify`); version 4 whole caches streamed
/// as snapshot files (`SnapshotBegin`, `SnapshotChunk`); version 5 inventories larger than a
/// frame, sent in parts (`InventoryPart`); version 6 payloads on answers (the query's
/// `with_payload`, the answer's `payloads`, `AnswerTooLarge`). The query and answer frames
/// changed layout in 6, so older peers are refused.
pub const PROTOCOL_VERSION: u16 = 6;
pub const MIN_PROTOCOL_VERSION: u16 = 6;
/// ALPN of QUIC connections carrying this protocol.
pub const ALPN: &[u8] = b"tiervec/1";
/// Default largest frame body (a 1,024-dim query or a k=1,024 answer is far below).
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;
/// Bytes before a frame's body.
pub const PREFIX_LEN: usize = 5;

/// The edge's opening frame.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hello {
    /// Highest protocol version the edge speaks.
    pub version: u16,
    /// Lowest protocol version the edge accepts.
    pub min_version: u16,
    /// The edge's name for logs (its identity proper comes from its TLS certificate).
    pub edge_name: String,
    /// The cache the cloud may push into, if the edge keeps one.
    pub cache: Option<CacheAnnouncement>,
}

/// A collection as the cloud announces it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WireCollection {
    pub name: String,
    pub id: [u8; 16],
    pub dim: u32,
    pub metric: u8,
    /// The checksum of the embedding model the collection records (version 6; `None`: made
    /// from vectors): an edge embedding texts with another model refuses them.
    pub model_checksum: Option<u64>,
}

/// The cloud's answer to [`Hello`]: the version chosen and the collections this edge may query.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HelloAck {
    pub version: u16,
    pub collections: Vec<WireCollection>,
    /// The manifest version the cloud believes the announced cache is at (`None`: it knows
    /// nothing of it). When it differs from the edge's, the edge sends an [`Inventory`].
    pub cache_version: Option<u64>,
}

/// One part of an inventory sent in several ([`Inventory::split`]).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InventoryPart {
    /// Whether this part is the inventory's last.
    pub last: bool,
    pub inventory: Inventory,
}

/// A search the edge could not answer confidently.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Query {
    pub query_id: u64,
    pub collection: String,
    /// Identity the edge's cache belongs to: a recreated collection is refused, not mixed.
    pub collection_id: [u8; 16],
    pub vector: Vec<f32>,
    pub k: u32,
    pub ef: u32,
    /// The edge's tracing span id, so the cloud's span can name its parent.
    pub span_id: u64,
    /// A shadow query (measuring the edge's accuracy) that must not count towards hotness.
    pub shadow: bool,
    /// Return each hit's payload (version 6); an answer too large for a frame with them is
    /// refused with [`ErrorCode::AnswerTooLarge`].
    pub with_payload: bool,
}

/// One hit of an [`Answer`].
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct WireHit {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
}

/// The cloud's answer to a [`Query`].
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Answer {
    pub query_id: u64,
    pub collection_id: [u8; 16],
    pub hits: Vec<WireHit>,
    pub took_us: u32,
    /// With `with_payload`: one entry per hit, in order, the payload as a JSON text (`None`: the
    /// point has none); otherwise empty.
    pub payloads: Vec<Option<String>>,
}

/// Why a frame or a query was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    VersionMismatch = 1,
    UnknownCollection = 2,
    NotAllowed = 3,
    BadQuery = 4,
    FrameTooLarge = 5,
    Malformed = 6,
    UnknownFrameType = 7,
    Unexpected = 8,
    Internal = 9,
    /// A cloud cluster could not search every shard of the collection (no live replica of
    /// some): refused rather than answered short. An edge that predates it reads `Internal`.
    PartialAnswer = 10,
    /// The hits asked for, with their payloads, do not fit in one frame (version 6): ask for
    /// fewer hits or without payloads.
    AnswerTooLarge = 11,
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            VersionMismatch,
            UnknownCollection,
            NotAllowed,
            BadQuery,
            FrameTooLarge,
            Malformed,
            UnknownFrameType,
            Unexpected,
            Internal,
            PartialAnswer,
            AnswerTooLarge,
        ]
        .into_iter()
        .find(|c| *c as u16 == code)
    }

    /// Label for metrics (`refused frames by reason`).
    pub const fn label(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::UnknownCollection => "unknown_collection",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::BadQuery => "bad_query",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownFrameType => "unknown_frame_type",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::Internal => "internal",
            ErrorCode::PartialAnswer => "partial_answer",
            ErrorCode::AnswerTooLarge => "answer_too_large",
        }
    }
}

/// The head of a whole cache sent as a snapshot file: `len` bytes follow in
/// [`Frame::SnapshotChunk`]s on the same stream, whose xxh3-64 is `checksum`. The file's own
/// manifest version is `version`, which the edge acknowledges with `DeltaAck` once the file
/// replaced its cache durably.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotBegin {
    pub collection_id: [u8; 16],
    pub version: u64,
    pub len: u64,
    pub checksum: u64,
}

/// A refusal; `query_id` 0 concerns the whole connection.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorFrame {
    pub query_id: u64,
    pub code: u16,
    pub message: String,
}

/// Every frame of protocol version 6. Types 16..=31 are the push messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Query(Query),
    Answer(Answer),
    Error(ErrorFrame),
    Ping(u64),
    Pong(u64),
    /// Cloud → edge, on a stream the cloud opens: the next step of the edge's cache.
    Delta(Delta),
    /// Edge → cloud, on the delta's stream: the version is durable in the edge's cache.
    DeltaAck(u64),
    /// Edge → cloud: what the cache holds, when the cloud's idea of it may be wrong.
    Inventory(Inventory),
    /// Edge → cloud (version 5): one part of an inventory larger than a frame, each on its own
    /// stream, in order; the cloud adopts the inventory at the last part.
    InventoryPart(InventoryPart),
    /// Cloud → edge: the cloud now believes the cache is at this version.
    InventoryAck(u64),
    /// Cloud → edge, on a stream the cloud opens: a whole cache follows as a snapshot file
    /// (an edge that lost most of what the cloud knew it held).
    SnapshotBegin(SnapshotBegin),
    /// Cloud → edge: the next bytes of the snapshot file (raw, not rkyv).
    SnapshotChunk(Vec<u8>),
}

/// Frame type bytes.
pub mod types {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const QUERY: u8 = 3;
    pub const ANSWER: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const PING: u8 = 6;
    pub const PONG: u8 = 7;
    pub const DELTA: u8 = 16;
    pub const DELTA_ACK: u8 = 17;
    pub const INVENTORY: u8 = 18;
    pub const INVENTORY_ACK: u8 = 19;
    pub const SNAPSHOT_BEGIN: u8 = 20;
    pub const SNAPSHOT_CHUNK: u8 = 21;
    pub const INVENTORY_PART: u8 = 22;
}

/// Why bytes could not be read as a frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {frame_type} has a malformed body: {reason}")]
    Malformed { frame_type: u8, reason: String },
    #[error("more than {max} frames in one stream")]
    TooManyFrames { max: usize },
}

impl FrameError {
    /// The code a peer is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } | FrameError::TooManyFrames { .. } => {
                ErrorCode::FrameTooLarge
            }
            FrameError::UnknownType(_) => ErrorCode::UnknownFrameType,
            FrameError::Malformed { .. } => ErrorCode::Malformed,
        }
    }
}

fn archive<T>(value: &T) -> AlignedVec
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rancor::Error>(value).expect("serialising plain data into memory cannot fail")
}

impl Frame {
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello(_) => types::HELLO,
            Frame::HelloAck(_) => types::HELLO_ACK,
            Frame::Query(_) => types::QUERY,
            Frame::Answer(_) => types::ANSWER,
            Frame::Error(_) => types::ERROR,
            Frame::Ping(_) => types::PING,
            Frame::Pong(_) => types::PONG,
            Frame::Delta(_) => types::DELTA,
            Frame::DeltaAck(_) => types::DELTA_ACK,
            Frame::Inventory(_) => types::INVENTORY,
            Frame::InventoryPart(_) => types::INVENTORY_PART,
            Frame::InventoryAck(_) => types::INVENTORY_ACK,
            Frame::SnapshotBegin(_) => types::SNAPSHOT_BEGIN,
            Frame::SnapshotChunk(_) => types::SNAPSHOT_CHUNK,
        }
    }

    /// Appends the encoded frame (prefix and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let body: Vec<u8> = match self {
            Frame::Hello(v) => archive(v).to_vec(),
            Frame::HelloAck(v) => archive(v).to_vec(),
            Frame::Query(v) => archive(v).to_vec(),
            Frame::Answer(v) => archive(v).to_vec(),
            Frame::Error(v) => archive(v).to_vec(),
            Frame::Delta(v) => archive(v).to_vec(),
            Frame::Inventory(v) => archive(v).to_vec(),
            Frame::InventoryPart(v) => archive(v).to_vec(),
            Frame::SnapshotBegin(v) => archive(v).to_vec(),
            Frame::SnapshotChunk(bytes) => bytes.clone(),
            Frame::Ping(n) | Frame::Pong(n) | Frame::DeltaAck(n) | Frame::InventoryAck(n) => {
                n.to_le_bytes().to_vec()
            }
        };
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.push(self.frame_type());
        out.extend_from_slice(&body);
    }

    /// Validates and decodes a body of type `frame_type`.
    pub fn decode(frame_type: u8, body: &[u8]) -> Result<Frame, FrameError> {
        let mut aligned = AlignedVec::<16>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        let malformed = |e: rancor::Error| FrameError::Malformed {
            frame_type,
            reason: e.to_string(),
        };
        let nonce = || -> Result<u64, FrameError> {
            body.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| FrameError::Malformed {
                    frame_type,
                    reason: format!("body is {} bytes, not 8", body.len()),
                })
        };
        Ok(match frame_type {
            types::HELLO => {
                Frame::Hello(rkyv::from_bytes::<Hello, rancor::Error>(&aligned).map_err(malformed)?)
            }
            types::HELLO_ACK => Frame::HelloAck(
                rkyv::from_bytes::<HelloAck, rancor::Error>(&aligned).map_err(malformed)?,
            ),
            types::QUERY => {
                Frame::Query(rkyv::from_bytes::<Query, rancor::Error>(&aligned).map_err(malformed)?)
            }
            types::ANSWER => Frame::Answer(
                rkyv::from_bytes::<Answer, rancor::Error>(&aligned).map_err(malformed)?,
            ),
            types::ERROR => Frame::Error(
                rkyv::from_bytes::<ErrorFrame, rancor::Error>(&aligned).map_err(malformed)?,
            ),
            types::PING => Frame::Ping(nonce()?),
            types::PONG => Frame::Pong(nonce()?),
            types::DELTA => {
                Frame::Delta(rkyv::from_bytes::<Delta, rancor::Error>(&aligned).map_err(malformed)?)
            }
            types::DELTA_ACK => Frame::DeltaAck(nonce()?),
            types::INVENTORY => Frame::Inventory(
                rkyv::from_bytes::<Inventory, rancor::Error>(&aligned).map_err(malformed)?,
            ),
            types::INVENTORY_PART => Frame::InventoryPart(
                rkyv::from_bytes::<InventoryPart, rancor::Error>(&aligned).map_err(malformed)?,
            ),
            types::INVENTORY_ACK => Frame::InventoryAck(nonce()?),
            types::SNAPSHOT_BEGIN => Frame::SnapshotBegin(
                rkyv::from_bytes::<SnapshotBegin, rancor::Error>(&aligned).map_err(malformed)?,
            ),
            types::SNAPSHOT_CHUNK => Frame::SnapshotChunk(body.to_vec()),
            other => return Err(FrameError::UnknownType(other)),
        })
    }
}

/// Splits a byte stream into frames, sans IO: feed bytes with [`FrameDecoder::push`], take
/// frames with [`FrameDecoder::next_frame`]. A frame longer than the limit is refused as soon as
/// its prefix arrives, before its body is buffered. Taking a frame moves a read offset rather
/// than the bytes behind it, so a buffer of many small frames decodes in linear time; consumed
/// bytes are dropped when more arrive.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`.
    start: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            max_frame,
            buf: Vec::new(),
            start: 0,
        }
    }

    fn declared_len(&self) -> Option<usize> {
        self.buf
            .get(self.start..self.start + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    }

    /// Buffers `bytes`; refuses a frame whose declared length exceeds the limit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        // One move of the unread bytes per push, not one per frame taken.
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
        match self.declared_len() {
            Some(len) if len > self.max_frame => Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            }),
            _ => Ok(()),
        }
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(len) = self.declared_len() else {
            return Ok(None);
        };
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let body = self.start + PREFIX_LEN;
        if self.buf.len() < body + len {
            return Ok(None);
        }
        let frame_type = self.buf[self.start + 4];
        let result = Frame::decode(frame_type, &self.buf[body..body + len]);
        self.start = body + len;
        result.map(Some)
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: 1,
                min_version: 1,
                edge_name: "edge-a".into(),
                cache: Some(CacheAnnouncement {
                    collection: "c".into(),
                    collection_id: [9; 16],
                    version: 3,
                    budget_bytes: 1 << 20,
                    certify: true,
                }),
            }),
            Frame::HelloAck(HelloAck {
                version: 1,
                collections: vec![WireCollection {
                    name: "c".into(),
                    id: [9; 16],
                    dim: 4,
                    metric: 1,
                    model_checksum: None,
                }],
                cache_version: Some(2),
            }),
            Frame::Query(Query {
                query_id: 7,
                collection: "c".into(),
                collection_id: [9; 16],
                vector: vec![0.5, -0.25, 1.0, 0.0],
                k: 10,
                ef: 64,
                span_id: 99,
                shadow: false,
                with_payload: true,
            }),
            Frame::Answer(Answer {
                query_id: 7,
                collection_id: [9; 16],
                hits: vec![WireHit {
                    id: 1,
                    distance: 0.1,
                    lsn: 5,
                }],
                took_us: 120,
                payloads: vec![Some(r#"{"text":"one"}"#.into())],
            }),
            Frame::Error(ErrorFrame {
                query_id: 7,
                code: ErrorCode::BadQuery as u16,
                message: "k = 0".into(),
            }),
            Frame::Ping(42),
            Frame::Pong(42),
            Frame::Delta(Delta {
                collection_id: [9; 16],
                dim: 4,
                metric: 1,
                version: 4,
                vectors: vec![crate::push::PushedVector {
                    id: 3,
                    lsn: 8,
                    vector: vec![0.5, 0.5, 0.5, 0.5],
                    payload: Some("{}".into()),
                }],
                anchors: vec![crate::push::PushedAnchor {
                    anchor_id: 11,
                    vector: vec![0.5, 0.5, 0.5, 0.5],
                    members: vec![3],
                    radius: 0.75,
                    hot_at_unix_us: 1,
                }],
                evict: vec![1],
                evict_anchors: vec![2],
                tombstones: vec![crate::push::Tombstone { id: 4, lsn: 9 }],
                certificates: vec![crate::push::Certificate {
                    anchor_id: 11,
                    radius: 0.5,
                    members: vec![],
                }],
                sent_at_unix_us: 2,
            }),
            Frame::DeltaAck(4),
            Frame::Inventory(Inventory {
                collection_id: [9; 16],
                version: 4,
                vectors: vec![crate::push::HeldVector {
                    id: 3,
                    lsn: 8,
                    bytes: 100,
                }],
                anchors: vec![(11, vec![3])],
            }),
            Frame::InventoryPart(InventoryPart {
                last: true,
                inventory: Inventory {
                    collection_id: [9; 16],
                    version: 4,
                    vectors: vec![],
                    anchors: vec![(12, vec![])],
                },
            }),
            Frame::InventoryAck(4),
            Frame::SnapshotBegin(SnapshotBegin {
                collection_id: [9; 16],
                version: 5,
                len: 3,
                checksum: 77,
            }),
            Frame::SnapshotChunk(vec![1, 2, 3]),
            Frame::SnapshotChunk(vec![]),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let mut bytes = Vec::new();
            f.encode(&mut bytes);
            let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
            d.push(&bytes).unwrap();
            assert_eq!(d.next_frame().unwrap(), Some(f));
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_unknown_and_malformed_frames_are_refused() {
        let mut d = FrameDecoder::new(1024);
        let mut prefix = 1025u32.to_le_bytes().to_vec();
        prefix.push(types::QUERY);
        assert_eq!(
            d.push(&prefix),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );

        let mut d = FrameDecoder::new(1024);
        d.push(&[1, 0, 0, 0, 200, 0]).unwrap();
        assert_eq!(d.next_frame(), Err(FrameError::UnknownType(200)));
        assert_eq!(
            d.buffered(),
            0,
            "the refused frame is consumed; the stream can go on"
        );

        let mut d = FrameDecoder::new(1024);
        d.push(&[16, 0, 0, 0, types::QUERY]).unwrap();
        d.push(&[0xee; 16]).unwrap();
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::Malformed { frame_type: 3, .. })
        ));
        assert_eq!(
            FrameError::UnknownType(9).code(),
            ErrorCode::UnknownFrameType
        );
        assert_eq!(ErrorCode::from_u16(4), Some(ErrorCode::BadQuery));
        assert_eq!(ErrorCode::from_u16(0), None);
    }

    /// Half a million frames in one buffer: taking each must not move the bytes behind it
    /// (with a move per frame this is ~10^12 byte copies, minutes; it takes milliseconds).
    #[test]
    fn many_small_frames_decode_in_linear_time() {
        const FRAMES: u64 = 500_000;
        let mut stream = Vec::new();
        for i in 0..FRAMES {
            Frame::Ping(i).encode(&mut stream);
        }
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(&stream).unwrap();
        for i in 0..FRAMES {
            assert_eq!(d.next_frame().unwrap(), Some(Frame::Ping(i)));
            assert_eq!(
                d.buffered(),
                stream.len() / FRAMES as usize * (FRAMES - i - 1) as usize
            );
        }
        assert_eq!(d.next_frame().unwrap(), None);
    }

    proptest! {
        /// Any chunking of a stream of frames yields the same frames, and the decoded lengths
        /// plus the remainder account for every byte.
        #[test]
        fn chunking_does_not_matter(cuts in proptest::collection::vec(1usize..64, 1..40)) {
            let frames = samples();
            let mut stream = Vec::new();
            for f in &frames {
                f.encode(&mut stream);
            }
            let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= stream.len() {
                    break;
                }
                let end = (at + c).min(stream.len());
                d.push(&stream[at..end]).unwrap();
                at = end;
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(d.buffered(), 0);
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new(256);
            if d.push(&bytes).is_ok() {
                while let Ok(Some(_)) = d.next_frame() {}
            }
        }
    }
}
