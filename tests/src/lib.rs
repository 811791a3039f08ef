//! Helpers of the integration tests: the configuration of the local stack started by
//! `scripts/stack up`, and unique names so tests do not see each other's data.

// Test support: a failed set-up step should stop the test with its message.
#![allow(clippy::unwrap_used)]

pub mod faults;
pub mod process;
pub mod registry_fixture;
pub mod running;
pub mod tls;

use std::path::PathBuf;

use rdkafka::message::{Header, OwnedHeaders};

use sluice::components::{self, Component, Kind};
use sluice::Config;
use sluice_core::config::parse_env_lines;

/// The stack settings file: `SLUICE_STACK_ENV`, or `<repo>/.stack/stack.env`.
pub fn stack_env_path() -> PathBuf {
    std::env::var_os("SLUICE_STACK_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/stack.env"))
        })
}

/// The stack settings (`KEY=VALUE` pairs).
pub fn stack_vars() -> Vec<(String, String)> {
    let path = stack_env_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}. Start the services first: scripts/stack up",
            path.display()
        )
    });
    parse_env_lines(&text)
}

/// One stack setting, e.g. `SLUICE_STACK_PG_URL`.
pub fn stack_var(name: &str) -> String {
    stack_vars()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{name} is not in {}", stack_env_path().display()))
}

/// The configuration pointing at the local stack (no config file, no process env).
pub fn stack_config() -> Config {
    Config::load_with(None, stack_vars()).expect("stack settings make a valid config")
}

/// The stage named `name` in the registry.
pub fn stage(name: &str) -> &'static Component {
    components::find(Kind::Stage, name).unwrap_or_else(|| panic!("no stage {name}"))
}

/// The sink named `name` in the registry.
pub fn sink(name: &str) -> &'static Component {
    components::find(Kind::Sink, name).unwrap_or_else(|| panic!("no sink {name}"))
}

/// Create every topic of the pipeline in `config` that does not exist yet.
pub async fn create_topics(config: &Config) {
    sluice_core::kafka::ensure_topics(&config.kafka, &config.topics, &components::topics(config))
        .await
        .unwrap();
}

/// A short unique suffix for names of topics, groups, schemas and indices.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..10])
}

/// A Kafka broker of a test's own (noida-db on a free port), for tests that stop and
/// restart the broker without disturbing the shared one. Killed on drop.
pub struct PrivateBroker {
    child: Option<std::process::Child>,
    port: u16,
    dir: PathBuf,
}

impl PrivateBroker {
    /// Start a broker with an empty data dir.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("sluice-broker-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Self {
            child: None,
            port,
            dir,
        };
        b.restart();
        b
    }

    /// `bootstrap.servers` of this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop the broker (SIGTERM; it saves its data) and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start (again) on the same port and data dir, and wait until it listens.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.join("broker.log")).unwrap();
        let child = std::process::Command::new(stack_var("SLUICE_STACK_NOIDA_BIN"))
            .args([
                "start",
                "--only",
                "kafka",
                "--host",
                "127.0.0.1",
                "--kafka-port",
            ])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting noida-db");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private broker did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An enriched event for sink tests: `i` makes the id, `at` is the event time.
pub fn enriched(
    i: usize,
    tenant: &str,
    user: &str,
    kind: &str,
    url: &str,
    at: &str,
) -> sluice_schemas::EnrichedEvent {
    let ms = chrono::DateTime::parse_from_rfc3339(at)
        .unwrap()
        .timestamp_millis();
    sluice_schemas::EnrichedEvent::from_click(sluice_schemas::ClickEvent {
        event_id: format!("ev-{i}"),
        tenant: tenant.into(),
        user_id: user.into(),
        session_id: Some(format!("{user}-s")),
        event_type: kind.into(),
        url: Some(url.into()),
        referrer: None,
        event_time: ms,
        received_at: ms + 100,
        user_agent: None,
        ip: None,
        extra: Default::default(),
    })
}

/// Produce enriched events (Avro single-object) to `topic` and wait for the acks.
pub async fn produce_enriched(
    config: &Config,
    topic: &str,
    events: &[sluice_schemas::EnrichedEvent],
) {
    let unversioned: Vec<_> = events.iter().map(|e| (e.clone(), None)).collect();
    produce_versioned(config, topic, &unversioned).await;
}

/// Produce enriched events, each with its processing stamp when given (as the enrich
/// stage stamps it), and wait for the acks.
pub async fn produce_versioned(
    config: &Config,
    topic: &str,
    events: &[(sluice_schemas::EnrichedEvent, Option<i64>)],
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    let mut acks = Vec::new();
    for (e, version) in events {
        let payload = sluice_schemas::ENRICHED_EVENTS.encode(e).unwrap();
        let key = format!("{}:{}", e.tenant, e.user_id);
        let stamp = version.map(|v| sluice_core::headers::stamp(OwnedHeaders::new(), v, None));
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        if let Some(h) = stamp {
            record = record.headers(h);
        }
        loop {
            match producer.send_result(record) {
                Ok(ack) => break acks.push(ack),
                // A large set outruns the producer's queue: wait for room.
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
}

/// A sink running in the background until [`RunningSink::stop`].
pub struct RunningSink {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<sluice::components::RunStats>>,
}

impl RunningSink {
    /// Start `sink` with `config`.
    pub fn start(config: &Config, sink: &'static Component) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let (c, s) = (config.clone(), stop.clone());
        let task = tokio::spawn(async move { sink.run(&c, s).await });
        Self { stop, task }
    }

    /// Wait until it committed everything of `group` on `topic`; fail at once, with the
    /// sink's own error, if it stopped.
    pub async fn caught_up(&mut self, config: &Config, group: &str, topic: &str) {
        tokio::select! {
            _ = caught_up(config, group, topic) => {}
            r = &mut self.task => panic!("sink stopped early: {:?}", r.map(|r| r.map_err(|e| format!("{e:#}")))),
        }
    }

    /// Stop it and return what it did.
    pub async fn stop(self) -> sluice::components::RunStats {
        self.stop.cancel();
        self.task.await.unwrap().unwrap()
    }
}

/// The offsets `group` committed on `topic`, by partition (0 where none).
pub async fn committed(
    config: &Config,
    group: &str,
    topic: &str,
) -> std::collections::HashMap<i32, i64> {
    let (k, g, t) = (config.kafka.clone(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || sluice_core::kafka::committed_offsets(&k, &g, &t))
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .collect()
}

/// Wait until `group` committed everything on `topic` (two minutes at most).
pub async fn caught_up(config: &Config, group: &str, topic: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (k, g, t) = (config.kafka.clone(), group.to_string(), topic.to_string());
        let lag = tokio::task::spawn_blocking(move || sluice_core::kafka::lag(&k, &g, &t))
            .await
            .unwrap()
            .unwrap();
        if lag <= 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "group {group} still has {lag} records to process on {topic}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// How many events each sink that holds events holds, by sink name (every ingest time).
pub async fn stored_counts(config: &Config) -> Vec<(&'static str, usize)> {
    let all = sluice_sinks::Selection::Received {
        from: 0,
        to: i64::MAX,
        tenant: None,
    };
    let mut out = Vec::new();
    for sink in components::event_sinks() {
        let read = sink.read_stored.unwrap();
        out.push((
            sink.name,
            read(config.clone(), all.clone(), false)
                .await
                .unwrap()
                .len(),
        ));
    }
    out
}

/// Records on a dead-letter topic.
pub async fn dead_letters(config: &Config, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        sluice_core::kafka::read_all(&k, &t, std::time::Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap()
}

/// Give `config` its own enriched topic (created), groups, schema and index prefix.
pub async fn sink_namespace(config: &mut Config, name: &str) {
    *config = config.clone().namespaced(&format!("t-{name}"), name);
    let t = &config.topics;
    let topics = vec![
        (t.enriched.clone(), "3600000".to_string()),
        (t.dlq(&t.enriched), "3600000".to_string()),
    ];
    sluice_core::kafka::create_topics(&config.kafka, 3, 1, &topics)
        .await
        .unwrap();
}

/// The `sluice` binary next to the test executable (`cargo test --workspace` builds it).
pub fn sluice_bin() -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/sluice
    let exe = std::env::current_exe().expect("the test executable's path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("sluice"))
        .expect("target/<profile>/deps layout");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p sluice` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// The headers ingest stamps on a raw record (tenant, event id, receipt time), for tests
/// that write raw records directly.
pub fn raw_headers(tenant: &str, event_id: &str, received_at_ms: &str) -> OwnedHeaders {
    use sluice_core::headers;
    OwnedHeaders::new()
        .insert(Header {
            key: headers::TENANT,
            value: Some(tenant),
        })
        .insert(Header {
            key: headers::EVENT_ID,
            value: Some(event_id),
        })
        .insert(Header {
            key: headers::RECEIVED_AT_MS,
            value: Some(received_at_ms),
        })
}

/// Make `client` fail for good, as librdkafka does when the broker lost an idempotent
/// producer's sequence state, through librdkafka's own fault-injection hook.
#[allow(unsafe_code)]
pub fn inject_fatal_error<C: rdkafka::ClientContext>(client: &rdkafka::client::Client<C>) {
    use rdkafka::bindings::{rd_kafka_resp_err_t, rd_kafka_test_fatal_error};
    let reason = std::ffi::CString::new("injected by a test").unwrap();
    // SAFETY: `client` outlives the call, and librdkafka copies `reason`.
    let rc = unsafe {
        rd_kafka_test_fatal_error(
            client.native_ptr(),
            rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(rc, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
}
