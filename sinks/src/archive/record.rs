//! One archived record and its Parquet form: the columns a batch engine needs, zstd
//! compressed.
//!
//! | column | type | |
//! | --- | --- | --- |
//! | `tenant` | string | `sluice.tenant` header (`_unknown` without one) |
//! | `event_id` | string | `sluice.event_id` header (`topic/partition/offset` without one) |
//! | `received_at` | timestamp (ms, UTC) | `sluice.received_at_ms` header (the Kafka timestamp without one) |
//! | `key` | binary, nullable | the record key |
//! | `value` | binary, nullable | the raw bytes, unchanged |
//! | `headers` | map<string, binary> | every header, unchanged |
//! | `topic`, `partition`, `offset` | string, int32, int64 | where it was in Kafka |
//! | `timestamp` | timestamp (ms, UTC), nullable | the Kafka timestamp |

use std::sync::Arc;

use arrow_array::builder::{
    ArrayBuilder, BinaryBuilder, Int32Builder, Int64Builder, MapBuilder, MapFieldNames,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rdkafka::message::{Headers, Message};
use sluice_core::headers;

use super::ArchiveError;

/// Tenant of a record that carries none.
pub const UNKNOWN_TENANT: &str = "_unknown";

/// A raw record as archived: its bytes and headers unchanged, where it was in Kafka, and
/// the identity the Hive partitions and the audit use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedRecord {
    /// Tenant (`sluice.tenant`).
    pub tenant: String,
    /// Event id (`sluice.event_id`).
    pub event_id: String,
    /// When ingest received it, Unix milliseconds (`sluice.received_at_ms`).
    pub received_at: i64,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Option<Vec<u8>>,
    /// Every header, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Kafka timestamp, Unix milliseconds.
    pub timestamp: Option<i64>,
}

impl ArchivedRecord {
    /// The record as archived.
    pub fn of<M: Message>(m: &M) -> Self {
        let id = Identity::of(m);
        let all = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            tenant: id.tenant.to_string(),
            event_id: id
                .event_id
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}/{}/{}", m.topic(), m.partition(), m.offset())),
            received_at: id.received_at,
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: all,
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
        }
    }

    /// Bytes it takes, roughly (what a file's size limit counts).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.tenant.len()
            + self.event_id.len()
            + self.topic.len()
            + 32
    }
}

/// The columns of one file, gathered record by record into Arrow builders (contiguous
/// buffers: no allocation per record), then encoded at once.
pub struct Columns {
    tenant: StringBuilder,
    event_id: StringBuilder,
    received_at: TimestampMillisecondBuilder,
    key: BinaryBuilder,
    value: BinaryBuilder,
    headers: MapBuilder<StringBuilder, BinaryBuilder>,
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: TimestampMillisecondBuilder,
    /// Ingest times of the rows, for the end-to-end latency once written.
    pub received: Vec<i64>,
    /// Bytes appended, roughly.
    pub bytes: usize,
}

impl Default for Columns {
    fn default() -> Self {
        let names = MapFieldNames {
            entry: "key_value".into(),
            key: "key".into(),
            value: "value".into(),
        };
        Self {
            tenant: StringBuilder::new(),
            event_id: StringBuilder::new(),
            received_at: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            key: BinaryBuilder::new(),
            value: BinaryBuilder::new(),
            headers: MapBuilder::new(Some(names), StringBuilder::new(), BinaryBuilder::new()),
            topic: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            received: Vec::new(),
            bytes: 0,
        }
    }
}

/// Who a raw record is for and when it came: what its folder and the audit go by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// Tenant (`sluice.tenant`; [`UNKNOWN_TENANT`] without one).
    pub tenant: &'a str,
    /// Event id (`sluice.event_id`); none: `topic/partition/offset` is used.
    pub event_id: Option<&'a str>,
    /// Ingest time, Unix ms (`sluice.received_at_ms`, else the Kafka timestamp).
    pub received_at: i64,
}

impl<'a> Identity<'a> {
    /// The identity of a record, from its headers.
    pub fn of<M: Message>(m: &'a M) -> Self {
        // One pass over the headers (each is read through librdkafka's FFI), where three
        // lookups cost a measurable share of the sink's time; the first of each key counts,
        // as with `headers::get`.
        let (mut tenant, mut event_id, mut received_at) = (None, None, None);
        if let Some(h) = m.headers() {
            for x in h.iter() {
                let slot = match x.key {
                    headers::TENANT => &mut tenant,
                    headers::EVENT_ID => &mut event_id,
                    headers::RECEIVED_AT_MS => &mut received_at,
                    _ => continue,
                };
                slot.get_or_insert(x.value.and_then(|v| std::str::from_utf8(v).ok()));
            }
        }
        Self {
            tenant: tenant
                .flatten()
                .filter(|t| !t.is_empty())
                .unwrap_or(UNKNOWN_TENANT),
            event_id: event_id.flatten(),
            received_at: received_at
                .flatten()
                .and_then(|v| v.parse().ok())
                .or_else(|| m.timestamp().to_millis())
                .unwrap_or(0),
        }
    }
}

impl Columns {
    /// Rows gathered.
    pub fn rows(&self) -> usize {
        self.offset.len()
    }

    /// Append a Kafka record whose identity is `id`.
    pub fn push<M: Message>(&mut self, m: &M, id: &Identity<'_>) -> Result<(), ArchiveError> {
        self.tenant.append_value(id.tenant);
        match id.event_id {
            Some(e) => self.event_id.append_value(e),
            None => self.event_id.append_value(format!(
                "{}/{}/{}",
                m.topic(),
                m.partition(),
                m.offset()
            )),
        }
        self.received_at.append_value(id.received_at);
        self.key.append_option(m.key());
        self.value.append_option(m.payload());
        let mut bytes = m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len);
        if let Some(h) = m.headers() {
            for x in h.iter() {
                let v = x.value.unwrap_or_default();
                bytes += x.key.len() + v.len();
                self.headers.keys().append_value(x.key);
                self.headers.values().append_value(v);
            }
        }
        self.headers.append(true)?;
        self.topic.append_value(m.topic());
        self.partition.append_value(m.partition());
        self.offset.append_value(m.offset());
        self.timestamp.append_option(m.timestamp().to_millis());
        self.received.push(id.received_at);
        self.bytes += bytes + id.tenant.len() + 64;
        Ok(())
    }

    /// Append an archived record (tests and benchmarks build files from these).
    pub fn push_record(&mut self, r: &ArchivedRecord) -> Result<(), ArchiveError> {
        self.tenant.append_value(&r.tenant);
        self.event_id.append_value(&r.event_id);
        self.received_at.append_value(r.received_at);
        self.key.append_option(r.key.as_deref());
        self.value.append_option(r.value.as_deref());
        for (k, v) in &r.headers {
            self.headers.keys().append_value(k);
            self.headers.values().append_value(v);
        }
        self.headers.append(true)?;
        self.topic.append_value(&r.topic);
        self.partition.append_value(r.partition);
        self.offset.append_value(r.offset);
        self.timestamp.append_option(r.timestamp);
        self.received.push(r.received_at);
        self.bytes += r.size();
        Ok(())
    }

    /// The gathered rows as one Parquet file.
    pub fn encode(mut self) -> Result<Vec<u8>, ArchiveError> {
        let n = self.rows();
        let columns: Vec<(&str, ArrayRef, bool)> = vec![
            ("tenant", Arc::new(self.tenant.finish()), false),
            ("event_id", Arc::new(self.event_id.finish()), false),
            ("received_at", Arc::new(self.received_at.finish()), false),
            ("key", Arc::new(self.key.finish()), true),
            ("value", Arc::new(self.value.finish()), true),
            ("headers", Arc::new(self.headers.finish()), false),
            ("topic", Arc::new(self.topic.finish()), false),
            ("partition", Arc::new(self.partition.finish()), false),
            ("offset", Arc::new(self.offset.finish()), false),
            ("timestamp", Arc::new(self.timestamp.finish()), true),
        ];
        // The schema follows the arrays' own types, so the two cannot disagree.
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, a, nullable)| Field::new(*name, a.data_type().clone(), *nullable))
                .collect::<Vec<_>>(),
        ));
        let batch =
            RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect())?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_created_by("sluice archive".into())
            .build();
        let mut out = Vec::with_capacity(self.bytes / 4 + 1024);
        let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props))?;
        if n > 0 {
            writer.write(&batch)?;
        }
        writer.close()?;
        Ok(out)
    }
}

/// The records as one Parquet file.
pub fn encode(records: &[&ArchivedRecord]) -> Result<Vec<u8>, ArchiveError> {
    let mut columns = Columns::default();
    for r in records {
        columns.push_record(r)?;
    }
    columns.encode()
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, ArchiveError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| ArchiveError::Format(format!("no column `{name}`")))
}

/// The records of one Parquet file written by [`encode`].
pub fn decode(bytes: Bytes) -> Result<Vec<ArchivedRecord>, ArchiveError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let bad = |name: &str| ArchiveError::Format(format!("column `{name}` has the wrong type"));
        let tenant = column(&batch, "tenant")?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("tenant"))?;
        let event_id = column(&batch, "event_id")?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("event_id"))?;
        let received_at = column(&batch, "received_at")?
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| bad("received_at"))?;
        let key = column(&batch, "key")?
            .as_binary_opt::<i32>()
            .ok_or_else(|| bad("key"))?;
        let value = column(&batch, "value")?
            .as_binary_opt::<i32>()
            .ok_or_else(|| bad("value"))?;
        let headers = column(&batch, "headers")?
            .as_map_opt()
            .ok_or_else(|| bad("headers"))?;
        let topic = column(&batch, "topic")?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("topic"))?;
        let partition = column(&batch, "partition")?
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| bad("partition"))?;
        let offset = column(&batch, "offset")?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| bad("offset"))?;
        let timestamp = column(&batch, "timestamp")?
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| bad("timestamp"))?;
        let header_keys = headers
            .keys()
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("headers.key"))?;
        let header_values = headers
            .values()
            .as_binary_opt::<i32>()
            .ok_or_else(|| bad("headers.value"))?;
        let offsets = headers.value_offsets();
        for i in 0..batch.num_rows() {
            let (from, to) = (offsets[i] as usize, offsets[i + 1] as usize);
            out.push(ArchivedRecord {
                tenant: tenant.value(i).to_string(),
                event_id: event_id.value(i).to_string(),
                received_at: received_at.value(i),
                key: key.is_valid(i).then(|| key.value(i).to_vec()),
                value: value.is_valid(i).then(|| value.value(i).to_vec()),
                headers: (from..to)
                    .map(|j| {
                        (
                            header_keys.value(j).to_string(),
                            header_values.value(j).to_vec(),
                        )
                    })
                    .collect(),
                topic: topic.value(i).to_string(),
                partition: partition.value(i),
                offset: offset.value(i),
                timestamp: timestamp.is_valid(i).then(|| timestamp.value(i)),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn record(offset: i64, with_key: bool) -> ArchivedRecord {
        ArchivedRecord {
            tenant: "acme".into(),
            event_id: format!("ev-{offset}"),
            received_at: 1_795_428_000_000 + offset,
            key: with_key.then(|| b"acme:u1".to_vec()),
            value: Some(format!("{{\"n\":{offset}}}").into_bytes()),
            headers: vec![
                ("sluice.tenant".into(), b"acme".to_vec()),
                ("bin".into(), vec![0, 159, 255]),
            ],
            topic: "raw".into(),
            partition: 2,
            offset,
            timestamp: (offset % 2 == 0).then_some(1_795_428_000_000),
        }
    }

    /// A raw record at `offset` with Kafka timestamp `timestamp` and `headers`, in order.
    pub(crate) fn message(
        offset: i64,
        timestamp: i64,
        headers: &[(&str, &[u8])],
    ) -> rdkafka::message::OwnedMessage {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let mut h = OwnedHeaders::new();
        for (key, value) in headers {
            h = h.insert(Header {
                key,
                value: Some(*value),
            });
        }
        OwnedMessage::new(
            None,
            None,
            "raw".into(),
            Timestamp::CreateTime(timestamp),
            0,
            offset,
            Some(h),
        )
    }

    #[test]
    fn identity_takes_the_first_of_each_header_and_falls_back() {
        let msg = |headers: &[(&str, &[u8])]| message(1, 7, headers);
        let full = msg(&[
            ("x", b"y"),
            ("sluice.tenant", b"acme"),
            ("sluice.event_id", b"ev-1"),
            ("sluice.received_at_ms", b"42"),
            ("sluice.tenant", b"globex"),
        ]);
        let id = Identity::of(&full);
        assert_eq!(
            (id.tenant, id.event_id, id.received_at),
            ("acme", Some("ev-1"), 42)
        );
        // An invalid first value is not replaced by a later one (as headers::get reads).
        let odd = msg(&[
            ("sluice.event_id", &[0xff]),
            ("sluice.event_id", b"ev-2"),
            ("sluice.tenant", b""),
            ("sluice.received_at_ms", b"soon"),
        ]);
        let id = Identity::of(&odd);
        assert_eq!(
            (id.tenant, id.event_id, id.received_at),
            (UNKNOWN_TENANT, None, 7)
        );
    }

    #[test]
    fn records_survive_parquet_unchanged() {
        let records: Vec<ArchivedRecord> = (0..50).map(|o| record(o, o % 3 != 0)).collect();
        let refs: Vec<&ArchivedRecord> = records.iter().collect();
        let bytes = encode(&refs).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        assert_eq!(decode(Bytes::from(bytes)).unwrap(), records);
    }

    #[test]
    fn an_empty_header_list_and_a_null_value_are_kept() {
        let mut r = record(7, false);
        r.headers.clear();
        r.value = None;
        let bytes = encode(&[&r]).unwrap();
        assert_eq!(decode(Bytes::from(bytes)).unwrap(), vec![r]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(Bytes::from_static(b"PAR1 not really")).is_err());
    }
}
