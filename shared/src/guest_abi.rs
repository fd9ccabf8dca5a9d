//! The byte layouts of the guest ABI, version [`ABI_VERSION`]: the search request, the search
//! response, the certificate list and the status codes. The guest (`tiervec-wasm`) and the
//! host (`tiervec_edge::wasm_host`) both use this one module, so the two sides cannot drift.
//! Pure byte work, like the rest of `shared`. Documented in `docs/wasm.md`; the snapshot buffer
//! the host hands the guest is aligned to [`crate::snapshot::BODY_ALIGN`].
//!
//! All integers and floats are little-endian; there is no padding beyond what is listed.
//!
//! Search request (`12 + 4·dim` bytes):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | `k` |
//! | 4 | 4 | `ef` |
//! | 8 | 4 | `dim` (number of query components) |
//! | 12 | 4·dim | query components, `f32` |
//!
//! Search response (`24 + 24·hits + payload bytes`):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | number of hits |
//! | 4 | 4 | flags: bit 0 certified, bit 1 nearest anchor present, bit 2 decision is local |
//! | 8 | 8 | nearest anchor id (0 when absent) |
//! | 16 | 4 | distance to the nearest anchor, `f32` (0 when absent) |
//! | 20 | 4 | total payload bytes that follow the hits |
//! | 24 | 24 each | per hit: id `u64`, LSN `u64`, distance `f32`, payload length `u32` (`u32::MAX`: none) |
//! | … | | the hits' payloads, UTF-8, concatenated in hit order |
//!
//! Certificates (`tv_set_certificates`, `12·n` bytes): `n` entries of anchor id `u64` and
//! radius `f32` (finite, > 0); every anchor not listed is uncertified.

use thiserror::Error;

/// Version of the guest ABI this file describes (`tv_abi_version` returns it).
pub const ABI_VERSION: u32 = 3;

/// Status codes every fallible export returns; on anything but [`status::OK`] the result
/// buffer (`tv_result_ptr`/`tv_result_len`) holds a UTF-8 message saying what went wrong.
pub mod status {
    /// Success; the result buffer holds the export's answer (empty for most).
    pub const OK: i32 = 0;
    /// An ABI argument is unusable: a null or misaligned pointer, a length past memory.
    pub const BAD_ARGUMENT: i32 = 1;
    /// The request bytes do not follow the layout of this module.
    pub const MALFORMED_REQUEST: i32 = 2;
    /// The search request is well formed but refused (`QueryError`: dimension, NaN, `k`, `ef`).
    pub const INVALID_QUERY: i32 = 3;
    /// The snapshot failed validation (`SnapshotError`: magic, checksums, rkyv bytecheck, …).
    pub const SNAPSHOT_REFUSED: i32 = 4;
    /// The delta bytes are not a delta (rkyv bytecheck failed).
    pub const DELTA_MALFORMED: i32 = 5;
    /// The delta is well formed but does not apply to this cache (`PushError`).
    pub const DELTA_REFUSED: i32 = 6;
    /// The guest could not allocate memory (the host's memory cap, or a huge request).
    pub const OUT_OF_MEMORY: i32 = 7;
    /// The guest was re-entered while busy (a host bug; the guest is single-threaded).
    pub const BUSY: i32 = 8;

    /// A short name for a status code, for logs and metrics.
    pub const fn name(code: i32) -> &'static str {
        match code {
            OK => "ok",
            BAD_ARGUMENT => "bad_argument",
            MALFORMED_REQUEST => "malformed_request",
            INVALID_QUERY => "invalid_query",
            SNAPSHOT_REFUSED => "snapshot_refused",
            DELTA_MALFORMED => "delta_malformed",
            DELTA_REFUSED => "delta_refused",
            OUT_OF_MEMORY => "out_of_memory",
            BUSY => "busy",
            _ => "unknown",
        }
    }
}

/// Response flag: the answer is certified exact (`LocalSearch::certified`).
pub const FLAG_CERTIFIED: u32 = 1;
/// Response flag: the cache holds an anchor; its id and distance are set.
pub const FLAG_ANCHOR: u32 = 2;
/// Response flag: the confidence rule says the answer is good enough to serve locally.
pub const FLAG_LOCAL: u32 = 4;

const REQUEST_HEADER: usize = 12;
const RESPONSE_HEADER: usize = 24;
const HIT_LEN: usize = 24;
const NO_PAYLOAD: u32 = u32::MAX;

/// Bytes that do not follow the layouts above.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum WireError {
    #[error("{what} is {len} bytes, shorter than the {needed} its header promises")]
    Truncated {
        what: &'static str,
        len: usize,
        needed: usize,
    },
    #[error("{what} has {extra} bytes after its last field")]
    Trailing { what: &'static str, extra: usize },
    #[error("payload of hit {hit} is not UTF-8")]
    PayloadNotUtf8 { hit: usize },
    #[error("certificate {index} has radius {radius}; a radius is finite and positive")]
    BadRadius { index: usize, radius: f32 },
    #[error("{what} exceeds 4 GiB and cannot be framed")]
    TooLarge { what: &'static str },
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_bits(u32_at(bytes, at))
}

const CERTIFICATE_LEN: usize = 12;

/// Appends the certificates in force (anchor id, radius) to `out` (cleared first).
pub fn encode_certificates(certificates: &[(u64, f32)], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(CERTIFICATE_LEN * certificates.len());
    for &(id, radius) in certificates {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&radius.to_le_bytes());
    }
}

/// Reads certificates written by [`encode_certificates`], refusing a ragged length and any
/// radius that is not finite and positive (a radius of 0 is no certificate: leave it out).
pub fn decode_certificates(bytes: &[u8]) -> Result<Vec<(u64, f32)>, WireError> {
    let extra = bytes.len() % CERTIFICATE_LEN;
    if extra != 0 {
        return Err(WireError::Trailing {
            what: "certificates",
            extra,
        });
    }
    bytes
        .chunks_exact(CERTIFICATE_LEN)
        .enumerate()
        .map(|(index, entry)| {
            let radius = f32_at(entry, 8);
            if radius.is_finite() && radius > 0.0 {
                Ok((u64_at(entry, 0), radius))
            } else {
                Err(WireError::BadRadius { index, radius })
            }
        })
        .collect()
}

fn len_u32(len: usize, what: &'static str) -> Result<u32, WireError> {
    u32::try_from(len).map_err(|_| WireError::TooLarge { what })
}

/// Appends a search request to `out` (cleared first).
pub fn encode_request(k: u32, ef: u32, query: &[f32], out: &mut Vec<u8>) -> Result<(), WireError> {
    out.clear();
    out.reserve(REQUEST_HEADER + 4 * query.len());
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&ef.to_le_bytes());
    out.extend_from_slice(&len_u32(query.len(), "query")?.to_le_bytes());
    for x in query {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(())
}

/// Decodes a search request: `(k, ef)`, with the query components written into `query`
/// (cleared first, so its capacity is reused across requests).
pub fn decode_request(bytes: &[u8], query: &mut Vec<f32>) -> Result<(u32, u32), WireError> {
    let what = "search request";
    if bytes.len() < REQUEST_HEADER {
        return Err(WireError::Truncated {
            what,
            len: bytes.len(),
            needed: REQUEST_HEADER,
        });
    }
    let (k, ef, dim) = (
        u32_at(bytes, 0),
        u32_at(bytes, 4),
        u32_at(bytes, 8) as usize,
    );
    let needed = dim
        .checked_mul(4)
        .and_then(|n| n.checked_add(REQUEST_HEADER))
        .ok_or(WireError::TooLarge { what })?;
    if bytes.len() < needed {
        return Err(WireError::Truncated {
            what,
            len: bytes.len(),
            needed,
        });
    }
    if bytes.len() > needed {
        return Err(WireError::Trailing {
            what,
            extra: bytes.len() - needed,
        });
    }
    query.clear();
    query.extend(
        bytes[REQUEST_HEADER..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok((k, ef))
}

/// A decoded hit: the shared local search's own hit type.
pub use crate::local::LocalHit as WireHit;

/// A decoded search response.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SearchResponse {
    /// Nearest first.
    pub hits: Vec<WireHit>,
    /// The nearest anchor's id and distance, if the cache holds anchors.
    pub nearest_anchor: Option<(u64, f32)>,
    /// The answer is certified exact.
    pub certified: bool,
    /// The confidence rule's decision: serve locally (else ask the cloud).
    pub local: bool,
}

/// Encodes a search response into `out` (cleared first) from borrowed hits
/// `(id, distance, lsn, payload)`.
pub fn encode_response<'a>(
    hits: impl ExactSizeIterator<Item = (u64, f32, u64, Option<&'a str>)> + Clone,
    nearest_anchor: Option<(u64, f32)>,
    certified: bool,
    local: bool,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    out.clear();
    let count = len_u32(hits.len(), "hit list")?;
    let payload_total: usize = hits.clone().map(|h| h.3.map_or(0, str::len)).sum();
    out.reserve(RESPONSE_HEADER + HIT_LEN * hits.len() + payload_total);
    let mut flags = 0;
    if certified {
        flags |= FLAG_CERTIFIED;
    }
    if nearest_anchor.is_some() {
        flags |= FLAG_ANCHOR;
    }
    if local {
        flags |= FLAG_LOCAL;
    }
    let (anchor_id, anchor_distance) = nearest_anchor.unwrap_or((0, 0.0));
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&anchor_id.to_le_bytes());
    out.extend_from_slice(&anchor_distance.to_le_bytes());
    out.extend_from_slice(&len_u32(payload_total, "payloads")?.to_le_bytes());
    for (id, distance, lsn, payload) in hits.clone() {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&distance.to_le_bytes());
        let len = match payload {
            Some(p) => len_u32(p.len(), "payload")?,
            None => NO_PAYLOAD,
        };
        out.extend_from_slice(&len.to_le_bytes());
    }
    for (_, _, _, payload) in hits {
        if let Some(p) = payload {
            out.extend_from_slice(p.as_bytes());
        }
    }
    Ok(())
}

/// Decodes a search response, checking every length against the bytes present.
pub fn decode_response(bytes: &[u8]) -> Result<SearchResponse, WireError> {
    let what = "search response";
    if bytes.len() < RESPONSE_HEADER {
        return Err(WireError::Truncated {
            what,
            len: bytes.len(),
            needed: RESPONSE_HEADER,
        });
    }
    let count = u32_at(bytes, 0) as usize;
    let flags = u32_at(bytes, 4);
    let payload_total = u32_at(bytes, 20) as usize;
    let needed = count
        .checked_mul(HIT_LEN)
        .and_then(|n| n.checked_add(RESPONSE_HEADER))
        .and_then(|n| n.checked_add(payload_total))
        .ok_or(WireError::TooLarge { what })?;
    if bytes.len() < needed {
        return Err(WireError::Truncated {
            what,
            len: bytes.len(),
            needed,
        });
    }
    if bytes.len() > needed {
        return Err(WireError::Trailing {
            what,
            extra: bytes.len() - needed,
        });
    }
    let nearest_anchor = (flags & FLAG_ANCHOR != 0).then(|| (u64_at(bytes, 8), f32_at(bytes, 16)));
    let mut payloads = RESPONSE_HEADER + HIT_LEN * count;
    let mut hits = Vec::with_capacity(count);
    for hit in 0..count {
        let at = RESPONSE_HEADER + HIT_LEN * hit;
        let len = u32_at(bytes, at + 20);
        let payload = if len == NO_PAYLOAD {
            None
        } else {
            let end = payloads
                .checked_add(len as usize)
                .filter(|&end| end <= bytes.len())
                .ok_or(WireError::Truncated {
                    what: "payload",
                    len: bytes.len(),
                    needed: payloads.saturating_add(len as usize),
                })?;
            let text = std::str::from_utf8(&bytes[payloads..end])
                .map_err(|_| WireError::PayloadNotUtf8 { hit })?;
            payloads = end;
            Some(text.to_owned())
        };
        hits.push(WireHit {
            id: u64_at(bytes, at),
            lsn: u64_at(bytes, at + 8),
            distance: f32_at(bytes, at + 16),
            payload,
        });
    }
    if payloads != bytes.len() {
        return Err(WireError::Trailing {
            what: "payloads",
            extra: bytes.len() - payloads,
        });
    }
    Ok(SearchResponse {
        hits,
        nearest_anchor,
        certified: flags & FLAG_CERTIFIED != 0,
        local: flags & FLAG_LOCAL != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_round_trip_and_truncation_is_refused() {
        let mut out = Vec::new();
        let hits = [
            (1u64, 0.5f32, 7u64, Some("a")),
            (2, 0.75, 8, None),
            (3, 1.0, 9, Some("çé")),
        ];
        encode_response(
            hits.iter().copied(),
            Some((42, 0.25)),
            true,
            false,
            &mut out,
        )
        .expect("encodes");
        let decoded = decode_response(&out).expect("decodes");
        assert_eq!(decoded.nearest_anchor, Some((42, 0.25)));
        assert!(decoded.certified && !decoded.local);
        assert_eq!(decoded.hits[2].payload.as_deref(), Some("çé"));
        assert_eq!(decoded.hits[1].payload, None);
        for cut in 0..out.len() {
            assert!(decode_response(&out[..cut]).is_err(), "cut at {cut}");
        }
        out.push(0);
        assert!(decode_response(&out).is_err());
    }
}
