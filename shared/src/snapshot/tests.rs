use rkyv::util::AlignedVec;
use xxhash_rust::xxh3::xxh3_64;

use super::writer::assemble;
use super::*;
use crate::hnsw::{HnswBuilder, HnswParams};

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
    assert_eq!(snap.view().payload(3).as_deref(), Some("é3"));
}

fn small_row(i: u64) -> [f32; 4] {
    let x = i as f32;
    [x.sin(), x.cos(), 1.0, (x * 0.3).sin()]
}

#[test]
fn the_writer_writes_what_the_parts_assemble() {
    let texts: Vec<String> = (0..40).map(|i| format!("é{i}")).collect();
    let mut writer = SnapshotWriter::new(spec(4), "t", Payloads::Json);
    for i in 0..40u64 {
        writer
            .push(i, 1, &small_row(i), Some(&texts[i as usize]))
            .unwrap();
    }
    assert_eq!(writer.len(), 40);
    let written = writer.finish().unwrap();
    let by_parts = encode(&spec(4), &small_body()).unwrap();
    assert_eq!(
        &written[..],
        &by_parts[..],
        "the same bytes as the body's own assembly"
    );
}

#[test]
fn the_writer_keeps_ids_lsns_payloads_anchors_and_the_manifest_version() {
    let mut writer = SnapshotWriter::new(spec(4), "t", Payloads::Json);
    writer
        .push(70, 5, &small_row(1), Some(r#"{"text":"seventy"}"#))
        .unwrap();
    writer.push(71, 6, &small_row(2), None).unwrap();
    writer.push_anchor(&small_row(3), &[70, 71]);
    writer.set_manifest_version(9);
    let snapshot = Snapshot::open(writer.finish().unwrap()).unwrap();
    let view = snapshot.view();
    assert_eq!(view.ids(), &[70, 71]);
    assert_eq!((view.lsn(0), view.lsn(1)), (Some(5), Some(6)));
    assert_eq!(
        (view.payload(0).as_deref(), view.payload(1)),
        (Some(r#"{"text":"seventy"}"#), None),
        "a JSON payload as written, none as none"
    );
    let body = view.to_body().unwrap();
    assert_eq!(body.manifest_version, 9);
    assert_eq!(body.anchors.answer_ids, vec![70, 71]);
    assert_eq!(
        body.anchors.radii,
        vec![0.0],
        "no certificate is ever written to a file"
    );
}

#[test]
fn a_writer_without_payloads_refuses_one_and_a_bad_vector_names_its_id() {
    let mut writer = SnapshotWriter::new(spec(4), "t", Payloads::Absent);
    writer.push(1, 1, &small_row(1), None).unwrap();
    assert!(matches!(
        writer.push(2, 1, &small_row(2), Some("text")),
        Err(SnapshotError::Write(m)) if m.contains("vector 2")
    ));
    let err = writer
        .push(3, 1, &[1.0, f32::NAN, 0.0, 0.0], None)
        .unwrap_err();
    assert!(
        matches!(&err, SnapshotError::Write(m) if m.contains("vector 3")),
        "{err}"
    );
    assert_eq!(writer.len(), 1, "refused rows are not kept");
    let snapshot = Snapshot::open(writer.finish().unwrap()).unwrap();
    assert!(!snapshot.header().has_payloads);
}

#[test]
fn a_version_1_payload_reads_as_json_whether_it_held_text_or_json() {
    let mut writer = SnapshotWriter::new(spec(4), "t", Payloads::Json);
    writer
        .push(1, 1, &small_row(1), Some("plain words"))
        .unwrap();
    writer
        .push(2, 1, &small_row(2), Some(r#"{"text":"restored"}"#))
        .unwrap();
    let mut bytes = writer.finish().unwrap();
    // As version 1 wrote it: the same layout, another version field and header checksum.
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let sum = xxh3_64(&bytes[..120]);
    bytes[120..128].copy_from_slice(&sum.to_le_bytes());
    let snapshot = Snapshot::open(bytes).unwrap();
    assert_eq!(snapshot.header().version, 1);
    let view = snapshot.view();
    let payload = |node| view.payload(node).map(std::borrow::Cow::into_owned);
    assert_eq!(
        payload(0).as_deref(),
        Some(r#"{"text":"plain words"}"#),
        "a testbed's plain text"
    );
    assert_eq!(
        payload(1).as_deref(),
        Some(r#"{"text":"restored"}"#),
        "a cloud restore's JSON, not wrapped again"
    );
}
