//! Restoring an edge's cache whole. When an edge comes back holding much less than the cloud
//! logged for it — its files were lost or set aside as corrupt — refilling it one hot anchor at
//! a time would take minutes. Instead the cloud builds a snapshot file of what the edge held
//! (those ids at their current versions, with the anchors whose points it still tracks),
//! streams it (`transfer::snapshot_frames`), and logs the file's own inventory once the edge
//! acknowledges it. Pure functions; the push task drives them.

use rkyv::util::AlignedVec;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tiervec_shared::local::LocalCache;
use tiervec_shared::push::{Inventory, Manifest, anchor_bytes, vector_bytes};
use tiervec_shared::snapshot::{Payloads, Snapshot, SnapshotError, SnapshotSpec, SnapshotWriter};

use super::corpus::Corpus;

/// Why the snapshot of a cache could not be built.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("the snapshot of the cache: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// When an announced inventory is far enough behind the logged manifest to restore it whole.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestorePolicy {
    /// Restore only caches the cloud logged at least this many vectors for.
    pub min_vectors: usize,
    /// ... and of which the edge still holds less than this fraction.
    pub held_fraction_below: f64,
}

impl Default for RestorePolicy {
    fn default() -> Self {
        RestorePolicy {
            min_vectors: 32,
            held_fraction_below: 0.5,
        }
    }
}

impl RestorePolicy {
    /// Whether an edge announcing `inventory` lost enough of `logged` to be restored.
    pub fn wants_restore(&self, logged: &Manifest, inventory: &Inventory) -> bool {
        logged.collection_id == inventory.collection_id
            && logged.len() >= self.min_vectors
            && (inventory.vectors.len() as f64) < self.held_fraction_below * logged.len() as f64
    }
}

/// A first snapshot for a new edge: the live points `ids`, in that order (those edges ask for
/// most first, then as held), at their current versions, until `budget` bytes of the byte
/// model are used, without anchors, at manifest version 0 — an edge opening it announces that
/// version, and the cloud adopts the inventory it sends.
pub fn seed(
    collection: &impl Corpus,
    ids: &[u64],
    budget: u64,
) -> Result<AlignedVec, RestoreError> {
    Ok(write(collection, ids, std::iter::empty(), |_| None, 0, budget)?.into_inner())
}

/// Points read per batch while building a restore.
const RESTORE_BATCH: usize = 512;

/// A snapshot file of what `logged` held, at the points' current versions (deleted ones left
/// out), with the anchors whose points `anchor_vector` still knows and whose members are all
/// in the file (or deleted), all within `budget` bytes
/// of the byte model (vectors first, newest first), at manifest `version`; and the inventory that file is (what the
/// edge's manifest will be once it installs it).
pub fn build(
    collection: &impl Corpus,
    logged: &Manifest,
    anchor_vector: impl Fn(u64) -> Option<Vec<f32>>,
    version: u64,
    budget: u64,
) -> Result<(AlignedVec, Inventory), RestoreError> {
    let mut held: Vec<(u64, u64)> = logged.ids().map(|(id, h)| (id, h.lsn)).collect();
    // Deterministic order, newest first, so a smaller budget keeps the freshest.
    held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let ids: Vec<u64> = held.iter().map(|(id, _)| *id).collect();
    let opened = write(
        collection,
        &ids,
        logged.anchors(),
        anchor_vector,
        version,
        budget,
    )?;
    // The inventory is read back from the file itself, exactly as the edge will read it.
    let inventory = LocalCache::over_snapshot(&opened.view())
        .manifest()
        .inventory();
    Ok((opened.into_inner(), inventory))
}

/// The snapshot file of the points `held`, in that order, at their current versions (deleted
/// ones left out), with those of `anchors` whose vectors `anchor_vector` still knows and whose
/// members are all in the file (or deleted), within `budget` bytes of the byte model (points
/// first), at manifest `version`.
fn write<'m>(
    collection: &impl Corpus,
    held: &[u64],
    anchors: impl Iterator<Item = (u64, &'m [u64])>,
    anchor_vector: impl Fn(u64) -> Option<Vec<f32>>,
    version: u64,
    budget: u64,
) -> Result<Snapshot<AlignedVec>, RestoreError> {
    let info = collection.info();
    let dim = info.dim;
    let spec = SnapshotSpec {
        collection: info.id,
        dim: dim as u32,
        metric: info.metric,
        params: info.params,
    };
    let mut writer = SnapshotWriter::new(spec, &info.name, Payloads::Json);
    let mut used = 0u64;
    let mut kept = std::collections::HashSet::new();
    // Points left out though they exist (or may): their batch could not be read (on a cluster,
    // a shard without a live replica), or the budget ran out first. An anchor missing one of
    // them is left out too: the edge would answer near it confidently without that neighbour.
    // (A member deleted since is no neighbour any more; its anchor stays.)
    let mut left_out = std::collections::HashSet::new();
    let mut full = false;
    for batch in held.chunks(RESTORE_BATCH) {
        let ids = batch.to_vec();
        let points = match (full, collection.get_many(&ids, true)) {
            (false, Some(points)) => points,
            _ => {
                left_out.extend(ids);
                continue;
            }
        };
        for (id, point) in ids.into_iter().zip(points) {
            let Some(point) = point else {
                continue;
            };
            let payload = point.payload.as_deref().unwrap_or_default();
            let cost = vector_bytes(dim, payload.len());
            if full || used + cost > budget {
                full = true;
                left_out.insert(id);
                continue;
            }
            writer.push(point.id, point.lsn, &point.vector, Some(payload))?;
            used += cost;
            kept.insert(point.id);
        }
    }
    for (anchor, members) in anchors {
        if members.iter().any(|m| left_out.contains(m)) {
            continue;
        }
        let Some(vector) = anchor_vector(anchor) else {
            continue;
        };
        let members: Vec<u64> = members
            .iter()
            .copied()
            .filter(|m| kept.contains(m))
            .collect();
        let cost = anchor_bytes(dim, members.len());
        if used + cost > budget {
            continue;
        }
        used += cost;
        writer.push_anchor(&vector, &members);
    }
    writer.set_manifest_version(version);
    // Opened as the edge will open it: a file that does not validate is never sent.
    Ok(Snapshot::open(writer.finish()?)?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tiervec_shared::hnsw::HnswParams;
    use tiervec_shared::push::HeldVector;
    use tiervec_shared::{CollectionId, Metric};

    use super::*;
    use crate::collection::{CollectionInfo, Point};

    /// Points by id; `get_many` of a batch holding an id of `unreadable` fails whole, as a
    /// cluster's does for a shard without a live replica.
    struct Points {
        info: CollectionInfo,
        points: HashMap<u64, Point>,
        unreadable: Vec<u64>,
    }

    impl Corpus for Points {
        fn info(&self) -> &CollectionInfo {
            &self.info
        }
        fn get(&self, id: u64) -> Option<Point> {
            self.points.get(&id).cloned()
        }
        fn get_many(&self, ids: &[u64], _: bool) -> Option<Vec<Option<Point>>> {
            (!ids.iter().any(|id| self.unreadable.contains(id)))
                .then(|| ids.iter().map(|id| self.get(*id)).collect())
        }
        fn search(&self, _: &[f32], _: usize, _: usize) -> Option<Vec<u64>> {
            None
        }
        fn exact(&self, _: &[f32], _: usize) -> Option<Vec<u64>> {
            None
        }
        fn deleted_at(&self, _: u64) -> Option<u64> {
            None
        }
    }

    const DIM: usize = 4;

    fn corpus(unreadable: Vec<u64>) -> Points {
        let points = (1..=6u64)
            .map(|id| {
                let point = Point {
                    id,
                    vector: vec![id as f32, 1.0, 0.0, 0.0],
                    lsn: 70 - 10 * id,
                    payload: None,
                };
                (id, point)
            })
            .collect();
        Points {
            info: CollectionInfo {
                name: "c".into(),
                id: CollectionId([4; 16]),
                dim: DIM,
                metric: Metric::L2,
                params: HnswParams::default(),
            },
            points,
            unreadable,
        }
    }

    /// Logged: points 1..=6 and 9 (deleted since), anchors 100 → [1, 2], 101 → [3, 4],
    /// 102 → [5, 6], 103 → [1, 9].
    fn logged() -> Manifest {
        let vectors = [1u64, 2, 3, 4, 5, 6, 9]
            .iter()
            .map(|&id| HeldVector {
                id,
                lsn: 70u64.saturating_sub(10 * id),
                bytes: vector_bytes(DIM, 0),
            })
            .collect();
        Manifest::from_inventory(
            &Inventory {
                collection_id: [4; 16],
                version: 3,
                vectors,
                anchors: vec![
                    (100, vec![1, 2]),
                    (101, vec![3, 4]),
                    (102, vec![5, 6]),
                    (103, vec![1, 9]),
                ],
            },
            DIM,
        )
    }

    fn members_of_restored(corpus: &Points, budget: u64) -> Vec<Vec<u64>> {
        let (_, inventory) = build(
            corpus,
            &logged(),
            |anchor| Some(vec![anchor as f32, 0.0, 0.0, 1.0]),
            4,
            budget,
        )
        .unwrap();
        let mut members: Vec<Vec<u64>> = inventory.anchors.into_iter().map(|(_, m)| m).collect();
        members.iter_mut().for_each(|m| m.sort_unstable());
        members.sort();
        members
    }

    #[test]
    fn an_anchor_is_restored_only_with_every_member_that_still_exists() {
        let everything = 10 * (vector_bytes(DIM, 0) + anchor_bytes(DIM, 2));
        // All read: every anchor, the one of a deleted member without it.
        assert_eq!(
            members_of_restored(&corpus(vec![]), everything),
            vec![vec![1], vec![1, 2], vec![3, 4], vec![5, 6]]
        );
        // The budget holds the four newest points: the anchor of the two oldest is left out.
        let four = 4 * vector_bytes(DIM, 0) + 3 * anchor_bytes(DIM, 2);
        assert_eq!(
            members_of_restored(&corpus(vec![]), four),
            vec![vec![1], vec![1, 2], vec![3, 4]]
        );
        // Nothing could be read: no anchor claims a neighbourhood the file lacks.
        assert!(members_of_restored(&corpus(vec![3]), everything).is_empty());
    }

    /// A new edge's first snapshot keeps the order it is given (the hottest first), leaves out
    /// what does not exist, and stops at its byte budget.
    #[test]
    fn a_seed_keeps_its_order_and_its_budget() {
        let corpus = corpus(Vec::new());
        let ids_of = |budget: u64| {
            let file = seed(&corpus, &[5, 2, 9, 6, 1], budget).unwrap();
            let snapshot = Snapshot::open(file).unwrap();
            assert_eq!(snapshot.header().spec.collection, CollectionId([4; 16]));
            assert_eq!(snapshot.view().manifest_version(), 0);
            snapshot.view().ids().to_vec()
        };
        assert_eq!(ids_of(u64::MAX), vec![5, 2, 6, 1], "9 does not exist");
        assert_eq!(ids_of(2 * vector_bytes(DIM, 0)), vec![5, 2], "two fit");
    }
}
