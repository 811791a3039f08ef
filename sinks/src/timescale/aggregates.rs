//! Continuous aggregates, and keeping them correct when old rows change.
//!
//! TimescaleDB's refresh policies only look at a recent window (e.g. the last 2 hours of
//! the per-minute aggregate). A replay of last week's data, or a late event, changes rows
//! no policy will ever look at again. So a batch that touches rows outside every
//! policy's reach also records the buckets it touched in a queue table, in the same
//! transaction; the sink then refreshes those buckets (coalesced into ranges) every few
//! seconds and when it stops. A crash between the write and the refresh loses nothing:
//! the queue is durable and the next run of the sink refreshes what it holds.

use chrono::{DateTime, Utc};

use super::errors::InsertError;
use super::Pool;

/// One continuous aggregate and its refresh policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aggregate {
    /// View name (in the sink's schema).
    pub name: &'static str,
    /// Bucket width, seconds.
    pub bucket_s: i64,
    /// The policy refreshes from this long ago...
    pub policy_start_s: i64,
    /// ...to this long ago.
    pub policy_end_s: i64,
    /// How often the policy runs, seconds.
    pub schedule_s: i64,
}

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// Continuous aggregates in refresh order (a hierarchical one after its source).
pub const AGGREGATES: &[Aggregate] = &[
    Aggregate {
        name: "page_views_1m",
        bucket_s: MINUTE,
        policy_start_s: 2 * HOUR,
        policy_end_s: MINUTE,
        schedule_s: MINUTE,
    },
    // Rolls up page_views_1m: refreshing it after its source picks the source's changes up.
    Aggregate {
        name: "page_views_1h",
        bucket_s: HOUR,
        policy_start_s: 3 * DAY,
        policy_end_s: HOUR,
        schedule_s: 30 * MINUTE,
    },
    Aggregate {
        name: "users_1h",
        bucket_s: HOUR,
        policy_start_s: 3 * DAY,
        policy_end_s: HOUR,
        schedule_s: 30 * MINUTE,
    },
];

/// A time range of one aggregate to refresh, `[start, end)` in Unix milliseconds,
/// aligned to its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    /// The aggregate.
    pub aggregate: &'static str,
    /// First millisecond.
    pub start: i64,
    /// First millisecond after.
    pub end: i64,
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |ms: i64| {
            DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
                .unwrap_or_else(|| ms.to_string())
        };
        write!(f, "{} {}..{}", self.aggregate, t(self.start), t(self.end))
    }
}

/// Which written rows need an explicit refresh of the aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshRule {
    /// Refresh policies exist (`timescale.refresh_policies`): rows they will reach are
    /// left to them.
    pub policies: bool,
    /// Refresh every touched bucket, also those a policy would reach later (a replay
    /// wants its result visible when it ends).
    pub everything: bool,
}

impl RefreshRule {
    /// The bucket ranges that rows at `times` (Unix ms) touch and that no policy will
    /// refresh soon enough, coalesced per aggregate.
    pub fn ranges(&self, times: impl IntoIterator<Item = i64> + Clone, now_ms: i64) -> Vec<Range> {
        let mut out = Vec::new();
        for agg in AGGREGATES {
            let width = agg.bucket_s * 1000;
            // A row the policy's window has not passed by its next run is left to it.
            let reach = now_ms - (agg.policy_start_s - agg.schedule_s) * 1000;
            for t in times.clone() {
                if self.everything || !self.policies || t < reach {
                    let start = t.div_euclid(width) * width;
                    out.push(Range {
                        aggregate: agg.name,
                        start,
                        end: start + width,
                    });
                }
            }
        }
        coalesce(out)
    }
}

/// Merge ranges of the same aggregate that overlap or lie less than an hour apart (a
/// refresh costs little per bucket and much per call).
pub fn coalesce(mut ranges: Vec<Range>) -> Vec<Range> {
    const GAP_MS: i64 = HOUR * 1000;
    ranges.sort();
    let mut out: Vec<Range> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.aggregate == r.aggregate && r.start <= last.end + GAP_MS => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    // Refresh in the order of AGGREGATES: a hierarchical aggregate after its source.
    out.sort_by_key(|r| {
        AGGREGATES
            .iter()
            .position(|a| a.name == r.aggregate)
            .unwrap_or(usize::MAX)
    });
    out
}

fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Record `ranges` in the refresh queue, inside the transaction that wrote their rows.
pub async fn enqueue(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &str,
    ranges: &[Range],
) -> Result<(), tokio_postgres::Error> {
    let names: Vec<&str> = ranges.iter().map(|r| r.aggregate).collect();
    let starts: Vec<DateTime<Utc>> = ranges.iter().map(|r| ts(r.start)).collect();
    let ends: Vec<DateTime<Utc>> = ranges.iter().map(|r| ts(r.end)).collect();
    tx.execute(
        &format!(
            "INSERT INTO {schema}.sluice_refresh_queue (aggregate, bucket_start, bucket_end)
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])"
        ),
        &[&names, &starts, &ends],
    )
    .await
    .map(drop)
}

/// Refresh what the queue holds, coalesced, then remove it from the queue. Returns the
/// ranges refreshed. Several sinks may do this at once: a range refreshed twice is only
/// wasted work.
pub async fn refresh_queued(pool: &Pool, schema: &str) -> Result<Vec<Range>, InsertError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT id, aggregate, (extract(epoch FROM bucket_start) * 1000)::bigint,
                   (extract(epoch FROM bucket_end) * 1000)::bigint
                 FROM {schema}.sluice_refresh_queue ORDER BY id LIMIT 10000"
            ),
            &[],
        )
        .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let queued: Vec<Range> = rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(1);
            let agg = AGGREGATES.iter().find(|a| a.name == name)?;
            Some(Range {
                aggregate: agg.name,
                start: r.get(2),
                end: r.get(3),
            })
        })
        .collect();
    let ranges = coalesce(queued);
    for r in &ranges {
        refresh(&client, schema, r).await?;
    }
    client
        .execute(
            &format!("DELETE FROM {schema}.sluice_refresh_queue WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    metrics::counter!("sluice_sink_aggregate_refreshes_total", "sink" => "timescale")
        .increment(ranges.len() as u64);
    Ok(ranges)
}

/// Refresh one range. The call cannot run inside a transaction (nor, on some servers,
/// through the extended protocol), so it is sent as a simple query; every part of it is
/// generated here, not taken from input.
async fn refresh(
    client: &tokio_postgres::Client,
    schema: &str,
    r: &Range,
) -> Result<(), tokio_postgres::Error> {
    let iso = |ms: i64| ts(ms).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    client
        .batch_execute(&format!(
            "CALL refresh_continuous_aggregate('{schema}.{}', '{}', '{}')",
            r.aggregate,
            iso(r.start),
            iso(r.end)
        ))
        .await
}

/// Refresh every continuous aggregate over all time (tests and the demo).
pub async fn refresh_aggregates(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<(), tokio_postgres::Error> {
    for agg in AGGREGATES {
        client
            .batch_execute(&format!(
                "CALL refresh_continuous_aggregate('{schema}.{}', NULL, NULL)",
                agg.name
            ))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const H: i64 = HOUR * 1000;

    #[test]
    fn recent_rows_are_left_to_the_policies() {
        let rule = RefreshRule {
            policies: true,
            everything: false,
        };
        assert!(rule.ranges([NOW - 10 * 60_000], NOW).is_empty());
        // Five hours ago: out of the per-minute policy's reach, within the hourly ones'.
        let t = NOW - 5 * H;
        let got = rule.ranges([t], NOW);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].aggregate, "page_views_1m");
        assert_eq!(got[0].end - got[0].start, 60_000);
        assert!(got[0].start <= t && t < got[0].end);
        // Last week: every aggregate.
        let week = rule.ranges([NOW - 7 * 24 * H], NOW);
        let names: Vec<&str> = week.iter().map(|r| r.aggregate).collect();
        assert_eq!(names, ["page_views_1m", "page_views_1h", "users_1h"]);
    }

    #[test]
    fn without_policies_or_in_a_replay_everything_touched() {
        for rule in [
            RefreshRule {
                policies: false,
                everything: false,
            },
            RefreshRule {
                policies: true,
                everything: true,
            },
        ] {
            assert_eq!(rule.ranges([NOW - 60_000], NOW).len(), 3);
        }
    }

    #[test]
    fn nearby_buckets_coalesce_and_distant_ones_do_not() {
        let rule = RefreshRule {
            policies: false,
            everything: false,
        };
        let base = NOW - NOW % H - 30 * 24 * H;
        let times = [base, base + 60_000, base + 30 * 60_000, base + 10 * H];
        let minutes: Vec<Range> = rule
            .ranges(times, NOW)
            .into_iter()
            .filter(|r| r.aggregate == "page_views_1m")
            .collect();
        assert_eq!(
            minutes,
            vec![
                Range {
                    aggregate: "page_views_1m",
                    start: base,
                    end: base + 31 * 60_000
                },
                Range {
                    aggregate: "page_views_1m",
                    start: base + 10 * H,
                    end: base + 10 * H + 60_000
                },
            ]
        );
    }
}
