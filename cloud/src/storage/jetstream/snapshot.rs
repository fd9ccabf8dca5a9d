//! Snapshots of shards in the JetStream object store, and trimming the shard streams below
//! them (docs/cluster.md, "Snapshots and trimming").
//!
//! * `P_SNAPSHOTS` (object store): object `<identity in hex>.<shard>.<position>`, a checkpoint
//!   file (`storage::checkpoint`, version 4) holding the shard's live points as of `position`
//!   and a cut naming that position;
//! * `P_SNAPSHOT_AT` (KV bucket): per shard (`<identity in hex>.<shard>`), the snapshot in
//!   force ([`Pointer`]), moved forward only, with compare-and-set.
//!
//! A shard's first placed node writes a snapshot every `cluster.snapshot_entries` entries of
//! its stream; once the pointer names it, the stream is purged below the position of the
//! snapshot before it. A replica trailing by less than one interval follows on from the
//! stream; one further behind (a node back after long, a new replica) finds the stream
//! starting after the next position it needs, loads the snapshot in force and follows on
//! from its position. So the stream is trimmed only below a snapshot that exists, and no
//! entry a replica needs is ever only in a trimmed part.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::jetstream::{kv, object_store};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::membership::{hex, placement_key};
use super::placement::ShardKey;
use super::{Shared, stream_if_present};
use crate::storage::checkpoint::{self, CheckpointBody, ClusterCut, Layout, ShardPosition};
use crate::storage::contract::ClusterError;
use crate::storage::entry::LogName;

/// The two buckets.
pub(super) struct Snapshots {
    objects: object_store::ObjectStore,
    pointers: kv::Store,
}

/// The snapshot in force for one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Pointer {
    object: String,
    /// The shard's stream position the snapshot holds every entry through.
    position: u64,
    points: u64,
    /// The position of the snapshot in force before it (0: none): the stream is kept from
    /// there on.
    previous: u64,
}

impl Snapshots {
    /// Creates (or opens) the buckets.
    pub(super) async fn open(shared: &Shared) -> Result<Snapshots, ClusterError> {
        let p = &shared.config.prefix;
        let replicas = shared.config.stream_replicas();
        let objects = shared
            .js
            .create_object_store(object_store::Config {
                bucket: format!("{p}_SNAPSHOTS"),
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Connect(format!("object store {p}_SNAPSHOTS: {e}")))?;
        let pointers = shared
            .js
            .create_key_value(kv::Config {
                bucket: format!("{p}_SNAPSHOT_AT"),
                history: 1,
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Connect(format!("bucket {p}_SNAPSHOT_AT: {e}")))?;
        Ok(Snapshots { objects, pointers })
    }

    /// The snapshot in force for `key` and its KV revision.
    async fn pointer(&self, key: ShardKey) -> Result<Option<(Pointer, u64)>, String> {
        let Some(entry) = self
            .pointers
            .entry(placement_key(key))
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let pointer = serde_json::from_slice(&entry.value)
            .map_err(|e| format!("snapshot pointer of {}: {e}", placement_key(key)))?;
        Ok(Some((pointer, entry.revision)))
    }

    /// The position of the snapshot in force for `key` (0: none).
    pub(super) async fn position(&self, key: ShardKey) -> Result<u64, String> {
        Ok(self.pointer(key).await?.map_or(0, |(p, _)| p.position))
    }
}

/// A file of this node's snapshot folder, for one shard.
fn scratch(shared: &Shared, key: ShardKey, what: &str) -> Result<PathBuf, String> {
    let dir = shared.dir.join("snapshots");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir.join(format!("{what}-{}-{}", hex(&key.0), key.1)))
}

/// Writes a snapshot of shard `key` (of a collection of `shards`) as this node applied it,
/// moves the pointer to it, deletes the snapshot it replaces and trims the stream below that
/// one's position. Does nothing when the snapshot in force is as new.
pub(super) async fn write(shared: &Arc<Shared>, key: ShardKey, shards: u32) -> Result<(), String> {
    let snapshots = shared.snapshots.get().ok_or("no snapshot buckets")?;
    let log = LogName::Shard(key.0, key.1);
    let taken = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let lock = shared.log_lock(log);
            let _applying = lock.lock();
            let position = shared.applied(log);
            let image = shared.state.shard_image(key.0, shards, key.1)?;
            Some((position, image))
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let Some((position, image)) = taken else {
        return Ok(());
    };
    let current = snapshots.pointer(key).await?;
    if let Some((p, _)) = current.as_ref().filter(|(p, _)| p.position >= position) {
        let mut known = shared.snapshot_at.lock();
        let known = known.entry(key).or_default();
        *known = (*known).max(p.position);
        return Ok(());
    }
    let points = image.ids.len() as u64;
    let folder = scratch(shared, key, "write")?;
    let body = CheckpointBody {
        lsn: position,
        collections: vec![image],
        edge_caches: Vec::new(),
        cluster: Some(ClusterCut {
            shards: vec![ShardPosition {
                collection: key.0,
                shard: key.1,
                position,
            }],
            layouts: vec![Layout {
                collection: key.0,
                shards,
            }],
            ..ClusterCut::default()
        }),
    };
    let chunk_bytes = shared.checkpoint_chunk_bytes;
    let file = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        checkpoint::write(&folder, &body, chunk_bytes).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let object = format!("{}.{}.{position}", hex(&key.0), key.1);
    let uploaded = upload(snapshots, &object, &file).await;
    let _ = std::fs::remove_file(&file);
    uploaded?;
    let previous = current.as_ref().map_or(0, |(p, _)| p.position);
    let pointer = Pointer {
        object: object.clone(),
        position,
        points,
        previous,
    };
    let value = serde_json::to_vec(&pointer).expect("a pointer serialises");
    let moved = match &current {
        Some((_, revision)) => snapshots
            .pointers
            .update(placement_key(key), value.into(), *revision)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => snapshots
            .pointers
            .create(placement_key(key), value.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = moved {
        // Another node moved the pointer meanwhile: its snapshot stands.
        let _ = snapshots.objects.delete(&object).await;
        return Err(format!("snapshot pointer of {object} not moved: {e}"));
    }
    *shared.snapshot_at.lock().entry(key).or_default() = position;
    info!(collection = %hex(&key.0), shard = key.1, position, points, "shard snapshot written");
    if let Some((old, _)) = current {
        if old.object != object
            && let Err(e) = snapshots.objects.delete(&old.object).await
        {
            warn!(object = old.object, error = %e, "replaced shard snapshot not deleted");
        }
        if old.previous > 0 {
            trim(shared, key, old.previous).await?;
        }
    }
    Ok(())
}

/// Purges the entries of shard `key`'s stream below position `through` (which is kept).
async fn trim(shared: &Shared, key: ShardKey, through: u64) -> Result<(), String> {
    let name = shared.shard_stream(key);
    let Some(stream) = stream_if_present(shared, &name).await? else {
        return Ok(());
    };
    let purged = stream
        .purge()
        .sequence(through)
        .await
        .map_err(|e| format!("trimming {name} below {through}: {e}"))?;
    info!(
        stream = name,
        below = through,
        entries = purged.purged,
        "stream trimmed below a snapshot's position"
    );
    metrics::counter!("tiervec_cluster_entries_trimmed_total").increment(purged.purged);
    Ok(())
}

async fn upload(snapshots: &Snapshots, object: &str, file: &Path) -> Result<(), String> {
    let mut reader = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    snapshots
        .objects
        .put(object, &mut reader)
        .await
        .map_err(|e| format!("uploading snapshot {object}: {e}"))?;
    Ok(())
}

/// Brings shard `key` up to the snapshot in force, whose position must reach `needed` (the
/// stream's first position, less one). Err when no snapshot covers it (the entries in between
/// are nowhere), or when the collection is not known here yet (the caller tries again).
pub(super) async fn restore(
    shared: &Arc<Shared>,
    key: ShardKey,
    needed: u64,
) -> Result<(), String> {
    let snapshots = shared.snapshots.get().ok_or("no snapshot buckets")?;
    let name = format!("{}.{}", hex(&key.0), key.1);
    let Some((pointer, _)) = snapshots.pointer(key).await? else {
        return Err(format!(
            "shard {name}'s stream was trimmed below position {needed} and no snapshot of it exists"
        ));
    };
    if pointer.position < needed {
        return Err(format!(
            "shard {name}'s snapshot holds positions through {}, but its stream starts after {needed}",
            pointer.position
        ));
    }
    let file = scratch(shared, key, "restore")?;
    let mut object = snapshots
        .objects
        .get(&pointer.object)
        .await
        .map_err(|e| format!("snapshot {}: {e}", pointer.object))?;
    let mut out = tokio::fs::File::create(&file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    tokio::io::copy(&mut object, &mut out)
        .await
        .map_err(|e| format!("downloading snapshot {}: {e}", pointer.object))?;
    drop(out);
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let body = checkpoint::read(&file);
        let _ = std::fs::remove_file(&file);
        let body = body.map_err(|e| e.to_string())?;
        let cut = body.cluster.unwrap_or_default();
        let holds = cut
            .shards
            .first()
            .map(|s| (s.collection, s.shard, s.position));
        let layout = cut.layouts.first().map(|l| (l.collection, l.shards));
        let (image, shards) = match (holds, layout, body.collections.as_slice()) {
            (Some((c, s, p)), Some((l, shards)), [image])
                if (c, s, p) == (key.0, key.1, pointer.position)
                    && l == key.0
                    && image.id == key.0 =>
            {
                (image, shards)
            }
            _ => {
                return Err(format!(
                    "snapshot {} does not hold shard {name} at {}",
                    pointer.object, pointer.position
                ));
            }
        };
        let log = LogName::Shard(key.0, key.1);
        let lock = shared.log_lock(log);
        let _applying = lock.lock();
        let from = shared.applied(log);
        if from < pointer.position {
            if !shared
                .state
                .replace_shard(image, shards, key.1, from, pointer.position)
            {
                return Err(format!("shard {name}'s collection is not known here yet"));
            }
            shared.set_applied(log, pointer.position);
            info!(
                shard = name,
                from,
                position = pointer.position,
                points = pointer.points,
                "shard caught up from its snapshot"
            );
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}
