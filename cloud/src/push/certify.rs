//! Certificates and invalidations. A certifying cache's pushed anchor comes with its exact
//! ball (its `anchor_members` nearest points, the radius the distance of the next one), which
//! the push task keeps per connection ([`Ball`]); every write of the collection reaches it, and
//! a point written inside a ball shrinks it (a deleted or moved member leaves it) in a delta
//! sent at once, with tombstones for the written ids the cache holds.

use std::collections::HashMap;

use tiervec_shared::certificate::euclidean;
use tiervec_shared::push::{Certificate, Delta, Manifest, ManifestStep, Tombstone};

use super::corpus::Corpus;
use crate::service::Invalidation;

/// A certificate as the cloud keeps it on one connection: the anchor's point, the radius, and
/// each member's Euclidean distance to the point.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Ball {
    vector: Vec<f32>,
    pub(super) radius: f32,
    pub(super) members: Vec<(u64, f32)>,
}

impl Ball {
    /// The exact ball around `vector` (prepared) holding its `m` nearest points: found by the
    /// collection's exact search, which ranks by the metric; a few more are fetched and
    /// re-ranked by Euclidean distance so that rounding between the two orders cannot put a
    /// closer point outside. `None` if the search fails.
    pub(super) fn exact(corpus: &impl Corpus, vector: &[f32], m: usize) -> Option<Ball> {
        let hits = corpus.exact(vector, m + BALL_MARGIN)?;
        let mut by_distance: Vec<(u64, f32)> = hits
            .iter()
            .filter_map(|&id| Some((id, euclidean(vector, &corpus.get(id)?.vector))))
            .collect();
        by_distance.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let radius = by_distance.get(m).map_or(f32::INFINITY, |(_, d)| *d);
        by_distance.truncate(m);
        Some(Ball {
            vector: vector.to_vec(),
            radius,
            members: by_distance,
        })
    }

    pub(super) fn member_ids(&self) -> Vec<u64> {
        self.members.iter().map(|(id, _)| *id).collect()
    }

    /// The ball after writes of `written` (current points; `None` for a deleted id): a point
    /// now inside shrinks the radius to its distance (it and everything beyond leave); a
    /// member deleted, or moved out, leaves. `None` if nothing changed.
    fn after(&self, written: &[(u64, Option<Vec<f32>>)]) -> Option<Ball> {
        let mut next = self.clone();
        for (id, point) in written {
            let distance = point.as_ref().map(|v| euclidean(&self.vector, v));
            match distance {
                Some(d) if d < next.radius => {
                    next.radius = d;
                    next.members.retain(|(m, md)| m != id && *md < d);
                }
                _ => next.members.retain(|(m, _)| m != id),
            }
        }
        (next != *self).then_some(next)
    }
}

/// Points fetched beyond a ball's members when it is computed.
const BALL_MARGIN: usize = 4;

/// Most (written point, ball) distance checks one write may cost a certifying cache's push
/// task (a few milliseconds at 384 dimensions); above, its certificates are dropped instead.
const MAX_BALL_CHECKS: usize = 1 << 20;

/// Writes to deliver to a cache in one delta.
#[derive(Debug, Default, PartialEq)]
pub struct InvalidationBatch {
    /// In the order they came; at most `state::MAX_IDS_PER_DELTA` ids in all.
    pub invalidations: Vec<Invalidation>,
    /// Revoke every certificate of the cache: writes were dropped from its queue unseen.
    pub revoke_certificates: bool,
}

/// The delta for a batch of writes in a cache: tombstones for the ids it holds (at the latest
/// LSN each was written), and the certificates the writes change (computed from `balls`, the
/// connection's certificates), or all of them revoked when the batch says so.
pub(super) fn invalidation(
    manifest: &Manifest,
    corpus: &impl Corpus,
    batch: &InvalidationBatch,
    balls: &HashMap<u64, Ball>,
) -> Option<(Delta, ManifestStep)> {
    let mut latest: HashMap<u64, u64> = HashMap::new();
    for inv in &batch.invalidations {
        for &id in &inv.ids {
            let lsn = latest.entry(id).or_default();
            *lsn = (*lsn).max(inv.lsn);
        }
    }
    let mut tombstones: Vec<Tombstone> = latest
        .iter()
        .filter(|(id, _)| manifest.held(**id).is_some())
        .map(|(&id, &lsn)| Tombstone { id, lsn })
        .collect();
    tombstones.sort_unstable_by_key(|t| t.id);
    let mut certificates = Vec::new();
    if batch.revoke_certificates || latest.len().saturating_mul(balls.len()) > MAX_BALL_CHECKS {
        // Writes the batch cannot show (dropped from a full queue), or a bulk write: checking
        // every point against every ball would stall this cache's deliveries. Dropping the
        // certificates is always correct, and hot anchors are certified again by the next
        // pushes.
        certificates.extend(balls.keys().filter(|a| manifest.holds_anchor(**a)).map(
            |&anchor_id| {
                Certificate {
                    anchor_id,
                    radius: 0.0,
                    members: manifest
                        .anchor_members(anchor_id)
                        .unwrap_or_default()
                        .to_vec(),
                }
            },
        ));
    } else if !balls.is_empty() {
        let written: Vec<(u64, Option<Vec<f32>>)> = latest
            .keys()
            .map(|&id| (id, corpus.get(id).map(|p| p.vector)))
            .collect();
        for (&anchor, ball) in balls {
            if manifest.holds_anchor(anchor)
                && let Some(next) = ball.after(&written)
            {
                certificates.push(Certificate {
                    anchor_id: anchor,
                    radius: next.radius,
                    members: next.member_ids(),
                });
            }
        }
    }
    if tombstones.is_empty() && certificates.is_empty() {
        return None;
    }
    let version = manifest.version + 1;
    let step = ManifestStep {
        version,
        removed: tombstones.iter().map(|t| t.id).collect(),
        anchors_added: certificates
            .iter()
            .map(|c| (c.anchor_id, c.members.clone()))
            .collect(),
        ..ManifestStep::default()
    };
    Some((
        Delta {
            collection_id: corpus.info().id.0,
            dim: corpus.info().dim as u32,
            metric: corpus.info().metric.code(),
            version,
            tombstones,
            certificates,
            ..Delta::default()
        },
        step,
    ))
}

/// Brings the connection's certificates in line with a delivered delta: new certified
/// anchors, certificate updates (of a known ball, or a held anchor certified again, whose point
/// `anchor_vector` gives), evicted anchors.
pub(super) fn follow_certificates(
    balls: &mut HashMap<u64, Ball>,
    delta: &Delta,
    corpus: &impl Corpus,
    anchor_vector: impl Fn(u64) -> Option<Vec<f32>>,
) {
    for anchor in &delta.evict_anchors {
        balls.remove(anchor);
    }
    for a in delta.anchors.iter().filter(|a| a.radius > 0.0) {
        let members = a
            .members
            .iter()
            .filter_map(|&id| Some((id, euclidean(&a.vector, &corpus.get(id)?.vector))))
            .collect();
        balls.insert(
            a.anchor_id,
            Ball {
                vector: a.vector.clone(),
                radius: a.radius,
                members,
            },
        );
    }
    for c in &delta.certificates {
        if c.radius == 0.0 {
            // Dropped: the anchor may be certified again.
            balls.remove(&c.anchor_id);
        } else if let Some(ball) = balls.get_mut(&c.anchor_id) {
            ball.radius = c.radius;
            ball.members.retain(|(id, _)| c.members.contains(id));
        } else if let Some(vector) = anchor_vector(c.anchor_id) {
            let members = c
                .members
                .iter()
                .filter_map(|&id| Some((id, euclidean(&vector, &corpus.get(id)?.vector))))
                .collect();
            balls.insert(
                c.anchor_id,
                Ball {
                    vector,
                    radius: c.radius,
                    members,
                },
            );
        }
    }
}

/// Ids a cache holds at an older LSN than the collection's, or that no longer exist: found
/// when an edge connects, for writes whose invalidation never reached it.
pub(super) fn outdated(manifest: &Manifest, corpus: &impl Corpus) -> Vec<(u64, u64)> {
    let held: Vec<(u64, u64)> = manifest.ids().map(|(id, h)| (id, h.lsn)).collect();
    let ids: Vec<u64> = held.iter().map(|(id, _)| *id).collect();
    // A shard no replica answers for: nothing is judged now, the next connect looks again.
    let Some(points) = corpus.get_many(&ids, false) else {
        return Vec::new();
    };
    held.iter()
        .zip(points)
        .filter_map(|(&(id, lsn), point)| match point {
            Some(p) if p.lsn <= lsn => None,
            Some(p) => Some((id, p.lsn)),
            None => Some((id, corpus.deleted_at(id).unwrap_or(u64::MAX))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ball() -> Ball {
        Ball {
            vector: vec![0.0, 0.0],
            radius: 1.0,
            members: vec![(1, 0.2), (2, 0.5), (3, 0.9)],
        }
    }

    #[test]
    fn a_point_written_inside_a_ball_shrinks_it_and_members_beyond_leave() {
        let next = ball().after(&[(9, Some(vec![0.6, 0.0]))]).unwrap();
        assert_eq!(next.radius, 0.6);
        assert_eq!(next.member_ids(), vec![1, 2], "0.9 is now outside");
        assert_eq!(
            ball().after(&[(9, Some(vec![2.0, 0.0]))]),
            None,
            "outside: unchanged"
        );
    }

    #[test]
    fn a_deleted_or_moved_member_leaves_the_ball() {
        let deleted = ball().after(&[(2, None)]).unwrap();
        assert_eq!((deleted.radius, deleted.member_ids()), (1.0, vec![1, 3]));
        let moved_out = ball().after(&[(1, Some(vec![0.0, 3.0]))]).unwrap();
        assert_eq!(
            (moved_out.radius, moved_out.member_ids()),
            (1.0, vec![2, 3])
        );
        // A member moved closer: the ball shrinks to it and it leaves (the edge's copy is
        // tombstoned by the same delta).
        let moved_in = ball().after(&[(3, Some(vec![0.3, 0.0]))]).unwrap();
        assert_eq!((moved_in.radius, moved_in.member_ids()), (0.3, vec![1]));
    }
}
