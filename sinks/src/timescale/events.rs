//! Enriched events into the events table, one row per event, newest processing wins.
//!
//! An event is identified by `(tenant, event_id)`. A hypertable's unique keys must hold
//! its time column, so the table's key is `(tenant, event_id, time)` and a small
//! `event_keys` table holds each event's current time and version (its processing
//! stamp). One batch is one transaction:
//!
//! 1. upsert the batch into `event_keys`, keeping only versions at least as new as the
//!    stored one, and learn which events moved to another time;
//! 2. upsert the accepted rows into `events` (`ON CONFLICT … DO UPDATE`);
//! 3. delete the rows a moved event left at its old time (only then, with the old times
//!    as constants, so TimescaleDB looks only at their chunks);
//! 4. queue the continuous-aggregate buckets no refresh policy will reach.
//!
//! A late re-delivery of an older processing changes nothing. The batch's rows are
//! inserted in key order, so concurrent batches lock shared keys in the same order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::config::TimescaleConfig;
use chrono::{DateTime, Utc};
use sluice_core::failure::Failure;
use sluice_core::headers::split_version;
use sluice_schemas::fields::{FieldKind, FieldValue, ENRICHED_FIELDS};
use sluice_schemas::EnrichedEvent;
use tokio_postgres::types::ToSql;

use super::aggregates::{self, RefreshRule};
use super::errors::{InsertError, Verdict};
use super::Pool;
use crate::consumer::{BatchWriter, Versioned, WriteError, WriteResult};
use sluice_core::retry::RetryAction;

/// The SQL type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    /// `text`.
    Text,
    /// `timestamptz`.
    Time,
    /// `jsonb`, sent as text.
    Json,
    /// `integer`.
    Int,
}

/// One column of the events table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Column name.
    pub name: &'static str,
    /// Its type.
    pub ty: SqlType,
    /// Whether it holds a value in every row.
    pub not_null: bool,
    /// Where its value comes from: a field of the event, or its version.
    source: Source,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Field(for<'a> fn(&'a EnrichedEvent) -> FieldValue<'a>),
    /// The processing-time part of the version.
    ProcessedAt,
    /// The replay-epoch part of the version.
    ReplayEpoch,
}

impl Column {
    /// The column's SQL type, as in `ALTER TABLE … ADD COLUMN`.
    pub fn sql_type(&self) -> &'static str {
        match self.ty {
            SqlType::Text => "text",
            SqlType::Time => "timestamptz",
            SqlType::Json => "jsonb",
            SqlType::Int => "integer",
        }
    }

    fn array_type(&self) -> &'static str {
        match self.ty {
            SqlType::Text | SqlType::Json => "text[]",
            SqlType::Time => "timestamptz[]",
            SqlType::Int => "int[]",
        }
    }
}

/// The column a field is stored in: its own name, but the event time is `time`.
pub fn column_name(field: &str) -> &str {
    match field {
        "event_time" => "time",
        other => other,
    }
}

const fn column_of(f: &sluice_schemas::fields::Field) -> Column {
    Column {
        name: match f.name.as_bytes() {
            b"event_time" => "time",
            _ => f.name,
        },
        ty: match f.kind {
            FieldKind::Time => SqlType::Time,
            FieldKind::Json => SqlType::Json,
            FieldKind::Key | FieldKind::Keyword | FieldKind::Text => SqlType::Text,
        },
        not_null: f.kind.required(),
        source: Source::Field(f.get),
    }
}

/// The events table's columns: one per field of the event, then its version (processing
/// time and replay epoch).
pub static COLUMNS: std::sync::LazyLock<Vec<Column>> = std::sync::LazyLock::new(|| {
    ENRICHED_FIELDS
        .iter()
        .map(column_of)
        .chain([
            Column {
                name: "processed_at",
                ty: SqlType::Time,
                not_null: false,
                source: Source::ProcessedAt,
            },
            Column {
                name: "replay_epoch",
                ty: SqlType::Int,
                not_null: false,
                source: Source::ReplayEpoch,
            },
        ])
        .collect()
});

/// How the events table keeps one row per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Plain PostgreSQL: the table's key is `(tenant, event_id)`; a moved event is an
    /// update of its row.
    Direct,
    /// A hypertable: its key must hold the time, so it is `(tenant, event_id, time)`, and
    /// `event_keys` keeps `(tenant, event_id)` unique and says where each event is.
    Keyed,
}

impl Layout {
    /// The layout of a TimescaleDB (`true`) or plain PostgreSQL events table.
    pub fn of(timescale: bool) -> Self {
        if timescale {
            Self::Keyed
        } else {
            Self::Direct
        }
    }

    /// Statements that turn the events table (keyed by `(time, event_id)` before) into
    /// this layout; `{s}` stands for the schema. Rows of one event at several times (the
    /// old key allowed them) keep the latest.
    pub const fn ddl(self) -> &'static [&'static str] {
        match self {
            Self::Direct => &[
                "DELETE FROM {s}.events a USING {s}.events b
                 WHERE a.tenant = b.tenant AND a.event_id = b.event_id AND a.time < b.time",
                "ALTER TABLE {s}.events DROP CONSTRAINT IF EXISTS events_pkey",
                "ALTER TABLE {s}.events ADD PRIMARY KEY (tenant, event_id)",
            ],
            Self::Keyed => &[
                "ALTER TABLE {s}.events DROP CONSTRAINT IF EXISTS events_pkey",
                "ALTER TABLE {s}.events ADD PRIMARY KEY (tenant, event_id, time)",
                "CREATE TABLE IF NOT EXISTS {s}.event_keys (
                    tenant text NOT NULL,
                    event_id text NOT NULL,
                    time timestamptz NOT NULL,
                    processed_at timestamptz NOT NULL,
                    prev_time timestamptz,
                    PRIMARY KEY (tenant, event_id))",
                "CREATE INDEX IF NOT EXISTS event_keys_time ON {s}.event_keys (time)",
                "INSERT INTO {s}.event_keys (tenant, event_id, time, processed_at)
                 SELECT DISTINCT ON (tenant, event_id) tenant, event_id, time, coalesce(processed_at, '-infinity')
                 FROM {s}.events ORDER BY tenant, event_id, time DESC
                 ON CONFLICT DO NOTHING",
                "DELETE FROM {s}.events e USING {s}.event_keys k
                 WHERE e.tenant = k.tenant AND e.event_id = k.event_id AND e.time <> k.time",
            ],
        }
    }
}

/// The batch statement (steps 1 and 2). It returns the rows written and the events that
/// moved, with their old times (none in the direct layout: a move is an update).
pub fn upsert_sql(schema: &str, layout: Layout) -> String {
    let cols = &*COLUMNS;
    let names: Vec<&str> = cols.iter().map(|c| c.name).collect();
    let list = names.join(", ");
    let arrays: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, c.array_type()))
        .collect();
    let selected: Vec<String> = cols
        .iter()
        .map(|c| match c.ty {
            SqlType::Json => format!("i.{}::jsonb", c.name),
            _ => format!("i.{}", c.name),
        })
        .collect();
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| !["tenant", "event_id", "time"].contains(&c.name))
        .map(|c| format!("{0} = EXCLUDED.{0}", c.name))
        .collect();
    if layout == Layout::Direct {
        let moves: Vec<String> = std::iter::once("time = EXCLUDED.time".to_string())
            .chain(updates.iter().cloned())
            .collect();
        return format!(
            "WITH input AS (SELECT * FROM unnest({arrays}) AS r({list})),
             written AS (
               INSERT INTO {schema}.events AS e ({list})
               SELECT {selected} FROM input i ORDER BY i.tenant, i.event_id
               ON CONFLICT (tenant, event_id) DO UPDATE SET {moves}
                 WHERE (coalesce(e.replay_epoch, 0), coalesce(e.processed_at, '-infinity'))
                     < (EXCLUDED.replay_epoch, EXCLUDED.processed_at)
               RETURNING 1)
             SELECT (SELECT count(*) FROM written), '{{}}'::text[], '{{}}'::text[], '{{}}'::timestamptz[]",
            arrays = arrays.join(", "),
            selected = selected.join(", "),
            moves = moves.join(", "),
        );
    }
    format!(
        "WITH input AS (SELECT * FROM unnest({arrays}) AS r({list})),
         keys AS (
           INSERT INTO {schema}.event_keys AS k (tenant, event_id, time, processed_at, replay_epoch)
           SELECT tenant, event_id, time, processed_at, replay_epoch FROM input ORDER BY tenant, event_id
           ON CONFLICT (tenant, event_id) DO UPDATE
             SET time = EXCLUDED.time, processed_at = EXCLUDED.processed_at,
               replay_epoch = EXCLUDED.replay_epoch, prev_time = k.time
             WHERE (k.replay_epoch, k.processed_at) <= (EXCLUDED.replay_epoch, EXCLUDED.processed_at)
           RETURNING k.tenant, k.event_id, k.time, k.prev_time),
         written AS (
           INSERT INTO {schema}.events AS e ({list})
           SELECT {selected} FROM input i JOIN keys USING (tenant, event_id)
           ORDER BY i.tenant, i.event_id
           ON CONFLICT (tenant, event_id, time) DO UPDATE SET {updates}
             WHERE (e.processed_at, e.replay_epoch) IS DISTINCT FROM (EXCLUDED.processed_at, EXCLUDED.replay_epoch)
           RETURNING 1)
         SELECT (SELECT count(*) FROM written),
           ARRAY(SELECT tenant FROM keys WHERE prev_time <> time),
           ARRAY(SELECT event_id FROM keys WHERE prev_time <> time),
           ARRAY(SELECT prev_time FROM keys WHERE prev_time <> time)",
        arrays = arrays.join(", "),
        selected = selected.join(", "),
        updates = updates.join(", "),
    )
}

/// The rows moved events left behind (step 3); their old times are constants of the
/// statement, so TimescaleDB opens only those chunks.
fn delete_moved_sql(schema: &str) -> String {
    format!(
        "DELETE FROM {schema}.events WHERE time = ANY($3)
           AND (tenant, event_id, time) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]))"
    )
}

/// A batch as one array per column, borrowing the events' strings.
struct Params<'a> {
    values: Vec<Box<dyn ToSql + Send + Sync + 'a>>,
}

impl<'a> Params<'a> {
    fn of(rows: &[(&'a EnrichedEvent, i64)]) -> Self {
        let ts = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let values = COLUMNS
            .iter()
            .map(|c| -> Box<dyn ToSql + Send + Sync + 'a> {
                match c.source {
                    Source::ProcessedAt => Box::new(
                        rows.iter()
                            .map(|(_, v)| ts(split_version(*v).1))
                            .collect::<Vec<_>>(),
                    ),
                    Source::ReplayEpoch => Box::new(
                        rows.iter()
                            .map(|(_, v)| split_version(*v).0 as i32)
                            .collect::<Vec<i32>>(),
                    ),
                    Source::Field(get) => match c.ty {
                        SqlType::Text => Box::new(
                            rows.iter()
                                .map(|(e, _)| match get(e) {
                                    FieldValue::Str(s) => s,
                                    _ => None,
                                })
                                .collect::<Vec<Option<&'a str>>>(),
                        ),
                        SqlType::Time => Box::new(
                            rows.iter()
                                .map(|(e, _)| match get(e) {
                                    FieldValue::Millis(ms) => ts(ms),
                                    _ => DateTime::<Utc>::default(),
                                })
                                .collect::<Vec<_>>(),
                        ),
                        SqlType::Json => Box::new(
                            rows.iter()
                                .map(|(e, _)| match get(e) {
                                    FieldValue::Json(m) => {
                                        sluice_schemas::fields::json_object(m).to_string()
                                    }
                                    _ => "{}".to_string(),
                                })
                                .collect::<Vec<String>>(),
                        ),
                        // No field is an integer column (only the replay epoch is).
                        SqlType::Int => Box::new(vec![0i32; rows.len()]),
                    },
                }
            })
            .collect();
        Self { values }
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.values.iter().map(|v| v.as_ref() as _).collect()
    }
}

/// What one batch transaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Rows inserted or changed (a re-delivered, unchanged row is not counted).
    pub written: u64,
    /// Events that moved to another time (their old rows were removed).
    pub moved: u64,
}

/// Writes batches of enriched events to the events table.
pub struct EventsWriter {
    pool: Pool,
    schema: String,
    upsert: String,
    delete_moved: String,
    /// `None` on plain PostgreSQL (no aggregates).
    refresh: Option<RefreshRule>,
    retention_days: Option<u32>,
    last_cleanup: std::sync::Mutex<Option<Instant>>,
}

impl EventsWriter {
    /// A writer into `config.schema`'s tables through `pool` (already migrated);
    /// `timescale` says whether it is a hypertable with aggregates to keep fresh, and
    /// `replay` that every bucket it touches is refreshed when it settles.
    pub fn new(pool: Pool, config: &TimescaleConfig, timescale: bool, replay: bool) -> Self {
        let refresh = timescale.then_some(RefreshRule {
            policies: config.refresh_policies,
            everything: replay,
        });
        Self::with_layout(pool, config, Layout::of(timescale), refresh)
    }

    /// A writer for a table of `layout`, refreshing aggregates by `refresh` (none: no
    /// aggregates).
    pub fn with_layout(
        pool: Pool,
        config: &TimescaleConfig,
        layout: Layout,
        refresh: Option<RefreshRule>,
    ) -> Self {
        let timescale = refresh.is_some();
        let schema = config.schema.clone();
        // Exported at 0 from the start, so rate() sees a zero.
        metrics::counter!("sluice_sink_events_moved_total", "sink" => "timescale").increment(0);
        if timescale {
            metrics::counter!("sluice_sink_aggregate_refreshes_total", "sink" => "timescale")
                .increment(0);
        }
        Self {
            upsert: upsert_sql(&schema, layout),
            delete_moved: delete_moved_sql(&schema),
            pool,
            schema,
            refresh,
            retention_days: config.retention_days,
            last_cleanup: std::sync::Mutex::new(None),
        }
    }

    /// Write `rows` (event and version, one per event) in one transaction.
    pub async fn upsert(&self, rows: &[(&EnrichedEvent, i64)]) -> Result<Outcome, InsertError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let params = Params::of(rows);
        let stmt = tx.prepare_cached(&self.upsert).await?;
        let row = tx.query_one(&stmt, &params.refs()).await?;
        let written: i64 = row.get(0);
        let tenants: Vec<String> = row.get(1);
        let ids: Vec<String> = row.get(2);
        let old_times: Vec<DateTime<Utc>> = row.get(3);
        if !ids.is_empty() {
            tx.execute(&self.delete_moved, &[&tenants, &ids, &old_times])
                .await?;
        }
        if let Some(rule) = &self.refresh {
            let times = rows
                .iter()
                .map(|(e, _)| e.event_time)
                .chain(old_times.iter().map(|t| t.timestamp_millis()));
            let ranges = rule.ranges(times.collect::<Vec<_>>(), sluice_core::now_ms());
            if !ranges.is_empty() {
                aggregates::enqueue(&tx, &self.schema, &ranges).await?;
            }
        }
        tx.commit().await?;
        Ok(Outcome {
            written: written as u64,
            moved: ids.len() as u64,
        })
    }

    /// Drop the `event_keys` of events older than the retention (their rows went with
    /// their chunks), at most once an hour.
    async fn clean_keys(&self) -> Result<(), InsertError> {
        let Some(days) = self.retention_days else {
            return Ok(());
        };
        {
            let mut last = self
                .last_cleanup
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let client = self.pool.get().await?;
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {}.event_keys WHERE time < now() - make_interval(days => $1)",
                    self.schema
                ),
                &[&(days as i32)],
            )
            .await?;
        if n > 0 {
            tracing::info!(
                keys = n,
                days,
                "forgot the keys of events past the retention"
            );
        }
        Ok(())
    }
}

/// Of several versions of one event in a batch, the newest (the later one on a tie);
/// records whose times cannot be stored are refused. Returns `(index, version)` of the
/// rows to write, in batch order.
fn newest_per_event(
    batch: &[Versioned<EnrichedEvent>],
    failures: &mut Vec<(usize, Failure)>,
) -> Vec<usize> {
    let mut newest: HashMap<(&str, &str), usize> = HashMap::with_capacity(batch.len());
    for (i, v) in batch.iter().enumerate() {
        let e = &v.record;
        if DateTime::from_timestamp_millis(e.event_time).is_none()
            || DateTime::from_timestamp_millis(e.received_at).is_none()
        {
            failures.push((
                i,
                Failure::new("write", "event_time or received_at out of range"),
            ));
            continue;
        }
        // Refused here, alone: sent to the database it would fail the whole batch.
        if let Some(field) = e.field_with_nul() {
            failures.push((
                i,
                Failure::new(
                    "write",
                    format!("field `{field}` holds a NUL character, which PostgreSQL cannot store"),
                ),
            ));
            continue;
        }
        newest
            .entry((e.tenant.as_str(), e.event_id.as_str()))
            .and_modify(|j| {
                if v.version >= batch[*j].version {
                    *j = i;
                }
            })
            .or_insert(i);
    }
    let mut keep: Vec<usize> = newest.into_values().collect();
    keep.sort_unstable();
    keep
}

impl EventsWriter {
    /// Write a batch; rows the database refuses for their data are written one by one,
    /// so that only they are rejected.
    async fn write_rows(
        &self,
        batch: &[Versioned<EnrichedEvent>],
    ) -> Result<Vec<(usize, Failure)>, WriteError> {
        let mut failures = Vec::new();
        let keep = newest_per_event(batch, &mut failures);
        let rows: Vec<(&EnrichedEvent, i64)> = keep
            .iter()
            .map(|&i| (&batch[i].record, batch[i].version))
            .collect();
        match self.upsert(&rows).await {
            Ok(outcome) => {
                if outcome.moved > 0 {
                    metrics::counter!("sluice_sink_events_moved_total", "sink" => "timescale")
                        .increment(outcome.moved);
                }
                return Ok(failures);
            }
            Err(e) => {
                e.into_write_error()?;
            }
        }
        // Refused for a row's data: write rows one by one, so only the bad ones go to
        // the dead-letter topic.
        tracing::info!("batch rejected for its data; writing rows one by one");
        for (&i, row) in keep.iter().zip(&rows) {
            if let Err(err) = self.upsert(std::slice::from_ref(row)).await {
                let reason = err.to_string();
                if err.into_write_error()? == Verdict::Row {
                    failures.push((i, Failure::new("write", reason)));
                }
            }
        }
        Ok(failures)
    }
}

impl BatchWriter for EventsWriter {
    type Record = EnrichedEvent;

    fn name(&self) -> &'static str {
        "timescale"
    }

    async fn write(&self, batch: &[Versioned<EnrichedEvent>]) -> WriteResult {
        self.write_rows(batch)
            .await
            .map_or_else(WriteResult::from, RetryAction::Successful)
    }

    async fn settle(&self) -> Result<Vec<String>, WriteError> {
        let fail = |e: InsertError| match e.verdict() {
            Verdict::Fatal => WriteError::Fatal(e.to_string()),
            _ => WriteError::Transient(e.to_string()),
        };
        self.clean_keys().await.map_err(fail)?;
        if self.refresh.is_none() {
            return Ok(Vec::new());
        }
        let ranges = aggregates::refresh_queued(&self.pool, &self.schema)
            .await
            .map_err(fail)?;
        Ok(ranges.iter().map(|r| format!("refreshed {r}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tenant: &str, id: &str) -> EnrichedEvent {
        EnrichedEvent::from_click(sluice_schemas::ClickEvent {
            event_id: id.into(),
            tenant: tenant.into(),
            user_id: "u".into(),
            session_id: None,
            event_type: "click".into(),
            url: None,
            referrer: None,
            event_time: 1_000,
            received_at: 2_000,
            user_agent: None,
            ip: None,
            extra: Default::default(),
        })
    }

    #[test]
    fn columns_follow_the_field_table() {
        let names: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), ENRICHED_FIELDS.len() + 2);
        assert!(names.contains(&"time") && !names.contains(&"event_time"));
        assert_eq!(names[names.len() - 2..], ["processed_at", "replay_epoch"]);
        for layout in [Layout::Direct, Layout::Keyed] {
            let sql = upsert_sql("s", layout);
            for n in &names {
                assert!(sql.contains(n), "{n} missing from the statement");
            }
            assert!(sql.contains(&format!("${}::timestamptz[]", COLUMNS.len() - 1)));
            assert!(sql.contains(&format!("${}::int[]", COLUMNS.len())));
        }
    }

    #[test]
    fn the_newest_version_of_an_event_in_a_batch_wins() {
        let v = |tenant: &str, id: &str, at: i64| Versioned {
            record: event(tenant, id),
            version: at,
        };
        let mut bad = v("a", "x", 1);
        bad.record.event_time = i64::MAX;
        let batch = vec![
            v("a", "e1", 5),
            v("b", "e1", 1),
            v("a", "e1", 9),
            v("a", "e1", 7),
            bad,
        ];
        let mut failures = Vec::new();
        // Same id, other tenant: another event. Of tenant a's three versions, 9 wins.
        assert_eq!(newest_per_event(&batch, &mut failures), vec![1, 2]);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, 4);
    }
}
