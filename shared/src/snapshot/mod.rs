//! The edge cache snapshot file, format version 2 — the one place that defines it.
//!
//! Documented in `docs/snapshot-format.md`. A snapshot is a fixed 128-byte little-endian header
//! followed, at byte [`BODY_OFFSET`], by an rkyv archive of [`SnapshotBody`]:
//!
//! | offset | size | field                                                       |
//! |-------:|-----:|-------------------------------------------------------------|
//! |      0 |    8 | magic `TVSNAP\r\n`                                          |
//! |      8 |    4 | format version (`2`; `1` is read)                           |
//! |     12 |    4 | header length (`128`)                                       |
//! |     16 |    4 | dimension                                                   |
//! |     20 |    1 | metric code (1 cosine, 2 l2, 3 dot)                         |
//! |     21 |    1 | flags (bit 0: payload text present)                         |
//! |     22 |    2 | HNSW `m`                                                    |
//! |     24 |    4 | HNSW `ef_construction`                                      |
//! |     28 |    4 | reserved, zero                                              |
//! |     32 |    8 | HNSW level seed                                             |
//! |     40 |    8 | vector count                                                |
//! |     48 |   16 | collection identity                                         |
//! |     64 |    8 | body offset (`128`)                                         |
//! |     72 |    8 | body length                                                 |
//! |     80 |    8 | xxh3-64 of the body                                         |
//! |     88 |   32 | reserved, zero                                              |
//! |    120 |    8 | xxh3-64 of header bytes 0..120                              |
//!
//! Version 2 changed what a payload is, not the layout: each payload is a JSON text (the cloud
//! stores any JSON value), and an empty one means none. A version 1 file's payload that parses
//! as JSON is read as that JSON (the cloud's restores wrote JSON), any other as `{"text": …}`
//! ([`SnapshotView::payload`]), so answers carry one convention.
//!
//! [`Snapshot::open`] validates a file once — magic, version, header checksum, lengths, body
//! checksum, rkyv's bytecheck, then every index the search will follow — and search afterwards
//! runs on the archived bytes in place, trusting them.

mod body;
mod header;
#[cfg(test)]
mod tests;
mod validation;
mod view;
mod writer;

/// A heap buffer aligned for a snapshot body (rkyv's 16-byte aligned vector).
pub use rkyv::util::AlignedVec as AlignedBytes;
use thiserror::Error;

pub use body::{
    AnchorSection, ArchivedSnapshotBody, BodyParts, GraphSection, LayerSection, QuantSection,
    SnapshotBody,
};
pub use header::{Expected, SnapshotHeader, SnapshotSpec};
pub use validation::validate;
pub use view::{Snapshot, SnapshotView, StableBytes};
pub use writer::{Payloads, SnapshotWriter, encode};

use crate::identity::CollectionId;
use crate::metric::Metric;

/// First eight bytes of every snapshot. The CR LF pair catches a file mangled by a text-mode
/// transfer, as PNG's signature does.
pub const MAGIC: [u8; 8] = *b"TVSNAP\r\n";
/// The format version this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_SUPPORTED_VERSION: u32 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Where the body starts. A multiple of 64, so a page-aligned mapping puts the body on a cache
/// line and satisfies rkyv's alignment (at most 8 for the archived types).
pub const BODY_OFFSET: usize = 128;
/// Alignment the body needs in memory.
pub const BODY_ALIGN: usize = 16;
/// Largest dimension a snapshot may declare.
pub const MAX_DIM: u32 = 65_536;
/// Largest HNSW `m` a snapshot may declare.
pub const MAX_M: u16 = 256;

const FLAG_PAYLOADS: u8 = 1;

/// Why a snapshot could not be written or opened. Each corruption has its own variant, and
/// every message says what to do next.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SnapshotError {
    #[error(
        "not a tiervec snapshot: the file starts with {found:02x?}, not the snapshot magic `TVSNAP\\r\\n`"
    )]
    BadMagic { found: [u8; 8] },
    #[error(
        "snapshot is truncated: {actual} bytes, but at least {needed} are needed; the file was cut short — rebuild or resync it"
    )]
    TooShort { actual: u64, needed: u64 },
    #[error(
        "snapshot format version {found} is newer than this build reads (newest {newest}); upgrade tiervec to open it"
    )]
    NewerVersion { found: u32, newest: u32 },
    #[error(
        "snapshot format version {found} is older than this build reads (oldest {oldest}); rebuild the snapshot"
    )]
    OlderVersion { found: u32, oldest: u32 },
    #[error(
        "snapshot header is corrupt: checksum {stored:016x} stored, {computed:016x} computed; rebuild or resync it"
    )]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error("snapshot header is invalid: {0}")]
    BadHeader(String),
    #[error(
        "snapshot is truncated: the header promises {expected} bytes, the file has {actual}; rebuild or resync it"
    )]
    Truncated { expected: u64, actual: u64 },
    #[error(
        "snapshot has {actual} bytes but the header promises {expected}: trailing data after the body"
    )]
    TrailingBytes { expected: u64, actual: u64 },
    #[error(
        "snapshot body is corrupt: checksum {stored:016x} stored, {computed:016x} computed; rebuild or resync it"
    )]
    BodyChecksum { stored: u64, computed: u64 },
    #[error("snapshot body fails structural validation (rkyv bytecheck): {0}")]
    Malformed(String),
    #[error("snapshot contents are inconsistent: {0}")]
    Inconsistent(String),
    #[error(
        "snapshot bytes start at an address not aligned to {align}; load the file into an aligned buffer (memory maps are)"
    )]
    Misaligned { align: usize },
    #[error("snapshot has dimension {found}, but {expected} was expected")]
    DimensionMismatch { expected: u32, found: u32 },
    #[error("snapshot uses metric {found}, but {expected} was expected")]
    MetricMismatch { expected: Metric, found: Metric },
    #[error("snapshot belongs to collection {found}, but {expected} was expected")]
    CollectionMismatch {
        expected: CollectionId,
        found: CollectionId,
    },
    #[error("cannot write snapshot: {0}")]
    Write(String),
}

#[cfg(not(target_endian = "little"))]
compile_error!(
    "tiervec's snapshot format is little-endian and is read in place: big-endian targets are not supported"
);
