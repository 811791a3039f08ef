//! Reaching the brokers once, before a process starts its work: a metadata request whose
//! failure names the setting to fix (a refused password, an untrusted certificate, a
//! protocol the listener does not speak). Left alone, librdkafka retries such failures
//! for ever and the process only logs them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;

/// Why the brokers could not be used, naming the setting to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// SASL authentication was refused.
    #[error("kafka.security.password: the brokers at {brokers} refused user {user} ({mechanism}): {reason}")]
    Authentication {
        /// `kafka.brokers`.
        brokers: String,
        /// `kafka.security.username`.
        user: String,
        /// `kafka.security.sasl_mechanism`.
        mechanism: String,
        /// librdkafka's words.
        reason: String,
    },
    /// The brokers' certificate was not trusted.
    #[error("kafka.security.ca_file: the certificate of the brokers at {brokers} is not trusted by {trust}: {reason}")]
    Certificate {
        /// `kafka.brokers`.
        brokers: String,
        /// What was trusted: the CA file, or the system's CAs when none is set.
        trust: String,
        /// librdkafka's words.
        reason: String,
    },
    /// The CA file could not be read.
    #[error("kafka.security.ca_file: {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// librdkafka's words.
        reason: String,
    },
    /// The listener speaks another protocol (TLS against a plaintext one, or the reverse).
    #[error(
        "kafka.security.protocol: {protocol} does not match the listener at {brokers}: {reason}"
    )]
    Protocol {
        /// `kafka.brokers`.
        brokers: String,
        /// `kafka.security.protocol`.
        protocol: String,
        /// librdkafka's words.
        reason: String,
    },
    /// No broker answered in time.
    #[error("kafka.brokers: {brokers} did not answer within {waited_ms} ms: {reason}")]
    Unreachable {
        /// `kafka.brokers`.
        brokers: String,
        /// How long it waited.
        waited_ms: u128,
        /// The last failure librdkafka reported.
        reason: String,
    },
    /// The client could not be created with these settings.
    #[error("kafka: {0}")]
    Client(String),
}

impl ConnectError {
    /// Whether waiting cannot help: the settings must change.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Unreachable { .. })
    }
}

/// What a successful probe found.
#[derive(Debug, Clone)]
pub struct Reached {
    /// Brokers in the cluster's metadata.
    pub brokers: usize,
    /// How long the answer took.
    pub took: Duration,
}

/// What a failure reported by librdkafka says about the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Authentication,
    Certificate,
    Protocol,
    /// The connection closed while the client asked for API versions: what a TLS
    /// listener does to a plaintext client, but also what a broker that is just stopping
    /// may do once. It settles the question only when it repeats.
    ClosedAtApiVersions,
}

/// How many times in a row [`Failure::ClosedAtApiVersions`] must be seen.
const CLOSED_AT_API_VERSIONS_REPEATS: u32 = 3;

/// Read librdkafka's error (or log) text: librdkafka gives these failures one code each
/// or none (`__SSL`, `__AUTHENTICATION`, `__TRANSPORT`), and words that say which.
fn classify(code: Option<RDKafkaErrorCode>, text: &str) -> Option<Failure> {
    let t = text.to_ascii_lowercase();
    // librdkafka's hints for a protocol mismatch: a TLS client on a plaintext port fails
    // its handshake; a SASL client on a port without SASL is refused the handshake.
    if t.contains("plaintext broker listener")
        || t.contains("wrong version number")
        || t.contains("packet length too long")
        || t.contains("mechanism handshake failed")
        || t.contains("incorrect security.protocol")
    {
        return Some(Failure::Protocol);
    }
    if code == Some(RDKafkaErrorCode::Authentication)
        || t.contains("sasl authentication error")
        || t.contains("authentication failed")
    {
        return Some(Failure::Authentication);
    }
    if t.contains("certificate verify failed") || t.contains("could not be verified") {
        return Some(Failure::Certificate);
    }
    if t.contains("disconnected") && t.contains("state apiversion_query") {
        return Some(Failure::ClosedAtApiVersions);
    }
    None
}

/// Records the first failure that settles the question, and the last one of any kind.
#[derive(Default)]
struct Watch {
    settled: Mutex<Option<(Failure, String)>>,
    closed_at_api_versions: std::sync::atomic::AtomicU32,
    last: Mutex<String>,
}

impl Watch {
    fn note(&self, code: Option<RDKafkaErrorCode>, text: &str) {
        use std::sync::atomic::Ordering;
        let failure = classify(code, text);
        if failure.is_none() && code == Some(RDKafkaErrorCode::AllBrokersDown) {
            // A summary of the failures already noted; keep the reason it summarizes.
            return;
        }
        let text = tidy(text);
        if let Ok(mut last) = self.last.lock() {
            last.clone_from(&text);
        }
        let settles = match failure {
            None => false,
            Some(Failure::ClosedAtApiVersions) => {
                let times = 1 + suppressed(&text);
                self.closed_at_api_versions
                    .fetch_add(times, Ordering::Relaxed)
                    + times
                    >= CLOSED_AT_API_VERSIONS_REPEATS
            }
            Some(_) => true,
        };
        if let (true, Some(f)) = (settles, failure) {
            if let Ok(mut s) = self.settled.lock() {
                s.get_or_insert((f, text));
            }
        }
    }
}

/// librdkafka's text without its thread and broker prefixes
/// (`[thrd:ssl://h:p/bootstrap]: ssl://h:p/bootstrap: SSL handshake failed…`).
fn tidy(text: &str) -> String {
    let mut t = text.trim();
    if t.starts_with("[thrd:") {
        if let Some(i) = t.find("]: ") {
            t = &t[i + 3..];
        }
    }
    // The broker's name: `host:port/id: ` or `proto://host:port/id: `.
    if let Some((name, rest)) = t.split_once(": ") {
        if !name.contains(' ') && name.contains('/') {
            t = rest;
        }
    }
    t.to_string()
}

/// How many identical reports librdkafka folded into this one ("N identical error(s)
/// suppressed").
fn suppressed(text: &str) -> u32 {
    text.split_once(" identical error(s) suppressed")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        self.note(error.rdkafka_error_code(), reason);
    }

    // The probe's own client stays quiet: its findings come back as the error.
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Info as i32) {
            self.note(None, message);
        }
    }
}

impl ConsumerContext for Watch {}

/// Ask the brokers for their metadata until they answer, a failure shows that the
/// settings are wrong, or `wait` has passed. Blocking: call from a blocking context.
pub fn probe(kafka: &KafkaConfig, wait: Duration) -> Result<Reached, ConnectError> {
    let start = Instant::now();
    let mut config = kafka.consumer_config("sluice-probe");
    // Fail over quickly between attempts; the probe polls the outcome itself.
    config
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "500")
        .set("statistics.interval.ms", "0")
        // A closed connection is reported at Info only.
        .set_log_level(RDKafkaLogLevel::Info);
    let consumer: BaseConsumer<Watch> = config
        .create_with_context(Watch::default())
        .map_err(|e| client_error(kafka, e))?;
    let step = Duration::from_millis(500);
    loop {
        match consumer.fetch_metadata(None, step) {
            Ok(m) => {
                return Ok(Reached {
                    brokers: m.brokers().len(),
                    took: start.elapsed(),
                })
            }
            Err(e) => {
                // librdkafka hands errors and logs to the context when the client is
                // polled; this consumer subscribes to nothing, so a poll only serves them.
                let _ = consumer.poll(Duration::ZERO);
                let watch = consumer.context();
                let settled = watch.settled.lock().ok().and_then(|s| s.clone());
                if let Some((failure, reason)) = settled {
                    return Err(named(kafka, failure, reason));
                }
                if start.elapsed() >= wait {
                    let last = watch.last.lock().map(|l| l.clone()).unwrap_or_default();
                    return Err(ConnectError::Unreachable {
                        brokers: kafka.brokers.clone(),
                        waited_ms: start.elapsed().as_millis(),
                        reason: if last.is_empty() { e.to_string() } else { last },
                    });
                }
            }
        }
    }
}

fn named(kafka: &KafkaConfig, failure: Failure, reason: String) -> ConnectError {
    let s = &kafka.security;
    let brokers = kafka.brokers.clone();
    match failure {
        Failure::Authentication => ConnectError::Authentication {
            brokers,
            user: s.username.clone().unwrap_or_default(),
            mechanism: s
                .sasl_mechanism
                .map_or("no mechanism", |m| m.as_str())
                .to_string(),
            reason,
        },
        Failure::Certificate => ConnectError::Certificate {
            brokers,
            trust: s.ca_file.as_ref().map_or_else(
                || "the system's CAs (no kafka.security.ca_file)".to_string(),
                |p| p.display().to_string(),
            ),
            reason,
        },
        Failure::Protocol | Failure::ClosedAtApiVersions => ConnectError::Protocol {
            brokers,
            protocol: s.protocol.as_str().to_string(),
            reason,
        },
    }
}

fn client_error(kafka: &KafkaConfig, e: KafkaError) -> ConnectError {
    let text = e.to_string();
    match &kafka.security.ca_file {
        Some(ca) if text.contains("ssl.ca.location") => ConnectError::CaFile {
            path: ca.display().to_string(),
            reason: match std::fs::metadata(ca) {
                Err(e) => e.to_string(),
                Ok(_) => format!("not a readable PEM file ({text})"),
            },
        },
        _ => ConnectError::Client(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafkas_words_are_read_as_the_setting_to_fix() {
        let auth = "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 302ms in state AUTH_REQ)";
        assert_eq!(classify(None, auth), Some(Failure::Authentication));
        assert_eq!(
            classify(Some(RDKafkaErrorCode::Authentication), "x"),
            Some(Failure::Authentication)
        );
        let cert = "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 4ms in state SSL_HANDSHAKE)";
        assert_eq!(
            classify(Some(RDKafkaErrorCode::SSL), cert),
            Some(Failure::Certificate)
        );
        let plaintext_on_tls = "127.0.0.1:33191/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 0ms in state APIVERSION_QUERY)";
        assert_eq!(
            classify(None, plaintext_on_tls),
            Some(Failure::ClosedAtApiVersions)
        );
        let tls_on_plaintext = "ssl://127.0.0.1:49791/bootstrap: SSL handshake failed: Disconnected: SSL connection closed by peer: connecting to a PLAINTEXT broker listener? (after 3ms in state SSL_HANDSHAKE)";
        assert_eq!(
            classify(Some(RDKafkaErrorCode::SSL), tls_on_plaintext),
            Some(Failure::Protocol)
        );
        let sasl_on_tls_only = "SASL SCRAM-SHA-512 mechanism handshake failed: Broker: Request not valid in current SASL state: broker's supported mechanisms:  (after 2ms in state AUTH_HANDSHAKE)";
        assert_eq!(
            classify(Some(RDKafkaErrorCode::Authentication), sasl_on_tls_only),
            Some(Failure::Protocol)
        );
        let refused =
            "Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)";
        assert_eq!(
            classify(None, refused),
            None,
            "a refused connection may pass"
        );
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::AllBrokersDown),
                "1/1 brokers are down"
            ),
            None
        );
    }

    #[test]
    fn a_connection_closed_at_api_versions_settles_only_when_it_repeats() {
        let w = Watch::default();
        let closed = "Disconnected: connection closed by peer: receive 0 after POLLIN (after 0ms in state APIVERSION_QUERY)";
        for _ in 1..CLOSED_AT_API_VERSIONS_REPEATS {
            w.note(None, closed);
        }
        assert!(w.settled.lock().unwrap().is_none());
        w.note(
            Some(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(
            *w.last.lock().unwrap(),
            closed,
            "the summary keeps the reason"
        );
        w.note(None, closed);
        assert_eq!(
            w.settled.lock().unwrap().as_ref().map(|s| s.0),
            Some(Failure::ClosedAtApiVersions)
        );
    }

    #[test]
    fn reasons_lose_librdkafkas_prefixes_and_count_what_it_folded() {
        let raw = "[thrd:ssl://127.0.0.1:1/bootstrap]: ssl://127.0.0.1:1/bootstrap: SSL handshake failed: x (after 0ms in state SSL_HANDSHAKE, 4 identical error(s) suppressed)";
        assert_eq!(
            tidy(raw),
            "SSL handshake failed: x (after 0ms in state SSL_HANDSHAKE, 4 identical error(s) suppressed)"
        );
        assert_eq!(suppressed(raw), 4);
        assert_eq!(suppressed("no count here"), 0);
        assert_eq!(tidy("1/1 brokers are down"), "1/1 brokers are down");
    }

    #[test]
    fn only_unreachable_is_worth_waiting_for() {
        let u = ConnectError::Unreachable {
            brokers: "b".into(),
            waited_ms: 1,
            reason: "r".into(),
        };
        assert!(!u.is_permanent());
        let p = ConnectError::Protocol {
            brokers: "b".into(),
            protocol: "plaintext".into(),
            reason: "r".into(),
        };
        assert!(p.is_permanent());
        assert!(p
            .to_string()
            .starts_with("kafka.security.protocol: plaintext"));
    }
}
