//! TLS for the clients Sluice opens itself (PostgreSQL/TimescaleDB, the tenants table):
//! rustls with the system's roots plus an optional CA bundle. The server certificate is
//! always verified, chain and host name, whatever `sslmode` says: a connection that
//! encrypts to an unverified peer protects nothing against the attacker TLS is for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ClientConfig;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read or holds no PEM certificate.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate was refused by rustls.
    #[error("CA file {path}: {source}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// A PostgreSQL connection string is malformed.
    #[error("{0}")]
    PostgresUrl(String),
}

/// A client configuration trusting the system's roots and, if given, the certificates of
/// `ca_file` (PEM, one or more).
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: a private CA file may be all there is.
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let err = |reason: String| TlsError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::Certificate {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    // The ring provider by name: the dependency tree enables two, and rustls refuses to
    // guess between them.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Certificate {
            path: ca_file.map(Path::to_path_buf).unwrap_or_default(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// A PostgreSQL connection: its settings and a TLS connector. The URL may carry libpq's
/// `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and
/// `sslrootcert=FILE`; `ca_file` (a setting) takes precedence over `sslrootcert`. The
/// `verify-*` modes are `require` here, since every TLS connection is verified.
pub fn postgres(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<
    (
        tokio_postgres::Config,
        tokio_postgres_rustls::MakeRustlsConnect,
    ),
    TlsError,
> {
    let (url, root_cert) = libpq_tls_options(url);
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| TlsError::PostgresUrl(format!("database url: {e}")))?;
    let ca = ca_file.map(Path::to_path_buf).or(root_cert);
    let tls = client_config(ca.as_deref())?;
    Ok((config, tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
}

/// Take out of a URL's query what tokio-postgres does not parse: `sslrootcert`, and the
/// `verify-ca` / `verify-full` modes (turned into `require`).
fn libpq_tls_options(url: &str) -> (String, Option<PathBuf>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut root_cert = None;
    let kept: Vec<String> = query
        .split('&')
        .filter_map(|pair| match pair.split_once('=') {
            Some(("sslrootcert", file)) => {
                root_cert = Some(PathBuf::from(file));
                None
            }
            Some(("sslmode", "verify-ca" | "verify-full")) => Some("sslmode=require".into()),
            _ => Some(pair.to_string()),
        })
        .collect();
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, root_cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_options_are_translated() {
        let (url, ca) =
            libpq_tls_options("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&x=1");
        assert_eq!(url, "postgres://u@h/db?sslmode=require&x=1");
        assert_eq!(ca, Some(PathBuf::from("/ca.pem")));
        let (url, ca) = libpq_tls_options("postgres://u@h/db?sslrootcert=/ca.pem");
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            libpq_tls_options("postgres://u@h/db").0,
            "postgres://u@h/db"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_named() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("empty.pem");
        let _ = std::fs::write(&file, "not a certificate\n");
        let e = client_config(Some(&file)).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("empty.pem") && e.contains("no PEM")),
            "{e:?}"
        );
        let missing = client_config(Some(&dir.join("missing.pem")))
            .err()
            .map(|e| e.to_string());
        assert!(missing.is_some_and(|e| e.contains("missing.pem")));
    }
}
