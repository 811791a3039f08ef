//! The object store behind the archive: S3 (or an S3-compatible store) or a local
//! directory, through `object_store`.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore};

use super::config::ArchiveConfig;
use super::ArchiveError;

/// An archive: its store and the prefix its files live under.
#[derive(Debug, Clone)]
pub struct Archive {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside it (empty: the store's root).
    pub prefix: Path,
    /// The URL, for messages.
    pub url: String,
}

/// Open the archive `config` names. A local directory is created when missing.
pub fn open(config: &ArchiveConfig) -> Result<Archive, ArchiveError> {
    let bad = |why: String| ArchiveError::Url(format!("archive.url {:?}: {why}", config.url));
    let url = url::Url::parse(&config.url).map_err(|e| bad(e.to_string()))?;
    match url.scheme() {
        "file" => {
            let dir = url.to_file_path().map_err(|()| {
                bad("expected an absolute path such as file:///var/lib/sluice/archive".into())
            })?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
            let store = LocalFileSystem::new_with_prefix(&dir)?;
            Ok(Archive {
                store: Arc::new(store),
                prefix: Path::default(),
                url: config.url.clone(),
            })
        }
        "s3" => {
            let bucket = url
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("expected s3://BUCKET/PREFIX".into()))?;
            let options = ClientOptions::new()
                .with_timeout(Duration::from_millis(config.request_timeout_ms.max(1)))
                .with_allow_http(config.allow_http);
            // The environment first (AWS_* variables, web identity as IRSA sets it up),
            // then what the settings say.
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_region(&config.region)
                .with_virtual_hosted_style_request(!config.path_style)
                .with_client_options(options);
            if let Some(endpoint) = &config.endpoint {
                b = b.with_endpoint(endpoint);
            }
            if let Some(id) = &config.access_key_id {
                b = b.with_access_key_id(id);
            }
            if let Some(secret) = &config.secret_access_key {
                b = b.with_secret_access_key(secret.expose());
            }
            if let Some(token) = &config.session_token {
                b = b.with_token(token.expose());
            }
            Ok(Archive {
                store: Arc::new(b.build()?),
                prefix: Path::parse(url.path().trim_matches('/'))
                    .map_err(|e| bad(e.to_string()))?,
                url: config.url.clone(),
            })
        }
        other => Err(bad(format!(
            "`{other}://` is not supported: use file:// or s3://"
        ))),
    }
}

impl Archive {
    /// Check that the store answers (the bucket exists, the credentials are good).
    pub async fn check(&self) -> Result<(), ArchiveError> {
        use futures::StreamExt;
        let mut listing = self.store.list(Some(&self.prefix));
        match listing.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
        }
    }
}
