//! The Avro schemas of the pipeline's records (`schemas/avro/*.avsc`, compiled in) and
//! their two encodings:
//!
//! - embedded (the default): Avro single-object encoding (a two-byte marker, the schema's
//!   64-bit Rabin fingerprint, then the datum), which needs no schema registry;
//! - registry: the Confluent wire format (a zero byte, the 4-byte schema id, then the
//!   datum), with the schemas registered in a Confluent-compatible schema registry.
//!
//! A [`Codec`] writes one of them and reads both, so a pipeline can switch modes while
//! records of the other are still in its topics.

pub mod codec;
pub mod compat;
pub mod fields;
pub mod registry;
pub mod setup;

pub use codec::{Codec, Encoding};
pub use registry::{RegistryAuth, RegistryError, SchemaRegistry};

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{GenericSingleObjectReader, Schema};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Text of the ClickEvent schema.
pub const CLICK_EVENT_AVSC: &str = include_str!("../avro/click_event.avsc");
/// Text of the EnrichedEvent schema.
pub const ENRICHED_EVENT_AVSC: &str = include_str!("../avro/enriched_event.avsc");

/// Text of the SessionSummary schema.
pub const SESSION_SUMMARY_AVSC: &str = include_str!("../avro/session_summary.avsc");

/// One user's session, emitted by the sessionize stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// `<user_id>-<started_at ms>`: the same events always give the same id.
    pub session_id: String,
    /// Tenant.
    pub tenant: String,
    /// User.
    pub user_id: String,
    /// Event time of the first event, Unix milliseconds.
    pub started_at: i64,
    /// Event time of the last event, Unix milliseconds.
    pub ended_at: i64,
    /// Page views in the session.
    pub page_views: i32,
    /// Events in the session.
    pub events: i32,
    /// `ended_at - started_at`.
    pub duration_ms: i64,
}

impl AvroRecord for SessionSummary {
    const NAME: &'static str = "SessionSummary";
    const AVSC: &'static str = SESSION_SUMMARY_AVSC;
}

/// The embedded-mode SessionSummary codec.
pub static SESSION_SUMMARIES: LazyLock<Arc<Codec<SessionSummary>>> = LazyLock::new(|| {
    Arc::new(Codec::embedded().expect("compiled-in SessionSummary schema parses"))
});

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A compiled-in schema does not parse (a build defect).
    #[error("schema {name} is invalid: {source}")]
    Schema {
        /// The schema's name.
        name: &'static str,
        /// The parse error.
        source: Box<apache_avro::Error>,
    },
    /// The bytes are not a record of this schema (wrong fingerprint or bad datum).
    #[error("cannot decode {name}: {source}")]
    Decode {
        /// The schema's name.
        name: &'static str,
        /// The Avro error.
        source: Box<apache_avro::Error>,
    },
    /// The record was written with a schema this codec does not know.
    #[error("cannot decode {name}: unknown schema fingerprint {found} (expected {expected})")]
    UnknownSchema {
        /// The schema's name.
        name: &'static str,
        /// The record's fingerprint, hex.
        found: String,
        /// This schema's fingerprint, hex.
        expected: String,
    },
    /// The record's schema id could not be resolved through the registry.
    #[error("cannot decode {name}: {source}")]
    Registry {
        /// The schema's name.
        name: &'static str,
        /// The registry's answer.
        source: RegistryError,
    },
    /// The bytes are in neither encoding.
    #[error("cannot decode {name}: {reason}")]
    Framing {
        /// The schema's name.
        name: &'static str,
        /// What the bytes look like.
        reason: String,
    },
    /// The value does not fit the schema.
    #[error("cannot encode {name}: {source}")]
    Encode {
        /// The schema's name.
        name: &'static str,
        /// The Avro error.
        source: Box<apache_avro::Error>,
    },
}

impl CodecError {
    /// Worth retrying later: the schema registry was unreachable.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry { source, .. } if source.is_transient())
    }
}

/// A record that does not decode: class `decode`, or a transient `registry` failure when
/// its schema could not be fetched because the registry was unreachable.
impl From<CodecError> for sluice_core::failure::Failure {
    fn from(e: CodecError) -> Self {
        if e.is_transient() {
            Self::transient("registry", e.to_string())
        } else {
            Self::new("decode", e.to_string())
        }
    }
}

/// A record type with a compiled-in Avro schema.
pub trait AvroRecord: Serialize + DeserializeOwned {
    /// The schema's name, for messages.
    const NAME: &'static str;
    /// The schema's text.
    const AVSC: &'static str;
    /// Texts of the released versions (`avro/released/<name>/`) whose records it still reads.
    const RELEASED: &'static [&'static str] = &[];
}

/// Whether a field's value holds a NUL character, raw or as JSON's `\u0000` escape (the
/// extra fields are JSON text).
trait HasNul {
    fn has_nul(&self) -> bool;
}

impl HasNul for String {
    fn has_nul(&self) -> bool {
        self.contains('\0')
    }
}

impl HasNul for Option<String> {
    fn has_nul(&self) -> bool {
        self.as_ref().is_some_and(HasNul::has_nul)
    }
}

impl HasNul for i64 {
    fn has_nul(&self) -> bool {
        false
    }
}

impl HasNul for HashMap<String, String> {
    fn has_nul(&self) -> bool {
        self.iter().any(|(k, v)| {
            k.contains('\0') || v.contains('\0') || v.contains("\\u0000") || k.contains("\\u0000")
        })
    }
}

/// Defines [`ClickEvent`] and [`EnrichedEvent`] from one list of their common fields
/// (and the enriched one's own), so the shared part is written once.
macro_rules! event_records {
    (
        common { $( $(#[$cm:meta])* $cf:ident : $ct:ty, )* }
        enriched { $( $(#[$em:meta])* $ef:ident : $et:ty, )* }
    ) => {
        /// A parsed clickstream/log event.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct ClickEvent {
            $( $(#[$cm])* pub $cf: $ct, )*
        }

        /// A ClickEvent with user-agent, network/geo and tenant details added.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct EnrichedEvent {
            $( $(#[$cm])* pub $cf: $ct, )*
            $( $(#[$em])* pub $ef: $et, )*
        }

        impl ClickEvent {
            /// The first field holding a NUL character (PostgreSQL text and jsonb cannot).
            pub fn field_with_nul(&self) -> Option<&'static str> {
                $( if HasNul::has_nul(&self.$cf) { return Some(stringify!($cf)); } )*
                None
            }
        }

        impl EnrichedEvent {
            /// The first field holding a NUL character (PostgreSQL text and jsonb cannot).
            pub fn field_with_nul(&self) -> Option<&'static str> {
                $( if HasNul::has_nul(&self.$cf) { return Some(stringify!($cf)); } )*
                $( if HasNul::has_nul(&self.$ef) { return Some(stringify!($ef)); } )*
                None
            }

            /// An enriched event with every enrichment empty.
            pub fn from_click(e: ClickEvent) -> Self {
                Self {
                    $( $cf: e.$cf, )*
                    ..Self::default()
                }
            }
        }
    };
}

event_records! {
    common {
        /// Unique id within its tenant; sinks use `(tenant, event_id)` as its identity.
        event_id: String,
        /// Tenant that sent it.
        tenant: String,
        /// User that did it.
        user_id: String,
        /// Client-side session id, if sent.
        session_id: Option<String>,
        /// `page_view`, `click`, ...
        event_type: String,
        /// Page URL.
        url: Option<String>,
        /// Referrer URL.
        referrer: Option<String>,
        /// When it happened, Unix milliseconds.
        event_time: i64,
        /// When ingest received it, Unix milliseconds.
        received_at: i64,
        /// Client user-agent string.
        user_agent: Option<String>,
        /// Client IP address.
        ip: Option<String>,
        /// Unknown fields, as JSON text.
        extra: HashMap<String, String>,
    }
    enriched {
        /// Browser name from the user agent.
        browser: Option<String>,
        /// Browser version from the user agent.
        browser_version: Option<String>,
        /// Operating system from the user agent.
        os: Option<String>,
        /// Device category from the user agent (pc, smartphone, crawler...).
        device: Option<String>,
        /// Coarse network from the IP lookup table.
        network: Option<String>,
        /// Country from the IP lookup table.
        country: Option<String>,
        /// The tenant's display name, from the tenant directory.
        #[serde(default)]
        tenant_name: Option<String>,
        /// The tenant's plan, from the tenant directory.
        #[serde(default)]
        tenant_plan: Option<String>,
    }
}

impl AvroRecord for ClickEvent {
    const NAME: &'static str = "ClickEvent";
    const AVSC: &'static str = CLICK_EVENT_AVSC;
    const RELEASED: &'static [&'static str] =
        &[include_str!("../avro/released/click_event/v1.avsc")];
}

impl AvroRecord for EnrichedEvent {
    const NAME: &'static str = "EnrichedEvent";
    const AVSC: &'static str = ENRICHED_EVENT_AVSC;
    const RELEASED: &'static [&'static str] =
        &[include_str!("../avro/released/enriched_event/v1.avsc")];
}

/// Encodes and decodes one record type in Avro single-object encoding.
pub struct SingleObjectCodec<T> {
    /// Leaked (a codec lives as long as its process): the cached writer borrows it, and
    /// building a writer per record resolved the schema's names every time.
    schema: &'static Schema,
    writer: GenericDatumWriter<'static>,
    header: Vec<u8>,
    reader: GenericSingleObjectReader,
    /// Released writer schemas by their 10-byte header, resolved into the current one.
    older: HashMap<Vec<u8>, Schema>,
    _record: PhantomData<fn() -> T>,
}

impl<T: AvroRecord> SingleObjectCodec<T> {
    /// A codec for `T`'s compiled-in schema.
    pub fn new() -> Result<Self, CodecError> {
        let schema_err = |e| CodecError::Schema {
            name: T::NAME,
            source: Box::new(e),
        };
        let schema: &'static Schema =
            Box::leak(Box::new(Schema::parse_str(T::AVSC).map_err(schema_err)?));
        let header = RabinFingerprintHeader::from_schema(schema).build_header();
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(schema_err)?;
        let reader = GenericSingleObjectReader::builder()
            .schema(schema.clone())
            .build()
            .map_err(schema_err)?;
        let mut older = HashMap::new();
        for text in T::RELEASED {
            let writer = Schema::parse_str(text).map_err(schema_err)?;
            let h = RabinFingerprintHeader::from_schema(&writer).build_header();
            if h != header {
                older.insert(h, writer);
            }
        }
        Ok(Self {
            schema,
            writer,
            header,
            reader,
            older,
            _record: PhantomData,
        })
    }

    /// The parsed schema.
    pub fn schema(&self) -> &'static Schema {
        self.schema
    }

    /// Append the datum of `record` (no header) to `out`.
    pub fn write_datum(&self, out: &mut Vec<u8>, record: &T) -> Result<(), CodecError> {
        self.writer
            .write_ser(out, record)
            .map(drop)
            .map_err(|e| CodecError::Encode {
                name: T::NAME,
                source: Box::new(e),
            })
    }

    /// The 10-byte single-object header (marker and fingerprint) of this schema.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Encode one record.
    pub fn encode(&self, record: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&self.header);
        self.write_datum(&mut out, record)?;
        Ok(out)
    }

    /// Decode one record written with this schema or a released older version; fails on
    /// an unknown fingerprint or a bad datum.
    pub fn decode(&self, mut bytes: &[u8]) -> Result<T, CodecError> {
        // An older released version: resolve its datum into the current schema.
        if let Some(writer) = bytes.get(..10).and_then(|h| self.older.get(h)) {
            let err = |e| CodecError::Decode {
                name: T::NAME,
                source: Box::new(e),
            };
            return resolve::<T>(writer, self.schema, &bytes[10..]).map_err(err);
        }
        // Name the fingerprint rather than report a confusing datum error.
        if bytes.len() >= 10 && bytes[..2] == self.header[..2] && bytes[2..10] != self.header[2..10]
        {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            return Err(CodecError::UnknownSchema {
                name: T::NAME,
                found: hex(&bytes[2..10]),
                expected: hex(&self.header[2..10]),
            });
        }
        self.reader
            .read_deser(&mut bytes)
            .map_err(|e| CodecError::Decode {
                name: T::NAME,
                source: Box::new(e),
            })
    }
}

/// Read a datum written with `writer` as `T` of schema `reader` (Avro schema resolution).
fn resolve<T: DeserializeOwned>(
    writer: &Schema,
    reader: &Schema,
    mut datum: &[u8],
) -> Result<T, apache_avro::Error> {
    apache_avro::reader::datum::GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        // Resolution works on values, not yet with direct deserialization.
        .and_then(|r| r.read_value(&mut datum))
        .and_then(|v| apache_avro::from_value::<T>(&v))
}

/// The embedded-mode ClickEvent codec.
pub static CLICK_EVENTS: LazyLock<Arc<Codec<ClickEvent>>> =
    LazyLock::new(|| Arc::new(Codec::embedded().expect("compiled-in ClickEvent schema parses")));
/// The embedded-mode EnrichedEvent codec.
pub static ENRICHED_EVENTS: LazyLock<Arc<Codec<EnrichedEvent>>> =
    LazyLock::new(|| Arc::new(Codec::embedded().expect("compiled-in EnrichedEvent schema parses")));

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClickEvent for the tests of this crate.
    pub(crate) fn click() -> ClickEvent {
        ClickEvent {
            event_id: "e1".into(),
            tenant: "acme".into(),
            user_id: "u1".into(),
            session_id: Some("s1".into()),
            event_type: "page_view".into(),
            url: Some("/home".into()),
            referrer: None,
            event_time: 1_700_000_000_000,
            received_at: 1_700_000_000_500,
            user_agent: None,
            ip: Some("10.0.0.1".into()),
            extra: HashMap::from([("k".into(), "\"v\"".into())]),
        }
    }

    #[test]
    fn round_trip_click() {
        let bytes = CLICK_EVENTS.encode(&click()).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(CLICK_EVENTS.decode(&bytes).unwrap(), click());
    }

    #[test]
    fn round_trip_enriched() {
        let mut e = EnrichedEvent::from_click(click());
        e.browser = Some("Firefox".into());
        let bytes = ENRICHED_EVENTS.encode(&e).unwrap();
        assert_eq!(ENRICHED_EVENTS.decode(&bytes).unwrap(), e);
    }

    /// A record written with the released v1 EnrichedEvent (before the tenant fields)
    /// still decodes, the new fields at their defaults.
    #[test]
    fn released_versions_still_decode() {
        let v1 =
            Schema::parse_str(include_str!("../avro/released/enriched_event/v1.avsc")).unwrap();
        let mut e = EnrichedEvent::from_click(click());
        e.browser = Some("Firefox".into());
        let apache_avro::types::Value::Record(fields) = apache_avro::to_value(&e).unwrap() else {
            panic!("a record");
        };
        let old: Vec<_> = fields
            .into_iter()
            .filter(|(k, _)| !k.starts_with("tenant_"))
            .collect();
        let mut bytes = RabinFingerprintHeader::from_schema(&v1).build_header();
        bytes.extend(
            GenericDatumWriter::builder(&v1)
                .build()
                .unwrap()
                .write_value_to_vec(apache_avro::types::Value::Record(old))
                .unwrap(),
        );
        assert_ne!(
            &bytes[..10],
            SingleObjectCodec::<EnrichedEvent>::new().unwrap().header()
        );
        assert_eq!(ENRICHED_EVENTS.decode(&bytes).unwrap(), e);
    }

    #[test]
    fn wrong_schema_is_rejected() {
        let bytes = CLICK_EVENTS.encode(&click()).unwrap();
        let err = ENRICHED_EVENTS.decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("EnrichedEvent"), "{err}");
        assert!(CLICK_EVENTS.decode(b"{\"json\":1}").is_err());
    }
}
