//! Reading the topic layers of the audited window into cells of event ids.

use std::collections::HashMap;

use anyhow::{Context, Result};
use rdkafka::message::{BorrowedMessage, Message};
use sluice_core::headers;

use super::reconcile::{Cell, Cells, Latest};
use super::{AuditedSink, Window, SCAN_TIMEOUT, STAMP_MARGIN_MS};
use crate::components::Config;

/// Tenant, ingest time and the given id header of a record (falling back to its
/// timestamp and position).
pub(crate) fn identity(m: &BorrowedMessage<'_>, id_header: &str) -> (String, i64, String) {
    let h = m.headers();
    let tenant = headers::get(h, headers::TENANT).unwrap_or("").to_string();
    let at = headers::get(h, headers::RECEIVED_AT_MS)
        .and_then(|v| v.parse().ok())
        .or_else(|| m.timestamp().to_millis())
        .unwrap_or(0);
    let id = headers::get(h, id_header)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}/{}/{}", m.topic(), m.partition(), m.offset()));
    (tenant, at, id)
}

/// Read `topic` from the window's start and call `each` with the cell and record of
/// every record of the window, and, for each of `groups`, whether it has yet to commit it.
pub(crate) fn scan_topic(
    config: &Config,
    window: &Window,
    cells: &mut Cells,
    topic: &str,
    groups: &[&str],
    mut each: impl FnMut(&mut Cell, &BorrowedMessage<'_>, &[bool]),
) -> Result<()> {
    let mut committed: Vec<HashMap<i32, i64>> = Vec::new();
    for g in groups {
        committed.push(
            sluice_core::kafka::committed_offsets(&config.kafka, g, topic)
                .with_context(|| format!("committed offsets of group {g}"))?
                .into_iter()
                .collect(),
        );
    }
    let since = window.from.timestamp_millis() - STAMP_MARGIN_MS;
    let mut pending = vec![false; groups.len()];
    let complete = sluice_core::kafka::scan(&config.kafka, topic, Some(since), SCAN_TIMEOUT, |m| {
        let (tenant, at, _) = identity(m, headers::EVENT_ID);
        if !window.contains(at) || !window.keeps(&tenant) {
            return;
        }
        for (i, c) in committed.iter().enumerate() {
            pending[i] = c.get(&m.partition()).is_none_or(|c| m.offset() >= *c);
        }
        let cell = cells.entry((tenant, window.bucket_of(at))).or_default();
        each(cell, m, &pending);
    })
    .with_context(|| format!("reading topic {topic}"))?;
    if !complete {
        anyhow::bail!("reading topic {topic} took longer than {SCAN_TIMEOUT:?}");
    }
    Ok(())
}

/// Count a record written outside a replay, by its raw id.
pub(crate) fn count_write(cell: &mut Cell, layer: &'static str, m: &BorrowedMessage<'_>) {
    if headers::get(m.headers(), headers::REPLAY).is_none() {
        let raw = identity(m, headers::RAW_EVENT_ID).2;
        *cell
            .writes
            .entry(layer)
            .or_default()
            .entry(raw)
            .or_insert(0) += 1;
    }
}

/// Read every topic layer; with `archived`, also note the raw records the archive group
/// has yet to commit.
pub(crate) fn scan_topics(
    config: &Config,
    window: &Window,
    sinks: &[AuditedSink],
    archived: bool,
) -> Result<Cells> {
    let t = &config.topics;
    let mut cells = Cells::new();
    let mut raw_groups = vec![config.parse.group.as_str()];
    if archived {
        raw_groups.push(&config.archive.group);
    }
    scan_topic(
        config,
        window,
        &mut cells,
        &t.raw,
        &raw_groups,
        |c, m, pending| {
            let (_, _, id) = identity(m, headers::EVENT_ID);
            if pending[0] {
                c.parse_pending.insert(id.clone());
            }
            if pending.get(1).copied().unwrap_or(false) {
                c.archive_pending.insert(id.clone());
            }
            count_write(c, "raw", m);
            c.raw.insert(id);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.dlq(&t.raw),
        &[],
        |c, m, _| {
            c.parse_dlq.insert(identity(m, headers::EVENT_ID).2);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.parsed,
        &[&config.enrich.group],
        |c, m, pending| {
            let (_, _, id) = identity(m, headers::EVENT_ID);
            if pending[0] {
                c.enrich_pending.insert(id.clone());
            }
            count_write(c, "parsed", m);
            c.parsed.insert(id);
            c.parsed_raw.insert(identity(m, headers::RAW_EVENT_ID).2);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.dlq(&t.parsed),
        &[],
        |c, m, _| {
            c.enrich_dlq.insert(identity(m, headers::EVENT_ID).2);
        },
    )?;
    let groups: Vec<&str> = sinks.iter().map(|s| s.group.as_str()).collect();
    scan_topic(
        config,
        window,
        &mut cells,
        &t.enriched,
        &groups,
        |c, m, pending| {
            let (_, _, id) = identity(m, headers::EVENT_ID);
            for (i, p) in pending.iter().enumerate() {
                if *p {
                    c.sink(i).pending.insert(id.clone());
                }
            }
            count_write(c, "enriched", m);
            let version = headers::version(m);
            let newer = c.latest.get(&id).is_none_or(|l| version >= l.version);
            if newer {
                let payload = window
                    .values
                    .then(|| m.payload().unwrap_or_default().to_vec());
                c.latest.insert(id.clone(), Latest { version, payload });
            }
            c.enriched.insert(id);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.dlq(&t.enriched),
        &[],
        |c, m, _| {
            let stage = headers::get(m.headers(), headers::DLQ_STAGE).unwrap_or("");
            if let Some(i) = sinks.iter().position(|s| s.name == stage) {
                c.sink(i).dlq.insert(identity(m, headers::EVENT_ID).2);
            }
        },
    )?;
    Ok(cells)
}

/// Count every copy of each raw event of the window in the archive (no deduplication: a
/// copy too many is a finding), and note those Kafka no longer retains.
pub(crate) async fn scan_archive(
    config: &Config,
    window: &Window,
    cells: &mut Cells,
) -> Result<()> {
    use sluice_sinks::archive::{self, record::decode, ArchiveRange};
    let archive = archive::open(&config.archive).context("opening the archive")?;
    let raw = config.topics.raw.clone();
    let range = ArchiveRange {
        topic: raw.clone(),
        from: Some(window.from.timestamp_millis() - STAMP_MARGIN_MS),
        to: Some(window.to.timestamp_millis() + STAMP_MARGIN_MS),
        tenant: window.tenant.clone(),
    };
    let kafka = config.kafka.clone();
    let starts: HashMap<i32, i64> =
        tokio::task::spawn_blocking(move || sluice_core::kafka::watermarks(&kafka, &raw))
            .await??
            .into_iter()
            .map(|(p, low, _)| (p, low))
            .collect();
    for f in archive::list_files(&archive, &range)
        .await
        .context("listing the archive")?
    {
        let bytes = archive.store.get(&f.path).await?.bytes().await?;
        for r in decode(bytes).with_context(|| format!("reading {}", f.path))? {
            if !window.contains(r.received_at) || !window.keeps(&r.tenant) {
                continue;
            }
            let cell = cells
                .entry((r.tenant.clone(), window.bucket_of(r.received_at)))
                .or_default();
            if starts.get(&r.partition).is_some_and(|low| r.offset < *low) {
                cell.archive_only.insert(r.event_id.clone());
            }
            *cell.archive.entry(r.event_id).or_insert(0) += 1;
        }
    }
    Ok(())
}
