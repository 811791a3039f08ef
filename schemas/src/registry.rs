//! A Confluent-compatible schema registry, reached through `schema_registry_converter`:
//! registration with a compatibility check when a writer starts, and the writer schema of
//! a record's id fetched when a reader meets it (the [`crate::Codec`] caches it).

use std::time::Duration;

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{
    get_schema_by_id, post_schema, SrSettings,
};
use schema_registry_converter::avro_common::get_supplied_schema;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::RawError;

/// The registry's own error body (`{"error_code", "message"}`) behind a failed call.
fn registry_answer(e: &SRCError) -> Option<&RawError> {
    std::error::Error::source(e)?.downcast_ref::<RawError>()
}

/// Why the registry could not answer or refused a schema.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused the schema: it is not compatible with what the subject holds.
    #[error("schema {name} is not compatible with the versions registered under subject `{subject}` at {url} (the registry says: {reason}); bump it compatibly (new fields need defaults) or change the subject's compatibility level")]
    Incompatible {
        /// The record's name.
        name: String,
        /// The subject.
        subject: String,
        /// The registry.
        url: String,
        /// The registry's own explanation.
        reason: String,
    },
    /// No schema has this id.
    #[error("schema id {id} is not in the registry at {url}")]
    UnknownId {
        /// The id.
        id: u32,
        /// The registry.
        url: String,
    },
    /// The registry holds a schema under this id that is not valid Avro.
    #[error("schema id {id} from {url} is not a valid Avro schema: {reason}")]
    BadSchema {
        /// The id.
        id: u32,
        /// The registry.
        url: String,
        /// The parse error.
        reason: String,
    },
    /// A request failed; `retriable` when the registry was unreachable or overloaded.
    #[error("schema registry {url}: {what}: {reason}")]
    Request {
        /// The registry.
        url: String,
        /// What was asked.
        what: String,
        /// The error.
        reason: String,
        /// Worth asking again later.
        retriable: bool,
    },
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"***")
                .finish(),
            Self::Token(_) => f.write_str("Token(***)"),
        }
    }
}

impl RegistryError {
    /// Worth retrying later (the registry was unreachable or overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Request {
                retriable: true,
                ..
            }
        )
    }
}

/// How to authenticate to the registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RegistryAuth {
    /// No credentials.
    #[default]
    None,
    /// HTTP basic (Confluent Cloud: API key and secret).
    Basic {
        /// User name or API key.
        username: String,
        /// Password or API secret.
        password: String,
    },
    /// A bearer token.
    Token(String),
}

/// Where a schema registry is and how to reach it.
#[derive(Debug)]
pub struct SchemaRegistry {
    urls: Vec<String>,
    auth: RegistryAuth,
    timeout: Duration,
}

impl SchemaRegistry {
    /// A registry at `urls` (tried in order).
    pub fn new(urls: Vec<String>, auth: RegistryAuth, timeout: Duration) -> Self {
        Self {
            urls,
            auth,
            timeout,
        }
    }

    /// The first URL, for messages, with any password in it masked.
    pub fn url(&self) -> String {
        sluice_core::redact::url(self.urls.first().map_or("", String::as_str))
    }

    fn settings(&self) -> Result<SrSettings, RegistryError> {
        let mut urls = self.urls.iter();
        let mut builder = SrSettings::new_builder(urls.next().cloned().unwrap_or_default());
        for u in urls {
            builder.add_url(u.clone());
        }
        match &self.auth {
            RegistryAuth::None => {}
            RegistryAuth::Basic { username, password } => {
                builder.set_basic_authorization(username, Some(password));
            }
            RegistryAuth::Token(t) => {
                builder.set_token_authorization(t);
            }
        }
        builder
            .set_timeout(self.timeout)
            .build()
            .map_err(|e| self.request_error("client set-up", &e))
    }

    fn request_error(&self, what: &str, e: &SRCError) -> RegistryError {
        let mut reason = match &e.cause {
            Some(c) => format!("{} ({c})", e.error),
            None => e.error.clone(),
        };
        // The HTTP client's errors may quote the URL it was given, credentials and all.
        for url in &self.urls {
            let masked = sluice_core::redact::url(url);
            reason = reason.replace(url.as_str(), &masked);
        }
        RegistryError::Request {
            url: self.url(),
            what: what.to_string(),
            reason,
            retriable: e.retriable,
        }
    }

    /// Register `schema` under `subject`; returns its id. The registry checks it against
    /// the subject's compatibility level and refuses it with a reason (HTTP 409), which
    /// [`RegistryError::Incompatible`] carries. Registering a schema that is already
    /// there returns the existing id.
    ///
    /// There is no separate compatibility call first: registration enforces the same
    /// rule, and only its refusal says why (Apicurio's compatibility endpoint answers a
    /// bare `false`).
    pub async fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let settings = self.settings()?;
        let supplied = get_supplied_schema(schema);
        let name = supplied.name.clone().unwrap_or_default();
        let registered = post_schema(&settings, subject.to_string(), supplied)
            .await
            .map_err(|e| match registry_answer(&e) {
                Some(answer) if answer.error_code == 409 || answer.error_code / 100 == 409 => {
                    RegistryError::Incompatible {
                        name,
                        subject: subject.to_string(),
                        url: self.url(),
                        reason: answer.message.clone(),
                    }
                }
                _ => self.request_error("registration", &e),
            })?;
        Ok(registered.id)
    }

    /// Fetch the schema registered under `id`.
    ///
    /// Decoding is synchronous (it runs inside a stage's transform), so this asks the
    /// registry on a short-lived thread of its own and waits: it must not need the
    /// caller's async runtime. Codecs cache the answer, so it runs once per id.
    pub fn schema(&self, id: u32) -> Result<Schema, RegistryError> {
        let settings = self.settings()?;
        let fetched = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| SRCError::new("no runtime", Some(e.to_string()), true))?;
                    runtime.block_on(get_schema_by_id(id, &settings))
                })
                .join()
                .unwrap_or_else(|_| Err(SRCError::new("lookup thread panicked", None, true)))
        });
        let registered = fetched.map_err(|e| {
            // 40403: schema not found (Confluent's code; Apicurio answers the same).
            if registry_answer(&e).is_some_and(|a| a.error_code == 40403 || a.error_code == 404)
                || e.error.contains("404")
            {
                RegistryError::UnknownId {
                    id,
                    url: self.url(),
                }
            } else {
                self.request_error(&format!("lookup of schema id {id}"), &e)
            }
        })?;
        Schema::parse_str(&registered.schema).map_err(|e| RegistryError::BadSchema {
            id,
            url: self.url(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_do_not_show_the_registry_password() {
        let registry = SchemaRegistry::new(
            vec!["http://sr-user:hunter2@127.0.0.1:1".into()],
            RegistryAuth::None,
            Duration::from_secs(2),
        );
        let err = registry.schema(5).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("sr-user:***@127.0.0.1:1"), "{err}");
    }
}
