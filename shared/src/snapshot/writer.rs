//! Writing snapshots: the one way tiervec turns vectors into a snapshot file's bytes.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    AnchorSection, BODY_OFFSET, FORMAT_VERSION, SnapshotBody, SnapshotError, SnapshotHeader,
    SnapshotSpec, validate,
};
use crate::hnsw::HnswBuilder;

/// Serialises a snapshot (header and body) into bytes, after checking that the result passes
/// the same validation [`Snapshot::open`] applies — tiervec never writes a file it would refuse.
pub fn encode(spec: &SnapshotSpec, body: &SnapshotBody) -> Result<AlignedVec, SnapshotError> {
    let out = assemble(spec, body)?;
    validate(&out)?;
    Ok(out)
}

/// Header plus archived body, unvalidated.
pub(super) fn assemble(
    spec: &SnapshotSpec,
    body: &SnapshotBody,
) -> Result<AlignedVec, SnapshotError> {
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

/// Builds a snapshot row by row: each pushed vector goes into the HNSW graph as it arrives,
/// with its id, LSN and payload; anchors and the manifest version are added beside them;
/// [`finish`](Self::finish) assembles the body and encodes it (validated, as every write).
///
/// The edge's compaction, the cloud's restore and the testbed's dataset snapshots all write
/// through this, so the body's parts cannot disagree in length or order.
pub struct SnapshotWriter {
    spec: SnapshotSpec,
    collection_name: String,
    builder: HnswBuilder,
    ids: Vec<u64>,
    lsns: Vec<u64>,
    /// `None`: the file carries no payload section.
    payloads: Option<Vec<String>>,
    anchors: AnchorSection,
    manifest_version: u64,
}

/// Whether a snapshot carries a payload per vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payloads {
    /// No payload section (the header's payload flag is clear).
    Absent,
    /// One JSON text per vector; a vector pushed without one gets the empty text (none).
    Json,
}

impl SnapshotWriter {
    /// A writer for a snapshot of `spec` (its dimension, metric and HNSW parameters shape the
    /// graph), named `collection_name`.
    pub fn new(spec: SnapshotSpec, collection_name: &str, payloads: Payloads) -> SnapshotWriter {
        SnapshotWriter {
            builder: HnswBuilder::new(spec.dim as usize, spec.metric, spec.params),
            spec,
            collection_name: collection_name.to_owned(),
            ids: Vec::new(),
            lsns: Vec::new(),
            payloads: (payloads == Payloads::Json).then(Vec::new),
            anchors: AnchorSection::default(),
            manifest_version: 0,
        }
    }

    /// Adds vector `id` at `lsn` (prepared for the metric on insertion) with its payload, a
    /// JSON text (the writer does not parse it: the cloud and the edge hand it payloads they
    /// hold as JSON already). Fails on a vector the graph refuses (wrong dimension, a
    /// non-finite component), or a payload given to a writer made with [`Payloads::Absent`].
    pub fn push(
        &mut self,
        id: u64,
        lsn: u64,
        vector: &[f32],
        payload: Option<&str>,
    ) -> Result<(), SnapshotError> {
        if self.payloads.is_none() && payload.is_some() {
            return Err(SnapshotError::Write(format!(
                "vector {id} has a payload, but this snapshot is written without payloads"
            )));
        }
        self.builder
            .insert(vector)
            .map_err(|e| SnapshotError::Write(format!("vector {id}: {e}")))?;
        self.ids.push(id);
        self.lsns.push(lsn);
        if let Some(payloads) = &mut self.payloads {
            payloads.push(payload.unwrap_or_default().to_owned());
        }
        Ok(())
    }

    /// Adds an anchor with the ids of its answer (its radius is written 0: certificates live
    /// for one connection, never in a file).
    pub fn push_anchor(&mut self, vector: &[f32], members: &[u64]) {
        self.anchors.push(vector, members);
    }

    /// Records the version of the edge manifest the snapshot reflects.
    pub fn set_manifest_version(&mut self, version: u64) {
        self.manifest_version = version;
    }

    /// Vectors pushed so far.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no vector was pushed.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Assembles and encodes the snapshot. The header records the parameters the graph was
    /// built with (the builder clamps `m` and `ef_construction` into range).
    pub fn finish(mut self) -> Result<AlignedVec, SnapshotError> {
        self.spec.params = self.builder.params();
        let mut body = SnapshotBody::from_builder(
            &self.builder,
            &self.collection_name,
            self.ids,
            self.lsns,
            self.payloads.as_deref(),
        )?;
        body.manifest_version = self.manifest_version;
        body.anchors = self.anchors;
        encode(&self.spec, &body)
    }
}
