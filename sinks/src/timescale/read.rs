//! Reading events back from the events table (for `sluice audit` and `replay --diff`).

use chrono::{DateTime, Utc};
use sluice_core::headers::version_of;
use sluice_schemas::fields::{json_texts, Stored as Value, ENRICHED_FIELDS};
use sluice_schemas::EnrichedEvent;

use super::errors::InsertError;
use super::events::{column_name, SqlType, COLUMNS};
use super::Pool;
use crate::{Selection, Stored};

/// Every row of `selection` in `schema`'s events table; with `events`, the whole event of
/// each row too.
pub async fn read_stored(
    pool: &Pool,
    schema: &str,
    selection: &Selection,
    events: bool,
) -> Result<Vec<Stored>, InsertError> {
    let cols: Vec<String> = COLUMNS.iter().map(|c| format!("e.{}", c.name)).collect();
    let select = format!(
        "SELECT e.tenant, e.event_id, (extract(epoch FROM e.received_at) * 1000)::bigint,
           coalesce((extract(epoch FROM e.processed_at) * 1000)::bigint, 0),
           coalesce(e.replay_epoch, 0){}",
        if events {
            format!(", {}", cols.join(", "))
        } else {
            String::new()
        }
    );
    let client = pool.get().await?;
    let mut out = Vec::new();
    match selection {
        Selection::Received { from, to, tenant } => {
            // Years 0..9999 hold every time PostgreSQL stores.
            let ts = |ms: i64| {
                DateTime::from_timestamp_millis(ms.clamp(-62_167_219_200_000, 253_402_300_799_999))
                    .unwrap_or_default()
            };
            let rows = client
                .query(
                    &format!(
                        "{select} FROM {schema}.events e
                         WHERE e.received_at >= $1 AND e.received_at < $2 AND ($3::text IS NULL OR e.tenant = $3)"
                    ),
                    &[&ts(*from), &ts(*to), tenant],
                )
                .await?;
            out.extend(rows.iter().map(|r| stored(r, events)));
        }
        Selection::Events(keys) => {
            // A hypertable's events are found through event_keys, which says at which
            // time (chunk) each is; a plain PostgreSQL table has no event_keys and is
            // keyed by the event itself.
            let keyed: bool = client
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&format!("{schema}.event_keys")],
                )
                .await?
                .get(0);
            let join = if keyed {
                format!(
                    "JOIN {schema}.event_keys k USING (tenant, event_id)
                     JOIN {schema}.events e ON e.tenant = k.tenant AND e.event_id = k.event_id AND e.time = k.time"
                )
            } else {
                format!("JOIN {schema}.events e ON e.tenant = w.tenant AND e.event_id = w.event_id")
            };
            for chunk in keys.chunks(5_000) {
                let tenants: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
                let ids: Vec<&str> = chunk.iter().map(|(_, id)| id.as_str()).collect();
                let rows = client
                    .query(
                        &format!(
                            "{select} FROM unnest($1::text[], $2::text[]) AS w(tenant, event_id) {join}"
                        ),
                        &[&tenants, &ids],
                    )
                    .await?;
                out.extend(rows.iter().map(|r| stored(r, events)));
            }
        }
    }
    Ok(out)
}

fn stored(r: &tokio_postgres::Row, events: bool) -> Stored {
    Stored {
        tenant: r.get(0),
        event_id: r.get(1),
        received_at: r.get(2),
        version: version_of(u32::try_from(r.get::<_, i32>(4)).unwrap_or(0), r.get(3)),
        event: events.then(|| event_of(r, 5)),
    }
}

/// The event of a row whose columns [`COLUMNS`] start at `first`.
fn event_of(r: &tokio_postgres::Row, first: usize) -> EnrichedEvent {
    let mut e = EnrichedEvent::default();
    for f in ENRICHED_FIELDS {
        let Some(i) = COLUMNS.iter().position(|c| c.name == column_name(f.name)) else {
            continue;
        };
        let value = match COLUMNS[i].ty {
            SqlType::Text => Value::Str(r.get(first + i)),
            SqlType::Time => Value::Millis(
                r.get::<_, Option<DateTime<Utc>>>(first + i)
                    .map_or(0, |t| t.timestamp_millis()),
            ),
            SqlType::Json => Value::Json(json_texts(
                &r.get::<_, Option<serde_json::Value>>(first + i)
                    .unwrap_or_default(),
            )),
            SqlType::Int => continue,
        };
        (f.set)(&mut e, value);
    }
    e
}
