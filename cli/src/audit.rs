//! `sluice audit`: reconcile, per tenant and time bucket (of ingest time), the events in
//! every layer of the pipeline: the raw topic, the parsed topic and its dead letters, the
//! enriched topic and its dead letters, the TimescaleDB table and Elasticsearch.
//!
//! Topics are matched by event id (`sluice.raw_event_id` traces parsed records back to
//! the raw ones). An event missing from a layer is accounted for when it was
//! dead-lettered there or is still in flight (at or past the consuming group's committed
//! offset). Anything else is a finding, and so is a duplicate row.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use rdkafka::message::{BorrowedMessage, Message};
use serde_json::json;
use sluice_core::headers;
use sluice_core::Config;

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
}

impl Window {
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

/// The sinks whose dead letters and progress are audited.
const SINKS: [&str; 2] = ["timescale", "elasticsearch"];

/// Event ids seen in each layer for one tenant and bucket.
#[derive(Debug, Default)]
struct Cell {
    raw: HashSet<String>,
    /// Raw ids that reached the parsed topic.
    parsed_raw: HashSet<String>,
    parse_dlq: HashSet<String>,
    parse_pending: HashSet<String>,
    /// Event ids on the parsed topic.
    parsed: HashSet<String>,
    enriched: HashSet<String>,
    enrich_dlq: HashSet<String>,
    enrich_pending: HashSet<String>,
    sink_dlq: [HashSet<String>; 2],
    sink_pending: [HashSet<String>; 2],
    /// Rows per event id.
    db: HashMap<String, i64>,
    es: u64,
}

/// One line of the audit table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// Tenant.
    pub tenant: String,
    /// Start of the bucket, Unix milliseconds.
    pub bucket: i64,
    /// Distinct events on the raw topic.
    pub raw: usize,
    /// Of those, how many reached the parsed topic.
    pub parsed: usize,
    /// Dead-lettered by parse.
    pub parse_dlq: usize,
    /// Distinct events on the enriched topic.
    pub enriched: usize,
    /// Dead-lettered by enrich.
    pub enrich_dlq: usize,
    /// Dead-lettered by the sinks.
    pub sink_dlq: usize,
    /// Distinct events in TimescaleDB.
    pub timescale: usize,
    /// Documents in Elasticsearch.
    pub elasticsearch: u64,
    /// Events not yet processed by some layer (past a group's committed offset).
    pub in_flight: usize,
}

/// A discrepancy no dead letter or in-flight record explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Layer: `parse`, `enrich`, `timescale` or `elasticsearch`.
    pub layer: &'static str,
    /// `missing`, `duplicated` or `extra`.
    pub kind: &'static str,
    /// Tenant.
    pub tenant: String,
    /// Start of the bucket, Unix milliseconds.
    pub bucket: i64,
    /// How many events.
    pub count: u64,
    /// One of the events, when known.
    pub example: Option<String>,
}

/// The result of an audit.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One row per tenant and bucket.
    pub rows: Vec<Row>,
    /// Unexplained discrepancies.
    pub findings: Vec<Finding>,
}

fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

impl Report {
    /// Whether nothing is missing or duplicated.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    /// Findings of one layer and kind, summed.
    pub fn count(&self, layer: &str, kind: &str) -> u64 {
        self.findings
            .iter()
            .filter(|f| f.layer == layer && f.kind == kind)
            .map(|f| f.count)
            .sum()
    }

    /// The table and the findings, as printed.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{:<16} {:<17} {:>7} {:>7} {:>9} {:>8} {:>10} {:>8} {:>9} {:>8} {:>9}\n",
            "tenant",
            "bucket",
            "raw",
            "parsed",
            "parse-dlq",
            "enriched",
            "enrich-dlq",
            "sink-dlq",
            "timescale",
            "es",
            "in-flight"
        );
        let mut total = Row {
            tenant: "total".into(),
            ..Row::default()
        };
        for r in &self.rows {
            s += &format!(
                "{:<16} {:<17} {:>7} {:>7} {:>9} {:>8} {:>10} {:>8} {:>9} {:>8} {:>9}\n",
                r.tenant,
                time(r.bucket),
                r.raw,
                r.parsed,
                r.parse_dlq,
                r.enriched,
                r.enrich_dlq,
                r.sink_dlq,
                r.timescale,
                r.elasticsearch,
                r.in_flight
            );
            total.raw += r.raw;
            total.parsed += r.parsed;
            total.parse_dlq += r.parse_dlq;
            total.enriched += r.enriched;
            total.enrich_dlq += r.enrich_dlq;
            total.sink_dlq += r.sink_dlq;
            total.timescale += r.timescale;
            total.elasticsearch += r.elasticsearch;
            total.in_flight += r.in_flight;
        }
        s += &format!(
            "{:<16} {:<17} {:>7} {:>7} {:>9} {:>8} {:>10} {:>8} {:>9} {:>8} {:>9}\n",
            total.tenant,
            "",
            total.raw,
            total.parsed,
            total.parse_dlq,
            total.enriched,
            total.enrich_dlq,
            total.sink_dlq,
            total.timescale,
            total.elasticsearch,
            total.in_flight
        );
        for f in &self.findings {
            s += &format!(
                "{} {}: {} event(s) {} for tenant {} in bucket {}{}\n",
                f.kind.to_uppercase(),
                f.layer,
                f.count,
                f.kind,
                f.tenant,
                time(f.bucket),
                f.example
                    .as_ref()
                    .map(|e| format!(" (e.g. {e})"))
                    .unwrap_or_default()
            );
        }
        s += &if self.ok() {
            "audit: every event is accounted for\n".to_string()
        } else {
            format!("audit: {} finding(s)\n", self.findings.len())
        };
        s
    }
}

/// Tenant, ingest time and the given id header of a record (falling back to its
/// timestamp and position).
fn identity(m: &BorrowedMessage<'_>, id_header: &str) -> (String, i64, String) {
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

/// The cells, by tenant and bucket.
type Cells = BTreeMap<(String, i64), Cell>;

/// Read `topic` from the window's start and call `each` with the cell and record of
/// every record of the window, and whether `group` (if any) has yet to commit it.
fn scan_topic(
    config: &Config,
    window: &Window,
    cells: &mut Cells,
    topic: &str,
    group: Option<&str>,
    mut each: impl FnMut(&mut Cell, &BorrowedMessage<'_>, bool),
) -> Result<()> {
    let committed: HashMap<i32, i64> = match group {
        Some(g) => sluice_core::kafka::committed_offsets(&config.kafka, g, topic)
            .with_context(|| format!("committed offsets of group {g}"))?
            .into_iter()
            .collect(),
        None => HashMap::new(),
    };
    let since = window.from.timestamp_millis() - STAMP_MARGIN_MS;
    let complete = sluice_core::kafka::scan(&config.kafka, topic, Some(since), SCAN_TIMEOUT, |m| {
        let (tenant, at, _) = identity(m, headers::EVENT_ID);
        if !window.contains(at) || !window.keeps(&tenant) {
            return;
        }
        let pending = group.is_some()
            && committed
                .get(&m.partition())
                .is_none_or(|c| m.offset() >= *c);
        let cell = cells.entry((tenant, window.bucket_of(at))).or_default();
        each(cell, m, pending);
    })
    .with_context(|| format!("reading topic {topic}"))?;
    if !complete {
        anyhow::bail!("reading topic {topic} took longer than {SCAN_TIMEOUT:?}");
    }
    Ok(())
}

/// Read every layer and reconcile it.
pub async fn run(config: &Config, window: &Window) -> Result<Report> {
    let mut cells = {
        let (config, window) = (config.clone(), window.clone());
        tokio::task::spawn_blocking(move || scan_topics(&config, &window))
            .await
            .context("audit task")??
    };
    count_database(config, window, &mut cells).await?;
    let unseen = count_elasticsearch(config, window, &mut cells).await?;
    let mut report = reconcile(&cells);
    if unseen > 0 {
        report.findings.push(Finding {
            layer: "elasticsearch",
            kind: "extra",
            tenant: window.tenant.clone().unwrap_or_else(|| "*".into()),
            bucket: window.from.timestamp_millis(),
            count: unseen,
            example: Some("documents of tenants or buckets absent from the topics".into()),
        });
    }
    Ok(report)
}

fn scan_topics(config: &Config, window: &Window) -> Result<Cells> {
    let t = &config.topics;
    let mut cells = Cells::new();
    scan_topic(
        config,
        window,
        &mut cells,
        &t.raw,
        Some(&config.parse.group),
        |c, m, pending| {
            let (_, _, id) = identity(m, headers::EVENT_ID);
            if pending {
                c.parse_pending.insert(id.clone());
            }
            c.raw.insert(id);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.dlq(&t.raw),
        None,
        |c, m, _| {
            c.parse_dlq.insert(identity(m, headers::EVENT_ID).2);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.parsed,
        Some(&config.enrich.group),
        |c, m, pending| {
            let (_, _, id) = identity(m, headers::EVENT_ID);
            if pending {
                c.enrich_pending.insert(id.clone());
            }
            c.parsed.insert(id);
            c.parsed_raw.insert(identity(m, headers::RAW_EVENT_ID).2);
        },
    )?;
    scan_topic(
        config,
        window,
        &mut cells,
        &t.dlq(&t.parsed),
        None,
        |c, m, _| {
            c.enrich_dlq.insert(identity(m, headers::EVENT_ID).2);
        },
    )?;
    for (i, group) in [&config.timescale.group, &config.elasticsearch.group]
        .into_iter()
        .enumerate()
    {
        scan_topic(
            config,
            window,
            &mut cells,
            &t.enriched,
            Some(group),
            |c, m, pending| {
                let (_, _, id) = identity(m, headers::EVENT_ID);
                if pending {
                    c.sink_pending[i].insert(id.clone());
                }
                c.enriched.insert(id);
            },
        )?;
    }
    scan_topic(
        config,
        window,
        &mut cells,
        &t.dlq(&t.enriched),
        None,
        |c, m, _| {
            let stage = headers::get(m.headers(), headers::DLQ_STAGE).unwrap_or("");
            if let Some(i) = SINKS.iter().position(|s| *s == stage) {
                c.sink_dlq[i].insert(identity(m, headers::EVENT_ID).2);
            }
        },
    )?;
    Ok(cells)
}

async fn count_database(config: &Config, window: &Window, cells: &mut Cells) -> Result<()> {
    let c = &config.timescale;
    let pool = sluice_sinks::timescale::pool(c)?;
    let client = pool.get().await.context("connecting to the database")?;
    let rows = client
        .query(
            &format!(
                "SELECT tenant, event_id, (extract(epoch FROM min(received_at)) * 1000)::bigint, count(*)
                 FROM {}.events WHERE received_at >= $1 AND received_at < $2
                 GROUP BY tenant, event_id",
                c.schema
            ),
            &[&window.from, &window.to],
        )
        .await
        .context("counting the events table")?;
    for row in rows {
        let tenant: String = row.get(0);
        if !window.keeps(&tenant) {
            continue;
        }
        let bucket = window.bucket_of(row.get(2));
        cells
            .entry((tenant, bucket))
            .or_default()
            .db
            .insert(row.get(1), row.get(3));
    }
    drop(client);
    pool.close();
    Ok(())
}

/// Count the documents of each cell; returns the documents of the window outside them.
async fn count_elasticsearch(config: &Config, window: &Window, cells: &mut Cells) -> Result<u64> {
    let es = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    let pattern = format!("{}-*", config.elasticsearch.index_prefix);
    es.indices()
        .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
            &pattern,
        ]))
        .allow_no_indices(true)
        .send()
        .await
        .context("elasticsearch refresh")?;
    let iso = |ms: i64| time_iso(ms);
    let count = |tenant: Option<String>, from: i64, to: i64| {
        let es = es.clone();
        let pattern = pattern.clone();
        async move {
            let mut filter =
                vec![json!({"range": {"received_at": {"gte": iso(from), "lt": iso(to)}}})];
            if let Some(t) = tenant {
                filter.push(json!({"term": {"tenant": t}}));
            }
            let resp = es
                .count(elasticsearch::CountParts::Index(&[&pattern]))
                .allow_no_indices(true)
                .body(json!({"query": {"bool": {"filter": filter}}}))
                .send()
                .await
                .context("elasticsearch count")?;
            let body: serde_json::Value = resp.json().await.context("elasticsearch count")?;
            body["count"]
                .as_u64()
                .with_context(|| format!("elasticsearch count answered {body}"))
        }
    };
    let (from, to) = (window.from.timestamp_millis(), window.to.timestamp_millis());
    let width = window.bucket.as_millis().max(1) as i64;
    let mut counted = 0;
    for ((tenant, bucket), cell) in cells.iter_mut() {
        cell.es = count(
            Some(tenant.clone()),
            (*bucket).max(from),
            (bucket + width).min(to),
        )
        .await?;
        counted += cell.es;
    }
    let total = count(window.tenant.clone(), from, to).await?;
    Ok(total.saturating_sub(counted))
}

fn time_iso(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Compare the layers of every cell.
fn reconcile(cells: &Cells) -> Report {
    let mut report = Report::default();
    for ((tenant, bucket), c) in cells {
        let mut finding = |layer: &'static str, kind: &'static str, ids: Vec<&String>| {
            if !ids.is_empty() {
                report.findings.push(Finding {
                    layer,
                    kind,
                    tenant: tenant.clone(),
                    bucket: *bucket,
                    count: ids.len() as u64,
                    example: ids.iter().min().map(|s| s.to_string()),
                });
            }
        };
        let mut in_flight: HashSet<&String> = HashSet::new();
        // parse: every raw event is parsed, dead-lettered or not yet consumed.
        let mut missing = Vec::new();
        for id in &c.raw {
            if c.parsed_raw.contains(id) || c.parse_dlq.contains(id) {
                continue;
            }
            if c.parse_pending.contains(id) {
                in_flight.insert(id);
            } else {
                missing.push(id);
            }
        }
        finding("parse", "missing", missing);
        // enrich: every parsed event is enriched, dead-lettered or not yet consumed.
        let mut missing = Vec::new();
        for id in &c.parsed {
            if c.enriched.contains(id) || c.enrich_dlq.contains(id) {
                continue;
            }
            if c.enrich_pending.contains(id) {
                in_flight.insert(id);
            } else {
                missing.push(id);
            }
        }
        finding("enrich", "missing", missing);
        // timescale: every enriched event is one row, dead-lettered or not yet consumed.
        let mut missing = Vec::new();
        for id in &c.enriched {
            if c.db.contains_key(id) || c.sink_dlq[0].contains(id) {
                continue;
            }
            if c.sink_pending[0].contains(id) {
                in_flight.insert(id);
            } else {
                missing.push(id);
            }
        }
        finding("timescale", "missing", missing);
        let duplicated: Vec<&String> =
            c.db.iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, _)| id)
                .collect();
        finding("timescale", "duplicated", duplicated);
        let extra: Vec<&String> = c.db.keys().filter(|id| !c.enriched.contains(*id)).collect();
        finding("timescale", "extra", extra);
        // elasticsearch: by count, as documents are addressed by event id.
        let expected = c
            .enriched
            .iter()
            .filter(|id| !c.sink_dlq[1].contains(*id))
            .count() as u64;
        let pending = c
            .enriched
            .iter()
            .filter(|id| !c.sink_dlq[1].contains(*id) && c.sink_pending[1].contains(*id))
            .inspect(|id| {
                in_flight.insert(id);
            })
            .count() as u64;
        let es_count = |n: u64, kind: &'static str| Finding {
            layer: "elasticsearch",
            kind,
            tenant: tenant.clone(),
            bucket: *bucket,
            count: n,
            example: None,
        };
        if c.es + pending < expected {
            report
                .findings
                .push(es_count(expected - pending - c.es, "missing"));
        } else if c.es > expected {
            report
                .findings
                .push(es_count(c.es - expected, "duplicated"));
        }
        report.rows.push(Row {
            tenant: tenant.clone(),
            bucket: *bucket,
            raw: c.raw.len(),
            parsed: c.raw.iter().filter(|id| c.parsed_raw.contains(*id)).count(),
            parse_dlq: c.parse_dlq.len(),
            enriched: c.enriched.len(),
            enrich_dlq: c.enrich_dlq.len(),
            sink_dlq: c.sink_dlq[0].len() + c.sink_dlq[1].len(),
            timescale: c.db.len(),
            elasticsearch: c.es,
            in_flight: in_flight.len(),
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accounted_and_unaccounted() {
        let mut cells = Cells::new();
        let c = cells.entry(("acme".into(), 0)).or_default();
        c.raw = ids(&["r1", "r2", "r3", "r4"]);
        c.parsed_raw = ids(&["r1", "r2"]);
        c.parse_dlq = ids(&["r3"]);
        c.parse_pending = ids(&[]);
        c.parsed = ids(&["e1", "e2"]);
        c.enriched = ids(&["e1", "e2"]);
        c.db = HashMap::from([("e1".into(), 1), ("e2".into(), 2)]);
        c.es = 1;
        c.sink_pending[1] = ids(&["e2"]);
        let report = reconcile(&cells);
        assert_eq!(
            report.count("parse", "missing"),
            1,
            "r4 is neither parsed nor dead-lettered"
        );
        assert_eq!(report.count("timescale", "duplicated"), 1);
        assert_eq!(
            report.count("elasticsearch", "missing"),
            0,
            "e2 is in flight"
        );
        assert_eq!(report.rows[0].in_flight, 1);
        assert!(!report.ok());
    }
}
