//! Running a replay: a stage or sink under a fresh group bounded by the plan's end
//! offsets, a reset of a group to the range's start, or a batch recomputation of sessions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::replay_scope::ReplayScope;
use sluice_core::wiring::Rewiring;
use tokio_util::sync::CancellationToken;

use super::epoch::LogEntry;
use super::plan::{Plan, TIMEOUT};
use super::{Filters, Mode, Outcome, Target};
use crate::components::{Config, Kind};

/// The names of the active members of `group`, if any (blocking).
pub fn active_members(kafka: &KafkaConfig, group: &str) -> Result<Vec<String>> {
    let consumer: BaseConsumer = kafka.admin_config().create()?;
    let list = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .with_context(|| format!("describing consumer group {group}"))?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| {
            g.members()
                .iter()
                .map(|m| format!("{} ({})", m.client_id(), m.client_host()))
        })
        .collect())
}

/// Commit `offsets` (partition → offset) of `topic` for `group`, which must have no
/// active members (blocking).
pub fn commit_group(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    offsets: &[(i32, i64)],
) -> Result<()> {
    let consumer: BaseConsumer = kafka.consumer_config(group).create()?;
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .with_context(|| format!("committing the start offsets of group {group}"))?;
    Ok(())
}

pub(crate) fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::block_in_place(f)
}

/// Run a replay of `plan` into `target`. `stop` interrupts it (Ctrl-C); what was done
/// is committed and the outcome says how to resume.
pub async fn run(
    config: &Config,
    plan: &Plan,
    target: &Target,
    mode: &Mode,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    let (group, input) = match target {
        Target::Copy(to) => return super::copy::copy(&config.kafka, plan, to, filters, stop).await,
        Target::Component(c) => (c.group(config), c.input(config)),
    };
    if let Target::Component(c) = target {
        if c.kind == Kind::Stage && c.name == "sessionize" {
            match mode {
                // Sessions of a bounded range are recomputed in batch (a streaming run's
                // commits wait for open sessions, and corrected events arrive out of order).
                Mode::FreshGroup(name) => {
                    return replay_sessions(config, plan, name, filters, stop).await
                }
                Mode::ResetGroup { .. } => bail!(
                    "--reset cannot replay sessionize: its group would start mid-session, and the partial sessions, stamped newer, would replace the complete rows they overlap. Drop --reset: `sluice replay --stage sessionize` recomputes the range's sessions in batch"
                ),
            }
        }
    }
    match mode {
        Mode::ResetGroup { execute, save_to } => {
            reset(config, plan, group, input, *execute, save_to.as_deref())
                .map(|()| Outcome::default())
        }
        Mode::FreshGroup(fresh_group) => {
            fresh_rewired(
                config,
                plan,
                target,
                fresh_group,
                filters,
                Rewiring::default(),
                stop,
            )
            .await
        }
    }
}

/// Recompute the sessions of the plan's range in batch and emit them to the sessions
/// topic, where the sessions sink replaces the sessions they overlap.
async fn replay_sessions(
    config: &Config,
    plan: &Plan,
    name: &str,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    let rewiring = Rewiring {
        input: Some(plan.topic.clone()),
        ..Rewiring::default()
    };
    let spec = sluice_stages::sessionize::SessionizeSpec::of(
        &config.shared(),
        &config.sessionize,
        &rewiring,
    )
    .await?;
    let epoch = super::epoch::draw(
        &config.kafka,
        &config.topics,
        &LogEntry::of(name, "stage sessionize", &plan.topic),
    )
    .await?;
    let scope = Arc::new(
        ReplayScope::new(plan.ends(), filters.tenant.clone(), filters.rate).with_epoch(epoch),
    );
    let ranges = plan.ranges.clone();
    let done =
        sluice_stages::sessionize::replay_sessions(&config.kafka, &spec, ranges, scope, name, stop)
            .await
            .context("sessionize replay")?;
    let mut notes = Vec::new();
    if done.at_edges > 0 {
        notes.push(format!(
            "{} session(s) within one gap ({} s) of the range's first or last event time were left as they are: they may continue outside the range; widen it to recompute them",
            done.at_edges, config.sessionize.gap_s
        ));
    }
    if done.undecodable > 0 {
        notes.push(format!(
            "{} record(s) did not decode and were left out",
            done.undecodable
        ));
    }
    if done.interrupted {
        notes.push(
            "interrupted before the end of the range: nothing was emitted; run it again".into(),
        );
    }
    Ok(Outcome {
        read: done.read,
        skipped: done.skipped,
        written: done.sessions,
        dead_lettered: 0,
        interrupted: done.interrupted,
        resume: None,
        notes,
    })
}

/// Offsets of a group saved before a reset, for `--offsets-from` to put back.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedOffsets {
    /// The consumer group.
    pub group: String,
    /// Its input topic.
    pub topic: String,
    /// When they were saved (RFC 3339).
    pub saved_at: String,
    /// `(partition, committed offset)`; 0 where the group had committed nothing.
    pub offsets: Vec<(i32, i64)>,
}

/// `<group>.offsets-<time>.json`, with every character of the group's name that is not
/// a letter, digit, `.`, `_` or `-` replaced by `_`, so that a name holding `/` or `..`
/// cannot place the file elsewhere.
fn offsets_file_name(group: &str, at: chrono::DateTime<chrono::Utc>) -> String {
    let safe: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = match safe.trim_start_matches('.') {
        "" => "group",
        name => name,
    };
    format!("{safe}.offsets-{}.json", at.format("%Y%m%dT%H%M%SZ"))
}

/// Write `bytes` to a file that must not exist yet (no overwrite, no following a
/// symlink planted there), readable by its owner only: saved offsets say where a group
/// stood, and a restore trusts them.
fn write_new_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(file)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Print a group's offsets before and after, per partition.
fn print_offsets(group: &str, topic: &str, current: &[(i32, i64)], new: &[(i32, i64)]) {
    println!("group {group} on {topic}:");
    println!("  {:>9}  {:>14}  {:>14}", "partition", "current", "new");
    for &(p, to) in new {
        let from = current
            .iter()
            .find(|(q, _)| *q == p)
            .map_or("-".to_string(), |(_, o)| o.to_string());
        println!("  {p:>9}  {from:>14}  {to:>14}");
    }
}

/// Commit `new` for `group` on `topic` after showing it; only with `execute`, and after
/// saving the current offsets to `save_to`.
fn move_group(
    config: &Config,
    group: &str,
    topic: &str,
    new: &[(i32, i64)],
    execute: bool,
    save_to: Option<&Path>,
) -> Result<Option<std::path::PathBuf>> {
    let kafka = config.kafka.clone();
    let g = group.to_string();
    let members = blocking(move || active_members(&kafka, &g))?;
    if !members.is_empty() {
        bail!(
            "--reset: consumer group {group} has {} active member(s): {}. Stop them first, or drop --reset to replay under a fresh group",
            members.len(),
            members.join(", ")
        );
    }
    let (kafka, g, t) = (config.kafka.clone(), group.to_string(), topic.to_string());
    let current = blocking(move || Ok(sluice_core::kafka::committed_offsets(&kafka, &g, &t)?))?;
    print_offsets(group, topic, &current, new);
    if !execute {
        println!("nothing changed: add --execute to move the group");
        return Ok(None);
    }
    let now = chrono::Utc::now();
    let file = save_to
        .map(Path::to_path_buf)
        .unwrap_or_else(|| offsets_file_name(group, now).into());
    let saved = SavedOffsets {
        group: group.to_string(),
        topic: topic.to_string(),
        saved_at: now.to_rfc3339(),
        offsets: current,
    };
    write_new_private(&file, &serde_json::to_vec_pretty(&saved)?).with_context(|| {
        format!(
            "--offsets-file {}: cannot write the previous offsets",
            file.display()
        )
    })?;
    let (kafka, g, t, new) = (
        config.kafka.clone(),
        group.to_string(),
        topic.to_string(),
        new.to_vec(),
    );
    blocking(move || commit_group(&kafka, &g, &t, &new))?;
    Ok(Some(file))
}

/// Put back the offsets a reset saved (`replay --offsets-from FILE`).
pub fn restore(config: &Config, file: &Path, execute: bool) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--offsets-from {}", file.display()))?;
    let saved: SavedOffsets = serde_json::from_str(&text).with_context(|| {
        format!(
            "--offsets-from {}: not a file of saved offsets",
            file.display()
        )
    })?;
    // The offsets it replaces are saved beside the file restored from (the group's name
    // comes from the file, so it is made safe as a file name first).
    let beside = file.with_file_name(offsets_file_name(&saved.group, chrono::Utc::now()));
    let before = move_group(
        config,
        &saved.group,
        &saved.topic,
        &saved.offsets,
        execute,
        Some(&beside),
    )?;
    if let Some(before) = before {
        println!(
            "group {} is back at the offsets of {} (those it had are in {})",
            saved.group,
            saved.saved_at,
            before.display()
        );
    }
    Ok(())
}

/// Move the target's own group to the start of the range, refusing while it has members.
fn reset(
    config: &Config,
    plan: &Plan,
    group: &str,
    input: &str,
    execute: bool,
    save_to: Option<&Path>,
) -> Result<()> {
    if input != plan.topic {
        bail!(
            "--reset: group {group} consumes `{input}`, not `{}`; drop --reset to replay `{}` under a fresh group",
            plan.topic,
            plan.topic
        );
    }
    let starts: Vec<(i32, i64)> = plan.ranges.iter().map(|r| (r.partition, r.start)).collect();
    if let Some(saved) = move_group(config, group, &plan.topic, &starts, execute, save_to)? {
        println!(
            "group {group} now starts at the range start on {} partition(s) of {}; its processes reprocess from there to the live end",
            plan.ranges.len(),
            plan.topic
        );
        println!(
            "previous offsets saved to {}: undo with `sluice replay --offsets-from {} --execute`",
            saved.display(),
            saved.display()
        );
    }
    Ok(())
}

pub(crate) fn progress(total: i64) -> ProgressBar {
    let bar = ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Run the target stage or sink here under a fresh group until its commits reach the
/// plan's end offsets, a stage's outputs and dead letters sent where `outputs` says.
pub(crate) async fn fresh_rewired(
    config: &Config,
    plan: &Plan,
    target: &Target,
    group: &str,
    filters: &Filters,
    outputs: Rewiring,
    stop: CancellationToken,
) -> Result<Outcome> {
    let kafka = config.kafka.clone();
    let g = group.to_string();
    let members = blocking(move || active_members(&kafka, &g))?;
    if !members.is_empty() {
        bail!("--group: consumer group {group} has active members; choose another name");
    }
    // Start where the range starts; partitions outside it start (and stay) at their end.
    let (kafka, topic) = (config.kafka.clone(), plan.topic.clone());
    let ranged: HashMap<i32, i64> = plan.ranges.iter().map(|r| (r.partition, r.start)).collect();
    let total = plan.partitions_total as i32;
    let starts: Vec<(i32, i64)> = blocking(move || {
        let ends = sluice_core::kafka::end_offsets(&kafka, &topic)?;
        Ok((0..total)
            .map(|p| {
                let end = ends.iter().find(|(q, _)| *q == p).map_or(0, |(_, e)| *e);
                (p, ranged.get(&p).copied().unwrap_or(end))
            })
            .collect())
    })?;
    let (kafka, g, topic) = (config.kafka.clone(), group.to_string(), plan.topic.clone());
    blocking(move || commit_group(&kafka, &g, &topic, &starts))?;

    let what = match target {
        Target::Component(c) => format!("{} {}", c.kind.as_str(), c.name),
        Target::Copy(to) => format!("copy {to}"),
    };
    let epoch = super::epoch::draw(
        &config.kafka,
        &config.topics,
        &LogEntry::of(group, &what, &plan.topic),
    )
    .await?;
    let scope = Arc::new(
        ReplayScope::new(plan.ends(), filters.tenant.clone(), filters.rate).with_epoch(epoch),
    );
    let rewiring = Rewiring {
        group: Some(group.to_string()),
        input: Some(plan.topic.clone()),
        scope: Some(scope.clone()),
        ..outputs
    };
    let runner = CancellationToken::new();
    let (cfg, r, token) = (config.clone(), rewiring, runner.clone());
    let target = target.clone();
    let task = tokio::spawn(async move {
        match target {
            Target::Component(c) => c.run_rewired(&cfg, r, token).await,
            Target::Copy(to) => anyhow::bail!("copying to {to} runs no stage or sink"),
        }
    });
    let bar = progress(plan.records());
    let mut interrupted = false;
    let mut committed: HashMap<i32, i64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => { interrupted = true; break; }
            _ = tick.tick() => {}
        }
        bar.set_position(scope.admitted() + scope.skipped());
        if task.is_finished() {
            break;
        }
        committed = group_positions(config, group, &plan.topic)?;
        if plan
            .ranges
            .iter()
            .all(|r| committed.get(&r.partition).is_some_and(|c| *c >= r.end))
        {
            break;
        }
    }
    runner.cancel();
    let done = task.await.context("replay task")??;
    let (read, written, dead_lettered, notes) =
        (done.consumed, done.written, done.dead_lettered, done.notes);
    bar.finish_and_clear();
    if interrupted {
        committed = group_positions(config, group, &plan.topic)?;
    }
    let resume = plan.resume_offsets(&committed);
    Ok(Outcome {
        read,
        skipped: scope.skipped(),
        written,
        dead_lettered,
        interrupted,
        resume: (interrupted && !resume.is_empty()).then_some(resume),
        notes,
    })
}

/// The offsets `group` committed on `topic`, by partition.
fn group_positions(config: &Config, group: &str, topic: &str) -> Result<HashMap<i32, i64>> {
    let (kafka, g, t) = (config.kafka.clone(), group.to_string(), topic.to_string());
    let committed = blocking(move || Ok(sluice_core::kafka::committed_offsets(&kafka, &g, &t)?))?;
    Ok(committed.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_name_cannot_move_the_offsets_file() {
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap_or_default();
        let name = offsets_file_name("../../etc/cron.d/x", at);
        assert_eq!(name, "_.._etc_cron.d_x.offsets-19700101T000000Z.json");
        assert!(!name.contains('/'));
        let hidden = offsets_file_name("..", at);
        assert!(!hidden.starts_with('.'), "{hidden}");
    }

    #[test]
    fn offsets_files_are_new_and_private() {
        let dir = std::env::temp_dir().join(format!("sluice-offsets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let file = dir.join("g.json");
        let _ = std::fs::remove_file(&file);
        write_new_private(&file, b"{}").unwrap_or_else(|e| panic!("{e}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).map(|m| m.permissions().mode() & 0o777);
            assert_eq!(mode.ok(), Some(0o600));
        }
        let again = write_new_private(&file, b"[]").unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).ok().as_deref(), Some(&b"{}"[..]));
        // A symlink planted at the name is not followed.
        #[cfg(unix)]
        {
            let link = dir.join("link.json");
            let target = dir.join("target.json");
            let _ = std::fs::remove_file(&link);
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(&target, &link).unwrap_or_else(|e| panic!("{e}"));
            assert!(write_new_private(&link, b"x").is_err());
            assert!(!target.exists());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
