//! Format compatibility: a small snapshot written by format version 1 is frozen in
//! `tests/fixtures/snapshot-v1.tvs`; every later build must still open it, read the same
//! contents, and re-encode those contents to the very same bytes (so the archived layout has
//! not drifted). Regenerate only for a new format version, with `TIERVEC_WRITE_FIXTURE=1`.

use std::path::PathBuf;

use tiervec_shared::hnsw::{HnswBuilder, HnswParams, SearchScratch};
use tiervec_shared::snapshot::{self, AlignedBytes, Snapshot, SnapshotBody, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};

const COLLECTION: CollectionId = CollectionId::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001);
const COUNT: usize = 64;
const DIM: usize = 8;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v1.tvs")
}

fn fixture_vector(i: usize) -> Vec<f32> {
    (0..DIM)
        .map(|d| ((i * 7 + d * 3) as f32 * 0.37).sin() + 0.1 * d as f32)
        .collect()
}

fn spec() -> SnapshotSpec {
    SnapshotSpec {
        collection: COLLECTION,
        dim: DIM as u32,
        metric: Metric::Cosine,
        params: HnswParams {
            m: 4,
            ef_construction: 32,
            seed: 42,
        },
    }
}

fn build_fixture() -> AlignedBytes {
    let spec = spec();
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, spec.params);
    for i in 0..COUNT {
        builder.insert(&fixture_vector(i)).unwrap();
    }
    let texts: Vec<String> = (0..COUNT).map(|i| format!("item {i}")).collect();
    let body = SnapshotBody::from_builder(
        &builder,
        "fixture",
        (0..COUNT as u64).map(|i| 1000 + i).collect(),
        (1..=COUNT as u64).collect(),
        Some(&texts),
    )
    .unwrap();
    snapshot::encode(&spec, &body).unwrap()
}

fn read_fixture() -> AlignedBytes {
    let path = fixture_path();
    if std::env::var_os("TIERVEC_WRITE_FIXTURE").is_some() {
        std::fs::write(&path, build_fixture().as_slice()).unwrap();
    }
    let raw =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut bytes = AlignedBytes::with_capacity(raw.len());
    bytes.extend_from_slice(&raw);
    bytes
}

#[test]
fn v1_fixture_reopens_with_its_contents() {
    let snap = Snapshot::open(read_fixture()).expect("the v1 fixture must validate");
    let h = snap.header();
    assert_eq!(h.version, 1);
    assert_eq!(h.spec, spec());
    assert_eq!(h.count, COUNT as u64);
    assert!(h.has_payloads);
    let view = snap.view();
    assert_eq!(view.collection_name(), "fixture");
    assert_eq!(view.ids()[5], 1005);
    assert_eq!(view.lsn(5), Some(6));
    assert_eq!(view.payload(63), Some("item 63"));
    assert_eq!(view.manifest_version(), 0);
    assert_eq!(view.anchor_count(), 0);
    let mut scratch = SearchScratch::new();
    for i in 0..COUNT as u32 {
        let q = view.vector(i).unwrap().to_vec();
        let top = view.search(&q, 1, 16, &mut scratch);
        assert_eq!(top[0].id, i, "a stored vector finds itself");
    }
}

#[test]
fn v1_fixture_contents_re_encode_to_the_same_bytes() {
    let fixture = read_fixture();
    let snap = Snapshot::open(fixture.as_slice()).unwrap();
    let again = snapshot::encode(&snap.header().spec, &snap.view().to_body().unwrap()).unwrap();
    assert!(
        again.as_slice() == fixture.as_slice(),
        "archived layout of format v1 changed"
    );
}
