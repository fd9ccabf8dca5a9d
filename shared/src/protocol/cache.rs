//! What both sides decide alike about an edge's cache: whether a connecting edge resyncs it by
//! inventory, and whether a push was acknowledged. The edge and the cloud each call these, so
//! the two ends of one exchange cannot disagree.

use thiserror::Error;

use super::frame::{DEFAULT_MAX_FRAME, Frame, FrameDecoder, FrameError, PREFIX_LEN};

/// Whether the edge must send its cache's inventory before the cloud pushes anything: the
/// cache belongs to another incarnation of the collection (`cache_collection` differs from the
/// collection's identity), or the version the cloud logged for it (`told`, from the
/// `HelloAck`; `None` when it logged none) is not the cache's own `cache_version`.
pub fn needs_resync(
    cache_collection: [u8; 16],
    cache_version: u64,
    collection: [u8; 16],
    told: Option<u64>,
) -> bool {
    cache_collection != collection || told != Some(cache_version)
}

/// The most bytes an acknowledgement of a push takes on its stream: one `DeltaAck` frame.
pub const PUSH_ACK_MAX_LEN: usize = PREFIX_LEN + 64;

/// Why a push's reply is not its acknowledgement.
#[derive(Debug, Error, PartialEq)]
pub enum PushAckError {
    #[error("the push's reply is not a valid frame: {0}")]
    Frame(#[from] FrameError),
    #[error("expected DeltaAck({expected}), got {got}")]
    Unexpected { expected: u64, got: String },
}

/// Checks that `reply`, everything the edge wrote back on a push's stream, acknowledges
/// manifest version `version` (a delta, or a streamed snapshot).
pub fn check_push_ack(reply: &[u8], version: u64) -> Result<(), PushAckError> {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    decoder.push(reply)?;
    match decoder.next_frame()? {
        Some(Frame::DeltaAck(v)) if v == version => Ok(()),
        other => Err(PushAckError::Unexpected {
            expected: version,
            got: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edge_resyncs_unless_the_cloud_logged_its_version_of_this_collection() {
        let (c, other) = ([1; 16], [2; 16]);
        assert!(!needs_resync(c, 5, c, Some(5)));
        assert!(needs_resync(c, 5, c, Some(4)), "versions differ");
        assert!(needs_resync(c, 0, c, None), "the cloud logged nothing");
        assert!(needs_resync(other, 5, c, Some(5)), "another incarnation");
    }

    #[test]
    fn only_the_acknowledgement_of_the_version_pushed_counts() {
        let mut reply = Vec::new();
        Frame::DeltaAck(7).encode(&mut reply);
        assert!(reply.len() <= PUSH_ACK_MAX_LEN);
        assert_eq!(check_push_ack(&reply, 7), Ok(()));
        assert!(matches!(
            check_push_ack(&reply, 8),
            Err(PushAckError::Unexpected { expected: 8, .. })
        ));
        assert!(matches!(
            check_push_ack(&[], 7),
            Err(PushAckError::Unexpected { .. })
        ));
        assert!(matches!(
            check_push_ack(&[0xff; 9], 7),
            Err(PushAckError::Frame(_))
        ));
    }
}
