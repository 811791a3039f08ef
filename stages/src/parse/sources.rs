//! Trust boundaries of the topics parse reads.
//!
//! Only ingest writes the raw topic (a Kafka ACL must say so), so the `sluice.*` headers
//! on it are believed: the tenant ingest authenticated, the event id, the receive time.
//! Other producers' topics (`topics.raw_extra`) are declared one by one in
//! `parse.sources`: every record of a topic is one fixed tenant's, or names its tenant
//! in a field checked against a list. Their `sluice.*` headers are dropped, so a
//! producer that can write such a topic cannot file records as another tenant, pick
//! their ids or skip the clock-skew check.

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::message::{Headers, Message, OwnedHeaders};
use sluice_core::failure::Failure;
use sluice_core::headers;

use super::config::{ParseConfig, SourceConfig};
use super::ParseConfigError;

/// Whose records one of the other producers' topics carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The topic (named in reasons).
    pub topic: String,
    /// Its records' `sluice.*` headers are believed (a mirror of another Sluice's raw
    /// topic); otherwise they are dropped.
    pub trust_headers: bool,
    /// Where a record's tenant comes from when no believed header names it.
    pub tenant: SourceTenant,
}

/// Where the tenant of a record from another producer comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceTenant {
    /// Every record is this tenant's.
    Fixed(String),
    /// The record names its tenant in `field`, one of `allowed`; without the field,
    /// `default` (if any).
    Field {
        /// The JSON field.
        field: String,
        /// The tenants the topic may write as.
        allowed: BTreeSet<String>,
        /// The tenant of a record without the field.
        default: Option<String>,
    },
}

/// The declared sources of `config` for the extra topics in `extra`. `directory` is the
/// tenants Sluice knows (those ingest has keys for); a field-named tenant must be one of
/// them or of the source's own `tenants`.
pub fn declared(
    config: &ParseConfig,
    extra: &[String],
    directory: &[String],
) -> Result<BTreeMap<String, Source>, ParseConfigError> {
    if let Some(topic) = config.sources.keys().find(|t| !extra.contains(t)) {
        return Err(ParseConfigError::Source {
            topic: topic.clone(),
            reason: "not a topic of topics.raw_extra (the raw topic is ingest's: its headers are always believed)".into(),
        });
    }
    extra
        .iter()
        .map(|topic| {
            let declared = config.sources.get(topic).ok_or_else(|| ParseConfigError::Source {
                topic: topic.clone(),
                reason: "missing: say whose records this topic of topics.raw_extra carries, with tenant = \"…\" or tenant_field = \"…\" and tenants = [\"…\"]".into(),
            })?;
            Ok((topic.clone(), source(topic, declared, directory)?))
        })
        .collect()
}

fn source(topic: &str, c: &SourceConfig, directory: &[String]) -> Result<Source, ParseConfigError> {
    let bad = |reason: &str| ParseConfigError::Source {
        topic: topic.to_string(),
        reason: reason.to_string(),
    };
    if c.tenant_field.as_deref() == Some("") {
        return Err(bad("tenant_field must not be empty"));
    }
    // Tenant names, empty ones included, are judged by the one rule for every tenant.
    let named = c.tenant.iter().chain(&c.default_tenant).chain(&c.tenants);
    if let Some(problem) = named
        .filter_map(|t| sluice_core::tenant_name_problem(t))
        .next()
    {
        return Err(bad(&problem));
    }
    let tenant = match (&c.tenant, &c.tenant_field) {
        (Some(_), Some(_)) => return Err(bad("give tenant or tenant_field, not both")),
        (None, None) => {
            return Err(bad(
                "give tenant = \"…\" (every record is that tenant's) or tenant_field = \"…\" with tenants = [\"…\"]",
            ))
        }
        (Some(t), None) => {
            if c.default_tenant.is_some() || !c.tenants.is_empty() {
                return Err(bad("default_tenant and tenants go with tenant_field, not tenant"));
            }
            SourceTenant::Fixed(t.clone())
        }
        (None, Some(field)) => {
            let allowed: BTreeSet<String> =
                c.tenants.iter().chain(directory).cloned().collect();
            if allowed.is_empty() {
                return Err(bad(
                    "tenant_field needs the tenants it may name: list them in tenants = [\"…\"] (ingest.api_keys has none here)",
                ));
            }
            SourceTenant::Field {
                field: field.clone(),
                allowed,
                default: c.default_tenant.clone(),
            }
        }
    };
    Ok(Source {
        topic: topic.to_string(),
        trust_headers: c.trust_headers,
        tenant,
    })
}

/// Which declared source a record comes from: its topic's, or for a replay's copy (on a
/// scratch topic, or fed from the archive) the topic it was first written to. `None`
/// for the raw topic and copies of it.
pub fn source_of<'a, M: Message>(
    sources: &'a BTreeMap<String, Source>,
    msg: &M,
) -> Option<&'a Source> {
    if sources.is_empty() {
        return None;
    }
    if let Some(s) = sources.get(msg.topic()) {
        return Some(s);
    }
    let from = headers::get(msg.headers(), headers::REPLAYED_FROM)?;
    let (topic, _, _) = headers::parse_origin(from)?;
    sources.get(topic)
}

/// The headers of a record from an untrusted producer worth forwarding: all but the
/// `sluice.*` ones, keeping `sluice.replayed_from` only when `keep_origin` (a replay
/// wrote it).
pub fn foreign_headers<H: Headers>(input: Option<&H>, keep_origin: bool) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(h) = input {
        for header in h.iter().filter(|h| {
            !h.key.starts_with("sluice.") || (keep_origin && h.key == headers::REPLAYED_FROM)
        }) {
            out = out.insert(header);
        }
    }
    out
}

impl Source {
    /// The tenant of a record of this source whose JSON field `get` reads.
    pub fn tenant(&self, field_value: impl Fn(&str) -> FieldValue) -> Result<String, Failure> {
        match &self.tenant {
            SourceTenant::Fixed(t) => Ok(t.clone()),
            SourceTenant::Field {
                field,
                allowed,
                default,
            } => {
                let named = match field_value(field) {
                    FieldValue::Text(t) => t,
                    FieldValue::Absent => default.clone().ok_or_else(|| {
                        Failure::new(
                            "validation",
                            format!(
                                "field `{field}` (parse.sources.\"{}\".tenant_field): required, missing",
                                self.topic
                            ),
                        )
                    })?,
                    FieldValue::Other(kind) => {
                        return Err(Failure::new(
                            "validation",
                            format!(
                                "field `{field}` (parse.sources.\"{}\".tenant_field): expected a non-empty string, got {kind}",
                                self.topic
                            ),
                        ))
                    }
                };
                if allowed.contains(&named) {
                    Ok(named)
                } else {
                    Err(Failure::new(
                        "tenant",
                        format!(
                            "field `{field}`: tenant {named:?} may not write to topic {} (parse.sources.\"{}\".tenants, ingest.api_keys)",
                            self.topic, self.topic
                        ),
                    ))
                }
            }
        }
    }
}

/// A record's tenant field, as [`Source::tenant`] needs it.
#[derive(Debug)]
pub enum FieldValue {
    /// A non-empty string.
    Text(String),
    /// Absent or null.
    Absent,
    /// Anything else, described ("a number").
    Other(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedMessage, Timestamp};

    fn config(entries: &[(&str, SourceConfig)]) -> ParseConfig {
        ParseConfig {
            sources: entries
                .iter()
                .map(|(t, s)| (t.to_string(), s.clone()))
                .collect(),
            ..ParseConfig::default()
        }
    }

    fn fixed(t: &str) -> SourceConfig {
        SourceConfig {
            tenant: Some(t.into()),
            ..SourceConfig::default()
        }
    }

    #[test]
    fn every_extra_topic_must_say_whose_records_it_carries() {
        let extra = vec!["logs".to_string()];
        let err = declared(&config(&[]), &extra, &[]).unwrap_err().to_string();
        assert!(
            err.contains("parse.sources.\"logs\"") && err.contains("missing"),
            "{err}"
        );
        let err = declared(&config(&[("other", fixed("a"))]), &extra, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"other\"") && err.contains("not a topic of topics.raw_extra"),
            "{err}"
        );
        let field = SourceConfig {
            tenant_field: Some("org".into()),
            ..SourceConfig::default()
        };
        let err = declared(&config(&[("logs", field.clone())]), &extra, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants = ["), "{err}");
        // The tenants ingest knows are the directory.
        let ok = declared(&config(&[("logs", field)]), &extra, &["acme".into()]).unwrap();
        assert!(
            matches!(&ok["logs"].tenant, SourceTenant::Field { allowed, .. } if allowed.contains("acme"))
        );
        let both = SourceConfig {
            tenant: Some("a".into()),
            tenant_field: Some("org".into()),
            ..SourceConfig::default()
        };
        assert!(declared(&config(&[("logs", both)]), &extra, &[]).is_err());
        let err = declared(&config(&[("logs", fixed("_unknown"))]), &extra, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
        let err = declared(&config(&[("logs", fixed(""))]), &extra, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must not be empty"), "{err}");
    }

    #[test]
    fn a_copy_is_judged_by_the_topic_it_came_from_and_a_source_by_its_own() {
        let sources = declared(&config(&[("logs", fixed("a"))]), &["logs".into()], &[]).unwrap();
        let at = |topic: &str, from: Option<&str>| {
            OwnedMessage::new(
                None,
                None,
                topic.into(),
                Timestamp::NotAvailable,
                0,
                1,
                from.map(|v| {
                    OwnedHeaders::new().insert(Header {
                        key: headers::REPLAYED_FROM,
                        value: Some(v),
                    })
                }),
            )
        };
        assert!(source_of(&sources, &at("logs", None)).is_some());
        assert!(source_of(&sources, &at("raw", None)).is_none());
        assert!(source_of(&sources, &at("scratch", Some("logs/0/5"))).is_some());
        assert!(source_of(&sources, &at("scratch", Some("raw/0/5"))).is_none());
        // A producer on the extra topic cannot claim its record was copied from raw.
        assert!(source_of(&sources, &at("logs", Some("raw/0/5"))).is_some());
    }

    #[test]
    fn a_named_tenant_must_be_in_the_list() {
        let s = Source {
            topic: "logs".into(),
            trust_headers: false,
            tenant: SourceTenant::Field {
                field: "org".into(),
                allowed: ["acme".to_string()].into(),
                default: None,
            },
        };
        assert_eq!(
            s.tenant(|_| FieldValue::Text("acme".into())).unwrap(),
            "acme"
        );
        let f = s.tenant(|_| FieldValue::Text("victim".into())).unwrap_err();
        assert_eq!(f.class, "tenant");
        assert!(
            f.reason.contains("\"victim\"") && f.reason.contains("logs"),
            "{f}"
        );
        assert_eq!(
            s.tenant(|_| FieldValue::Absent).unwrap_err().class,
            "validation"
        );
        assert!(s
            .tenant(|_| FieldValue::Other("a number"))
            .unwrap_err()
            .reason
            .contains("a number"));
    }

    #[test]
    fn foreign_headers_lose_every_sluice_header() {
        let h = OwnedHeaders::new()
            .insert(Header {
                key: headers::TENANT,
                value: Some("victim"),
            })
            .insert(Header {
                key: headers::RECEIVED_AT_MS,
                value: Some("0"),
            })
            .insert(Header {
                key: headers::REPLAYED_FROM,
                value: Some("logs/0/1"),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-ab"),
            });
        let keys = |o: OwnedHeaders| o.iter().map(|h| h.key.to_string()).collect::<Vec<_>>();
        assert_eq!(keys(foreign_headers(Some(&h), false)), ["traceparent"]);
        assert_eq!(
            keys(foreign_headers(Some(&h), true)),
            [headers::REPLAYED_FROM, "traceparent"]
        );
    }
}
