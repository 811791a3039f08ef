//! What a process used, from `/proc`: CPU seconds and resident memory.

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
