//! Who sends a request: the bearer API key, looked up among the configured ones. Keys
//! are held as SHA-256 digests and compared in constant time, so neither memory nor the
//! time an answer takes gives a key away.

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use crate::config::ApiKey;
use crate::http::Rejection;

/// The accepted API keys.
pub(crate) struct Keys {
    /// SHA-256 of each key, and its tenant.
    keys: Vec<([u8; 32], String)>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal, in a time that does not depend on where the digests differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    /// The keys of the configuration (empty ones are refused by `IngestConfig::check`).
    pub(crate) fn new(keys: &[ApiKey]) -> Self {
        Self {
            keys: keys
                .iter()
                .filter(|k| !k.key.expose().trim().is_empty())
                .map(|k| (digest(k.key.expose().trim()), k.tenant.clone()))
                .collect(),
        }
    }

    /// The tenant whose key authorizes the request, or a 401 saying what is wrong.
    pub(crate) fn tenant_of(&self, headers: &HeaderMap) -> Result<&str, Rejection> {
        let unauthorized = |r: &str| Rejection::new(StatusCode::UNAUTHORIZED, "unauthorized", r);
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <api key>"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("Authorization must be `Bearer <api key>`"))?;
        let presented = digest(token);
        // Every key is compared, matching or not.
        let mut found = None;
        for (key, tenant) in &self.keys {
            if same(key, &presented) && found.is_none() {
                found = Some(tenant.as_str());
            }
        }
        found.ok_or_else(|| unauthorized("unknown API key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&[
            ApiKey {
                tenant: "acme".into(),
                key: "k-acme".into(),
            },
            ApiKey {
                tenant: "ghost".into(),
                key: "".into(),
            },
        ])
    }

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            v.parse().unwrap_or_else(|_| panic!("{v}")),
        );
        h
    }

    #[test]
    fn keys_match_by_digest_and_an_empty_key_matches_nothing() {
        let k = keys();
        assert_eq!(k.tenant_of(&bearer("Bearer k-acme")).ok(), Some("acme"));
        assert!(k.tenant_of(&bearer("Bearer k-acm")).is_err());
        assert!(k.tenant_of(&bearer("Bearer ")).is_err(), "an empty token");
        assert!(k.tenant_of(&bearer("Bearer  ")).is_err());
        assert!(k.keys.iter().all(|(d, _)| d != &[0u8; 32]));
        assert_eq!(k.keys.len(), 1, "the empty key is not held");
    }
}
