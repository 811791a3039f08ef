//! TLS fixtures: a throwaway CA with a server certificate for 127.0.0.1, and an
//! Elasticsearch front that terminates TLS and demands credentials (the stack's
//! ES-API servers speak plain HTTP without auth), forwarding to a real server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A CA and a server certificate it signed, as PEM files in a directory of their own.
pub struct TestCa {
    /// The directory.
    pub dir: PathBuf,
    /// The CA certificate (what a client trusts).
    pub ca_file: PathBuf,
    /// The server's certificate (for 127.0.0.1 and localhost).
    pub cert_file: PathBuf,
    /// The server's private key.
    pub key_file: PathBuf,
}

impl TestCa {
    /// Generate them.
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Sluice test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = server
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("server certificate");
        let dir = std::env::temp_dir().join(crate::unique("tls"));
        std::fs::create_dir_all(&dir).expect("TLS directory");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("writing a PEM file");
            path
        };
        Self {
            ca_file: write("ca.crt", ca_cert.pem()),
            cert_file: write("server.crt", cert.pem()),
            key_file: write("server.key", key.serialize_pem()),
            dir,
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_file(&self.cert_file).expect("server cert")];
        let key = PrivateKeyDer::from_pem_file(&self.key_file).expect("server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// An HTTPS front for an Elasticsearch server that accepts only the given
/// `Authorization` header values and answers anything else 401, as a secured cluster does.
pub struct SecuredEs {
    /// Its address (`https://127.0.0.1:PORT`).
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl SecuredEs {
    /// Serve on a free port, forwarding to `upstream` (plain HTTP).
    pub async fn start(ca: &TestCa, upstream: String, accepted: Vec<String>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let acceptor = ca.acceptor();
        let accepted = Arc::new(accepted);
        let client = reqwest::Client::new();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, accepted, client, upstream) = (
                    acceptor.clone(),
                    accepted.clone(),
                    client.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    // A client that does not trust the CA ends the handshake here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        forward(req, accepted.clone(), client.clone(), upstream.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://127.0.0.1:{}", addr.port()),
            task,
        }
    }
}

impl Drop for SecuredEs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    req: Request<hyper::body::Incoming>,
    accepted: Arc<Vec<String>>,
    client: reqwest::Client,
    upstream: String,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !accepted.contains(&auth) {
        let body = r#"{"error":{"type":"security_exception","reason":"missing authentication credentials"},"status":401}"#;
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = hyper::StatusCode::UNAUTHORIZED;
        resp.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let content_type = req.headers().get("content-type").cloned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = client
        .request(method, format!("{upstream}{path}"))
        .body(body);
    if let Some(ct) = content_type.and_then(|v| v.to_str().map(str::to_string).ok()) {
        out = out.header("content-type", ct);
    }
    let Ok(answer) = out.send().await else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"upstream down")));
        *resp.status_mut() = hyper::StatusCode::BAD_GATEWAY;
        return Ok(resp);
    };
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    for name in ["content-type", "x-elastic-product"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                resp.headers_mut().insert(name, v);
            }
        }
    }
    Ok(resp)
}
