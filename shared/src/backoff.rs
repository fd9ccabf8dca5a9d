//! Retry timing, sans IO: exponential backoff with jitter. The caller draws the randomness (this
//! crate draws nothing and reads no clock), so a fleet of edges that lost its cloud at the same
//! moment spreads its reconnections instead of arriving in lockstep.

use std::time::Duration;

/// Waits that double from `first` up to `cap`, each drawn from the upper half of its interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    interval: Duration,
}

impl Backoff {
    /// `cap` below `first` is taken as `first`.
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap: cap.max(first),
            interval: first,
        }
    }

    /// The wait before the next attempt: `unit` (a uniform draw in [0, 1], clamped) picks it in
    /// [interval / 2, interval] ("equal jitter": never at once, spread by up to half); the
    /// interval then doubles, up to the cap.
    pub fn next_wait(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let half = self.interval / 2;
        let wait = half + (self.interval - half).mul_f64(unit);
        self.interval = self.interval.saturating_mul(2).min(self.cap);
        wait
    }

    /// After a success: the next failure waits about `first` again.
    pub fn reset(&mut self) {
        self.interval = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_double_to_the_cap_within_the_upper_half_and_reset() {
        let mut b = Backoff::new(100 * MS, 1_000 * MS);
        assert_eq!(b.next_wait(1.0), 100 * MS);
        assert_eq!(b.next_wait(0.0), 100 * MS, "half of 200 ms");
        assert_eq!(b.next_wait(0.5), 300 * MS, "between 200 and 400 ms");
        assert_eq!(b.next_wait(1.0), 800 * MS);
        for _ in 0..100 {
            let w = b.next_wait(1.0);
            assert_eq!(w, 1_000 * MS, "capped");
        }
        b.reset();
        assert_eq!(b.next_wait(1.0), 100 * MS);
        for bad in [f64::NAN, f64::INFINITY, -3.0, 7.0] {
            let w = Backoff::new(100 * MS, 100 * MS).next_wait(bad);
            assert!((50 * MS..=100 * MS).contains(&w), "{bad}: {w:?}");
        }
        assert_eq!(Backoff::new(100 * MS, MS).next_wait(1.0), 100 * MS);
    }

    #[test]
    fn a_fleet_drawing_independently_spreads_over_half_the_interval() {
        let mut waits: Vec<Duration> = (0..1_000)
            .map(|i| Backoff::new(1_000 * MS, 1_000 * MS).next_wait(i as f64 / 999.0))
            .collect();
        waits.sort();
        assert_eq!((waits[0], waits[999]), (500 * MS, 1_000 * MS));
    }
}
