//! The host side of chunked top-k: the device returns k candidates per (query, row chunk,
//! segment); these are mapped to slots and merged into the k nearest, in the CPU exact path's
//! order (distance, then slot).

use tiervec_shared::hnsw::Neighbour;

/// Appends the candidates of query `query` from one top-k launch to `into`: `dist` and `row`
/// are the kernel's output (`[queries][segments][k]`, row `-1` = no candidate), `slot_of`
/// maps a row of the chunk to the collection's slot.
pub fn collect(
    dist: &[f32],
    row: &[i32],
    query: usize,
    segments: usize,
    k: usize,
    slot_of: impl Fn(usize) -> u32,
    into: &mut Vec<Neighbour>,
) {
    let span = query * segments * k..(query + 1) * segments * k;
    for (&d, &r) in dist[span.clone()].iter().zip(&row[span]) {
        if let Ok(r) = usize::try_from(r) {
            into.push(Neighbour {
                id: slot_of(r),
                distance: d,
            });
        }
    }
}

/// The `k` nearest of `candidates`, nearest first, ties by slot.
pub fn merge(mut candidates: Vec<Neighbour>, k: usize) -> Vec<Neighbour> {
    candidates.sort_unstable_by(Neighbour::cmp_nearest);
    candidates.truncate(k);
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u32, distance: f32) -> Neighbour {
        Neighbour { id, distance }
    }

    #[test]
    fn chunk_candidates_merge_into_the_global_top_k_with_ties_by_slot() {
        // Two queries, two segments, k = 3; query 1's second segment had one live row only.
        let dist = [
            0.1,
            0.4,
            0.5,
            0.2,
            0.3,
            0.9, // query 0: segment 0, segment 1
            0.7,
            0.8,
            0.9,
            0.05,
            f32::INFINITY,
            f32::INFINITY, // query 1
        ];
        let row = [0, 3, 5, 1, 2, 4, 0, 1, 2, 7, -1, -1];
        let mut c = Vec::new();
        collect(&dist, &row, 0, 2, 3, |r| r as u32 + 100, &mut c);
        // A second row chunk whose candidate ties query 0's third best at a lower slot.
        c.push(n(50, 0.3));
        assert_eq!(merge(c, 3), vec![n(100, 0.1), n(101, 0.2), n(50, 0.3)]);
        let mut c = Vec::new();
        collect(&dist, &row, 1, 2, 3, |r| r as u32, &mut c);
        assert_eq!(c.len(), 4, "empty entries are skipped");
        assert_eq!(
            merge(c, 10),
            vec![n(7, 0.05), n(0, 0.7), n(1, 0.8), n(2, 0.9)]
        );
    }
}
