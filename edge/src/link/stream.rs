//! One exchange on one stream: a flight of frames sent on a new bidirectional stream, the
//! answer's frames read back (size-limited, decoded before use); and the UDP byte counters.

use std::sync::atomic::{AtomicU64, Ordering};

use tiervec_shared::protocol::frame::{DEFAULT_MAX_FRAME, Frame, FrameDecoder, PREFIX_LEN};

/// Why an exchange on a stream failed.
pub(super) enum ExchangeError {
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
    pub(super) fn message(self) -> String {
        match self {
            ExchangeError::EarlyDataRejected => "early data rejected".into(),
            ExchangeError::Other(m) => m,
        }
    }
}

/// Adds the connection's UDP traffic since the last call to the edge's byte counters.
pub(super) fn account_wire_bytes(conn: &quinn::Connection, seen: &[AtomicU64; 2]) {
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
pub(super) async fn exchange(
    conn: &quinn::Connection,
    flight: &[Frame],
) -> Result<Vec<Frame>, ExchangeError> {
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
