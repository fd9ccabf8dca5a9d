//! The embedded store: one WAL per data directory and checkpoint files beside it — the default
//! [`DurableLog`]. The WAL's flush leader applies each flushed group to the state before it
//! acknowledges, in LSN order; the LSN is the position of every entry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::checkpoint::{self, CheckpointBody, CheckpointError};
use super::contract::{Appended, Apply, Checkpointed, Cut, DurableLog, Image, StorageError};
use super::entry::{LogName, WalEntry};
use super::wal::{self, FlushStats, RecoveryReport, Wal};

/// How start-up went.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// The checkpoint loaded, and its LSN.
    pub checkpoint: Option<(PathBuf, u64)>,
    pub wal: RecoveryReport,
    pub seconds: f64,
}

/// The WAL and checkpoints of one data directory (the caller holds its lock).
pub struct Embedded {
    dir: PathBuf,
    state: Arc<dyn Apply>,
    wal: Wal<dyn Apply>,
    checkpoint_chunk_bytes: usize,
}

fn record_flush(stats: FlushStats) {
    metrics::histogram!("tiervec_wal_fsync_seconds").record(stats.fsync_seconds);
    metrics::counter!("tiervec_wal_records_total").increment(stats.records as u64);
    metrics::counter!("tiervec_wal_flushes_total").increment(1);
}

impl Embedded {
    /// Loads the newest checkpoint of `dir` into `state`, replays the WAL after it (a torn tail
    /// is truncated), and opens the WAL for appending.
    pub fn open(
        dir: &Path,
        state: Arc<dyn Apply>,
        checkpoint_chunk_bytes: usize,
    ) -> Result<(Embedded, StartReport), StorageError> {
        let started = Instant::now();
        let mut start = StartReport::default();
        let mut after = 0;
        if let Some((path, body)) = checkpoint::load_latest(dir)? {
            after = body.lsn;
            start.checkpoint = Some((path, body.lsn));
            state.restore(Image {
                collections: body.collections,
                edge_caches: body.edge_caches,
                models: body.models,
            });
        }
        let (report, last) = wal::recover(dir, after, |lsn, entry| state.apply(lsn, &entry))?;
        if let Some((path, offset, why)) = &report.truncated {
            warn!(file = %path.display(), offset, why, "truncated a torn WAL tail");
        }
        start.wal = report;
        let wal = Wal::open(dir, last + 1, |s: &(dyn Apply + 'static), entries| {
            for (lsn, e) in entries {
                s.apply(*lsn, e);
            }
        })?;
        start.seconds = started.elapsed().as_secs_f64();
        Ok((
            Embedded {
                dir: dir.to_owned(),
                state,
                wal,
                checkpoint_chunk_bytes,
            },
            start,
        ))
    }
}

impl DurableLog for Embedded {
    fn append(&self, entry: WalEntry) -> Result<Appended, StorageError> {
        let position = self.wal.commit(&*self.state, entry, &record_flush)?;
        Ok(Appended {
            position,
            shards: Vec::new(),
        })
    }

    fn checkpoint(&self) -> Result<Checkpointed, StorageError> {
        let started = Instant::now();
        let (image, lsn) = self.wal.rotate(&*self.state, || self.state.image())?;
        let path = checkpoint::write(
            &self.dir,
            &CheckpointBody {
                lsn,
                collections: image.collections,
                edge_caches: image.edge_caches,
                models: image.models,
                cluster: None,
            },
            self.checkpoint_chunk_bytes,
        )?;
        self.wal.remove_through(lsn)?;
        checkpoint::remove_before(&self.dir, lsn).map_err(|source| CheckpointError::Io {
            path: self.dir.clone(),
            source,
        })?;
        info!(lsn, seconds = started.elapsed().as_secs_f64(), path = %path.display(), "checkpoint written");
        Ok(Checkpointed {
            path,
            cut: Cut(vec![(LogName::Embedded, lsn)]),
        })
    }

    fn bytes(&self) -> u64 {
        self.wal.bytes()
    }

    fn flushes(&self) -> u64 {
        self.wal.flushes()
    }

    fn failure(&self) -> Option<String> {
        self.wal.failure()
    }

    /// One process writes the WAL and applies every entry before acknowledging it, so every
    /// position it ever handed out is applied.
    fn wait_applied(&self, _: LogName, _: u64, _: std::time::Duration) -> bool {
        true
    }

    /// The one process that writes the catalog has applied all of it.
    fn catch_up_catalog(&self, _: std::time::Duration) -> bool {
        false
    }
}
