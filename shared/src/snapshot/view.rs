//! Opening validated bytes and searching them in place.

use std::borrow::Cow;
use std::ops::Deref;

use rkyv::rancor;
use rkyv::util::AlignedVec;

use super::body::{ArchivedSnapshotBody, cast};
use super::{BODY_OFFSET, SnapshotBody, SnapshotError, SnapshotHeader, validate};
use crate::hnsw::{self, ExactSpace, Graph, Neighbour, QuantizedSpace, SearchScratch};
use crate::kernels;
use crate::metric::Metric;

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

    /// Node `node`'s payload as a JSON text, if it has one: version 2 files store JSON (an
    /// empty payload is none). Version 1 files hold either plain text (the testbed's) or the
    /// JSON text of the cloud's payload (its restores, and edge compactions of them): a version
    /// 1 payload that parses as JSON is that JSON, any other text `t` reads as `{"text": t}`.
    pub fn payload(&self, node: u32) -> Option<Cow<'a, str>> {
        let stored = self.stored_payload(node).filter(|p| !p.is_empty())?;
        let is_json = || serde_json::from_str::<serde::de::IgnoredAny>(stored).is_ok();
        Some(if self.header.version >= 2 || is_json() {
            Cow::Borrowed(stored)
        } else {
            Cow::Owned(serde_json::json!({ "text": stored }).to_string())
        })
    }

    /// Node `node`'s payload bytes as the file stores them (for the byte accounting of the
    /// cache budget).
    pub fn stored_payload(&self, node: u32) -> Option<&'a str> {
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
