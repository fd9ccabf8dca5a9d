//! The record format of every append-only log in tiervec (the cloud's write-ahead log, and the
//! edge's delta log), version 2 — the one place that defines it. Documented in `docs/wal.md`.
//!
//! A log file is a 40-byte header followed by records, written in *flushes* (the records one
//! `write` + `fsync` puts on disk):
//!
//! ```text
//! header := magic "TVLOG\r\n\0" | version u32 | kind u32 | first_lsn u64 | salt u64
//!           | reserved u32 | sum u32
//! record := len u32 | flags u32 | lsn u64 | body_sum u64 | head_sum u32 | body[len]
//! ```
//!
//! All integers are little-endian. `flags` marks the first ([`FLUSH_START`]) and the last
//! ([`FLUSH_END`]) record of a flush. `body_sum` is xxh3-64 of the body and `head_sum` the low
//! 32 bits of xxh3-64 of the 24 bytes before it, both seeded with the file's random `salt`, so
//! a damaged length is caught before it is used, no length above [`MAX_RECORD`] is trusted, and
//! bytes a client chose (a vector inside a body) can never pass for a record of this file.
//! LSNs strictly increase within a log.
//!
//! [`scan`] tells a *torn tail* from *corruption*. A flush is complete when all its records
//! read back, from its start through its end. A writer starts a flush only after the previous
//! one's fsync returned, so a damaged record followed anywhere by a valid flush start was
//! already durable: corruption, an error naming the offset. Without one, everything after the
//! last complete flush is a torn tail — an unacknowledged write whose pages reached the disk
//! partly, in any order — which recovery truncates. [`salvage`] keeps every record that reads
//! back, around damaged ranges, for an offline repair.
//!
//! Version 1 (a 32-byte header without salt; 24-byte records without flags, checksums
//! unseeded; every record its own flush) is still read; writers append only to version 2.

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// First eight bytes of every log file.
pub const MAGIC: [u8; 8] = *b"TVLOG\r\n\0";
/// The format version this build writes (it reads [`OLDEST_READABLE_VERSION`] too).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Bytes of the file header this build writes.
pub const FILE_HEADER_LEN: usize = 40;
/// Bytes of a record's header this build writes.
pub const RECORD_HEADER_LEN: usize = 28;
/// Largest record body; a larger length is corruption, never an allocation.
pub const MAX_RECORD: usize = 64 << 20;
/// Record flag: the first record of a flush.
pub const FLUSH_START: u32 = 1;
/// Record flag: the last record of a flush.
pub const FLUSH_END: u32 = 2;

/// Byte layout of one format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    header_len: usize,
    record_header_len: usize,
    /// Offset of `head_sum` in a record header (the bytes it covers end there).
    head_sum_at: usize,
    salt: u64,
    /// Version 1 has no flags: every record is a flush of its own.
    flagged: bool,
}

impl Layout {
    fn of(header: &LogHeader) -> Layout {
        if header.version == 1 {
            Layout {
                header_len: 32,
                record_header_len: 24,
                head_sum_at: 20,
                salt: 0,
                flagged: false,
            }
        } else {
            Layout {
                header_len: FILE_HEADER_LEN,
                record_header_len: RECORD_HEADER_LEN,
                head_sum_at: 24,
                salt: header.salt,
                flagged: true,
            }
        }
    }
}

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
        "log format version {found} is not supported (this build reads {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}); run a tiervec release that reads it"
    )]
    UnsupportedVersion { found: u32 },
    #[error("log header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("log is a {found:?} log, expected {expected:?}")]
    WrongKind { expected: LogKind, found: LogKind },
    #[error("log header names unknown kind {0}")]
    UnknownKind(u32),
    #[error("log is {found} bytes, shorter than its {needed}-byte header")]
    TooShort { found: usize, needed: usize },
    #[error(
        "log is corrupt at byte {offset}: {what}, and a later flush follows, so this was durable and is not a torn write"
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
    /// Seed of the file's checksums, drawn at random when the file is made.
    pub salt: u64,
    /// The file's format version: [`FORMAT_VERSION`] for every file this build writes; a file
    /// of an older version is read, never appended to.
    pub version: u32,
}

impl LogHeader {
    /// The header of a new file in the current format; `salt` should be random (the
    /// caller's: this crate has no source of randomness).
    pub fn new(kind: LogKind, first_lsn: u64, salt: u64) -> LogHeader {
        LogHeader {
            kind,
            first_lsn,
            salt,
            version: FORMAT_VERSION,
        }
    }

    /// Whether records may be appended to the file (it is in the format this build writes).
    pub fn is_current(&self) -> bool {
        self.version == FORMAT_VERSION
    }

    /// The header's bytes in the current format (whatever `version` says).
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut h = [0u8; FILE_HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.kind.code().to_le_bytes());
        h[16..24].copy_from_slice(&self.first_lsn.to_le_bytes());
        h[24..32].copy_from_slice(&self.salt.to_le_bytes());
        let sum = xxh3_64_with_seed(&h[..36], 0) as u32;
        h[36..40].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Decodes and checks a header of any readable version, requiring `kind`.
    pub fn decode(bytes: &[u8], kind: LogKind) -> Result<LogHeader, LogError> {
        if bytes.len() < 12 {
            return Err(LogError::TooShort {
                found: bytes.len(),
                needed: FILE_HEADER_LEN,
            });
        }
        if bytes[0..8] != MAGIC {
            return Err(LogError::BadMagic);
        }
        let version = u32_at(bytes, 8);
        let (len, salt_at) = match version {
            1 => (32, None),
            FORMAT_VERSION => (FILE_HEADER_LEN, Some(24)),
            found => return Err(LogError::UnsupportedVersion { found }),
        };
        if bytes.len() < len {
            return Err(LogError::TooShort {
                found: bytes.len(),
                needed: len,
            });
        }
        if u32_at(bytes, len - 4) != xxh3_64_with_seed(&bytes[..len - 4], 0) as u32 {
            return Err(LogError::HeaderChecksum);
        }
        let code = u32_at(bytes, 12);
        let found = LogKind::from_code(code).ok_or(LogError::UnknownKind(code))?;
        if found != kind {
            return Err(LogError::WrongKind {
                expected: kind,
                found,
            });
        }
        Ok(LogHeader {
            kind,
            first_lsn: u64_at(bytes, 16),
            salt: salt_at.map_or(0, |at| u64_at(bytes, at)),
            version,
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends one flush — `records` as `(lsn, body)`, the first marked [`FLUSH_START`], the last
/// [`FLUSH_END`] — to `out`, checksummed with `salt` (the file header's). Every record is
/// checked before any is written: on an error `out` is unchanged.
pub fn encode_flush<B: AsRef<[u8]>>(
    salt: u64,
    records: &[(u64, B)],
    out: &mut Vec<u8>,
) -> Result<(), LogError> {
    if let Some((_, body)) = records.iter().find(|(_, b)| b.as_ref().len() > MAX_RECORD) {
        return Err(LogError::RecordTooLarge {
            len: body.as_ref().len(),
        });
    }
    let last = records.len().saturating_sub(1);
    for (i, (lsn, body)) in records.iter().enumerate() {
        let body = body.as_ref();
        let flags = if i == 0 { FLUSH_START } else { 0 } | if i == last { FLUSH_END } else { 0 };
        let start = out.len();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&xxh3_64_with_seed(body, salt).to_le_bytes());
        let head_sum = xxh3_64_with_seed(&out[start..start + 24], salt) as u32;
        out.extend_from_slice(&head_sum.to_le_bytes());
        out.extend_from_slice(body);
    }
    Ok(())
}

/// A record as read back, borrowing its body from the log's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: u64,
    /// Byte offset of the record in the file (its header's first byte).
    pub offset: u64,
    /// [`FLUSH_START`] and [`FLUSH_END`] (both, for every record of a version-1 file).
    pub flags: u32,
    pub body: &'a [u8],
}

impl Record<'_> {
    /// The offset just past the record, in a file of `layout`.
    fn end(&self, layout: Layout) -> u64 {
        self.offset + (layout.record_header_len + self.body.len()) as u64
    }
}

/// How a record at some offset failed to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    Incomplete,
    Header,
    Length,
    Body,
    NoStart,
    StartInFlush,
}

impl Bad {
    const fn describe(self) -> &'static str {
        match self {
            Bad::Incomplete => "record runs past the end of the file",
            Bad::Header => "record header checksum mismatch",
            Bad::Length => "record length above the limit",
            Bad::Body => "record body checksum mismatch",
            Bad::NoStart => "record continues a flush that ended or never started",
            Bad::StartInFlush => "a flush starts before the previous one ended",
        }
    }
}

/// Reads the record at `at` in `bytes`.
fn read_record(bytes: &[u8], at: usize, layout: Layout) -> Result<Record<'_>, Bad> {
    let rest = &bytes[at..];
    if rest.len() < layout.record_header_len {
        return Err(Bad::Incomplete);
    }
    let covered = layout.head_sum_at;
    if u32_at(rest, covered) != xxh3_64_with_seed(&rest[..covered], layout.salt) as u32 {
        return Err(Bad::Header);
    }
    let len = u32_at(rest, 0) as usize;
    if len > MAX_RECORD {
        return Err(Bad::Length);
    }
    let (flags, lsn_at) = if layout.flagged {
        (u32_at(rest, 4), 8)
    } else {
        (FLUSH_START | FLUSH_END, 4)
    };
    let end = layout.record_header_len + len;
    if rest.len() < end {
        return Err(Bad::Incomplete);
    }
    let body = &rest[layout.record_header_len..end];
    if xxh3_64_with_seed(body, layout.salt) != u64_at(rest, lsn_at + 8) {
        return Err(Bad::Body);
    }
    Ok(Record {
        lsn: u64_at(rest, lsn_at),
        offset: at as u64,
        flags,
        body,
    })
}

/// What a scan of a whole log found.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    pub header: LogHeader,
    /// Every record of a complete flush, in file order.
    pub records: Vec<Record<'a>>,
    /// Length through the last complete flush: recovery truncates the file here.
    pub valid_len: u64,
    /// Set when bytes after the last complete flush are dropped (a torn write): what was wrong.
    pub torn_tail: Option<&'static str>,
}

/// Reads a whole log. Everything after the last complete flush is a torn tail when no valid
/// flush start follows the first damaged record (the result says where to truncate); a damaged
/// record followed by a valid flush start is corruption, an error naming its offset. LSNs must
/// strictly increase.
pub fn scan(bytes: &[u8], kind: LogKind) -> Result<Scan<'_>, LogError> {
    let header = LogHeader::decode(bytes, kind)?;
    let layout = Layout::of(&header);
    let mut records = Vec::new();
    let mut at = layout.header_len;
    // Records and bytes through the last complete flush.
    let mut complete = (0, at);
    let mut in_flush = false;
    while at < bytes.len() {
        let record = read_record(bytes, at, layout).and_then(|r| {
            match (r.flags & FLUSH_START != 0, in_flush) {
                (true, true) => Err(Bad::StartInFlush),
                (false, false) => Err(Bad::NoStart),
                _ => Ok(r),
            }
        });
        match record {
            Ok(r) => {
                if let Some(p) = records
                    .last()
                    .map(|p: &Record| p.lsn)
                    .filter(|&p| r.lsn <= p)
                {
                    return Err(LogError::LsnOrder {
                        previous: p,
                        lsn: r.lsn,
                    });
                }
                at = r.end(layout) as usize;
                in_flush = r.flags & FLUSH_END == 0;
                records.push(r);
                if !in_flush {
                    complete = (records.len(), at);
                }
            }
            Err(bad) => {
                // A valid flush start, here or later, proves what came before was durable.
                let flush_follows = bad == Bad::StartInFlush
                    || (at + 1..bytes.len()).any(|o| {
                        read_record(bytes, o, layout).is_ok_and(|r| r.flags & FLUSH_START != 0)
                    });
                if flush_follows {
                    return Err(LogError::Corrupt {
                        offset: at as u64,
                        what: bad.describe(),
                    });
                }
                records.truncate(complete.0);
                return Ok(Scan {
                    header,
                    records,
                    valid_len: complete.1 as u64,
                    torn_tail: Some(bad.describe()),
                });
            }
        }
    }
    let torn_tail = in_flush.then_some("the last flush has no end record");
    records.truncate(complete.0);
    Ok(Scan {
        header,
        records,
        valid_len: complete.1 as u64,
        torn_tail,
    })
}

/// What [`salvage`] kept of a damaged log.
#[derive(Debug, PartialEq, Eq)]
pub struct Salvage<'a> {
    pub header: LogHeader,
    /// Every record that reads back whole, in file order (LSNs strictly increasing).
    pub records: Vec<Record<'a>>,
    /// Byte ranges `[start, end)` in which no record reads back.
    pub lost: Vec<(u64, u64)>,
}

/// Keeps every record of a log that reads back whole — before, between and after damaged
/// ranges, in complete flushes or not — for an offline repair: unlike truncating at the first
/// damage, this loses no record that is still intact. A record whose LSN does not follow the
/// previous kept one is dropped with its bytes counted as lost. Only a damaged header (whose
/// salt the records need) is an error.
pub fn salvage(bytes: &[u8], kind: LogKind) -> Result<Salvage<'_>, LogError> {
    let header = LogHeader::decode(bytes, kind)?;
    let layout = Layout::of(&header);
    let mut records: Vec<Record> = Vec::new();
    let mut lost = Vec::new();
    let mut at = layout.header_len;
    while at < bytes.len() {
        match read_record(bytes, at, layout) {
            Ok(r) if records.last().is_none_or(|p| p.lsn < r.lsn) => {
                at = r.end(layout) as usize;
                records.push(r);
            }
            _ => {
                let next = (at + 1..bytes.len())
                    .find(|&o| {
                        read_record(bytes, o, layout)
                            .is_ok_and(|r| records.last().is_none_or(|p| p.lsn < r.lsn))
                    })
                    .unwrap_or(bytes.len());
                lost.push((at as u64, next as u64));
                at = next;
            }
        }
    }
    Ok(Salvage {
        header,
        records,
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SALT: u64 = 0x5eed_0f0f_7e57;

    /// A log of `flushes`, each a list of bodies; LSNs count from 1.
    fn log(flushes: &[Vec<Vec<u8>>]) -> Vec<u8> {
        let mut out = LogHeader::new(LogKind::CloudWal, 1, SALT).encode().to_vec();
        let mut lsn = 0;
        for flush in flushes {
            let records: Vec<(u64, &[u8])> = flush
                .iter()
                .map(|b| {
                    lsn += 1;
                    (lsn, b.as_slice())
                })
                .collect();
            encode_flush(SALT, &records, &mut out).unwrap();
        }
        out
    }

    fn flushes() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
        let body = proptest::collection::vec(any::<u8>(), 0..120);
        proptest::collection::vec(proptest::collection::vec(body, 1..4), 1..7)
    }

    /// `(start, end)` byte ranges of each flush in `log(flushes)`.
    fn flush_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for r in scan(bytes, LogKind::CloudWal).unwrap().records {
            let end = r.offset as usize + RECORD_HEADER_LEN + r.body.len();
            if r.flags & FLUSH_START != 0 {
                out.push((r.offset as usize, end));
            }
            out.last_mut().unwrap().1 = end;
        }
        out
    }

    proptest! {
        #[test]
        fn flushes_round_trip(f in flushes()) {
            let bytes = log(&f);
            let s = scan(&bytes, LogKind::CloudWal).unwrap();
            prop_assert_eq!(s.torn_tail, None);
            prop_assert_eq!(s.valid_len as usize, bytes.len());
            let got: Vec<&[u8]> = s.records.iter().map(|r| r.body).collect();
            let want: Vec<&[u8]> = f.iter().flatten().map(Vec::as_slice).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(flush_ranges(&bytes).len(), f.len());
        }

        /// Cutting the file anywhere after the header keeps exactly the flushes that end at or
        /// before the cut, and recovery truncates at the last of them.
        #[test]
        fn any_truncation_keeps_the_complete_flushes(f in flushes(), cut in any::<prop::sample::Index>()) {
            let bytes = log(&f);
            let ranges = flush_ranges(&bytes);
            let cut = FILE_HEADER_LEN + cut.index(bytes.len() - FILE_HEADER_LEN);
            let s = scan(&bytes[..cut], LogKind::CloudWal).unwrap();
            let whole: usize = f.iter().zip(&ranges).filter(|(_, r)| r.1 <= cut).map(|(f, _)| f.len()).sum();
            let valid = ranges.iter().map(|r| r.1).filter(|&e| e <= cut).max().unwrap_or(FILE_HEADER_LEN);
            prop_assert_eq!(s.records.len(), whole);
            prop_assert_eq!(s.valid_len as usize, valid);
            prop_assert_eq!(s.torn_tail.is_some(), cut != valid);
        }

        /// A flipped bit is never silently accepted: in the last flush it drops that flush as
        /// a torn tail; anywhere before, it is corruption at or before the flipped byte.
        #[test]
        fn a_flipped_bit_is_detected(f in flushes(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = log(&f);
            let ranges = flush_ranges(&bytes);
            let last = *ranges.last().unwrap();
            let at = FILE_HEADER_LEN + at.index(bytes.len() - FILE_HEADER_LEN);
            bytes[at] ^= 1 << bit;
            match scan(&bytes, LogKind::CloudWal) {
                Ok(s) => {
                    prop_assert!(at >= last.0, "flip at {} before the last flush ({}) went unreported", at, last.0);
                    prop_assert_eq!(s.valid_len as usize, last.0);
                    prop_assert_eq!(s.records.len(), f[..f.len() - 1].iter().map(Vec::len).sum::<usize>());
                    prop_assert!(s.torn_tail.is_some());
                }
                Err(LogError::Corrupt { offset, .. }) => {
                    prop_assert!(at < last.0);
                    prop_assert!(offset as usize <= at);
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        /// Finding 7: the pages of an unacknowledged flush reach the disk in any order. Any
        /// damaged range inside the last flush — later records of it intact or not — is a
        /// torn tail, never corruption, and every earlier flush survives.
        #[test]
        fn a_last_flush_persisted_out_of_order_is_a_torn_tail(
            f in flushes(), from in any::<prop::sample::Index>(), len in 1usize..64,
        ) {
            let mut bytes = log(&f);
            let last = *flush_ranges(&bytes).last().unwrap();
            let from = last.0 + from.index(last.1 - last.0);
            let to = (from + len).min(last.1);
            bytes[from..to].iter_mut().for_each(|b| *b = !*b);
            let s = scan(&bytes, LogKind::CloudWal).unwrap();
            prop_assert_eq!(s.valid_len as usize, last.0);
            prop_assert_eq!(s.records.len(), f[..f.len() - 1].iter().map(Vec::len).sum::<usize>());
            prop_assert!(s.torn_tail.is_some());
        }

        /// `salvage` keeps every record that the damage did not touch, wherever it lies.
        #[test]
        fn salvage_keeps_every_intact_record(f in flushes(), from in any::<prop::sample::Index>(), len in 1usize..64) {
            let mut bytes = log(&f);
            let intact = scan(&bytes, LogKind::CloudWal).unwrap().records.iter()
                .map(|r| (r.offset as usize, r.offset as usize + RECORD_HEADER_LEN + r.body.len(), r.lsn))
                .collect::<Vec<_>>();
            let from = FILE_HEADER_LEN + from.index(bytes.len() - FILE_HEADER_LEN);
            let to = (from + len).min(bytes.len());
            bytes[from..to].iter_mut().for_each(|b| *b = !*b);
            let s = salvage(&bytes, LogKind::CloudWal).unwrap();
            let kept: Vec<u64> = s.records.iter().map(|r| r.lsn).collect();
            let untouched: Vec<u64> = intact.iter().filter(|(a, b, _)| *b <= from || *a >= to).map(|r| r.2).collect();
            prop_assert_eq!(kept, untouched);
            prop_assert!(!s.lost.is_empty());
        }
    }

    /// Finding 7: bytes a client chose inside a body — a whole record and flush, checksummed
    /// as well as a client can without the file's salt — never pass for records when that body
    /// is torn: recovery cuts a torn tail instead of refusing to start.
    #[test]
    fn record_shaped_bytes_in_a_torn_body_are_a_torn_tail() {
        let mut forged = Vec::new();
        for guess in [0, 1, SALT ^ 1] {
            encode_flush(guess, &[(1_000, b"forged".as_slice())], &mut forged).unwrap();
        }
        let mut body = vec![7u8; 64];
        body.extend_from_slice(&forged);
        body.extend_from_slice(&[9u8; 64]);
        let bytes = log(&[vec![b"one".to_vec()], vec![b"two".to_vec()], vec![body]]);
        let torn = &bytes[..bytes.len() - 10];
        let s = scan(torn, LogKind::CloudWal).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.torn_tail, Some("record runs past the end of the file"));
        assert_eq!(
            s.valid_len as usize,
            flush_ranges(&bytes)[1].1,
            "the cut is after the second flush"
        );
    }

    /// A record that starts a flush before the previous one ended proves the previous flush
    /// was written whole: damage before it is corruption, not a torn tail.
    #[test]
    fn damage_before_a_later_flush_is_corruption() {
        let bytes = log(&[
            vec![b"a".to_vec(), b"b".to_vec()],
            vec![b"c".to_vec()],
            vec![b"d".to_vec()],
        ]);
        let ranges = flush_ranges(&bytes);
        let mut damaged = bytes.clone();
        damaged[ranges[1].0 + 2] ^= 1;
        assert_eq!(
            scan(&damaged, LogKind::CloudWal),
            Err(LogError::Corrupt {
                offset: ranges[1].0 as u64,
                what: "record header checksum mismatch"
            })
        );
        let s = salvage(&damaged, LogKind::CloudWal).unwrap();
        let kept: Vec<&[u8]> = s.records.iter().map(|r| r.body).collect();
        assert_eq!(kept, [b"a".as_slice(), b"b", b"d"]);
        assert_eq!(s.lost, vec![(ranges[1].0 as u64, ranges[1].1 as u64)]);

        // The end record of the first flush lost and a second flush following it.
        let second_record = scan(&bytes, LogKind::CloudWal).unwrap().records[1].offset as usize;
        let mut spliced = bytes[..second_record].to_vec();
        spliced.extend_from_slice(&bytes[ranges[1].0..]);
        assert!(matches!(
            scan(&spliced, LogKind::CloudWal),
            Err(LogError::Corrupt {
                what: "a flush starts before the previous one ended",
                ..
            })
        ));
    }

    /// A version-1 file (written by the release before flushes were marked; frozen in the
    /// edge's test fixtures) reads back: its records are one flush each, unsalted.
    #[test]
    fn version_1_files_are_read() {
        let bytes = include_bytes!("../../edge/tests/fixtures/deltas-v1.log");
        let s = scan(bytes, LogKind::EdgeDeltas).unwrap();
        assert_eq!(s.header.version, 1);
        assert!(!s.header.is_current());
        assert_eq!(s.header.first_lsn, 1);
        assert_eq!(
            s.records.iter().map(|r| r.lsn).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(s.records.iter().all(|r| r.flags == FLUSH_START | FLUSH_END));
        assert_eq!((s.valid_len as usize, s.torn_tail), (bytes.len(), None));
        let cut = scan(&bytes[..bytes.len() - 3], LogKind::EdgeDeltas).unwrap();
        assert_eq!(cut.records.len(), 2);
        assert!(cut.torn_tail.is_some());
        let mut damaged = bytes.to_vec();
        damaged[32 + 30] ^= 1;
        assert!(matches!(
            scan(&damaged, LogKind::EdgeDeltas),
            Err(LogError::Corrupt { offset: 32, .. })
        ));
    }

    #[test]
    fn header_errors_are_distinct() {
        let bytes = log(&[vec![vec![1, 2, 3]]]);
        assert_eq!(
            scan(&bytes[..10], LogKind::CloudWal),
            Err(LogError::TooShort {
                found: 10,
                needed: FILE_HEADER_LEN
            })
        );
        assert_eq!(
            scan(&bytes[..36], LogKind::CloudWal),
            Err(LogError::TooShort {
                found: 36,
                needed: FILE_HEADER_LEN
            })
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
        assert_eq!(
            scan(&b, LogKind::CloudWal),
            Err(LogError::UnsupportedVersion { found: 9 })
        );
        let mut b = bytes;
        b[26] ^= 1;
        assert_eq!(scan(&b, LogKind::CloudWal), Err(LogError::HeaderChecksum));
    }

    #[test]
    fn lsns_must_increase_and_huge_bodies_are_refused() {
        let mut out = LogHeader::new(LogKind::CloudWal, 1, SALT).encode().to_vec();
        encode_flush(SALT, &[(5, b"a"), (5, b"b")], &mut out).unwrap();
        assert_eq!(
            scan(&out, LogKind::CloudWal),
            Err(LogError::LsnOrder {
                previous: 5,
                lsn: 5
            })
        );
        let big = vec![0u8; MAX_RECORD + 1];
        let mut out = vec![1];
        assert_eq!(
            encode_flush(SALT, &[(1, vec![]), (2, big)], &mut out),
            Err(LogError::RecordTooLarge {
                len: MAX_RECORD + 1
            })
        );
        assert_eq!(out, [1], "nothing of a refused flush is written");
    }
}
