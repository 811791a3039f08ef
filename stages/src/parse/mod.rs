//! The parse stage: one raw JSON line → one `ClickEvent` in Avro.
//!
//! Required: `user_id` (string or integer), `type` or `event_type` (string), and a time
//! in `ts`, `timestamp` or `event_time` (RFC 3339, or epoch milliseconds or seconds).
//! Known optional fields: `session_id`, `url`, `referrer`, `user_agent`, `ip`, `event_id`.
//! Every other field is kept, as JSON text, in `extra`. The tenant and the event id
//! come from the headers ingest stamped (a client may send its own `event_id` to make
//! its retries idempotent).
//!
//! Records other producers wrote straight to the raw topic (no `sluice.*` headers) are
//! parsed too: the tenant from `parse.tenant_field` or `parse.default_tenant`, the event
//! id from the record's own `event_id` or else `kafka:<topic>:<partition>:<offset>`
//! (the same on every replay, so the sinks stay idempotent), the receive time from the
//! Kafka timestamp. Logstash's `json` codec output parses as it is (`@timestamp`).

use rdkafka::message::{Header, Message};
use serde_json::Value;
use sluice_core::headers;
use std::sync::Arc;

use sluice_schemas::{ClickEvent, Codec, CLICK_EVENTS};

pub mod config;
mod fields;
pub mod sources;

use fields::{Document, Fields};

use crate::runtime::run_stage;
use crate::transform::{Output, StageError, StageSpec, StageStats, Transform};
use sluice_core::failure::Failure;
use sluice_core::telemetry;
use sluice_core::wiring::{Rewiring, Shared};
use sluice_schemas::setup::writing_codec;
use tokio_util::sync::CancellationToken;

/// Epoch values below this are seconds (in seconds it is year 5138; in ms, 1973).
const SECONDS_BELOW: i64 = 100_000_000_000;

/// How the parse stage reads events.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseRules {
    /// Longer raw events are dead-lettered as `oversized` (`topics.max_event_bytes`).
    pub max_event_bytes: usize,
    /// Fields holding the event time, tried in order.
    pub time_fields: Vec<String>,
    /// Time zone of times written without an offset.
    pub timezone: chrono_tz::Tz,
    /// The JSON field naming the tenant of a record without a tenant header.
    pub tenant_field: Option<String>,
    /// The tenant of a record without a tenant header or tenant field.
    pub default_tenant: Option<String>,
    /// Most milliseconds an event time may lie before its receive time.
    pub max_past_skew_ms: i64,
    /// Most milliseconds an event time may lie after its receive time.
    pub max_future_skew_ms: i64,
    /// Other producers' topics, by name: whose records each carries.
    pub sources: std::collections::BTreeMap<String, sources::Source>,
}

impl Default for ParseRules {
    fn default() -> Self {
        let c = config::ParseConfig::default();
        Self {
            max_event_bytes: sluice_core::config::TopicsConfig::default().max_event_bytes,
            time_fields: c.time_fields,
            timezone: chrono_tz::UTC,
            tenant_field: None,
            default_tenant: None,
            max_past_skew_ms: c.max_past_skew_s as i64 * 1000,
            max_future_skew_ms: c.max_future_skew_s as i64 * 1000,
            sources: Default::default(),
        }
    }
}

/// Why the parse settings are wrong.
#[derive(Debug, thiserror::Error)]
pub enum ParseConfigError {
    /// The time zone is not an IANA name.
    #[error("parse.timezone: {0:?} is not an IANA time zone name such as \"Europe/Berlin\"")]
    Timezone(String),
    /// No time field is given.
    #[error("parse.time_fields: give at least one field name")]
    NoTimeFields,
    /// An empty default tenant or tenant field.
    #[error("parse.{0}: must not be empty")]
    Empty(&'static str),
    /// The default tenant is a name Sluice keeps for itself.
    #[error("parse.default_tenant: {0}")]
    Reserved(String),
    /// An other producer's topic is declared wrongly, or not at all.
    #[error("parse.sources.{topic:?}: {reason}")]
    Source {
        /// The topic.
        topic: String,
        /// What is wrong.
        reason: String,
    },
}

impl ParseRules {
    /// The rules of the `[parse]` settings, with the shared event size limit, for the
    /// other producers' topics `extra`; `directory` names the tenants ingest has keys for.
    pub fn of(
        config: &config::ParseConfig,
        max_event_bytes: usize,
        extra: &[String],
        directory: &[String],
    ) -> Result<Self, ParseConfigError> {
        if config.time_fields.is_empty() {
            return Err(ParseConfigError::NoTimeFields);
        }
        if config.default_tenant.as_deref() == Some("") {
            return Err(ParseConfigError::Empty("default_tenant"));
        }
        if config.tenant_field.as_deref() == Some("") {
            return Err(ParseConfigError::Empty("tenant_field"));
        }
        if let Some(problem) = config
            .default_tenant
            .as_deref()
            .and_then(sluice_core::tenant_name_problem)
        {
            return Err(ParseConfigError::Reserved(problem));
        }
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        Ok(Self {
            max_event_bytes,
            time_fields: config.time_fields.clone(),
            timezone: config
                .timezone
                .parse()
                .map_err(|_| ParseConfigError::Timezone(config.timezone.clone()))?,
            tenant_field: config.tenant_field.clone(),
            default_tenant: config.default_tenant.clone(),
            max_past_skew_ms: ms(config.max_past_skew_s),
            max_future_skew_ms: ms(config.max_future_skew_s),
            sources: sources::declared(config, extra, directory)?,
        })
    }
}

/// The parse stage.
#[derive(Debug)]
pub struct Parser {
    rules: ParseRules,
    codec: Arc<Codec<ClickEvent>>,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new(ParseRules::default())
    }
}

/// What the parser needs of a raw record besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct RawMeta<'a> {
    /// Tenant stamped by ingest; none for a record another producer wrote.
    pub tenant: Option<&'a str>,
    /// Event id stamped by ingest (or derived from the record's position).
    pub event_id: &'a str,
    /// When ingest received it, Unix milliseconds.
    pub received_at: i64,
    /// The other producer's topic it came from (`None`: the raw topic).
    pub source: Option<&'a sources::Source>,
}

impl Parser {
    /// A parser following `rules`.
    pub fn new(rules: ParseRules) -> Self {
        Self {
            rules,
            codec: CLICK_EVENTS.clone(),
        }
    }

    /// Write events with `codec` (e.g. in registry mode) instead of the embedded one.
    pub fn with_codec(mut self, codec: Arc<Codec<ClickEvent>>) -> Self {
        self.codec = codec;
        self
    }

    /// Parse one raw line.
    pub fn parse(&self, line: &[u8], meta: RawMeta<'_>) -> Result<ClickEvent, Failure> {
        if line.len() > self.rules.max_event_bytes {
            return Err(Failure::new(
                "oversized",
                format!(
                    "event: at most {} bytes (topics.max_event_bytes), got {}",
                    self.rules.max_event_bytes,
                    line.len()
                ),
            ));
        }
        let obj = match Document::read(line) {
            Ok(Document::Object(fields)) => fields,
            Ok(Document::Other(other)) => {
                return Err(Failure::new(
                    "validation",
                    format!("event: expected a JSON object, got {}", kind(&other)),
                ))
            }
            Err(e) => return Err(Failure::new("decode", format!("malformed JSON: {e}"))),
        };
        self.parse_fields(obj, meta)
    }

    /// Parse the fields of one raw event.
    fn parse_fields(&self, mut obj: Fields<'_>, meta: RawMeta<'_>) -> Result<ClickEvent, Failure> {
        let user_id = take_id(&mut obj, "user_id")?
            .ok_or_else(|| Failure::new("validation", "field `user_id`: required, missing"))?;
        let event_type = match take_str(&mut obj, "type")? {
            Some(t) => t,
            None => take_str(&mut obj, "event_type")?
                .ok_or_else(|| Failure::new("validation", "field `type`: required, missing"))?,
        };
        let mut event_time = None;
        for field in &self.rules.time_fields {
            if let Some(v) = obj.take(field) {
                event_time = Some(parse_time(field, &v, self.rules.timezone)?);
                break;
            }
        }
        let event_time = event_time.ok_or_else(|| {
            Failure::new(
                "validation",
                format!(
                    "field `{}`: required (RFC 3339 or epoch ms/s), missing",
                    self.rules.time_fields.join("` or `")
                ),
            )
        })?;
        let event_id = take_str(&mut obj, "event_id")?.unwrap_or_else(|| meta.event_id.to_string());
        if event_id.is_empty() {
            return Err(Failure::new(
                "validation",
                "field `event_id`: expected a non-empty string, got \"\"",
            ));
        }
        if meta.received_at > 0 {
            let skew = event_time - meta.received_at;
            if skew > self.rules.max_future_skew_ms || -skew > self.rules.max_past_skew_ms {
                return Err(Failure::new(
                    "out_of_range",
                    format!(
                        "event time {} is {} the receive time {}; allowed: {} s before, {} s after (parse.max_past_skew_s, parse.max_future_skew_s)",
                        show_ms(event_time),
                        if skew > 0 { "after" } else { "before" },
                        show_ms(meta.received_at),
                        self.rules.max_past_skew_ms / 1000,
                        self.rules.max_future_skew_ms / 1000
                    ),
                ));
            }
        }
        let tenant = match (meta.tenant, meta.source) {
            (None, Some(source)) => source.tenant(|field| tenant_field(&obj, field))?,
            (header, _) => self.tenant(header, &obj)?,
        };
        // A field-named tenant (a header's is ingest's, checked at its start).
        if meta.tenant.is_none() {
            if let Some(problem) = sluice_core::tenant_name_problem(&tenant) {
                return Err(Failure::new("validation", problem));
            }
        }
        Ok(ClickEvent {
            event_id,
            tenant,
            user_id,
            session_id: take_id(&mut obj, "session_id")?,
            event_type,
            url: take_str(&mut obj, "url")?,
            referrer: take_str(&mut obj, "referrer")?,
            event_time,
            received_at: meta.received_at,
            user_agent: take_str(&mut obj, "user_agent")?,
            ip: take_str(&mut obj, "ip")?,
            extra: obj.into_extra(),
        })
    }
}

impl Parser {
    /// The tenant: the header, else the configured field, else the default.
    fn tenant(&self, header: Option<&str>, obj: &Fields<'_>) -> Result<String, Failure> {
        if let Some(t) = header {
            return Ok(t.to_string());
        }
        if let Some(field) = &self.rules.tenant_field {
            match tenant_field(obj, field) {
                sources::FieldValue::Text(t) => return Ok(t),
                sources::FieldValue::Absent => {}
                sources::FieldValue::Other(kind) => {
                    return Err(Failure::new(
                        "validation",
                        format!(
                            "field `{field}` (parse.tenant_field): expected a non-empty string, got {kind}"
                        ),
                    ))
                }
            }
        }
        self.rules.default_tenant.clone().ok_or_else(|| {
            Failure::new(
                "validation",
                format!(
                    "no tenant: header `{}` missing (not written by ingest), and neither parse.tenant_field{} nor parse.default_tenant gives one",
                    headers::TENANT,
                    self.rules
                        .tenant_field
                        .as_deref()
                        .map(|f| format!(" (`{f}`)"))
                        .unwrap_or_default()
                ),
            )
        })
    }
}

/// The id of a record another producer wrote: `kafka:<topic>:<partition>:<offset>` of
/// its first place in the log (a copy or a restore names it in `sluice.replayed_from`).
/// `believe_origin`: that header was written by a replay, not by an untrusted producer.
fn place_id<M: Message>(msg: &M, believe_origin: bool) -> String {
    let origin = headers::get(msg.headers(), headers::REPLAYED_FROM).filter(|_| believe_origin);
    match origin.and_then(headers::parse_origin) {
        Some((topic, partition, offset)) => format!("kafka:{topic}:{partition}:{offset}"),
        None => format!("kafka:{}:{}:{}", msg.topic(), msg.partition(), msg.offset()),
    }
}

fn show_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Run the parse stage (raw → parsed) with `settings` until `shutdown`; `directory`
/// names the tenants ingest has keys for.
pub async fn run(
    shared: &Shared,
    settings: &config::ParseConfig,
    directory: &[String],
    rewiring: &Rewiring,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let t = &shared.topics;
    let mut spec = StageSpec::new(t, &settings.group, &t.raw, &t.parsed, rewiring);
    spec.max_in_flight = settings.max_in_flight;
    spec.max_in_flight_bytes = settings.max_in_flight_bytes;
    spec.exactly_once = settings.exactly_once;
    spec.transaction_max_records = settings.transaction_max_records;
    spec.transaction_linger = std::time::Duration::from_millis(settings.transaction_ms);
    shared
        .kafka
        .check_event_size(t.max_event_bytes)
        .map_err(|e| StageError::Settings(e.to_string()))?;
    let rules = ParseRules::of(settings, t.max_event_bytes, &t.raw_extra, directory)
        .map_err(|e| StageError::Settings(e.to_string()))?;
    // The registry subject is the usual output's, also when a --diff writes elsewhere.
    let parser = Parser::new(rules).with_codec(writing_codec(&shared.schemas, &t.parsed).await?);
    let parser = Arc::new(parser);
    // Other producers' topics feed parse too: a runtime each, in the same group, with
    // dead letters to `<topic>.dlq`. A replay reads only the topic it names (or the
    // records it feeds).
    let mut specs = vec![spec];
    if rewiring.input.is_none() && rewiring.feed.is_none() {
        for extra in &t.raw_extra {
            let mut s = specs[0].clone();
            s.input = extra.clone();
            s.dlq = t.dlq(extra);
            specs.push(s);
        }
    }
    telemetry::process_readiness().set(true);
    let runs = specs
        .iter()
        .map(|s| run_stage(&shared.kafka, s, parser.clone(), shutdown.clone()));
    let all = futures::future::try_join_all(runs).await?;
    Ok(all
        .into_iter()
        .fold(StageStats::default(), |a, b| StageStats {
            consumed: a.consumed + b.consumed,
            published: a.published + b.published,
            dead_lettered: a.dead_lettered + b.dead_lettered,
        }))
}

impl Transform for Parser {
    fn name(&self) -> &'static str {
        "parse"
    }

    fn process<M: Message>(&self, msg: &M) -> Result<Vec<Output>, Failure> {
        let source = sources::source_of(&self.rules.sources, msg);
        // An untrusted producer's `sluice.*` headers are not read; `replayed_from` only
        // when a replay wrote it (the record is not on the producer's own topic).
        let trusted = source.is_none_or(|s| s.trust_headers);
        let copied = source.is_some_and(|s| s.topic != msg.topic());
        let h = if trusted { msg.headers() } else { None };
        let tenant = headers::get(h, headers::TENANT);
        // A record another producer wrote: an id from its place in the log, the same on
        // every replay of it (also of a copy or a restore: their first place).
        let position;
        let event_id = match headers::get(h, headers::EVENT_ID) {
            Some(id) => id,
            None => {
                position = place_id(msg, trusted || copied);
                position.as_str()
            }
        };
        let received_at = headers::get(h, headers::RECEIVED_AT_MS)
            .and_then(|v| v.parse().ok())
            .or_else(|| msg.timestamp().to_millis())
            .unwrap_or(0);
        let line = msg.payload().unwrap_or_default();
        let event = self.parse(
            line,
            RawMeta {
                tenant,
                event_id,
                received_at,
                source,
            },
        )?;
        let payload = self
            .codec
            .encode(&event)
            .map_err(|e| Failure::new("encode", e.to_string()))?;
        // The tenant header is stamped whatever the tenant came from (header, field or
        // default): replays by tenant, the audit and every later layer read it there.
        let replaced = [
            headers::EVENT_ID,
            headers::RAW_EVENT_ID,
            headers::ENCODING,
            headers::TENANT,
        ];
        let forwarded = if trusted {
            headers::forward(h, &replaced)
        } else {
            sources::foreign_headers(msg.headers(), copied)
        };
        let out_headers = forwarded
            .insert(Header {
                key: headers::TENANT,
                value: Some(event.tenant.as_str()),
            })
            .insert(Header {
                key: headers::EVENT_ID,
                value: Some(event.event_id.as_str()),
            })
            .insert(Header {
                key: headers::RAW_EVENT_ID,
                value: Some(event_id),
            })
            .insert(Header {
                key: headers::ENCODING,
                value: Some(self.codec.encoding().as_str()),
            });
        Ok(vec![Output {
            key: Some(format!("{}:{}", event.tenant, event.user_id).into_bytes()),
            payload,
            headers: out_headers,
        }])
    }
}

/// A record's tenant field as a tenant: text, absent (or null), or something else.
fn tenant_field(obj: &Fields<'_>, field: &str) -> sources::FieldValue {
    match obj.get(field) {
        None | Some(Value::Null) => sources::FieldValue::Absent,
        Some(Value::String(t)) if !t.is_empty() => sources::FieldValue::Text(t.clone()),
        Some(other) => sources::FieldValue::Other(kind(other)),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An optional string field; null counts as absent.
fn take_str(obj: &mut Fields<'_>, field: &str) -> Result<Option<String>, Failure> {
    match obj.take(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Failure::new(
            "validation",
            format!("field `{field}`: expected a string, got {}", kind(&other)),
        )),
    }
}

/// An optional id field: a string, or an integer taken as its decimal text.
fn take_id(obj: &mut Fields<'_>, field: &str) -> Result<Option<String>, Failure> {
    match obj.take(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(other) => Err(Failure::new(
            "validation",
            format!(
                "field `{field}`: expected a non-empty string or an integer, got {}",
                describe(&other)
            ),
        )),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "an empty string".into(),
        Value::Number(n) => format!("the number {n}"),
        other => kind(other).into(),
    }
}

/// A time written without an offset (`2026-11-23T10:00:00`, `2026-11-23 10:00:00.250`),
/// read in `tz`. `None` when the text is not such a time; an error when the local time
/// does not exist there (skipped by a daylight-saving change).
fn naive_time(s: &str, tz: chrono_tz::Tz) -> Option<Result<i64, String>> {
    use chrono::TimeZone;
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())?;
    Some(
        tz.from_local_datetime(&naive)
            .earliest()
            .map(|t| t.timestamp_millis())
            .ok_or_else(|| format!("{s:?} does not exist in time zone {tz} (parse.timezone)")),
    )
}

/// A time as Unix milliseconds: RFC 3339 text, a time without offset (read in `tz`), or
/// epoch milliseconds or seconds.
fn parse_time(field: &str, v: &Value, tz: chrono_tz::Tz) -> Result<i64, Failure> {
    let bad = |got: String| {
        Failure::new(
            "validation",
            format!("field `{field}`: expected RFC 3339 or epoch ms/s, got {got}"),
        )
    };
    match v {
        Value::String(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => Ok(t.timestamp_millis()),
            Err(_) => match naive_time(s, tz) {
                Some(Ok(ms)) => Ok(ms),
                Some(Err(why)) => Err(Failure::new(
                    "validation",
                    format!("field `{field}`: {why}"),
                )),
                None => s
                    .parse::<i64>()
                    .map(epoch_to_ms)
                    .map_err(|_| bad(format!("{s:?}"))),
            },
        },
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(epoch_to_ms(i)),
            (None, Some(f)) if f.is_finite() && f.abs() < 1e16 => Ok(epoch_to_ms_f(f)),
            _ => Err(bad(format!("the number {n}"))),
        },
        other => Err(bad(kind(other).into())),
    }
    .and_then(|ms| {
        // Avro timestamp-millis and the sinks' timestamptz both hold this range easily.
        if (0..=253_402_300_799_999).contains(&ms) {
            Ok(ms)
        } else {
            Err(bad(format!("{ms} ms, outside years 1970..9999")))
        }
    })
}

fn epoch_to_ms(i: i64) -> i64 {
    // unsigned_abs: `abs` of i64::MIN overflows (a panic in a debug build).
    if i.unsigned_abs() < SECONDS_BELOW.unsigned_abs() {
        i.saturating_mul(1000)
    } else {
        i
    }
}

fn epoch_to_ms_f(f: f64) -> i64 {
    if f.abs() < SECONDS_BELOW as f64 {
        (f * 1000.0).round() as i64
    } else {
        f.round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receive time of 0 is unknown, which skips the skew check (tested on its own).
    const META: RawMeta<'static> = RawMeta {
        tenant: Some("acme"),
        event_id: "ev-1",
        received_at: 0,
        source: None,
    };

    fn parse(s: &str) -> Result<ClickEvent, Failure> {
        Parser::default().parse(s.as_bytes(), META)
    }

    #[test]
    fn event_times_far_from_the_receive_time_are_out_of_range() {
        let received = 1_795_428_000_000; // 2026-11-22T…
        let at = |ts: &str| {
            RawMeta {
                received_at: received,
                source: None,
                ..META
            }
            .then_parse(&format!(r#"{{"user_id":"u","type":"t","ts":{ts}}}"#))
        };
        assert!(
            at(&(received - 3_600_000).to_string()).is_ok(),
            "an hour old is fine"
        );
        assert!(
            at(&(received + 60_000).to_string()).is_ok(),
            "a minute ahead is fine"
        );
        let f = at("\"9999-01-01T00:00:00Z\"").unwrap_err();
        assert_eq!(f.class, "out_of_range");
        assert!(
            f.to_string().contains("9999-01-01") && f.to_string().contains("max_future_skew_s"),
            "{f}"
        );
        let f = at(&(received - 8 * 86_400_000).to_string()).unwrap_err();
        assert_eq!(f.class, "out_of_range", "eight days old");
    }

    impl RawMeta<'static> {
        fn then_parse(self, line: &str) -> Result<ClickEvent, Failure> {
            Parser::default().parse(line.as_bytes(), self)
        }
    }

    fn place_id_of<M: Message>(msg: &M) -> String {
        place_id(msg, true)
    }

    #[test]
    fn a_foreign_record_keeps_the_id_of_its_first_place_when_copied_or_restored() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let at = |topic: &str, headers: Option<OwnedHeaders>| {
            OwnedMessage::new(
                None,
                None,
                topic.into(),
                Timestamp::NotAvailable,
                2,
                9,
                headers,
            )
        };
        assert_eq!(place_id_of(&at("raw", None)), "kafka:raw:2:9");
        let from = |v: &str| {
            Some(OwnedHeaders::new().insert(Header {
                key: headers::REPLAYED_FROM,
                value: Some(v),
            }))
        };
        assert_eq!(
            place_id_of(&at("raw.restore-20261201", from("raw/3/42"))),
            "kafka:raw:3:42"
        );
        // An unreadable origin: its own place.
        assert_eq!(place_id_of(&at("copy", from("raw/x/42"))), "kafka:copy:2:9");
        assert_eq!(place_id_of(&at("copy", from("3/42"))), "kafka:copy:2:9");
    }

    #[test]
    fn a_record_without_headers_gets_its_tenant_from_a_field_or_the_default() {
        let foreign = RawMeta {
            tenant: None,
            event_id: "kafka:raw:0:7",
            received_at: 0,
            source: None,
        };
        let line = r#"{"user_id":"u","type":"t","ts":1,"org":"globex"}"#;
        let f = Parser::default()
            .parse(line.as_bytes(), foreign)
            .unwrap_err();
        assert!(
            f.to_string().contains("no tenant") && f.to_string().contains("parse.default_tenant"),
            "{f}"
        );
        let rules = |field: Option<&str>, default: Option<&str>| ParseRules {
            tenant_field: field.map(String::from),
            default_tenant: default.map(String::from),
            ..ParseRules::default()
        };
        let e = Parser::new(rules(Some("org"), Some("fallback")))
            .parse(line.as_bytes(), foreign)
            .unwrap();
        assert_eq!(
            (e.tenant.as_str(), e.event_id.as_str()),
            ("globex", "kafka:raw:0:7")
        );
        let e = Parser::new(rules(Some("tenant"), Some("fallback")))
            .parse(line.as_bytes(), foreign)
            .unwrap();
        assert_eq!(e.tenant, "fallback");
        // `_unknown` is where the archive files records without a tenant: no tenant's.
        let reserved = r#"{"user_id":"u","type":"t","ts":1,"org":"_unknown"}"#;
        let f = Parser::new(rules(Some("org"), None))
            .parse(reserved.as_bytes(), foreign)
            .unwrap_err();
        assert!(
            f.class == "validation" && f.reason.contains("reserved"),
            "{f}"
        );
        let c = config::ParseConfig {
            default_tenant: Some("_unknown".into()),
            ..Default::default()
        };
        assert!(ParseRules::of(&c, 1024, &[], &[])
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        // A header (written by ingest, authenticated) is never overridden by the body.
        let e = Parser::new(rules(Some("org"), None))
            .parse(line.as_bytes(), META)
            .unwrap();
        assert_eq!(e.tenant, "acme");
        // Logstash's json codec: @timestamp, @version, host as an object.
        let logstash = r#"{"@timestamp":"2026-11-30T10:00:00.000Z","@version":"1","host":{"name":"web-1"},"user_id":"u9","type":"click","event_id":"ls-1","org":"globex"}"#;
        let e = Parser::new(rules(Some("org"), None))
            .parse(logstash.as_bytes(), foreign)
            .unwrap();
        assert_eq!(e.event_id, "ls-1");
        assert_eq!(e.event_time, 1_796_032_800_000);
        assert!(e.extra.contains_key("host"));
    }

    #[test]
    fn a_tenant_from_a_field_is_stamped_as_the_output_header() {
        use rdkafka::message::{OwnedMessage, Timestamp};
        let parser = Parser::new(ParseRules {
            tenant_field: Some("org".into()),
            ..ParseRules::default()
        });
        let line = br#"{"user_id":"u","type":"t","ts":1795428000000,"org":"globex"}"#;
        let foreign = OwnedMessage::new(
            Some(line.to_vec()),
            None,
            "raw".into(),
            Timestamp::CreateTime(1_795_428_000_000),
            0,
            7,
            None,
        );
        let out = parser.process(&foreign).unwrap();
        assert_eq!(
            headers::get(Some(&out[0].headers), headers::TENANT),
            Some("globex")
        );
        assert_eq!(out[0].key.as_deref(), Some(&b"globex:u"[..]));
    }

    #[test]
    fn full_event() {
        let e = parse(
            r#"{"user_id":"u1","type":"page_view","ts":"2026-11-23T10:00:00.250Z","url":"/a","session_id":7,"color":"red","n":[1]}"#,
        )
        .unwrap();
        assert_eq!(e.user_id, "u1");
        assert_eq!(e.event_type, "page_view");
        assert_eq!(e.event_time, 1_795_428_000_250);
        assert_eq!(e.session_id.as_deref(), Some("7"));
        assert_eq!(e.event_id, "ev-1");
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.received_at, 0);
        assert_eq!(e.extra["color"], "\"red\"");
        assert_eq!(e.extra["n"], "[1]");
    }

    #[test]
    fn epoch_seconds_and_millis() {
        let s = parse(r#"{"user_id":1,"type":"click","ts":1795428000}"#).unwrap();
        let ms = parse(r#"{"user_id":1,"type":"click","timestamp":1795428000000}"#).unwrap();
        let f = parse(r#"{"user_id":1,"type":"click","event_time":1795428000.5}"#).unwrap();
        assert_eq!(s.event_time, 1_795_428_000_000);
        assert_eq!(ms.event_time, 1_795_428_000_000);
        assert_eq!(f.event_time, 1_795_428_000_500);
        // The extremes are refused with a reason, not a panic (i64::MIN has no abs).
        for extreme in [i64::MIN, i64::MAX] {
            let line = format!(r#"{{"user_id":1,"type":"click","ts":{extreme}}}"#);
            let f = parse(&line).unwrap_err();
            assert!(f.reason.contains("outside years 1970..9999"), "{f}");
        }
    }

    #[test]
    fn times_without_offset_are_read_in_the_configured_zone() {
        let line = r#"{"user_id":"u","type":"click","ts":"2026-11-20T22:30:00"}"#;
        let utc = parse(line).unwrap().event_time;
        assert_eq!(utc, 1_795_213_800_000); // 2026-11-20T22:30:00Z
        let ny = ParseRules {
            timezone: chrono_tz::America::New_York,
            ..ParseRules::default()
        };
        let moved = Parser::new(ny.clone())
            .parse(line.as_bytes(), META)
            .unwrap();
        // 22:30 in New York (UTC-5 in November) is 03:30 UTC the next day.
        assert_eq!(moved.event_time - utc, 5 * 3_600_000);
        let spaced = r#"{"user_id":"u","type":"click","ts":"2026-11-20 22:30:00.5"}"#;
        assert_eq!(parse(spaced).unwrap().event_time, utc + 500);
        // 02:30 on 2026-03-08 does not exist in New York (clocks jump 02:00 → 03:00).
        let gap = r#"{"user_id":"u","type":"click","ts":"2026-03-08T02:30:00"}"#;
        let f = Parser::new(ny).parse(gap.as_bytes(), META).unwrap_err();
        assert!(f.reason.contains("does not exist"), "{f}");
    }

    #[test]
    fn time_fields_and_zone_come_from_the_settings() {
        let mut c = config::ParseConfig {
            time_fields: vec!["when".into()],
            timezone: "Europe/Berlin".into(),
            ..Default::default()
        };
        let p = Parser::new(ParseRules::of(&c, 1024, &[], &[]).unwrap());
        let e = p
            .parse(
                br#"{"user_id":"u","type":"t","when":1795428000,"ts":"x"}"#,
                META,
            )
            .unwrap();
        assert_eq!(e.event_time, 1_795_428_000_000);
        assert_eq!(
            e.extra["ts"], "\"x\"",
            "a field no longer read as the time is kept"
        );
        let f = p.parse(br#"{"user_id":"u","type":"t"}"#, META).unwrap_err();
        assert!(f.reason.starts_with("field `when`: required"), "{f}");
        c.timezone = "Mars/Olympus".into();
        let err = ParseRules::of(&c, 1024, &[], &[]).unwrap_err().to_string();
        assert!(
            err.contains("parse.timezone") && err.contains("Mars/Olympus"),
            "{err}"
        );
    }

    #[test]
    fn client_event_id_wins() {
        let e = parse(r#"{"user_id":"u","type":"click","ts":1,"event_id":"mine"}"#).unwrap();
        assert_eq!(e.event_id, "mine");
    }

    #[test]
    fn precise_reasons() {
        let reason = |s: &str| parse(s).unwrap_err().to_string();
        assert!(reason("{not json").starts_with("decode: malformed JSON"));
        assert_eq!(
            reason("[1]"),
            "validation: event: expected a JSON object, got an array"
        );
        assert_eq!(
            reason(r#"{"type":"x","ts":1}"#),
            "validation: field `user_id`: required, missing"
        );
        assert_eq!(
            reason(r#"{"user_id":true,"type":"x","ts":1}"#),
            "validation: field `user_id`: expected a non-empty string or an integer, got a boolean"
        );
        assert_eq!(
            reason(r#"{"user_id":"u","ts":1}"#),
            "validation: field `type`: required, missing"
        );
        assert_eq!(
            reason(r#"{"user_id":"u","type":"x","ts":"yesterday"}"#),
            "validation: field `ts`: expected RFC 3339 or epoch ms/s, got \"yesterday\""
        );
        assert_eq!(
            reason(r#"{"user_id":"u","type":"x"}"#),
            "validation: field `ts` or `timestamp` or `event_time` or `@timestamp`: required (RFC 3339 or epoch ms/s), missing"
        );
        assert_eq!(
            reason(r#"{"user_id":"u","type":"x","ts":1,"url":5}"#),
            "validation: field `url`: expected a string, got a number"
        );
        assert!(reason(r#"{"user_id":"u","type":"x","ts":-5}"#).contains("outside years"));
    }
}

/// Property tests of the decoder: no input makes it panic, every failure has a class and a
/// reason, and every well-formed event round-trips through the Avro encoding.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A receive time of 0 is unknown, which skips the skew check (tested on its own).
    const META: RawMeta<'static> = RawMeta {
        tenant: Some("acme"),
        event_id: "ev-1",
        received_at: 0,
        source: None,
    };

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
            "20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-][01][0-9]:[0-5][0-9])"
                .prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Objects using the known field names with values of any type.
    fn event_like() -> impl Strategy<Value = Vec<u8>> {
        let field = prop_oneof![
            Just("user_id"),
            Just("type"),
            Just("event_type"),
            Just("ts"),
            Just("timestamp"),
            Just("event_time"),
            Just("event_id"),
            Just("session_id"),
            Just("url"),
            Just("ip"),
            Just("user_agent"),
            Just("referrer"),
            Just("other"),
        ];
        prop::collection::vec((field, json_value()), 0..10).prop_map(|fields| {
            let obj: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
        })
    }

    fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
        match Parser::default().parse(bytes, META) {
            Ok(event) => {
                let encoded = CLICK_EVENTS
                    .encode(&event)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let decoded: ClickEvent = CLICK_EVENTS
                    .decode(&encoded)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(decoded, event);
            }
            Err(f) => {
                prop_assert!(
                    ["decode", "validation", "oversized"].contains(&f.class),
                    "{}",
                    f.class
                );
                prop_assert!(!f.reason.is_empty());
            }
        }
        Ok(())
    }

    /// What parse made of `bytes` before it read fields on its own: a `serde_json::Map`.
    fn parse_through_a_map(bytes: &[u8]) -> Result<ClickEvent, Failure> {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(map)) => Parser::default().parse_fields(Fields::from(map), META),
            Ok(other) => Err(Failure::new(
                "validation",
                format!("event: expected a JSON object, got {}", kind(&other)),
            )),
            Err(e) => Err(Failure::new("decode", format!("malformed JSON: {e}"))),
        }
    }

    /// Object text whose keys may repeat, from the known field names.
    fn event_like_with_repeats() -> impl Strategy<Value = Vec<u8>> {
        let key = prop_oneof![
            Just("user_id"),
            Just("type"),
            Just("event_type"),
            Just("ts"),
            Just("event_id"),
            Just("url"),
            Just("other"),
            Just("ot\\u0068er"),
        ];
        prop::collection::vec((key, json_value()), 0..10).prop_map(|fields| {
            let body: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
            format!("{{{}}}", body.join(",")).into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn fields_read_as_a_map_reads_them(bytes in prop_oneof![
            event_like(),
            event_like_with_repeats(),
            prop::collection::vec(any::<u8>(), 0..64),
            json_value().prop_map(|v| v.to_string().into_bytes()),
        ]) {
            let (now, before) = (Parser::default().parse(&bytes, META), parse_through_a_map(&bytes));
            match (now, before) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => prop_assert_eq!((a.class, a.reason), (b.class, b.reason)),
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
            }
        }

        #[test]
        fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&bytes)?;
        }

        #[test]
        fn event_shaped_json(bytes in event_like()) {
            check(&bytes)?;
        }
    }

    #[test]
    fn oversized_events_are_refused_with_their_size() {
        let line = format!(
            r#"{{"user_id":"u","type":"t","ts":1,"pad":"{}"}}"#,
            "x".repeat(100)
        );
        let rules = ParseRules {
            max_event_bytes: 64,
            ..ParseRules::default()
        };
        let f = Parser::new(rules).parse(line.as_bytes(), META).unwrap_err();
        assert_eq!(f.class, "oversized");
        assert!(
            f.reason.contains("at most 64 bytes") && f.reason.contains(&line.len().to_string()),
            "{}",
            f.reason
        );
    }
}
