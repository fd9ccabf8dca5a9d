//! The storage contract (see the module above): the [`DurableLog`] the service appends to, the
//! [`Apply`] side its entries reach the state through, and what a checkpoint covers.

use std::path::PathBuf;

use thiserror::Error;

use super::checkpoint::{CheckpointError, CollectionImage, EdgeCacheImage, ModelImage};
use super::entry::{LogName, WalEntry};
use super::wal::WalError;

/// Why storage failed.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Why the replicated store failed, classified for the caller: the request is at fault
/// (`TooLarge`), another node won (`Conflict`), or the cluster could not be reached in time
/// (`Unavailable`: retry later; the entry may or may not have become durable).
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cluster configuration: {0}")]
    Config(String),
    #[error("cannot reach the NATS cluster: {0}")]
    Connect(String),
    #[error("the cluster log is unavailable: {0}")]
    Unavailable(String),
    #[error("an entry of {bytes} bytes is over the NATS servers' max_payload of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unsupported(&'static str),
    /// A write spanning shards became durable on some of them only: those keep it (their
    /// positions are named), the others do not; retrying the whole write is safe.
    #[error(
        "the write is durable on shards {durable:?} (shard, position) but not on shards {failed:?}: {reason}"
    )]
    PartlyDurable {
        durable: Vec<(u32, u64)>,
        failed: Vec<u32>,
        reason: String,
    },
}

/// What a checkpoint covers: a position per log, every entry at or before which it includes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cut(pub Vec<(LogName, u64)>);

impl Cut {
    /// The position the cut holds for `log`.
    pub fn of(&self, log: LogName) -> Option<u64> {
        self.0.iter().find(|(l, _)| *l == log).map(|(_, p)| *p)
    }
}

/// A checkpoint written: its file and what it covers.
#[derive(Clone, Debug)]
pub struct Checkpointed {
    pub path: PathBuf,
    pub cut: Cut,
}

/// Everything applied, as a checkpoint holds it.
pub struct Image {
    pub collections: Vec<CollectionImage>,
    pub edge_caches: Vec<EdgeCacheImage>,
    /// The embedding model of each collection made for texts.
    pub models: Vec<ModelImage>,
}

/// The state a store's entries are applied to (the catalog).
pub trait Apply: Send + Sync {
    /// Loads a checkpoint's image; called at start, before any entry is applied.
    fn restore(&self, image: Image);
    /// Applies one durable entry at `position` in its log. Deterministic and idempotent by
    /// position.
    fn apply(&self, position: u64, entry: &WalEntry);
    /// Everything applied so far; called with no append in flight.
    fn image(&self) -> Image;
    /// Hears a durable write of a shard this node does not hold: nothing is stored, but what
    /// the write changed is announced (edge caches this node serves may hold those ids).
    fn observe(&self, position: u64, entry: &WalEntry);
    /// The live points of shard `shard` (of `shards`) of `collection`, for a snapshot of the
    /// shard; `None` for a collection not held (by default: a state that holds no shards).
    /// Called with the shard's log not applying.
    fn shard_image(
        &self,
        _collection: [u8; 16],
        _shards: u32,
        _shard: u32,
    ) -> Option<CollectionImage> {
        None
    }
    /// Drops this node's copy of shard `shard` (of `shards`) of `collection`, which other
    /// nodes hold: no deletion is remembered or announced.
    fn forget_shard(&self, _collection: [u8; 16], _shards: u32, _shard: u32) {}
    /// Makes shard `shard` (of `shards`) of `image`'s collection what a snapshot of it at
    /// `position` holds, this node having applied the shard through `from` (< `position`):
    /// points of the shard not in `image` are deleted at `position`, those in it upserted at
    /// their own positions, and every id that changed after `from` is announced. False (and
    /// nothing done) when the collection is not held here.
    fn replace_shard(
        &self,
        _image: &CollectionImage,
        _shards: u32,
        _shard: u32,
        _from: u64,
        _position: u64,
    ) -> bool {
        false
    }
}

/// Where an appended entry became durable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// Its position in its log; for a write spread over several shards, the highest of theirs.
    pub position: u64,
    /// For a write on a replicated store, each shard it touched with its position there
    /// (empty on the embedded store, whose one log orders everything).
    pub shards: Vec<(u32, u64)>,
}

/// Shards held by other nodes: what a store that spreads collections over nodes offers the
/// service's fan-out (the embedded store holds everything here and has none).
pub trait Peers: Send + Sync {
    /// The shards of the collection with identity `collection` (1 when unknown).
    fn shards(&self, collection: [u8; 16]) -> u32;
    /// The shards of `collection` this node holds and has caught up with.
    fn ready_here(&self, collection: [u8; 16]) -> Vec<u32>;
    /// Other live nodes that may answer shards of `collection`, each with those shards.
    fn candidates(&self, collection: [u8; 16]) -> Vec<(String, Vec<u32>)>;
    /// Sends `body` to `node`'s request handler; its answer, or why there is none, arrives on
    /// the receiver by `deadline`.
    fn ask(
        &self,
        node: &str,
        body: Vec<u8>,
        deadline: std::time::Instant,
    ) -> std::sync::mpsc::Receiver<Result<Vec<u8>, ClusterError>>;
    /// Sets what answers other nodes' requests (called once, at start).
    fn answer_with(&self, handler: PeerHandler);
}

/// Answers one request of another node (runs on a blocking thread).
pub type PeerHandler = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// A durable log the service appends to.
pub trait DurableLog: Send + Sync {
    /// Appends `entry` to its log; returns where once it is durable and applied (on a
    /// replicated store: applied here for the shards this node holds).
    fn append(&self, entry: WalEntry) -> Result<Appended, StorageError>;
    /// Appends a collection create whose writes are spread over `shards` shards.
    fn append_create(&self, entry: WalEntry, shards: u32) -> Result<Appended, StorageError> {
        if shards == 1 {
            self.append(entry)
        } else {
            Err(ClusterError::Unsupported(
                "a collection of several shards needs a cluster (`[cluster]` in the configuration)",
            )
            .into())
        }
    }
    /// The other nodes holding shards, on a store that spreads them over nodes.
    fn peers(&self) -> Option<&dyn Peers> {
        None
    }
    /// Writes a checkpoint of the state and drops what it makes redundant.
    fn checkpoint(&self) -> Result<Checkpointed, StorageError>;
    /// Bytes of log not yet covered by a checkpoint (what checkpoints are triggered by).
    fn bytes(&self) -> u64;
    /// Durable writes (e.g. fsyncs) so far; fewer than appends when appends shared them.
    fn flushes(&self) -> u64;
    /// Why the log no longer takes appends, if it does not (it stopped after a failed write).
    fn failure(&self) -> Option<String>;
    /// Waits up to `within` until this node has applied `log` through `position` (a position
    /// another node of a cluster acknowledged); whether it has.
    fn wait_applied(&self, log: LogName, position: u64, within: std::time::Duration) -> bool;
    /// Applies, waiting up to `within`, every catalog entry the store holds now (on a cluster,
    /// a collection another node just created); whether anything may have changed. At most
    /// one caller at a time waits; the others return false at once.
    fn catch_up_catalog(&self, within: std::time::Duration) -> bool;
}
