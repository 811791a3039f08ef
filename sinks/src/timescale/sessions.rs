//! Session summaries into the sessions table, newest processing wins.
//!
//! A user's sessions never overlap: events less than the gap apart are one session. So a
//! stored session that overlaps an incoming one of the same user is a version of it
//! from another processing. When the incoming one is newer, the overlapped ones go (a
//! corrected event or gap merged or split them); when a stored one is newer, the
//! incoming one is stale and changes nothing. A session re-emitted unchanged (after a
//! restart) has the same key and is written once. Writers of the same users take turns
//! (an advisory lock per user), so concurrent writers cannot both keep overlapping
//! versions.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sluice_core::failure::Failure;
use sluice_core::headers::split_version;
use sluice_schemas::SessionSummary;

use super::errors::{InsertError, Verdict};
use super::Pool;
use crate::consumer::{BatchWriter, Versioned, WriteError, WriteResult};
use sluice_core::retry::RetryAction;

/// Writes session summaries into the sessions table.
pub struct SessionsWriter {
    pool: Pool,
    write: String,
}

/// Takes a transaction-scoped advisory lock per (tenant, user) of the batch, in sorted
/// order (so two writers never wait on each other in a cycle). The write's "is a newer
/// version stored?" and its delete of older ones see only committed rows: without the
/// lock, two writers (a live sink and a replay's, or one with `pool_size` > 1) could each
/// miss the other's overlapping session and both keep theirs.
const LOCK_USERS: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended(tenant || chr(31) || user_id, 0))
     FROM (SELECT DISTINCT tenant, user_id FROM unnest($1::text[], $2::text[]) AS u(tenant, user_id)
           ORDER BY tenant, user_id) AS k";

impl SessionsWriter {
    /// A writer into `schema`'s sessions table through `pool` (already migrated).
    pub fn new(pool: Pool, schema: &str) -> Self {
        let overlaps = "s.tenant = i.tenant AND s.user_id = i.user_id
            AND s.started_at <= i.ended_at AND s.ended_at >= i.started_at";
        // A version is (replay epoch, processing time), compared as a row.
        let stored = "(s.replay_epoch, coalesce(s.processed_at, '-infinity'))";
        let write = format!(
            "WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                 $5::timestamptz[], $6::int[], $7::int[], $8::bigint[], $9::timestamptz[], $10::int[])
               AS r(tenant, user_id, session_id, started_at, ended_at, page_views, events, duration_ms, processed_at, replay_epoch)),
             fresh AS (
               SELECT i.* FROM input i WHERE NOT EXISTS (
                 SELECT 1 FROM {schema}.sessions s WHERE {overlaps}
                   AND {stored} > (i.replay_epoch, i.processed_at))),
             replaced AS (
               DELETE FROM {schema}.sessions s USING fresh i
               WHERE {overlaps} AND {stored} < (i.replay_epoch, i.processed_at)
                 AND NOT (s.session_id = i.session_id AND s.started_at = i.started_at)
               RETURNING 1)
             INSERT INTO {schema}.sessions AS s
               (tenant, user_id, session_id, started_at, ended_at, page_views, events, duration_ms, processed_at, replay_epoch)
             SELECT * FROM fresh ORDER BY tenant, session_id
             ON CONFLICT (tenant, session_id, started_at) DO UPDATE SET
               ended_at = EXCLUDED.ended_at, page_views = EXCLUDED.page_views, events = EXCLUDED.events,
               duration_ms = EXCLUDED.duration_ms, processed_at = EXCLUDED.processed_at,
               replay_epoch = EXCLUDED.replay_epoch
             WHERE (s.replay_epoch, s.processed_at) IS DISTINCT FROM (EXCLUDED.replay_epoch, EXCLUDED.processed_at)
               AND {stored} <= (EXCLUDED.replay_epoch, EXCLUDED.processed_at)"
        );
        Self { pool, write }
    }

    async fn upsert(&self, rows: &[&Versioned<SessionSummary>]) -> Result<(), InsertError> {
        let ts = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let tenant: Vec<&str> = rows.iter().map(|r| r.record.tenant.as_str()).collect();
        let user: Vec<&str> = rows.iter().map(|r| r.record.user_id.as_str()).collect();
        let id: Vec<&str> = rows.iter().map(|r| r.record.session_id.as_str()).collect();
        let start: Vec<DateTime<Utc>> = rows.iter().map(|r| ts(r.record.started_at)).collect();
        let end: Vec<DateTime<Utc>> = rows.iter().map(|r| ts(r.record.ended_at)).collect();
        let views: Vec<i32> = rows.iter().map(|r| r.record.page_views).collect();
        let events: Vec<i32> = rows.iter().map(|r| r.record.events).collect();
        let duration: Vec<i64> = rows.iter().map(|r| r.record.duration_ms).collect();
        let split: Vec<(u32, i64)> = rows.iter().map(|r| split_version(r.version)).collect();
        let version: Vec<DateTime<Utc>> = split.iter().map(|&(_, at)| ts(at)).collect();
        let epoch: Vec<i32> = split.iter().map(|&(e, _)| e as i32).collect();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(LOCK_USERS, &[&tenant, &user]).await?;
        tx.execute(
            &self.write,
            &[
                &tenant, &user, &id, &start, &end, &views, &events, &duration, &version, &epoch,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Of sessions in one batch that overlap (versions of one session from different
/// processings), the newest; the others are dropped. Returns indices in batch order.
fn newest_overlapping(batch: &[Versioned<SessionSummary>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(batch[i].version));
    // Only a user's own sessions can overlap, so each is compared with those alone: a
    // batch is mostly distinct users, and comparing with every kept session was
    // quadratic in the batch size.
    let mut kept_of_user: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    let mut kept: Vec<usize> = Vec::with_capacity(batch.len());
    for i in order {
        let s = &batch[i].record;
        let theirs = kept_of_user
            .entry((s.tenant.as_str(), s.user_id.as_str()))
            .or_default();
        let shadowed = theirs.iter().any(|&k| {
            let t = &batch[k].record;
            t.started_at <= s.ended_at
                && t.ended_at >= s.started_at
                && batch[k].version > batch[i].version
        });
        let same = theirs.iter().any(|&k| batch[k] == batch[i]);
        if !shadowed && !same {
            theirs.push(i);
            kept.push(i);
        }
    }
    kept.sort_unstable();
    kept
}

impl SessionsWriter {
    /// Write a batch; rows the database refuses for their data are written one by one,
    /// so that only they are rejected.
    async fn write_rows(
        &self,
        batch: &[Versioned<SessionSummary>],
    ) -> Result<Vec<(usize, Failure)>, WriteError> {
        let keep = newest_overlapping(batch);
        let rows: Vec<&Versioned<SessionSummary>> = keep.iter().map(|&i| &batch[i]).collect();
        match self.upsert(&rows).await {
            Ok(()) => return Ok(Vec::new()),
            Err(e) => {
                e.into_write_error()?;
            }
        }
        // Refused for its data: row by row, so only the bad ones are dead-lettered.
        let mut failures = Vec::new();
        for (&i, row) in keep.iter().zip(&rows) {
            if let Err(e) = self.upsert(&[row]).await {
                let reason = e.to_string();
                if e.into_write_error()? == Verdict::Row {
                    failures.push((i, Failure::new("write", reason)));
                }
            }
        }
        Ok(failures)
    }
}

impl BatchWriter for SessionsWriter {
    type Record = SessionSummary;

    fn name(&self) -> &'static str {
        "sessions"
    }

    async fn write(&self, batch: &[Versioned<SessionSummary>]) -> WriteResult {
        self.write_rows(batch)
            .await
            .map_or_else(WriteResult::from, RetryAction::Successful)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, start: i64, end: i64, processed_at: i64) -> Versioned<SessionSummary> {
        Versioned {
            record: SessionSummary {
                session_id: format!("{user}-{start}"),
                tenant: "t".into(),
                user_id: user.into(),
                started_at: start,
                ended_at: end,
                page_views: 1,
                events: 1,
                duration_ms: end - start,
            },
            version: processed_at,
        }
    }

    #[test]
    fn an_older_overlapping_version_in_the_same_batch_is_dropped() {
        let batch = vec![
            session("a", 0, 10, 1),
            session("a", 45, 50, 1),
            // The correction merged both into one session.
            session("a", 0, 50, 2),
            session("b", 0, 10, 1),
            session("b", 0, 10, 1),
        ];
        assert_eq!(newest_overlapping(&batch), vec![2, 3]);
    }

    /// The definition, as first written: each session against every kept one.
    fn every_pair(batch: &[Versioned<SessionSummary>]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(batch[i].version));
        let mut kept: Vec<usize> = Vec::with_capacity(batch.len());
        for i in order {
            let s = &batch[i].record;
            let shadowed = kept.iter().any(|&k| {
                let t = &batch[k].record;
                t.tenant == s.tenant
                    && t.user_id == s.user_id
                    && t.started_at <= s.ended_at
                    && t.ended_at >= s.started_at
                    && batch[k].version > batch[i].version
            });
            let same = kept.iter().any(|&k| batch[k] == batch[i]);
            if !shadowed && !same {
                kept.push(i);
            }
        }
        kept.sort_unstable();
        kept
    }

    proptest::proptest! {
        /// Comparing within a user keeps what comparing with every kept session kept:
        /// few users, tenants and times, so that overlaps, duplicates and ties are common.
        #[test]
        fn keeps_what_every_pair_keeps(
            rows in proptest::collection::vec((0u8..3, 0u8..4, 0i64..60, 0i64..30, 0i64..4), 0..60),
        ) {
            let batch: Vec<_> = rows
                .iter()
                .map(|&(tenant, user, start, len, processed_at)| {
                    let mut s = session(&format!("u{user}"), start, start + len, processed_at);
                    s.record.tenant = format!("t{tenant}");
                    s
                })
                .collect();
            proptest::prop_assert_eq!(newest_overlapping(&batch), every_pair(&batch));
        }
    }

    /// The cost grows with the batch, not with its square: ten times the sessions of
    /// distinct users take about ten times as long (a hundred times before). Best of
    /// several, so the ratio is of this machine at this moment.
    #[test]
    fn a_batch_costs_in_proportion_to_its_size() {
        let batch = |n: usize| -> Vec<_> {
            (0..n)
                .map(|i| session(&format!("user-{i}"), 0, 10, 1))
                .collect()
        };
        let (small, large) = (batch(1_000), batch(10_000));
        let time = |b: &[Versioned<SessionSummary>]| {
            sluice_core::timing::fastest(
                5,
                || (),
                |_| assert_eq!(newest_overlapping(b).len(), b.len()),
            )
        };
        let (small_t, large_t) = (time(&small), time(&large));
        let ratio = sluice_core::timing::slowdown(large_t, small_t);
        assert!(
            ratio < 35.0,
            "10,000 sessions took {ratio:.0}x 1,000 ({large_t:?} vs {small_t:?})"
        );
    }
}
