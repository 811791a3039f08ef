//! The two stage runtimes, at-least-once and exactly-once (Kafka transactions), and what
//! they share. [`run_stage`] picks one from the stage's spec.

pub mod at_least_once;
pub mod exactly_once;
mod produce;

use std::sync::Arc;

use sluice_core::config::KafkaConfig;
use tokio_util::sync::CancellationToken;

use crate::transform::{StageError, StageSpec, StageStats, Transform};

/// Records a runtime takes from the consumer's queue in one go, without going back
/// through its loop's `select!`: a wake-up per record cost more than the transforms.
const BURST: usize = 256;

/// Counts the records a runtime takes in one go, up to [`BURST`], and ends the burst at
/// the first one it refuses. A runtime refuses a record only at shutdown with no room
/// for it, and leaves it untracked for the next run; a record taken after it (an ack
/// having freed room meanwhile) would let the committed offset pass it.
#[derive(Debug, Default)]
struct Burst {
    taken: usize,
}

impl Burst {
    /// The runtime took (or refused) a record: whether to take another.
    fn goes_on(&mut self, took: bool) -> bool {
        if !took {
            return false;
        }
        self.taken += 1;
        self.taken < BURST
    }
}

/// Run `transform` as a stage until `shutdown` is cancelled, at-least-once or (with
/// `spec.exactly_once`) in Kafka transactions; then drain, commit, and return what was
/// done. Fed in-process (`spec.feed`), it runs until the records end, at-least-once:
/// there is no consumed offset to commit in a transaction.
pub async fn run_stage<T: Transform>(
    kafka: &KafkaConfig,
    spec: &StageSpec,
    transform: Arc<T>,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let mut spec = spec.clone();
    spec.max_message_bytes = kafka.max_message_bytes();
    if spec.feed.is_some() {
        at_least_once::run_fed(kafka, &spec, transform, shutdown).await
    } else if spec.exactly_once {
        exactly_once::run(kafka, &spec, transform, shutdown).await
    } else {
        at_least_once::run(kafka, &spec, transform, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Take records 0.. in bursts as the at-least-once loop does; `refuse` is refused.
    fn burst_of(refuse: usize) -> Vec<usize> {
        let mut burst = Burst::default();
        let mut taken = Vec::new();
        for record in 0.. {
            let took = record != refuse;
            if took {
                taken.push(record);
            }
            if !burst.goes_on(took) {
                break;
            }
        }
        taken
    }

    #[test]
    fn a_burst_stops_at_the_first_refused_record() {
        // Record 3 meets a full in-flight bound at shutdown; by record 4 an ack may have
        // freed room. Nothing after 3 may be taken.
        assert_eq!(burst_of(3), vec![0, 1, 2]);
    }

    #[test]
    fn a_burst_takes_at_most_its_bound() {
        assert_eq!(burst_of(usize::MAX).len(), BURST);
    }
}
