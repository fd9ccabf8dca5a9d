//! A whole cache streamed as a snapshot file (`SnapshotBegin`, then `SnapshotChunk`s on one
//! stream), checked as it arrives, sans IO: the driver writes each accepted chunk to a temp file
//! and installs the file only after [`SnapshotReceiver::finish`] accepted the whole.
//! [`snapshot_frames`] is the sending side.

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use super::frame::{Frame, SnapshotBegin};

/// Largest chunk the cloud sends (well under the default frame limit).
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Why a streamed snapshot is refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TransferError {
    #[error("a streamed snapshot of {len} bytes exceeds this cache's limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("the streamed snapshot ran past its announced {len} bytes")]
    Overrun { len: u64 },
    #[error("the streamed snapshot ended after {received} of its {len} bytes")]
    Truncated { received: u64, len: u64 },
    #[error("the streamed snapshot's checksum is {actual:016x}, not the announced {expected:016x}")]
    Checksum { expected: u64, actual: u64 },
}

/// The frames that stream `file` (a snapshot whose manifest version is `version`).
pub fn snapshot_frames(collection_id: [u8; 16], version: u64, file: &[u8]) -> Vec<Frame> {
    let begin = SnapshotBegin {
        collection_id,
        version,
        len: file.len() as u64,
        checksum: xxhash_rust::xxh3::xxh3_64(file),
    };
    std::iter::once(Frame::SnapshotBegin(begin))
        .chain(
            file.chunks(SNAPSHOT_CHUNK)
                .map(|chunk| Frame::SnapshotChunk(chunk.to_vec())),
        )
        .collect()
}

/// Checks one streamed snapshot: length never past the announced one, checksum at the end.
pub struct SnapshotReceiver {
    begin: SnapshotBegin,
    received: u64,
    hasher: Xxh3,
}

impl SnapshotReceiver {
    /// Starts receiving what `begin` announces, refusing more than `max_len` bytes up front.
    pub fn new(begin: SnapshotBegin, max_len: u64) -> Result<SnapshotReceiver, TransferError> {
        if begin.len > max_len {
            return Err(TransferError::TooLarge {
                len: begin.len,
                max: max_len,
            });
        }
        Ok(SnapshotReceiver {
            begin,
            received: 0,
            hasher: Xxh3::new(),
        })
    }

    pub fn begin(&self) -> &SnapshotBegin {
        &self.begin
    }

    /// Takes the next chunk; refused if it runs past the announced length.
    pub fn chunk(&mut self, bytes: &[u8]) -> Result<(), TransferError> {
        let received = self.received + bytes.len() as u64;
        if received > self.begin.len {
            return Err(TransferError::Overrun {
                len: self.begin.len,
            });
        }
        self.hasher.update(bytes);
        self.received = received;
        Ok(())
    }

    /// The stream ended: every announced byte arrived and the checksum matches.
    pub fn check_complete(&self) -> Result<(), TransferError> {
        if self.received != self.begin.len {
            return Err(TransferError::Truncated {
                received: self.received,
                len: self.begin.len,
            });
        }
        let actual = self.hasher.digest();
        if actual != self.begin.checksum {
            return Err(TransferError::Checksum {
                expected: self.begin.checksum,
                actual,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn receive(frames: &[Frame], max: u64) -> Result<SnapshotBegin, TransferError> {
        let Frame::SnapshotBegin(begin) = frames[0] else {
            panic!("starts with its head")
        };
        let mut receiver = SnapshotReceiver::new(begin, max)?;
        for frame in &frames[1..] {
            let Frame::SnapshotChunk(bytes) = frame else {
                panic!("then chunks")
            };
            receiver.chunk(bytes)?;
        }
        receiver.check_complete().map(|()| *receiver.begin())
    }

    #[test]
    fn a_streamed_file_arrives_whole_in_chunks() {
        let bytes = file(2 * SNAPSHOT_CHUNK + 17);
        let frames = snapshot_frames([3; 16], 9, &bytes);
        assert_eq!(frames.len(), 4);
        let begin = receive(&frames, 1 << 30).expect("accepted");
        assert_eq!((begin.version, begin.len), (9, bytes.len() as u64));
    }

    #[test]
    fn too_large_overrun_truncated_and_corrupt_streams_are_refused() {
        let bytes = file(1000);
        let frames = snapshot_frames([3; 16], 9, &bytes);
        assert_eq!(
            receive(&frames, 999),
            Err(TransferError::TooLarge {
                len: 1000,
                max: 999
            })
        );
        let mut longer = frames.clone();
        longer.push(Frame::SnapshotChunk(vec![0]));
        assert_eq!(
            receive(&longer, 1 << 20),
            Err(TransferError::Overrun { len: 1000 })
        );
        let mut short = frames.clone();
        let Frame::SnapshotChunk(last) = &mut short[1] else {
            unreachable!()
        };
        last.pop();
        assert_eq!(
            receive(&short, 1 << 20),
            Err(TransferError::Truncated {
                received: 999,
                len: 1000
            })
        );
        let mut flipped = frames;
        let Frame::SnapshotChunk(body) = &mut flipped[1] else {
            unreachable!()
        };
        body[500] ^= 1;
        assert!(matches!(
            receive(&flipped, 1 << 20),
            Err(TransferError::Checksum { .. })
        ));
    }
}
