//! Durable storage: what the catalog and the collections are rebuilt from.
//!
//! Everything durable is an entry ([`WalEntry`]) in a log, plus checkpoints that make a prefix
//! of the logs redundant. The service appends through the [`DurableLog`] trait and the state it
//! owns (the catalog) takes entries through [`Apply`]; neither knows how the log is kept.
//!
//! The trait is shaped for two implementations that differ in ways settled here:
//! * [`Embedded`], the default: one WAL per data directory
//!   ([`wal`], group commit) carrying every entry, and checkpoint files ([`checkpoint`]). Its
//!   flush leader applies a flushed group to the state *before* it acknowledges the appends, so
//!   an acknowledged write is visible at once.
//! * [`JetStreamLog`], the replicated store (a log per shard on NATS JetStream, and a catalog log for creates,
//!   drops and edge steps): each entry goes to the log [`WalEntry::log`] names, a position means
//!   something only within its log, replicas apply by following their logs, and an append is
//!   acknowledged once durable — so its `append` also waits until the local replica has applied
//!   through the returned position, which keeps the contract below.
//!
//! The contract both keep: `append` returns once the entry is durable *and* applied to the
//! state; entries of one log are applied in position order, and applying is idempotent by
//! position, so replay rebuilds exactly the acknowledged state; a checkpoint covers a [`Cut`],
//! one position per log.

pub mod checkpoint;
pub mod entry;
pub mod wal;

mod contract;
mod embedded;
mod jetstream;

pub use checkpoint::{CheckpointError, CollectionImage, DecodeError, EdgeCacheImage, ModelImage};
pub use contract::{
    Appended, Apply, Checkpointed, ClusterError, Cut, DurableLog, Image, PeerHandler, Peers,
    StorageError,
};
pub use embedded::{Embedded, StartReport};
pub use entry::{LogName, UndecodableEntry, WalEntry};
pub use jetstream::peer;
pub use jetstream::placement::{self, FanOut, MAX_SHARDS, plan_fan_out, shard_of};
pub use jetstream::{ClusterConfig, JetStreamLog};
pub use wal::WalError;
