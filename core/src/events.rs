//! What happens at runtime that an operator should know of. Each event emits its log
//! line and its metric together, so that the two always agree.

use std::time::Duration;

/// Something that happened, to log and count.
pub trait Emit {
    /// Log it and record its metric.
    fn emit(self);
}

/// Which kind of component something happened in: its metrics are named after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// A stage, by name.
    Stage(&'static str),
    /// A sink, by name.
    Sink(&'static str),
}

/// Receiving from the broker failed (it is retried after a pause).
#[derive(Debug)]
pub struct ConsumeFailed<'a> {
    /// The stage or sink.
    pub component: &'static str,
    /// What failed.
    pub error: &'a str,
}

impl Emit for ConsumeFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            component = self.component,
            error = self.error,
            "consume error; retrying"
        );
    }
}

/// A record was sent to the dead-letter topic.
#[derive(Debug)]
pub struct DeadLettered<'a> {
    /// Where.
    pub component: Component,
    /// The failure's class.
    pub class: &'static str,
    /// Why.
    pub reason: &'a str,
}

impl Emit for DeadLettered<'_> {
    fn emit(self) {
        match self.component {
            Component::Stage(stage) => {
                tracing::debug!(
                    stage,
                    class = self.class,
                    reason = self.reason,
                    "dead-lettered"
                );
                metrics::counter!("sluice_stage_dead_letters_total", "stage" => stage, "reason" => self.class)
                    .increment(1);
            }
            Component::Sink(sink) => {
                tracing::debug!(
                    sink,
                    class = self.class,
                    reason = self.reason,
                    "dead-lettered"
                );
                metrics::counter!("sluice_sink_dead_letters_total", "sink" => sink, "reason" => self.class)
                    .increment(1);
            }
        }
    }
}

/// A sink's batch write failed for a reason that may pass; it is retried.
#[derive(Debug)]
pub struct BatchRetrying<'a> {
    /// The sink.
    pub sink: &'static str,
    /// Why it failed.
    pub error: &'a str,
    /// When it is tried again.
    pub retry_in: Duration,
}

impl Emit for BatchRetrying<'_> {
    fn emit(self) {
        tracing::warn!(
            sink = self.sink,
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "write failed; retrying the batch"
        );
        metrics::counter!("sluice_sink_retries_total", "sink" => self.sink).increment(1);
    }
}

/// Records of a sink's batch were stamped further ahead of the sink's clock than
/// [`MAX_CLOCK_SKEW_MS`]: the host that processed them has a clock running fast. Their
/// versions would beat a correcting replay's if replays trusted clocks (they carry a
/// replay epoch instead), and they beat later live processing of the same events.
#[derive(Debug)]
pub struct VersionsAhead {
    /// The sink.
    pub sink: &'static str,
    /// How many records.
    pub records: usize,
    /// How far ahead the furthest one was, in milliseconds.
    pub ahead_ms: i64,
}

/// How far ahead of a sink's clock a processing stamp may be before it is counted as a
/// clock running fast (hosts synchronised by NTP differ by far less).
pub const MAX_CLOCK_SKEW_MS: i64 = 60_000;

impl Emit for VersionsAhead {
    fn emit(self) {
        tracing::warn!(
            sink = self.sink,
            records = self.records,
            ahead_ms = self.ahead_ms,
            "records stamped ahead of this host's clock: a stage's clock runs fast"
        );
        metrics::counter!("sluice_sink_versions_ahead_total", "sink" => self.sink)
            .increment(self.records as u64);
    }
}

/// Some items of a sink's request were refused for load; they are sent again.
#[derive(Debug)]
pub struct ItemsRetrying {
    /// The sink.
    pub sink: &'static str,
    /// How many items.
    pub items: usize,
    /// When they are sent again.
    pub retry_in: Duration,
}

impl Emit for ItemsRetrying {
    fn emit(self) {
        tracing::warn!(
            sink = self.sink,
            items = self.items,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "items refused for load; re-sending them"
        );
        metrics::counter!("sluice_sink_retries_total", "sink" => self.sink)
            .increment(self.items as u64);
    }
}

/// A stage's record failed for a reason that may pass; it is retried.
#[derive(Debug)]
pub struct RecordRetrying<'a> {
    /// The stage.
    pub stage: &'static str,
    /// Attempts made so far.
    pub attempts: u32,
    /// Why it failed.
    pub failure: &'a str,
    /// When it is tried again.
    pub retry_in: Duration,
}

impl Emit for RecordRetrying<'_> {
    fn emit(self) {
        tracing::debug!(
            stage = self.stage,
            attempts = self.attempts,
            failure = self.failure,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "transient failure; retrying the record"
        );
        metrics::counter!("sluice_stage_retries_total", "stage" => self.stage).increment(1);
    }
}

/// A producer failed for good (e.g. the broker lost its idempotence state) and was
/// replaced.
#[derive(Debug)]
pub struct ProducerReplaced<'a> {
    /// The stage, or `None` for ingest.
    pub stage: Option<&'static str>,
    /// librdkafka's reason.
    pub reason: &'a str,
}

impl Emit for ProducerReplaced<'_> {
    fn emit(self) {
        match self.stage {
            Some(stage) => {
                tracing::warn!(
                    stage,
                    reason = self.reason,
                    "the producer failed for good; replaced it"
                );
                metrics::counter!("sluice_stage_producer_replacements_total", "stage" => stage)
                    .increment(1);
            }
            None => {
                tracing::warn!(
                    reason = self.reason,
                    "the producer failed for good; replaced it"
                );
                metrics::counter!("sluice_ingest_producer_replacements_total").increment(1);
            }
        }
    }
}

/// A record could not be delivered to the broker; it is sent again.
#[derive(Debug)]
pub struct DeliveryRetrying<'a> {
    /// The topic.
    pub topic: &'a str,
    /// Why.
    pub error: &'a str,
    /// When it is sent again.
    pub retry_in: Duration,
}

impl Emit for DeliveryRetrying<'_> {
    fn emit(self) {
        tracing::warn!(
            topic = self.topic,
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "record not delivered; sending it again"
        );
    }
}
