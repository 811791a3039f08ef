//! The tenant directory the enrich stage looks tenants up in: a table in PostgreSQL,
//! loaded whole into memory and reloaded in the background (tenants are few and change
//! rarely). Entries are trusted for a TTL after the last successful load; past it, a
//! lookup is a transient failure (retried, then dead-lettered) rather than a silent miss.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sluice_core::failure::Failure;

/// What the directory knows of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenant {
    /// Display name.
    pub name: Option<String>,
    /// Plan (e.g. `free`, `enterprise`).
    pub plan: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Tenant>,
    loaded_at: Option<Instant>,
    last_error: Option<String>,
}

/// Tenants by id, with the time of their last successful load.
#[derive(Debug)]
pub struct TenantDirectory {
    ttl: Duration,
    state: RwLock<State>,
}

impl TenantDirectory {
    /// An empty directory whose loads stay valid for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: RwLock::default(),
        }
    }

    /// How long a load stays valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Replace the entries after a successful load.
    pub fn loaded(&self, entries: HashMap<String, Tenant>) {
        let mut s = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.entries = entries;
        s.loaded_at = Some(Instant::now());
        s.last_error = None;
    }

    /// The tenants listed, and the error of the last load if it failed.
    pub fn status(&self) -> (usize, Option<String>) {
        let s = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (s.entries.len(), s.last_error.clone())
    }

    /// Record a failed load; the entries stay valid until their TTL runs out.
    pub fn failed(&self, error: String) {
        let mut s = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.last_error = Some(error);
    }

    /// The tenant's entry (`None` for a tenant the directory does not list), or a
    /// transient failure while the directory is older than its TTL.
    pub fn lookup(&self, tenant: &str) -> Result<Option<Tenant>, Failure> {
        let s = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match s.loaded_at {
            Some(at) if at.elapsed() <= self.ttl => Ok(s.entries.get(tenant).cloned()),
            _ => Err(Failure::transient(
                "lookup",
                format!(
                    "tenant directory: no successful load within its TTL of {:?}{}",
                    self.ttl,
                    s.last_error
                        .as_deref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ),
            )),
        }
    }
}

/// The directory from the rows of the operator's `tenants_query` (id, name, plan). A row
/// whose id is NULL names no tenant and is skipped; a column of the wrong type fails the
/// load, naming it.
fn entries(rows: &[tokio_postgres::Row]) -> Result<HashMap<String, Tenant>, String> {
    let column = |i: usize, what: &str, e: tokio_postgres::Error| {
        format!("enrich.tenants_query: column {} ({what}): {e}", i + 1)
    };
    let mut out = HashMap::with_capacity(rows.len());
    let mut nameless = 0;
    for r in rows {
        let Some(id) = r
            .try_get::<_, Option<String>>(0)
            .map_err(|e| column(0, "tenant id", e))?
        else {
            nameless += 1;
            continue;
        };
        let tenant = Tenant {
            name: r.try_get(1).map_err(|e| column(1, "name", e))?,
            plan: r.try_get(2).map_err(|e| column(2, "plan", e))?,
        };
        out.insert(id, tenant);
    }
    if nameless > 0 {
        tracing::warn!(
            rows = nameless,
            "tenant directory rows with a NULL id skipped"
        );
    }
    Ok(out)
}

/// Load the directory from `url` with `query` once; a failure is logged and recorded
/// (lookups fail transiently once the last good load is older than the TTL).
pub async fn load(url: &str, query: &str, directory: &TenantDirectory) {
    let load = async {
        // TLS as the URL asks (`sslmode`, `sslrootcert`), verified.
        let (config, tls) = sluice_core::tls::postgres(url, None).map_err(|e| e.to_string())?;
        let (client, connection) = config.connect(tls).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let rows = client.query(query, &[]).await.map_err(|e| e.to_string())?;
        entries(&rows)
    };
    match tokio::time::timeout(Duration::from_secs(10), load).await {
        Ok(Ok(entries)) => directory.loaded(entries),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "tenant directory load failed");
            directory.failed(e);
        }
        Err(_) => {
            tracing::warn!("tenant directory load timed out");
            directory.failed("timed out after 10 s".into());
        }
    }
}

/// Reload the directory every half TTL until `shutdown`.
pub async fn refresh(
    url: String,
    query: String,
    directory: std::sync::Arc<TenantDirectory>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let every = (directory.ttl() / 2).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => load(&url, &query, &directory).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_stale_and_unknown() {
        let dir = TenantDirectory::new(Duration::from_millis(50));
        let err = dir.lookup("acme").unwrap_err();
        assert!(err.transient && err.class == "lookup", "{err:?}");
        let acme = Tenant {
            name: Some("Acme".into()),
            plan: Some("pro".into()),
        };
        dir.loaded(HashMap::from([("acme".to_string(), acme.clone())]));
        assert_eq!(dir.lookup("acme").unwrap(), Some(acme));
        assert_eq!(dir.lookup("other").unwrap(), None);
        dir.failed("connection refused".into());
        std::thread::sleep(Duration::from_millis(60));
        let err = dir.lookup("acme").unwrap_err();
        assert!(err.reason.contains("connection refused"), "{err}");
    }
}
