//! Helpers of the integration tests: the configuration of the local stack started by
//! `scripts/stack up`, and unique names so tests do not see each other's data.

// Test support: a failed set-up step should stop the test with its message.
#![allow(clippy::unwrap_used)]

pub mod faults;
pub mod process;
pub mod registry;
pub mod running;
pub mod scenario;
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

/// Whether the stack's broker is noida-db (`SLUICE_BROKER=noida`) rather than Apache
/// Kafka. Its group-coordination gaps (docs/reliability.md) need the workarounds of
/// [`noida_group_workarounds`].
pub fn broker_is_noida() -> bool {
    stack_var("SLUICE_STACK_BROKER") == "noida"
}

/// On noida-db only, the consumer settings its group coordinator needs
/// (docs/reliability.md): the eager protocol, because it never completes
/// cooperative-sticky's second round and stalls after a static member is replaced; and a
/// 15 s rebalance timeout, because it never expires a member that left without telling
/// it. Apache Kafka keeps Sluice's defaults.
pub fn noida_group_workarounds(consumer: &mut std::collections::BTreeMap<String, String>) {
    if broker_is_noida() {
        consumer.insert("partition.assignment.strategy".into(), "roundrobin".into());
        consumer.insert("max.poll.interval.ms".into(), "15000".into());
    }
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

/// A Kafka broker of a test's own on free ports, for tests that stop, kill, pause and
/// restart the broker without disturbing the shared one: Apache Kafka (one KRaft node,
/// through `scripts/kafka-broker`) or, when the stack runs noida-db, noida-db. Killed on
/// drop.
pub struct PrivateBroker {
    child: Option<std::process::Child>,
    port: u16,
    dir: PathBuf,
    apache: bool,
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `scripts/kafka-broker` with the stack's tools folder.
fn kafka_broker_script() -> std::process::Command {
    let mut c = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/kafka-broker"
    ));
    c.env("SLUICE_TOOLS_DIR", stack_var("SLUICE_STACK_TOOLS_DIR"));
    c
}

impl PrivateBroker {
    /// Start a broker with an empty data dir.
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("sluice-broker-"));
        std::fs::create_dir_all(&dir).unwrap();
        let apache = stack_var("SLUICE_STACK_BROKER") == "kafka";
        if apache {
            let out = kafka_broker_script()
                .arg("init")
                .arg(&dir)
                .arg(port.to_string())
                .arg(free_port().to_string())
                .output()
                .expect("running scripts/kafka-broker init");
            assert!(
                out.status.success(),
                "scripts/kafka-broker init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut b = Self {
            child: None,
            port,
            dir,
            apache,
        };
        b.restart();
        b
    }

    /// `bootstrap.servers` of this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stop the broker (SIGTERM: a controlled shutdown) and wait for it to exit.
    pub fn stop(&mut self) {
        self.signal_and_reap("TERM", std::time::Duration::from_secs(30));
    }

    /// Kill the broker (SIGKILL: no controlled shutdown, no flush) and reap it.
    pub fn kill9(&mut self) {
        self.signal_and_reap("KILL", std::time::Duration::from_secs(10));
    }

    /// Freeze the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Let a frozen broker go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{name}"), &pid.to_string()])
                .status();
        }
    }

    fn signal_and_reap(&mut self, name: &str, wait: std::time::Duration) {
        self.signal("CONT");
        self.signal(name);
        if let Some(mut child) = self.child.take() {
            let deadline = std::time::Instant::now() + wait;
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

    /// Start (again) on the same port and data dir, and wait until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .unwrap();
        let mut command = if self.apache {
            let mut c = kafka_broker_script();
            c.arg("run").arg(&self.dir);
            c
        } else {
            let mut c = std::process::Command::new(stack_var("SLUICE_STACK_NOIDA_BIN"));
            c.args(["start", "--only", "kafka", "--host", "127.0.0.1"])
                .arg("--kafka-port")
                .arg(self.port.to_string())
                .arg("--data-dir")
                .arg(self.dir.join("data"));
            c
        };
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the private broker");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private broker did not listen; log: {}",
                self.dir.join("broker.log").display()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if self.apache {
            let out = kafka_broker_script()
                .args(["ready", &self.brokers(), "60"])
                .output()
                .expect("running scripts/kafka-broker ready");
            assert!(
                out.status.success(),
                "private broker not ready: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill9();
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

/// The text a `/metrics` endpoint at `addr` serves; `None` when it does not answer.
pub async fn metrics_text(addr: std::net::SocketAddr) -> Option<String> {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// A memory figure of a process from `/proc/<pid>/status` (`pid` "self" for this one),
/// such as `VmRSS` or `VmHWM`, in MiB; 0 when it cannot be read.
pub fn proc_memory_mib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
