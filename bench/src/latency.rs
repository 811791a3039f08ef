//! Latency quantiles from the Prometheus histograms the pipeline exports: the difference
//! of two scrapes is the window's distribution, and a quantile is interpolated linearly
//! inside the bucket that holds it (as Prometheus's `histogram_quantile` does).

use anyhow::{Context, Result};

/// Cumulative bucket counts of one histogram series: (upper bound, count), ascending,
/// the last bound `+Inf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// The buckets of histogram `metric` whose label `label` is `value`, in the
    /// Prometheus text `scrape`; empty when the series is not there (yet).
    pub fn of(scrape: &str, metric: &str, label: &str, value: &str) -> Result<Self> {
        let lines = scrape.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).context("parsing /metrics")?;
        for sample in parsed.samples {
            if sample.metric != metric || sample.labels.get(label) != Some(value) {
                continue;
            }
            if let prometheus_parse::Value::Histogram(counts) = sample.value {
                let mut b: Vec<(f64, f64)> =
                    counts.iter().map(|c| (c.less_than, c.count)).collect();
                b.sort_by(|x, y| x.0.total_cmp(&y.0));
                return Ok(Self(b));
            }
        }
        Ok(Self::default())
    }

    /// What was recorded between `earlier` and `self` (same series, later scrape).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(le, n)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0.0, |(_, c)| *c);
                    (le, n - before)
                })
                .collect(),
        )
    }

    /// Observations in these buckets.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, n)| *n)
    }

    /// The `q` quantile (0..1), interpolated in its bucket; `None` without observations.
    /// A quantile in the `+Inf` bucket is reported as the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, n) in &self.0 {
            if n >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = n - lower.1;
                let share = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, n);
        }
        Some(lower.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# TYPE lat histogram\n\
        lat_bucket{sink=\"a\",le=\"0.1\"} 10\n\
        lat_bucket{sink=\"a\",le=\"0.5\"} 90\n\
        lat_bucket{sink=\"a\",le=\"1\"} 100\n\
        lat_bucket{sink=\"a\",le=\"+Inf\"} 100\n\
        lat_sum{sink=\"a\"} 30\n\
        lat_count{sink=\"a\"} 100\n\
        lat_bucket{sink=\"b\",le=\"0.1\"} 1\n\
        lat_bucket{sink=\"b\",le=\"0.5\"} 1\n\
        lat_bucket{sink=\"b\",le=\"1\"} 1\n\
        lat_bucket{sink=\"b\",le=\"+Inf\"} 1\n\
        lat_sum{sink=\"b\"} 0.05\n\
        lat_count{sink=\"b\"} 1\n";

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let b = Buckets::of(SCRAPE, "lat", "sink", "a").unwrap();
        assert_eq!(b.count(), 100.0);
        // The 50th of 100 lies half-way through the 80 between 0.1 and 0.5.
        assert!((b.quantile(0.5).unwrap() - 0.3).abs() < 1e-9);
        assert!((b.quantile(0.05).unwrap() - 0.05).abs() < 1e-9);
        assert!((b.quantile(0.99).unwrap() - 0.95).abs() < 1e-9);
    }

    #[test]
    fn a_window_is_the_difference_of_two_scrapes() {
        let before = Buckets(vec![(0.1, 5.0), (1.0, 5.0), (f64::INFINITY, 5.0)]);
        let after = Buckets(vec![(0.1, 5.0), (1.0, 15.0), (f64::INFINITY, 15.0)]);
        let window = after.since(&before);
        assert_eq!(window.count(), 10.0);
        assert!(
            window.quantile(0.5).unwrap() > 0.1,
            "only the new, slower ones count"
        );
        assert_eq!(Buckets::default().quantile(0.5), None);
        let other = Buckets::of(SCRAPE, "lat", "sink", "b").unwrap();
        assert_eq!(other.count(), 1.0);
    }
}
