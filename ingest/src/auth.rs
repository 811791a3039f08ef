//! Who sends a request: the bearer API key, looked up among the configured ones.

use std::collections::HashMap;

use axum::http::{header, HeaderMap, StatusCode};

use crate::config::ApiKey;
use crate::http::Rejection;

/// The accepted API keys.
pub(crate) struct Keys {
    /// Bearer token → tenant.
    keys: HashMap<String, String>,
}

impl Keys {
    /// The keys of the configuration.
    pub(crate) fn new(keys: &[ApiKey]) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| (k.key.expose().to_string(), k.tenant.clone()))
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
            .ok_or_else(|| unauthorized("Authorization must be `Bearer <api key>`"))?;
        self.keys
            .get(token.trim())
            .map(String::as_str)
            .ok_or_else(|| unauthorized("unknown API key"))
    }
}
