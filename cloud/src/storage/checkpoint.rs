//! Checkpoints: every collection's points at one LSN, in one file written atomically as a
//! sequence of checksummed chunks (format version 3, documented in `docs/wal.md`). Recovery
//! loads the newest checkpoint and replays the WAL records after its LSN; the graph is rebuilt
//! from the vectors (in parallel), so no index file is ever trusted.
//!
//! A cluster node's checkpoint (version 4) ends with a [`Chunk::Cluster`] naming the position
//! of every stream it covers ([`ClusterCut`]); the header's LSN then only orders that node's
//! checkpoints. Version 5 adds a [`Chunk::Model`] per collection made for texts (the
//! embedding model it records), after the edge caches and before the cut.
//!
//! Chunks exist because rkyv's layout is pinned to 32-bit relative pointers for the whole
//! workspace (the edge snapshot shares it): one archive cannot exceed 2 GiB, about 1.4 M 384-d
//! vectors. Each chunk holds at most [`CHUNK_BYTES`] of points (one point at the least), so a
//! collection of any size is written, and a chunk that still cannot be archived is an error
//! that names it, never a panic. Version 2 (one archive of the whole body) is still read.
//!
//! ```text
//! header (64 bytes, little-endian):
//!   magic "TVCKPT\r\n" | version u32 | reserved u32 | lsn u64 | body_len u64 | chunk_count u64
//!   | reserved 16 | header_xxh3 u64 (of bytes 0..56)
//! body: chunk_count × (archive_len u64 | archive_xxh3 u64 | rkyv archive of Chunk)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

pub const MAGIC: [u8; 8] = *b"TVCKPT\r\n";
/// Version 5 adds the collections' embedding models; version 4 added the cluster's cut chunk to
/// version 3's chunked body; versions 4, 3 (chunks without either) and 2 (one archive) are
/// read; version 1 lacked the edges' cache manifests and is refused with an error naming the
/// versions read.
pub const FORMAT_VERSION: u32 = 5;
const CHUNKED_VERSION: u32 = 3;
const MODELS_VERSION: u32 = 5;
const SINGLE_ARCHIVE_VERSION: u32 = 2;
const HEADER_LEN: usize = 64;
const CHUNK_HEADER_LEN: usize = 16;
/// The points one chunk holds at most, in bytes of ids, LSNs, vectors and payloads: far below
/// rkyv's 2 GiB, and small enough that writing or reading a chunk needs little memory beside
/// the collection itself.
pub const CHUNK_BYTES: usize = 64 << 20;

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

/// Everything durable as of `lsn` (for a cluster node: as of its `cluster` cut).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CheckpointBody {
    pub lsn: u64,
    pub collections: Vec<CollectionImage>,
    pub edge_caches: Vec<EdgeCacheImage>,
    /// The embedding model of each collection made for texts.
    pub models: Vec<ModelImage>,
    /// Present in a cluster node's checkpoint, absent in the embedded store's.
    pub cluster: Option<ClusterCut>,
}

/// The embedding model a collection records (see `WalEntry::SetModel`).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelImage {
    pub collection: [u8; 16],
    pub name: String,
    pub dim: u32,
    pub checksum: u64,
}

/// A version 2 body: one archive of these fields.
#[derive(Archive, Serialize, Deserialize)]
struct SingleArchiveBody {
    lsn: u64,
    collections: Vec<CollectionImage>,
    edge_caches: Vec<EdgeCacheImage>,
}

/// What a cluster node's checkpoint covers: every entry of the catalog stream through
/// `catalog` and of each shard stream through its `position`, with the state the node keeps
/// beside the collections to publish conditionally and to follow the shards.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ClusterCut {
    pub catalog: u64,
    pub shards: Vec<ShardPosition>,
    /// Per collection name, the catalog sequence of its last create or drop.
    pub names: Vec<NameSequence>,
    /// Per edge cache, the catalog sequence of its last step or reset.
    pub caches: Vec<CacheSequence>,
    /// Shards per live collection.
    pub layouts: Vec<Layout>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ShardPosition {
    pub collection: [u8; 16],
    pub shard: u32,
    pub position: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NameSequence {
    pub name: String,
    pub sequence: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CacheSequence {
    pub edge: String,
    pub collection: [u8; 16],
    pub sequence: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Layout {
    pub collection: [u8; 16],
    pub shards: u32,
}

/// A collection's identity and parameters; its `points` follow in [`Chunk::Points`].
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CollectionHead {
    pub name: String,
    pub id: [u8; 16],
    pub dim: u32,
    pub metric: u8,
    pub m: u32,
    pub ef_construction: u32,
    pub seed: u64,
    pub points: u64,
}

/// One piece of a version 3 body. A `Points` chunk belongs to the last `Collection` before it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Chunk {
    Collection(CollectionHead),
    Points {
        ids: Vec<u64>,
        lsns: Vec<u64>,
        vectors: Vec<f32>,
        payloads: Vec<Option<String>>,
    },
    EdgeCache(EdgeCacheImage),
    /// Version 4, last and at most once: a cluster node's cut.
    Cluster(ClusterCut),
    /// Version 5, after the edge caches: a collection's embedding model.
    Model(ModelImage),
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
    #[error("checkpoint {path}: chunk {chunk} cannot be archived: {source}")]
    Encode {
        path: PathBuf,
        chunk: u64,
        #[source]
        source: rancor::Error,
    },
}

/// Why checkpoint bytes were refused.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("{0} bytes, shorter than the header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error(
        "format version {0}; this build reads versions {SINGLE_ARCHIVE_VERSION} to {FORMAT_VERSION} (start the version that wrote it and take a checkpoint, or move the file aside if the WAL holds every record)"
    )]
    Version(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("body is {found} bytes, header says {header}")]
    BodyLength { found: u64, header: u64 },
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("chunk {chunk}: length {len} runs past the body")]
    ChunkLength { chunk: u64, len: u64 },
    #[error("chunk {chunk}: checksum mismatch")]
    ChunkChecksum { chunk: u64 },
    #[error("chunk {chunk}: {kind} out of place")]
    ChunkOrder { chunk: u64, kind: &'static str },
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

/// What an encoding step failed on: the sink, or a chunk rkyv refused.
#[derive(Debug)]
pub enum EncodeError {
    Io(io::Error),
    Archive { chunk: u64, source: rancor::Error },
}

fn header(version: u32, lsn: u64, body_len: u64, word: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[16..24].copy_from_slice(&lsn.to_le_bytes());
    h[24..32].copy_from_slice(&body_len.to_le_bytes());
    h[32..40].copy_from_slice(&word.to_le_bytes());
    let sum = xxh3_64(&h[..56]);
    h[56..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The bytes a point adds to a chunk, for splitting (rkyv's own overhead is small beside it).
fn point_bytes(dim: usize, payload: &Option<String>) -> usize {
    16 + 4 * dim + 8 + payload.as_ref().map_or(0, String::len)
}

/// The chunks of `body`, in order, `chunk_bytes` of points each at most (one point at least).
fn chunks(body: &CheckpointBody, chunk_bytes: usize) -> impl Iterator<Item = Chunk> + '_ {
    let collections = body.collections.iter().flat_map(move |c| {
        let dim = c.dim as usize;
        let mut ranges = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, payload) in c.payloads.iter().enumerate() {
            let b = point_bytes(dim, payload);
            if i > start && bytes + b > chunk_bytes {
                ranges.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += b;
        }
        if start < c.ids.len() {
            ranges.push(start..c.ids.len());
        }
        let head = Chunk::Collection(CollectionHead {
            name: c.name.clone(),
            id: c.id,
            dim: c.dim,
            metric: c.metric,
            m: c.m,
            ef_construction: c.ef_construction,
            seed: c.seed,
            points: c.ids.len() as u64,
        });
        std::iter::once(head).chain(ranges.into_iter().map(move |r| Chunk::Points {
            ids: c.ids[r.clone()].to_vec(),
            lsns: c.lsns[r.clone()].to_vec(),
            vectors: c.vectors[r.start * dim..r.end * dim].to_vec(),
            payloads: c.payloads[r].to_vec(),
        }))
    });
    collections
        .chain(body.edge_caches.iter().cloned().map(Chunk::EdgeCache))
        .chain(body.models.iter().cloned().map(Chunk::Model))
        .chain(body.cluster.iter().cloned().map(Chunk::Cluster))
}

/// Writes the chunks of `body` to `out` (the header, which needs their count and length, is
/// the caller's); returns their count and their bytes.
fn write_body(
    out: &mut impl Write,
    body: &CheckpointBody,
    chunk_bytes: usize,
) -> Result<(u64, u64), EncodeError> {
    let (mut count, mut len) = (0u64, 0u64);
    for chunk in chunks(body, chunk_bytes) {
        let archived =
            rkyv::to_bytes::<rancor::Error>(&chunk).map_err(|source| EncodeError::Archive {
                chunk: count,
                source,
            })?;
        let mut head = [0u8; CHUNK_HEADER_LEN];
        head[..8].copy_from_slice(&(archived.len() as u64).to_le_bytes());
        head[8..].copy_from_slice(&xxh3_64(&archived).to_le_bytes());
        out.write_all(&head).map_err(EncodeError::Io)?;
        out.write_all(&archived).map_err(EncodeError::Io)?;
        count += 1;
        len += (CHUNK_HEADER_LEN + archived.len()) as u64;
    }
    Ok((count, len))
}

/// Encodes a checkpoint into memory (tests and small tools; [`write`] streams).
pub fn encode(body: &CheckpointBody, chunk_bytes: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; HEADER_LEN];
    let (count, len) = write_body(&mut out, body, chunk_bytes)?;
    out[..HEADER_LEN].copy_from_slice(&header(FORMAT_VERSION, body.lsn, len, count));
    Ok(out)
}

/// Reads exactly `buf.len()` bytes; running out is damage (a truncated file), not an IO error.
fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::Decode(DecodeError::BodyLength {
            found: 0,
            header: buf.len() as u64,
        }),
        _ => ReadError::Io(e),
    })
}

/// Why reading failed: the source, or the bytes.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Decode(DecodeError),
}

impl From<DecodeError> for ReadError {
    fn from(e: DecodeError) -> ReadError {
        ReadError::Decode(e)
    }
}

fn archive_of(input: &mut impl Read, len: usize) -> Result<AlignedVec<16>, ReadError> {
    let mut aligned = AlignedVec::<16>::with_capacity(len);
    aligned.resize(len, 0);
    read_exact(input, &mut aligned)?;
    Ok(aligned)
}

/// Validates and decodes a checkpoint of `total` bytes from `input`, chunk by chunk.
pub fn decode_from(input: &mut impl Read, total: u64) -> Result<CheckpointBody, ReadError> {
    if total < HEADER_LEN as u64 {
        return Err(DecodeError::Short(total as usize).into());
    }
    let mut h = [0u8; HEADER_LEN];
    read_exact(input, &mut h)?;
    if h[..8] != MAGIC {
        return Err(DecodeError::Magic.into());
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if !(SINGLE_ARCHIVE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(DecodeError::Version(version).into());
    }
    if u64_at(56) != xxh3_64(&h[..56]) {
        return Err(DecodeError::HeaderChecksum.into());
    }
    let (lsn, body_len, word) = (u64_at(16), u64_at(24), u64_at(32));
    let found = total - HEADER_LEN as u64;
    if found != body_len {
        return Err(DecodeError::BodyLength {
            found,
            header: body_len,
        }
        .into());
    }
    let body = if version == SINGLE_ARCHIVE_VERSION {
        decode_v2(input, body_len, word, lsn)?
    } else {
        decode_chunks(input, body_len, word, lsn, version)?
    };
    for c in &body.collections {
        let n = c.ids.len();
        if c.lsns.len() != n || c.payloads.len() != n || c.vectors.len() != n * c.dim as usize {
            return Err(DecodeError::Inconsistent(c.name.clone()).into());
        }
    }
    Ok(body)
}

/// Version 2: the body is one archive of [`SingleArchiveBody`], `word` its checksum.
fn decode_v2(
    input: &mut impl Read,
    body_len: u64,
    word: u64,
    lsn: u64,
) -> Result<CheckpointBody, ReadError> {
    let len = usize::try_from(body_len).map_err(|_| DecodeError::ChunkLength {
        chunk: 0,
        len: body_len,
    })?;
    let aligned = archive_of(input, len)?;
    if xxh3_64(&aligned) != word {
        return Err(DecodeError::BodyChecksum.into());
    }
    let body = rkyv::from_bytes::<SingleArchiveBody, rancor::Error>(&aligned)
        .map_err(DecodeError::Archive)?;
    if body.lsn != lsn {
        return Err(DecodeError::LsnMismatch.into());
    }
    Ok(CheckpointBody {
        lsn: body.lsn,
        collections: body.collections,
        edge_caches: body.edge_caches,
        models: Vec::new(),
        cluster: None,
    })
}

/// Versions 3 to 5: `count` chunks filling `body_len` bytes exactly (models from version 5,
/// a cluster cut from version 4, last).
fn decode_chunks(
    input: &mut impl Read,
    body_len: u64,
    count: u64,
    lsn: u64,
    version: u32,
) -> Result<CheckpointBody, ReadError> {
    let mut body = CheckpointBody {
        lsn,
        ..CheckpointBody::default()
    };
    // Points still owed to the last collection head.
    let mut owed = 0u64;
    let mut left = body_len;
    for chunk in 0..count {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        if left < CHUNK_HEADER_LEN as u64 {
            return Err(DecodeError::ChunkLength { chunk, len: left }.into());
        }
        read_exact(input, &mut head)?;
        left -= CHUNK_HEADER_LEN as u64;
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let sum = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        if len > left {
            return Err(DecodeError::ChunkLength { chunk, len }.into());
        }
        left -= len;
        let aligned = archive_of(input, len as usize)?;
        if xxh3_64(&aligned) != sum {
            return Err(DecodeError::ChunkChecksum { chunk }.into());
        }
        let decoded =
            rkyv::from_bytes::<Chunk, rancor::Error>(&aligned).map_err(DecodeError::Archive)?;
        match decoded {
            Chunk::Collection(h) => {
                if owed != 0
                    || !body.edge_caches.is_empty()
                    || !body.models.is_empty()
                    || body.cluster.is_some()
                {
                    return Err(DecodeError::ChunkOrder {
                        chunk,
                        kind: "a collection",
                    }
                    .into());
                }
                owed = h.points;
                body.collections.push(CollectionImage {
                    name: h.name,
                    id: h.id,
                    dim: h.dim,
                    metric: h.metric,
                    m: h.m,
                    ef_construction: h.ef_construction,
                    seed: h.seed,
                    ids: Vec::new(),
                    lsns: Vec::new(),
                    vectors: Vec::new(),
                    payloads: Vec::new(),
                });
            }
            Chunk::Points {
                ids,
                lsns,
                vectors,
                payloads,
            } => {
                let Some(c) = body
                    .collections
                    .last_mut()
                    .filter(|_| ids.len() as u64 <= owed)
                else {
                    return Err(DecodeError::ChunkOrder {
                        chunk,
                        kind: "points",
                    }
                    .into());
                };
                owed -= ids.len() as u64;
                c.ids.extend(ids);
                c.lsns.extend(lsns);
                c.vectors.extend(vectors);
                c.payloads.extend(payloads);
            }
            Chunk::EdgeCache(e) => {
                if owed != 0 || !body.models.is_empty() || body.cluster.is_some() {
                    return Err(DecodeError::ChunkOrder {
                        chunk,
                        kind: "an edge cache",
                    }
                    .into());
                }
                body.edge_caches.push(e);
            }
            Chunk::Cluster(cut) => {
                if owed != 0 || body.cluster.is_some() || version == CHUNKED_VERSION {
                    return Err(DecodeError::ChunkOrder {
                        chunk,
                        kind: "a cluster cut",
                    }
                    .into());
                }
                body.cluster = Some(cut);
            }
            Chunk::Model(m) => {
                if owed != 0 || body.cluster.is_some() || version < MODELS_VERSION {
                    return Err(DecodeError::ChunkOrder {
                        chunk,
                        kind: "a model",
                    }
                    .into());
                }
                body.models.push(m);
            }
        }
    }
    if left != 0 || owed != 0 {
        return Err(DecodeError::BodyLength {
            found: body_len - left,
            header: body_len,
        }
        .into());
    }
    Ok(body)
}

/// Reads and validates the checkpoint file at `path`.
pub fn read(path: &Path) -> Result<CheckpointBody, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let total = file.metadata().map_err(io)?.len();
    decode_from(&mut BufReader::with_capacity(1 << 20, file), total).map_err(|e| match e {
        ReadError::Io(source) => CheckpointError::Io {
            path: path.to_owned(),
            source,
        },
        ReadError::Decode(source) => CheckpointError::Corrupt {
            path: path.to_owned(),
            source,
        },
    })
}

/// Writes a checkpoint atomically into `dir`, streaming its chunks (temp file, fsync, rename,
/// fsync of the directory); returns its path.
pub fn write(
    dir: &Path,
    body: &CheckpointBody,
    chunk_bytes: usize,
) -> Result<PathBuf, CheckpointError> {
    let path = checkpoint_path(dir, body.lsn);
    let tmp = tiervec_shared::durable::temp_beside(&path, "tmp").map_err(|source| {
        CheckpointError::Io {
            path: path.clone(),
            source,
        }
    })?;
    let result = (|| {
        let io = |source| CheckpointError::Io {
            path: tmp.clone(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
        let (count, len) = write_body(&mut out, body, chunk_bytes).map_err(|e| match e {
            EncodeError::Io(source) => io(source),
            EncodeError::Archive { chunk, source } => CheckpointError::Encode {
                path: path.clone(),
                chunk,
                source,
            },
        })?;
        let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
        std::io::Seek::rewind(&mut file).map_err(io)?;
        file.write_all(&header(FORMAT_VERSION, body.lsn, len, count))
            .map_err(io)?;
        drop(file);
        tiervec_shared::durable::seal(&tmp, false).map_err(io)?;
        tiervec_shared::durable::replace(&tmp, &path).map_err(io)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// Loads the newest checkpoint in `dir`, if any.
pub fn load_latest(dir: &Path) -> Result<Option<(PathBuf, CheckpointBody)>, CheckpointError> {
    let Some((_, path)) = list(dir)
        .map_err(|source| CheckpointError::Io {
            path: dir.to_owned(),
            source,
        })?
        .pop()
    else {
        return Ok(None);
    };
    let body = read(&path)?;
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

    fn collection(name: &str, n: u64, dim: u32) -> CollectionImage {
        CollectionImage {
            name: name.into(),
            id: [n as u8; 16],
            dim,
            metric: 1,
            m: 16,
            ef_construction: 100,
            seed: 3,
            ids: (0..n).map(|i| i * 7).collect(),
            lsns: (0..n).map(|i| 10 + i).collect(),
            vectors: (0..n * dim as u64).map(|i| i as f32 * 0.5).collect(),
            payloads: (0..n)
                .map(|i| {
                    (i % 3 != 0).then(|| format!("{{\"text\":\"{}\"}}", "x".repeat(i as usize)))
                })
                .collect(),
        }
    }

    fn body() -> CheckpointBody {
        CheckpointBody {
            lsn: 42,
            collections: vec![collection("a", 2, 2), collection("empty", 0, 3)],
            edge_caches: vec![EdgeCacheImage {
                edge: "edge-a".into(),
                manifest: tiervec_shared::push::Inventory {
                    collection_id: [2; 16],
                    version: 7,
                    vectors: vec![tiervec_shared::push::HeldVector {
                        id: 7,
                        lsn: 11,
                        bytes: 300,
                    }],
                    anchors: vec![(99, vec![7])],
                },
            }],
            models: Vec::new(),
            cluster: None,
        }
    }

    fn cut() -> ClusterCut {
        ClusterCut {
            catalog: 12,
            shards: vec![
                ShardPosition {
                    collection: [2; 16],
                    shard: 0,
                    position: 40,
                },
                ShardPosition {
                    collection: [2; 16],
                    shard: 2,
                    position: 7,
                },
            ],
            names: vec![NameSequence {
                name: "a".into(),
                sequence: 3,
            }],
            caches: vec![CacheSequence {
                edge: "edge-a".into(),
                collection: [2; 16],
                sequence: 11,
            }],
            layouts: vec![Layout {
                collection: [2; 16],
                shards: 3,
            }],
        }
    }

    fn decode(bytes: &[u8]) -> Result<CheckpointBody, ReadError> {
        decode_from(&mut &bytes[..], bytes.len() as u64)
    }

    fn assert_refused(bytes: &[u8], what: &str) {
        match decode(bytes) {
            Err(ReadError::Decode(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let bytes = encode(&body(), CHUNK_BYTES).unwrap();
        assert_eq!(decode(&bytes).unwrap(), body());
        let clustered = CheckpointBody {
            cluster: Some(cut()),
            ..body()
        };
        assert_eq!(
            decode(&encode(&clustered, CHUNK_BYTES).unwrap()).unwrap(),
            clustered
        );
        for at in [
            0,
            9,
            20,
            36,
            60,
            64,
            70,
            90,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert_refused(&b, &format!("flip at {at}"));
        }
        assert_refused(&bytes[..bytes.len() - 1], "one byte short");
        assert_refused(&bytes[..10], "ten bytes");
    }

    /// The 2 GiB archive limit, injected small: a collection many times the chunk size is
    /// written in chunks of at most that many bytes of points and reads back whole.
    #[test]
    fn a_collection_larger_than_a_chunk_is_written_in_chunks() {
        let body = CheckpointBody {
            lsn: 9,
            collections: vec![collection("big", 1_000, 16), collection("small", 3, 16)],
            edge_caches: body().edge_caches,
            models: vec![model([2; 16])],
            cluster: Some(cut()),
        };
        let chunk_bytes = 4 << 10;
        let bytes = encode(&body, chunk_bytes).unwrap();
        let chunks = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
        let points_bytes: usize = body
            .collections
            .iter()
            .flat_map(|c| c.payloads.iter().map(|p| point_bytes(c.dim as usize, p)))
            .sum();
        assert!(
            chunks as usize > points_bytes / chunk_bytes,
            "{chunks} chunks for {points_bytes} bytes"
        );
        // Every chunk's archive stays near the limit (rkyv adds a little per vector).
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert!(len <= chunk_bytes + 256, "a chunk of {len} bytes");
            at += CHUNK_HEADER_LEN + len;
        }
        assert_eq!(decode(&bytes).unwrap(), body);
        // One point larger than a chunk still goes, alone in its chunk.
        let mut huge = collection("huge", 2, 4);
        huge.payloads[1] = Some("y".repeat(3 * chunk_bytes));
        let body = CheckpointBody {
            lsn: 1,
            collections: vec![huge],
            edge_caches: vec![],
            models: vec![],
            cluster: None,
        };
        assert_eq!(decode(&encode(&body, chunk_bytes).unwrap()).unwrap(), body);
    }

    /// A chunk whose points overrun its collection's head, or points before any head, are
    /// damage even with every checksum right.
    #[test]
    fn chunks_out_of_place_are_refused() {
        let file = |chunks: &[Chunk]| {
            let mut out = vec![0u8; HEADER_LEN];
            for chunk in chunks {
                let archived = rkyv::to_bytes::<rancor::Error>(chunk).unwrap();
                out.extend_from_slice(&(archived.len() as u64).to_le_bytes());
                out.extend_from_slice(&xxh3_64(&archived).to_le_bytes());
                out.extend_from_slice(&archived);
            }
            let len = (out.len() - HEADER_LEN) as u64;
            out[..HEADER_LEN].copy_from_slice(&header(FORMAT_VERSION, 1, len, chunks.len() as u64));
            out
        };
        let points = Chunk::Points {
            ids: vec![1],
            lsns: vec![1],
            vectors: vec![0.0],
            payloads: vec![None],
        };
        let head = |points| {
            Chunk::Collection(CollectionHead {
                name: "c".into(),
                id: [0; 16],
                dim: 1,
                metric: 1,
                m: 16,
                ef_construction: 100,
                seed: 0,
                points,
            })
        };
        let cluster = Chunk::Cluster(cut());
        assert!(decode(&file(&[head(1), points.clone()])).is_ok());
        assert!(decode(&file(&[head(1), points.clone(), cluster.clone()])).is_ok());
        for (chunks, at) in [
            (vec![points.clone()], 0),
            (vec![head(1), points.clone(), points.clone()], 2),
            (vec![head(2), points.clone(), head(0)], 2),
            (vec![cluster.clone(), head(0)], 1),
            (vec![head(1), cluster.clone(), points.clone()], 1),
            (vec![cluster.clone(), cluster.clone()], 1),
            (vec![cluster.clone(), Chunk::Model(model([2; 16]))], 1),
            (vec![Chunk::Model(model([2; 16])), head(0)], 1),
        ] {
            match decode(&file(&chunks)) {
                Err(ReadError::Decode(DecodeError::ChunkOrder { chunk, .. })) => {
                    assert_eq!(chunk, at)
                }
                other => panic!("{other:?}"),
            }
        }
        // A head announcing more points than follow.
        assert_refused(&file(&[head(2), points]), "points missing");
    }

    /// Reads `tests/fixtures/<name>`, a checkpoint of the six-point fixture collection at LSN 2.
    fn read_fixture(name: &str) -> CheckpointBody {
        let old = read(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap();
        assert_eq!(old.lsn, 2);
        let c = &old.collections[0];
        assert_eq!((c.name.as_str(), c.dim, c.ids.len()), ("fixture", 4, 6));
        assert_eq!(c.ids, (0..6).collect::<Vec<u64>>());
        assert_eq!(
            c.payloads[5].as_deref(),
            Some(r#"{"text":"point number 5"}"#)
        );
        old
    }

    /// A version 2 file written by the previous release (`tests/fixtures/checkpoint-v2.tvck`:
    /// six 4-d cosine points with text payloads, made by `tiervec-cloud` at 0ae8d70) still
    /// loads; so does one with edge manifests, encoded here the way version 2 was.
    #[test]
    fn version_2_files_are_read() {
        read_fixture("checkpoint-v2.tvck");

        let b = body();
        let archived = rkyv::to_bytes::<rancor::Error>(&SingleArchiveBody {
            lsn: b.lsn,
            collections: b.collections,
            edge_caches: b.edge_caches,
        })
        .unwrap();
        let mut v2 = header(
            SINGLE_ARCHIVE_VERSION,
            42,
            archived.len() as u64,
            xxh3_64(&archived),
        )
        .to_vec();
        v2.extend_from_slice(&archived);
        assert_eq!(decode(&v2).unwrap(), body());
        let mut v1 = v2.clone();
        v1[..HEADER_LEN].copy_from_slice(&header(1, 42, archived.len() as u64, xxh3_64(&archived)));
        match decode(&v1) {
            Err(ReadError::Decode(e @ DecodeError::Version(1))) => {
                assert!(e.to_string().contains("versions 2 to 5"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    fn model(collection: [u8; 16]) -> ModelImage {
        ModelImage {
            collection,
            name: "all-MiniLM-L6-v2".into(),
            dim: 384,
            checksum: 0xfeed_f00d,
        }
    }

    /// Version 5 carries the collections' models between the edge caches and the cut; an
    /// older version, or a model out of place, is refused.
    #[test]
    fn models_round_trip_in_version_5_only() {
        let with_models = CheckpointBody {
            models: vec![model([2; 16]), model([3; 16])],
            cluster: Some(cut()),
            ..body()
        };
        let mut bytes = encode(&with_models, CHUNK_BYTES).unwrap();
        assert_eq!(decode(&bytes).unwrap(), with_models);
        let (len, count) = (
            u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
            u64::from_le_bytes(bytes[32..40].try_into().unwrap()),
        );
        bytes[..HEADER_LEN].copy_from_slice(&header(4, 42, len, count));
        assert_refused(&bytes, "a model in version 4");
    }

    /// A version 3 file written by the previous release (`tests/fixtures/checkpoint-v3.tvck`:
    /// the same six points, made by `tiervec-cloud serve` at 960f272) still loads; a version 3
    /// file cannot carry a cluster cut.
    #[test]
    fn version_3_files_are_read() {
        assert_eq!(read_fixture("checkpoint-v3.tvck").cluster, None);

        let clustered = CheckpointBody {
            cluster: Some(cut()),
            ..body()
        };
        let mut v3 = encode(&clustered, CHUNK_BYTES).unwrap();
        let (len, count) = (
            u64::from_le_bytes(v3[24..32].try_into().unwrap()),
            u64::from_le_bytes(v3[32..40].try_into().unwrap()),
        );
        v3[..HEADER_LEN].copy_from_slice(&header(CHUNKED_VERSION, 42, len, count));
        assert_refused(&v3, "a cluster cut in version 3");
    }

    #[test]
    fn newest_checkpoint_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_latest(dir.path()).unwrap().is_none());
        let mut b = body();
        write(dir.path(), &b, CHUNK_BYTES).unwrap();
        b.lsn = 50;
        write(dir.path(), &b, 64).unwrap();
        assert_eq!(load_latest(dir.path()).unwrap().unwrap().1, b);
        remove_before(dir.path(), 50).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 1);
        // No temp file is left beside it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
