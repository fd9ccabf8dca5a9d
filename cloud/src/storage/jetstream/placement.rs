//! Where a sharded collection lives, as plain functions (no IO, no clock): the shard an id
//! belongs to, the cloud nodes that should hold each shard, and which nodes a query asks.
//! The replicated store writes placements from [`place`]; the service's fan-out plans its
//! requests with [`plan_fan_out`].

use crate::storage::WalEntry;

/// A shard of a collection: its identity and number.
pub type ShardKey = ([u8; 16], u32);

/// The most shards a collection may have (each is a JetStream stream and, on every node
/// holding it, a consumer).
pub const MAX_SHARDS: u32 = 64;

/// The shard of `id` in a collection of `shards` shards. Stable forever: changing it would
/// move every point of every sharded collection to another shard.
pub fn shard_of(id: u64, shards: u32) -> u32 {
    (mix(id) % u64::from(shards.max(1))) as u32
}

/// SplitMix64's finaliser: ids written in sequence spread evenly over the shards.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The entries that carry `entry`'s writes on a collection of `shards` shards, each with its
/// shard: an upsert's or delete's ids (and vectors and payloads) grouped by [`shard_of`], in
/// their order. Any other entry is not a shard's and comes back whole, as shard 0.
pub fn split_by_shard(entry: WalEntry, shards: u32) -> Vec<(u32, WalEntry)> {
    if shards <= 1 {
        return vec![(0, entry)];
    }
    match entry {
        WalEntry::Upsert {
            collection,
            ids,
            vectors,
            payloads,
        } => {
            let dim = vectors.len() / ids.len().max(1);
            // Per shard: its ids, vectors and payloads.
            type Part = (Vec<u64>, Vec<f32>, Vec<Option<String>>);
            let mut parts: Vec<Part> = vec![Default::default(); shards as usize];
            for ((i, id), payload) in ids.iter().enumerate().zip(payloads) {
                let part = &mut parts[shard_of(*id, shards) as usize];
                part.0.push(*id);
                part.1.extend_from_slice(&vectors[i * dim..(i + 1) * dim]);
                part.2.push(payload);
            }
            (0..shards)
                .zip(parts)
                .filter(|(_, p)| !p.0.is_empty())
                .map(|(s, (ids, vectors, payloads))| {
                    let entry = WalEntry::Upsert {
                        collection,
                        ids,
                        vectors,
                        payloads,
                    };
                    (s, entry)
                })
                .collect()
        }
        WalEntry::Delete { collection, ids } => {
            let mut parts = vec![Vec::new(); shards as usize];
            for id in ids {
                parts[shard_of(id, shards) as usize].push(id);
            }
            (0..shards)
                .zip(parts)
                .filter(|(_, ids)| !ids.is_empty())
                .map(|(s, ids)| (s, WalEntry::Delete { collection, ids }))
                .collect()
        }
        other => vec![(0, other)],
    }
}

/// The nodes that should hold each shard of a collection of `shards` shards: rendezvous
/// hashing with bounded loads. Each shard ranks the live nodes by an xxh3 weight of
/// (collection, shard, node) and takes the `replicas` best that hold fewer than
/// ⌈shards × replicas / live⌉ of its shards so far. Where that greedy pass runs out of nodes
/// with room (a few collections in a hundred), each shard instead takes the least loaded
/// nodes, best weight first among equals. Every node computes the same answer from the same
/// live set; every node holds its share (pure rendezvous left a node with none of 3 shards ×
/// 2 replicas on 3 nodes in some collections); a node leaving or joining moves mostly its own
/// share.
pub fn place(
    collection: &[u8; 16],
    shards: u32,
    live: &[String],
    replicas: usize,
) -> Vec<Vec<String>> {
    let mut live: Vec<&String> = live.iter().collect();
    live.sort();
    live.dedup();
    let replicas = replicas.min(live.len());
    if replicas == 0 {
        return vec![Vec::new(); shards as usize];
    }
    let cap = (shards as usize * replicas).div_ceil(live.len());
    // Per shard, the live nodes' indexes by weight, best first.
    let ranked: Vec<Vec<usize>> = (0..shards)
        .map(|shard| {
            let mut weighted: Vec<(u64, usize)> = live
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let mut key = Vec::with_capacity(node.len() + 20);
                    key.extend_from_slice(collection);
                    key.extend_from_slice(&shard.to_le_bytes());
                    key.extend_from_slice(node.as_bytes());
                    (xxhash_rust::xxh3::xxh3_64(&key), i)
                })
                .collect();
            weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            weighted.into_iter().map(|(_, i)| i).collect()
        })
        .collect();
    let mut load = vec![0usize; live.len()];
    let chosen: Vec<Vec<usize>> = ranked
        .iter()
        .map(|order| {
            // Best weight among nodes with room; then, if too few have room, least loaded.
            let (mut chosen, mut full): (Vec<usize>, Vec<usize>) =
                order.iter().partition(|&&i| load[i] < cap);
            chosen.truncate(replicas);
            full.sort_by_key(|&i| load[i]);
            chosen.extend(full.into_iter().take(replicas - chosen.len()));
            for &i in &chosen {
                load[i] += 1;
            }
            chosen
        })
        .collect();
    chosen
        .into_iter()
        .map(|nodes| nodes.into_iter().map(|i| live[i].clone()).collect())
        .collect()
}

/// Which nodes a query of a collection of `shards` shards asks, for which shards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FanOut {
    /// The shards this node answers itself.
    pub local: Vec<u32>,
    /// Other nodes and the shards each is asked for.
    pub remote: Vec<(String, Vec<u32>)>,
    /// Shards no live node can answer.
    pub missing: Vec<u32>,
}

/// Plans a query: the shards this node holds caught up (`local`) it answers itself; the
/// others go to as few of the `candidates` (other nodes, each with the shards it may answer,
/// best first) as cover them, skipping `exclude` (nodes that already failed this query).
/// Among candidates covering equally many shards, `spread` picks (a per-query counter), so
/// queries share the replicas.
pub fn plan_fan_out(
    shards: u32,
    local: &[u32],
    candidates: &[(String, Vec<u32>)],
    exclude: &[String],
    spread: u64,
) -> FanOut {
    let mut uncovered: Vec<u32> = (0..shards).filter(|s| !local.contains(s)).collect();
    let mut plan = FanOut {
        local: (0..shards).filter(|s| local.contains(s)).collect(),
        ..FanOut::default()
    };
    let mut usable: Vec<&(String, Vec<u32>)> = candidates
        .iter()
        .filter(|(node, _)| !exclude.contains(node))
        .collect();
    while !uncovered.is_empty() {
        let cover = |c: &&(String, Vec<u32>)| c.1.iter().filter(|s| uncovered.contains(s)).count();
        let best = usable.iter().map(cover).max().unwrap_or(0);
        if best == 0 {
            break;
        }
        let ties: Vec<usize> = (0..usable.len())
            .filter(|&i| cover(&usable[i]) == best)
            .collect();
        let chosen = usable.remove(ties[(spread % ties.len() as u64) as usize]);
        let asked: Vec<u32> = uncovered
            .iter()
            .copied()
            .filter(|s| chosen.1.contains(s))
            .collect();
        uncovered.retain(|s| !asked.contains(s));
        plan.remote.push((chosen.0.clone(), asked));
    }
    plan.missing = uncovered;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn ids_spread_evenly_over_shards_and_stay_put() {
        let mut counts = [0u32; 3];
        for id in 0..30_000 {
            counts[shard_of(id, 3) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..=10_500).contains(&c)),
            "{counts:?}"
        );
        // Fixed values: the function is part of the on-disk layout.
        assert_eq!(
            [
                shard_of(0, 3),
                shard_of(1, 3),
                shard_of(42, 3),
                shard_of(u64::MAX, 3)
            ],
            [0, 1, 2, 0]
        );
        assert_eq!(shard_of(7, 1), 0);
        assert_eq!(shard_of(7, 0), 0);
    }

    #[test]
    fn a_write_splits_into_one_entry_per_shard_it_touches() {
        let upsert = WalEntry::Upsert {
            collection: [1; 16],
            ids: (0..10).collect(),
            vectors: (0..20).map(|v| v as f32).collect(),
            payloads: (0..10).map(|i| Some(i.to_string())).collect(),
        };
        let parts = split_by_shard(upsert.clone(), 3);
        let mut seen = 0;
        for (shard, part) in &parts {
            let WalEntry::Upsert {
                ids,
                vectors,
                payloads,
                ..
            } = part
            else {
                panic!("{part:?}");
            };
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(shard_of(*id, 3), *shard);
                assert_eq!(
                    vectors[2 * i..2 * i + 2],
                    [2.0 * *id as f32, 2.0 * *id as f32 + 1.0]
                );
                assert_eq!(payloads[i], Some(id.to_string()));
                seen += 1;
            }
        }
        assert_eq!(seen, 10);
        assert_eq!(split_by_shard(upsert.clone(), 1), vec![(0, upsert)]);
        let delete = WalEntry::Delete {
            collection: [1; 16],
            ids: vec![42],
        };
        assert_eq!(
            split_by_shard(delete.clone(), 3),
            vec![(shard_of(42, 3), delete)]
        );
    }

    #[test]
    fn every_node_holds_its_share_and_a_leaving_node_moves_mostly_its_own() {
        let live = nodes(3);
        // Three shards, two replicas, three nodes: every node holds one to three (two each in
        // most collections), whatever the collection.
        for c in 0..=255u8 {
            let placed = place(&[c; 16], 3, &live, 2);
            for n in &live {
                let held = placed.iter().filter(|p| p.contains(n)).count();
                assert!((1..=3).contains(&held), "collection {c}: {placed:?}");
            }
        }
        let id = [9; 16];
        let before = place(&id, 60, &live, 2);
        let mut held = [0; 3];
        for p in &before {
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            for n in p {
                held[live.iter().position(|l| l == n).unwrap()] += 1;
            }
        }
        assert!(held.iter().all(|&h| (36..=44).contains(&h)), "{held:?}");
        let five = nodes(5);
        let before = place(&id, 60, &five, 2);
        let survivors: Vec<String> = five.iter().filter(|n| *n != &five[1]).cloned().collect();
        let after = place(&id, 60, &survivors, 2);
        let kept = before
            .iter()
            .zip(&after)
            .flat_map(|(old, new)| old.iter().filter(|n| *n != &five[1] && new.contains(n)))
            .count();
        let could_keep = before.iter().flatten().filter(|n| *n != &five[1]).count();
        assert!(
            kept * 10 >= could_keep * 9,
            "only {kept} of {could_keep} replicas on surviving nodes stayed put"
        );
        // Fewer live nodes than replicas: every live node.
        assert_eq!(place(&id, 1, &live[..1], 2), vec![vec![live[0].clone()]]);
        assert_eq!(place(&id, 1, &[], 2), vec![Vec::<String>::new()]);
    }

    #[test]
    fn a_query_asks_as_few_nodes_as_cover_the_shards_and_names_the_rest() {
        let candidates = vec![
            ("b".to_owned(), vec![1, 2]),
            ("c".to_owned(), vec![2]),
            ("d".to_owned(), vec![1, 2]),
        ];
        let plan = plan_fan_out(4, &[0], &candidates, &[], 0);
        assert_eq!(plan.local, vec![0]);
        assert_eq!(plan.remote, vec![("b".to_owned(), vec![1, 2])]);
        assert_eq!(plan.missing, vec![3]);
        // Ties go round: another query asks the other node covering as much.
        let other = plan_fan_out(4, &[0], &candidates, &[], 1);
        assert_eq!(other.remote, vec![("d".to_owned(), vec![1, 2])]);
        // A node that failed is not asked again; the others cover what they can.
        let retry = plan_fan_out(4, &[0], &candidates, &["b".into(), "d".into()], 0);
        assert_eq!(retry.remote, vec![("c".to_owned(), vec![2])]);
        assert_eq!(retry.missing, vec![1, 3]);
        // Everything local: nobody asked.
        assert_eq!(plan_fan_out(2, &[1, 0], &candidates, &[], 0).remote, vec![]);
    }
}
