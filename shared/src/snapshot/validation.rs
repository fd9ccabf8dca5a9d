//! Validation: every check a snapshot passes once, before search trusts its bytes.

use rkyv::rancor;
use xxhash_rust::xxh3::xxh3_64;

use super::body::{
    ArchivedAnchorSection, ArchivedGraphSection, ArchivedQuantSection, ArchivedSnapshotBody, cast,
};
use super::{BODY_ALIGN, BODY_OFFSET, SnapshotError, SnapshotHeader};
use crate::hnsw::MAX_LAYERS;

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
