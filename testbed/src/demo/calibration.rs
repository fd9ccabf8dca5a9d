//! Calibration of the confidence rules: what each edge would answer locally for a request (its
//! confidence signals and the answer's recall), and the trade-off a rule makes over its
//! threshold — local fraction against end-to-end recall, the cloud answering what the rule
//! does not keep local.

use serde::Serialize;
use tiervec_edge::EdgeIndex;

use crate::measure::{K, recall_at_10};
use crate::trace::{Request, Truth};

/// One point of the threshold trade-off.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub rule: &'static str,
    pub threshold: f64,
    pub local_fraction: f64,
    pub recall_at_10: f64,
}

/// What the edge would answer locally for a request: its confidence signals (infinite when
/// absent) and the local answer's recall.
#[derive(Clone, Copy, Debug)]
pub struct LocalAnswer {
    pub kth_distance: f32,
    pub anchor_distance: f32,
    pub recall: f64,
}

/// A confidence rule swept over its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The 10th local distance.
    Kth,
    /// The distance to the nearest anchor.
    Anchor,
    /// Either, at the same threshold.
    Combined,
}

impl Rule {
    pub const fn name(self) -> &'static str {
        match self {
            Rule::Kth => "kth_distance",
            Rule::Anchor => "anchor_distance",
            Rule::Combined => "combined",
        }
    }

    /// The signal the threshold applies to.
    fn signal(self, a: &LocalAnswer) -> f32 {
        match self {
            Rule::Kth => a.kth_distance,
            Rule::Anchor => a.anchor_distance,
            Rule::Combined => a.kth_distance.min(a.anchor_distance),
        }
    }
}

/// The local answers of the edges' own search over their snapshots `indexes`, for every
/// request of every edge (the anchor signal absent: snapshots as built have no anchors).
pub fn local_answers(
    indexes: &[EdgeIndex],
    requests: &[Vec<Request>],
    truth: &[Vec<Truth>],
    ef: usize,
) -> anyhow::Result<Vec<LocalAnswer>> {
    let mut out = Vec::new();
    for (edge, (reqs, truths)) in requests.iter().zip(truth).enumerate() {
        for (r, t) in reqs.iter().zip(truths) {
            let hits = indexes[edge].search(&r.vector, K, ef)?;
            let found: Vec<(u64, f32)> = hits.iter().map(|h| (h.id, h.distance)).collect();
            out.push(LocalAnswer {
                kth_distance: hits.get(K - 1).map_or(f32::INFINITY, |h| h.distance),
                anchor_distance: f32::INFINITY,
                recall: recall_at_10(&found, &t.ids, &t.distances),
            });
        }
    }
    Ok(out)
}

/// The rule's outcome at `threshold`: local when its signal is at most the threshold (with the
/// local recall), else the cloud's (with its measured recall).
pub fn predict(local: &[LocalAnswer], threshold: f64, cloud_recall: f64, rule: Rule) -> SweepPoint {
    let mut kept = 0usize;
    let mut recall = 0.0;
    for a in local {
        if f64::from(rule.signal(a)) <= threshold {
            kept += 1;
            recall += a.recall;
        } else {
            recall += cloud_recall;
        }
    }
    let n = local.len().max(1) as f64;
    SweepPoint {
        rule: rule.name(),
        threshold,
        local_fraction: kept as f64 / n,
        recall_at_10: recall / n,
    }
}

/// The trade-off at every distinct signal value (each is where the curve moves).
pub fn sweep(local: &[LocalAnswer], cloud_recall: f64, rule: Rule) -> Vec<SweepPoint> {
    let mut order: Vec<&LocalAnswer> = local.iter().collect();
    order.sort_by(|a, b| rule.signal(a).total_cmp(&rule.signal(b)));
    let n = local.len().max(1) as f64;
    let mut recall_sum: f64 = local.len() as f64 * cloud_recall;
    let mut points = vec![SweepPoint {
        rule: rule.name(),
        threshold: 0.0,
        local_fraction: 0.0,
        recall_at_10: recall_sum / n,
    }];
    for (i, a) in order.iter().enumerate() {
        recall_sum += a.recall - cloud_recall;
        let value = rule.signal(a);
        let last_of_its_value = order
            .get(i + 1)
            .is_none_or(|next| rule.signal(next) > value);
        if last_of_its_value && value.is_finite() {
            points.push(SweepPoint {
                rule: rule.name(),
                threshold: f64::from(value),
                local_fraction: (i + 1) as f64 / n,
                recall_at_10: recall_sum / n,
            });
        }
    }
    points
}

/// At most `max` points of a sweep, evenly spread over its local fraction.
pub fn thin(points: &[SweepPoint], max: usize) -> Vec<SweepPoint> {
    if points.len() <= max {
        return points.to_vec();
    }
    (0..max)
        .map(|i| points[i * (points.len() - 1) / (max - 1)].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Vec<LocalAnswer> {
        [(0.1, 1.0), (0.2, 0.9), (0.2, 0.8), (0.5, 0.3)]
            .into_iter()
            .map(|(d, r)| LocalAnswer {
                kth_distance: d,
                anchor_distance: 1.0 - d,
                recall: r,
            })
            .collect()
    }

    #[test]
    fn the_sweep_matches_the_rule_at_every_threshold() {
        let local = answers();
        let points = sweep(&local, 0.99, Rule::Kth);
        assert_eq!(points.len(), 4, "0, and each distinct distance");
        assert_eq!(points[2].local_fraction, 0.75, "ties move together");
        for rule in [Rule::Kth, Rule::Anchor, Rule::Combined] {
            for p in sweep(&local, 0.99, rule) {
                let direct = predict(&local, p.threshold, 0.99, rule);
                assert!((direct.recall_at_10 - p.recall_at_10).abs() < 1e-12);
                assert!((direct.local_fraction - p.local_fraction).abs() < 1e-12);
                assert_eq!(p.rule, rule.name());
            }
        }
    }

    #[test]
    fn thinning_keeps_both_ends() {
        let local: Vec<LocalAnswer> = (0..500)
            .map(|i| LocalAnswer {
                kth_distance: i as f32,
                anchor_distance: f32::INFINITY,
                recall: 1.0,
            })
            .collect();
        let points = sweep(&local, 1.0, Rule::Kth);
        let thin = thin(&points, 10);
        assert_eq!(thin.len(), 10);
        assert_eq!(thin[0].threshold, points[0].threshold);
        assert_eq!(thin[9].threshold, points.last().unwrap().threshold);
    }
}
