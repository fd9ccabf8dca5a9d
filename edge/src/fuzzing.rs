//! The guest ABI's host side under arbitrary calls, for the fuzz target of `edge/fuzz`
//! (cargo-fuzz, on nightly) and for the stable test that replays its corpus. [`guest_abi`]
//! drives a real [`WasmHost`] (the `tiervec-wasm` guest in wasmtime, two instances following
//! one journal) and, beside it, the native edge kernel (`Snapshot` + `LocalCache`) through the
//! same calls, and panics where they part: a snapshot one takes and the other refuses, a delta
//! one applies and the other refuses, an answer that differs, or any failure of the guest
//! other than a typed refusal (a trap, a deadline, a malformed response).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tiervec_shared::confidence::{ConfidenceRule, Decision};
use tiervec_shared::guest_abi::status;
use tiervec_shared::hnsw::{HnswBuilder, HnswParams};
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::push::{Certificate, Delta, PushedAnchor, PushedVector, Tombstone};
use tiervec_shared::snapshot::{self, AlignedBytes, Snapshot, SnapshotBody, SnapshotSpec};
use tiervec_shared::{CollectionId, Metric};

use crate::wasm_host::{WasmConfig, WasmError, WasmHost};

/// Rows of the snapshot every input starts from.
const ROWS: usize = 48;
/// Their dimension.
const DIM: usize = 8;
const COLLECTION: CollectionId = CollectionId::from_u128(0xf022);

static GUEST_MODULE: OnceLock<PathBuf> = OnceLock::new();

/// Names the guest module [`guest_abi`] runs (`tiervec_wasm.wasm` built with its
/// `test-exports` feature or without); the first call wins.
pub fn use_guest_module(path: PathBuf) {
    let _ = GUEST_MODULE.set(path);
}

/// The rows of the starting snapshot: fixed, spread over the sphere, two of them equal (ties).
fn row(i: usize) -> Vec<f32> {
    let i = if i == 7 { 6 } else { i };
    let mut v: Vec<f32> = (0..DIM)
        .map(|d| ((i * 31 + d * 17) % 23) as f32 - 11.0 + 0.25 * d as f32)
        .collect();
    Metric::Cosine.prepare(&mut v);
    v
}

/// The starting snapshot's file: rows `0..ROWS` with ids `0..ROWS`, payloads on even rows.
fn snapshot_file() -> Vec<u8> {
    let params = HnswParams::default();
    let mut builder = HnswBuilder::new(DIM, Metric::Cosine, params);
    for i in 0..ROWS {
        builder.insert(&row(i)).expect("finite");
    }
    let texts: Vec<String> = (0..ROWS)
        .map(|i| {
            if i.is_multiple_of(2) {
                format!("row {i}")
            } else {
                String::new()
            }
        })
        .collect();
    let body = SnapshotBody::from_builder(
        &builder,
        "fuzz",
        (0..ROWS as u64).collect(),
        (1..=ROWS as u64).collect(),
        Some(&texts),
    )
    .expect("parts");
    let spec = SnapshotSpec {
        collection: COLLECTION,
        dim: DIM as u32,
        metric: Metric::Cosine,
        params,
    };
    snapshot::encode(&spec, &body).expect("encodes").to_vec()
}

/// The native kernel the guest is compared with.
struct Native {
    snapshot: Option<Snapshot<AlignedBytes>>,
    cache: LocalCache,
    rule: ConfidenceRule,
    scratch: LocalScratch,
}

impl Native {
    fn over(bytes: &[u8]) -> Result<Snapshot<AlignedBytes>, String> {
        let mut aligned = AlignedBytes::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        Snapshot::open(aligned).map_err(|e| e.to_string())
    }

    fn load(&mut self, snapshot: Snapshot<AlignedBytes>) {
        self.cache = LocalCache::over_snapshot(&snapshot.view());
        self.snapshot = Some(snapshot);
    }
}

struct Harness {
    host: WasmHost,
    clean: Vec<u8>,
    native: Native,
    /// Next LSN a pushed vector or tombstone gets.
    lsn: u64,
}

impl Harness {
    fn start() -> Harness {
        let module = GUEST_MODULE
            .get()
            .expect("use_guest_module names the guest first")
            .clone();
        let cache_dir =
            std::env::temp_dir().join(format!("tiervec-fuzz-guest-{}", std::process::id()));
        let mut config = WasmConfig::new(module, cache_dir);
        config.max_instances = 2;
        // Generous: a deadline met under a sanitizer is not what this target looks for.
        config.deadline = Duration::from_secs(10);
        config.memory_limit = 64 << 20;
        config.huge_pages = false;
        let host = WasmHost::start(config).expect("the guest starts");
        let clean = snapshot_file();
        let snapshot = Native::over(&clean).expect("the starting snapshot opens");
        let mut native = Native {
            snapshot: None,
            cache: LocalCache::empty(),
            rule: ConfidenceRule::default(),
            scratch: LocalScratch::default(),
        };
        native.load(snapshot);
        Harness {
            host,
            clean,
            native,
            lsn: 1_000,
        }
    }

    /// Both sides back to the starting snapshot with the default rule.
    fn reset(&mut self) {
        self.host
            .load_snapshot(&self.clean)
            .expect("the starting snapshot loads");
        self.native.load(Native::over(&self.clean).expect("opens"));
        self.native.rule = ConfidenceRule::default();
        self.host.configure(self.native.rule);
    }
}

/// Bytes read one at a time, zero past the end.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn f32(&mut self) -> f32 {
        f32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// A vector near row `byte % ROWS` (or, one time in eight, raw bits: NaN, infinities,
    /// huge numbers), `DIM` long unless the byte after says otherwise.
    fn vector(&mut self) -> Vec<f32> {
        let (base, shape) = (self.u8(), self.u8());
        let len = if shape & 0x80 != 0 {
            usize::from(shape & 0x0f)
        } else {
            DIM
        };
        if shape & 0x70 == 0x70 {
            return (0..len).map(|_| self.f32()).collect();
        }
        let mut v = row(usize::from(base) % ROWS);
        v.resize(len, 0.1);
        let nudge = usize::from(self.u8()) % DIM.max(1);
        if let Some(x) = v.get_mut(nudge) {
            *x += f32::from(self.u8()) / 256.0 - 0.5;
        }
        v
    }

    fn radius(&mut self) -> f32 {
        f32::from(self.u8()) / 64.0
    }
}

/// A delta built from `bytes` for a cache at `version`: mostly the next version (sometimes the
/// same, or one ahead: refused), vectors and tombstones over ids near the snapshot's, anchors
/// with certificates, evictions.
fn delta(bytes: &mut Bytes<'_>, version: u64, lsn: &mut u64) -> Delta {
    let flags = bytes.u8();
    let mut next_lsn = || {
        *lsn += 1;
        *lsn
    };
    let mut delta = Delta {
        collection_id: if flags & 0x80 != 0 {
            [9; 16]
        } else {
            COLLECTION.0
        },
        dim: if flags & 0x40 != 0 {
            DIM as u32 + 1
        } else {
            DIM as u32
        },
        metric: Metric::Cosine.code(),
        version: version + [1, 1, 1, 0, 2, 1, 1, 1][usize::from(flags & 7)],
        ..Delta::default()
    };
    for _ in 0..bytes.u8() % 6 {
        let id = u64::from(bytes.u8() % 64);
        let vector = bytes.vector();
        let payload = bytes.u8().is_multiple_of(3).then(|| format!("pushed {id}"));
        delta.vectors.push(PushedVector {
            id,
            lsn: next_lsn(),
            vector,
            payload,
        });
    }
    for _ in 0..bytes.u8() % 4 {
        delta.tombstones.push(Tombstone {
            id: u64::from(bytes.u8() % 64),
            lsn: next_lsn(),
        });
    }
    for _ in 0..bytes.u8() % 3 {
        let anchor_id = u64::from(bytes.u8() % 8) + 1_000;
        let vector = bytes.vector();
        let members = (0..bytes.u8() % 5)
            .map(|_| u64::from(bytes.u8() % 64))
            .collect();
        delta.anchors.push(PushedAnchor {
            anchor_id,
            vector,
            members,
            radius: bytes.radius(),
            hot_at_unix_us: 0,
        });
    }
    for _ in 0..bytes.u8() % 3 {
        let anchor_id = u64::from(bytes.u8() % 8) + 1_000;
        let members = (0..bytes.u8() % 5)
            .map(|_| u64::from(bytes.u8() % 64))
            .collect();
        delta.certificates.push(Certificate {
            anchor_id,
            radius: bytes.radius(),
            members,
        });
    }
    for _ in 0..bytes.u8() % 3 {
        delta.evict.push(u64::from(bytes.u8() % 64));
    }
    for _ in 0..bytes.u8() % 2 {
        delta.evict_anchors.push(u64::from(bytes.u8() % 8) + 1_000);
    }
    delta
}

/// The guest's refusal code, or a panic for any other failure (the host's promise: bad input
/// is a typed refusal, never a trap).
fn refusal(what: &str, e: &WasmError) -> i32 {
    match e {
        WasmError::Guest { code, .. } => *code,
        other => panic!("{what}: the guest failed instead of refusing: {other}"),
    }
}

/// The guest ABI's host side driven by a script of calls (see [`delta`] and
/// [`Bytes::vector`]): each op byte picks a search, a delta, certificates, a confidence rule,
/// a damaged snapshot, the starting snapshot again, or an empty cache. After every call the
/// guest and the native kernel agree (a certificate list the ABI refuses — a radius not finite
/// and positive — changes neither): the same snapshots and deltas taken and refused (with
/// the refusal's code), the same answers — hits, distances, LSNs, payloads, nearest anchor,
/// certification and the rule's decision — bit for bit where both run fused kernels
/// (AVX2 + FMA), otherwise distances within 1e-5 rank by rank.
pub fn guest_abi(data: &[u8]) {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    let mut guard = HARNESS
        .get_or_init(|| Mutex::new(Harness::start()))
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let h = &mut *guard;
    h.reset();
    let bit_for_bit = tiervec_shared::kernels::active() == "avx2+fma";
    let mut bytes = Bytes(data);
    while !bytes.0.is_empty() {
        match bytes.u8() % 8 {
            0..=2 => {
                let query = bytes.vector();
                let k = usize::from(bytes.u8() % 40);
                let ef = usize::from(bytes.u8()) * 2;
                let native = h.native.cache.search(
                    h.native.snapshot.as_ref().map(Snapshot::view).as_ref(),
                    &query,
                    k,
                    ef,
                    &mut h.native.scratch,
                );
                let guest = h.host.search(&query, k, ef);
                match (native, guest) {
                    (Err(_), Err(e)) => {
                        assert_eq!(refusal("search", &e), status::INVALID_QUERY, "{e}");
                    }
                    (Ok(n), Ok(g)) => {
                        let distances: Vec<f32> = n.hits.iter().map(|h| h.distance).collect();
                        let local =
                            h.native
                                .rule
                                .decide(&distances, k, n.nearest_anchor.map(|(_, d)| d))
                                == Decision::Local;
                        if bit_for_bit {
                            let bits = |hits: &[tiervec_shared::local::LocalHit]| {
                                hits.iter()
                                    .map(|h| (h.id, h.distance.to_bits(), h.lsn, h.payload.clone()))
                                    .collect::<Vec<_>>()
                            };
                            assert_eq!(bits(&n.hits), bits(&g.hits), "hits of {query:?}");
                            let anchor = |a: Option<(u64, f32)>| a.map(|(id, d)| (id, d.to_bits()));
                            assert_eq!(anchor(n.nearest_anchor), anchor(g.nearest_anchor));
                            assert_eq!(n.certified, g.certified, "certification of {query:?}");
                            assert_eq!(local, g.local, "decision on {query:?}");
                        } else {
                            assert_eq!(n.hits.len(), g.hits.len(), "hits of {query:?}");
                            for (a, b) in n.hits.iter().zip(&g.hits) {
                                assert!((a.distance - b.distance).abs() <= 1e-5, "{a:?} vs {b:?}");
                            }
                        }
                    }
                    (n, g) => panic!("native {n:?} but guest {g:?} for {query:?}, k {k}, ef {ef}"),
                }
            }
            3 => {
                let accept = bytes.u8() & 1 == 1;
                let d = delta(&mut bytes, h.native.cache.version(), &mut h.lsn);
                let native = h.native.cache.apply(&d, accept);
                let guest = h.host.apply_delta(&d, accept);
                match (&native, &guest) {
                    (Ok(_), Ok(())) => {}
                    (Err(_), Err(e)) => {
                        assert_eq!(refusal("delta", e), status::DELTA_REFUSED, "{e}");
                    }
                    _ => panic!("delta {d:?}: native {native:?}, guest {guest:?}"),
                }
            }
            4 => {
                let certificates: Vec<(u64, f32)> = (0..bytes.u8() % 6)
                    .map(|_| (u64::from(bytes.u8() % 8) + 1_000, bytes.radius()))
                    .collect();
                // The ABI takes radii that are finite and positive (`guest_abi`); a list
                // holding another is refused whole and changes nothing.
                let valid = certificates.iter().all(|&(_, r)| r.is_finite() && r > 0.0);
                match h.host.set_certificates(&certificates) {
                    Ok(()) => {
                        assert!(valid, "certificates {certificates:?} taken");
                        h.native.cache.set_certificates(&certificates);
                    }
                    Err(e) => {
                        assert!(!valid, "certificates {certificates:?} refused: {e}");
                        assert_eq!(refusal("certificates", &e), status::MALFORMED_REQUEST);
                    }
                }
            }
            5 => {
                let flags = bytes.u8();
                let rule = ConfidenceRule {
                    max_kth_distance: (flags & 1 == 1).then(|| bytes.radius()),
                    max_anchor_distance: (flags & 2 == 2).then(|| bytes.radius()),
                };
                h.native.rule = rule;
                h.host.configure(rule);
            }
            6 => {
                // The starting snapshot with up to eight bytes changed.
                let mut damaged = h.clean.clone();
                for _ in 0..bytes.u8() % 8 + 1 {
                    let at = usize::from(u16::from_le_bytes([bytes.u8(), bytes.u8()]));
                    let len = damaged.len();
                    damaged[at % len] ^= bytes.u8() | 1;
                }
                let cut = usize::from(bytes.u8());
                if cut > 200 {
                    damaged.truncate(damaged.len() * (cut - 200) / 56);
                }
                match (Native::over(&damaged), h.host.load_snapshot(&damaged)) {
                    (Ok(snapshot), Ok(())) => h.native.load(snapshot),
                    (Err(_), Err(e)) => {
                        assert_eq!(refusal("snapshot", &e), status::SNAPSHOT_REFUSED, "{e}");
                    }
                    (n, g) => panic!(
                        "a damaged snapshot: native {:?}, guest {g:?}",
                        n.map(|_| "taken")
                    ),
                }
            }
            _ => {
                if bytes.u8() & 1 == 0 {
                    h.reset();
                } else {
                    h.host.clear();
                    h.native.snapshot = None;
                    h.native.cache = LocalCache::empty();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every committed corpus input and every recorded crash of `edge/fuzz`, through the guest
    /// built with its test exports.
    #[test]
    fn corpora_replay() {
        super::use_guest_module(tiervec_test_support::guest::test_guest().to_owned());
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        tiervec_shared::fuzzing::replay_corpora(&root, &[("guest_abi", super::guest_abi)]);
    }
}
