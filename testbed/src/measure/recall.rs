//! recall@10 against exact ground truth (`../shared/docs/bench-json.md`), and that ground
//! truth where the dataset does not ship it.

use tiervec_shared::{Metric, exact};

/// The `k` of recall@10: how many neighbours every bench and the demo ask for.
pub const K: usize = 10;

/// recall@10 of one answer under the rule of bench-json.md: a returned id counts when it is in
/// the true top-10 or its distance ties the true 10th distance within 1e-5.
pub fn recall_at_10(found: &[(u64, f32)], true_ids: &[u64], true_distances: &[f32]) -> f64 {
    let k = K.min(true_ids.len());
    if k == 0 {
        return 1.0;
    }
    let tenth = true_distances[k - 1];
    let hits = found
        .iter()
        .take(k)
        .filter(|(id, d)| true_ids[..k].contains(id) || (d - tenth).abs() <= 1e-5)
        .count();
    hits as f64 / k as f64
}

/// The exact top-[`K`] ids and distances (cosine) of every query over `vectors` (rows of `dim`),
/// in query order, on all cores: the ground truth recall is measured against.
pub fn exact_top_k(vectors: &[f32], dim: usize, queries: &[&[f32]]) -> Vec<(Vec<u64>, Vec<f32>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = queries.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(chunk)
            .map(|qs| {
                s.spawn(move || {
                    qs.iter()
                        .map(|q| {
                            let top = exact::search(vectors, dim, Metric::Cosine, q, K);
                            (
                                top.iter().map(|n| n.id as u64).collect(),
                                top.iter().map(|n| n.distance).collect(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("ground-truth thread"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_ties_at_the_tenth_distance() {
        let ids: Vec<u64> = (0..10).collect();
        let d: Vec<f32> = (0..10).map(|i| i as f32 * 0.1).collect();
        let mut found: Vec<(u64, f32)> = (0..10).map(|i| (i, i as f32 * 0.1)).collect();
        assert_eq!(recall_at_10(&found, &ids, &d), 1.0);
        found[9] = (99, 0.9 + 5e-6);
        assert_eq!(recall_at_10(&found, &ids, &d), 1.0);
        found[9] = (99, 0.95);
        assert_eq!(recall_at_10(&found, &ids, &d), 0.9);
    }
}
