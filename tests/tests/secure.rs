//! Secured destinations: PostgreSQL that accepts only verified TLS with a password, and
//! an Elasticsearch API behind TLS that demands credentials. The sinks write through
//! both; a connection that does not trust the CA fails with a message that says so.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use sluice::Config;
use sluice_sinks::timescale::config::DbMode;
use sluice_tests::tls::{SecuredEs, TestCa};
use sluice_tests::{
    enriched, produce_enriched, sink, sink_namespace, stack_config, stack_var, unique, RunningSink,
};

/// A private PostgreSQL 15 with `ssl=on` and only `hostssl … scram-sha-256` access.
struct TlsPostgres {
    dir: PathBuf,
    port: u16,
}

impl TlsPostgres {
    const PASSWORD: &'static str = "pg@pw-1";

    fn start(ca: &TestCa) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = ca.dir.join("pg");
        let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/pg-tls"))
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .arg(&ca.cert_file)
            .arg(&ca.key_file)
            .arg(Self::PASSWORD)
            .status()
            .unwrap();
        assert!(status.success(), "the TLS PostgreSQL did not start");
        Self { dir, port }
    }

    /// The URL, the password percent-encoded (it holds an `@`).
    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres:pg%40pw-1@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/pg-tls"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn events(n: usize) -> Vec<sluice_schemas::EnrichedEvent> {
    (0..n)
        .map(|i| enriched(i, "acme", "u1", "page_view", "/p", "2026-11-30T10:00:00Z"))
        .collect()
}

/// The event ids `name` holds.
async fn stored(config: &Config, name: &str) -> BTreeSet<String> {
    let all = sluice_sinks::Selection::Received {
        from: 0,
        to: i64::MAX,
        tenant: None,
    };
    let read = sink(name).read_stored.unwrap();
    read(config.clone(), all, false)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.event_id)
        .collect()
}

fn ids(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("ev-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_sink_writes_over_verified_tls_only() {
    let ca = TestCa::generate();
    let pg = TlsPostgres::start(&ca);
    let mut config = stack_config();
    sink_namespace(&mut config, &unique("tlspg")).await;
    config.timescale.mode = DbMode::Postgres;

    // Without the CA the certificate is not trusted, and the error says what to set.
    config.timescale.url = pg.url("sslmode=require");
    let e = sluice_sinks::timescale::check(&config.timescale)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate") && e.contains("timescale.ca_file"),
        "{e}"
    );
    // Without TLS the server refuses (hostssl only): the connection really is TLS.
    config.timescale.url = pg.url("sslmode=disable");
    config.timescale.ca_file = Some(ca.ca_file.clone());
    let e = sluice_sinks::timescale::check(&config.timescale)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no pg_hba.conf entry"), "{e}");
    // libpq's spelling works too: verify-full and sslrootcert in the URL.
    config.timescale.ca_file = None;
    config.timescale.url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.ca_file.display()
    ));
    let found = sluice_sinks::timescale::check(&config.timescale)
        .await
        .unwrap();
    assert!(found.contains("PostgreSQL 15"), "{found}");

    // The sink itself, through TLS: every event stored.
    config.timescale.ca_file = Some(ca.ca_file.clone());
    config.timescale.url = pg.url("sslmode=require");
    produce_enriched(&config, &config.topics.enriched, &events(50)).await;
    let mut running = RunningSink::start(&config, sink("timescale"));
    running
        .caught_up(&config, &config.timescale.group, &config.topics.enriched)
        .await;
    running.stop().await;
    assert_eq!(stored(&config, "timescale").await, ids(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_sink_authenticates_over_verified_tls() {
    use base64::Engine;
    let ca = TestCa::generate();
    let basic = base64::engine::general_purpose::STANDARD.encode("elastic:es@pw-2");
    let api_key = base64::engine::general_purpose::STANDARD.encode("key-id:key-secret");
    let es = SecuredEs::start(
        &ca,
        stack_var("SLUICE__ELASTICSEARCH__URL"),
        vec![format!("Basic {basic}"), format!("ApiKey {api_key}")],
    )
    .await;
    let mut config = stack_config();
    sink_namespace(&mut config, &unique("tlses")).await;
    let settings = |f: &dyn Fn(&mut sluice_sinks::elasticsearch::config::ElasticsearchConfig)| {
        let mut c = config.elasticsearch.clone();
        c.url = es.url.clone();
        c.ca_file = Some(ca.ca_file.clone());
        c.request_timeout_ms = 5_000;
        f(&mut c);
        c
    };
    let check = |c| async move { sluice_sinks::elasticsearch::check(&c).await };

    // Not trusting the CA: the handshake fails, and the error says it is the certificate.
    let e = check(settings(&|c| {
        c.ca_file = None;
        c.username = Some("elastic".into());
        c.password = Some("es@pw-2".into());
    }))
    .await
    .unwrap_err();
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    // No or wrong credentials: 401 from the cluster.
    let e = check(settings(&|_| {})).await.unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");
    let e = check(settings(&|c| c.bearer_token = Some("nope".into())))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");
    // Basic auth (settings, or in the URL with the @ percent-encoded) and an API key.
    check(settings(&|c| {
        c.username = Some("elastic".into());
        c.password = Some("es@pw-2".into());
    }))
    .await
    .unwrap();
    check(settings(&|c| {
        c.url = c.url.replace("https://", "https://elastic:es%40pw-2@");
    }))
    .await
    .unwrap();
    check(settings(&|c| c.api_key = Some(api_key.clone().into())))
        .await
        .unwrap();

    // The sink itself, with the API key: every event indexed.
    config.elasticsearch = settings(&|c| c.api_key = Some(api_key.clone().into()));
    produce_enriched(&config, &config.topics.enriched, &events(40)).await;
    let mut running = RunningSink::start(&config, sink("elasticsearch"));
    running
        .caught_up(
            &config,
            &config.elasticsearch.group,
            &config.topics.enriched,
        )
        .await;
    running.stop().await;
    assert_eq!(stored(&config, "elasticsearch").await, ids(40));
}
