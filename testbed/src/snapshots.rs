//! Building edge snapshots from the dataset.

use tiervec_shared::CollectionId;
use tiervec_shared::Metric;
use tiervec_shared::hnsw::{FlatGraph, HnswParams};
use tiervec_shared::snapshot::{
    self, AlignedBytes, BodyParts, Payloads, SnapshotBody, SnapshotError, SnapshotSpec,
    SnapshotWriter,
};
use tiervec_shared::vecs::Matrix;

/// The collection identity the testbed gives the dataset's collection.
pub const DATASET_COLLECTION: CollectionId =
    CollectionId::from_u128(0x7469_6572_7665_6300_0000_0000_0000_0001);

/// Builds and encodes a cosine snapshot of base rows `0..count`, with their texts as payloads
/// (`{"text": …}`, as the cloud holds them) when given. Ids are the row numbers; LSNs are 1-based row numbers.
pub fn build(
    base: &Matrix<f32>,
    count: usize,
    params: HnswParams,
    texts: Option<&[String]>,
) -> Result<AlignedBytes, SnapshotError> {
    let rows: Vec<usize> = (0..count.min(base.rows())).collect();
    build_rows(base, &rows, params, texts, DATASET_COLLECTION, |row| {
        row as u64 + 1
    })
}

/// Builds and encodes a cosine snapshot of the given base rows, in that order, with their
/// texts (`texts[row]`) as payloads when given, for the collection incarnation `collection`
/// and with the LSN `lsn_of(row)` — an edge linked to a cloud needs the cloud's identity and
/// LSNs, or it resyncs them away. Ids are the row numbers.
pub fn build_rows(
    base: &Matrix<f32>,
    rows: &[usize],
    params: HnswParams,
    texts: Option<&[String]>,
    collection: CollectionId,
    lsn_of: impl Fn(usize) -> u64,
) -> Result<AlignedBytes, SnapshotError> {
    let spec = SnapshotSpec {
        collection,
        dim: base.dim as u32,
        metric: Metric::Cosine,
        params,
    };
    let payloads = if texts.is_some() {
        Payloads::Json
    } else {
        Payloads::Absent
    };
    let mut writer = SnapshotWriter::new(spec, "wordnet", payloads);
    for &row in rows {
        if row >= base.rows() {
            return Err(SnapshotError::Write(format!(
                "row {row} is past the {} base rows",
                base.rows()
            )));
        }
        let payload = match texts {
            Some(t) => Some(text_payload(t.get(row).ok_or_else(|| {
                SnapshotError::Write(format!("no text for row {row} ({} texts)", t.len()))
            })?)),
            None => None,
        };
        writer.push(row as u64, lsn_of(row), base.row(row), payload.as_deref())?;
    }
    writer.finish()
}

/// The payload a dataset text becomes, in the cloud and in snapshots alike.
pub fn text_payload(text: &str) -> String {
    serde_json::json!({ "text": text }).to_string()
}

/// Encodes a cosine snapshot of base rows `0..graph's node count` over a graph built elsewhere
/// (the hnsw_rs peer's, exported), without payloads.
pub fn encode_with_graph(
    base: &Matrix<f32>,
    graph: FlatGraph,
    params: HnswParams,
) -> Result<AlignedBytes, SnapshotError> {
    let count = graph
        .layers
        .first()
        .map_or(0, |l| l.offsets.len().saturating_sub(1));
    let mut vectors = base.data[..count * base.dim].to_vec();
    for row in vectors.chunks_exact_mut(base.dim) {
        Metric::Cosine.prepare(row);
    }
    let body = SnapshotBody::from_parts(BodyParts {
        collection_name: "wordnet",
        dim: base.dim,
        ids: (0..count as u64).collect(),
        lsns: (1..=count as u64).collect(),
        vectors,
        payloads: None,
        graph,
    })?;
    let spec = SnapshotSpec {
        collection: DATASET_COLLECTION,
        dim: base.dim as u32,
        metric: Metric::Cosine,
        params,
    };
    snapshot::encode(&spec, &body)
}
