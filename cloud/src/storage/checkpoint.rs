//! Checkpoints: every collection's points at one LSN, in one checksummed file written
//! atomically (format version 1, documented in `docs/wal.md`). Recovery loads the newest
//! checkpoint and replays the WAL records after its LSN; the graph is rebuilt from the vectors
//! (in parallel), so no index file is ever trusted.
//!
//! ```text
//! header (64 bytes, little-endian):
//!   magic "TVCKPT\r\n" | version u32 | reserved u32 | lsn u64 | body_len u64 | body_xxh3 u64
//!   | reserved 16 | header_xxh3 u64 (of bytes 0..56)
//! body: rkyv archive of CheckpointBody
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

pub const MAGIC: [u8; 8] = *b"TVCKPT\r\n";
/// Version 2 added the edges' cache manifests; a version 1 checkpoint is refused with a clear
/// error (no deployment predates it).
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 64;

/// One collection as of the checkpoint's LSN (live points only).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CollectionImage {
    pub name: String,
    pub id: [u8; 16],
    pub dim: u32,
    pub metric: u8,
    pub m: u32,
    pub ef_construction: u32,
    pub seed: u64,
    pub ids: Vec<u64>,
    pub lsns: Vec<u64>,
    /// `ids.len() × dim` components, prepared for the metric.
    pub vectors: Vec<f32>,
    pub payloads: Vec<Option<String>>,
}

/// What the cloud believes one edge's cache of one collection holds.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EdgeCacheImage {
    pub edge: String,
    pub manifest: tiervec_shared::push::Inventory,
}

/// Everything durable as of `lsn`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CheckpointBody {
    pub lsn: u64,
    pub collections: Vec<CollectionImage>,
    pub edge_caches: Vec<EdgeCacheImage>,
}

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "checkpoint {path} is damaged: {source}; move it aside to start from the WAL alone only if the WAL still holds every record"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
}

/// Why checkpoint bytes were refused.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("{0} bytes, shorter than the header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("format version {0}, this build reads {FORMAT_VERSION}")]
    Version(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("body is {found} bytes, header says {header}")]
    BodyLength { found: u64, header: u64 },
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("body is not a checkpoint archive: {0}")]
    Archive(#[source] rancor::Error),
    #[error("header and body disagree on the LSN")]
    LsnMismatch,
    #[error("collection `{0}` has inconsistent array lengths")]
    Inconsistent(String),
}

fn checkpoint_path(dir: &Path, lsn: u64) -> PathBuf {
    dir.join(format!("checkpoint-{lsn:020}.tvck"))
}

/// Checkpoint files in `dir`, oldest first, with their LSN.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    super::wal::numbered_files(dir, "checkpoint-", ".tvck")
}

/// Encodes a checkpoint file.
pub fn encode(body: &CheckpointBody) -> Vec<u8> {
    let archived =
        rkyv::to_bytes::<rancor::Error>(body).expect("serialising into memory cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + archived.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&body.lsn.to_le_bytes());
    out.extend_from_slice(&(archived.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(&archived).to_le_bytes());
    out.resize(56, 0);
    let sum = xxh3_64(&out[..56]);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&archived);
    out
}

/// Validates and decodes checkpoint file bytes.
pub fn decode(bytes: &[u8]) -> Result<CheckpointBody, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(DecodeError::Magic);
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    if u64_at(56) != xxh3_64(&bytes[..56]) {
        return Err(DecodeError::HeaderChecksum);
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != u64_at(24) {
        return Err(DecodeError::BodyLength {
            found: body.len() as u64,
            header: u64_at(24),
        });
    }
    if xxh3_64(body) != u64_at(32) {
        return Err(DecodeError::BodyChecksum);
    }
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let decoded = rkyv::from_bytes::<CheckpointBody, rancor::Error>(&aligned)
        .map_err(DecodeError::Archive)?;
    if decoded.lsn != u64_at(16) {
        return Err(DecodeError::LsnMismatch);
    }
    for c in &decoded.collections {
        let n = c.ids.len();
        if c.lsns.len() != n || c.payloads.len() != n || c.vectors.len() != n * c.dim as usize {
            return Err(DecodeError::Inconsistent(c.name.clone()));
        }
    }
    Ok(decoded)
}

/// Writes a checkpoint atomically into `dir`; returns its path.
pub fn write(dir: &Path, body: &CheckpointBody) -> Result<PathBuf, CheckpointError> {
    let path = checkpoint_path(dir, body.lsn);
    tiervec_shared::durable::write_atomic(&path, &encode(body), false).map_err(|source| {
        CheckpointError::Io {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}

/// Loads the newest checkpoint in `dir`, if any.
pub fn load_latest(dir: &Path) -> Result<Option<(PathBuf, CheckpointBody)>, CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CheckpointError::Io { path, source }
    };
    let Some((_, path)) = list(dir).map_err(io(dir))?.pop() else {
        return Ok(None);
    };
    let bytes = fs::read(&path).map_err(io(&path))?;
    let body = decode(&bytes).map_err(|source| CheckpointError::Corrupt {
        path: path.clone(),
        source,
    })?;
    Ok(Some((path, body)))
}

/// Removes checkpoints older than `lsn`.
pub fn remove_before(dir: &Path, lsn: u64) -> io::Result<()> {
    for (l, path) in list(dir)? {
        if l < lsn {
            fs::remove_file(path)?;
        }
    }
    tiervec_shared::durable::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/wal.md states the versions the code writes: the log framing's row first, then
    /// the checkpoint's.
    #[test]
    fn the_format_document_states_the_versions_written() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/wal.md"))
            .unwrap();
        let stated: Vec<u32> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| 8 | 4 | format version, `"))
            .map(|rest| rest[..rest.find('`').unwrap()].parse().unwrap())
            .collect();
        assert_eq!(
            stated,
            vec![tiervec_shared::log::FORMAT_VERSION, FORMAT_VERSION]
        );
    }

    fn body() -> CheckpointBody {
        CheckpointBody {
            lsn: 42,
            collections: vec![CollectionImage {
                name: "c".into(),
                id: [1; 16],
                dim: 2,
                metric: 1,
                m: 16,
                ef_construction: 100,
                seed: 3,
                ids: vec![5, 6],
                lsns: vec![10, 11],
                vectors: vec![1.0, 0.0, 0.0, 1.0],
                payloads: vec![None, Some("\"x\"".into())],
            }],
            edge_caches: vec![EdgeCacheImage {
                edge: "edge-a".into(),
                manifest: tiervec_shared::push::Inventory {
                    collection_id: [1; 16],
                    version: 7,
                    vectors: vec![tiervec_shared::push::HeldVector {
                        id: 5,
                        lsn: 10,
                        bytes: 300,
                    }],
                    anchors: vec![(99, vec![5])],
                },
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let bytes = encode(&body());
        assert_eq!(decode(&bytes).unwrap(), body());
        for at in [0, 9, 20, 60, 64, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {at} accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&bytes[..10]).is_err());
    }

    #[test]
    fn newest_checkpoint_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_latest(dir.path()).unwrap().is_none());
        let mut b = body();
        write(dir.path(), &b).unwrap();
        b.lsn = 50;
        write(dir.path(), &b).unwrap();
        assert_eq!(load_latest(dir.path()).unwrap().unwrap().1.lsn, 50);
        remove_before(dir.path(), 50).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }
}
