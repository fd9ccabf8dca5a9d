//! The archived body: vectors, ids, LSNs, payload text, the graph, anchors and `i8` codes.

use rkyv::{Archive, Deserialize, Serialize};

use super::SnapshotError;
use crate::hnsw::{FlatGraph, HnswBuilder};
use crate::{kernels, quant};

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

/// One layer; see [`crate::hnsw::FlatLayer`] for the meaning of the arrays.
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

/// Reinterprets an archived little-endian array as native values. The `bytemuck` cast checks
/// size and alignment; both always hold for rkyv's `aligned` layout, so it cannot fail.
#[inline]
pub(super) fn cast<A: bytemuck::Pod, N: bytemuck::Pod>(v: &rkyv::vec::ArchivedVec<A>) -> &[N] {
    bytemuck::cast_slice(v.as_slice())
}
