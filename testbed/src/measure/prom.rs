//! Figures read from the Prometheus text the processes serve at `/metrics` (parsed by
//! `prometheus-parse`): sums of counters and gauges over label sets, means of histograms, and
//! percentiles of histograms merged across label sets and processes (interpolated within a
//! bucket, as Prometheus' `histogram_quantile` does; as fine as the buckets the process
//! declares).

use prometheus_parse::{Sample, Scrape, Value};

/// One process's `/metrics` text, parsed.
pub struct Exposition(Vec<Sample>);

impl Exposition {
    /// Parses an exposition text; lines the parser does not understand are skipped.
    pub fn parse(text: &str) -> Exposition {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Exposition(Scrape::parse(lines).map_or_else(|_| Vec::new(), |s| s.samples))
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.0.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The sum of counter, gauge or untyped `name` over its label sets that include `labels`;
    /// `None` when there is no such sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .filter_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                Value::Histogram(_) | Value::Summary(_) => None,
            })
            .reduce(|a, b| a + b)
    }

    /// The sum of counter (or gauge) `name` over all its label sets, 0 without samples.
    pub fn counter(&self, name: &str) -> f64 {
        // (`+ 0.0`: an empty f64 sum is −0.0.)
        self.value(name, &[]).unwrap_or(0.0) + 0.0
    }

    /// The mean of histogram `name` over its label sets that include `labels` (`_sum` over
    /// `_count`).
    pub fn mean(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        Some(
            self.value(&format!("{name}_sum"), labels)?
                / self.value(&format!("{name}_count"), labels)?,
        )
    }

    /// Histogram `name`'s buckets, summed over its label sets that include `labels`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Histogram {
        let mut merged = Histogram::default();
        for sample in self.matching(name, labels) {
            if let Value::Histogram(buckets) = &sample.value {
                for b in buckets {
                    merged.add(b.less_than, b.count);
                }
            }
        }
        merged
    }
}

/// Cumulative bucket counts of a histogram, by upper bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending `le`, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    fn add(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(l, _)| *l == le) {
            Some(b) => b.1 += count,
            None => {
                let at = self.buckets.partition_point(|(l, _)| *l < le);
                self.buckets.insert(at, (le, count));
            }
        }
    }

    /// Adds another histogram's counts (same buckets expected; missing ones are added).
    pub fn merge(&mut self, other: &Histogram) {
        for &(le, count) in &other.buckets {
            self.add(le, count);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE d histogram\n\
        d_bucket{le=\"0.01\"} 2\n\
        d_bucket{le=\"0.02\"} 6\n\
        d_bucket{le=\"+Inf\"} 10\n\
        d_sum 1.0\n\
        d_count 10\n\
        # TYPE l histogram\n\
        l_bucket{kind=\"a\",le=\"1\"} 1\n\
        l_bucket{kind=\"a\",le=\"+Inf\"} 1\n\
        l_bucket{kind=\"b\",le=\"1\"} 0\n\
        l_bucket{kind=\"b\",le=\"+Inf\"} 3\n\
        l_sum{kind=\"a\"} 0.5\n\
        l_count{kind=\"a\"} 1\n\
        # TYPE c_total counter\n\
        c_total{kind=\"a\"} 3\n\
        c_total{kind=\"b\"} 4\n\
        c_total_other 100\n\
        # TYPE g gauge\n\
        g 0.25\n";

    #[test]
    fn quantiles_interpolate_within_buckets_and_merge_across_processes() {
        let m = Exposition::parse(TEXT);
        let mut h = m.histogram("d", &[]);
        assert_eq!(h.count(), 10.0);
        assert!((h.quantile(0.4).unwrap() - 0.015).abs() < 1e-12);
        assert_eq!(h.quantile(0.99), Some(0.02), "+Inf reports the last bound");
        h.merge(&m.histogram("d", &[]));
        assert_eq!(h.count(), 20.0);
        assert!((h.quantile(0.1).unwrap() - 0.005).abs() < 1e-12);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn figures_are_summed_over_the_label_sets_asked_for() {
        let m = Exposition::parse(TEXT);
        assert_eq!(m.counter("c_total"), 7.0);
        assert_eq!(m.counter("missing"), 0.0);
        assert_eq!(m.value("g", &[]), Some(0.25));
        assert_eq!(m.value("missing", &[]), None);
        assert_eq!(m.value("c_total", &[("kind", "b")]), Some(4.0));
        assert_eq!(m.histogram("l", &[]).count(), 4.0);
        assert_eq!(m.histogram("l", &[("kind", "b")]).quantile(0.5), Some(1.0));
        assert_eq!(m.mean("d", &[]), Some(0.1));
        assert_eq!(m.mean("l", &[("kind", "a")]), Some(0.5));
        assert_eq!(m.mean("l", &[("kind", "b")]), None);
    }
}
