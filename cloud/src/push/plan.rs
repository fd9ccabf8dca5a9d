//! Planning a push: the delta that brings one edge cache closer to what its edge asks for,
//! within the cache's byte budget, with its manifest step. Pure over the small [`Corpus`] trait
//! (get, search, exact), so it runs on the blocking pool and is tested without a collection.

use std::collections::{HashMap, HashSet};

use tiervec_shared::hot::Estimate;
use tiervec_shared::push::{
    Certificate, Delta, HeldVector, Manifest, ManifestStep, PushedAnchor, PushedVector,
    anchor_bytes, vector_bytes,
};

use super::certify::Ball;
use super::config::PushConfig;
use super::corpus::Corpus;

/// What the edge asks for, read from its anchor table and the hot ids when a plan starts.
pub(super) struct Demand {
    /// Hot anchors the cache lacks, hottest first, at most `max_anchors_per_delta`: (anchor,
    /// point, when it was asked (Unix µs), count).
    pub candidates: Vec<(u64, Vec<f32>, u64, f64)>,
    /// The count of every hot anchor.
    pub scores: HashMap<u64, f64>,
    /// A certifying cache's hot anchors held without a certificate on this connection (held
    /// across a reconnection), with their points, at most `max_anchors_per_delta`.
    pub uncertified: Vec<(u64, Vec<f32>)>,
    /// Ids hot on their own (count at least `hot_id_count`), hottest first.
    pub hot_ids: Vec<Estimate>,
}

/// A planned delta with its manifest step.
#[derive(Debug, PartialEq)]
pub(super) struct Plan {
    pub delta: Delta,
    pub step: ManifestStep,
    /// Hot ids that the cache has room for were left out to keep the delta within its byte
    /// limit: plan again as soon as this one is delivered.
    pub more: bool,
}

/// The delta that brings the cache (`manifest`) closer to `demand`, within `budget` and the
/// delta byte limit ([`PushConfig::delta_limit`]), with its manifest step;
/// `None` when there is nothing to push. Admission: a hot anchor enters a full
/// cache only by evicting anchors colder than itself, so that an evicted anchor (still hot,
/// but less) is not pushed straight back — no churn.
///
/// `certify` (a certifying cache): pushed anchors come with their exact balls, and the
/// uncertified hot anchors are certified again, within the same `max_anchors_per_delta` exact
/// searches.
pub(super) fn plan(
    corpus: &impl Corpus,
    config: &PushConfig,
    manifest: &Manifest,
    budget: u64,
    certify: bool,
    demand: Demand,
) -> Option<Plan> {
    let info = corpus.info();
    let dim = info.dim;
    let delta_limit = config.delta_limit();
    let Demand {
        candidates,
        scores,
        uncertified,
        hot_ids,
    } = demand;
    // Each candidate with its members (and, certified, its exact ball), hottest first.
    let mut anchors: Vec<(PushedAnchor, f64)> = candidates
        .into_iter()
        .filter_map(|(anchor, vector, hot_at, count)| {
            let (members, radius) = if certify {
                let ball = Ball::exact(corpus, &vector, config.anchor_members)?;
                (ball.member_ids(), ball.radius)
            } else {
                let ef = config.anchor_ef.max(config.anchor_members);
                (corpus.search(&vector, config.anchor_members, ef)?, 0.0)
            };
            Some((
                PushedAnchor {
                    anchor_id: anchor,
                    members,
                    radius,
                    vector,
                    hot_at_unix_us: hot_at,
                },
                count,
            ))
        })
        .collect();
    // Every point this plan may push, read at once (on a cluster, one request per node).
    let fetched = fetch_unheld(
        corpus,
        manifest,
        anchors
            .iter()
            .flat_map(|(a, _)| a.members.iter().copied())
            .chain(hot_ids.iter().map(|e| e.id)),
    );
    // Drop the coldest candidates until the rest fit by evicting only colder entries.
    let (anchors, vectors, evict, evict_anchors, added) = loop {
        let mut vectors = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        for (a, _) in &anchors {
            for &id in &a.members {
                if manifest.held(id).is_none() && seen.insert(id) {
                    vectors.extend(fetched.get(&id).cloned());
                }
            }
        }
        let needed: u64 = vectors.iter().map(|v| push_cost(v, dim)).sum::<u64>()
            + anchors
                .iter()
                .map(|(a, _)| anchor_bytes(dim, a.members.len()))
                .sum::<u64>();
        let coldest = anchors.last().map_or(f64::INFINITY, |(_, c)| *c);
        let keep: HashSet<u64> = anchors
            .iter()
            .flat_map(|(a, _)| a.members.iter().copied())
            .collect();
        let ranked = Scores {
            anchors: &scores,
            ids: &hot_ids,
        };
        let evicted = evictions(manifest, &ranked, &keep, needed, budget, dim, coldest);
        match evicted {
            Some((evict, evict_anchors)) if needed <= delta_limit => {
                break (anchors, vectors, evict, evict_anchors, needed);
            }
            _ if anchors.len() > 1 => {
                anchors.pop();
            }
            _ => break (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0),
        }
    };
    let mut anchors: Vec<PushedAnchor> = anchors.into_iter().map(|(a, _)| a).collect();
    let mut vectors = vectors;
    // Plain hot ids outside anchors, only into room left (they evict nothing).
    let after: u64 = manifest.bytes()
        + vectors.iter().map(|v| push_cost(v, dim)).sum::<u64>()
        + anchors
            .iter()
            .map(|a| anchor_bytes(dim, a.members.len()))
            .sum::<u64>()
        - evict
            .iter()
            .filter_map(|id| manifest.held(*id))
            .map(|h| h.bytes)
            .sum::<u64>();
    let mut room = budget.saturating_sub(after);
    let mut delta_room = delta_limit.saturating_sub(added);
    let mut more = false;
    let pushed: HashSet<u64> = vectors.iter().map(|v| v.id).collect();
    for e in &hot_ids {
        if manifest.held(e.id).is_none() && !pushed.contains(&e.id) {
            match fetched.get(&e.id).cloned() {
                Some(v) if push_cost(&v, dim) <= room.min(delta_room) => {
                    room -= push_cost(&v, dim);
                    delta_room -= push_cost(&v, dim);
                    vectors.push(v);
                }
                Some(v) if push_cost(&v, dim) <= room => more = true,
                _ => {}
            }
        }
    }
    let evicted: HashSet<u64> = evict.iter().copied().collect();
    let pushed: HashSet<u64> = vectors.iter().map(|v| v.id).collect();
    // An anchor is pushed only if all its members are held afterwards.
    anchors.retain(|a| {
        a.members
            .iter()
            .all(|m| pushed.contains(m) || (manifest.held(*m).is_some() && !evicted.contains(m)))
    });
    // Certify again, with what exact searches this delta has left, hot anchors held without
    // a certificate on this connection whose whole ball is still held.
    let certificates: Vec<Certificate> = uncertified
        .into_iter()
        .filter(|(id, _)| !evict_anchors.contains(id))
        .take(config.max_anchors_per_delta.saturating_sub(anchors.len()))
        .filter_map(|(id, vector)| {
            let ball = Ball::exact(corpus, &vector, config.anchor_members)?;
            ball.members
                .iter()
                .all(|(m, _)| {
                    pushed.contains(m) || (manifest.held(*m).is_some() && !evicted.contains(m))
                })
                .then(|| Certificate {
                    anchor_id: id,
                    radius: ball.radius,
                    members: ball.member_ids(),
                })
        })
        .collect();
    if vectors.is_empty() && anchors.is_empty() && evict.is_empty() && certificates.is_empty() {
        return None;
    }
    let version = manifest.version + 1;
    let step = ManifestStep {
        version,
        added: vectors
            .iter()
            .map(|v| HeldVector {
                id: v.id,
                lsn: v.lsn,
                bytes: push_cost(v, dim),
            })
            .collect(),
        removed: evict.clone(),
        anchors_added: anchors
            .iter()
            .map(|a| (a.anchor_id, a.members.clone()))
            .chain(
                certificates
                    .iter()
                    .map(|c| (c.anchor_id, c.members.clone())),
            )
            .collect(),
        anchors_removed: evict_anchors.clone(),
    };
    let delta = Delta {
        collection_id: info.id.0,
        dim: dim as u32,
        metric: info.metric.code(),
        version,
        vectors,
        anchors,
        evict,
        evict_anchors,
        tombstones: Vec::new(),
        certificates,
        sent_at_unix_us: 0,
    };
    Some(Plan { delta, step, more })
}

/// The points of `ids` the cache does not hold, as pushed, by id (those that exist; none
/// when some could not be read: nothing is pushed that could be incomplete).
fn fetch_unheld(
    corpus: &impl Corpus,
    manifest: &Manifest,
    ids: impl Iterator<Item = u64>,
) -> HashMap<u64, PushedVector> {
    let mut ids: Vec<u64> = ids.filter(|&id| manifest.held(id).is_none()).collect();
    ids.sort_unstable();
    ids.dedup();
    corpus
        .get_many(&ids, true)
        .into_iter()
        .flatten()
        .flatten()
        .map(|p| {
            let pushed = PushedVector {
                id: p.id,
                lsn: p.lsn,
                vector: p.vector,
                payload: p.payload.map(|t| t.to_string()),
            };
            (p.id, pushed)
        })
        .collect()
}

/// A pushed vector's cost in the byte model.
fn push_cost(v: &PushedVector, dim: usize) -> u64 {
    vector_bytes(dim, v.payload.as_ref().map_or(0, String::len))
}

/// The decayed counts eviction orders by: hot anchors, and ids hot on their own.
pub(super) struct Scores<'a> {
    anchors: &'a HashMap<u64, f64>,
    ids: &'a [tiervec_shared::hot::Estimate],
}

/// What to evict so that `needed` more bytes fit in `budget`: anchors colder than `below`,
/// coldest first (with their members no kept anchor needs), then plain ids outside anchors,
/// coldest first by their own count (they only ever filled spare room, so any anchor
/// outranks them); never an id in `keep` (the members of what is being pushed). `None` when
/// that cannot free enough.
fn evictions(
    manifest: &Manifest,
    scores: &Scores,
    keep: &HashSet<u64>,
    needed: u64,
    budget: u64,
    dim: usize,
    below: f64,
) -> Option<(Vec<u64>, Vec<u64>)> {
    let mut over = (manifest.bytes() + needed).saturating_sub(budget);
    if over == 0 {
        return Some((Vec::new(), Vec::new()));
    }
    let id_score: HashMap<u64, f64> = scores.ids.iter().map(|e| (e.id, e.count)).collect();
    let mut refs: HashMap<u64, usize> = HashMap::new();
    for (_, members) in manifest.anchors() {
        for m in members {
            *refs.entry(*m).or_default() += 1;
        }
    }
    let mut anchors: Vec<(u64, &[u64], f64)> = manifest
        .anchors()
        .map(|(a, m)| (a, m, scores.anchors.get(&a).copied().unwrap_or(0.0)))
        .filter(|(_, _, score)| *score < below)
        .collect();
    anchors.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
    let (mut evict, mut evict_anchors) = (Vec::new(), Vec::new());
    let mut gone: HashSet<u64> = HashSet::new();
    for (anchor, members, _) in anchors {
        if over == 0 {
            break;
        }
        evict_anchors.push(anchor);
        over = over.saturating_sub(anchor_bytes(dim, members.len()));
        for m in members {
            let unreferenced = refs.get_mut(m).is_some_and(|r| {
                *r = r.saturating_sub(1);
                *r == 0
            });
            if unreferenced
                && !keep.contains(m)
                && gone.insert(*m)
                && let Some(h) = manifest.held(*m)
            {
                evict.push(*m);
                over = over.saturating_sub(h.bytes);
            }
        }
    }
    if over > 0 {
        let mut plain: Vec<(u64, u64, f64)> = manifest
            .ids()
            .filter(|(id, _)| {
                !gone.contains(id) && !keep.contains(id) && refs.get(id).is_none_or(|r| *r == 0)
            })
            .map(|(id, h)| (id, h.bytes, id_score.get(&id).copied().unwrap_or(0.0)))
            .collect();
        plain.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
        for (id, bytes, _) in plain {
            if over == 0 {
                break;
            }
            evict.push(id);
            over = over.saturating_sub(bytes);
        }
    }
    (over == 0).then_some((evict, evict_anchors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::{CollectionInfo, Point};
    use tiervec_shared::hnsw::HnswParams;
    use tiervec_shared::{CollectionId, Metric};

    /// Points on a line, `(id, x)`: nearest neighbours by |x - q|.
    struct Line {
        info: CollectionInfo,
        points: Vec<(u64, f32)>,
    }

    impl Line {
        fn new(points: &[(u64, f32)]) -> Line {
            Line {
                info: CollectionInfo {
                    name: "line".into(),
                    id: CollectionId([9; 16]),
                    dim: 2,
                    metric: Metric::L2,
                    params: HnswParams::default(),
                },
                points: points.to_vec(),
            }
        }

        fn nearest(&self, query: &[f32], k: usize) -> Vec<u64> {
            let mut by: Vec<(f32, u64)> = self
                .points
                .iter()
                .map(|(id, x)| ((x - query[0]).abs(), *id))
                .collect();
            by.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            by.into_iter().take(k).map(|(_, id)| id).collect()
        }
    }

    impl Corpus for Line {
        fn info(&self) -> &CollectionInfo {
            &self.info
        }
        fn get(&self, id: u64) -> Option<Point> {
            let (_, x) = self.points.iter().find(|(i, _)| *i == id)?;
            Some(Point {
                id,
                vector: vec![*x, 0.0],
                lsn: id + 100,
                payload: None,
            })
        }
        fn search(&self, query: &[f32], k: usize, _ef: usize) -> Option<Vec<u64>> {
            Some(self.nearest(query, k))
        }
        fn exact(&self, query: &[f32], k: usize) -> Option<Vec<u64>> {
            Some(self.nearest(query, k))
        }
        fn deleted_at(&self, _: u64) -> Option<u64> {
            None
        }
    }

    fn demand(anchor: u64, at: f32) -> Demand {
        Demand {
            candidates: vec![(anchor, vec![at, 0.0], 5, 2.0)],
            scores: HashMap::from([(anchor, 2.0)]),
            uncertified: Vec::new(),
            hot_ids: Vec::new(),
        }
    }

    #[test]
    fn a_hot_anchor_is_planned_with_its_members_and_the_step_that_logs_them() {
        let line = Line::new(&[(1, 0.0), (2, 1.0), (3, 2.0), (4, 10.0)]);
        let config = PushConfig {
            anchor_members: 2,
            ..PushConfig::default()
        };
        let manifest = Manifest::new([9; 16], 6);
        let Plan { delta, step, more } =
            plan(&line, &config, &manifest, 1 << 20, false, demand(77, 0.9)).unwrap();
        assert!(!more);
        assert_eq!((delta.version, step.version), (7, 7));
        assert_eq!(delta.anchors.len(), 1);
        assert_eq!(delta.anchors[0].members, vec![2, 1]);
        assert_eq!(delta.anchors[0].radius, 0.0, "not certifying");
        let mut pushed: Vec<u64> = delta.vectors.iter().map(|v| v.id).collect();
        pushed.sort();
        assert_eq!(pushed, vec![1, 2]);
        assert_eq!(step.anchors_added, vec![(77, vec![2, 1])]);
        assert_eq!(step.added.len(), 2);
        assert!(step.added.iter().all(|h| h.lsn == h.id + 100));
    }

    #[test]
    fn a_certified_anchor_carries_the_distance_of_the_next_point_as_its_radius() {
        let line = Line::new(&[(1, 0.0), (2, 1.0), (3, 2.0), (4, 10.0)]);
        let config = PushConfig {
            anchor_members: 2,
            ..PushConfig::default()
        };
        let manifest = Manifest::new([9; 16], 0);
        let delta = plan(&line, &config, &manifest, 1 << 20, true, demand(77, 0.9))
            .unwrap()
            .delta;
        let radius = delta.anchors[0].radius;
        assert!(
            (radius - 1.1).abs() < 1e-6,
            "point 3 at 2.0 is next: {radius}"
        );
    }

    #[test]
    fn nothing_is_planned_when_the_budget_cannot_hold_the_anchor() {
        let line = Line::new(&[(1, 0.0), (2, 1.0)]);
        let manifest = Manifest::new([9; 16], 0);
        assert_eq!(
            plan(
                &line,
                &PushConfig::default(),
                &manifest,
                16,
                false,
                demand(77, 0.0)
            ),
            None
        );
    }

    /// A cache with room for every hot id still gets them within the delta limit, and is told
    /// to plan again at once for the rest.
    #[test]
    fn hot_ids_fill_a_delta_up_to_its_byte_limit_and_ask_for_the_rest() {
        let points: Vec<(u64, f32)> = (1..=50).map(|i| (i, i as f32)).collect();
        let line = Line::new(&points);
        let each = vector_bytes(2, 0);
        let config = PushConfig {
            max_delta_bytes: 10 * each,
            ..PushConfig::default()
        };
        let hot = Demand {
            candidates: Vec::new(),
            scores: HashMap::new(),
            uncertified: Vec::new(),
            hot_ids: (1..=50)
                .map(|id| Estimate {
                    id,
                    count: 100.0 - id as f64,
                    error: 0.0,
                })
                .collect(),
        };
        let mut manifest = Manifest::new([9; 16], 0);
        let first = plan(&line, &config, &manifest, 1 << 30, false, hot).unwrap();
        assert_eq!(first.delta.vectors.len(), 10, "exactly the limit");
        assert!(first.more, "40 more fit in the cache");
        let ids: Vec<u64> = first.delta.vectors.iter().map(|v| v.id).collect();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>(), "hottest first");
        // The last ones: nothing left out.
        for id in 1..=45 {
            manifest.insert(id, id + 100, each);
        }
        let rest = Demand {
            candidates: Vec::new(),
            scores: HashMap::new(),
            uncertified: Vec::new(),
            hot_ids: (46..=50)
                .map(|id| Estimate {
                    id,
                    count: 1.0,
                    error: 0.0,
                })
                .collect(),
        };
        let last = plan(&line, &config, &manifest, 1 << 30, false, rest).unwrap();
        assert_eq!((last.delta.vectors.len(), last.more), (5, false));
    }

    #[test]
    fn evictions_take_the_coldest_anchor_first_and_keep_shared_members() {
        let dim = 2;
        let mut m = Manifest::new([1; 16], 3);
        for id in 1..=4 {
            m.insert(id, 1, 100);
        }
        m.insert_anchor(10, vec![1, 2], dim);
        m.insert_anchor(11, vec![2, 3], dim);
        let scores = HashMap::from([(10, 1.0), (11, 5.0)]);
        // Over by a little: the colder anchor goes, with member 1 (member 2 is shared).
        let budget = m.bytes() + 50;
        let (evict, anchors) = evictions(
            &m,
            &Scores {
                anchors: &scores,
                ids: &[],
            },
            &HashSet::new(),
            100,
            budget,
            dim,
            3.0,
        )
        .unwrap();
        assert_eq!(anchors, vec![10]);
        assert_eq!(evict, vec![1]);
        // Within budget: nothing.
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[],
                },
                &HashSet::new(),
                10,
                m.bytes() + 10,
                dim,
                3.0
            ),
            Some((vec![], vec![]))
        );
        // Admission: a candidate no hotter than the resident anchors evicts none of them;
        // plain ids (4) give way to any anchor, but here they are not enough.
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[]
                },
                &HashSet::new(),
                200,
                budget,
                dim,
                1.0
            ),
            None
        );
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[]
                },
                &HashSet::new(),
                100,
                budget,
                dim,
                1.0
            ),
            Some((vec![4], vec![]))
        );
        // Needing more than the colder entries hold: refused too.
        assert_eq!(
            evictions(
                &m,
                &Scores {
                    anchors: &scores,
                    ids: &[]
                },
                &HashSet::new(),
                10_000,
                budget,
                dim,
                3.0
            ),
            None
        );
    }
}
