//! Pushing into edge caches: anchors (past fallback queries, tracked per edge by a decaying
//! heavy-hitter table), the vectors around them, hot ids, evictions to keep each cache within
//! its byte budget, and invalidations of written ids, sent at once.
//!
//! One push task per connected edge cache ([`push_loop`], driving the sans-IO [`PushState`])
//! sends every delta of that cache, one at a time, each on a stream the cloud opens, and waits
//! for its acknowledgement before the next: so deltas arrive in version order. Before a delta
//! is sent, its manifest step is committed to the WAL, so the cloud's manifest of the cache is always a superset of what the
//! edge holds, across cloud restarts. Nothing is pushed before the connection's handshake is
//! confirmed (never as 0.5-RTT data).
//!
//! When a push happens: every `period_ms`, and within `min_gap_ms` of an anchor becoming hot
//! (its decayed count reaching `anchor_hot_count`). An invalidation goes out as soon as the
//! write that caused it is durable; deltas are kept small (`max_anchors_per_delta`) so that one
//! never waits long behind a push.
//!
//! Certificates (edges that announce `certify`, cosine and L2 collections): a pushed anchor's
//! members are then its exact `anchor_members` nearest points and its radius the Euclidean
//! distance of the next one, so the members are exactly the corpus inside the ball. The push
//! task keeps each certificate it sent on this connection (`certify.rs`); every write of the
//! collection reaches it, and a point written inside a ball shrinks it (a deleted or moved
//! member leaves it) in a delta sent at once, like an invalidation. A new connection starts
//! with none: the edge forgets its certificates when it connects.
//!
//! Inside, each file using only those before it: `clock.rs` (the one wall-clock reading),
//! `corpus.rs` (the [`Corpus`] trait over collections), [`restore`] (whole-cache snapshots, and
//! a new edge's first one),
//! [`config`], `anchors.rs` (the anchor tables), `certify.rs` (balls, invalidation deltas),
//! `plan.rs` (a delta within the budget), [`state`] (the sans-IO decisions), `hub.rs` (what the
//! tasks share, routing), `task.rs` (the tokio driver).

mod anchors;
mod certify;
mod clock;
pub mod config;
mod corpus;
mod hub;
mod plan;
pub mod restore;
pub mod state;
mod task;

pub use config::PushConfig;
pub use corpus::{Corpus, ServiceCorpus};
pub use hub::PushHub;
pub use restore::RestorePolicy;
pub use state::{PushAction, PushState};
pub use task::{PushError, PushSession, push_loop};
