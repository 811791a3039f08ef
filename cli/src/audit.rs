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
//! a topic outside replays (at-least-once redeliveries) are reported as a warning.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use rdkafka::message::{BorrowedMessage, Message};
use sluice_core::headers;
use sluice_core::Config;
use sluice_schemas::fields::differences;
use sluice_schemas::EnrichedEvent;
use sluice_sinks::{Selection, Stored};

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

/// A sink whose contents are audited: its name (as in dead-letter headers) and group.
#[derive(Debug, Clone)]
struct AuditedSink {
    name: &'static str,
    group: String,
}

fn audited_sinks(config: &Config) -> Vec<AuditedSink> {
    vec![
        AuditedSink {
            name: "timescale",
            group: config.timescale.group.clone(),
        },
        AuditedSink {
            name: "elasticsearch",
            group: config.elasticsearch.group.clone(),
        },
    ]
}

/// One sink's view of one cell.
#[derive(Debug, Default)]
struct SinkCell {
    dlq: HashSet<String>,
    pending: HashSet<String>,
    /// What the sink holds, by event id (two entries: a duplicate).
    stored: HashMap<String, Vec<Stored>>,
}

/// The newest record of an enriched event.
#[derive(Debug, Clone)]
struct Latest {
    version: i64,
    /// Its bytes, when values are compared.
    payload: Option<Vec<u8>>,
}

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
    latest: HashMap<String, Latest>,
    sinks: Vec<SinkCell>,
    /// Records per raw id outside replays, by topic layer.
    writes: BTreeMap<&'static str, HashMap<String, u32>>,
}

impl Cell {
    fn sink(&mut self, i: usize) -> &mut SinkCell {
        if self.sinks.len() <= i {
            self.sinks.resize_with(i + 1, SinkCell::default);
        }
        &mut self.sinks[i]
    }
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
    /// Distinct events in each audited sink, by sink name.
    pub sinks: Vec<(&'static str, usize)>,
    /// Events not yet processed by some layer (past a group's committed offset).
    pub in_flight: usize,
    /// Events written more than once to a topic layer outside replays.
    pub repeated: usize,
}

impl Row {
    /// Distinct events in the sink named `name`.
    pub fn sink(&self, name: &str) -> usize {
        self.sinks
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| *c)
    }
}

/// A discrepancy no dead letter or in-flight record explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Layer: `parse`, `enrich`, a sink's name, or a topic layer for repeats.
    pub layer: &'static str,
    /// `missing`, `duplicated`, `extra`, `stale` or (a warning) `repeated`.
    pub kind: &'static str,
    /// Tenant.
    pub tenant: String,
    /// Start of the bucket, Unix milliseconds.
    pub bucket: i64,
    /// How many events.
    pub count: u64,
    /// One of the events, when known, with what is wrong with it.
    pub example: Option<String>,
}

impl Finding {
    /// Whether it is only a warning (the audit still passes).
    pub fn is_warning(&self) -> bool {
        self.kind == "repeated"
    }
}

/// The result of an audit.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One row per tenant and bucket.
    pub rows: Vec<Row>,
    /// Discrepancies and warnings.
    pub findings: Vec<Finding>,
    /// The audited sinks, in column order.
    pub sinks: Vec<&'static str>,
}

fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn sink_column(name: &str) -> &str {
    match name {
        "elasticsearch" => "es",
        other => other,
    }
}

impl Report {
    /// Whether nothing is missing, duplicated, extra or stale.
    pub fn ok(&self) -> bool {
        self.findings.iter().all(Finding::is_warning)
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
        let line = |cells: Vec<String>| -> String {
            let widths = [16, 17, 7, 7, 9, 8, 10, 8];
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(9);
                if i < 2 {
                    s += &format!("{c:<w$} ");
                } else {
                    s += &format!("{c:>w$} ");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut head: Vec<String> = [
            "tenant",
            "bucket",
            "raw",
            "parsed",
            "parse-dlq",
            "enriched",
            "enrich-dlq",
            "sink-dlq",
        ]
        .map(String::from)
        .to_vec();
        head.extend(self.sinks.iter().map(|s| sink_column(s).to_string()));
        head.extend(["in-flight".to_string(), "repeated".to_string()]);
        let mut s = line(head);
        let mut total = Row {
            tenant: "total".into(),
            sinks: self.sinks.iter().map(|n| (*n, 0)).collect(),
            ..Row::default()
        };
        let cells = |r: &Row, bucket: String| -> Vec<String> {
            let mut v = vec![
                r.tenant.clone(),
                bucket,
                r.raw.to_string(),
                r.parsed.to_string(),
                r.parse_dlq.to_string(),
                r.enriched.to_string(),
                r.enrich_dlq.to_string(),
                r.sink_dlq.to_string(),
            ];
            v.extend(self.sinks.iter().map(|n| r.sink(n).to_string()));
            v.extend([r.in_flight.to_string(), r.repeated.to_string()]);
            v
        };
        for r in &self.rows {
            s += &line(cells(r, time(r.bucket)));
            total.raw += r.raw;
            total.parsed += r.parsed;
            total.parse_dlq += r.parse_dlq;
            total.enriched += r.enriched;
            total.enrich_dlq += r.enrich_dlq;
            total.sink_dlq += r.sink_dlq;
            for (name, n) in &mut total.sinks {
                *n += r.sink(name);
            }
            total.in_flight += r.in_flight;
            total.repeated += r.repeated;
        }
        s += &line(cells(&total, String::new()));
        for f in &self.findings {
            s += &format!(
                "{} {}: {} event(s) {} for tenant {} in bucket {}{}{}\n",
                f.kind.to_uppercase(),
                f.layer,
                f.count,
                match f.kind {
                    "stale" => "hold an older processing than the enriched topic's newest record",
                    "repeated" => "written more than once outside replays (at-least-once redelivery; the sinks keep one)",
                    other => other,
                },
                f.tenant,
                time(f.bucket),
                f.example
                    .as_ref()
                    .map(|e| format!(" (e.g. {e})"))
                    .unwrap_or_default(),
                if f.is_warning() { " [warning]" } else { "" },
            );
        }
        let failing = self.findings.iter().filter(|f| !f.is_warning()).count();
        s += &if failing == 0 {
            "audit: every event is accounted for\n".to_string()
        } else {
            format!("audit: {failing} finding(s)\n")
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
/// every record of the window, and, for each of `groups`, whether it has yet to commit it.
fn scan_topic(
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
fn count_write(cell: &mut Cell, layer: &'static str, m: &BorrowedMessage<'_>) {
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

/// Read every layer and reconcile it.
pub async fn run(config: &Config, window: &Window) -> Result<Report> {
    let sinks = audited_sinks(config);
    let mut cells = {
        let (config, window, sinks) = (config.clone(), window.clone(), sinks.clone());
        tokio::task::spawn_blocking(move || scan_topics(&config, &window, &sinks))
            .await
            .context("audit task")??
    };
    let selection = Selection::Received {
        from: window.from.timestamp_millis(),
        to: window.to.timestamp_millis(),
        tenant: window.tenant.clone(),
    };
    for (i, sink) in sinks.iter().enumerate() {
        let stored = match sink.name {
            "timescale" => {
                let pool = sluice_sinks::timescale::pool(&config.timescale)?;
                let rows = sluice_sinks::timescale::read::read_stored(
                    &pool,
                    &config.timescale.schema,
                    &selection,
                    window.values,
                )
                .await
                .context("reading the events table")?;
                pool.close();
                rows
            }
            _ => {
                let es = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
                sluice_sinks::elasticsearch::read::read_stored(
                    &es,
                    &config.elasticsearch.index_prefix,
                    &selection,
                    window.values,
                )
                .await
                .context("reading the Elasticsearch documents")?
            }
        };
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
        Some(crate::pipeline::reading_codec::<EnrichedEvent>(config)?)
    } else {
        None
    };
    Ok(reconcile(&cells, &sinks, codec.as_deref()))
}

fn scan_topics(config: &Config, window: &Window, sinks: &[AuditedSink]) -> Result<Cells> {
    let t = &config.topics;
    let mut cells = Cells::new();
    scan_topic(
        config,
        window,
        &mut cells,
        &t.raw,
        &[&config.parse.group],
        |c, m, pending| {
            let (_, _, id) = identity(m, headers::EVENT_ID);
            if pending[0] {
                c.parse_pending.insert(id.clone());
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
            let version = headers::processed_at(m);
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

/// Compare the layers of every cell. With `codec`, stored values are compared with the
/// enriched topic's newest record of each event.
fn reconcile(
    cells: &Cells,
    sinks: &[AuditedSink],
    codec: Option<&sluice_schemas::Codec<EnrichedEvent>>,
) -> Report {
    let mut report = Report {
        sinks: sinks.iter().map(|s| s.name).collect(),
        ..Report::default()
    };
    let empty = SinkCell::default();
    for ((tenant, bucket), c) in cells {
        let mut finding = |layer: &'static str, kind: &'static str, mut examples: Vec<String>| {
            if !examples.is_empty() {
                examples.sort();
                report.findings.push(Finding {
                    layer,
                    kind,
                    tenant: tenant.clone(),
                    bucket: *bucket,
                    count: examples.len() as u64,
                    example: examples.into_iter().next(),
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
                missing.push(id.clone());
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
                missing.push(id.clone());
            }
        }
        finding("enrich", "missing", missing);
        // Each sink: exactly the enriched events it did not dead-letter, each once, at the
        // newest version (and values) the enriched topic has.
        let mut counts = Vec::new();
        let mut sink_dlq = 0;
        for (i, sink) in sinks.iter().enumerate() {
            let s = c.sinks.get(i).unwrap_or(&empty);
            sink_dlq += s.dlq.len();
            let mut missing = Vec::new();
            for id in &c.enriched {
                if s.stored.contains_key(id) || s.dlq.contains(id) {
                    continue;
                }
                if s.pending.contains(id) {
                    in_flight.insert(id);
                } else {
                    missing.push(id.clone());
                }
            }
            finding(sink.name, "missing", missing);
            let duplicated = s
                .stored
                .iter()
                .filter(|(_, v)| v.len() > 1)
                .map(|(id, _)| id.clone())
                .collect();
            finding(sink.name, "duplicated", duplicated);
            let extra = s
                .stored
                .keys()
                .filter(|id| !c.enriched.contains(*id))
                .cloned()
                .collect();
            finding(sink.name, "extra", extra);
            let mut stale = Vec::new();
            for (id, versions) in &s.stored {
                let (Some(latest), Some(stored)) = (c.latest.get(id), versions.first()) else {
                    continue;
                };
                if s.pending.contains(id) {
                    continue; // its newest record is still on its way
                }
                // 0: written before versions were stored; only values can tell.
                if stored.processed_at != 0 && stored.processed_at < latest.version {
                    stale.push(format!(
                        "{id}: version {} < {}",
                        stored.processed_at, latest.version
                    ));
                    continue;
                }
                let (Some(codec), Some(bytes), Some(held)) =
                    (codec, &latest.payload, &stored.event)
                else {
                    continue;
                };
                let Ok(newest) = codec.decode(bytes) else {
                    continue;
                };
                if let Some((field, want, got)) = differences(&newest, held).into_iter().next() {
                    let v = |x: Option<String>| x.unwrap_or_else(|| "null".into());
                    stale.push(format!("{id}: {field} {} ≠ {}", v(got), v(want)));
                }
            }
            finding(sink.name, "stale", stale);
            counts.push((sink.name, s.stored.len()));
        }
        let mut repeated = 0;
        for (layer, writes) in &c.writes {
            let ids: Vec<String> = writes
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| format!("{id} ×{n}"))
                .collect();
            repeated += ids.len();
            finding(layer, "repeated", ids);
        }
        report.rows.push(Row {
            tenant: tenant.clone(),
            bucket: *bucket,
            raw: c.raw.len(),
            parsed: c.raw.iter().filter(|id| c.parsed_raw.contains(*id)).count(),
            parse_dlq: c.parse_dlq.len(),
            enriched: c.enriched.len(),
            enrich_dlq: c.enrich_dlq.len(),
            sink_dlq,
            sinks: counts,
            in_flight: in_flight.len(),
            repeated,
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

    fn stored(id: &str, version: i64) -> Stored {
        Stored {
            tenant: "acme".into(),
            event_id: id.into(),
            received_at: 0,
            processed_at: version,
            event: None,
        }
    }

    fn sinks() -> Vec<AuditedSink> {
        ["timescale", "elasticsearch"]
            .map(|name| AuditedSink {
                name,
                group: String::new(),
            })
            .to_vec()
    }

    #[test]
    fn accounted_and_unaccounted() {
        let mut cells = Cells::new();
        let c = cells.entry(("acme".into(), 0)).or_default();
        c.raw = ids(&["r1", "r2", "r3", "r4"]);
        c.parsed_raw = ids(&["r1", "r2"]);
        c.parse_dlq = ids(&["r3"]);
        c.parsed = ids(&["e1", "e2"]);
        c.enriched = ids(&["e1", "e2"]);
        for id in ["e1", "e2"] {
            c.latest.insert(
                id.into(),
                Latest {
                    version: 5,
                    payload: None,
                },
            );
        }
        c.sink(0).stored = HashMap::from([
            ("e1".to_string(), vec![stored("e1", 5)]),
            ("e2".to_string(), vec![stored("e2", 5), stored("e2", 5)]),
        ]);
        // Elasticsearch: e1 at an old version, e2 in flight, and a document no topic has.
        c.sink(1).stored = HashMap::from([
            ("e1".to_string(), vec![stored("e1", 3)]),
            ("zz".to_string(), vec![stored("zz", 5)]),
        ]);
        c.sink(1).pending = ids(&["e2"]);
        c.writes
            .insert("parsed", HashMap::from([("r1".to_string(), 2)]));
        let report = reconcile(&cells, &sinks(), None);
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
        assert_eq!(
            report.count("elasticsearch", "extra"),
            1,
            "a missing and an extra do not cancel out"
        );
        assert_eq!(report.count("elasticsearch", "stale"), 1);
        assert_eq!(report.count("parsed", "repeated"), 1);
        assert_eq!(report.rows[0].in_flight, 1);
        assert_eq!(report.rows[0].repeated, 1);
        assert!(!report.ok());
        let text = report.render();
        assert!(
            text.contains("STALE elasticsearch: 1 event(s)") && text.contains("e1: version 3 < 5"),
            "{text}"
        );
        assert!(text.contains("[warning]"), "{text}");
    }

    #[test]
    fn values_are_compared_field_by_field() {
        let codec = sluice_schemas::ENRICHED_EVENTS.clone();
        let mut newest = EnrichedEvent {
            event_id: "e1".into(),
            tenant: "acme".into(),
            ..Default::default()
        };
        newest.country = Some("DE".into());
        let mut held = newest.clone();
        held.country = Some("XX".into());
        let mut cells = Cells::new();
        let c = cells.entry(("acme".into(), 0)).or_default();
        c.enriched = ids(&["e1"]);
        c.latest.insert(
            "e1".into(),
            Latest {
                version: 5,
                payload: Some(codec.encode(&newest).unwrap()),
            },
        );
        let mut s = stored("e1", 5);
        s.event = Some(held);
        c.sink(0).stored = HashMap::from([("e1".to_string(), vec![s.clone()])]);
        s.event = Some(newest);
        c.sink(1).stored = HashMap::from([("e1".to_string(), vec![s])]);
        let report = reconcile(&cells, &sinks(), Some(&codec));
        assert_eq!(report.count("timescale", "stale"), 1);
        assert_eq!(report.count("elasticsearch", "stale"), 0);
        assert_eq!(
            report.findings[0].example.as_deref(),
            Some("e1: country XX ≠ DE")
        );
    }
}
