//! `sluice check`: connect to everything a process needs before it is deployed (or
//! started: the chart runs it in an init container), one line per dependency.

use std::time::Duration;

use serde::Serialize;

use crate::components::{self, Component, Config};

/// What was checked and what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    /// The dependency, e.g. `kafka`, `topic sluice.raw`, `database`.
    pub dependency: String,
    /// Whether it answered as needed.
    pub ok: bool,
    /// What was found, or why it failed.
    pub detail: String,
}

impl Checked {
    fn new(dependency: impl Into<String>, result: anyhow::Result<String>) -> Self {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        Self {
            dependency: dependency.into(),
            ok,
            detail,
        }
    }

    /// One line for a terminal or a pod log.
    pub fn line(&self) -> String {
        format!(
            "{:<4} {:<40} {}",
            if self.ok { "ok" } else { "FAIL" },
            self.dependency,
            self.detail
        )
    }
}

/// Which process is checked: `ingest`, a component by its Helm name (`sink-timescale`)
/// or its name (`timescale`), or everything.
pub fn select(name: Option<&str>) -> anyhow::Result<(bool, Vec<&'static Component>)> {
    match name {
        None => Ok((true, components::COMPONENTS.iter().collect())),
        Some("ingest") => Ok((true, Vec::new())),
        Some(n) => components::COMPONENTS
            .iter()
            .find(|c| c.helm == n || c.name == n)
            .map(|c| (false, vec![c]))
            .ok_or_else(|| {
                let names: Vec<&str> = components::COMPONENTS.iter().map(|c| c.helm).collect();
                anyhow::anyhow!(
                    "--component {n}: no such component (ingest, {})",
                    names.join(", ")
                )
            }),
    }
}

/// Check the brokers, the topics, the schema registry and each component's own
/// dependencies; `ingest` adds the raw topic.
pub async fn run(config: &Config, ingest: bool, selected: &[&'static Component]) -> Vec<Checked> {
    let mut out = Vec::new();
    let brokers = kafka(config).await;
    let brokers_ok = brokers.ok;
    out.push(brokers);
    // The topics this process reads and writes, with their dead-letter topics.
    let mut names: Vec<String> = Vec::new();
    if ingest {
        names.push(config.topics.raw.clone());
    }
    for c in selected {
        names.push(c.input(config).to_string());
        names.push(c.dlq(config));
        if let Some(o) = c.output(config) {
            names.push(o.to_string());
        }
    }
    names.sort();
    names.dedup();
    if brokers_ok {
        let wanted: Vec<(String, i64)> = components::topics(config)
            .into_iter()
            .filter(|(t, _)| names.contains(t))
            .collect();
        match sluice_core::kafka::check_topics(&config.kafka, &config.topics, &wanted).await {
            Ok(report) => out.extend(report.into_iter().map(|t| {
                let result = match (t.exists, t.differences.is_empty()) {
                    (false, _) => Err(anyhow::anyhow!("missing (sluice topics creates it)")),
                    (true, true) => Ok("present, as configured".to_string()),
                    // Differences are worth knowing but do not stop a process.
                    (true, false) => Ok(format!("present; differs: {}", t.differences.join("; "))),
                };
                Checked::new(format!("topic {}", t.topic), result)
            })),
            Err(e) => out.push(Checked::new("topics", Err(e.into()))),
        }
    }
    let avro = selected
        .iter()
        .any(|c| c.output.is_some() || c.input(config) != config.topics.raw);
    if avro && config.schemas.mode == sluice_core::config::SchemaMode::Registry {
        out.push(Checked::new("schema registry", registry(config).await));
    }
    for c in selected {
        if let Some((what, check)) = c.check {
            match check(config.clone()).await {
                Ok(Some(found)) => out.push(Checked::new(what, Ok(found))),
                Ok(None) => {}
                Err(e) => out.push(Checked::new(what, Err(e))),
            }
        }
    }
    // One line per dependency, even when several components share it (the database).
    let mut seen = std::collections::HashSet::new();
    out.retain(|c| seen.insert((c.dependency.clone(), c.ok)));
    out
}

async fn kafka(config: &Config) -> Checked {
    let kafka = config.kafka.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let reached = sluice_core::kafka_probe::probe(&kafka, Duration::from_secs(10))?;
        Ok(format!(
            "{} broker(s) at {}, {}",
            reached.brokers,
            kafka.brokers,
            kafka.security.protocol.as_str()
        ))
    })
    .await
    .unwrap_or_else(|e| Err(e.into()));
    Checked::new("kafka", result)
}

async fn registry(config: &Config) -> anyhow::Result<String> {
    let c = &config.schemas;
    let url = c
        .registry_url
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(c.registry_timeout_ms.max(1)))
        .build()?;
    let mut request = client.get(format!("{url}/subjects"));
    if let Some(token) = &c.registry_token {
        request = request.bearer_auth(token.expose());
    } else if let Some(user) = &c.registry_username {
        request = request.basic_auth(user, c.registry_password.as_ref().map(|p| p.expose()));
    }
    let resp = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", sluice_core::redact::url(url)))?;
    let status = resp.status();
    if !status.is_success() {
        anyhow::bail!("{}: answered {status}", sluice_core::redact::url(url));
    }
    let subjects: Vec<String> = resp.json().await.unwrap_or_default();
    Ok(format!("{} subject(s)", subjects.len()))
}
