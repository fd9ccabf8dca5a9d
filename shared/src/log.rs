//! The record format of every append-only log in tiervec (the cloud's write-ahead log, and the
//! edge's delta log), version 1 — the one place that defines it. Documented in `docs/wal.md`.
//!
//! A log file is a 32-byte header followed by records:
//!
//! ```text
//! header := magic "TVLOG\r\n\0" | version u32 | kind u32 | first_lsn u64 | reserved u32 | sum u32
//! record := len u32 | lsn u64 | body_sum u64 | head_sum u32 | body[len]
//! ```
//!
//! All integers are little-endian. `body_sum` is xxh3-64 of the body; `head_sum` is the low 32
//! bits of xxh3-64 of the 20 bytes before it, so a damaged length is caught before it is used,
//! and no length above [`MAX_RECORD`] is ever trusted. LSNs strictly increase within a log.
//!
//! [`scan`] reads a log and tells a *torn tail* — a last write that did not finish before a
//! crash, which recovery truncates — from *corruption* earlier in the log, which is an error
//! naming the offset: a bad record is torn only if no valid record follows it anywhere.

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// First eight bytes of every log file.
pub const MAGIC: [u8; 8] = *b"TVLOG\r\n\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the file header.
pub const FILE_HEADER_LEN: usize = 32;
/// Bytes of a record's header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Largest record body; a larger length is corruption, never an allocation.
pub const MAX_RECORD: usize = 64 << 20;

/// Which log a file is, so that one is never replayed as the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// The cloud's write-ahead log.
    CloudWal,
    /// An edge's delta log.
    EdgeDeltas,
}

impl LogKind {
    const fn code(self) -> u32 {
        match self {
            LogKind::CloudWal => 1,
            LogKind::EdgeDeltas => 2,
        }
    }

    const fn from_code(code: u32) -> Option<LogKind> {
        match code {
            1 => Some(LogKind::CloudWal),
            2 => Some(LogKind::EdgeDeltas),
            _ => None,
        }
    }
}

/// Why a log could not be read or written.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LogError {
    #[error("not a tiervec log: bad magic bytes")]
    BadMagic,
    #[error(
        "log format version {found} is not supported (this build reads {supported}); upgrade tiervec"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("log header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("log is a {found:?} log, expected {expected:?}")]
    WrongKind { expected: LogKind, found: LogKind },
    #[error("log header names unknown kind {0}")]
    UnknownKind(u32),
    #[error("log is {0} bytes, shorter than its 32-byte header")]
    TooShort(usize),
    #[error(
        "log is corrupt at byte {offset}: {what}, and valid records follow, so this is not a torn write; restore from a checkpoint or replica"
    )]
    Corrupt { offset: u64, what: &'static str },
    #[error("record body of {len} bytes exceeds the {MAX_RECORD}-byte limit")]
    RecordTooLarge { len: usize },
    #[error("LSN {lsn} does not follow {previous}: LSNs must strictly increase")]
    LsnOrder { previous: u64, lsn: u64 },
}

/// A log file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    pub kind: LogKind,
    /// LSN of the first record this file may hold (records before it live in a checkpoint).
    pub first_lsn: u64,
}

impl LogHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut h = [0u8; FILE_HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.kind.code().to_le_bytes());
        h[16..24].copy_from_slice(&self.first_lsn.to_le_bytes());
        let sum = xxh3_64(&h[..28]) as u32;
        h[28..32].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Decodes and checks a header, requiring `kind`.
    pub fn decode(bytes: &[u8], kind: LogKind) -> Result<LogHeader, LogError> {
        if bytes.len() < FILE_HEADER_LEN {
            return Err(LogError::TooShort(bytes.len()));
        }
        if bytes[0..8] != MAGIC {
            return Err(LogError::BadMagic);
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(LogError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let sum = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
        if sum != xxh3_64(&bytes[..28]) as u32 {
            return Err(LogError::HeaderChecksum);
        }
        let code = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let found = LogKind::from_code(code).ok_or(LogError::UnknownKind(code))?;
        if found != kind {
            return Err(LogError::WrongKind {
                expected: kind,
                found,
            });
        }
        Ok(LogHeader {
            kind,
            first_lsn: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// Appends one record (header and body) to `out`.
pub fn encode_record(lsn: u64, body: &[u8], out: &mut Vec<u8>) -> Result<(), LogError> {
    if body.len() > MAX_RECORD {
        return Err(LogError::RecordTooLarge { len: body.len() });
    }
    let start = out.len();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&xxh3_64(body).to_le_bytes());
    let head_sum = xxh3_64(&out[start..start + 20]) as u32;
    out.extend_from_slice(&head_sum.to_le_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// A record as read back, borrowing its body from the log's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: u64,
    /// Byte offset of the record in the file (its header's first byte).
    pub offset: u64,
    pub body: &'a [u8],
}

/// How a record at some offset failed to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    Incomplete,
    Header,
    Length,
    Body,
}

impl Bad {
    const fn describe(self) -> &'static str {
        match self {
            Bad::Incomplete => "record runs past the end of the file",
            Bad::Header => "record header checksum mismatch",
            Bad::Length => "record length above the limit",
            Bad::Body => "record body checksum mismatch",
        }
    }
}

/// Reads the record at `at` in `bytes` (file offsets are `base + at`).
fn read_record(bytes: &[u8], at: usize) -> Result<(u64, &[u8], usize), Bad> {
    let rest = &bytes[at..];
    if rest.len() < RECORD_HEADER_LEN {
        return Err(Bad::Incomplete);
    }
    let head_sum = u32::from_le_bytes(rest[20..24].try_into().expect("4 bytes"));
    if head_sum != xxh3_64(&rest[..20]) as u32 {
        return Err(Bad::Header);
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(Bad::Length);
    }
    let lsn = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
    let body_sum = u64::from_le_bytes(rest[12..20].try_into().expect("8 bytes"));
    let end = RECORD_HEADER_LEN + len;
    if rest.len() < end {
        return Err(Bad::Incomplete);
    }
    let body = &rest[RECORD_HEADER_LEN..end];
    if xxh3_64(body) != body_sum {
        return Err(Bad::Body);
    }
    Ok((lsn, body, end))
}

/// What a scan of a whole log found.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    pub header: LogHeader,
    /// Every valid record, in file order.
    pub records: Vec<Record<'a>>,
    /// Length of the valid prefix: recovery truncates the file here.
    pub valid_len: u64,
    /// Set when the file ends in a torn write (bytes past `valid_len` to drop): what was wrong.
    pub torn_tail: Option<&'static str>,
}

/// Reads a whole log. A bad record with no valid record anywhere after it is a torn tail (the
/// result says where to truncate); a bad record followed by a valid one is corruption, an
/// error naming its offset. LSNs must strictly increase.
pub fn scan(bytes: &[u8], kind: LogKind) -> Result<Scan<'_>, LogError> {
    let header = LogHeader::decode(bytes, kind)?;
    let mut records = Vec::new();
    let mut at = FILE_HEADER_LEN;
    let mut previous: Option<u64> = None;
    while at < bytes.len() {
        match read_record(bytes, at) {
            Ok((lsn, body, len)) => {
                if let Some(p) = previous.filter(|&p| lsn <= p) {
                    return Err(LogError::LsnOrder { previous: p, lsn });
                }
                previous = Some(lsn);
                records.push(Record {
                    lsn,
                    offset: at as u64,
                    body,
                });
                at += len;
            }
            Err(bad) => {
                let follows = (at + 1..bytes.len()).any(|o| read_record(bytes, o).is_ok());
                if follows {
                    return Err(LogError::Corrupt {
                        offset: at as u64,
                        what: bad.describe(),
                    });
                }
                return Ok(Scan {
                    header,
                    records,
                    valid_len: at as u64,
                    torn_tail: Some(bad.describe()),
                });
            }
        }
    }
    Ok(Scan {
        header,
        records,
        valid_len: at as u64,
        torn_tail: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut out = LogHeader {
            kind: LogKind::CloudWal,
            first_lsn: 1,
        }
        .encode()
        .to_vec();
        for (i, b) in bodies.iter().enumerate() {
            encode_record(i as u64 + 1, b, &mut out).unwrap();
        }
        out
    }

    fn bodies() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..12)
    }

    proptest! {
        #[test]
        fn records_round_trip(b in bodies()) {
            let bytes = log(&b);
            let s = scan(&bytes, LogKind::CloudWal).unwrap();
            prop_assert_eq!(s.torn_tail, None);
            prop_assert_eq!(s.valid_len as usize, bytes.len());
            let got: Vec<&[u8]> = s.records.iter().map(|r| r.body).collect();
            let want: Vec<&[u8]> = b.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(got, want);
        }

        /// Cutting the file anywhere after the header loses only the records the cut touches,
        /// and recovery truncates exactly at the last whole record.
        #[test]
        fn any_truncation_is_a_torn_tail(b in bodies(), cut in any::<prop::sample::Index>()) {
            let bytes = log(&b);
            let full = scan(&bytes, LogKind::CloudWal).unwrap();
            let cut = FILE_HEADER_LEN + cut.index(bytes.len() - FILE_HEADER_LEN);
            let s = scan(&bytes[..cut], LogKind::CloudWal).unwrap();
            let whole = full.records.iter().filter(|r| r.offset as usize + RECORD_HEADER_LEN + r.body.len() <= cut).count();
            prop_assert_eq!(s.records.len(), whole);
            prop_assert_eq!(&s.records[..], &full.records[..whole]);
            prop_assert_eq!(s.torn_tail.is_some(), cut != s.valid_len as usize);
        }

        /// A flipped bit is never silently accepted: the record it hits is lost as a torn tail
        /// only when it is the last record; anywhere else it is reported as corruption.
        #[test]
        fn a_flipped_bit_is_detected(b in bodies(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = log(&b);
            let full: Vec<(u64, usize)> = scan(&bytes, LogKind::CloudWal).unwrap().records.iter().map(|r| (r.offset, r.body.len())).collect();
            let at = FILE_HEADER_LEN + at.index(bytes.len() - FILE_HEADER_LEN);
            bytes[at] ^= 1 << bit;
            let last_start = full.last().unwrap().0 as usize;
            match scan(&bytes, LogKind::CloudWal) {
                Ok(s) => {
                    prop_assert!(at >= last_start, "flip at {} before the last record ({}) went unreported", at, last_start);
                    prop_assert_eq!(s.records.len(), full.len() - 1);
                    prop_assert!(s.torn_tail.is_some());
                }
                Err(LogError::Corrupt { offset, .. }) => prop_assert!(offset as usize <= at),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }

    #[test]
    fn header_errors_are_distinct() {
        let bytes = log(&[vec![1, 2, 3]]);
        assert_eq!(
            scan(&bytes[..10], LogKind::CloudWal),
            Err(LogError::TooShort(10))
        );
        assert_eq!(
            scan(&bytes, LogKind::EdgeDeltas),
            Err(LogError::WrongKind {
                expected: LogKind::EdgeDeltas,
                found: LogKind::CloudWal
            })
        );
        let mut b = bytes.clone();
        b[0] = 0;
        assert_eq!(scan(&b, LogKind::CloudWal), Err(LogError::BadMagic));
        let mut b = bytes.clone();
        b[8] = 9;
        assert!(matches!(
            scan(&b, LogKind::CloudWal),
            Err(LogError::UnsupportedVersion { found: 9, .. })
        ));
        let mut b = bytes;
        b[20] ^= 1;
        assert_eq!(scan(&b, LogKind::CloudWal), Err(LogError::HeaderChecksum));
    }

    #[test]
    fn lsns_must_increase_and_huge_bodies_are_refused() {
        let mut out = LogHeader {
            kind: LogKind::CloudWal,
            first_lsn: 1,
        }
        .encode()
        .to_vec();
        encode_record(5, b"a", &mut out).unwrap();
        encode_record(5, b"b", &mut out).unwrap();
        assert_eq!(
            scan(&out, LogKind::CloudWal),
            Err(LogError::LsnOrder {
                previous: 5,
                lsn: 5
            })
        );
        let big = vec![0u8; MAX_RECORD + 1];
        assert_eq!(
            encode_record(1, &big, &mut Vec::new()),
            Err(LogError::RecordTooLarge {
                len: MAX_RECORD + 1
            })
        );
    }
}
