//! **Test fixture, not part of Sluice:** a small in-memory server speaking the subset of
//! the Confluent Schema Registry REST API that registry mode uses, because no real
//! registry can be installed on these machines. It keeps schemas in memory, gives a
//! schema the same id under every subject (as Confluent does), enforces the subject's
//! compatibility level (BACKWARD by default) with Apache Avro's own resolution rules, and
//! counts requests so tests can see the caching.
//!
//! Endpoints: `POST /subjects/{s}/versions`, `POST /compatibility/subjects/{s}/versions`
//! (and `/versions/latest`), `GET /schemas/ids/{id}`, `GET /subjects`,
//! `GET /subjects/{s}/versions`, `GET /subjects/{s}/versions/{v|latest}`,
//! `PUT /config/{s}`. Errors use the registry's `{"error_code", "message"}` bodies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Store {
    /// Schema text by id (ids start at 1).
    schemas: Vec<String>,
    /// Id of each canonical form.
    ids: HashMap<String, u32>,
    /// Ids of each subject's versions, oldest first.
    subjects: HashMap<String, Vec<u32>>,
    /// Compatibility level of each subject that set one.
    levels: HashMap<String, String>,
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    lookups_by_id: AtomicU64,
}

/// A running fixture registry; stops on drop.
pub struct RegistryFixture {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for RegistryFixture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

fn parse(body: &Value) -> Result<Schema, Box<Response>> {
    let text = body.get("schema").and_then(Value::as_str).unwrap_or("");
    Schema::parse_str(text).map_err(|e| {
        Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {e}"),
        ))
    })
}

impl Store {
    /// Add `text` as the next version of `subject`; its id is the one it already has
    /// under any subject, or a new one.
    fn add(&mut self, subject: &str, text: &str, canonical: String) -> u32 {
        let id = match self.ids.get(&canonical) {
            Some(&id) => id,
            None => {
                self.schemas.push(text.to_string());
                let id = self.schemas.len() as u32;
                self.ids.insert(canonical, id);
                id
            }
        };
        self.subjects
            .entry(subject.to_string())
            .or_default()
            .push(id);
        id
    }

    fn schema(&self, id: u32) -> Option<Schema> {
        let text = self.schemas.get(id.checked_sub(1)? as usize)?;
        Schema::parse_str(text).ok()
    }

    /// Whether `candidate` may join `subject` under its level.
    fn compatible(&self, subject: &str, candidate: &Schema) -> bool {
        let level = self
            .levels
            .get(subject)
            .map_or("BACKWARD", String::as_str)
            .to_string();
        let versions = self.subjects.get(subject).cloned().unwrap_or_default();
        let against: Vec<u32> = match level.as_str() {
            "NONE" => return true,
            l if l.ends_with("_TRANSITIVE") => versions,
            _ => versions.last().copied().into_iter().collect(),
        };
        against
            .into_iter()
            .filter_map(|id| self.schema(id))
            .all(|old| {
                let backward = SchemaCompatibility::can_read(&old, candidate).is_ok();
                let forward = SchemaCompatibility::can_read(candidate, &old).is_ok();
                match level.trim_end_matches("_TRANSITIVE") {
                    "FORWARD" => forward,
                    "FULL" => backward && forward,
                    _ => backward,
                }
            })
    }
}

async fn register(
    State(s): State<Arc<Shared>>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let schema = match parse(&body) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let canonical = schema.canonical_form();
    let mut store = s.store.lock().unwrap();
    if let Some(&id) = store.ids.get(&canonical) {
        if store
            .subjects
            .get(&subject)
            .is_some_and(|v| v.contains(&id))
        {
            return Json(json!({"id": id})).into_response();
        }
    }
    if !store.compatible(&subject, &schema) {
        return error(
            StatusCode::CONFLICT,
            409,
            "Schema being registered is incompatible with an earlier schema for subject",
        );
    }
    let id = store.add(&subject, body["schema"].as_str().unwrap_or(""), canonical);
    Json(json!({"id": id})).into_response()
}

async fn compatibility(
    State(s): State<Arc<Shared>>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let schema = match parse(&body) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let store = s.store.lock().unwrap();
    if !store.subjects.contains_key(&subject) {
        return error(StatusCode::NOT_FOUND, 40401, "Subject not found.");
    }
    Json(json!({"is_compatible": store.compatible(&subject, &schema)})).into_response()
}

async fn compatibility_latest(
    state: State<Arc<Shared>>,
    Path((subject, _version)): Path<(String, String)>,
    body: Json<Value>,
) -> Response {
    compatibility(state, Path(subject), body).await
}

async fn by_id(State(s): State<Arc<Shared>>, Path(id): Path<u32>) -> Response {
    s.lookups_by_id.fetch_add(1, Ordering::Relaxed);
    let store = s.store.lock().unwrap();
    match id
        .checked_sub(1)
        .and_then(|i| store.schemas.get(i as usize))
    {
        Some(text) => Json(json!({"schema": text})).into_response(),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}

async fn subjects(State(s): State<Arc<Shared>>) -> Response {
    let store = s.store.lock().unwrap();
    let mut names: Vec<&String> = store.subjects.keys().collect();
    names.sort();
    Json(json!(names)).into_response()
}

async fn versions(State(s): State<Arc<Shared>>, Path(subject): Path<String>) -> Response {
    let store = s.store.lock().unwrap();
    match store.subjects.get(&subject) {
        Some(v) => Json(json!((1..=v.len()).collect::<Vec<_>>())).into_response(),
        None => error(StatusCode::NOT_FOUND, 40401, "Subject not found."),
    }
}

async fn version(
    State(s): State<Arc<Shared>>,
    Path((subject, version)): Path<(String, String)>,
) -> Response {
    let store = s.store.lock().unwrap();
    let Some(ids) = store.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, "Subject not found.");
    };
    let n = match version.as_str() {
        "latest" | "-1" => ids.len(),
        v => v.parse().unwrap_or(0),
    };
    match n.checked_sub(1).and_then(|i| ids.get(i)) {
        Some(&id) => Json(json!({
            "subject": subject,
            "version": n,
            "id": id,
            "schema": store.schemas[id as usize - 1],
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, 40402, "Version not found."),
    }
}

async fn set_level(
    State(s): State<Arc<Shared>>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let level = body["compatibility"]
        .as_str()
        .unwrap_or("BACKWARD")
        .to_string();
    s.store
        .lock()
        .unwrap()
        .levels
        .insert(subject, level.clone());
    Json(json!({"compatibility": level})).into_response()
}

impl RegistryFixture {
    /// Start on a free loopback port, on a thread and runtime of its own: a codec's
    /// schema lookup blocks its caller, which may be the test's own runtime thread.
    pub fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/subjects", get(subjects))
            .route("/subjects/{subject}/versions", post(register).get(versions))
            .route("/subjects/{subject}/versions/{version}", get(version))
            .route(
                "/compatibility/subjects/{subject}/versions",
                post(compatibility),
            )
            .route(
                "/compatibility/subjects/{subject}/versions/{version}",
                post(compatibility_latest),
            )
            .route("/schemas/ids/{id}", get(by_id))
            .route("/config/{subject}", put(set_level))
            .with_state(shared.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(s.cancelled_owned())
                    .await
            })
        });
        Self { addr, shared, stop }
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET /schemas/ids/{id}` requests served so far.
    pub fn lookups_by_id(&self) -> u64 {
        self.shared.lookups_by_id.load(Ordering::Relaxed)
    }

    /// The ids registered under `subject`, oldest first.
    pub fn ids(&self, subject: &str) -> Vec<u32> {
        let store = self.shared.store.lock().unwrap();
        store.subjects.get(subject).cloned().unwrap_or_default()
    }

    /// Register `schema` under `subject` directly (a producer outside Sluice).
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        let canonical = Schema::parse_str(schema).unwrap().canonical_form();
        self.shared
            .store
            .lock()
            .unwrap()
            .add(subject, schema, canonical)
    }
}
