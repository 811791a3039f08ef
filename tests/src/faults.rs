//! Faults a test injects: services of the shared stack stopped, started or frozen; a TCP
//! relay that takes a server away and brings it back; an HTTP proxy that refuses bulk
//! items the way a loaded Elasticsearch does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::stack_env_path;

/// Stop or start one service of the shared stack (`scripts/stack stop|start NAME`).
pub fn stack(action: &str, service: &str) {
    let dir = stack_env_path().parent().unwrap().to_path_buf();
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack"))
        .args([action, service])
        .env("SLUICE_STACK_DIR", dir)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/stack {action} {service}");
}

/// Signal a service of the shared stack by its PID (`kill -STOP`, `kill -CONT`).
pub fn signal_service(service: &str, signal: &str) {
    let pid_file = stack_env_path()
        .parent()
        .unwrap()
        .join("run")
        .join(format!("{service}.pid"));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let status = Command::new("kill")
        .args([signal, pid.trim()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {service}");
}

/// A TCP relay in front of a server that the test can take down (new connections are
/// refused and open ones cut, as when the server's process is gone) and bring back on the
/// same address.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    down: tokio::sync::watch::Sender<bool>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    /// A relay to `upstream`, up.
    pub async fn start(upstream: SocketAddr) -> Self {
        use tokio::net::{TcpListener, TcpStream};
        let (down, mut state) = tokio::sync::watch::channel(false);
        let mut open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = open.local_addr().unwrap();
        let watcher = state.clone();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                loop {
                    tokio::select! {
                        accepted = open.accept() => {
                            let Ok((mut inbound, _)) = accepted else { continue };
                            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let mut cut = watcher.clone();
                            tokio::spawn(async move {
                                let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                    _ = cut.wait_for(|down| *down) => {}
                                }
                            });
                        }
                        _ = state.wait_for(|down| *down) => break,
                    }
                }
                drop(open);
                if state.wait_for(|down| !*down).await.is_err() {
                    return;
                }
                open = TcpListener::bind(addr).await.unwrap();
            }
        });
        Self {
            addr,
            down,
            accepted,
        }
    }

    /// Connections it has accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Take the server away (refuse and cut connections), or bring it back.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

/// An HTTP proxy in front of the real ES-API server that refuses some `_bulk` items with
/// 429, as a loaded cluster does: those items are not forwarded, and the answer for them
/// says `es_rejected_execution_exception`. Each document is refused once at most.
pub struct RejectingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Items refused so far.
    pub rejected: Arc<AtomicU64>,
}

impl RejectingProxy {
    /// A proxy to `upstream` refusing about one item in `every` (each at most once).
    pub async fn start(upstream: String, every: u64) -> Self {
        use axum::body::Bytes;
        use axum::extract::State;
        use axum::http::{Method, Uri};
        #[derive(Clone)]
        struct Ctx {
            upstream: String,
            client: reqwest::Client,
            seen: Arc<std::sync::Mutex<BTreeSet<String>>>,
            rejected: Arc<AtomicU64>,
            counter: Arc<AtomicU64>,
            every: u64,
        }
        async fn forward(
            State(ctx): State<Ctx>,
            method: Method,
            uri: Uri,
            headers: axum::http::HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            use axum::response::IntoResponse;
            let is_bulk = uri.path().ends_with("/_bulk");
            let mut body = body.to_vec();
            // (position in the request, rejected item) of the items kept back.
            let mut kept_back: Vec<(usize, serde_json::Value)> = Vec::new();
            if is_bulk {
                let text = String::from_utf8_lossy(&body).to_string();
                let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
                let mut forwarded = String::new();
                for (i, pair) in lines.chunks(2).enumerate() {
                    let action: serde_json::Value = serde_json::from_str(pair[0]).unwrap();
                    let (op, meta) = action.as_object().unwrap().iter().next().unwrap();
                    let id = meta["_id"].as_str().unwrap_or_default().to_string();
                    let n = ctx.counter.fetch_add(1, Ordering::Relaxed);
                    let first_time = ctx.seen.lock().unwrap().insert(id.clone());
                    if first_time && n % ctx.every == 0 {
                        ctx.rejected.fetch_add(1, Ordering::Relaxed);
                        kept_back.push((i, serde_json::json!({op.clone(): {
                            "_index": meta["_index"], "_id": id, "status": 429,
                            "error": {"type": "es_rejected_execution_exception", "reason": "injected by the test proxy"}
                        }})));
                    } else {
                        forwarded += pair[0];
                        forwarded.push('\n');
                        if let Some(doc) = pair.get(1) {
                            forwarded += doc;
                            forwarded.push('\n');
                        }
                    }
                }
                if kept_back.is_empty() {
                    body = text.into_bytes();
                } else if forwarded.is_empty() {
                    let items: Vec<_> = kept_back.into_iter().map(|(_, v)| v).collect();
                    return axum::Json(
                        serde_json::json!({"took": 0, "errors": true, "items": items}),
                    )
                    .into_response();
                } else {
                    body = forwarded.into_bytes();
                }
            }
            let sent = relay(&ctx.client, &ctx.upstream, &uri, method, &headers, body).await;
            let (status, bytes) = match sent {
                Ok(answer) => answer,
                Err(e) => return (axum::http::StatusCode::BAD_GATEWAY, e).into_response(),
            };
            if is_bulk && !kept_back.is_empty() && status == 200 {
                let mut answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let mut items = answer["items"].as_array().cloned().unwrap_or_default();
                for (i, item) in kept_back {
                    items.insert(i.min(items.len()), item);
                }
                answer["items"] = serde_json::Value::Array(items);
                answer["errors"] = serde_json::Value::Bool(true);
                return axum::Json(answer).into_response();
            }
            es_answer(status, bytes)
        }
        let rejected = Arc::new(AtomicU64::new(0));
        let ctx = Ctx {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            seen: Default::default(),
            rejected: rejected.clone(),
            counter: Default::default(),
            every,
        };
        let addr = serve(axum::Router::new().fallback(forward).with_state(ctx)).await;
        Self { addr, rejected }
    }
}

/// An HTTP proxy in front of the real ES-API server that answers 413 to any request
/// body over `limit` bytes, as a cluster with `http.max_content_length` does.
pub struct SizeLimitProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Requests refused as too large so far.
    pub refused: Arc<AtomicU64>,
}

impl SizeLimitProxy {
    /// A proxy to `upstream` refusing bodies over `limit` bytes.
    pub async fn start(upstream: String, limit: usize) -> Self {
        use axum::body::Bytes;
        use axum::extract::State;
        use axum::http::{Method, Uri};
        use axum::response::IntoResponse;
        #[derive(Clone)]
        struct Ctx {
            upstream: String,
            client: reqwest::Client,
            refused: Arc<AtomicU64>,
            limit: usize,
        }
        async fn forward(
            State(ctx): State<Ctx>,
            method: Method,
            uri: Uri,
            headers: axum::http::HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            if body.len() > ctx.limit {
                ctx.refused.fetch_add(1, Ordering::Relaxed);
                return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, "").into_response();
            }
            match relay(
                &ctx.client,
                &ctx.upstream,
                &uri,
                method,
                &headers,
                body.to_vec(),
            )
            .await
            {
                Ok((status, bytes)) => es_answer(status, bytes),
                Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e).into_response(),
            }
        }
        let refused = Arc::new(AtomicU64::new(0));
        let ctx = Ctx {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            refused: refused.clone(),
            limit,
        };
        let addr = serve(
            axum::Router::new()
                .fallback(forward)
                .layer(axum::extract::DefaultBodyLimit::disable())
                .with_state(ctx),
        )
        .await;
        Self { addr, refused }
    }
}

/// Send a request for `uri` on to the ES-API server at `upstream` with the client's
/// headers (but its host and length); the answer's status and body.
async fn relay(
    client: &reqwest::Client,
    upstream: &str,
    uri: &axum::http::Uri,
    method: axum::http::Method,
    headers: &axum::http::HeaderMap,
    body: Vec<u8>,
) -> Result<(u16, axum::body::Bytes), String> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = client
        .request(method, format!("{upstream}{path}"))
        .body(body);
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.bytes().await.unwrap_or_default()))
}

/// An answer as the ES-API server gives it: its status and body, JSON, with the product
/// header the `elasticsearch` client checks.
fn es_answer(status: u16, body: axum::body::Bytes) -> axum::response::Response {
    let mut out = axum::response::Response::new(axum::body::Body::from(body));
    *out.status_mut() =
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    for (name, value) in [
        ("content-type", "application/json"),
        ("x-elastic-product", "Elasticsearch"),
    ] {
        out.headers_mut()
            .insert(name, axum::http::HeaderValue::from_static(value));
    }
    out
}

/// Serve `app` on a free loopback port; its address.
async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}
