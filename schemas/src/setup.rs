//! The codecs a process reads and writes with, from the `[schemas]` settings: embedded
//! schemas, or a schema registry in which writers register theirs at start.

use std::sync::Arc;
use std::time::Duration;

use sluice_core::config::{SchemaMode, SchemasConfig};

use crate::{AvroRecord, Codec, CodecError, RegistryAuth, SchemaRegistry};

/// Why a codec could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The registry refused the schema (e.g. incompatible with the subject's versions)
    /// or could not be reached.
    #[error("registering {name} under subject `{subject}`: {source}")]
    Register {
        /// The schema's name.
        name: &'static str,
        /// The subject.
        subject: String,
        /// Why.
        source: Box<CodecError>,
    },
    /// A compiled-in schema does not parse (a build defect).
    #[error(transparent)]
    Codec(Box<CodecError>),
}

impl From<CodecError> for SetupError {
    fn from(e: CodecError) -> Self {
        Self::Codec(Box::new(e))
    }
}

/// The schema registry in registry mode; `None` in embedded mode.
pub fn schema_registry(c: &SchemasConfig) -> Option<Arc<SchemaRegistry>> {
    if c.mode != SchemaMode::Registry {
        return None;
    }
    let auth = match (&c.registry_token, &c.registry_username) {
        (Some(token), _) => RegistryAuth::Token(token.expose().to_string()),
        (None, Some(username)) => RegistryAuth::Basic {
            username: username.clone(),
            password: c
                .registry_password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default(),
        },
        (None, None) => RegistryAuth::None,
    };
    let urls = c
        .registry_url
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect();
    Some(Arc::new(SchemaRegistry::new(
        urls,
        auth,
        Duration::from_millis(c.registry_timeout_ms),
    )))
}

/// The codec a process writes `T` to `topic` with: in registry mode, `T`'s schema is
/// registered (after the registry's compatibility check) under the subject
/// `<topic>-value` (Confluent's TopicNameStrategy).
pub async fn writing_codec<T: AvroRecord>(
    schemas: &SchemasConfig,
    topic: &str,
) -> Result<Arc<Codec<T>>, SetupError> {
    Ok(Arc::new(match schema_registry(schemas) {
        None => Codec::embedded()?,
        Some(registry) => {
            let subject = format!("{topic}-value");
            Codec::writing(registry, &subject)
                .await
                .map_err(|source| SetupError::Register {
                    name: T::NAME,
                    subject,
                    source: Box::new(source),
                })?
        }
    }))
}

/// The codec a process reads `T` with (either encoding; registry lookups in registry
/// mode).
pub fn reading_codec<T: AvroRecord>(schemas: &SchemasConfig) -> Result<Arc<Codec<T>>, SetupError> {
    Ok(Arc::new(match schema_registry(schemas) {
        None => Codec::embedded()?,
        Some(registry) => Codec::reading(registry)?,
    }))
}
