//! `sluice audit`: reconcile, per tenant and time bucket (of ingest time), the events in
//! every layer of the pipeline: the raw topic, the parsed topic and its dead letters, the
//! enriched topic and its dead letters, and what each sink holds.
//!
//! Topics are matched by event id (`sluice.raw_event_id` traces later records back to the
//! raw ones). An event missing from a layer is accounted for when it was dead-lettered
//! there or is still in flight (at or past the consuming group's committed offset).
//! Sinks are matched by id sets, not counts, and by version: each stored event must hold
//! the newest processing the enriched topic has of it (and, with `--values`, the same
//! values, field by field). Anything else is a finding. Events written more than once to
//! a topic outside replays (at-least-once redeliveries) are reported as a warning. Where
//! the archive sink runs, the archive is a column too: each raw event in it once.

use std::time::Duration;

use crate::components::{Config, ReadStored};
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sluice_schemas::EnrichedEvent;
use sluice_sinks::Selection;

mod reconcile;
mod report;
mod scan;

pub use report::{Finding, Report, Row};

/// Records are stamped shortly after ingest receives them; read topics from this much
/// earlier than `--from` so none is missed.
const STAMP_MARGIN_MS: i64 = 10 * 60 * 1000;
const SCAN_TIMEOUT: Duration = Duration::from_secs(300);

/// What to audit.
#[derive(Debug, Clone)]
pub struct Window {
    /// First ingest time included.
    pub from: DateTime<Utc>,
    /// First ingest time excluded.
    pub to: DateTime<Utc>,
    /// Width of a time bucket.
    pub bucket: Duration,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Also compare every stored event's values with the enriched topic's newest record.
    pub values: bool,
}

impl Window {
    /// Everything ingested in `[from, to)` in one-hour buckets, all tenants, versions only.
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        Self {
            from,
            to,
            bucket: Duration::from_secs(3600),
            tenant: None,
            values: false,
        }
    }

    fn contains(&self, ms: i64) -> bool {
        ms >= self.from.timestamp_millis() && ms < self.to.timestamp_millis()
    }

    fn bucket_of(&self, ms: i64) -> i64 {
        let width = self.bucket.as_millis().max(1) as i64;
        ms.div_euclid(width) * width
    }

    fn keeps(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

/// A sink whose contents are audited: its name (as in dead-letter headers), its group,
/// and how its events are read back.
#[derive(Clone)]
struct AuditedSink {
    name: &'static str,
    group: String,
    read: ReadStored,
}

fn audited_sinks(config: &Config) -> Vec<AuditedSink> {
    crate::components::event_sinks()
        .filter_map(|c| {
            Some(AuditedSink {
                name: c.name,
                group: c.group(config).to_string(),
                read: c.read_stored?,
            })
        })
        .collect()
}

/// Whether the archive sink runs here: its group has committed on the raw topic.
async fn archive_deployed(config: &Config) -> Result<bool> {
    let (kafka, group, raw) = (
        config.kafka.clone(),
        config.archive.group.clone(),
        config.topics.raw.clone(),
    );
    let committed = tokio::task::spawn_blocking(move || {
        sluice_core::kafka::committed_offsets(&kafka, &group, &raw)
    })
    .await
    .context("audit task")??;
    Ok(committed.iter().any(|(_, o)| *o > 0))
}

/// Read every layer and reconcile it. The archive is audited when its sink runs (its
/// group has committed on the raw topic).
pub async fn run(config: &Config, window: &Window) -> Result<Report> {
    let sinks = audited_sinks(config);
    let archived = archive_deployed(config).await?;
    let mut cells = {
        let (config, window, sinks) = (config.clone(), window.clone(), sinks.clone());
        tokio::task::spawn_blocking(move || scan::scan_topics(&config, &window, &sinks, archived))
            .await
            .context("audit task")??
    };
    if archived {
        scan::scan_archive(config, window, &mut cells).await?;
    }
    let selection = Selection::Received {
        from: window.from.timestamp_millis(),
        to: window.to.timestamp_millis(),
        tenant: window.tenant.clone(),
    };
    for (i, sink) in sinks.iter().enumerate() {
        let stored = (sink.read)(config.clone(), selection.clone(), window.values).await?;
        for s in stored {
            let cell = cells
                .entry((s.tenant.clone(), window.bucket_of(s.received_at)))
                .or_default();
            cell.sink(i)
                .stored
                .entry(s.event_id.clone())
                .or_default()
                .push(s);
        }
    }
    let codec = if window.values {
        Some(sluice_schemas::setup::reading_codec::<EnrichedEvent>(
            &config.schemas,
        )?)
    } else {
        None
    };
    Ok(reconcile::reconcile(
        &cells,
        &sinks,
        codec.as_deref(),
        archived,
    ))
}
