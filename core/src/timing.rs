//! For tests that show a cost does not grow with the data (table rows, open sessions,
//! tenants, batch size): time the same work on a small and a large input, in the same
//! test, and compare. A ratio of two timings taken moments apart holds on a noisy
//! machine where an absolute time would not.

use std::time::{Duration, Instant};

/// The fastest of `runs` timings of `work`, each on a fresh `setup()`. Neither the
/// setup nor dropping what it made is timed. The fastest, because other processes'
/// interference only ever adds time.
pub fn fastest<S>(
    runs: usize,
    mut setup: impl FnMut() -> S,
    mut work: impl FnMut(&mut S),
) -> Duration {
    (0..runs.max(1))
        .map(|_| {
            let mut input = setup();
            let t = Instant::now();
            work(&mut input);
            let elapsed = t.elapsed();
            drop(input);
            elapsed
        })
        .min()
        .unwrap_or_default()
}

/// How many times as long `large` took as `small`.
pub fn slowdown(large: Duration, small: Duration) -> f64 {
    large.as_secs_f64() / small.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the setup makes: slow to make and slow to drop.
    struct SlowInput(Duration);

    impl Drop for SlowInput {
        fn drop(&mut self) {
            std::thread::sleep(self.0);
        }
    }

    /// A sleep lasts at least its length, so a timing that included the setup, the drop
    /// or a slow run could not come in under it; the fast run does nothing.
    #[test]
    fn setup_and_drop_are_not_timed_and_the_fastest_run_counts() {
        let pause = Duration::from_millis(200);
        let mut run = 0;
        let t = fastest(
            3,
            || {
                std::thread::sleep(pause);
                SlowInput(pause)
            },
            |_| {
                run += 1;
                if run != 2 {
                    std::thread::sleep(pause);
                }
            },
        );
        assert_eq!(run, 3);
        assert!(t < pause, "{t:?}");
    }

    #[test]
    fn slowdown_is_the_ratio() {
        let r = slowdown(Duration::from_millis(30), Duration::from_millis(10));
        assert!((r - 3.0).abs() < 1e-9);
    }
}
