//! The guest's ABI exercised from inside (natively, and under wasmtime with
//! `cargo test --target wasm32-wasip1 -p tiervec-wasm` and the workspace's runner): snapshots
//! in and refused, deltas applied, searches equal to `LocalCache` searched directly.

use tiervec_shared::certificate::euclidean;
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::push::{Delta, PushedAnchor, PushedVector, Tombstone, anchor_id};
use tiervec_shared::snapshot::{self, Snapshot, SnapshotBody, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};
use tiervec_test_support::vectors::vector;

use super::*;

const DIM: usize = 24;
const COLLECTION: CollectionId = CollectionId::from_u128(7);

fn snapshot_bytes(n: usize) -> Vec<u8> {
    let params = HnswParams::default();
    let mut b = HnswBuilder::new(DIM, Metric::Cosine, params);
    for i in 0..n {
        b.insert(&vector(i as u64, DIM)).expect("finite vector");
    }
    let texts: Vec<String> = (0..n).map(|i| format!("text {i}")).collect();
    let body = SnapshotBody::from_builder(
        &b,
        "guest",
        (0..n as u64).map(|i| i * 3).collect(),
        (1..=n as u64).collect(),
        Some(&texts),
    )
    .expect("consistent parts");
    let spec = SnapshotSpec {
        collection: COLLECTION,
        dim: DIM as u32,
        metric: Metric::Cosine,
        params,
    };
    snapshot::encode(&spec, &body).expect("encodes").to_vec()
}

/// A fresh guest: under wasm32-wasip1 every test runs on the one thread, which would otherwise
/// share the guest state between tests.
fn fresh() {
    GUEST.with(|g| *g.borrow_mut() = Guest::default());
}

/// Copies `bytes` into a fresh 16-aligned guest buffer and loads it.
fn load(bytes: &[u8]) -> i32 {
    let ptr = tv_alloc(bytes.len(), 16);
    assert!(!ptr.is_null());
    // SAFETY: `ptr` has room for `bytes.len()` bytes; ownership passes to the guest.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len());
        tv_load_snapshot(ptr, bytes.len())
    }
}

fn result() -> Vec<u8> {
    // SAFETY: the result buffer is valid until the next export call.
    unsafe { std::slice::from_raw_parts(tv_result_ptr(), tv_result_len()).to_vec() }
}

fn message() -> String {
    String::from_utf8(result()).expect("UTF-8 message")
}

fn search(query: &[f32], k: u32, ef: u32) -> Result<guest_abi::SearchResponse, (i32, String)> {
    let mut request = Vec::new();
    guest_abi::encode_request(k, ef, query, &mut request).expect("encodes");
    // SAFETY: `request` is a live buffer of that length.
    let code = unsafe { tv_search(request.as_ptr(), request.len()) };
    if code != status::OK {
        return Err((code, message()));
    }
    Ok(guest_abi::decode_response(&result()).expect("well-formed response"))
}

fn apply(delta: &Delta) -> i32 {
    apply_with(delta, true)
}

fn apply_with(delta: &Delta, accept_certificates: bool) -> i32 {
    let bytes = delta.to_bytes();
    // SAFETY: `bytes` is a live buffer of that length.
    unsafe { tv_apply_delta(bytes.as_ptr(), bytes.len(), u32::from(accept_certificates)) }
}

fn set_certificates(bytes: &[u8]) -> i32 {
    // SAFETY: `bytes` is a live buffer of that length (a dangling, aligned one when empty,
    // which the guest reads nothing from).
    unsafe { tv_set_certificates(bytes.as_ptr(), bytes.len()) }
}

/// A delta pushing 200 vectors and an anchor whose certificate is its exact ball of 20.
fn certified_delta(anchor: &[f32]) -> Delta {
    let corpus: Vec<(u64, Vec<f32>)> = (0..200u64)
        .map(|id| {
            let mut v = vector(id + 5_000, DIM);
            Metric::Cosine.prepare(&mut v);
            (id, v)
        })
        .collect();
    let mut by_distance: Vec<(f32, u64)> = corpus
        .iter()
        .map(|(id, v)| (euclidean(anchor, v), *id))
        .collect();
    by_distance.sort_by(|a, b| a.0.total_cmp(&b.0));
    let radius = (by_distance[19].0 + by_distance[20].0) / 2.0;
    Delta {
        collection_id: COLLECTION.0,
        dim: DIM as u32,
        metric: Metric::Cosine.code(),
        version: 1,
        vectors: corpus
            .iter()
            .map(|(id, v)| PushedVector {
                id: *id,
                lsn: 1,
                vector: v.clone(),
                payload: None,
            })
            .collect(),
        anchors: vec![PushedAnchor {
            anchor_id: anchor_id(anchor),
            vector: anchor.to_vec(),
            members: by_distance[..20].iter().map(|(_, id)| *id).collect(),
            radius,
            hot_at_unix_us: 0,
        }],
        ..Delta::default()
    }
}

#[test]
fn answers_equal_local_cache_search() {
    fresh();
    let bytes = snapshot_bytes(300);
    assert_eq!(load(&bytes), status::OK, "{}", message());
    let native = Snapshot::open(bytes).expect("valid");
    let view = native.view();
    let cache = LocalCache::over_snapshot(&view);
    let mut scratch = LocalScratch::new();
    for q in 0..20 {
        let query = vector(1000 + q, DIM);
        let expected = cache
            .search(Some(&view), &query, 10, 48, &mut scratch)
            .expect("valid query");
        let got = search(&query, 10, 48).expect("guest answers");
        assert_eq!(got.hits.len(), expected.hits.len());
        for (g, e) in got.hits.iter().zip(&expected.hits) {
            assert_eq!((g.id, g.lsn, &g.payload), (e.id, e.lsn, &e.payload));
            assert!((g.distance - e.distance).abs() <= 1e-5);
        }
        assert_eq!(got.certified, expected.certified);
    }
}

#[test]
fn corrupt_snapshot_is_refused_with_its_code_and_the_old_cache_stays() {
    fresh();
    let bytes = snapshot_bytes(50);
    assert_eq!(load(&bytes), status::OK);
    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert_eq!(load(&corrupt), status::SNAPSHOT_REFUSED);
    assert!(message().contains("checksum"), "{}", message());
    assert_eq!(load(&bytes[..100]), status::SNAPSHOT_REFUSED);
    assert_eq!(
        search(&vector(1, DIM), 5, 16)
            .expect("still answers")
            .hits
            .len(),
        5
    );
}

#[test]
fn misaligned_and_null_buffers_are_bad_arguments() {
    fresh();
    let bytes = snapshot_bytes(10);
    let ptr = tv_alloc(bytes.len() + 16, 16);
    // SAFETY: one byte in, there is room for `bytes.len()` bytes; the guest refuses the
    // misaligned buffer without taking it, so it is freed here.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.add(1), bytes.len());
        assert_eq!(
            tv_load_snapshot(ptr.add(1), bytes.len()),
            status::BAD_ARGUMENT
        );
        tv_dealloc(ptr, bytes.len() + 16, 16);
        assert_eq!(tv_search(std::ptr::null(), 12), status::BAD_ARGUMENT);
    }
    assert!(message().contains("null"), "{}", message());
}

#[test]
fn malformed_and_invalid_requests_have_their_codes() {
    fresh();
    assert_eq!(load(&snapshot_bytes(40)), status::OK);
    let mut request = Vec::new();
    guest_abi::encode_request(5, 16, &vector(3, DIM), &mut request).expect("encodes");
    // SAFETY: a live buffer, one byte shorter than its header promises.
    let code = unsafe { tv_search(request.as_ptr(), request.len() - 1) };
    assert_eq!(code, status::MALFORMED_REQUEST);
    assert_eq!(
        search(&vector(3, DIM)[..DIM - 1], 5, 16).map(|_| ()),
        Err((
            status::INVALID_QUERY,
            "query has 23 dimensions but the index has 24".into()
        ))
    );
    let mut nan = vector(3, DIM);
    nan[2] = f32::NAN;
    assert_eq!(search(&nan, 5, 16).unwrap_err().0, status::INVALID_QUERY);
    assert_eq!(
        search(&vector(3, DIM), 0, 16).unwrap_err().0,
        status::INVALID_QUERY
    );
}

#[test]
fn deltas_show_up_in_answers_and_bad_ones_are_refused() {
    fresh();
    assert_eq!(load(&snapshot_bytes(60)), status::OK);
    let mut pushed: Vec<f32> = (0..DIM).map(|d| ((d * d) as f32 * 0.3).cos()).collect();
    Metric::Cosine.prepare(&mut pushed);
    let delta = Delta {
        collection_id: COLLECTION.0,
        dim: DIM as u32,
        metric: Metric::Cosine.code(),
        version: 1,
        vectors: vec![PushedVector {
            id: 999_999,
            lsn: 500,
            vector: pushed.clone(),
            payload: Some("pushed".into()),
        }],
        tombstones: vec![Tombstone { id: 0, lsn: 501 }],
        ..Delta::default()
    };
    assert_eq!(apply(&delta), status::OK, "{}", message());
    let answer = search(&pushed, 3, 32).expect("answers");
    assert_eq!(answer.hits[0].id, 999_999);
    assert_eq!(answer.hits[0].payload.as_deref(), Some("pushed"));
    let near_zero = search(&vector(0, DIM), 10, 64).expect("answers");
    assert!(
        near_zero.hits.iter().all(|h| h.id != 0),
        "tombstoned id 0 returned"
    );
    // The same version again does not follow the manifest.
    assert_eq!(apply(&delta), status::DELTA_REFUSED);
    assert!(message().contains("resync"), "{}", message());
    let bytes = delta.to_bytes();
    // SAFETY: a live buffer, cut short.
    let code = unsafe { tv_apply_delta(bytes.as_ptr(), bytes.len() / 2, 1) };
    assert_eq!(code, status::DELTA_MALFORMED);
}

#[test]
fn confidence_rule_decides_locally_only_within_its_threshold() {
    fresh();
    assert_eq!(load(&snapshot_bytes(80)), status::OK);
    let query = vector(12, DIM);
    assert_eq!(tv_configure(1, 10.0, 0, 0.0), status::OK);
    assert!(search(&query, 5, 32).expect("answers").local);
    assert_eq!(tv_configure(1, -1.0, 0, 0.0), status::OK);
    assert!(!search(&query, 5, 32).expect("answers").local);
    assert_eq!(tv_configure(0, 0.0, 0, 0.0), status::OK);
    assert!(!search(&query, 5, 32).expect("answers").local);
}

#[test]
fn empty_guest_answers_nothing_and_alloc_refuses_bad_alignment() {
    fresh();
    assert!(
        search(&vector(1, DIM), 3, 16)
            .expect("answers")
            .hits
            .is_empty()
    );
    assert!(tv_alloc(16, 3).is_null());
    assert_eq!(tv_abi_version(), guest_abi::ABI_VERSION);
}

#[test]
fn kernels_return_the_portable_or_the_fused_bits() {
    // Under simd128 the dispatched kernels are the explicit wasm ones. Their `f32` kernels use
    // `relaxed_madd`, which the host fuses if it has FMA: they must then return exactly the
    // bits of the fused canonical order (those of the native edge's AVX2 path), and otherwise
    // exactly the portable kernels' bits — one or the other for every length, never a mix.
    use tiervec_shared::kernels::{self, reference};
    let mut fused = Vec::new();
    for n in [0usize, 1, 15, 16, 31, 32, 33, 63, 64, 65, 100, 384, 385] {
        let a: Vec<f32> = (0..n).map(|i| ((i * 7 + 3) as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 5 + 1) as f32 * 0.91).cos()).collect();
        for (got, portable, fused_bits) in [
            (
                kernels::dot(&a, &b),
                kernels::dot_portable(&a, &b),
                reference::dot_fused(&a, &b),
            ),
            (
                kernels::l2_squared(&a, &b),
                kernels::l2_squared_portable(&a, &b),
                reference::l2_squared_fused(&a, &b),
            ),
        ] {
            assert!(
                got.to_bits() == portable.to_bits() || got.to_bits() == fused_bits.to_bits(),
                "n = {n}: {got} is neither the portable {portable} nor the fused {fused_bits}"
            );
            if portable.to_bits() != fused_bits.to_bits() {
                fused.push(got.to_bits() == fused_bits.to_bits());
            }
        }
        let ca: Vec<i8> = (0..n)
            .map(|i| ((i * 37) % 255) as i32 as i8)
            .map(|c| c.max(-127))
            .collect();
        let cb: Vec<i8> = (0..n)
            .map(|i| ((i * 91 + 5) % 255) as i32 as i8)
            .map(|c| c.max(-127))
            .collect();
        assert_eq!(
            kernels::dot_i8(&ca, &cb),
            kernels::dot_i8_portable(&ca, &cb)
        );
        // The extremes, where a saturating pair sum (relaxed dot, `pmaddubsw`) would show.
        for (x, y) in [(127i8, 127i8), (-127, -127), (127, -127), (-127, 127)] {
            let (ca, cb) = (vec![x; n], vec![y; n]);
            let want = n as i32 * i32::from(x) * i32::from(y);
            assert_eq!(kernels::dot_i8(&ca, &cb), want);
            assert_eq!(kernels::dot_i8_portable(&ca, &cb), want);
        }
    }
    assert!(
        fused.windows(2).all(|w| w[0] == w[1]),
        "fused on some lengths only: {fused:?}"
    );
}

#[test]
fn certificates_certify_like_the_local_cache_and_follow_set_certificates() {
    fresh();
    let mut anchor = vector(9_999, DIM);
    Metric::Cosine.prepare(&mut anchor);
    let delta = certified_delta(&anchor);
    let mut native = LocalCache::empty();
    native.apply(&delta, true).expect("applies");
    assert_eq!(apply(&delta), status::OK, "{}", message());
    let expected = native
        .search(None, &anchor, 5, 32, &mut LocalScratch::new())
        .expect("valid query");
    assert!(expected.certified);
    let got = search(&anchor, 5, 32).expect("answers");
    assert!(got.certified);
    let ids = |hits: &[guest_abi::WireHit]| hits.iter().map(|h| h.id).collect::<Vec<_>>();
    assert_eq!(ids(&got.hits), ids(&expected.hits));
    // Certification is not the rule's decision: with no rule the guest says "ask the cloud".
    assert!(!got.local);

    assert_eq!(set_certificates(&[]), status::OK, "{}", message());
    assert!(!search(&anchor, 5, 32).expect("answers").certified);
    let mut list = Vec::new();
    guest_abi::encode_certificates(&native.certificates(), &mut list);
    assert_eq!(set_certificates(&list), status::OK, "{}", message());
    assert!(search(&anchor, 5, 32).expect("answers").certified);

    // Refused lists change nothing.
    assert_eq!(set_certificates(&list[..11]), status::MALFORMED_REQUEST);
    for bad in [f32::NAN, -1.0, 0.0, f32::INFINITY] {
        let mut entry = Vec::new();
        guest_abi::encode_certificates(&[(anchor_id(&anchor), bad)], &mut entry);
        assert_eq!(set_certificates(&entry), status::MALFORMED_REQUEST);
        assert!(message().contains("radius"), "{}", message());
    }
    assert!(search(&anchor, 5, 32).expect("answers").certified);
}

#[test]
fn a_delta_applied_without_its_certificates_never_certifies() {
    fresh();
    let mut anchor = vector(9_999, DIM);
    Metric::Cosine.prepare(&mut anchor);
    assert_eq!(apply_with(&certified_delta(&anchor), false), status::OK);
    let answer = search(&anchor, 5, 32).expect("answers");
    assert!(!answer.certified);
    assert_eq!(
        answer.nearest_anchor.map(|(id, _)| id),
        Some(anchor_id(&anchor))
    );
}
