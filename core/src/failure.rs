//! Why a record could not be processed, and its dead letter: the record sent to
//! `<topic>.dlq` with the original key, bytes and headers plus headers that say where it
//! came from and why. Shared by stages and sinks.

use rdkafka::message::{Header, Message, OwnedHeaders};

use crate::headers;

/// Why a record could not be processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Class of the error: `decode`, `validation`, `transform`, `write`, ...
    pub class: &'static str,
    /// What exactly was wrong.
    pub reason: String,
    /// Worth retrying (a lookup that is down), unlike a defect of the record itself.
    pub transient: bool,
}

impl Failure {
    /// A failure of `class` with `reason`, caused by the record: not retried.
    pub fn new(class: &'static str, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
            transient: false,
        }
    }

    /// A failure that may pass on a later attempt: retried with backoff, then dead-lettered.
    pub fn transient(class: &'static str, reason: impl Into<String>) -> Self {
        Self {
            transient: true,
            ..Self::new(class, reason)
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.reason)
    }
}

/// A record on its way to a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original bytes.
    pub payload: Vec<u8>,
    /// The original headers plus the dead-letter headers.
    pub headers: OwnedHeaders,
}

impl DeadLetter {
    /// The dead letter of `msg`, failed in `stage` after `attempts` attempts.
    pub fn of<M: Message>(msg: &M, stage: &str, failure: &Failure, attempts: u32) -> Self {
        let mut h = headers::without(msg.headers(), headers::DEAD_LETTER);
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let attempts = attempts.to_string();
        let failed_at = crate::now_ms().to_string();
        let record_ts = msg.timestamp().to_millis().unwrap_or(-1).to_string();
        for (key, value) in [
            (headers::DLQ_TOPIC, msg.topic()),
            (headers::DLQ_PARTITION, partition.as_str()),
            (headers::DLQ_OFFSET, offset.as_str()),
            (headers::DLQ_STAGE, stage),
            (headers::DLQ_ERROR_CLASS, failure.class),
            (headers::DLQ_REASON, failure.reason.as_str()),
            (headers::DLQ_ATTEMPTS, attempts.as_str()),
            (headers::DLQ_FAILED_AT_MS, failed_at.as_str()),
            (headers::DLQ_RECORD_TS_MS, record_ts.as_str()),
        ] {
            h = h.insert(Header {
                key,
                value: Some(value),
            });
        }
        Self {
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers: h,
        }
    }
}
