//! Shared pieces of the benchmarks: timing, paired rounds and their ratio, and the bare
//! baselines (a consume→produce pass-through, a bare producer, `psql \copy`, `curl
//! _bulk`) that the measured parts are compared with in the same run.
//!
//! The machines are noisy (two cores shared with the servers, whose periodic saves take
//! a core while they hold a lot), so every comparison is made of rounds in which the
//! baseline and the measured pass run back to back; the median of the per-round ratios is
//! reported with its spread, and each pass deletes what it created.

#![allow(clippy::unwrap_used)] // benchmarks: a failed step stops the run with its message

pub mod baselines;
pub mod lag;
pub mod latency;
pub mod processes;
pub mod procstat;

use std::time::{Duration, Instant};

/// The connections the Helm chart gives the TimescaleDB sink (`timescale.pool_size` in
/// `helm/sluice/values.yaml`); the benches run the sink as deployed.
pub const CHART_PG_CONNECTIONS: usize = 4;

/// Events per second of `events` done in `elapsed`.
pub fn rate(events: usize, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Time an async block.
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// The median of `values` (sorts them): of an even count, the mean of the middle two
/// (the upper one alone would report the better of two rounds as their median).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Write a benchmark's results as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    println!("results written to {}", path.display());
    Ok(())
}

/// Where a benchmark's results go: `given`, or `target/bench-results/<bench>-<time>.json`.
pub fn results_path(
    bench: &str,
    given: Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let dir = std::path::PathBuf::from("target/bench-results");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(format!(
        "{bench}-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    )))
}

/// Paired rounds of one comparison: a baseline and a measured rate per round.
#[derive(Debug, Clone, Default)]
pub struct Rounds {
    /// What is measured.
    pub name: String,
    /// What it is compared with.
    pub baseline_name: String,
    /// (baseline, measured) rates, per round.
    pub pairs: Vec<(f64, f64)>,
}

/// What [`Rounds`] amount to.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Verdict {
    /// The median of the per-round ratios.
    pub ratio: f64,
    /// The lowest per-round ratio.
    pub min: f64,
    /// The highest per-round ratio.
    pub max: f64,
    /// The baseline's median rate.
    pub baseline: f64,
    /// The measured median rate.
    pub measured: f64,
    /// The goal.
    pub goal: f64,
    /// Whether the median ratio meets it.
    pub met: bool,
}

impl Rounds {
    /// A comparison of `name` with `baseline_name`.
    pub fn new(name: &str, baseline_name: &str) -> Self {
        Self {
            name: name.into(),
            baseline_name: baseline_name.into(),
            pairs: Vec::new(),
        }
    }

    /// Add one round.
    pub fn push(&mut self, baseline: f64, measured: f64) {
        self.pairs.push((baseline, measured));
    }

    /// The median ratio and its spread against `goal`.
    pub fn verdict(&self, goal: f64) -> Verdict {
        let mut ratios: Vec<f64> = self.pairs.iter().map(|(b, m)| m / b.max(1e-9)).collect();
        let mut baselines: Vec<f64> = self.pairs.iter().map(|p| p.0).collect();
        let mut measured: Vec<f64> = self.pairs.iter().map(|p| p.1).collect();
        let ratio = median(&mut ratios);
        Verdict {
            ratio,
            min: ratios.first().copied().unwrap_or(0.0),
            max: ratios.last().copied().unwrap_or(0.0),
            baseline: median(&mut baselines),
            measured: median(&mut measured),
            goal,
            met: ratio >= goal,
        }
    }

    /// Print the verdict (median ratio, spread, rates, goal) and return it.
    pub fn report(&self, goal: f64) -> Verdict {
        let v = self.verdict(goal);
        println!(
            "{}   goal >= {:.2}: {}",
            self.line(&v),
            goal,
            if v.met { "met" } else { "NOT met" }
        );
        v
    }

    /// Print the median ratio, spread and rates of a comparison that has no goal (it
    /// explains the others), and return them.
    pub fn inform(&self) -> Verdict {
        let v = self.verdict(0.0);
        println!("{}", self.line(&v));
        v
    }

    fn line(&self, v: &Verdict) -> String {
        format!(
            "{:<34} {:>9.0}/s   {:<30} {:>9.0}/s   ratio {:.2} (rounds {:.2}..{:.2}, n={})",
            self.name,
            v.measured,
            self.baseline_name,
            v.baseline,
            v.ratio,
            v.min,
            v.max,
            self.pairs.len(),
        )
    }
}

/// POST an NDJSON `body` to ingest at `url` with API key `key`; whether it was accepted
/// (202).
pub async fn post_ndjson(http: &reqwest::Client, url: &str, key: &str, body: String) -> bool {
    http.post(url)
        .bearer_auth(key)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .is_ok_and(|r| r.status().as_u16() == 202)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_ratio_and_its_spread() {
        let mut r = Rounds::new("m", "b");
        for (b, m) in [(100.0, 80.0), (100.0, 60.0), (50.0, 45.0)] {
            r.push(b, m);
        }
        let v = r.verdict(0.7);
        assert!((v.ratio - 0.8).abs() < 1e-9, "{v:?}");
        assert!(
            (v.min - 0.6).abs() < 1e-9 && (v.max - 0.9).abs() < 1e-9,
            "{v:?}"
        );
        assert!(v.met);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let mut r = Rounds::new("m", "b");
        r.push(100.0, 76.0);
        r.push(100.0, 103.0);
        let v = r.verdict(0.9);
        assert!((v.ratio - 0.895).abs() < 1e-9, "{v:?}");
        assert!(!v.met, "the better round alone must not meet the goal");
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
