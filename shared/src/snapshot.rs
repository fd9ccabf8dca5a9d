//! The edge cache snapshot file, format version 1 — the one place that defines it.
//!
//! Documented in `docs/snapshot-format.md`. A snapshot is a fixed 128-byte little-endian header
//! followed, at byte [`BODY_OFFSET`], by an rkyv archive of [`SnapshotBody`]:
//!
//! | offset | size | field                                                       |
//! |-------:|-----:|-------------------------------------------------------------|
//! |      0 |    8 | magic `TVSNAP\r\n`                                          |
//! |      8 |    4 | format version (`1`)                                        |
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
//! [`Snapshot::open`] validates a file once — magic, version, header checksum, lengths, body
//! checksum, rkyv's bytecheck, then every index the search will follow — and search afterwards
//! runs on the archived bytes in place, trusting them.

use std::ops::Deref;

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// A heap buffer aligned for a snapshot body (rkyv's 16-byte aligned vector).
pub use rkyv::util::AlignedVec as AlignedBytes;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use crate::hnsw::{
    self, ExactSpace, FlatGraph, Graph, HnswBuilder, HnswParams, MAX_LAYERS, Neighbour,
    QuantizedSpace, SearchScratch,
};
use crate::identity::CollectionId;
use crate::metric::Metric;
use crate::{kernels, quant};

/// First eight bytes of every snapshot. The CR LF pair catches a file mangled by a text-mode
/// transfer, as PNG's signature does.
pub const MAGIC: [u8; 8] = *b"TVSNAP\r\n";
/// The format version this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
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

/// The archived body. Every large part is one flat array (rkyv's validation cost grows with
/// the number of archived objects, not their size), indexed by the node id `0..count`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SnapshotBody {
    /// Human name of the collection (the identity proper is in the header).
    pub collection_name: String,
    /// Cloud id of each vector.
    pub ids: Vec<u64>,
    /// Cloud sequence number (LSN) of the write that last changed each vector.
    pub lsns: Vec<u64>,
    /// `count × dim` components, row-major, prepared for the metric.
    pub vectors: Vec<f32>,
    /// Empty when there is no payload text; otherwise `count + 1` byte offsets into `payload_text`.
    pub payload_offsets: Vec<u32>,
    /// All payload texts, concatenated.
    pub payload_text: String,
    /// The HNSW graph over `vectors`.
    pub graph: GraphSection,
    /// Version of the edge manifest this snapshot reflects (0 for a snapshot built outside an
    /// edge; a compaction writes the version it reached).
    pub manifest_version: u64,
    /// Confidence anchors the cloud pushed (a compaction writes them; empty otherwise).
    pub anchors: AnchorSection,
    /// `i8` codes of the vectors for fast traversal (empty: search traverses in `f32`).
    pub quantization: QuantSection,
}

/// Scalar quantisation of the vectors (see [`crate::quant`]); empty or complete.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct QuantSection {
    /// `dim` per-dimension scales.
    pub scales: Vec<f32>,
    /// `count × dim` codes in `-127..=127`.
    pub codes: Vec<i8>,
    /// Squared norm of each original vector.
    pub norms: Vec<f32>,
}

impl QuantSection {
    /// Quantises `vectors` (row-major, `dim` wide).
    pub fn build(vectors: &[f32], dim: usize) -> QuantSection {
        if vectors.is_empty() {
            return QuantSection::default();
        }
        let scales = quant::train(vectors, dim);
        let mut codes = Vec::with_capacity(vectors.len());
        let mut norms = Vec::with_capacity(vectors.len() / dim);
        for row in vectors.chunks_exact(dim) {
            quant::encode(row, &scales, &mut codes);
            norms.push(kernels::dot(row, row));
        }
        QuantSection {
            scales,
            codes,
            norms,
        }
    }
}

/// The HNSW graph: per layer one flat neighbour array plus offsets, and an entry point.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GraphSection {
    pub entry_point: Option<u32>,
    pub layers: Vec<LayerSection>,
}

/// One layer; see [`hnsw::FlatLayer`] for the meaning of the arrays.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct LayerSection {
    pub nodes: Vec<u32>,
    pub offsets: Vec<u32>,
    pub neighbours: Vec<u32>,
}

/// Anchors: points of query space with the ids of their exact answers and a certified radius.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AnchorSection {
    /// `anchors × dim` components.
    pub vectors: Vec<f32>,
    /// One radius per anchor.
    pub radii: Vec<f32>,
    /// `anchors + 1` offsets into `answer_ids` (empty when there are no anchors).
    pub answer_offsets: Vec<u32>,
    pub answer_ids: Vec<u64>,
}

impl AnchorSection {
    /// Appends an anchor with the ids of its answer. Its radius is written 0: certificates
    /// live for one connection, never in a file.
    pub fn push(&mut self, vector: &[f32], members: &[u64]) {
        if self.answer_offsets.is_empty() {
            self.answer_offsets.push(0);
        }
        self.vectors.extend_from_slice(vector);
        self.radii.push(0.0);
        self.answer_ids.extend_from_slice(members);
        self.answer_offsets.push(self.answer_ids.len() as u32);
    }
}

impl From<FlatGraph> for GraphSection {
    fn from(g: FlatGraph) -> Self {
        GraphSection {
            entry_point: g.entry_point,
            layers: g
                .layers
                .into_iter()
                .map(|l| LayerSection {
                    nodes: l.nodes,
                    offsets: l.offsets,
                    neighbours: l.neighbours,
                })
                .collect(),
        }
    }
}

impl SnapshotBody {
    /// Assembles a body from a finished graph builder: node `i` gets `ids[i]`, `lsns[i]` and,
    /// when given, `payloads[i]`. Fails if the lengths disagree or the text exceeds 4 GiB.
    pub fn from_builder(
        builder: &HnswBuilder,
        collection_name: &str,
        ids: Vec<u64>,
        lsns: Vec<u64>,
        payloads: Option<&[String]>,
    ) -> Result<SnapshotBody, SnapshotError> {
        Self::from_parts(BodyParts {
            collection_name,
            dim: builder.dim(),
            ids,
            lsns,
            vectors: builder.vectors().to_vec(),
            payloads,
            graph: builder.to_flat(),
        })
    }

    /// Assembles a body from its parts (vectors already prepared for the metric), quantising
    /// the vectors for traversal. Fails if the lengths disagree or the text exceeds 4 GiB; the
    /// graph itself is checked when the body is encoded.
    pub fn from_parts(parts: BodyParts<'_>) -> Result<SnapshotBody, SnapshotError> {
        let BodyParts {
            collection_name,
            dim,
            ids,
            lsns,
            vectors,
            payloads,
            graph,
        } = parts;
        let n = ids.len();
        if lsns.len() != n || vectors.len() != n * dim || payloads.is_some_and(|p| p.len() != n) {
            return Err(SnapshotError::Write(format!(
                "{n} ids but {} LSNs, {} vector components (dimension {dim}) and {} payloads",
                lsns.len(),
                vectors.len(),
                payloads.map_or(0, <[String]>::len)
            )));
        }
        let mut payload_offsets = Vec::new();
        let mut payload_text = String::new();
        if let Some(texts) = payloads {
            payload_offsets.reserve(n + 1);
            payload_offsets.push(0);
            for t in texts {
                payload_text.push_str(t);
                let end = u32::try_from(payload_text.len())
                    .map_err(|_| SnapshotError::Write("payload text exceeds 4 GiB".into()))?;
                payload_offsets.push(end);
            }
        }
        let quantization = QuantSection::build(&vectors, dim);
        Ok(SnapshotBody {
            collection_name: collection_name.to_owned(),
            ids,
            lsns,
            vectors,
            payload_offsets,
            payload_text,
            graph: graph.into(),
            manifest_version: 0,
            anchors: AnchorSection::default(),
            quantization,
        })
    }
}

/// The contents of a snapshot body before it is assembled; node `i` is `ids[i]`.
#[derive(Clone, Debug)]
pub struct BodyParts<'a> {
    pub collection_name: &'a str,
    pub dim: usize,
    pub ids: Vec<u64>,
    pub lsns: Vec<u64>,
    /// `ids.len() × dim` components, prepared for the metric.
    pub vectors: Vec<f32>,
    pub payloads: Option<&'a [String]>,
    pub graph: FlatGraph,
}

/// What the header records besides lengths and checksums.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotSpec {
    pub collection: CollectionId,
    pub dim: u32,
    pub metric: Metric,
    pub params: HnswParams,
}

/// What a caller expects of a snapshot it opens; `None` accepts anything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expected {
    pub dim: Option<u32>,
    pub metric: Option<Metric>,
    pub collection: Option<CollectionId>,
}

impl Expected {
    /// Checks `header` against these expectations.
    pub fn check(&self, header: &SnapshotHeader) -> Result<(), SnapshotError> {
        let spec = &header.spec;
        if let Some(expected) = self.dim.filter(|&d| d != spec.dim) {
            return Err(SnapshotError::DimensionMismatch {
                expected,
                found: spec.dim,
            });
        }
        if let Some(expected) = self.metric.filter(|&m| m != spec.metric) {
            return Err(SnapshotError::MetricMismatch {
                expected,
                found: spec.metric,
            });
        }
        if let Some(expected) = self.collection.filter(|&c| c != spec.collection) {
            return Err(SnapshotError::CollectionMismatch {
                expected,
                found: spec.collection,
            });
        }
        Ok(())
    }
}

/// A decoded header.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotHeader {
    pub version: u32,
    pub spec: SnapshotSpec,
    pub count: u64,
    pub has_payloads: bool,
    pub body_offset: u64,
    pub body_len: u64,
    pub body_checksum: u64,
}

impl SnapshotHeader {
    /// Total file length the header promises.
    pub fn file_len(&self) -> u64 {
        self.body_offset + self.body_len
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..20].copy_from_slice(&self.spec.dim.to_le_bytes());
        h[20] = self.spec.metric.code();
        h[21] = if self.has_payloads { FLAG_PAYLOADS } else { 0 };
        h[22..24].copy_from_slice(&(self.spec.params.m as u16).to_le_bytes());
        h[24..28].copy_from_slice(&(self.spec.params.ef_construction as u32).to_le_bytes());
        h[32..40].copy_from_slice(&self.spec.params.seed.to_le_bytes());
        h[40..48].copy_from_slice(&self.count.to_le_bytes());
        h[48..64].copy_from_slice(&self.spec.collection.0);
        h[64..72].copy_from_slice(&self.body_offset.to_le_bytes());
        h[72..80].copy_from_slice(&self.body_len.to_le_bytes());
        h[80..88].copy_from_slice(&self.body_checksum.to_le_bytes());
        let sum = xxh3_64(&h[..120]);
        h[120..128].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Decodes and checks a header: magic, version, checksum, then each field's range.
    pub fn decode(bytes: &[u8]) -> Result<SnapshotHeader, SnapshotError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
                return Err(SnapshotError::TooShort {
                    actual: bytes.len() as u64,
                    needed: HEADER_LEN as u64,
                });
            }
            let mut found = [0u8; 8];
            let n = bytes.len().min(8);
            found[..n].copy_from_slice(&bytes[..n]);
            return Err(SnapshotError::BadMagic { found });
        }
        if bytes.len() < 12 {
            return Err(SnapshotError::TooShort {
                actual: bytes.len() as u64,
                needed: HEADER_LEN as u64,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version > FORMAT_VERSION {
            return Err(SnapshotError::NewerVersion {
                found: version,
                newest: FORMAT_VERSION,
            });
        }
        if version < OLDEST_SUPPORTED_VERSION {
            return Err(SnapshotError::OlderVersion {
                found: version,
                oldest: OLDEST_SUPPORTED_VERSION,
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(SnapshotError::TooShort {
                actual: bytes.len() as u64,
                needed: HEADER_LEN as u64,
            });
        }
        let stored = u64_at(120);
        let computed = xxh3_64(&bytes[..120]);
        if stored != computed {
            return Err(SnapshotError::HeaderChecksum { stored, computed });
        }
        let bad = |what: String| Err(SnapshotError::BadHeader(what));
        if u32_at(12) as usize != HEADER_LEN {
            return bad(format!(
                "header length {} (expected {HEADER_LEN})",
                u32_at(12)
            ));
        }
        let dim = u32_at(16);
        if dim == 0 || dim > MAX_DIM {
            return bad(format!("dimension {dim} is outside 1..={MAX_DIM}"));
        }
        let Some(metric) = Metric::from_code(bytes[20]) else {
            return bad(format!("unknown metric code {}", bytes[20]));
        };
        let flags = bytes[21];
        if flags & !FLAG_PAYLOADS != 0 {
            return bad(format!("unknown flags {flags:#04x}"));
        }
        let m = u16::from_le_bytes([bytes[22], bytes[23]]);
        if !(2..=MAX_M).contains(&m) {
            return bad(format!("HNSW m = {m} is outside 2..={MAX_M}"));
        }
        let count = u64_at(40);
        if count >= u64::from(u32::MAX) {
            return bad(format!(
                "vector count {count} exceeds the u32 node-id space"
            ));
        }
        let body_offset = u64_at(64);
        if body_offset != BODY_OFFSET as u64 {
            return bad(format!(
                "body offset {body_offset} (expected {BODY_OFFSET})"
            ));
        }
        let mut collection = [0u8; 16];
        collection.copy_from_slice(&bytes[48..64]);
        Ok(SnapshotHeader {
            version,
            spec: SnapshotSpec {
                collection: CollectionId(collection),
                dim,
                metric,
                params: HnswParams {
                    m: m as usize,
                    ef_construction: u32_at(24) as usize,
                    seed: u64_at(32),
                },
            },
            count,
            has_payloads: flags & FLAG_PAYLOADS != 0,
            body_offset,
            body_len: u64_at(72),
            body_checksum: u64_at(80),
        })
    }
}

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

/// Serialises a snapshot (header and body) into bytes, after checking that the result passes
/// the same validation [`Snapshot::open`] applies — tiervec never writes a file it would refuse.
pub fn encode(spec: &SnapshotSpec, body: &SnapshotBody) -> Result<AlignedVec, SnapshotError> {
    let out = assemble(spec, body)?;
    validate(&out)?;
    Ok(out)
}

/// Header plus archived body, unvalidated.
fn assemble(spec: &SnapshotSpec, body: &SnapshotBody) -> Result<AlignedVec, SnapshotError> {
    let archived =
        rkyv::to_bytes::<rancor::Error>(body).map_err(|e| SnapshotError::Write(e.to_string()))?;
    let count = body.ids.len() as u64;
    let header = SnapshotHeader {
        version: FORMAT_VERSION,
        spec: spec.clone(),
        count,
        has_payloads: !body.payload_offsets.is_empty(),
        body_offset: BODY_OFFSET as u64,
        body_len: archived.len() as u64,
        body_checksum: xxh3_64(&archived),
    };
    let mut out = AlignedVec::with_capacity(BODY_OFFSET + archived.len());
    out.extend_from_slice(&header.encode());
    out.resize(BODY_OFFSET, 0);
    out.extend_from_slice(&archived);
    Ok(out)
}

/// Validates a whole snapshot held in `bytes` and returns its header. After `Ok`, every index
/// the search follows is in bounds, so searching the archived data cannot panic.
pub fn validate(bytes: &[u8]) -> Result<SnapshotHeader, SnapshotError> {
    let header = SnapshotHeader::decode(bytes)?;
    let actual = bytes.len() as u64;
    let expected = header.file_len();
    if actual < expected {
        return Err(SnapshotError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(SnapshotError::TrailingBytes { expected, actual });
    }
    let body = &bytes[BODY_OFFSET..];
    let computed = xxh3_64(body);
    if computed != header.body_checksum {
        return Err(SnapshotError::BodyChecksum {
            stored: header.body_checksum,
            computed,
        });
    }
    if !(body.as_ptr() as usize).is_multiple_of(BODY_ALIGN) {
        return Err(SnapshotError::Misaligned { align: BODY_ALIGN });
    }
    let archived = rkyv::access::<ArchivedSnapshotBody, rancor::Error>(body)
        .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
    check_contents(&header, archived)?;
    Ok(header)
}

fn inconsistent<T>(what: String) -> Result<T, SnapshotError> {
    Err(SnapshotError::Inconsistent(what))
}

/// Checks that `offsets` is a valid CSR offset array of `rows` rows over `len` items.
fn check_offsets(
    name: &str,
    offsets: &[u32],
    rows: usize,
    len: usize,
) -> Result<(), SnapshotError> {
    if offsets.len() != rows + 1 {
        return inconsistent(format!(
            "{name} has {} offsets for {rows} rows (expected {})",
            offsets.len(),
            rows + 1
        ));
    }
    if offsets[0] != 0 || offsets[rows] as usize != len {
        return inconsistent(format!(
            "{name} offsets run from {} to {}, expected 0 to {len}",
            offsets[0], offsets[rows]
        ));
    }
    if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return inconsistent(format!("{name} offsets decrease at row {i}"));
    }
    Ok(())
}

/// The semantic checks bytecheck cannot make: lengths agree with the header, offsets are
/// monotone, every node id is in range, degrees are bounded, vectors are finite.
fn check_contents(h: &SnapshotHeader, b: &ArchivedSnapshotBody) -> Result<(), SnapshotError> {
    let count = h.count as usize;
    let dim = h.spec.dim as usize;
    if b.ids.len() != count || b.lsns.len() != count {
        return inconsistent(format!(
            "header says {count} vectors, body has {} ids and {} LSNs",
            b.ids.len(),
            b.lsns.len()
        ));
    }
    let vectors: &[f32] = cast(&b.vectors);
    if vectors.len() != count * dim {
        return inconsistent(format!(
            "{} vector components for {count} vectors of dimension {dim}",
            vectors.len()
        ));
    }
    if let Some(i) = vectors.iter().position(|x| !x.is_finite()) {
        return inconsistent(format!("vector {} has a non-finite component", i / dim));
    }
    let payload_offsets: &[u32] = cast(&b.payload_offsets);
    if h.has_payloads == payload_offsets.is_empty() {
        return inconsistent("payload flag disagrees with the payload section".into());
    }
    if h.has_payloads {
        let text = b.payload_text.as_str();
        check_offsets("payload", payload_offsets, count, text.len())?;
        if let Some(i) = payload_offsets
            .iter()
            .position(|&o| !text.is_char_boundary(o as usize))
        {
            return inconsistent(format!("payload {i} does not start on a UTF-8 character"));
        }
    } else if !b.payload_text.is_empty() {
        return inconsistent("payload text present without offsets".into());
    }
    check_graph(h, &b.graph, count)?;
    check_anchors(&b.anchors, dim)?;
    check_quantization(&b.quantization, count, dim)
}

fn check_quantization(
    q: &ArchivedQuantSection,
    count: usize,
    dim: usize,
) -> Result<(), SnapshotError> {
    if q.scales.is_empty() && q.codes.is_empty() && q.norms.is_empty() {
        return Ok(());
    }
    let scales: &[f32] = cast(&q.scales);
    let norms: &[f32] = cast(&q.norms);
    if scales.len() != dim || q.codes.len() != count * dim || norms.len() != count {
        return inconsistent(format!(
            "quantisation has {} scales, {} codes and {} norms for {count} vectors of dimension {dim}",
            scales.len(),
            q.codes.len(),
            norms.len()
        ));
    }
    if scales.iter().chain(norms).any(|x| !x.is_finite()) {
        return inconsistent("quantisation scales or norms are not finite".into());
    }
    if q.codes.contains(&i8::MIN) {
        return inconsistent("quantisation code -128 is outside -127..=127".into());
    }
    Ok(())
}

fn check_graph(
    h: &SnapshotHeader,
    g: &ArchivedGraphSection,
    count: usize,
) -> Result<(), SnapshotError> {
    let entry = g.entry_point.as_ref().map(|e| e.to_native());
    let layers = g.layers.len();
    if count == 0 {
        if entry.is_some() || layers != 0 {
            return inconsistent("an empty snapshot has a graph".into());
        }
        return Ok(());
    }
    let Some(entry) = entry.filter(|&e| (e as usize) < count) else {
        return inconsistent(format!(
            "entry point {entry:?} is not one of the {count} nodes"
        ));
    };
    if layers == 0 || layers > MAX_LAYERS {
        return inconsistent(format!("{layers} graph layers (expected 1..={MAX_LAYERS})"));
    }
    for (l, layer) in g.layers.iter().enumerate() {
        let nodes: &[u32] = cast(&layer.nodes);
        let offsets: &[u32] = cast(&layer.offsets);
        let neighbours: &[u32] = cast(&layer.neighbours);
        let rows = if l == 0 {
            if !nodes.is_empty() {
                return inconsistent("layer 0 lists its nodes (it holds all of them)".into());
            }
            count
        } else {
            if nodes.windows(2).any(|w| w[1] <= w[0])
                || nodes.last().is_some_and(|&n| n as usize >= count)
            {
                return inconsistent(format!("layer {l} node list is unsorted or out of range"));
            }
            nodes.len()
        };
        check_offsets(&format!("layer {l}"), offsets, rows, neighbours.len())?;
        let max = h.spec.params.max_degree(l);
        if let Some(i) = offsets
            .windows(2)
            .position(|w| (w[1] - w[0]) as usize > max)
        {
            return inconsistent(format!("layer {l} row {i} has more than {max} neighbours"));
        }
        if let Some(&n) = neighbours.iter().find(|&&n| n as usize >= count) {
            return inconsistent(format!("layer {l} links to node {n}, beyond {count} nodes"));
        }
        if l + 1 == layers && l > 0 && nodes.binary_search(&entry).is_err() {
            return inconsistent(format!("entry point {entry} is not on the top layer {l}"));
        }
    }
    Ok(())
}

fn check_anchors(a: &ArchivedAnchorSection, dim: usize) -> Result<(), SnapshotError> {
    let anchors = a.radii.len();
    let answer_offsets: &[u32] = cast(&a.answer_offsets);
    if a.vectors.len() != anchors * dim {
        return inconsistent(format!(
            "{} anchor components for {anchors} anchors of dimension {dim}",
            a.vectors.len()
        ));
    }
    if anchors == 0 {
        if !answer_offsets.is_empty() || !a.answer_ids.is_empty() {
            return inconsistent("anchor answers without anchors".into());
        }
        return Ok(());
    }
    check_offsets(
        "anchor answers",
        answer_offsets,
        anchors,
        a.answer_ids.len(),
    )
}

/// Reinterprets an archived little-endian array as native values. The `bytemuck` cast checks
/// size and alignment; both always hold for rkyv's `aligned` layout, so it cannot fail.
#[inline]
fn cast<A: bytemuck::Pod, N: bytemuck::Pod>(v: &rkyv::vec::ArchivedVec<A>) -> &[N] {
    bytemuck::cast_slice(v.as_slice())
}

#[cfg(not(target_endian = "little"))]
compile_error!(
    "tiervec's snapshot format is little-endian and is read in place: big-endian targets are not supported"
);

/// Byte containers whose contents and address cannot change while they are borrowed and are
/// not changed by anyone else while they live, so that bytes validated once stay valid.
///
/// # Safety
/// `deref` must return the same slice (address, length and contents) for the whole life of the
/// value. Implementing this for a memory map asserts that no one truncates or rewrites the
/// mapped file while it is mapped (see `docs/snapshot-format.md`, "The mmap hazard").
pub unsafe trait StableBytes: Deref<Target = [u8]> {}

// SAFETY: owned buffers only change through `&mut`, which `Snapshot` never hands out.
unsafe impl StableBytes for AlignedVec {}
// SAFETY: as above.
unsafe impl StableBytes for Vec<u8> {}
// SAFETY: as above.
unsafe impl StableBytes for Box<[u8]> {}
// SAFETY: shared references guarantee immutability for their lifetime.
unsafe impl StableBytes for &[u8] {}

/// A validated snapshot over bytes the caller owns (a memory map, or a buffer).
pub struct Snapshot<B: StableBytes> {
    bytes: B,
    header: SnapshotHeader,
}

impl<B: StableBytes> Snapshot<B> {
    /// Validates `bytes` once (see [`validate`]); afterwards views search it in place.
    pub fn open(bytes: B) -> Result<Self, SnapshotError> {
        let header = validate(&bytes)?;
        Ok(Snapshot { bytes, header })
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Size of the snapshot in bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The validated file bytes (to hand the same snapshot to another searcher, e.g. a guest).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A view of the archived contents, without copying or re-validating.
    pub fn view(&self) -> SnapshotView<'_> {
        // SAFETY: `open` validated these exact bytes with `rkyv::access`, and `StableBytes`
        // guarantees they have not moved or changed since.
        let body =
            unsafe { rkyv::access_unchecked::<ArchivedSnapshotBody>(&self.bytes[BODY_OFFSET..]) };
        let layer0 = body.graph.layers.first();
        SnapshotView {
            header: &self.header,
            body,
            vectors: cast(&body.vectors),
            ids: cast(&body.ids),
            layer0_offsets: layer0.map_or(&[], |l| cast(&l.offsets)),
            layer0_neighbours: layer0.map_or(&[], |l| cast(&l.neighbours)),
        }
    }

    pub fn into_inner(self) -> B {
        self.bytes
    }
}

/// Borrowed access to a validated snapshot: ids, vectors, payloads and the graph, in place.
#[derive(Clone, Copy)]
pub struct SnapshotView<'a> {
    header: &'a SnapshotHeader,
    body: &'a ArchivedSnapshotBody,
    vectors: &'a [f32],
    ids: &'a [u64],
    layer0_offsets: &'a [u32],
    layer0_neighbours: &'a [u32],
}

impl<'a> SnapshotView<'a> {
    pub fn header(&self) -> &'a SnapshotHeader {
        self.header
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.header.spec.dim as usize
    }

    pub fn metric(&self) -> Metric {
        self.header.spec.metric
    }

    pub fn collection_name(&self) -> &'a str {
        self.body.collection_name.as_str()
    }

    pub fn manifest_version(&self) -> u64 {
        self.body.manifest_version.to_native()
    }

    /// All vectors, row-major.
    pub fn vectors(&self) -> &'a [f32] {
        self.vectors
    }

    /// Cloud ids, by node.
    pub fn ids(&self) -> &'a [u64] {
        self.ids
    }

    /// The LSN of node `node`'s last write.
    pub fn lsn(&self, node: u32) -> Option<u64> {
        self.body.lsns.get(node as usize).map(|l| l.to_native())
    }

    /// Node `node`'s vector.
    pub fn vector(&self, node: u32) -> Option<&'a [f32]> {
        let dim = self.dim();
        let start = node as usize * dim;
        self.vectors.get(start..start + dim)
    }

    /// Node `node`'s payload text, if the snapshot carries payloads.
    pub fn payload(&self, node: u32) -> Option<&'a str> {
        let offsets: &'a [u32] = cast(&self.body.payload_offsets);
        let (start, end) = (
            *offsets.get(node as usize)?,
            *offsets.get(node as usize + 1)?,
        );
        self.body.payload_text.get(start as usize..end as usize)
    }

    /// An owned copy of the whole body (for rewriting a snapshot, e.g. compaction).
    pub fn to_body(&self) -> Result<SnapshotBody, SnapshotError> {
        rkyv::deserialize::<SnapshotBody, rancor::Error>(self.body)
            .map_err(|e| SnapshotError::Malformed(e.to_string()))
    }

    /// Number of anchors.
    pub fn anchor_count(&self) -> usize {
        self.body.anchors.radii.len()
    }

    /// Anchor `i`: its point and the ids of its answer (validated consistent on open).
    pub fn anchor(&self, i: usize) -> Option<(&'a [f32], &'a [u64])> {
        let a = &self.body.anchors;
        let dim = self.dim();
        let offsets: &'a [u32] = cast(&a.answer_offsets);
        let vectors: &'a [f32] = cast(&a.vectors);
        let ids: &'a [u64] = cast(&a.answer_ids);
        let (start, end) = (*offsets.get(i)? as usize, *offsets.get(i + 1)? as usize);
        Some((vectors.get(i * dim..(i + 1) * dim)?, ids.get(start..end)?))
    }

    /// Degree statistics of each graph layer, bottom first.
    pub fn layer_stats(&self) -> Vec<hnsw::graph_stats::LayerStats> {
        self.body
            .graph
            .layers
            .iter()
            .map(|l| hnsw::graph_stats::layer_stats(cast(&l.offsets)))
            .collect()
    }

    /// k nearest nodes to `query` (validated and prepared for the metric by the caller),
    /// nearest first, borrowed from `scratch`.
    pub fn search<'s>(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        scratch: &'s mut SearchScratch,
    ) -> &'s [Neighbour] {
        let exact = ExactSpace {
            vectors: self.vectors,
            dim: self.dim(),
            metric: self.metric(),
            query,
        };
        let q = &self.body.quantization;
        if q.codes.is_empty() {
            return hnsw::search(self, &exact, k, ef, scratch);
        }
        let scales: &[f32] = cast(&q.scales);
        let mut codes = std::mem::take(scratch.query_codes());
        codes.prepare(query, scales);
        let quantized = QuantizedSpace {
            codes: q.codes.as_slice(),
            norms: cast(&q.norms),
            dim: self.dim(),
            metric: self.metric(),
            query: &codes,
            query_norm: kernels::dot(query, query),
        };
        hnsw::search_reranked(self, &quantized, &exact, k, ef, ef, scratch);
        *scratch.query_codes() = codes;
        scratch.found()
    }
}

impl Graph for SnapshotView<'_> {
    #[inline]
    fn neighbours(&self, node: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            return hnsw::flat_neighbours(
                &[],
                self.layer0_offsets,
                self.layer0_neighbours,
                node,
                0,
            );
        }
        match self.body.graph.layers.get(layer) {
            Some(l) => hnsw::flat_neighbours(
                cast(&l.nodes),
                cast(&l.offsets),
                cast(&l.neighbours),
                node,
                layer,
            ),
            None => &[],
        }
    }

    fn entry_point(&self) -> Option<u32> {
        self.body.graph.entry_point.as_ref().map(|e| e.to_native())
    }

    #[inline]
    fn prefetch_neighbours(&self, node: u32, layer: usize) {
        if layer == 0
            && let Some(&start) = self.layer0_offsets.get(node as usize)
            && let Some(list) = self.layer0_neighbours.get(start as usize..)
        {
            // The first line of the list: a whole list (32 ids) is two lines, usually one.
            kernels::prefetch_all(&list[..list.len().min(16)]);
        }
    }

    fn layers(&self) -> usize {
        self.body.graph.layers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dim: u32) -> SnapshotSpec {
        SnapshotSpec {
            collection: CollectionId::from_u128(7),
            dim,
            metric: Metric::Cosine,
            params: HnswParams::default(),
        }
    }

    fn small_body() -> SnapshotBody {
        let mut b = HnswBuilder::new(4, Metric::Cosine, HnswParams::default());
        for i in 0..40 {
            let x = i as f32;
            b.insert(&[x.sin(), x.cos(), 1.0, (x * 0.3).sin()]).unwrap();
        }
        let texts: Vec<String> = (0..40).map(|i| format!("é{i}")).collect();
        SnapshotBody::from_builder(&b, "t", (0..40).collect(), vec![1; 40], Some(&texts)).unwrap()
    }

    /// Encodes without the writer's validation, so the reader's checks can be exercised.
    fn refused(body: SnapshotBody) -> SnapshotError {
        let bytes = assemble(&spec(4), &body).unwrap();
        let err = validate(&bytes).unwrap_err();
        assert_eq!(
            encode(&spec(4), &body).unwrap_err(),
            err,
            "the writer refuses it too"
        );
        err
    }

    #[test]
    fn each_inconsistency_is_refused() {
        let good = small_body();
        assert!(encode(&spec(4), &good).is_ok());
        type Mutation = Box<dyn Fn(&mut SnapshotBody)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "ids",
                Box::new(|b| {
                    b.ids.pop();
                }),
            ),
            (
                "vectors",
                Box::new(|b| {
                    b.vectors.push(0.0);
                }),
            ),
            ("non-finite", Box::new(|b| b.vectors[5] = f32::NAN)),
            ("payload offsets", Box::new(|b| b.payload_offsets[3] = 1000)),
            ("payload boundary", Box::new(|b| b.payload_offsets[1] = 1)),
            (
                "neighbour range",
                Box::new(|b| b.graph.layers[0].neighbours[0] = 40),
            ),
            (
                "offsets order",
                Box::new(|b| b.graph.layers[0].offsets.swap(1, 2)),
            ),
            ("entry", Box::new(|b| b.graph.entry_point = Some(99))),
            ("layers", Box::new(|b| b.graph.layers.clear())),
            ("anchors", Box::new(|b| b.anchors.radii.push(1.0))),
            ("codes", Box::new(|b| b.quantization.codes[0] = i8::MIN)),
            (
                "scales",
                Box::new(|b| {
                    b.quantization.scales.pop();
                }),
            ),
        ];
        for (what, mutate) in cases {
            let mut body = good.clone();
            mutate(&mut body);
            assert!(
                matches!(refused(body), SnapshotError::Inconsistent(_)),
                "{what} must be refused as inconsistent"
            );
        }
    }

    #[test]
    fn degree_above_the_header_bound_is_refused() {
        let mut body = small_body();
        let layer = &mut body.graph.layers[0];
        let extra = HnswParams::default().max_degree(0) + 1;
        let row0 = layer.offsets[1] as usize;
        layer
            .neighbours
            .splice(row0..row0, std::iter::repeat_n(1, extra));
        for o in layer.offsets.iter_mut().skip(1) {
            *o += extra as u32;
        }
        assert!(matches!(refused(body), SnapshotError::Inconsistent(m) if m.contains("more than")));
    }

    #[test]
    fn garbage_body_with_a_valid_checksum_fails_bytecheck() {
        let mut bytes = encode(&spec(4), &small_body()).unwrap();
        let len = bytes.len();
        for b in &mut bytes[len - 64..] {
            *b = 0xAB;
        }
        let sum = xxh3_64(&bytes[BODY_OFFSET..]);
        bytes[80..88].copy_from_slice(&sum.to_le_bytes());
        let hsum = xxh3_64(&bytes[..120]);
        bytes[120..128].copy_from_slice(&hsum.to_le_bytes());
        assert!(matches!(validate(&bytes), Err(SnapshotError::Malformed(_))));
    }

    #[test]
    fn expectations_name_what_differs() {
        let bytes = encode(&spec(4), &small_body()).unwrap();
        let h = validate(&bytes).unwrap();
        assert_eq!(Expected::default().check(&h), Ok(()));
        let dim = Expected {
            dim: Some(384),
            ..Expected::default()
        };
        assert_eq!(
            dim.check(&h),
            Err(SnapshotError::DimensionMismatch {
                expected: 384,
                found: 4
            })
        );
        let metric = Expected {
            metric: Some(Metric::L2),
            ..Expected::default()
        };
        assert!(matches!(
            metric.check(&h),
            Err(SnapshotError::MetricMismatch { .. })
        ));
        let coll = Expected {
            collection: Some(CollectionId::from_u128(8)),
            ..Expected::default()
        };
        assert!(matches!(
            coll.check(&h),
            Err(SnapshotError::CollectionMismatch { .. })
        ));
    }

    #[test]
    fn misaligned_bytes_are_refused_not_misread() {
        let bytes = encode(&spec(4), &small_body()).unwrap();
        let mut shifted: AlignedVec = AlignedVec::with_capacity(bytes.len() + 1);
        shifted.push(0);
        shifted.extend_from_slice(&bytes);
        assert_eq!(
            validate(&shifted[1..]),
            Err(SnapshotError::Misaligned { align: BODY_ALIGN })
        );
    }

    #[test]
    fn body_round_trips_through_the_archive() {
        let body = small_body();
        let snap = Snapshot::open(encode(&spec(4), &body).unwrap()).unwrap();
        assert_eq!(snap.view().to_body().unwrap(), body);
        assert_eq!(snap.view().payload(3), Some("é3"));
    }
}
