//! Shared pieces of the benchmarks: timing and the ratio report.

use std::time::{Duration, Instant};

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

/// Print a benchmark's result as a ratio against its baseline, and say whether it meets
/// `goal`. Returns the ratio.
pub fn report(name: &str, baseline_name: &str, baseline: f64, measured: f64, goal: f64) -> f64 {
    let ratio = measured / baseline.max(1e-9);
    println!("{baseline_name:<40} {baseline:>12.0} events/s");
    println!("{name:<40} {measured:>12.0} events/s");
    println!(
        "ratio {name} / {baseline_name} = {ratio:.2} (goal >= {goal:.2}: {})",
        if ratio >= goal { "met" } else { "NOT met" }
    );
    ratio
}

/// The median of `values` (sorts them).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Of paired rounds `(baseline, measured)`, the one whose ratio is the median: pairs
/// measured side by side are compared, so a round where the whole machine was slow
/// does not mix with another where it was fast.
pub fn median_round(rounds: &[(f64, f64)]) -> (f64, f64) {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| (a.1 / a.0.max(1e-9)).total_cmp(&(b.1 / b.0.max(1e-9))));
    sorted.get(sorted.len() / 2).copied().unwrap_or((0.0, 0.0))
}
