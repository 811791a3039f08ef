//! What a process used, from `/proc`: CPU seconds (also per thread) and resident memory.

use std::collections::BTreeMap;

use anyhow::Result;

/// CPU seconds (user + system) process `pid` used so far.
pub fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = procfs::process::Process::new(pid)?.stat()?;
    Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// CPU seconds process `pid` and its children used so far, reaped children included: a
/// server that forks a process per connection (PostgreSQL) spends its work in them.
pub fn tree_cpu_seconds(pid: i32) -> Result<f64> {
    let root = procfs::process::Process::new(pid)?.stat()?;
    let mut ticks = (root.utime + root.stime) as f64 + (root.cutime + root.cstime).max(0) as f64;
    for p in procfs::process::all_processes()?.flatten() {
        // A child that exits meanwhile is skipped; its time moves to the root's cutime.
        if let Ok(s) = p.stat() {
            if s.ppid == pid {
                ticks += (s.utime + s.stime) as f64;
            }
        }
    }
    Ok(ticks / procfs::ticks_per_second() as f64)
}

/// Resident memory of process `pid` now, and its peak, in bytes.
pub fn rss_bytes(pid: i32) -> Result<(u64, u64)> {
    let status = procfs::process::Process::new(pid)?.status()?;
    let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
    Ok((kib(status.vmrss), kib(status.vmhwm)))
}

/// CPU seconds this process used so far.
pub fn own_cpu_seconds() -> Result<f64> {
    cpu_seconds(std::process::id() as i32)
}

/// The process id of the stack's service `name` (from `scripts/stack`'s pid file), if
/// the stack runs here.
pub fn service_pid(name: &str) -> Option<i32> {
    let file = sluice_tests::stack_env_path()
        .parent()?
        .join("run")
        .join(format!("{name}.pid"));
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// CPU seconds used by this process and by the broker (0 when its pid is unknown): what
/// a pass costs on each side of the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    /// This process (the bench, and a stage it runs in-process).
    pub process: f64,
    /// The Kafka broker.
    pub broker: f64,
}

impl CpuSplit {
    /// Both counters now.
    pub fn now() -> Self {
        let broker = service_pid("kafka")
            .and_then(|p| cpu_seconds(p).ok())
            .unwrap_or(0.0);
        Self {
            process: own_cpu_seconds().unwrap_or(0.0),
            broker,
        }
    }

    /// What each side used since `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            process: self.process - before.process,
            broker: self.broker - before.broker,
        }
    }

    /// CPU microseconds per record of each side, for `records` records.
    pub fn per_record(&self, records: usize) -> (f64, f64) {
        let per = |seconds: f64| seconds * 1e6 / records.max(1) as f64;
        (per(self.process), per(self.broker))
    }
}

/// CPU seconds each thread of process `pid` used so far, summed by thread name with its
/// numbers replaced by `#` (`rdk:broker#`, `data-plane-kafka-request-handler-#`): one
/// entry per kind of thread. Threads that ended meanwhile are not counted.
pub fn thread_cpu_seconds(pid: i32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = procfs::process::Process::new(pid).and_then(|p| p.tasks()) else {
        return out;
    };
    let ticks = procfs::ticks_per_second() as f64;
    for t in tasks.flatten() {
        if let Ok(stat) = t.stat() {
            *out.entry(thread_kind(&stat.comm)).or_insert(0.0) +=
                (stat.utime + stat.stime) as f64 / ticks;
        }
    }
    out
}

/// A thread's name with each run of digits replaced by `#`.
fn thread_kind(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Per-thread CPU seconds of this process and of the broker: where a pass's time goes.
#[derive(Debug, Clone, Default)]
pub struct ThreadSplit {
    /// This process's threads, by kind.
    pub process: BTreeMap<String, f64>,
    /// The broker's threads, by kind.
    pub broker: BTreeMap<String, f64>,
}

impl ThreadSplit {
    /// Both now.
    pub fn now() -> Self {
        Self {
            process: thread_cpu_seconds(std::process::id() as i32),
            broker: service_pid("kafka")
                .map(thread_cpu_seconds)
                .unwrap_or_default(),
        }
    }

    /// What each kind of thread used since `before`.
    pub fn since(&self, before: &Self) -> Self {
        let diff = |now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .collect()
        };
        Self {
            process: diff(&self.process, &before.process),
            broker: diff(&self.broker, &before.broker),
        }
    }

    /// Add `other`'s seconds to these.
    pub fn add(&mut self, other: &Self) {
        for (mine, theirs) in [
            (&mut self.process, &other.process),
            (&mut self.broker, &other.broker),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_insert(0.0) += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_kinds_fold_their_numbers() {
        assert_eq!(thread_kind("rdk:broker1"), "rdk:broker#");
        assert_eq!(
            thread_kind("data-plane-kafka-request-handler-12"),
            "data-plane-kafka-request-handler-#"
        );
        assert_eq!(thread_kind("tokio-runtime-w"), "tokio-runtime-w");
    }

    #[test]
    fn this_process_has_threads_with_cpu() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let threads = thread_cpu_seconds(std::process::id() as i32);
        assert!(!threads.is_empty());
    }
}
