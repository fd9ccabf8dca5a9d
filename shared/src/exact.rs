//! Exact (brute-force) k-nearest-neighbour search with the SIMD kernels: the ground truth that
//! approximate search is measured against, and the answer for small collections.

use std::collections::BinaryHeap;

use crate::hnsw::Neighbour;
use crate::metric::Metric;

/// Max-heap entry ordered by [`Neighbour::cmp_nearest`].
#[derive(PartialEq)]
struct Worst(Neighbour);
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp_nearest(&other.0)
    }
}

/// The `k` rows of `vectors` (row-major, `dim` wide) nearest to `query`, nearest first; equal
/// distances are ordered by row number. `query` must be prepared for the metric.
pub fn search(
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    query: &[f32],
    k: usize,
) -> Vec<Neighbour> {
    search_where(vectors, dim, metric, query, k, |_| true)
}

/// [`search`] over the rows `keep` accepts (by row number): memory for `k` results whatever the
/// number of rows or how many are skipped.
pub fn search_where(
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    query: &[f32],
    k: usize,
    keep: impl Fn(usize) -> bool,
) -> Vec<Neighbour> {
    if k == 0 || dim == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
    for (id, row) in vectors.chunks_exact(dim).enumerate() {
        if !keep(id) {
            continue;
        }
        let candidate = Neighbour {
            id: id as u32,
            distance: metric.distance(query, row),
        };
        if heap.len() < k {
            heap.push(Worst(candidate));
        } else if let Some(top) = heap.peek()
            && candidate.cmp_nearest(&top.0).is_lt()
        {
            heap.pop();
            heap.push(Worst(candidate));
        }
    }
    let mut out: Vec<Neighbour> = heap.into_iter().map(|w| w.0).collect();
    out.sort_unstable_by(Neighbour::cmp_nearest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_nearest_first_with_ties_by_row() {
        let v = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, -1.0, 0.0];
        let got = search(&v, 2, Metric::Dot, &[1.0, 0.0], 3);
        let ids: Vec<u32> = got.iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![0, 2, 1]);
        assert_eq!(got[0].distance, -1.0);
        assert!(search(&v, 2, Metric::Dot, &[1.0, 0.0], 0).is_empty());
        assert_eq!(search(&v, 2, Metric::Dot, &[1.0, 0.0], 10).len(), 4);
        let odd: Vec<u32> = search_where(&v, 2, Metric::Dot, &[1.0, 0.0], 10, |r| r % 2 == 1)
            .iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(
            odd,
            vec![1, 3],
            "skipped rows are not returned; row numbers are kept"
        );
    }
}
