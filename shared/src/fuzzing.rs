//! Invariant checks over arbitrary bytes, one per fuzz target of `shared/fuzz` (cargo-fuzz, on
//! nightly). Each check panics when an invariant breaks — not only on a crash: round trips,
//! bytes consumed and left over, what a rescan of the kept prefix must find. The fuzzers call
//! them on generated inputs; `tests::corpora_replay` runs them on stable over every input the
//! fuzzers kept (`shared/fuzz/corpus/<target>/`) and every crash they found
//! (`shared/fuzz/regressions/<target>/`), so CI checks them without nightly.

use crate::hnsw::SearchScratch;
use crate::log::{self, LogKind};
use crate::metric::Metric;
use crate::protocol::frame::{Frame, FrameDecoder, FrameError, WireCollection};
use crate::protocol::frame::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Query};
use crate::protocol::session::{
    ClientAction, ClientEvent, ClientSession, QueryFailure, ServerAction, ServerSession,
};
use crate::push::{Delta, Manifest};
use crate::query::validate_search;
use crate::snapshot::Snapshot;

/// An invariant check over one input; it panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name, as `shared/fuzz/fuzz_targets/<name>.rs` calls them.
pub const TARGETS: [(&str, Check); 7] = [
    ("frame_decoder", frame_decoder),
    ("log_scan", log_scan),
    ("log_round_trip", log_round_trip),
    ("snapshot_open", snapshot_open),
    ("delta_decode", delta_decode),
    ("server_session", server_session),
    ("client_session", client_session),
];

/// The frame limit the decoder check runs under: small, so that the limit is reached often.
const FUZZ_MAX_FRAME: usize = 4096;

/// Frames, then the first error, of a decoder fed `stream` in pieces of the given sizes
/// (cycled; the whole stream at once when there are none).
fn decode_in_pieces(stream: &[u8], pieces: &[usize]) -> (Vec<Frame>, Option<FrameError>) {
    let mut decoder = FrameDecoder::new(FUZZ_MAX_FRAME);
    let mut frames = Vec::new();
    let mut at = 0;
    let mut sizes = pieces.iter().cycle();
    while at < stream.len() {
        let size = sizes.next().copied().unwrap_or(stream.len());
        let piece = &stream[at..(at + size).min(stream.len())];
        at += piece.len();
        if let Err(e) = decoder.push(piece) {
            return (frames, Some(e));
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        assert!(decoder.buffered() <= at, "buffered more than was pushed");
    }
    (frames, None)
}

/// Frames by their wire bytes: two decodings agree when these do (a frame holding a NaN is
/// not equal to itself, its bytes are).
fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for f in frames {
        f.encode(&mut bytes);
    }
    bytes
}

/// The frame decoder: the same frames and the same first error however the stream is cut
/// into pieces; every frame re-encodes to bytes that decode to it again.
pub fn frame_decoder(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n % 8) as usize;
    if rest.len() < n {
        return;
    }
    let (sizes, stream) = rest.split_at(n);
    let pieces: Vec<usize> = sizes.iter().map(|&s| s as usize + 1).collect();
    let (frames, error) = decode_in_pieces(stream, &[]);
    let (cut_frames, cut_error) = decode_in_pieces(stream, &pieces);
    assert_eq!(
        (wire(&frames), error),
        (wire(&cut_frames), cut_error),
        "the pieces changed what was decoded"
    );
    for frame in &frames {
        let bytes = wire(std::slice::from_ref(frame));
        let (again, error) = decode_in_pieces(&bytes, &[]);
        assert_eq!(
            (wire(&again), error),
            (bytes, None),
            "a frame did not round-trip"
        );
    }
}

/// Log scanning: the kept prefix rescans to the same records with no torn tail, records lie
/// inside it in strictly increasing LSN order, and `salvage` keeps every record `scan` kept,
/// outside the ranges it reports lost.
pub fn log_scan(data: &[u8]) {
    for kind in [LogKind::CloudWal, LogKind::EdgeDeltas] {
        if let Ok(scan) = log::scan(data, kind) {
            let valid = scan.valid_len as usize;
            assert!(valid <= data.len());
            assert_eq!(scan.torn_tail.is_none(), valid == data.len());
            assert!(scan.records.windows(2).all(|w| w[0].lsn < w[1].lsn));
            assert!(
                scan.records
                    .iter()
                    .all(|r| r.offset as usize + r.body.len() <= valid)
            );
            let again = log::scan(&data[..valid], kind).expect("the kept prefix rescans");
            assert_eq!(again.records, scan.records);
            assert_eq!(again.torn_tail, None);
            let salvaged = log::salvage(data, kind).expect("a header scan read, salvage reads");
            for r in &scan.records {
                assert!(
                    salvaged.records.contains(r),
                    "salvage dropped a kept record"
                );
            }
        }
        if let Ok(s) = log::salvage(data, kind) {
            assert!(s.records.windows(2).all(|w| w[0].lsn < w[1].lsn));
            assert!(s.lost.windows(2).all(|w| w[0].1 <= w[1].0));
            for r in &s.records {
                let start = r.offset;
                assert!(
                    s.lost.iter().all(|&(a, b)| b <= start || a > start),
                    "a kept record starts in a lost range"
                );
            }
        }
    }
}

/// Log framing: records built from the input (bodies and flush sizes from its bytes) scan back
/// exactly; cut at every byte of the last flush, they scan back without that flush.
pub fn log_round_trip(data: &[u8]) {
    let Some((&salt_byte, mut rest)) = data.split_first() else {
        return;
    };
    let salt = u64::from(salt_byte).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut flushes: Vec<Vec<(u64, &[u8])>> = Vec::new();
    let mut lsn = 0;
    while let Some((&head, tail)) = rest.split_first() {
        let len = ((head >> 2) as usize).min(tail.len());
        let (body, after) = tail.split_at(len);
        lsn += 1 + u64::from(head & 1);
        if head & 2 != 0 || flushes.is_empty() {
            flushes.push(Vec::new());
        }
        flushes.last_mut().expect("pushed").push((lsn, body));
        rest = after;
    }
    let mut bytes = log::LogHeader::new(LogKind::CloudWal, 1, salt)
        .encode()
        .to_vec();
    let mut last_start = bytes.len();
    for flush in &flushes {
        last_start = bytes.len();
        log::encode_flush(salt, flush, &mut bytes).expect("bodies are small");
    }
    let all: Vec<(u64, &[u8])> = flushes.iter().flatten().copied().collect();
    let scan = log::scan(&bytes, LogKind::CloudWal).expect("an encoded log scans");
    let got: Vec<(u64, &[u8])> = scan.records.iter().map(|r| (r.lsn, r.body)).collect();
    assert_eq!(got, all);
    assert_eq!(
        (scan.valid_len as usize, scan.torn_tail),
        (bytes.len(), None)
    );
    let kept = all.len() - flushes.last().map_or(0, Vec::len);
    for cut in last_start..bytes.len() {
        let s = log::scan(&bytes[..cut], LogKind::CloudWal).expect("a cut log scans");
        assert_eq!(s.records.len(), kept, "cut at {cut}");
        assert_eq!(s.valid_len as usize, last_start);
    }
}

/// Snapshot validation: arbitrary bytes are refused or open into a snapshot whose every
/// accessor and search stays in bounds.
pub fn snapshot_open(data: &[u8]) {
    // Unaligned, as a caller may hand them over, and aligned, so content is what is tested.
    let _ = Snapshot::open(data);
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
    aligned.extend_from_slice(data);
    let Ok(snapshot) = Snapshot::open(aligned.as_slice()) else {
        return;
    };
    let view = snapshot.view();
    let (n, dim) = (view.len(), view.dim());
    assert_eq!(view.ids().len(), n);
    for node in 0..n.min(64) as u32 {
        assert_eq!(view.vector(node).map(<[f32]>::len), Some(dim));
        let _ = (view.payload(node), view.lsn(node));
    }
    let query = vec![1.0 / (dim.max(1) as f32).sqrt(); dim];
    let mut scratch = SearchScratch::new();
    let hits = view.search(&query, 10, 32, &mut scratch);
    assert!(hits.len() <= 10.min(n));
    assert!(hits.iter().all(|h| (h.id as usize) < n));
}

/// Delta archives: what decodes re-encodes to an archive that decodes to the same delta, and
/// applying it to a manifest is an error or a change, never a panic.
pub fn delta_decode(data: &[u8]) {
    let Ok(delta) = Delta::from_bytes(data) else {
        return;
    };
    // Compared as archives: a delta holding a NaN is not equal to itself.
    let bytes = delta.to_bytes();
    let again = Delta::from_bytes(&bytes).expect("an archive made here decodes");
    assert_eq!(again.to_bytes(), bytes, "a delta did not round-trip");
    let mut manifest = Manifest::new(delta.collection_id, delta.version.saturating_sub(1));
    let _ = manifest.apply(&delta, (delta.dim as usize).min(1 << 16));
}

/// The cloud's session state machine driven by the frames of a stream (the first byte says
/// which of the first eight arrive as 0-RTT data): a query is searched only after an accepted
/// Hello, only for an allowed collection of its identity and only when it validates; an
/// inventory is adopted only after the handshake and for an allowed collection, and never from
/// early data; every refusal sends an error frame; after a close nothing more happens.
pub fn server_session(data: &[u8]) {
    let Some((&early, stream)) = data.split_first() else {
        return;
    };
    let allowed = vec![
        WireCollection {
            name: "wordnet".into(),
            id: [5; 16],
            dim: 384,
            metric: Metric::Cosine.code(),
            model_checksum: None,
        },
        WireCollection {
            name: "small".into(),
            id: [6; 16],
            dim: 4,
            metric: Metric::L2.code(),
            model_checksum: None,
        },
    ];
    let mut session = ServerSession::new(allowed.clone(), vec![([5; 16], 4)]);
    let mut decoder = FrameDecoder::new(1 << 16);
    if decoder.push(stream).is_err() {
        return;
    }
    let (mut ready, mut closed) = (false, false);
    for i in 0.. {
        let actions = match decoder.next_frame() {
            Ok(None) => break,
            Err(e) => {
                let stop = matches!(e, FrameError::TooLarge { .. });
                let actions = session.bad_frame(&e);
                if stop {
                    break;
                }
                actions
            }
            Ok(Some(frame)) if i < 8 && early & (1 << i) != 0 => {
                let kind = frame.frame_type();
                match session.handle_early(frame) {
                    Ok(actions) => {
                        assert!(
                            !actions.iter().any(|a| matches!(a, ServerAction::Resync(_))),
                            "frame type {kind} changed durable state from early data"
                        );
                        actions
                    }
                    Err(_) => continue,
                }
            }
            Ok(Some(frame)) => session.handle(frame),
        };
        if closed {
            assert!(
                actions.iter().all(|a| matches!(
                    a,
                    ServerAction::Refused(_)
                        | ServerAction::Send(Frame::Error(_))
                        | ServerAction::Close { .. }
                )),
                "actions after the session closed: {actions:?}"
            );
        }
        for (n, action) in actions.iter().enumerate() {
            match action {
                ServerAction::Send(Frame::HelloAck(_)) => {
                    assert!(!ready, "a second handshake");
                    ready = true;
                }
                ServerAction::Search(q) => {
                    assert!(ready && !closed, "a search outside a ready session");
                    let c = allowed
                        .iter()
                        .find(|c| c.name == q.collection && c.id == q.collection_id)
                        .expect("a search of a collection the edge may not query");
                    validate_search(&q.vector, c.dim as usize, q.k as usize, q.ef as usize)
                        .expect("a search that does not validate");
                }
                ServerAction::Resync(inv) => {
                    assert!(ready && !closed);
                    assert!(allowed.iter().any(|c| c.id == inv.collection_id));
                }
                ServerAction::CacheAnnounced { cache, .. } => {
                    assert!(allowed.iter().any(|c| c.name == cache.collection));
                }
                ServerAction::Refused(_) => assert!(
                    matches!(
                        actions.get(n + 1),
                        Some(ServerAction::Send(Frame::Error(_)))
                    ),
                    "a refusal without an error frame"
                ),
                ServerAction::Close { .. } => closed = true,
                ServerAction::Send(_) => {}
            }
        }
        assert_eq!(session.version().is_some(), ready && !closed);
    }
}

/// What the edge's session has promised so far, kept beside it by [`client_session`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelState {
    Disconnected,
    Handshaking,
    Ready,
}

/// The edge's session driven by a script of events: connections, disconnections, queries with
/// deadlines, the passing of time, undecodable frames and frames from the cloud (decoded from
/// the input's tail). Every query asked ends at most once, as an answer only on a ready session
/// and a timeout only at its deadline; a disconnection or a close fails every query in flight;
/// the handshake completes only in the version range offered, after a Hello; cache traffic is
/// acted on only on a ready session; `is_ready` and `poll_timeout` agree with what was promised.
///
/// Input: one byte `n`, `n` script bytes, then a frame stream (the cloud's frames, taken one per
/// `Received` step).
pub fn client_session(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (script, stream) = rest.split_at((n as usize).min(rest.len()));
    let mut decoder = FrameDecoder::new(1 << 16);
    if decoder.push(stream).is_err() {
        return;
    }
    let mut frames = std::iter::from_fn(|| decoder.next_frame().ok().flatten());
    let mut session = ClientSession::new("fuzz-edge", None);
    let mut state = ModelState::Disconnected;
    let mut in_flight: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut now = 0u64;
    let mut bytes = script.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let before = state;
        let event = match op % 6 {
            0 => ClientEvent::Connected,
            1 => ClientEvent::Disconnected,
            2 => ClientEvent::Ask {
                query: Query {
                    query_id: u64::from(arg % 8),
                    collection: "wordnet".into(),
                    collection_id: [5; 16],
                    vector: vec![0.0; 4],
                    k: 1,
                    ef: 0,
                    span_id: 0,
                    shadow: false,
                    with_payload: arg % 2 == 1,
                },
                deadline_us: now + u64::from(arg) * 1_000,
            },
            3 => match frames.next() {
                Some(frame) => ClientEvent::Received(frame),
                None => continue,
            },
            4 => ClientEvent::BadFrame(FrameError::UnknownType(arg)),
            _ => {
                now += u64::from(arg) * 1_000;
                let actions = session.handle_timeout(now);
                for action in actions {
                    let ClientAction::Failed { query_id, reason } = action else {
                        panic!("a timeout did more than fail queries: {action:?}");
                    };
                    assert_eq!(reason, QueryFailure::Timeout);
                    let deadline = in_flight.remove(&query_id).expect("a query failed twice");
                    assert!(deadline <= now, "a query timed out before its deadline");
                }
                continue;
            }
        };
        let asked = match &event {
            ClientEvent::Ask { query, deadline_us } => Some((query.query_id, *deadline_us)),
            _ => None,
        };
        let received_hello_ack = matches!(&event, ClientEvent::Received(Frame::HelloAck(_)));
        let actions = session.handle(event, now);
        // Queries whose deadline had passed fail first, whatever the event.
        let mut hello_sent = false;
        let mut closed = false;
        for action in &actions {
            match action {
                ClientAction::Send(Frame::Hello(h)) => {
                    assert_eq!(op % 6, 0, "a Hello sent without a new connection");
                    assert_eq!(
                        (h.min_version, h.version),
                        (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
                    );
                    hello_sent = true;
                }
                ClientAction::Send(Frame::Query(q)) => {
                    assert_eq!(Some(q.query_id), asked.map(|a| a.0), "a query nobody asked");
                    assert_ne!(before, ModelState::Disconnected, "a query sent unconnected");
                }
                ClientAction::Send(frame) => assert!(
                    matches!(frame, Frame::Pong(_)),
                    "the session sent {frame:?} on its own"
                ),
                ClientAction::Ready { version, .. } => {
                    assert!(received_hello_ack && before == ModelState::Handshaking);
                    assert!((MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(version));
                    state = ModelState::Ready;
                }
                ClientAction::Answered(answer) => {
                    assert_eq!(
                        before,
                        ModelState::Ready,
                        "an answer outside a ready session"
                    );
                    in_flight
                        .remove(&answer.query_id)
                        .expect("an answer to a query not in flight");
                }
                ClientAction::Failed {
                    query_id,
                    reason: QueryFailure::NotReady,
                } => {
                    assert_eq!(before, ModelState::Disconnected);
                    assert_eq!(Some(*query_id), asked.map(|a| a.0));
                }
                ClientAction::Failed { query_id, reason } => {
                    let deadline = in_flight
                        .remove(query_id)
                        .expect("a failure of a query not in flight");
                    if reason == &QueryFailure::Timeout {
                        assert!(deadline <= now, "a query timed out before its deadline");
                    }
                }
                ClientAction::ApplyDelta(_)
                | ClientAction::SnapshotBegin(_)
                | ClientAction::SnapshotChunk(_)
                | ClientAction::InventoryAcked(_) => {
                    assert_eq!(
                        before,
                        ModelState::Ready,
                        "cache traffic outside a ready session"
                    )
                }
                ClientAction::Close { .. } => closed = true,
            }
        }
        if hello_sent {
            state = ModelState::Handshaking;
        }
        if let Some((id, deadline)) = asked
            && before != ModelState::Disconnected
        {
            in_flight.insert(id, deadline);
        }
        if closed || op % 6 == 1 {
            state = ModelState::Disconnected;
            assert!(in_flight.is_empty(), "queries outlived their connection");
        }
        assert_eq!(session.is_ready(), state == ModelState::Ready);
        assert_eq!(session.poll_timeout(), in_flight.values().min().copied());
    }
}

/// Runs each target's check over every input under `root/corpus/<target>/` (what the fuzzer
/// kept) and `root/regressions/<target>/` (what once failed); panics naming the first input
/// that fails, or when there is none at all. The crates' `corpora_replay` tests call it, so the
/// corpora are checked on stable.
pub fn replay_corpora(root: &std::path::Path, targets: &[(&str, Check)]) {
    let mut replayed = 0;
    for &(name, check) in targets {
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a readable corpus folder").path();
                let bytes = std::fs::read(&path).expect("a readable corpus file");
                let outcome = std::panic::catch_unwind(|| check(&bytes));
                assert!(outcome.is_ok(), "{name}: {} fails", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed > 0, "no corpus under {}", root.display());
    eprintln!("{replayed} fuzz inputs replayed");
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::protocol::frame::{
        Answer, ErrorCode, ErrorFrame, Frame, HelloAck, SnapshotBegin, WireHit,
    };

    /// A whole conversation in `client_session`'s input format: connect with a query pipelined
    /// behind the Hello, the handshake, an answer, a ping, cache traffic, a refusal, a timeout,
    /// a disconnection with a query in flight, a query asked while disconnected.
    pub(super) fn client_conversation() -> Vec<u8> {
        let script: &[u8] = &[
            0, 0, // Connected
            2, 1, // Ask query 1, deadline 1 ms
            3, 0, // HelloAck
            3, 0, // Answer to query 1
            3, 0, // Ping
            3, 0, // SnapshotBegin
            3, 0, // SnapshotChunk
            3, 0, // InventoryAck
            2, 2, // Ask query 2
            3, 0, // Error for query 2
            2, 3, // Ask query 3
            5, 9, // 9 ms pass: query 3 times out
            2, 4, // Ask query 4
            1, 0, // Disconnected: query 4 fails
            2, 5, // Ask query 5 while disconnected
            4, 9, // an undecodable frame
        ];
        let frames = [
            Frame::HelloAck(HelloAck {
                version: super::PROTOCOL_VERSION,
                collections: Vec::new(),
                cache_version: Some(3),
            }),
            Frame::Answer(Answer {
                query_id: 1,
                collection_id: [5; 16],
                hits: vec![WireHit {
                    id: 7,
                    distance: 0.25,
                    lsn: 2,
                }],
                took_us: 40,
                payloads: vec![Some("{}".into())],
            }),
            Frame::Ping(9),
            Frame::SnapshotBegin(SnapshotBegin {
                collection_id: [5; 16],
                version: 4,
                len: 3,
                checksum: 1,
            }),
            Frame::SnapshotChunk(vec![1, 2, 3]),
            Frame::InventoryAck(4),
            Frame::Error(ErrorFrame {
                query_id: 2,
                code: ErrorCode::BadQuery as u16,
                message: "k too large".into(),
            }),
        ];
        let mut data = vec![script.len() as u8];
        data.extend_from_slice(script);
        data.extend(super::wire(&frames));
        data
    }

    #[test]
    fn a_whole_client_conversation_keeps_the_session_invariants() {
        super::client_session(&client_conversation());
    }

    /// Every committed corpus input and every recorded crash, through its target's check.
    #[test]
    fn corpora_replay() {
        super::replay_corpora(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"),
            &super::TARGETS,
        );
    }
}
