//! Kafka's secured listeners, end to end on the stack's Apache Kafka: the whole pipeline
//! over SASL_SSL and SSL, and settings the brokers refuse named by `sluice check` and by
//! a process that starts with them. Skipped on brokers without TLS (noida-db, tansu).
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::path::PathBuf;
use std::process::{Command, Stdio};

use chrono::Utc;
use sluice::Config;
use sluice_core::config::{KafkaSecurity, SaslMechanism, SecurityProtocol};
use sluice_tests::running::Running;
use sluice_tests::scenario::{
    assert_exactly_once, audit_ok, create_topics, events, ids_of, pipeline_config, post_events,
    settle, stop_all,
};
use sluice_tests::{broker_is_noida, sluice_bin, stack_var, unique};

/// Whether the stack's broker has the secured listeners (Apache Kafka does).
fn secured_listeners() -> bool {
    let has = !broker_is_noida() && stack_var("SLUICE_STACK_BROKER") == "kafka";
    if !has {
        println!("skipped: the stack's broker has no TLS or SASL listeners");
    }
    has
}

/// SASL over TLS with `mechanism` and `password`, trusting `ca` (none: the system's CAs).
fn sasl_ssl(
    mechanism: SaslMechanism,
    password: &str,
    ca: Option<PathBuf>,
) -> (String, KafkaSecurity) {
    (
        stack_var("SLUICE_STACK_KAFKA_SASL_SSL"),
        KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(mechanism),
            username: Some(stack_var("SLUICE_STACK_KAFKA_USER")),
            password: Some(password.into()),
            ca_file: ca,
        },
    )
}

/// TLS without SASL, trusting `ca`.
fn ssl(ca: Option<PathBuf>) -> (String, KafkaSecurity) {
    (
        stack_var("SLUICE_STACK_KAFKA_SSL"),
        KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            ca_file: ca,
            ..Default::default()
        },
    )
}

fn stack_ca() -> Option<PathBuf> {
    Some(stack_var("SLUICE_STACK_KAFKA_CA").into())
}

fn password() -> String {
    stack_var("SLUICE_STACK_KAFKA_PASSWORD")
}

fn with(config: &Config, (brokers, security): (String, KafkaSecurity)) -> Config {
    let mut c = config.clone();
    c.kafka.brokers = brokers;
    c.kafka.security = security;
    c
}

/// HTTP ingest → parse → enrich → PostgreSQL and Elasticsearch, every client of Kafka
/// over a secured listener: ingest with SASL PLAIN, the stages with SCRAM-SHA-512, the
/// sinks with TLS alone. Every event arrives once in each sink (id sets), and the audit,
/// itself over SASL_SSL, accounts for every layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_sasl_ssl_and_ssl() {
    if !secured_listeners() {
        return;
    }
    let from = Utc::now() - chrono::Duration::seconds(5);
    let base = pipeline_config(&unique("sec")).await;
    let scram = with(
        &base,
        sasl_ssl(SaslMechanism::ScramSha512, &password(), stack_ca()),
    );
    let plain = with(
        &base,
        sasl_ssl(SaslMechanism::Plain, &password(), stack_ca()),
    );
    let tls = with(&base, ssl(stack_ca()));
    create_topics(&scram).await;
    let (addr, ingest) = Running::ingest(&plain).await;
    let tasks = vec![
        ingest,
        Running::stage(&scram, "parse"),
        Running::stage(&scram, "enrich"),
        Running::sink(&tls, "timescale"),
        Running::sink(&tls, "elasticsearch"),
    ];
    let events = events("sec", 3_000);
    let refused = post_events(addr, &events, 250, 2.0).await;
    assert_eq!(refused, 0, "ingest refused requests over SASL_SSL");
    settle(&scram).await;
    stop_all(tasks).await;
    assert_exactly_once(&scram, &ids_of(&events)).await;
    let report = audit_ok(&scram, from).await;
    let raw: usize = report.rows.iter().map(|r| r.raw).sum();
    assert_eq!(raw, events.len());
}

/// `sluice check --component parse` with `config`: its lines and whether it passed.
fn check(config: &Config) -> (String, bool) {
    let file = std::env::temp_dir().join(format!("{}.toml", unique("check")));
    std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    let out = Command::new(sluice_bin())
        .arg("--config")
        .arg(&file)
        .args(["check", "--component", "parse"])
        .env_remove("SLUICE_STACK_ENV")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    )
}

/// The `kafka` line of `sluice check`'s output.
fn kafka_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some("kafka"))
        .unwrap_or_else(|| panic!("no kafka line in {out}"))
}

/// Each setting the brokers refuse is one FAIL line of `sluice check` naming it; none is
/// reported as brokers that merely did not answer (the check's wait would then have run
/// out: the mismatch was recognised, not timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_settings_are_named_by_sluice_check() {
    if !secured_listeners() {
        return;
    }
    let base = sluice_tests::stack_config();
    let cases = [
        (
            "a wrong password",
            sasl_ssl(SaslMechanism::ScramSha512, "not-the-password", stack_ca()),
            "kafka.security.password",
            "Authentication failed",
        ),
        (
            "no CA (the system's CAs do not know the stack's)",
            sasl_ssl(SaslMechanism::ScramSha512, &password(), None),
            "kafka.security.ca_file",
            "certificate verify failed",
        ),
        (
            "a CA file that is not there",
            ssl(Some("/nonexistent/ca.pem".into())),
            "kafka.security.ca_file",
            "/nonexistent/ca.pem",
        ),
        (
            "a plaintext client on the TLS port",
            (
                stack_var("SLUICE_STACK_KAFKA_SSL"),
                KafkaSecurity::default(),
            ),
            "kafka.security.protocol",
            "plaintext does not match",
        ),
        (
            "a TLS client on the plaintext port",
            (base.kafka.brokers.clone(), ssl(stack_ca()).1),
            "kafka.security.protocol",
            "PLAINTEXT broker listener",
        ),
        (
            "SASL on the TLS-only port",
            (
                stack_var("SLUICE_STACK_KAFKA_SSL"),
                sasl_ssl(SaslMechanism::ScramSha512, &password(), stack_ca()).1,
            ),
            "kafka.security.protocol",
            "handshake failed",
        ),
    ];
    for (case, settings, key, words) in cases {
        let (out, ok) = check(&with(&base, settings));
        let line = kafka_line(&out);
        assert!(!ok, "{case}: sluice check passed:\n{out}");
        assert!(
            line.starts_with("FAIL") && line.contains(key) && line.contains(words),
            "{case}: wanted {key} ({words}), got: {line}"
        );
        assert!(
            !line.contains("did not answer"),
            "{case}: timed out: {line}"
        );
        println!("{case}: {line}");
    }
    let (out, ok) = check(&with(
        &base,
        sasl_ssl(SaslMechanism::ScramSha512, &password(), stack_ca()),
    ));
    assert!(kafka_line(&out).starts_with("ok"), "{out}");
    let _ = ok; // the topics of the default names need not exist
}

/// A stage started with a wrong password stops at once with the setting named, instead
/// of retrying the brokers for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_a_wrong_password_stops_naming_it() {
    if !secured_listeners() {
        return;
    }
    let mut config = with(
        &sluice_tests::stack_config(),
        sasl_ssl(SaslMechanism::ScramSha512, "not-the-password", stack_ca()),
    );
    config.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let file = std::env::temp_dir().join(format!("{}.toml", unique("badpw")));
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let out = Command::new(sluice_bin())
        .arg("--config")
        .arg(&file)
        .args(["stage", "parse"])
        .env_remove("SLUICE_STACK_ENV")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the stage ran: {stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("Error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error.contains("kafka.security.password") && error.contains("refused user"),
        "{error}"
    );
}
