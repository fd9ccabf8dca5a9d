//! The write-ahead log on disk: segment files, recovery, and group commit.
//!
//! Records use the shared log format (`tiervec_shared::log`, kind `CloudWal`) with
//! [`WalEntry`] bodies; `docs/wal.md` documents both. Each flush is marked as one in the log, so
//! that recovery cuts an unacknowledged flush that reached the disk partly (in any order) as a
//! torn tail; [`repair`] keeps every intact record of a log damaged before its end. Segments are named
//! `wal-{first_lsn:020}.log` in the data directory; a checkpoint at LSN `c` starts a new
//! segment at `c + 1`, after which older segments can be deleted.
//!
//! **Group commit.** A writer queues its encoded entry and waits. The first writer that finds no
//! flush under way becomes the leader: it takes every queued entry, frames them as one flush
//! (first and last record marked), writes it with one `write` and one `fdatasync`, applies the
//! flushed entries to the in-memory state in LSN order (through the `apply` hook), marks them
//! durable and wakes the others. So concurrent writers share fsyncs, nothing is visible before it is durable, and no
//! write is acknowledged before its fsync returned. An IO error poisons the log: every later
//! write fails until the process restarts and recovers from disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard};
use thiserror::Error;
use tiervec_shared::durable::{sync_dir, write_atomic};
use tiervec_shared::log::{self, FILE_HEADER_LEN, LogError, LogHeader, LogKind, MAX_RECORD};

use super::entry::{UndecodableEntry, WalEntry};

/// Why the WAL failed.
#[derive(Debug, Error)]
pub enum WalError {
    #[error("WAL file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("WAL file {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: LogError,
    },
    #[error(
        "WAL file {path} is corrupt at byte {offset}: {what}, and a later flush follows (so it was acknowledged); the server will not start on a damaged log — stop it and run `tiervec-cloud repair --data-dir <dir>`, which keeps every record that reads back whole and sets the damaged file aside"
    )]
    BadEntry {
        path: PathBuf,
        offset: u64,
        what: &'static str,
    },
    #[error(
        "WAL file {path} holds a record at byte {offset} that does not decode ({source}); the server will not start on a damaged log — restore the file or move it aside"
    )]
    Undecodable {
        path: PathBuf,
        offset: u64,
        #[source]
        source: UndecodableEntry,
    },
    #[error(
        "WAL file {path} ends in a torn write but a later segment exists: an earlier segment cannot be torn; stop the server and run `tiervec-cloud repair --data-dir <dir>`"
    )]
    TornMiddle { path: PathBuf },
    #[error(
        "the WAL is unusable after an earlier write failure ({0}); restart the server to recover"
    )]
    Poisoned(String),
    #[error("write too large for one WAL record: {0}")]
    TooLarge(LogError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where recovery stopped, for logs and `inspect`.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records_replayed: u64,
    pub records_skipped: u64,
    /// `(file, offset, why)` of a torn tail that was truncated.
    pub truncated: Option<(PathBuf, u64, &'static str)>,
}

/// Files in `dir` named `{prefix}{number}{suffix}`, with their number, in ascending order.
pub(super) fn numbered_files(
    dir: &Path,
    prefix: &str,
    suffix: &str,
) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(n) = name
            .strip_prefix(prefix)
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Lists `wal-*.log` segments in `dir` with their first LSN, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "wal-", ".log")
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("wal-{first_lsn:020}.log"))
}

/// Reads every segment in `dir`, calling `replay` for each entry with an LSN above `after`, in
/// order. Truncates a torn tail of the last segment (durably); any other damage is an error
/// naming the file and offset. Returns the report and the highest LSN seen.
pub fn recover(
    dir: &Path,
    after: u64,
    mut replay: impl FnMut(u64, WalEntry),
) -> Result<(RecoveryReport, u64), WalError> {
    let segs = segments(dir).map_err(io_err(dir))?;
    let mut report = RecoveryReport {
        segments: segs.len(),
        ..RecoveryReport::default()
    };
    let mut last = after;
    for (i, (_, path)) in segs.iter().enumerate() {
        let bytes = fs::read(path).map_err(io_err(path))?;
        // A newest segment without a whole header is one whose creation never finished (by a
        // version that did not create segments atomically): it holds no record.
        if i + 1 == segs.len() && bytes.len() < FILE_HEADER_LEN {
            fs::remove_file(path).map_err(io_err(path))?;
            sync_dir(dir).map_err(io_err(dir))?;
            report.segments -= 1;
            report.truncated = Some((path.clone(), 0, "a segment whose header was never written"));
            continue;
        }
        let scan = log::scan(&bytes, LogKind::CloudWal).map_err(|source| match source {
            LogError::Corrupt { offset, what } => WalError::BadEntry {
                path: path.clone(),
                offset,
                what,
            },
            source => WalError::Format {
                path: path.clone(),
                source,
            },
        })?;
        for r in &scan.records {
            if r.lsn <= last {
                report.records_skipped += 1;
                continue;
            }
            let entry = WalEntry::decode(r.body).map_err(|source| WalError::Undecodable {
                path: path.clone(),
                offset: r.offset,
                source,
            })?;
            replay(r.lsn, entry);
            last = r.lsn;
            report.records_replayed += 1;
        }
        if let Some(why) = scan.torn_tail {
            if i + 1 != segs.len() {
                return Err(WalError::TornMiddle { path: path.clone() });
            }
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            file.set_len(scan.valid_len).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
            report.truncated = Some((path.clone(), scan.valid_len, why));
        }
    }
    Ok((report, last))
}

type ApplyFn<S> = Box<dyn Fn(&S, &[(u64, WalEntry)]) + Send + Sync>;

struct Segment {
    /// Seed of the segment's record checksums (its header's).
    salt: u64,
    /// Shared with the flush leader, which writes while the lock is released: a duplicated
    /// descriptor per flush could fail (EMFILE) and poison the log for a reason that is not
    /// the disk's.
    file: Arc<File>,
    path: PathBuf,
    bytes: u64,
}

struct WalState {
    segment: Segment,
    next_lsn: u64,
    durable_lsn: u64,
    /// Encoded bodies waiting for the next flush, with their LSNs.
    pending: Vec<(u64, Vec<u8>)>,
    pending_entries: Vec<(u64, WalEntry)>,
    flushing: bool,
    failed: Option<String>,
    /// Flushes (write + fsync) so far: fewer than records when writers shared them.
    flushes: u64,
    /// Bytes in all live segments (for metrics and checkpoint triggers).
    total_bytes: u64,
}

/// The open write-ahead log with group commit. `S` is the state the `apply` hook updates.
pub struct Wal<S: ?Sized> {
    dir: PathBuf,
    state: Mutex<WalState>,
    flushed: Condvar,
    apply: ApplyFn<S>,
}

/// Statistics of one flush, reported to the metrics hook.
#[derive(Clone, Copy, Debug)]
pub struct FlushStats {
    pub records: usize,
    pub bytes: usize,
    pub fsync_seconds: f64,
}

impl<S: ?Sized> Wal<S> {
    /// Opens the log for appending after recovery: continues the newest segment when it is in
    /// the current format, or starts one at `next_lsn`. `apply` is called by flush leaders with
    /// durable entries in LSN order.
    pub fn open(
        dir: &Path,
        next_lsn: u64,
        apply: impl Fn(&S, &[(u64, WalEntry)]) + Send + Sync + 'static,
    ) -> Result<Wal<S>, WalError> {
        let segs = segments(dir).map_err(io_err(dir))?;
        let segment = match segs.last() {
            Some((_, path)) => match open_current(path)? {
                Some(segment) => segment,
                // A segment of an older format is read, never appended to.
                None => create_segment(dir, next_lsn)?,
            },
            None => create_segment(dir, next_lsn)?,
        };
        let older: u64 = segs
            .iter()
            .filter(|(_, p)| *p != segment.path)
            .filter_map(|(_, p)| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let total_bytes = older + segment.bytes;
        Ok(Wal {
            dir: dir.to_owned(),
            state: Mutex::new(WalState {
                segment,
                next_lsn,
                durable_lsn: next_lsn - 1,
                pending: Vec::new(),
                pending_entries: Vec::new(),
                flushing: false,
                failed: None,
                flushes: 0,
                total_bytes,
            }),
            flushed: Condvar::new(),
            apply: Box::new(apply),
        })
    }

    /// Appends `entry`, waits until it is on disk and applied, and returns its LSN.
    pub fn commit(
        &self,
        state: &S,
        entry: WalEntry,
        on_flush: &dyn Fn(FlushStats),
    ) -> Result<u64, WalError> {
        let body = entry.encode();
        if body.len() > MAX_RECORD {
            return Err(WalError::TooLarge(LogError::RecordTooLarge {
                len: body.len(),
            }));
        }
        let mut st = self.state.lock();
        if let Some(why) = &st.failed {
            return Err(WalError::Poisoned(why.clone()));
        }
        let lsn = st.next_lsn;
        st.next_lsn += 1;
        st.pending.push((lsn, body));
        st.pending_entries.push((lsn, entry));
        loop {
            if st.durable_lsn >= lsn {
                return Ok(lsn);
            }
            if let Some(why) = &st.failed {
                return Err(WalError::Poisoned(why.clone()));
            }
            if st.flushing {
                self.flushed.wait(&mut st);
            } else {
                st = self.lead(st, state, on_flush);
            }
        }
    }

    /// Flushes everything pending as the leader; returns the re-taken lock.
    fn lead<'a>(
        &'a self,
        mut st: MutexGuard<'a, WalState>,
        state: &S,
        on_flush: &dyn Fn(FlushStats),
    ) -> MutexGuard<'a, WalState> {
        st.flushing = true;
        let records = std::mem::take(&mut st.pending);
        let entries = std::mem::take(&mut st.pending_entries);
        let file = st.segment.file.clone();
        let salt = st.segment.salt;
        let mut bytes = Vec::new();
        let written = MutexGuard::unlocked(&mut st, || {
            // Every body was checked against the record limit when it was queued.
            log::encode_flush(salt, &records, &mut bytes).map_err(io::Error::other)?;
            let started = Instant::now();
            (&*file).write_all(&bytes)?;
            file.sync_data()?;
            let fsync_seconds = started.elapsed().as_secs_f64();
            // A panic while applying would leave `flushing` set and every later writer waiting
            // for ever; the entries are durable but the state did not take them, so the log
            // stops taking writes (a restart replays them) and every waiter gets the error.
            std::panic::catch_unwind(AssertUnwindSafe(|| (self.apply)(state, &entries))).map_err(
                |panic| {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    io::Error::other(format!("applying durable entries panicked: {why}"))
                },
            )?;
            on_flush(FlushStats {
                records: entries.len(),
                bytes: bytes.len(),
                fsync_seconds,
            });
            Ok::<(), io::Error>(())
        });
        match written {
            Ok(()) => {
                if let Some((lsn, _)) = entries.last() {
                    st.durable_lsn = *lsn;
                }
                st.segment.bytes += bytes.len() as u64;
                st.total_bytes += bytes.len() as u64;
                st.flushes += 1;
            }
            Err(e) => st.failed = Some(e.to_string()),
        }
        st.flushing = false;
        self.flushed.notify_all();
        st
    }

    /// Runs `snapshot` with no write in flight and every acknowledged write applied, then starts
    /// a new segment at the next LSN. Returns the snapshot and the LSN it reflects.
    pub fn rotate<T>(&self, state: &S, snapshot: impl FnOnce() -> T) -> Result<(T, u64), WalError> {
        let mut st = self.state.lock();
        while st.flushing {
            self.flushed.wait(&mut st);
        }
        if !st.pending.is_empty() {
            st = self.lead(st, state, &|_| {});
        }
        if let Some(why) = &st.failed {
            return Err(WalError::Poisoned(why.clone()));
        }
        let lsn = st.durable_lsn;
        let taken = snapshot();
        let segment = create_segment(&self.dir, lsn + 1)?;
        st.total_bytes += segment.bytes;
        st.segment = segment;
        Ok((taken, lsn))
    }

    /// Deletes segments that hold only records at or below `lsn` (covered by a checkpoint).
    pub fn remove_through(&self, lsn: u64) -> Result<(), WalError> {
        let segs = segments(&self.dir).map_err(io_err(&self.dir))?;
        let mut removed = 0u64;
        for pair in segs.windows(2) {
            let (_, path) = &pair[0];
            let (next_first, _) = pair[1];
            if next_first <= lsn + 1 {
                removed += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(path).map_err(io_err(path))?;
            }
        }
        sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        let mut st = self.state.lock();
        st.total_bytes = st.total_bytes.saturating_sub(removed);
        Ok(())
    }

    /// Bytes in the live segments.
    pub fn bytes(&self) -> u64 {
        self.state.lock().total_bytes
    }

    /// Why the log stopped taking writes, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state.lock().failed.clone()
    }

    /// Flushes (write + fsync) since the log was opened.
    pub fn flushes(&self) -> u64 {
        self.state.lock().flushes
    }
}

/// A random seed for a new segment's checksums: unknown to clients, so bytes they choose can
/// never pass for a record.
fn random_salt(path: &Path) -> Result<u64, WalError> {
    use ring::rand::SecureRandom;
    let mut salt = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| io::Error::other("the operating system's random source failed"))
        .map_err(io_err(path))?;
    Ok(u64::from_le_bytes(salt))
}

/// Opens an existing segment for appending, or `None` when it is in an older format.
fn open_current(path: &Path) -> Result<Option<Segment>, WalError> {
    use std::io::Read;
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut head = Vec::with_capacity(FILE_HEADER_LEN);
    (&mut file)
        .take(FILE_HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io_err(path))?;
    let header =
        LogHeader::decode(&head, LogKind::CloudWal).map_err(|source| WalError::Format {
            path: path.to_owned(),
            source,
        })?;
    if !header.is_current() {
        return Ok(None);
    }
    let bytes = file.metadata().map_err(io_err(path))?.len();
    Ok(Some(Segment {
        salt: header.salt,
        file: Arc::new(file),
        path: path.to_owned(),
        bytes,
    }))
}

/// Creates segment `first_lsn` whole or not at all: its header is written to a temp file,
/// fsynced and renamed into place, so a crash or a full disk never leaves a header-less
/// segment behind.
fn create_segment(dir: &Path, first_lsn: u64) -> Result<Segment, WalError> {
    let (path, salt, bytes) = write_segment(dir, first_lsn, &[])?;
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    Ok(Segment {
        salt,
        file: Arc::new(file),
        path,
        bytes,
    })
}

/// Writes segment `first_lsn` atomically, each of `records` its own flush: the file is
/// durable whole, so damage to any record but the last is later judged corruption, not a
/// torn write. Returns its path, salt and length.
fn write_segment(
    dir: &Path,
    first_lsn: u64,
    records: &[(u64, &[u8])],
) -> Result<(PathBuf, u64, u64), WalError> {
    let path = segment_path(dir, first_lsn);
    let salt = random_salt(&path)?;
    let mut bytes = LogHeader::new(LogKind::CloudWal, first_lsn, salt)
        .encode()
        .to_vec();
    for record in records {
        log::encode_flush(salt, std::slice::from_ref(record), &mut bytes).map_err(|source| {
            WalError::Format {
                path: path.clone(),
                source,
            }
        })?;
    }
    write_atomic(&path, &bytes, false).map_err(io_err(&path))?;
    Ok((path, salt, bytes.len() as u64))
}

/// What [`repair`] did to one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRepair {
    pub path: PathBuf,
    /// Where the damaged original was set aside (`None` on a dry run).
    pub set_aside: Option<PathBuf>,
    /// Records kept: every one that reads back whole.
    pub kept: usize,
    /// Byte ranges `[start, end)` of the original in which no record reads back.
    pub lost: Vec<(u64, u64)>,
    /// LSNs missing between kept records (`(after, before)`, exclusive): the writes lost.
    pub lsn_gaps: Vec<(u64, u64)>,
}

/// Rewrites every segment that recovery refuses — damaged before its last flush, or torn but
/// followed by another segment — with every record of it that reads back whole, setting the
/// original aside as `<name>.damaged`. Intact segments and a newest segment that merely ends in
/// a torn write (which recovery cuts) are left alone. The server must be stopped. With
/// `dry_run` nothing is written; the report says what would be kept and lost.
pub fn repair(dir: &Path, dry_run: bool) -> Result<Vec<SegmentRepair>, WalError> {
    let segs = segments(dir).map_err(io_err(dir))?;
    let mut out = Vec::new();
    for (i, (first_lsn, path)) in segs.iter().enumerate() {
        let bytes = fs::read(path).map_err(io_err(path))?;
        let format = |source| WalError::Format {
            path: path.clone(),
            source,
        };
        let refused = match log::scan(&bytes, LogKind::CloudWal) {
            Ok(scan) => scan.torn_tail.is_some() && i + 1 != segs.len(),
            Err(LogError::Corrupt { .. }) => true,
            Err(e) => return Err(format(e)),
        };
        if !refused {
            continue;
        }
        let salvaged = log::salvage(&bytes, LogKind::CloudWal).map_err(format)?;
        let lsn_gaps = salvaged
            .records
            .windows(2)
            .filter(|w| w[1].lsn > w[0].lsn + 1)
            .map(|w| (w[0].lsn, w[1].lsn))
            .collect();
        let mut report = SegmentRepair {
            path: path.clone(),
            set_aside: None,
            kept: salvaged.records.len(),
            lost: salvaged.lost.clone(),
            lsn_gaps,
        };
        if !dry_run {
            let aside = path.with_extension("log.damaged");
            write_atomic(&aside, &bytes, false).map_err(io_err(&aside))?;
            let records: Vec<(u64, &[u8])> =
                salvaged.records.iter().map(|r| (r.lsn, r.body)).collect();
            write_segment(dir, *first_lsn, &records)?;
            report.set_aside = Some(aside);
        }
        out.push(report);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    fn entry(id: u64) -> WalEntry {
        WalEntry::Delete {
            collection: [1; 16],
            ids: vec![id],
        }
    }

    /// A crash (or ENOSPC) while an older version created a segment left it without a whole
    /// header: recovery drops it (it holds no record) instead of refusing to start, and the
    /// log goes on in the previous segment. Segments are now created whole or not at all.
    #[test]
    fn a_newest_segment_without_its_header_is_dropped_at_recovery() {
        for short in [0usize, 7, FILE_HEADER_LEN - 1] {
            let dir = tempfile::tempdir().unwrap();
            let wal: Wal<()> =
                Wal::open(dir.path(), 1, |_: &(), _: &[(u64, WalEntry)]| {}).unwrap();
            for id in 1..=3 {
                wal.commit(&(), entry(id), &|_| {}).unwrap();
            }
            drop(wal);
            let torn = segment_path(dir.path(), 4);
            let header = LogHeader::new(LogKind::CloudWal, 4, 1).encode();
            fs::write(&torn, &header[..short]).unwrap();

            let mut replayed = Vec::new();
            let (report, last) = recover(dir.path(), 0, |lsn, _| replayed.push(lsn)).unwrap();
            assert_eq!((replayed, last), (vec![1, 2, 3], 3), "{short} header bytes");
            assert_eq!(report.segments, 1);
            assert!(!torn.exists());
            let wal: Wal<()> =
                Wal::open(dir.path(), 4, |_: &(), _: &[(u64, WalEntry)]| {}).unwrap();
            assert_eq!(wal.commit(&(), entry(4), &|_| {}).unwrap(), 4);
            drop(wal);
            let mut replayed = Vec::new();
            recover(dir.path(), 0, |lsn, _| replayed.push(lsn)).unwrap();
            assert_eq!(replayed, vec![1, 2, 3, 4]);
        }
    }

    /// A panic while a leader applies entries must not leave `flushing` set: every writer,
    /// then and later, gets an error instead of waiting for ever.
    #[test]
    fn a_panic_while_applying_poisons_the_log_instead_of_wedging_it() {
        let dir = tempfile::tempdir().unwrap();
        let explode = Arc::new(AtomicBool::new(false));
        let wal: Arc<Wal<AtomicBool>> = Arc::new(
            Wal::open(
                dir.path(),
                1,
                |explode: &AtomicBool, _: &[(u64, WalEntry)]| {
                    assert!(!explode.load(Ordering::SeqCst), "apply failed");
                },
            )
            .unwrap(),
        );
        assert_eq!(wal.commit(&explode, entry(1), &|_| {}).unwrap(), 1);
        explode.store(true, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        for id in 2..6 {
            let (wal, explode, tx) = (wal.clone(), explode.clone(), tx.clone());
            std::thread::spawn(move || tx.send(wal.commit(&explode, entry(id), &|_| {})));
        }
        for _ in 2..6 {
            let answer = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a writer is wedged");
            assert!(matches!(answer, Err(WalError::Poisoned(why)) if why.contains("panicked")));
        }
        explode.store(false, Ordering::SeqCst);
        assert!(matches!(
            wal.commit(&explode, entry(9), &|_| {}),
            Err(WalError::Poisoned(_))
        ));
    }

    /// Finding 7: a record damaged before the last flush is corruption (acknowledged data),
    /// and the server refuses it; `repair` keeps every other record — before and after the
    /// damage — so that recovery then replays all but the one lost, and the log goes on.
    #[test]
    fn repair_keeps_every_intact_record_of_a_log_damaged_before_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let wal: Wal<()> = Wal::open(dir.path(), 1, |_: &(), _: &[(u64, WalEntry)]| {}).unwrap();
        for id in 1..=5 {
            wal.commit(&(), entry(id), &|_| {}).unwrap();
        }
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let original = fs::read(&path).unwrap();
        let third = log::scan(&original, LogKind::CloudWal).unwrap().records[2].offset as usize;
        let mut damaged = original.clone();
        damaged[third + log::RECORD_HEADER_LEN + 3] ^= 0x40;
        fs::write(&path, &damaged).unwrap();

        let err = recover(dir.path(), 0, |_, _| {}).unwrap_err();
        assert!(matches!(err, WalError::BadEntry { .. }), "{err}");
        assert!(err.to_string().contains("tiervec-cloud repair"), "{err}");

        let dry = repair(dir.path(), true).unwrap();
        assert_eq!(dry.len(), 1);
        assert_eq!((dry[0].kept, dry[0].lsn_gaps.clone()), (4, vec![(2, 4)]));
        assert_eq!(dry[0].set_aside, None);
        assert_eq!(
            fs::read(&path).unwrap(),
            damaged,
            "a dry run writes nothing"
        );

        let done = repair(dir.path(), false).unwrap();
        let aside = done[0].set_aside.clone().unwrap();
        assert_eq!(
            fs::read(&aside).unwrap(),
            damaged,
            "the original is kept aside"
        );
        let mut replayed = Vec::new();
        let (_, last) = recover(dir.path(), 0, |lsn, _| replayed.push(lsn)).unwrap();
        assert_eq!((replayed, last), (vec![1, 2, 4, 5], 5));
        assert!(
            repair(dir.path(), false).unwrap().is_empty(),
            "nothing left to repair"
        );

        let wal: Wal<()> = Wal::open(dir.path(), 6, |_: &(), _: &[(u64, WalEntry)]| {}).unwrap();
        assert_eq!(wal.commit(&(), entry(6), &|_| {}).unwrap(), 6);
        drop(wal);
        let mut replayed = Vec::new();
        recover(dir.path(), 0, |lsn, _| replayed.push(lsn)).unwrap();
        assert_eq!(replayed, vec![1, 2, 4, 5, 6]);
    }

    /// Concurrent writers' records shared flushes, and each flush is marked: a file cut after
    /// any record that does not end a flush loses that whole flush at recovery, never part
    /// of one.
    #[test]
    fn group_commits_are_recovered_flush_by_flush() {
        let dir = tempfile::tempdir().unwrap();
        let wal: Arc<Wal<()>> =
            Arc::new(Wal::open(dir.path(), 1, |_: &(), _: &[(u64, WalEntry)]| {}).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let wal = wal.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        wal.commit(&(), entry(t * 100 + i), &|_| {}).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(wal.flushes() < 200);
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let bytes = fs::read(&path).unwrap();
        let records = log::scan(&bytes, LogKind::CloudWal).unwrap().records;
        assert_eq!(records.len(), 200);
        let inside = records
            .iter()
            .find(|r| r.flags & log::FLUSH_END == 0)
            .expect("some flush holds several records");
        let start = records
            .iter()
            .rev()
            .find(|r| r.offset <= inside.offset && r.flags & log::FLUSH_START != 0)
            .unwrap();
        let cut = inside.offset as usize + log::RECORD_HEADER_LEN + inside.body.len();
        fs::write(&path, &bytes[..cut]).unwrap();
        let mut replayed = Vec::new();
        let (report, _) = recover(dir.path(), 0, |lsn, _| replayed.push(lsn)).unwrap();
        assert_eq!(replayed.last().copied().unwrap_or(0), start.lsn - 1);
        assert_eq!(report.truncated.unwrap().1, start.offset);
    }
}
