//! Snapshots of shards in the JetStream object store (docs/cluster.md, "Snapshots and
//! trimming"): the buckets, the pointer to the snapshot in force, and a snapshot's file. When
//! to write one, trimming the stream and catching a replica up from one are the store's
//! (`JetStreamLog`).
//!
//! * `P_SNAPSHOTS` (object store): object `<identity in hex>.<shard>.<position>`, a checkpoint
//!   file (`storage::checkpoint`, version 4) holding the shard's live points as of `position`
//!   and a cut naming that position and the collection's shard count;
//! * `P_SNAPSHOT_AT` (KV bucket): per shard (`<identity in hex>.<shard>`), the snapshot in
//!   force ([`Pointer`]), moved forward only, with compare-and-set.

use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, kv, object_store};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::config::ClusterConfig;
use super::membership::{hex, placement_key};
use super::placement::ShardKey;
use crate::storage::checkpoint::{
    self, CheckpointBody, ClusterCut, CollectionImage, Layout, ShardPosition,
};
use crate::storage::contract::ClusterError;

/// The two buckets.
pub(super) struct Snapshots {
    objects: object_store::ObjectStore,
    pointers: kv::Store,
}

/// The snapshot in force for one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Pointer {
    pub object: String,
    /// The shard's stream position the snapshot holds every entry through.
    pub position: u64,
    pub points: u64,
}

/// What publishing a snapshot did.
pub(super) enum Published {
    /// The pointer names it now; the stream may be trimmed below `trim_below`, the position
    /// of the snapshot it replaced (0: none).
    InForce { trim_below: u64 },
    /// The snapshot in force is as new (at this position).
    Stale(u64),
}

impl Snapshots {
    /// Creates (or opens) the buckets.
    pub(super) async fn open(
        js: &jetstream::Context,
        config: &ClusterConfig,
    ) -> Result<Snapshots, ClusterError> {
        let p = &config.prefix;
        let objects = js
            .create_object_store(object_store::Config {
                bucket: format!("{p}_SNAPSHOTS"),
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.stream_replicas(),
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Connect(format!("object store {p}_SNAPSHOTS: {e}")))?;
        let pointers = js
            .create_key_value(kv::Config {
                bucket: format!("{p}_SNAPSHOT_AT"),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.stream_replicas(),
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

    /// Uploads `file`, a snapshot of `key` at `position` holding `points`, and moves the
    /// pointer to it unless the one in force is as new; deletes the snapshot it replaces.
    pub(super) async fn publish(
        &self,
        key: ShardKey,
        file: &Path,
        position: u64,
        points: u64,
    ) -> Result<Published, String> {
        let current = self.pointer(key).await?;
        if let Some((p, _)) = current.as_ref().filter(|(p, _)| p.position >= position) {
            return Ok(Published::Stale(p.position));
        }
        let object = format!("{}.{}.{position}", hex(&key.0), key.1);
        let mut reader = tokio::fs::File::open(file)
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        self.objects
            .put(object.as_str(), &mut reader)
            .await
            .map_err(|e| format!("uploading snapshot {object}: {e}"))?;
        let pointer = Pointer {
            object: object.clone(),
            position,
            points,
        };
        let value = serde_json::to_vec(&pointer).expect("a pointer serialises");
        let moved = match &current {
            Some((_, revision)) => self
                .pointers
                .update(placement_key(key), value.into(), *revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => self
                .pointers
                .create(placement_key(key), value.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = moved {
            // Another node moved the pointer meanwhile: its snapshot stands.
            let _ = self.objects.delete(&object).await;
            return Err(format!("snapshot pointer of {object} not moved: {e}"));
        }
        let Some((old, _)) = current else {
            return Ok(Published::InForce { trim_below: 0 });
        };
        if let Err(e) = self.objects.delete(&old.object).await {
            warn!(object = old.object, error = %e, "replaced shard snapshot not deleted");
        }
        Ok(Published::InForce {
            trim_below: old.position,
        })
    }

    /// Downloads the snapshot in force for `key` into `file`, if it holds every entry
    /// through `needed`. Err when none does (the entries in between are nowhere).
    pub(super) async fn fetch(
        &self,
        key: ShardKey,
        needed: u64,
        file: &Path,
    ) -> Result<Pointer, String> {
        let name = placement_key(key);
        let Some((pointer, _)) = self.pointer(key).await? else {
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
        let mut object = self
            .objects
            .get(&pointer.object)
            .await
            .map_err(|e| format!("snapshot {}: {e}", pointer.object))?;
        let mut out = tokio::fs::File::create(file)
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        tokio::io::copy(&mut object, &mut out)
            .await
            .map_err(|e| format!("downloading snapshot {}: {e}", pointer.object))?;
        Ok(pointer)
    }
}

/// The folder, under a node's data folder `dir`, where shard `key`'s snapshot files are made.
pub(super) fn scratch(dir: &Path, key: ShardKey) -> Result<PathBuf, String> {
    let folder = dir
        .join("snapshots")
        .join(format!("{}-{}", hex(&key.0), key.1));
    std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    Ok(folder)
}

/// Writes `image`, shard `key` (of `shards`) at `position`, as a snapshot file in `folder`.
pub(super) fn write_file(
    folder: &Path,
    key: ShardKey,
    shards: u32,
    position: u64,
    image: CollectionImage,
    chunk_bytes: usize,
) -> Result<PathBuf, String> {
    let body = CheckpointBody {
        lsn: position,
        collections: vec![image],
        edge_caches: Vec::new(),
        models: Vec::new(),
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
    checkpoint::write(folder, &body, chunk_bytes).map_err(|e| e.to_string())
}

/// Reads a snapshot file of shard `key` at `position`: its points and the collection's
/// shard count; Err for a file that holds anything else.
pub(super) fn read_file(
    file: &Path,
    key: ShardKey,
    position: u64,
) -> Result<(CollectionImage, u32), String> {
    let body = checkpoint::read(file).map_err(|e| e.to_string())?;
    let cut = body.cluster.unwrap_or_default();
    let holds = cut
        .shards
        .first()
        .map(|s| (s.collection, s.shard, s.position));
    let layout = cut.layouts.first().map(|l| (l.collection, l.shards));
    match (
        holds,
        layout,
        <[CollectionImage; 1]>::try_from(body.collections),
    ) {
        (Some(h), Some((l, shards)), Ok([image]))
            if h == (key.0, key.1, position) && l == key.0 && image.id == key.0 =>
        {
            Ok((image, shards))
        }
        _ => Err(format!(
            "snapshot file {} does not hold shard {} at {position}",
            file.display(),
            placement_key(key)
        )),
    }
}
