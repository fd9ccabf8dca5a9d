//! What the cloud pushes into an edge's cache, and the manifest of what that cache holds, sans
//! IO (documented in `docs/protocol.md`, "Push").
//!
//! A [`Delta`] takes a cache from manifest version `version - 1` to `version`: vectors (with
//! payloads and LSNs) and anchors to add, vectors and anchors to evict, and tombstones for
//! vectors the cloud deleted or replaced. The cloud keeps, per edge, a [`Manifest`] of what it
//! has sent (a superset of what the edge holds, so that no invalidation is ever missed); the
//! edge keeps the same [`Manifest`] of what it has made durable. Both apply deltas with
//! [`Manifest::apply`], so they cannot disagree on what a delta means, and both count bytes
//! with [`vector_bytes`] and [`anchor_bytes`], the one byte model of the cache budget.
//!
//! Certificates (see `docs/protocol.md`, "Certified answers"): an anchor may carry a radius ρ
//! (Euclidean, on the prepared vectors) such that its members are exactly the corpus ids
//! within ρ of it; [`Certificate`]s shrink or drop radii as the corpus changes. Certificates
//! live for one connection: an edge forgets them when it (re)connects or restarts, and the
//! cloud keeps the state it maintains them with in the connection's push task.
//!
//! LSN rule: for one id, the higher LSN wins. A vector older than what the cache holds, or
//! than a tombstone it has seen, is ignored; a tombstone older than the held vector is ignored.
//! So replays and duplicates are harmless, and an invalidation that overtakes a push of the
//! vector it deletes still wins.

use std::collections::HashMap;

use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

/// Bytes a cached vector costs beside its components: id, LSN, the i8 codes (one byte per
/// component, counted in [`vector_bytes`]) and its share of the graph's neighbour lists
/// (2·M links of 4 bytes at M = 16 on layer 0).
pub const VECTOR_OVERHEAD_BYTES: u64 = 16 + 128;
/// Bytes an anchor costs beside its components and member ids: id and radius.
pub const ANCHOR_OVERHEAD_BYTES: u64 = 16;

/// The cache cost of one vector of `dim` components with a payload of `payload_len` bytes:
/// f32 components, i8 codes, payload text and [`VECTOR_OVERHEAD_BYTES`].
pub const fn vector_bytes(dim: usize, payload_len: usize) -> u64 {
    (dim as u64) * 5 + payload_len as u64 + VECTOR_OVERHEAD_BYTES
}

/// The cache cost of one anchor of `dim` components with `members` answer ids.
pub const fn anchor_bytes(dim: usize, members: usize) -> u64 {
    (dim as u64) * 4 + (members as u64) * 8 + ANCHOR_OVERHEAD_BYTES
}

/// An anchor's id: xxh3-64 of its prepared components' bytes, so that a snapshot, which stores
/// anchors' points but not their ids, gives them back the same ids.
pub fn anchor_id(vector: &[f32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(vector))
}

/// A vector pushed into a cache.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PushedVector {
    pub id: u64,
    pub lsn: u64,
    /// Components, already prepared for the collection's metric.
    pub vector: Vec<f32>,
    pub payload: Option<String>,
}

/// A past query whose answer the cloud supplied: its point, and the ids around it (all pushed
/// in the same delta or held already), nearest first.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PushedAnchor {
    pub anchor_id: u64,
    /// The query point, prepared for the metric.
    pub vector: Vec<f32>,
    pub members: Vec<u64>,
    /// Certified radius (Euclidean): `members` are exactly the corpus ids closer than this to
    /// `vector`. 0 when the anchor carries no certificate.
    pub radius: f32,
    /// When the anchor became hot in the cloud (Unix µs), for measuring push delay.
    pub hot_at_unix_us: u64,
}

/// A new radius and member list for a held anchor's certificate: smaller after a write inside
/// its ball, fewer members after a member was deleted or moved out; radius 0 drops it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Certificate {
    pub anchor_id: u64,
    pub radius: f32,
    pub members: Vec<u64>,
}

/// A vector the cache must stop returning: deleted, or replaced at `lsn`.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub id: u64,
    pub lsn: u64,
}

/// One step of a cache's manifest.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Delta {
    pub collection_id: [u8; 16],
    /// The collection's dimension and metric code, so that a delta log describes itself.
    pub dim: u32,
    pub metric: u8,
    /// The manifest version this delta produces; it applies to `version - 1`.
    pub version: u64,
    pub vectors: Vec<PushedVector>,
    pub anchors: Vec<PushedAnchor>,
    pub evict: Vec<u64>,
    pub evict_anchors: Vec<u64>,
    pub tombstones: Vec<Tombstone>,
    /// Certificate updates for anchors already held (applied after `anchors`).
    pub certificates: Vec<Certificate>,
    /// When the cloud sent it (Unix µs), for measuring invalidation delay.
    pub sent_at_unix_us: u64,
}

/// The most bytes of payload (JSON text) one point may carry. A point is pushed whole, so this
/// keeps any single point far inside the edge's frame limit (`protocol::DEFAULT_MAX_FRAME`,
/// 4 MiB) with its vector; the cloud refuses larger payloads when they are written.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Bytes that are not a [`Delta`] archive (bytecheck refused them).
#[derive(Debug, thiserror::Error)]
#[error("not a delta archive: {0}")]
pub struct UndecodableDelta(#[source] rkyv::rancor::Error);

impl Delta {
    /// The delta's rkyv archive (a delta-log record body).
    pub fn to_bytes(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .expect("serialising plain data into memory cannot fail")
            .to_vec()
    }

    /// Validates (bytecheck) and decodes an archive made by [`Delta::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Delta, UndecodableDelta> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Delta, rkyv::rancor::Error>(&aligned).map_err(UndecodableDelta)
    }

    /// Whether this delta only invalidates (tombstones and certificate updates, sent at once,
    /// not with the next push).
    pub fn is_invalidation(&self) -> bool {
        self.vectors.is_empty()
            && self.anchors.is_empty()
            && (!self.tombstones.is_empty() || !self.certificates.is_empty())
    }
}

/// One held vector, as an [`Inventory`] lists it.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldVector {
    pub id: u64,
    pub lsn: u64,
    /// Its cost in the byte model.
    pub bytes: u64,
}

/// What an edge's cache holds, sent when the cloud's idea of it may differ (the edge's
/// manifest version is not the cloud's): after a restart, a lost delta, or a cache set aside.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Inventory {
    pub collection_id: [u8; 16],
    pub version: u64,
    pub vectors: Vec<HeldVector>,
    /// Held anchors with their member ids.
    pub anchors: Vec<(u64, Vec<u64>)>,
}

/// The most items (held vectors, anchors and anchor members, all together) an inventory may
/// list: ~2 M held vectors, a cache far larger than an edge device holds, and an inventory the
/// cloud can still log as one WAL entry (24 bytes an item, under its 64 MiB entry limit). The
/// cloud refuses a larger one (`FrameTooLarge`), the edge does not send it.
pub const MAX_INVENTORY_ITEMS: usize = 2_000_000;

/// Archived bytes of an inventory's fixed part, and of each held vector, anchor and member
/// (rkyv's 32-bit layout: 16-byte id, version, two relative vector headers; `(u64, Vec<u64>)`
/// is a u64 and a vector header).
const INVENTORY_ROOT_BYTES: usize = 48;
const HELD_VECTOR_BYTES: usize = 24;
const ANCHOR_BYTES: usize = 16;
const MEMBER_BYTES: usize = 8;

impl Inventory {
    /// Held vectors, anchors and anchor members together (what [`MAX_INVENTORY_ITEMS`] bounds).
    pub fn items(&self) -> usize {
        self.vectors.len()
            + self.anchors.len()
            + self.anchors.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    /// An upper bound on the bytes of its archive (alignment padding included).
    pub fn archived_bytes(&self) -> usize {
        INVENTORY_ROOT_BYTES
            + self.vectors.len() * HELD_VECTOR_BYTES
            + self
                .anchors
                .iter()
                .map(|(_, m)| ANCHOR_BYTES + m.len() * MEMBER_BYTES + MEMBER_BYTES)
                .sum::<usize>()
    }

    /// Splits the inventory into parts whose archives each take at most `max_bytes` (same
    /// collection and version in every part; vectors first, then anchors, in order), so that
    /// an inventory larger than a frame can be sent as several. Always at least one part; an
    /// anchor whose members alone exceed `max_bytes` makes a part of its own that does.
    pub fn split(self, max_bytes: usize) -> Vec<Inventory> {
        let empty = || Inventory {
            collection_id: self.collection_id,
            version: self.version,
            ..Inventory::default()
        };
        let mut parts = vec![empty()];
        for held in self.vectors.iter().copied() {
            let last = parts.last_mut().expect("never empty");
            if last.archived_bytes() + HELD_VECTOR_BYTES > max_bytes && last.items() > 0 {
                parts.push(empty());
            }
            parts.last_mut().expect("never empty").vectors.push(held);
        }
        for anchor in self.anchors.iter().cloned() {
            let cost = ANCHOR_BYTES + (anchor.1.len() + 1) * MEMBER_BYTES;
            let last = parts.last_mut().expect("never empty");
            if last.archived_bytes() + cost > max_bytes && last.items() > 0 {
                parts.push(empty());
            }
            parts.last_mut().expect("never empty").anchors.push(anchor);
        }
        parts
    }

    /// Appends a later part of the same inventory (see [`Inventory::split`]).
    pub fn extend(&mut self, part: Inventory) {
        self.vectors.extend(part.vectors);
        self.anchors.extend(part.anchors);
    }
}

/// What a delta does to a manifest, without the vectors' contents: what the cloud logs (in
/// its WAL) for each delta it sends, so that a restarted cloud still knows what each edge may
/// hold. Tombstoned ids count as removed.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ManifestStep {
    pub version: u64,
    pub added: Vec<HeldVector>,
    pub removed: Vec<u64>,
    pub anchors_added: Vec<(u64, Vec<u64>)>,
    pub anchors_removed: Vec<u64>,
}

/// The cache an edge announces in its Hello.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CacheAnnouncement {
    pub collection: String,
    /// Identity of the collection the cache belongs to (all zero for a cache never filled).
    pub collection_id: [u8; 16],
    pub version: u64,
    /// The most bytes (in the byte model) the cloud may make the cache hold.
    pub budget_bytes: u64,
    /// Whether the edge wants certificates with its anchors (an option of its collection).
    pub certify: bool,
}

/// Why a delta cannot be applied.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PushError {
    #[error("delta {got} does not follow manifest version {have}; the cache must resync")]
    OutOfOrder { have: u64, got: u64 },
    #[error("delta for another collection (the cache belongs to a different incarnation)")]
    WrongCollection,
    #[error("pushed vector {id} has {got} components, the collection {dim}")]
    Dimension { id: u64, got: usize, dim: usize },
    #[error("pushed vector {id} has a NaN or infinite component")]
    NotFinite { id: u64 },
    #[error("anchor {anchor} has a negative or NaN certificate radius")]
    BadRadius { anchor: u64 },
}

/// A held vector in a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub lsn: u64,
    pub bytes: u64,
}

/// What changed when a delta was applied: the caller's overlay follows these.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// Indexes into `delta.vectors` that were taken (the rest lost to a higher LSN).
    pub vectors: Vec<usize>,
    /// Ids no longer returned (evicted, or tombstoned at or above their LSN).
    pub removed: Vec<u64>,
    pub anchors_added: Vec<u64>,
    pub anchors_removed: Vec<u64>,
    /// Indexes into `delta.certificates` whose anchor is held (the rest were ignored).
    pub certificates: Vec<usize>,
}

/// What a cache holds: ids with LSNs, anchors, tombstones seen, and its byte count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifest {
    pub collection_id: [u8; 16],
    pub version: u64,
    held: HashMap<u64, Held>,
    anchors: HashMap<u64, Vec<u64>>,
    /// Highest LSN at which each id was deleted or replaced, as far as this cache has heard.
    tombstones: HashMap<u64, u64>,
    /// Saturating: a manifest may be rebuilt from an inventory an edge sent.
    bytes: u64,
}

impl Manifest {
    pub fn new(collection_id: [u8; 16], version: u64) -> Manifest {
        Manifest {
            collection_id,
            version,
            ..Manifest::default()
        }
    }

    /// A manifest exactly as an inventory describes it.
    pub fn from_inventory(inv: &Inventory, dim: usize) -> Manifest {
        let mut m = Manifest::new(inv.collection_id, inv.version);
        for v in &inv.vectors {
            m.insert(v.id, v.lsn, v.bytes);
        }
        for (anchor, members) in &inv.anchors {
            m.bytes = m.bytes.saturating_add(anchor_bytes(dim, members.len()));
            m.anchors.insert(*anchor, members.clone());
        }
        m
    }

    /// The inventory describing this manifest (ids in ascending order).
    pub fn inventory(&self) -> Inventory {
        let mut vectors: Vec<HeldVector> = self
            .held
            .iter()
            .map(|(&id, h)| HeldVector {
                id,
                lsn: h.lsn,
                bytes: h.bytes,
            })
            .collect();
        vectors.sort_unstable_by_key(|v| v.id);
        let mut anchors: Vec<(u64, Vec<u64>)> =
            self.anchors.iter().map(|(a, m)| (*a, m.clone())).collect();
        anchors.sort_unstable_by_key(|(a, _)| *a);
        Inventory {
            collection_id: self.collection_id,
            version: self.version,
            vectors,
            anchors,
        }
    }

    /// Records a held vector (used when a snapshot is opened).
    pub fn insert(&mut self, id: u64, lsn: u64, bytes: u64) {
        if let Some(old) = self.held.insert(id, Held { lsn, bytes }) {
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Records a held anchor (used when a snapshot is opened).
    pub fn insert_anchor(&mut self, anchor: u64, members: Vec<u64>, dim: usize) {
        self.bytes = self.bytes.saturating_add(anchor_bytes(dim, members.len()));
        if let Some(old) = self.anchors.insert(anchor, members) {
            self.bytes = self.bytes.saturating_sub(anchor_bytes(dim, old.len()));
        }
    }

    pub fn held(&self, id: u64) -> Option<Held> {
        self.held.get(&id).copied()
    }

    pub fn holds_anchor(&self, anchor: u64) -> bool {
        self.anchors.contains_key(&anchor)
    }

    /// A held anchor's member ids.
    pub fn anchor_members(&self, anchor: u64) -> Option<&[u64]> {
        self.anchors.get(&anchor).map(Vec::as_slice)
    }

    pub fn anchors(&self) -> impl Iterator<Item = (u64, &[u64])> {
        self.anchors.iter().map(|(a, m)| (*a, m.as_slice()))
    }

    pub fn ids(&self) -> impl Iterator<Item = (u64, Held)> + '_ {
        self.held.iter().map(|(&id, &h)| (id, h))
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn anchor_count(&self) -> usize {
        self.anchors.len()
    }

    /// Bytes held, in the byte model.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Forgets the tombstones (after a compaction, when no push built before them can still
    /// arrive on the connection that follows a restart).
    pub fn clear_tombstones(&mut self) {
        self.tombstones.clear();
    }

    /// Applies a logged step (the cloud's side: no LSN comparison, the step is what was sent).
    pub fn apply_step(&mut self, step: &ManifestStep, dim: usize) {
        for id in &step.removed {
            if let Some(h) = self.held.remove(id) {
                self.bytes = self.bytes.saturating_sub(h.bytes);
            }
        }
        for anchor in &step.anchors_removed {
            if let Some(members) = self.anchors.remove(anchor) {
                self.bytes = self.bytes.saturating_sub(anchor_bytes(dim, members.len()));
            }
        }
        for v in &step.added {
            self.insert(v.id, v.lsn, v.bytes);
        }
        for (anchor, members) in &step.anchors_added {
            self.insert_anchor(*anchor, members.clone(), dim);
        }
        self.version = step.version;
    }

    /// Checks a delta's order, collection and vectors without changing anything.
    pub fn check(&self, delta: &Delta, dim: usize) -> Result<(), PushError> {
        if delta.version != self.version + 1 {
            return Err(PushError::OutOfOrder {
                have: self.version,
                got: delta.version,
            });
        }
        if delta.collection_id != self.collection_id {
            return Err(PushError::WrongCollection);
        }
        for v in &delta.vectors {
            if v.vector.len() != dim {
                return Err(PushError::Dimension {
                    id: v.id,
                    got: v.vector.len(),
                    dim,
                });
            }
            if !v.vector.iter().all(|x| x.is_finite()) {
                return Err(PushError::NotFinite { id: v.id });
            }
        }
        for a in &delta.anchors {
            if a.vector.len() != dim || !a.vector.iter().all(|x| x.is_finite()) {
                return Err(PushError::Dimension {
                    id: a.anchor_id,
                    got: a.vector.len(),
                    dim,
                });
            }
        }
        let radii = delta.anchors.iter().map(|a| (a.anchor_id, a.radius));
        let updates = delta.certificates.iter().map(|c| (c.anchor_id, c.radius));
        if let Some((anchor, _)) = radii.chain(updates).find(|(_, r)| r.is_nan() || *r < 0.0) {
            return Err(PushError::BadRadius { anchor });
        }
        Ok(())
    }

    /// Applies `delta` (after [`Manifest::check`]): evictions, then tombstones, then vectors
    /// (each only if its LSN is the highest seen for its id), then anchors.
    pub fn apply(&mut self, delta: &Delta, dim: usize) -> Result<Applied, PushError> {
        self.check(delta, dim)?;
        let mut applied = Applied::default();
        for &id in &delta.evict {
            if let Some(h) = self.held.remove(&id) {
                self.bytes = self.bytes.saturating_sub(h.bytes);
                applied.removed.push(id);
            }
        }
        for &anchor in &delta.evict_anchors {
            if let Some(members) = self.anchors.remove(&anchor) {
                self.bytes = self.bytes.saturating_sub(anchor_bytes(dim, members.len()));
                applied.anchors_removed.push(anchor);
            }
        }
        for t in &delta.tombstones {
            let seen = self.tombstones.entry(t.id).or_insert(0);
            *seen = (*seen).max(t.lsn);
            if self.held.get(&t.id).is_some_and(|h| h.lsn <= t.lsn)
                && let Some(h) = self.held.remove(&t.id)
            {
                self.bytes = self.bytes.saturating_sub(h.bytes);
                applied.removed.push(t.id);
            }
        }
        for (i, v) in delta.vectors.iter().enumerate() {
            let newest_known = self
                .held
                .get(&v.id)
                .map(|h| h.lsn)
                .into_iter()
                .chain(self.tombstones.get(&v.id).copied())
                .max();
            if newest_known.is_some_and(|lsn| lsn >= v.lsn) {
                continue;
            }
            let bytes = vector_bytes(dim, v.payload.as_ref().map_or(0, String::len));
            self.insert(v.id, v.lsn, bytes);
            applied.vectors.push(i);
        }
        for a in &delta.anchors {
            if !self.anchors.contains_key(&a.anchor_id) {
                applied.anchors_added.push(a.anchor_id);
            }
            self.insert_anchor(a.anchor_id, a.members.clone(), dim);
        }
        for (i, c) in delta.certificates.iter().enumerate() {
            if self.anchors.contains_key(&c.anchor_id) {
                self.insert_anchor(c.anchor_id, c.members.clone(), dim);
                applied.certificates.push(i);
            }
        }
        self.version = delta.version;
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DIM: usize = 2;

    fn vector(id: u64, lsn: u64) -> PushedVector {
        PushedVector {
            id,
            lsn,
            vector: vec![id as f32, 1.0],
            payload: Some(format!("p{id}")),
        }
    }

    fn delta(version: u64) -> Delta {
        Delta {
            collection_id: [1; 16],
            version,
            ..Delta::default()
        }
    }

    #[test]
    fn deltas_apply_in_order_and_count_bytes() {
        let mut m = Manifest::new([1; 16], 0);
        let mut d = delta(1);
        d.vectors = vec![vector(10, 5), vector(11, 6)];
        d.anchors = vec![PushedAnchor {
            anchor_id: 7,
            vector: vec![0.0, 1.0],
            members: vec![10, 11],
            radius: 0.0,
            hot_at_unix_us: 0,
        }];
        let applied = m.apply(&d, DIM).unwrap();
        assert_eq!(applied.vectors, vec![0, 1]);
        assert_eq!(applied.anchors_added, vec![7]);
        assert_eq!(
            m.bytes(),
            vector_bytes(DIM, 3) * 2 + anchor_bytes(DIM, 2),
            "one byte model"
        );
        assert_eq!(
            m.apply(&d, DIM),
            Err(PushError::OutOfOrder { have: 1, got: 1 })
        );
        assert_eq!(
            m.apply(&delta(3), DIM),
            Err(PushError::OutOfOrder { have: 1, got: 3 })
        );
        let mut other = delta(2);
        other.collection_id = [2; 16];
        assert_eq!(m.apply(&other, DIM), Err(PushError::WrongCollection));
        let mut bad = delta(2);
        bad.vectors = vec![PushedVector {
            vector: vec![f32::NAN, 0.0],
            ..vector(1, 1)
        }];
        assert_eq!(m.apply(&bad, DIM), Err(PushError::NotFinite { id: 1 }));
        assert_eq!(m.version, 1, "a refused delta changes nothing");

        let mut evict = delta(2);
        evict.evict = vec![10, 99];
        evict.evict_anchors = vec![7];
        let applied = m.apply(&evict, DIM).unwrap();
        assert_eq!(applied.removed, vec![10]);
        assert_eq!(m.bytes(), vector_bytes(DIM, 3));
        assert_eq!(Manifest::from_inventory(&m.inventory(), DIM), {
            let mut expected = m.clone();
            expected.clear_tombstones();
            expected
        });
    }

    #[test]
    fn the_higher_lsn_wins_whatever_the_order() {
        // An invalidation that overtakes the push of an older version of the same vector.
        let mut m = Manifest::new([1; 16], 0);
        let mut inval = delta(1);
        inval.tombstones = vec![Tombstone { id: 5, lsn: 9 }];
        assert!(inval.is_invalidation());
        m.apply(&inval, DIM).unwrap();
        let mut stale_push = delta(2);
        stale_push.vectors = vec![vector(5, 8)];
        assert!(m.apply(&stale_push, DIM).unwrap().vectors.is_empty());
        assert_eq!(m.held(5), None);
        let mut newer = delta(3);
        newer.vectors = vec![vector(5, 10)];
        assert_eq!(m.apply(&newer, DIM).unwrap().vectors, vec![0]);
        // A tombstone older than the held vector does nothing.
        let mut old_tomb = delta(4);
        old_tomb.tombstones = vec![Tombstone { id: 5, lsn: 9 }];
        assert!(m.apply(&old_tomb, DIM).unwrap().removed.is_empty());
        assert_eq!(m.held(5).map(|h| h.lsn), Some(10));
    }

    fn archive_len(inventory: &Inventory) -> usize {
        rkyv::to_bytes::<rkyv::rancor::Error>(inventory)
            .unwrap()
            .len()
    }

    /// 300k held vectors (7 MiB archived) and anchors go as parts that each fit a 4 MiB frame
    /// and join back into the same inventory.
    #[test]
    fn a_large_inventory_splits_into_parts_under_the_limit() {
        let whole = Inventory {
            collection_id: [3; 16],
            version: 9,
            vectors: (0..300_000)
                .map(|id| HeldVector {
                    id,
                    lsn: id + 1,
                    bytes: 40,
                })
                .collect(),
            anchors: (0..2_000).map(|a| (a, (0..a % 50).collect())).collect(),
        };
        assert!(archive_len(&whole) > crate::protocol::frame::DEFAULT_MAX_FRAME);
        assert!(archive_len(&whole) <= whole.archived_bytes());
        let parts = whole
            .clone()
            .split(crate::protocol::frame::DEFAULT_MAX_FRAME);
        assert_eq!(parts.len(), 2);
        let mut joined = Inventory::default();
        for part in &parts {
            assert!(archive_len(part) <= crate::protocol::frame::DEFAULT_MAX_FRAME);
            assert_eq!((part.collection_id, part.version), ([3; 16], 9));
        }
        joined.collection_id = [3; 16];
        joined.version = 9;
        for part in parts {
            joined.extend(part);
        }
        assert_eq!(joined, whole);
        assert_eq!(Inventory::default().split(100).len(), 1);
    }

    proptest! {
        /// Any inventory: every part's archive within the budget (unless one anchor alone is
        /// larger) and its bound true; the parts join back into the whole.
        #[test]
        fn inventories_split_within_the_budget(
            vectors in 0usize..400,
            anchors in proptest::collection::vec(0usize..30, 0..40),
            budget in 128usize..2_000,
        ) {
            let whole = Inventory {
                collection_id: [1; 16],
                version: 2,
                vectors: (0..vectors as u64).map(|id| HeldVector { id, lsn: id, bytes: 1 }).collect(),
                anchors: anchors.iter().enumerate().map(|(i, n)| (i as u64, (0..*n as u64).collect())).collect(),
            };
            let mut joined = Inventory { collection_id: [1; 16], version: 2, ..Inventory::default() };
            for part in whole.clone().split(budget) {
                let len = archive_len(&part);
                prop_assert!(len <= part.archived_bytes());
                prop_assert!(len <= budget || (part.vectors.is_empty() && part.anchors.len() == 1));
                joined.extend(part);
            }
            prop_assert_eq!(joined, whole);
        }
    }

    proptest! {
        /// Whatever mix of pushes and tombstones, an id is held iff its highest-LSN event is a
        /// push, and at that LSN; the byte count is the sum over held ids.
        #[test]
        fn holdings_follow_the_highest_lsn(
            events in proptest::collection::vec((0u64..6, 1u64..40, any::<bool>()), 1..60)
        ) {
            let mut m = Manifest::new([1; 16], 0);
            let mut newest: HashMap<u64, (u64, bool)> = HashMap::new();
            for (version, (id, lsn, is_push)) in events.into_iter().enumerate() {
                let mut d = delta(version as u64 + 1);
                if is_push {
                    d.vectors.push(vector(id, lsn));
                } else {
                    d.tombstones.push(Tombstone { id, lsn });
                }
                m.apply(&d, DIM).unwrap();
                let e = newest.entry(id).or_insert((lsn, is_push));
                // On an LSN tie a tombstone wins (a delete at the vector's own LSN removes it).
                if lsn > e.0 || (lsn == e.0 && !is_push) {
                    *e = (lsn, is_push);
                }
            }
            let mut bytes = 0;
            for (id, (lsn, pushed)) in newest {
                let held = m.held(id);
                prop_assert_eq!(held.map(|h| h.lsn), pushed.then_some(lsn));
                bytes += held.map_or(0, |h| h.bytes);
            }
            prop_assert_eq!(m.bytes(), bytes);
        }
    }
}
