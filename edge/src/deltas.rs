//! The edge's delta log: every delta the cloud pushed since the snapshot was written, in the
//! shared log format (`tiervec_shared::log`, kind `EdgeDeltas`, documented in `docs/wal.md`),
//! one record per delta and one flush per append, its LSN the manifest version, its body the
//! delta's rkyv archive. A delta is acknowledged to the cloud only after its record is fsynced.
//! A log in an older format is read and rewritten in the current one when it is opened.
//!
//! A compaction writes a new snapshot at version V and then rewrites the log with only the
//! records after V (atomically), so that a crash between the two leaves records the reader
//! skips, never a gap.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tiervec_shared::durable::write_atomic;
use tiervec_shared::log::{self, LogError, LogHeader, LogKind};
use tiervec_shared::push::{Delta, UndecodableDelta};

#[derive(Debug, Error)]
pub enum DeltaLogError {
    #[error("delta log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write a record to delta log {path}: {source}")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: LogError,
    },
    #[error("delta log {path} is damaged: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: LogError,
    },
    #[error("delta log {path}: record {version} does not decode: {source}")]
    Undecodable {
        path: PathBuf,
        version: u64,
        #[source]
        source: UndecodableDelta,
    },
    #[error("delta log {path}: record {record} holds delta {holds}")]
    VersionMismatch {
        path: PathBuf,
        record: u64,
        holds: u64,
    },
    /// An earlier append failed and its bytes could not be taken back (or its fsync failed,
    /// after which the file's state is unknown): the log takes no more deltas until it is
    /// opened again, so nothing is acknowledged that might not survive.
    #[error(
        "delta log {path} stopped taking deltas after a failed append ({why}); restart the edge"
    )]
    Stopped { path: PathBuf, why: String },
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Replayed {
    pub deltas: Vec<Delta>,
    /// Set when a torn last record (a crash mid-append) was cut off: its description.
    pub truncated: Option<&'static str>,
}

/// The open delta log, appended to by the one writer of the cache.
#[derive(Debug)]
pub struct DeltaLog {
    path: PathBuf,
    file: File,
    /// Seed of the file's record checksums (its header's).
    salt: u64,
    /// The length through the last record appended whole and fsynced.
    good_len: u64,
    /// Why appends stopped, if they did.
    stopped: Option<String>,
}

/// Appends `deltas`' records to `out`, each its own flush (as each was appended and fsynced
/// alone): damage to any but the last is then corruption, never mistaken for a torn write. A
/// body over the record limit is refused, not a panic.
fn encode(
    deltas: &[Delta],
    salt: u64,
    out: &mut Vec<u8>,
    path: &Path,
) -> Result<(), DeltaLogError> {
    for d in deltas {
        log::encode_flush(salt, &[(d.version, d.to_bytes())], out).map_err(|source| {
            DeltaLogError::Unwritable {
                path: path.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

/// A random seed for a new log's checksums (std's per-instance random hash keys), unknown to
/// the cloud, so bytes inside a pushed vector can never pass for a record.
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
}

impl DeltaLog {
    /// Bytes of the log through its last whole record.
    pub fn bytes(&self) -> u64 {
        self.good_len
    }

    /// Opens (or creates) the log at `path` and returns its deltas in version order. A torn
    /// tail is truncated; a log in an older format is rewritten in the current one; anything
    /// else wrong is an error (the caller sets the file aside).
    pub fn open(path: &Path) -> Result<(DeltaLog, Replayed), DeltaLogError> {
        let io_err = |source| DeltaLogError::Io {
            path: path.to_owned(),
            source,
        };
        if !path.exists() {
            return Ok((Self::rewrite(path, &[])?, Replayed::default()));
        }
        let bytes = std::fs::read(path).map_err(io_err)?;
        let scan =
            log::scan(&bytes, LogKind::EdgeDeltas).map_err(|source| DeltaLogError::Corrupt {
                path: path.to_owned(),
                source,
            })?;
        let mut replayed = Replayed {
            truncated: scan.torn_tail,
            ..Replayed::default()
        };
        for record in &scan.records {
            let delta =
                Delta::from_bytes(record.body).map_err(|source| DeltaLogError::Undecodable {
                    path: path.to_owned(),
                    version: record.lsn,
                    source,
                })?;
            if delta.version != record.lsn {
                return Err(DeltaLogError::VersionMismatch {
                    path: path.to_owned(),
                    record: record.lsn,
                    holds: delta.version,
                });
            }
            replayed.deltas.push(delta);
        }
        if !scan.header.is_current() {
            return Ok((Self::rewrite(path, &replayed.deltas)?, replayed));
        }
        let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
        if scan.torn_tail.is_some() {
            file.set_len(scan.valid_len).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        let mut log = DeltaLog {
            path: path.to_owned(),
            file,
            salt: scan.header.salt,
            good_len: 0,
            stopped: None,
        };
        log.good_len = log.seek_end()?;
        Ok((log, replayed))
    }

    /// Moves to the end of the file; returns its length.
    fn seek_end(&mut self) -> Result<u64, DeltaLogError> {
        use std::io::Seek;
        self.file
            .seek(io::SeekFrom::End(0))
            .map_err(|source| DeltaLogError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the log at `path`, atomically, by one holding exactly `deltas`.
    pub fn rewrite(path: &Path, deltas: &[Delta]) -> Result<DeltaLog, DeltaLogError> {
        let io_err = |source| DeltaLogError::Io {
            path: path.to_owned(),
            source,
        };
        let salt = random_u64();
        let first_lsn = deltas.first().map_or(0, |d| d.version);
        let mut bytes = LogHeader::new(LogKind::EdgeDeltas, first_lsn, salt)
            .encode()
            .to_vec();
        encode(deltas, salt, &mut bytes, path)?;
        write_atomic(path, &bytes, false).map_err(io_err)?;
        let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
        let mut log = DeltaLog {
            path: path.to_owned(),
            file,
            salt,
            good_len: 0,
            stopped: None,
        };
        log.good_len = log.seek_end()?;
        Ok(log)
    }

    /// Appends `delta` and fsyncs: when this returns Ok, the delta survives a crash. When the
    /// write fails part-way (a full disk), its bytes are cut off again so that the next append
    /// does not land behind garbage (which the next open would take for damage and set the
    /// whole log aside); when that cut or the fsync fails, the log stops taking deltas.
    pub fn append(&mut self, delta: &Delta) -> Result<(), DeltaLogError> {
        if let Some(why) = &self.stopped {
            return Err(DeltaLogError::Stopped {
                path: self.path.clone(),
                why: why.clone(),
            });
        }
        let mut bytes = Vec::new();
        encode(
            std::slice::from_ref(delta),
            self.salt,
            &mut bytes,
            &self.path,
        )?;
        let path = self.path.clone();
        let io_err = |source| DeltaLogError::Io { path, source };
        if let Err(e) = self.file.write_all(&bytes) {
            if let Err(cut) = self.cut_back() {
                self.stopped = Some(format!("{e}; then cutting it back: {cut}"));
            }
            return Err(io_err(e));
        }
        if let Err(e) = self.file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages: what is on disk
            // is unknown, so nothing more is appended (or acknowledged) until a reopen reads it.
            self.stopped = Some(format!("fsync failed: {e}"));
            return Err(io_err(e));
        }
        self.good_len += bytes.len() as u64;
        Ok(())
    }

    /// Truncates the file to the last good record and moves there.
    fn cut_back(&mut self) -> io::Result<()> {
        use std::io::Seek;
        self.file.set_len(self.good_len)?;
        self.file.sync_data()?;
        self.file.seek(io::SeekFrom::Start(self.good_len)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(version: u64) -> Delta {
        Delta {
            collection_id: [3; 16],
            version,
            evict: vec![version],
            ..Delta::default()
        }
    }

    #[test]
    fn appended_deltas_come_back_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.deltas");
        let (mut log, replayed) = DeltaLog::open(&path).unwrap();
        assert!(replayed.deltas.is_empty());
        for v in 1..=3 {
            log.append(&delta(v)).unwrap();
        }
        drop(log);
        let len = std::fs::metadata(&path).unwrap().len();
        let (_, replayed) = DeltaLog::open(&path).unwrap();
        assert_eq!(replayed.deltas, vec![delta(1), delta(2), delta(3)]);

        // A crash in the middle of the last append.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap();
        let (mut log, replayed) = DeltaLog::open(&path).unwrap();
        assert_eq!(replayed.deltas.len(), 2);
        assert!(replayed.truncated.is_some());
        log.append(&delta(3)).unwrap();
        drop(log);
        let (_, replayed) = DeltaLog::open(&path).unwrap();
        assert_eq!(replayed.deltas.len(), 3, "appends go on after the cut");

        let log = DeltaLog::rewrite(&path, &[delta(3)]).unwrap();
        drop(log);
        assert_eq!(DeltaLog::open(&path).unwrap().1.deltas, vec![delta(3)]);
    }

    /// Item 11: an append that fails part-way leaves nothing behind it (the next append and
    /// the next open see only whole records), and one whose bytes cannot be taken back stops
    /// the log: no later delta is written, so none is acknowledged.
    #[test]
    fn a_failed_append_is_cut_back_or_stops_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.deltas");
        let (mut log, _) = DeltaLog::open(&path).unwrap();
        log.append(&delta(1)).unwrap();
        // What a write that fails half-way leaves: part of a record after the last good one.
        let mut half = Vec::new();
        encode(&[delta(2)], log.salt, &mut half, &path).unwrap();
        log.file.write_all(&half[..half.len() / 2]).unwrap();
        log.cut_back().unwrap();
        log.append(&delta(2)).unwrap();
        log.append(&delta(3)).unwrap();
        drop(log);
        let (_, replayed) = DeltaLog::open(&path).unwrap();
        assert_eq!(replayed.deltas, vec![delta(1), delta(2), delta(3)]);
        assert!(
            replayed.truncated.is_none(),
            "nothing torn, nothing set aside"
        );

        // A disk that takes no bytes and a file that cannot be cut: the log stops.
        let mut full = DeltaLog {
            path: path.clone(),
            file: OpenOptions::new().write(true).open("/dev/full").unwrap(),
            salt: 0,
            good_len: 0,
            stopped: None,
        };
        assert!(matches!(
            full.append(&delta(4)),
            Err(DeltaLogError::Io { .. })
        ));
        assert!(matches!(
            full.append(&delta(5)),
            Err(DeltaLogError::Stopped { .. })
        ));
        let (_, replayed) = DeltaLog::open(&path).unwrap();
        assert_eq!(replayed.deltas.len(), 3, "the log on disk is untouched");
    }

    #[test]
    fn damage_before_the_end_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.deltas");
        let (mut log, _) = DeltaLog::open(&path).unwrap();
        for v in 1..=3 {
            log.append(&delta(v)).unwrap();
        }
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[log::FILE_HEADER_LEN + 30] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = DeltaLog::open(&path).unwrap_err();
        assert!(matches!(err, DeltaLogError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("cache.deltas"));
        std::fs::write(&path, b"not a log at all, just some bytes here").unwrap();
        assert!(DeltaLog::open(&path).is_err());
    }

    /// A delta log of format version 1 (frozen: written by the release before flushes were
    /// marked) replays, is rewritten in the current format, and takes appends after that.
    #[test]
    fn a_version_1_log_is_read_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.deltas");
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/deltas-v1.log"),
            &path,
        )
        .unwrap();
        let (mut log, replayed) = DeltaLog::open(&path).unwrap();
        let versions: Vec<u64> = replayed.deltas.iter().map(|d| d.version).collect();
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(replayed.deltas[1].tombstones[0].id, 55);
        assert_eq!(
            replayed.deltas[2].vectors[0].payload.as_deref(),
            Some("point 3")
        );
        let bytes = std::fs::read(&path).unwrap();
        let header = LogHeader::decode(&bytes, LogKind::EdgeDeltas).unwrap();
        assert!(header.is_current(), "rewritten in the current format");
        log.append(&delta(4)).unwrap();
        drop(log);
        let (_, again) = DeltaLog::open(&path).unwrap();
        assert_eq!(&again.deltas[..3], &replayed.deltas[..]);
        assert_eq!(again.deltas[3], delta(4));
    }
}
