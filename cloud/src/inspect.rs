//! `tiervec-cloud inspect`: a read-only report of a data directory's checkpoints and WAL
//! segments — each file's LSNs, size and validity, a torn tail and where it would be cut.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tiervec_shared::log::{self as record_log, LogKind};
use tiervec_shared::{CollectionId, Metric};

use crate::storage::{checkpoint, wal};

/// Why the report could not be made (a damaged file is reported, not an error).
#[derive(Debug, Error)]
pub enum InspectError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Checkpoint(checkpoint::CheckpointError),
    #[error("writing the report: {0}")]
    Write(#[from] io::Error),
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> InspectError + '_ {
    move |source| InspectError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Writes the report of `dir` to `out`.
pub fn report(dir: &Path, out: &mut impl Write) -> Result<(), InspectError> {
    if !dir.is_dir() {
        return Err(InspectError::NotADirectory(dir.to_owned()));
    }
    for (lsn, path) in checkpoint::list(dir).map_err(at(dir))? {
        let bytes = std::fs::metadata(&path).map_err(at(&path))?.len();
        match checkpoint::read(&path) {
            Ok(body) => {
                writeln!(
                    out,
                    "checkpoint {} at LSN {lsn}: {bytes} bytes, valid",
                    path.display(),
                )?;
                for c in &body.collections {
                    writeln!(
                        out,
                        "  collection {} dim {} metric {}: {} points",
                        c.name,
                        c.dim,
                        Metric::from_code(c.metric).map_or("?", Metric::name),
                        c.ids.len()
                    )?;
                }
                if let Some(cut) = &body.cluster {
                    writeln!(out, "  cluster cut: catalog stream through {}", cut.catalog)?;
                    for s in &cut.shards {
                        writeln!(
                            out,
                            "  cluster cut: shard {} of collection {} through {}",
                            s.shard,
                            CollectionId(s.collection),
                            s.position
                        )?;
                    }
                }
            }
            Err(checkpoint::CheckpointError::Corrupt { source, .. }) => writeln!(
                out,
                "checkpoint {} at LSN {lsn}: INVALID: {source}",
                path.display()
            )?,
            Err(e) => return Err(InspectError::Checkpoint(e)),
        }
    }
    for (first, path) in wal::segments(dir).map_err(at(dir))? {
        let bytes = std::fs::read(&path).map_err(at(&path))?;
        match record_log::scan(&bytes, LogKind::CloudWal) {
            Ok(s) => {
                let last = s.records.last().map_or(0, |r| r.lsn);
                writeln!(
                    out,
                    "wal {}: first LSN {first}, {} records (LSN {}..={last}), {} bytes{}",
                    path.display(),
                    s.records.len(),
                    s.records.first().map_or(0, |r| r.lsn),
                    bytes.len(),
                    match s.torn_tail {
                        Some(why) => format!(
                            ", torn tail at byte {} ({why}) — truncated at next start",
                            s.valid_len
                        ),
                        None => String::new(),
                    }
                )?;
            }
            Err(e) => writeln!(out, "wal {}: INVALID: {e}", path.display())?,
        }
    }
    Ok(())
}
