//! Latency histograms: microsecond resolution, 3 significant digits, up to
//! one hour, over `hdrhistogram`. Each worker records into its own and the
//! run merges them at the end, so recording never takes a lock.

use hdrhistogram::Histogram;
use serde::Serialize;

pub struct Latency {
    h: Histogram<u64>,
}

/// What a report shows of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// The 99.9th percentile (absent in reports of older versions).
    #[serde(default)]
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

const MAX_US: u64 = 3_600_000_000;

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            h: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"),
        }
    }

    /// Records one latency in microseconds (clamped to the range, 0 counts as 1).
    pub fn record_us(&mut self, us: u64) {
        self.h.saturating_record(us.clamp(1, MAX_US));
    }

    pub fn add(&mut self, other: &Latency) {
        // Same bounds on both sides, so this cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// The recorded values as `(µs, count)` pairs, one per non-empty bucket:
    /// what a `--processes` child sends its parent, which rebuilds the
    /// same histogram with [`Latency::from_buckets`] and merges them.
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        self.h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub fn from_buckets(buckets: &[(u64, u64)]) -> Latency {
        let mut l = Latency::new();
        for &(us, n) in buckets {
            l.h.saturating_record_n(us.clamp(1, MAX_US), n);
        }
        l
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> Summary {
        if self.h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.h.len(),
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.h.max() as f64 / 1000.0,
            mean_ms: self.h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        // 3 significant digits: within 0.1 %.
        (a - b).abs() <= b.abs() * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = Latency::new();
        for us in 1..=10_000 {
            h.record_us(us);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert!(close(s.p50_ms, 5.0), "{s:?}");
        assert!(close(s.p90_ms, 9.0), "{s:?}");
        assert!(close(s.p99_ms, 9.9), "{s:?}");
        assert!(close(s.p999_ms, 9.99), "{s:?}");
        assert!(close(s.max_ms, 10.0), "{s:?}");
        assert!(close(s.mean_ms, 5.0005), "{s:?}");
    }

    #[test]
    fn an_outlier_shows_in_max_but_not_in_p99() {
        let mut h = Latency::new();
        for _ in 0..1000 {
            h.record_us(200);
        }
        h.record_us(2_000_000);
        let s = h.summary();
        assert!(close(s.p99_ms, 0.2), "{s:?}");
        assert!(close(s.max_ms, 2000.0), "{s:?}");
    }

    #[test]
    fn merged_histograms_count_everything() {
        let (mut a, mut b) = (Latency::new(), Latency::new());
        a.record_us(1000);
        b.record_us(3000);
        b.record_us(0);
        b.record_us(u64::MAX);
        a.add(&b);
        assert_eq!(a.count(), 4);
        assert!(close(a.summary().max_ms, MAX_US as f64 / 1000.0));
    }

    #[test]
    fn buckets_rebuild_the_same_histogram() {
        let mut a = Latency::new();
        for us in [1, 7, 7, 950, 12_345, 2_000_000, MAX_US] {
            a.record_us(us);
        }
        let b = Latency::from_buckets(&a.buckets());
        assert_eq!(b.count(), a.count());
        assert_eq!(b.summary(), a.summary());
        assert_eq!(b.buckets(), a.buckets());
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        assert_eq!(Latency::new().summary(), Summary::default());
    }
}
