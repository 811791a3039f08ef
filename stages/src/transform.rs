//! What a stage is: a [`Transform`] of one record into outputs or a failure, where it
//! reads and writes ([`StageSpec`]), and the processing of one record that both stage
//! runtimes share (retries of transient failures, stamps, dead letters, counts).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders, OwnedMessage};
use sluice_core::config::TopicsConfig;
use sluice_core::events::{Component, DeadLettered, Emit};
use sluice_core::failure::{DeadLetter, Failure};
use sluice_core::headers;
use sluice_core::replay_scope::{Admit, ReplayScope};
use sluice_core::wiring::Rewiring;

/// One record a transform produces for the stage's output topic.
#[derive(Debug, Clone)]
pub struct Output {
    /// Record key (decides the partition).
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers.
    pub headers: OwnedHeaders,
}

impl Output {
    /// Bytes it takes as a record: key, payload and headers (with a little framing).
    pub fn size(&self) -> usize {
        use rdkafka::message::Headers;
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 8)
            .sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.len() + headers + 64
    }
}

/// What a stage does to each record.
pub trait Transform: Send + Sync + 'static {
    /// Name used in metrics, logs and dead-letter headers.
    fn name(&self) -> &'static str;
    /// Turn one input record into zero or more outputs, or say why it cannot be.
    fn process<M: Message>(&self, msg: &M) -> Result<Vec<Output>, Failure>;
}

/// Why a stage stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Reading a range of a topic failed.
    #[error("{0}")]
    Admin(#[from] sluice_core::kafka::KafkaAdminError),
    /// An output does not encode (a defect of the stage).
    #[error("encoding an output: {0}")]
    Encode(String),
    /// Shutdown came while an output was still undelivered (nothing more is committed).
    #[error("stopped with an output to {0} undelivered")]
    Undelivered(String),
    /// A codec could not be set up (e.g. the registry refused a schema).
    #[error("{0}")]
    Codec(#[from] sluice_schemas::setup::SetupError),
    /// The stage's settings are wrong.
    #[error("{0}")]
    Settings(String),
    /// An aborted transaction's records could not be rewound on a partition the stage
    /// still owns: going on would commit past them, so the stage stops, and its restart
    /// reads from the committed offsets.
    #[error("cannot rewind {topic} [{partition}] to offset {offset} after an aborted transaction: {source}")]
    Rewind {
        /// The input topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The aborted batch's first offset there.
        offset: i64,
        /// Why the seek failed.
        source: KafkaError,
    },
}

/// Where a stage reads from and writes to.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Consumer group.
    pub group: String,
    /// Topic consumed.
    pub input: String,
    /// Topic the outputs go to.
    pub output: String,
    /// Topic the dead letters go to.
    pub dlq: String,
    /// Most records awaiting broker acks at once.
    pub max_in_flight: usize,
    /// Most bytes of outputs awaiting broker acks (with `max_in_flight`, whichever is
    /// reached first).
    pub max_in_flight_bytes: usize,
    /// Longest wait for in-flight records when partitions are revoked or at shutdown.
    pub drain_timeout: Duration,
    /// Bounds of a replay run (end offsets, tenant, rate); `None` for a normal run.
    pub scope: Option<Arc<ReplayScope>>,
    /// Kafka transactions around read-process-write instead of at-least-once.
    pub exactly_once: bool,
    /// Exactly-once: most records in one transaction.
    pub transaction_max_records: usize,
    /// Exactly-once: longest a transaction stays open.
    pub transaction_linger: Duration,
    /// How transient failures are retried before a record is dead-lettered.
    pub retry: crate::retry::RetryPolicy,
    /// The producers' `message.max.bytes`: larger outputs are dead-lettered, larger dead
    /// letters replaced by stubs. Set from the Kafka settings when the stage starts.
    pub max_message_bytes: usize,
    /// Records fed in-process instead of consumed from `input` (a replay of the archive).
    pub feed: Option<sluice_core::wiring::Feed>,
}

impl StageSpec {
    /// A stage in `group` reading `input` and writing `output`, its dead letters to
    /// `<input>.dlq`, as `rewiring` changes it (a re-driven record's dead letters still go
    /// to the usual DLQ); the other settings at their defaults.
    pub fn new(
        topics: &TopicsConfig,
        group: &str,
        input: &str,
        output: &str,
        rewiring: &Rewiring,
    ) -> Self {
        Self {
            group: Rewiring::or(&rewiring.group, group),
            input: Rewiring::or(&rewiring.input, input),
            output: Rewiring::or(&rewiring.output, output),
            dlq: Rewiring::or(&rewiring.dlq, &topics.dlq(input)),
            max_in_flight: 10_000,
            max_in_flight_bytes: 64 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
            scope: rewiring.scope.clone(),
            exactly_once: false,
            transaction_max_records: 10_000,
            transaction_linger: Duration::from_millis(500),
            retry: Default::default(),
            max_message_bytes: 1_000_000,
            feed: rewiring.feed.clone(),
        }
    }
}

/// The record being processed: borrowed from the consumer, or owned (detached for
/// retries, or fed in-process).
pub(crate) enum Held<'a> {
    Borrowed(BorrowedMessage<'a>),
    Owned(OwnedMessage),
}

/// Counts of what a stage did, returned when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageStats {
    /// Records consumed.
    pub consumed: u64,
    /// Output records published.
    pub published: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
}

impl std::ops::AddAssign for StageStats {
    fn add_assign(&mut self, other: Self) {
        self.consumed += other.consumed;
        self.published += other.published;
        self.dead_lettered += other.dead_lettered;
    }
}

impl StageStats {
    /// Log the line a runtime ends with (`what`: "stage stopped" and the like): the
    /// counts and the rate since `started`.
    pub(crate) fn log_stopped(&self, stage: &str, started: std::time::Instant, what: &str) {
        tracing::info!(
            stage,
            consumed = self.consumed,
            published = self.published,
            dead_lettered = self.dead_lettered,
            records_per_s =
                (self.consumed as f64 / started.elapsed().as_secs_f64().max(1e-3)).round(),
            "{what}"
        );
    }
}

impl Held<'_> {
    /// The record's partition and offset.
    pub(crate) fn position(&self) -> (i32, i64) {
        match self {
            Held::Borrowed(m) => (m.partition(), m.offset()),
            Held::Owned(m) => (m.partition(), m.offset()),
        }
    }
}

/// Metric handles of a stage, resolved once: a labelled lookup per record is measurable.
pub(crate) struct Meters {
    pub(crate) records_in: metrics::Counter,
    pub(crate) records_out: metrics::Counter,
    pub(crate) processing: metrics::Histogram,
}

impl Meters {
    pub(crate) fn of(name: &'static str, spec: &StageSpec) -> Self {
        Self {
            records_in: metrics::counter!("sluice_stage_records_in_total", "stage" => name, "topic" => spec.input.clone()),
            records_out: metrics::counter!("sluice_stage_records_out_total", "stage" => name, "topic" => spec.output.clone()),
            processing: metrics::histogram!("sluice_stage_processing_duration_seconds", "stage" => name),
        }
    }
}

/// One record, processed: what to produce, and to which topic.
pub(crate) struct Processed<'a, 's> {
    /// The record (detached when it was retried).
    pub(crate) held: Held<'a>,
    /// Its outputs, stamped, or its dead letter.
    pub(crate) outputs: Vec<Output>,
    /// Their size ([`Output::size`]), measured once for both the size limit and the
    /// in-flight bound.
    pub(crate) bytes: usize,
    /// The output topic, or the dead-letter topic.
    pub(crate) topic: &'s str,
}

/// Transform one record (a skipped one yields nothing), retrying a transient failure
/// as `retry` allows (the record is detached then, as waiting must not hold the
/// consumer's borrowed message), and turn the result into stamped outputs or a dead
/// letter, counting both.
pub(crate) async fn process<'a, 's, T: Transform>(
    transform: &T,
    retry: &mut crate::retry::Retry,
    spec: &'s StageSpec,
    msg: Held<'a>,
    admit: Admit,
    stats: &mut StageStats,
    meters: &Meters,
) -> Processed<'a, 's> {
    let name = transform.name();
    let input_epoch = match &msg {
        Held::Borrowed(m) => headers::epoch(m.headers()),
        Held::Owned(m) => headers::epoch(m.headers()),
    };
    let started = std::time::Instant::now();
    let mut result = match (admit, &msg) {
        (Admit::Process, Held::Borrowed(m)) => transform.process(m),
        (Admit::Process, Held::Owned(m)) => transform.process(m),
        _ => Ok(Vec::new()),
    };
    meters.processing.record(started.elapsed().as_secs_f64());
    let mut attempts = 1;
    let transient = matches!(&result, Err(f) if f.transient);
    let held = match msg {
        Held::Borrowed(m) if transient => {
            let owned = m.detach();
            drop(m);
            (result, attempts) = retry.run(transform, &owned, result).await;
            Held::Owned(owned)
        }
        Held::Owned(m) if transient => {
            (result, attempts) = retry.run(transform, &m, result).await;
            Held::Owned(m)
        }
        held => held,
    };
    // Stamped before they are measured: the size that counts is the produced record's.
    // An output the producer would refuse for its size is a defect of the record: it is
    // dead-lettered instead of retried for ever (which would stall the partition).
    let result = result
        .map(|outputs| stamped(outputs, spec, input_epoch))
        .and_then(|outputs| {
            let mut bytes = 0;
            for size in outputs.iter().map(Output::size) {
                if size > spec.max_message_bytes {
                    return Err(Failure::new(
                        "oversized",
                        format!(
                            "output of {size} bytes exceeds the producers' message.max.bytes ({})",
                            spec.max_message_bytes
                        ),
                    ));
                }
                bytes += size;
            }
            Ok((outputs, bytes))
        });
    match result {
        Ok((outputs, bytes)) => {
            stats.published += outputs.len() as u64;
            meters.records_out.increment(outputs.len() as u64);
            Processed {
                held,
                outputs,
                bytes,
                topic: &spec.output,
            }
        }
        Err(failure) => {
            stats.dead_lettered += 1;
            DeadLettered {
                component: Component::Stage(name),
                class: failure.class,
                reason: &failure.reason,
            }
            .emit();
            let dl = match &held {
                Held::Borrowed(m) => DeadLetter::of(m, name, &failure, attempts),
                Held::Owned(m) => DeadLetter::of(m, name, &failure, attempts),
            }
            .fit(spec.max_message_bytes);
            let output = Output {
                key: dl.key,
                payload: dl.payload,
                headers: dl.headers,
            };
            Processed {
                held,
                bytes: output.size(),
                outputs: vec![output],
                topic: &spec.dlq,
            }
        }
    }
}

/// Stamp a record's outputs with this processing (and the replay running it, if any): the
/// time now, and the higher of the input's replay epoch and this replay's.
pub(crate) fn stamped(outputs: Vec<Output>, spec: &StageSpec, input_epoch: u32) -> Vec<Output> {
    let epoch = spec
        .scope
        .as_ref()
        .map_or(0, |s| s.epoch())
        .max(input_epoch);
    let now = headers::version_of(epoch, sluice_core::now_ms());
    let replay = spec.scope.is_some().then_some(spec.group.as_str());
    outputs
        .into_iter()
        .map(|o| Output {
            headers: headers::stamp(o.headers, now, replay),
            ..o
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Headers, Timestamp};

    /// Outputs one record of 100 zero bytes, whatever it is given.
    struct Hundred;

    impl Transform for Hundred {
        fn name(&self) -> &'static str {
            "hundred"
        }

        fn process<M: Message>(&self, _: &M) -> Result<Vec<Output>, Failure> {
            Ok(vec![Output {
                key: None,
                payload: vec![0; 100],
                headers: OwnedHeaders::new(),
            }])
        }
    }

    /// `Hundred`'s output through `process` with `limit` as the producers' limit.
    async fn through(limit: usize) -> (String, Vec<Output>, usize, Option<String>) {
        let mut spec = StageSpec::new(&Default::default(), "g", "in", "out", &Default::default());
        spec.max_message_bytes = limit;
        let msg = OwnedMessage::new(
            Some(b"line".to_vec()),
            None,
            "in".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        );
        let held = Held::Owned(msg);
        let meters = Meters::of("hundred", &spec);
        let mut retry = crate::retry::Retry::new(spec.retry.clone(), "hundred");
        let mut stats = StageStats::default();
        let done = process(
            &Hundred,
            &mut retry,
            &spec,
            held,
            Admit::Process,
            &mut stats,
            &meters,
        )
        .await;
        let class = done.outputs.first().and_then(|o| {
            sluice_core::headers::get(Some(&o.headers), sluice_core::headers::DLQ_ERROR_CLASS)
                .map(str::to_string)
        });
        let topic = done.topic.to_string();
        (topic, done.outputs, done.bytes, class)
    }

    #[tokio::test]
    async fn an_output_is_measured_stamped_against_the_size_limit() {
        let bare = Output {
            key: None,
            payload: vec![0; 100],
            headers: OwnedHeaders::new(),
        }
        .size();

        // Fits as the transform made it, not once stamped: the producer would refuse it.
        let (topic, outputs, bytes, class) = through(bare).await;
        assert_eq!(topic, "in.dlq");
        assert_eq!(class.as_deref(), Some("oversized"));
        assert_eq!(bytes, outputs[0].size());

        // With room for the stamp it is published, stamped, and counted at that size.
        let (topic, outputs, bytes, class) = through(bare + 64).await;
        assert_eq!(topic, "out");
        assert_eq!(class, None);
        assert_eq!(outputs.len(), 1);
        assert!(outputs[0]
            .headers
            .iter()
            .any(|h| h.key == sluice_core::headers::PROCESSED_AT_MS));
        assert_eq!(bytes, outputs[0].size());
        assert!(bytes > bare);
    }
}
