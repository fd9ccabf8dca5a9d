//! Invariant checks over arbitrary inputs, for the fuzz targets of `cloud/fuzz` (cargo-fuzz, on
//! nightly) and for the property tests that drive the same models with random sequences. Each
//! check panics when an invariant breaks. `tests::corpora_replay` runs them over every input
//! the fuzzers kept (`cloud/fuzz/corpus/<target>/`) and every crash they found
//! (`cloud/fuzz/regressions/<target>/`), so CI checks them on stable.

use std::time::{Duration, Instant};

use tiervec_shared::push::{Delta, ManifestStep};

use crate::push::state::{PushAction, PushState};
use crate::service::Invalidation;
use crate::storage::WalEntry;

/// An invariant check over one input; it panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name, as `cloud/fuzz/fuzz_targets/<name>.rs` calls them.
pub const TARGETS: [(&str, Check); 2] = [("push_state", push_state), ("wal_entry", wal_entry)];

/// The planning period and the gap between plans the model's [`PushState`] runs with (and the
/// push state's unit tests).
pub(crate) const PERIOD: Duration = Duration::from_millis(1_000);
pub(crate) const GAP: Duration = Duration::from_millis(100);

/// The write of id `id` at LSN `id`.
pub(crate) fn inv(id: u64) -> Invalidation {
    Invalidation {
        collection: [1; 16],
        ids: vec![id],
        lsn: id,
    }
}

/// An empty delta of `version` and its manifest step.
pub(crate) fn delta(version: u64) -> (Delta, ManifestStep) {
    (
        Delta {
            version,
            ..Delta::default()
        },
        ManifestStep {
            version,
            ..ManifestStep::default()
        },
    )
}

/// What the driver of a [`PushState`] does next: an event from outside, or the completion of
/// work an action gave it (ignored when it has no such work).
#[derive(Clone, Debug)]
pub enum PushOp {
    Invalidate,
    AnchorHot,
    Tick(u16),
    Resynced,
    FinishPlan(bool),
    FinishBuild(bool),
    FinishCommit,
    Ack,
    StrayAck(u64),
}

/// Random [`PushOp`]s, for property tests.
#[cfg(test)]
pub fn push_op() -> impl proptest::strategy::Strategy<Value = PushOp> {
    use proptest::prelude::*;
    prop_oneof![
        Just(PushOp::Invalidate),
        Just(PushOp::AnchorHot),
        (0u16..2_000).prop_map(PushOp::Tick),
        Just(PushOp::Resynced),
        any::<bool>().prop_map(PushOp::FinishPlan),
        any::<bool>().prop_map(PushOp::FinishBuild),
        Just(PushOp::FinishCommit),
        Just(PushOp::Ack),
        (0u64..20).prop_map(PushOp::StrayAck),
    ]
}

/// [`PushOp`]s from bytes: one byte each, a tick's milliseconds from the byte after it.
fn push_ops(data: &[u8]) -> Vec<PushOp> {
    let mut ops = Vec::new();
    let mut bytes = data.iter().copied();
    while let Some(b) = bytes.next() {
        let high = b / 9;
        ops.push(match b % 9 {
            0 => PushOp::Invalidate,
            1 => PushOp::AnchorHot,
            2 => PushOp::Tick(u16::from(bytes.next().unwrap_or(0)) * 8),
            3 => PushOp::Resynced,
            4 => PushOp::FinishPlan(high & 1 == 1),
            5 => PushOp::FinishBuild(high & 1 == 1),
            6 => PushOp::FinishCommit,
            7 => PushOp::Ack,
            _ => PushOp::StrayAck(u64::from(high % 20)),
        });
    }
    ops
}

/// The cloud's per-cache push state machine driven by the events `data` spells (see
/// [`push_events`]).
pub fn push_state(data: &[u8]) {
    push_events(&push_ops(data));
}

/// A driver that carries out actions faithfully and checks each one against the state's
/// promises: one delivery at a time, every step logged before its delta is sent, versions
/// in order without gaps, one plan at a time, invalidations built in arrival order.
#[derive(Default)]
struct Driver {
    logged: u64,
    /// Version the running plan was made against, if one runs.
    plan_from: Option<u64>,
    building: bool,
    committing: Option<u64>,
    sending: Option<u64>,
    handed: u64,
    built: Vec<u64>,
}

impl Driver {
    fn delivering(&self) -> bool {
        self.building || self.committing.is_some() || self.sending.is_some()
    }

    fn take(&mut self, action: PushAction) {
        match action {
            PushAction::Reconcile => {}
            PushAction::BuildInvalidation(batch) => {
                assert!(!self.delivering(), "a build while delivering");
                assert!(!batch.revoke_certificates);
                self.built
                    .extend(batch.invalidations.iter().map(|inv| inv.lsn));
                self.building = true;
            }
            PushAction::PlanNeeded => {
                assert!(self.plan_from.is_none(), "two plans at once");
                self.plan_from = Some(self.logged);
            }
            PushAction::CommitStep(step) => {
                assert!(!self.delivering(), "a step while delivering");
                assert_eq!(step.version, self.logged + 1, "steps in order, no gaps");
                self.committing = Some(step.version);
            }
            PushAction::Send(delta) => {
                assert_eq!(self.committing, None, "sent before its step was durable");
                assert_eq!(self.sending, None);
                assert_eq!(
                    delta.version, self.logged,
                    "only the step just logged is sent"
                );
                self.sending = Some(delta.version);
            }
        }
    }

    fn drain(&mut self, s: &mut PushState) {
        while let Some(action) = s.poll() {
            self.take(action);
        }
    }
}

/// Drives a [`PushState`] through `ops` with a faithful [`Driver`] checking every action, then
/// finishes all outstanding work: every invalidation must have been delivered, in the order
/// it came, and no delivery may be left hanging.
pub fn push_events(ops: &[PushOp]) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = PushState::new(PERIOD, GAP, 0, t0);
    let mut d = Driver::default();
    for op in ops {
        match *op {
            PushOp::Invalidate => {
                d.handed += 1;
                s.handle_invalidation(inv(d.handed));
            }
            PushOp::AnchorHot => s.handle_anchor_hot(now),
            PushOp::Tick(ms) => {
                now += Duration::from_millis(u64::from(ms));
                s.handle_tick(now);
            }
            PushOp::Resynced => {
                // An inventory adopted between deliveries: the logged version stays.
                if !d.delivering() {
                    s.handle_resynced(d.logged);
                }
            }
            PushOp::FinishPlan(found) => {
                if let Some(from) = d.plan_from.take() {
                    s.handle_planned(found.then(|| delta(from + 1)), false);
                }
            }
            PushOp::FinishBuild(found) => {
                if d.building {
                    d.building = false;
                    s.handle_built(found.then(|| delta(d.logged + 1)));
                }
            }
            PushOp::FinishCommit => {
                if let Some(v) = d.committing.take() {
                    d.logged = v;
                    s.handle_committed(v);
                }
            }
            PushOp::Ack => {
                if let Some(v) = d.sending.take() {
                    s.handle_ack(v);
                }
            }
            PushOp::StrayAck(v) => {
                if d.sending != Some(v) {
                    s.handle_ack(v);
                }
            }
        }
        d.drain(&mut s);
    }
    // Finishing all work delivers every invalidation, in the order they came.
    for _ in 0..4 * (d.handed + 4) {
        if let Some(from) = d.plan_from.take() {
            s.handle_planned(Some(delta(from + 1)), false);
        }
        if d.building {
            d.building = false;
            s.handle_built(Some(delta(d.logged + 1)));
        }
        if let Some(v) = d.committing.take() {
            d.logged = v;
            s.handle_committed(v);
        }
        if let Some(v) = d.sending.take() {
            s.handle_ack(v);
        }
        d.drain(&mut s);
    }
    assert_eq!(
        d.built,
        (1..=d.handed).collect::<Vec<_>>(),
        "invalidations lost or reordered"
    );
    assert!(!d.delivering(), "a delivery never finished");
}

/// A WAL record body as recovery reads it: refused, or decoded into an entry whose own
/// encoding decodes again to the same bytes (compared as bytes: a vector may hold a NaN) and
/// whose log is named.
pub fn wal_entry(data: &[u8]) {
    let Ok(entry) = WalEntry::decode(data) else {
        return;
    };
    let bytes = entry.encode();
    let again = WalEntry::decode(&bytes).expect("an entry's own encoding decodes");
    assert_eq!(again.encode(), bytes, "an entry's encoding is not stable");
    let _ = entry.log();
}

#[cfg(test)]
mod tests {
    /// Every committed corpus input and every recorded crash, through its target's check.
    #[test]
    fn corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        tiervec_shared::fuzzing::replay_corpora(&root, &super::TARGETS);
    }
}
