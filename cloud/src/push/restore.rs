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

/// Points read per batch while building a restore.
const RESTORE_BATCH: usize = 512;

/// A snapshot file of what `logged` held, at the points' current versions (deleted ones left
/// out), with the anchors whose points `anchor_vector` still knows, all within `budget` bytes
/// of the byte model (vectors first, newest first), at manifest `version`; and the inventory that file is (what the
/// edge's manifest will be once it installs it).
pub fn build(
    collection: &impl Corpus,
    logged: &Manifest,
    anchor_vector: impl Fn(u64) -> Option<Vec<f32>>,
    version: u64,
    budget: u64,
) -> Result<(AlignedVec, Inventory), RestoreError> {
    let info = collection.info();
    let dim = info.dim;
    let spec = SnapshotSpec {
        collection: info.id,
        dim: dim as u32,
        metric: info.metric,
        params: info.params,
    };
    let mut writer = SnapshotWriter::new(spec, &info.name, Payloads::Text);
    let mut held: Vec<(u64, u64)> = logged.ids().map(|(id, h)| (id, h.lsn)).collect();
    // Deterministic order, newest first, so a smaller budget keeps the freshest.
    held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut used = 0u64;
    let mut kept = std::collections::HashSet::new();
    // Read in batches (on a cluster, one request per node and batch); a batch that cannot be
    // read whole (a shard without a live replica) leaves its points out of the restore.
    'fill: for batch in held.chunks(RESTORE_BATCH) {
        let ids: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
        let points = collection.get_many(&ids, true).unwrap_or_default();
        for point in points.into_iter().flatten() {
            let payload = point.payload.as_deref().unwrap_or_default();
            let cost = vector_bytes(dim, payload.len());
            if used + cost > budget {
                break 'fill;
            }
            writer.push(point.id, point.lsn, &point.vector, Some(payload))?;
            used += cost;
            kept.insert(point.id);
        }
    }
    for (anchor, members) in logged.anchors() {
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
    let file = writer.finish()?;
    // The inventory is read back from the file itself, exactly as the edge will read it.
    let opened = Snapshot::open(file)?;
    let inventory = LocalCache::over_snapshot(&opened.view())
        .manifest()
        .inventory();
    Ok((opened.into_inner(), inventory))
}
