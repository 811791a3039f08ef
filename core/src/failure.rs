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

impl DeadLetter {
    /// Bytes it takes as a record: key, payload and headers.
    pub fn size(&self) -> usize {
        use rdkafka::message::Headers;
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.len() + headers
    }

    /// The dead letter as it is, or, when it would not fit a record of `max_bytes`, a stub
    /// that keeps the dead-letter headers (where the record is: topic, partition, offset;
    /// why) and the tenant and event id, with the original's size in
    /// `sluice.dlq.dropped_bytes`. Without it a too-large dead letter would be refused by
    /// the producer for ever, and its partition would stall.
    pub fn fit(self, max_bytes: usize) -> Self {
        use rdkafka::message::Headers;
        let room = max_bytes.saturating_sub(crate::config::RECORD_ROOM_BYTES / 2);
        if self.size() <= room {
            return self;
        }
        let dropped = self.size().to_string();
        let mut h = OwnedHeaders::new();
        for header in self.headers.iter() {
            let keep = header.key.starts_with("sluice.dlq.")
                || header.key == headers::TENANT
                || header.key == headers::EVENT_ID;
            if keep && header.value.map_or(0, <[u8]>::len) <= 4096 {
                h = h.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        h = h.insert(Header {
            key: headers::DLQ_DROPPED_BYTES,
            value: Some(dropped.as_str()),
        });
        Self {
            key: None,
            payload: Vec::new(),
            headers: h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_too_large_becomes_a_stub_that_says_where_and_why() {
        let small = DeadLetter {
            key: Some(b"k".to_vec()),
            payload: vec![b'x'; 100],
            headers: OwnedHeaders::new().insert(Header {
                key: headers::DLQ_REASON,
                value: Some("oversized: …"),
            }),
        };
        assert_eq!(
            small.clone().fit(1_000_000).payload.len(),
            100,
            "fits: unchanged"
        );
        let big = DeadLetter {
            payload: vec![b'x'; 2_000_000],
            headers: small
                .headers
                .clone()
                .insert(Header {
                    key: headers::TENANT,
                    value: Some("acme"),
                })
                .insert(Header {
                    key: "x-client",
                    value: Some("dropped"),
                }),
            ..small
        };
        let stub = big.fit(1_000_000);
        assert!(stub.payload.is_empty() && stub.key.is_none());
        assert_eq!(
            headers::get(Some(&stub.headers), headers::DLQ_REASON),
            Some("oversized: …")
        );
        assert_eq!(
            headers::get(Some(&stub.headers), headers::TENANT),
            Some("acme")
        );
        assert_eq!(headers::get(Some(&stub.headers), "x-client"), None);
        assert!(headers::get(Some(&stub.headers), headers::DLQ_DROPPED_BYTES).is_some());
    }
}
