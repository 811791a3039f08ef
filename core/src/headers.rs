//! Names of the Kafka record headers Sluice sets, and helpers to read them.

use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Tenant that sent the event.
pub const TENANT: &str = "sluice.tenant";
/// Where the event came from (the client's `X-Source` header, or `http`).
pub const SOURCE: &str = "sluice.source";
/// Content type of the request that carried the event.
pub const CONTENT_TYPE: &str = "sluice.content_type";
/// When ingest received the event, in Unix milliseconds (end-to-end latency starts here).
pub const RECEIVED_AT_MS: &str = "sluice.received_at_ms";
/// Id of the ingest request that carried the event.
pub const INGEST_ID: &str = "sluice.ingest_id";
/// Unique id of the event, kept by every stage and used by sinks for idempotence.
pub const EVENT_ID: &str = "sluice.event_id";
/// The id ingest stamped on the raw record, kept by every later stage even when the
/// client chose its own `event_id`: `sluice audit` traces records back to raw with it.
pub const RAW_EVENT_ID: &str = "sluice.raw_event_id";
/// Encoding of the record value (`json`, `avro-single-object`, `avro-confluent`).
pub const ENCODING: &str = "sluice.encoding";
/// When the stage that produced the record processed it, Unix milliseconds: the
/// record's version. Sinks keep the newest processing of an event and ignore older ones,
/// so a replay after a fix overwrites and a late re-delivery of an old result does not.
pub const PROCESSED_AT_MS: &str = "sluice.processed_at_ms";
/// The replay epoch of the record's processing: the number `sluice replay` drew from the
/// replay log when it started (absent, i.e. 0, for live processing). It is the high-order
/// part of the record's [`version`], so a correcting replay beats every earlier
/// processing whatever the hosts' clocks said; later stages keep the highest epoch of
/// their input and their own.
pub const REPLAY_EPOCH: &str = "sluice.replay_epoch";
/// The replay that produced the record (its consumer group); absent outside replays.
/// `sluice audit` tells a replay's repeats from at-least-once redeliveries with it.
pub const REPLAY: &str = "sluice.replay";
/// Where a copied or restored record was first written: `topic/partition/offset`. A
/// record of another producer (no event id) keeps the id its first place gave it.
pub const REPLAYED_FROM: &str = "sluice.replayed_from";

/// Headers a stage sets on its own outputs; dropped from what it forwards.
pub const STAGE_STAMPS: &[&str] = &[PROCESSED_AT_MS, REPLAY, REPLAY_EPOCH];

/// Dead letters: topic the failed record came from.
pub const DLQ_TOPIC: &str = "sluice.dlq.topic";
/// Dead letters: partition the failed record came from.
pub const DLQ_PARTITION: &str = "sluice.dlq.partition";
/// Dead letters: offset of the failed record.
pub const DLQ_OFFSET: &str = "sluice.dlq.offset";
/// Dead letters: the stage or sink that failed.
pub const DLQ_STAGE: &str = "sluice.dlq.stage";
/// Dead letters: the class of the error (`decode`, `validation`, `transform`, `write`...).
pub const DLQ_ERROR_CLASS: &str = "sluice.dlq.error_class";
/// Dead letters: a human-readable reason.
pub const DLQ_REASON: &str = "sluice.dlq.reason";
/// Dead letters: how many attempts were made.
pub const DLQ_ATTEMPTS: &str = "sluice.dlq.attempts";
/// Dead letters: when the record was dead-lettered, Unix milliseconds.
pub const DLQ_FAILED_AT_MS: &str = "sluice.dlq.failed_at_ms";
/// Dead letters: the original record's timestamp, Unix milliseconds.
pub const DLQ_RECORD_TS_MS: &str = "sluice.dlq.record_ts_ms";
/// Dead letter: set on a stub that replaced a record too large for the dead-letter
/// topic; the original's size in bytes (the record itself stays at its origin).
pub const DLQ_DROPPED_BYTES: &str = "sluice.dlq.dropped_bytes";

/// Every dead-letter header: replaced when a dead letter fails again, dropped when a
/// re-driven one succeeds.
pub const DEAD_LETTER: &[&str] = &[
    DLQ_TOPIC,
    DLQ_PARTITION,
    DLQ_OFFSET,
    DLQ_STAGE,
    DLQ_ERROR_CLASS,
    DLQ_REASON,
    DLQ_ATTEMPTS,
    DLQ_FAILED_AT_MS,
    DLQ_RECORD_TS_MS,
    DLQ_DROPPED_BYTES,
];

/// The value of header `name` as UTF-8, if present and valid.
pub fn get<'a, H: Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Bits of a [`version`] that hold the processing time: milliseconds up to the year 2109.
const TIME_BITS: u32 = 42;
/// Largest replay epoch a version holds (Elasticsearch's external versions are positive
/// 63-bit numbers).
pub const MAX_EPOCH: u32 = (1 << (63 - TIME_BITS)) - 1;

/// A record's version: its replay epoch in the high-order bits, its processing time
/// (Unix milliseconds) in the low 42. Of two versions of one event the greater wins, so
/// any replay beats live processing and a later replay an earlier one, while within one
/// epoch the processing time decides. Epoch 0 leaves the time as it is.
pub fn version_of(epoch: u32, processed_at_ms: i64) -> i64 {
    (i64::from(epoch.min(MAX_EPOCH)) << TIME_BITS) | processed_at_ms.clamp(0, (1 << TIME_BITS) - 1)
}

/// The replay epoch and processing time (Unix milliseconds) of a version.
pub fn split_version(version: i64) -> (u32, i64) {
    let v = version.max(0);
    (
        u32::try_from(v >> TIME_BITS).unwrap_or(MAX_EPOCH),
        v & ((1 << TIME_BITS) - 1),
    )
}

/// The replay epoch of a record's headers: 0 when absent (live processing).
pub fn epoch<H: Headers>(headers: Option<&H>) -> u32 {
    get(headers, REPLAY_EPOCH)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The processing time of a record: its stamp, else its Kafka timestamp (records
/// written before stamps existed), else 0.
pub fn processed_at<M: rdkafka::message::Message>(msg: &M) -> i64 {
    get(msg.headers(), PROCESSED_AT_MS)
        .and_then(|v| v.parse().ok())
        .or_else(|| msg.timestamp().to_millis())
        .unwrap_or(0)
}

/// The version of a record (see [`version_of`]): its replay epoch and processing time.
pub fn version<M: rdkafka::message::Message>(msg: &M) -> i64 {
    version_of(epoch(msg.headers()), processed_at(msg))
}

/// The headers a stage forwards from its input: all but the dead-letter headers, the
/// previous stage's stamps and the keys in `replaced` (which the stage sets itself).
pub fn forward<H: Headers>(input: Option<&H>, replaced: &[&str]) -> OwnedHeaders {
    let mut out =
        OwnedHeaders::new_with_capacity(input.map_or(0, Headers::count) + replaced.len() + 2);
    if let Some(h) = input {
        for header in h.iter().filter(|h| {
            !replaced.contains(&h.key)
                && !DEAD_LETTER.contains(&h.key)
                && !STAGE_STAMPS.contains(&h.key)
        }) {
            out = out.insert(header);
        }
    }
    out
}

/// Add a stage's stamps to one of its outputs: the version (processing time and replay
/// epoch, written only when not 0) and the replay that produced it, if any.
pub fn stamp(headers: OwnedHeaders, version: i64, replay: Option<&str>) -> OwnedHeaders {
    let (epoch, at) = split_version(version);
    let at = at.to_string();
    let mut h = headers.insert(Header {
        key: PROCESSED_AT_MS,
        value: Some(at.as_str()),
    });
    if epoch > 0 {
        let epoch = epoch.to_string();
        h = h.insert(Header {
            key: REPLAY_EPOCH,
            value: Some(epoch.as_str()),
        });
    }
    match replay {
        Some(r) => h.insert(Header {
            key: REPLAY,
            value: Some(r),
        }),
        None => h,
    }
}

/// The value of `sluice.replayed_from` for a record at `topic`/`partition`/`offset`.
pub fn origin(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// `topic/partition/offset` of a `sluice.replayed_from` value, as [`origin`] writes it
/// (topic names hold no `/`); `None` for anything else.
pub fn parse_origin(from: &str) -> Option<(&str, i32, i64)> {
    let mut parts = from.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    let topic = parts.next().filter(|t| !t.is_empty())?;
    Some((topic, partition, offset))
}

/// Headers without any whose key is in `drop`.
pub fn without<H: Headers>(headers: Option<&H>, drop: &[&str]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(h) = headers {
        for header in h.iter().filter(|h| !drop.contains(&h.key)) {
            out = out.insert(header);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_replay_epoch_beats_any_processing_time_and_splits_back() {
        let live_fast = version_of(0, 4_102_444_800_000); // 2100-01-01
        let replay = version_of(1, 1_700_000_000_000);
        assert!(replay > live_fast);
        assert!(version_of(2, 0) > version_of(1, 4_102_444_800_000));
        assert_eq!(version_of(0, 1_700_000_000_123), 1_700_000_000_123);
        assert_eq!(split_version(replay), (1, 1_700_000_000_000));
        assert_eq!(split_version(version_of(MAX_EPOCH, i64::MAX)).0, MAX_EPOCH);
        assert!(version_of(MAX_EPOCH, i64::MAX) > 0);
        assert_eq!(split_version(-5), (0, 0));
    }

    #[test]
    fn a_stamp_carries_the_epoch_only_when_there_is_one() {
        let live = stamp(OwnedHeaders::new(), version_of(0, 1_000), None);
        assert_eq!(get(Some(&live), PROCESSED_AT_MS), Some("1000"));
        assert_eq!(epoch(Some(&live)), 0);
        assert_eq!(get(Some(&live), REPLAY_EPOCH), None);
        let replayed = stamp(OwnedHeaders::new(), version_of(3, 2_000), Some("fix-1"));
        assert_eq!(get(Some(&replayed), PROCESSED_AT_MS), Some("2000"));
        assert_eq!(epoch(Some(&replayed)), 3);
        assert_eq!(get(Some(&replayed), REPLAY), Some("fix-1"));
        // A later stage replaces the stamps it forwards.
        let next = forward(Some(&replayed), &[]);
        assert_eq!(epoch(Some(&next)), 0);
    }

    #[test]
    fn an_origin_reads_back_as_written() {
        let from = origin("ns.raw.restore-20261201", 3, 42);
        assert_eq!(
            parse_origin(&from),
            Some(("ns.raw.restore-20261201", 3, 42))
        );
        for bad in ["raw/x/42", "3/42", "/3/42", "raw/3/"] {
            assert_eq!(parse_origin(bad), None, "{bad}");
        }
    }
}
