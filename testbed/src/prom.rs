//! Reading figures out of the Prometheus text the edges serve at `/metrics`: counters, and
//! percentiles of histograms merged across processes (interpolated within a bucket, as
//! Prometheus' `histogram_quantile` does; as fine as the buckets the edge declares).

/// Cumulative bucket counts of histogram `name` (all label sets summed), by upper bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending `le`, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Parses `name`'s buckets from one exposition text.
    pub fn parse(text: &str, name: &str) -> Histogram {
        let prefix = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let Some(le) = line
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            let Some(count) = line
                .rsplit(' ')
                .next()
                .and_then(|c| c.trim().parse::<f64>().ok())
            else {
                continue;
            };
            match buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += count,
                None => buckets.push((le, count)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram { buckets }
    }

    /// Adds another histogram's counts (same buckets expected; missing ones are added).
    pub fn merge(&mut self, other: &Histogram) {
        for &(le, count) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += count,
                None => self.buckets.push((le, count)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The `q` quantile, interpolated linearly inside its bucket; `None` without samples. A
    /// quantile in the `+Inf` bucket is reported as the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = cumulative - lower.1;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * fraction);
            }
            lower = (le, cumulative);
        }
        Some(lower.0)
    }
}

/// The sum of counter (or gauge) `name` over its label sets.
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE d histogram\n\
        d_bucket{le=\"0.01\"} 2\n\
        d_bucket{le=\"0.02\"} 6\n\
        d_bucket{le=\"+Inf\"} 10\n\
        d_sum 1.0\n\
        d_count 10\n\
        c_total{kind=\"a\"} 3\n\
        c_total{kind=\"b\"} 4\n\
        c_total_other 100\n";

    #[test]
    fn quantiles_interpolate_within_buckets_and_merge_across_processes() {
        let mut h = Histogram::parse(TEXT, "d");
        assert_eq!(h.count(), 10.0);
        assert!((h.quantile(0.4).unwrap() - 0.015).abs() < 1e-12);
        assert_eq!(h.quantile(0.99), Some(0.02), "+Inf reports the last bound");
        h.merge(&Histogram::parse(TEXT, "d"));
        assert_eq!(h.count(), 20.0);
        assert!((h.quantile(0.1).unwrap() - 0.005).abs() < 1e-12);
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(counter(TEXT, "c_total"), 7.0);
    }
}
