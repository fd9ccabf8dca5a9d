//! Format compatibility: a small snapshot written by format version 1 is frozen in
//! `tests/fixtures/snapshot-v1.tvs`; every later build must still open it, read the same
//! contents (its plain-text payloads as `{"text": …}`), and re-encode those contents to the
//! same body bytes (so the archived layout has not drifted; version 2 changed only what a
//! payload means). The file is version 1's and is never rewritten.

use std::path::PathBuf;

use tiervec_shared::hnsw::{HnswParams, SearchScratch};
use tiervec_shared::snapshot::{self, AlignedBytes, Snapshot, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};

const COLLECTION: CollectionId = CollectionId::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001);
const COUNT: usize = 64;
const DIM: usize = 8;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v1.tvs")
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

fn read_fixture() -> AlignedBytes {
    let path = fixture_path();
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
    assert_eq!(
        view.payload(63).as_deref(),
        Some(r#"{"text":"item 63"}"#),
        "a version 1 file's plain-text payload reads as JSON"
    );
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
    // Version 2 keeps version 1's layout (only what a payload means changed): the same body,
    // and a header that differs in its version and the header checksum alone.
    let body = snapshot::BODY_OFFSET;
    assert!(
        again[body..] == fixture[body..],
        "archived layout of format v1 changed"
    );
    assert_eq!(u32::from_le_bytes(again[8..12].try_into().unwrap()), 2);
    assert!(
        again[12..120] == fixture[12..120],
        "header fields other than the version changed"
    );
}
