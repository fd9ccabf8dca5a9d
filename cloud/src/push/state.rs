//! The push task's decisions, sans IO in quinn's style: [`PushState`] takes events (a write to
//! invalidate, an anchor that became hot, the time, a plan's or a delivery's outcome) and hands
//! out [`PushAction`]s for its driver (`task.rs`) to carry out. It reads no clock, touches no
//! socket and runs no search, so sequences of events are tested on a made-up clock.
//!
//! One delta is delivered at a time, in version order: built (an invalidation's delta from the
//! manifest at that moment, or a plan), its step logged ([`PushAction::CommitStep`]) before it
//! is sent ([`PushAction::Send`]), then acknowledged. Invalidations never wait for a plan: the
//! plan runs on the blocking pool while they are delivered, and a plan overtaken by a delivered
//! step is dropped and made again at once.
//!
//! What waits is bounded: queued writes go out together, up to [`MAX_IDS_PER_DELTA`] ids a
//! delta, and past [`MAX_QUEUED_IDS`] the queue gives way to one reconciliation (the cache's
//! outdated ids, found from the collection as it now is) and the revocation of its certificates.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tiervec_shared::push::{Delta, ManifestStep};

pub use super::certify::InvalidationBatch;
use crate::service::Invalidation;

/// Ids of writes queued for one cache. Past it the queue is dropped for a reconciliation, which
/// finds every id the cache holds at an older LSN, and the cache's certificates are revoked
/// (a dropped write may have entered their balls): an edge that falls behind costs bounded
/// memory and gets a correct cache.
pub const MAX_QUEUED_IDS: usize = 65_536;

/// Most ids in one invalidation delta (16 bytes a tombstone: a quarter of a MiB, far within the
/// frame limit).
pub const MAX_IDS_PER_DELTA: usize = 16_384;

/// How long deliveries wait after logging a step failed with the log unavailable.
pub const COMMIT_RETRY: Duration = Duration::from_millis(500);

/// What the driver is to do next.
#[derive(Debug, PartialEq)]
pub enum PushAction {
    /// Find the ids the cache holds at older LSNs than the collection's (writes whose
    /// invalidation never reached it) and feed them back as invalidations.
    Reconcile,
    /// Build the delta of these writes for the cache (tombstones, shrunk or revoked
    /// certificates) from the logged manifest, and report it with [`PushState::handle_built`].
    BuildInvalidation(InvalidationBatch),
    /// Plan a push on the blocking pool (events keep flowing meanwhile); report it with
    /// [`PushState::handle_planned`].
    PlanNeeded,
    /// Log this step durably, then report [`PushState::handle_committed`].
    CommitStep(ManifestStep),
    /// Send this delta and wait for its acknowledgement, then report [`PushState::handle_ack`].
    Send(Delta),
}

impl PushAction {
    /// Whether the action is part of delivering a delta (which holds the cache's turn).
    pub fn delivers(&self) -> bool {
        matches!(
            self,
            PushAction::BuildInvalidation(_) | PushAction::CommitStep(_) | PushAction::Send(_)
        )
    }
}

/// Where the one delivery in progress stands.
#[derive(Debug)]
enum Delivery {
    Idle,
    /// An invalidation's delta is being built.
    Building,
    /// Built: its step is to be logged (the delta boxed: it is the largest of these).
    ToCommit(Box<Delta>, ManifestStep),
    /// Its step is being logged.
    Committing(Delta),
    /// Logged: it is to be sent.
    ToSend(Delta),
    /// Sent; waiting for the acknowledgement of this version.
    Sending(u64),
}

/// One connected edge cache's push decisions.
#[derive(Debug)]
pub struct PushState {
    period: Duration,
    gap: Duration,
    /// The manifest version logged for the cache.
    logged: u64,
    /// When the next periodic push is due.
    next_period: Instant,
    /// When a push is due after an anchor became hot (batched over the gap).
    push_due: Option<Instant>,
    /// A push is due and not yet planned.
    push_wanted: bool,
    /// A plan runs.
    planning: bool,
    /// A finished plan waiting for the delivery slot.
    planned: Option<(Delta, ManifestStep)>,
    /// The delivered plan left demand out (its byte limit): plan again once it is acknowledged.
    plan_after_ack: bool,
    reconcile: bool,
    /// Outdated ids found by the last reconciliation, delivered before queued writes.
    reconciled: VecDeque<Invalidation>,
    invalidations: VecDeque<Invalidation>,
    /// Ids in `invalidations`.
    queued_ids: usize,
    /// The next batch revokes the cache's certificates.
    revoke: bool,
    delivery: Delivery,
    /// Deliveries wait until then: logging a step failed (the log unavailable).
    paused_until: Option<Instant>,
}

impl PushState {
    /// A cache whose logged manifest is at version `logged`, pushed every `period` and within
    /// `gap` of an anchor becoming hot. The first push is due at `now`, and the cache is
    /// reconciled first.
    pub fn new(period: Duration, gap: Duration, logged: u64, now: Instant) -> PushState {
        PushState {
            period,
            gap,
            logged,
            next_period: now,
            push_due: None,
            push_wanted: false,
            planning: false,
            planned: None,
            plan_after_ack: false,
            reconcile: true,
            reconciled: VecDeque::new(),
            invalidations: VecDeque::new(),
            queued_ids: 0,
            revoke: false,
            delivery: Delivery::Idle,
            paused_until: None,
        }
    }

    /// A durable write that concerns the cache. Returns whether the queue overflowed
    /// [`MAX_QUEUED_IDS`] (and was replaced by a reconciliation).
    pub fn handle_invalidation(&mut self, inv: Invalidation) -> bool {
        if self.queued_ids + inv.ids.len() > MAX_QUEUED_IDS {
            self.handle_backlog_overflow();
            return true;
        }
        self.queued_ids += inv.ids.len();
        self.invalidations.push_back(inv);
        false
    }

    /// Writes for the cache were dropped before they reached this state (its driver's queue
    /// was full): reconcile and revoke its certificates, as when this state's queue overflows.
    pub fn handle_backlog_overflow(&mut self) {
        self.invalidations.clear();
        self.queued_ids = 0;
        self.reconcile = true;
        self.revoke = true;
    }

    /// The outdated ids a [`PushAction::Reconcile`] found, as writes to deliver (not counted
    /// against [`MAX_QUEUED_IDS`]: they are bounded by the cache's manifest).
    pub fn handle_reconciled(&mut self, outdated: Vec<Invalidation>) {
        self.reconciled.extend(outdated);
    }

    /// The next writes to deliver together, reconciled ones first, splitting a write with more
    /// than [`MAX_IDS_PER_DELTA`] ids.
    fn next_batch(&mut self) -> Option<InvalidationBatch> {
        if !self.revoke && self.reconciled.is_empty() && self.invalidations.is_empty() {
            return None;
        }
        let mut batch = InvalidationBatch {
            invalidations: Vec::new(),
            revoke_certificates: std::mem::take(&mut self.revoke),
        };
        let mut room = MAX_IDS_PER_DELTA;
        while room > 0 {
            let reconciled = !self.reconciled.is_empty();
            let queue = if reconciled {
                &mut self.reconciled
            } else {
                &mut self.invalidations
            };
            let Some(next) = queue.front_mut() else {
                break;
            };
            let inv = if next.ids.len() > room {
                let rest = next.ids.split_off(room);
                Invalidation {
                    ids: std::mem::replace(&mut next.ids, rest),
                    ..*next
                }
            } else {
                queue.pop_front().expect("a front")
            };
            room -= inv.ids.len();
            if !reconciled {
                self.queued_ids -= inv.ids.len();
            }
            batch.invalidations.push(inv);
        }
        Some(batch)
    }

    /// One of the cache's anchors became hot: a push is due within the gap.
    pub fn handle_anchor_hot(&mut self, now: Instant) {
        self.push_due.get_or_insert(now + self.gap);
    }

    /// The edge's inventory was adopted: the logged manifest is now at `logged`; reconcile.
    pub fn handle_resynced(&mut self, logged: u64) {
        self.logged = logged;
        self.reconcile = true;
    }

    /// The time passed `now`: pushes that are due become wanted.
    pub fn handle_tick(&mut self, now: Instant) {
        if self.paused_until.is_some_and(|until| now >= until) {
            self.paused_until = None;
        }
        if now >= self.next_period {
            self.push_wanted = true;
            self.next_period = now + self.period;
        }
        if self.push_due.is_some_and(|due| now >= due) {
            self.push_due = None;
            self.push_wanted = true;
        }
    }

    /// When [`PushState::handle_tick`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        [self.push_due, self.paused_until]
            .into_iter()
            .flatten()
            .fold(self.next_period, Instant::min)
    }

    /// A plan finished: its delta and step, or nothing to push. `more`: it left out demand
    /// the cache has room for (to keep within the delta's byte limit), so the next plan is due
    /// as soon as this delta is acknowledged rather than at the next period.
    pub fn handle_planned(&mut self, plan: Option<(Delta, ManifestStep)>, more: bool) {
        self.planning = false;
        self.plan_after_ack = more && plan.is_some();
        self.planned = plan;
    }

    /// An invalidation's delta was built: it, or nothing (the cache holds none of the ids and
    /// no certificate changed).
    pub fn handle_built(&mut self, built: Option<(Delta, ManifestStep)>) {
        debug_assert!(matches!(self.delivery, Delivery::Building));
        self.delivery = match built {
            Some((delta, step)) => Delivery::ToCommit(Box::new(delta), step),
            None => Delivery::Idle,
        };
    }

    /// The step of version `version` is durable.
    pub fn handle_committed(&mut self, version: u64) {
        match std::mem::replace(&mut self.delivery, Delivery::Idle) {
            Delivery::Committing(delta) if delta.version == version => {
                self.logged = version;
                self.delivery = Delivery::ToSend(delta);
            }
            other => self.delivery = other,
        }
    }

    /// Logging the step in progress failed with the log unavailable (JetStream electing
    /// leaders, say): nothing was sent, and the connection stays. The delta is dropped and
    /// nothing is delivered for `COMMIT_RETRY`; then the cache is reconciled (what an
    /// invalidation carried comes back as an outdated id) and planned again, against the
    /// manifest as now `logged` (the failed step may have become durable after all).
    pub fn handle_commit_failed(&mut self, now: Instant, logged: u64) {
        if matches!(self.delivery, Delivery::Committing(_)) {
            self.delivery = Delivery::Idle;
            self.logged = logged;
            self.reconcile = true;
            self.push_wanted = true;
            self.paused_until = Some(now + COMMIT_RETRY);
        }
    }

    /// The edge acknowledged version `version`.
    pub fn handle_ack(&mut self, version: u64) {
        if matches!(self.delivery, Delivery::Sending(v) if v == version) {
            self.delivery = Delivery::Idle;
            if std::mem::take(&mut self.plan_after_ack) {
                self.push_wanted = true;
            }
        }
    }

    /// The next action, if any.
    pub fn poll(&mut self) -> Option<PushAction> {
        if self.paused_until.is_some() {
            return None;
        }
        match std::mem::replace(&mut self.delivery, Delivery::Idle) {
            Delivery::Idle => {}
            Delivery::ToCommit(delta, step) => {
                self.delivery = Delivery::Committing(*delta);
                return Some(PushAction::CommitStep(step));
            }
            Delivery::ToSend(delta) => {
                self.delivery = Delivery::Sending(delta.version);
                return Some(PushAction::Send(delta));
            }
            busy => {
                self.delivery = busy;
                return None;
            }
        }
        if self.reconcile {
            self.reconcile = false;
            return Some(PushAction::Reconcile);
        }
        if let Some((delta, step)) = self.planned.take() {
            if delta.version == self.logged + 1 {
                self.delivery = Delivery::Committing(delta);
                return Some(PushAction::CommitStep(step));
            }
            // Overtaken by a step delivered while it was planned: plan again at once.
            self.push_wanted = true;
        }
        if let Some(batch) = self.next_batch() {
            self.delivery = Delivery::Building;
            return Some(PushAction::BuildInvalidation(batch));
        }
        if self.push_wanted && !self.planning {
            self.push_wanted = false;
            self.planning = true;
            return Some(PushAction::PlanNeeded);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{GAP, PERIOD, delta, inv};

    /// The writes of `ids` (one each) as one batch.
    fn batch(ids: &[u64]) -> PushAction {
        PushAction::BuildInvalidation(InvalidationBatch {
            invalidations: ids.iter().map(|&id| inv(id)).collect(),
            revoke_certificates: false,
        })
    }

    /// A state past its first reconcile and first plan (which found nothing).
    fn settled(logged: u64, t0: Instant) -> PushState {
        let mut s = PushState::new(PERIOD, GAP, logged, t0);
        assert_eq!(s.poll(), Some(PushAction::Reconcile));
        s.handle_tick(t0);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        s.handle_planned(None, false);
        assert_eq!(s.poll(), None);
        s
    }

    /// Delivers the delta the state is committing as version `version`.
    fn deliver(s: &mut PushState, version: u64) {
        s.handle_committed(version);
        match s.poll() {
            Some(PushAction::Send(d)) => assert_eq!(d.version, version),
            other => panic!("expected Send({version}), got {other:?}"),
        }
        assert_eq!(s.poll(), None, "nothing while a delta is unacknowledged");
        s.handle_ack(version);
    }

    #[test]
    fn a_new_connection_reconciles_then_plans_at_once() {
        let t0 = Instant::now();
        let mut s = PushState::new(PERIOD, GAP, 3, t0);
        assert_eq!(s.poll_timeout(), t0);
        assert_eq!(s.poll(), Some(PushAction::Reconcile));
        assert_eq!(s.poll(), None);
        s.handle_tick(t0);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        assert_eq!(s.poll_timeout(), t0 + PERIOD);
    }

    #[test]
    fn a_step_is_logged_before_its_delta_is_sent_and_the_next_waits_for_the_ack() {
        let t0 = Instant::now();
        let mut s = settled(3, t0);
        s.handle_invalidation(inv(1));
        assert_eq!(s.poll(), Some(batch(&[1])));
        s.handle_invalidation(inv(2));
        assert_eq!(s.poll(), None, "one delivery at a time");
        let (d, step) = delta(4);
        s.handle_built(Some((d, step.clone())));
        assert_eq!(s.poll(), Some(PushAction::CommitStep(step)));
        assert_eq!(s.poll(), None, "nothing is sent before the step is durable");
        deliver(&mut s, 4);
        assert_eq!(s.poll(), Some(batch(&[2])));
        s.handle_built(None);
        assert_eq!(
            s.poll(),
            None,
            "a write the cache does not hold sends nothing"
        );
    }

    #[test]
    fn a_step_the_log_could_not_take_pauses_deliveries_then_reconciles_and_plans_again() {
        let t0 = Instant::now();
        let mut s = settled(3, t0);
        s.handle_invalidation(inv(1));
        assert_eq!(s.poll(), Some(batch(&[1])));
        let (d, step) = delta(4);
        s.handle_built(Some((d, step.clone())));
        assert_eq!(s.poll(), Some(PushAction::CommitStep(step)));
        // The log was unavailable; the step may have become durable after all (logged 4).
        s.handle_commit_failed(t0, 4);
        s.handle_invalidation(inv(2));
        assert_eq!(s.poll(), None, "nothing is delivered while paused");
        assert_eq!(s.poll_timeout(), t0 + COMMIT_RETRY);
        s.handle_tick(t0 + COMMIT_RETRY);
        // Write 1 comes back through the reconcile; write 2 is still queued.
        assert_eq!(s.poll(), Some(PushAction::Reconcile));
        s.handle_reconciled(vec![inv(1)]);
        assert_eq!(s.poll(), Some(batch(&[1, 2])));
        let (d, step) = delta(5);
        s.handle_built(Some((d, step.clone())));
        assert_eq!(
            s.poll(),
            Some(PushAction::CommitStep(step)),
            "the next step follows the version now logged"
        );
        deliver(&mut s, 5);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
    }

    #[test]
    fn invalidations_flow_while_a_plan_runs_and_overtake_it() {
        let t0 = Instant::now();
        let mut s = settled(3, t0);
        s.handle_tick(t0 + PERIOD);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        // The plan, made against version 3, is still running when a write comes in.
        s.handle_invalidation(inv(7));
        assert_eq!(s.poll(), Some(batch(&[7])));
        let (d, step) = delta(4);
        s.handle_built(Some((d, step.clone())));
        assert_eq!(s.poll(), Some(PushAction::CommitStep(step)));
        deliver(&mut s, 4);
        // The plan finishes for version 4, which the invalidation took: planned again.
        s.handle_planned(Some(delta(4)), false);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        let (d, step) = delta(5);
        s.handle_planned(Some((d, step.clone())), false);
        assert_eq!(s.poll(), Some(PushAction::CommitStep(step)));
        deliver(&mut s, 5);
        assert_eq!(s.poll(), None);
    }

    #[test]
    fn a_hot_anchor_is_pushed_within_the_gap_not_at_the_next_period() {
        let t0 = Instant::now();
        let mut s = settled(0, t0);
        let t1 = t0 + Duration::from_millis(300);
        s.handle_anchor_hot(t1);
        s.handle_anchor_hot(t1 + Duration::from_millis(50));
        assert_eq!(s.poll_timeout(), t1 + GAP, "batched from the first");
        s.handle_tick(t1 + Duration::from_millis(99));
        assert_eq!(s.poll(), None);
        s.handle_tick(t1 + GAP);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        assert_eq!(s.poll_timeout(), t0 + PERIOD);
    }

    #[test]
    fn one_plan_at_a_time_however_many_pushes_fall_due() {
        let t0 = Instant::now();
        let mut s = settled(0, t0);
        s.handle_tick(t0 + PERIOD);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        s.handle_tick(t0 + 2 * PERIOD);
        assert_eq!(s.poll(), None, "the running plan answers for both");
        s.handle_planned(None, false);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded), "the later tick's");
    }

    #[test]
    fn a_resync_reconciles_again_and_retires_plans_of_the_old_version() {
        let t0 = Instant::now();
        let mut s = settled(3, t0);
        s.handle_tick(t0 + PERIOD);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        s.handle_resynced(9);
        s.handle_planned(Some(delta(4)), false);
        assert_eq!(s.poll(), Some(PushAction::Reconcile));
        assert_eq!(
            s.poll(),
            Some(PushAction::PlanNeeded),
            "the stale plan is made again"
        );
        let (d, step) = delta(10);
        s.handle_planned(Some((d, step.clone())), false);
        assert_eq!(s.poll(), Some(PushAction::CommitStep(step)));
    }

    #[test]
    fn acknowledgements_of_other_versions_change_nothing() {
        let t0 = Instant::now();
        let mut s = settled(0, t0);
        s.handle_invalidation(inv(1));
        assert!(matches!(s.poll(), Some(PushAction::BuildInvalidation(_))));
        s.handle_built(Some(delta(1)));
        assert!(matches!(s.poll(), Some(PushAction::CommitStep(_))));
        s.handle_committed(1);
        assert!(matches!(s.poll(), Some(PushAction::Send(_))));
        s.handle_ack(2);
        s.handle_invalidation(inv(2));
        assert_eq!(s.poll(), None, "still waiting for 1");
        s.handle_ack(1);
        assert_eq!(s.poll(), Some(batch(&[2])));
    }

    #[test]
    fn a_plan_that_left_demand_out_is_followed_by_the_next_once_acknowledged() {
        let t0 = Instant::now();
        let mut s = settled(0, t0);
        s.handle_anchor_hot(t0);
        s.handle_tick(t0 + GAP);
        assert_eq!(s.poll(), Some(PushAction::PlanNeeded));
        let (d, step) = delta(1);
        s.handle_planned(Some((d, step.clone())), true);
        assert_eq!(s.poll(), Some(PushAction::CommitStep(step)));
        s.handle_committed(1);
        assert!(matches!(s.poll(), Some(PushAction::Send(_))));
        assert_eq!(s.poll(), None, "not before the acknowledgement");
        s.handle_ack(1);
        assert_eq!(
            s.poll(),
            Some(PushAction::PlanNeeded),
            "not at the next period"
        );
        s.handle_planned(Some(delta(2)), false);
        assert!(matches!(s.poll(), Some(PushAction::CommitStep(_))));
        deliver(&mut s, 2);
        assert_eq!(s.poll(), None, "nothing was left out");
    }

    #[test]
    fn queued_writes_go_out_together_up_to_the_delta_limit() {
        let t0 = Instant::now();
        let mut s = settled(0, t0);
        s.handle_invalidation(inv(1));
        assert_eq!(s.poll(), Some(batch(&[1])));
        // While 1 is delivered, three writes queue: 2 and 3 small, 4 larger than a delta.
        s.handle_invalidation(inv(2));
        s.handle_invalidation(inv(3));
        let big = Invalidation {
            collection: [1; 16],
            ids: (100..100 + MAX_IDS_PER_DELTA as u64).collect(),
            lsn: 4,
        };
        s.handle_invalidation(big.clone());
        s.handle_built(None);
        let Some(PushAction::BuildInvalidation(first)) = s.poll() else {
            panic!("a batch")
        };
        assert_eq!(first.invalidations.len(), 3);
        assert_eq!(&first.invalidations[..2], &[inv(2), inv(3)]);
        assert_eq!(first.invalidations[2].ids, big.ids[..MAX_IDS_PER_DELTA - 2]);
        assert_eq!(first.invalidations[2].lsn, 4);
        s.handle_built(None);
        let Some(PushAction::BuildInvalidation(rest)) = s.poll() else {
            panic!("the rest of the large write")
        };
        assert_eq!(rest.invalidations.len(), 1);
        assert_eq!(rest.invalidations[0].ids, big.ids[MAX_IDS_PER_DELTA - 2..]);
        s.handle_built(None);
        assert_eq!(s.poll(), None);
    }

    #[test]
    fn a_queue_past_its_limit_becomes_a_reconciliation_that_revokes_certificates() {
        let t0 = Instant::now();
        let mut s = settled(0, t0);
        s.handle_invalidation(inv(1));
        assert_eq!(s.poll(), Some(batch(&[1])));
        // The edge is slow to acknowledge: writes pile up to the limit, and one more.
        let full = Invalidation {
            collection: [1; 16],
            ids: (10..10 + MAX_QUEUED_IDS as u64).collect(),
            lsn: 2,
        };
        assert!(!s.handle_invalidation(full), "exactly the limit is kept");
        assert!(s.handle_invalidation(inv(3)), "one more id overflows");
        s.handle_built(None);
        assert_eq!(s.poll(), Some(PushAction::Reconcile));
        s.handle_reconciled(vec![inv(10), inv(11)]);
        let Some(PushAction::BuildInvalidation(b)) = s.poll() else {
            panic!("the reconciled writes")
        };
        assert!(b.revoke_certificates);
        assert_eq!(
            b.invalidations,
            vec![inv(10), inv(11)],
            "the queue was dropped"
        );
        s.handle_built(None);
        assert_eq!(s.poll(), None);
        // Memory is back: the queue takes writes again.
        assert!(!s.handle_invalidation(inv(4)));
        assert_eq!(s.poll(), Some(batch(&[4])));
    }

    proptest::proptest! {
        /// The model of `crate::fuzzing::push_events` over random sequences (the fuzz target
        /// `push_state` drives the same model from bytes).
        #[test]
        fn any_event_sequence_keeps_the_delivery_promises(
            ops in proptest::collection::vec(crate::fuzzing::push_op(), 0..200)
        ) {
            crate::fuzzing::push_events(&ops);
        }
    }
}
