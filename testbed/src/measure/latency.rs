//! Latency samples and their percentiles, from hdrhistogram: every percentile the testbed
//! reports (bench rows, the demo's sources and staleness, medians of a few timed runs) is read
//! from a [`Latencies`], so all share one definition of a quantile and one precision.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latency samples in nanoseconds (1 ns to 60 s, 3 significant digits), reported in
/// microseconds or milliseconds.
pub struct Latencies(Histogram<u64>);

impl Latencies {
    pub fn new() -> Latencies {
        Latencies(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_nanos().max(1) as u64);
    }

    /// Number of samples recorded.
    pub fn samples(&self) -> u64 {
        self.0.len()
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latencies) {
        let _ = self.0.add(&other.0);
    }

    /// The `q` quantile (0..1) in µs: the smallest recorded value with at least `q` of the
    /// samples at or below it (the median of 7 samples is the 4th).
    pub fn percentile_us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1e3
    }

    /// The `q` quantile in ms; `None` without samples.
    pub fn percentile_ms(&self, q: f64) -> Option<f64> {
        (self.samples() > 0).then(|| self.0.value_at_quantile(q) as f64 / 1e6)
    }

    /// The largest sample in ms; `None` without samples.
    pub fn max_ms(&self) -> Option<f64> {
        (self.samples() > 0).then(|| self.0.max() as f64 / 1e6)
    }

    /// The distribution as `(latency µs, at least 1, percentile 0..100)` points: 201 evenly
    /// spaced up to p99.9, then p99.95 and p99.99, where the tail is.
    pub fn cdf_points(&self) -> Vec<(f64, f64)> {
        (0..=200)
            .map(|i| i as f64 / 200.0 * 0.999)
            .chain([0.9995, 0.9999])
            .map(|q| (self.percentile_us(q).max(1.0), q * 100.0))
            .collect()
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl FromIterator<Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = Duration>>(samples: I) -> Latencies {
        let mut lat = Latencies::new();
        for d in samples {
            lat.record(d);
        }
        lat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_a_few_runs_is_the_middle_one() {
        let lat: Latencies = [7, 1, 5, 3, 9, 2, 8]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        assert_eq!(lat.samples(), 7);
        assert!((lat.percentile_ms(0.5).unwrap() - 5.0).abs() < 5e-3);
        assert!((lat.max_ms().unwrap() - 9.0).abs() < 9e-3);
        assert_eq!(Latencies::new().percentile_ms(0.5), None);
    }
}
