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
