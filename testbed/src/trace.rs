//! The demo's query trace: what each edge's users ask, and its exact ground truth.
//!
//! Each edge has its own popularity order over the 5,000 dataset queries (a seeded
//! permutation: rank 0 is that edge's most popular query). A request picks a rank by a Zipf law;
//! with probability `repeat_fraction` it repeats that query exactly (a voice assistant hears the
//! same command again), otherwise it is the query plus Gaussian noise scaled so that its cosine
//! to the original is about `noise_cosine`, re-normalised. Deployment (popularity) and trace
//! have separate seeds, so `max_distance` can be calibrated on one trace and reported on
//! another over the same caches.
//!
//! The ground truth of a noisy request is an exact search over the whole corpus, computed in
//! batches on every core and cached on disk under a name that hashes every input.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal, Zipf};
use rand_pcg::Pcg64;
use tiervec_shared::Metric;
use tiervec_shared::vecs::Matrix;

use crate::measure;

/// The knobs of a trace.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TraceSpec {
    pub edges: usize,
    pub requests_per_edge: usize,
    pub zipf_exponent: f64,
    pub repeat_fraction: f64,
    pub noise_cosine: f64,
    /// Seed of the per-edge popularity orders (what the caches are built from).
    pub deployment_seed: u64,
    /// Seed of the requests.
    pub trace_seed: u64,
}

/// The popularity order of each edge: `orders[edge][rank]` is a query index.
pub fn popularity(edges: usize, queries: usize, deployment_seed: u64) -> Vec<Vec<usize>> {
    (0..edges)
        .map(|edge| {
            let mut order: Vec<usize> = (0..queries).collect();
            let mut rng = Pcg64::seed_from_u64(deployment_seed ^ ((edge as u64 + 1) * 0x9e37_79b9));
            order.shuffle(&mut rng);
            order
        })
        .collect()
}

/// One request of the trace.
#[derive(Clone, Debug)]
pub struct Request {
    pub edge: usize,
    /// The dataset query it comes from.
    pub query: usize,
    /// An exact repeat of that query (else a noisy variant).
    pub repeat: bool,
    pub vector: Vec<f32>,
}

/// The requests of every edge, in each edge's order (`requests[edge][i]`).
pub fn generate(spec: &TraceSpec, queries: &Matrix<f32>) -> anyhow::Result<Vec<Vec<Request>>> {
    let orders = popularity(spec.edges, queries.rows(), spec.deployment_seed);
    let zipf = Zipf::new(queries.rows() as f64, spec.zipf_exponent)
        .map_err(|e| anyhow::anyhow!("Zipf law: {e}"))?;
    // Noise of norm t orthogonal-ish to a unit vector gives cosine 1/sqrt(1+t²).
    let c = spec.noise_cosine;
    let noise_norm = (1.0 / (c * c) - 1.0).sqrt();
    let per_dim = (noise_norm / (queries.dim as f64).sqrt()) as f32;
    Ok(orders
        .iter()
        .enumerate()
        .map(|(edge, order)| {
            let mut rng = Pcg64::seed_from_u64(spec.trace_seed ^ ((edge as u64 + 1) * 0xbf58_476d));
            (0..spec.requests_per_edge)
                .map(|_| {
                    let rank = zipf.sample(&mut rng) as usize - 1;
                    let query = order[rank.min(order.len() - 1)];
                    let repeat = rng.random_bool(spec.repeat_fraction);
                    let mut vector = queries.row(query).to_vec();
                    if !repeat {
                        for x in &mut vector {
                            let g: f32 = StandardNormal.sample(&mut rng);
                            *x += g * per_dim;
                        }
                        Metric::Cosine.prepare(&mut vector);
                    }
                    Request {
                        edge,
                        query,
                        repeat,
                        vector,
                    }
                })
                .collect()
        })
        .collect())
}

/// The exact top-10 of one request: ids and cosine distances, nearest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Truth {
    pub ids: Vec<u64>,
    pub distances: Vec<f32>,
}

const TRUTH_K: usize = measure::K;

fn cache_path(dir: &Path, spec: &TraceSpec, base: &Matrix<f32>) -> PathBuf {
    let mut key = serde_json::to_vec(spec).expect("a trace spec serialises");
    key.extend_from_slice(&(base.rows() as u64).to_le_bytes());
    key.extend_from_slice(bytemuck::cast_slice::<f32, u8>(
        &base.data[..base.dim.min(base.data.len())],
    ));
    dir.join(format!(
        "truth-{:016x}.bin",
        xxhash_rust::xxh3::xxh3_64(&key)
    ))
}

/// The exact top-10 of every request over `base`. Exact repeats take the dataset's shipped
/// ground truth (`shipped`, per dataset query); noisy requests are searched exactly, in
/// parallel, and the whole answer is cached in `cache_dir`.
pub fn ground_truth(
    spec: &TraceSpec,
    requests: &[Vec<Request>],
    base: &Matrix<f32>,
    shipped: &(dyn Fn(usize) -> Truth + Sync),
    cache_dir: &Path,
) -> anyhow::Result<Vec<Vec<Truth>>> {
    let path = cache_path(cache_dir, spec, base);
    let lengths: Vec<usize> = requests.iter().map(Vec::len).collect();
    if let Ok(bytes) = std::fs::read(&path)
        && let Some(truth) = decode(&bytes, &lengths)
    {
        return Ok(truth);
    }
    let flat: Vec<&Request> = requests.iter().flatten().collect();
    let noisy: Vec<&[f32]> = flat
        .iter()
        .filter(|r| !r.repeat)
        .map(|r| r.vector.as_slice())
        .collect();
    let mut exact = measure::exact_top_k(&base.data, base.dim, &noisy).into_iter();
    let answers: Vec<Truth> = flat
        .iter()
        .map(|r| {
            if r.repeat {
                Some(shipped(r.query))
            } else {
                exact
                    .next()
                    .map(|(ids, distances)| Truth { ids, distances })
            }
        })
        .collect::<Option<_>>()
        .context("an exact answer per noisy request")?;
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    tiervec_shared::durable::write_atomic(&path, &encode(&answers), false)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut it = answers.into_iter();
    Ok(lengths
        .iter()
        .map(|&n| it.by_ref().take(n).collect())
        .collect())
}

const RECORD: usize = TRUTH_K * 12;

fn encode(answers: &[Truth]) -> Vec<u8> {
    let mut out = Vec::with_capacity(answers.len() * RECORD);
    for t in answers {
        for i in 0..TRUTH_K {
            out.extend_from_slice(&t.ids.get(i).copied().unwrap_or(u64::MAX).to_le_bytes());
            out.extend_from_slice(
                &t.distances
                    .get(i)
                    .copied()
                    .unwrap_or(f32::MAX)
                    .to_le_bytes(),
            );
        }
    }
    out
}

/// `None` when the cache does not have exactly the expected shape (then it is recomputed).
fn decode(bytes: &[u8], lengths: &[usize]) -> Option<Vec<Vec<Truth>>> {
    let total: usize = lengths.iter().sum();
    if bytes.len() != total * RECORD {
        return None;
    }
    let mut records = bytes.chunks_exact(RECORD).map(|rec| {
        let mut t = Truth {
            ids: Vec::with_capacity(TRUTH_K),
            distances: Vec::with_capacity(TRUTH_K),
        };
        for entry in rec.chunks_exact(12) {
            let id = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            if id != u64::MAX {
                t.ids.push(id);
                t.distances
                    .push(f32::from_le_bytes(entry[8..].try_into().expect("4 bytes")));
            }
        }
        t
    });
    Some(
        lengths
            .iter()
            .map(|&n| records.by_ref().take(n).collect())
            .collect(),
    )
}

/// The fraction of requests a cache keyed by a hash of the exact query vector would have
/// answered at each edge (the seed's Redis pattern): a hit needs the same bytes seen before.
pub fn hash_cache_hits(requests: &[Vec<Request>]) -> f64 {
    let mut hits = 0usize;
    let mut total = 0usize;
    for edge in requests {
        let mut seen = std::collections::HashSet::new();
        for r in edge {
            total += 1;
            if !seen.insert(xxhash_rust::xxh3::xxh3_128(
                bytemuck::cast_slice::<f32, u8>(&r.vector),
            )) {
                hits += 1;
            }
        }
    }
    hits as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queries(n: usize, dim: usize) -> Matrix<f32> {
        let mut rng = Pcg64::seed_from_u64(3);
        let mut data = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let mut v: Vec<f32> = (0..dim).map(|_| StandardNormal.sample(&mut rng)).collect();
            Metric::Cosine.prepare(&mut v);
            data.extend(v);
        }
        Matrix { dim, data }
    }

    fn spec() -> TraceSpec {
        TraceSpec {
            edges: 2,
            requests_per_edge: 4_000,
            zipf_exponent: 1.0,
            repeat_fraction: 0.3,
            noise_cosine: 0.95,
            deployment_seed: 1,
            trace_seed: 2,
        }
    }

    #[test]
    fn traces_are_seeded_popularity_skewed_and_noisy_by_the_stated_amount() {
        let q = queries(500, 384);
        let a = generate(&spec(), &q).unwrap();
        let b = generate(&spec(), &q).unwrap();
        assert_eq!(a[1][77].vector, b[1][77].vector, "same seed, same trace");
        let other = generate(
            &TraceSpec {
                trace_seed: 9,
                ..spec()
            },
            &q,
        )
        .unwrap();
        assert_ne!(
            a[0][0..50].iter().map(|r| r.query).collect::<Vec<_>>(),
            other[0][0..50].iter().map(|r| r.query).collect::<Vec<_>>()
        );

        let orders = popularity(2, 500, 1);
        assert_ne!(orders[0], orders[1], "each edge has its own popularity");
        let top = a[0].iter().filter(|r| r.query == orders[0][0]).count() as f64;
        let tenth = a[0].iter().filter(|r| r.query == orders[0][9]).count() as f64;
        // Zipf 1.0 over 500 ranks: rank 1 takes 1/H(500) ≈ 14.7 %, rank 10 a tenth of that.
        assert!((top / 4_000.0 - 0.147).abs() < 0.03, "{top}");
        assert!(top / tenth.max(1.0) > 5.0, "{top} vs {tenth}");

        let repeats = a[0].iter().filter(|r| r.repeat).count() as f64 / 4_000.0;
        assert!((repeats - 0.3).abs() < 0.03, "{repeats}");
        for r in a[0].iter().take(300) {
            let cos = tiervec_shared::kernels::dot(&r.vector, q.row(r.query));
            if r.repeat {
                assert_eq!(r.vector, q.row(r.query));
            } else {
                assert!((cos - 0.95).abs() < 0.02, "cosine {cos}");
                let norm = tiervec_shared::kernels::dot(&r.vector, &r.vector);
                assert!((norm - 1.0).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn ground_truth_is_exact_and_cached() {
        let base = queries(300, 16);
        let q = queries(40, 16);
        let s = TraceSpec {
            requests_per_edge: 50,
            ..spec()
        };
        let reqs = generate(&s, &q).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let shipped = |i: usize| {
            let top = tiervec_shared::exact::search(&base.data, 16, Metric::Cosine, q.row(i), 10);
            Truth {
                ids: top.iter().map(|n| n.id as u64).collect(),
                distances: top.iter().map(|n| n.distance).collect(),
            }
        };
        let first = ground_truth(&s, &reqs, &base, &shipped, dir.path()).unwrap();
        let r = &reqs[1][7];
        let top = tiervec_shared::exact::search(&base.data, 16, Metric::Cosine, &r.vector, 10);
        assert_eq!(
            first[1][7].ids,
            top.iter().map(|n| n.id as u64).collect::<Vec<_>>()
        );
        let cached = ground_truth(&s, &reqs, &base, &|_| unreachable!(), dir.path());
        // Repeats would call `shipped` again if the cache were not read.
        assert_eq!(cached.unwrap(), first);
    }

    #[test]
    fn the_hash_cache_hits_only_exact_repeats_seen_before() {
        let q = queries(100, 8);
        let reqs = generate(&spec(), &q).unwrap();
        let hits = hash_cache_hits(&reqs);
        assert!(hits > 0.0 && hits < 0.3, "{hits}");
    }
}
