//! [`Codec`]: one record type's encoder and decoder in the configured mode.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::Schema;

use crate::registry::SchemaRegistry;
use crate::{AvroRecord, CodecError, SingleObjectCodec};

/// The first byte of a Confluent wire-format record.
const CONFLUENT_MAGIC: u8 = 0;
/// The first two bytes of an Avro single-object record.
const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];

/// How records are written, named in the `sluice.encoding` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Avro single-object encoding (schema fingerprint in each record, no registry).
    SingleObject,
    /// Confluent wire format (schema id from a registry in each record).
    Confluent,
}

impl Encoding {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::SingleObject => "avro-single-object",
            Encoding::Confluent => "avro-confluent",
        }
    }
}

/// The registry side of a codec.
struct Registered {
    registry: Arc<SchemaRegistry>,
    /// The id this codec writes with; `None` for a codec that only reads.
    write_id: Option<u32>,
    /// Writer schemas met so far by id: `None` when it is this codec's own schema (read
    /// directly), otherwise resolved into it.
    writers: RwLock<HashMap<u32, Option<Arc<Schema>>>>,
    /// Ids the registry does not have (or holds no valid Avro under), and when it said so:
    /// a flood of records naming made-up ids asks the registry once per id and
    /// [`UNKNOWN_ID_TTL`], not once per record.
    unknown: RwLock<HashMap<u32, (std::time::Instant, crate::RegistryError)>>,
}

/// How long the registry's "no such schema id" is believed before it is asked again.
const UNKNOWN_ID_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Most ids remembered as unknown; past it the oldest half is forgotten.
const MAX_UNKNOWN_IDS: usize = 10_000;

/// Encodes records of `T` in the configured mode and decodes records in either mode.
pub struct Codec<T> {
    single: SingleObjectCodec<T>,
    /// Reads datums of the current schema (cached: building one resolves the schema).
    direct: GenericDatumReader<'static>,
    registered: Option<Registered>,
}

/// Most bytes one decoded value may claim. A record is at most a Kafka message (about
/// 1 MB), so a length prefix beyond this is a corrupt or hostile record: refused before
/// anything is allocated (apache-avro's own default lets one record claim 512 MB).
pub const MAX_DECODE_ALLOCATION: usize = 16 * 1024 * 1024;

impl<T: AvroRecord> Codec<T> {
    /// The embedded mode: single-object encoding, no registry.
    pub fn embedded() -> Result<Self, CodecError> {
        Self::with(SingleObjectCodec::new()?, None)
    }

    fn with(
        single: SingleObjectCodec<T>,
        registered: Option<Registered>,
    ) -> Result<Self, CodecError> {
        // Process-wide and set once: before the first decode, by whichever codec is first.
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
        let direct = GenericDatumReader::builder(single.schema())
            .build()
            .map_err(|e| CodecError::Schema {
                name: T::NAME,
                source: Box::new(e),
            })?;
        Ok(Self {
            single,
            direct,
            registered,
        })
    }

    /// The registry mode for a writer: registers `T`'s schema under `subject` (the
    /// registry checks compatibility first) and writes with its id.
    pub async fn writing(registry: Arc<SchemaRegistry>, subject: &str) -> Result<Self, CodecError> {
        let single = SingleObjectCodec::new()?;
        let id = registry
            .register(subject, single.schema())
            .await
            .map_err(|source| CodecError::Registry {
                name: T::NAME,
                source,
            })?;
        Self::with(
            single,
            Some(Registered {
                registry,
                write_id: Some(id),
                writers: RwLock::new(HashMap::from([(id, None)])),
                unknown: RwLock::default(),
            }),
        )
    }

    /// The registry mode for a reader: writer schemas are fetched by id as records name
    /// them. Writes (if any) stay single-object.
    pub fn reading(registry: Arc<SchemaRegistry>) -> Result<Self, CodecError> {
        Self::with(
            SingleObjectCodec::new()?,
            Some(Registered {
                registry,
                write_id: None,
                writers: RwLock::new(HashMap::new()),
                unknown: RwLock::default(),
            }),
        )
    }

    /// The current schema.
    pub fn schema(&self) -> &Schema {
        self.single.schema()
    }

    /// How this codec writes.
    pub fn encoding(&self) -> Encoding {
        match self.schema_id() {
            Some(_) => Encoding::Confluent,
            None => Encoding::SingleObject,
        }
    }

    /// The schema id records are written with, in registry mode.
    pub fn schema_id(&self) -> Option<u32> {
        self.registered.as_ref().and_then(|r| r.write_id)
    }

    /// Encode one record.
    pub fn encode(&self, record: &T) -> Result<Vec<u8>, CodecError> {
        let Some(id) = self.schema_id() else {
            return self.single.encode(record);
        };
        let mut out = Vec::with_capacity(256);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        self.single.write_datum(&mut out, record)?;
        Ok(out)
    }

    /// Decode one record in either encoding, resolving an older writer schema into the
    /// current one.
    pub fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if bytes.starts_with(&SINGLE_OBJECT_MARKER) {
            return self.single.decode(bytes);
        }
        match (bytes, &self.registered) {
            ([CONFLUENT_MAGIC, a, b, c, d, datum @ ..], Some(r)) => {
                let id = u32::from_be_bytes([*a, *b, *c, *d]);
                let writer = self.writer(r, id)?;
                self.read(writer.as_deref(), datum)
            }
            ([CONFLUENT_MAGIC, _, _, _, _, ..], None) => Err(CodecError::Framing {
                name: T::NAME,
                reason: "a Confluent wire-format record, but no schema registry is configured \
                         (set schemas.mode = \"registry\")"
                    .into(),
            }),
            _ => Err(CodecError::Framing {
                name: T::NAME,
                reason: format!(
                    "neither Avro single-object nor Confluent wire format (starts with {:02x?})",
                    &bytes[..bytes.len().min(5)]
                ),
            }),
        }
    }

    /// The writer schema of `id`: `None` when it is the current schema.
    fn writer(&self, r: &Registered, id: u32) -> Result<Option<Arc<Schema>>, CodecError> {
        if let Some(w) = r
            .writers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return Ok(w.clone());
        }
        let err = |source| CodecError::Registry {
            name: T::NAME,
            source,
        };
        if let Some((at, e)) = r
            .unknown
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            if at.elapsed() < UNKNOWN_ID_TTL {
                return Err(err(e.clone()));
            }
        }
        let fetched = match r.registry.schema(id) {
            Ok(schema) => schema,
            Err(e) => {
                if !e.is_transient() {
                    let mut unknown = r
                        .unknown
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if unknown.len() >= MAX_UNKNOWN_IDS {
                        let mut ages: Vec<_> = unknown.values().map(|(at, _)| *at).collect();
                        ages.sort();
                        let cut = ages[ages.len() / 2];
                        unknown.retain(|_, (at, _)| *at > cut);
                    }
                    unknown.insert(id, (std::time::Instant::now(), e.clone()));
                }
                return Err(err(e));
            }
        };
        let writer =
            (fetched.canonical_form() != self.schema().canonical_form()).then(|| Arc::new(fetched));
        r.writers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, writer.clone());
        Ok(writer)
    }

    fn read(&self, writer: Option<&Schema>, mut datum: &[u8]) -> Result<T, CodecError> {
        let err = |e| CodecError::Decode {
            name: T::NAME,
            source: Box::new(e),
        };
        match writer {
            None => self.direct.read_deser(&mut datum).map_err(err),
            Some(w) => crate::resolve(w, self.schema(), datum).map_err(err),
        }
    }
}

impl<T> std::fmt::Debug for Codec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field(
                "registry",
                &self.registered.as_ref().map(|r| r.registry.url()),
            )
            .field(
                "write_id",
                &self.registered.as_ref().and_then(|r| r.write_id),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClickEvent;

    #[test]
    fn embedded_reads_and_writes_single_object() {
        let codec = Codec::<ClickEvent>::embedded().unwrap();
        let e = crate::tests::click();
        let bytes = codec.encode(&e).unwrap();
        assert_eq!(codec.encoding(), Encoding::SingleObject);
        assert_eq!(codec.decode(&bytes).unwrap(), e);
        let err = codec
            .decode(&[0, 0, 0, 0, 7, 1, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no schema registry is configured"), "{err}");
        let err = codec.decode(b"{\"a\":1}").unwrap_err().to_string();
        assert!(err.contains("neither Avro single-object"), "{err}");
    }
}
