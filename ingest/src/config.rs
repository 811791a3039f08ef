//! Settings of the HTTP ingest endpoint (`[ingest]`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One tenant's API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The tenant this key writes as.
    pub tenant: String,
    /// The bearer token.
    pub key: sluice_core::secret::Secret,
}

/// The HTTP ingest endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most lines accepted in one NDJSON request.
    pub max_lines: usize,
    /// How long to wait for the broker to acknowledge a request's records.
    pub ack_timeout_ms: u64,
    /// Fields of an event, tried in order, whose value keys its record.
    pub partition_key_fields: Vec<String>,
    /// Accepted API keys.
    pub api_keys: Vec<ApiKey>,
    /// Per-tenant sustained rate, in events per second; none means unlimited.
    pub rate_limit_per_sec: Option<u32>,
    /// Per-tenant burst, in events (the token bucket's size); defaults to one second's rate.
    pub rate_limit_burst: Option<u32>,
    /// Requests handled at once; more are answered 503 with Retry-After at once.
    pub max_concurrent_requests: usize,
    /// Most bytes of request bodies held at once (a body counts its Content-Length, or
    /// `max_body_bytes` without one); a request beyond it is answered 503 before its body
    /// is read. With the producer's queue (`queue.buffering.max.kbytes`, 128 MiB unless
    /// set) this bounds ingest's memory by bytes, whatever clients send.
    pub max_in_flight_bytes: usize,
    /// A connection that has not sent a whole request head within this long is closed
    /// (slowloris), in milliseconds.
    pub header_read_timeout_ms: u64,
    /// A body not received within this long is answered 408, in milliseconds.
    pub body_read_timeout_ms: u64,
    /// Most bytes of a refused request's body read (and dropped) before the answer, so
    /// that a client still sending gets the status and reason, not a reset connection;
    /// a larger body's connection is closed.
    pub max_refused_body_bytes: usize,
    /// Longest `X-Source` and `Idempotency-Key` header values, in bytes: they are copied
    /// onto every record of the request.
    pub max_header_value_bytes: usize,
    /// Refused bodies being drained at once (their own small budget, apart from the
    /// requests'); a refusal beyond it closes its connection instead. A 401 or 403 is
    /// never drained: its connection is closed.
    pub max_draining: usize,
    /// Open connections; beyond this a new connection is closed at once (idle and
    /// trickling clients hold a connection each).
    pub max_connections: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            max_lines: 10_000,
            ack_timeout_ms: 10_000,
            partition_key_fields: vec!["user_id".into(), "session_id".into()],
            api_keys: Vec::new(),
            rate_limit_per_sec: None,
            rate_limit_burst: None,
            max_concurrent_requests: 256,
            max_in_flight_bytes: 128 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            max_refused_body_bytes: 64 * 1024 * 1024,
            max_header_value_bytes: 256,
            max_draining: 32,
            max_connections: 10_000,
        }
    }
}

impl IngestConfig {
    /// How long a request's body may take to arrive (at least 1 ms).
    pub fn body_read_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_read_timeout_ms.max(1))
    }

    /// Settings that cannot work, named.
    pub fn check(&self) -> Result<(), String> {
        if let Some(k) = self
            .api_keys
            .iter()
            .find(|k| k.key.expose().trim().is_empty())
        {
            return Err(format!(
                "ingest.api_keys: the key of tenant {:?} is empty (it would match `Bearer `)",
                k.tenant
            ));
        }
        if self.api_keys.iter().any(|k| k.tenant.trim().is_empty()) {
            return Err("ingest.api_keys: a key has an empty tenant".into());
        }
        if let Some(problem) = self
            .api_keys
            .iter()
            .find_map(|k| sluice_core::tenant_name_problem(&k.tenant))
        {
            return Err(format!("ingest.api_keys: {problem}"));
        }
        // One key, two tenants: whichever matched first would get the other's events.
        for (i, a) in self.api_keys.iter().enumerate() {
            if let Some(b) = self.api_keys[..i]
                .iter()
                .find(|b| b.key.expose() == a.key.expose() && b.tenant != a.tenant)
            {
                return Err(format!(
                    "ingest.api_keys: tenants {:?} and {:?} have the same key; each tenant needs its own",
                    b.tenant, a.tenant
                ));
            }
        }
        if self.max_concurrent_requests == 0 {
            return Err("ingest.max_concurrent_requests: must be at least 1".into());
        }
        if self.max_in_flight_bytes < self.max_body_bytes {
            return Err(format!(
                "ingest.max_in_flight_bytes ({}) is below ingest.max_body_bytes ({}): no request of the largest size could ever be taken",
                self.max_in_flight_bytes, self.max_body_bytes
            ));
        }
        Ok(())
    }
}
