//! The fixed 128-byte header: what it records, its encoding and its checks.

use xxhash_rust::xxh3::xxh3_64;

use super::{
    BODY_OFFSET, FLAG_PAYLOADS, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_DIM, MAX_M,
    OLDEST_SUPPORTED_VERSION, SnapshotError,
};
use crate::hnsw::HnswParams;
use crate::identity::CollectionId;
use crate::metric::Metric;

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

    pub(super) fn encode(&self) -> [u8; HEADER_LEN] {
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
