//! The bodies of write-ahead-log records (format version 1; the framing is
//! `tiervec_shared::log`, documented together in `docs/wal.md`).
//!
//! A body is an rkyv archive of [`WalEntry`], validated with bytecheck on replay like any
//! untrusted bytes. Entries are already-validated writes: replaying them is deterministic.
//! Each names the log a replicated store keeps it in ([`LogName`]).

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use tiervec_shared::push::{Inventory, ManifestStep};

/// One log of a store. The embedded store has one log for everything; a replicated store has a
/// catalog log and one per shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogName {
    /// The embedded store's WAL, which carries every entry.
    Embedded,
    /// Creates, drops and edge-cache steps.
    Catalog,
    /// The writes of one shard (by number) of one collection (by identity).
    Shard([u8; 16], u32),
}

/// One logged write.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum WalEntry {
    /// A collection was created with this identity and parameters.
    CreateCollection {
        name: String,
        id: [u8; 16],
        dim: u32,
        metric: u8,
        m: u32,
        ef_construction: u32,
        seed: u64,
    },
    /// The collection with this identity was dropped.
    DropCollection { name: String, id: [u8; 16] },
    /// Points were inserted or replaced: `ids.len()` points, `vectors` row-major (already
    /// prepared for the metric), one optional JSON payload text each.
    Upsert {
        collection: [u8; 16],
        ids: Vec<u64>,
        vectors: Vec<f32>,
        payloads: Vec<Option<String>>,
    },
    /// Points were deleted (absent ids are no-ops).
    Delete { collection: [u8; 16], ids: Vec<u64> },
    /// A delta is about to be pushed to `edge`'s cache of `collection` (logged before it is
    /// sent, so the cloud's manifest is a superset of what the edge holds).
    EdgeStep {
        edge: String,
        collection: [u8; 16],
        step: ManifestStep,
    },
    /// `edge` said its cache of `collection` holds exactly this (a resync).
    EdgeReset {
        edge: String,
        collection: [u8; 16],
        inventory: Inventory,
    },
    /// The collection with this identity holds embeddings of texts by this model (logged
    /// right after its create): text queries are embedded only by the same model. Added
    /// after the other variants and smaller than the largest, so the archived entry keeps its
    /// size and every older record still decodes.
    SetModel {
        collection: [u8; 16],
        name: String,
        dim: u32,
        checksum: u64,
    },
}

/// A record body that is not a [`WalEntry`] archive (bytecheck refused it).
#[derive(Debug, thiserror::Error)]
#[error("not a WAL entry: {0}")]
pub struct UndecodableEntry(#[source] rancor::Error);

impl WalEntry {
    /// The record body for this entry.
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rancor::Error>(self)
            .expect("serialising plain data into memory cannot fail")
            .to_vec()
    }

    /// Validates and decodes a record body.
    pub fn decode(body: &[u8]) -> Result<WalEntry, UndecodableEntry> {
        let mut aligned = AlignedVec::<16>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        rkyv::from_bytes::<WalEntry, rancor::Error>(&aligned).map_err(UndecodableEntry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records are decoded from the end of their bytes, where the root is: an entry type of
    /// another archived size would misread every record written before it.
    #[test]
    fn the_archived_entry_keeps_its_size() {
        assert_eq!(
            std::mem::size_of::<ArchivedWalEntry>(),
            ARCHIVED_ENTRY_BYTES
        );
    }

    /// The archived size of [`WalEntry`] in format version 1.
    const ARCHIVED_ENTRY_BYTES: usize = 72;

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let e = WalEntry::Upsert {
            collection: [7; 16],
            ids: vec![1, 2],
            vectors: vec![0.5; 8],
            payloads: vec![Some("{\"a\":1}".into()), None],
        };
        assert_eq!(WalEntry::decode(&e.encode()).unwrap(), e);
        assert!(WalEntry::decode(&[0xff; 40]).is_err());
        let model = WalEntry::SetModel {
            collection: [9; 16],
            name: "all-MiniLM-L6-v2".into(),
            dim: 384,
            checksum: 0x1234_5678_9abc_def0,
        };
        assert_eq!(WalEntry::decode(&model.encode()).unwrap(), model);
        assert!(WalEntry::decode(&[]).is_err());
    }
}
